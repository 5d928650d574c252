#pragma once
// Least-recently-used eviction.

#include "kvtier/detail/index_entry.hpp"

namespace kvtier::eviction {

/// LRU: a chunk joins the back of the list when its last use ends (a store, a lease released or
/// retrieved, a write to a lower tier finished, an unpin), and the front is evicted. Chunks in
/// use or pinned are not in the list at all, so choosing a victim is O(1).
struct lru {
  static constexpr const char* name = "lru";

  static void on_evictable(detail::eviction_list& list, detail::index_entry& e) noexcept {
    list.push_back(e);
  }
  [[nodiscard]] static detail::index_entry* victim(detail::eviction_list& list) noexcept {
    return list.empty() ? nullptr : &list.front();
  }
};

}  // namespace kvtier::eviction
