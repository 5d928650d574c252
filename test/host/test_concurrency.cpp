// Concurrent store / lookup / retrieve / pin / clear from several threads, with eviction churn
// and disk promotion, checking every loaded byte against what was stored under its key.
#include "stress.hpp"

#include <thread>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;

namespace {

constexpr std::size_t N = 16;

// Prompts share prefixes: prompt p = family prefix (p % 3) + its own suffix. KV bytes are a pure
// function of the chunk key, so any thread can verify any chunk it loads.
std::vector<kvtier::token_id> prompt(std::size_t p) {
  auto t = test::tokens(2 * N, static_cast<std::uint32_t>(1000 + p % 3));
  const auto suffix = test::tokens(2 * N + (p % 4) * N, static_cast<std::uint32_t>(p));
  t.insert(t.end(), suffix.begin(), suffix.end());
  return t;
}

// KV bytes are a pure function of the chunk key (the stress guards' reference).
using stress::fill;

template <class Cache>
void hammer(Cache& cache, int threads, int iters) {
  std::atomic<std::size_t> bad{0}, loaded{0};
  std::vector<std::thread> pool;
  for (int w = 0; w < threads; ++w) {
    pool.emplace_back([&, w] {
      std::mt19937 rng(static_cast<std::uint32_t>(w));
      test::engine<nhd> eng(test::small_model, 64, static_cast<std::uint32_t>(w));
      test::engine<nhd> want(test::small_model, 64, 0);
      for (int i = 0; i < iters; ++i) {
        const auto toks = prompt(rng() % 12);
        const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, rng());
        switch (rng() % 6) {
          case 0:
          case 1:
            fill(cache, eng, bt, toks);
            cache.store(toks, eng.kv(), bt);
            break;
          case 2: {
            auto pin = cache.pin(toks);
            (void)cache.unpin(pin);
            break;
          }
          case 3:
            if (rng() % 8 == 0) cache.clear(toks);
            break;
          default: {
            auto l = cache.lookup(toks);
            eng.wipe();
            const std::size_t n = cache.retrieve(l, eng.kv(), bt);
            if (n % N != 0 || n > toks.size()) ++bad;
            fill(cache, want, bt, toks);
            if (!test::same_tokens(eng, bt, want, bt, 0, n)) ++bad;
            loaded += n;
          }
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  CHECK(bad == 0);
  CHECK(loaded > 0);
  MESSAGE("tokens loaded and verified: " << loaded.load());
}

}  // namespace

TEST_CASE("concurrent callers on the host tier see only whole, correct chunks") {
  kvtier::cache<o::chunk_tokens<N>> cache(test::small_model, test::small_salt, {{12 * 4096}});
  hammer(cache, 4, 300);
  const auto s = cache.stats();
  CHECK(s.tiers[0].evictions > 0);
}

TEST_CASE("concurrent callers with disk write-through and promotion") {
  kvtier::cache<o::chunk_tokens<N>, o::tiers<host, disk>> cache(
      test::small_model, test::small_salt,
      {{10 * 4096}, {test::temp_dir("concurrent"), 64 * 8192}});
  hammer(cache, 4, 300);
  cache.flush();
  const auto s = cache.stats();
  CHECK(s.tiers[1].writes > 0);
  CHECK(s.tiers[1].errors == 0);
  MESSAGE("promotions: " << s.tiers[1].promotions << ", host evictions: " << s.tiers[0].evictions);
}
