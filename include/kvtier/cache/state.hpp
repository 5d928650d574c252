#pragma once
// The cache's one lock and what it guards besides the tier indexes: the counters, and the
// condition an operation waits on for a chunk another caller is still writing.

#include "kvtier/stats.hpp"

#include <condition_variable>
#include <cstddef>
#include <mutex>

namespace kvtier::detail {

/// Chunks one batch of lower-tier I/O takes at most (a write, a promotion, a prefetch read):
/// the parts' job arrays on the stack are this long.
inline constexpr std::size_t batch_chunks = 16;

template <std::size_t Tiers>
struct cache_state {
  mutable std::mutex mu;
  std::condition_variable state_cv;  ///< an entry left the writing state
  cache_stats<Tiers> stats{};
};

}  // namespace kvtier::detail
