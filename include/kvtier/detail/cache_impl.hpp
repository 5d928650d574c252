#pragma once
// The cache's machinery behind kvtier::cache (see cache.hpp for the documented API).

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/layout/view.hpp"
#include "kvtier/model.hpp"
#include "kvtier/stats.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/transfer/batch_plan.hpp"
#include "kvtier/transfer/host_copy.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <type_traits>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace kvtier {

/// When a lower tier receives a chunk stored in the first tier. Either way a lower tier with
/// `admit_after_hits` N > 0 takes a chunk only once lookups hit it N times in the first tier.
enum class write_mode {
  write_through,  ///< as soon as it is stored (queued; the engine never waits for it)
  write_back,     ///< when the first tier evicts it (and on flush()); its slot is freed then
};

/// Runtime settings of a cache that are not per tier.
struct cache_config {
  /// Longest token sequence lookup/store/pin accept; sizes the preallocated key buffers.
  std::size_t max_tokens = 131072;
  /// Operations in flight at once: live leases plus concurrent store/pin/unpin/clear calls.
  /// A call beyond it is refused as a miss (lookup) or stores nothing (store), and is counted.
  std::size_t max_inflight = 64;
  /// Chunks waiting for write-through to lower tiers; when full, writes are dropped (counted)
  /// rather than blocking the engine.
  std::size_t write_queue_depth = 1024;
  /// Also store the last, partial chunk of a sequence (off by default: a partial chunk is a hit
  /// only for a lookup whose tail is exactly the same tokens).
  bool store_partial_tail = false;
  /// When lower tiers receive a chunk (see write_mode).
  write_mode mode = write_mode::write_through;
  /// Chunks waiting to be loaded by prefetch(); when full, prefetch starts no more (counted).
  std::size_t prefetch_queue_depth = 256;
};

namespace detail {

/// One chunk held by an operation: which tier and slot.
struct chunk_ref {
  std::uint32_t slot = 0;
  std::uint8_t tier = 0;
  std::uint8_t wrote = 0;  ///< store: this call allocated the entry and must fill it
};

/// The ordering argument and event type of a first tier with asynchronous copies (the GPU
/// tiers); an empty tag for the others.
template <class F>
struct async_types {
  struct type {};
  using event = void*;
};
template <class F>
requires requires { typename F::transfers_type; }
struct async_types<F> {
  using type = typename F::transfers_type::order_type;
  using event = typename F::transfers_type::event_type;
};

/// Whether lower tiers can read a tier's slots (a tier without the member: yes).
template <class T>
inline constexpr bool host_visible_v = true;
template <class T>
requires requires { T::host_visible; }
inline constexpr bool host_visible_v<T> = T::host_visible;

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class TierTuple>
class cache_impl;

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
class cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher, std::tuple<First, Lower...>> {
  using index_type = chunk_index<Eviction>;
  using first_impl = typename First::template impl<Eviction>;
  static constexpr std::uint32_t no_op = UINT32_MAX;
  static constexpr std::uint8_t dropped_tier = 0xff;
  template <class T>
  static constexpr bool is_indexed = requires(std::remove_cvref_t<T>& x) {
    x.index();
  };
  static constexpr bool has_lower = sizeof...(Lower) > 0;
  static constexpr std::size_t remote_count =
      (std::size_t{0} + ... + !is_indexed<typename Lower::template impl<Eviction>>);
  static constexpr std::size_t window = 16;  // chunks promoted or written per batch
  static_assert(sizeof...(Lower) < 8, "kvtier: a tier chain has at most 8 tiers");
  static_assert(host_visible_v<First> || sizeof...(Lower) == 0,
                "kvtier::opt::tiers<tier::device, ...>: lower tiers need a host-visible first "
                "tier; use tier::pinned_host first");

 public:
  static constexpr std::size_t chunk_tokens = ChunkTokens;
  static constexpr std::size_t block_tokens = BlockTokens;  ///< 0 when known at run time only
  static constexpr std::size_t tier_count = 1 + sizeof...(Lower);
  using layout_type = Layout;
  using eviction_type = Eviction;
  using hasher_type = Hasher;
  using tier_list = std::tuple<First, Lower...>;
  using tier_configs = std::tuple<typename First::config, typename Lower::config...>;
  using stats_type = cache_stats<tier_count>;
  /// True when the first tier copies asynchronously on the GPU (tier::device, tier::pinned_host).
  static constexpr bool async_copies = requires { first_impl::async_copies; };
  /// How GPU copies are ordered with the engine's stream (gpu::stream_order for the GPU tiers).
  using order_type = typename async_types<first_impl>::type;
  /// The event a layer pipeline step returns (cudaEvent_t for the GPU tiers).
  using event_type = typename async_types<first_impl>::event;

  /// The result of lookup: the cached prefix, its chunks protected from eviction until
  /// retrieve() or release() (or destruction). Move-only; must not outlive its cache.
  class lease {
   public:
    lease() = default;
    lease(lease&& o) noexcept { take(o); }
    lease& operator=(lease&& o) noexcept {
      if (this != &o) {
        reset();
        take(o);
      }
      return *this;
    }
    lease(const lease&) = delete;
    lease& operator=(const lease&) = delete;
    ~lease() { reset(); }

    /// Tokens of the cached run from first_token() (a multiple of chunk_tokens unless a partial
    /// tail hit); for a lookup from the start, the cached prefix.
    [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
    /// The first token of the run: first_chunk * chunk_tokens of the lookup (0 by default).
    [[nodiscard]] std::size_t first_token() const noexcept { return first_ * ChunkTokens; }
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
    friend class cache_impl;
    void take(lease& o) noexcept {
      cache_ = std::exchange(o.cache_, nullptr);
      op_ = std::exchange(o.op_, no_op);
      chunks_ = std::exchange(o.chunks_, 0);
      tokens_ = std::exchange(o.tokens_, 0);
      first_ = std::exchange(o.first_, 0);
    }
    cache_impl* cache_ = nullptr;
    std::uint32_t op_ = no_op;
    std::size_t first_ = 0;  ///< first chunk of the run
    std::size_t chunks_ = 0;
    std::size_t tokens_ = 0;
  };

  cache_impl(const model_shape& model, const salt& s, const tier_configs& tiers = {},
             const cache_config& cfg = {})
      : model_(checked_model(model)),
        cfg_(checked_config(cfg)),
        format_(layout::chunk_format::from(model, ChunkTokens, layout::traits<Layout>::kv_planes)),
        salt_key_(make_salt_key(s, format_)),
        max_chunks_((cfg.max_tokens + ChunkTokens - 1) / ChunkTokens),
        op_keys_(std::make_unique<chunk_key[]>(max_chunks_ * cfg.max_inflight)),
        op_refs_(std::make_unique<chunk_ref[]>(max_chunks_ * cfg.max_inflight)) {
    const tier::context ctx{format_, salt_key_, model_.block_size, max_chunks_, cfg_.max_inflight};
    first_ = std::make_unique<first_impl>(std::get<0>(tiers), ctx);
    make_lower(tiers, ctx, std::index_sequence_for<Lower...>{});
    index_[0] = &first_->index();
    for (std::size_t t = 1; t < tier_count; ++t) {
      with_lower(t - 1, [&](auto& impl) {
        if constexpr (requires { impl.recovered(); }) {
          stats_.tiers[t].recovered = impl.recovered();
          stats_.tiers[t].errors = impl.dropped_at_open();
        }
      });
    }
    free_ops_.reserve(cfg.max_inflight);
    if constexpr (async_copies) {
      async_.resize(cfg.max_inflight);
      pending_.reserve(cfg.max_inflight);
    }
    for (std::size_t i = cfg.max_inflight; i-- > 0;) {
      free_ops_.push_back(static_cast<std::uint32_t>(i));
    }
    const char* names[] = {First::name, Lower::name...};
    for (std::size_t t = 0; t < tier_count; ++t) stats_.tiers[t].name = names[t];
    if constexpr (has_lower) {
      prefetch_ring_.resize(cfg.prefetch_queue_depth);
      for (std::size_t t = 1; t < tier_count; ++t) {
        rings_[t].slots.resize(cfg.write_queue_depth);
        for (std::size_t w = 0; w < writers_[t]; ++w) {
          rings_[t].threads.emplace_back([this, t] { writer_loop(t); });
        }
      }
      reader_ = std::thread([this] { reader_loop(); });
    }
  }

  /// Finishes queued writes to lower tiers (bounded by the queue depths) and stops; queued
  /// prefetches are abandoned. Under write_back, chunks not yet written back are not written:
  /// call flush() first to keep them.
  ~cache_impl() {
    if constexpr (async_copies) synchronize();
    if constexpr (has_lower) {
      {
        std::lock_guard lk(mu_);
        stop_ = true;
      }
      work_cv_.notify_all();
      prefetch_cv_.notify_all();
      for (std::size_t t = 1; t < tier_count; ++t) {
        for (auto& th : rings_[t].threads) th.join();
      }
      reader_.join();
    }
  }
  cache_impl(const cache_impl&) = delete;
  cache_impl& operator=(const cache_impl&) = delete;

  // ---- keys ---------------------------------------------------------------------------------

  /// Chunks a sequence of `tokens` tokens is cut into (full chunks, plus the partial tail when
  /// store_partial_tail is set).
  [[nodiscard]] std::size_t chunk_count(std::size_t tokens) const noexcept {
    return tokens / ChunkTokens + (cfg_.store_partial_tail && tokens % ChunkTokens ? 1 : 0);
  }

  /// Writes the keys of `tokens`' chunks into `out` and returns their count.
  /// Throws invalid_argument when `out` is too small. Thread-safe, allocates nothing.
  std::size_t keys(std::span<const token_id> tokens, std::span<chunk_key> out) const {
    const std::size_t n = chunk_count(tokens.size());
    if (out.size() < n) {
      throw invalid_argument("kvtier: keys() output holds " + std::to_string(out.size()) +
                             " keys, " + std::to_string(tokens.size()) + " tokens make " +
                             std::to_string(n) + " chunks");
    }
    chunk_key prev = salt_key_;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t b = i * ChunkTokens;
      prev = Hasher::next(prev, tokens.subspan(b, std::min(ChunkTokens, tokens.size() - b)));
      out[i] = prev;
    }
    return n;
  }

  // ---- the engine's calls -------------------------------------------------------------------

  lease lookup(std::span<const token_id> tokens, std::size_t first_chunk = 0) {
    check_tokens("lookup", tokens.size());
    const std::size_t n = chunk_count(tokens.size());
    check_first_chunk("lookup", first_chunk, n);
    lease l;
    l.cache_ = this;
    l.first_ = first_chunk;
    std::unique_lock lk(mu_);
    poll_pending_locked();
    ++stats_.lookups;
    stats_.lookup_tokens += tokens.size();
    if (first_chunk == n) return l;
    const std::uint32_t op = begin_op(lk, tokens, n);
    if (op == no_op) return l;
    const chunk_key* ks = op_keys(op);
    chunk_ref* rs = op_refs(op);
    std::size_t hit = 0, hit_tokens = 0;
    for (; first_chunk + hit < n; ++hit) {
      std::size_t t = 0;
      index_entry* e = nullptr;
      for (; t < tier_count; ++t) {
        if (index_[t] == nullptr) continue;  // remote tiers are asked below, for the rest at once
        if ((e = index_[t]->find_ready(ks[first_chunk + hit])) != nullptr) break;
        ++stats_.tiers[t].misses;
      }
      if (e == nullptr) break;
      index_[t]->ref(*e);
      ++stats_.tiers[t].hits;
      if (t == 0) note_hit_locked(*e);
      rs[hit] = {index_[t]->slot(*e), static_cast<std::uint8_t>(t), 0};
      hit_tokens += e->tokens;
    }
    if constexpr (remote_count > 0) {
      // The chunks no local tier holds: one pipelined existence check per remote tier, without
      // the lock, bounded by the tier's timeout. A remote tier that is down answers at once.
      if (first_chunk + hit < n) {
        const std::span<const chunk_key> rest(ks + first_chunk + hit, n - first_chunk - hit);
        lk.unlock();
        std::size_t found = 0, tier = 0;
        std::array<std::uint8_t, tier_count> asked{};
        for (std::size_t t = 1; t < tier_count && found == 0; ++t) {
          with_lower(t - 1, [&](auto& impl) {
            if constexpr (!is_indexed<decltype(impl)>) {
              found = impl.probe(rest);
              asked[t] = 1;
              tier = t;
            }
          });
        }
        lk.lock();
        for (std::size_t t = 1; t < tier_count; ++t) {
          if (asked[t] && (t != tier || found < rest.size())) ++stats_.tiers[t].misses;
        }
        if (found > 0) stats_.tiers[tier].hits += found;
        for (std::size_t j = 0; j < found; ++j, ++hit) {
          rs[hit] = {0, static_cast<std::uint8_t>(tier), 0};
          hit_tokens += chunk_tokens_at(first_chunk + hit, tokens.size());
        }
      }
    }
    stats_.hit_tokens += hit_tokens;
    if (hit == 0) {
      free_ops_.push_back(op);
      return l;
    }
    l.op_ = op;
    l.chunks_ = hit;
    l.tokens_ = hit_tokens;
    return l;
  }

  std::size_t retrieve(lease& l, const engine_kv& kv, block_table table,
                       std::size_t end_token = SIZE_MAX) {
    if constexpr (async_copies) {
      return retrieve(l, kv, table, order_type{}, end_token);
    }
    check_lease("retrieve", l);
    const layout::view<Layout> v(model_, kv);
    const std::size_t abs_end = l.end_token();
    const std::size_t count = chunks_to_load(l, v, table, end_token);
    if (count == 0) {
      release(l);
      return 0;
    }
    chunk_key* ks = op_keys(l.op_);
    chunk_ref* rs = op_refs(l.op_);
    std::size_t loaded = 0, bytes = 0;
    // A window of chunks at a time: its lower-tier chunks are promoted in one batch per tier,
    // then the window is scattered into the engine's blocks.
    for (std::size_t w = 0; w < count; w += window) {
      const std::size_t hi = std::min(count, w + window);
      if constexpr (has_lower) promote_window(ks + l.first_, rs, w, hi, l.first_, abs_end);
      std::size_t i = w;
      for (; i < hi && rs[i].tier == 0; ++i) {
        const std::size_t c = l.first_ + i;
        const std::size_t ntok = chunk_tokens_at(c, abs_end);
        transfer::scatter(v, format_, table, c * ChunkTokens, ntok, first_->data(rs[i].slot));
        loaded += ntok;
        bytes += format_.bytes(ntok);
      }
      if (i < hi) break;  // a chunk could not be brought in: the loaded prefix ends there
    }
    std::lock_guard lk(mu_);
    stats_.retrieved_tokens += loaded;
    stats_.bytes_to_engine += bytes;
    stats_.tiers[0].bytes_read += bytes;
    release_locked(l);
    return loaded;
  }

  std::size_t store(std::span<const token_id> tokens, const engine_kv& kv, block_table table,
                    std::size_t first_token = 0) {
    if constexpr (async_copies) {
      return store(tokens, kv, table, order_type{}, first_token);
    }
    check_tokens("store", tokens.size());
    if (first_token > tokens.size()) {
      throw invalid_argument("kvtier: store first_token " + std::to_string(first_token) +
                             " is past the " + std::to_string(tokens.size()) + " tokens");
    }
    const layout::view<Layout> v(model_, kv);
    const std::size_t n = chunk_count(tokens.size());
    // Chunks starting before first_token are skipped: the engine may no longer hold their blocks.
    const std::size_t first = (first_token + ChunkTokens - 1) / ChunkTokens;
    const std::size_t end = n == 0 ? 0 : std::min(n * ChunkTokens, tokens.size());
    v.check_block_table(table, std::min(first * ChunkTokens, end), end);
    if (first >= n) return 0;
    std::unique_lock lk(mu_);
    const std::uint32_t op = begin_op(lk, tokens, n);
    if (op == no_op) return 0;
    const chunk_key* ks = op_keys(op);
    chunk_ref* rs = op_refs(op);
    index_type& ix = *index_[0];
    const std::size_t placed = place_locked(ks, rs, first, n, tokens.size());
    lk.unlock();
    std::size_t bytes = 0;
    for (std::size_t i = first; i < placed; ++i) {
      if (!rs[i].wrote) continue;
      const std::size_t ntok = chunk_tokens_at(i, tokens.size());
      transfer::gather(v, format_, table, i * ChunkTokens, ntok, first_->data(rs[i].slot));
      bytes += format_.bytes(ntok);
    }
    lk.lock();
    for (std::size_t i = first; i < placed; ++i) {
      if (!rs[i].wrote) continue;
      index_entry& e = ix.at(rs[i].slot);
      ix.publish(e);
      ++stats_.tiers[0].writes;
      if constexpr (has_lower) on_stored_locked(e);
      ix.unref(e);
    }
    const std::size_t stored = std::min(placed * ChunkTokens, tokens.size()) - first * ChunkTokens;
    stats_.stored_tokens += stored;
    stats_.bytes_from_engine += bytes;
    stats_.tiers[0].bytes_written += bytes;
    free_ops_.push_back(op);
    lk.unlock();
    state_cv_.notify_all();
    if constexpr (has_lower) work_cv_.notify_all();
    return stored;
  }

  // ---- the GPU path: asynchronous copies and layer pipelines --------------------------------

  class store_pipeline;
  class retrieve_pipeline;

 private:
  // What a store or retrieve pipeline holds, and the steps both take: the cache, its operation
  // slot, the next layer to copy, and the tokens and bytes the operation moves.
  struct pipeline_state {
    cache_impl* c = nullptr;
    std::uint32_t op = no_op;
    std::size_t next = 0, tokens = 0, bytes = 0;

    pipeline_state() = default;
    pipeline_state(pipeline_state&& o) noexcept
        : c(std::exchange(o.c, nullptr)),
          op(std::exchange(o.op, no_op)),
          next(std::exchange(o.next, 0)),
          tokens(std::exchange(o.tokens, 0)),
          bytes(std::exchange(o.bytes, 0)) {}
    pipeline_state& operator=(pipeline_state&&) = delete;
    void assign(pipeline_state&& o, bool store) noexcept {
      if (this == &o) return;
      finish_noexcept(store);
      c = std::exchange(o.c, nullptr);
      op = std::exchange(o.op, no_op);
      next = std::exchange(o.next, 0);
      tokens = std::exchange(o.tokens, 0);
      bytes = std::exchange(o.bytes, 0);
    }

    // Copies layer `l` (the next one), after the engine stream's work for a store; returns the
    // layer's event.
    event_type layer(const char* what, std::size_t l, bool join) {
      if (op == no_op) return event_type{};
      c->check_layer_count(what, l);
      c->check_layer(what, l, next);
      auto& x = c->first_->transfers();
      if (join) x.join(op);
      x.copy(op, static_cast<std::uint32_t>(l), static_cast<std::uint32_t>(l + 1));
      ++next;
      return x.layer_signal(op, static_cast<std::uint32_t>(l));
    }
    void all(const char* what, bool join) {
      if (op == no_op) return;
      if (next != 0) c->check_layer(what, 0, next);
      auto& x = c->first_->transfers();
      if (join) x.join(op);
      x.copy(op, 0, static_cast<std::uint32_t>(c->model_.layers));
      next = c->model_.layers;
    }
    // Ends the operation: it completes (publishing a store's chunks if every layer was copied,
    // releasing a retrieve's) once its copies have. Returns the tokens moved, or 0.
    std::size_t finish(bool store) {
      if (c == nullptr) return 0;
      if (op == no_op) {
        c = nullptr;
        return 0;
      }
      try {
        c->first_->transfers().end(op);
      } catch (...) {
        fail();
        throw;
      }
      cache_impl* cc = std::exchange(c, nullptr);
      const std::uint32_t o = std::exchange(op, no_op);
      const bool whole = next == cc->model_.layers;
      std::lock_guard lk(cc->mu_);
      if (store) cc->async_[o].ok = whole;
      cc->pending_.push_back(o);
      if (!whole) return 0;
      if (store) {
        cc->stats_.stored_tokens += tokens;
        cc->stats_.bytes_from_engine += bytes;
        cc->stats_.tiers[0].bytes_written += bytes;
      } else {
        cc->stats_.retrieved_tokens += tokens;
        cc->stats_.bytes_to_engine += bytes;
        cc->stats_.tiers[0].bytes_read += bytes;
      }
      return tokens;
    }
    void finish_noexcept(bool store) noexcept {
      try {
        finish(store);
      } catch (...) {  // a destructor cannot report it; a store publishes nothing then
      }
    }
    // Staging or ending failed: whatever was enqueued is waited for, and the operation ends as
    // failed (a store publishes nothing).
    void fail() noexcept {
      c->first_->transfers().cancel(op);
      c->complete(std::exchange(op, no_op), false);
      c = nullptr;
    }
  };

 public:
  /// GPU tiers: store as above, the copy enqueued (all layers of all chunks in one batch) and
  /// ordered by `o`. Returns before the copy completes; the chunks become visible to lookup once
  /// it has (the next call that finds it complete publishes them, or synchronize()).
  std::size_t store(std::span<const token_id> tokens, const engine_kv& kv, block_table table,
                    const order_type& o, std::size_t first_token = 0) requires async_copies {
    store_pipeline p = begin_store(tokens, kv, table, o, first_token);
    p.store_all();
    return p.finish();
  }

  /// GPU tiers: retrieve as above, the copy into the engine's blocks enqueued in one batch and
  /// ordered by `o` (with run_on_stream false, o.stream waits for it). Returns the tokens whose
  /// copy was enqueued; the lease's chunks stay protected until it completes.
  std::size_t retrieve(lease& l, const engine_kv& kv, block_table table, const order_type& o,
                       std::size_t end_token = SIZE_MAX) requires async_copies {
    retrieve_pipeline p = begin_retrieve(l, kv, table, o, end_token);
    p.retrieve_all();
    return p.finish();
  }

  /// Starts a layer-wise store of `tokens` (as store()): entries are reserved and descriptors
  /// staged now; store_layer(l) then copies layer l once the engine's stream has computed it.
  store_pipeline begin_store(std::span<const token_id> tokens, const engine_kv& kv,
                             block_table table, const order_type& o,
                             std::size_t first_token = 0) requires async_copies {
    check_tokens("store", tokens.size());
    if (first_token > tokens.size()) {
      throw invalid_argument("kvtier: store first_token " + std::to_string(first_token) +
                             " is past the " + std::to_string(tokens.size()) + " tokens");
    }
    const layout::view<Layout> v(model_, kv);
    const std::size_t n = chunk_count(tokens.size());
    const std::size_t first = (first_token + ChunkTokens - 1) / ChunkTokens;
    const std::size_t end = n == 0 ? 0 : std::min(n * ChunkTokens, tokens.size());
    v.check_block_table(table, std::min(first * ChunkTokens, end), end);
    first_->transfers().validate(kv.tensors, o);
    store_pipeline p;
    p.st_.c = this;
    if (first >= n) return p;
    std::unique_lock lk(mu_);
    poll_pending_locked();
    const std::uint32_t op = begin_op(lk, tokens, n);
    if (op == no_op) return p;
    chunk_ref* rs = op_refs(op);
    const std::size_t placed = place_locked(op_keys(op), rs, first, n, tokens.size());
    async_[op] = {false, first, placed, true};
    lk.unlock();
    std::size_t wrote = 0;
    for (std::size_t i = first; i < placed; ++i) {
      if (rs[i].wrote) {
        ++wrote;
        p.st_.bytes += format_.bytes(chunk_tokens_at(i, tokens.size()));
      }
    }
    p.st_.op = op;
    p.st_.tokens = std::min(placed * ChunkTokens, tokens.size()) - first * ChunkTokens;
    auto& x = first_->transfers();
    try {
      x.begin(op, transfer::way::to_chunk, o);
      x.stage(op, v.resolved(), kv.tensors, table, wrote, [&, i = first](std::size_t) mutable {
        while (!rs[i].wrote) ++i;
        const transfer::staged_chunk c{
            rs[i].slot, static_cast<std::uint32_t>(chunk_tokens_at(i, tokens.size())),
            i * ChunkTokens};
        ++i;
        return c;
      });
    } catch (...) {
      p.st_.fail();
      throw;
    }
    return p;
  }

  /// Starts a layer-wise retrieve of the lease (as retrieve(); it consumes the lease): lower-tier
  /// chunks are promoted into the first tier now, then retrieve_layer(l) copies layer l.
  retrieve_pipeline begin_retrieve(lease& l, const engine_kv& kv, block_table table,
                                   const order_type& o,
                                   std::size_t end_token = SIZE_MAX) requires async_copies {
    check_lease("retrieve", l);
    const layout::view<Layout> v(model_, kv);
    const std::size_t abs_end = l.end_token();
    std::size_t count = chunks_to_load(l, v, table, end_token);
    first_->transfers().validate(kv.tensors, o);
    retrieve_pipeline p;
    p.st_.c = this;
    if (count == 0) {
      release(l);
      return p;
    }
    chunk_ref* rs = op_refs(l.op_);
    if constexpr (has_lower) {
      for (std::size_t w = 0; w < count; w += window) {
        promote_window(op_keys(l.op_) + l.first_, rs, w, std::min(count, w + window), l.first_,
                       abs_end);
      }
    }
    std::size_t loaded = 0;
    while (loaded < count && rs[loaded].tier == 0) ++loaded;  // a failed promotion ends it
    // The pipeline takes the lease's operation; its chunks are released once the copy is done.
    {
      std::lock_guard lk(mu_);
      poll_pending_locked();
      async_[l.op_] = {true, 0, l.chunks_, true};
    }
    p.st_.op = std::exchange(l.op_, no_op);
    l.cache_ = nullptr;
    l.chunks_ = l.tokens_ = 0;
    const std::size_t first = l.first_;
    for (std::size_t i = 0; i < loaded; ++i) {
      const std::size_t ntok = chunk_tokens_at(first + i, abs_end);
      p.st_.tokens += ntok;
      p.st_.bytes += format_.bytes(ntok);
    }
    auto& x = first_->transfers();
    try {
      x.begin(p.st_.op, transfer::way::to_engine, o);
      x.stage(p.st_.op, v.resolved(), kv.tensors, table, loaded, [&](std::size_t i) {
        return transfer::staged_chunk{
            rs[i].slot, static_cast<std::uint32_t>(chunk_tokens_at(first + i, abs_end)),
            (first + i) * ChunkTokens};
      });
    } catch (...) {
      p.st_.fail();
      throw;
    }
    return p;
  }

  /// Waits until every GPU copy started so far has completed, and publishes the stored chunks.
  void synchronize() requires async_copies {
    std::unique_lock lk(mu_);
    while (!pending_.empty()) {
      const std::uint32_t op = pending_.front();
      lk.unlock();
      first_->transfers().wait(op);
      lk.lock();
      poll_pending_locked();
    }
  }

  /// A layer-wise store (from begin_store). Call store_layer(l) for l = 0, 1, ... in order once
  /// the engine has enqueued layer l's KV computation on its stream, then finish() (or let it
  /// go out of scope). Chunks are published only if every layer was stored. Move-only.
  class store_pipeline {
   public:
    store_pipeline() = default;
    store_pipeline(store_pipeline&&) noexcept = default;
    store_pipeline& operator=(store_pipeline&& o) noexcept {
      st_.assign(std::move(o.st_), true);
      return *this;
    }
    ~store_pipeline() { st_.finish_noexcept(true); }

    /// Tokens this store covers (stored or already held), as store() returns.
    [[nodiscard]] std::size_t tokens() const noexcept { return st_.tokens; }
    /// Copies layer `l` of every chunk after the work now on the engine's stream; returns the
    /// event marking its copy done (after it, the engine may reuse those blocks), or a null
    /// event when this pipeline moves nothing.
    event_type store_layer(std::size_t l) { return st_.layer("store_layer", l, true); }
    /// Copies every layer at once (what store() does).
    void store_all() { st_.all("store_all", true); }
    /// Ends the store: returns tokens() if every layer was stored (the chunks are published once
    /// the copies complete), else 0 and nothing is published.
    std::size_t finish() { return st_.finish(true); }

   private:
    friend class cache_impl;
    pipeline_state st_;
  };

  /// A layer-wise retrieve (from begin_retrieve). Call retrieve_layer(l) for l = 0, 1, ... in
  /// order before the engine enqueues layer l's attention: the engine's stream (with
  /// run_on_stream false) waits for that layer only, so loading layer l+1 overlaps computing
  /// layer l. Then finish() (or let it go out of scope). Move-only.
  class retrieve_pipeline {
   public:
    retrieve_pipeline() = default;
    retrieve_pipeline(retrieve_pipeline&&) noexcept = default;
    retrieve_pipeline& operator=(retrieve_pipeline&& o) noexcept {
      st_.assign(std::move(o.st_), false);
      return *this;
    }
    ~retrieve_pipeline() { st_.finish_noexcept(false); }

    /// Tokens this retrieve loads (a prefix of the lease), as retrieve() returns.
    [[nodiscard]] std::size_t tokens() const noexcept { return st_.tokens; }
    /// Copies layer `l` of every chunk into the engine's blocks; returns the event marking it
    /// loaded (the engine's stream already waits for it unless run_on_stream), or a null event
    /// when this pipeline moves nothing.
    event_type retrieve_layer(std::size_t l) { return st_.layer("retrieve_layer", l, false); }
    /// Copies every layer at once (what retrieve() does).
    void retrieve_all() { st_.all("retrieve_all", false); }
    /// Ends the retrieve: returns tokens() if every layer was loaded, else 0 (the layers loaded
    /// are in the engine's blocks, but the prefix is not whole). The chunks stay protected until
    /// the copies complete.
    std::size_t finish() { return st_.finish(false); }

   private:
    friend class cache_impl;
    pipeline_state st_;
  };

  /// Starts loading the lower-tier chunks of `tokens`' cached prefix into the first tier in the
  /// background; returns the tokens whose loading started. lookup() reports a chunk in the
  /// first tier once it is loaded (and in its lower tier until then).
  std::size_t prefetch(std::span<const token_id> tokens) {
    check_tokens("prefetch", tokens.size());
    if constexpr (!has_lower) {
      return 0;
    } else {
      const std::size_t n = chunk_count(tokens.size());
      if (n == 0) return 0;
      std::unique_lock lk(mu_);
      poll_pending_locked();
      const std::uint32_t op = begin_op(lk, tokens, n);
      if (op == no_op) return 0;
      const chunk_key* ks = op_keys(op);
      index_type& first = *index_[0];
      std::size_t started = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (first.find(ks[i]) != nullptr) continue;  // held, or on its way in
        // The first indexed tier holding it; else the first remote tier (a miss costs a GET).
        std::size_t t = tier_count, remote = tier_count;
        index_entry* low = nullptr;
        for (std::size_t u = 1; u < tier_count && low == nullptr; ++u) {
          if (index_[u] == nullptr) {
            remote = std::min(remote, u);
          } else if ((low = index_[u]->find_ready(ks[i])) != nullptr) {
            t = u;
          }
        }
        if (low == nullptr) t = remote;
        if (t == tier_count) break;  // no tier below can hold it: the cached prefix ends here
        if (prefetch_count_ == prefetch_ring_.size()) {
          ++stats_.prefetch_dropped;
          break;
        }
        index_entry* e = allocate_first_locked();
        if (e == nullptr) {
          ++stats_.prefetch_dropped;
          break;
        }
        first.insert_writing(*e, ks[i],
                             static_cast<std::uint32_t>(chunk_tokens_at(i, tokens.size())));
        if (low != nullptr) index_[t]->ref(*low);
        prefetch_ring_[(prefetch_head_ + prefetch_count_) % prefetch_ring_.size()] = {
            first.slot(*e), low ? index_[t]->slot(*low) : 0, static_cast<std::uint8_t>(t)};
        ++prefetch_count_;
        started += chunk_tokens_at(i, tokens.size());
      }
      free_ops_.push_back(op);
      lk.unlock();
      if (started > 0) prefetch_cv_.notify_one();
      return started;
    }
  }

  /// Throws what store or retrieve would throw for `kv` and the blocks of tokens [begin, end) of
  /// `table`, without doing anything else.
  void validate(const engine_kv& kv, block_table table, std::size_t begin, std::size_t end) const {
    layout::view<Layout>(model_, kv).check_block_table(table, begin, end);
  }

  void release(lease& l) noexcept {
    if (l.cache_ != this) return;
    std::lock_guard lk(mu_);
    release_locked(l);
  }

  std::size_t pin(std::span<const token_id> tokens) {
    return for_each_chunk("pin", tokens, true, [](index_type& ix, index_entry& e) {
      ix.pin(e);
      return true;
    });
  }

  std::size_t unpin(std::span<const token_id> tokens) {
    return for_each_chunk("unpin", tokens, false,
                          [](index_type& ix, index_entry& e) { return ix.unpin(e); });
  }

  std::size_t clear(std::span<const token_id> tokens) {
    return for_each_chunk(
        "clear", tokens, false, [](index_type& ix, index_entry& e) { return ix.remove(e); },
        [&](std::span<const chunk_key> ks, std::size_t done) {
          // Remote tiers have no local index: their chunks are deleted by key. A chunk only a
          // remote tier held counts too (full chunks; the tail last).
          std::size_t removed = 0;
          for (std::size_t t = 1; t < tier_count; ++t) {
            with_lower(t - 1, [&](auto& impl) {
              if constexpr (!is_indexed<decltype(impl)>)
                removed = std::max(removed, impl.remove(ks));
            });
          }
          return std::max(done, std::min(removed * ChunkTokens, tokens.size()));
        });
  }

  std::size_t clear() {
    std::unique_lock lk(mu_);
    poll_pending_locked();
    std::size_t removed = 0;
    for (std::size_t t = 0; t < tier_count; ++t) {
      if (index_[t] == nullptr) continue;
      index_type& ix = *index_[t];
      for (std::uint32_t s = 0; s < ix.capacity(); ++s) {
        index_entry& e = ix.at(s);
        if (e.state == entry_state::ready && ix.remove(e)) ++removed;
      }
    }
    lk.unlock();
    if constexpr (remote_count > 0) {
      for (std::size_t t = 1; t < tier_count; ++t) {
        with_lower(t - 1, [&](auto& impl) {
          if constexpr (!is_indexed<decltype(impl)>) removed += impl.remove_all();
        });
      }
    }
    return removed;
  }

  /// Waits until every queued write to a lower tier has completed. Under write_back it first
  /// writes back every chunk the first tier still owes a lower tier (and has admitted).
  void flush() {
    if constexpr (async_copies) synchronize();
    if constexpr (has_lower) {
      std::unique_lock lk(mu_);
      for (bool more = true; more;) {
        more = false;
        if (cfg_.mode == write_mode::write_back) {
          index_type& ix = *index_[0];
          for (std::uint32_t s = 0; s < ix.capacity(); ++s) {
            index_entry& e = ix.at(s);
            if (e.state != entry_state::ready || e.owed == 0) continue;
            for (std::size_t t = 1; t < tier_count; ++t) {
              if ((e.owed & bit(t)) && admitted(e, t) && !try_enqueue_locked(e, t, false)) {
                more = true;  // that queue is full: wait for it, then go on
              }
            }
          }
          work_cv_.notify_all();
        }
        idle_cv_.wait(lk, [this] { return writers_idle_locked(); });
      }
    }
  }

  [[nodiscard]] stats_type stats() const {
    std::lock_guard lk(mu_);
    stats_type s = stats_;
    for (std::size_t t = 0; t < tier_count; ++t) {
      if (index_[t] == nullptr) continue;  // a remote tier does not know what it holds
      s.tiers[t].used_chunks = index_[t]->size();
      s.tiers[t].capacity_chunks = index_[t]->capacity();
    }
    return s;
  }

  [[nodiscard]] const model_shape& model() const noexcept { return model_; }
  [[nodiscard]] const cache_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const layout::chunk_format& format() const noexcept { return format_; }
  [[nodiscard]] const chunk_key& salt_key() const noexcept { return salt_key_; }

  /// Tier I's implementation, for diagnostics and tests (its file, its slab).
  template <std::size_t I>
  [[nodiscard]] auto& tier() noexcept {
    if constexpr (I == 0) {
      return *first_;
    } else {
      return *std::get<I - 1>(lower_);
    }
  }

 private:
  // ---- construction -------------------------------------------------------------------------

  static model_shape checked_model(const model_shape& m) {
    const std::pair<const char*, std::uint32_t> fields[] = {{"layers", m.layers},
                                                            {"kv_heads", m.kv_heads},
                                                            {"head_size", m.head_size},
                                                            {"dtype_size", m.dtype_size},
                                                            {"block_size", m.block_size}};
    for (auto [name, value] : fields) {
      if (value == 0) throw invalid_argument(std::string("kvtier: model_shape.") + name + " is 0");
    }
    if (BlockTokens != 0 && m.block_size != BlockTokens) {
      throw invalid_argument("kvtier: model_shape.block_size " + std::to_string(m.block_size) +
                             " differs from opt::block_tokens " + std::to_string(BlockTokens));
    }
    if (ChunkTokens % m.block_size != 0) {
      throw invalid_argument("kvtier: chunk size " + std::to_string(ChunkTokens) +
                             " is not a multiple of the engine block size " +
                             std::to_string(m.block_size));
    }
    std::size_t bytes = layout::traits<Layout>::kv_planes * ChunkTokens;
    for (std::size_t f : {std::size_t{m.layers}, std::size_t{m.kv_heads}, std::size_t{m.head_size},
                          std::size_t{m.dtype_size}}) {
      if (__builtin_mul_overflow(bytes, f, &bytes)) {
        throw invalid_argument("kvtier: model_shape makes a chunk larger than 2^64 bytes");
      }
    }
    return m;
  }

  static cache_config checked_config(const cache_config& c) {
    if (c.max_tokens == 0) throw invalid_argument("kvtier: cache_config.max_tokens is 0");
    if (c.max_inflight == 0 || c.max_inflight >= no_op) {
      throw invalid_argument("kvtier: cache_config.max_inflight " + std::to_string(c.max_inflight) +
                             " is out of range 1..2^32-2");
    }
    if (c.write_queue_depth == 0) {
      throw invalid_argument("kvtier: cache_config.write_queue_depth is 0");
    }
    if (c.prefetch_queue_depth == 0) {
      throw invalid_argument("kvtier: cache_config.prefetch_queue_depth is 0");
    }
    return c;
  }

  static chunk_key make_salt_key(const salt& s, const layout::chunk_format& f) {
    if (s.tp_size == 0 || s.tp_rank >= s.tp_size) {
      throw invalid_argument("kvtier: salt.tp_rank " + std::to_string(s.tp_rank) +
                             " is not below salt.tp_size " + std::to_string(s.tp_size));
    }
    // Canonical bytes: a version tag, then each field as a little-endian u64 or a
    // length-prefixed string, in a fixed order (documented in docs/keys.md).
    std::string b = "kvtier.salt.v1";
    auto u64 = [&b](std::uint64_t v) {
      for (int i = 0; i < 8; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    };
    auto str = [&](const std::string& v) {
      u64(v.size());
      b += v;
    };
    str(s.model_id);
    str(s.kv_dtype);
    u64(f.fingerprint());
    u64(s.tp_rank);
    u64(s.tp_size);
    str(s.tenant);
    str(Hasher::name);
    return Hasher::seed(std::as_bytes(std::span(b.data(), b.size())));
  }

  template <std::size_t... I>
  void make_lower(const tier_configs& tiers, const tier::context& ctx, std::index_sequence<I...>) {
    ((std::get<I>(lower_) =
          std::make_unique<typename Lower::template impl<Eviction>>(std::get<I + 1>(tiers), ctx),
      admit_[I + 1] = admit_after(std::get<I + 1>(tiers)),
      writers_[I + 1] = writers_of(std::get<I + 1>(tiers)), lower_mask_ |= bit(I + 1)),
     ...);
    (set_index<I>(), ...);
  }
  template <std::size_t I>
  void set_index() noexcept {
    if constexpr (is_indexed<decltype(*std::get<I>(lower_))>) {
      index_[I + 1] = &std::get<I>(lower_)->index();
    }
  }

  // Threads writing into a lower tier: its config's `writers`, else 1.
  template <class Config>
  static std::size_t writers_of(const Config& c) {
    if constexpr (requires { c.writers; }) {
      if (c.writers == 0 || c.writers > 64) {
        throw invalid_argument("kvtier: writers " + std::to_string(c.writers) +
                               " is out of range 1..64");
      }
      return c.writers;
    } else {
      return 1;
    }
  }

  template <class Config>
  static std::uint32_t admit_after(const Config& c) {
    if constexpr (requires { c.admit_after_hits; }) {
      if (c.admit_after_hits > 255) {
        throw invalid_argument("kvtier: admit_after_hits " + std::to_string(c.admit_after_hits) +
                               " is above 255");
      }
      return static_cast<std::uint32_t>(c.admit_after_hits);
    } else {
      return 0;
    }
  }

  // ---- helpers ------------------------------------------------------------------------------

  void check_tokens(const char* what, std::size_t n) const {
    if (n > cfg_.max_tokens) {
      throw invalid_argument(std::string("kvtier: ") + what + " of " + std::to_string(n) +
                             " tokens exceeds cache_config.max_tokens " +
                             std::to_string(cfg_.max_tokens));
    }
  }
  static void check_first_chunk(const char* what, std::size_t first, std::size_t n) {
    if (first > n) {
      throw invalid_argument(std::string("kvtier: ") + what + " first_chunk " +
                             std::to_string(first) + " is past the " + std::to_string(n) +
                             " chunks of the tokens");
    }
  }
  void check_lease(const char* what, const lease& l) const {
    if (l.cache_ == nullptr) {
      throw invalid_argument(std::string("kvtier: ") + what +
                             " of a lease that is not live (moved from, released or retrieved)");
    }
    if (l.cache_ != this) {
      throw invalid_argument(std::string("kvtier: ") + what + " of a lease of another cache");
    }
  }
  static std::size_t chunk_tokens_at(std::size_t i, std::size_t total) noexcept {
    return std::min(ChunkTokens, total - i * ChunkTokens);
  }
  static constexpr std::uint8_t bit(std::size_t t) noexcept {
    return static_cast<std::uint8_t>(1u << t);
  }
  chunk_key* op_keys(std::uint32_t op) const noexcept { return op_keys_.get() + op * max_chunks_; }
  chunk_ref* op_refs(std::uint32_t op) const noexcept { return op_refs_.get() + op * max_chunks_; }

  // Store: finds or allocates first-tier entries for chunks [first, n) (of a sequence of
  // `total` tokens); an allocated one is `writing` and marked `wrote`. Returns one past the last
  // chunk placed (fewer than n when nothing more is evictable).
  std::size_t place_locked(const chunk_key* ks, chunk_ref* rs, std::size_t first, std::size_t n,
                           std::size_t total) noexcept {
    index_type& ix = *index_[0];
    std::size_t placed = first;
    for (; placed < n; ++placed) {
      if (index_entry* e = ix.find(ks[placed])) {
        ix.touch(*e);  // already held (or being written by another caller)
        rs[placed] = {ix.slot(*e), 0, 0};
        continue;
      }
      index_entry* e = allocate_first_locked();
      if (e == nullptr) break;  // everything left is leased, pinned or being written
      ix.insert_writing(*e, ks[placed], static_cast<std::uint32_t>(chunk_tokens_at(placed, total)));
      rs[placed] = {ix.slot(*e), 0, 1};
    }
    if (placed < n) ++stats_.store_partial;
    return placed;
  }

  // Retrieve: the lease's chunks that end at or before end_token, after checking the table.
  std::size_t chunks_to_load(const lease& l, const layout::view<Layout>& v, block_table table,
                             std::size_t end_token) const {
    const std::size_t abs_end = l.end_token();
    std::size_t count = l.chunks_;
    while (count > 0 &&
           (l.first_ + count - 1) * ChunkTokens + chunk_tokens_at(l.first_ + count - 1, abs_end) >
               end_token) {
      --count;
    }
    const std::size_t load_end = count == 0 ? l.first_token()
                                            : (l.first_ + count - 1) * ChunkTokens +
                                                  chunk_tokens_at(l.first_ + count - 1, abs_end);
    v.check_block_table(table, l.first_token(), load_end);
    return count;
  }

  // ---- asynchronous copies (GPU tiers) ------------------------------------------------------

  static void check_layer(const char* what, std::size_t l, std::size_t next) {
    if (l != next) {
      throw invalid_argument(std::string("kvtier: ") + what + "(" + std::to_string(l) +
                             ") out of order: layer " + std::to_string(next) +
                             " is next (layers are copied once each, in order)");
    }
  }
  void check_layer_count(const char* what, std::size_t l) const {
    if (l >= model_.layers) {
      throw invalid_argument(std::string("kvtier: ") + what + "(" + std::to_string(l) +
                             ") is past the model's " + std::to_string(model_.layers) + " layers");
    }
  }

  // Operation `op`'s copies finished (ok) or failed: a store publishes its chunks (or drops
  // them: a failed or incomplete store is never visible), a retrieve releases its lease's chunks.
  void complete_locked(std::uint32_t op, bool ok) noexcept {
    const async_op& a = async_[op];
    chunk_ref* rs = op_refs(op);
    if (!a.retrieve) {
      index_type& ix = *index_[0];
      for (std::size_t i = a.first; i < a.count; ++i) {
        if (!rs[i].wrote) continue;
        index_entry& e = ix.at(rs[i].slot);
        if (ok && a.ok) {
          ix.publish(e);
          ++stats_.tiers[0].writes;
          if constexpr (has_lower) on_stored_locked(e);
        } else {
          ix.abort(e);
          if (!ok) ++stats_.tiers[0].errors;
        }
        ix.unref(e);
      }
    } else {
      for (std::size_t i = 0; i < a.count; ++i) {
        if (rs[i].tier == dropped_tier || index_[rs[i].tier] == nullptr) continue;
        index_type& ix = *index_[rs[i].tier];
        ix.unref(ix.at(rs[i].slot));
      }
    }
    free_ops_.push_back(op);
  }
  void complete(std::uint32_t op, bool ok) noexcept {
    {
      std::lock_guard lk(mu_);
      complete_locked(op, ok);
    }
    state_cv_.notify_all();
  }

  // Completes every pending operation whose copies have finished.
  void poll_pending_locked() noexcept {
    if constexpr (async_copies) {
      bool any = false;
      for (std::size_t k = 0; k < pending_.size();) {
        const std::uint32_t op = pending_[k];
        const auto st = first_->transfers().poll(op);
        if (st == decltype(st)::pending) {
          ++k;
          continue;
        }
        complete_locked(op, st == decltype(st)::done);
        pending_[k] = pending_.back();
        pending_.pop_back();
        any = true;
      }
      if (any) {
        state_cv_.notify_all();
        if constexpr (has_lower) work_cv_.notify_all();
      }
    }
  }

  // Waits for an entry to leave the writing state. With asynchronous copies nothing signals
  // that by itself: the copies are polled every 100 us meanwhile.
  void wait_state_locked(std::unique_lock<std::mutex>& lk) {
    if constexpr (async_copies) {
      poll_pending_locked();
      state_cv_.wait_for(lk, std::chrono::microseconds(100));
    } else {
      state_cv_.wait(lk);
    }
  }

  std::uint32_t acquire_op_locked() noexcept {
    if (free_ops_.empty()) {
      ++stats_.busy;
      return no_op;
    }
    const std::uint32_t op = free_ops_.back();
    free_ops_.pop_back();
    return op;
  }

  // Takes an operation slot and fills its keys for `tokens` (n chunks) without the lock; `lk`
  // is held on entry and on return. no_op when every slot is taken (counted in busy).
  std::uint32_t begin_op(std::unique_lock<std::mutex>& lk, std::span<const token_id> tokens,
                         std::size_t n) {
    const std::uint32_t op = acquire_op_locked();
    if (op == no_op) return no_op;
    lk.unlock();
    keys(tokens, {op_keys(op), n});
    lk.lock();
    return op;
  }

  void release_locked(lease& l) noexcept {
    if (l.op_ != no_op) {
      const chunk_ref* rs = op_refs(l.op_);
      for (std::size_t i = 0; i < l.chunks_; ++i) {
        if (rs[i].tier == dropped_tier || index_[rs[i].tier] == nullptr) continue;
        index_type& ix = *index_[rs[i].tier];
        ix.unref(ix.at(rs[i].slot));
      }
      free_ops_.push_back(l.op_);
    }
    l.cache_ = nullptr;
    l.op_ = no_op;
    l.chunks_ = 0;
    l.tokens_ = 0;
  }

  std::size_t lease_hits_in(const lease& l, std::size_t t) const noexcept {
    if (l.op_ == no_op) return 0;
    const chunk_ref* rs = op_refs(l.op_);
    std::size_t n = 0;
    for (std::size_t i = 0; i < l.chunks_; ++i) n += rs[i].tier == t;
    return n;
  }

  // Under the lock, applies `op(index, entry) -> bool` to each chunk of `tokens` in every
  // indexed tier holding it ready; returns the tokens of the chunks it was true for in some tier
  // (only the prefix up to the first chunk it was true for nowhere, when `prefix`). Then, without
  // the lock, `after(keys, done)` may act on the chunk keys and returns the final count.
  template <class Op, class After>
  std::size_t for_each_chunk(const char* what, std::span<const token_id> tokens, bool prefix, Op op,
                             After after) {
    check_tokens(what, tokens.size());
    const std::size_t n = chunk_count(tokens.size());
    if (n == 0) return 0;
    std::unique_lock lk(mu_);
    poll_pending_locked();
    const std::uint32_t op_slot = begin_op(lk, tokens, n);
    if (op_slot == no_op) return 0;
    const chunk_key* ks = op_keys(op_slot);
    std::size_t done = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bool any = false;
      for (std::size_t t = 0; t < tier_count; ++t) {
        if (index_[t] == nullptr) continue;
        if (index_entry* e = index_[t]->find_ready(ks[i])) any = op(*index_[t], *e) || any;
      }
      if (any) {
        done += chunk_tokens_at(i, tokens.size());
      } else if (prefix) {
        break;
      }
    }
    lk.unlock();
    done = after(std::span<const chunk_key>(ks, n), done);
    lk.lock();
    free_ops_.push_back(op_slot);
    return done;
  }
  template <class Op>
  std::size_t for_each_chunk(const char* what, std::span<const token_id> tokens, bool prefix,
                             Op op) {
    return for_each_chunk(what, tokens, prefix, op,
                          [](std::span<const chunk_key>, std::size_t done) { return done; });
  }

  // ---- tier-chain policy --------------------------------------------------------------------

  // The first tier's allocation: under write_back, a victim that still owes a lower tier its
  // bytes is queued for writing instead (its slot frees when the write completes) and the next
  // victim is tried; when its queue is full it is evicted unwritten (a counted dropped write).
  index_entry* allocate_first_locked() noexcept {
    return index_[0]->allocate(stats_.tiers[0].evictions, [this](index_entry& v) {
      if constexpr (has_lower) {
        if (cfg_.mode != write_mode::write_back || v.owed == 0) return false;
        bool kept = false;
        for (std::size_t t = 1; t < tier_count; ++t) {
          if (!(v.owed & bit(t)) || !admitted(v, t)) continue;
          if (try_enqueue_locked(v, t, true)) {
            kept = true;
          } else {
            ++stats_.tiers[t].dropped_writes;
          }
        }
        return kept;
      } else {
        (void)v;
        return false;
      }
    });
  }

  bool admitted(const index_entry& e, std::size_t t) const noexcept {
    return admit_[t] == 0 || e.hits >= admit_[t];
  }

  // A chunk just stored in the first tier: every lower tier is owed it; under write-through,
  // the tiers that admit it at once get it queued now.
  void on_stored_locked(index_entry& e) noexcept {
    e.owed = lower_mask_;
    if (cfg_.mode != write_mode::write_through) return;
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (admit_[t] == 0 && !try_enqueue_locked(e, t, false)) {
        ++stats_.tiers[t].dropped_writes;
        e.owed &= static_cast<std::uint8_t>(~bit(t));
      }
    }
  }

  // A lookup hit in the first tier: counts toward admission into lower tiers.
  void note_hit_locked(index_entry& e) noexcept {
    if (e.hits < 255) ++e.hits;
    if constexpr (has_lower) {
      if (cfg_.mode != write_mode::write_through || e.owed == 0) return;
      bool queued = false;
      for (std::size_t t = 1; t < tier_count; ++t) {
        if ((e.owed & bit(t)) && admit_[t] != 0 && e.hits >= admit_[t]) {
          if (try_enqueue_locked(e, t, false)) {
            queued = true;
          } else {
            ++stats_.tiers[t].dropped_writes;
            e.owed &= static_cast<std::uint8_t>(~bit(t));
          }
        }
      }
      if (queued) work_cv_.notify_all();
    }
  }

  // Queues the first tier's entry `e` for writing to tier t (referenced until written); false
  // when that queue is full.
  bool try_enqueue_locked(index_entry& e, std::size_t t, bool evict_after) noexcept {
    write_ring& r = rings_[t];
    if (r.count == r.slots.size()) return false;
    index_[0]->ref(e);  // the writer reads the first tier's bytes in place
    r.slots[(r.head + r.count) % r.slots.size()] = index_[0]->slot(e);
    ++r.count;
    e.owed &= static_cast<std::uint8_t>(~bit(t));
    if (evict_after) e.evict_after_write = 1;
    return true;
  }

  bool writers_idle_locked() const noexcept {
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (rings_[t].count != 0 || rings_[t].active != 0) return false;
    }
    return true;
  }

  // ---- lower tiers --------------------------------------------------------------------------

  template <class F>
  void with_lower(std::size_t j, F&& f) {
    with_lower_impl(j, f, std::index_sequence_for<Lower...>{});
  }
  template <class F, std::size_t... I>
  void with_lower_impl(std::size_t j, F& f, std::index_sequence<I...>) {
    ((j == I ? (f(*std::get<I>(lower_)), 0) : 0), ...);
  }

  // Reads the jobs of lower tier t in one batch.
  void read_lower(std::size_t t, std::span<tier::read_job> jobs) {
    with_lower(t - 1, [&](auto& impl) { impl.read_batch(jobs); });
  }

  // The end of bringing a chunk from lower tier t (slot `lslot` there, when indexed) into the
  // first tier's writing entry `hslot`. On success the entry is published and keeps the
  // caller's reference; otherwise it is aborted and unreferenced. The lower reference (indexed
  // tiers) is dropped either way; a record that failed verification is discarded, pinned or
  // not, so it is never served.
  bool finish_promotion_locked(std::uint32_t hslot, std::size_t t, std::uint32_t lslot,
                               tier::read_status st) noexcept {
    index_type& first = *index_[0];
    index_entry& e = first.at(hslot);
    const std::size_t bytes = format_.bytes(e.tokens);
    const bool ok = st == tier::read_status::ok;
    if (ok) {
      first.publish(e);
      ++stats_.tiers[t].promotions;
      stats_.tiers[t].bytes_read += bytes;
      ++stats_.tiers[0].writes;
      stats_.tiers[0].bytes_written += bytes;
    } else {
      first.abort(e);
      first.unref(e);
      if (st != tier::read_status::missing) ++stats_.tiers[t].errors;
    }
    if (index_type* low = index_[t]) {
      index_entry& le = low->at(lslot);
      if (st == tier::read_status::corrupt) low->discard(le);
      low->unref(le);
    }
    return ok;
  }

  // Brings the lower-tier chunks of a lease's window [lo, hi) into the first tier, one read
  // batch per tier, without the lock during I/O. On return each chunk's ref is in the first
  // tier (still referenced) or dropped.
  void promote_window(const chunk_key* ks, chunk_ref* rs, std::size_t lo, std::size_t hi,
                      std::size_t first_chunk, std::size_t abs_end) {
    bool any = false;
    for (std::size_t i = lo; i < hi; ++i) any = any || (rs[i].tier != 0);
    if (!any) return;
    index_type& first = *index_[0];
    std::array<tier::read_job, window> jobs;
    std::array<std::uint32_t, window> at{};     // chunk index of each job
    std::array<std::uint32_t, window> hslot{};  // its first-tier entry
    std::array<std::uint32_t, window> wait{};   // chunks another caller is bringing in
    std::size_t nj = 0, nw = 0;
    std::unique_lock lk(mu_);
    // Jobs are collected tier by tier, so each tier's jobs are contiguous: one batch each.
    for (std::size_t t = 1; t < tier_count; ++t) {
      for (std::size_t i = lo; i < hi; ++i) {
        chunk_ref& r = rs[i];
        if (r.tier != t) continue;
        index_entry* e = first.find(ks[i]);
        if (e != nullptr && e->state == entry_state::ready) {
          first.ref(*e);
          drop_ref_locked(r);
          r = {first.slot(*e), 0, 0};
        } else if (e != nullptr) {
          wait[nw++] = static_cast<std::uint32_t>(i);
        } else if ((e = allocate_first_locked()) == nullptr) {
          drop_ref_locked(r);
        } else {
          const std::size_t ntok = chunk_tokens_at(first_chunk + i, abs_end);
          first.insert_writing(*e, ks[i], static_cast<std::uint32_t>(ntok));
          hslot[nj] = first.slot(*e);
          jobs[nj] = {r.slot, ks[i], static_cast<std::uint32_t>(ntok), first_->data(hslot[nj]),
                      format_.bytes(ntok)};
          at[nj++] = static_cast<std::uint32_t>(i);
        }
      }
    }
    lk.unlock();
    for (std::size_t j = 0; j < nj;) {
      std::size_t k = j;
      const std::uint8_t t = rs[at[j]].tier;
      while (k < nj && rs[at[k]].tier == t) ++k;
      read_lower(t, {jobs.data() + j, k - j});
      j = k;
    }
    std::array<std::uint8_t, window> tier_of{};
    for (std::size_t j = 0; j < nj; ++j) tier_of[j] = rs[at[j]].tier;
    lk.lock();
    for (std::size_t j = 0; j < nj; ++j) {
      chunk_ref& r = rs[at[j]];
      if (finish_promotion_locked(hslot[j], r.tier, r.slot, jobs[j].status)) {
        r = {hslot[j], 0, 0};
      } else {
        r = {0, dropped_tier, 0};
      }
    }
    lk.unlock();
    if (nj > 0) state_cv_.notify_all();
    forget_corrupt_remote(jobs.data(), nj, [&](std::size_t j) { return tier_of[j]; });
    if (nw == 0) return;
    // Wait for the chunks other callers (or prefetch) are bringing in, now that this caller
    // holds no writing entry of its own.
    lk.lock();
    for (std::size_t w = 0; w < nw; ++w) {
      chunk_ref& r = rs[wait[w]];
      index_entry* e;
      while ((e = first.find(ks[wait[w]])) != nullptr && e->state == entry_state::writing) {
        wait_state_locked(lk);
      }
      if (e != nullptr) {
        first.ref(*e);
        drop_ref_locked(r);
        r = {first.slot(*e), 0, 0};
      } else {
        drop_ref_locked(r);  // its loader failed: the prefix ends here
      }
    }
  }

  // Deletes from remote tiers the records that failed verification, so lookups stop reporting
  // them (an indexed tier discards its entry in finish_promotion_locked). Called unlocked.
  template <class TierOf>
  void forget_corrupt_remote(const tier::read_job* jobs, std::size_t n, TierOf tier_of) {
    if constexpr (remote_count > 0) {
      for (std::size_t j = 0; j < n; ++j) {
        const std::size_t t = tier_of(j);
        if (jobs[j].status != tier::read_status::corrupt || index_[t] != nullptr) continue;
        with_lower(t - 1, [&](auto& impl) {
          if constexpr (!is_indexed<decltype(impl)>) (void)impl.remove({&jobs[j].key, 1});
        });
      }
    } else {
      (void)jobs, (void)n, (void)tier_of;
    }
  }

  // Drops an operation's reference to a lower-tier chunk; the lease still counts the chunk, so
  // it is marked for release.
  void drop_ref_locked(chunk_ref& r) noexcept {
    if (r.tier != dropped_tier && index_[r.tier] != nullptr) {
      index_type& ix = *index_[r.tier];
      ix.unref(ix.at(r.slot));
    }
    r = {0, dropped_tier, 0};
  }

  // ---- background work: one writer per lower tier, one prefetch reader ---------------------

  void writer_loop(std::size_t t) {
    write_ring& rg = rings_[t];
    index_type& first = *index_[0];
    index_type* ix = index_[t];
    std::array<std::uint32_t, window> hs{};
    std::array<tier::write_job, window> jobs;
    std::array<std::uint32_t, window> job_of{};
    std::unique_lock lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [&] { return stop_ || rg.count > 0; });
      if (rg.count == 0) break;  // stopping, and everything queued was written
      std::size_t n = 0, m = 0;
      for (; rg.count > 0 && n < window; ++n) {
        hs[n] = rg.slots[rg.head];
        rg.head = (rg.head + 1) % rg.slots.size();
        --rg.count;
      }
      rg.active += n;
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
          index_entry* e = ix->allocate(stats_.tiers[t].evictions);
          if (e == nullptr) {
            ++stats_.tiers[t].dropped_writes;
            continue;
          }
          ix->insert_writing(*e, he.key, he.tokens);
          slot = ix->slot(*e);
        }
        jobs[m] = {slot, he.key, he.tokens, first_->data(hs[i]), format_.bytes(he.tokens)};
        job_of[m++] = static_cast<std::uint32_t>(i);
      }
      lk.unlock();
      if (m > 0) with_lower(t - 1, [&](auto& impl) { impl.write_batch({jobs.data(), m}); });
      lk.lock();
      std::array<chunk_key, window> undo;  // written, but cleared meanwhile (remote tiers)
      std::size_t nundo = 0;
      for (std::size_t j = 0; j < m; ++j) {
        // The writer's reference kept the chunk from eviction, so a chunk no longer ready was
        // cleared while being written: it must not appear in this tier afterwards.
        const bool cleared = first.at(hs[job_of[j]]).state != entry_state::ready;
        const bool ok = jobs[j].ok && !cleared;
        if (ix != nullptr) {
          index_entry& e = ix->at(jobs[j].slot);
          if (ok) {
            ix->publish(e);
          } else {
            ix->abort(e);
          }
          ix->unref(e);
        } else if (cleared && jobs[j].ok) {
          undo[nundo++] = jobs[j].key;
        }
        if (ok) {
          ++stats_.tiers[t].writes;
          stats_.tiers[t].bytes_written += jobs[j].bytes;
          if (first.at(hs[job_of[j]]).evict_after_write) ++stats_.tiers[t].write_backs;
        } else if (!cleared) {
          ++stats_.tiers[t].errors;
        }
      }
      if (nundo > 0) {
        lk.unlock();
        with_lower(t - 1, [&](auto& impl) {
          if constexpr (!is_indexed<decltype(impl)>) (void)impl.remove({undo.data(), nundo});
        });
        lk.lock();
      }
      for (std::size_t i = 0; i < n; ++i) {
        index_entry& he = first.at(hs[i]);
        first.unref(he);
        // Write-back: the slot whose eviction waited for this write is freed now, unless a
        // lookup took it again meanwhile (then it stays, most recently used).
        if (he.evict_after_write && he.evictable() && first.remove(he)) {
          ++stats_.tiers[0].evictions;
        }
      }
      rg.active -= n;
      if (writers_idle_locked()) idle_cv_.notify_all();
    }
    idle_cv_.notify_all();
  }

  void reader_loop() {
    index_type& first = *index_[0];
    std::array<prefetch_job, window> pj;
    std::array<tier::read_job, window> jobs;
    std::unique_lock lk(mu_);
    for (;;) {
      prefetch_cv_.wait(lk, [&] { return stop_ || prefetch_count_ > 0; });
      if (stop_) break;
      // One batch from the queue's head, all from one tier.
      std::size_t n = 0;
      const std::uint8_t t = prefetch_ring_[prefetch_head_].tier;
      while (prefetch_count_ > 0 && n < window && prefetch_ring_[prefetch_head_].tier == t) {
        pj[n] = prefetch_ring_[prefetch_head_];
        prefetch_head_ = (prefetch_head_ + 1) % prefetch_ring_.size();
        --prefetch_count_;
        const index_entry& e = first.at(pj[n].hslot);
        jobs[n] = {pj[n].lslot, e.key, e.tokens, first_->data(pj[n].hslot),
                   format_.bytes(e.tokens)};
        ++n;
      }
      lk.unlock();
      read_lower(t, {jobs.data(), n});
      lk.lock();
      for (std::size_t i = 0; i < n; ++i) {
        if (finish_promotion_locked(pj[i].hslot, t, pj[i].lslot, jobs[i].status)) {
          ++stats_.prefetched;
          first.unref(first.at(pj[i].hslot));
        }
      }
      lk.unlock();
      state_cv_.notify_all();
      forget_corrupt_remote(jobs.data(), n, [&](std::size_t) { return t; });
      lk.lock();
    }
  }

  // ---- state --------------------------------------------------------------------------------

  struct write_ring {
    std::vector<std::uint32_t> slots;  // first-tier slots waiting to be written
    std::size_t head = 0, count = 0;
    std::size_t active = 0;  // taken by the writer, not finished
    std::vector<std::thread> threads;
  };
  struct prefetch_job {
    std::uint32_t hslot = 0;  // the first tier's writing entry
    std::uint32_t lslot = 0;  // the lower tier's slot (indexed tiers)
    std::uint8_t tier = 0;
  };

  model_shape model_;
  cache_config cfg_;
  layout::chunk_format format_;
  chunk_key salt_key_;
  std::size_t max_chunks_;

  std::unique_ptr<first_impl> first_;
  std::tuple<std::unique_ptr<typename Lower::template impl<Eviction>>...> lower_;
  std::array<index_type*, tier_count> index_{};  // nullptr for a remote tier
  std::array<std::uint32_t, tier_count> admit_{};
  std::array<std::size_t, tier_count> writers_{};
  std::uint8_t lower_mask_ = 0;

  mutable std::mutex mu_;
  std::condition_variable state_cv_;     // an entry left the writing state
  std::condition_variable work_cv_;      // write work or stop
  std::condition_variable idle_cv_;      // writers drained
  std::condition_variable prefetch_cv_;  // prefetch work or stop
  stats_type stats_{};

  std::unique_ptr<chunk_key[]> op_keys_;
  std::unique_ptr<chunk_ref[]> op_refs_;
  std::vector<std::uint32_t> free_ops_;

  struct async_op {
    bool retrieve = false;
    std::size_t first = 0;  ///< store: first chunk; retrieve: 0
    std::size_t count = 0;  ///< store: one past the last chunk placed; retrieve: lease chunks
    bool ok = true;         ///< store: every layer was copied
  };
  std::vector<async_op> async_;         // per operation slot (GPU tiers)
  std::vector<std::uint32_t> pending_;  // operations whose copies may still run

  std::array<write_ring, tier_count> rings_;
  std::vector<prefetch_job> prefetch_ring_;
  std::size_t prefetch_head_ = 0, prefetch_count_ = 0;
  std::thread reader_;
  bool stop_ = false;
};

}  // namespace detail
}  // namespace kvtier
