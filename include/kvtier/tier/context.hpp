#pragma once
// What every tier is told about the cache it serves, and the jobs lower tiers run.

#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/chunk_format.hpp"

#include <cstddef>
#include <cstdint>

namespace kvtier::tier {

/// The cache's identity, given to each tier at construction: the chunk format (sizes every slot
/// and record) and the salt key (namespaces files and records, and is checked on every read).
struct context {
  layout::chunk_format format;
  chunk_key salt;
  std::uint32_t block_size = 1;  ///< the engine's tokens per block
  std::size_t max_chunks = 1;    ///< chunks one operation can name (cache_config.max_tokens)
  std::size_t max_ops = 1;       ///< operations in flight at once (cache_config.max_inflight)
};

/// Outcome of reading a record back. `missing` is a remote tier's miss (no record under the
/// key); `corrupt` a record that failed verification; `io_error` a failed or late transfer.
enum class read_status { ok, io_error, corrupt, missing };

/// Write `bytes` of chunk `key` (`tokens` tokens) from `src` into `slot` (indexed tiers; a
/// remote tier ignores it). `src` is a first-tier slot: 4 KiB aligned, readable up to `bytes`
/// rounded up to 4 KiB. The tier sets `ok`.
struct write_job {
  std::uint32_t slot = 0;
  chunk_key key{};
  std::uint32_t tokens = 0;
  const std::byte* src = nullptr;
  std::size_t bytes = 0;
  bool ok = false;
  /// Set (with ok false) when the storage had no room for the record (ENOSPC): the cache then
  /// stops handing the tier the slots it has never filled, and evicts instead.
  bool no_space = false;
};

/// Read chunk `key`'s record into `dst` and prove it is that chunk's; `dst` is a first-tier
/// slot, writable up to `bytes` rounded up to 4 KiB. The tier sets `status`.
struct read_job {
  std::uint32_t slot = 0;
  chunk_key key{};
  std::uint32_t tokens = 0;
  std::byte* dst = nullptr;
  std::size_t bytes = 0;
  read_status status = read_status::io_error;
};

}  // namespace kvtier::tier
