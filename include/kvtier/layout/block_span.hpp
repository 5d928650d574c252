#pragma once
// Where one (layer, K-or-V, block) of an engine's KV lives, and the resolved strides that say so.

#include "kvtier/config.hpp"
#include "kvtier/layout/dims.hpp"

#include <cstddef>
#include <cstdint>

namespace kvtier::layout {

/// Address of one block's slots for one layer and one of K/V, as byte offset and strides inside
/// tensor `tensor` of the engine's KV. Slot s, head h begins at
/// offset + s * token_stride + h * head_stride, and its head_size elements are contiguous, or,
/// when elem_stride is not 0 (K of a page::k_transposed layout), elem_stride bytes apart.
struct block_span {
  std::uint32_t tensor = 0;
  std::size_t offset = 0;
  std::size_t token_stride = 0;
  std::size_t head_stride = 0;
  std::size_t elem_stride = 0;  ///< 0: rows are contiguous
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
  /// page::k_transposed: K's bytes between slots (one element) and between the elements of a
  /// row (a slot's K elements lie block_size apart); both 0 when K's rows are like V's.
  std::size_t k_token_stride = 0;
  std::size_t k_elem_stride = 0;

  /// True when every row of every plane is head_size contiguous elements (row_bytes).
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr bool contiguous_rows() const noexcept {
    return k_elem_stride == 0;
  }

  KVTIER_HOST_DEVICE [[nodiscard]] constexpr block_span span(std::size_t layer, std::size_t kv,
                                                             std::size_t block) const noexcept {
    const std::uint32_t t = scope == tensors::one ? 0u
                            : scope == tensors::per_layer
                                ? static_cast<std::uint32_t>(layer)
                                : static_cast<std::uint32_t>(kv * layers + layer);
    const bool kt = kv == 0 && k_elem_stride != 0;
    return {t, layer * layer_stride + kv * kv_stride + block * block_stride,
            kt ? k_token_stride : token_stride, head_stride, kt ? k_elem_stride : 0};
  }
};

}  // namespace kvtier::layout
