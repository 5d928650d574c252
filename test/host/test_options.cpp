// Policy composition: order-free tags, defaults, nested names.
#include "support.hpp"

#include <type_traits>

namespace o = kvtier::opt;

TEST_CASE("every option has a default") {
  using c = kvtier::cache<>;
  static_assert(c::chunk_tokens == 256);
  static_assert(std::is_same_v<c::layout_type, kvtier::layout::vllm_flash_nhd>);
  static_assert(std::is_same_v<c::eviction_type, kvtier::eviction::lru>);
  static_assert(std::is_same_v<c::hasher_type, kvtier::key::xxh3_hasher>);
  static_assert(std::is_same_v<c::tier_list, std::tuple<kvtier::tier::host>>);
  static_assert(c::tier_count == 1);
  CHECK(c::chunk_tokens == 256);
}

TEST_CASE("options resolve the same in any order") {
  using a = kvtier::cache<o::chunk_tokens<64>, o::layout<kvtier::layout::trtllm_packed>,
                          o::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
  using b = kvtier::cache<o::tiers<kvtier::tier::host, kvtier::tier::local_disk>,
                          o::layout<kvtier::layout::trtllm_packed>, o::chunk_tokens<64>>;
  static_assert(std::is_same_v<a::layout_type, b::layout_type>);
  static_assert(std::is_same_v<a::tier_list, b::tier_list>);
  static_assert(a::chunk_tokens == b::chunk_tokens && a::chunk_tokens == 64);
  static_assert(
      std::is_same_v<a::tier_configs,
                     std::tuple<kvtier::tier::host::config, kvtier::tier::local_disk::config>>);
  // Both resolve to the same implementation type.
  static_assert(
      std::is_base_of_v<
          kvtier::detail::cache_impl<64, 0, kvtier::layout::trtllm_packed, kvtier::eviction::lru,
                                     kvtier::key::xxh3_hasher, a::tier_list>,
          b>);
  CHECK(a::tier_count == 2);
}

namespace {
// A user-defined eviction policy (most recently used first), to show the concept is the contract.
struct mru {
  static constexpr const char* name = "mru";
  static void on_evictable(kvtier::detail::eviction_list& l, kvtier::detail::index_entry& e) {
    l.push_back(e);
  }
  static kvtier::detail::index_entry* victim(kvtier::detail::eviction_list& l) {
    return l.empty() ? nullptr : &l.back();
  }
};
}  // namespace

TEST_CASE("a user eviction policy plugs in and is used") {
  using c = kvtier::cache<o::chunk_tokens<16>, o::eviction<mru>>;
  static_assert(kvtier::eviction_policy<mru>);
  static_assert(std::is_same_v<c::eviction_type, mru>);
  // A 16-token chunk of the small model is 2 KiB, one 4 KiB slot: room for two chunks.
  c cache(test::small_model, test::small_salt, {{2 * 4096}});
  REQUIRE(cache.stats().tiers[0].capacity_chunks == 2);
  test::engine<kvtier::layout::vllm_flash_nhd> eng(test::small_model, 16, 1);
  const auto bt = test::shuffled_table(4, 16, 2);
  const auto a = test::tokens(16, 10), b = test::tokens(16, 11), d = test::tokens(16, 12);
  CHECK(cache.store(a, eng.kv(), bt) == 16);
  CHECK(cache.store(b, eng.kv(), bt) == 16);
  cache.lookup(a).reset();  // a is now the most recently used
  CHECK(cache.store(d, eng.kv(), bt) == 16);
  CHECK(cache.lookup(a).tokens() == 0);  // MRU evicted a
  CHECK(cache.lookup(b).tokens() == 16);
  CHECK(cache.lookup(d).tokens() == 16);
}
