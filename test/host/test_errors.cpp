// Bad input raises kvtier::invalid_argument naming the value, and changes nothing.
#include "support.hpp"

#include <limits>

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

// Sizes computed from what an engine passes overflow nowhere: each is refused with
// invalid_argument naming the value and the limit, and a valid size that cannot be reserved
// fails with a kvtier::error saying how much was asked for (issue 16, item 1).
namespace {
using disk = kvtier::tier::local_disk;
using CD = kvtier::cache<o::chunk_tokens<16>, o::tiers<kvtier::tier::host, disk>>;
constexpr std::size_t huge = std::numeric_limits<std::size_t>::max();
// Huge reservations abort under ASan and TSan instead of throwing std::bad_alloc.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool can_fail_allocations = false;
#else
constexpr bool can_fail_allocations = true;
#endif
}  // namespace

TEST_CASE("a model whose chunk size overflows, or is absurd, is refused with the limit") {
  // 2 x 16 tokens x 2 layers x (2^29-1) x (2^29+1) x 1 byte = 2^64-64: a page rounding wrapped
  // it to 0 and the constructor divided by zero.
  const kvtier::model_shape wraps{2, 536870911, 536870913, 1, 4};
  CHECK_THROWS_WITH_AS(C(wraps, test::small_salt, {{mib}}),
                       doctest::Contains("makes a chunk of 18446744073709551552 bytes, above the "
                                         "limit of 1099511627776 (2^40)"),
                       E);
  const kvtier::model_shape over{UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT32_MAX, 4};
  CHECK_THROWS_WITH_AS(C(over, test::small_salt, {{mib}}),
                       doctest::Contains("layers 4294967295, kv_heads 4294967295"), E);
  CHECK_THROWS_WITH_AS(C(over, test::small_salt, {{mib}}), doctest::Contains("more than 2^64"), E);
}

TEST_CASE("max_tokens beyond 2^32 is refused, not wrapped") {
  for (std::size_t v :
       {huge, std::size_t{1} << 63, std::size_t{1} << 50, (std::size_t{1} << 32) + 1}) {
    kvtier::cache_config cfg;
    cfg.max_tokens = v;
    CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{mib}}, cfg),
                         test::contains("cache_config.max_tokens " + std::to_string(v) +
                                        " is out of range 1..2^32 (4294967296)"),
                         E);
  }
}

TEST_CASE("queue depths beyond 2^32-1 are refused; a deep valid one reserves what can be used") {
  const auto dir = test::temp_dir("errors-depth");
  for (int which = 0; which < 2; ++which) {
    kvtier::cache_config cfg;
    (which == 0 ? cfg.write_queue_depth : cfg.prefetch_queue_depth) = huge;
    CHECK_THROWS_WITH_AS(CD(test::small_model, test::small_salt, {{mib}, {dir, 4 * mib}}, cfg),
                         test::contains(std::string(which == 0 ? "write" : "prefetch") +
                                        "_queue_depth 18446744073709551615 is out of range "
                                        "1..2^32-1 (4294967295)"),
                         E);
  }
  // The deepest valid queues hold no more than the first tier's chunks: nothing huge reserved.
  kvtier::cache_config cfg;
  cfg.write_queue_depth = cfg.prefetch_queue_depth = UINT32_MAX;
  CD cache(test::small_model, test::small_salt, {{mib}, {dir, 4 * mib}}, cfg);
  test::engine<nhd> eng(test::small_model, 32, 1);
  const auto toks = test::tokens(32, 1);
  CHECK(cache.store(toks, eng.kv(), test::shuffled_table(8, 32, 2)) == 32);
  cache.flush();
  CHECK(cache.stats().tiers[1].writes == 2);
}

TEST_CASE("tier capacities too large to index are refused before anything is reserved") {
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{huge}}),
                       doctest::Contains("tier capacity of 4503599627370495 chunks is out of "
                                         "range 1..4294967295"),
                       E);
  const auto dir = test::temp_dir("errors-cap");
  CHECK_THROWS_WITH_AS(CD(test::small_model, test::small_salt, {{mib}, {dir, huge}}),
                       doctest::Contains("local_disk capacity_bytes 18446744073709551615 is above "
                                         "the limit of 4611686018427387904 (2^62)"),
                       E);
}

TEST_CASE("valid settings that cannot be reserved fail with a kvtier error saying how much") {
  if (!can_fail_allocations) return;
  kvtier::cache_config cfg;
  cfg.max_inflight = UINT32_MAX - 1;  // 8192 chunks x (2^32-2) operations x 24 bytes
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{mib}}, cfg),
                       doctest::Contains("cannot reserve 844424929738752 bytes"), kvtier::error);
  cfg = {};
  cfg.max_tokens = std::size_t{1} << 32;  // 2^28 chunks x 64 operations x 24 bytes
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{mib}}, cfg),
                       doctest::Contains("cannot reserve 412316860416 bytes"), kvtier::error);
}

TEST_CASE("tensor extents and strides whose offsets overflow are refused") {
  C cache(test::small_model, test::small_salt, {{mib}});
  test::engine<nhd> eng(test::small_model, 32, 1);
  const auto toks = test::tokens(32, 1);
  const auto bt = test::shuffled_table(8, 32, 2);
  const snapshot before(cache);
  // [2, num_blocks, block_size, kv_heads, head_size]; dense strides [2048, 64, 16, 8, 1].
  auto shape = eng.shape;
  shape[1] = std::int64_t{1} << 62;  // was accepted: the dense stride product wrapped
  CHECK_THROWS_WITH_AS(cache.store(toks, {eng.kv().tensors, shape}, bt),
                       doctest::Contains("shape[1] (num_blocks) is 4611686018427387904"), E);
  shape[1] = std::int64_t{1} << 50;  // no overflow, but larger than any address space
  CHECK_THROWS_WITH_AS(cache.store(toks, {eng.kv().tensors, shape}, bt),
                       doctest::Contains("spans more than the limit of 72057594037927936 bytes"),
                       E);
  // A stride of 2^61 on num_blocks: stride x extent wrapped and passed the overlap check.
  std::vector<std::int64_t> st{2048, std::int64_t{1} << 61, 16, 8, 1};
  CHECK_THROWS_WITH_AS(
      cache.store(toks, {eng.kv().tensors, eng.shape, st}, bt),
      doctest::Contains("shape[1] (num_blocks) is 32 with stride 2305843009213693952"), E);
  st = {std::int64_t{1} << 61, 64, 16, 8, 1};  // on kv: fits 64 bits, no address space
  CHECK_THROWS_WITH_AS(cache.store(toks, {eng.kv().tensors, eng.shape, st}, bt),
                       doctest::Contains("shape[0] (kv) is 2 with stride 2305843009213693952"), E);
  CHECK_THROWS_WITH_AS(cache.validate({eng.kv().tensors, eng.shape, st}, bt, 0, 32),
                       doctest::Contains("with stride 2305843009213693952"), E);
  CHECK(snapshot(cache) == before);
  CHECK(cache.store(toks, eng.kv(), bt) == 32);  // the engine's real tensors still work
}
