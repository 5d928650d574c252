#pragma once
// The result of pin(): the chunks one pin() call kept from eviction, which only this handle can
// give back. It names a slot of the cache's pin table (pin_table.hpp), which holds the keys of
// exactly the chunks this call pinned; unpinning undoes one pin on each of them and touches no
// other chunk, so a holder can never drop a pin it did not take (a chunk stored after the pin, a
// chunk another caller pinned). Only the cache reads or changes the slot.

#include "kvtier/cache/op_table.hpp"

#include <cstddef>
#include <cstdint>
#include <utility>

namespace kvtier::detail {

/// A pin of `Cache`. Move-only; unpins when destroyed or reset; must not outlive its cache. Not
/// thread-safe (one owner at a time); different handles may be used from different threads.
template <class Cache>
class basic_pin {
 public:
  basic_pin() = default;
  basic_pin(basic_pin&& o) noexcept { take(o); }
  basic_pin& operator=(basic_pin&& o) noexcept {
    if (this != &o) {
      reset();
      take(o);
    }
    return *this;
  }
  basic_pin(const basic_pin&) = delete;
  basic_pin& operator=(const basic_pin&) = delete;
  ~basic_pin() { reset(); }

  /// Tokens of the pinned prefix (0 when nothing was pinned).
  [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
  /// Chunks of the pinned prefix.
  [[nodiscard]] std::size_t chunks() const noexcept { return chunks_; }
  /// True while the pin holds chunks (until unpinned, reset or moved from).
  [[nodiscard]] bool live() const noexcept { return cache_ != nullptr; }
  /// Undoes this pin now (same as cache.unpin(*this)).
  void reset() noexcept {
    if (cache_) (void)cache_->unpin(*this);
  }

 private:
  friend Cache;
  void take(basic_pin& o) noexcept {
    cache_ = std::exchange(o.cache_, nullptr);
    slot_ = std::exchange(o.slot_, op_table::no_op);
    chunks_ = std::exchange(o.chunks_, 0);
    tokens_ = std::exchange(o.tokens_, 0);
  }
  void clear() noexcept {
    cache_ = nullptr;
    slot_ = op_table::no_op;
    chunks_ = 0;
    tokens_ = 0;
  }
  Cache* cache_ = nullptr;
  std::uint32_t slot_ = op_table::no_op;
  std::size_t chunks_ = 0;
  std::size_t tokens_ = 0;
};

}  // namespace kvtier::detail
