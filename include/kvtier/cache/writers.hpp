#pragma once
// Background writers: per lower tier, a bounded queue of first-tier chunks waiting to be written
// there, and `writers` threads that take up to a window of them at a time and write them with
// one write_batch call, without the lock. A queued chunk is referenced in the first tier (the
// writer reads its slot in place) until its write is done. So that a lower tier that is slow,
// hung or gone cannot starve the first tier, writes (queued or in progress) hold at most
// write_hold_percent of its slots when it needs room: beyond that, a queued write whose chunk
// nothing else uses is dropped (counted) and its slot used (drop_queued_locked); and writes in
// progress never hold more.

#include "kvtier/cache/state.hpp"
#include "kvtier/detail/checked.hpp"
#include "kvtier/detail/index_entry.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/tier/context.hpp"

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace kvtier::detail {

template <class Chain>
class writers {
  static constexpr std::size_t tier_count = Chain::tier_count;
  using index_type = typename Chain::index_type;
  using state_type = cache_state<tier_count>;

 public:
  static constexpr std::size_t window =
      batch_chunks;  ///< chunks one write_batch call takes at most

  /// Starts each lower tier's threads; each queue holds `depth` chunks, or as many as the first
  /// tier holds when that is fewer (a chunk is queued at most once per tier).
  /// Writes hold at most `hold_percent` of the first tier's slots (at least one) when it needs
  /// room (see drop_queued_locked).
  writers(Chain& chain, state_type& st, const layout::chunk_format& f, std::size_t depth,
          unsigned hold_percent = 100)
      : chain_(chain),
        st_(st),
        format_(f),
        hold_limit_(std::max<std::size_t>(
            1, chain.first_index().capacity() / 100 * hold_percent +
                   chain.first_index().capacity() % 100 * hold_percent / 100)) {
    depth = std::min(depth, chain.first_index().capacity());
    try {
      for (std::size_t t = 1; t < tier_count; ++t) {
        reserving("a write queue (cache_config.write_queue_depth)", depth * sizeof(std::uint32_t),
                  [&] { rings_[t].slots.resize(depth); });
        for (std::size_t w = 0; w < chain.writers(t); ++w) {
          rings_[t].threads.emplace_back([this, t] { loop(t); });
        }
      }
    } catch (...) {
      stop();
      throw;
    }
  }
  /// Writes what is queued (bounded by the queue depths), then stops.
  ~writers() { stop(); }
  writers(const writers&) = delete;
  writers& operator=(const writers&) = delete;

  /// Queues the first tier's entry `e` for writing to tier t, referenced until written; clears
  /// its owed bit for t. false when that queue is full. Under the lock; call notify() after.
  bool try_enqueue_locked(index_entry& e, std::size_t t, bool evict_after) noexcept {
    ring& r = rings_[t];
    if (r.count == r.slots.size()) return false;
    chain_.first_index().ref(e);
    r.slots[(r.head + r.count) % r.slots.size()] = chain_.first_index().slot(e);
    ++r.count;
    e.owed &= static_cast<std::uint8_t>(~(1u << t));
    if (evict_after) e.evict_after_write = 1;
    return true;
  }
  /// The first tier needs a slot and every one is referenced: when writes (queued and in
  /// progress, all tiers; a chunk queued for two tiers counts twice) hold more than the bound,
  /// drops one queued write whose chunk nothing else references, which makes that chunk
  /// evictable (a write-back victim is then evicted unwritten). Counted in the tier's
  /// dropped_writes and in writes_dropped_for_room. false when none was dropped. Under the lock.
  bool drop_queued_locked() noexcept {
    std::size_t pending = 0;
    for (std::size_t t = 1; t < tier_count; ++t) pending += rings_[t].count + rings_[t].active;
    if (pending <= hold_limit_) return false;
    index_type& first = chain_.first_index();
    // First a write whose drop frees its chunk; else any (a chunk queued for two tiers, or
    // leased: the next call may then free it).
    for (const bool sole : {true, false}) {
      for (std::size_t t = 1; t < tier_count; ++t) {
        ring& r = rings_[t];
        for (std::size_t i = 0; i < r.count; ++i) {
          const std::size_t pos = (r.head + i) % r.slots.size();
          index_entry& e = first.at(r.slots[pos]);
          if ((sole && e.refs != 1) || e.pins != 0 || e.state != entry_state::ready) continue;
          r.slots[pos] = r.slots[r.head];  // the head takes its place: the rest keep their order
          r.head = (r.head + 1) % r.slots.size();
          --r.count;
          ++st_.stats.tiers[t].dropped_writes;
          ++st_.stats.writes_dropped_for_room;
          first.unref(e);
          return true;
        }
      }
    }
    return false;
  }
  /// Most first-tier slots writes may hold, and how many chunks writers have taken now.
  [[nodiscard]] std::size_t hold_limit() const noexcept { return hold_limit_; }
  [[nodiscard]] std::size_t writing_locked() const noexcept { return writing_; }
  /// Wakes the writers for what was queued.
  void notify() noexcept { work_cv_.notify_all(); }
  /// True when no chunk is queued or being written, and no cleared record waits to be
  /// invalidated. Under the lock.
  [[nodiscard]] bool idle_locked() const noexcept {
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (rings_[t].count != 0 || rings_[t].active != 0 || invalidating(t)) return false;
    }
    return true;
  }
  /// Waits, with `lk` on the cache's lock, until idle_locked().
  void wait_idle(std::unique_lock<std::mutex>& lk) {
    work_cv_.notify_all();  // work queued by a call that notified no one (a lease's last unref)
    idle_cv_.wait(lk, [this] { return idle_locked(); });
  }
  /// Chunks queued for tier t now (for tests and diagnostics). Under the lock.
  [[nodiscard]] std::size_t queued_locked(std::size_t t) const noexcept { return rings_[t].count; }

 private:
  struct ring {
    std::vector<std::uint32_t> slots;  // first-tier slots waiting to be written
    std::size_t head = 0, count = 0;
    std::size_t active = 0;        // taken by a writer, not finished
    std::size_t invalidating = 0;  // cleared records a writer is invalidating
    std::vector<std::thread> threads;
  };

  void stop() noexcept {
    {
      std::lock_guard lk(st_.mu);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (std::size_t t = 1; t < tier_count; ++t) {
      for (auto& th : rings_[t].threads) th.join();
      rings_[t].threads.clear();
    }
  }

  [[nodiscard]] bool invalidating(std::size_t t) const noexcept {
    const index_type* ix = chain_.index(t);
    return rings_[t].invalidating != 0 || (ix != nullptr && ix->invalidations_pending());
  }

  void loop(std::size_t t) {
    ring& rg = rings_[t];
    index_type& first = chain_.first_index();
    index_type* ix = chain_.index(t);
    auto& stats = st_.stats;
    std::array<std::uint32_t, window> hs{};
    std::array<tier::write_job, window> jobs;
    std::array<std::uint32_t, window> job_of{};
    std::unique_lock lk(st_.mu);
    for (;;) {
      // Writes in progress hold first-tier slots: no more than hold_limit_ of them at once.
      work_cv_.wait(lk, [&] {
        return (ix != nullptr && ix->invalidations_pending()) ||
               (rg.count > 0 && writing_ < hold_limit_) || (stop_ && rg.count == 0);
      });
      if (ix != nullptr && ix->invalidations_pending()) {
        // Cleared records of a durable tier: invalidated in storage before their slots are
        // reused, so a clear lasts across a restart.
        const std::size_t k = ix->take_invalidations(hs.data(), window);
        rg.invalidating += k;
        lk.unlock();
        chain_.invalidate(t, {hs.data(), k});
        lk.lock();
        for (std::size_t i = 0; i < k; ++i) ix->finish_invalidation(hs[i]);
        rg.invalidating -= k;
        if (idle_locked()) idle_cv_.notify_all();
        continue;
      }
      if (rg.count == 0) break;  // stopping, and everything queued was written
      const std::size_t take = std::min(window, hold_limit_ - writing_);
      std::size_t n = 0, m = 0;
      for (; rg.count > 0 && n < take; ++n) {
        hs[n] = rg.slots[rg.head];
        rg.head = (rg.head + 1) % rg.slots.size();
        --rg.count;
      }
      rg.active += n;
      writing_ += n;
      for (std::size_t i = 0; i < n; ++i) {
        index_entry& he = first.at(hs[i]);
        // A chunk cleared while queued is not written: clear must not be undone by a late write.
        if (he.state != entry_state::ready) continue;
        std::uint32_t slot = 0;
        if (ix != nullptr) {
          if (index_entry* e = ix->find(he.key)) {
            ix->touch(*e);
            continue;
          }
          index_entry* e = ix->allocate(stats.tiers[t].evictions);
          if (e == nullptr) {
            ++stats.tiers[t].dropped_writes;
            continue;
          }
          ix->insert_writing(*e, he.key, he.tokens);
          slot = ix->slot(*e);
        }
        jobs[m] = {slot, he.key, he.tokens, chain_.first().data(hs[i]), format_.bytes(he.tokens)};
        job_of[m++] = static_cast<std::uint32_t>(i);
      }
      lk.unlock();
      if (m > 0) chain_.write(t, {jobs.data(), m});
      lk.lock();
      std::array<chunk_key, window> undo;  // written, but cleared meanwhile (remote tiers)
      std::size_t nundo = 0;
      bool no_space = false;
      for (std::size_t j = 0; j < m; ++j) {
        no_space = no_space || jobs[j].no_space;
        // The writer's reference kept the chunk from eviction, so a chunk no longer ready was
        // cleared while being written: it must not appear in this tier afterwards.
        const bool cleared = first.at(hs[job_of[j]]).state != entry_state::ready;
        const bool ok = jobs[j].ok && !cleared;
        if (ix != nullptr) {
          index_entry& e = ix->at(jobs[j].slot);
          if (ok) {
            chain_.publish_locked(t, e);
            ix->unref(e);
          } else if (cleared && jobs[j].ok && chain_.durable(t)) {
            ix->abort_durably(e);  // the record is in storage: invalidated before reuse
          } else {
            ix->abort(e);
            ix->unref(e);
          }
        } else if (cleared && jobs[j].ok) {
          undo[nundo++] = jobs[j].key;
        }
        if (ok) {
          ++stats.tiers[t].writes;
          stats.tiers[t].bytes_written += jobs[j].bytes;
          if (first.at(hs[job_of[j]]).evict_after_write) ++stats.tiers[t].write_backs;
        } else if (!cleared) {
          ++stats.tiers[t].errors;
        }
      }
      // The tier's storage is full: its never-filled slots are set aside, so later chunks evict
      // (and reuse slots the storage holds) instead of failing one by one.
      if (no_space && ix != nullptr) ix->retire_free();
      if (nundo > 0) {
        lk.unlock();
        chain_.remove_from(t, {undo.data(), nundo});
        lk.lock();
      }
      for (std::size_t i = 0; i < n; ++i) {
        index_entry& he = first.at(hs[i]);
        first.unref(he);
        // Write-back: the slot whose eviction waited for this write is freed now, unless a
        // lookup took it again meanwhile (then it stays, most recently used).
        if (he.evict_after_write && he.evictable() && first.remove(he)) {
          ++stats.tiers[0].evictions;
        }
      }
      rg.active -= n;
      const bool was_full = writing_ >= hold_limit_;
      writing_ -= n;
      if (idle_locked()) idle_cv_.notify_all();
      if (was_full) work_cv_.notify_all();  // other writers may wait for room
    }
    idle_cv_.notify_all();
  }

  Chain& chain_;
  state_type& st_;
  const layout::chunk_format format_;
  std::array<ring, tier_count> rings_;
  std::condition_variable work_cv_;  // write work or stop
  std::condition_variable idle_cv_;  // writers drained
  bool stop_ = false;
  const std::size_t hold_limit_;  // first-tier slots writes in progress may hold
  std::size_t writing_ = 0;       // chunks taken by writer threads and not finished, all tiers
};

}  // namespace kvtier::detail
