#pragma once
// The cache's pin table: one slot per live pin handle (pin.hpp), reserved at construction
// (cache_config::max_pins), holding the keys of exactly the chunks that pin pinned. Pinning
// covers a chunk in every indexed tier holding it; every copy of a chunk carries the same count
// (tier_chain::publish_locked gives a new copy the chunk's count), so an unpin undoes one pin
// wherever the chunk is. Not thread-safe: the cache calls it under its lock.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/detail/index_entry.hpp"
#include "kvtier/key/chunk_key.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace kvtier::detail {

template <class Chain>
class pin_table {
 public:
  pin_table(Chain& chain, std::size_t max_chunks, std::size_t max_pins)
      : chain_(chain), slots_(max_chunks, max_pins, "max_pins") {}

  /// A free slot, whose keys the caller then fills (without the lock), or op_table::no_op.
  [[nodiscard]] std::uint32_t acquire_locked() noexcept { return slots_.acquire(); }
  [[nodiscard]] chunk_key* keys(std::uint32_t s) const noexcept { return slots_.keys(s); }

  /// Pins the leading chunks of slot s's `n` keys that some indexed tier holds ready, once in
  /// every such tier, up to the first no tier holds; returns how many. With none, the slot is
  /// given back.
  std::size_t pin_locked(std::uint32_t s, std::size_t n) noexcept {
    const chunk_key* ks = slots_.keys(s);
    std::size_t i = 0;
    for (; i < n; ++i) {
      bool any = false;
      for_each_copy(ks[i], [&](auto& ix, index_entry& e) {
        ix.pin(e);
        any = true;
      });
      if (!any) break;
    }
    std::fill_n(slots_.refs(s), i, chunk_ref{});  // none lost yet
    if (i == 0) slots_.release(s);
    return i;
  }

  /// Undoes one pin of each of slot s's first `chunks` chunks in every indexed tier holding it,
  /// except those marked lost, and gives the slot back.
  void unpin_locked(std::uint32_t s, std::size_t chunks) noexcept {
    const chunk_key* ks = slots_.keys(s);
    const chunk_ref* rs = slots_.refs(s);
    for (std::size_t i = 0; i < chunks; ++i) {
      if (rs[i].tier == dropped_tier) continue;
      for_each_copy(ks[i], [](auto& ix, index_entry& e) { (void)ix.unpin(e); });
    }
    slots_.release(s);
  }

  /// Marks chunk `k` lost in every slot that names it, so their unpin skips it: its last indexed
  /// copy was discarded (failed verification) while pinned, and its pins went with it; a copy
  /// stored later is a new chunk with pins of its own, which those handles must not drop.
  /// O(max_pins x max_chunks), for a rare event. (A free slot's marks are reset by pin_locked.)
  void mark_lost_locked(const chunk_key& k) noexcept {
    for (std::uint32_t s = 0; s < slots_.capacity(); ++s) {
      const chunk_key* ks = slots_.keys(s);
      chunk_ref* rs = slots_.refs(s);
      for (std::size_t i = 0; i < slots_.max_chunks(); ++i) {
        if (ks[i] == k) rs[i].tier = dropped_tier;
      }
    }
  }

 private:
  template <class F>
  void for_each_copy(const chunk_key& k, F&& f) noexcept {
    for (std::size_t t = 0; t < Chain::tier_count; ++t) {
      auto* ix = chain_.index(t);
      if (ix == nullptr) continue;  // a remote tier: not pinned
      if (index_entry* e = ix->find_ready(k)) f(*ix, *e);
    }
  }

  Chain& chain_;
  op_table slots_;
};

}  // namespace kvtier::detail
