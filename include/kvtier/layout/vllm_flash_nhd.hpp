#pragma once
// vLLM FlashAttention layout: one tensor per layer, [2, NB, BS, H, D].

#include "kvtier/layout/block_span.hpp"
#include "kvtier/model.hpp"

#include <array>
#include <cstdint>

namespace kvtier::layout {

/// vLLM flash-attention backend, NHD: per layer `[2, num_blocks, block_size, kv_heads,
/// head_size]`. A block's slots are contiguous for each of K and V, so one block moves as one
/// span of block_size * kv_heads * head_size elements.
struct vllm_flash_nhd {
  static constexpr const char* name = "vllm_flash_nhd";
  static constexpr bool per_layer = true;  ///< one tensor per layer
  static constexpr std::size_t rank = 5;
  static constexpr std::array<const char*, rank> dim_names{"kv", "num_blocks", "block_size",
                                                           "kv_heads", "head_size"};
  static constexpr std::size_t blocks_dim = 1;

  /// The shape each tensor must have for this model and `blocks` engine blocks.
  [[nodiscard]] static constexpr std::array<std::int64_t, rank> shape(const model_shape& m,
                                                                      std::int64_t blocks) {
    return {2, blocks, m.block_size, m.kv_heads, m.head_size};
  }

  KVTIER_HOST_DEVICE [[nodiscard]] static constexpr block_span span(const extents& e,
                                                                    std::size_t layer,
                                                                    std::size_t kv,
                                                                    std::size_t block) noexcept {
    const std::size_t row = e.head_size * e.dtype_size;
    const std::size_t token = e.heads * row;
    return {static_cast<std::uint32_t>(layer), (kv * e.blocks + block) * e.block_size * token,
            token, row};
  }
};

}  // namespace kvtier::layout
