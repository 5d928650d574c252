#pragma once
// A validated view of the engine's KV tensors through a layout policy.

#include "kvtier/error.hpp"
#include "kvtier/layout/block_span.hpp"
#include "kvtier/layout/dims.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace kvtier::layout {

/// The most bytes one engine tensor may span, first element to last (2^56: no 64-bit process
/// addresses more), so that every offset computed into it fits 64 bits.
inline constexpr std::uint64_t max_tensor_bytes = std::uint64_t{1} << 56;

/// The engine's tensors checked against layout L and the model: tensor count, null pointers,
/// rank, every extent, and (when the engine gives them) strides. Throws
/// kvtier::invalid_argument naming the first offending value and what the layout expects.
/// Cheap to build (no allocation); valid while the engine_kv's memory is.
template <class L>
class view {
  using tr = traits<L>;

 public:
  view(const model_shape& m, const engine_kv& kv) {
    const std::string lname = L::name;
    const std::size_t want_tensors = tensor_count(L::scope, m);
    if (kv.tensors.size() != want_tensors) {
      throw invalid_argument("kvtier: engine_kv has " + std::to_string(kv.tensors.size()) +
                             " tensors, layout " + lname + " expects " +
                             std::to_string(want_tensors) + scope_text());
    }
    for (std::size_t i = 0; i < kv.tensors.size(); ++i) {
      if (kv.tensors[i] == nullptr) {
        throw invalid_argument("kvtier: engine_kv tensor " + std::to_string(i) + " is null");
      }
    }
    if (tr::kv_planes == 1 && m.kv_heads != 1) {
      throw invalid_argument("kvtier: model_shape.kv_heads is " + std::to_string(m.kv_heads) +
                             ", layout " + lname +
                             " holds one latent row per token (no K/V split) and expects 1");
    }
    if (kv.shape.size() != tr::rank) {
      throw invalid_argument("kvtier: engine_kv shape has rank " + std::to_string(kv.shape.size()) +
                             ", layout " + lname + " expects rank " + std::to_string(tr::rank));
    }
    // The block count comes from the dim that grows with it (in tokens for a token pool).
    const std::size_t bd = tr::blocks_dim;
    const std::int64_t unit = extent(L::dims[bd], m, 1);
    const std::int64_t grown = kv.shape[bd];
    if (grown <= 0 || grown % unit != 0) {
      throw invalid_argument("kvtier: engine_kv shape[" + std::to_string(bd) + "] (" +
                             dim_name(L::dims[bd]) + ") is " + std::to_string(grown) + ", layout " +
                             lname + " expects a positive multiple of " + std::to_string(unit));
    }
    const std::int64_t blocks = grown / unit;
    const auto want = shape_of<L>(m, blocks);
    for (std::size_t d = 0; d < tr::rank; ++d) {
      if (kv.shape[d] != want[d]) {
        throw invalid_argument("kvtier: engine_kv shape[" + std::to_string(d) + "] (" +
                               dim_name(L::dims[d]) + ") is " + std::to_string(kv.shape[d]) +
                               ", layout " + lname + " expects " + std::to_string(want[d]));
      }
    }
    const std::array<std::int64_t, tr::rank> st = strides(kv, want, lname, m.dtype_size);
    const auto s = [&](dim d) -> std::size_t {
      return tr::has(d) ? static_cast<std::size_t>(st[tr::index(d)]) * m.dtype_size : 0;
    };
    r_.scope = L::scope;
    r_.layers = m.layers;
    r_.heads = m.kv_heads;
    r_.block_size = m.block_size;
    r_.row_bytes = std::size_t{m.head_size} * m.dtype_size;
    r_.blocks = static_cast<std::uint64_t>(blocks);
    r_.layer_stride = s(dim::layer);
    r_.head_stride = s(dim::head);
    if (tr::has(dim::token)) {
      r_.token_stride = s(dim::token);
      r_.block_stride = r_.token_stride * m.block_size;
    } else {
      r_.token_stride = s(dim::slot);
      r_.block_stride = s(dim::block);
    }
    r_.kv_stride = tr::has(dim::kv_elem) ? std::size_t{m.head_size} * m.dtype_size : s(dim::kv);
    if constexpr (tr::page_kind == page::k_transposed) {
      // The (slot, kv_elem) dims only frame a page of block_size * 2 * head_size elements, which
      // must then be dense: K [head_size][block_size], then V [block_size][head_size].
      const std::size_t sd = tr::rank - 2;
      if (st[sd] != 2 * std::int64_t{m.head_size}) {
        throw invalid_argument(
            "kvtier: engine_kv strides[" + std::to_string(sd) + "] (" + dim_name(dim::slot) +
            ") is " + std::to_string(st[sd]) + ", layout " + lname + " needs " +
            std::to_string(2 * std::int64_t{m.head_size}) + " (each (block, head) page dense)");
      }
      const std::size_t dt = m.dtype_size;
      r_.kv_stride = std::size_t{m.block_size} * m.head_size * dt;  // V follows K's page half
      r_.token_stride = std::size_t{m.head_size} * dt;              // V: [block_size][head_size]
      r_.k_token_stride = dt;                                       // K: [head_size][block_size]
      r_.k_elem_stride = std::size_t{m.block_size} * dt;
    }
    tensors_ = kv.tensors.data();
  }

  [[nodiscard]] const ref& resolved() const noexcept { return r_; }

  /// Base address of (layer, kv, block) and its strides. `block` must be < blocks().
  [[nodiscard]] std::byte* base(std::size_t layer, std::size_t kv, std::size_t block,
                                block_span& s) const noexcept {
    s = r_.span(layer, kv, block);
    return static_cast<std::byte*>(tensors_[s.tensor]) + s.offset;
  }

  /// Checks the blocks of tokens [begin, end): the table reaches them and every id is in range.
  /// Blocks before `begin` are not looked at (the engine may have freed them).
  void check_block_table(block_table table, std::size_t begin, std::size_t end) const {
    if (end <= begin) return;
    const std::size_t need = (end + r_.block_size - 1) / r_.block_size;
    if (table.size() < need) {
      throw invalid_argument("kvtier: block table has " + std::to_string(table.size()) +
                             " blocks, " + std::to_string(end) + " tokens need " +
                             std::to_string(need) + " (block size " +
                             std::to_string(r_.block_size) + ")");
    }
    for (std::size_t i = begin / r_.block_size; i < need; ++i) {
      if (table[i] < 0 || static_cast<std::uint64_t>(table[i]) >= r_.blocks) {
        throw invalid_argument("kvtier: block table[" + std::to_string(i) + "] is block id " +
                               std::to_string(table[i]) + ", engine has blocks 0.." +
                               std::to_string(r_.blocks - 1));
      }
    }
  }

 private:
  static std::string scope_text() {
    switch (L::scope) {
      case tensors::one:
        return " (one for all layers)";
      case tensors::per_layer:
        return " (one per layer)";
      case tensors::per_layer_kv:
        return " (one per layer for K, then one per layer for V)";
    }
    return "";
  }

  // The engine's strides (elements), checked, or the dense row-major strides of `shape`. Either
  // way the tensor spans at most max_tensor_bytes, so no offset computed from them overflows.
  static std::array<std::int64_t, tr::rank> strides(const engine_kv& kv,
                                                    const std::array<std::int64_t, tr::rank>& shape,
                                                    const std::string& lname,
                                                    std::size_t dtype_size) {
    std::array<std::int64_t, tr::rank> st{};
    std::int64_t dense = 1;
    bool dense_over = false;  // only an error without the engine's strides
    std::size_t over_dim = 0;
    for (std::size_t d = tr::rank; d-- > 0;) {
      st[d] = dense;
      if (!dense_over && __builtin_mul_overflow(dense, shape[d], &dense)) {
        dense_over = true;
        over_dim = d;
      }
    }
    if (kv.strides.empty()) {
      if (dense_over) {
        throw invalid_argument("kvtier: engine_kv shape[" + std::to_string(over_dim) + "] (" +
                               dim_name(L::dims[over_dim]) + ") is " +
                               std::to_string(shape[over_dim]) +
                               ", which makes a tensor of more than 2^63 elements; the limit is " +
                               std::to_string(max_tensor_bytes) + " bytes (2^56)");
      }
      check_span(shape, st, dtype_size);
      return st;
    }
    if (kv.strides.size() != tr::rank) {
      throw invalid_argument("kvtier: engine_kv strides have rank " +
                             std::to_string(kv.strides.size()) + ", shape has rank " +
                             std::to_string(tr::rank));
    }
    const std::size_t last = tr::rank - 1;
    if (kv.strides[last] != 1) {
      throw invalid_argument("kvtier: engine_kv strides[" + std::to_string(last) + "] (" +
                             dim_name(L::dims[last]) + ") is " + std::to_string(kv.strides[last]) +
                             ", layout " + lname + " needs 1 (contiguous rows)");
    }
    for (std::size_t d = 0; d < tr::rank; ++d) {
      if (kv.strides[d] < 0) {
        throw invalid_argument("kvtier: engine_kv strides[" + std::to_string(d) + "] (" +
                               dim_name(L::dims[d]) + ") is " + std::to_string(kv.strides[d]) +
                               ", layout " + lname + " needs non-negative strides");
      }
    }
    check_span(shape, std::span<const std::int64_t, tr::rank>(kv.strides.data(), tr::rank),
               dtype_size);
    // No two elements may share an address: ordered by stride, each dim must step over the
    // whole extent of the next smaller one. (check_span bounds every product below.)
    std::array<std::size_t, tr::rank> order{};
    for (std::size_t d = 0; d < tr::rank; ++d) order[d] = d;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return kv.strides[a] != kv.strides[b] ? kv.strides[a] < kv.strides[b] : a > b;
    });
    std::int64_t span = 1;  // elements covered by the dims checked so far
    for (std::size_t i = 0; i < tr::rank; ++i) {
      const std::size_t d = order[i];
      if (kv.strides[d] < 0 || (shape[d] > 1 && kv.strides[d] < span)) {
        throw invalid_argument("kvtier: engine_kv strides[" + std::to_string(d) + "] (" +
                               dim_name(L::dims[d]) + ") is " + std::to_string(kv.strides[d]) +
                               ", which overlaps the dims inside it (" + std::to_string(span) +
                               " elements); layout " + lname +
                               " needs non-overlapping "
                               "strides, dense ones are " +
                               std::to_string(st[d]));
      }
      if (shape[d] > 1) span = kv.strides[d] * shape[d];
    }
    for (std::size_t d = 0; d < tr::rank; ++d) st[d] = kv.strides[d];
    return st;
  }

  // Throws unless the bytes from a tensor's first element to its last fit max_tensor_bytes,
  // naming the dim whose extent and stride take it over. Strides are non-negative.
  static void check_span(const std::array<std::int64_t, tr::rank>& shape,
                         std::span<const std::int64_t, tr::rank> st, std::size_t dtype_size) {
    std::uint64_t last = 0;  // offset of the last element, in elements
    for (std::size_t d = 0; d < tr::rank; ++d) {
      std::uint64_t step = 0, bytes = 0;
      const bool over = __builtin_mul_overflow(static_cast<std::uint64_t>(shape[d] - 1),
                                               static_cast<std::uint64_t>(st[d]), &step) ||
                        __builtin_add_overflow(last, step, &last) ||
                        __builtin_mul_overflow(last + 1, std::uint64_t{dtype_size}, &bytes) ||
                        bytes > max_tensor_bytes;
      if (over) {
        throw invalid_argument(
            "kvtier: engine_kv shape[" + std::to_string(d) + "] (" + dim_name(L::dims[d]) +
            ") is " + std::to_string(shape[d]) + " with stride " + std::to_string(st[d]) +
            ": the tensor spans more than the limit of " + std::to_string(max_tensor_bytes) +
            " bytes (2^56, more than any address space)");
      }
    }
  }

  void* const* tensors_ = nullptr;
  ref r_{};
};

}  // namespace kvtier::layout
