#pragma once
// Cutting a token sequence into chunks and naming them: the salt key (everything that makes KV
// bytes interchangeable, hashed once per cache) and each chunk's key, chained over the prefix.
// Thread-safe, allocates nothing (except the salt's bytes, at construction).

#include "kvtier/error.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace kvtier::detail {

template <std::size_t ChunkTokens, class Hasher>
class chunker {
 public:
  chunker(const salt& s, const layout::chunk_format& f, bool partial_tail)
      : salt_key_(make_salt_key(s, f)), partial_tail_(partial_tail) {}

  [[nodiscard]] const chunk_key& salt_key() const noexcept { return salt_key_; }

  /// Chunks a sequence of `tokens` tokens is cut into (full chunks, plus the partial tail when
  /// it is stored).
  [[nodiscard]] std::size_t count(std::size_t tokens) const noexcept {
    return tokens / ChunkTokens + (partial_tail_ && tokens % ChunkTokens ? 1 : 0);
  }
  /// Tokens of chunk i of a sequence of `total` tokens.
  [[nodiscard]] static std::size_t tokens_at(std::size_t i, std::size_t total) noexcept {
    return std::min(ChunkTokens, total - i * ChunkTokens);
  }

  /// Writes the keys of `tokens`' chunks into `out` and returns their count. Throws
  /// invalid_argument when `out` is too small. O(tokens).
  std::size_t keys(std::span<const token_id> tokens, std::span<chunk_key> out) const {
    const std::size_t n = count(tokens.size());
    if (out.size() < n) {
      throw invalid_argument("kvtier: keys() output holds " + std::to_string(out.size()) +
                             " keys, " + std::to_string(tokens.size()) + " tokens make " +
                             std::to_string(n) + " chunks");
    }
    chunk_key prev = salt_key_;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t b = i * ChunkTokens;
      prev = Hasher::next(prev, tokens.subspan(b, std::min(ChunkTokens, tokens.size() - b)));
      out[i] = prev;
    }
    return n;
  }

  /// The salt key: canonical bytes (a version tag, then each field as a little-endian u64 or a
  /// length-prefixed string, in a fixed order, documented in docs/keys.md) through the hasher.
  static chunk_key make_salt_key(const salt& s, const layout::chunk_format& f) {
    if (s.tp_size == 0 || s.tp_rank >= s.tp_size) {
      throw invalid_argument("kvtier: salt.tp_rank " + std::to_string(s.tp_rank) +
                             " is not below salt.tp_size " + std::to_string(s.tp_size));
    }
    std::string b = "kvtier.salt.v1";
    auto u64 = [&b](std::uint64_t v) {
      for (int i = 0; i < 8; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    };
    auto str = [&](const std::string& v) {
      u64(v.size());
      b += v;
    };
    str(s.model_id);
    str(s.kv_dtype);
    u64(f.fingerprint());
    u64(s.tp_rank);
    u64(s.tp_size);
    str(s.tenant);
    str(Hasher::name);
    return Hasher::seed(std::as_bytes(std::span(b.data(), b.size())));
  }

 private:
  chunk_key salt_key_;
  bool partial_tail_;
};

}  // namespace kvtier::detail
