#pragma once
// Byte shuffle: the bytes of fixed-size elements regrouped into planes (every element's byte 0,
// then every element's byte 1, ...), which puts the low-entropy sign and exponent bytes of
// 16-bit floats next to each other where a general-purpose compressor finds them.

#include <cstddef>
#include <cstring>

namespace kvtier::codec {

/// Writes the `n` bytes of `in`, elements of `elem` bytes, to `out` plane by plane: byte b of
/// element i goes to `out[b * (n / elem) + i]`. Bytes past the last whole element are copied as
/// they are. `in` and `out` do not overlap (`__restrict`: what lets the compiler vectorize). O(n),
/// allocates nothing.
inline void byte_shuffle(const std::byte* __restrict in, std::byte* __restrict out, std::size_t n,
                         std::size_t elem) noexcept {
  const std::size_t count = elem ? n / elem : 0;
  if (elem == 2) {
    for (std::size_t i = 0; i < count; ++i) {
      out[i] = in[2 * i];
      out[count + i] = in[2 * i + 1];
    }
  } else {
    for (std::size_t i = 0; i < count; ++i) {
      for (std::size_t b = 0; b < elem; ++b) out[b * count + i] = in[i * elem + b];
    }
  }
  std::memcpy(out + count * elem, in + count * elem, n - count * elem);
}

/// The inverse of byte_shuffle with the same `n` and `elem`.
inline void byte_unshuffle(const std::byte* __restrict in, std::byte* __restrict out, std::size_t n,
                           std::size_t elem) noexcept {
  const std::size_t count = elem ? n / elem : 0;
  if (elem == 2) {
    for (std::size_t i = 0; i < count; ++i) {
      out[2 * i] = in[i];
      out[2 * i + 1] = in[count + i];
    }
  } else {
    for (std::size_t i = 0; i < count; ++i) {
      for (std::size_t b = 0; b < elem; ++b) out[i * elem + b] = in[b * count + i];
    }
  }
  std::memcpy(out + count * elem, in + count * elem, n - count * elem);
}

}  // namespace kvtier::codec
