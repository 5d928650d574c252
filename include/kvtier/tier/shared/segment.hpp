#pragma once
// A named POSIX shared-memory segment holding a shared host tier: created by the first process
// that asks for it, attached by the others, refused when it was made for another salt, chunk
// format or kvtier version. Mapping and identity only; shared/index.hpp runs the structures.

#include "kvtier/error.hpp"
#include "kvtier/tier/shared/layout.hpp"
#include "kvtier/tier/shared/owner.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <thread>

namespace kvtier::detail_shared {

/// What a segment must have been made for: the cache's salt key and chunk format.
struct identity {
  chunk_key salt;
  std::uint64_t format = 0;
  std::uint64_t chunk_bytes = 0;
};

/// Refuses a segment name shm_open would not take as one object: "/name", no other '/', no NUL.
inline void check_name(const std::string& n) {
  const bool bad = n.size() < 2 || n.size() > 250 || n[0] != '/' ||
                   n.find('/', 1) != std::string::npos || n.find('\0') != std::string::npos;
  if (bad) {
    std::string shown;
    for (char c : n) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
    throw invalid_argument("kvtier: shared_host name '" + shown +
                           "' must be '/' then 1..249 characters, without '/' or NUL");
  }
}

class segment {
 public:
  /// Attaches to segment `name`, or (with `create`) creates it with geometry `g` when absent.
  /// Waits up to `timeout` for a creator still initialising; a segment whose creator died before
  /// finishing is removed and made again.
  segment(const std::string& name, const identity& id, const geometry& g, bool create,
          std::chrono::milliseconds timeout)
      : name_(name) {
    check_name(name);
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (create) {
        fd_ = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd_ >= 0) {
          make(id, g);
          created_ = true;
          return;
        }
        if (errno != EEXIST) fail("create");
      }
      fd_ = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
      if (fd_ < 0) {
        if (errno == ENOENT && create) continue;  // removed since: make it
        fail("open");
      }
      if (attach(id, timeout)) return;
      // Its creator died while making it: remove it and try again.
      close_all();
      ::shm_unlink(name.c_str());
    }
    throw tier_error("kvtier: shared_host segment '" + name_ +
                     "' could not be created or attached (raced three times)");
  }
  ~segment() { close_all(); }
  segment(const segment&) = delete;
  segment& operator=(const segment&) = delete;

  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] bool created() const noexcept { return created_; }
  [[nodiscard]] header& hdr() const noexcept { return *reinterpret_cast<header*>(base_); }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

  [[nodiscard]] proc_rec& proc(std::uint32_t i) const noexcept {
    return reinterpret_cast<proc_rec*>(base_ + hdr().off_procs)[i];
  }
  [[nodiscard]] lease_head& lease(std::uint32_t i) const noexcept {
    return *reinterpret_cast<lease_head*>(base_ + hdr().off_leases +
                                          std::size_t{i} * hdr().lease_stride);
  }
  [[nodiscard]] std::uint32_t* lease_slots(std::uint32_t i) const noexcept {
    return reinterpret_cast<std::uint32_t*>(&lease(i) + 1);
  }
  [[nodiscard]] entry& at(std::uint32_t slot) const noexcept {
    return reinterpret_cast<entry*>(base_ + hdr().off_entries)[slot];
  }
  [[nodiscard]] std::uint32_t* buckets() const noexcept {
    return reinterpret_cast<std::uint32_t*>(base_ + hdr().off_buckets);
  }
  [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
    return base_ + hdr().off_data + std::size_t{slot} * hdr().slot_bytes;
  }

  /// Removes segment `name` from the namespace (mapped segments live on until unmapped).
  /// Returns false when there was none.
  static bool unlink(const std::string& name) {
    check_name(name);
    return ::shm_unlink(name.c_str()) == 0;
  }

 private:
  [[noreturn]] void fail(const char* what) {
    const int e = errno;
    close_all();
    throw tier_error("kvtier: shared_host cannot " + std::string(what) + " segment '" + name_ +
                     "': " + std::strerror(e));
  }

  void close_all() noexcept {
    if (base_ != nullptr) ::munmap(base_, bytes_);
    base_ = nullptr;
    bytes_ = 0;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // The whole segment's page tables are filled at attach (MAP_POPULATE): otherwise the first
  // loads of each process would pay a page fault per 4 KiB.
  void map(std::size_t n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0);
    if (p == MAP_FAILED) fail("map");
    base_ = static_cast<std::byte*>(p);
    bytes_ = n;
  }

  void make(const identity& id, const geometry& g) {
    if (::ftruncate(fd_, static_cast<off_t>(g.total_bytes)) != 0) {
      const int e = errno;
      ::shm_unlink(name_.c_str());
      errno = e;
      fail("size");
    }
    // Reserve every page now (tmpfs would otherwise SIGBUS on a later write when /dev/shm is
    // full); this also faults the pages in.
    if (const int e = ::posix_fallocate(fd_, 0, static_cast<off_t>(g.total_bytes)); e != 0) {
      close_all();
      ::shm_unlink(name_.c_str());
      throw tier_error("kvtier: shared_host segment '" + name_ + "' needs " +
                       std::to_string(g.total_bytes) +
                       " bytes of shared memory (/dev/shm): " + std::strerror(e));
    }
    map(g.total_bytes);
    header* h = new (base_) header();
    h->magic = segment_magic;
    h->version = segment_version;
    h->header_bytes = sizeof(header);
    h->format = id.format;
    h->salt = id.salt;
    h->chunk_bytes = g.chunk_bytes;
    h->slot_bytes = g.slot_bytes;
    h->slots = g.slots;
    h->buckets = g.buckets;
    h->procs = g.procs;
    h->leases = g.leases;
    h->lease_chunks = g.lease_chunks;
    h->lease_stride = g.lease_stride;
    h->off_procs = g.off_procs;
    h->off_leases = g.off_leases;
    h->off_entries = g.off_entries;
    h->off_buckets = g.off_buckets;
    h->off_data = g.off_data;
    h->total_bytes = g.total_bytes;
    h->creator = self_id();
    h->pid_ns = pid_namespace();
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    const int rc = pthread_mutex_init(&h->mu, &a);
    pthread_mutexattr_destroy(&a);
    if (rc != 0) {
      close_all();
      ::shm_unlink(name_.c_str());
      throw tier_error("kvtier: shared_host segment '" + name_ +
                       "': robust process-shared mutex refused: " + std::strerror(rc));
    }
    for (std::uint32_t i = 0; i < g.procs; ++i) new (&proc(i)) proc_rec();
    for (std::uint32_t i = 0; i < g.leases; ++i) {
      lease_head& l = *new (&lease(i)) lease_head();
      l.next_free = i + 1 < g.leases ? i + 1 : nil;
    }
    h->free_leases = 0;
    for (std::uint32_t i = 0; i < g.slots; ++i) {
      entry& e = *new (&at(i)) entry();
      e.after = i + 1 < g.slots ? i + 1 : nil;
    }
    h->free_head = 0;
    std::uint32_t* b = buckets();
    for (std::uint32_t i = 0; i < g.buckets; ++i) b[i] = nil;
    h->ready.store(1, std::memory_order_release);
  }

  // Maps an existing segment once its creator has finished; false when the creator died first.
  bool attach(const identity& id, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      struct stat st {};
      if (::fstat(fd_, &st) != 0) fail("stat");
      const auto size = static_cast<std::size_t>(st.st_size);
      if (size >= sizeof(header)) {
        if (base_ == nullptr) map(size);
        if (hdr().ready.load(std::memory_order_acquire) == 1) break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        // Not ready: stale when its creator is gone; otherwise still being made (a huge one).
        if (base_ != nullptr && hdr().creator.pid != 0 && alive(hdr().creator)) {
          close_all();
          throw tier_error("kvtier: shared_host segment '" + name_ +
                           "' is still being created by pid " + std::to_string(hdr().creator.pid) +
                           " after " + std::to_string(timeout.count()) + " ms");
        }
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const header& h = hdr();
    auto refuse = [&](const std::string& why) {
      close_all();
      throw tier_error("kvtier: shared_host segment '" + name_ + "' " + why);
    };
    if (h.magic != segment_magic) refuse("is not a kvtier shared host segment");
    if (h.version != segment_version || h.header_bytes != sizeof(header)) {
      refuse("was made by an incompatible kvtier (segment version " + std::to_string(h.version) +
             ", header " + std::to_string(h.header_bytes) + " bytes; this build: version " +
             std::to_string(segment_version) + ", " + std::to_string(sizeof(header)) + " bytes)");
    }
    if (const std::uint64_t ns = pid_namespace(); h.pid_ns != 0 && ns != 0 && h.pid_ns != ns) {
      refuse("was made in another PID namespace (" + std::to_string(h.pid_ns) + ", this " +
             "process's is " + std::to_string(ns) + "): the processes of a segment must see " +
             "each other's pids, or a live owner would look dead");
    }
    if (h.format != id.format || h.chunk_bytes != id.chunk_bytes) {
      refuse("was made for chunk format " + std::to_string(h.format) + " (" +
             std::to_string(h.chunk_bytes) + "-byte chunks), this cache's is " +
             std::to_string(id.format) + " (" + std::to_string(id.chunk_bytes) + ")");
    }
    if (h.salt != id.salt) {
      refuse("was made for salt " + h.salt.hex() + ", this cache's is " + id.salt.hex());
    }
    // Every offset and size must be the ones this build computes for the header's counts, so a
    // damaged header cannot point outside the mapping.
    geometry g;
    try {
      g = make_geometry(std::uint64_t{h.slots} * h.slot_bytes, h.chunk_bytes, h.procs, h.leases,
                        h.lease_chunks);
    } catch (const error& e) {
      refuse(std::string("has a damaged header: ") + e.what());
    }
    if (g.slots != h.slots || g.slot_bytes != h.slot_bytes || g.buckets != h.buckets ||
        g.lease_stride != h.lease_stride || g.off_procs != h.off_procs ||
        g.off_leases != h.off_leases || g.off_entries != h.off_entries ||
        g.off_buckets != h.off_buckets || g.off_data != h.off_data ||
        g.total_bytes != h.total_bytes) {
      refuse("has a damaged header (its offsets do not follow from its sizes)");
    }
    if (h.total_bytes != bytes_) {
      refuse("is " + std::to_string(bytes_) + " bytes, its header says " +
             std::to_string(h.total_bytes));
    }
    return true;
  }

  std::string name_;
  int fd_ = -1;
  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
  bool created_ = false;
};

}  // namespace kvtier::detail_shared
