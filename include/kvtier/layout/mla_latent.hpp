#pragma once
// MLA latent layout (DeepSeek in vLLM): one tensor per layer, [NB, BS, D]; no K/V split.

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// Multi-head latent attention (DeepSeek V2/V3 in vLLM): per layer `[num_blocks, block_size,
/// head_size]` with head_size the latent width (e.g. 512 + 64 = 576) and no K/V split, so a chunk
/// has one plane. model_shape.kv_heads must be 1.
struct mla_latent {
  static constexpr const char* name = "mla_latent";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::slot, dim::elem};
};

}  // namespace kvtier::layout
