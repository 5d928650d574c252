#pragma once
// What a shared host segment holds, at fixed offsets from its start (every link is a 32-bit
// index, never a pointer, so each process may map it at its own address):
//
//   header     magic, version, identity (salt key, format fingerprint, sizes), the robust lock,
//              the list heads and the counters
//   procs      one record per attached process: its owner_id
//   leases     records of chunks held by one owner: the slots it references
//   entries    one per slot: key, tokens, state, references, checksum, links
//   buckets    hash chain heads
//   data       the slots, page aligned
//
// Everything but `ready` is read and written under the header's lock.

#include "kvtier/error.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/tier/shared/owner.hpp"

#include <pthread.h>

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvtier::detail_shared {

inline constexpr std::uint64_t segment_magic = 0x3148534b56544b31ull;  // "1KTVKSH1"
/// Bumped whenever any structure below changes: a segment of another version is refused.
inline constexpr std::uint32_t segment_version = 1;
inline constexpr std::uint32_t nil = UINT32_MAX;
inline constexpr std::size_t page = 4096;

enum class slot_state : std::uint8_t {
  free,     ///< on the free list
  writing,  ///< reserved by `writer`, bytes being copied in; in the hash (dedupes writers)
  ready,    ///< bytes whole: served
  zombie,   ///< removed while referenced; freed when the last reference goes
};

/// One slot's entry. A field's writes are ordered so that a process dying at any point leaves an
/// entry that recovery reads correctly: `state` is set to free or writing before the key changes,
/// and to ready only after every other field and the bytes are in.
struct entry {
  chunk_key key;
  std::uint64_t checksum = 0;  ///< XXH3-64 of the payload, seeded by the key
  std::uint64_t stamp = 0;     ///< last use (the LRU order, rebuilt from it after a crash)
  std::uint32_t tokens = 0;
  std::uint32_t refs = 0;    ///< references held by lease records
  std::uint32_t next = nil;  ///< hash chain
  std::uint32_t prev = nil;  ///< LRU or free list
  std::uint32_t after = nil;
  std::uint32_t writer = nil;  ///< proc record of the writer (writing)
  std::uint32_t writer_gen = 0;
  slot_state state = slot_state::free;
};
static_assert(sizeof(entry) == 64);

/// An attached process. gen changes at each registration, so a record reused by another process
/// is told apart from the one that left.
struct proc_rec {
  owner_id who;
  std::uint32_t gen = 0;
  std::uint32_t unused = 0;
};

/// A lease record: `count` slot references held by proc record `owner` (generation `owner_gen`).
/// `id` changes whenever the record is taken, so a stale ticket names nothing.
struct lease_head {
  std::uint32_t owner = nil;  ///< nil: free
  std::uint32_t owner_gen = 0;
  std::uint32_t id = 0;
  std::uint32_t count = 0;
  std::uint32_t next_free = nil;
  std::uint32_t unused = 0;
  // followed by lease_chunks std::uint32_t slots
};

/// Segment-wide counters (every process's events).
struct seg_counters {
  std::uint64_t writes = 0;      ///< chunks written
  std::uint64_t duplicates = 0;  ///< writes answered by a chunk already held
  std::uint64_t full = 0;        ///< writes refused: every slot referenced or being written
  std::uint64_t hits = 0;        ///< chunks found by probes and reads
  std::uint64_t misses = 0;      ///< chunks not found by probes and reads
  std::uint64_t evictions = 0;
  std::uint64_t removed = 0;           ///< chunks removed by remove / remove_all / corrupt reads
  std::uint64_t corrupt = 0;           ///< reads whose bytes failed the checksum
  std::uint64_t reclaimed_procs = 0;   ///< dead processes whose holdings were reclaimed
  std::uint64_t reclaimed_refs = 0;    ///< references they held, given back
  std::uint64_t reclaimed_writes = 0;  ///< half-written slots they left, freed
  std::uint64_t recoveries = 0;        ///< lock taken from a dead holder: index rebuilt
  std::uint64_t lock_timeouts = 0;     ///< calls that gave up waiting for the lock
};

struct header {
  std::uint64_t magic = 0;
  std::uint32_t version = 0;
  std::uint32_t header_bytes = 0;  ///< sizeof(header) of the creator (also its pthread ABI)
  std::uint64_t format = 0;        ///< chunk_format fingerprint
  chunk_key salt;
  std::uint64_t chunk_bytes = 0;
  std::uint64_t slot_bytes = 0;
  std::uint32_t slots = 0;
  std::uint32_t buckets = 0;  ///< a power of two
  std::uint32_t procs = 0;
  std::uint32_t leases = 0;
  std::uint32_t lease_chunks = 0;
  std::uint32_t lease_stride = 0;  ///< bytes per lease record
  std::uint64_t off_procs = 0, off_leases = 0, off_entries = 0, off_buckets = 0, off_data = 0;
  std::uint64_t total_bytes = 0;
  owner_id creator;
  std::uint64_t pid_ns = 0;             ///< the creator's PID namespace (0: unknown)
  std::atomic<std::uint32_t> ready{0};  ///< 1 once the creator has initialised everything
  std::uint32_t unused = 0;
  pthread_mutex_t mu;  ///< robust, process-shared
  // ---- under mu ----
  std::uint32_t free_head = nil;
  std::uint32_t lru_head = nil;  ///< oldest evictable (ready, unreferenced)
  std::uint32_t lru_tail = nil;  ///< newest
  std::uint32_t free_leases = nil;
  std::uint32_t indexed = 0;  ///< entries writing or ready
  std::uint32_t lease_seq = 0;
  std::uint64_t clock = 0;  ///< stamps
  seg_counters counters;
};

static_assert(std::atomic<std::uint32_t>::is_always_lock_free,
              "the segment's ready flag must be an address-free atomic");

/// The sizes a segment is made with. Computed with checked arithmetic from the user's config.
struct geometry {
  std::uint64_t chunk_bytes = 0, slot_bytes = 0;
  std::uint32_t slots = 0, buckets = 0, procs = 0, leases = 0, lease_chunks = 0, lease_stride = 0;
  std::uint64_t off_procs = 0, off_leases = 0, off_entries = 0, off_buckets = 0, off_data = 0;
  std::uint64_t total_bytes = 0;
};

namespace detail {
inline std::uint64_t add(std::uint64_t a, std::uint64_t b, const char* what) {
  std::uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) {
    throw invalid_argument(std::string("kvtier: shared_host ") + what + " overflows 64 bits");
  }
  return r;
}
inline std::uint64_t mul(std::uint64_t a, std::uint64_t b, const char* what) {
  std::uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) {
    throw invalid_argument(std::string("kvtier: shared_host ") + what + " overflows 64 bits");
  }
  return r;
}
inline std::uint64_t align_up(std::uint64_t v, std::uint64_t a, const char* what) {
  return add(v, a - 1, what) / a * a;
}
inline void in_range(const char* name, std::uint64_t v, std::uint64_t lo, std::uint64_t hi) {
  if (v < lo || v > hi) {
    throw invalid_argument(std::string("kvtier: shared_host ") + name + " " + std::to_string(v) +
                           " is out of range " + std::to_string(lo) + ".." + std::to_string(hi));
  }
}
}  // namespace detail

/// The geometry of a segment of `capacity_bytes` of slots of `chunk_bytes` each, for `procs`
/// processes, `leases` lease records of `lease_chunks` chunks. Throws invalid_argument naming
/// the value when a count is out of range or the capacity holds no slot.
inline geometry make_geometry(std::uint64_t capacity_bytes, std::uint64_t chunk_bytes,
                              std::uint64_t procs, std::uint64_t leases,
                              std::uint64_t lease_chunks) {
  using namespace detail;
  geometry g;
  in_range("chunk bytes", chunk_bytes, 1, std::uint64_t{1} << 40);
  in_range("processes", procs, 1, 4096);
  in_range("leases", leases, 1, 1u << 20);
  in_range("lease_chunks", lease_chunks, 1, 1u << 20);
  g.chunk_bytes = chunk_bytes;
  g.slot_bytes = align_up(chunk_bytes, page, "slot size");
  const std::uint64_t slots = capacity_bytes / g.slot_bytes;
  if (slots == 0) {
    throw invalid_argument("kvtier: shared_host capacity_bytes " + std::to_string(capacity_bytes) +
                           " holds no chunk of " + std::to_string(g.slot_bytes) + " bytes");
  }
  in_range("slots (capacity_bytes / slot bytes)", slots, 1, UINT32_MAX - 1);
  g.slots = static_cast<std::uint32_t>(slots);
  g.buckets = static_cast<std::uint32_t>(std::bit_ceil(slots < 8 ? std::uint64_t{8} : slots));
  g.procs = static_cast<std::uint32_t>(procs);
  g.leases = static_cast<std::uint32_t>(leases);
  g.lease_chunks = static_cast<std::uint32_t>(lease_chunks);
  g.lease_stride = static_cast<std::uint32_t>(
      align_up(sizeof(lease_head) + 4 * lease_chunks, 8, "lease record size"));
  std::uint64_t off = align_up(sizeof(header), 64, "header");
  g.off_procs = off;
  off = align_up(add(off, mul(procs, sizeof(proc_rec), "process table"), "process table"), 64,
                 "process table");
  g.off_leases = off;
  off = align_up(add(off, mul(leases, g.lease_stride, "lease table"), "lease table"), 64,
                 "lease table");
  g.off_entries = off;
  off = add(off, mul(slots, sizeof(entry), "entry table"), "entry table");
  g.off_buckets = off;
  off = align_up(add(off, mul(g.buckets, 4, "hash buckets"), "hash buckets"), page, "data");
  g.off_data = off;
  g.total_bytes = add(off, mul(slots, g.slot_bytes, "slab"), "slab");
  return g;
}

}  // namespace kvtier::detail_shared
