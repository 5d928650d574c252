// Bad input raises kvtier::invalid_argument naming the value, and changes nothing.
#include "support.hpp"

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using trt = kvtier::layout::trtllm_packed;
using C = kvtier::cache<o::chunk_tokens<16>>;
using E = kvtier::invalid_argument;

namespace {
constexpr std::size_t mib = std::size_t{1} << 20;

// Everything observable about a cache's contents and counters.
struct snapshot {
  std::uint64_t stored, bytes, used, lookups;
  template <class Cache>
  explicit snapshot(const Cache& c) {
    const auto s = c.stats();
    stored = s.stored_tokens, bytes = s.bytes_from_engine, used = s.tiers[0].used_chunks,
    lookups = s.lookups;
  }
  bool operator==(const snapshot&) const = default;
};
}  // namespace

TEST_CASE("model and config errors at construction name the value") {
  kvtier::model_shape m = test::small_model;
  m.block_size = 48;  // 16 is not a multiple of 48
  CHECK_THROWS_WITH_AS(C(m, test::small_salt, {{mib}}),
                       "kvtier: chunk size 16 is not a multiple of the engine block size 48", E);
  m = test::small_model;
  m.kv_heads = 0;
  CHECK_THROWS_WITH_AS(C(m, test::small_salt, {{mib}}), "kvtier: model_shape.kv_heads is 0", E);
  kvtier::salt s = test::small_salt;
  s.tp_rank = 2, s.tp_size = 2;
  CHECK_THROWS_WITH_AS(C(test::small_model, s, {{mib}}), doctest::Contains("tp_rank 2"), E);
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{100}}),
                       doctest::Contains("host capacity_bytes 100 holds no chunk"), E);
  kvtier::cache_config cfg;
  cfg.max_inflight = 0;
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{mib}}, cfg),
                       doctest::Contains("max_inflight 0"), E);
}

TEST_CASE_TEMPLATE("engine tensor errors name the offending value and change nothing", L, nhd,
                   trt) {
  kvtier::cache<o::chunk_tokens<16>, o::layout<L>> cache(test::small_model, test::small_salt,
                                                         {{mib}});
  test::engine<L> eng(test::small_model, 32, 1);
  const auto toks = test::tokens(32, 1);
  const auto bt = test::shuffled_table(8, 32, 2);
  REQUIRE(cache.store(std::span(toks).first(16), eng.kv(), bt) == 16);
  const snapshot before(cache);

  SUBCASE("wrong tensor count") {
    std::vector<void*> ptrs(eng.ptrs.begin(), eng.ptrs.end());
    ptrs.push_back(ptrs[0]);
    CHECK_THROWS_WITH_AS(cache.store(toks, {ptrs, eng.shape}, bt),
                         test::contains(std::to_string(ptrs.size()) + " tensors"), E);
  }
  SUBCASE("null tensor") {
    auto kv = eng.kv();
    std::vector<void*> ptrs(kv.tensors.begin(), kv.tensors.end());
    ptrs.back() = nullptr;
    CHECK_THROWS_WITH_AS(cache.store(toks, {ptrs, eng.shape}, bt), doctest::Contains("is null"), E);
  }
  SUBCASE("wrong rank") {
    auto shape = eng.shape;
    shape.push_back(1);
    CHECK_THROWS_WITH_AS(
        cache.store(toks, {eng.kv().tensors, shape}, bt),
        test::contains("rank " + std::to_string(kvtier::layout::traits<L>::rank + 1)), E);
  }
  SUBCASE("wrong extent, for every dimension but the block count") {
    for (std::size_t d = 0; d < kvtier::layout::traits<L>::rank; ++d) {
      if (d == kvtier::layout::traits<L>::blocks_dim) continue;
      auto shape = eng.shape;
      shape[d] += 1;
      const std::string msg = "shape[" + std::to_string(d) + "] (" +
                              kvtier::layout::dim_name(L::dims[d]) + ") is " +
                              std::to_string(shape[d]) + ", layout " + L::name + " expects " +
                              std::to_string(eng.shape[d]);
      CHECK_THROWS_WITH_AS(cache.store(toks, {eng.kv().tensors, shape}, bt), test::contains(msg),
                           E);
    }
  }
  SUBCASE("block id out of range, and negative") {
    auto bad = bt;
    bad[5] = 32;
    CHECK_THROWS_WITH_AS(cache.store(toks, eng.kv(), bad),
                         doctest::Contains("block table[5] is block id 32"), E);
    bad[5] = -1;
    CHECK_THROWS_WITH_AS(cache.store(toks, eng.kv(), bad),
                         doctest::Contains("block table[5] is block id -1"), E);
  }
  SUBCASE("block table shorter than the tokens") {
    CHECK_THROWS_WITH_AS(cache.store(toks, eng.kv(), std::span(bt).first(7)),
                         "kvtier: block table has 7 blocks, 32 tokens need 8 (block size 4)", E);
  }
  SUBCASE("more tokens than max_tokens") {
    std::vector<kvtier::token_id> huge(131072 + 1, 1);
    CHECK_THROWS_WITH_AS((void)cache.lookup(huge), doctest::Contains("131073 tokens exceeds"), E);
  }
  CHECK(snapshot(cache) == before);
  CHECK(cache.lookup(toks).tokens() == 16);
}

TEST_CASE("a failed retrieve leaves the lease live and usable") {
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 32, 1);
  const auto toks = test::tokens(32, 1);
  const auto bt = test::shuffled_table(8, 32, 2);
  REQUIRE(cache.store(toks, eng.kv(), bt) == 32);
  auto l = cache.lookup(toks);
  test::engine<nhd> dst(test::small_model, 32, 2);
  const auto before = dst.storage;
  CHECK_THROWS_AS(cache.retrieve(l, dst.kv(), std::span(bt).first(3)), E);
  CHECK(dst.storage == before);
  CHECK(l.live());
  CHECK(cache.retrieve(l, dst.kv(), bt) == 32);
}

TEST_CASE("leases of another cache, or already consumed, are rejected") {
  C a(test::small_model, test::small_salt, {{mib}}),
      b(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 32, 1);
  const auto toks = test::tokens(32, 1);
  const auto bt = test::shuffled_table(8, 32, 2);
  a.store(toks, eng.kv(), bt);
  auto l = a.lookup(toks);
  CHECK_THROWS_WITH_AS(b.retrieve(l, eng.kv(), bt), doctest::Contains("another cache"), E);
  CHECK(a.retrieve(l, eng.kv(), bt) == 32);
  CHECK_THROWS_WITH_AS(a.retrieve(l, eng.kv(), bt), doctest::Contains("not live"), E);
}
