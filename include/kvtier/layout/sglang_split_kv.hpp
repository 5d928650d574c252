#pragma once
// SGLang MHA token pool: separate K and V buffers per layer, [NB*BS, H, D] each.

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// SGLang MHA token pool: `2 x layers` tensors `[num_tokens, kv_heads, head_size]` (all K buffers
/// in layer order, then all V buffers); token t of block b is row b * block_size + slot. With
/// SGLang's page size 1, block_size is 1 and the block table is the token-to-slot mapping.
struct sglang_split_kv {
  static constexpr const char* name = "sglang_split_kv";
  static constexpr tensors scope = tensors::per_layer_kv;
  static constexpr std::array dims{dim::token, dim::head, dim::elem};
};

}  // namespace kvtier::layout
