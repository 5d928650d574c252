#pragma once
// Where one (layer, K-or-V, block) of an engine's KV lives: a shape/stride value.

#include "kvtier/config.hpp"

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

/// Runtime extents a layout's index arithmetic needs, all in elements except dtype_size.
struct extents {
  std::size_t layers = 0;
  std::size_t blocks = 0;
  std::size_t block_size = 0;
  std::size_t heads = 0;
  std::size_t head_size = 0;
  std::size_t dtype_size = 0;
};

}  // namespace kvtier::layout
