// Memory: engine-provided regions, mlock, and zero heap allocations per operation in steady state.
#include "support.hpp"

#include <sys/resource.h>

#include <cstdlib>
#include <new>

#include "alloc_counter.hpp"

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;

namespace {

// An engine's memory resource that records what it handed out.
struct counting_resource : std::pmr::memory_resource {
  std::size_t live_bytes = 0, calls = 0;
  void* do_allocate(std::size_t n, std::size_t a) override {
    ++calls;
    live_bytes += n;
    return std::pmr::new_delete_resource()->allocate(n, a);
  }
  void do_deallocate(void* p, std::size_t n, std::size_t a) override {
    live_bytes -= n;
    std::pmr::new_delete_resource()->deallocate(p, n, a);
  }
  bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override {
    return this == &o;
  }
};

template <class Cache>
std::uint64_t allocations_over(Cache& cache, test::engine<nhd>& eng,
                               const std::vector<std::int32_t>& bt, int rounds) {
  std::vector<std::vector<kvtier::token_id>> prompts;
  for (std::uint32_t i = 0; i < 8; ++i) prompts.push_back(test::tokens(64, i));
  auto round = [&](int r) {
    const auto& p = prompts[static_cast<std::size_t>(r) % prompts.size()];
    (void)cache.store(p, eng.kv(), bt);
    auto l = cache.lookup(p);
    (void)cache.retrieve(l, eng.kv(), bt);
    auto l2 = cache.lookup(p);
    cache.release(l2);
    auto pin = cache.pin(p);
    (void)cache.unpin(pin);
    if constexpr (!Cache::async_copies) {  // the layer-wise pipelines
      const auto& q = prompts[static_cast<std::size_t>(r + 3) % prompts.size()];
      auto sp = cache.begin_store(q, eng.kv(), bt);
      sp.store_all();
      (void)sp.finish();
      auto l3 = cache.lookup(q);
      auto rp = cache.begin_retrieve(l3, eng.kv(), bt);
      rp.retrieve_all();
      (void)rp.finish();
    }
  };
  for (int r = 0; r < 16; ++r) round(r);  // warm up: every path taken once
  cache.flush();
  (void)eng.kv();  // the test engine's own pointer vector, outside the measured window
  const std::uint64_t before = g_allocs.load();
  for (int r = 0; r < rounds; ++r) round(r);
  cache.flush();
  return g_allocs.load() - before;
}

}  // namespace

TEST_CASE("no heap allocation per operation in steady state (host tier, evicting)") {
  // Room for 6 of the 8 prompts' 32 chunks: stores evict all the time.
  kvtier::cache<o::chunk_tokens<16>> cache(test::small_model, test::small_salt, {{24 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 2);
  const std::uint64_t n = allocations_over(cache, eng, bt, 200);
  CHECK(n == 0);
  CHECK(cache.stats().tiers[0].evictions > 0);
}

TEST_CASE("no heap allocation per operation in steady state (host + disk, promoting)") {
  kvtier::cache<o::chunk_tokens<16>, o::tiers<host, disk>> cache(
      test::small_model, test::small_salt, {{8 * 4096}, {test::temp_dir("alloc"), 64 * 8192}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 2);
  const std::uint64_t n = allocations_over(cache, eng, bt, 100);
  CHECK(n == 0);
  const auto s = cache.stats();
  CHECK(s.tiers[1].writes > 0);
}

TEST_CASE("the host tier can take its memory from the engine's memory resource") {
  counting_resource res;
  {
    kvtier::cache<o::chunk_tokens<16>> cache(test::small_model, test::small_salt,
                                             {{8 * 4096, false, &res}});
    CHECK(res.calls == 1);
    CHECK(res.live_bytes == 8 * 4096);
    test::engine<nhd> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
    const auto bt = test::shuffled_table(16, 64, 2);
    const auto p = test::tokens(64, 1);
    CHECK(cache.store(p, eng.kv(), bt) == 64);
    auto l = cache.lookup(p);
    CHECK(cache.retrieve(l, dst.kv(), bt) == 64);
    CHECK(test::same_tokens(eng, bt, dst, bt, 0, 64));
    const auto* first = cache.tier<0>().data(0);
    CHECK(reinterpret_cast<std::uintptr_t>(first) % 4096 == 0);
  }
  CHECK(res.live_bytes == 0);  // handed back at destruction
}

TEST_CASE("lock_memory locks the slab, or fails with a tier_error naming the size") {
  rlimit lim{};
  ::getrlimit(RLIMIT_MEMLOCK, &lim);
  const std::size_t bytes = 16 * 4096;
  using C = kvtier::cache<o::chunk_tokens<16>>;
  if (lim.rlim_cur == RLIM_INFINITY || lim.rlim_cur >= 4 * bytes) {
    C cache(test::small_model, test::small_salt, {{bytes, true}});
    CHECK(cache.tier<0>().slab().memory().locked());
  }
  // Beyond the limit (when there is one we may not raise), the error names the size.
  if (lim.rlim_cur != RLIM_INFINITY && ::geteuid() != 0) {
    const std::size_t too_big = static_cast<std::size_t>(lim.rlim_cur) + (std::size_t{64} << 20);
    CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{too_big, true}}),
                         doctest::Contains("mlock of"), kvtier::tier_error);
  }
}
