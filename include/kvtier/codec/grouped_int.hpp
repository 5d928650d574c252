#pragma once
// Grouped int8 / int4 quantization of a bf16 or fp16 chunk in the style of KIVI: K per channel
// (a group is `group_size` consecutive tokens of one channel), V per token (a group is
// `group_size` consecutive channels of one token), each group with its own scale and minimum.

#include "kvtier/codec/concept.hpp"
#include "kvtier/codec/descriptor.hpp"
#include "kvtier/codec/float16.hpp"
#include "kvtier/detail/checked.hpp"
#include "kvtier/layout/chunk_format.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace kvtier::codec {

/// Asymmetric grouped quantization to `bits` (8 or 4) bits per element.
///
/// Each group stores a float32 minimum `m` and scale `s = (max - min) / (2^bits - 1)`; an element
/// `x` becomes `q = round((x - m) / s)` and decodes to `q * s + m`, rounded to the source type, so
/// the error is at most `s / 2` plus the source type's own rounding (half an ulp of the result).
/// Asymmetric rather than symmetric because K channels carry large per-channel offsets (the
/// outlier channels KIVI quantizes per channel for): a symmetric grid centred on zero would spend
/// half its codes on values a shifted channel never takes, which doubles `s` at 4 bits.
///
/// Plane 0 of each layer (K, or MLA's single latent plane) is grouped per channel: a group is up
/// to `group_size` consecutive tokens of one (head, element); plane 1 (V) per token: up to
/// `group_size` consecutive elements of one token's heads x head_size row. A partial last group
/// is its own group. Elements are meant to be finite: a NaN quantizes to the group's minimum, an
/// infinity makes its group's scale infinite.
///
/// Encoded: the 32-byte header, then for each (layer, plane) in chunk order the groups'
/// (minimum, scale) float32 pairs, then the codes in the chunk's element order (int4: two per
/// byte, the even element in the low nibble). Encode keeps a per-channel minimum and maximum in
/// scratch reserved at construction, so neither encode nor decode allocates; O(elements).
/// Encode uses the scratch: one thread per codec object; decode is const and may run
/// concurrently.
class grouped_int_codec {
 public:
  /// Throws invalid_argument for bits other than 8 or 4, a group size of 0 or over 2^32-1, or a
  /// format that does not hold 2-byte `source` elements.
  grouped_int_codec(const layout::chunk_format& f, elem_type source, unsigned bits,
                    std::size_t group_size)
      : format_(f), source_(source), bits_(bits), group_(group_size) {
    detail::check_lossy_format(f, source, "grouped_int_codec");
    if (bits != 8 && bits != 4) {
      throw invalid_argument("kvtier: grouped_int_codec takes 8 or 4 bits, not " +
                             std::to_string(bits));
    }
    if (group_size == 0 || group_size > 0xffffffffu) {
      throw invalid_argument("kvtier: grouped_int_codec group size " + std::to_string(group_size) +
                             " is not 1 to 2^32-1");
    }
    channels_ = kvtier::detail::checked_mul(f.heads, f.head_size, "grouped_int_codec channels");
    (void)max_encoded_bytes(f.chunk_tokens);
    const std::size_t c = channels_;
    lo_ = kvtier::detail::reserving("grouped_int_codec scratch", c * 4,
                                    [c] { return std::vector<float>(c); });
    hi_ = kvtier::detail::reserving("grouped_int_codec scratch", c * 4,
                                    [c] { return std::vector<float>(c); });
    row_ = kvtier::detail::reserving("grouped_int_codec scratch", c,
                                     [c] { return std::vector<std::uint8_t>(c); });
    if (source == elem_type::fp16) {
      fp16_float_ = kvtier::detail::reserving("grouped_int_codec's fp16 table", 65536 * 4,
                                              [] { return std::vector<float>(65536); });
      for (std::uint32_t h = 0; h < 65536; ++h) {
        fp16_float_[h] = fp16_to_float(static_cast<std::uint16_t>(h));
      }
    }
  }

  [[nodiscard]] codec_descriptor descriptor() const noexcept {
    return {bits_ == 8 ? codec_id::int8_grouped : codec_id::int4_grouped, source_, 0, false,
            static_cast<std::uint32_t>(group_)};
  }
  [[nodiscard]] const layout::chunk_format& format() const noexcept { return format_; }
  [[nodiscard]] unsigned bits() const noexcept { return bits_; }
  [[nodiscard]] std::size_t group_size() const noexcept { return group_; }

  /// Groups of plane `plane` (0: K, 1: V) of one layer of a chunk of `tokens` tokens.
  [[nodiscard]] std::size_t groups(std::size_t plane, std::size_t tokens) const noexcept {
    return plane == 0 ? (tokens + group_ - 1) / group_ * channels_
                      : tokens * ((channels_ + group_ - 1) / group_);
  }

  /// Exact encoded size of `tokens` tokens (header included); also the bound encode needs.
  /// Checked arithmetic: throws invalid_argument when it would overflow.
  [[nodiscard]] std::size_t max_encoded_bytes(std::size_t tokens) const {
    using kvtier::detail::checked_add;
    using kvtier::detail::checked_mul;
    std::size_t per_layer = 0;
    for (std::size_t p = 0; p < format_.kv_planes; ++p) {
      per_layer = checked_add(per_layer, plane_bytes(p, tokens), "grouped_int encoded plane");
    }
    return checked_add(header_bytes, checked_mul(format_.layers, per_layer, "grouped_int layers"),
                       "grouped_int encoded bytes");
  }

  /// Encodes `src`, `tokens` tokens in the chunk format, into `out` (at least
  /// max_encoded_bytes(tokens)); returns the bytes written. Throws invalid_argument on bad sizes.
  std::size_t encode(std::span<const std::byte> src, std::size_t tokens, std::span<std::byte> out) {
    const std::size_t size = max_encoded_bytes(tokens);
    detail::check_encode(format_, src.size(), tokens, out.size(), size);
    detail::write_header({descriptor(), static_cast<std::uint32_t>(tokens), format_.fingerprint(),
                          size - header_bytes},
                         out.data());
    const bool fp16 = source_ == elem_type::fp16;
    if (fp16 && bits_ == 8) encode_all<true, 8>(src.data(), tokens, out.data() + header_bytes);
    if (fp16 && bits_ == 4) encode_all<true, 4>(src.data(), tokens, out.data() + header_bytes);
    if (!fp16 && bits_ == 8) encode_all<false, 8>(src.data(), tokens, out.data() + header_bytes);
    if (!fp16 && bits_ == 4) encode_all<false, 4>(src.data(), tokens, out.data() + header_bytes);
    return size;
  }

  /// Decodes `in` into `out` (at least format().bytes(tokens)); returns the tokens decoded.
  /// Throws codec_error when `in` is not this codec's encoding of this chunk format.
  std::size_t decode(std::span<const std::byte> in, std::span<std::byte> out) const {
    const encoded_header h = detail::read_header(in, descriptor(), format_);
    const std::size_t tokens = h.tokens;
    if (h.payload != max_encoded_bytes(tokens) - header_bytes) {
      detail::bad("has " + std::to_string(h.payload) + " payload bytes, " + std::to_string(tokens) +
                  " tokens at " + std::to_string(bits_) + " bits are " +
                  std::to_string(max_encoded_bytes(tokens) - header_bytes));
    }
    detail::check_decode_out(format_, tokens, out.size());
    const bool fp16 = source_ == elem_type::fp16;
    const std::byte* s = in.data() + header_bytes;
    if (fp16 && bits_ == 8) decode_all<true, 8>(s, tokens, out.data());
    if (fp16 && bits_ == 4) decode_all<true, 4>(s, tokens, out.data());
    if (!fp16 && bits_ == 8) decode_all<false, 8>(s, tokens, out.data());
    if (!fp16 && bits_ == 4) decode_all<false, 4>(s, tokens, out.data());
    return tokens;
  }

 private:
  [[nodiscard]] std::size_t plane_bytes(std::size_t plane, std::size_t tokens) const {
    using kvtier::detail::checked_add;
    using kvtier::detail::checked_mul;
    const std::size_t n = checked_mul(tokens, channels_, "grouped_int plane elements");
    const std::size_t groups =
        plane == 0 ? checked_mul(tokens / group_ + (tokens % group_ != 0), channels_,
                                 "grouped_int K groups")
                   : checked_mul(tokens, channels_ / group_ + (channels_ % group_ != 0),
                                 "grouped_int V groups");
    return checked_add(checked_mul(groups, 8, "grouped_int group parameters"),
                       bits_ == 8 ? n : n / 2 + n % 2, "grouped_int plane bytes");
  }

  template <bool Fp16>
  [[nodiscard]] float load(const std::byte* plane, std::size_t i) const noexcept {
    std::uint16_t h;
    std::memcpy(&h, plane + 2 * i, 2);
    if constexpr (Fp16) {
      return fp16_float_[h];  // a table: binary16's subnormals and specials branch otherwise
    } else {
      return bf16_to_float(h);
    }
  }
  template <bool Fp16>
  static void store(std::byte* out, std::size_t i, float v) noexcept {
    const std::uint16_t h = Fp16 ? float_to_fp16(v) : float_to_bf16(v);
    std::memcpy(out + 2 * i, &h, 2);
  }
  template <unsigned Bits>
  [[nodiscard]] static unsigned code(const std::byte* codes, std::size_t i) noexcept {
    if constexpr (Bits == 8) {
      return static_cast<unsigned>(codes[i]);
    } else {
      return (static_cast<unsigned>(codes[i / 2]) >> ((i & 1) * 4)) & 0xfu;
    }
  }
  // Writes the `n` codes of one row, element `first` of the plane onwards; int4 codes go two to
  // a byte, the even element low, into bytes zeroed beforehand (a row may start or end mid-byte).
  template <unsigned Bits>
  static void store_row(const std::uint8_t* q, std::size_t n, std::byte* codes,
                        std::size_t first) noexcept {
    if constexpr (Bits == 8) {
      std::memcpy(codes + first, q, n);
    } else {
      std::size_t j = 0;
      if ((first & 1) != 0 && n > 0) {
        codes[first / 2] |= static_cast<std::byte>(q[0] << 4);
        j = 1;
      }
      std::byte* o = codes + (first + j) / 2;
      for (; j + 1 < n; j += 2) *o++ = static_cast<std::byte>(q[j] | (q[j + 1] << 4));
      if (j < n) *o |= static_cast<std::byte>(q[j]);
    }
  }
  // Stores (minimum, scale) of a group and returns 1 / scale, 0 for a constant group (every code
  // 0, decoded to the minimum exactly).
  template <unsigned Bits>
  [[nodiscard]] static float params(std::byte* at, float lo, float hi) noexcept {
    if (!(lo <= hi)) lo = hi = 0;  // every element a NaN
    const float sc = (hi - lo) / static_cast<float>((1u << Bits) - 1);
    std::memcpy(at, &lo, 4);
    std::memcpy(at + 4, &sc, 4);
    return sc > 0 ? 1.0f / sc : 0.0f;
  }
  template <unsigned Bits>
  [[nodiscard]] static std::uint8_t quantize(float x, float lo, float inv) noexcept {
    constexpr float top = static_cast<float>((1u << Bits) - 1);
    float r = (x - lo) * inv;
    r = r > 0.0f ? r : 0.0f;  // also a NaN: the comparison is false
    r = r < top ? r : top;
    return static_cast<std::uint8_t>(r + 0.5f);
  }

  template <bool Fp16, unsigned Bits>
  void encode_all(const std::byte* s, std::size_t tokens, std::byte* o) {
    const std::size_t plane_elems = tokens * channels_;
    for (std::size_t l = 0; l < format_.layers; ++l) {
      for (std::size_t p = 0; p < format_.kv_planes; ++p) {
        std::byte* codes = o + groups(p, tokens) * 8;
        if constexpr (Bits == 4) std::memset(codes, 0, (plane_elems + 1) / 2);
        if (p == 0) {
          encode_per_channel<Fp16, Bits>(s, tokens, o, codes);
        } else {
          encode_per_token<Fp16, Bits>(s, tokens, o, codes);
        }
        s += plane_elems * 2;
        o += plane_bytes(p, tokens);
      }
    }
  }
  template <bool Fp16, unsigned Bits>
  void encode_per_channel(const std::byte* plane, std::size_t tokens, std::byte* params_out,
                          std::byte* codes) {
    const std::size_t c_n = channels_;
    float* lo = lo_.data();
    float* hi = hi_.data();
    std::uint8_t* q = row_.data();
    for (std::size_t t0 = 0; t0 < tokens; t0 += group_) {
      const std::size_t t1 = std::min(tokens, t0 + group_);
      std::fill(lo, lo + c_n, std::numeric_limits<float>::infinity());
      std::fill(hi, hi + c_n, -std::numeric_limits<float>::infinity());
      for (std::size_t t = t0; t < t1; ++t) {
        for (std::size_t c = 0; c < c_n; ++c) {
          const float x = load<Fp16>(plane, t * c_n + c);
          lo[c] = x < lo[c] ? x : lo[c];
          hi[c] = x > hi[c] ? x : hi[c];
        }
      }
      std::byte* at = params_out + t0 / group_ * c_n * 8;
      for (std::size_t c = 0; c < c_n; ++c) {
        const float inv = params<Bits>(at + c * 8, lo[c], hi[c]);
        lo[c] = lo[c] <= hi[c] ? lo[c] : 0.0f;
        hi[c] = inv;  // hi now holds 1 / scale
      }
      for (std::size_t t = t0; t < t1; ++t) {
        for (std::size_t c = 0; c < c_n; ++c) {
          q[c] = quantize<Bits>(load<Fp16>(plane, t * c_n + c), lo[c], hi[c]);
        }
        store_row<Bits>(q, c_n, codes, t * c_n);
      }
    }
  }
  template <bool Fp16, unsigned Bits>
  void encode_per_token(const std::byte* plane, std::size_t tokens, std::byte* params_out,
                        std::byte* codes) {
    const std::size_t c_n = channels_;
    const std::size_t cg = (c_n + group_ - 1) / group_;
    std::uint8_t* q = row_.data();
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t g = 0; g < cg; ++g) {
        const std::size_t c0 = g * group_, c1 = std::min(c_n, c0 + group_);
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (std::size_t c = c0; c < c1; ++c) {
          const float x = load<Fp16>(plane, t * c_n + c);
          lo = x < lo ? x : lo;
          hi = x > hi ? x : hi;
        }
        const float inv = params<Bits>(params_out + (t * cg + g) * 8, lo, hi);
        if (!(lo <= hi)) lo = 0;
        for (std::size_t c = c0; c < c1; ++c) {
          q[c] = quantize<Bits>(load<Fp16>(plane, t * c_n + c), lo, inv);
        }
      }
      store_row<Bits>(q, c_n, codes, t * c_n);
    }
  }

  template <bool Fp16, unsigned Bits>
  void decode_all(const std::byte* s, std::size_t tokens, std::byte* o) const {
    const std::size_t c_n = channels_;
    const std::size_t cg = (c_n + group_ - 1) / group_;
    for (std::size_t l = 0; l < format_.layers; ++l) {
      for (std::size_t p = 0; p < format_.kv_planes; ++p) {
        const std::byte* params = s;
        const std::byte* codes = s + groups(p, tokens) * 8;
        for (std::size_t t = 0; t < tokens; ++t) {
          const std::size_t row = t * c_n;
          if (p == 0) {
            const std::byte* at = params + t / group_ * c_n * 8;
            for (std::size_t c = 0; c < c_n; ++c) {
              float mn, sc;
              std::memcpy(&mn, at + c * 8, 4);
              std::memcpy(&sc, at + c * 8 + 4, 4);
              store<Fp16>(o, row + c, static_cast<float>(code<Bits>(codes, row + c)) * sc + mn);
            }
          } else {
            for (std::size_t g = 0; g < cg; ++g) {
              float mn, sc;
              std::memcpy(&mn, params + (t * cg + g) * 8, 4);
              std::memcpy(&sc, params + (t * cg + g) * 8 + 4, 4);
              const std::size_t c1 = std::min(c_n, (g + 1) * group_);
              for (std::size_t c = g * group_; c < c1; ++c) {
                store<Fp16>(o, row + c, static_cast<float>(code<Bits>(codes, row + c)) * sc + mn);
              }
            }
          }
        }
        s += plane_bytes(p, tokens);
        o += tokens * c_n * 2;
      }
    }
  }

  layout::chunk_format format_;
  elem_type source_;
  unsigned bits_;
  std::size_t group_;
  std::size_t channels_ = 0;
  std::vector<float> lo_, hi_, fp16_float_;
  std::vector<std::uint8_t> row_;
};

static_assert(chunk_codec<grouped_int_codec>,
              "grouped_int_codec must model kvtier::codec::chunk_codec");

}  // namespace kvtier::codec
