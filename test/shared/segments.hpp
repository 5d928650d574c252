#pragma once
// The shared segment tests' own segments: a name per test, removed when the test ends however it
// ends, and a way to damage every chunk payload of one from outside kvtier.

#include <kvtier/kvtier.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <string>

namespace shared_test {

/// A segment name of this process's own, unique per call.
inline std::string segment_name(const char* what) {
  static int n = 0;
  return "/kvtier-test-" + std::string(what) + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(n++);
}

/// Removes the segment when the test ends, however it ends.
struct segment_guard {
  std::string name;
  ~segment_guard() { kvtier::tier::shared_host::handle::unlink(name); }
};

/// Flips byte 100 of every slot's payload of segment `name` (slots of `slot` bytes) through a
/// mapping of the caller's own: the index and checksums stay, the bytes are no longer theirs.
inline void corrupt_every_slot(const std::string& name, std::size_t slot) {
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  REQUIRE(fd >= 0);
  auto* h = static_cast<kvtier::detail_shared::header*>(
      ::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, fd, 0));
  const std::size_t total = h->total_bytes, off = h->off_data, slots = h->slots;
  ::munmap(h, 4096);
  auto* base =
      static_cast<std::byte*>(::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  for (std::size_t i = 0; i < slots; ++i) base[off + i * slot + 100] ^= std::byte{1};
  ::munmap(base, total);
  ::close(fd);
}

}  // namespace shared_test
