#pragma once
// The asynchronous first tier (the GPU tiers): a store or retrieve enqueues its copies and
// returns; its operation stays pending until the copies complete, then a store publishes its
// chunks (or drops them, if a copy failed or not every layer was copied) and a retrieve releases
// its lease's chunks. Pending operations are polled by the cache's calls and by synchronize().
// Layer pipelines (store_pipeline, retrieve_pipeline) copy one layer at a time. For a first
// tier with synchronous copies (tier::host) this part is empty: nothing is ever pending.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/cache/write_policy.hpp"
#include "kvtier/detail/index_entry.hpp"
#include "kvtier/error.hpp"
#include "kvtier/transfer/batch_plan.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvtier::detail {

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

template <class Chain>
class async_path {
  static constexpr std::size_t tier_count = Chain::tier_count;
  using index_type = typename Chain::index_type;
  using first_impl = typename Chain::first_impl;
  using state_type = cache_state<tier_count>;
  static constexpr std::uint32_t no_op = op_table::no_op;

 public:
  /// True when the first tier copies asynchronously on the GPU (tier::device, tier::pinned_host).
  static constexpr bool enabled = requires { first_impl::async_copies; };
  using order_type = typename async_types<first_impl>::type;
  using event_type = typename async_types<first_impl>::event;

  /// What a pending operation does when its copies complete.
  struct async_op {
    bool retrieve = false;
    std::size_t first = 0;  ///< store: first chunk; retrieve: 0
    std::size_t count = 0;  ///< store: one past the last chunk placed; retrieve: lease chunks
    bool ok = true;         ///< store: every layer was copied
  };

  async_path(Chain& chain, state_type& st, op_table& ops, write_policy<Chain>& policy,
             std::size_t layers)
      : chain_(chain), st_(st), ops_(ops), policy_(policy), layers_(layers) {
    if constexpr (enabled) {
      s_.ops.resize(ops.capacity());
      s_.pending.reserve(ops.capacity());
    }
  }
  ~async_path() {
    if constexpr (enabled) synchronize();
  }
  async_path(const async_path&) = delete;
  async_path& operator=(const async_path&) = delete;

  /// Sets what operation `op` does on completion. Under the lock.
  void set_locked(std::uint32_t op, const async_op& a) noexcept { s_.ops[op] = a; }

  /// Completes every pending operation whose copies have finished. Under the lock.
  void poll_locked() noexcept {
    if constexpr (enabled) {
      bool any = false;
      for (std::size_t k = 0; k < s_.pending.size();) {
        const std::uint32_t op = s_.pending[k];
        const auto s = chain_.first().transfers().poll(op);
        if (s == decltype(s)::pending) {
          ++k;
          continue;
        }
        complete_locked(op, s == decltype(s)::done);
        s_.pending[k] = s_.pending.back();
        s_.pending.pop_back();
        any = true;
      }
      if (any) {
        st_.state_cv.notify_all();
        policy_.notify();
      }
    }
  }

  /// Waits for an entry to leave the writing state. With asynchronous copies nothing signals
  /// that by itself: the copies are polled every 100 us meanwhile.
  void wait_state_locked(std::unique_lock<std::mutex>& lk) {
    if constexpr (enabled) {
      poll_locked();
      st_.state_cv.wait_for(lk, std::chrono::microseconds(100));
    } else {
      st_.state_cv.wait(lk);
    }
  }

  /// Waits until every copy started so far has completed, and completes its operation.
  void synchronize() {
    if constexpr (enabled) {
      std::unique_lock lk(st_.mu);
      while (!s_.pending.empty()) {
        const std::uint32_t op = s_.pending.front();
        lk.unlock();
        chain_.first().transfers().wait(op);
        lk.lock();
        poll_locked();
      }
    }
  }

  /// Operation `op`'s copies finished (ok) or failed: a store publishes its chunks (or drops
  /// them: a failed or incomplete store is never visible), a retrieve releases its chunks; the
  /// slot is freed. Under the lock.
  void complete_locked(std::uint32_t op, bool ok) noexcept {
    const async_op& a = s_.ops[op];
    chunk_ref* rs = ops_.refs(op);
    if (!a.retrieve) {
      index_type& ix = chain_.first_index();
      for (std::size_t i = a.first; i < a.count; ++i) {
        if (!rs[i].wrote) continue;
        index_entry& e = ix.at(rs[i].slot);
        if (ok && a.ok) {
          chain_.publish_locked(0, e);
          ++st_.stats.tiers[0].writes;
          policy_.on_stored_locked(e);
        } else {
          ix.abort(e);
          if (!ok) ++st_.stats.tiers[0].errors;
        }
        ix.unref(e);
      }
    } else {
      for (std::size_t i = 0; i < a.count; ++i) chain_.unref_locked(rs[i]);
    }
    ops_.release(op);
  }
  void complete(std::uint32_t op, bool ok) noexcept {
    {
      std::lock_guard lk(st_.mu);
      complete_locked(op, ok);
    }
    st_.state_cv.notify_all();
  }

  class store_pipeline;
  class retrieve_pipeline;

  /// What a store or retrieve pipeline holds, and the steps both take: the path, its operation
  /// slot, the next layer to copy, and the tokens and bytes the operation moves.
  struct pipeline_state {
    async_path* a = nullptr;
    std::uint32_t op = no_op;
    std::size_t next = 0, tokens = 0, bytes = 0;

    pipeline_state() = default;
    pipeline_state(pipeline_state&& o) noexcept
        : a(std::exchange(o.a, nullptr)),
          op(std::exchange(o.op, no_op)),
          next(std::exchange(o.next, 0)),
          tokens(std::exchange(o.tokens, 0)),
          bytes(std::exchange(o.bytes, 0)) {}
    pipeline_state& operator=(pipeline_state&&) = delete;
    void assign(pipeline_state&& o, bool store) noexcept {
      if (this == &o) return;
      finish_noexcept(store);
      a = std::exchange(o.a, nullptr);
      op = std::exchange(o.op, no_op);
      next = std::exchange(o.next, 0);
      tokens = std::exchange(o.tokens, 0);
      bytes = std::exchange(o.bytes, 0);
    }

    // Copies layer `l` (the next one), after the engine stream's work for a store; returns the
    // layer's event.
    event_type layer(const char* what, std::size_t l, bool join) {
      if (op == no_op) return event_type{};
      a->check_layer_count(what, l);
      check_layer(what, l, next);
      auto& x = a->chain_.first().transfers();
      if (join) x.join(op);
      x.copy(op, static_cast<std::uint32_t>(l), static_cast<std::uint32_t>(l + 1));
      ++next;
      return x.layer_signal(op, static_cast<std::uint32_t>(l));
    }
    void all(const char* what, bool join) {
      if (op == no_op) return;
      if (next != 0) check_layer(what, 0, next);
      auto& x = a->chain_.first().transfers();
      if (join) x.join(op);
      x.copy(op, 0, static_cast<std::uint32_t>(a->layers_));
      next = a->layers_;
    }
    // Ends the operation: it completes (publishing a store's chunks if every layer was copied,
    // releasing a retrieve's) once its copies have. Returns the tokens moved, or 0.
    std::size_t finish(bool store) {
      if (a == nullptr) return 0;
      if (op == no_op) {
        a = nullptr;
        return 0;
      }
      try {
        a->chain_.first().transfers().end(op);
      } catch (...) {
        fail();
        throw;
      }
      async_path* p = std::exchange(a, nullptr);
      const std::uint32_t o = std::exchange(op, no_op);
      const bool whole = next == p->layers_;
      std::lock_guard lk(p->st_.mu);
      if (store) p->s_.ops[o].ok = whole;
      p->s_.pending.push_back(o);
      if (!whole) return 0;
      auto& s = p->st_.stats;
      if (store) {
        s.stored_tokens += tokens;
        s.bytes_from_engine += bytes;
        s.tiers[0].bytes_written += bytes;
      } else {
        s.retrieved_tokens += tokens;
        s.bytes_to_engine += bytes;
        s.tiers[0].bytes_read += bytes;
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
      a->chain_.first().transfers().cancel(op);
      a->complete(std::exchange(op, no_op), false);
      a = nullptr;
    }
  };

  /// A layer-wise store (from begin_store). Call store_layer(l) for l = 0, 1, ... in order once
  /// the engine has enqueued layer l's KV computation on its stream, then finish() (or let it
  /// go out of scope). Chunks are published only if every layer was stored. Move-only.
  class store_pipeline {
   public:
    store_pipeline() = default;
    /// Takes a staged operation (the cache makes pipelines; engines receive them).
    explicit store_pipeline(pipeline_state&& s) noexcept : st_(std::move(s)) {}
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
    pipeline_state st_;
  };

  /// A layer-wise retrieve (from begin_retrieve). Call retrieve_layer(l) for l = 0, 1, ... in
  /// order before the engine enqueues layer l's attention: the engine's stream (with
  /// run_on_stream false) waits for that layer only, so loading layer l+1 overlaps computing
  /// layer l. Then finish() (or let it go out of scope). Move-only.
  class retrieve_pipeline {
   public:
    retrieve_pipeline() = default;
    /// Takes a staged operation (the cache makes pipelines; engines receive them).
    explicit retrieve_pipeline(pipeline_state&& s) noexcept : st_(std::move(s)) {}
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
    pipeline_state st_;
  };

  /// Starts operation `op`'s batch in direction `w` ordered by `o`, staging `n` chunks
  /// (`chunk(i)` gives the i-th one's staged_chunk). A retrieve's copies are ordered here, once,
  /// after the work already on the engine's stream: they write into engine blocks that kernels
  /// queued before the call may still read or write (blocks a finished request just freed), and
  /// the GPU tier's join also orders them after stores in flight from those blocks. A store
  /// joins the engine's stream at each layer it copies
  /// (after the KV it reads is computed). On failure the operation ends as failed and the error
  /// propagates.
  template <class View, class Tensors, class Table, class Chunk>
  void stage(pipeline_state& p, transfer::way w, const order_type& o, const View& v,
             const Tensors& tensors, Table table, std::size_t n, Chunk&& chunk) {
    auto& x = chain_.first().transfers();
    try {
      x.begin(p.op, w, o);
      x.stage(p.op, v.resolved(), tensors, table, n, chunk);
      if (w == transfer::way::to_engine) x.join(p.op);
    } catch (...) {
      p.fail();
      throw;
    }
  }

 private:
  static void check_layer(const char* what, std::size_t l, std::size_t next) {
    if (l != next) {
      throw invalid_argument(std::string("kvtier: ") + what + "(" + std::to_string(l) +
                             ") out of order: layer " + std::to_string(next) +
                             " is next (layers are copied once each, in order)");
    }
  }
  void check_layer_count(const char* what, std::size_t l) const {
    if (l >= layers_) {
      throw invalid_argument(std::string("kvtier: ") + what + "(" + std::to_string(l) +
                             ") is past the model's " + std::to_string(layers_) + " layers");
    }
  }

  Chain& chain_;
  state_type& st_;
  op_table& ops_;
  write_policy<Chain>& policy_;
  std::size_t layers_;
  // Per operation slot, and the operations whose copies may still run: only for an
  // asynchronous first tier (nothing is ever pending otherwise).
  struct storage {
    std::vector<async_op> ops;
    std::vector<std::uint32_t> pending;
  };
  struct no_storage {};
  [[no_unique_address]] std::conditional_t<enabled, storage, no_storage> s_;
};

}  // namespace kvtier::detail
