#pragma once
// Promotion: bringing chunks held only by lower tiers into the first tier, verified, before they
// are copied to the engine. One read batch per lower tier for a window of chunks, without the
// lock during I/O; a chunk another caller (or prefetch) is already bringing in is waited for
// rather than read twice. A record that fails verification is dropped from its tier, never used.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/cache/pin_table.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/cache/write_policy.hpp"
#include "kvtier/detail/index_entry.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/tier/context.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace kvtier::detail {

template <class Chain>
class promoter {
  static constexpr std::size_t tier_count = Chain::tier_count;
  using index_type = typename Chain::index_type;
  using state_type = cache_state<tier_count>;

 public:
  static constexpr std::size_t window = batch_chunks;  ///< chunks promoted per batch at most

  /// `pins`: the cache's pin table, told of pinned chunks lost with a discarded record.
  promoter(Chain& chain, state_type& st, write_policy<Chain>& policy, const layout::chunk_format& f,
           pin_table<Chain>* pins = nullptr) noexcept
      : chain_(chain), st_(st), policy_(policy), format_(f), pins_(pins) {}

  /// The end of bringing a chunk from lower tier t (slot `lslot` there, when indexed) into the
  /// first tier's writing entry `hslot`. On success the entry is published and keeps the
  /// caller's reference; otherwise it is aborted and unreferenced. The lower reference (indexed
  /// tiers) is dropped either way; a record that failed verification is discarded, pinned or
  /// not, so it is never served. Under the lock.
  bool finish_locked(std::uint32_t hslot, std::size_t t, std::uint32_t lslot,
                     tier::read_status st) noexcept {
    index_type& first = chain_.first_index();
    auto& stats = st_.stats;
    index_entry& e = first.at(hslot);
    const std::size_t bytes = format_.bytes(e.tokens);
    const bool ok = st == tier::read_status::ok;
    if (ok) {
      chain_.publish_locked(0, e);
      ++stats.tiers[t].promotions;
      stats.tiers[t].bytes_read += bytes;
      ++stats.tiers[0].writes;
      stats.tiers[0].bytes_written += bytes;
    } else {
      first.abort(e);
      first.unref(e);
      if (st != tier::read_status::missing) ++stats.tiers[t].errors;
    }
    if (index_type* low = chain_.index(t)) {
      index_entry& le = low->at(lslot);
      if (st == tier::read_status::corrupt) {
        const bool pinned = le.pins != 0;
        const chunk_key k = le.key;
        low->discard(le);
        if (pinned && pins_ != nullptr && !chain_.held_locked(k)) pins_->mark_lost_locked(k);
      }
      low->unref(le);
    }
    return ok;
  }

  /// Deletes from remote tiers the records of `jobs` that failed verification, so lookups stop
  /// reporting them (an indexed tier discards its entry in finish_locked). Without the lock.
  template <class TierOf>
  void forget_corrupt(const tier::read_job* jobs, std::size_t n, TierOf tier_of) {
    if constexpr (Chain::remote_count > 0) {
      for (std::size_t j = 0; j < n; ++j) {
        const std::size_t t = tier_of(j);
        if (jobs[j].status != tier::read_status::corrupt || chain_.index(t) != nullptr) continue;
        chain_.remove_from(t, {&jobs[j].key, 1});
      }
    } else {
      (void)jobs, (void)n, (void)tier_of;
    }
  }

  /// Brings the lower-tier chunks of an operation's window [lo, hi) (keys `ks`, refs `rs`; chunk
  /// i is chunk first_chunk + i of a run ending at token abs_end) into the first tier. On return
  /// each chunk's ref is in the first tier (still referenced) or dropped (dropped_tier).
  /// `wait(lk)` waits, under the lock, for an entry to leave the writing state. Without the lock
  /// on entry and return; allocates nothing.
  template <class Wait>
  void promote(const chunk_key* ks, chunk_ref* rs, std::size_t lo, std::size_t hi,
               std::size_t first_chunk, std::size_t abs_end, std::size_t chunk_tokens,
               Wait&& wait) {
    bool any = false;
    for (std::size_t i = lo; i < hi; ++i) any = any || (rs[i].tier != 0);
    if (!any) return;
    index_type& first = chain_.first_index();
    std::array<tier::read_job, window> jobs;
    std::array<std::uint32_t, window> at{};     // chunk index of each job
    std::array<std::uint32_t, window> hslot{};  // its first-tier entry
    std::array<std::uint32_t, window> waits{};  // chunks another caller is bringing in
    std::size_t nj = 0, nw = 0;
    std::unique_lock lk(st_.mu);
    // Jobs are collected tier by tier, so each tier's jobs are contiguous: one batch each.
    for (std::size_t t = 1; t < tier_count; ++t) {
      for (std::size_t i = lo; i < hi; ++i) {
        chunk_ref& r = rs[i];
        if (r.tier != t) continue;
        index_entry* e = first.find(ks[i]);
        if (e != nullptr && e->state == entry_state::ready) {
          first.ref(*e);
          drop_locked(r);
          r = {first.slot(*e), 0, 0};
        } else if (e != nullptr) {
          waits[nw++] = static_cast<std::uint32_t>(i);
        } else if ((e = policy_.allocate_first_locked()) == nullptr) {
          drop_locked(r);
        } else {
          const std::size_t c = first_chunk + i;
          const std::size_t ntok = std::min(chunk_tokens, abs_end - c * chunk_tokens);
          first.insert_writing(*e, ks[i], static_cast<std::uint32_t>(ntok));
          hslot[nj] = first.slot(*e);
          jobs[nj] = {r.slot, ks[i], static_cast<std::uint32_t>(ntok),
                      chain_.first().data(hslot[nj]), format_.bytes(ntok)};
          at[nj++] = static_cast<std::uint32_t>(i);
        }
      }
    }
    lk.unlock();
    for (std::size_t j = 0; j < nj;) {
      std::size_t k = j;
      const std::uint8_t t = rs[at[j]].tier;
      while (k < nj && rs[at[k]].tier == t) ++k;
      chain_.read(t, {jobs.data() + j, k - j});
      j = k;
    }
    std::array<std::uint8_t, window> tier_of{};
    for (std::size_t j = 0; j < nj; ++j) tier_of[j] = rs[at[j]].tier;
    lk.lock();
    for (std::size_t j = 0; j < nj; ++j) {
      chunk_ref& r = rs[at[j]];
      if (finish_locked(hslot[j], r.tier, r.slot, jobs[j].status)) {
        r = {hslot[j], 0, 0};
      } else {
        r = {0, dropped_tier, 0};
      }
    }
    lk.unlock();
    if (nj > 0) st_.state_cv.notify_all();
    forget_corrupt(jobs.data(), nj, [&](std::size_t j) { return tier_of[j]; });
    if (nw == 0) return;
    // Wait for the chunks other callers (or prefetch) are bringing in, now that this caller
    // holds no writing entry of its own.
    lk.lock();
    for (std::size_t w = 0; w < nw; ++w) {
      chunk_ref& r = rs[waits[w]];
      index_entry* e;
      while ((e = first.find(ks[waits[w]])) != nullptr && e->state == entry_state::writing) {
        wait(lk);
      }
      if (e != nullptr) {
        first.ref(*e);
        drop_locked(r);
        r = {first.slot(*e), 0, 0};
      } else {
        drop_locked(r);  // its loader failed: the prefix ends here
      }
    }
  }

 private:
  // Drops an operation's reference to a lower-tier chunk; the lease still counts the chunk, so
  // it is marked for release.
  void drop_locked(chunk_ref& r) noexcept {
    chain_.unref_locked(r);
    r = {0, dropped_tier, 0};
  }

  Chain& chain_;
  state_type& st_;
  write_policy<Chain>& policy_;
  const layout::chunk_format format_;
  pin_table<Chain>* pins_;
};

}  // namespace kvtier::detail
