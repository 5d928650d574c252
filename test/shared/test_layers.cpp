// Layer-wise store and retrieve on host tiers (host_pipeline.hpp): a store is published only
// once every layer is in; a retrieve copies one layer at a time, from the host tier, from the
// node's shared segment in place and from a disk, and proves every chunk before it copies any.

#include "common.hpp"
#include "segments.hpp"

#include <doctest/doctest.h>

#include <cstddef>
#include <string>
#include <vector>

using namespace shared_test;
namespace ts = kvtier::tier;

namespace {

constexpr std::size_t slot = 4096;  // a 2048-byte chunk's slot

/// Wrong bytes of layer `l` of tokens [0, n) of family f, or, with `want_untouched`, bytes of
/// layer l of those tokens that a load changed.
std::size_t wrong_in_layer(const engine_t& e, const std::vector<std::int32_t>& bt, std::uint32_t f,
                           std::size_t n, std::size_t l, bool want_untouched = false) {
  const std::size_t rb = model.head_size * model.dtype_size;
  std::size_t wrong = 0;
  for (std::size_t t = 0; t < n; ++t) {
    const std::size_t b = static_cast<std::size_t>(bt[t / model.block_size]);
    for (std::size_t kv = 0; kv < 2; ++kv)
      for (std::size_t h = 0; h < model.kv_heads; ++h) {
        const std::byte* row = e.row(l, kv, b, t % model.block_size, h);
        for (std::size_t j = 0; j < rb; ++j) {
          wrong += row[j] != (want_untouched ? untouched : ref_byte(f, t, l, kv, h, j));
        }
      }
  }
  return wrong;
}

constexpr std::size_t chunk_bytes =
    16 * model.layers * 2 * model.kv_heads * model.head_size * model.dtype_size;

}  // namespace

TEST_CASE("a layer-wise store is published only once every layer is stored, in order") {
  segment_guard g{segment_name("store")};
  cache_t c(model, salt, configs(g.name, 32 * slot));
  engine_t e(model, engine_blocks, 1);
  const auto bt = test::shuffled_table(20, engine_blocks, 1);
  fill(e, bt, 3, 80);
  const auto toks = prompt(3, 80);
  auto p = c.begin_store(toks, e.kv(), bt);
  CHECK(p.tokens() == 80);
  CHECK_THROWS_AS(p.store_layer(1), kvtier::invalid_argument);  // out of order: refused
  p.store_layer(0);
  CHECK(c.lookup(toks).tokens() == 0);  // reserved, not visible
  p.store_layer(1);
  CHECK_THROWS_AS(p.store_layer(2), kvtier::invalid_argument);  // past the model's layers
  CHECK(p.finish() == 80);
  c.flush();
  engine_t e2(model, engine_blocks, 2);
  e2.wipe(untouched);
  auto hit = c.lookup(toks);
  REQUIRE(hit.tokens() == 80);
  CHECK(c.retrieve(hit, e2.kv(), bt) == 80);
  CHECK(wrong_bytes(e2, bt, 3, 80) == 0);
  CHECK(c.stats().stored_tokens == 80);

  // A store that ends before its last layer publishes nothing, in any tier.
  fill(e, bt, 4, 80);
  const auto other = prompt(4, 80);
  {
    auto q = c.begin_store(other, e.kv(), bt);
    q.store_layer(0);
    CHECK(q.finish() == 0);
  }
  {
    auto q = c.begin_store(other, e.kv(), bt);
    q.store_layer(0);
  }  // dropped: the same
  c.flush();
  CHECK(c.lookup(other).tokens() == 0);
  cache_t fresh(model, salt, configs(g.name, 32 * slot));
  CHECK(fresh.lookup(other).tokens() == 0);
  CHECK(fresh.lookup(toks).tokens() == 80);  // the whole store reached the segment
  // A bad block table is refused before anything is reserved.
  const std::vector<std::int32_t> short_table(bt.begin(), bt.begin() + 3);
  CHECK_THROWS_AS((void)c.begin_store(other, e.kv(), short_table), kvtier::invalid_argument);
  CHECK(c.lookup(other).tokens() == 0);
}

TEST_CASE("a layer-wise retrieve copies one layer at a time, from the host tier and in place") {
  segment_guard g{segment_name("retrieve")};
  const auto bt = test::shuffled_table(20, engine_blocks, 3);
  const auto toks = prompt(5, 80);
  cache_t a(model, salt, configs(g.name, 32 * slot));
  engine_t e(model, engine_blocks, 4);
  fill(e, bt, 5, 80);
  CHECK(a.store(toks, e.kv(), bt) == 80);
  a.flush();

  // From a's host tier.
  engine_t e1(model, engine_blocks, 5);
  e1.wipe(untouched);
  auto h1 = a.lookup(toks);
  CHECK(h1.hits_in(0) == 5);
  auto p1 = a.begin_retrieve(h1, e1.kv(), bt);
  CHECK_FALSE(h1.live());  // consumed
  CHECK(p1.tokens() == 80);
  p1.retrieve_layer(0);
  CHECK(wrong_in_layer(e1, bt, 5, 80, 0) == 0);
  CHECK(wrong_in_layer(e1, bt, 5, 80, 1, true) == 0);  // layer 1 not yet written
  p1.retrieve_layer(1);
  CHECK(p1.finish() == 80);
  CHECK(wrong_bytes(e1, bt, 5, 80) == 0);

  // From the segment, in place, through a fresh attachment (another engine's process).
  cache_t b(model, salt, configs(g.name, 32 * slot));
  engine_t e2(model, engine_blocks, 6);
  e2.wipe(untouched);
  auto h2 = b.lookup(toks);
  CHECK(h2.hits_in(1) == 5);
  auto p2 = b.begin_retrieve(h2, e2.kv(), bt, 48);  // the chunks ending by token 48
  CHECK(p2.tokens() == 48);
  p2.retrieve_layer(0);
  CHECK(wrong_in_layer(e2, bt, 5, 48, 0) == 0);
  CHECK(wrong_in_layer(e2, bt, 5, 48, 1, true) == 0);
  p2.retrieve_layer(1);
  CHECK(p2.finish() == 48);
  CHECK(wrong_bytes(e2, bt, 5, 48) == 0);
  const auto st = b.stats();
  CHECK(st.retrieved_tokens == 48);
  CHECK(st.tiers[1].bytes_read == 3 * chunk_bytes);
  CHECK(st.tiers[0].used_chunks == 0);  // read in place: nothing promoted

  // A pipeline that ends early reports nothing loaded and gives its chunks back.
  auto h3 = b.lookup(toks);
  {
    auto p3 = b.begin_retrieve(h3, e2.kv(), bt);
    p3.retrieve_layer(0);
    CHECK(p3.finish() == 0);
  }
  CHECK(b.stats().retrieved_tokens == 48);
  CHECK(b.tier<1>().census().refs == 0);  // every pipeline gave its segment lease back
}

TEST_CASE("a layer-wise retrieve proves the segment's chunks before it copies any byte") {
  segment_guard g{segment_name("corrupt")};
  const auto bt = test::shuffled_table(20, engine_blocks, 7);
  const auto toks = prompt(6, 80);
  {
    cache_t a(model, salt, configs(g.name, 16 * slot));
    engine_t e(model, engine_blocks, 8);
    fill(e, bt, 6, 80);
    CHECK(a.store(toks, e.kv(), bt) == 80);
    a.flush();
  }
  corrupt_every_slot(g.name, slot);
  cache_t b(model, salt, configs(g.name, 16 * slot));
  engine_t e2(model, engine_blocks, 9);
  e2.wipe(untouched);
  auto hit = b.lookup(toks);
  CHECK(hit.tokens() == 80);
  auto p = b.begin_retrieve(hit, e2.kv(), bt);
  CHECK(p.tokens() == 0);  // known before any layer is copied
  p.retrieve_layer(0);
  p.retrieve_layer(1);
  CHECK(p.finish() == 0);
  // Not one byte of the engine changed (the one-call retrieve may write a failed chunk's blocks).
  CHECK(wrong_bytes(e2, bt, 6, 0) == 0);
  CHECK(b.stats().tiers[1].errors >= 1);
  CHECK(b.tier<1>().stats().corrupt >= 1);
  CHECK(b.lookup(toks).tokens() == 0);  // the corrupt chunk is gone from the segment
}

TEST_CASE("chunks a pipeline holds in the segment stay exact while another process clears it") {
  segment_guard g{segment_name("held")};
  const auto bt = test::shuffled_table(20, engine_blocks, 10);
  const auto toks = prompt(7, 80);
  cache_t a(model, salt, configs(g.name, 16 * slot));
  {
    engine_t e(model, engine_blocks, 11);
    fill(e, bt, 7, 80);
    CHECK(a.store(toks, e.kv(), bt) == 80);
    a.flush();
  }
  cache_t b(model, salt, configs(g.name, 16 * slot));
  engine_t e2(model, engine_blocks, 12);
  e2.wipe(untouched);
  auto hit = b.lookup(toks);
  REQUIRE(hit.hits_in(1) == 5);
  auto p = b.begin_retrieve(hit, e2.kv(), bt);
  REQUIRE(p.tokens() == 80);
  p.retrieve_layer(0);
  // Another attachment clears the segment and fills it with other chunks meanwhile.
  {
    cache_t c(model, salt, configs(g.name, 16 * slot));
    (void)c.clear();
    engine_t e3(model, engine_blocks, 13);
    const auto bt3 = test::shuffled_table(40, engine_blocks, 14);
    for (std::uint32_t f = 20; f < 24; ++f) {
      fill(e3, bt3, f, 160);
      (void)c.store(prompt(f, 160), e3.kv(), bt3);
    }
    c.flush();
  }
  p.retrieve_layer(1);
  CHECK(p.finish() == 80);
  CHECK(wrong_bytes(e2, bt, 7, 80) == 0);
  CHECK(b.lookup(toks).tokens() == 0);  // cleared: freed once the pipeline let go
}

TEST_CASE("a layer-wise retrieve promotes a disk's chunks, verified, before it copies") {
  using disk_t = kvtier::cache<kvtier::opt::chunk_tokens<16>,
                               kvtier::opt::layout<kvtier::layout::vllm_flash_nhd>,
                               kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
  const std::string dir = test::temp_dir("layers-disk");
  const disk_t::tier_configs cfg{
      ts::host::config{.capacity_bytes = 16 * 4096},
      ts::local_disk::config{.path = dir, .capacity_bytes = 64 * (slot + 4096)}};
  const auto bt = test::shuffled_table(20, engine_blocks, 15);
  const auto toks = prompt(8, 80);
  {
    disk_t a(model, salt, cfg);
    engine_t e(model, engine_blocks, 16);
    fill(e, bt, 8, 80);
    CHECK(a.store(toks, e.kv(), bt) == 80);
    a.flush();
  }
  disk_t b(model, salt, cfg);
  engine_t e2(model, engine_blocks, 17);
  e2.wipe(untouched);
  auto hit = b.lookup(toks);
  REQUIRE(hit.hits_in(1) == 5);
  auto p = b.begin_retrieve(hit, e2.kv(), bt);
  CHECK(p.tokens() == 80);
  CHECK(b.stats().tiers[1].promotions == 5);  // promoted when it began
  p.retrieve_all();
  CHECK(p.finish() == 80);
  CHECK(wrong_bytes(e2, bt, 8, 80) == 0);
}
