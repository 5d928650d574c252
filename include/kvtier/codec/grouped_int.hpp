#pragma once
// Grouped int8 / int4 quantization of a bf16 or fp16 chunk in the style of KIVI: K per channel
// (a group is `group_size` consecutive tokens of one channel), V per token (a group is
// `group_size` consecutive channels of one token), each group with its own scale and minimum.

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
    lo_ = kvtier::detail::reserving("grouped_int_codec scratch", c * 8,
                                    [c] { return std::vector<float>(c); });
    hi_ = kvtier::detail::reserving("grouped_int_codec scratch", c * 8,
                                    [c] { return std::vector<float>(c); });
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
    const std::byte* s = src.data();
    std::byte* o = out.data() + header_bytes;
    const std::size_t plane_elems = tokens * channels_;
    for (std::size_t l = 0; l < format_.layers; ++l) {
      for (std::size_t p = 0; p < format_.kv_planes; ++p) {
        std::byte* params = o;
        std::byte* codes = o + groups(p, tokens) * 8;
        if (bits_ == 4) std::memset(codes, 0, code_bytes(tokens));
        if (p == 0) {
          encode_per_channel(s, tokens, params, codes);
        } else {
          encode_per_token(s, tokens, params, codes);
        }
        s += plane_elems * 2;
        o += plane_bytes(p, tokens);
      }
    }
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
    const std::byte* s = in.data() + header_bytes;
    std::byte* o = out.data();
    const std::size_t cg = (channels_ + group_ - 1) / group_;
    for (std::size_t l = 0; l < format_.layers; ++l) {
      for (std::size_t p = 0; p < format_.kv_planes; ++p) {
        const std::byte* params = s;
        const std::byte* codes = s + groups(p, tokens) * 8;
        for (std::size_t t = 0; t < tokens; ++t) {
          for (std::size_t c = 0; c < channels_; ++c) {
            const std::size_t g = p == 0 ? t / group_ * channels_ + c : t * cg + c / group_;
            float mn, sc;
            std::memcpy(&mn, params + g * 8, 4);
            std::memcpy(&sc, params + g * 8 + 4, 4);
            const std::uint16_t v =
                from_float(source_, static_cast<float>(code(codes, t * channels_ + c)) * sc + mn);
            std::memcpy(o + (t * channels_ + c) * 2, &v, 2);
          }
        }
        s += plane_bytes(p, tokens);
        o += tokens * channels_ * 2;
      }
    }
    return tokens;
  }

 private:
  [[nodiscard]] std::size_t code_bytes(std::size_t tokens) const noexcept {
    const std::size_t n = tokens * channels_;
    return bits_ == 8 ? n : (n + 1) / 2;
  }
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
  [[nodiscard]] float elem(const std::byte* plane, std::size_t i) const noexcept {
    std::uint16_t h;
    std::memcpy(&h, plane + 2 * i, 2);
    return to_float(source_, h);
  }
  [[nodiscard]] unsigned code(const std::byte* codes, std::size_t i) const noexcept {
    const auto b = static_cast<unsigned>(codes[bits_ == 8 ? i : i / 2]);
    return bits_ == 8 ? b : (b >> ((i & 1) * 4)) & 0xfu;
  }
  void put_code(std::byte* codes, std::size_t i, unsigned q) const noexcept {
    if (bits_ == 8) {
      codes[i] = static_cast<std::byte>(q);
    } else {
      codes[i / 2] |= static_cast<std::byte>(q << ((i & 1) * 4));
    }
  }
  // (minimum, scale) of a group from its minimum and maximum; the scale's reciprocal, 0 for a
  // constant group (every code 0, decoded to the minimum exactly).
  [[nodiscard]] float params(std::byte* at, float lo, float hi) const noexcept {
    const float levels = bits_ == 8 ? 255.0f : 15.0f;
    const float sc = (hi - lo) / levels;
    std::memcpy(at, &lo, 4);
    std::memcpy(at + 4, &sc, 4);
    return sc > 0 ? 1.0f / sc : 0.0f;
  }
  [[nodiscard]] unsigned quantize(float x, float lo, float inv) const noexcept {
    const float levels = bits_ == 8 ? 255.0f : 15.0f;
    // fmax/fmin also send a NaN to 0: the cast below never sees one.
    const float r = std::fmin(std::fmax((x - lo) * inv, 0.0f), levels);
    return static_cast<unsigned>(r + 0.5f);
  }
  void encode_per_channel(const std::byte* plane, std::size_t tokens, std::byte* params_out,
                          std::byte* codes) {
    const std::size_t c_n = channels_;
    for (std::size_t t0 = 0; t0 < tokens; t0 += group_) {
      const std::size_t t1 = std::min(tokens, t0 + group_);
      std::fill(lo_.begin(), lo_.end(), std::numeric_limits<float>::infinity());
      std::fill(hi_.begin(), hi_.end(), -std::numeric_limits<float>::infinity());
      for (std::size_t t = t0; t < t1; ++t) {
        for (std::size_t c = 0; c < c_n; ++c) {
          const float x = elem(plane, t * c_n + c);
          lo_[c] = std::fmin(lo_[c], x);
          hi_[c] = std::fmax(hi_[c], x);
        }
      }
      std::byte* at = params_out + t0 / group_ * c_n * 8;
      for (std::size_t c = 0; c < c_n; ++c) {
        if (!(lo_[c] <= hi_[c])) lo_[c] = hi_[c] = 0;  // every element a NaN
        hi_[c] = params(at + c * 8, lo_[c], hi_[c]);   // hi_ now holds 1 / scale
      }
      for (std::size_t t = t0; t < t1; ++t) {
        for (std::size_t c = 0; c < c_n; ++c) {
          put_code(codes, t * c_n + c, quantize(elem(plane, t * c_n + c), lo_[c], hi_[c]));
        }
      }
    }
  }
  void encode_per_token(const std::byte* plane, std::size_t tokens, std::byte* params_out,
                        std::byte* codes) const {
    const std::size_t c_n = channels_;
    const std::size_t cg = (c_n + group_ - 1) / group_;
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t g = 0; g < cg; ++g) {
        const std::size_t c0 = g * group_, c1 = std::min(c_n, c0 + group_);
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (std::size_t c = c0; c < c1; ++c) {
          const float x = elem(plane, t * c_n + c);
          lo = std::fmin(lo, x);
          hi = std::fmax(hi, x);
        }
        if (!(lo <= hi)) lo = hi = 0;
        const float inv = params(params_out + (t * cg + g) * 8, lo, hi);
        for (std::size_t c = c0; c < c1; ++c) {
          put_code(codes, t * c_n + c, quantize(elem(plane, t * c_n + c), lo, inv));
        }
      }
    }
  }

  layout::chunk_format format_;
  elem_type source_;
  unsigned bits_;
  std::size_t group_;
  std::size_t channels_ = 0;
  std::vector<float> lo_, hi_;
};

}  // namespace kvtier::codec
