// kvtier-gpu-bench: the GPU path against the limits measured in the same run.
//
//   kvtier-gpu-bench [--shape llama|mla|all] [--chunks 16] [--iters 5] [--overlap-only]
//
// Limits: device-to-device cudaMemcpyAsync of one contiguous buffer of the batch's size, and
// pinned host-to-device / device-to-host cudaMemcpyAsync of the same size. Then, per layout,
// copy engine and first tier (device, pinned_host): gather = store() of `chunks` chunks through
// the cache until the copy has completed (synchronize), scatter = lookup() + retrieve() until
// the engine's stream has the bytes. Each is the best of `iters` runs, in GB/s of KV moved
// (bytes counted once), and as a ratio to its limit (device memcpy for the device tier, the
// pinned copy of the same direction for pinned_host). Every stored and retrieved byte is
// checked once per case; each tensor is filled from its own seed, so a copy from the wrong
// tensor or layer cannot read as exact.
//
// Layer-wise overlap: a stand-in compute kernel per layer on the engine's stream, after
// retrieve_layer(l), as long as one layer's copy takes and occupying every multiprocessor (as
// many 1024-thread blocks as fit on all of them at once, in 8 waves of short blocks, as real
// compute runs); overlap = time saved against copying everything first, over the most that
// could be saved (min of copy and compute).
//
// Exits 77 when no CUDA device is present (ctest reports it skipped).
#include <kvtier/cuda.cuh>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace ly = kvtier::layout;
namespace ce = kvtier::gpu::copy_engine;

namespace {

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "kvtier-gpu-bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct shape {
  const char* name;
  kvtier::model_shape m;
};

struct options {
  std::string which = "all";
  std::size_t chunks = 16;
  int iters = 5;
  bool overlap_only = false;
};

constexpr std::size_t chunk_tokens = 256;

// Best seconds of `iters` runs of fn() (fn synchronizes itself).
template <class Fn>
double best_of(int iters, Fn&& fn) {
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    const double t0 = now();
    fn();
    best = std::min(best, now() - t0);
  }
  return best;
}

struct limits {
  double d2d = 0, h2d = 0, d2h = 0;  // GB/s
};

limits measure_limits(std::size_t bytes, int iters, cudaStream_t s) {
  void *a = nullptr, *b = nullptr, *h = nullptr;
  ok(cudaMalloc(&a, bytes), "cudaMalloc");
  ok(cudaMalloc(&b, bytes), "cudaMalloc");
  ok(cudaHostAlloc(&h, bytes, cudaHostAllocDefault), "cudaHostAlloc");
  std::memset(h, 1, bytes);
  auto run = [&](void* dst, const void* src, cudaMemcpyKind k) {
    return best_of(iters, [&] {
      ok(cudaMemcpyAsync(dst, src, bytes, k, s), "cudaMemcpyAsync");
      ok(cudaStreamSynchronize(s), "sync");
    });
  };
  limits l;
  l.d2d = bytes / run(b, a, cudaMemcpyDeviceToDevice) / 1e9;
  l.h2d = bytes / run(a, h, cudaMemcpyHostToDevice) / 1e9;
  l.d2h = bytes / run(h, a, cudaMemcpyDeviceToHost) / 1e9;
  cudaFree(a);
  cudaFree(b);
  cudaFreeHost(h);
  return l;
}

template <class L>
struct engine_tensors {
  std::vector<std::int64_t> shape;
  std::vector<void*> ptrs;
  std::size_t bytes = 1;
  engine_tensors(const kvtier::model_shape& m, std::int64_t blocks, unsigned seed) {
    const auto s = ly::shape_of<L>(m, blocks);
    shape.assign(s.begin(), s.end());
    bytes = m.dtype_size;
    for (auto d : shape) bytes *= static_cast<std::size_t>(d);
    std::vector<unsigned char> fill(bytes);
    for (std::size_t t = 0; t < ly::tensor_count(L::scope, m); ++t) {
      std::mt19937 rng(seed * 7919u + static_cast<unsigned>(t));  // each tensor its own bytes
      for (auto& c : fill) c = static_cast<unsigned char>(rng());
      void* p = nullptr;
      ok(cudaMalloc(&p, bytes), "cudaMalloc (engine)");
      ok(cudaMemcpy(p, fill.data(), bytes, cudaMemcpyHostToDevice), "fill");
      ptrs.push_back(p);
    }
  }
  ~engine_tensors() {
    for (void* p : ptrs) cudaFree(p);
  }
  kvtier::engine_kv kv() const { return {ptrs, shape}; }
  // Bytes of the rows of `table`'s blocks, layer by layer (for the byte check): the tensors
  // are downloaded once and addressed on the host through the layout view.
  std::vector<unsigned char> rows(const kvtier::model_shape& m,
                                  const std::vector<std::int32_t>& table) const {
    std::vector<std::vector<std::byte>> host(ptrs.size(), std::vector<std::byte>(bytes));
    std::vector<void*> hp;
    for (std::size_t t = 0; t < ptrs.size(); ++t) {
      ok(cudaMemcpy(host[t].data(), ptrs[t], bytes, cudaMemcpyDeviceToHost), "check copy");
      hp.push_back(host[t].data());
    }
    const ly::view<L> v(m, {hp, shape});
    const std::size_t row = m.head_size * m.dtype_size;
    std::vector<unsigned char> out;
    out.reserve(m.layers * ly::traits<L>::kv_planes * table.size() * m.block_size * m.kv_heads *
                row);
    for (std::size_t l = 0; l < m.layers; ++l)
      for (std::size_t p = 0; p < ly::traits<L>::kv_planes; ++p)
        for (std::int32_t b : table)
          for (std::size_t s = 0; s < m.block_size; ++s)
            for (std::size_t h = 0; h < m.kv_heads; ++h) {
              ly::block_span sp;
              const auto* a = reinterpret_cast<const unsigned char*>(
                  v.base(l, p, static_cast<std::size_t>(b), sp) + s * sp.token_stride +
                  h * sp.head_stride);
              out.insert(out.end(), a, a + row);
            }
    return out;
  }
};

std::vector<std::int32_t> table_of(std::size_t blocks, std::size_t offset, unsigned seed) {
  std::vector<std::int32_t> t(blocks);
  for (std::size_t i = 0; i < blocks; ++i) t[i] = static_cast<std::int32_t>(offset + i);
  std::shuffle(t.begin(), t.end(), std::mt19937(seed));
  return t;
}

template <class L, class Tier>
void run_case(const shape& sh, const char* layout_name, const options& o, const limits& lim,
              cudaStream_t s) {
  using C = kvtier::cache<kvtier::opt::chunk_tokens<chunk_tokens>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<Tier>>;
  const auto& m = sh.m;
  const kvtier::layout::chunk_format f =
      kvtier::layout::chunk_format::from(m, chunk_tokens, ly::traits<L>::kv_planes);
  const std::size_t bytes = f.chunk_bytes() * o.chunks;
  const std::size_t blocks = o.chunks * chunk_tokens / m.block_size;
  engine_tensors<L> eng(m, static_cast<std::int64_t>(2 * blocks), 1);
  const auto src = table_of(blocks, 0, 2), dst = table_of(blocks, blocks, 3);
  kvtier::cache_config cc;
  cc.max_tokens = o.chunks * chunk_tokens;
  C cache(m, {"bench", "bf16", 0, 1, ""}, {{f.chunk_bytes() * o.chunks + 4096}}, cc);
  std::vector<kvtier::token_id> toks(o.chunks * chunk_tokens);
  for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<kvtier::token_id>(i);
  const kvtier::gpu::stream_order ord{s};
  const double gather = best_of(o.iters, [&] {
    cache.clear();
    cache.store(toks, eng.kv(), src, ord);
    cache.synchronize();
  });
  bool exact = cache.lookup(toks).tokens() == toks.size();
  const double scatter = best_of(o.iters, [&] {
    auto l = cache.lookup(toks);
    cache.retrieve(l, eng.kv(), dst, ord);
    ok(cudaStreamSynchronize(s), "sync");
  });
  cache.synchronize();
  exact = exact && eng.rows(m, src) == eng.rows(m, dst);
  constexpr bool pinned = Tier::host_visible;  // pinned_host: the limit is the PCIe copy
  const double g = bytes / gather / 1e9, sc = bytes / scatter / 1e9;
  const double gl = pinned ? lim.d2h : lim.d2d, sl = pinned ? lim.h2d : lim.d2d;
  std::printf("%-6s %-6s %-12s %-13s gather %7.1f GB/s %5.2fx  scatter %7.1f GB/s %5.2fx  %s\n",
              sh.name, layout_name, Tier::name, Tier::copy_engine::name, g, g / gl, sc, sc / sl,
              exact ? "bytes exact" : "BYTES WRONG");
  if (!exact) std::exit(1);
}

__global__ void __launch_bounds__(1024) spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

/// A stand-in for one layer's compute that fills the GPU: `waves` waves of as many 1024-thread
/// blocks as are resident on all multiprocessors at once, each spinning cycles / waves.
struct compute_kernel {
  unsigned blocks = 1;
  int waves = 8;
  long long cycles_per_block = 0;
  compute_kernel(long long layer_cycles, int device) {
    int sms = 1, per_sm = 1;
    ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "multiprocessors");
    ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, spin, 1024, 0), "occupancy");
    blocks = static_cast<unsigned>(std::max(1, sms * per_sm) * waves);
    cycles_per_block = std::max<long long>(layer_cycles / waves, 1);
  }
  void launch(cudaStream_t s) const {
    spin<<<blocks, 1024, 0, s>>>(cycles_per_block);
    ok(cudaGetLastError(), "compute kernel launch");
  }
};

template <class L>
void overlap(const shape& sh, const options& o, cudaStream_t s) {
  using C = kvtier::cache<kvtier::opt::chunk_tokens<chunk_tokens>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::pinned_host>>;
  const auto& m = sh.m;
  const auto f = kvtier::layout::chunk_format::from(m, chunk_tokens, ly::traits<L>::kv_planes);
  const std::size_t blocks = o.chunks * chunk_tokens / m.block_size;
  engine_tensors<L> eng(m, static_cast<std::int64_t>(2 * blocks), 1);
  const auto src = table_of(blocks, 0, 2), dst = table_of(blocks, blocks, 3);
  kvtier::cache_config cc;
  cc.max_tokens = o.chunks * chunk_tokens;
  C cache(m, {"bench", "bf16", 0, 1, ""}, {{f.chunk_bytes() * o.chunks + 4096}}, cc);
  std::vector<kvtier::token_id> toks(o.chunks * chunk_tokens);
  for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<kvtier::token_id>(i + 7);
  cache.store(toks, eng.kv(), src, {s});
  cache.synchronize();
  const kvtier::gpu::stream_order ord{s};
  // One layer's copy time, from a whole retrieve.
  const double all = best_of(o.iters, [&] {
    auto l = cache.lookup(toks);
    cache.retrieve(l, eng.kv(), dst, ord);
    ok(cudaStreamSynchronize(s), "sync");
  });
  int clock_khz = 0;
  ok(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "clock rate");
  const compute_kernel k(static_cast<long long>(all / m.layers * clock_khz * 1e3), 0);
  const double compute = best_of(o.iters, [&] {
    for (std::size_t l = 0; l < m.layers; ++l) k.launch(s);
    ok(cudaStreamSynchronize(s), "sync");
  });
  const double serial = best_of(o.iters, [&] {
    auto l = cache.lookup(toks);
    cache.retrieve(l, eng.kv(), dst, ord);
    for (std::size_t i = 0; i < m.layers; ++i) k.launch(s);
    ok(cudaStreamSynchronize(s), "sync");
  });
  const double piped = best_of(o.iters, [&] {
    auto l = cache.lookup(toks);
    auto p = cache.begin_retrieve(l, eng.kv(), dst, ord);
    for (std::size_t i = 0; i < m.layers; ++i) {
      p.retrieve_layer(i);
      k.launch(s);
    }
    p.finish();
    ok(cudaStreamSynchronize(s), "sync");
  });
  const double overlap = (serial - piped) / std::min(all, compute);
  std::printf(
      "%-6s overlap (pinned_host, sm_kernel): copy %.2f ms, compute %.2f ms (%u blocks of 1024 "
      "threads per layer, every multiprocessor), serial %.2f ms, layer-wise %.2f ms, overlap %.2f "
      "of the ideal\n",
      sh.name, all * 1e3, compute * 1e3, k.blocks, serial * 1e3, piped * 1e3, overlap);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvtier-gpu-bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--shape") {
      o.which = next();
    } else if (a == "--chunks") {
      o.chunks = std::stoul(next());
    } else if (a == "--iters") {
      o.iters = std::stoi(next());
    } else if (a == "--overlap-only") {
      o.overlap_only = true;
    } else {
      std::fprintf(stderr, "kvtier-gpu-bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("kvtier-gpu-bench: no CUDA device, nothing measured\n");
    return 77;
  }
  cudaDeviceProp prop{};
  ok(cudaGetDeviceProperties(&prop, 0), "properties");
  cudaStream_t s;
  ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  const shape llama{"llama", {32, 8, 128, 2, 16}};  // Llama-3-8B: 32 MiB per 256-token chunk
  const shape mla{"mla", {61, 1, 576, 2, 16}};      // DeepSeek-V3 MLA latent: 17.2 MiB per chunk
  std::printf("device %s, %zu chunks of %zu tokens per batch, best of %d\n", prop.name, o.chunks,
              chunk_tokens, o.iters);
  using namespace kvtier::tier;
  if (o.which == "all" || o.which == "llama") {
    const auto f = kvtier::layout::chunk_format::from(llama.m, chunk_tokens, 2);
    const limits lim = measure_limits(f.chunk_bytes() * o.chunks, o.iters, s);
    std::printf("llama  limits: device memcpy %.1f GB/s, pinned H2D %.1f GB/s, D2H %.1f GB/s\n",
                lim.d2d, lim.h2d, lim.d2h);
    if (!o.overlap_only) {
      run_case<ly::vllm_flash_nhd, device>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_nhd, basic_device<ce::memcpy_batch>>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_nhd, basic_device<ce::cub_batched>>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_hnd, device>(llama, "hnd", o, lim, s);
      run_case<ly::vllm_flash_hnd, basic_device<ce::memcpy_batch>>(llama, "hnd", o, lim, s);
      run_case<ly::vllm_flash_hnd, basic_device<ce::cub_batched>>(llama, "hnd", o, lim, s);
      run_case<ly::vllm_flash_nhd, pinned_host>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_nhd, basic_pinned_host<ce::memcpy_batch>>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_nhd, basic_pinned_host<ce::cub_batched>>(llama, "nhd", o, lim, s);
      run_case<ly::vllm_flash_hnd, pinned_host>(llama, "hnd", o, lim, s);
      run_case<ly::vllm_flash_hnd, basic_pinned_host<ce::memcpy_batch>>(llama, "hnd", o, lim, s);
    }
    overlap<ly::vllm_flash_nhd>(llama, o, s);
  }
  if (o.which == "all" || o.which == "mla") {
    const auto f = kvtier::layout::chunk_format::from(mla.m, chunk_tokens, 1);
    const limits lim = measure_limits(f.chunk_bytes() * o.chunks, o.iters, s);
    std::printf("mla    limits: device memcpy %.1f GB/s, pinned H2D %.1f GB/s, D2H %.1f GB/s\n",
                lim.d2d, lim.h2d, lim.d2h);
    if (!o.overlap_only) {
      run_case<ly::mla_latent, device>(mla, "mla", o, lim, s);
      run_case<ly::mla_latent, basic_device<ce::memcpy_batch>>(mla, "mla", o, lim, s);
      run_case<ly::mla_latent, basic_device<ce::cub_batched>>(mla, "mla", o, lim, s);
      run_case<ly::mla_latent, pinned_host>(mla, "mla", o, lim, s);
      run_case<ly::mla_latent, basic_pinned_host<ce::memcpy_batch>>(mla, "mla", o, lim, s);
      run_case<ly::mla_latent, basic_pinned_host<ce::cub_batched>>(mla, "mla", o, lim, s);
    }
    overlap<ly::mla_latent>(mla, o, s);
  }
  cudaStreamDestroy(s);
  return 0;
}
