#pragma once
// A fake paged engine for tests: random KV bytes in vLLM flash NHD or TensorRT-LLM packed
// tensors, with reference addressing written independently of kvtier's layout code.

#include <kvtier/kvtier.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace test {

inline std::filesystem::path temp_dir(const std::string& name) {
  const char* base = std::getenv("KVTIER_TEST_TMP");
  static std::atomic<int> counter{0};
  std::filesystem::path p =
      std::filesystem::path(base ? base : "/tmp/kvtier-test") /
      (name + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

/// doctest::Contains for a std::string (doctest takes its own string type).
inline doctest::Contains contains(const std::string& s) { return doctest::Contains(s.c_str()); }

inline std::vector<kvtier::token_id> tokens(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<kvtier::token_id> t(n);
  for (auto& x : t) x = static_cast<kvtier::token_id>(rng() % 128000);
  return t;
}

/// An engine holding KV in layout L, with `blocks` blocks filled with random bytes.
template <class L>
struct engine {
  kvtier::model_shape m;
  std::int64_t blocks;
  std::vector<std::vector<std::byte>> storage;
  mutable std::vector<void*> ptrs;  // rebuilt by kv(): copies of an engine own their bytes
  std::vector<std::int64_t> shape;

  engine(const kvtier::model_shape& ms, std::int64_t nb, std::uint32_t seed) : m(ms), blocks(nb) {
    const auto s = kvtier::layout::shape_of<L>(m, nb);
    shape.assign(s.begin(), s.end());
    std::size_t elems = 1;
    for (auto d : shape) elems *= static_cast<std::size_t>(d);
    storage.resize(kvtier::layout::tensor_count(L::scope, m));
    std::mt19937_64 rng(seed);
    for (auto& t : storage) {
      t.resize(elems * m.dtype_size);
      for (auto& b : t) b = static_cast<std::byte>(rng());
    }
  }
  kvtier::engine_kv kv() const {
    ptrs.clear();
    for (auto& t : storage) ptrs.push_back(const_cast<std::byte*>(t.data()));
    return {ptrs, shape};
  }
  void wipe(std::byte v = std::byte{0}) {
    for (auto& t : storage) std::fill(t.begin(), t.end(), v);
  }

  /// Elements between consecutive elements of a row of plane `kv` (1: rows are contiguous;
  /// vllm_cpu's K is stored transposed in its page, a row's elements block_size apart).
  std::size_t elem_step(std::size_t kv) const {
    return std::is_same_v<L, kvtier::layout::vllm_cpu> && kv == 0 ? m.block_size : 1;
  }
  /// Row (layer, kv, block, slot, head) copied out, element by element (any layout).
  std::vector<std::byte> get_row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                                 std::size_t h) const {
    const std::size_t dt = m.dtype_size, step = elem_step(kv) * dt;
    const std::byte* p = first_elem(l, kv, b, s, h);
    std::vector<std::byte> out(m.head_size * dt);
    for (std::size_t d = 0; d < m.head_size; ++d) std::memcpy(&out[d * dt], p + d * step, dt);
    return out;
  }
  /// Writes row (layer, kv, block, slot, head) from `src` (head_size contiguous elements).
  void put_row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s, std::size_t h,
               const std::byte* src) {
    const std::size_t dt = m.dtype_size, step = elem_step(kv) * dt;
    std::byte* p = const_cast<std::byte*>(first_elem(l, kv, b, s, h));
    for (std::size_t d = 0; d < m.head_size; ++d) std::memcpy(p + d * step, src + d * dt, dt);
  }

  /// Reference address of the head_size-element row (layer, kv, block, slot, head), for layouts
  /// whose rows are contiguous.
  const std::byte* row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                       std::size_t h) const {
    static_assert(!std::is_same_v<L, kvtier::layout::vllm_cpu>, "use get_row/put_row");
    return first_elem(l, kv, b, s, h);
  }
  std::byte* row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s, std::size_t h) {
    return const_cast<std::byte*>(std::as_const(*this).row(l, kv, b, s, h));
  }

  /// Reference address of element 0 of row (layer, kv, block, slot, head), from each layout's
  /// documented shape, written out by hand (not through kvtier's dim roles).
  const std::byte* first_elem(std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                              std::size_t h) const {
    namespace ly = kvtier::layout;
    const std::size_t NB = blocks, BS = m.block_size, H = m.kv_heads, D = m.head_size,
                      NL = m.layers, dt = m.dtype_size;
    std::size_t tensor = l, elem = 0;
    if constexpr (std::is_same_v<L, ly::vllm_flash_nhd>) {
      elem = (((kv * NB + b) * BS + s) * H + h) * D;  // [2, NB, BS, H, D]
    } else if constexpr (std::is_same_v<L, ly::vllm_flash_hnd>) {
      elem = (((kv * NB + b) * H + h) * BS + s) * D;  // [2, NB, H, BS, D]
    } else if constexpr (std::is_same_v<L, ly::flashinfer_nhd>) {
      elem = (((b * 2 + kv) * BS + s) * H + h) * D;  // [NB, 2, BS, H, D]
    } else if constexpr (std::is_same_v<L, ly::flashinfer_hnd>) {
      elem = (((b * 2 + kv) * H + h) * BS + s) * D;  // [NB, 2, H, BS, D]
    } else if constexpr (std::is_same_v<L, ly::vllm_cross_layer>) {
      tensor = 0;
      elem = (((((b * NL + l) * 2 + kv) * BS + s) * H + h)) * D;  // [NB, NL, 2, BS, H, D]
    } else if constexpr (std::is_same_v<L, ly::sglang_split_kv>) {
      tensor = kv * NL + l;
      elem = ((b * BS + s) * H + h) * D;  // 2 x NL x [NB*BS, H, D]
    } else if constexpr (std::is_same_v<L, ly::mla_latent>) {
      elem = (b * BS + s) * D;  // [NB, BS, D]
    } else if constexpr (std::is_same_v<L, ly::state_pages>) {
      elem = (b * BS + s) * D;  // [NB, BS, bytes]
    } else if constexpr (std::is_same_v<L, ly::sglang_mla>) {
      elem = (b * BS + s) * D;  // [NB*BS, 1, D]
    } else if constexpr (std::is_same_v<L, ly::trtllm_packed>) {
      tensor = 0;
      elem = ((((b * NL + l) * 2 + kv) * H + h) * BS + s) * D;  // [NB, NL, 2, H, BS, D]
    } else if constexpr (std::is_same_v<L, ly::fused_kv>) {
      elem = ((b * H + h) * BS + s) * 2 * D + kv * D;  // [NB, H, BS, 2*D]
    } else if constexpr (std::is_same_v<L, ly::vllm_cpu>) {
      // Page (b, h) of BS*2D elements: K as [D][BS] (element d of slot s at d*BS + s), then V
      // as [BS][D].
      elem = (b * H + h) * BS * 2 * D + (kv == 0 ? s : BS * D + s * D);
    } else {
      static_assert(sizeof(L) == 0, "test engine: no reference formula for this layout");
    }
    return storage[tensor].data() + elem * dt;
  }
  static constexpr std::size_t planes = kvtier::layout::traits<L>::kv_planes;
  /// Token t's rows (every layer, K/V, head) as in block table `bt`.
  template <class F>
  void for_token(const std::vector<std::int32_t>& bt, std::size_t t, F&& f) const {
    const std::size_t b = static_cast<std::size_t>(bt[t / m.block_size]), s = t % m.block_size;
    for (std::size_t l = 0; l < m.layers; ++l)
      for (std::size_t kv = 0; kv < planes; ++kv)
        for (std::size_t h = 0; h < m.kv_heads; ++h) f(row(l, kv, b, s, h));
  }
};

/// True when tokens [0, n) of `a` (table ta) hold the same bytes as those of `b` (table tb).
template <class LA, class LB>
bool same_tokens(const engine<LA>& a, const std::vector<std::int32_t>& ta, const engine<LB>& b,
                 const std::vector<std::int32_t>& tb, std::size_t first, std::size_t n) {
  for (std::size_t t = first; t < first + n; ++t) {
    const std::size_t ba = static_cast<std::size_t>(ta[t / a.m.block_size]);
    const std::size_t bb = static_cast<std::size_t>(tb[t / b.m.block_size]);
    const std::size_t s = t % a.m.block_size, sb = t % b.m.block_size;
    for (std::size_t l = 0; l < a.m.layers; ++l)
      for (std::size_t kv = 0; kv < engine<LA>::planes; ++kv)
        for (std::size_t h = 0; h < a.m.kv_heads; ++h) {
          if (a.get_row(l, kv, ba, s, h) != b.get_row(l, kv, bb, sb, h)) return false;
        }
  }
  return true;
}

/// A block table of `n` distinct blocks in shuffled (non-contiguous) order.
inline std::vector<std::int32_t> shuffled_table(std::size_t n, std::int64_t blocks,
                                                std::uint32_t seed) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(seed));
  REQUIRE(n <= all.size());
  all.resize(n);
  return all;
}

inline std::size_t blocks_for(std::size_t tokens, std::size_t bs) { return (tokens + bs - 1) / bs; }

/// A small model: 2 layers, 2 KV heads, head size 8, 2-byte dtype, engine block 4 tokens.
inline constexpr kvtier::model_shape small_model{2, 2, 8, 2, 4};
inline const kvtier::salt small_salt{"test-model", "bf16", 0, 1, ""};

}  // namespace test
