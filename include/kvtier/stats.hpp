#pragma once
// Counters a cache reports.

#include <array>
#include <cstddef>
#include <cstdint>

namespace kvtier {

/// One tier's counters. Chunk counts unless named bytes.
struct tier_stats {
  const char* name = "";
  std::uint64_t hits = 0;    ///< chunks a lookup found in this tier
  std::uint64_t misses = 0;  ///< chunks a lookup asked this tier for and did not find
  std::uint64_t writes = 0;  ///< chunks written into this tier
  std::uint64_t bytes_written = 0;
  std::uint64_t bytes_read = 0;  ///< bytes read out of this tier (retrieve, promotion)
  std::uint64_t evictions = 0;
  std::uint64_t errors = 0;          ///< failed I/O and records that failed verification
  std::uint64_t dropped_writes = 0;  ///< writes into this tier dropped (queue full, no room)
  std::uint64_t write_backs = 0;     ///< writes made because the first tier evicted the chunk
  std::uint64_t promotions = 0;      ///< chunks copied from this tier into the first tier
  std::uint64_t recovered = 0;       ///< chunks found intact in storage at construction
  std::size_t used_chunks = 0;       ///< chunks visible to lookup now
  std::size_t capacity_chunks = 0;
};

/// A cache's own counters (every tier chain has the same), the part of cache_stats that does not
/// depend on the chain's length.
struct cache_counters {
  std::uint64_t lookups = 0;
  std::uint64_t lookup_tokens = 0;      ///< tokens asked for by lookups
  std::uint64_t hit_tokens = 0;         ///< tokens lookups found cached
  std::uint64_t stored_tokens = 0;      ///< tokens store() reported stored
  std::uint64_t retrieved_tokens = 0;   ///< tokens retrieve() loaded into the engine
  std::uint64_t bytes_from_engine = 0;  ///< bytes gathered from engine blocks
  std::uint64_t bytes_to_engine = 0;    ///< bytes scattered into engine blocks
  std::uint64_t store_partial = 0;      ///< stores that found no room for all their chunks
  std::uint64_t busy = 0;               ///< calls refused because max_inflight were in flight
  std::uint64_t pins_refused = 0;       ///< pin() calls refused because max_pins were held
  std::uint64_t prefetched = 0;         ///< chunks prefetch() loaded into the first tier
  std::uint64_t prefetch_dropped = 0;   ///< prefetch() calls that stopped early (queue, room)
  /// Queued lower-tier writes dropped because the first tier needed their chunks' slots (a lower
  /// tier that is slow, hung or unreachable); also in that tier's dropped_writes.
  std::uint64_t writes_dropped_for_room = 0;
};

/// A snapshot of a cache's counters, and its tiers'.
template <std::size_t Tiers>
struct cache_stats : cache_counters {
  std::array<tier_stats, Tiers> tiers{};
};

}  // namespace kvtier
