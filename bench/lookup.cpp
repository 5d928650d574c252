// Control-path cost: hashing (ns per token) and lookup latency of a fully cached prompt.
//
//   kvtier_bench_lookup [--tokens N] [--iters N]
//
// Lookup is measured end to end (hashing + index walk + lease) and the index walk alone
// (lookup time minus the hashing time of the same tokens), against the design target of
// <= 20 us plus hashing for a 128k-token prompt. Payload bytes are irrelevant here, so the model
// is tiny (1 layer, 1 head, head size 8, 1-byte dtype) and a chunk is 4 KiB.
#include <kvtier/kvtier.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  std::size_t tokens = 131072;
  int iters = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--tokens")
      tokens = std::stoul(argv[i + 1]);
    else if (a == "--iters")
      iters = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  using clock_type = std::chrono::steady_clock;
  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<256>>;
  const kvtier::model_shape m{1, 1, 8, 1, 16};
  const std::size_t chunks = tokens / 256;
  kvtier::cache_config cfg;
  cfg.max_tokens = tokens;
  cache_t cache(m, {"bench", "fp8", 0, 1, ""}, {{(chunks + 1) * 4096}}, cfg);
  const std::int64_t blocks = static_cast<std::int64_t>(tokens / 16);
  const auto shape_arr = kvtier::layout::shape_of<kvtier::layout::vllm_flash_nhd>(m, blocks);
  std::vector<std::int64_t> shape(shape_arr.begin(), shape_arr.end());
  std::vector<std::byte> layer(static_cast<std::size_t>(2 * blocks * 16 * 8));
  std::vector<void*> ptrs{layer.data()};
  std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
  std::iota(table.begin(), table.end(), 0);
  std::vector<kvtier::token_id> prompt(tokens);
  for (std::size_t i = 0; i < tokens; ++i)
    prompt[i] = static_cast<kvtier::token_id>(i * 7919 % 128000);
  if (cache.store(prompt, {ptrs, shape}, table) != chunks * 256) {
    std::fprintf(stderr, "could not store the prompt\n");
    return 1;
  }
  std::vector<kvtier::chunk_key> keys(chunks);
  std::vector<double> hash_s, lookup_s;
  for (int i = 0; i < iters; ++i) {
    auto t0 = clock_type::now();
    cache.keys(prompt, keys);
    hash_s.push_back(std::chrono::duration<double>(clock_type::now() - t0).count());
    t0 = clock_type::now();
    auto lease = cache.lookup(prompt);
    lookup_s.push_back(std::chrono::duration<double>(clock_type::now() - t0).count());
    if (lease.tokens() != chunks * 256) {
      std::fprintf(stderr, "lookup hit %zu of %zu tokens\n", lease.tokens(), chunks * 256);
      return 1;
    }
  }
  auto pct = [](std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1))];
  };
  const double h50 = pct(hash_s, 0.5), l50 = pct(lookup_s, 0.5), l99 = pct(lookup_s, 0.99);
  std::printf("fully cached prompt of %zu tokens (%zu chunks), %d runs\n", tokens, chunks, iters);
  std::printf("  hashing          p50 %8.1f us  (%.2f ns/token, %.2f GB/s of token ids)\n",
              h50 * 1e6, h50 * 1e9 / static_cast<double>(tokens),
              static_cast<double>(tokens * 4) / h50 / 1e9);
  std::printf("  lookup           p50 %8.1f us  p99 %8.1f us\n", l50 * 1e6, l99 * 1e6);
  std::printf("  lookup - hashing p50 %8.1f us  (target <= 20 us: ratio %.2f)\n", (l50 - h50) * 1e6,
              (l50 - h50) * 1e6 / 20.0);
  return 0;
}
