#pragma once
// One aligned host memory region, reserved by kvtier or handed in by the engine.

#include "kvtier/error.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory_resource>
#include <string>
#include <utility>

namespace kvtier::memory {

/// Owns `bytes` of host memory aligned to `alignment` (a power of two, at least 64). With an
/// upstream std::pmr::memory_resource the engine supplies the memory (its own pool, a
/// huge-page arena); without one kvtier reserves it with aligned new. With `prefault`, every page
/// is touched now, so the first store into it does not page-fault. With `lock`, the pages are
/// mlock()ed (which faults them in); failure throws tier_error naming the size and the system's
/// reason (usually RLIMIT_MEMLOCK).
class region {
 public:
  region() = default;
  region(std::size_t bytes, std::size_t alignment, bool lock,
         std::pmr::memory_resource* upstream = nullptr, bool prefault = false)
      : bytes_(bytes), alignment_(alignment), upstream_(upstream) {
    if (bytes == 0) throw invalid_argument("kvtier: memory region of 0 bytes");
    try {
      data_ = upstream ? upstream->allocate(bytes, alignment)
                       : ::operator new (bytes, std::align_val_t{alignment});
    } catch (const std::bad_alloc&) {
      throw tier_error("kvtier: cannot allocate a host region of " + std::to_string(bytes) +
                       " bytes");
    }
    if (prefault && !lock) std::memset(data_, 0, bytes);  // mlock faults the pages itself
    if (lock) {
      if (::mlock(data_, bytes) != 0) {
        const int err = errno;
        release();
        throw tier_error("kvtier: mlock of " + std::to_string(bytes) + " bytes failed: " +
                         std::strerror(err) + " (raise RLIMIT_MEMLOCK or set lock_memory = false)");
      }
      locked_ = true;
    }
  }
  region(region&& o) noexcept { swap(o); }
  region& operator=(region&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  region(const region&) = delete;
  region& operator=(const region&) = delete;
  ~region() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(data_); }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }
  [[nodiscard]] bool locked() const noexcept { return locked_; }

 private:
  void swap(region& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(alignment_, o.alignment_);
    std::swap(upstream_, o.upstream_);
    std::swap(locked_, o.locked_);
  }
  void release() noexcept {
    if (!data_) return;
    if (locked_) ::munlock(data_, bytes_);
    if (upstream_) {
      upstream_->deallocate(data_, bytes_, alignment_);
    } else {
      ::operator delete (data_, std::align_val_t{alignment_});
    }
    data_ = nullptr;
    locked_ = false;
  }

  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t alignment_ = 64;
  std::pmr::memory_resource* upstream_ = nullptr;
  bool locked_ = false;
};

}  // namespace kvtier::memory
