// Guards for issue 16, sized for 2 cores: (1) threads storing, loading, pinning and clearing
// over tiny tiers while every pin and every lease is checked to hold; (2) a process SIGKILLed
// while it writes to disk, again and again on one directory, and a verifier after each kill that
// loads everything recovered and checks every byte.
#include "stress.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace o = kvtier::opt;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;

using stress::fill;
using stress::N;
using stress::nhd;
using stress::prompt;

TEST_CASE("stress: a tiny host tier, pins and leases honoured, every byte checked") {
  // 10 chunks for 4 threads whose prompts have 3-6 chunks: every store evicts.
  kvtier::cache<o::chunk_tokens<N>> cache(test::small_model, test::small_salt, {{10 * 4096}});
  stress::run(cache, true, 4, 400);
  CHECK(cache.stats().tiers[0].evictions > 0);
}

TEST_CASE("stress: tiny host and disk tiers, write-through, promotion, every byte checked") {
  kvtier::cache<o::chunk_tokens<N>, o::tiers<host, disk>> cache(
      test::small_model, test::small_salt, {{10 * 4096}, {test::temp_dir("stress"), 24 * 8192}});
  // A lease of disk chunks may load fewer tokens (no free host slot to promote into).
  stress::run(cache, false, 4, 400);
  cache.flush();
  CHECK(cache.stats().tiers[1].writes > 0);
  // How many writes the churn got through depends on the machine's speed (a first tier that
  // needs room drops queued writes), so disk eviction is made certain afterwards: 48 more chunks,
  // each store waited for, through 24 slots.
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(test::blocks_for(4 * N, 4), 64, 2);
  for (std::uint32_t p = 0; p < 12; ++p) {
    REQUIRE(cache.store(test::tokens(4 * N, 5000 + p), eng.kv(), bt) == 4 * N);
    cache.flush();
  }
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
