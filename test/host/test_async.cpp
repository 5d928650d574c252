// The GPU path's host-testable half: the batch index arithmetic the CUDA kernel and the DMA
// engines run (executed here on the host, every lane of every block), against the host copy
// engine for every layout; and the cache's asynchronous protocol with a first tier whose copies
// complete only when the test says so (test/host/emulated_gpu.hpp): publication after
// completion, failed copies never visible, leases held until their copy is done, layer-wise
// pipelines and their misuse.
#include "emulated_gpu.hpp"
#include "support.hpp"

#include <kvtier/transfer/inflight_stores.hpp>

namespace ly = kvtier::layout;
namespace tr = kvtier::transfer;

#define KVTIER_ALL_LAYOUTS                                                                        \
  ly::vllm_flash_nhd, ly::vllm_flash_hnd, ly::flashinfer_nhd, ly::flashinfer_hnd,                 \
      ly::vllm_cross_layer, ly::sglang_split_kv, ly::trtllm_packed, ly::fused_kv, ly::mla_latent, \
      ly::sglang_mla

namespace {

template <class L, std::size_t Chunk = 16>
using emu_cache = kvtier::cache<kvtier::opt::chunk_tokens<Chunk>, kvtier::opt::layout<L>,
                                kvtier::opt::tiers<test::emulated_gpu>>;

template <class L>
kvtier::model_shape model_for(std::uint32_t head_size = 8, std::uint32_t dtype = 2) {
  return {3, ly::traits<L>::kv_planes == 2 ? 2u : 1u, head_size, dtype, 4};
}

// Every chunk slot of the cache's first tier for `toks` equals what the host gather writes.
template <class C, class L>
void check_slots_match_host_gather(C& cache, const test::engine<L>& eng,
                                   const std::vector<std::int32_t>& bt,
                                   const std::vector<kvtier::token_id>& toks) {
  const ly::view<L> v(eng.m, eng.kv());
  const auto& f = cache.format();
  std::vector<std::byte> ref(f.chunk_bytes());
  auto l = cache.lookup(toks);
  const std::size_t chunks = cache.chunk_count(toks.size());
  REQUIRE(l.chunks() == chunks);
  std::vector<kvtier::chunk_key> keys(chunks);
  cache.keys(toks, keys);
  auto& ix = cache.template tier<0>().index();
  for (std::size_t i = 0; i < chunks; ++i) {
    const std::size_t ntok =
        std::min<std::size_t>(C::chunk_tokens, toks.size() - i * C::chunk_tokens);
    tr::gather(v, f, bt, i * C::chunk_tokens, ntok, ref.data());
    auto* e = ix.find_ready(keys[i]);
    REQUIRE(e != nullptr);
    CHECK(std::memcmp(cache.template tier<0>().data(ix.slot(*e)), ref.data(), f.bytes(ntok)) == 0);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("batched GPU index logic moves every layout byte-exactly (kernel and copy list)",
                   L, KVTIER_ALL_LAYOUTS) {
  for (auto engine : {test::emu_engine::kernel, test::emu_engine::copy_list}) {
    // Rows of 16, 8, 6 and 5 bytes: the kernel moves them in 16-, 8-, 2- and 1-byte accesses.
    for (auto [head, dtype, width] : {std::tuple{8u, 2u, 16u}, std::tuple{4u, 2u, 8u},
                                      std::tuple{3u, 2u, 2u}, std::tuple{5u, 1u, 1u}}) {
      CAPTURE(static_cast<int>(engine));
      CAPTURE(head);
      const auto m = model_for<L>(head, dtype);
      kvtier::cache_config cfg;
      cfg.store_partial_tail = true;  // a partial chunk: blocks past its tokens move nothing
      emu_cache<L> cache(m, test::small_salt, {{std::size_t{1} << 20, engine}}, cfg);
      test::engine<L> eng(m, 40, 1), dst(m, 40, 2);
      const auto toks = test::tokens(16 * 5 + 6, 3);
      const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 40, 4);
      const auto bt2 = test::shuffled_table(test::blocks_for(toks.size(), 4), 40, 5);
      REQUIRE(cache.store(toks, eng.kv(), bt) == toks.size());
      auto& x = cache.template tier<0>().transfers();
      CHECK(x.batches == 0);  // queued, not run
      test::last_width = 0;
      x.run();
      CHECK(x.batches == 1);  // 6 chunks x 3 layers in one batch
      if (engine == test::emu_engine::kernel) CHECK(test::last_width == width);
      check_slots_match_host_gather(cache, eng, bt, toks);
      auto l = cache.lookup(toks);
      REQUIRE(l.tokens() == toks.size());
      REQUIRE(cache.retrieve(l, dst.kv(), bt2) == toks.size());
      CHECK_FALSE(test::same_tokens(eng, bt, dst, bt2, 0, toks.size()));  // not run yet
      x.run();
      CHECK(test::same_tokens(eng, bt, dst, bt2, 0, toks.size()));
      // Nothing outside the request's blocks was written.
      test::engine<L> untouched(m, 40, 2);
      for (std::int64_t b = 0; b < 40; ++b) {
        if (std::find(bt2.begin(), bt2.end(), b) != bt2.end()) continue;
        for (std::size_t li = 0; li < m.layers; ++li)
          for (std::size_t kv = 0; kv < test::engine<L>::planes; ++kv)
            for (std::size_t s = 0; s < m.block_size; ++s)
              for (std::size_t h = 0; h < m.kv_heads; ++h)
                REQUIRE(std::memcmp(dst.row(li, kv, b, s, h), untouched.row(li, kv, b, s, h),
                                    m.head_size * m.dtype_size) == 0);
      }
    }
  }
}

TEST_CASE("batch plan: segment order, dense detection, copy granularity, vector width") {
  const kvtier::model_shape m{2, 4, 64, 2, 16};
  test::engine<ly::vllm_flash_nhd> nhd(m, 8, 1);
  test::engine<ly::vllm_flash_hnd> hnd(m, 8, 1);
  const ly::view<ly::vllm_flash_nhd> vn(m, nhd.kv());
  const ly::view<ly::vllm_flash_hnd> vh(m, hnd.kv());
  tr::batch_plan p;
  p.eng = vn.resolved();
  CHECK(p.engine_dense());
  CHECK(p.copies_per_segment() == 1);
  p.eng = vh.resolved();
  CHECK_FALSE(p.engine_dense());
  CHECK_FALSE(p.engine_token_dense());
  CHECK(p.copies_per_segment() == 16 * 4);  // one 128-byte row per (token, head)
  // Segment index: block fastest, then plane, then layer, then chunk.
  std::vector<std::byte> slot(2 * m.layers * 2 * 32 * 4 * 128);
  const tr::batch_chunk chunks[2] = {{slot.data(), 32, 0}, {slot.data() + slot.size() / 2, 20, 2}};
  const std::int32_t ids[4] = {5, 1, 7, 3};
  p.eng = vn.resolved();
  p.tensors = nhd.kv().tensors.data();
  p.chunks = chunks;
  p.block_ids = ids;
  p.chunk_count = 2;
  p.planes = 2;
  p.blocks_per_chunk = 2;
  p.layer_begin = 0;
  p.layer_end = 2;
  CHECK(p.segments() == 16);
  const tr::segment s5 = p.at(5);  // chunk 0, layer 1, plane 0, block 1
  CHECK(s5.tokens == 16);
  CHECK(s5.engine == nhd.row(1, 0, 1, 0, 0));
  CHECK(s5.chunk == slot.data() + ((1 * 2 + 0) * 32 + 16) * 4 * 128);
  const tr::segment s15 = p.at(15);  // chunk 1 (20 tokens), layer 1, plane 1, block 1: 4 tokens
  CHECK(s15.tokens == 4);
  CHECK(s15.engine == nhd.row(1, 1, 3, 0, 0));
  p.layer_begin = 1;  // one layer: segments of layer 1 only
  CHECK(p.segments() == 8);
  CHECK(p.at(0).engine == nhd.row(1, 0, 5, 0, 0));
  // Thread blocks per segment on 132 multiprocessors: one layer of one Llama-3-8B chunk (32
  // segments of 2048 16-byte vectors) gets 2 per segment (the cap: one per 1024 vectors).
  tr::batch_plan big = p;
  big.eng.block_size = 16;
  big.eng.heads = 8;
  big.eng.row_bytes = 256;
  big.chunk_count = 1;
  big.blocks_per_chunk = 16;
  big.layer_begin = 0;
  big.layer_end = 1;  // 32 segments of 2048 vectors
  CHECK(tr::parts_for(big, 16, 132) == 2);
  big.eng.row_bytes = 2048;  // 16384 vectors: up to 16 parts, 17 wanted
  CHECK(tr::parts_for(big, 16, 132) == 16);
  big.layer_end = 32;  // 1024 segments: one part each
  CHECK(tr::parts_for(big, 16, 132) == 1);
  // The widest aligned access.
  std::vector<void*> t = {reinterpret_cast<void*>(0x1000), reinterpret_cast<void*>(0x2008)};
  CHECK(tr::vector_bytes(vn.resolved(), t.data(), 1, 4096) == 16);
  CHECK(tr::vector_bytes(vn.resolved(), t.data(), 2, 4096) == 8);
  ly::ref odd = vn.resolved();
  odd.row_bytes = 6;
  CHECK(tr::vector_bytes(odd, t.data(), 1, 4096) == 2);
}

TEST_CASE("the kernel's access width is the widest the alignment allows: 16, 8, 4, 2 or 1") {
  const auto width = [](std::uint32_t vb) {
    std::uint32_t w = 0;
    tr::for_vector_width(vb, [&](auto c) { w = c; });
    return w;
  };
  CHECK(width(16) == 16);
  CHECK(width(8) == 8);
  CHECK(width(4) == 4);
  CHECK(width(2) == 2);
  CHECK(width(1) == 1);
}

TEST_CASE("memcpy_batch's copy list: merged runs, handed over whenever the arrays fill") {
  const kvtier::model_shape m{2, 4, 64, 2, 16};
  test::engine<ly::vllm_flash_hnd> hnd(m, 8, 1);
  test::engine<ly::vllm_flash_nhd> nhd(m, 8, 1);
  std::vector<std::byte> slot(2 * m.layers * 2 * 32 * 4 * 128);
  const tr::batch_chunk chunks[2] = {{slot.data(), 32, 0}, {slot.data() + slot.size() / 2, 20, 2}};
  const std::int32_t ids[4] = {5, 1, 7, 3};
  const auto plan_for = [&](const auto& eng, const auto& view) {
    tr::batch_plan p;
    p.eng = view.resolved();
    p.tensors = eng.kv().tensors.data();
    p.chunks = chunks;
    p.block_ids = ids;
    p.chunk_count = 2;
    p.planes = 2;
    p.blocks_per_chunk = 2;
    p.layer_begin = 0;
    p.layer_end = 2;
    return p;
  };
  const ly::view<ly::vllm_flash_hnd> vh(m, hnd.kv());
  const tr::batch_plan p = plan_for(hnd, vh);
  // The copies the plan defines, one per (segment, token, head) row: 52 tokens x 4 heads x 2
  // layers x 2 planes, 128 bytes each. HND rows are never adjacent on the engine side.
  std::vector<std::pair<void*, std::size_t>> want;
  for (std::uint64_t i = 0; i < p.segments(); ++i) {
    for (std::uint32_t k = 0; k < p.copies_per_segment(); ++k) {
      std::byte *e = nullptr, *c = nullptr;
      const std::size_t n = p.copy_at(p.at(i), k, e, c);
      if (n > 0) want.emplace_back(c, n);
    }
  }
  REQUIRE(want.size() == 52 * 4 * 2 * 2);
  for (std::size_t cap : {std::size_t{1}, std::size_t{7}, std::size_t{100}, want.size()}) {
    CAPTURE(cap);
    std::vector<void*> dst(cap), src(cap);
    std::vector<std::size_t> size(cap);
    std::vector<std::pair<void*, std::size_t>> got;
    std::size_t calls = 0;
    const std::size_t flushes = tr::gather_copies(p, tr::way::to_chunk, cap, dst.data(), src.data(),
                                                  size.data(), [&](std::size_t n) {
                                                    ++calls;
                                                    CHECK(n > 0);
                                                    CHECK(n <= cap);
                                                    for (std::size_t i = 0; i < n; ++i)
                                                      got.emplace_back(dst[i], size[i]);
                                                  });
    CHECK(flushes == calls);
    CHECK(calls == (want.size() + cap - 1) / cap);
    CHECK(got == want);
  }
  // NHD: one run per block, and a chunk's consecutive blocks merge only when the engine's blocks
  // are adjacent too (none here: ids 5, 1 / 7, 3).
  const ly::view<ly::vllm_flash_nhd> vn(m, nhd.kv());
  const tr::batch_plan q = plan_for(nhd, vn);
  std::vector<void*> dst(64), src(64);
  std::vector<std::size_t> size(64);
  std::size_t runs = 0, bytes = 0;
  tr::gather_copies(q, tr::way::to_engine, 64, dst.data(), src.data(), size.data(),
                    [&](std::size_t n) {
                      runs += n;
                      for (std::size_t i = 0; i < n; ++i) bytes += size[i];
                    });
  CHECK(runs == q.segments());
  CHECK(bytes == 52 * 2 * 2 * 4 * 128);
  const std::int32_t adjacent[4] = {2, 3, 6, 7};
  tr::batch_plan r = q;
  r.block_ids = adjacent;
  runs = 0;
  tr::gather_copies(r, tr::way::to_engine, 64, dst.data(), src.data(), size.data(),
                    [&](std::size_t n) { runs += n; });
  CHECK(runs == q.segments() / 2);  // each chunk's two blocks are one run per (layer, plane)
}

TEST_CASE("a retrieve waits only for the stores in flight that read the blocks it writes") {
  kvtier::transfer::inflight_stores st(4, 8);
  const std::int32_t store_a[3] = {7, 2, 9}, store_b[2] = {4, 5}, retrieve[3] = {1, 9, 3};
  const auto overlapping = [&](std::uint32_t op, std::span<const std::int32_t> blocks) {
    std::vector<std::uint32_t> out;
    st.for_overlapping(op, blocks, [&](std::uint32_t o) { out.push_back(o); });
    return out;
  };
  st.begin(0, store_a);
  st.begin(1, store_b);
  CHECK(overlapping(2, retrieve).empty());  // staged, nothing enqueued yet
  st.copied(0);
  st.copied(1);
  CHECK(overlapping(2, retrieve) == std::vector<std::uint32_t>{0});  // block 9; not b
  CHECK(overlapping(2, store_b) == std::vector<std::uint32_t>{1});
  CHECK(overlapping(1, store_b).empty());  // never itself
  st.clear(0);                             // a's copies completed
  CHECK(overlapping(2, retrieve).empty());
  st.begin(0, retrieve);  // the slot reused by another store: live again only once it copies
  CHECK(overlapping(2, std::span<const std::int32_t>(store_a + 2, 1)).empty());  // block 9
  st.copied(0);
  CHECK(overlapping(2, std::span<const std::int32_t>(store_a + 2, 1)) ==
        std::vector<std::uint32_t>{0});
  st.begin(3, {});  // a store of no blocks is never live
  st.copied(3);
  CHECK(overlapping(2, retrieve) == std::vector<std::uint32_t>{0});
}

TEST_CASE("a GPU store is published only once its copy has completed") {
  using L = ly::vllm_flash_nhd;
  const auto m = model_for<L>();
  emu_cache<L> cache(m, test::small_salt, {{std::size_t{1} << 20}});
  test::engine<L> eng(m, 32, 1);
  const auto toks = test::tokens(64, 1);
  const auto bt = test::shuffled_table(16, 32, 2);
  auto& x = cache.tier<0>().transfers();
  REQUIRE(cache.store(toks, eng.kv(), bt, test::emu_order{7}) == 64);
  CHECK(x.joins == 1);  // ordered after the engine's stream
  CHECK(cache.lookup(toks).tokens() == 0);
  CHECK(cache.stats().tiers[0].writes == 0);
  // A second store of the same tokens while the first is in flight copies nothing again.
  REQUIRE(cache.store(toks, eng.kv(), bt) == 64);
  CHECK(x.staged_chunks == 4);
  x.run();
  CHECK(cache.lookup(toks).tokens() == 64);
  CHECK(cache.stats().tiers[0].writes == 4);
  // synchronize() runs and publishes what is in flight.
  const auto more = test::tokens(32, 9);
  REQUIRE(cache.store(more, eng.kv(), bt) == 32);
  cache.synchronize();
  CHECK(cache.stats().tiers[0].used_chunks == 6);
  CHECK(cache.lookup(more).tokens() == 32);
}

TEST_CASE("a failed GPU copy is never served, and bad input changes nothing") {
  using L = ly::vllm_flash_hnd;
  const auto m = model_for<L>();
  emu_cache<L> cache(m, test::small_salt, {{std::size_t{1} << 20}});
  test::engine<L> eng(m, 32, 1);
  const auto toks = test::tokens(64, 1);
  const auto bt = test::shuffled_table(16, 32, 2);
  auto& x = cache.tier<0>().transfers();
  x.fail_next = true;
  REQUIRE(cache.store(toks, eng.kv(), bt) == 64);
  x.run();
  CHECK(cache.lookup(toks).tokens() == 0);
  CHECK(cache.stats().tiers[0].errors == 4);  // one per chunk dropped
  CHECK(cache.stats().tiers[0].used_chunks == 0);
  // Failing while staging: the exception reaches the engine, nothing is kept.
  x.fail_stage = true;
  CHECK_THROWS_AS(cache.store(toks, eng.kv(), bt), kvtier::tier_error);
  x.fail_stage = false;
  CHECK(cache.stats().tiers[0].used_chunks == 0);
  // Tensors the tier refuses (host memory for a GPU tier) are rejected before anything changes.
  REQUIRE(cache.store(toks, eng.kv(), bt) == 64);
  cache.synchronize();
  auto kv = eng.kv();
  x.reject = kv.tensors[1];
  CHECK_THROWS_AS(cache.store(test::tokens(64, 5), kv, bt), kvtier::invalid_argument);
  auto l = cache.lookup(toks);
  CHECK(l.tokens() == 64);
  CHECK_THROWS_AS(cache.retrieve(l, kv, bt), kvtier::invalid_argument);
  CHECK(l.live());  // the lease survives a rejected retrieve
  x.reject = nullptr;
  CHECK(cache.stats().tiers[0].used_chunks == 4);
}

TEST_CASE("a retrieve keeps its chunks from eviction until its copy has completed") {
  using L = ly::vllm_flash_nhd;
  const auto m = model_for<L>();
  emu_cache<L> cache(m, test::small_salt, {{2 * 4096}});  // two chunk slots
  test::engine<L> eng(m, 32, 1), dst(m, 32, 2);
  const auto a = test::tokens(32, 1), b = test::tokens(32, 2);
  const auto bt = test::shuffled_table(8, 32, 3), bt2 = test::shuffled_table(8, 32, 4);
  auto& x = cache.tier<0>().transfers();
  REQUIRE(cache.store(a, eng.kv(), bt) == 32);
  x.run();
  auto l = cache.lookup(a);
  REQUIRE(cache.retrieve(l, dst.kv(), bt2) == 32);
  CHECK_FALSE(l.live());
  CHECK(cache.store(b, eng.kv(), bt) == 0);  // a's slots are still being read
  x.run();
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 32));
  CHECK(cache.store(b, eng.kv(), bt) == 32);  // released once the copy completed
  cache.synchronize();  // the engine's tensors must outlive the copies that read them
}

TEST_CASE("a retrieve's copy waits for the engine's stream as of the call, once") {
  // Kernels the engine queued before retrieve() may still use the blocks it loads into (blocks
  // a request that is still running just freed, a store still copying from them): the copy must
  // start after them. A store waits for the engine's stream too (the KV it reads is computed).
  using L = ly::vllm_flash_nhd;
  const auto m = model_for<L>();
  emu_cache<L> cache(m, test::small_salt, {{std::size_t{1} << 20}});
  test::engine<L> eng(m, 32, 1), dst(m, 32, 2);
  const auto toks = test::tokens(32, 1);
  const auto bt = test::shuffled_table(8, 32, 3), bt2 = test::shuffled_table(8, 32, 4);
  auto& x = cache.tier<0>().transfers();
  REQUIRE(cache.store(toks, eng.kv(), bt, test::emu_order{3}) == 32);
  CHECK(x.last_op_steps() == "bjce");  // begin, wait for the engine, copy, end
  x.run();
  auto l = cache.lookup(toks);
  REQUIRE(cache.retrieve(l, dst.kv(), bt2, test::emu_order{4}) == 32);
  CHECK(x.last_op_steps() == "bjce");
  CHECK(x.log[x.log.size() - 3].what == 'j');
  CHECK(x.log[x.log.size() - 3].stream == 4);  // the order's stream, not another
  x.run();
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 32));
  // Layer by layer: one wait when the retrieve begins, before any copy, and none per layer
  // (the copy of layer l+1 must not wait for the engine's compute of layer l).
  auto l2 = cache.lookup(toks);
  auto p = cache.begin_retrieve(l2, dst.kv(), bt2, test::emu_order{5});
  CHECK(x.last_op_steps() == "bj");
  for (std::size_t layer = 0; layer < m.layers; ++layer) p.retrieve_layer(layer);
  CHECK(p.finish() == 32);
  CHECK(x.last_op_steps() == "bj" + std::string(m.layers, 'c') + "e");
  x.run();
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 32));
}

TEST_CASE_TEMPLATE("layer-wise pipelines copy layer by layer, in order, whole or not at all", L,
                   ly::vllm_flash_nhd, ly::vllm_flash_hnd, ly::mla_latent) {
  const auto m = model_for<L>();
  emu_cache<L> cache(m, test::small_salt, {{std::size_t{1} << 20}});
  test::engine<L> eng(m, 32, 1), dst(m, 32, 2);
  const auto toks = test::tokens(48, 1);
  const auto bt = test::shuffled_table(12, 32, 2), bt2 = test::shuffled_table(12, 32, 3);
  auto& x = cache.template tier<0>().transfers();
  {
    auto p = cache.begin_store(toks, eng.kv(), bt, test::emu_order{1});
    CHECK(p.tokens() == 48);
    CHECK_THROWS_WITH_AS(p.store_layer(1), test::contains("store_layer(1) out of order: layer 0"),
                         kvtier::invalid_argument);
    for (std::size_t l = 0; l < m.layers; ++l) CHECK(p.store_layer(l) != nullptr);
    CHECK_THROWS_WITH_AS(p.store_layer(3), test::contains("past the model's 3 layers"),
                         kvtier::invalid_argument);
    CHECK(x.joins == m.layers);  // each layer waits for the engine's stream
    CHECK(p.finish() == 48);
  }
  CHECK(x.queued() == m.layers + 1);  // one batch per layer, then the end
  x.run();
  CHECK(x.batches == m.layers);
  CHECK(cache.lookup(toks).tokens() == 48);

  // An abandoned store (not every layer) publishes nothing.
  const auto other = test::tokens(48, 7);
  {
    auto p = cache.begin_store(other, eng.kv(), bt, test::emu_order{1});
    p.store_layer(0);
  }  // destroyed without the other layers
  x.run();
  CHECK(cache.lookup(other).tokens() == 0);

  // Retrieve layer by layer: after running layer k's copy only, layers <= k are loaded.
  auto l = cache.lookup(toks);
  auto p = cache.begin_retrieve(l, dst.kv(), bt2, test::emu_order{2});
  CHECK_FALSE(l.live());
  CHECK(p.tokens() == 48);
  const std::size_t row = m.head_size * m.dtype_size;
  for (std::size_t layer = 0; layer < m.layers; ++layer) {
    p.retrieve_layer(layer);
    x.run(1);
    for (std::size_t li = 0; li < m.layers; ++li) {
      const bool same =
          std::memcmp(dst.row(li, 0, bt2[0], 0, 0), eng.row(li, 0, bt[0], 0, 0), row) == 0;
      CHECK(same == (li <= layer));
    }
  }
  CHECK(p.finish() == 48);
  x.run();
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 48));
  CHECK(cache.stats().retrieved_tokens == 48);
}

TEST_CASE("a pinned-host-like GPU tier feeds lower tiers only after its copy completed") {
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<16>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<test::emulated_gpu, kvtier::tier::local_disk>>;
  const auto m = model_for<L>();
  const auto dir = test::temp_dir("async-disk");
  C cache(m, test::small_salt, {{2 * 4096}, {dir, 64 * 8192}});
  test::engine<L> eng(m, 32, 1), dst(m, 32, 2);
  const auto toks = test::tokens(64, 1);
  const auto bt = test::shuffled_table(16, 32, 2), bt2 = test::shuffled_table(16, 32, 3);
  auto& x = cache.tier<0>().transfers();
  REQUIRE(cache.store(toks, eng.kv(), bt) == 32);  // two slots: two chunks
  cache.flush();                                   // runs the copies, then writes them to disk
  CHECK(cache.stats().tiers[1].writes == 2);
  REQUIRE(cache.store(test::tokens(64, 8), eng.kv(), bt) == 32);  // evicts toks' chunks
  cache.flush();
  // Promotion from disk into the GPU tier, then the copy into the engine.
  auto l = cache.lookup(toks);
  REQUIRE(l.tokens() == 32);
  CHECK(l.hits_in(1) == 2);
  REQUIRE(cache.retrieve(l, dst.kv(), bt2) == 32);
  x.run();
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 32));
}
