#pragma once
// A validated view of the engine's KV tensors through a layout policy.

#include "kvtier/error.hpp"
#include "kvtier/layout/block_span.hpp"
#include "kvtier/model.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvtier::layout {

/// The engine's tensors checked against layout L and the model: tensor count, null pointers,
/// rank and every extent. Throws kvtier::invalid_argument naming the first offending value.
/// Cheap to build (no allocation); valid while the engine_kv's memory is.
template <class L>
class view {
 public:
  view(const model_shape& m, const engine_kv& kv) {
    const std::size_t want_tensors = L::per_layer ? m.layers : 1;
    if (kv.tensors.size() != want_tensors) {
      throw invalid_argument("kvtier: engine_kv has " + std::to_string(kv.tensors.size()) +
                             " tensors, layout " + L::name + " expects " +
                             std::to_string(want_tensors) +
                             (L::per_layer ? " (one per layer)" : " (one for all layers)"));
    }
    for (std::size_t i = 0; i < kv.tensors.size(); ++i) {
      if (kv.tensors[i] == nullptr) {
        throw invalid_argument("kvtier: engine_kv tensor " + std::to_string(i) + " is null");
      }
    }
    if (kv.shape.size() != L::rank) {
      throw invalid_argument("kvtier: engine_kv shape has rank " + std::to_string(kv.shape.size()) +
                             ", layout " + L::name + " expects rank " + std::to_string(L::rank));
    }
    const std::int64_t blocks = kv.shape[L::blocks_dim];
    if (blocks <= 0) {
      throw invalid_argument("kvtier: engine_kv shape[" + std::to_string(L::blocks_dim) + "] (" +
                             L::dim_names[L::blocks_dim] + ") is " + std::to_string(blocks) +
                             ", must be > 0");
    }
    const auto want = L::shape(m, blocks);
    for (std::size_t d = 0; d < L::rank; ++d) {
      if (kv.shape[d] != want[d]) {
        throw invalid_argument("kvtier: engine_kv shape[" + std::to_string(d) + "] (" +
                               L::dim_names[d] + ") is " + std::to_string(kv.shape[d]) +
                               ", layout " + L::name + " expects " + std::to_string(want[d]));
      }
    }
    tensors_ = kv.tensors.data();
    ext_ = {m.layers,    static_cast<std::size_t>(blocks), m.block_size, m.kv_heads, m.head_size,
            m.dtype_size};
  }

  [[nodiscard]] const extents& ext() const noexcept { return ext_; }
  [[nodiscard]] std::size_t blocks() const noexcept { return ext_.blocks; }

  /// Base address and strides of (layer, kv, block). `block` must be < blocks().
  [[nodiscard]] std::byte* base(std::size_t layer, std::size_t kv, std::size_t block,
                                block_span& s) const noexcept {
    s = L::span(ext_, layer, kv, block);
    return static_cast<std::byte*>(tensors_[s.tensor]) + s.offset;
  }

  /// Checks the first `tokens` tokens' blocks: the table is long enough and every id is in range.
  void check_block_table(block_table table, std::size_t tokens) const {
    const std::size_t need = (tokens + ext_.block_size - 1) / ext_.block_size;
    if (table.size() < need) {
      throw invalid_argument("kvtier: block table has " + std::to_string(table.size()) +
                             " blocks, " + std::to_string(tokens) + " tokens need " +
                             std::to_string(need) + " (block size " +
                             std::to_string(ext_.block_size) + ")");
    }
    for (std::size_t i = 0; i < need; ++i) {
      if (table[i] < 0 || static_cast<std::size_t>(table[i]) >= ext_.blocks) {
        throw invalid_argument("kvtier: block table[" + std::to_string(i) + "] is block id " +
                               std::to_string(table[i]) + ", engine has blocks 0.." +
                               std::to_string(ext_.blocks - 1));
      }
    }
  }

 private:
  void* const* tensors_ = nullptr;
  extents ext_{};
};

}  // namespace kvtier::layout
