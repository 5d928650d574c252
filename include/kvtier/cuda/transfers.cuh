#pragma once
// The asynchronous transfer machinery a GPU tier gives the cache: per operation, a descriptor
// staging area (pinned host and device), events, and the stream the operation runs on.

#include "kvtier/cuda/copy_engine.cuh"
#include "kvtier/cuda/runtime_api.hpp"
#include "kvtier/error.hpp"
#include "kvtier/layout/block_span.hpp"
#include "kvtier/model.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/transfer/batch_plan.hpp"
#include "kvtier/transfer/inflight_stores.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace kvtier::gpu {

/// How a store, retrieve or layer pipeline is ordered with the engine's GPU work.
///
/// With `run_on_stream` false (the default) the copy runs on one of kvtier's own transfer streams
/// (one for stores, one for retrieves, both of the highest priority): a store's copy starts once
/// `stream` has reached the point of the call (the KV it copies is computed); a retrieve's copy
/// also starts only once `stream` has reached the point of the call, and `stream` waits for it
/// before the work the engine enqueues next.
/// With `run_on_stream` true the copy is enqueued on `stream` itself. Either way, `signal`,
/// when set, is recorded once the whole copy has completed (an event the engine owns).
struct stream_order {
  cudaStream_t stream = nullptr;  ///< the engine's stream (nullptr: the legacy default stream)
  bool run_on_stream = false;
  cudaEvent_t signal = nullptr;
};

/// Where an asynchronous operation stands.
enum class async_state { pending, done, failed };

/// The device a tier config names (-1: the current one), checked.
inline int resolve_device(int device, const char* tier) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0) check(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= count) {
    throw invalid_argument(std::string("kvtier: ") + tier + " tier: device " +
                           std::to_string(device) + " does not exist (" + std::to_string(count) +
                           " CUDA devices)");
  }
  return device;
}

/// Per-operation GPU state of one tier, for `ctx.max_ops` operations of up to `ctx.max_chunks`
/// chunks, reserved at construction (events, pinned and device staging). Operation slots are
/// the cache's: an operation is reused only after poll() said it finished.
template <class Engine>
class transfers {
 public:
  using event_type = cudaEvent_t;
  using order_type = stream_order;

  /// Chunk slot i is at `slots + i * slot_bytes` as the device sees it; `slot_alignment` is what
  /// every slot address is a multiple of.
  transfers(int device, const tier::context& ctx, std::byte* slots, std::size_t slot_bytes,
            std::size_t slot_alignment)
      : device_(device),
        format_(ctx.format),
        block_size_(ctx.block_size),
        blocks_per_chunk_(ctx.format.chunk_tokens / ctx.block_size),
        max_chunks_(ctx.max_chunks),
        slot_alignment_(slot_alignment),
        max_tensors_(2 * ctx.format.layers),
        ops_(ctx.max_ops),
        stores_(ctx.max_ops, ctx.max_chunks * (ctx.format.chunk_tokens / ctx.block_size)),
        engine_(engine_setup{
            ctx.max_chunks,
            ctx.format.layers * ctx.format.kv_planes * (ctx.format.chunk_tokens / ctx.block_size),
            ctx.block_size, static_cast<std::uint32_t>(ctx.format.heads), ctx.max_ops, device,
            multiprocessors(device)}),
        slots_(slots),
        slot_bytes_(slot_bytes) {
    device_guard g(device_);
    try {
      // Highest priority: a copy's blocks are scheduled ahead of compute that fills the GPU.
      int least = 0, greatest = 0;
      check(cudaDeviceGetStreamPriorityRange(&least, &greatest),
            "cudaDeviceGetStreamPriorityRange");
      for (cudaStream_t* st : {&store_stream_, &retrieve_stream_}) {
        check(cudaStreamCreateWithPriority(st, cudaStreamNonBlocking, greatest),
              "cudaStreamCreateWithPriority");
      }
      staging_bytes_ = tensors_bytes() + chunks_bytes() + ids_bytes();
      void* p = nullptr;
      check(cudaHostAlloc(&p, staging_bytes_ * ops_.size(), cudaHostAllocDefault),
            "cudaHostAlloc (descriptor staging)");
      host_stage_ = static_cast<std::byte*>(p);
      check(cudaMalloc(&p, staging_bytes_ * ops_.size()), "cudaMalloc (descriptor staging)");
      dev_stage_ = static_cast<std::byte*>(p);
      for (auto& t : validated_) t.tensors.resize(max_tensors_);
      for (op_state& o : ops_) {
        o.layer_events.resize(format_.layers);
        o.blocks.reserve(max_chunks_ * blocks_per_chunk_);
        for (cudaEvent_t* e : {&o.done, &o.joined, &o.copied}) {
          check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
        }
        for (cudaEvent_t& e : o.layer_events) {
          check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
        }
      }
    } catch (...) {
      release();
      throw;
    }
  }
  transfers(const transfers&) = delete;
  transfers& operator=(const transfers&) = delete;
  ~transfers() { release(); }

  [[nodiscard]] int device() const noexcept { return device_; }
  /// The stream a copy in direction `w` runs on unless its order has run_on_stream: stores and
  /// retrieves have one each, so a retrieve never queues behind a store's copy.
  [[nodiscard]] cudaStream_t transfer_stream(transfer::way w) const noexcept {
    return w == transfer::way::to_chunk ? store_stream_ : retrieve_stream_;
  }
  /// The copy engine's state (its reservations, for tests).
  [[nodiscard]] const typename Engine::state& engine() const noexcept { return engine_; }

 private:
  void release() noexcept {
    device_guard g(device_, std::nothrow);
    for (cudaStream_t st : {store_stream_, retrieve_stream_}) {
      if (st) cudaStreamSynchronize(st);
    }
    for (op_state& o : ops_) {
      if (o.done) cudaEventSynchronize(o.done), cudaEventDestroy(o.done);
      if (o.joined) cudaEventDestroy(o.joined);
      if (o.copied) cudaEventDestroy(o.copied);
      for (cudaEvent_t e : o.layer_events) {
        if (e) cudaEventDestroy(e);
      }
    }
    if (dev_stage_) cudaFree(dev_stage_);
    if (host_stage_) cudaFreeHost(host_stage_);
    for (cudaStream_t st : {store_stream_, retrieve_stream_}) {
      if (st) cudaStreamDestroy(st);
    }
  }

 public:
  /// Starts operation `op` in direction `w`, ordered by `o` (checked by validate()).
  void begin(std::uint32_t op, transfer::way w, const stream_order& o) {
    op_state& s = ops_[op];
    s.order = o;
    s.way = w;
    s.stream = o.run_on_stream ? o.stream : transfer_stream(w);
  }

  /// Writes the descriptors of `count` chunks (`chunk_at(i)` -> transfer::staged_chunk) and the
  /// engine's tensor table into op's staging and copies them to the device on op's stream. The
  /// tensors must have passed validate().
  template <class ChunkAt>
  void stage(std::uint32_t op, const layout::ref& eng, std::span<void* const> tensors,
             block_table table, std::size_t count, ChunkAt&& chunk_at) {
    device_guard g(device_);
    op_state& s = ops_[op];
    if (count > max_chunks_) {
      throw invalid_argument("kvtier: GPU batch of " + std::to_string(count) +
                             " chunks exceeds the " + std::to_string(max_chunks_) +
                             " chunks staged per operation");
    }
    std::byte* host = host_stage_ + op * staging_bytes_;
    std::byte* dev = dev_stage_ + op * staging_bytes_;
    auto* host_tensors = reinterpret_cast<void**>(host);
    auto* host_chunks = reinterpret_cast<transfer::batch_chunk*>(host + tensors_bytes());
    auto* host_ids = reinterpret_cast<std::int32_t*>(host + tensors_bytes() + chunks_bytes());
    for (std::size_t i = 0; i < tensors.size(); ++i) host_tensors[i] = tensors[i];
    std::uint32_t ids = 0;
    s.blocks.clear();
    for (std::size_t i = 0; i < count; ++i) {
      const transfer::staged_chunk c = chunk_at(i);
      host_chunks[i] = {slots_ + std::size_t{c.slot} * slot_bytes_, c.tokens, ids};
      const std::size_t first_block = c.first_token / block_size_;
      const std::size_t blocks = (c.tokens + block_size_ - 1) / block_size_;
      for (std::size_t j = 0; j < blocks; ++j) {
        host_ids[ids + j] = table[first_block + j];
        s.blocks.push_back(table[first_block + j]);
      }
      ids += static_cast<std::uint32_t>(blocks_per_chunk_);
    }
    if (s.way == transfer::way::to_chunk) {
      stores_.begin(op, s.blocks);
    } else {
      stores_.clear(op);
    }
    s.host_plan = plan(eng, host_tensors, host_chunks, host_ids, count);
    s.dev_plan =
        plan(eng, reinterpret_cast<void* const*>(dev),
             reinterpret_cast<const transfer::batch_chunk*>(dev + tensors_bytes()),
             reinterpret_cast<const std::int32_t*>(dev + tensors_bytes() + chunks_bytes()), count);
    s.vector_bytes = transfer::vector_bytes(eng, tensors.data(), tensors.size(), slot_alignment_);
    const std::size_t used = tensors_bytes() + chunks_bytes() + std::size_t{ids} * 4;
    check(cudaMemcpyAsync(dev, host, used, cudaMemcpyHostToDevice, s.stream),
          "cudaMemcpyAsync (descriptors)");
  }

  /// Throws invalid_argument unless every tensor is device memory of this tier's device, the
  /// stream `o` names belongs to that device (CUDA 12.8+; the legacy and per-thread default
  /// streams are the tier device's, which kvtier makes current for its calls) and the copy
  /// engine can run on it. The last `remembered_tables` tensor tables that passed are
  /// remembered: an engine passing the same few tables (per layer group, per model) pays the
  /// pointer queries once for each.
  void validate(std::span<void* const> tensors, const stream_order& o) const {
    check_stream(o.stream);
    if (std::is_same_v<Engine, copy_engine::memcpy_batch> && o.run_on_stream &&
        (o.stream == nullptr || o.stream == cudaStreamLegacy)) {
      throw invalid_argument(
          "kvtier: copy engine memcpy_batch cannot run on the legacy default stream "
          "(stream_order.stream is null with run_on_stream)");
    }
    if (tensors.size() > max_tensors_) {
      throw invalid_argument("kvtier: engine_kv has " + std::to_string(tensors.size()) +
                             " tensors, more than the " + std::to_string(max_tensors_) +
                             " a GPU tier stages");
    }
    {
      std::lock_guard lk(validated_mu_);
      for (const validated_table& t : validated_) {
        if (t.count == tensors.size() &&
            std::equal(tensors.begin(), tensors.end(), t.tensors.begin())) {
          return;
        }
      }
    }
    device_guard g(device_);
    for (std::size_t i = 0; i < tensors.size(); ++i) check_device_pointer(tensors[i], i);
    std::lock_guard lk(validated_mu_);
    validated_table& t = validated_[next_validated_++ % validated_.size()];
    std::copy(tensors.begin(), tensors.end(), t.tensors.begin());
    t.count = tensors.size();
  }
  /// Tensor tables validate() remembers.
  static constexpr std::size_t remembered_tables = 4;

  /// Op's stream waits for the work the engine's stream holds now (nothing to do on the engine
  /// stream). A retrieve's also waits for the copies enqueued so far by stores in flight that
  /// read one of the blocks it writes (they run on the store stream, so stream order does not
  /// cover them), and for no other store: a retrieve is not held up by unrelated stores.
  void join(std::uint32_t op) {
    op_state& s = ops_[op];
    device_guard g(device_);
    if (!s.order.run_on_stream) {
      check(cudaEventRecord(s.joined, s.order.stream), "cudaEventRecord (join)");
      check(cudaStreamWaitEvent(s.stream, s.joined, 0), "cudaStreamWaitEvent (join)");
    }
    if (s.way == transfer::way::to_engine) {
      stores_.for_overlapping(op, s.blocks, [&](std::uint32_t store) {
        check(cudaStreamWaitEvent(s.stream, ops_[store].copied, 0),
              "cudaStreamWaitEvent (store reading the blocks)");
      });
    }
  }

  /// Enqueues layers [begin, end) of op's staged chunks.
  void copy(std::uint32_t op, std::uint32_t layer_begin, std::uint32_t layer_end) {
    device_guard g(device_);
    op_state& s = ops_[op];
    transfer::batch_plan d = s.dev_plan, h = s.host_plan;
    d.layer_begin = h.layer_begin = layer_begin;
    d.layer_end = h.layer_end = layer_end;
    engine_.enqueue(d, h, s.way, s.vector_bytes, s.stream, op);
    if (s.way == transfer::way::to_chunk) {
      check(cudaEventRecord(s.copied, s.stream), "cudaEventRecord (store copied)");
      stores_.copied(op);
    }
  }

  /// Records layer `l`'s event after what op has enqueued; for a retrieve on kvtier's stream the
  /// engine's stream waits for it. Returns it (valid until op is reused).
  cudaEvent_t layer_signal(std::uint32_t op, std::uint32_t l) {
    device_guard g(device_);
    op_state& s = ops_[op];
    check(cudaEventRecord(s.layer_events[l], s.stream), "cudaEventRecord (layer)");
    if (s.way == transfer::way::to_engine && !s.order.run_on_stream) {
      check(cudaStreamWaitEvent(s.order.stream, s.layer_events[l], 0),
            "cudaStreamWaitEvent (layer)");
    }
    return s.layer_events[l];
  }

  /// Ends op: records its completion event (and the engine's signal); the engine's stream waits
  /// for a retrieve.
  void end(std::uint32_t op) {
    device_guard g(device_);
    op_state& s = ops_[op];
    check(cudaEventRecord(s.done, s.stream), "cudaEventRecord (done)");
    if (s.way == transfer::way::to_engine && !s.order.run_on_stream) {
      check(cudaStreamWaitEvent(s.order.stream, s.done, 0), "cudaStreamWaitEvent (done)");
    }
    if (s.order.signal)
      check(cudaEventRecord(s.order.signal, s.stream), "cudaEventRecord (signal)");
  }

  /// After a failure part-way: waits (best effort) until whatever op enqueued has finished, so
  /// its slots can be reused.
  void cancel(std::uint32_t op) noexcept {
    op_state& s = ops_[op];
    device_guard g(device_, std::nothrow);
    if (cudaEventRecord(s.done, s.stream) == cudaSuccess) cudaEventSynchronize(s.done);
    (void)cudaGetLastError();
    stores_.clear(op);
  }

  [[nodiscard]] async_state poll(std::uint32_t op) noexcept {
    const cudaError_t e = cudaEventQuery(ops_[op].done);
    if (e == cudaErrorNotReady) return async_state::pending;
    stores_.clear(op);
    if (e == cudaSuccess) return async_state::done;
    (void)cudaGetLastError();
    return async_state::failed;
  }
  void wait(std::uint32_t op) noexcept {
    (void)cudaEventSynchronize(ops_[op].done);
    stores_.clear(op);
  }

 private:
  struct op_state {
    cudaEvent_t done = nullptr;
    cudaEvent_t joined = nullptr;
    cudaEvent_t copied = nullptr;  ///< a store's copies enqueued so far
    std::vector<cudaEvent_t> layer_events;
    std::vector<std::int32_t> blocks;  ///< the engine blocks op's batch names
    stream_order order{};
    cudaStream_t stream = nullptr;
    transfer::way way = transfer::way::to_chunk;
    transfer::batch_plan host_plan{}, dev_plan{};
    std::uint32_t vector_bytes = 1;
  };

  static std::uint32_t multiprocessors(int device) {
    int n = 1;
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute (multiprocessors)");
    return static_cast<std::uint32_t>(n);
  }
  static std::size_t align16(std::size_t v) noexcept { return (v + 15) / 16 * 16; }
  std::size_t tensors_bytes() const noexcept { return align16(max_tensors_ * sizeof(void*)); }
  std::size_t chunks_bytes() const noexcept {
    return align16(max_chunks_ * sizeof(transfer::batch_chunk));
  }
  std::size_t ids_bytes() const noexcept {
    return align16(max_chunks_ * blocks_per_chunk_ * sizeof(std::int32_t));
  }

  transfer::batch_plan plan(const layout::ref& eng, void* const* t, const transfer::batch_chunk* c,
                            const std::int32_t* ids, std::size_t count) const noexcept {
    transfer::batch_plan p;
    p.eng = eng;
    p.tensors = t;
    p.chunks = c;
    p.block_ids = ids;
    p.chunk_count = static_cast<std::uint32_t>(count);
    p.planes = static_cast<std::uint32_t>(format_.kv_planes);
    p.blocks_per_chunk = static_cast<std::uint32_t>(blocks_per_chunk_);
    p.layer_begin = 0;
    p.layer_end = static_cast<std::uint32_t>(format_.layers);
    return p;
  }

  // Not checked while the stream is being captured (cudaStreamGetDevice is not allowed then on
  // every driver, and a refused call invalidates the capture), nor when the driver lacks the
  // call (a toolkit newer than the driver).
  void check_stream(cudaStream_t st) const {
    if (st == nullptr || st == cudaStreamLegacy || st == cudaStreamPerThread) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(st, &capture) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (capture != cudaStreamCaptureStatusNone) return;
    int dev = -1;
    bool known = false;
    if (detail_gpu::stream_device(st, dev, known) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (known && dev != device_) {
      throw invalid_argument("kvtier: stream_order.stream is on device " + std::to_string(dev) +
                             ", the tier on device " + std::to_string(device_));
    }
  }

  void check_device_pointer(void* p, std::size_t i) const {
    cudaPointerAttributes a{};
    check(cudaPointerGetAttributes(&a, p), "cudaPointerGetAttributes (engine_kv tensor)");
    if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
      throw invalid_argument("kvtier: engine_kv tensor " + std::to_string(i) +
                             " is not device memory; the GPU tiers copy from and to the "
                             "engine's GPU tensors");
    }
    if (a.device != device_) {
      throw invalid_argument("kvtier: engine_kv tensor " + std::to_string(i) + " is on device " +
                             std::to_string(a.device) + ", the tier on device " +
                             std::to_string(device_));
    }
  }

  int device_;
  layout::chunk_format format_;
  std::size_t block_size_;
  std::size_t blocks_per_chunk_;
  std::size_t max_chunks_;
  std::size_t slot_alignment_;
  std::size_t max_tensors_;
  std::vector<op_state> ops_;
  transfer::inflight_stores stores_;
  struct validated_table {
    std::vector<void*> tensors;  ///< max_tensors_ entries, `count` used
    std::size_t count = 0;
  };
  mutable std::mutex validated_mu_;
  mutable std::array<validated_table, remembered_tables> validated_{};  ///< the last that passed
  mutable std::size_t next_validated_ = 0;
  typename Engine::state engine_;
  std::byte* slots_;
  std::size_t slot_bytes_;
  cudaStream_t store_stream_ = nullptr;
  cudaStream_t retrieve_stream_ = nullptr;
  std::size_t staging_bytes_ = 0;
  std::byte* host_stage_ = nullptr;
  std::byte* dev_stage_ = nullptr;
};

}  // namespace kvtier::gpu
