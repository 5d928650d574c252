// The Redis/Valkey tier against real servers started by ctest fixtures (servers.sh): write
// and load exact bytes, verification of every value, TTL, clear, admission, a server restart
// survived without restarting the cache, and Redis Cluster with ASK and MOVED redirections.
#include "support.hpp"
#include "../host/stress.hpp"

#include <thread>

namespace {

using test::raw;
using test::slot;

int single_port() { return test::read_ports("single.port").front(); }
std::string addr(int port) { return "127.0.0.1:" + std::to_string(port); }
void servers(const std::string& cmd) {
  const std::string line =
      "bash '" KVTIER_REDIS_SCRIPT "' " + cmd + " '" + test::servers_dir() + "' >/dev/null";
  REQUIRE(std::system(line.c_str()) == 0);
}

remote::config single_config(std::string prefix) {
  remote::config rc;
  rc.nodes = {addr(single_port())};
  rc.key_prefix = std::move(prefix);
  rc.timeout = 500ms;
  rc.backoff_min = 20ms;
  rc.backoff_max = 100ms;
  return rc;
}

struct engine_fixture {
  test::engine<nhd> eng{test::small_model, 64, 1};
  std::vector<std::int32_t> bt = test::shuffled_table(16, 64, 3);
};

}  // namespace

TEST_CASE("chunks written to redis load back exact into a cache with an empty host tier") {
  engine_fixture f;
  const auto rc = single_config("exact");
  const auto p = test::tokens(64, 1);
  {
    C writer(test::small_model, test::small_salt, {{16 * slot}, rc});
    CHECK(writer.store(p, f.eng.kv(), f.bt) == 64);
    writer.flush();
    const auto s = writer.stats();
    CHECK(s.tiers[1].writes == 4);
    CHECK(s.tiers[1].bytes_written == 4 * writer.format().bytes(16));
    CHECK(s.tiers[1].errors == 0);
    std::array<kvtier::chunk_key, 4> ks;
    writer.keys(p, ks);
    raw r(single_port());
    for (const auto& k : ks) CHECK(r.integer("EXISTS %s", writer.tier<1>().key_of(k).c_str()) == 1);
  }
  C reader(test::small_model, test::small_salt, {{16 * slot}, rc});
  auto l = reader.lookup(p);
  CHECK(l.tokens() == 64);
  CHECK(l.hits_in(1) == 4);
  test::engine<nhd> dst(test::small_model, 64, 2);
  const auto bt2 = test::shuffled_table(16, 64, 4);
  CHECK(reader.retrieve(l, dst.kv(), bt2) == 64);
  CHECK(test::same_tokens(f.eng, f.bt, dst, bt2, 0, 64));
  const auto s = reader.stats();
  CHECK(s.tiers[1].promotions == 4);
  CHECK(reader.lookup(p).hits_in(0) == 4);  // promoted into host memory
  // A longer prompt: its cached prefix is found, the rest is a miss.
  auto longer = p;
  for (int i = 0; i < 32; ++i) longer.push_back(7000 + i);
  C other(test::small_model, test::small_salt, {{16 * slot}, rc});
  CHECK(other.lookup(longer).tokens() == 64);
}

TEST_CASE("a redis value that is not the chunk's record is a miss and a counted error") {
  engine_fixture f;
  const auto rc = single_config("tamper");
  const auto p = test::tokens(32, 5);
  C writer(test::small_model, test::small_salt, {{16 * slot}, rc});
  REQUIRE(writer.store(p, f.eng.kv(), f.bt) == 32);
  writer.flush();
  std::array<kvtier::chunk_key, 2> ks;
  writer.keys(p, ks);
  const std::string k0 = writer.tier<1>().key_of(ks[0]), k1 = writer.tier<1>().key_of(ks[1]);
  raw r(single_port());
  SUBCASE("a flipped payload byte") {
    auto v = r.cmd("GET %s", k0.c_str());
    REQUIRE(v->type == REDIS_REPLY_STRING);
    std::string bytes(v->str, v->len);
    bytes[bytes.size() - 3] ^= 0x5a;
    r.cmd("SET %s %b", k0.c_str(), bytes.data(), bytes.size());
  }
  SUBCASE("another chunk's record under this key") {
    auto v = r.cmd("GET %s", k1.c_str());
    REQUIRE(v->type == REDIS_REPLY_STRING);
    r.cmd("SET %s %b", k0.c_str(), v->str, v->len);
  }
  SUBCASE("a truncated value") { r.cmd("SET %s %s", k0.c_str(), "short"); }
  C reader(test::small_model, test::small_salt, {{16 * slot}, rc});
  auto l = reader.lookup(p);
  REQUIRE(l.hits_in(1) == 2);  // existence is all lookup checks
  test::engine<nhd> dst(test::small_model, 64, 2);
  dst.wipe();
  CHECK(reader.retrieve(l, dst.kv(), f.bt) == 0);  // chunk 0 is bad: nothing is served
  CHECK(reader.stats().tiers[1].errors == 1);
  for (const auto& t : dst.storage) {
    CHECK(std::all_of(t.begin(), t.end(), [](std::byte b) { return b == std::byte{0}; }));
  }
  // The bad value was deleted: lookups no longer report it.
  CHECK(r.integer("EXISTS %s", k0.c_str()) == 0);
  C again(test::small_model, test::small_salt, {{16 * slot}, rc});
  CHECK(again.lookup(p).tokens() == 0);
}

TEST_CASE("redis keys carry the salt: another model's cache never sees them") {
  engine_fixture f;
  const auto rc = single_config("salted");
  const auto p = test::tokens(32, 6);
  C a(test::small_model, test::small_salt, {{16 * slot}, rc});
  REQUIRE(a.store(p, f.eng.kv(), f.bt) == 32);
  a.flush();
  kvtier::salt other = test::small_salt;
  other.model_id = "another-model";
  C b(test::small_model, other, {{16 * slot}, rc});
  CHECK(b.lookup(p).tokens() == 0);
}

TEST_CASE("a redis ttl expires written chunks") {
  engine_fixture f;
  auto rc = single_config("ttl");
  rc.ttl = 60000ms;
  C cache(test::small_model, test::small_salt, {{16 * slot}, rc});
  const auto p = test::tokens(16, 7);
  REQUIRE(cache.store(p, f.eng.kv(), f.bt) == 16);
  cache.flush();
  std::array<kvtier::chunk_key, 1> k;
  cache.keys(p, k);
  raw r(single_port());
  const long long pttl = r.integer("PTTL %s", cache.tier<1>().key_of(k[0]).c_str());
  CHECK(pttl > 50000);
  CHECK(pttl <= 60000);
}

TEST_CASE("clear removes chunks from redis too") {
  engine_fixture f;
  const auto rc = single_config("clear");
  C cache(test::small_model, test::small_salt, {{16 * slot}, rc});
  const auto p = test::tokens(48, 8), q = test::tokens(32, 9);
  REQUIRE(cache.store(p, f.eng.kv(), f.bt) == 48);
  REQUIRE(cache.store(q, f.eng.kv(), f.bt) == 32);
  cache.flush();
  CHECK(cache.clear(p) == 48);
  C fresh(test::small_model, test::small_salt, {{16 * slot}, rc});
  CHECK(fresh.lookup(p).tokens() == 0);
  CHECK(fresh.lookup(q).tokens() == 32);
  CHECK(cache.clear() >= 2);  // q's two chunks in host and in redis
  CHECK(fresh.lookup(q).hits_in(1) == 0);
  // Issue 16, item 5: a chunk stored again after its clear is there for a restarted cache, once.
  REQUIRE(cache.store(p, f.eng.kv(), f.bt) == 48);
  cache.flush();
  C restarted(test::small_model, test::small_salt, {{16 * slot}, rc});
  auto l = restarted.lookup(p);
  CHECK(l.hits_in(1) == 3);
  test::engine<nhd> dst(test::small_model, 64, 2);
  CHECK(restarted.retrieve(l, dst.kv(), f.bt) == 48);
  CHECK(test::same_tokens(f.eng, f.bt, dst, f.bt, 0, 48));
  CHECK(restarted.stats().tiers[1].errors == 0);
  CHECK(restarted.lookup(q).tokens() == 0);  // q stays cleared
}

TEST_CASE("admit_after_hits: redis takes a chunk only once it was hit that often") {
  engine_fixture f;
  auto rc = single_config("admit");
  rc.admit_after_hits = 2;
  C cache(test::small_model, test::small_salt, {{16 * slot}, rc});
  const auto p = test::tokens(32, 10);
  REQUIRE(cache.store(p, f.eng.kv(), f.bt) == 32);
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 0);
  cache.lookup(p).reset();
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 0);  // one hit: not yet
  cache.lookup(p).reset();
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 2);  // second hit: admitted
  cache.lookup(p).reset();
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 2);  // written once
}

TEST_CASE("an unreachable redis at construction is a tier_error naming it") {
  auto rc = single_config("down");
  rc.nodes = {"127.0.0.1:1"};
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{16 * slot}, rc}),
                       doctest::Contains("127.0.0.1:1"), kvtier::tier_error);
  rc.nodes = {"localhost"};
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{16 * slot}, rc}),
                       doctest::Contains("'localhost' is not host:port"), kvtier::invalid_argument);
  rc.nodes = {addr(single_port())};
  rc.timeout = 0ms;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{16 * slot}, rc}),
                       doctest::Contains("timeout 0"), kvtier::invalid_argument);
}

TEST_CASE("a redis restart: calls stay prompt while it is down, and it is used again after") {
  engine_fixture f;
  const auto rc = single_config("restart");
  C cache(test::small_model, test::small_salt, {{64 * slot}, rc});
  const auto before = test::tokens(32, 11);
  REQUIRE(cache.store(before, f.eng.kv(), f.bt) == 32);
  cache.flush();
  REQUIRE(cache.stats().tiers[1].writes == 2);

  servers("stop-single");
  const auto t0 = std::chrono::steady_clock::now();
  const auto during = test::tokens(32, 12);
  CHECK(cache.store(during, f.eng.kv(), f.bt) == 32);  // host takes it; redis write fails
  cache.flush();
  const auto elapsed = std::chrono::steady_clock::now() - t0;
  CHECK(elapsed < 2s);
  CHECK(cache.stats().tiers[1].errors >= 2);
  CHECK(cache.lookup(test::tokens(48, 13)).tokens() == 0);  // remote miss, promptly
  CHECK(cache.tier<1>().stats().failures >= 1);

  servers("restart-single");
  std::this_thread::sleep_for(150ms);  // past the longest backoff
  const auto after = test::tokens(32, 14);
  REQUIRE(cache.store(after, f.eng.kv(), f.bt) == 32);
  cache.flush();
  C fresh(test::small_model, test::small_salt, {{64 * slot}, rc});
  CHECK(fresh.lookup(after).hits_in(1) == 2);  // written after the restart
  CHECK(fresh.lookup(before).tokens() == 0);   // the server kept nothing (no persistence)
}

TEST_CASE("a hung redis: lookups miss within the timeout, stores never wait, writes drop") {
  engine_fixture f;
  auto rc = single_config("hung");
  rc.timeout = 200ms;
  kvtier::cache_config cfg;
  cfg.write_queue_depth = 2;
  C cache(test::small_model, test::small_salt, {{64 * slot}, rc}, cfg);
  const auto p = test::tokens(16, 40);
  REQUIRE(cache.store(p, f.eng.kv(), f.bt) == 16);
  cache.flush();
  C reader(test::small_model, test::small_salt, {{64 * slot}, rc});
  servers("pause-single");
  struct resume {
    ~resume() { servers("resume-single"); }
  } guard;
  // Stores: the host tier takes them at once; the writer is stuck on the server, its queue
  // fills, and further writes are dropped and counted.
  std::chrono::nanoseconds worst{0};
  for (std::uint32_t i = 0; i < 8; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(cache.store(test::tokens(16, 41 + i), f.eng.kv(), f.bt) == 16);
    worst = std::max(worst, std::chrono::steady_clock::now() - t0);
  }
  CHECK(worst < 50ms);
  CHECK(cache.stats().tiers[1].dropped_writes >= 1);
  // A lookup that must ask the server: a miss, bounded by the timeout; then the server is
  // marked down and the next lookups do not wait at all.
  auto t0 = std::chrono::steady_clock::now();
  CHECK(reader.lookup(p).tokens() == 0);
  CHECK(std::chrono::steady_clock::now() - t0 < 1s);
  t0 = std::chrono::steady_clock::now();
  CHECK(reader.lookup(p).tokens() == 0);
  CHECK(std::chrono::steady_clock::now() - t0 < 20ms);
}

TEST_CASE("prefetch from redis loads chunks into the host tier; a missing chunk ends it") {
  engine_fixture f;
  const auto rc = single_config("prefetch");
  const auto p = test::tokens(48, 60);
  {
    C writer(test::small_model, test::small_salt, {{16 * slot}, rc});
    REQUIRE(writer.store(p, f.eng.kv(), f.bt) == 48);
    writer.flush();
  }
  C reader(test::small_model, test::small_salt, {{16 * slot}, rc});
  auto longer = p;
  for (int i = 0; i < 16; ++i) longer.push_back(9000 + i);  // a fourth chunk nobody stored
  CHECK(reader.prefetch(longer) == 64);  // a remote tier is tried for every chunk
  bool in_host = false;
  for (int i = 0; i < 400 && !in_host; ++i) {
    in_host = reader.lookup(p).hits_in(0) == 3;
    if (!in_host) std::this_thread::sleep_for(5ms);
  }
  CHECK(in_host);
  CHECK(reader.stats().prefetched == 3);
  CHECK(reader.stats().tiers[1].errors == 0);  // the missing chunk is a miss, not an error
  auto l = reader.lookup(longer);
  CHECK(l.tokens() == 48);
  test::engine<nhd> dst(test::small_model, 64, 2);
  const auto bt2 = test::shuffled_table(16, 64, 4);
  CHECK(reader.retrieve(l, dst.kv(), bt2) == 48);
  CHECK(test::same_tokens(f.eng, f.bt, dst, bt2, 0, 48));
}

TEST_CASE("stress: tiny host, disk and redis tiers under 4 threads: every byte, pin and lease") {
  using chain_t =
      kvtier::cache<o::chunk_tokens<16>, o::tiers<host, kvtier::tier::local_disk, remote>>;
  chain_t cache(
      test::small_model, test::small_salt,
      {{10 * slot}, {test::temp_dir("redis-stress"), 12 * 8192}, single_config("stress")});
  stress::run(cache, false, 4, 300);
  cache.flush();
  const auto s = cache.stats();
  CHECK(s.tiers[2].writes > 0);
  CHECK(s.tiers[2].errors == 0);
  CHECK(s.tiers[1].evictions > 0);  // 12 disk slots: chunks live on in redis only
}
