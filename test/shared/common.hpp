#pragma once
// What the shared host tier's tests and their worker processes agree on: the cache type, the
// model, and a reference model of KV bytes. The bytes of token t of a prompt of family f are a
// function of (f, t) only, and family f's prompts are prefixes of one token sequence, so every
// chunk key names exactly one content: any byte that differs from the reference is a wrong byte.

#include <kvtier/kvtier.hpp>
#include <kvtier/shared_lookup.hpp>

#include "../host/support.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace shared_test {

using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<16>,
                              kvtier::opt::layout<kvtier::layout::vllm_flash_nhd>,
                              kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::shared_host>>;
using engine_t = test::engine<kvtier::layout::vllm_flash_nhd>;

inline constexpr kvtier::model_shape model = test::small_model;  // 2 x 2 x 8, bf16, block 4
inline const kvtier::salt salt{"shared-test-model", "bf16", 0, 1, ""};
inline constexpr std::int64_t engine_blocks = 64;  // 256 tokens
inline constexpr std::size_t max_prompt = 200;
inline constexpr std::byte untouched{0xEE};

/// Family f's prompt of n tokens.
inline std::vector<kvtier::token_id> prompt(std::uint32_t family, std::size_t n) {
  std::vector<kvtier::token_id> t(n);
  for (std::size_t i = 0; i < n; ++i) {
    t[i] = static_cast<kvtier::token_id>((family * 7919u + i * 31u) % 120000u);
  }
  return t;
}

/// The reference byte j of row (layer, kv, head) of token t of family f.
inline std::byte ref_byte(std::uint32_t f, std::size_t t, std::size_t l, std::size_t kv,
                          std::size_t h, std::size_t j) {
  std::uint64_t x = (std::uint64_t{f} << 40) ^ (t << 20) ^ (l << 12) ^ (kv << 10) ^ (h << 6) ^ j;
  x *= 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  return static_cast<std::byte>(x >> 24);
}

/// Fills tokens [0, n) of family f into the engine's blocks `bt` (everything else: untouched).
inline void fill(engine_t& e, const std::vector<std::int32_t>& bt, std::uint32_t f, std::size_t n) {
  e.wipe(untouched);
  const std::size_t rb = model.head_size * model.dtype_size;
  for (std::size_t t = 0; t < n; ++t) {
    const std::size_t b = static_cast<std::size_t>(bt[t / model.block_size]);
    const std::size_t s = t % model.block_size;
    for (std::size_t l = 0; l < model.layers; ++l)
      for (std::size_t kv = 0; kv < 2; ++kv)
        for (std::size_t h = 0; h < model.kv_heads; ++h) {
          std::byte* row = e.row(l, kv, b, s, h);
          for (std::size_t j = 0; j < rb; ++j) row[j] = ref_byte(f, t, l, kv, h, j);
        }
  }
}

/// Wrong bytes in the whole engine after a load of `loaded` tokens of family f into `bt`: the
/// loaded tokens must equal the reference and every other byte of every tensor must be untouched.
/// Tokens [loaded, unchecked_end) are not checked (a chunk that failed verification after it
/// was read in place may have reached their blocks: retrieve does not report them as loaded).
inline std::size_t wrong_bytes(const engine_t& e, const std::vector<std::int32_t>& bt,
                               std::uint32_t f, std::size_t loaded, std::size_t unchecked_end = 0) {
  const std::size_t rb = model.head_size * model.dtype_size;
  std::size_t wrong = 0;
  std::vector<std::uint8_t> expect_ref(static_cast<std::size_t>(engine_blocks) * model.block_size,
                                       0);
  std::vector<std::size_t> token_of(expect_ref.size(), 0);
  for (std::size_t t = 0; t < std::max(loaded, unchecked_end); ++t) {
    const std::size_t pos = static_cast<std::size_t>(bt[t / model.block_size]) * model.block_size +
                            t % model.block_size;
    expect_ref[pos] = t < loaded ? 1 : 2;
    token_of[pos] = t;
  }
  for (std::size_t b = 0; b < static_cast<std::size_t>(engine_blocks); ++b)
    for (std::size_t s = 0; s < model.block_size; ++s)
      for (std::size_t l = 0; l < model.layers; ++l)
        for (std::size_t kv = 0; kv < 2; ++kv)
          for (std::size_t h = 0; h < model.kv_heads; ++h) {
            const std::byte* row = e.row(l, kv, b, s, h);
            const std::size_t pos = b * model.block_size + s;
            if (expect_ref[pos] == 2) continue;
            for (std::size_t j = 0; j < rb; ++j) {
              const std::byte want =
                  expect_ref[pos] ? ref_byte(f, token_of[pos], l, kv, h, j) : untouched;
              wrong += row[j] != want;
            }
          }
  return wrong;
}

/// The tier configs of a worker's cache: a 16-chunk host tier over segment `name`.
inline cache_t::tier_configs configs(const std::string& name, std::size_t shared_bytes) {
  kvtier::tier::shared_host::config sc;
  sc.name = name;
  sc.capacity_bytes = shared_bytes;
  sc.processes = 32;
  sc.reap_interval = std::chrono::milliseconds(50);
  return {kvtier::tier::host::config{.capacity_bytes = 16 * 4096}, sc};
}

}  // namespace shared_test
