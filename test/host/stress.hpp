#pragma once
// The threaded stress of issue 16's guards, shared by test_stress (host, disk), test_faults (disk
// faults) and test_redis (host, disk, Redis): prompts with shared prefixes, a reference whose
// bytes are a function of the chunk key, and workers that store, load, pin and clear while every
// loaded byte, every pin and every lease is checked.
#include "support.hpp"

#include <atomic>
#include <thread>

namespace stress {

using nhd = kvtier::layout::vllm_flash_nhd;
constexpr std::size_t N = 16;

// Prompt p: a family prefix (p % 4) and its own suffix; 3 to 6 chunks.
inline std::vector<kvtier::token_id> prompt(std::size_t p) {
  auto t = test::tokens(2 * N, static_cast<std::uint32_t>(5000 + p % 4));
  const auto suffix = test::tokens(N + (p % 4) * N, static_cast<std::uint32_t>(7000 + p));
  t.insert(t.end(), suffix.begin(), suffix.end());
  return t;
}

// The reference: a chunk's bytes are a function of its key, so a byte loaded under a key is
// right only if it is that key's.
template <class Cache>
void fill(const Cache& c, test::engine<nhd>& eng, const std::vector<std::int32_t>& bt,
          const std::vector<kvtier::token_id>& toks) {
  std::vector<kvtier::chunk_key> keys(c.chunk_count(toks.size()));
  c.keys(toks, keys);
  const std::size_t row = test::small_model.head_size * test::small_model.dtype_size;
  for (std::size_t t = 0; t < keys.size() * N; ++t) {
    std::mt19937_64 rng(keys[t / N].lo ^ (t % N) * 0x9E3779B97F4A7C15ull);
    eng.for_token(bt, t, [&](const std::byte* p) {
      auto* w = const_cast<std::byte*>(p);
      for (std::size_t i = 0; i < row; ++i) w[i] = static_cast<std::byte>(rng());
    });
  }
}

struct tally {
  std::atomic<std::size_t> ops{0}, loaded{0}, wrong{0}, pin_broken{0}, lease_broken{0};
};

// One thread's work: stores, lookups + retrieves (bytes checked), pins held across other
// threads' churn (the pinned prefix must stay found), clears.
template <class Cache>
void worker(Cache& cache, tally& t, std::uint32_t seed, int iters, bool leases_exact) {
  std::mt19937 rng(seed);
  test::engine<nhd> eng(test::small_model, 64, seed);
  test::engine<nhd> want(test::small_model, 64, 0);
  for (int i = 0; i < iters; ++i) {
    const auto toks = prompt(rng() % 16);
    const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, rng());
    ++t.ops;
    switch (rng() % 8) {
      case 0:
      case 1:
      case 2:
        fill(cache, eng, bt, toks);
        (void)cache.store(toks, eng.kv(), bt);
        break;
      case 3: {
        auto pin = cache.pin(toks);
        for (int k = 0; k < 3; ++k) {
          std::this_thread::yield();
          auto l = cache.lookup(toks);
          if (l.tokens() < pin.tokens()) ++t.pin_broken;  // a pinned chunk was evicted or cleared
        }
        // The handle undoes exactly the chunks it pinned. (Before pin handles, unpin(toks) also
        // dropped the pins other threads held on chunks of toks this pin had not reached.)
        (void)cache.unpin(pin);
        break;
      }
      case 4:
        if (rng() % 4 == 0) (void)cache.clear(toks);
        break;
      default: {
        auto l = cache.lookup(toks);
        const std::size_t leased = l.tokens();
        std::this_thread::yield();  // others evict and clear meanwhile: the lease must hold
        eng.wipe();
        const std::size_t n = cache.retrieve(l, eng.kv(), bt);
        if (n > leased || n % N != 0 || (leases_exact && n != leased)) ++t.lease_broken;
        fill(cache, want, bt, toks);
        if (!test::same_tokens(eng, bt, want, bt, 0, n)) ++t.wrong;
        t.loaded += n;
      }
    }
  }
}

template <class Cache>
void run(Cache& cache, bool leases_exact, int threads, int iters) {
  tally t;
  std::vector<std::thread> pool;
  for (int w = 0; w < threads; ++w) {
    pool.emplace_back(
        [&, w] { worker(cache, t, 100 + static_cast<std::uint32_t>(w), iters, leases_exact); });
  }
  for (auto& th : pool) th.join();
  CHECK(t.wrong == 0);
  CHECK(t.pin_broken == 0);
  CHECK(t.lease_broken == 0);
  CHECK(t.loaded > 0);
  MESSAGE(threads << " threads, " << t.ops.load() << " operations, " << t.loaded.load() * 128
                  << " bytes loaded and verified, " << t.wrong.load() << " wrong, "
                  << t.pin_broken.load() << " pins and " << t.lease_broken.load()
                  << " leases broken");
}

}  // namespace stress
