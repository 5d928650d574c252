#pragma once
// The GPU tiers: tier::device (chunk slots in GPU memory) and tier::pinned_host (chunk slots in
// page-locked host memory). Either is the first tier of a cache whose engine KV is on the GPU;
// its copies run asynchronously on CUDA streams with a copy engine policy.

#include "kvtier/cuda/copy_engine.cuh"
#include "kvtier/cuda/transfers.cuh"
#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/memory/region.hpp"
#include "kvtier/memory/slab.hpp"
#include "kvtier/tier/context.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

namespace kvtier::tier {

namespace detail_gpu {

/// What both GPU tiers are: an index of fixed-size chunk slots, their memory (the derived tier
/// allocates it), and the transfers between the engine's blocks and the slots' device addresses.
template <class Eviction, class Engine>
class slot_tier {
 public:
  static constexpr std::size_t alignment = 4096;  // page-aligned: O_DIRECT and DMA
  static constexpr bool async_copies = true;
  using transfers_type = gpu::transfers<Engine>;

  slot_tier(const slot_tier&) = delete;
  slot_tier& operator=(const slot_tier&) = delete;

  [[nodiscard]] kvtier::detail::chunk_index<Eviction>& index() noexcept { return index_; }
  [[nodiscard]] transfers_type& transfers() noexcept { return *xfer_; }
  [[nodiscard]] int device() const noexcept { return device_; }

 protected:
  slot_tier(int device, std::size_t capacity_bytes, const context& ctx, const char* name)
      : device_(gpu::resolve_device(device, name)),
        index_(memory::slab::slots_in(capacity_bytes, ctx.format.chunk_bytes(), alignment, name)),
        slot_bytes_(memory::slab::round_up(ctx.format.chunk_bytes(), alignment)) {}
  ~slot_tier() = default;

  [[nodiscard]] std::size_t bytes() const noexcept { return index_.capacity() * slot_bytes_; }
  // Starts the transfers over slots at `device_slots` (as the device addresses them).
  void start(const context& ctx, std::byte* device_slots) {
    xfer_ = std::make_unique<transfers_type>(device_, ctx, device_slots, slot_bytes_, alignment);
  }
  // Stops them: waits for the transfer stream, frees events and staging.
  void stop() noexcept { xfer_.reset(); }

  int device_;
  kvtier::detail::chunk_index<Eviction> index_;
  std::size_t slot_bytes_;
  std::unique_ptr<transfers_type> xfer_;
};

}  // namespace detail_gpu

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
  class impl : public detail_gpu::slot_tier<Eviction, Engine> {
    using base = detail_gpu::slot_tier<Eviction, Engine>;

   public:
    impl(const config& c, const context& ctx) : base(c.device, c.capacity_bytes, ctx, "device") {
      gpu::device_guard g(this->device_);
      void* p = nullptr;
      gpu::check(cudaMalloc(&p, this->bytes()),
                 "device tier: cudaMalloc of " + std::to_string(this->bytes()) + " bytes");
      pool_ = static_cast<std::byte*>(p);
      try {
        this->start(ctx, pool_);
      } catch (...) {
        cudaFree(pool_);
        throw;
      }
    }
    ~impl() {
      this->stop();
      gpu::device_guard g(this->device_, std::nothrow);
      cudaFree(pool_);
    }

    /// Slot `slot`'s device address.
    [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
      return pool_ + std::size_t{slot} * this->slot_bytes_;
    }

   private:
    std::byte* pool_ = nullptr;
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
  class impl : public detail_gpu::slot_tier<Eviction, Engine> {
    using base = detail_gpu::slot_tier<Eviction, Engine>;

   public:
    impl(const config& c, const context& ctx)
        : base(c.device, c.capacity_bytes, ctx, "pinned_host"), how_(c.how) {
      gpu::device_guard g(this->device_);
      const std::size_t bytes = this->bytes();
      const std::string what =
          "pinned_host tier: pinning " + std::to_string(bytes) + " bytes with ";
      if (how_ == pinning::host_alloc) {
        void* p = nullptr;
        gpu::check(cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped),
                   what + "cudaHostAlloc");
        host_ = static_cast<std::byte*>(p);
      } else {
        region_ = memory::region(bytes, base::alignment, false, nullptr, true);
        gpu::check(cudaHostRegister(region_.data(), bytes,
                                    cudaHostRegisterPortable | cudaHostRegisterMapped),
                   what + "cudaHostRegister");
        host_ = region_.data();
      }
      try {
        void* dev = nullptr;
        gpu::check(cudaHostGetDevicePointer(&dev, host_, 0), "cudaHostGetDevicePointer");
        this->start(ctx, static_cast<std::byte*>(dev));
      } catch (...) {
        unpin();
        throw;
      }
    }
    ~impl() {
      this->stop();
      unpin();
    }

    /// Slot `slot`'s host address (lower tiers read and write it).
    [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
      return host_ + std::size_t{slot} * this->slot_bytes_;
    }

   private:
    void unpin() noexcept {
      gpu::device_guard g(this->device_, std::nothrow);
      if (host_ && how_ == pinning::host_alloc) {
        cudaFreeHost(host_);
      } else if (host_) {
        cudaHostUnregister(host_);
      }
      host_ = nullptr;
    }

    pinning how_;
    memory::region region_;
    std::byte* host_ = nullptr;
  };
};

using device = basic_device<gpu::copy_engine::sm_kernel>;
using pinned_host = basic_pinned_host<gpu::copy_engine::sm_kernel>;

static_assert(memory_tier<device::impl<eviction::lru>>);
static_assert(memory_tier<pinned_host::impl<eviction::lru>>);

}  // namespace kvtier::tier
