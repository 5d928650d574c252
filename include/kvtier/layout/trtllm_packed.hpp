#pragma once
// TensorRT-LLM KV pool: one tensor, [NB, NL, 2, H, BS, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// TensorRT-LLM paged pool: one tensor `[num_blocks, layers, 2, kv_heads, block_size, head_size]`,
/// every layer of a block packed together, heads outside tokens (HND).
struct trtllm_packed {
  static constexpr const char* name = "trtllm_packed";
  static constexpr tensors scope = tensors::one;
  static constexpr std::array dims{dim::block, dim::layer, dim::kv,
                                   dim::head,  dim::slot,  dim::elem};
};

}  // namespace kvtier::layout
