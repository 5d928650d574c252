#pragma once
// The cache's operation slots: every call that names chunks (lookup, store, pin, clear,
// prefetch, a live lease, a GPU copy in flight) holds one slot, whose preallocated arrays carry
// the call's chunk keys and the chunks it holds. Not thread-safe: the cache calls acquire and
// release under its lock; a slot's arrays belong to its holder alone.

#include "kvtier/error.hpp"
#include "kvtier/key/chunk_key.hpp"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace kvtier::detail {

/// One chunk held by an operation: which tier and slot.
struct chunk_ref {
  std::uint32_t slot = 0;
  std::uint8_t tier = 0;
  std::uint8_t wrote = 0;  ///< store: this call allocated the entry and must fill it
};

/// A chunk_ref's tier after its operation dropped it (a failed promotion): it holds nothing.
inline constexpr std::uint8_t dropped_tier = 0xff;

/// `max_ops` slots of `max_chunks` keys and refs each, reserved at construction. `setting` names
/// the cache_config field that sets `max_ops` (max_inflight for operations, max_pins for pins).
class op_table {
 public:
  static constexpr std::uint32_t no_op = UINT32_MAX;

  op_table(std::size_t max_chunks, std::size_t max_ops, const char* setting = "max_inflight")
      : max_chunks_(max_chunks), max_ops_(max_ops) {
    const std::string name = setting;
    if (max_ops == 0 || max_ops >= no_op) {
      throw invalid_argument("kvtier: cache_config." + name + " " + std::to_string(max_ops) +
                             " is out of range 1..2^32-2");
    }
    if (max_chunks == 0 || max_chunks > std::numeric_limits<std::size_t>::max() / max_ops /
                                            (sizeof(chunk_key) + sizeof(chunk_ref))) {
      throw invalid_argument("kvtier: cache_config.max_tokens makes " + std::to_string(max_chunks) +
                             " chunks per slot, times " + std::to_string(max_ops) + " slots (" +
                             name + "): too many to reserve");
    }
    try {
      keys_ = std::make_unique<chunk_key[]>(max_chunks * max_ops);
      refs_ = std::make_unique<chunk_ref[]>(max_chunks * max_ops);
      free_.reserve(max_ops);
    } catch (const std::bad_alloc&) {
      throw error("kvtier: cannot reserve " +
                  std::to_string(max_chunks * max_ops * (sizeof(chunk_key) + sizeof(chunk_ref))) +
                  " bytes of slots (max_tokens x " + name + ")");
    }
    for (std::size_t i = max_ops; i-- > 0;) free_.push_back(static_cast<std::uint32_t>(i));
  }

  /// Chunks one operation can name, and slots in all.
  [[nodiscard]] std::size_t max_chunks() const noexcept { return max_chunks_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return max_ops_; }
  /// Slots free now.
  [[nodiscard]] std::size_t available() const noexcept { return free_.size(); }

  /// A free slot, or no_op when every slot is taken. O(1), allocates nothing.
  [[nodiscard]] std::uint32_t acquire() noexcept {
    if (free_.empty()) return no_op;
    const std::uint32_t op = free_.back();
    free_.pop_back();
    return op;
  }
  /// Gives slot `op` back (its holder no longer reads its arrays).
  void release(std::uint32_t op) noexcept { free_.push_back(op); }

  [[nodiscard]] chunk_key* keys(std::uint32_t op) const noexcept {
    return keys_.get() + op * max_chunks_;
  }
  [[nodiscard]] chunk_ref* refs(std::uint32_t op) const noexcept {
    return refs_.get() + op * max_chunks_;
  }

 private:
  std::size_t max_chunks_;
  std::size_t max_ops_;
  std::unique_ptr<chunk_key[]> keys_;
  std::unique_ptr<chunk_ref[]> refs_;
  std::vector<std::uint32_t> free_;
};

}  // namespace kvtier::detail
