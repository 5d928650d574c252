#pragma once
// Where one (layer, K-or-V, block) of an engine's KV lives, and the resolved strides that say so.

#include "kvtier/config.hpp"
#include "kvtier/layout/dims.hpp"

#include <cstddef>
#include <cstdint>

namespace kvtier::layout {

/// Address of one block's slots for one layer and one of K/V, as byte offset and strides inside
/// tensor `tensor` of the engine's KV. Slot s, head h begins at
/// offset + s * token_stride + h * head_stride, and its head_size elements are contiguous.
struct block_span {
  std::uint32_t tensor = 0;
  std::size_t offset = 0;
  std::size_t token_stride = 0;
  std::size_t head_stride = 0;
};

/// An engine's KV resolved through a layout: extents and byte strides by role. Trivially
/// copyable, the same on host and device: CUDA kernels receive it by value.
struct ref {
  tensors scope = tensors::one;
  std::uint32_t layers = 0;
  std::uint32_t heads = 0;
  std::uint32_t block_size = 0;
  std::uint32_t row_bytes = 0;  ///< head_size * dtype_size: one contiguous row
  std::uint64_t blocks = 0;
  std::size_t kv_stride = 0;     ///< bytes between K and V (0 when they are separate tensors)
  std::size_t layer_stride = 0;  ///< bytes between layers (0 when layers are separate tensors)
  std::size_t block_stride = 0;
  std::size_t token_stride = 0;  ///< bytes between slots of a block
  std::size_t head_stride = 0;

  KVTIER_HOST_DEVICE [[nodiscard]] constexpr block_span span(std::size_t layer, std::size_t kv,
                                                             std::size_t block) const noexcept {
    const std::uint32_t t = scope == tensors::one ? 0u
                            : scope == tensors::per_layer
                                ? static_cast<std::uint32_t>(layer)
                                : static_cast<std::uint32_t>(kv * layers + layer);
    return {t, layer * layer_stride + kv * kv_stride + block * block_stride, token_stride,
            head_stride};
  }
};

}  // namespace kvtier::layout
