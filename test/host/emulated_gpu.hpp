#pragma once
// A first tier with asynchronous copies, emulated on the host for tests: it has the interface
// the GPU tiers give the cache (transfers_type: begin, stage, join, copy, layer_signal, end,
// cancel, poll, wait), and it executes a batch with the CUDA kernel's own per-thread code
// (transfer::move_segment, every lane of a 256-thread block in turn) or with the DMA engines'
// copy list (batch_plan::copy_at). Copies stay queued until the test runs them, so tests see
// exactly what the cache does before a GPU copy has completed.

#include <kvtier/kvtier.hpp>
#include <kvtier/transfer/batch_plan.hpp>
#include <kvtier/transfer/copy_runs.hpp>

#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace test {

struct emu_order {
  int stream = 0;
};

enum class emu_engine { kernel, copy_list };

struct alignas(16) v16 {
  std::uint64_t a, b;
};

/// The access width run_batch last moved a kernel batch in (16, 8, 4, 2 or 1).
inline std::uint32_t last_width = 0;

/// Runs batch `p` on the host as the GPU would.
inline void run_batch(const kvtier::transfer::batch_plan& p, kvtier::transfer::way w,
                      std::uint32_t vb, emu_engine e) {
  namespace tr = kvtier::transfer;
  for (std::uint64_t i = 0; i < p.segments(); ++i) {
    const tr::segment s = p.at(i);
    if (e == emu_engine::copy_list) break;  // the whole batch below, as memcpy_batch
    // As the kernel with 3 thread blocks of 256 threads per segment (more parts than the
    // kernel picks for these small segments, so every lane mapping is exercised).
    auto lanes = [&](auto vec, auto way_tag, auto dense_tag) {
      using V = decltype(vec);
      constexpr std::uint32_t parts = 3, threads = 256;
      for (std::uint32_t part = 0; part < parts; ++part) {
        for (std::uint32_t t = 0; t < threads; ++t) {
          tr::move_segment<V, decltype(way_tag)::value, decltype(dense_tag)::value>(
              p, s, part * threads + t, parts * threads);
        }
      }
    };
    auto by_way = [&](auto vec, auto dense_tag) {
      if (w == tr::way::to_chunk) {
        lanes(vec, std::integral_constant<tr::way, tr::way::to_chunk>{}, dense_tag);
      } else {
        lanes(vec, std::integral_constant<tr::way, tr::way::to_engine>{}, dense_tag);
      }
    };
    auto by_dense = [&](auto vec) {
      if (p.engine_dense()) {
        by_way(vec, std::true_type{});
      } else {
        by_way(vec, std::false_type{});
      }
    };
    // The kernel's dispatch: the widest access the batch's alignment allows.
    tr::for_vector_width(vb, [&](auto width) {
      constexpr std::uint32_t W = decltype(width)::value;
      last_width = W;
      using V = std::conditional_t<
          W == 16, v16,
          std::conditional_t<
              W == 8, std::uint64_t,
              std::conditional_t<W == 4, std::uint32_t,
                                 std::conditional_t<W == 2, std::uint16_t, std::uint8_t>>>>;
      by_dense(V{});
    });
  }
  if (e == emu_engine::copy_list) {
    // memcpy_batch's copy list: merged runs, gathered a few at a time as into its arrays.
    constexpr std::size_t cap = 7;
    void* dst[cap];
    void* src[cap];
    std::size_t size[cap];
    tr::gather_copies(p, w, cap, dst, src, size, [&](std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) std::memcpy(dst[i], src[i], size[i]);
    });
  }
}

/// The emulated GPU tier (host memory slots, visible to lower tiers).
struct emulated_gpu {
  static constexpr const char* name = "emulated_gpu";
  static constexpr bool is_memory = true;
  static constexpr bool host_visible = true;
  struct config {
    std::size_t capacity_bytes = std::size_t{1} << 24;
    emu_engine engine = emu_engine::kernel;
  };

  enum class state { pending, done, failed };

  class transfers_type {
   public:
    using order_type = emu_order;
    using event_type = const void*;

    transfers_type(const kvtier::tier::context& ctx, std::byte* slots, std::size_t slot_bytes,
                   emu_engine e)
        : ops_(ctx.max_ops),
          slots_(slots),
          slot_bytes_(slot_bytes),
          bs_(ctx.block_size),
          bpc_(ctx.format.chunk_tokens / ctx.block_size),
          layers_(ctx.format.layers),
          planes_(ctx.format.kv_planes),
          engine_(e) {
      for (auto& o : ops_) {
        o.chunks.resize(ctx.max_chunks);
        o.ids.resize(ctx.max_chunks * bpc_);
        o.layer_marks.resize(layers_);
      }
    }

    // -- the interface the cache uses
    void validate(std::span<void* const> tensors, const emu_order&) const {
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (tensors[i] == reject) throw kvtier::invalid_argument("emulated: rejected tensor");
      }
    }
    void begin(std::uint32_t op, kvtier::transfer::way w, const emu_order& o) {
      std::lock_guard lk(mu_);
      ops_[op].way = w;
      ops_[op].st = state::pending;
      ops_[op].stream = o.stream;
      ++begun;
      log.push_back({op, 'b', o.stream});
    }
    template <class ChunkAt>
    void stage(std::uint32_t op, const kvtier::layout::ref& eng, std::span<void* const> tensors,
               kvtier::block_table table, std::size_t count, ChunkAt&& chunk_at) {
      std::lock_guard lk(mu_);
      if (fail_stage) throw kvtier::tier_error("emulated: staging failed");
      op_state& s = ops_[op];
      s.tensors.assign(tensors.begin(), tensors.end());
      std::uint32_t ids = 0;
      for (std::size_t i = 0; i < count; ++i) {
        const kvtier::transfer::staged_chunk c = chunk_at(i);
        s.chunks[i] = {slots_ + std::size_t{c.slot} * slot_bytes_, c.tokens, ids};
        const std::size_t b0 = c.first_token / bs_;
        for (std::size_t j = 0; j < (c.tokens + bs_ - 1) / bs_; ++j) s.ids[ids + j] = table[b0 + j];
        ids += static_cast<std::uint32_t>(bpc_);
      }
      s.plan = {};
      s.plan.eng = eng;
      s.plan.tensors = s.tensors.data();
      s.plan.chunks = s.chunks.data();
      s.plan.block_ids = s.ids.data();
      s.plan.chunk_count = static_cast<std::uint32_t>(count);
      s.plan.planes = static_cast<std::uint32_t>(planes_);
      s.plan.blocks_per_chunk = static_cast<std::uint32_t>(bpc_);
      s.vb = kvtier::transfer::vector_bytes(eng, tensors.data(), tensors.size(), 4096);
      staged_chunks += count;
    }
    void join(std::uint32_t op) {
      std::lock_guard lk(mu_);
      ++joins;
      log.push_back({op, 'j', ops_[op].stream});
    }
    void copy(std::uint32_t op, std::uint32_t l0, std::uint32_t l1) {
      std::lock_guard lk(mu_);
      queue_.push_back({op, l0, l1, false});
      log.push_back({op, 'c', ops_[op].stream});
    }
    event_type layer_signal(std::uint32_t op, std::uint32_t l) { return &ops_[op].layer_marks[l]; }
    void end(std::uint32_t op) {
      std::lock_guard lk(mu_);
      queue_.push_back({op, 0, 0, true});
      log.push_back({op, 'e', ops_[op].stream});
    }
    void cancel(std::uint32_t op) noexcept {
      std::lock_guard lk(mu_);
      ops_[op].cancelled = true;
      run_locked(SIZE_MAX);
    }
    state poll(std::uint32_t op) noexcept {
      std::lock_guard lk(mu_);
      return ops_[op].st;
    }
    void wait(std::uint32_t) noexcept {
      std::lock_guard lk(mu_);
      run_locked(SIZE_MAX);
    }

    // -- test controls
    /// Executes up to `n` queued items (copies and ends) in order, as the GPU would.
    void run(std::size_t n = SIZE_MAX) {
      std::lock_guard lk(mu_);
      run_locked(n);
    }
    std::size_t queued() {
      std::lock_guard lk(mu_);
      return queue_.size();
    }
    /// The next operation to end fails (its copies are not run), as a failed CUDA copy.
    bool fail_next = false;
    bool fail_stage = false;
    void* reject = nullptr;
    std::size_t begun = 0, joins = 0, staged_chunks = 0, batches = 0;
    /// What the cache asked of the copy streams, in order: per operation, begin ('b'), join
    /// ('j': the copy stream waits for the engine's stream as of now), copy ('c'), end ('e'),
    /// with the engine stream of the operation's order. Tests read the ordering from it.
    struct step {
      std::uint32_t op;
      char what;
      int stream;
    };
    std::vector<step> log;
    /// The steps of the last operation begun, as a string ("bjcce").
    std::string last_op_steps() {
      std::lock_guard lk(mu_);
      std::size_t b = log.size();
      while (b > 0 && log[b - 1].what != 'b') --b;
      if (b == 0) return {};
      const std::uint32_t op = log[b - 1].op;
      std::string out;
      for (std::size_t i = b - 1; i < log.size(); ++i) {
        if (log[i].op == op) out += log[i].what;
      }
      return out;
    }

   private:
    struct item {
      std::uint32_t op, l0, l1;
      bool end;
    };
    struct op_state {
      std::vector<void*> tensors;
      std::vector<kvtier::transfer::batch_chunk> chunks;
      std::vector<std::int32_t> ids;
      std::vector<char> layer_marks;
      kvtier::transfer::batch_plan plan{};
      kvtier::transfer::way way{};
      state st = state::done;
      int stream = 0;
      std::uint32_t vb = 1;
      bool cancelled = false;
      bool failing = false;
    };
    void run_locked(std::size_t n) {
      for (; n > 0 && !queue_.empty(); --n) {
        const item it = queue_.front();
        queue_.pop_front();
        op_state& s = ops_[it.op];
        if (it.end) {
          s.st = s.failing ? state::failed : state::done;
          s.failing = s.cancelled = false;
          continue;
        }
        if (fail_next) {
          fail_next = false;
          s.failing = true;
        }
        if (s.failing) continue;
        kvtier::transfer::batch_plan p = s.plan;
        p.layer_begin = it.l0;
        p.layer_end = it.l1;
        run_batch(p, s.way, s.vb, engine_);
        ++batches;
      }
    }

    std::mutex mu_;
    std::deque<item> queue_;
    std::vector<op_state> ops_;
    std::byte* slots_;
    std::size_t slot_bytes_, bs_, bpc_, layers_, planes_;
    emu_engine engine_;
  };

  template <class Eviction>
  class impl {
   public:
    static constexpr std::size_t alignment = 4096;
    static constexpr bool async_copies = true;
    using transfers_type = emulated_gpu::transfers_type;

    impl(const config& c, const kvtier::tier::context& ctx)
        : index_(kvtier::memory::slab::slots_in(c.capacity_bytes, ctx.format.chunk_bytes(),
                                                alignment, "emulated_gpu")),
          slab_(index_.capacity(), ctx.format.chunk_bytes(), alignment, false),
          xfer_(ctx, slab_.data(0), slab_.slot_bytes(), c.engine) {}

    kvtier::detail::chunk_index<Eviction>& index() noexcept { return index_; }
    std::byte* data(std::uint32_t slot) const noexcept { return slab_.data(slot); }
    transfers_type& transfers() noexcept { return xfer_; }

   private:
    kvtier::detail::chunk_index<Eviction> index_;
    kvtier::memory::slab slab_;
    transfers_type xfer_;
  };
};

}  // namespace test
