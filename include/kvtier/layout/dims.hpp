#pragma once
// The vocabulary layouts are written in: what each dimension of an engine's KV tensor means.

#include "kvtier/model.hpp"

#include <array>
#include <cstddef>
#include <cstdint>

namespace kvtier::layout {

/// The role of one dimension of an engine KV tensor.
enum class dim : std::uint8_t {
  kv,       ///< 2: K then V
  layer,    ///< layers, in a tensor that holds several
  block,    ///< engine blocks
  slot,     ///< token slot inside a block (block_size)
  token,    ///< block * block_size + slot, for token-granular pools (SGLang)
  head,     ///< KV heads
  elem,     ///< head_size elements, contiguous
  kv_elem,  ///< 2 * head_size elements: K's head_size then V's (fused K/V)
};

/// How K and V sit inside the rows the dims describe. A layout that leaves `page` out has
/// `rows`.
enum class page : std::uint8_t {
  rows,  ///< as the dims say: each (token, head) row of head_size elements is contiguous
  /// vLLM's CPU backend: the dims end in {slot, kv_elem}, and the block_size x 2*head_size
  /// elements of one (block, head) are one page holding K transposed, `[head_size][block_size]`
  /// (a token's K elements block_size apart), then V, `[block_size][head_size]`.
  k_transposed,
};

/// Which tensors an engine passes for one layout.
enum class tensors : std::uint8_t {
  one,           ///< one tensor for all layers
  per_layer,     ///< one per layer, in layer order
  per_layer_kv,  ///< one per (K or V, layer): all K tensors in layer order, then all V tensors
};

[[nodiscard]] constexpr const char* dim_name(dim d) noexcept {
  switch (d) {
    case dim::kv:
      return "kv";
    case dim::layer:
      return "layers";
    case dim::block:
      return "num_blocks";
    case dim::slot:
      return "block_size";
    case dim::token:
      return "num_tokens";
    case dim::head:
      return "kv_heads";
    case dim::elem:
      return "head_size";
    case dim::kv_elem:
      return "2*head_size";
  }
  return "?";
}

[[nodiscard]] constexpr std::size_t tensor_count(tensors t, const model_shape& m) noexcept {
  return t == tensors::one ? 1 : t == tensors::per_layer ? m.layers : 2 * std::size_t{m.layers};
}

/// What kvtier derives from a layout's dims at compile time, with the checks that make a
/// description well-formed (each fails to compile with a one-line message).
template <class L>
struct traits {
  static constexpr std::size_t rank = L::dims.size();

  static constexpr std::size_t count(dim d) noexcept {
    std::size_t n = 0;
    for (dim x : L::dims) n += x == d;
    return n;
  }
  static constexpr bool has(dim d) noexcept { return count(d) > 0; }
  static constexpr std::size_t index(dim d) noexcept {
    for (std::size_t i = 0; i < rank; ++i)
      if (L::dims[i] == d) return i;
    return rank;
  }

  /// How K and V sit in a page (`L::page`, else page::rows).
  static constexpr page page_kind = [] {
    if constexpr (requires { L::page; }) {
      return page{L::page};
    } else {
      return page::rows;
    }
  }();

  /// K and V planes per chunk: 1 for layouts without a K/V split (MLA latent), else 2.
  static constexpr std::size_t kv_planes =
      has(dim::kv) || has(dim::kv_elem) || L::scope == tensors::per_layer_kv ? 2 : 1;
  /// The dimension that grows with the engine's block count.
  static constexpr std::size_t blocks_dim = has(dim::block) ? index(dim::block) : index(dim::token);

  static_assert(rank >= 2, "kvtier layout: at least two dims");
  static_assert(
      [] {
        for (std::size_t i = 0; i < rank; ++i)
          for (std::size_t j = i + 1; j < rank; ++j)
            if (L::dims[i] == L::dims[j]) return false;
        return true;
      }(),
      "kvtier layout: a dim role appears twice");
  static_assert(L::dims[rank - 1] == dim::elem || L::dims[rank - 1] == dim::kv_elem,
                "kvtier layout: the last dim must be elem or kv_elem (rows are contiguous)");
  static_assert(has(dim::token) != (has(dim::block) && has(dim::slot)),
                "kvtier layout: give block and slot dims, or one token dim");
  static_assert(!has(dim::token) || (!has(dim::block) && !has(dim::slot)),
                "kvtier layout: a token dim replaces block and slot");
  static_assert(count(dim::kv) + count(dim::kv_elem) + (L::scope == tensors::per_layer_kv) <= 1,
                "kvtier layout: K/V is split by exactly one of kv, kv_elem, or per_layer_kv");
  static_assert(page_kind == page::rows || (rank >= 2 && L::dims[rank - 2] == dim::slot &&
                                            L::dims[rank - 1] == dim::kv_elem),
                "kvtier layout: page::k_transposed needs dims ending in slot, kv_elem");
  static_assert(has(dim::layer) == (L::scope == tensors::one),
                "kvtier layout: a layer dim exactly when one tensor holds all layers");
};

/// The extent of dim `d` for model `m` and `blocks` engine blocks.
[[nodiscard]] constexpr std::int64_t extent(dim d, const model_shape& m,
                                            std::int64_t blocks) noexcept {
  switch (d) {
    case dim::kv:
      return 2;
    case dim::layer:
      return m.layers;
    case dim::block:
      return blocks;
    case dim::slot:
      return m.block_size;
    case dim::token:
      return blocks * m.block_size;
    case dim::head:
      return m.kv_heads;
    case dim::elem:
      return m.head_size;
    case dim::kv_elem:
      return 2 * std::int64_t{m.head_size};
  }
  return 0;
}

/// The shape each tensor of layout L has for model `m` and `blocks` engine blocks.
template <class L>
[[nodiscard]] constexpr std::array<std::int64_t, traits<L>::rank> shape_of(
    const model_shape& m, std::int64_t blocks) noexcept {
  std::array<std::int64_t, traits<L>::rank> s{};
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = extent(L::dims[i], m, blocks);
  // A layout without heads keeps one (MLA's latent vector is one "head" of head_size).
  return s;
}

}  // namespace kvtier::layout
