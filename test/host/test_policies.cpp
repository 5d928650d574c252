// Tier-chain policies (write-through, write-back, admission after N hits), prefetch, and the
// disk tier's batched I/O engine (io_uring and the thread-pool fallback).
#include "support.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;
using C = kvtier::cache<o::chunk_tokens<16>, o::tiers<host, disk>>;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t slot = 4096;
constexpr std::size_t record = 4096 + 4096;

struct fixture {
  std::filesystem::path dir;
  C cache;
  test::engine<nhd> eng{test::small_model, 64, 1};
  std::vector<std::int32_t> bt = test::shuffled_table(16, 64, 3);

  fixture(const char* name, kvtier::cache_config cfg, disk::config dc = {})
      : dir(test::temp_dir(name)),
        cache(test::small_model, test::small_salt, {{4 * slot}, with_dir(dc, dir)}, cfg) {}
  static disk::config with_dir(disk::config dc, const std::filesystem::path& d) {
    dc.path = d;
    dc.capacity_bytes = 16 * record;
    return dc;
  }
  // Retrieves `p` into a fresh engine and checks every byte against the source.
  bool loads_exact(const std::vector<kvtier::token_id>& p) {
    auto l = cache.lookup(p);
    if (l.tokens() != p.size()) return false;
    test::engine<nhd> dst(test::small_model, 64, 9);
    const auto bt2 = test::shuffled_table(16, 64, 4);
    return cache.retrieve(l, dst.kv(), bt2) == p.size() &&
           test::same_tokens(eng, bt, dst, bt2, 0, p.size());
  }
  // Waits until lookup finds `p` entirely in the first tier.
  bool wait_in_host(const std::vector<kvtier::token_id>& p) {
    for (int i = 0; i < 400; ++i) {
      if (cache.lookup(p).hits_in(0) * 16 == p.size()) return true;
      std::this_thread::sleep_for(5ms);
    }
    return false;
  }
};

kvtier::cache_config mode(kvtier::write_mode m) {
  kvtier::cache_config c;
  c.mode = m;
  return c;
}

}  // namespace

TEST_CASE("write-back: a chunk reaches disk only when the host tier evicts it") {
  fixture f("wb", mode(kvtier::write_mode::write_back));
  const auto p = test::tokens(32, 1);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 32);
  std::this_thread::sleep_for(20ms);
  CHECK(f.cache.stats().tiers[1].writes == 0);  // nothing written yet
  // Four new chunks fill the host tier: p's two chunks are the LRU victims. Their eviction
  // queues their write-back; the store takes the two free slots first, then waits for none.
  const auto q = test::tokens(64, 2);
  const std::size_t stored = f.cache.store(q, f.eng.kv(), f.bt);
  CHECK(stored >= 32);
  // (flush() would write back q's chunks too: wait for the two write-backs instead.)
  for (int i = 0; i < 400 && f.cache.stats().tiers[0].evictions < 2; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  auto s = f.cache.stats();
  CHECK(s.tiers[1].writes == 2);
  CHECK(s.tiers[1].write_backs == 2);
  CHECK(s.tiers[0].evictions == 2);  // freed once written
  auto l = f.cache.lookup(p);
  CHECK(l.hits_in(1) == 2);
  l.reset();
  CHECK(f.loads_exact(p));
}

TEST_CASE("write-back: flush writes back every chunk still owed") {
  fixture f("wb-flush", mode(kvtier::write_mode::write_back));
  const auto p = test::tokens(48, 3);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 48);
  f.cache.flush();
  CHECK(f.cache.stats().tiers[1].writes == 3);
  CHECK(f.cache.stats().tiers[1].write_backs == 0);  // written by flush, not by eviction
  CHECK(f.cache.lookup(p).hits_in(0) == 3);          // and still in host memory
  f.cache.flush();
  CHECK(f.cache.stats().tiers[1].writes == 3);  // nothing owed any more
}

TEST_CASE("write-through: every chunk is queued for disk as soon as it is stored") {
  fixture f("wt", mode(kvtier::write_mode::write_through));
  REQUIRE(f.cache.store(test::tokens(48, 4), f.eng.kv(), f.bt) == 48);
  f.cache.flush();
  CHECK(f.cache.stats().tiers[1].writes == 3);
  CHECK(f.cache.stats().tiers[1].write_backs == 0);
}

TEST_CASE("admission: the disk takes a chunk only after N hits in the host tier") {
  disk::config dc;
  dc.admit_after_hits = 2;
  SUBCASE("write-through") {
    fixture f("admit-wt", mode(kvtier::write_mode::write_through), dc);
    const auto p = test::tokens(32, 5);
    REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 32);
    f.cache.flush();
    CHECK(f.cache.stats().tiers[1].writes == 0);
    f.cache.lookup(p).reset();
    f.cache.flush();
    CHECK(f.cache.stats().tiers[1].writes == 0);
    f.cache.lookup(p).reset();
    f.cache.flush();
    CHECK(f.cache.stats().tiers[1].writes == 2);
  }
  SUBCASE("write-back: an evicted chunk that was not hit enough is not written") {
    fixture f("admit-wb", mode(kvtier::write_mode::write_back), dc);
    const auto hot = test::tokens(16, 6), cold = test::tokens(16, 7);
    REQUIRE(f.cache.store(hot, f.eng.kv(), f.bt) == 16);
    REQUIRE(f.cache.store(cold, f.eng.kv(), f.bt) == 16);
    f.cache.lookup(hot).reset();
    f.cache.lookup(hot).reset();
    // Evict both: four new chunks.
    REQUIRE(f.cache.store(test::tokens(64, 8), f.eng.kv(), f.bt) >= 32);
    f.cache.flush();
    CHECK(f.cache.lookup(hot).hits_in(1) == 1);
    CHECK(f.cache.lookup(cold).tokens() == 0);
    CHECK(f.cache.stats().tiers[1].writes == 1);
  }
}

TEST_CASE("prefetch loads disk chunks into the host tier in the background") {
  fixture f("prefetch", {});
  const auto p = test::tokens(48, 10);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 48);
  f.cache.flush();
  REQUIRE(f.cache.store(test::tokens(64, 11), f.eng.kv(), f.bt) == 64);  // evicts p from host
  f.cache.flush();
  REQUIRE(f.cache.lookup(p).hits_in(1) == 3);
  CHECK(f.cache.prefetch(p) == 48);
  CHECK(f.wait_in_host(p));
  CHECK(f.cache.stats().prefetched == 3);
  CHECK(f.cache.stats().tiers[1].promotions == 3);
  CHECK(f.loads_exact(p));
  CHECK(f.cache.prefetch(p) == 0);  // already in host memory
  // Nothing cached: nothing to start; a prefix stops at the first chunk no tier holds.
  CHECK(f.cache.prefetch(test::tokens(32, 12)) == 0);
}

TEST_CASE("prefetch of a corrupt disk record publishes nothing and counts an error") {
  fixture f("prefetch-bad", {});
  const auto p = test::tokens(16, 13);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 16);
  f.cache.flush();
  REQUIRE(f.cache.store(test::tokens(64, 14), f.eng.kv(), f.bt) == 64);
  f.cache.flush();
  // Chunk p is in disk slot 0; flip a payload byte.
  const int fd = ::open(f.cache.tier<1>().file().c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  unsigned char b = 0;
  REQUIRE(::pread(fd, &b, 1, 4096 + 7) == 1);
  b ^= 1;
  REQUIRE(::pwrite(fd, &b, 1, 4096 + 7) == 1);
  ::close(fd);
  CHECK(f.cache.prefetch(p) == 16);
  for (int i = 0; i < 400 && f.cache.stats().tiers[1].errors == 0; ++i)
    std::this_thread::sleep_for(5ms);
  CHECK(f.cache.stats().tiers[1].errors == 1);
  CHECK(f.cache.lookup(p).tokens() == 0);  // gone from every tier
}

TEST_CASE("the disk tier's two I/O backends store and load the same bytes") {
  disk::config dc;
  SUBCASE("io_uring where built in") { dc.use_io_uring = true; }
  SUBCASE("thread pool") { dc.use_io_uring = false; }
  dc.segment_bytes = 4096;  // many segments per record: exercises the queue depth
  dc.queue_depth = 3;
  dc.sync = kvtier::tier::durability::each_batch;
  fixture f("backends", {}, dc);
#if defined(KVTIER_USE_IO_URING)
  CHECK(std::string(f.cache.tier<1>().io_backend()) == (dc.use_io_uring ? "io_uring" : "threads"));
#else
  CHECK(std::string(f.cache.tier<1>().io_backend()) == "threads");
#endif
  const auto p = test::tokens(64, 15);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 64);
  f.cache.flush();
  REQUIRE(f.cache.store(test::tokens(64, 16), f.eng.kv(), f.bt) == 64);
  f.cache.flush();
  CHECK(f.cache.lookup(p).hits_in(1) == 4);
  CHECK(f.loads_exact(p));
  CHECK(f.cache.stats().tiers[1].errors == 0);
}

TEST_CASE("io_engine: segmented batches, errors and short files") {
  for (bool uring : {true, false}) {
    CAPTURE(uring);
    kvtier::detail::io_engine io(2, 4, 4096, uring);
    const auto dir = test::temp_dir("io-engine");
    const auto file = dir / "f";
    const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    REQUIRE(fd >= 0);
    std::vector<unsigned char> a(40000), b(40000);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<unsigned char>(i * 7 + 1);
    std::array<kvtier::detail::io_op, 2> w{
        {{fd, true, a.data(), 30000, 0}, {fd, true, a.data() + 30000, 10000, 50000}}};
    CHECK(io.run(w));
    CHECK(w[0].res == 30000);
    CHECK(w[1].res == 10000);
    std::array<kvtier::detail::io_op, 2> r{
        {{fd, false, b.data(), 30000, 0}, {fd, false, b.data() + 30000, 10000, 50000}}};
    CHECK(io.run(r));
    CHECK(std::memcmp(a.data(), b.data(), 40000) == 0);
    // Past the end of the file: -ENODATA; a bad descriptor: -EBADF; the other op still runs.
    std::vector<unsigned char> c(300);  // each op its own buffer: they run concurrently
    std::array<kvtier::detail::io_op, 3> bad{{{fd, false, b.data(), 20000, 50000},
                                              {-1, false, c.data(), 100, 0},
                                              {fd, false, c.data() + 100, 100, 0}}};
    CHECK_FALSE(io.run(bad));
    CHECK(bad[0].res == -ENODATA);
    CHECK(bad[1].res == -EBADF);
    CHECK(bad[2].res == 100);
    ::close(fd);
  }
}

TEST_CASE("policy and disk settings out of range are rejected, naming them") {
  const auto dir = test::temp_dir("bad-settings");
  disk::config dc{dir, 16 * record};
  dc.queue_depth = 0;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{4 * slot}, dc}),
                       doctest::Contains("queue_depth 0"), kvtier::invalid_argument);
  dc.queue_depth = 8;
  dc.segment_bytes = 1000;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{4 * slot}, dc}),
                       doctest::Contains("segment_bytes 1000"), kvtier::invalid_argument);
  dc.segment_bytes = 4096;
  dc.admit_after_hits = 300;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{4 * slot}, dc}),
                       doctest::Contains("admit_after_hits 300"), kvtier::invalid_argument);
  dc.admit_after_hits = 0;
  kvtier::cache_config cfg;
  cfg.prefetch_queue_depth = 0;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{4 * slot}, dc}, cfg),
                       doctest::Contains("prefetch_queue_depth"), kvtier::invalid_argument);
}
