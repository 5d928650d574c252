#pragma once
// A cache's runtime settings that are not per tier, and the checks of what an engine passes to
// the constructor (model shape, settings), each refused with the bad value named.

#include "kvtier/cache/write_policy.hpp"
#include "kvtier/detail/checked.hpp"
#include "kvtier/error.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace kvtier {

/// Runtime settings of a cache that are not per tier.
struct cache_config {
  /// Longest token sequence lookup/store/pin accept; sizes the preallocated key buffers.
  std::size_t max_tokens = 131072;
  /// Operations in flight at once: live leases plus concurrent store/clear/prefetch calls.
  /// A call beyond it is refused as a miss (lookup) or stores nothing (store), and is counted.
  std::size_t max_inflight = 64;
  /// Pins held at once (pin handles not yet unpinned); sizes the pin table (max_tokens keys per
  /// pin). A pin beyond it pins nothing and is counted (pins_refused).
  std::size_t max_pins = 64;
  /// Chunks waiting for write-through to lower tiers; when full, writes are dropped (counted)
  /// rather than blocking the engine.
  std::size_t write_queue_depth = 1024;
  /// Also store the last, partial chunk of a sequence (off by default: a partial chunk is a hit
  /// only for a lookup whose tail is exactly the same tokens).
  bool store_partial_tail = false;
  /// When lower tiers receive a chunk (see write_mode).
  write_mode mode = write_mode::write_through;
  /// Chunks waiting to be loaded by prefetch(); when full, prefetch starts no more (counted).
  std::size_t prefetch_queue_depth = 256;
  /// Most of the first tier's slots (percent, 1..100, at least one slot) that chunks waiting for
  /// lower-tier writes may hold when the first tier needs room: beyond it, a queued write is
  /// dropped (counted in writes_dropped_for_room) and its chunk's slot reused, and writes in
  /// progress never hold more. So a slow, hung or unreachable lower tier never stops the first
  /// tier from caching. With 100, writes may hold every slot (a store then stores nothing until
  /// one finishes).
  unsigned write_hold_percent = 50;
};

namespace detail {

/// The largest chunk a cache takes, in bytes (2^40): far above any model's (a 256-token chunk of
/// 128 layers x 128 heads x 128 elements in bf16 is 2^31), low enough that no size derived from
/// it (slots rounded up to pages, records, tier capacities) can overflow.
inline constexpr std::size_t max_chunk_bytes = std::size_t{1} << 40;
/// The largest cache_config.max_tokens (2^32 tokens in one sequence).
inline constexpr std::size_t max_tokens_limit = std::size_t{1} << 32;
/// The largest write and prefetch queue depth (a queue never holds more than the first tier's
/// chunks, which are at most 2^32-1).
inline constexpr std::size_t max_queue_depth = UINT32_MAX;

/// The model, if every field is set, the block size fits the chunk size (and opt::block_tokens
/// when given) and a chunk's size is at most max_chunk_bytes.
template <std::size_t ChunkTokens, std::size_t BlockTokens, std::size_t KvPlanes>
model_shape checked_model(const model_shape& m) {
  const std::pair<const char*, std::uint32_t> fields[] = {{"layers", m.layers},
                                                          {"kv_heads", m.kv_heads},
                                                          {"head_size", m.head_size},
                                                          {"dtype_size", m.dtype_size},
                                                          {"block_size", m.block_size}};
  for (auto [name, value] : fields) {
    if (value == 0) throw invalid_argument(std::string("kvtier: model_shape.") + name + " is 0");
  }
  if (BlockTokens != 0 && m.block_size != BlockTokens) {
    throw invalid_argument("kvtier: model_shape.block_size " + std::to_string(m.block_size) +
                           " differs from opt::block_tokens " + std::to_string(BlockTokens));
  }
  if (ChunkTokens % m.block_size != 0) {
    throw invalid_argument("kvtier: chunk size " + std::to_string(ChunkTokens) +
                           " is not a multiple of the engine block size " +
                           std::to_string(m.block_size));
  }
  std::size_t bytes = KvPlanes * ChunkTokens;
  bool over = false;
  for (std::size_t f : {std::size_t{m.layers}, std::size_t{m.kv_heads}, std::size_t{m.head_size},
                        std::size_t{m.dtype_size}}) {
    over = __builtin_mul_overflow(bytes, f, &bytes) || over;
  }
  if (over || bytes > max_chunk_bytes) {
    throw invalid_argument(
        "kvtier: model_shape (layers " + std::to_string(m.layers) + ", kv_heads " +
        std::to_string(m.kv_heads) + ", head_size " + std::to_string(m.head_size) +
        ", dtype_size " + std::to_string(m.dtype_size) + ") makes a chunk of " +
        (over ? std::string("more than 2^64") : std::to_string(bytes)) +
        " bytes, above the limit of " + std::to_string(max_chunk_bytes) + " (2^40)");
  }
  return m;
}

/// The settings, if every count is in range.
inline cache_config checked_config(const cache_config& c) {
  if (c.max_tokens == 0 || c.max_tokens > max_tokens_limit) {
    throw invalid_argument("kvtier: cache_config.max_tokens " + std::to_string(c.max_tokens) +
                           " is out of range 1..2^32 (" + std::to_string(max_tokens_limit) + ")");
  }
  if (c.max_inflight == 0 || c.max_inflight >= UINT32_MAX) {
    throw invalid_argument("kvtier: cache_config.max_inflight " + std::to_string(c.max_inflight) +
                           " is out of range 1..2^32-2");
  }
  const std::pair<const char*, std::size_t> depths[] = {
      {"write_queue_depth", c.write_queue_depth}, {"prefetch_queue_depth", c.prefetch_queue_depth}};
  for (auto [name, value] : depths) {
    if (value == 0 || value > max_queue_depth) {
      throw invalid_argument(std::string("kvtier: cache_config.") + name + " " +
                             std::to_string(value) + " is out of range 1..2^32-1 (" +
                             std::to_string(max_queue_depth) + ")");
    }
  }
  if (c.write_hold_percent == 0 || c.write_hold_percent > 100) {
    throw invalid_argument("kvtier: cache_config.write_hold_percent " +
                           std::to_string(c.write_hold_percent) + " is out of range 1..100");
  }
  return c;
}

/// Chunks one operation can name: max_tokens rounded up to whole chunks.
inline std::size_t max_chunks(const cache_config& c, std::size_t chunk_tokens) noexcept {
  return c.max_tokens / chunk_tokens + (c.max_tokens % chunk_tokens != 0 ? 1 : 0);
}

/// Refuses a call (`what`) naming more tokens than the key buffers hold.
inline void check_tokens(const char* what, std::size_t n, const cache_config& c) {
  if (n > c.max_tokens) {
    throw invalid_argument(std::string("kvtier: ") + what + " of " + std::to_string(n) +
                           " tokens exceeds cache_config.max_tokens " +
                           std::to_string(c.max_tokens));
  }
}

/// A store's chunks [first, n) (those starting before first_token are skipped: the engine may
/// no longer hold their blocks), and its view of the engine's tensors.
template <class View>
struct store_range {
  View v;
  std::size_t n, first;
};
/// The range of a store of `tokens` tokens (`n` chunks), after checking the tokens, the tensors
/// and the block table.
template <class View, std::size_t ChunkTokens>
store_range<View> check_store(const model_shape& model, const cache_config& cfg, std::size_t tokens,
                              std::size_t n, const engine_kv& kv, block_table table,
                              std::size_t first_token) {
  check_tokens("store", tokens, cfg);
  if (first_token > tokens) {
    throw invalid_argument("kvtier: store first_token " + std::to_string(first_token) +
                           " is past the " + std::to_string(tokens) + " tokens");
  }
  store_range<View> r{View(model, kv), n, (first_token + ChunkTokens - 1) / ChunkTokens};
  const std::size_t end = r.n == 0 ? 0 : std::min(r.n * ChunkTokens, tokens);
  r.v.check_block_table(table, std::min(r.first * ChunkTokens, end), end);
  return r;
}

/// Refuses a lookup from a chunk past the tokens' `n` chunks.
inline void check_first_chunk(const char* what, std::size_t first, std::size_t n) {
  if (first > n) {
    throw invalid_argument(std::string("kvtier: ") + what + " first_chunk " +
                           std::to_string(first) + " is past the " + std::to_string(n) +
                           " chunks of the tokens");
  }
}

}  // namespace detail
}  // namespace kvtier
