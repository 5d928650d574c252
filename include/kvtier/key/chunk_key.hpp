#pragma once
// The 128-bit chunk key and its hash for in-memory indexes.

#include <cstdint>
#include <cstdio>
#include <string>

namespace kvtier {

/// 128-bit content key of one chunk: the hash of its tokens chained on the previous chunk's key
/// and seeded by the salt. Equal keys mean equal KV bytes, in every process on every machine.
struct chunk_key {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;

  friend constexpr bool operator==(const chunk_key&, const chunk_key&) = default;

  /// 32 lowercase hex digits, high half first (the value printed by xxhsum -H2).
  [[nodiscard]] std::string hex() const {
    char buf[33];
    std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(hi),
                  static_cast<unsigned long long>(lo));
    return std::string(buf, 32);
  }
};

/// Hash of a key for hash tables: the key is already uniformly distributed.
struct chunk_key_hash {
  [[nodiscard]] std::size_t operator()(const chunk_key& k) const noexcept {
    return static_cast<std::size_t>(k.lo ^ (k.hi * 0x9E3779B97F4A7C15ull));
  }
};

}  // namespace kvtier
