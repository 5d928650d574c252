#pragma once
// fp8 e4m3 (the OCP "E4M3FN" format: 4 exponent bits, bias 7, 3 mantissa bits, no infinities,
// one NaN per sign): conversions, and a codec that stores each bf16 or fp16 element of a chunk
// as one such byte.

#include "kvtier/codec/concept.hpp"
#include "kvtier/codec/descriptor.hpp"
#include "kvtier/codec/float16.hpp"
#include "kvtier/config.hpp"
#include "kvtier/layout/chunk_format.hpp"

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace kvtier::codec {

/// Largest finite e4m3 magnitude.
inline constexpr float fp8_e4m3_max = 448.0f;

/// `f` as e4m3, rounded to nearest even, saturating to +-448 (infinities too); NaN gives NaN
/// (0x7f or 0xff, the sign kept).
KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint8_t float_to_fp8_e4m3(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);
  if (a >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // >= 448
  if (a < 0x3c800000u) {
    // Below 2^-6: a subnormal of e4m3 in units of 2^-9, rounded to nearest even as in
    // float_to_fp16; 8 units is the smallest normal, whose code is 8 as well.
    float v = std::bit_cast<float>(a) * 512.0f;
    v = (v + 0x1p23f) - 0x1p23f;
    return static_cast<std::uint8_t>(sign | static_cast<std::uint8_t>(v));
  }
  const std::uint32_t r = a - (120u << 23);  // rebias 127 -> 7
  const std::uint32_t code = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  // 448 < |f| < 464 rounds down to 448 already; the top code 0x7f would be NaN.
  return static_cast<std::uint8_t>(sign | (code > 0x7eu ? 0x7eu : code));
}

/// e4m3 byte `b` as float: exact.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr float fp8_e4m3_to_float(std::uint8_t b) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exp = (b >> 3) & 0xfu;
  const std::uint32_t mant = b & 0x7u;
  if (exp == 0xf && mant == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 0x1p-9f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(v));
  }
  return std::bit_cast<float>(sign | ((exp + 120u) << 23) | (mant << 20));
}

/// A codec that stores every element of a bf16 or fp16 chunk as one e4m3 byte: half the bytes,
/// relative error at most 2^-4 for |x| in [2^-6, 448], absolute error at most 2^-10 below 2^-6,
/// |x| - 448 above (saturation); NaN stays NaN. Decode gives back the source type (every e4m3
/// value is exact in bf16 and fp16).
///
/// Encoded: the 32-byte header, then one byte per element in the chunk's own order.
/// Encode and decode are table lookups (a 64 KiB table built at construction): they allocate
/// nothing, O(elements). A codec object is immutable after construction: concurrent calls on one
/// object are safe.
class fp8_e4m3_codec {
 public:
  /// Throws invalid_argument when `f` does not hold 2-byte `source` (bf16 or fp16) elements.
  fp8_e4m3_codec(const layout::chunk_format& f, elem_type source) : format_(f), source_(source) {
    detail::check_lossy_format(f, source, "fp8_e4m3_codec");
    encode_table_ = kvtier::detail::reserving("the fp8 encode table", 65536,
                                              [] { return std::vector<std::uint8_t>(65536); });
    for (std::uint32_t h = 0; h < 65536; ++h) {
      encode_table_[h] = float_to_fp8_e4m3(to_float(source, static_cast<std::uint16_t>(h)));
    }
    for (std::uint32_t b = 0; b < 256; ++b) {
      decode_table_[b] = from_float(source, fp8_e4m3_to_float(static_cast<std::uint8_t>(b)));
    }
  }

  [[nodiscard]] codec_descriptor descriptor() const noexcept {
    return {codec_id::fp8_e4m3, source_, 0, false, 0};
  }
  [[nodiscard]] const layout::chunk_format& format() const noexcept { return format_; }

  /// Exact encoded size of `tokens` tokens (header included); also the bound encode needs.
  [[nodiscard]] std::size_t max_encoded_bytes(std::size_t tokens) const {
    return kvtier::detail::checked_add(
        header_bytes, detail::checked_chunk_bytes(format_, tokens) / 2, "fp8 encoded bytes");
  }

  /// Encodes `src`, `tokens` tokens in the chunk format, into `out` (at least
  /// max_encoded_bytes(tokens)); returns the bytes written. Throws invalid_argument on bad sizes.
  std::size_t encode(std::span<const std::byte> src, std::size_t tokens,
                     std::span<std::byte> out) const {
    const std::size_t size = max_encoded_bytes(tokens);
    detail::check_encode(format_, src.size(), tokens, out.size(), size);
    const std::size_t n = src.size() / 2;
    detail::write_header(
        {descriptor(), static_cast<std::uint32_t>(tokens), format_.fingerprint(), n}, out.data());
    const std::byte* s = src.data();
    std::byte* o = out.data() + header_bytes;
    const std::uint8_t* table = encode_table_.data();
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, s + 2 * i, 2);
      o[i] = static_cast<std::byte>(table[h]);
    }
    return size;
  }

  /// Decodes `in` into `out` (at least format().bytes(tokens)); returns the tokens decoded.
  /// Throws codec_error when `in` is not this codec's encoding of this chunk format.
  std::size_t decode(std::span<const std::byte> in, std::span<std::byte> out) const {
    const encoded_header h = detail::read_header(in, descriptor(), format_);
    const std::size_t n = format_.bytes(h.tokens) / 2;
    if (h.payload != n) {
      detail::bad("has " + std::to_string(h.payload) + " payload bytes, " +
                  std::to_string(h.tokens) + " fp8 tokens are " + std::to_string(n));
    }
    detail::check_decode_out(format_, h.tokens, out.size());
    const std::byte* s = in.data() + header_bytes;
    std::byte* o = out.data();
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t v = decode_table_[static_cast<std::uint8_t>(s[i])];
      std::memcpy(o + 2 * i, &v, 2);
    }
    return h.tokens;
  }

 private:
  layout::chunk_format format_;
  elem_type source_;
  std::vector<std::uint8_t> encode_table_;
  std::array<std::uint16_t, 256> decode_table_{};
};

static_assert(chunk_codec<fp8_e4m3_codec>, "fp8_e4m3_codec must model kvtier::codec::chunk_codec");

}  // namespace kvtier::codec
