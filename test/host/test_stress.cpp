// Guards for issue 16, sized for 2 cores: (1) threads storing, loading, pinning and clearing
// over tiny tiers while every pin and every lease is checked to hold; (2) a process SIGKILLed
// while it writes to disk, again and again on one directory, and a verifier after each kill that
// loads everything recovered and checks every byte.
#include "support.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;

namespace {

constexpr std::size_t N = 16;

// Prompt p: a family prefix (p % 4) and its own suffix; 3 to 6 chunks.
std::vector<kvtier::token_id> prompt(std::size_t p) {
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
        const std::size_t pinned = cache.pin(toks);
        for (int k = 0; k < 3; ++k) {
          std::this_thread::yield();
          auto l = cache.lookup(toks);
          if (l.tokens() < pinned) ++t.pin_broken;  // a pinned chunk was evicted or cleared
        }
        // Unpin exactly what was pinned: unpin(toks) would also drop the pins other threads
        // hold on chunks of toks this pin did not reach (pins are counts; see the note on
        // issue 16), which this test caught.
        (void)cache.unpin(std::span<const kvtier::token_id>(toks).first(pinned));
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
void stress(Cache& cache, bool leases_exact, int threads, int iters) {
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

}  // namespace

TEST_CASE("stress: a tiny host tier, pins and leases honoured, every byte checked") {
  // 10 chunks for 4 threads whose prompts have 3-6 chunks: every store evicts.
  kvtier::cache<o::chunk_tokens<N>> cache(test::small_model, test::small_salt, {{10 * 4096}});
  stress(cache, true, 4, 400);
  CHECK(cache.stats().tiers[0].evictions > 0);
}

TEST_CASE("stress: tiny host and disk tiers, write-through, promotion, every byte checked") {
  kvtier::cache<o::chunk_tokens<N>, o::tiers<host, disk>> cache(
      test::small_model, test::small_salt, {{10 * 4096}, {test::temp_dir("stress"), 24 * 8192}});
  // A lease of disk chunks may load fewer tokens (no free host slot to promote into).
  stress(cache, false, 4, 400);
  cache.flush();
  const auto s = cache.stats();
  CHECK(s.tiers[1].errors == 0);
  CHECK(s.tiers[1].evictions > 0);
}

TEST_CASE("crash: a writer SIGKILLed mid-write, then a verifier; again and again on one file") {
  using cache_t = kvtier::cache<o::chunk_tokens<N>, o::tiers<host, disk>>;
  const auto dir = test::temp_dir("crash");
  const disk::config dc{.path = dir, .capacity_bytes = 48 * 8192};
  std::mt19937 rng(9);
  std::size_t recovered_total = 0, verified_tokens = 0, wrong = 0, dropped = 0;
  for (int round = 0; round < 4; ++round) {
    // The writer: a fresh process (nothing of this one's threads), storing until killed.
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int rc = 0;
      try {
        cache_t c(test::small_model, test::small_salt, {{8 * 4096}, dc});
        test::engine<nhd> eng(test::small_model, 64, 1);
        for (std::uint32_t i = 0;; ++i) {
          const auto toks = prompt(i % 16 + 16 * static_cast<std::uint32_t>(round % 2));
          const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, i);
          fill(c, eng, bt, toks);
          (void)c.store(toks, eng.kv(), bt);
        }
      } catch (...) {
        rc = 3;
      }
      ::_exit(rc);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 400));
    ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
    REQUIRE(WIFSIGNALED(st));  // killed mid-run, not exited (a writer that threw exits 3)
    // The verifier: recovers the file and loads every prompt the writer could have stored.
    cache_t v(test::small_model, test::small_salt, {{64 * 4096}, dc});
    const auto s0 = v.stats();
    recovered_total += s0.tiers[1].recovered;
    dropped += s0.tiers[1].errors;
    test::engine<nhd> eng(test::small_model, 64, 2), want(test::small_model, 64, 0);
    for (std::size_t p = 0; p < 32; ++p) {
      const auto toks = prompt(p);
      const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, 77);
      eng.wipe();
      auto l = v.lookup(toks);
      const std::size_t n = v.retrieve(l, eng.kv(), bt);
      fill(v, want, bt, toks);
      if (!test::same_tokens(eng, bt, want, bt, 0, n)) ++wrong;
      verified_tokens += n;
    }
  }
  CHECK(wrong == 0);
  CHECK(recovered_total > 0);
  CHECK(verified_tokens > 0);
  MESSAGE("4 writers SIGKILLed mid-write: "
          << recovered_total << " records recovered, " << dropped << " dropped at open, "
          << verified_tokens * 128 << " bytes verified after recovery, " << wrong << " wrong");
}
