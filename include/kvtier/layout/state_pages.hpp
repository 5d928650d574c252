#pragma once
// Opaque per-slot state pages: one tensor per state array, [NB, BS, bytes].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// Opaque per-slot state kept in pages like KV blocks (an indexer's keys, a compressed cache):
/// per state array ("layer") `[num_blocks, block_size, state_bytes]`, no K/V split. Describe it
/// with model_shape{arrays, 1, state_bytes, 1, block_size} and use it as one group of a
/// group_cache.
struct state_pages {
  static constexpr const char* name = "state_pages";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::slot, dim::elem};
};

}  // namespace kvtier::layout
