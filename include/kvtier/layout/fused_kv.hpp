#pragma once
// Fused K/V layout (vLLM blocks-first): one tensor per layer, [NB, H, BS, 2*D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// Fused K/V, blocks first: per layer `[num_blocks, kv_heads, block_size, 2 * head_size]`, each
/// row holding a token's K (first head_size elements) then its V.
struct fused_kv {
  static constexpr const char* name = "fused_kv";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::head, dim::slot, dim::kv_elem};
};

}  // namespace kvtier::layout
