#pragma once
// The GPU copy engines: what moves a batch (transfer::batch_plan) between engine blocks and
// chunk slots. Each is a policy with a `state` built once per tier and an `enqueue` that puts
// one whole batch (many chunks x the batch's layers) on a stream, allocating nothing.
//
//   copy_engine::sm_kernel    one kernel launch; 16-byte vector loads and stores (8, 4, 2 or 1
//                             only when an address or stride is not 16-byte aligned)
//   copy_engine::memcpy_batch cudaMemcpyBatchAsync: the copy engines (DMA), one descriptor per
//                             contiguous run, adjacent runs merged
//   copy_engine::cub_batched  cub::DeviceMemcpy::Batched over the same runs, its descriptors
//                             computed on the device from the plan (no host array)

#include "kvtier/cuda/runtime_api.hpp"
#include "kvtier/error.hpp"
#include "kvtier/transfer/batch_plan.hpp"
#include "kvtier/transfer/copy_runs.hpp"

#include <cuda_runtime.h>

#include <cub/device/device_memcpy.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace kvtier::gpu {

/// Throws kvtier::tier_error naming the CUDA call and the error when `e` is not cudaSuccess
/// (and clears a non-sticky error, so the next call does not report it again).
inline void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw tier_error("kvtier: " + what + " failed: " + cudaGetErrorName(e) + " (" +
                     cudaGetErrorString(e) + ")");
  }
}

/// Makes `device` current for a scope and restores the previous one, so the engine thread's
/// later work still goes to its own device.
class device_guard {
 public:
  explicit device_guard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  /// For code that cannot throw (destructors, cleanup): errors are ignored and cleared.
  device_guard(int device, std::nothrow_t) noexcept {
    if (cudaGetDevice(&prev_) != cudaSuccess ||
        (prev_ != device && cudaSetDevice(device) != cudaSuccess)) {
      (void)cudaGetLastError();
    }
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
  ~device_guard() {
    int now = prev_;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
};

/// What a copy engine is told at construction: the largest batch it will be given and how many
/// operations (slots, each used by one call at a time) can be in flight.
struct engine_setup {
  std::size_t max_chunks = 0;          ///< chunks per batch
  std::size_t segments_per_chunk = 0;  ///< layers x planes x blocks per chunk (all layers)
  std::uint32_t block_size = 1;        ///< the engine's tokens per block
  std::uint32_t heads = 1;             ///< KV heads (per-row copies: block_size x heads)
  std::size_t max_ops = 1;             ///< operation slots
  int device = 0;                      ///< the CUDA device
  std::uint32_t sms = 1;               ///< its multiprocessors

  /// Segments in one window of at most `window` chunks (the batched engines' unit of work).
  [[nodiscard]] std::size_t window_segments(std::size_t window) const noexcept {
    return std::min(max_chunks, window) * segments_per_chunk;
  }
};

namespace detail_gpu {

// Thread block i moves part (i % parts) of segment (i / parts); `parts` > 1 spreads a batch of
// few segments (one layer of one chunk) over more multiprocessors.
template <class V, transfer::way W, bool Dense>
__global__ void __launch_bounds__(256) batch_kernel(transfer::batch_plan p, std::uint32_t parts) {
  const std::uint64_t n = p.segments() * parts;
  for (std::uint64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const transfer::segment s = p.at(i / parts);
    const auto part = static_cast<std::uint32_t>(i % parts);
    transfer::move_segment<V, W, Dense>(p, s, part * blockDim.x + threadIdx.x, parts * blockDim.x);
  }
}

/// The vector type of each access width transfer::for_vector_width picks.
template <std::uint32_t Bytes>
using vector_t = std::conditional_t<
    Bytes == 16, uint4,
    std::conditional_t<
        Bytes == 8, uint2,
        std::conditional_t<Bytes == 4, unsigned,
                           std::conditional_t<Bytes == 2, unsigned short, unsigned char>>>>;

// Returns the launch's own result (cudaLaunchKernelEx), not an error an earlier call of the
// engine's thread left pending, which cudaGetLastError would report and clear.
template <class V, transfer::way W>
cudaError_t launch(const transfer::batch_plan& p, std::uint32_t sms, cudaStream_t s) {
  const std::uint64_t n = p.segments();
  if (n == 0) return cudaSuccess;
  const std::uint32_t parts = transfer::parts_for(p, sizeof(V), sms);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(std::min<std::uint64_t>(n * parts, 1u << 16)));
  cfg.blockDim = dim3(256);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = s;
  if (p.engine_dense()) return cudaLaunchKernelEx(&cfg, batch_kernel<V, W, true>, p, parts);
  return cudaLaunchKernelEx(&cfg, batch_kernel<V, W, false>, p, parts);
}

template <transfer::way W>
cudaError_t launch_width(const transfer::batch_plan& p, std::uint32_t vb, std::uint32_t sms,
                         cudaStream_t s) {
  cudaError_t e = cudaSuccess;
  transfer::for_vector_width(
      vb, [&](auto width) { e = launch<vector_t<decltype(width)::value>, W>(p, sms, s); });
  return e;
}

/// Copy k of a batch, computed from the plan: part 0 the source pointer, 1 the destination,
/// 2 the bytes (0 past a partial chunk's tail).
template <int Part>
struct copy_part {
  transfer::batch_plan p;
  transfer::way w;
  std::uint32_t per_segment;
  __host__ __device__ auto operator()(std::uint64_t k) const {
    const transfer::segment s = p.at(k / per_segment);
    std::byte *e = nullptr, *c = nullptr;
    const std::size_t bytes = p.copy_at(s, static_cast<std::uint32_t>(k % per_segment), e, c);
    if constexpr (Part == 2) {
      return bytes;
    } else {
      return (Part == 0) == (w == transfer::way::to_chunk) ? e : c;
    }
  }
};

/// Runs `fn(sub_plan)` for windows of at most `window` chunks of `p`.
template <class Fn>
void for_windows(const transfer::batch_plan& p, std::size_t window, Fn&& fn) {
  for (std::uint32_t c = 0; c < p.chunk_count; c += static_cast<std::uint32_t>(window)) {
    transfer::batch_plan w = p;
    w.chunks = p.chunks + c;
    w.chunk_count = static_cast<std::uint32_t>(std::min<std::size_t>(window, p.chunk_count - c));
    fn(w);
  }
}

template <class>
inline constexpr bool dependent_false = false;

}  // namespace detail_gpu

namespace copy_engine {

/// One kernel launch per batch: a thread block per segment (grid-stride), threads over 16-byte
/// vectors in chunk order (8, 4, 2 or 1 bytes when an address or stride is only that aligned),
/// so the chunk side is fully coalesced and the engine side is too for NHD (whole blocks) and in
/// whole rows for HND. Reads and writes pinned host memory directly when the chunk slots are
/// pinned (zero-copy over PCIe/NVLink-C2C).
struct sm_kernel {
  static constexpr const char* name = "sm_kernel";
  class state {
   public:
    explicit state(const engine_setup& s) : sms_(s.sms) {}
    void enqueue(const transfer::batch_plan& dev, const transfer::batch_plan& /*host*/,
                 transfer::way w, std::uint32_t vb, cudaStream_t s, std::uint32_t /*op*/) {
      const cudaError_t e =
          w == transfer::way::to_chunk
              ? detail_gpu::launch_width<transfer::way::to_chunk>(dev, vb, sms_, s)
              : detail_gpu::launch_width<transfer::way::to_engine>(dev, vb, sms_, s);
      check(e, "sm_kernel launch");
    }

   private:
    std::uint32_t sms_;
  };
};

#if KVTIER_HAS_MEMCPY_BATCH
/// cudaMemcpyBatchAsync (CUDA 12.8+): the DMA copy engines move the batch, no SM time taken from
/// the engine's kernels. One descriptor per contiguous run (a whole block for NHD layouts, a
/// token or a row otherwise), runs adjacent on both sides merged. The descriptor arrays are
/// built on the host under a lock into arrays reserved at construction for one token run per
/// (segment, token) of 16 chunks; a batch with more runs (per-row HND copies, more chunks) is
/// enqueued in several calls as the arrays fill. Each call reads them before it returns. Not
/// usable on the legacy default stream.
struct memcpy_batch {
  static constexpr const char* name = "memcpy_batch";
  static constexpr std::size_t window = 16;
  class state {
   public:
    explicit state(const engine_setup& s)
        : cap_(std::max<std::size_t>(s.window_segments(window) * s.block_size, 1)),
          device_(s.device) {
      dst_.resize(cap_);
      src_.resize(cap_);
      size_.resize(cap_);
    }
    void enqueue(const transfer::batch_plan& /*dev*/, const transfer::batch_plan& host,
                 transfer::way w, std::uint32_t /*vb*/, cudaStream_t s, std::uint32_t /*op*/) {
      std::lock_guard lk(mu_);
      transfer::gather_copies(host, w, cap_, dst_.data(), src_.data(), size_.data(),
                              [&](std::size_t n) {
                                check(detail_gpu::memcpy_batch_async(dst_.data(), src_.data(),
                                                                     size_.data(), n, device_, s),
                                      "cudaMemcpyBatchAsync");
                              });
    }
    /// Descriptors reserved (each a destination, a source and a size).
    [[nodiscard]] std::size_t capacity() const noexcept { return cap_; }

   private:
    std::size_t cap_;
    int device_;
    std::mutex mu_;
    std::vector<void*> dst_;
    std::vector<void*> src_;
    std::vector<std::size_t> size_;
  };
};
#else
/// Before CUDA 12.8 there is no cudaMemcpyBatchAsync: the name exists so that the rest of the GPU
/// path compiles, and a tier that uses it fails to compile with this message.
struct memcpy_batch {
  static constexpr const char* name = "memcpy_batch";
  class state {
   public:
    template <class Setup>
    explicit state(const Setup&) {
      static_assert(detail_gpu::dependent_false<Setup>,
                    "kvtier: copy_engine::memcpy_batch needs cudaMemcpyBatchAsync, CUDA 12.8 or "
                    "newer (CUDART_VERSION is older); use copy_engine::sm_kernel or cub_batched");
    }
    template <class... A>
    void enqueue(A&&...) {}
  };
};
#endif

/// cub::DeviceMemcpy::Batched: device-side batched copies of the same runs as memcpy_batch (not
/// merged), their source, destination and size computed on the device from the plan through
/// transform iterators. Each call takes as many chunks as fit the copies reserved for: one per
/// token of 16 chunks, or one chunk's per-row copies if more (so HND takes fewer chunks per
/// call). Each operation slot has its own temporary storage, reserved at construction: an
/// operation's calls and layers run in order on its one stream, and the cache reuses a slot only
/// after its previous operation completed, so no call waits on the host.
struct cub_batched {
  static constexpr const char* name = "cub_batched";
  static constexpr std::size_t window = 16;
  class state {
   public:
    explicit state(const engine_setup& s)
        : cap_(std::max(s.window_segments(window) * s.block_size,
                        s.segments_per_chunk * s.block_size * s.heads)),
          ops_(std::max<std::size_t>(s.max_ops, 1)),
          device_(s.device) {
      device_guard g(device_);  // built before the tier's own guard: allocate on its device
      using detail_gpu::copy_part;
      const thrust::counting_iterator<std::uint64_t> k(0);
      const transfer::batch_plan none{};
      std::size_t bytes = 0;
      check(cub::DeviceMemcpy::Batched(
                nullptr, bytes,
                thrust::make_transform_iterator(k, copy_part<0>{none, transfer::way::to_chunk, 1}),
                thrust::make_transform_iterator(k, copy_part<1>{none, transfer::way::to_chunk, 1}),
                thrust::make_transform_iterator(k, copy_part<2>{none, transfer::way::to_chunk, 1}),
                static_cast<std::int64_t>(cap_), nullptr),
            "cub::DeviceMemcpy::Batched (temporary storage size)");
      bytes_ = std::max<std::size_t>(bytes, 1);
      void* p = nullptr;
      check(cudaMalloc(&p, bytes_ * ops_), "cudaMalloc (cub temporary storage)");
      temp_ = static_cast<std::byte*>(p);
    }
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      device_guard g(device_, std::nothrow);
      if (temp_) cudaFree(temp_);  // the tier waited for its operations first
    }
    /// Temporary storage of one operation slot.
    [[nodiscard]] std::size_t temp_bytes() const noexcept { return bytes_; }
    void enqueue(const transfer::batch_plan& dev, const transfer::batch_plan& /*host*/,
                 transfer::way w, std::uint32_t /*vb*/, cudaStream_t s, std::uint32_t op) {
      using detail_gpu::copy_part;
      const std::uint32_t per = dev.copies_per_segment();
      std::byte* temp = temp_ + std::size_t{op % ops_} * bytes_;
      // As many chunks per call as fit the copies reserved for (at least one).
      const std::uint64_t per_chunk =
          std::uint64_t{dev.layer_end - dev.layer_begin} * dev.planes * dev.blocks_per_chunk * per;
      const std::size_t chunks =
          std::max<std::size_t>(cap_ / std::max<std::uint64_t>(per_chunk, 1), 1);
      detail_gpu::for_windows(dev, chunks, [&](const transfer::batch_plan& p) {
        const std::uint64_t n = p.segments() * per;
        if (n == 0) return;
        const thrust::counting_iterator<std::uint64_t> k(0);
        std::size_t bytes = bytes_;
        check(cub::DeviceMemcpy::Batched(
                  temp, bytes, thrust::make_transform_iterator(k, copy_part<0>{p, w, per}),
                  thrust::make_transform_iterator(k, copy_part<1>{p, w, per}),
                  thrust::make_transform_iterator(k, copy_part<2>{p, w, per}),
                  static_cast<std::int64_t>(n), s),
              "cub::DeviceMemcpy::Batched");
      });
    }

   private:
    std::size_t cap_;
    std::size_t ops_;
    int device_;
    std::size_t bytes_ = 0;
    std::byte* temp_ = nullptr;
  };
};

}  // namespace copy_engine

/// A GPU copy engine policy: a name and a state that enqueues batches.
template <class E>
concept copy_engine_policy = requires(typename E::state& st, const transfer::batch_plan& p,
                                      cudaStream_t s) {
  { E::name } -> std::convertible_to<const char*>;
  st.enqueue(p, p, transfer::way::to_chunk, 16u, s, 0u);
};

}  // namespace kvtier::gpu
