#pragma once
// vLLM FlashAttention layout, HND: one tensor per layer, [2, NB, H, BS, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM flash-attention backend, HND: per layer `[2, num_blocks, kv_heads, block_size, head_size]`.
/// Each head's slots are contiguous; rows of head_size move to the token-major chunk format.
struct vllm_flash_hnd {
  static constexpr const char* name = "vllm_flash_hnd";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::kv, dim::block, dim::head, dim::slot, dim::elem};
};

}  // namespace kvtier::layout
