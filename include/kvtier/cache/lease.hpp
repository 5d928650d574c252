#pragma once
// The result of a lookup: the cached run, its chunks protected from eviction until retrieve() or
// release() consumes it (or it is destroyed). It names the operation slot that holds the run's
// chunk references; only the cache reads or changes it.

#include "kvtier/cache/op_table.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace kvtier::detail {

/// A lease of `Cache` (which must be its friend's friend: the cache fills and consumes it).
/// Move-only; must not outlive its cache. Not thread-safe (one owner at a time).
template <class Cache>
class basic_lease {
 public:
  basic_lease() = default;
  basic_lease(basic_lease&& o) noexcept { take(o); }
  basic_lease& operator=(basic_lease&& o) noexcept {
    if (this != &o) {
      reset();
      take(o);
    }
    return *this;
  }
  basic_lease(const basic_lease&) = delete;
  basic_lease& operator=(const basic_lease&) = delete;
  ~basic_lease() { reset(); }

  /// Tokens of the cached run from first_token() (a multiple of chunk_tokens unless a partial
  /// tail hit); for a lookup from the start, the cached prefix.
  [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
  /// The first token of the run: first_chunk * chunk_tokens of the lookup (0 by default).
  [[nodiscard]] std::size_t first_token() const noexcept { return first_ * Cache::chunk_tokens; }
  /// One past the last token of the run.
  [[nodiscard]] std::size_t end_token() const noexcept { return first_token() + tokens_; }
  /// Chunks of the cached prefix.
  [[nodiscard]] std::size_t chunks() const noexcept { return chunks_; }
  /// Chunks of the prefix found in tier `t` (0 = the first tier).
  [[nodiscard]] std::size_t hits_in(std::size_t t) const noexcept {
    return cache_ ? cache_->lease_hits_in(*this, t) : 0;
  }
  /// True until retrieve or release consumes it.
  [[nodiscard]] bool live() const noexcept { return cache_ != nullptr; }
  /// Releases the chunks now (same as cache.release(*this)).
  void reset() noexcept {
    if (cache_) cache_->release(*this);
  }

 private:
  friend Cache;
  void take(basic_lease& o) noexcept {
    cache_ = std::exchange(o.cache_, nullptr);
    op_ = std::exchange(o.op_, op_table::no_op);
    chunks_ = std::exchange(o.chunks_, 0);
    tokens_ = std::exchange(o.tokens_, 0);
    first_ = std::exchange(o.first_, 0);
  }
  // The leading chunks of the run that end at or before `end_token`, and the token where the
  // last of them ends (first_token() when none does).
  [[nodiscard]] std::pair<std::size_t, std::size_t> chunks_ending_by(
      std::size_t end_token) const noexcept {
    constexpr std::size_t n = Cache::chunk_tokens;
    auto end_of = [&](std::size_t i) { return std::min((first_ + i + 1) * n, this->end_token()); };
    std::size_t count = chunks_;
    while (count > 0 && end_of(count - 1) > end_token) --count;
    return {count, count == 0 ? first_token() : end_of(count - 1)};
  }
  // Forgets the run (its chunks were released or handed on).
  void clear() noexcept {
    cache_ = nullptr;
    op_ = op_table::no_op;
    chunks_ = 0;
    tokens_ = 0;
  }
  Cache* cache_ = nullptr;
  std::uint32_t op_ = op_table::no_op;
  std::size_t first_ = 0;  ///< first chunk of the run
  std::size_t chunks_ = 0;
  std::size_t tokens_ = 0;
};

}  // namespace kvtier::detail
