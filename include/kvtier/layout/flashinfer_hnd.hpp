#pragma once
// FlashInfer layout, HND: one tensor per layer, [NB, 2, H, BS, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM FlashInfer backend, HND: per layer `[num_blocks, 2, kv_heads, block_size, head_size]`.
struct flashinfer_hnd {
  static constexpr const char* name = "flashinfer_hnd";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::kv, dim::head, dim::slot, dim::elem};
};

}  // namespace kvtier::layout
