// Host tier throughput against memcpy of the same bytes, measured in the same run.
//
//   kvtier_bench_host [--layout nhd|trt] [--layers N] [--chunks N] [--iters N]
//
// Model: Llama-3-8B KV shape (8 KV heads, head size 128, bf16, block 16) with a chosen layer
// count; 256-token chunks, engine blocks in shuffled order. Reports store (gather from paged
// blocks into the host slab) and retrieve (scatter back) GB/s, each as a ratio to the limit: the
// fastest of glibc memcpy in chunk-sized pieces, glibc memcpy in one call, and kvtier's own copy,
// of the same bytes between two contiguous buffers. Every timed copy starts with source and
// destination flushed from the caches. Best of --iters runs of each, interleaved so noise hits
// all alike.
#include <kvtier/kvtier.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

using clock_type = std::chrono::steady_clock;

// Flushes [p, p + n) from every cache level, so each timed copy starts from DRAM whatever the
// size of the last-level cache (shared VMs report L3s of hundreds of MiB, which would otherwise
// hold a benchmark's whole source between iterations and flatter whichever copy reuses it).
void evict(const void* p, std::size_t n) {
#if defined(__SSE2__)
  const auto* b = static_cast<const char*>(p);
  for (std::size_t i = 0; i < n; i += 64) _mm_clflush(b + i);
  _mm_mfence();
#else
  (void)p, (void)n;
#endif
}

template <class L>
int run(std::uint32_t layers, std::size_t chunks, int iters) {
  using cache_t = kvtier::cache<kvtier::opt::layout<L>, kvtier::opt::chunk_tokens<256>>;
  const kvtier::model_shape m{layers, 8, 128, 2, 16};
  const std::size_t tokens = chunks * 256;
  const std::int64_t blocks = static_cast<std::int64_t>(tokens / 16);
  const auto shape_arr = kvtier::layout::shape_of<L>(m, blocks);
  std::vector<std::int64_t> shape(shape_arr.begin(), shape_arr.end());
  std::size_t tensor_bytes = m.dtype_size;
  for (auto d : shape) tensor_bytes *= static_cast<std::size_t>(d);
  const std::size_t ntensors = kvtier::layout::tensor_count(L::scope, m);
  std::vector<std::vector<std::byte>> tensors(ntensors, std::vector<std::byte>(tensor_bytes));
  std::vector<void*> ptrs;
  for (auto& t : tensors) {
    std::memset(t.data(), 7, t.size());
    ptrs.push_back(t.data());
  }
  const kvtier::engine_kv kv{ptrs, shape};
  std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(1));
  std::vector<kvtier::token_id> prompt(tokens);
  std::iota(prompt.begin(), prompt.end(), 0);

  const kvtier::salt salt{"bench", "bf16", 0, 1, ""};
  const std::size_t chunk_bytes = kvtier::layout::chunk_format::from(m, 256).chunk_bytes();
  cache_t cache(m, salt, {{(chunks + 1) * kvtier::memory::slab::round_up(chunk_bytes, 4096)}});
  std::vector<std::byte> src(chunks * chunk_bytes), dst(chunks * chunk_bytes);
  std::memset(src.data(), 1, src.size());
  std::memset(dst.data(), 2, dst.size());
  const std::size_t total = chunks * chunk_bytes;

  double best_store = 1e30, best_load = 1e30, best_copy = 1e30, best_stream = 1e30,
         best_whole = 1e30;
  const auto& slab = cache.template tier<0>().slab().memory();
  auto cold_engine = [&] {
    for (auto& t : tensors) evict(t.data(), t.size());
    evict(slab.data(), slab.size());
  };
  auto cold_buffers = [&] {
    evict(src.data(), src.size());
    evict(dst.data(), dst.size());
  };
  auto seconds = [](clock_type::time_point t0) {
    return std::chrono::duration<double>(clock_type::now() - t0).count();
  };
  for (int i = 0; i < iters; ++i) {
    cache.clear();
    cold_engine();
    auto t0 = clock_type::now();
    const std::size_t stored = cache.store(prompt, kv, table);
    best_store = std::min(best_store, seconds(t0));
    if (stored != tokens) {
      std::fprintf(stderr, "stored %zu of %zu tokens\n", stored, tokens);
      return 1;
    }
    auto lease = cache.lookup(prompt);
    cold_engine();
    t0 = clock_type::now();
    const std::size_t loaded = cache.retrieve(lease, kv, table);
    best_load = std::min(best_load, seconds(t0));
    if (loaded != tokens) {
      std::fprintf(stderr, "loaded %zu of %zu tokens\n", loaded, tokens);
      return 1;
    }
    cold_buffers();
    t0 = clock_type::now();
    for (std::size_t c = 0; c < chunks; ++c) {
      std::memcpy(dst.data() + c * chunk_bytes, src.data() + c * chunk_bytes, chunk_bytes);
    }
    best_copy = std::min(best_copy, seconds(t0));
    cold_buffers();
    t0 = clock_type::now();
    for (std::size_t c = 0; c < chunks; ++c) {
      kvtier::transfer::detail::copy_bytes(dst.data() + c * chunk_bytes,
                                           src.data() + c * chunk_bytes, chunk_bytes);
    }
    kvtier::transfer::detail::fence();
    best_stream = std::min(best_stream, seconds(t0));
    cold_buffers();
    t0 = clock_type::now();
    std::memcpy(dst.data(), src.data(), total);
    best_whole = std::min(best_whole, seconds(t0));
  }
  const double best_limit = std::min({best_copy, best_stream, best_whole});
  auto gb = [&](double s) { return static_cast<double>(total) / s / 1e9; };
  std::printf("layout %s, %u layers, %zu chunks of %.1f MiB (%zu tokens), best of %d\n", L::name,
              layers, chunks, chunk_bytes / 1048576.0, tokens, iters);
  std::printf("  glibc memcpy, per chunk  %7.2f GB/s\n", gb(best_copy));
  std::printf("  glibc memcpy, one call   %7.2f GB/s\n", gb(best_whole));
  std::printf("  kvtier copy_bytes       %7.2f GB/s\n", gb(best_stream));
  std::printf("  limit (best of these)   %7.2f GB/s\n", gb(best_limit));
  std::printf("  store (gather)          %7.2f GB/s  ratio %.2f\n", gb(best_store),
              best_limit / best_store);
  std::printf("  retrieve (scatter)      %7.2f GB/s  ratio %.2f\n", gb(best_load),
              best_limit / best_load);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string layout = "nhd";
  std::uint32_t layers = 32;
  std::size_t chunks = 8;
  int iters = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--layout")
      layout = argv[i + 1];
    else if (a == "--layers")
      layers = static_cast<std::uint32_t>(std::stoul(argv[i + 1]));
    else if (a == "--chunks")
      chunks = std::stoul(argv[i + 1]);
    else if (a == "--iters")
      iters = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (layout == "nhd") return run<kvtier::layout::vllm_flash_nhd>(layers, chunks, iters);
  if (layout == "trt") return run<kvtier::layout::trtllm_packed>(layers, chunks, iters);
  std::fprintf(stderr, "unknown layout %s (nhd or trt)\n", layout.c_str());
  return 2;
}
