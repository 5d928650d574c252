#pragma once
// One chunk's record in a tier's index, linked by Boost.Intrusive hooks (no allocation).

#include "kvtier/key/chunk_key.hpp"

#include <boost/intrusive/list.hpp>
#include <boost/intrusive/unordered_set.hpp>

#include <cstdint>

namespace kvtier::detail {

namespace bi = boost::intrusive;

enum class entry_state : std::uint8_t {
  free,     ///< on the free list
  writing,  ///< in the hash set but its bytes are not whole yet: invisible to lookup
  ready,    ///< bytes whole: visible to lookup
  zombie,   ///< removed from the hash set while still referenced; freed by the last unref
};

/// Entry i of a tier owns slot i of that tier's storage. An entry is in the eviction list
/// exactly when it is ready, unreferenced and unpinned, so the list's victim is always evictable.
/// The list hook doubles as the free-list hook and the hook of the list of zombies whose records
/// are to be invalidated in storage (an entry is in at most one of them).
struct index_entry : bi::unordered_set_base_hook<bi::link_mode<bi::normal_link>>,
                     bi::list_base_hook<bi::link_mode<bi::normal_link>> {
  chunk_key key{};
  std::uint32_t tokens = 0;  ///< tokens held (the chunk size, or fewer for a partial tail)
  std::uint32_t refs = 0;    ///< leases, transfers and queued writes using the bytes
  std::uint32_t pins = 0;    ///< pin() calls not yet unpinned
  entry_state state = entry_state::free;
  // Tier-chain policy state, used in the first tier only:
  std::uint8_t hits = 0;  ///< lookups that hit this chunk since it came in (saturates at 255)
  /// First tier: bit t set while lower tier t has not been sent this chunk yet. A durable lower
  /// tier: nonzero on a cleared (zombie) entry whose record is to be invalidated once no
  /// reader references it (chunk_index::remove_durably).
  std::uint8_t owed = 0;
  std::uint8_t evict_after_write = 0;  ///< write-back: free the slot once its write completes

  [[nodiscard]] bool evictable() const noexcept {
    return state == entry_state::ready && refs == 0 && pins == 0;
  }
};

static_assert(sizeof(index_entry) <= 56, "index_entry grew: metadata budget is 64 B per chunk");

struct entry_key_of {
  using type = chunk_key;
  const type& operator()(const index_entry& e) const noexcept { return e.key; }
};

/// The list an eviction policy orders. It holds exactly the evictable entries.
using eviction_list = bi::list<index_entry, bi::constant_time_size<true>>;

}  // namespace kvtier::detail
