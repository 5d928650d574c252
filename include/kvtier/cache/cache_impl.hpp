#pragma once
// The cache behind kvtier::cache (see cache.hpp for the documented API): the engine's calls, each
// composed from the parts in this folder. Top to bottom: the parts, construction, keys, the
// engine's calls (lookup, retrieve, store), the GPU path, prefetch, pins and clears (defined in
// chunk_calls.inl, included at the end), flush and stats. One lock (state) guards every index and
// counter; it is never held across a copy or I/O.
//
//   chunker       chunk counts and keys           op_table      operation slots (keys, refs)
//   tier_chain    the tiers and their settings    lease, pin    a lookup's run, a pin's chunks
//   pin_table     the chunks each pin holds
//   writers       background lower-tier writes    write_policy  write-through/back, admission
//   promoter      lower tier -> first tier        prefetcher    background promotion
//   async_path    GPU copies and layer pipelines  in_place      reads from tiers in memory

#include "kvtier/cache/async_path.hpp"
#include "kvtier/cache/chunker.hpp"
#include "kvtier/cache/config.hpp"
#include "kvtier/cache/host_pipeline.hpp"
#include "kvtier/cache/in_place.hpp"
#include "kvtier/cache/lease.hpp"
#include "kvtier/cache/op_table.hpp"
#include "kvtier/cache/pin.hpp"
#include "kvtier/cache/pin_table.hpp"
#include "kvtier/cache/prefetcher.hpp"
#include "kvtier/cache/promotion.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/cache/tier_chain.hpp"
#include "kvtier/cache/write_policy.hpp"
#include "kvtier/cache/writers.hpp"
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
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <tuple>
#include <utility>

namespace kvtier::detail {

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class TierTuple>
class cache_impl;

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
class cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher, std::tuple<First, Lower...>> {
  using chain_type = tier_chain<Eviction, First, Lower...>;
  using index_type = typename chain_type::index_type;
  using async_type = async_path<chain_type>;
  using view_type = layout::view<Layout>;
  static constexpr std::uint32_t no_op = op_table::no_op;
  static constexpr bool has_lower = chain_type::has_lower;
  static constexpr std::size_t remote_count = chain_type::remote_count;
  static constexpr std::size_t window = promoter<chain_type>::window;

 public:
  static constexpr std::size_t chunk_tokens = ChunkTokens;
  static constexpr std::size_t block_tokens = BlockTokens;  ///< 0 when known at run time only
  static constexpr std::size_t tier_count = chain_type::tier_count;
  using layout_type = Layout;
  using eviction_type = Eviction;
  using hasher_type = Hasher;
  using tier_list = std::tuple<First, Lower...>;
  using tier_configs = typename chain_type::configs;
  using stats_type = cache_stats<tier_count>;
  /// True when the first tier copies asynchronously on the GPU (tier::device, tier::pinned_host).
  static constexpr bool async_copies = async_type::enabled;
  static_assert(!async_copies || layout::traits<Layout>::page_kind == layout::page::rows,
                "kvtier: a layout with transposed K pages (layout::vllm_cpu) holds KV in host "
                "memory; its first tier must be tier::host, not a GPU tier");
  /// How GPU copies are ordered with the engine's stream (gpu::stream_order for the GPU tiers).
  using order_type = typename async_type::order_type;
  /// The event a layer pipeline step returns (cudaEvent_t for the GPU tiers).
  using event_type = typename async_type::event_type;
  /// The result of lookup (see lease.hpp).
  using lease = basic_lease<cache_impl>;
  /// The result of pin (see pin.hpp).
  using pin_handle = basic_pin<cache_impl>;
  /// Layer-wise copies: on the GPU tiers (async_path.hpp), on host tiers (host_pipeline.hpp).
  using store_pipeline = std::conditional_t<async_copies, typename async_type::store_pipeline,
                                            host_store_pipeline<cache_impl>>;
  using retrieve_pipeline = std::conditional_t<async_copies, typename async_type::retrieve_pipeline,
                                               host_retrieve_pipeline<cache_impl>>;

  cache_impl(const model_shape& model, const salt& s, const tier_configs& tiers = {},
             const cache_config& cfg = {}) try
      : model_(checked_model<ChunkTokens, BlockTokens, layout::traits<Layout>::kv_planes>(model)),
        cfg_(checked_config(cfg)),
        format_(layout::chunk_format::from(model, ChunkTokens, layout::traits<Layout>::kv_planes)),
        chunker_(s, format_, cfg_.store_partial_tail),
        chain_(tiers, tier::context{format_, chunker_.salt_key(), model_.block_size,
                                    max_chunks(cfg_, ChunkTokens), cfg_.max_inflight}),
        ops_(max_chunks(cfg_, ChunkTokens), cfg_.max_inflight),
        pins_(chain_, max_chunks(cfg_, ChunkTokens), cfg_.max_pins),
        writers_(chain_, st_, format_, cfg_.write_queue_depth, cfg_.write_hold_percent),
        policy_(chain_, st_, writers_, cfg_.mode),
        promoter_(chain_, st_, policy_, format_, &pins_),
        prefetcher_(chain_, st_, policy_, promoter_, format_, cfg_.prefetch_queue_depth),
        in_place_(chain_, st_, format_, ChunkTokens),
        async_(chain_, st_, ops_, policy_, model_.layers) {
    chain_.init_stats(st_.stats);
  } catch (const std::bad_alloc&) {
    // The parts name what they reserve; this is for what they do not (a thread, a path).
    throw error("kvtier: out of memory constructing the cache (max_tokens " +
                std::to_string(cfg.max_tokens) + ", max_inflight " +
                std::to_string(cfg.max_inflight) + ", write_queue_depth " +
                std::to_string(cfg.write_queue_depth) + ")");
  }
  /// Waits for GPU copies, finishes queued writes to lower tiers (bounded by the queue depths)
  /// and stops; queued prefetches are abandoned. Under write_back, chunks not yet written back
  /// are not written: call flush() first to keep them. (The parts' destructors, in this order.)
  ~cache_impl() = default;
  cache_impl(const cache_impl&) = delete;
  cache_impl& operator=(const cache_impl&) = delete;

  // ---- keys ---------------------------------------------------------------------------------

  /// Chunks a sequence of `tokens` tokens is cut into (full chunks, plus the partial tail when
  /// store_partial_tail is set).
  [[nodiscard]] std::size_t chunk_count(std::size_t tokens) const noexcept {
    return chunker_.count(tokens);
  }
  /// Writes the keys of `tokens`' chunks into `out` and returns their count.
  /// Throws invalid_argument when `out` is too small. Thread-safe, allocates nothing.
  std::size_t keys(std::span<const token_id> tokens, std::span<chunk_key> out) const {
    return chunker_.keys(tokens, out);
  }

  // ---- the engine's calls -------------------------------------------------------------------

  lease lookup(std::span<const token_id> tokens, std::size_t first_chunk = 0) {
    check_tokens("lookup", tokens.size(), cfg_);
    const std::size_t n = chunk_count(tokens.size());
    check_first_chunk("lookup", first_chunk, n);
    lease l;
    l.cache_ = this;
    l.first_ = first_chunk;
    auto& stats = st_.stats;
    std::unique_lock lk(st_.mu);
    async_.poll_locked();
    ++stats.lookups;
    stats.lookup_tokens += tokens.size();
    if (first_chunk == n) return l;
    const std::uint32_t op = begin_op(lk, tokens, n);
    if (op == no_op) return l;
    const chunk_key* ks = ops_.keys(op);
    chunk_ref* rs = ops_.refs(op);
    std::size_t hit = 0, hit_tokens = 0;
    for (; first_chunk + hit < n; ++hit) {
      std::size_t t = 0;
      index_entry* e = nullptr;
      for (; t < tier_count; ++t) {
        index_type* ix = chain_.index(t);
        if (ix == nullptr) continue;  // remote tiers are asked below, for the rest at once
        if ((e = ix->find_ready(ks[first_chunk + hit])) != nullptr) break;
        ++stats.tiers[t].misses;
      }
      if (e == nullptr) break;
      chain_.index(t)->ref(*e);
      ++stats.tiers[t].hits;
      if (t == 0) policy_.note_hit_locked(*e);
      rs[hit] = {chain_.index(t)->slot(*e), static_cast<std::uint8_t>(t), 0};
      hit_tokens += e->tokens;
    }
    if constexpr (chain_type::has_mapped) prefer_mapped(lk, ks + first_chunk, rs, hit);
    if constexpr (remote_count > 0) {
      // The chunks no local tier holds: one pipelined existence check per remote tier, without
      // the lock, bounded by the tier's timeout. A remote tier that is down answers at once.
      if (first_chunk + hit < n) {
        const std::span<const chunk_key> rest(ks + first_chunk + hit, n - first_chunk - hit);
        lk.unlock();
        std::size_t tier = 0;
        std::array<std::uint8_t, tier_count> asked{};
        const std::size_t found = chain_.probe_remote(rest, asked, tier);
        lk.lock();
        for (std::size_t t = 1; t < tier_count; ++t) {
          if (asked[t] && (t != tier || found < rest.size())) ++stats.tiers[t].misses;
        }
        if (found > 0) stats.tiers[tier].hits += found;
        for (std::size_t j = 0; j < found; ++j, ++hit) {
          rs[hit] = {0, static_cast<std::uint8_t>(tier), 0};
          hit_tokens += tokens_at(first_chunk + hit, tokens.size());
        }
      }
    }
    stats.hit_tokens += hit_tokens;
    if (hit == 0) {
      ops_.release(op);
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
    const view_type v(model_, kv);
    const std::size_t abs_end = l.end_token();
    const std::size_t count = chunks_to_load(l, v, table, end_token);
    if (count == 0) {
      release(l);
      return 0;
    }
    chunk_ref* rs = ops_.refs(l.op_);
    std::size_t loaded = 0, bytes = 0, first_bytes = 0;
    // A window of chunks at a time: its chunks in tiers that read in place are scattered from
    // there, its other lower-tier chunks are promoted in one batch per tier, then the rest of
    // the window is scattered from the first tier into the engine's blocks.
    for (std::size_t w = 0; w < count; w += window) {
      const std::size_t hi = std::min(count, w + window);
      typename in_place_reader<chain_type>::outcome direct{};  // 1: loaded in place, 2: failed
      std::size_t upto = hi;  // the window's chunks before one that failed in place
      if constexpr (chain_type::has_mapped) {
        in_place_.load(ops_.keys(l.op_) + l.first_, rs, l.first_, w, hi, abs_end, v, table, direct);
        upto = w + static_cast<std::size_t>(
                       std::find(direct.begin(), direct.begin() + (hi - w), 2) - direct.begin());
      }
      if constexpr (has_lower) promote(l, w, upto, abs_end);
      std::size_t i = w;
      for (; i < hi && direct[i - w] != 2 && (direct[i - w] == 1 || rs[i].tier == 0); ++i) {
        const std::size_t c = l.first_ + i;
        const std::size_t ntok = tokens_at(c, abs_end);
        if (direct[i - w] == 0) {
          transfer::scatter(v, format_, table, c * ChunkTokens, ntok,
                            chain_.first().data(rs[i].slot));
          first_bytes += format_.bytes(ntok);
        }
        loaded += ntok;
        bytes += format_.bytes(ntok);
      }
      if (i < hi) break;  // a chunk could not be brought in: the loaded prefix ends there
    }
    std::lock_guard lk(st_.mu);
    st_.stats.retrieved_tokens += loaded;
    st_.stats.bytes_to_engine += bytes;
    st_.stats.tiers[0].bytes_read += first_bytes;
    release_locked(l);
    return loaded;
  }

  std::size_t store(std::span<const token_id> tokens, const engine_kv& kv, block_table table,
                    std::size_t first_token = 0) {
    if constexpr (async_copies) {
      return store(tokens, kv, table, order_type{}, first_token);
    }
    const auto r = check_store<view_type, ChunkTokens>(
        model_, cfg_, tokens.size(), chunk_count(tokens.size()), kv, table, first_token);
    if (r.first >= r.n) return 0;
    std::unique_lock lk(st_.mu);
    const std::uint32_t op = begin_op(lk, tokens, r.n);
    if (op == no_op) return 0;
    chunk_ref* rs = ops_.refs(op);
    index_type& ix = chain_.first_index();
    std::size_t first = r.first;
    if constexpr (chain_type::has_mapped) {  // held by a tier read in place: stored already
      lk.unlock();
      first = in_place_.skip_held(ops_.keys(op), rs, first, r.n);
      lk.lock();
    }
    const std::size_t placed = policy_.place_locked(
        ops_.keys(op), rs, first, r.n, [&](std::size_t i) { return tokens_at(i, tokens.size()); });
    lk.unlock();
    std::size_t bytes = 0;
    for (std::size_t i = r.first; i < placed; ++i) {
      if (!rs[i].wrote) continue;
      const std::size_t ntok = tokens_at(i, tokens.size());
      transfer::gather(r.v, format_, table, i * ChunkTokens, ntok, chain_.first().data(rs[i].slot));
      bytes += format_.bytes(ntok);
    }
    lk.lock();
    for (std::size_t i = r.first; i < placed; ++i) {
      if (!rs[i].wrote) continue;
      index_entry& e = ix.at(rs[i].slot);
      chain_.publish_locked(0, e);
      ++st_.stats.tiers[0].writes;
      policy_.on_stored_locked(e);
      ix.unref(e);
    }
    const std::size_t stored =
        std::min(placed * ChunkTokens, tokens.size()) - r.first * ChunkTokens;
    st_.stats.stored_tokens += stored;
    st_.stats.bytes_from_engine += bytes;
    st_.stats.tiers[0].bytes_written += bytes;
    ops_.release(op);
    lk.unlock();
    st_.state_cv.notify_all();
    policy_.notify();
    return stored;
  }

  // ---- the GPU path: asynchronous copies and layer pipelines (async_path.hpp) ---------------

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
    const auto r = check_store<view_type, ChunkTokens>(
        model_, cfg_, tokens.size(), chunk_count(tokens.size()), kv, table, first_token);
    chain_.first().transfers().validate(kv.tensors, o);
    typename async_type::pipeline_state p;
    p.a = &async_;
    if (r.first >= r.n) return store_pipeline(std::move(p));
    std::unique_lock lk(st_.mu);
    async_.poll_locked();
    const std::uint32_t op = begin_op(lk, tokens, r.n);
    if (op == no_op) return store_pipeline(std::move(p));
    chunk_ref* rs = ops_.refs(op);
    const std::size_t placed =
        policy_.place_locked(ops_.keys(op), rs, r.first, r.n,
                             [&](std::size_t i) { return tokens_at(i, tokens.size()); });
    async_.set_locked(op, {false, r.first, placed, true});
    lk.unlock();
    std::size_t wrote = 0;
    for (std::size_t i = r.first; i < placed; ++i) {
      if (rs[i].wrote) {
        ++wrote;
        p.bytes += format_.bytes(tokens_at(i, tokens.size()));
      }
    }
    p.op = op;
    p.tokens = std::min(placed * ChunkTokens, tokens.size()) - r.first * ChunkTokens;
    async_.stage(p, transfer::way::to_chunk, o, r.v, kv.tensors, table, wrote,
                 [&, i = r.first](std::size_t) mutable {
                   while (!rs[i].wrote) ++i;
                   const transfer::staged_chunk c{
                       rs[i].slot, static_cast<std::uint32_t>(tokens_at(i, tokens.size())),
                       i * ChunkTokens};
                   ++i;
                   return c;
                 });
    return store_pipeline(std::move(p));
  }

  /// Starts a layer-wise retrieve of the lease (as retrieve(); it consumes the lease): lower-tier
  /// chunks are promoted into the first tier now, then retrieve_layer(l) copies layer l.
  retrieve_pipeline begin_retrieve(lease& l, const engine_kv& kv, block_table table,
                                   const order_type& o,
                                   std::size_t end_token = SIZE_MAX) requires async_copies {
    check_lease("retrieve", l);
    const view_type v(model_, kv);
    const std::size_t abs_end = l.end_token();
    const std::size_t count = chunks_to_load(l, v, table, end_token);
    chain_.first().transfers().validate(kv.tensors, o);
    typename async_type::pipeline_state p;
    p.a = &async_;
    if (count == 0) {
      release(l);
      return retrieve_pipeline(std::move(p));
    }
    chunk_ref* rs = ops_.refs(l.op_);
    if constexpr (has_lower) {
      for (std::size_t w = 0; w < count; w += window) {
        promote(l, w, std::min(count, w + window), abs_end);
      }
    }
    std::size_t loaded = 0;
    while (loaded < count && rs[loaded].tier == 0) ++loaded;  // a failed promotion ends it
    // The pipeline takes the lease's operation; its chunks are released once the copy is done.
    {
      std::lock_guard lk(st_.mu);
      async_.poll_locked();
      async_.set_locked(l.op_, {true, 0, l.chunks_, true});
    }
    p.op = l.op_;
    const std::size_t first = l.first_;
    l.clear();
    for (std::size_t i = 0; i < loaded; ++i) {
      const std::size_t ntok = tokens_at(first + i, abs_end);
      p.tokens += ntok;
      p.bytes += format_.bytes(ntok);
    }
    async_.stage(p, transfer::way::to_engine, o, v, kv.tensors, table, loaded, [&](std::size_t i) {
      return transfer::staged_chunk{rs[i].slot,
                                    static_cast<std::uint32_t>(tokens_at(first + i, abs_end)),
                                    (first + i) * ChunkTokens};
    });
    return retrieve_pipeline(std::move(p));
  }

  /// Host tiers: starts a layer-wise store of `tokens` (as store()): entries are reserved now,
  /// store_layer(l) copies layer l once the engine has computed it, finish() publishes.
  store_pipeline begin_store(std::span<const token_id> tokens, const engine_kv& kv,
                             block_table table,
                             std::size_t first_token = 0) requires(!async_copies) {
    return store_pipeline(*this, tokens, kv, table, first_token);
  }

  /// Host tiers: starts a layer-wise retrieve of the lease (it consumes the lease): the chunks
  /// it loads are proven now (promoted from lower tiers, or held and verified in the segment),
  /// then retrieve_layer(l) copies layer l.
  retrieve_pipeline begin_retrieve(lease& l, const engine_kv& kv, block_table table,
                                   std::size_t end_token = SIZE_MAX) requires(!async_copies) {
    check_lease("retrieve", l);
    const view_type v(model_, kv);
    const std::size_t count = chunks_to_load(l, v, table, end_token);
    if (count == 0) {
      release(l);
      return retrieve_pipeline(*this, no_op, 0, 0, 0, 0, v, table);
    }
    const std::uint32_t op = l.op_;
    const std::size_t first = l.first_, chunks = l.chunks_, abs_end = l.end_token();
    l.clear();  // the pipeline owns the operation and its references from here
    return retrieve_pipeline(*this, op, first, chunks, count, abs_end, v, table);
  }

  /// Waits until every GPU copy started so far has completed, and publishes the stored chunks.
  void synchronize() requires async_copies { async_.synchronize(); }

  // ---- prefetch, pins, clears (defined in chunk_calls.inl) ----------------------------------

  /// Starts loading the lower-tier chunks of `tokens`' cached prefix into the first tier in the
  /// background; returns the tokens whose loading started. lookup() reports a chunk in the
  /// first tier once it is loaded (and in its lower tier until then).
  std::size_t prefetch(std::span<const token_id> tokens);

  /// Throws what store or retrieve would throw for `kv` and the blocks of tokens [begin, end) of
  /// `table`, without doing anything else.
  void validate(const engine_kv& kv, block_table table, std::size_t begin, std::size_t end) const {
    view_type(model_, kv).check_block_table(table, begin, end);
  }

  void release(lease& l) noexcept {
    if (l.cache_ != this) return;
    std::lock_guard lk(st_.mu);
    release_locked(l);
  }

  /// Pins the cached prefix of `tokens` (see cache.hpp); the handle owns exactly those chunks.
  [[nodiscard]] pin_handle pin(std::span<const token_id> tokens);
  /// Undoes `p`'s pin and empties it; returns the tokens it had pinned (0 for an empty handle).
  std::size_t unpin(pin_handle& p) noexcept;
  /// Removes the unpinned chunks of `tokens` from every tier; returns the tokens removed.
  std::size_t clear(std::span<const token_id> tokens);
  /// Removes every unpinned chunk from every tier; returns the chunk copies removed.
  std::size_t clear();

  // ---- flush, stats, accessors --------------------------------------------------------------

  /// Waits until every queued write to a lower tier has completed. Under write_back it first
  /// writes back every chunk the first tier still owes a lower tier (and has admitted).
  void flush() {
    if constexpr (async_copies) synchronize();
    if constexpr (has_lower) {
      std::unique_lock lk(st_.mu);
      policy_.flush(lk);
    }
  }

  [[nodiscard]] stats_type stats() const {
    std::lock_guard lk(st_.mu);
    stats_type s = st_.stats;
    for (std::size_t t = 0; t < tier_count; ++t) {
      const index_type* ix = chain_.index(t);
      if (ix == nullptr) continue;  // a remote tier does not know what it holds
      s.tiers[t].used_chunks = ix->size();
      s.tiers[t].capacity_chunks = ix->capacity();
    }
    return s;
  }

  [[nodiscard]] const model_shape& model() const noexcept { return model_; }
  [[nodiscard]] const cache_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const layout::chunk_format& format() const noexcept { return format_; }
  [[nodiscard]] const chunk_key& salt_key() const noexcept { return chunker_.salt_key(); }

  /// Tier I's implementation, for diagnostics and tests (its file, its slab).
  template <std::size_t I>
  [[nodiscard]] auto& tier() noexcept {
    return chain_.template tier<I>();
  }

 private:
  friend lease;
  friend host_store_pipeline<cache_impl>;
  friend host_retrieve_pipeline<cache_impl>;

  // ---- checks -------------------------------------------------------------------------------

  void check_lease(const char* what, const lease& l) const {
    if (l.cache_ == nullptr) {
      throw invalid_argument(std::string("kvtier: ") + what +
                             " of a lease that is not live (moved from, released or retrieved)");
    }
    if (l.cache_ != this) {
      throw invalid_argument(std::string("kvtier: ") + what + " of a lease of another cache");
    }
  }

  // Retrieve: the lease's chunks that end at or before end_token, after checking the table.
  std::size_t chunks_to_load(const lease& l, const view_type& v, block_table table,
                             std::size_t end_token) const {
    const auto [count, load_end] = l.chunks_ending_by(end_token);
    v.check_block_table(table, l.first_token(), load_end);
    return count;
  }

  // ---- operations ---------------------------------------------------------------------------

  static std::size_t tokens_at(std::size_t i, std::size_t total) noexcept {
    return chunker<ChunkTokens, Hasher>::tokens_at(i, total);
  }

  // Takes an operation slot and fills its keys for `tokens` (n chunks) without the lock; `lk`
  // is held on entry and on return. no_op when every slot is taken (counted in busy).
  std::uint32_t begin_op(std::unique_lock<std::mutex>& lk, std::span<const token_id> tokens,
                         std::size_t n) {
    const std::uint32_t op = ops_.acquire();
    if (op == no_op) {
      ++st_.stats.busy;
      return no_op;
    }
    lk.unlock();
    keys(tokens, {ops_.keys(op), n});
    lk.lock();
    return op;
  }

  // Checks `tokens`, locks `lk` and begins an operation on their chunks (with their count);
  // no_op when there are none or every slot is taken.
  std::pair<std::uint32_t, std::size_t> begin_call(const char* what,
                                                   std::span<const token_id> tokens,
                                                   std::unique_lock<std::mutex>& lk) {
    check_tokens(what, tokens.size(), cfg_);
    const std::size_t n = chunk_count(tokens.size());
    if (n == 0) return {no_op, 0};
    lk.lock();
    async_.poll_locked();
    return {begin_op(lk, tokens, n), n};
  }

  // Promotes the lease's chunks [lo, hi) into the first tier (promotion.hpp).
  void promote(const lease& l, std::size_t lo, std::size_t hi, std::size_t abs_end) {
    promote_run(l.op_, l.first_, lo, hi, abs_end);
  }
  void promote_run(std::uint32_t op, std::size_t first, std::size_t lo, std::size_t hi,
                   std::size_t abs_end) {
    promoter_.promote(ops_.keys(op) + first, ops_.refs(op), lo, hi, first, abs_end, ChunkTokens,
                      [this](std::unique_lock<std::mutex>& lk) { async_.wait_state_locked(lk); });
  }

  void release_locked(lease& l) noexcept {
    if (l.op_ != no_op) {
      const chunk_ref* rs = ops_.refs(l.op_);
      for (std::size_t i = 0; i < l.chunks_; ++i) chain_.unref_locked(rs[i]);
      ops_.release(l.op_);
    }
    l.clear();
  }

  /// Chain order for the tier that reads in place (tier m: the node's shared segment): a hit of
  /// lookup's in an indexed tier below m (a local disk under the segment) that m also holds is
  /// served from m, in place, instead of being read from the slower tier and promoted. The
  /// segment is probed without the cache's lock (it takes its own); the lower tier's reference
  /// is dropped, so a chunk the segment evicts before retrieve ends the loaded prefix there.
  void prefer_mapped(std::unique_lock<std::mutex>& lk, const chunk_key* ks, chunk_ref* rs,
                     std::size_t hit) {
    constexpr std::size_t m = chain_type::first_mapped;
    std::size_t j0 = 0;
    while (j0 < hit && rs[j0].tier < m) ++j0;
    if (j0 == hit) return;
    lk.unlock();
    const std::size_t held = chain_.probe_mapped({ks + j0, hit - j0});
    lk.lock();
    for (std::size_t j = j0; j < j0 + held; ++j) {
      if (rs[j].tier < m) continue;
      --st_.stats.tiers[rs[j].tier].hits;
      ++st_.stats.tiers[m].hits;
      chain_.unref_locked(rs[j]);
      rs[j] = {0, static_cast<std::uint8_t>(m), 0};
    }
  }

  std::size_t lease_hits_in(const lease& l, std::size_t t) const noexcept {
    if (l.op_ == no_op) return 0;
    const chunk_ref* rs = ops_.refs(l.op_);
    std::size_t n = 0;
    for (std::size_t i = 0; i < l.chunks_; ++i) n += rs[i].tier == t;
    return n;
  }

  // ---- state: the parts, constructed in this order and destroyed in the reverse ------------

  model_shape model_;
  cache_config cfg_;
  layout::chunk_format format_;
  chunker<ChunkTokens, Hasher> chunker_;
  cache_state<tier_count> st_;
  chain_type chain_;
  op_table ops_;
  pin_table<chain_type> pins_;
  writers<chain_type> writers_;
  write_policy<chain_type> policy_;
  promoter<chain_type> promoter_;
  prefetcher<chain_type> prefetcher_;
  in_place_reader<chain_type> in_place_;
  async_type async_;
};

}  // namespace kvtier::detail

#include "kvtier/cache/chunk_calls.inl"
