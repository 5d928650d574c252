#pragma once
// SGLang MLA token pool: one tensor per layer, [NB*BS, 1, D]; no K/V split.

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// SGLang MLA token pool: per layer `[num_tokens, 1, head_size]` (the latent as one head), no
/// K/V split. Chunks are interchangeable with mla_latent's. model_shape.kv_heads must be 1.
struct sglang_mla {
  static constexpr const char* name = "sglang_mla";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::token, dim::head, dim::elem};
};

}  // namespace kvtier::layout
