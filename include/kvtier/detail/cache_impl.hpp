#pragma once
// The cache's machinery behind kvtier::cache (see cache.hpp for the documented API).

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/layout/view.hpp"
#include "kvtier/model.hpp"
#include "kvtier/stats.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/tier/local_disk.hpp"
#include "kvtier/transfer/host_copy.hpp"

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace kvtier {

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
};

namespace detail {

/// One chunk held by an operation: which tier and slot.
struct chunk_ref {
  std::uint32_t slot = 0;
  std::uint8_t tier = 0;
  std::uint8_t wrote = 0;  ///< store: this call allocated the entry and must fill it
};

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
        op_refs_(std::make_unique<chunk_ref[]>(max_chunks_ * cfg.max_inflight)),
        ring_(cfg.write_queue_depth) {
    const tier::context ctx{format_, salt_key_};
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
    for (std::size_t i = cfg.max_inflight; i-- > 0;) {
      free_ops_.push_back(static_cast<std::uint32_t>(i));
    }
    const char* names[] = {First::name, Lower::name...};
    for (std::size_t t = 0; t < tier_count; ++t) stats_.tiers[t].name = names[t];
    if constexpr (sizeof...(Lower) > 0) worker_ = std::thread([this] { worker_loop(); });
  }

  /// Finishes queued write-through (bounded by the queue depth), then frees everything.
  ~cache_impl() {
    if constexpr (sizeof...(Lower) > 0) {
      {
        std::lock_guard lk(mu_);
        stop_ = true;
      }
      work_cv_.notify_all();
      worker_.join();
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
    ++stats_.lookups;
    stats_.lookup_tokens += tokens.size();
    if (first_chunk == n) return l;
    const std::uint32_t op = acquire_op_locked();
    if (op == no_op) return l;
    lk.unlock();
    chunk_key* ks = op_keys(op);
    keys(tokens, {ks, n});
    chunk_ref* rs = op_refs(op);
    lk.lock();
    std::size_t hit = 0, hit_tokens = 0;
    for (; first_chunk + hit < n; ++hit) {
      std::size_t t = 0;
      index_entry* e = nullptr;
      for (; t < tier_count; ++t) {
        if ((e = index_[t]->find_ready(ks[first_chunk + hit])) != nullptr) break;
        ++stats_.tiers[t].misses;
      }
      if (e == nullptr) break;
      index_[t]->ref(*e);
      ++stats_.tiers[t].hits;
      rs[hit] = {index_[t]->slot(*e), static_cast<std::uint8_t>(t), 0};
      hit_tokens += e->tokens;
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
    check_lease("retrieve", l);
    const layout::view<Layout> v(model_, kv);
    // Load the lease's chunks that end at or before end_token.
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
    if (count == 0) {
      release(l);
      return 0;
    }
    chunk_key* ks = op_keys(l.op_);
    chunk_ref* rs = op_refs(l.op_);
    std::size_t loaded = 0, bytes = 0, i = 0;
    for (; i < count; ++i) {
      const std::size_t c = l.first_ + i;
      const std::size_t ntok = chunk_tokens_at(c, abs_end);
      if (rs[i].tier != 0 && !promote(ks[c], ntok, rs[i])) break;
      transfer::scatter(v, format_, table, c * ChunkTokens, ntok, first_->data(rs[i].slot));
      loaded += ntok;
      bytes += format_.bytes(ntok);
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
    const std::uint32_t op = acquire_op_locked();
    if (op == no_op) return 0;
    lk.unlock();
    chunk_key* ks = op_keys(op);
    keys(tokens, {ks, n});
    chunk_ref* rs = op_refs(op);
    index_type& ix = *index_[0];
    lk.lock();
    std::size_t placed = first;
    for (; placed < n; ++placed) {
      if (index_entry* e = ix.find(ks[placed])) {
        ix.touch(*e);  // already held (or being written by another caller)
        rs[placed] = {ix.slot(*e), 0, 0};
        continue;
      }
      index_entry* e = ix.allocate(stats_.tiers[0].evictions);
      if (e == nullptr) break;  // everything left is leased, pinned or being written
      ix.insert_writing(*e, ks[placed], chunk_tokens_at(placed, tokens.size()));
      rs[placed] = {ix.slot(*e), 0, 1};
    }
    if (placed < n) ++stats_.store_partial;
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
      if constexpr (sizeof...(Lower) > 0) enqueue_locked(e);
      ix.unref(e);
    }
    const std::size_t stored = std::min(placed * ChunkTokens, tokens.size()) - first * ChunkTokens;
    stats_.stored_tokens += stored;
    stats_.bytes_from_engine += bytes;
    stats_.tiers[0].bytes_written += bytes;
    free_ops_.push_back(op);
    lk.unlock();
    state_cv_.notify_all();
    if constexpr (sizeof...(Lower) > 0) work_cv_.notify_one();
    return stored;
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
    return for_each_chunk("clear", tokens, false,
                          [](index_type& ix, index_entry& e) { return ix.remove(e); });
  }

  std::size_t clear() {
    std::lock_guard lk(mu_);
    std::size_t removed = 0;
    for (std::size_t t = 0; t < tier_count; ++t) {
      index_type& ix = *index_[t];
      for (std::uint32_t s = 0; s < ix.capacity(); ++s) {
        index_entry& e = ix.at(s);
        if (e.state == entry_state::ready && ix.remove(e)) ++removed;
      }
    }
    return removed;
  }

  void flush() {
    if constexpr (sizeof...(Lower) > 0) {
      std::unique_lock lk(mu_);
      idle_cv_.wait(lk, [this] { return queued_ == 0 && active_jobs_ == 0; });
    }
  }

  [[nodiscard]] stats_type stats() const {
    std::lock_guard lk(mu_);
    stats_type s = stats_;
    for (std::size_t t = 0; t < tier_count; ++t) {
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
      index_[I + 1] = &std::get<I>(lower_)->index()),
     ...);
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
  chunk_key* op_keys(std::uint32_t op) const noexcept { return op_keys_.get() + op * max_chunks_; }
  chunk_ref* op_refs(std::uint32_t op) const noexcept { return op_refs_.get() + op * max_chunks_; }

  std::uint32_t acquire_op_locked() noexcept {
    if (free_ops_.empty()) {
      ++stats_.busy;
      return no_op;
    }
    const std::uint32_t op = free_ops_.back();
    free_ops_.pop_back();
    return op;
  }

  void release_locked(lease& l) noexcept {
    if (l.op_ != no_op) {
      const chunk_ref* rs = op_refs(l.op_);
      for (std::size_t i = 0; i < l.chunks_; ++i) {
        if (rs[i].tier == dropped_tier) continue;
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

  // Under the lock, applies `op(index, entry) -> bool` to each chunk of `tokens` in every tier
  // holding it ready; returns the tokens of the chunks it was true for in some tier (only the
  // prefix up to the first chunk it was true for nowhere, when `prefix`).
  template <class Op>
  std::size_t for_each_chunk(const char* what, std::span<const token_id> tokens, bool prefix,
                             Op op) {
    check_tokens(what, tokens.size());
    const std::size_t n = chunk_count(tokens.size());
    if (n == 0) return 0;
    std::unique_lock lk(mu_);
    const std::uint32_t op_slot = acquire_op_locked();
    if (op_slot == no_op) return 0;
    lk.unlock();
    chunk_key* ks = op_keys(op_slot);
    keys(tokens, {ks, n});
    lk.lock();
    std::size_t done = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bool any = false;
      for (std::size_t t = 0; t < tier_count; ++t) {
        if (index_entry* e = index_[t]->find_ready(ks[i])) any = op(*index_[t], *e) || any;
      }
      if (any) {
        done += chunk_tokens_at(i, tokens.size());
      } else if (prefix) {
        break;
      }
    }
    free_ops_.push_back(op_slot);
    return done;
  }

  // Brings chunk `k` held in a lower tier (by `r`) into the first tier; on success `r` points at
  // the first tier's entry (still referenced), on failure the lower reference is dropped and
  // `r` no longer counts. Disk I/O runs without the lock.
  bool promote(const chunk_key& k, std::size_t ntok, chunk_ref& r) {
    index_type& first = *index_[0];
    index_type& low = *index_[r.tier];
    std::unique_lock lk(mu_);
    index_entry* e;
    // Another caller may be bringing the same chunk in: wait for its outcome, then re-check.
    while ((e = first.find(k)) != nullptr && e->state == entry_state::writing) state_cv_.wait(lk);
    if (e != nullptr) {
      first.ref(*e);
      low.unref(low.at(r.slot));
      r = {first.slot(*e), 0, 0};
      return true;
    }
    e = first.allocate(stats_.tiers[0].evictions);
    if (e == nullptr) {
      drop_ref_locked(r);
      return false;
    }
    first.insert_writing(*e, k, static_cast<std::uint32_t>(ntok));
    const std::uint32_t slot = first.slot(*e);
    const std::size_t t = r.tier;
    lk.unlock();
    const tier::read_status st = read_lower(t, r.slot, k, ntok, first_->data(slot));
    lk.lock();
    const std::size_t bytes = format_.bytes(ntok);
    if (st == tier::read_status::ok) {
      first.publish(*e);
      ++stats_.tiers[t].promotions;
      stats_.tiers[t].bytes_read += bytes;
      ++stats_.tiers[0].writes;
      stats_.tiers[0].bytes_written += bytes;
      low.unref(low.at(r.slot));
      r = {slot, 0, 0};
    } else {
      first.abort(*e);
      first.unref(*e);
      ++stats_.tiers[t].errors;
      // A record that failed verification is dropped, pinned or not, so it is never served.
      if (st == tier::read_status::corrupt) low.discard(low.at(r.slot));
      drop_ref_locked(r);
    }
    lk.unlock();
    state_cv_.notify_all();
    return st == tier::read_status::ok;
  }

  // Drops an operation's reference; the lease still counts the chunk, so mark it for release.
  void drop_ref_locked(chunk_ref& r) noexcept {
    index_type& ix = *index_[r.tier];
    ix.unref(ix.at(r.slot));
    r = {0, dropped_tier, 0};
  }

  tier::read_status read_lower(std::size_t t, std::uint32_t slot, const chunk_key& k,
                               std::size_t ntok, std::byte* dst) {
    tier::read_status st = tier::read_status::io_error;
    with_lower(t - 1, [&](auto& impl) {
      st = impl.read(slot, k, static_cast<std::uint32_t>(ntok), dst, format_.bytes(ntok));
    });
    return st;
  }

  template <class F>
  void with_lower(std::size_t j, F&& f) {
    with_lower_impl(j, f, std::index_sequence_for<Lower...>{});
  }
  template <class F, std::size_t... I>
  void with_lower_impl(std::size_t j, F& f, std::index_sequence<I...>) {
    ((j == I ? (f(*std::get<I>(lower_)), 0) : 0), ...);
  }

  // ---- write-through ------------------------------------------------------------------------

  void enqueue_locked(index_entry& e) noexcept {
    if (queued_ == ring_.size()) {
      for (std::size_t t = 1; t < tier_count; ++t) ++stats_.tiers[t].dropped_writes;
      return;
    }
    index_[0]->ref(e);  // the worker reads the first tier's bytes in place
    ring_[(ring_head_ + queued_) % ring_.size()] = index_[0]->slot(e);
    ++queued_;
  }

  void worker_loop() {
    std::unique_lock lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [this] { return stop_ || queued_ > 0; });
      if (queued_ == 0) break;  // stopping, and everything queued was written
      const std::uint32_t hslot = ring_[ring_head_];
      ring_head_ = (ring_head_ + 1) % ring_.size();
      --queued_;
      ++active_jobs_;
      index_entry& he = index_[0]->at(hslot);
      const chunk_key key = he.key;
      const std::uint32_t ntok = he.tokens;
      std::array<std::uint32_t, tier_count> dst{};
      std::array<bool, tier_count> write{};
      // A chunk cleared while queued is not written: clear must not be undone by a late write.
      for (std::size_t t = 1; t < tier_count && he.state == entry_state::ready; ++t) {
        index_type& ix = *index_[t];
        if (index_entry* e = ix.find(key)) {
          ix.touch(*e);
          continue;
        }
        index_entry* e = ix.allocate(stats_.tiers[t].evictions);
        if (e == nullptr) {
          ++stats_.tiers[t].dropped_writes;
          continue;
        }
        ix.insert_writing(*e, key, ntok);
        dst[t] = ix.slot(*e);
        write[t] = true;
      }
      lk.unlock();
      const std::size_t bytes = format_.bytes(ntok);
      std::array<bool, tier_count> ok{};
      for (std::size_t t = 1; t < tier_count; ++t) {
        if (!write[t]) continue;
        with_lower(t - 1, [&](auto& impl) {
          ok[t] = impl.write(dst[t], key, ntok, first_->data(hslot), bytes);
        });
      }
      lk.lock();
      for (std::size_t t = 1; t < tier_count; ++t) {
        if (!write[t]) continue;
        index_type& ix = *index_[t];
        index_entry& e = ix.at(dst[t]);
        if (ok[t]) {
          ix.publish(e);
          ++stats_.tiers[t].writes;
          stats_.tiers[t].bytes_written += bytes;
        } else {
          ix.abort(e);
          ++stats_.tiers[t].errors;
        }
        ix.unref(e);
      }
      index_[0]->unref(he);
      --active_jobs_;
      if (queued_ == 0 && active_jobs_ == 0) idle_cv_.notify_all();
    }
    idle_cv_.notify_all();
  }

  model_shape model_;
  cache_config cfg_;
  layout::chunk_format format_;
  chunk_key salt_key_;
  std::size_t max_chunks_;

  std::unique_ptr<first_impl> first_;
  std::tuple<std::unique_ptr<typename Lower::template impl<Eviction>>...> lower_;
  std::array<index_type*, tier_count> index_{};

  mutable std::mutex mu_;
  std::condition_variable state_cv_;  // an entry left the writing state
  std::condition_variable work_cv_;   // write-through work or stop
  std::condition_variable idle_cv_;   // write-through queue drained
  stats_type stats_{};

  std::unique_ptr<chunk_key[]> op_keys_;
  std::unique_ptr<chunk_ref[]> op_refs_;
  std::vector<std::uint32_t> free_ops_;

  std::vector<std::uint32_t> ring_;
  std::size_t ring_head_ = 0;
  std::size_t queued_ = 0;
  std::size_t active_jobs_ = 0;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace detail
}  // namespace kvtier
