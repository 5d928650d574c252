// Per-group models: several layer groups with their own layouts, block sizes, widths, dtypes
// and hit rules, sharing chunk keys' prefix semantics.
#include "support.hpp"

namespace o = kvtier::opt;
namespace ly = kvtier::layout;

namespace {

constexpr std::size_t N = 64;
using full_t = kvtier::cache<o::chunk_tokens<N>, o::layout<ly::vllm_flash_nhd>>;
using swa_t = kvtier::cache<o::chunk_tokens<N>, o::layout<ly::flashinfer_nhd>,
                            o::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
using state_t = kvtier::cache<o::chunk_tokens<N>, o::layout<ly::state_pages>>;
using hybrid = kvtier::group_cache<full_t, swa_t, state_t>;

// A hybrid model: full attention (block 16, 2 layers, 2 heads x 8, bf16), sliding window of
// 100 tokens (block 32, 3 layers, 1 head x 16, fp32), per-slot state (block 16, 1 array of 24
// bytes per slot).
const kvtier::model_shape full_m{2, 2, 8, 2, 16};
const kvtier::model_shape swa_m{3, 1, 16, 4, 32};
const kvtier::model_shape state_m{1, 1, 24, 1, 16};
constexpr std::size_t window = 100;

struct engines {
  test::engine<ly::vllm_flash_nhd> full{full_m, 64, 1};
  test::engine<ly::flashinfer_nhd> swa{swa_m, 32, 2};
  test::engine<ly::state_pages> state{state_m, 64, 3};
  std::vector<std::int32_t> t_full, t_swa, t_state;
  std::vector<kvtier::engine_kv> kvs;
  std::vector<kvtier::block_table> tables;

  engines(std::size_t tokens, std::uint32_t seed)
      : t_full(test::shuffled_table(test::blocks_for(tokens, 16), 64, seed)),
        t_swa(test::shuffled_table(test::blocks_for(tokens, 32), 32, seed + 1)),
        t_state(test::shuffled_table(test::blocks_for(tokens, 16), 64, seed + 2)) {
    refresh();
  }
  void refresh() {
    kvs = {full.kv(), swa.kv(), state.kv()};
    tables = {t_full, t_swa, t_state};
  }
};

hybrid make(const std::string& name) {
  return hybrid(test::small_salt, kvtier::group<full_t>{full_m, {{1 << 20}}},
                kvtier::group<swa_t>{swa_m,
                                     {{1 << 20}, {test::temp_dir(name), 4 << 20}},
                                     {},
                                     kvtier::hit_rule::trailing_window(window)},
                kvtier::group<state_t>{state_m, {{1 << 20}}});
}

}  // namespace

TEST_CASE("a hybrid model round-trips: full groups every token, window groups their window") {
  auto cache = make("hybrid-roundtrip");
  const auto toks = test::tokens(8 * N + 10, 1);
  engines src(toks.size(), 10), dst(toks.size(), 20);
  const auto before = dst.swa.storage;
  CHECK(cache.store(toks, src.kvs, src.tables) == 8 * N);
  auto l = cache.lookup(toks);
  CHECK(l.tokens() == 8 * N);
  CHECK(l.part<1>().first_token() == (8 * N - window) / N * N);  // chunk 6: tokens 384..
  CHECK(cache.retrieve(l, dst.kvs, dst.tables) == 8 * N);
  CHECK(test::same_tokens(src.full, src.t_full, dst.full, dst.t_full, 0, 8 * N));
  CHECK(test::same_tokens(src.state, src.t_state, dst.state, dst.t_state, 0, 8 * N));
  CHECK(test::same_tokens(src.swa, src.t_swa, dst.swa, dst.t_swa, 6 * N, 2 * N));
  // The window group loaded nothing before its window.
  test::engine<ly::flashinfer_nhd> untouched(swa_m, 32, 2);
  CHECK(test::same_tokens(untouched, dst.t_swa, dst.swa, dst.t_swa, 0, 6 * N));
}

TEST_CASE("a window group whose early blocks were freed stores and serves its window") {
  auto cache = make("hybrid-freed");
  const auto toks = test::tokens(8 * N, 2);
  engines src(toks.size(), 10), dst(toks.size(), 20);
  // The engine freed the window group's blocks before token 384: -1 in its table.
  for (std::size_t b = 0; b < 384 / 32; ++b) src.t_swa[b] = -1;
  src.refresh();
  const std::size_t firsts[] = {0, 384, 0};
  CHECK(cache.store(toks, src.kvs, src.tables, firsts) == 8 * N);
  CHECK(cache.cache<1>().stats().tiers[0].used_chunks == 2);
  auto l = cache.lookup(toks);
  CHECK(l.tokens() == 8 * N);
  CHECK(cache.retrieve(l, dst.kvs, dst.tables) == 8 * N);
  CHECK(test::same_tokens(src.swa, src.t_swa, dst.swa, dst.t_swa, 6 * N, 2 * N));
  // A request sharing only the first 5 chunks: the window group has nothing for any shorter
  // prefix's window, so nothing is a hit (the full group alone would have said 5 chunks).
  auto other = toks;
  other[5 * N + 3] ^= 1;
  CHECK(cache.cache<0>().lookup(other).tokens() == 5 * N);
  CHECK(cache.lookup(other).tokens() == 0);
}

TEST_CASE("a chunk missing from one group ends the hit there") {
  auto cache = make("hybrid-missing");
  const auto toks = test::tokens(8 * N, 3);
  engines src(toks.size(), 10);
  REQUIRE(cache.store(toks, src.kvs, src.tables) == 8 * N);
  // Remove the state group's chunk 3 only: clear chunks 0-3, store chunks 0-2 again.
  CHECK(cache.cache<2>().clear(std::span(toks).first(4 * N)) == 4 * N);
  REQUIRE(cache.cache<2>().store(std::span(toks).first(3 * N), src.state.kv(), src.t_state) ==
          3 * N);
  auto l = cache.lookup(toks);
  CHECK(l.tokens() == 3 * N);
  engines dst(toks.size(), 20);
  CHECK(cache.retrieve(l, dst.kvs, dst.tables) == 3 * N);
  CHECK(test::same_tokens(src.state, src.t_state, dst.state, dst.t_state, 0, 3 * N));
  // The window group's chunks before the window of 3 chunks were not needed nor loaded.
  CHECK(cache.lookup(std::span(toks).first(2 * N)).tokens() == 2 * N);
}

TEST_CASE("clearing one group's chunks ends the hit until that group stores them again") {
  auto cache = make("hybrid-disk");
  const auto toks = test::tokens(8 * N, 4);
  engines src(toks.size(), 10), dst(toks.size(), 20);
  REQUIRE(cache.store(toks, src.kvs, src.tables) == 8 * N);
  cache.flush();
  cache.cache<1>().clear();  // removes the window group's chunks from host and disk
  CHECK(cache.lookup(toks).tokens() == 0);
  REQUIRE(cache.store(toks, src.kvs, src.tables) == 8 * N);
  cache.flush();
  auto l = cache.lookup(toks);
  CHECK(l.tokens() == 8 * N);
  CHECK(cache.retrieve(l, dst.kvs, dst.tables) == 8 * N);
  CHECK(test::same_tokens(src.swa, src.t_swa, dst.swa, dst.t_swa, 6 * N, 2 * N));
}

TEST_CASE("group errors name the group and change nothing") {
  using c48 = kvtier::cache<o::chunk_tokens<48>>;
  CHECK_THROWS_WITH_AS((kvtier::group_cache<c48, c48>(
                           test::small_salt, kvtier::group<c48>{{1, 1, 8, 2, 16}, {{1 << 20}}},
                           kvtier::group<c48>{{1, 1, 8, 2, 32}, {{1 << 20}}})),
                       "kvtier: group 1 has block size 32; chunk size 48 is not a multiple of it "
                       "(the smallest that fits every group is 32)",
                       kvtier::invalid_argument);
  static_assert(kvtier::chunk_tokens_for<16, 48, 64> == 192);
  auto cache = make("hybrid-errors");
  const auto toks = test::tokens(4 * N, 5);
  engines src(toks.size(), 10), dst(toks.size(), 20);
  CHECK_THROWS_WITH_AS(cache.store(toks, std::span(src.kvs).first(2), src.tables),
                       "kvtier: group store got 2 engine_kv and 3 block tables for 3 groups",
                       kvtier::invalid_argument);
  REQUIRE(cache.store(toks, src.kvs, src.tables) == 4 * N);
  auto l = cache.lookup(toks);
  auto bad = dst.t_state;
  bad[5] = 999;
  std::vector<kvtier::block_table> tables{dst.t_full, dst.t_swa, bad};
  const auto full_before = dst.full.storage;
  CHECK_THROWS_WITH_AS(cache.retrieve(l, dst.kvs, tables),
                       test::contains("block table[5] is block id 999"), kvtier::invalid_argument);
  CHECK(dst.full.storage == full_before);  // group 0 was not loaded either
  CHECK(l.live());
  CHECK(cache.retrieve(l, dst.kvs, dst.tables) == 4 * N);
}
