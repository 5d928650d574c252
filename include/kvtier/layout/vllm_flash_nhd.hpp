#pragma once
// vLLM FlashAttention layout, NHD: one tensor per layer, [2, NB, BS, H, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM flash-attention backend, NHD: per layer `[2, num_blocks, block_size, kv_heads, head_size]`.
/// A block's slots are contiguous for each of K and V: a block moves as one span.
struct vllm_flash_nhd {
  static constexpr const char* name = "vllm_flash_nhd";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::kv, dim::block, dim::slot, dim::head, dim::elem};
};

}  // namespace kvtier::layout
