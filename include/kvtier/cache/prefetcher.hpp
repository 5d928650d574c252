#pragma once
// Prefetch: loading lower-tier chunks into the first tier in the background before a request
// needs them. prefetch() reserves a writing first-tier entry per chunk under the lock (so a
// retrieve of the same chunk waits for it rather than reading it twice) and queues it; one
// thread reads the queue head in batches of one tier each, and publishes what verified.

#include "kvtier/cache/promotion.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/cache/write_policy.hpp"
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
#include <memory>
#include <thread>

namespace kvtier::detail {

template <class Chain>
class prefetcher {
  static constexpr std::size_t tier_count = Chain::tier_count;
  using index_type = typename Chain::index_type;
  using state_type = cache_state<tier_count>;

 public:
  static constexpr std::size_t window = batch_chunks;  ///< chunks one read batch takes at most

  /// Starts the reader thread (when the chain has lower tiers); the queue holds `depth` chunks,
  /// or as many as the first tier holds when that is fewer (each holds a first-tier entry).
  prefetcher(Chain& chain, state_type& st, write_policy<Chain>& policy, promoter<Chain>& prom,
             const layout::chunk_format& f, std::size_t depth)
      : chain_(chain), st_(st), policy_(policy), promoter_(prom), format_(f) {
    if constexpr (Chain::has_lower) {
      depth = std::min(depth, chain.first_index().capacity());
      reserving("the prefetch queue (cache_config.prefetch_queue_depth)", depth * sizeof(job),
                [&] { ring_ = std::make_unique<job[]>(depth); });
      depth_ = depth;
      reader_ = std::thread([this] { loop(); });
    }
  }
  /// Stops; queued prefetches are abandoned (their entries stay invisible to the end).
  ~prefetcher() {
    if constexpr (Chain::has_lower) {
      {
        std::lock_guard lk(st_.mu);
        stop_ = true;
      }
      cv_.notify_all();
      reader_.join();
    }
  }
  prefetcher(const prefetcher&) = delete;
  prefetcher& operator=(const prefetcher&) = delete;

  /// Queues the chunks of keys `ks[0, n)` (chunk i holds `tokens_at(i)` tokens) that the first
  /// tier lacks, each from the first indexed tier holding it, else from the first remote tier.
  /// Stops at the first chunk no lower tier can hold, or when the queue or the first tier is
  /// full (counted in prefetch_dropped). Returns the tokens queued. Under the lock; call notify()
  /// after unlocking when it returned more than 0.
  template <class TokensAt>
  std::size_t start_locked(const chunk_key* ks, std::size_t n, TokensAt tokens_at) noexcept {
    index_type& first = chain_.first_index();
    std::size_t started = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (first.find(ks[i]) != nullptr) continue;  // held, or on its way in
      // The first indexed tier holding it; else the first remote tier (a miss costs a GET).
      std::size_t t = tier_count, remote = tier_count;
      index_entry* low = nullptr;
      for (std::size_t u = 1; u < tier_count && low == nullptr; ++u) {
        if (chain_.index(u) == nullptr) {
          remote = std::min(remote, u);
        } else if ((low = chain_.index(u)->find_ready(ks[i])) != nullptr) {
          t = u;
        }
      }
      if (low == nullptr) t = remote;
      if (t == tier_count) break;  // no tier below can hold it: the cached prefix ends here
      if (count_ == depth_) {
        ++st_.stats.prefetch_dropped;
        break;
      }
      index_entry* e = policy_.allocate_first_locked();
      if (e == nullptr) {
        ++st_.stats.prefetch_dropped;
        break;
      }
      const std::size_t ntok = tokens_at(i);
      first.insert_writing(*e, ks[i], static_cast<std::uint32_t>(ntok));
      if (low != nullptr) chain_.index(t)->ref(*low);
      ring_[(head_ + count_) % depth_] = {first.slot(*e), low ? chain_.index(t)->slot(*low) : 0,
                                          static_cast<std::uint8_t>(t)};
      ++count_;
      started += ntok;
    }
    return started;
  }
  void notify() noexcept { cv_.notify_one(); }

 private:
  struct job {
    std::uint32_t hslot = 0;  // the first tier's writing entry
    std::uint32_t lslot = 0;  // the lower tier's slot (indexed tiers)
    std::uint8_t tier = 0;
  };

  void loop() {
    index_type& first = chain_.first_index();
    std::array<job, window> pj;
    std::array<tier::read_job, window> jobs;
    std::unique_lock lk(st_.mu);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || count_ > 0; });
      if (stop_) break;
      // One batch from the queue's head, all from one tier.
      std::size_t n = 0;
      const std::uint8_t t = ring_[head_].tier;
      while (count_ > 0 && n < window && ring_[head_].tier == t) {
        pj[n] = ring_[head_];
        head_ = (head_ + 1) % depth_;
        --count_;
        const index_entry& e = first.at(pj[n].hslot);
        jobs[n] = {pj[n].lslot, e.key, e.tokens, chain_.first().data(pj[n].hslot),
                   format_.bytes(e.tokens)};
        ++n;
      }
      lk.unlock();
      chain_.read(t, {jobs.data(), n});
      lk.lock();
      for (std::size_t i = 0; i < n; ++i) {
        if (promoter_.finish_locked(pj[i].hslot, t, pj[i].lslot, jobs[i].status)) {
          ++st_.stats.prefetched;
          first.unref(first.at(pj[i].hslot));
        }
      }
      lk.unlock();
      st_.state_cv.notify_all();
      promoter_.forget_corrupt(jobs.data(), n, [&](std::size_t) { return t; });
      lk.lock();
    }
  }

  Chain& chain_;
  state_type& st_;
  write_policy<Chain>& policy_;
  promoter<Chain>& promoter_;
  const layout::chunk_format format_;
  std::unique_ptr<job[]> ring_;  // (not a vector: GCC 12 -O3 misreads its resize)
  std::size_t depth_ = 0;
  std::size_t head_ = 0, count_ = 0;
  std::condition_variable cv_;  // prefetch work or stop
  std::thread reader_;
  bool stop_ = false;
};

}  // namespace kvtier::detail
