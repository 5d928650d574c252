#pragma once
// vLLM cross-layer layout: one tensor, [NB, NL, 2, BS, H, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM cross-layer mode: one tensor `[num_blocks, layers, 2, block_size, kv_heads, head_size]`,
/// every layer of a block together, so one block of all layers is one contiguous span.
struct vllm_cross_layer {
  static constexpr const char* name = "vllm_cross_layer";
  static constexpr tensors scope = tensors::one;
  static constexpr std::array dims{dim::block, dim::layer, dim::kv,
                                   dim::slot,  dim::head,  dim::elem};
};

}  // namespace kvtier::layout
