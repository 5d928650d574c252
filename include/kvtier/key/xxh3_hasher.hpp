#pragma once
// The default chunk hasher: XXH3-128 (Debian libxxhash-dev, inlined so nothing is linked).

#include "kvtier/detail/xxhash.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/model.hpp"

#include <bit>
#include <cstddef>
#include <span>

namespace kvtier::key {

// Keys must be equal across machines, so the hashed bytes are the little-endian token ids; every
// platform kvtier targets is little-endian, and a big-endian one fails here instead of silently
// producing different keys.
static_assert(std::endian::native == std::endian::little,
              "kvtier keys hash little-endian token ids; big-endian targets are not supported");

/// XXH3-128 chunk hasher.
///  - seed(bytes) = XXH3_128bits(bytes)                         (the salt's canonical bytes)
///  - next(prev, tokens) = XXH3_128bits(prev.lo, prev.hi, tokens as little-endian int32)
/// with prev.lo and prev.hi as little-endian 64-bit words. Stateless and thread-safe.
struct xxh3_hasher {
  static constexpr const char* name = "xxh3_128";

  [[nodiscard]] static chunk_key seed(std::span<const std::byte> bytes) noexcept {
    const XXH128_hash_t h = XXH3_128bits(bytes.data(), bytes.size());
    return chunk_key{h.low64, h.high64};
  }

  [[nodiscard]] static chunk_key next(const chunk_key& prev,
                                      std::span<const token_id> tokens) noexcept {
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    XXH3_128bits_reset(&state);
    const std::uint64_t words[2] = {prev.lo, prev.hi};
    XXH3_128bits_update(&state, words, sizeof words);
    kvtier::detail::xxh3_update(&state, tokens.data(), tokens.size_bytes());  // the AVX2 loop
    const XXH128_hash_t h = XXH3_128bits_digest(&state);
    return chunk_key{h.low64, h.high64};
  }
};

}  // namespace kvtier::key
