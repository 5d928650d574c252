#pragma once
// The GPU copy engines: what moves a batch (transfer::batch_plan) between engine blocks and
// chunk slots. Each is a policy with a `state` built once per tier and an `enqueue` that puts
// one whole batch (many chunks x the batch's layers) on a stream, allocating nothing.
//
//   copy_engine::sm_kernel    one kernel launch; 16-byte vector loads and stores (narrower only
//                             when an address or stride is not 16-byte aligned)
//   copy_engine::memcpy_batch cudaMemcpyBatchAsync: the copy engines (DMA), one descriptor per
//                             contiguous run, adjacent runs merged
//   copy_engine::cub_batched  cub::DeviceMemcpy::Batched over the same runs, its descriptors
//                             computed on the device from the plan (no host array)

#include "kvtier/error.hpp"
#include "kvtier/transfer/batch_plan.hpp"

#include <cuda_runtime.h>

#include <cub/device/device_memcpy.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
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

/// What a copy engine is told at construction: the largest batch it will be given.
struct engine_setup {
  std::size_t max_chunks = 0;          ///< chunks per batch
  std::size_t segments_per_chunk = 0;  ///< layers x planes x blocks per chunk (all layers)
  std::uint32_t copies_per_segment = 1;
  int device = 0;         ///< the CUDA device
  std::uint32_t sms = 1;  ///< its multiprocessors

  /// Copies in one window of at most `window` chunks (the DMA engines' unit of work).
  [[nodiscard]] std::size_t window_copies(std::size_t window) const noexcept {
    return std::min(max_chunks, window) * segments_per_chunk * copies_per_segment;
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

template <class V, transfer::way W>
void launch(const transfer::batch_plan& p, std::uint32_t sms, cudaStream_t s) {
  const std::uint64_t n = p.segments();
  if (n == 0) return;
  const std::uint32_t parts = transfer::parts_for(p, sizeof(V), sms);
  const unsigned grid = static_cast<unsigned>(std::min<std::uint64_t>(n * parts, 1u << 16));
  if (p.engine_dense()) {
    batch_kernel<V, W, true><<<grid, 256, 0, s>>>(p, parts);
  } else {
    batch_kernel<V, W, false><<<grid, 256, 0, s>>>(p, parts);
  }
}

template <transfer::way W>
void launch_width(const transfer::batch_plan& p, std::uint32_t vb, std::uint32_t sms,
                  cudaStream_t s) {
  if (vb >= 16) {
    launch<uint4, W>(p, sms, s);
  } else if (vb >= 4) {
    launch<unsigned, W>(p, sms, s);
  } else {
    launch<unsigned char, W>(p, sms, s);
  }
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

}  // namespace detail_gpu

namespace copy_engine {

/// One kernel launch per batch: a thread block per segment (grid-stride), threads over 16-byte
/// vectors in chunk order, so the chunk side is fully coalesced and the engine side is too for
/// NHD (whole blocks) and in whole rows for HND. Reads and writes pinned host memory directly
/// when the chunk slots are pinned (zero-copy over PCIe/NVLink-C2C).
struct sm_kernel {
  static constexpr const char* name = "sm_kernel";
  class state {
   public:
    explicit state(const engine_setup& s) : sms_(s.sms) {}
    void enqueue(const transfer::batch_plan& dev, const transfer::batch_plan& /*host*/,
                 transfer::way w, std::uint32_t vb, cudaStream_t s) {
      if (w == transfer::way::to_chunk) {
        detail_gpu::launch_width<transfer::way::to_chunk>(dev, vb, sms_, s);
      } else {
        detail_gpu::launch_width<transfer::way::to_engine>(dev, vb, sms_, s);
      }
      check(cudaGetLastError(), "sm_kernel launch");
    }

   private:
    std::uint32_t sms_;
  };
};

/// cudaMemcpyBatchAsync (CUDA 12.8+): the DMA copy engines move the batch, no SM time taken from
/// the engine's kernels. One descriptor per contiguous run (a whole block for NHD layouts, a
/// token or a row otherwise), runs adjacent on both sides merged. The descriptor arrays are
/// built on the host under a lock, in windows of 16 chunks, into arrays reserved at construction;
/// the call reads them before it returns. Not usable on the legacy default stream.
struct memcpy_batch {
  static constexpr const char* name = "memcpy_batch";
  static constexpr std::size_t window = 16;
  class state {
   public:
    explicit state(const engine_setup& s) : cap_(s.window_copies(window)), device_(s.device) {
      dst_.resize(cap_);
      src_.resize(cap_);
      size_.resize(cap_);
    }
    void enqueue(const transfer::batch_plan& /*dev*/, const transfer::batch_plan& host,
                 transfer::way w, std::uint32_t /*vb*/, cudaStream_t s) {
      std::lock_guard lk(mu_);
      const std::uint32_t per = host.copies_per_segment();
      detail_gpu::for_windows(host, window, [&](const transfer::batch_plan& p) {
        std::size_t n = 0;
        const std::uint64_t segs = p.segments();
        for (std::uint64_t i = 0; i < segs; ++i) {
          const transfer::segment seg = p.at(i);
          for (std::uint32_t k = 0; k < per; ++k) {
            std::byte *e = nullptr, *c = nullptr;
            const std::size_t bytes = p.copy_at(seg, k, e, c);
            if (bytes == 0) continue;
            std::byte* d = w == transfer::way::to_chunk ? c : e;
            const std::byte* from = w == transfer::way::to_chunk ? e : c;
            if (n > 0 && static_cast<std::byte*>(dst_[n - 1]) + size_[n - 1] == d &&
                static_cast<const std::byte*>(src_[n - 1]) + size_[n - 1] == from) {
              size_[n - 1] += bytes;  // continues the previous run on both sides
              continue;
            }
            dst_[n] = d;
            src_[n] = from;
            size_[n] = bytes;
            ++n;
          }
        }
        if (n == 0) return;
        cudaMemcpyAttributes attr{};
        attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        attr.srcLocHint = {cudaMemLocationTypeDevice, device_};  // hints; unused unless managed
        attr.dstLocHint = {cudaMemLocationTypeDevice, device_};
        attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        std::size_t first = 0;
        check(cudaMemcpyBatchAsync(dst_.data(), src_.data(), size_.data(), n, &attr, &first, 1, s),
              "cudaMemcpyBatchAsync");
      });
    }

   private:
    std::size_t cap_;
    int device_;
    std::mutex mu_;
    std::vector<void*> dst_;
    std::vector<const void*> src_;
    std::vector<std::size_t> size_;
  };
};

/// cub::DeviceMemcpy::Batched: one device-side batched copy of the same runs as memcpy_batch
/// (not merged), its source, destination and size computed on the device from the plan through
/// transform iterators. Temporary storage comes from a ring of 4 buffers reserved at
/// construction, each reused only after the event of its last use has completed.
struct cub_batched {
  static constexpr const char* name = "cub_batched";
  static constexpr std::size_t window = 16;
  class state {
   public:
    explicit state(const engine_setup& s) : cap_(s.window_copies(window)) {
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
      for (auto& b : ring_) {
        check(cudaMalloc(&b.temp, bytes_), "cudaMalloc (cub temporary storage)");
        check(cudaEventCreateWithFlags(&b.used, cudaEventDisableTiming), "cudaEventCreate");
      }
    }
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      for (auto& b : ring_) {
        if (b.used) cudaEventSynchronize(b.used), cudaEventDestroy(b.used);
        if (b.temp) cudaFree(b.temp);
      }
    }
    void enqueue(const transfer::batch_plan& dev, const transfer::batch_plan& /*host*/,
                 transfer::way w, std::uint32_t /*vb*/, cudaStream_t s) {
      using detail_gpu::copy_part;
      const std::uint32_t per = dev.copies_per_segment();
      detail_gpu::for_windows(dev, window, [&](const transfer::batch_plan& p) {
        const std::uint64_t n = p.segments() * per;
        if (n == 0) return;
        std::lock_guard lk(mu_);
        buffer& b = ring_[next_++ % ring_.size()];
        check(cudaEventSynchronize(b.used), "cudaEventSynchronize (cub temporary storage)");
        const thrust::counting_iterator<std::uint64_t> k(0);
        std::size_t bytes = bytes_;
        check(cub::DeviceMemcpy::Batched(
                  b.temp, bytes, thrust::make_transform_iterator(k, copy_part<0>{p, w, per}),
                  thrust::make_transform_iterator(k, copy_part<1>{p, w, per}),
                  thrust::make_transform_iterator(k, copy_part<2>{p, w, per}),
                  static_cast<std::int64_t>(n), s),
              "cub::DeviceMemcpy::Batched");
        check(cudaEventRecord(b.used, s), "cudaEventRecord");
      });
    }

   private:
    struct buffer {
      void* temp = nullptr;
      cudaEvent_t used = nullptr;
    };
    std::size_t cap_;
    std::size_t bytes_ = 0;
    std::mutex mu_;
    std::array<buffer, 4> ring_{};
    std::size_t next_ = 0;
  };
};

}  // namespace copy_engine

/// A GPU copy engine policy: a name and a state that enqueues batches.
template <class E>
concept copy_engine_policy = requires(typename E::state& st, const transfer::batch_plan& p,
                                      cudaStream_t s) {
  { E::name } -> std::convertible_to<const char*>;
  st.enqueue(p, p, transfer::way::to_chunk, 16u, s);
};

}  // namespace kvtier::gpu
