#pragma once
// The tier chain's write policy: when a chunk stored in the first tier goes to each lower tier.
// Write-through queues it once stored; write-back queues it when the first tier evicts it (its
// slot is freed once written). Either way a lower tier with admit_after_hits N takes a chunk only
// once lookups hit it N times in the first tier. A full queue drops the write (counted) rather
// than blocking the engine. Every call is under the cache's lock.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/cache/writers.hpp"
#include "kvtier/detail/index_entry.hpp"

#include <cstddef>
#include <cstdint>
#include <mutex>

namespace kvtier {

/// When a lower tier receives a chunk stored in the first tier. Either way a lower tier with
/// `admit_after_hits` N > 0 takes a chunk only once lookups hit it N times in the first tier.
enum class write_mode {
  write_through,  ///< as soon as it is stored (queued; the engine never waits for it)
  write_back,     ///< when the first tier evicts it (and on flush()); its slot is freed then
};

}  // namespace kvtier

namespace kvtier::detail {

template <class Chain>
class write_policy {
  static constexpr std::size_t tier_count = Chain::tier_count;
  static constexpr bool has_lower = Chain::has_lower;
  using state_type = cache_state<tier_count>;

 public:
  write_policy(Chain& chain, state_type& st, writers<Chain>& w, write_mode mode) noexcept
      : chain_(chain), st_(st), writers_(w), mode_(mode) {}

  [[nodiscard]] write_mode mode() const noexcept { return mode_; }

  /// A first-tier entry for a new chunk, evicting the eviction policy's victim when none is
  /// free, else dropping a queued lower-tier write to free one (writers::drop_queued_locked);
  /// nullptr when everything is leased, pinned or being written. Under write_back, a
  /// victim that still owes a lower tier its bytes is queued for writing instead (its slot frees
  /// when the write completes) and the next victim is tried; when its queue is full it is evicted
  /// unwritten (a counted dropped write).
  index_entry* allocate_first_locked() noexcept {
    auto& evicted = st_.stats.tiers[0].evictions;
    if constexpr (has_lower) {
      const auto keep = [this](index_entry& v) {
        if (mode_ != write_mode::write_back || v.owed == 0) return false;
        bool kept = false;
        for (std::size_t t = 1; t < tier_count; ++t) {
          if (!(v.owed & bit(t)) || !admitted(v, t)) continue;
          if (writers_.try_enqueue_locked(v, t, true)) {
            kept = true;
          } else {
            ++st_.stats.tiers[t].dropped_writes;
          }
        }
        // Wake the writers now: the caller may be a promotion or a prefetch, which notify no
        // one, and the victim's slot frees only once its write is done.
        if (kept) writers_.notify();
        return kept;
      };
      for (;;) {
        index_entry* e = chain_.first_index().allocate(evicted, keep);
        // Everything is referenced: writes still queued for a lower tier that is behind (slow,
        // hung, gone) give their chunks' slots back rather than starve the first tier.
        if (e != nullptr || !writers_.drop_queued_locked()) return e;
      }
    } else {
      return chain_.first_index().allocate(evicted);
    }
  }

  /// Store: finds or allocates first-tier entries for chunks [first, n) of keys `ks` (chunk i
  /// holds tokens_at(i) tokens); an allocated one is `writing` and marked `wrote` in `rs`.
  /// Returns one past the last chunk placed (fewer than n when nothing more is evictable,
  /// counted in store_partial).
  template <class TokensAt>
  std::size_t place_locked(const chunk_key* ks, chunk_ref* rs, std::size_t first, std::size_t n,
                           TokensAt tokens_at) noexcept {
    auto& ix = chain_.first_index();
    std::size_t placed = first;
    for (; placed < n; ++placed) {
      if (index_entry* e = ix.find(ks[placed])) {
        ix.touch(*e);  // already held (or being written by another caller)
        rs[placed] = {ix.slot(*e), 0, 0};
        continue;
      }
      index_entry* e = allocate_first_locked();
      if (e == nullptr) break;  // everything left is leased, pinned or being written
      ix.insert_writing(*e, ks[placed], static_cast<std::uint32_t>(tokens_at(placed)));
      rs[placed] = {ix.slot(*e), 0, 1};
    }
    if (placed < n) ++st_.stats.store_partial;
    return placed;
  }

  /// Whether lower tier t takes `e` now (its admission count is reached).
  [[nodiscard]] bool admitted(const index_entry& e, std::size_t t) const noexcept {
    return chain_.admit_after(t) == 0 || e.hits >= chain_.admit_after(t);
  }

  /// A chunk just published in the first tier: every lower tier is owed it; under
  /// write-through the tiers that admit it at once get it queued now. Call notify() after.
  void on_stored_locked(index_entry& e) noexcept {
    if constexpr (has_lower) {
      e.owed = chain_.lower_mask();
      if (mode_ != write_mode::write_through) return;
      for (std::size_t t = 1; t < tier_count; ++t) {
        if (chain_.admit_after(t) == 0) enqueue_or_drop(e, t);
      }
    } else {
      (void)e;
    }
  }

  /// A lookup hit in the first tier: counts toward admission into lower tiers, and under
  /// write-through queues the chunk for each tier whose admission count it reaches.
  void note_hit_locked(index_entry& e) noexcept {
    if (e.hits < 255) ++e.hits;
    if constexpr (has_lower) {
      if (mode_ != write_mode::write_through || e.owed == 0) return;
      bool queued = false;
      for (std::size_t t = 1; t < tier_count; ++t) {
        if ((e.owed & bit(t)) && chain_.admit_after(t) != 0 && e.hits >= chain_.admit_after(t)) {
          queued = enqueue_or_drop(e, t) || queued;
        }
      }
      if (queued) writers_.notify();
    }
  }

  /// Waits until every queued write has completed; under write_back, first queues every chunk
  /// the first tier still owes an admitting lower tier (waiting for room as queues fill).
  void flush(std::unique_lock<std::mutex>& lk) {
    if constexpr (has_lower) {
      for (bool more = true; more;) {
        more = false;
        if (mode_ == write_mode::write_back) {
          auto& ix = chain_.first_index();
          for (std::uint32_t s = 0; s < ix.capacity(); ++s) {
            index_entry& e = ix.at(s);
            if (e.state != entry_state::ready || e.owed == 0) continue;
            for (std::size_t t = 1; t < tier_count; ++t) {
              if ((e.owed & bit(t)) && admitted(e, t) &&
                  !writers_.try_enqueue_locked(e, t, false)) {
                more = true;  // that queue is full: wait for it, then go on
              }
            }
          }
          writers_.notify();
        }
        writers_.wait_idle(lk);
      }
    } else {
      (void)lk;
    }
  }

  void notify() noexcept {
    if constexpr (has_lower) writers_.notify();
  }

 private:
  static constexpr std::uint8_t bit(std::size_t t) noexcept {
    return static_cast<std::uint8_t>(1u << t);
  }
  // Queues `e` for tier t; when the queue is full the write is dropped, counted, and no longer
  // owed. Returns whether it was queued.
  bool enqueue_or_drop(index_entry& e, std::size_t t) noexcept {
    if (writers_.try_enqueue_locked(e, t, false)) return true;
    ++st_.stats.tiers[t].dropped_writes;
    e.owed &= static_cast<std::uint8_t>(~bit(t));
    return false;
  }

  Chain& chain_;
  state_type& st_;
  writers<Chain>& writers_;
  write_mode mode_;
};

}  // namespace kvtier::detail
