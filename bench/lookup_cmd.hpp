#pragma once
// kvtier-bench lookup: the cost of the control path.

#include "common.hpp"

#include <numeric>

namespace bench {

template <std::size_t N>
void run_lookup(const std::vector<std::size_t>& sizes, int iters, report& rep) {
  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<N>>;
  // Payload bytes do not matter here: 1 layer, 1 head of 8 one-byte elements.
  const kvtier::model_shape m{1, 1, 8, 1, 16};
  const std::size_t max_tokens = *std::max_element(sizes.begin(), sizes.end());
  const std::size_t max_chunks = max_tokens / N;
  kvtier::cache_config cfg;
  cfg.max_tokens = max_tokens;
  cache_t cache(m, {"kvtier-bench", "fp8", 0, 1, ""}, {{(max_chunks + 8) * 4096}}, cfg);
  const auto blocks = static_cast<std::int64_t>(max_tokens / 16);
  const auto shape_arr = kvtier::layout::shape_of<kvtier::layout::vllm_flash_nhd>(m, blocks);
  std::vector<std::int64_t> shape(shape_arr.begin(), shape_arr.end());
  aligned_buffer layer(static_cast<std::size_t>(2 * blocks * 16 * 8));
  std::vector<void*> ptrs{layer.data};
  const kvtier::engine_kv kv{ptrs, shape};
  std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
  std::iota(table.begin(), table.end(), 0);
  std::vector<kvtier::chunk_key> keys(max_chunks + 1);
  progress bar("lookup", sizes.size() * 3);
  for (std::size_t tokens : sizes) {
    std::vector<kvtier::token_id> prompt(tokens);
    for (std::size_t i = 0; i < tokens; ++i)
      prompt[i] = static_cast<kvtier::token_id>((i * 7919 + tokens) % 128000);
    for (int pct : {0, 50, 100}) {
      cache.clear();
      const std::size_t cached = tokens / N * static_cast<std::size_t>(pct) / 100 * N;
      if (cached > 0 && cache.store(std::span(prompt).first(cached), kv, table) != cached) {
        throw std::runtime_error("could not store the cached part");
      }
      std::vector<double> hash, look;
      for (int i = 0; i < iters; ++i) {
        auto t0 = clock_type::now();
        cache.keys(prompt, keys);
        hash.push_back(seconds_since(t0));
        t0 = clock_type::now();
        auto l = cache.lookup(prompt);
        look.push_back(seconds_since(t0));
        if (l.tokens() != cached) throw std::runtime_error("lookup found the wrong prefix");
      }
      const double h = percentile(hash, 0.5), l50 = percentile(look, 0.5);
      std::vector<std::pair<std::string, cell>> r{
          {"chunk", static_cast<double>(N)},
          {"tokens", static_cast<double>(tokens)},
          {"cached %", static_cast<double>(pct)},
          {"hash us", h * 1e6},
          {"hash ns/token", h * 1e9 / static_cast<double>(tokens)},
          {"lookup p50 us", l50 * 1e6},
          {"lookup p99 us", percentile(look, 0.99) * 1e6},
          {"minus hash us", (l50 - h) * 1e6},
      };
      if (tokens >= 131072 && pct == 100) {
        r.emplace_back("target us", 20.0);
        r.emplace_back("ratio", (l50 - h) * 1e6 / 20.0);
      }
      rep.row(std::move(r));
      bar.step();
    }
  }
  // Per-chunk overhead with tiny payloads, and heap allocations per operation in steady state.
  std::vector<kvtier::token_id> one(N);
  std::iota(one.begin(), one.end(), 1);
  cache.clear();
  std::vector<double> st, rt;
  for (int w = 0; w < 16; ++w) {  // warm every path
    (void)cache.store(one, kv, table);
    auto l = cache.lookup(one);
    (void)cache.retrieve(l, kv, table);
  }
  const int ops = std::max(iters, 200);
  st.reserve(static_cast<std::size_t>(ops));  // the bench's own vectors must not allocate below
  rt.reserve(static_cast<std::size_t>(ops));
  const std::uint64_t a0 = allocations.load();
  for (int i = 0; i < ops; ++i) {
    one[0] = static_cast<kvtier::token_id>(i + 1000);  // a new chunk each time: a real store
    auto t0 = clock_type::now();
    (void)cache.store(one, kv, table);
    st.push_back(seconds_since(t0));
    auto l = cache.lookup(one);
    t0 = clock_type::now();
    (void)cache.retrieve(l, kv, table);
    rt.push_back(seconds_since(t0));
  }
  const double per_op = static_cast<double>(allocations.load() - a0) / (3.0 * ops);
  const auto& ix = cache.template tier<0>().index();
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "chunk %zu: one-chunk store p50 %.2f us, retrieve p50 %.2f us (tiny payload); "
                "heap allocations per operation %.3f (target 0); metadata %.1f bytes per chunk "
                "(entry %zu + hash buckets; target <= 64)",
                N, percentile(st, 0.5) * 1e6, percentile(rt, 0.5) * 1e6, per_op,
                static_cast<double>(ix.metadata_bytes()) / static_cast<double>(ix.capacity()),
                sizeof(kvtier::detail::index_entry));
  rep.note(buf);
}

inline void lookup_command(args& a, bool json, const std::string& plot) {
  const auto sizes = a.list("tokens", "1024,4096,16384,65536,131072");
  const auto chunks = a.list("chunk", "256");
  const int iters = static_cast<int>(a.num("iters", 100));
  a.check_all_used();
  report rep(
      "kvtier-bench lookup: control-path cost (target: a fully cached 128k-token lookup "
      "in <= 20 us plus hashing)");
  for (std::size_t n : chunks)
    with_chunk_size(n, [&]<std::size_t N>() { run_lookup<N>(sizes, iters, rep); });
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
  if (!plot.empty()) {
    rep.plot(plot, "tokens", "lookup p50 us", "cached %", "prompt tokens", "lookup p50 (us)");
  }
}

}  // namespace bench
