// The generated single header alone (no include/ on the path) builds a working cache.
#include <kvtier/kvtier.hpp>

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <vector>

TEST_CASE("single header: store and retrieve round-trip") {
  const kvtier::model_shape m{2, 2, 8, 2, 4};
  kvtier::cache<kvtier::opt::chunk_tokens<16>> cache(m, {"m", "bf16", 0, 1, ""}, {{1 << 20}});
  std::vector<std::int64_t> shape{2, 8, 4, 2, 8};
  std::vector<std::byte> l0(2 * 8 * 4 * 2 * 8 * 2), l1(l0.size());
  for (std::size_t i = 0; i < l0.size(); ++i) {
    l0[i] = std::byte(i * 7 + 1);
    l1[i] = std::byte(i * 13 + 5);
  }
  std::vector<void*> ptrs{l0.data(), l1.data()};
  std::vector<kvtier::token_id> toks(32, 3);
  std::vector<std::int32_t> bt{7, 6, 5, 4, 3, 2, 1, 0};
  CHECK(cache.store(toks, {ptrs, shape}, bt) == 32);
  const auto a = l0, b = l1;
  std::fill(l0.begin(), l0.end(), std::byte{0});
  std::fill(l1.begin(), l1.end(), std::byte{0});
  auto lease = cache.lookup(toks);
  CHECK(cache.retrieve(lease, {ptrs, shape}, bt) == 32);
  CHECK(l0 == a);
  CHECK(l1 == b);
}

#if __has_include(<hiredis/hiredis.h>)
#include <kvtier/kvtier_redis.hpp>

TEST_CASE("single header: the Redis tier's header compiles on top of the core one") {
  static_assert(kvtier::tier_policy<kvtier::tier::redis>);
  CHECK(kvtier::tier::detail_redis::key_slot("123456789") == (0x31C3 & 16383));
}
#endif
