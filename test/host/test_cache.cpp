// The cache end to end on the host tier: round trips over the cross product of policies,
// prefix semantics, leases, pins, eviction under pressure, partial tails, clear, stats.
#include "support.hpp"

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using trt = kvtier::layout::trtllm_packed;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;
using E = kvtier::invalid_argument;

namespace {

template <class C>
typename C::tier_configs configs(std::size_t host_bytes, const std::string& name) {
  if constexpr (C::tier_count == 1) {
    return {{host_bytes}};
  } else {
    return {{host_bytes}, {test::temp_dir(name), std::size_t{64} << 20}};
  }
}

constexpr std::size_t mib = std::size_t{1} << 20;

}  // namespace

// Cross product: chunk size x layout x tier chain.
#define KVTIER_CACHE_TYPES                                                      \
  kvtier::cache<o::chunk_tokens<16>, o::layout<nhd>>,                           \
      kvtier::cache<o::chunk_tokens<16>, o::layout<trt>>,                       \
      kvtier::cache<o::chunk_tokens<32>, o::layout<nhd>, o::tiers<host, disk>>, \
      kvtier::cache<o::layout<trt>, o::tiers<host, disk>, o::chunk_tokens<32>>, \
      kvtier::cache<o::chunk_tokens<64>, o::layout<nhd>, o::tiers<host, disk>>, \
      kvtier::cache<o::chunk_tokens<8>, o::layout<trt>>

TEST_CASE_TEMPLATE("store then retrieve round-trips bytes exactly into other blocks", C,
                   KVTIER_CACHE_TYPES) {
  using L = typename C::layout_type;
  constexpr std::size_t N = C::chunk_tokens;
  C cache(test::small_model, test::small_salt, configs<C>(4 * mib, "roundtrip"));
  const std::size_t n = 5 * N + 3;  // a partial tail that is not stored
  const auto toks = test::tokens(n, 77);
  test::engine<L> eng(test::small_model, 128, 11);
  const auto bt = test::shuffled_table(test::blocks_for(n, 4), 128, 12);
  CHECK(cache.store(toks, eng.kv(), bt) == 5 * N);

  auto lease = cache.lookup(toks);
  CHECK(lease.tokens() == 5 * N);
  CHECK(lease.chunks() == 5);
  test::engine<L> dst(test::small_model, 128, 13);
  const auto bt2 = test::shuffled_table(test::blocks_for(n, 4), 128, 14);
  CHECK(cache.retrieve(lease, dst.kv(), bt2) == 5 * N);
  CHECK_FALSE(lease.live());
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 5 * N));
  // The tail that was not stored was not written.
  test::engine<L> fresh(test::small_model, 128, 13);
  CHECK(test::same_tokens(fresh, bt2, dst, bt2, 5 * N, 3));

  const auto s = cache.stats();
  CHECK(s.stored_tokens == 5 * N);
  CHECK(s.retrieved_tokens == 5 * N);
  CHECK(s.bytes_from_engine == cache.format().bytes(5 * N));
  CHECK(s.bytes_to_engine == cache.format().bytes(5 * N));
  CHECK(s.tiers[0].hits == 5);
}

TEST_CASE_TEMPLATE("lookup returns the longest shared prefix", C, KVTIER_CACHE_TYPES) {
  using L = typename C::layout_type;
  constexpr std::size_t N = C::chunk_tokens;
  C cache(test::small_model, test::small_salt, configs<C>(4 * mib, "prefix"));
  test::engine<L> eng(test::small_model, 128, 1);
  const auto a = test::tokens(4 * N, 5);
  const auto bt = test::shuffled_table(test::blocks_for(4 * N, 4), 128, 2);
  REQUIRE(cache.store(a, eng.kv(), bt) == 4 * N);
  auto b = a;
  b[2 * N + 1] ^= 7;  // diverges inside the third chunk
  b.resize(6 * N, 1);
  CHECK(cache.lookup(b).tokens() == 2 * N);
  CHECK(cache.lookup(std::span(a).first(3 * N + 5)).tokens() == 3 * N);
  CHECK(cache.lookup(std::span(a).first(N - 1)).tokens() == 0);
  auto other = test::tokens(4 * N, 6);
  CHECK(cache.lookup(other).tokens() == 0);
  const auto s = cache.stats();
  CHECK(s.lookups == 4);
  CHECK(s.hit_tokens == 5 * N);
}

TEST_CASE("a stored chunk is found by a request that shares only the prefix, loaded exactly") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
  const auto a = test::tokens(64, 1);
  const auto bt = test::shuffled_table(16, 64, 3);
  cache.store(a, eng.kv(), bt);
  auto b = a;
  b.resize(100, 42);
  b[40] = 1;
  auto l = cache.lookup(b);
  REQUIRE(l.tokens() == 32);
  const auto bt2 = test::shuffled_table(25, 64, 4);
  CHECK(cache.retrieve(l, dst.kv(), bt2) == 32);
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 32));
}

TEST_CASE("eviction under pressure never touches leased or pinned chunks") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  // Room for 4 chunks of 16 tokens (2 KiB each in a 4 KiB slot).
  C cache(test::small_model, test::small_salt, {{4 * 4096}});
  REQUIRE(cache.stats().tiers[0].capacity_chunks == 4);
  test::engine<nhd> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p1 = test::tokens(32, 1), p2 = test::tokens(32, 2), p3 = test::tokens(32, 3);
  REQUIRE(cache.store(p1, eng.kv(), bt) == 32);
  auto held = cache.lookup(p1);  // p1 leased
  REQUIRE(held.tokens() == 32);
  REQUIRE(cache.store(p2, eng.kv(), bt) == 32);
  auto pin2 = cache.pin(p2);  // p2 pinned
  REQUIRE(pin2.tokens() == 32);
  // Nothing evictable: the store of p3 stores nothing and says so.
  CHECK(cache.store(p3, eng.kv(), bt) == 0);
  CHECK(cache.stats().store_partial == 1);
  CHECK(cache.stats().tiers[0].evictions == 0);
  // Scribble the engine: the leased chunks must still hold the original bytes.
  test::engine<nhd> orig = eng;
  eng.wipe(std::byte{0x5a});
  const auto bt2 = test::shuffled_table(8, 64, 9);
  CHECK(cache.retrieve(held, dst.kv(), bt2) == 32);
  CHECK(test::same_tokens(orig, bt, dst, bt2, 0, 32));
  // p1 is now evictable, p2 still pinned: p3 evicts p1 only.
  CHECK(cache.store(p3, eng.kv(), bt) == 32);
  CHECK(cache.stats().tiers[0].evictions == 2);
  CHECK(cache.lookup(p1).tokens() == 0);
  CHECK(cache.lookup(p2).tokens() == 32);
  // Unpinned, p2 is evicted in LRU order.
  CHECK(cache.unpin(pin2) == 32);
  CHECK_FALSE(pin2.live());
  CHECK(cache.unpin(pin2) == 0);  // not pinned any more
  const auto p4 = test::tokens(64, 4);
  CHECK(cache.store(p4, eng.kv(), bt) == 64);
  CHECK(cache.lookup(p2).tokens() == 0);
  CHECK(cache.lookup(p3).tokens() == 0);
}

TEST_CASE("store stores the prefix that fits and reports it") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{3 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(64, 1);
  auto pinned = test::tokens(16, 2);
  REQUIRE(cache.store(pinned, eng.kv(), bt) == 16);
  const auto pin = cache.pin(pinned);
  REQUIRE(pin.tokens() == 16);
  // 4 chunks asked, 2 slots usable: the first 2 chunks are stored. A chunk of this very store
  // is never evicted to make room for a later one (it is still being written).
  CHECK(cache.store(p, eng.kv(), bt) == 32);
  CHECK(cache.lookup(p).tokens() == 32);
}

TEST_CASE("release gives chunks back without loading; a lease's destructor does too") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{2 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(32, 1), q = test::tokens(32, 2);
  cache.store(p, eng.kv(), bt);
  {
    auto l = cache.lookup(p);
    CHECK(l.tokens() == 32);
    CHECK(cache.store(q, eng.kv(), bt) == 0);  // p is leased
  }
  CHECK(cache.store(q, eng.kv(), bt) == 32);  // lease ended: p evicted
  auto l = cache.lookup(q);
  auto moved = std::move(l);
  CHECK_FALSE(l.live());
  CHECK(moved.tokens() == 32);
  cache.release(moved);
  CHECK_FALSE(moved.live());
  CHECK(cache.store(p, eng.kv(), bt) == 32);
}

TEST_CASE("pin protects a chunk until unpinned; pin stops at the first missing chunk") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{2 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(32, 1);
  cache.store(std::span(p).first(16), eng.kv(), bt);
  auto pin = cache.pin(p);
  CHECK(pin.tokens() == 16);  // only the first chunk is cached
  CHECK(pin.chunks() == 1);
  CHECK(pin.live());
  auto none = cache.pin(test::tokens(32, 9));
  CHECK(none.tokens() == 0);
  CHECK_FALSE(none.live());
  CHECK(cache.unpin(none) == 0);
  CHECK(cache.clear(p) == 0);  // clear leaves pinned chunks
  CHECK(cache.unpin(pin) == 16);
  CHECK(cache.clear(p) == 16);
  CHECK(cache.lookup(p).tokens() == 0);
}

// Issue 16, item 2: pins were counts that unpin(tokens) dropped on every chunk of `tokens`, so a
// holder whose pin had reached only the first chunk also dropped the pin another holder had put
// on the second (stored after the first pin). A pin handle undoes exactly the chunks it pinned.
TEST_CASE("a pin undoes only the chunks it pinned, never another holder's pin") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{3 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(32, 1);
  REQUIRE(cache.store(std::span(p).first(16), eng.kv(), bt) == 16);
  auto a = cache.pin(p);  // holder A reaches the first chunk only
  REQUIRE(a.tokens() == 16);
  REQUIRE(cache.store(p, eng.kv(), bt) == 32);
  auto b = cache.pin(p);  // holder B pins both
  REQUIRE(b.tokens() == 32);
  a.reset();  // A lets go: B's pins on both chunks must stay
  CHECK_FALSE(a.live());
  CHECK(cache.clear(p) == 0);
  // Three stores of other chunks into 3 slots evict everything unpinned.
  for (std::uint32_t s = 50; s < 53; ++s) cache.store(test::tokens(16, s), eng.kv(), bt);
  CHECK(cache.lookup(p).tokens() == 32);
  {
    const auto moved = std::move(b);  // a pin moves with its handle and unpins when destroyed
    CHECK_FALSE(b.live());
    CHECK(moved.tokens() == 32);
  }
  CHECK(cache.clear(p) == 32);
}

TEST_CASE("pins beyond max_pins pin nothing and are counted") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{2 * 4096}},
          kvtier::cache_config{.max_tokens = 64, .max_pins = 2});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(16, 1);
  REQUIRE(cache.store(p, eng.kv(), bt) == 16);
  auto a = cache.pin(p), b = cache.pin(p);
  CHECK((a.tokens() == 16 && b.tokens() == 16));
  auto c = cache.pin(p);
  CHECK(c.tokens() == 0);
  CHECK(cache.stats().pins_refused == 1);
  a.reset();
  CHECK(cache.pin(p).tokens() == 16);  // a slot is free again (and given back at once)
  b.reset();
  CHECK(cache.clear(p) == 16);  // every pin undone
  CHECK_THROWS_WITH_AS(
      C(test::small_model, test::small_salt, {{2 * 4096}}, kvtier::cache_config{.max_pins = 0}),
      doctest::Contains("max_pins 0"), kvtier::invalid_argument);
}

TEST_CASE("clear removes chunks; a leased chunk stays readable until its lease ends") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{4 * 4096}});
  test::engine<nhd> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(32, 1), q = test::tokens(32, 2);
  cache.store(p, eng.kv(), bt);
  cache.store(q, eng.kv(), bt);
  auto l = cache.lookup(p);
  CHECK(cache.clear() == 4);
  CHECK(cache.lookup(q).tokens() == 0);
  CHECK(cache.lookup(p).tokens() == 0);
  // The removed chunks' slots are not reused while the lease holds them.
  const auto r = test::tokens(64, 3);
  test::engine<nhd> other(test::small_model, 64, 99);
  CHECK(cache.store(r, other.kv(), bt) == 32);  // 2 free slots only
  CHECK(cache.retrieve(l, dst.kv(), bt) == 32);
  CHECK(test::same_tokens(eng, bt, dst, bt, 0, 32));
  CHECK(cache.stats().tiers[0].used_chunks == 2);
}

TEST_CASE("a partial tail is stored only when enabled, and hits only the same tail") {
  using C = kvtier::cache<o::chunk_tokens<16>, o::layout<trt>>;
  kvtier::cache_config cfg;
  cfg.store_partial_tail = true;
  C cache(test::small_model, test::small_salt, {{mib}}, cfg);
  test::engine<trt> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
  const auto p = test::tokens(16 + 7, 1);
  const auto bt = test::shuffled_table(6, 64, 3);
  CHECK(cache.store(p, eng.kv(), bt) == 23);
  auto l = cache.lookup(p);
  CHECK(l.tokens() == 23);
  CHECK(l.chunks() == 2);
  const auto bt2 = test::shuffled_table(6, 64, 4);
  CHECK(cache.retrieve(l, dst.kv(), bt2) == 23);
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 23));
  // A longer request shares the full chunk, not the tail.
  auto longer = p;
  longer.push_back(5);
  CHECK(cache.lookup(longer).tokens() == 16);
  // Without the option the tail is neither stored nor looked up.
  C plain(test::small_model, test::small_salt, {{mib}});
  CHECK(plain.store(p, eng.kv(), bt) == 16);
  CHECK(plain.lookup(p).tokens() == 16);
}

TEST_CASE("storing an already cached chunk does not copy it again") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(32, 1);
  CHECK(cache.store(p, eng.kv(), bt) == 32);
  CHECK(cache.store(p, eng.kv(), bt) == 32);
  const auto s = cache.stats();
  CHECK(s.tiers[0].writes == 2);
  CHECK(s.bytes_from_engine == cache.format().bytes(32));
}

TEST_CASE("lookup of an empty or sub-chunk sequence is a clean miss") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 8, 1);
  auto l = cache.lookup({});
  CHECK(l.tokens() == 0);
  CHECK(l.live());
  CHECK(cache.retrieve(l, eng.kv(), {}) == 0);
  CHECK(cache.store(test::tokens(15, 1), eng.kv(), std::vector<std::int32_t>{0, 1, 2, 3}) == 0);
}

TEST_CASE("in-flight operations are bounded; a refused lookup is a counted miss") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  kvtier::cache_config cfg;
  cfg.max_inflight = 2;
  C cache(test::small_model, test::small_salt, {{mib}}, cfg);
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(8, 64, 3);
  const auto p = test::tokens(32, 1);
  cache.store(p, eng.kv(), bt);
  auto a = cache.lookup(p), b = cache.lookup(p);
  auto c = cache.lookup(p);
  CHECK(a.tokens() == 32);
  CHECK(b.tokens() == 32);
  CHECK(c.tokens() == 0);
  CHECK(cache.stats().busy == 1);
  a.reset();
  CHECK(cache.lookup(p).tokens() == 32);
}

TEST_CASE("chunk ranges: lookup from a chunk, store from a token, retrieve up to a token") {
  using C = kvtier::cache<o::chunk_tokens<16>>;
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 64, 1), dst(test::small_model, 64, 2);
  auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(64, 1);
  // The engine no longer holds the blocks of tokens 0..31: they are -1 and must not be read.
  auto freed = bt;
  for (std::size_t b = 0; b < 8; ++b) freed[b] = -1;
  CHECK(cache.store(p, eng.kv(), freed, 20) == 32);  // chunk 1 starts before 20: skipped too
  CHECK(cache.lookup(p).tokens() == 0);              // no prefix from token 0
  auto l = cache.lookup(p, 2);
  CHECK(l.first_token() == 32);
  CHECK(l.tokens() == 32);
  CHECK(l.end_token() == 64);
  // Load only up to token 48: chunk 2, not chunk 3; the blocks before 32 are not looked at.
  CHECK(cache.retrieve(l, dst.kv(), freed, 48) == 16);
  CHECK(test::same_tokens(eng, bt, dst, bt, 32, 16));
  test::engine<nhd> fresh(test::small_model, 64, 2);
  CHECK(test::same_tokens(fresh, bt, dst, bt, 48, 16));
  CHECK_THROWS_WITH_AS((void)cache.lookup(p, 5),
                       "kvtier: lookup first_chunk 5 is past the 4 chunks of the tokens", E);
  CHECK_THROWS_WITH_AS(cache.store(p, eng.kv(), bt, 65),
                       "kvtier: store first_token 65 is past the 64 tokens", E);
  CHECK(cache.lookup(p, 4).tokens() == 0);
}
