#pragma once
// Which engine blocks the stores in flight still read, per operation slot. Stores and retrieves
// run on separate streams, so a retrieve is not ordered after an earlier store's copy by stream
// order; it waits for the stores whose blocks it writes into, and for no other. Plain C++ (the
// GPU transfers hold one; host tests drive it directly).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

namespace kvtier::transfer {

class inflight_stores {
 public:
  /// Room for `ops` slots of at most `max_blocks` block ids each, reserved here.
  inflight_stores(std::size_t ops, std::size_t max_blocks) : slots_(ops) {
    for (slot& s : slots_) s.blocks.reserve(max_blocks);
  }

  /// Operation `op` is a store reading `blocks` (at most max_blocks) until end(op)'s copy
  /// completes; live once its first copy is enqueued (copied()).
  void begin(std::uint32_t op, std::span<const std::int32_t> blocks) {
    std::lock_guard lk(mu_);
    slot& s = slots_[op];
    s.live = false;
    s.blocks.assign(blocks.begin(), blocks.end());
    std::sort(s.blocks.begin(), s.blocks.end());
  }
  /// Op has enqueued a copy; its event now covers it.
  void copied(std::uint32_t op) {
    std::lock_guard lk(mu_);
    slots_[op].live = !slots_[op].blocks.empty();
  }
  /// Op no longer reads engine blocks (its copies completed, or it is a retrieve now).
  void clear(std::uint32_t op) noexcept {
    std::lock_guard lk(mu_);
    slots_[op].live = false;
  }
  /// Calls `fn(store_op)` for every live store other than `op` that reads one of `blocks`.
  template <class Fn>
  void for_overlapping(std::uint32_t op, std::span<const std::int32_t> blocks, Fn&& fn) const {
    std::lock_guard lk(mu_);
    for (std::uint32_t o = 0; o < slots_.size(); ++o) {
      const slot& s = slots_[o];
      if (o == op || !s.live) continue;
      const bool hit = std::any_of(blocks.begin(), blocks.end(), [&](std::int32_t b) {
        return std::binary_search(s.blocks.begin(), s.blocks.end(), b);
      });
      if (hit) fn(o);
    }
  }

 private:
  struct slot {
    std::vector<std::int32_t> blocks;  ///< sorted
    bool live = false;
  };
  mutable std::mutex mu_;
  std::vector<slot> slots_;
};

}  // namespace kvtier::transfer
