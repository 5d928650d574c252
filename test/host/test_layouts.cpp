// Engine layouts on the host copy path: byte-exact gather/scatter for every layout, the chunk
// format, cross-layout sharing for every pair, strided engines, and the layout descriptions.
#include "support.hpp"

namespace ly = kvtier::layout;

#define KVTIER_TWO_PLANE_LAYOUTS                                                  \
  ly::vllm_flash_nhd, ly::vllm_flash_hnd, ly::flashinfer_nhd, ly::flashinfer_hnd, \
      ly::vllm_cross_layer, ly::sglang_split_kv, ly::trtllm_packed, ly::fused_kv, ly::vllm_cpu
#define KVTIER_ALL_LAYOUTS KVTIER_TWO_PLANE_LAYOUTS, ly::mla_latent, ly::sglang_mla

namespace {

struct shape_case {
  kvtier::model_shape m;
  std::int64_t blocks;
};

// Randomised model shapes from fixed seeds (block size divides the 64-token span used below).
// MLA layouts (one plane) get kv_heads = 1.
template <class L>
std::vector<shape_case> shapes() {
  const bool heads = ly::traits<L>::kv_planes == 2;  // MLA layouts hold one latent row
  std::vector<shape_case> out = {{{2, heads ? 2u : 1u, 8, 2, 4}, 40},
                                 {{1, 1, 4, 1, 32}, 5},
                                 {{3, 1, 576, 2, 16}, 9},  // an MLA-sized row
                                 // vllm_cpu's K transpose in 16-byte tiles with ragged edges:
                                 // 2-byte elements, 12 per row (8 tiled + 4), runs of 11-16
                                 // tokens; 4-byte, 18 per row (16 + 2); 2-byte, 32-token blocks.
                                 {{1, heads ? 2u : 1u, 12, 2, 16}, 9},
                                 {{2, heads ? 3u : 1u, 18, 4, 32}, 5},
                                 {{1, heads ? 2u : 1u, 24, 2, 32}, 6}};
  std::mt19937 rng(1234);
  const std::uint32_t bs[] = {1, 2, 4, 8, 16, 32};
  const std::uint32_t dts[] = {1, 2, 4};
  for (int i = 0; i < 6; ++i) {
    auto r = [&](std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); };
    kvtier::model_shape m{1 + r(4), heads ? 1 + r(5) : 1, 1 + r(24), dts[r(3)], bs[r(6)]};
    out.push_back({m, static_cast<std::int64_t>(2 * 64 / m.block_size + 1 + r(7))});
  }
  return out;
}

template <class L>
ly::chunk_format format(const kvtier::model_shape& m, std::size_t tokens) {
  return ly::chunk_format::from(m, tokens, ly::traits<L>::kv_planes);
}

}  // namespace

TEST_CASE_TEMPLATE("gather writes the canonical chunk format", L, KVTIER_ALL_LAYOUTS) {
  for (const auto& sc : shapes<L>()) {
    CAPTURE(sc.m.layers);
    CAPTURE(sc.m.kv_heads);
    CAPTURE(sc.m.head_size);
    CAPTURE(sc.m.dtype_size);
    CAPTURE(sc.m.block_size);
    test::engine<L> eng(sc.m, sc.blocks, 5);
    const auto bt = test::shuffled_table(test::blocks_for(64, sc.m.block_size), sc.blocks, 9);
    const ly::view<L> v(sc.m, eng.kv());
    const auto f = format<L>(sc.m, 32);
    // Tokens [5, 37): starts and ends inside blocks (when block_size > 1).
    const std::size_t first = 5, n = 32;
    std::vector<std::byte> chunk(f.bytes(n));
    kvtier::transfer::gather(v, f, bt, first, n, chunk.data());
    bool all = true;
    for (std::size_t t = 0; t < n; ++t) {
      const std::size_t tok = first + t;
      const std::size_t b = bt[tok / sc.m.block_size], s = tok % sc.m.block_size;
      for (std::size_t l = 0; l < sc.m.layers; ++l)
        for (std::size_t kv = 0; kv < f.kv_planes; ++kv)
          for (std::size_t h = 0; h < sc.m.kv_heads; ++h)
            all &= std::memcmp(chunk.data() + f.offset(l, kv, t, n) + h * f.row_bytes(),
                               eng.get_row(l, kv, b, s, h).data(), f.row_bytes()) == 0;
    }
    CHECK(all);
  }
}

TEST_CASE_TEMPLATE("scatter is the exact inverse of gather and touches nothing else", L,
                   KVTIER_ALL_LAYOUTS) {
  for (const auto& sc : shapes<L>()) {
    test::engine<L> src(sc.m, sc.blocks, 7), dst(sc.m, sc.blocks, 8);
    const auto dst_before = dst.storage;
    const std::size_t n = 45;  // a partial last block when block_size does not divide 45
    const auto bt_src = test::shuffled_table(test::blocks_for(n, sc.m.block_size), sc.blocks, 1);
    const auto bt_dst = test::shuffled_table(test::blocks_for(n, sc.m.block_size), sc.blocks, 2);
    const auto f = format<L>(sc.m, n);
    std::vector<std::byte> chunk(f.bytes(n));
    kvtier::transfer::gather(ly::view<L>(sc.m, src.kv()), f, bt_src, 0, n, chunk.data());
    kvtier::transfer::scatter(ly::view<L>(sc.m, dst.kv()), f, bt_dst, 0, n, chunk.data());
    CHECK(test::same_tokens(src, bt_src, dst, bt_dst, 0, n));
    // Expected engine: the old bytes with exactly the n tokens' rows replaced (by reference
    // addressing); anything else scatter touched would show as a difference.
    test::engine<L> expected = dst;
    expected.storage = dst_before;
    for (std::size_t t = 0; t < n; ++t) {
      const std::size_t bs = bt_src[t / sc.m.block_size], bd = bt_dst[t / sc.m.block_size];
      const std::size_t slot = t % sc.m.block_size;
      for (std::size_t l = 0; l < sc.m.layers; ++l)
        for (std::size_t kv = 0; kv < f.kv_planes; ++kv)
          for (std::size_t h = 0; h < sc.m.kv_heads; ++h)
            expected.put_row(l, kv, bd, slot, h, src.get_row(l, kv, bs, slot, h).data());
    }
    CHECK(dst.storage == expected.storage);
  }
}

// Every ordered pair of two-plane layouts: A's chunk scatters into B exactly, and B gathers
// back the very same canonical bytes.
template <class A>
struct from_layout {
  template <class B>
  static void into() {
    for (const auto& sc : shapes<A>()) {
      test::engine<A> a(sc.m, sc.blocks, 3);
      test::engine<B> b(sc.m, sc.blocks, 4);
      const std::size_t n = 64;
      const auto ta = test::shuffled_table(test::blocks_for(n, sc.m.block_size), sc.blocks, 5);
      const auto tb = test::shuffled_table(test::blocks_for(n, sc.m.block_size), sc.blocks, 6);
      const auto f = format<A>(sc.m, n);
      std::vector<std::byte> chunk(f.bytes(n)), back(f.bytes(n));
      kvtier::transfer::gather(ly::view<A>(sc.m, a.kv()), f, ta, 0, n, chunk.data());
      kvtier::transfer::scatter(ly::view<B>(sc.m, b.kv()), f, tb, 0, n, chunk.data());
      CHECK(test::same_tokens(a, ta, b, tb, 0, n));
      kvtier::transfer::gather(ly::view<B>(sc.m, b.kv()), f, tb, 0, n, back.data());
      CHECK(back == chunk);
    }
  }
};

TEST_CASE_TEMPLATE("a chunk from one layout loads into every other layout exactly", A,
                   KVTIER_TWO_PLANE_LAYOUTS) {
  using F = from_layout<A>;
  F::template into<ly::vllm_flash_nhd>();
  F::template into<ly::vllm_flash_hnd>();
  F::template into<ly::flashinfer_nhd>();
  F::template into<ly::flashinfer_hnd>();
  F::template into<ly::vllm_cross_layer>();
  F::template into<ly::sglang_split_kv>();
  F::template into<ly::trtllm_packed>();
  F::template into<ly::fused_kv>();
  F::template into<ly::vllm_cpu>();
}

TEST_CASE("MLA chunks move between vLLM's and SGLang's MLA layouts exactly") {
  from_layout<ly::mla_latent>::into<ly::sglang_mla>();
  from_layout<ly::sglang_mla>::into<ly::mla_latent>();
}

TEST_CASE("the chunk format has one plane for MLA and two otherwise") {
  static_assert(ly::traits<ly::mla_latent>::kv_planes == 1);
  static_assert(ly::traits<ly::sglang_mla>::kv_planes == 1);
  static_assert(ly::traits<ly::vllm_flash_nhd>::kv_planes == 2);
  static_assert(ly::traits<ly::sglang_split_kv>::kv_planes == 2);
  static_assert(ly::traits<ly::fused_kv>::kv_planes == 2);
  // DeepSeek-V3 MLA: 61 layers, latent 512 + 64, bf16: 70272 bytes per token, one plane.
  const kvtier::model_shape ds{61, 1, 576, 2, 64};
  const auto f = ly::chunk_format::from(ds, 256, 1);
  CHECK(f.bytes(1) == 61u * 576 * 2);
  // Different planes, different fingerprint: MLA and MHA chunks never share keys.
  CHECK(f.fingerprint() != ly::chunk_format::from(ds, 256, 2).fingerprint());
}

TEST_CASE("layout shapes match the engines' tensors") {
  const kvtier::model_shape m{32, 8, 128, 2, 16};
  using A5 = std::array<std::int64_t, 5>;
  using A6 = std::array<std::int64_t, 6>;
  using A3 = std::array<std::int64_t, 3>;
  using A4 = std::array<std::int64_t, 4>;
  CHECK(ly::shape_of<ly::vllm_flash_nhd>(m, 1000) == A5{2, 1000, 16, 8, 128});
  CHECK(ly::shape_of<ly::vllm_flash_hnd>(m, 1000) == A5{2, 1000, 8, 16, 128});
  CHECK(ly::shape_of<ly::flashinfer_nhd>(m, 1000) == A5{1000, 2, 16, 8, 128});
  CHECK(ly::shape_of<ly::flashinfer_hnd>(m, 1000) == A5{1000, 2, 8, 16, 128});
  CHECK(ly::shape_of<ly::vllm_cross_layer>(m, 1000) == A6{1000, 32, 2, 16, 8, 128});
  CHECK(ly::shape_of<ly::sglang_split_kv>(m, 1000) == A3{16000, 8, 128});
  CHECK(ly::shape_of<ly::trtllm_packed>(m, 1000) == A6{1000, 32, 2, 8, 16, 128});
  CHECK(ly::shape_of<ly::fused_kv>(m, 1000) == A4{1000, 8, 16, 256});
  CHECK(ly::shape_of<ly::vllm_cpu>(m, 1000) == A4{1000, 8, 16, 256});
  const kvtier::model_shape mla{61, 1, 576, 2, 64};
  CHECK(ly::shape_of<ly::mla_latent>(mla, 100) == A3{100, 64, 576});
  CHECK(ly::shape_of<ly::sglang_mla>(mla, 100) == A3{6400, 1, 576});
  CHECK(ly::tensor_count(ly::sglang_split_kv::scope, m) == 64);
  CHECK(ly::tensor_count(ly::trtllm_packed::scope, m) == 1);
  // Llama-3-8B: 128 KiB per token, a 256-token chunk is 32 MiB.
  const auto f = ly::chunk_format::from(m, 256);
  CHECK(f.chunk_bytes() == 32u << 20);
  CHECK(f.bytes(1) == 128u << 10);
}

// ---- strides --------------------------------------------------------------------------------

TEST_CASE("an engine with padded strides (a view into a larger allocation) round-trips") {
  // vLLM NHD [2, NB, BS, H, D] where each block is padded by 3 rows of D: block stride larger
  // than dense, every other stride dense.
  const kvtier::model_shape m{2, 2, 8, 2, 4};
  const std::int64_t NB = 12, BS = 4, H = 2, D = 8, pad = 3 * D;
  const std::int64_t block_stride = BS * H * D + pad;
  std::vector<std::int64_t> shape{2, NB, BS, H, D};
  std::vector<std::int64_t> strides{NB * block_stride, block_stride, H * D, D, 1};
  const std::size_t elems = static_cast<std::size_t>(2 * NB * block_stride);
  std::vector<std::vector<std::byte>> src(2, std::vector<std::byte>(elems * 2)),
      dst(2, std::vector<std::byte>(elems * 2, std::byte{0}));
  std::mt19937 rng(3);
  for (auto& t : src)
    for (auto& b : t) b = static_cast<std::byte>(rng());
  std::vector<void*> ps{src[0].data(), src[1].data()}, pd{dst[0].data(), dst[1].data()};
  const auto bt = test::shuffled_table(8, NB, 4);
  const auto f = ly::chunk_format::from(m, 32);
  std::vector<std::byte> chunk(f.bytes(32));
  kvtier::transfer::gather(ly::view<ly::vllm_flash_nhd>(m, {ps, shape, strides}), f, bt, 0, 32,
                           chunk.data());
  kvtier::transfer::scatter(ly::view<ly::vllm_flash_nhd>(m, {pd, shape, strides}), f, bt, 0, 32,
                            chunk.data());
  // Every row of the 32 tokens equal; every padding byte of dst untouched (still zero).
  std::size_t rows_equal = 0, pad_touched = 0;
  for (std::size_t l = 0; l < 2; ++l)
    for (std::int64_t kv = 0; kv < 2; ++kv)
      for (std::size_t t = 0; t < 32; ++t) {
        const std::int64_t b = bt[t / 4], s = static_cast<std::int64_t>(t % 4);
        for (std::int64_t h = 0; h < H; ++h) {
          const std::size_t off = static_cast<std::size_t>(kv * strides[0] + b * strides[1] +
                                                           s * strides[2] + h * strides[3]) *
                                  2;
          rows_equal += std::memcmp(src[l].data() + off, dst[l].data() + off, D * 2) == 0;
        }
      }
  for (std::size_t l = 0; l < 2; ++l)
    for (std::int64_t kv = 0; kv < 2; ++kv)
      for (std::int64_t b = 0; b < NB; ++b)
        for (std::int64_t p = 0; p < pad * 2; ++p)
          pad_touched +=
              dst[l][static_cast<std::size_t>((kv * strides[0] + b * strides[1] + BS * H * D) * 2 +
                                              p)] != std::byte{0};
  CHECK(rows_equal == 2 * 2 * 32 * H);
  CHECK(pad_touched == 0);
}

TEST_CASE("a permuted view (HND storage described as NHD dims) is addressed by its strides") {
  // Storage is vLLM HND [2, NB, H, BS, D]; the engine hands kvtier the NHD-ordered view of it
  // (shape [2, NB, BS, H, D] with permuted strides), as vLLM does with kv_cache_stride_order.
  const kvtier::model_shape m{1, 3, 8, 2, 4};
  const std::int64_t NB = 10;
  test::engine<ly::vllm_flash_hnd> hnd(m, NB, 11);
  std::vector<std::int64_t> shape{2, NB, 4, 3, 8};
  std::vector<std::int64_t> strides{NB * 3 * 4 * 8, 3 * 4 * 8, 8, 4 * 8, 1};
  std::vector<void*> ptrs{hnd.storage[0].data()};
  const ly::view<ly::vllm_flash_nhd> permuted(m, {ptrs, shape, strides});
  const auto bt = test::shuffled_table(6, NB, 12);
  const auto f = ly::chunk_format::from(m, 24);
  std::vector<std::byte> a(f.bytes(24)), b(f.bytes(24));
  kvtier::transfer::gather(permuted, f, bt, 0, 24, a.data());
  kvtier::transfer::gather(ly::view<ly::vllm_flash_hnd>(m, hnd.kv()), f, bt, 0, 24, b.data());
  CHECK(a == b);
}

TEST_CASE("strides that contradict the layout are rejected, naming both") {
  const kvtier::model_shape m{1, 2, 8, 2, 4};
  std::vector<std::byte> t(2 * 4 * 4 * 2 * 8 * 2);
  std::vector<void*> ptrs{t.data()};
  std::vector<std::int64_t> shape{2, 4, 4, 2, 8};
  using V = ly::view<ly::vllm_flash_nhd>;
  const auto bad = [&](std::vector<std::int64_t> st) {
    return [&, st] { V v(m, {ptrs, shape, st}); };
  };
  CHECK_THROWS_WITH_AS(bad({256, 64, 16, 8, 2})(),
                       "kvtier: engine_kv strides[4] (head_size) is 2, layout vllm_flash_nhd "
                       "needs 1 (contiguous rows)",
                       kvtier::invalid_argument);
  // Heads overlapping: head stride 4 < head_size 8.
  CHECK_THROWS_WITH_AS(bad({256, 64, 16, 4, 1})(),
                       test::contains("strides[3] (kv_heads) is 4, which overlaps"),
                       kvtier::invalid_argument);
  CHECK_THROWS_WITH_AS(bad({256, 64, 16, 8})(),
                       "kvtier: engine_kv strides have rank 4, shape has rank 5",
                       kvtier::invalid_argument);
  CHECK_NOTHROW(bad({256, 64, 16, 8, 1})());  // dense
}

TEST_CASE("token-pool extents must be whole blocks, and MLA layouts need one head") {
  const kvtier::model_shape m{1, 2, 8, 2, 4};
  std::vector<std::byte> t(1 << 12);
  std::vector<void*> ptrs{t.data(), t.data()};
  std::vector<std::int64_t> shape{30, 2, 8};  // 30 tokens is not a multiple of block size 4
  CHECK_THROWS_WITH_AS((ly::view<ly::sglang_split_kv>(m, {ptrs, shape})),
                       "kvtier: engine_kv shape[0] (num_tokens) is 30, layout sglang_split_kv "
                       "expects a positive multiple of 4",
                       kvtier::invalid_argument);
  std::vector<void*> one{t.data()};
  std::vector<std::int64_t> mla{4, 4, 8};
  CHECK_THROWS_WITH_AS((ly::view<ly::mla_latent>(m, {one, mla})),
                       "kvtier: model_shape.kv_heads is 2, layout mla_latent holds one latent row "
                       "per token (no K/V split) and expects 1",
                       kvtier::invalid_argument);
}

TEST_CASE_TEMPLATE("every layout round-trips through the cache, with disk promotion", L,
                   KVTIER_ALL_LAYOUTS) {
  using C = kvtier::cache<kvtier::opt::chunk_tokens<16>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
  const kvtier::model_shape m{2, ly::traits<L>::kv_planes == 2 ? 2u : 1u, 8, 2, 4};
  C cache(m, test::small_salt, {{4 * 4096}, {test::temp_dir("layouts"), 32 * 8192}});
  test::engine<L> eng(m, 64, 1), dst(m, 64, 2);
  const auto toks = test::tokens(64, 3);
  const auto bt = test::shuffled_table(16, 64, 4), bt2 = test::shuffled_table(16, 64, 5);
  REQUIRE(cache.store(toks, eng.kv(), bt) == 64);
  cache.flush();
  REQUIRE(cache.store(test::tokens(64, 4), eng.kv(), bt) == 64);  // pushes toks to disk only
  cache.flush();
  auto l = cache.lookup(toks);
  CHECK(l.hits_in(1) == 4);
  CHECK(cache.retrieve(l, dst.kv(), bt2) == 64);
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 64));
}

TEST_CASE("vllm_cpu: K is transposed inside each (block, head) page, and pages must be dense") {
  // One layer, 2 heads, head size 3, 1-byte elements, block size 4, 2 blocks: element values
  // written by the page formula, read back from the chunk by the canonical formula.
  const kvtier::model_shape m{1, 2, 3, 1, 4};
  const std::int64_t NB = 2, H = 2, BS = 4, D = 3;
  std::vector<std::uint8_t> t(static_cast<std::size_t>(NB * H * BS * 2 * D));
  for (std::int64_t b = 0; b < NB; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t s = 0; s < BS; ++s)
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t page = (b * H + h) * BS * 2 * D;
          const auto tag = static_cast<std::uint8_t>(((b * BS + s) * H + h) * D + d);
          t[static_cast<std::size_t>(page + d * BS + s)] = tag;                // K[d][s]
          t[static_cast<std::size_t>(page + BS * D + s * D + d)] = tag + 128;  // V[s][d]
        }
  std::vector<void*> ptrs{t.data()};
  const std::vector<std::int64_t> shape{NB, H, BS, 2 * D};
  const ly::view<ly::vllm_cpu> v(m, {ptrs, shape});
  const std::vector<std::int32_t> bt{1, 0};  // tokens 0..3 in block 1, 4..7 in block 0
  const auto f = ly::chunk_format::from(m, 8);
  std::vector<std::uint8_t> chunk(f.bytes(8));
  kvtier::transfer::gather(v, f, bt, 0, 8, reinterpret_cast<std::byte*>(chunk.data()));
  std::size_t wrong = 0;
  for (std::size_t tok = 0; tok < 8; ++tok)
    for (std::size_t kv = 0; kv < 2; ++kv)
      for (std::size_t h = 0; h < 2; ++h)
        for (std::size_t d = 0; d < 3; ++d) {
          const std::size_t b = static_cast<std::size_t>(bt[tok / 4]), s = tok % 4;
          const auto tag = static_cast<std::uint8_t>(((b * 4 + s) * 2 + h) * 3 + d + kv * 128);
          wrong += chunk[f.offset(0, kv, tok, 8) + h * 3 + d] != tag;
        }
  CHECK(wrong == 0);
  // A padded page (slot stride 8 instead of 2 * head_size = 6) cannot hold this layout.
  std::vector<std::uint8_t> big(2 * 2 * 4 * 8);
  std::vector<void*> bp{big.data()};
  CHECK_THROWS_WITH_AS(
      (ly::view<ly::vllm_cpu>(m, {bp, shape, std::vector<std::int64_t>{64, 32, 8, 1}})),
      "kvtier: engine_kv strides[2] (block_size) is 8, layout vllm_cpu needs 6 (each (block, "
      "head) page dense)",
      kvtier::invalid_argument);
  static_assert(ly::traits<ly::vllm_cpu>::page_kind == ly::page::k_transposed);
  static_assert(ly::traits<ly::fused_kv>::page_kind == ly::page::rows);
}
