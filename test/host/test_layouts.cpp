// Engine layouts on the host copy path: byte-exact gather/scatter, the chunk format, and
// cross-layout sharing.
#include "support.hpp"

using nhd = kvtier::layout::vllm_flash_nhd;
using trt = kvtier::layout::trtllm_packed;

namespace {

struct shape_case {
  kvtier::model_shape m;
  std::int64_t blocks;
};

// Randomised model shapes from fixed seeds (block size divides the 32-token chunk).
std::vector<shape_case> shapes() {
  std::vector<shape_case> out = {{{2, 2, 8, 2, 4}, 24}, {{1, 1, 4, 1, 32}, 3}};
  std::mt19937 rng(1234);
  const std::uint32_t bs[] = {1, 2, 4, 8, 16, 32};
  const std::uint32_t dts[] = {1, 2, 4};
  for (int i = 0; i < 6; ++i) {
    auto r = [&](std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); };
    kvtier::model_shape m{1 + r(4), 1 + r(5), 1 + r(24), dts[r(3)], bs[r(6)]};
    out.push_back({m, static_cast<std::int64_t>(2 * 64 / m.block_size + 1 + rng() % 7)});
  }
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("gather writes the canonical chunk format", L, nhd, trt) {
  for (const auto& sc : shapes()) {
    CAPTURE(sc.m.layers);
    CAPTURE(sc.m.kv_heads);
    CAPTURE(sc.m.head_size);
    CAPTURE(sc.m.dtype_size);
    CAPTURE(sc.m.block_size);
    test::engine<L> eng(sc.m, sc.blocks, 5);
    const auto bt = test::shuffled_table(test::blocks_for(64, sc.m.block_size), sc.blocks, 9);
    const kvtier::layout::view<L> v(sc.m, eng.kv());
    const auto f = kvtier::layout::chunk_format::from(sc.m, 32);
    // Tokens [5, 37): starts and ends inside blocks (when block_size > 1).
    const std::size_t first = 5, n = 32;
    std::vector<std::byte> chunk(f.bytes(n));
    kvtier::transfer::gather(v, f, bt, first, n, chunk.data());
    bool all = true;
    for (std::size_t t = 0; t < n; ++t) {
      const std::size_t tok = first + t;
      const std::size_t b = bt[tok / sc.m.block_size], s = tok % sc.m.block_size;
      for (std::size_t l = 0; l < sc.m.layers; ++l)
        for (std::size_t kv = 0; kv < 2; ++kv)
          for (std::size_t h = 0; h < sc.m.kv_heads; ++h)
            all &= std::memcmp(chunk.data() + f.offset(l, kv, t, n) + h * f.row_bytes(),
                               eng.row(l, kv, b, s, h), f.row_bytes()) == 0;
    }
    CHECK(all);
  }
}

TEST_CASE_TEMPLATE("scatter is the exact inverse of gather and touches nothing else", L, nhd, trt) {
  for (const auto& sc : shapes()) {
    test::engine<L> src(sc.m, sc.blocks, 7), dst(sc.m, sc.blocks, 8);
    const auto dst_before = dst.storage;
    const auto bt_src = test::shuffled_table(test::blocks_for(45, sc.m.block_size), sc.blocks, 1);
    const auto bt_dst = test::shuffled_table(test::blocks_for(45, sc.m.block_size), sc.blocks, 2);
    const auto f = kvtier::layout::chunk_format::from(sc.m, 45);
    std::vector<std::byte> chunk(f.bytes(45));
    kvtier::transfer::gather(kvtier::layout::view<L>(sc.m, src.kv()), f, bt_src, 0, 45,
                             chunk.data());
    kvtier::transfer::scatter(kvtier::layout::view<L>(sc.m, dst.kv()), f, bt_dst, 0, 45,
                              chunk.data());
    CHECK(test::same_tokens(src, bt_src, dst, bt_dst, 0, 45));
    // Expected engine: the old bytes with exactly the 45 tokens' rows replaced (by reference
    // addressing); anything else scatter touched would show as a difference.
    test::engine<L> expected = dst;
    expected.storage = dst_before;
    for (std::size_t t = 0; t < 45; ++t) {
      const std::size_t bs = bt_src[t / sc.m.block_size], bd = bt_dst[t / sc.m.block_size];
      const std::size_t slot = t % sc.m.block_size;
      for (std::size_t l = 0; l < sc.m.layers; ++l)
        for (std::size_t kv = 0; kv < 2; ++kv)
          for (std::size_t h = 0; h < sc.m.kv_heads; ++h)
            std::memcpy(expected.row(l, kv, bd, slot, h), src.row(l, kv, bs, slot, h),
                        f.row_bytes());
    }
    CHECK(dst.storage == expected.storage);
  }
}

TEST_CASE("a chunk gathered from vLLM NHD scatters into the TensorRT-LLM pool exactly") {
  for (const auto& sc : shapes()) {
    test::engine<nhd> a(sc.m, sc.blocks, 3);
    test::engine<trt> b(sc.m, sc.blocks, 4);
    const auto ta = test::shuffled_table(test::blocks_for(64, sc.m.block_size), sc.blocks, 5);
    const auto tb = test::shuffled_table(test::blocks_for(64, sc.m.block_size), sc.blocks, 6);
    const auto f = kvtier::layout::chunk_format::from(sc.m, 64);
    std::vector<std::byte> chunk(f.bytes(64)), back(f.bytes(64));
    kvtier::transfer::gather(kvtier::layout::view<nhd>(sc.m, a.kv()), f, ta, 0, 64, chunk.data());
    kvtier::transfer::scatter(kvtier::layout::view<trt>(sc.m, b.kv()), f, tb, 0, 64, chunk.data());
    CHECK(test::same_tokens(a, ta, b, tb, 0, 64));
    kvtier::transfer::gather(kvtier::layout::view<trt>(sc.m, b.kv()), f, tb, 0, 64, back.data());
    CHECK(back == chunk);  // both layouts produce the same canonical bytes
  }
}

TEST_CASE("layout shapes match the engines' tensors") {
  const kvtier::model_shape m{32, 8, 128, 2, 16};
  CHECK(nhd::shape(m, 1000) == std::array<std::int64_t, 5>{2, 1000, 16, 8, 128});
  CHECK(trt::shape(m, 1000) == std::array<std::int64_t, 6>{1000, 32, 2, 8, 16, 128});
  // Llama-3-8B: 128 KiB per token, a 256-token chunk is 32 MiB.
  const auto f = kvtier::layout::chunk_format::from(m, 256);
  CHECK(f.chunk_bytes() == 32u << 20);
  CHECK(f.bytes(1) == 128u << 10);
}
