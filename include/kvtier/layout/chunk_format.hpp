#pragma once
// The canonical byte format of one chunk inside kvtier's tiers.

#include "kvtier/config.hpp"
#include "kvtier/model.hpp"

#include <cstddef>
#include <cstdint>

namespace kvtier::layout {

/// Canonical chunk format: `[layers][kv_planes][tokens][kv_heads][head_size]`, dense, with
/// kv_planes 2 (K then V) or 1 for layouts without a K/V split (MLA's latent).
///
/// Layer-major so that one layer of a chunk is one contiguous span (what layer-wise pipelining
/// moves), K before V, then token-major so that a run of tokens of one (layer, K/V) is contiguous
/// and NHD engine blocks move as whole spans. A chunk of fewer tokens (a stored partial tail) is
/// packed with its own token count. Every engine layout gathers into this format and scatters out
/// of it, which is what lets engines with different layouts share chunks.
struct chunk_format {
  std::size_t layers = 0;
  std::size_t heads = 0;
  std::size_t head_size = 0;
  std::size_t dtype_size = 0;
  std::size_t chunk_tokens = 0;
  std::size_t kv_planes = 2;

  [[nodiscard]] static constexpr chunk_format from(const model_shape& m, std::size_t chunk_tokens,
                                                   std::size_t kv_planes = 2) noexcept {
    return {m.layers, m.kv_heads, m.head_size, m.dtype_size, chunk_tokens, kv_planes};
  }
  /// Bytes of one head row (head_size elements).
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t row_bytes() const noexcept {
    return head_size * dtype_size;
  }
  /// Bytes of one token of one (layer, K/V).
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t token_bytes() const noexcept {
    return heads * row_bytes();
  }
  /// Bytes of a chunk of `tokens` tokens.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t bytes(std::size_t tokens) const noexcept {
    return layers * kv_planes * tokens * token_bytes();
  }
  /// Bytes of a full chunk.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t chunk_bytes() const noexcept {
    return bytes(chunk_tokens);
  }
  /// Byte offset of token `t` of (layer, kv) in a chunk of `tokens` tokens.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t offset(std::size_t layer, std::size_t kv,
                                                                std::size_t t,
                                                                std::size_t tokens) const noexcept {
    return ((layer * kv_planes + kv) * tokens + t) * token_bytes();
  }
  /// 64-bit fingerprint of the format (FNV-1a over its fields and a version), stable across
  /// builds. Two caches share chunks only if their fingerprints are equal.
  [[nodiscard]] constexpr std::uint64_t fingerprint() const noexcept {
    std::uint64_t h = 0xcbf29ce484222325ull;
    const std::uint64_t fields[] = {
        1 /* format version */, layers, kv_planes, heads, head_size, dtype_size, chunk_tokens};
    for (std::uint64_t f : fields) {
      for (int i = 0; i < 8; ++i) {
        h ^= (f >> (8 * i)) & 0xff;
        h *= 0x100000001b3ull;
      }
    }
    return h;
  }
};

}  // namespace kvtier::layout
