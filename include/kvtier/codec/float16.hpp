#pragma once
// Bit-exact conversions between float and the two 16-bit element types KV caches hold (bfloat16
// and IEEE binary16), rounding to nearest even, shared by every lossy codec.

#include "kvtier/config.hpp"

#include <bit>
#include <cstdint>

namespace kvtier::codec {

/// The element type of a chunk's bytes, as a codec reads and writes it back.
enum class elem_type : std::uint8_t {
  bytes = 0,  ///< opaque bytes (lossless codecs only)
  bf16 = 1,   ///< bfloat16: 1 sign, 8 exponent, 7 mantissa bits
  fp16 = 2,   ///< IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits
};

/// Name of `t` for messages ("bytes", "bf16", "fp16", "unknown").
[[nodiscard]] constexpr const char* name(elem_type t) noexcept {
  switch (t) {
    case elem_type::bytes:
      return "bytes";
    case elem_type::bf16:
      return "bf16";
    case elem_type::fp16:
      return "fp16";
  }
  return "unknown";
}

/// bfloat16 bits to float: exact.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr float bf16_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// float to bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN of the same sign.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint16_t float_to_bf16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  // Adding 0x7fff plus the lowest kept bit carries into the kept bits exactly when the dropped
  // half is above one half, or exactly one half with an odd kept part.
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/// IEEE binary16 bits to float: exact (subnormals included).
KVTIER_HOST_DEVICE [[nodiscard]] constexpr float fp16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float.
    const float v = static_cast<float>(mant) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(v));
  }
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// float to IEEE binary16 bits, round to nearest even; overflow gives infinity, NaN a quiet NaN.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint16_t float_to_fp16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {
    // Below 2^-14: a subnormal of binary16, in units of 2^-24. Scaling by 2^24 is exact and
    // adding then subtracting 2^23 rounds to an integer, to nearest even.
    float v = std::bit_cast<float>(a) * 0x1p24f;
    v = (v + 0x1p23f) - 0x1p23f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(v));
  }
  // Normal: rebias the exponent, then round away the 13 dropped mantissa bits (a carry into the
  // exponent is the right result, up to infinity at the top).
  const std::uint32_t r = a - (112u << 23);
  return static_cast<std::uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

/// Element `h` of type `t` (bf16 or fp16) as float.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr float to_float(elem_type t, std::uint16_t h) noexcept {
  return t == elem_type::fp16 ? fp16_to_float(h) : bf16_to_float(h);
}

/// `f` as an element of type `t` (bf16 or fp16), rounded to nearest even.
KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint16_t from_float(elem_type t, float f) noexcept {
  return t == elem_type::fp16 ? float_to_fp16(f) : float_to_bf16(f);
}

}  // namespace kvtier::codec
