#pragma once
// TensorRT-LLM KV pool: one tensor, [NB, NL, 2, H, BS, D].

#include "kvtier/layout/block_span.hpp"
#include "kvtier/model.hpp"

#include <array>
#include <cstdint>

namespace kvtier::layout {

/// TensorRT-LLM paged pool: one tensor `[num_blocks, layers, 2, kv_heads, block_size,
/// head_size]`, every layer of a block packed together, heads outside tokens (HND). Each head's
/// tokens are contiguous, so moving to the token-major chunk format copies head_size runs.
struct trtllm_packed {
  static constexpr const char* name = "trtllm_packed";
  static constexpr bool per_layer = false;  ///< one tensor for all layers
  static constexpr std::size_t rank = 6;
  static constexpr std::array<const char*, rank> dim_names{"num_blocks", "layers",     "kv",
                                                           "kv_heads",   "block_size", "head_size"};
  static constexpr std::size_t blocks_dim = 0;

  [[nodiscard]] static constexpr std::array<std::int64_t, rank> shape(const model_shape& m,
                                                                      std::int64_t blocks) {
    return {blocks, m.layers, 2, m.kv_heads, m.block_size, m.head_size};
  }

  KVTIER_HOST_DEVICE [[nodiscard]] static constexpr block_span span(const extents& e,
                                                                    std::size_t layer,
                                                                    std::size_t kv,
                                                                    std::size_t block) noexcept {
    const std::size_t row = e.head_size * e.dtype_size;
    const std::size_t head = e.block_size * row;
    return {0, ((block * e.layers + layer) * 2 + kv) * e.heads * head, row, head};
  }
};

}  // namespace kvtier::layout
