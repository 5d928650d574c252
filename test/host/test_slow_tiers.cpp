// A lower tier that is slow, hangs or is gone never stops the first tier from caching: writes in
// progress hold at most cache_config.write_hold_percent of the first tier's slots, and a queued
// write gives its chunk's slot back (dropped, counted) when the first tier needs it (issue 16,
// item 3).
#include "support.hpp"

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using kvtier::chunk_key;
using namespace std::chrono_literals;

namespace {

enum class behaviour {
  slow,  // every batch takes 20 ms, then succeeds
  hung,  // every batch waits until released (bounded: 20 s, then fails as a timeout would)
  gone,  // every batch fails after a 20 ms connect timeout
};

struct control {
  std::mutex mu;
  std::condition_variable cv;
  bool released = false;
  std::size_t batches = 0, jobs = 0;
  void release() {
    {
      std::lock_guard lk(mu);
      released = true;
    }
    cv.notify_all();
  }
};

// A remote lower tier (asked by key, nothing held) whose writes behave as `how` says.
struct stalling {
  static constexpr const char* name = "stalling";
  static constexpr bool is_memory = false;
  struct config {
    behaviour how = behaviour::slow;
    control* ctl = nullptr;
  };
  template <class Eviction>
  class impl {
   public:
    impl(const config& c, const kvtier::tier::context&) : c_(c) {}
    void write_batch(std::span<kvtier::tier::write_job> jobs) {
      bool ok = true;
      {
        std::unique_lock lk(c_.ctl->mu);
        ++c_.ctl->batches;
        c_.ctl->jobs += jobs.size();
        if (c_.how == behaviour::hung) {
          ok = c_.ctl->cv.wait_for(lk, 20s, [&] { return c_.ctl->released; });
        }
      }
      if (c_.how == behaviour::slow) std::this_thread::sleep_for(20ms);
      if (c_.how == behaviour::gone) {
        std::this_thread::sleep_for(20ms);
        ok = false;
      }
      for (auto& j : jobs) j.ok = ok;
    }
    void read_batch(std::span<kvtier::tier::read_job> jobs) {
      for (auto& j : jobs) j.status = kvtier::tier::read_status::missing;
    }
    std::size_t probe(std::span<const chunk_key>) { return 0; }
    std::size_t remove(std::span<const chunk_key>) { return 0; }
    std::size_t remove_all() { return 0; }

   private:
    config c_;
  };
};

using C = kvtier::cache<o::chunk_tokens<16>, o::tiers<host, stalling>>;
constexpr std::size_t slot = 4096;  // one 16-token chunk of the small model, page-rounded

}  // namespace

TEST_CASE_TEMPLATE_DEFINE(
    "back-to-back stores all store over a lower tier that is slow, hung or "
    "gone",
    T, stores_over) {
  constexpr behaviour how = T::value;
  control ctl;
  // The case: a 16-chunk host tier, 60 back-to-back one-chunk stores.
  C cache(test::small_model, test::small_salt, {{16 * slot}, {how, &ctl}});
  test::engine<nhd> eng(test::small_model, 16, 1);
  const auto bt = test::shuffled_table(4, 16, 2);
  std::size_t empty = 0;
  for (std::uint32_t i = 0; i < 60; ++i) {
    empty += cache.store(test::tokens(16, 100 + i), eng.kv(), bt) == 0;
  }
  CHECK(empty == 0);  // was 44-47 of 60: every host slot held by a queued write
  const auto s = cache.stats();
  CHECK(s.stored_tokens == 60 * 16);
  CHECK(s.writes_dropped_for_room > 0);
  CHECK(s.tiers[1].dropped_writes >= s.writes_dropped_for_room);
  // Every chunk is written or counted as dropped (none waits forever).
  ctl.release();
  cache.flush();
  const auto f = cache.stats();
  CHECK(f.tiers[1].writes + f.tiers[1].errors + f.tiers[1].dropped_writes == 60);
  if (how == behaviour::gone) {
    CHECK(f.tiers[1].writes == 0);
    CHECK(f.tiers[1].errors == 60 - f.tiers[1].dropped_writes);
  } else {
    CHECK(f.tiers[1].writes > 0);
    CHECK(f.tiers[1].errors == 0);
  }
  // The most recent chunks are served from the host tier.
  CHECK(cache.lookup(test::tokens(16, 159)).hits_in(0) == 1);
}
template <behaviour B>
struct as_type {
  static constexpr behaviour value = B;
};
TEST_CASE_TEMPLATE_INVOKE(stores_over, as_type<behaviour::slow>, as_type<behaviour::hung>,
                          as_type<behaviour::gone>);

TEST_CASE("two hung lower tiers, each sent every chunk, do not starve the first tier either") {
  control a, b;
  using C2 = kvtier::cache<o::chunk_tokens<16>, o::tiers<host, stalling, stalling>>;
  C2 cache(test::small_model, test::small_salt,
           {{16 * slot}, {behaviour::hung, &a}, {behaviour::hung, &b}});
  test::engine<nhd> eng(test::small_model, 16, 1);
  const auto bt = test::shuffled_table(4, 16, 2);
  std::size_t empty = 0;
  for (std::uint32_t i = 0; i < 60; ++i) {
    empty += cache.store(test::tokens(16, 500 + i), eng.kv(), bt) == 0;
  }
  CHECK(empty == 0);
  CHECK(cache.lookup(test::tokens(16, 559)).hits_in(0) == 1);
  a.release();
  b.release();
  cache.flush();
  const auto s = cache.stats();
  CHECK(s.writes_dropped_for_room > 0);
  CHECK(s.tiers[1].writes + s.tiers[1].dropped_writes == 60);
  CHECK(s.tiers[2].writes + s.tiers[2].dropped_writes == 60);
}

TEST_CASE("while a lower tier hangs, its writes hold at most write_hold_percent of the slots") {
  control ctl;
  kvtier::cache_config cfg;
  cfg.write_hold_percent = 25;  // 4 of 16 slots
  C cache(test::small_model, test::small_salt, {{16 * slot}, {behaviour::hung, &ctl}}, cfg);
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 2);
  for (std::uint32_t i = 0; i < 8; ++i) {
    CHECK(cache.store(test::tokens(64, 200 + i), eng.kv(), bt) == 64);
  }
  // The hung tier was handed at most 4 chunks; the last three stores are all in host memory.
  {
    std::lock_guard lk(ctl.mu);
    CHECK(ctl.jobs <= 4);
  }
  for (std::uint32_t i = 5; i < 8; ++i) {
    CHECK(cache.lookup(test::tokens(64, 200 + i)).hits_in(0) == 4);
  }
  ctl.release();
  cache.flush();
  const auto s = cache.stats();
  CHECK(s.writes_dropped_for_room > 0);
  CHECK(s.tiers[1].dropped_writes == s.writes_dropped_for_room);
  CHECK(s.tiers[1].writes + s.tiers[1].dropped_writes == 32);  // each written or counted
}

TEST_CASE("write_hold_percent 100 lets writes in progress hold every slot; 0 and 101 are refused") {
  for (unsigned bad : {0u, 101u}) {
    kvtier::cache_config cfg;
    cfg.write_hold_percent = bad;
    control ctl;
    CHECK_THROWS_WITH_AS(
        C(test::small_model, test::small_salt, {{16 * slot}, {behaviour::slow, &ctl}}, cfg),
        test::contains("write_hold_percent " + std::to_string(bad) + " is out of range 1..100"),
        kvtier::invalid_argument);
  }
  control ctl;
  kvtier::cache_config cfg;
  cfg.write_hold_percent = 100;
  C cache(test::small_model, test::small_salt, {{4 * slot}, {behaviour::hung, &ctl}}, cfg);
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 2);
  CHECK(cache.store(test::tokens(64, 300), eng.kv(), bt) == 64);
  const auto until = std::chrono::steady_clock::now() + 10s;
  for (;;) {  // until the writer has taken all four chunks into its (hung) batch
    {
      std::lock_guard lk(ctl.mu);
      if (ctl.jobs == 4 || std::chrono::steady_clock::now() > until) break;
    }
    std::this_thread::sleep_for(1ms);
  }
  CHECK(cache.store(test::tokens(64, 301), eng.kv(), bt) == 0);  // every slot being written
  CHECK(cache.stats().writes_dropped_for_room == 0);
  ctl.release();
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 4);
}

namespace {
// An indexed lower tier whose storage holds `room` records: a write into a slot at or past it
// fails with no_space, as a local disk without preallocation does once the file system is full.
struct filling {
  static constexpr const char* name = "filling";
  static constexpr bool is_memory = false;
  struct config {
    std::size_t capacity = 8;
    std::size_t room = 4;
  };
  template <class Eviction>
  class impl {
   public:
    impl(const config& c, const kvtier::tier::context& ctx)
        : room_(c.room), index_(c.capacity), keys_(c.capacity), bytes_(c.capacity) {
      (void)ctx;
    }
    kvtier::detail::chunk_index<Eviction>& index() noexcept { return index_; }
    void write_batch(std::span<kvtier::tier::write_job> jobs) {
      std::lock_guard lk(mu_);
      for (auto& j : jobs) {
        j.ok = j.slot < room_;
        j.no_space = !j.ok;
        if (!j.ok) continue;
        keys_[j.slot] = j.key;
        bytes_[j.slot].assign(j.src, j.src + j.bytes);
      }
    }
    void read_batch(std::span<kvtier::tier::read_job> jobs) {
      std::lock_guard lk(mu_);
      for (auto& j : jobs) {
        const bool ok = keys_[j.slot] == j.key && bytes_[j.slot].size() == j.bytes;
        if (ok) std::copy(bytes_[j.slot].begin(), bytes_[j.slot].end(), j.dst);
        j.status = ok ? kvtier::tier::read_status::ok : kvtier::tier::read_status::corrupt;
      }
    }

   private:
    std::size_t room_;
    kvtier::detail::chunk_index<Eviction> index_;
    std::vector<chunk_key> keys_;
    std::vector<std::vector<std::byte>> bytes_;
    std::mutex mu_;
  };
};
}  // namespace

// Issue 16, item 4: once the storage is full, new chunks went to free slots it had no room for
// and failed, one after another, rather than evicting.
TEST_CASE("a lower tier that runs out of space evicts instead of failing every new chunk") {
  kvtier::cache<o::chunk_tokens<16>, o::tiers<host, filling>> cache(
      test::small_model, test::small_salt, {{4 * slot}, {8, 4}});
  test::engine<nhd> eng(test::small_model, 16, 1);
  const auto bt = test::shuffled_table(4, 16, 2);
  for (std::uint32_t i = 0; i < 8; ++i) {
    REQUIRE(cache.store(test::tokens(16, 400 + i), eng.kv(), bt) == 16);
    cache.flush();
  }
  const auto s = cache.stats();
  CHECK(s.tiers[1].errors == 1);  // the first write with no room (was 4: every later one too)
  CHECK(s.tiers[1].writes == 7);
  CHECK(s.tiers[1].used_chunks == 4);
  CHECK(cache.tier<1>().index().retired() == 4);  // slots 4 (the failed one) to 7
  // The newest chunks are in the lower tier: chunk 8's record was written by evicting.
  CHECK(cache.tier<1>().index().find_ready([&] {
    kvtier::chunk_key k;
    (void)cache.keys(test::tokens(16, 407), {&k, 1});
    return k;
  }()) != nullptr);
}
