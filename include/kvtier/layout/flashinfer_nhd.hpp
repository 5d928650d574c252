#pragma once
// FlashInfer layout, NHD: one tensor per layer, [NB, 2, BS, H, D].

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM FlashInfer backend, NHD: per layer `[num_blocks, 2, block_size, kv_heads, head_size]`
/// (K and V of a block next to each other).
struct flashinfer_nhd {
  static constexpr const char* name = "flashinfer_nhd";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::kv, dim::slot, dim::head, dim::elem};
};

}  // namespace kvtier::layout
