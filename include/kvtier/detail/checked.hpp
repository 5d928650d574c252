#pragma once
// Checked arithmetic for sizes computed from what an engine passes (model shape, settings,
// tensor extents and strides, capacities), and reservations that fail with a kvtier::error
// saying how much was asked for.

#include "kvtier/error.hpp"

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvtier::detail {

/// `a * b`; throws invalid_argument "kvtier: <what> (<a> x <b>) overflows 2^64" when it does not
/// fit.
[[nodiscard]] inline std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
  std::size_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) {
    throw invalid_argument(std::string("kvtier: ") + what + " (" + std::to_string(a) + " x " +
                           std::to_string(b) + ") overflows 2^64");
  }
  return r;
}

/// `a + b`, checked as checked_mul.
[[nodiscard]] inline std::size_t checked_add(std::size_t a, std::size_t b, const char* what) {
  std::size_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) {
    throw invalid_argument(std::string("kvtier: ") + what + " (" + std::to_string(a) + " + " +
                           std::to_string(b) + ") overflows 2^64");
  }
  return r;
}

/// `v` rounded up to a multiple of `a` (> 0), checked as checked_mul.
[[nodiscard]] inline std::size_t checked_round_up(std::size_t v, std::size_t a, const char* what) {
  return checked_add(v, a - 1, what) / a * a;
}

/// Returns `f()`, which reserves about `bytes` bytes for `what`; a std::bad_alloc or
/// std::length_error it throws becomes a kvtier::error naming `what` and `bytes`.
template <class F>
decltype(auto) reserving(const char* what, std::size_t bytes, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const std::bad_alloc&) {
    throw error(std::string("kvtier: cannot reserve ") + std::to_string(bytes) + " bytes for " +
                what + " (out of memory)");
  } catch (const std::length_error&) {
    throw error(std::string("kvtier: cannot reserve ") + std::to_string(bytes) + " bytes for " +
                what + " (longer than a vector holds)");
  }
}

}  // namespace kvtier::detail
