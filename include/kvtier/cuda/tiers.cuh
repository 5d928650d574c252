#pragma once
// The GPU tiers: tier::device (chunk slots in GPU memory) and tier::pinned_host (chunk slots in
// page-locked host memory). Either is the first tier of a cache whose engine KV is on the GPU;
// its copies run asynchronously on CUDA streams with a copy engine policy.

#include "kvtier/cuda/copy_engine.cuh"
#include "kvtier/cuda/transfers.cuh"
#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/memory/region.hpp"
#include "kvtier/memory/slab.hpp"
#include "kvtier/tier/context.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace kvtier::tier {

/// Device memory tier: one cudaMalloc'd pool of chunk slots on one GPU. Copies between the
/// engine's blocks and the slots run on the GPU (Engine: copy_engine::sm_kernel by default).
/// Chunks stay on the GPU, so lower tiers cannot take them: it is a chain of its own.
template <gpu::copy_engine_policy Engine>
struct basic_device {
  static constexpr const char* name = "device";
  static constexpr bool is_memory = true;
  static constexpr bool host_visible = false;  ///< lower tiers cannot read its slots
  using copy_engine = Engine;

  struct config {
    std::size_t capacity_bytes = std::size_t{1} << 30;  ///< pool size; floor(cap / chunk) slots
    int device = -1;                                    ///< CUDA device (-1: the current one)
  };

  template <class Eviction>
  class impl {
   public:
    static constexpr std::size_t alignment = 4096;
    static constexpr bool async_copies = true;
    using transfers_type = gpu::transfers<Engine>;

    impl(const config& c, const context& ctx)
        : device_(gpu::resolve_device(c.device, "device tier")),
          index_(memory::slab::slots_in(c.capacity_bytes, ctx.format.chunk_bytes(), alignment,
                                        "device")),
          slot_bytes_(memory::slab::round_up(ctx.format.chunk_bytes(), alignment)) {
      gpu::device_guard g(device_);
      void* p = nullptr;
      const std::size_t bytes = index_.capacity() * slot_bytes_;
      const cudaError_t e = cudaMalloc(&p, bytes);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        throw tier_error("kvtier: device tier cannot allocate " + std::to_string(bytes) +
                         " bytes on device " + std::to_string(device_) + ": " +
                         cudaGetErrorString(e));
      }
      pool_ = static_cast<std::byte*>(p);
      try {
        xfer_ = std::make_unique<transfers_type>(device_, ctx, pool_, slot_bytes_, alignment);
      } catch (...) {
        cudaFree(pool_);
        throw;
      }
    }
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;
    ~impl() {
      xfer_.reset();  // waits for its stream
      cudaSetDevice(device_);
      cudaFree(pool_);
    }

    [[nodiscard]] detail::chunk_index<Eviction>& index() noexcept { return index_; }
    /// Slot `slot`'s device address.
    [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
      return pool_ + std::size_t{slot} * slot_bytes_;
    }
    [[nodiscard]] transfers_type& transfers() noexcept { return *xfer_; }
    [[nodiscard]] int device() const noexcept { return device_; }

   private:
    int device_;
    detail::chunk_index<Eviction> index_;
    std::size_t slot_bytes_;
    std::byte* pool_ = nullptr;
    std::unique_ptr<transfers_type> xfer_;
  };
};

/// How the pinned host tier pins its slab.
enum class pinning {
  host_alloc,     ///< cudaHostAlloc (portable, mapped)
  host_register,  ///< aligned host allocation, then cudaHostRegister (portable, mapped)
};

/// Pinned host memory tier: chunk slots in page-locked host memory, so the GPU's copies go
/// straight between the engine's blocks and the slab (no staging buffer), and lower tiers (disk,
/// Redis) read and write the same slots as with tier::host.
template <gpu::copy_engine_policy Engine>
struct basic_pinned_host {
  static constexpr const char* name = "pinned_host";
  static constexpr bool is_memory = true;
  static constexpr bool host_visible = true;
  using copy_engine = Engine;

  struct config {
    std::size_t capacity_bytes = std::size_t{1} << 30;  ///< slab size; floor(cap / chunk) slots
    pinning how = pinning::host_alloc;
    int device = -1;  ///< the CUDA device whose engine KV it copies (-1: the current one)
  };

  template <class Eviction>
  class impl {
   public:
    static constexpr std::size_t alignment = 4096;  // page-aligned: O_DIRECT and DMA
    static constexpr bool async_copies = true;
    using transfers_type = gpu::transfers<Engine>;

    impl(const config& c, const context& ctx)
        : device_(gpu::resolve_device(c.device, "pinned_host tier")),
          index_(memory::slab::slots_in(c.capacity_bytes, ctx.format.chunk_bytes(), alignment,
                                        "pinned_host")),
          slot_bytes_(memory::slab::round_up(ctx.format.chunk_bytes(), alignment)),
          how_(c.how) {
      gpu::device_guard g(device_);
      const std::size_t bytes = index_.capacity() * slot_bytes_;
      if (how_ == pinning::host_alloc) {
        void* p = nullptr;
        const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
        if (e != cudaSuccess) {
          (void)cudaGetLastError();
          throw tier_error("kvtier: pinned_host tier cannot cudaHostAlloc " +
                           std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
        }
        host_ = static_cast<std::byte*>(p);
      } else {
        region_ = memory::region(bytes, alignment, false, nullptr, true);
        const cudaError_t e = cudaHostRegister(region_.data(), bytes,
                                               cudaHostRegisterPortable | cudaHostRegisterMapped);
        if (e != cudaSuccess) {
          (void)cudaGetLastError();
          throw tier_error("kvtier: pinned_host tier cannot cudaHostRegister " +
                           std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
        }
        host_ = region_.data();
      }
      try {
        void* dev = nullptr;
        gpu::check(cudaHostGetDevicePointer(&dev, host_, 0), "cudaHostGetDevicePointer");
        xfer_ = std::make_unique<transfers_type>(device_, ctx, static_cast<std::byte*>(dev),
                                                 slot_bytes_, alignment);
      } catch (...) {
        unpin();
        throw;
      }
    }
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;
    ~impl() {
      xfer_.reset();
      unpin();
    }

    [[nodiscard]] detail::chunk_index<Eviction>& index() noexcept { return index_; }
    /// Slot `slot`'s host address (lower tiers read and write it).
    [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
      return host_ + std::size_t{slot} * slot_bytes_;
    }
    [[nodiscard]] transfers_type& transfers() noexcept { return *xfer_; }
    [[nodiscard]] int device() const noexcept { return device_; }

   private:
    void unpin() noexcept {
      cudaSetDevice(device_);
      if (how_ == pinning::host_alloc) {
        if (host_) cudaFreeHost(host_);
      } else if (host_) {
        cudaHostUnregister(host_);
      }
      host_ = nullptr;
    }

    int device_;
    detail::chunk_index<Eviction> index_;
    std::size_t slot_bytes_;
    pinning how_;
    memory::region region_;
    std::byte* host_ = nullptr;
    std::unique_ptr<transfers_type> xfer_;
  };
};

using device = basic_device<gpu::copy_engine::sm_kernel>;
using pinned_host = basic_pinned_host<gpu::copy_engine::sm_kernel>;

}  // namespace kvtier::tier
