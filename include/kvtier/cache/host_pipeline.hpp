#pragma once
// Layer-wise store and retrieve on host tiers (a chain whose first tier is tier::host): an
// engine's forward pass computes and reads its KV one layer at a time, and these pipelines move
// one layer of every chunk at a time, so the engine can copy layer l on one thread while it
// computes another layer on its own (vLLM's save_kv_layer and wait_for_layer_load). The GPU
// tiers' pipelines (async_path.hpp) have the same calls.
//
// A retrieve pipeline proves every byte it will serve before it serves any: the chunks of lower
// tiers are promoted into the first tier (verified as they are read) and the chunks of the
// shared segment are held there under a lease and verified in place, both when the pipeline
// begins; tokens() is then final, and retrieve_layer only copies. A store pipeline reserves its
// chunks' entries when it begins and publishes them at finish, only if every layer was copied.

#include "kvtier/cache/config.hpp"
#include "kvtier/cache/op_table.hpp"
#include "kvtier/error.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/model.hpp"
#include "kvtier/tier/shared_host.hpp"
#include "kvtier/transfer/host_copy.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace kvtier::detail {

/// Refuses a layer out of order or past the model's layers.
inline void check_layer(const char* what, std::size_t l, std::size_t next, std::size_t layers) {
  if (l != next || l >= layers) {
    throw invalid_argument(std::string("kvtier: ") + what + "(" + std::to_string(l) + ") after " +
                           std::to_string(next) + " of " + std::to_string(layers) +
                           " layers: layers are copied once each, in order 0, 1, ...");
  }
}

/// A layer-wise store on host tiers (from cache::begin_store). Call store_layer(l) for
/// l = 0, 1, ... in order once the engine has written layer l's KV, then finish() (or let it go
/// out of scope). Chunks are published only if every layer was stored. The engine's tensors and
/// block table must stay valid until finish. Move-only; one thread at a time.
template <class Cache>
class host_store_pipeline {
 public:
  host_store_pipeline() = default;
  host_store_pipeline(host_store_pipeline&& o) noexcept { take(o); }
  host_store_pipeline& operator=(host_store_pipeline&& o) noexcept {
    if (this != &o) {
      finish_noexcept();
      take(o);
    }
    return *this;
  }
  ~host_store_pipeline() { finish_noexcept(); }

  /// Tokens this store covers (stored now or held already), as store() returns.
  [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
  /// Copies layer `l` of every chunk this store writes into the first tier.
  void store_layer(std::size_t l) {
    check_layer("store_layer", l, next_, layers_);
    ++next_;
    if (c_ == nullptr) return;
    const chunk_ref* rs = c_->ops_.refs(op_);
    for (std::size_t i = first_; i < placed_; ++i) {
      if (!rs[i].wrote) continue;
      transfer::gather_layer(*v_, c_->format_, table_, i * Cache::chunk_tokens,
                             Cache::tokens_at(i, total_), c_->chain_.first().data(rs[i].slot), l);
    }
  }
  /// Copies the layers not stored yet.
  void store_all() {
    while (next_ < layers_) store_layer(next_);
  }
  /// Ends the store: tokens() when every layer was stored (the chunks are visible to lookup from
  /// now on), else 0 and nothing is published.
  std::size_t finish() {
    const bool whole = next_ == layers_;
    if (c_ == nullptr) return whole ? tokens_ : 0;
    Cache& c = *std::exchange(c_, nullptr);
    auto& ix = c.chain_.first_index();
    const chunk_ref* rs = c.ops_.refs(op_);
    std::size_t bytes = 0;
    {
      std::lock_guard lk(c.st_.mu);
      for (std::size_t i = first_; i < placed_; ++i) {
        if (!rs[i].wrote) continue;
        index_entry& e = ix.at(rs[i].slot);
        if (whole) {
          c.chain_.publish_locked(0, e);
          ++c.st_.stats.tiers[0].writes;
          c.policy_.on_stored_locked(e);
          bytes += c.format_.bytes(Cache::tokens_at(i, total_));
        } else {
          ix.abort(e);
        }
        ix.unref(e);
      }
      if (whole) {
        c.st_.stats.stored_tokens += tokens_;
        c.st_.stats.bytes_from_engine += bytes;
        c.st_.stats.tiers[0].bytes_written += bytes;
      }
      c.ops_.release(op_);
    }
    c.st_.state_cv.notify_all();
    c.policy_.notify();
    return whole ? tokens_ : 0;
  }

 private:
  friend Cache;
  using view_type = typename Cache::view_type;

  // Reserves the first-tier entries of `tokens`' chunks from first_token's (as store()).
  host_store_pipeline(Cache& c, std::span<const token_id> tokens, const engine_kv& kv,
                      block_table table, std::size_t first_token)
      : layers_(c.model_.layers) {
    const auto r = check_store<view_type, Cache::chunk_tokens>(
        c.model_, c.cfg_, tokens.size(), c.chunk_count(tokens.size()), kv, table, first_token);
    if (r.first >= r.n) return;
    std::unique_lock lk(c.st_.mu);
    const std::uint32_t op = c.begin_op(lk, tokens, r.n);
    if (op == op_table::no_op) return;
    chunk_ref* rs = c.ops_.refs(op);
    std::size_t first = r.first;
    if constexpr (Cache::chain_type::has_mapped) {  // held by a tier read in place: stored
      lk.unlock();
      first = c.in_place_.skip_held(c.ops_.keys(op), rs, first, r.n);
      lk.lock();
    }
    placed_ = c.policy_.place_locked(c.ops_.keys(op), rs, first, r.n, [&](std::size_t i) {
      return Cache::tokens_at(i, tokens.size());
    });
    c_ = &c;
    op_ = op;
    v_.emplace(r.v);
    table_ = table;
    first_ = r.first;
    total_ = tokens.size();
    tokens_ = std::min(placed_ * Cache::chunk_tokens, total_) - first_ * Cache::chunk_tokens;
  }

  void take(host_store_pipeline& o) noexcept {
    c_ = std::exchange(o.c_, nullptr);
    op_ = o.op_;
    v_ = std::move(o.v_);
    table_ = o.table_;
    first_ = o.first_, placed_ = o.placed_, total_ = o.total_, tokens_ = o.tokens_;
    next_ = o.next_, layers_ = o.layers_;
  }
  void finish_noexcept() noexcept {
    try {
      (void)finish();
    } catch (...) {  // a destructor cannot report it
    }
  }

  Cache* c_ = nullptr;
  std::uint32_t op_ = op_table::no_op;
  std::optional<view_type> v_;
  block_table table_;
  std::size_t first_ = 0, placed_ = 0, total_ = 0, tokens_ = 0, next_ = 0, layers_ = 0;
};

/// A layer-wise retrieve on host tiers (from cache::begin_retrieve, which consumes the lease).
/// Every chunk it loads is proven when it begins (see above), so tokens() is what it loads.
/// Call retrieve_layer(l) for l = 0, 1, ... in order before the engine reads layer l, then
/// finish() (or let it go out of scope). The chunks stay held until finish. The engine's tensors
/// and block table must stay valid until then. Move-only; one thread at a time.
template <class Cache>
class host_retrieve_pipeline {
  using chain_type = typename Cache::chain_type;
  static constexpr bool has_mapped = chain_type::has_mapped;
  static constexpr std::uint8_t held_mark = 2;  // chunk_ref::wrote of a chunk held in place
  using held_type = std::conditional_t<has_mapped, tier::shared_host::held, std::monostate>;

 public:
  host_retrieve_pipeline() = default;
  host_retrieve_pipeline(host_retrieve_pipeline&& o) noexcept { take(o); }
  host_retrieve_pipeline& operator=(host_retrieve_pipeline&& o) noexcept {
    if (this != &o) {
      finish();
      take(o);
    }
    return *this;
  }
  ~host_retrieve_pipeline() { finish(); }

  /// Tokens this retrieve loads (a prefix of the lease, every chunk of it proven).
  [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
  /// Copies layer `l` of every chunk into the engine's blocks.
  void retrieve_layer(std::size_t l) {
    check_layer("retrieve_layer", l, next_, layers_);
    ++next_;
    if (c_ == nullptr) return;
    const chunk_ref* rs = c_->ops_.refs(op_);
    for (std::size_t i = 0; i < loaded_; ++i) {
      const std::size_t c = first_ + i;
      transfer::scatter_layer(*v_, c_->format_, table_, c * Cache::chunk_tokens,
                              Cache::tokens_at(c, abs_end_), source(rs[i]), l);
    }
  }
  /// Copies the layers not loaded yet.
  void retrieve_all() {
    while (next_ < layers_) retrieve_layer(next_);
  }
  /// Ends the retrieve and releases its chunks: tokens() when every layer was loaded, else 0
  /// (the layers loaded are in the engine's blocks, but the prefix is not whole).
  std::size_t finish() noexcept {
    const bool whole = next_ == layers_;
    if (c_ == nullptr) return whole ? tokens_ : 0;
    Cache& c = *std::exchange(c_, nullptr);
    const chunk_ref* rs = c.ops_.refs(op_);
    {
      std::lock_guard lk(c.st_.mu);
      if (whole) {
        std::size_t first_bytes = 0, held_bytes = 0;
        for (std::size_t i = 0; i < loaded_; ++i) {
          const std::size_t b = c.format_.bytes(Cache::tokens_at(first_ + i, abs_end_));
          (rs[i].wrote == held_mark ? held_bytes : first_bytes) += b;
        }
        c.st_.stats.retrieved_tokens += tokens_;
        c.st_.stats.bytes_to_engine += first_bytes + held_bytes;
        c.st_.stats.tiers[0].bytes_read += first_bytes;
        if constexpr (has_mapped)
          c.st_.stats.tiers[chain_type::first_mapped].bytes_read += held_bytes;
      }
      for (std::size_t i = 0; i < chunks_; ++i) c.chain_.unref_locked(rs[i]);
      c.ops_.release(op_);
    }
    if constexpr (has_mapped) held_.reset();
    c.st_.state_cv.notify_all();
    return whole ? tokens_ : 0;
  }

 private:
  friend Cache;
  using view_type = typename Cache::view_type;

  // Takes over a lease's operation `op` (chunks first_chunk.. of a run ending at token abs_end;
  // `chunks` referenced, the first `count` to load) and proves the chunks it will load.
  host_retrieve_pipeline(Cache& c, std::uint32_t op, std::size_t first_chunk, std::size_t chunks,
                         std::size_t count, std::size_t abs_end, const view_type& v,
                         block_table table)
      : c_(op == op_table::no_op ? nullptr : &c),
        op_(op),
        v_(v),
        table_(table),
        first_(first_chunk),
        chunks_(chunks),
        abs_end_(abs_end),
        layers_(c.model_.layers) {
    if (c_ == nullptr) return;  // nothing to load
    try {
      prove(count);
    } catch (...) {
      next_ = 0;
      finish();
      throw;
    }
  }

  void prove(std::size_t count) {
    Cache& c = *c_;
    chunk_ref* rs = c.ops_.refs(op_);
    if constexpr (has_mapped) {
      // The segment's chunks: held for the pipeline's life and verified in place, now. The k-th
      // of them gets slot k (its place in the hold) and held_mark; a chunk not held ends the run.
      constexpr std::size_t m = chain_type::first_mapped;
      std::size_t nm = 0;
      for (std::size_t i = 0; i < count; ++i) nm += rs[i].tier == m;
      if (nm > 0) {
        // hold asks for k = 0, 1, ... in order, twice: a cursor, restarted when k goes back.
        std::size_t ck = SIZE_MAX, ci = 0;  // chunk ci is the ck-th of the segment's
        const auto nth = [&](std::size_t k) {
          if (ck == SIZE_MAX || k < ck) {
            ck = 0;
            ci = 0;
            while (rs[ci].tier != m) ++ci;
          }
          for (; ck < k; ++ck) {
            ++ci;
            while (rs[ci].tier != m) ++ci;
          }
          return ci;
        };
        const chunk_key* ks = c.ops_.keys(op_) + first_;
        std::size_t corrupt = 0;
        held_ = c.chain_.hold_mapped(
            nm, [&](std::size_t k) { return ks[nth(k)]; },
            [&](std::size_t k) { return Cache::tokens_at(first_ + nth(k), abs_end_); }, &corrupt);
        const std::size_t held = held_.chunks();
        if (held < nm) count = nth(held);
        for (std::size_t i = 0, k = 0; i < count; ++i) {
          if (rs[i].tier == m) rs[i] = {static_cast<std::uint32_t>(k++), dropped_tier, held_mark};
        }
        std::lock_guard lk(c.st_.mu);
        c.st_.stats.tiers[m].errors += corrupt;
      }
    }
    if constexpr (Cache::has_lower) {
      for (std::size_t w = 0; w < count; w += Cache::window) {
        c.promote_run(op_, first_, w, std::min(count, w + Cache::window), abs_end_);
      }
    }
    while (loaded_ < count && (rs[loaded_].tier == 0 || rs[loaded_].wrote == held_mark)) {
      tokens_ += Cache::tokens_at(first_ + loaded_, abs_end_);
      ++loaded_;
    }
  }

  const std::byte* source(const chunk_ref& r) const noexcept {
    if constexpr (has_mapped) {
      if (r.wrote == held_mark) return held_.data(r.slot);
    }
    return c_->chain_.first().data(r.slot);
  }

  void take(host_retrieve_pipeline& o) noexcept {
    c_ = std::exchange(o.c_, nullptr);
    op_ = o.op_;
    v_ = std::move(o.v_);
    held_ = std::move(o.held_);
    table_ = o.table_;
    first_ = o.first_, chunks_ = o.chunks_, loaded_ = o.loaded_, abs_end_ = o.abs_end_;
    tokens_ = o.tokens_, next_ = o.next_, layers_ = o.layers_;
  }

  Cache* c_ = nullptr;
  std::uint32_t op_ = op_table::no_op;
  std::optional<view_type> v_;
  [[no_unique_address]] held_type held_;
  block_table table_;
  std::size_t first_ = 0, chunks_ = 0, loaded_ = 0, abs_end_ = 0, tokens_ = 0, next_ = 0,
              layers_ = 0;
};

}  // namespace kvtier::detail
