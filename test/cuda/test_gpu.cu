// GPU tests (ctest label `gpu`): the GPU tiers and copy engines on a real device. Exits 77
// (reported as skipped by ctest) when no CUDA device is present, as on CI.
//
// Each case stores a request's KV from device tensors in an engine layout, retrieves it into
// other blocks of a second set of tensors, and compares every row of the request with the
// source on the host; rows of other blocks must be untouched.
#include <kvtier/cuda.cuh>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace ly = kvtier::layout;
namespace ce = kvtier::gpu::copy_engine;

namespace {

int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("  FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

void cuda_ok(cudaError_t e) {
  if (e != cudaSuccess) {
    std::printf("CUDA error %s\n", cudaGetErrorString(e));
    std::exit(1);
  }
}

/// Engine KV tensors of layout L on the device, filled with seeded random bytes, with a host copy.
template <class L>
struct gpu_engine {
  kvtier::model_shape m;
  std::vector<std::int64_t> shape;
  std::vector<void*> dev;
  std::vector<std::vector<std::byte>> host;
  std::size_t bytes = 0;
  gpu_engine(const kvtier::model_shape& ms, std::int64_t blocks, std::uint32_t seed) : m(ms) {
    const auto s = ly::shape_of<L>(m, blocks);
    shape.assign(s.begin(), s.end());
    bytes = m.dtype_size;
    for (auto d : shape) bytes *= static_cast<std::size_t>(d);
    std::mt19937_64 rng(seed);
    for (std::size_t t = 0; t < ly::tensor_count(L::scope, m); ++t) {
      host.emplace_back(bytes);
      for (auto& b : host.back()) b = static_cast<std::byte>(rng());
      void* p = nullptr;
      cuda_ok(cudaMalloc(&p, bytes));
      cuda_ok(cudaMemcpy(p, host.back().data(), bytes, cudaMemcpyHostToDevice));
      dev.push_back(p);
    }
  }
  ~gpu_engine() {
    for (void* p : dev) cudaFree(p);
  }
  kvtier::engine_kv kv() const { return {dev, shape}; }
  void download() {
    for (std::size_t t = 0; t < dev.size(); ++t) {
      cuda_ok(cudaMemcpy(host[t].data(), dev[t], bytes, cudaMemcpyDeviceToHost));
    }
  }
  // Row (layer, plane, block, slot, head) of the host copy, addressed through the layout view.
  const std::byte* row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                       std::size_t h) const {
    std::vector<void*> ptrs;
    for (auto& t : host) ptrs.push_back(const_cast<std::byte*>(t.data()));
    const ly::view<L> v(m, {ptrs, shape});
    ly::block_span sp;
    return v.base(l, kv, b, sp) + s * sp.token_stride + h * sp.head_stride;
  }
};

template <class L>
bool same_rows(const gpu_engine<L>& a, const std::vector<std::int32_t>& ta, const gpu_engine<L>& b,
               const std::vector<std::int32_t>& tb, std::size_t tokens) {
  const std::size_t row = a.m.head_size * a.m.dtype_size;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t l = 0; l < a.m.layers; ++l)
      for (std::size_t kv = 0; kv < ly::traits<L>::kv_planes; ++kv)
        for (std::size_t h = 0; h < a.m.kv_heads; ++h) {
          const std::size_t bs = a.m.block_size;
          if (std::memcmp(a.row(l, kv, ta[t / bs], t % bs, h), b.row(l, kv, tb[t / bs], t % bs, h),
                          row) != 0)
            return false;
        }
  }
  return true;
}

std::vector<kvtier::token_id> tokens(std::size_t n, std::uint32_t seed) {
  std::vector<kvtier::token_id> t(n);
  std::mt19937 rng(seed);
  for (auto& x : t) x = static_cast<kvtier::token_id>(rng() % 50000);
  return t;
}

std::vector<std::int32_t> shuffled(std::size_t n, std::int32_t blocks, std::uint32_t seed) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(blocks));
  for (std::int32_t i = 0; i < blocks; ++i) all[static_cast<std::size_t>(i)] = i;
  std::shuffle(all.begin(), all.end(), std::mt19937(seed));
  all.resize(n);
  return all;
}

const kvtier::salt salt{"gpu-test", "bf16", 0, 1, ""};

template <class L>
kvtier::model_shape model_for() {
  return {4, ly::traits<L>::kv_planes == 2 ? 4u : 1u, ly::traits<L>::kv_planes == 2 ? 64u : 576u, 2,
          16};
}

// Store, synchronize, lookup, retrieve (whole batch, then layer by layer); byte-exact.
template <class L, class Tier>
void round_trip(const char* what, typename Tier::config cfg) {
  std::printf("case %s\n", what);
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<Tier>>;
  const auto m = model_for<L>();
  kvtier::cache_config cc;
  cc.store_partial_tail = true;
  C cache(m, salt, {cfg}, cc);
  gpu_engine<L> src(m, 64, 1), dst(m, 64, 2), clean(m, 64, 2);
  const auto toks = tokens(64 * 5 + 24, 3);
  const auto bt = shuffled(22, 64, 4), bt2 = shuffled(22, 64, 5);
  cudaStream_t s;
  cuda_ok(cudaStreamCreate(&s));
  EXPECT(cache.store(toks, src.kv(), bt, kvtier::gpu::stream_order{s}) == toks.size());
  cache.synchronize();
  auto l = cache.lookup(toks);
  EXPECT(l.tokens() == toks.size());
  EXPECT(cache.retrieve(l, dst.kv(), bt2, kvtier::gpu::stream_order{s}) == toks.size());
  cuda_ok(cudaStreamSynchronize(s));
  dst.download();
  EXPECT(same_rows(src, bt, dst, bt2, toks.size()));
  // Blocks outside the request are untouched.
  bool untouched = true;
  for (std::int32_t b = 0; b < 64; ++b) {
    if (std::find(bt2.begin(), bt2.end(), b) != bt2.end()) continue;
    untouched = untouched && std::memcmp(dst.row(0, 0, b, 0, 0), clean.row(0, 0, b, 0, 0),
                                         m.head_size * m.dtype_size) == 0;
  }
  EXPECT(untouched);
  // Layer by layer on the engine's stream order, then the whole prefix again.
  gpu_engine<L> dst2(m, 64, 6);
  auto l2 = cache.lookup(toks);
  auto p = cache.begin_retrieve(l2, dst2.kv(), bt2, kvtier::gpu::stream_order{s});
  for (std::size_t layer = 0; layer < m.layers; ++layer) EXPECT(p.retrieve_layer(layer) != nullptr);
  EXPECT(p.finish() == toks.size());
  cuda_ok(cudaStreamSynchronize(s));
  dst2.download();
  EXPECT(same_rows(src, bt, dst2, bt2, toks.size()));
  // A host pointer is refused before anything changes.
  std::vector<std::byte> host_buf(src.bytes);
  std::vector<void*> bad = src.dev;
  bad[0] = host_buf.data();
  bool threw = false;
  try {
    cache.store(tokens(64, 9), {bad, src.shape}, bt);
  } catch (const kvtier::invalid_argument& e) {
    threw = std::string(e.what()).find("not device memory") != std::string::npos;
  }
  EXPECT(threw);
  cuda_ok(cudaStreamDestroy(s));
}

// pinned_host first, disk below: chunks reach the disk from the pinned slots and come back.
void pinned_with_disk() {
  std::printf("case pinned_host + local_disk promotion\n");
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::pinned_host, kvtier::tier::local_disk>>;
  const auto m = model_for<L>();
  const auto dir = std::filesystem::temp_directory_path() / "kvtier-gpu-test";
  std::filesystem::remove_all(dir);
  const std::size_t chunk = 4 * 2 * 64 * 4 * 64 * 2;
  C cache(m, salt, {{2 * chunk}, {dir, 16 * (chunk + 8192)}});
  gpu_engine<L> src(m, 64, 1), dst(m, 64, 2);
  const auto a = tokens(128, 1), b = tokens(128, 2);
  const auto bt = shuffled(8, 64, 3), bt2 = shuffled(8, 64, 4);
  EXPECT(cache.store(a, src.kv(), bt) == 128);
  cache.flush();
  EXPECT(cache.store(b, src.kv(), bt) == 128);  // evicts a's chunks from pinned memory
  cache.flush();
  auto l = cache.lookup(a);
  EXPECT(l.hits_in(1) == 2);
  EXPECT(cache.retrieve(l, dst.kv(), bt2) == 128);
  cuda_ok(cudaDeviceSynchronize());
  dst.download();
  EXPECT(same_rows(src, bt, dst, bt2, 128));
  std::filesystem::remove_all(dir);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  using namespace kvtier::tier;
  const std::size_t cap = std::size_t{64} << 20;
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel", {cap});
  round_trip<ly::vllm_flash_hnd, device>("hnd device sm_kernel", {cap});
  round_trip<ly::mla_latent, device>("mla device sm_kernel", {cap});
  round_trip<ly::vllm_cross_layer, device>("cross-layer device sm_kernel", {cap});
  round_trip<ly::fused_kv, device>("fused device sm_kernel", {cap});
  round_trip<ly::vllm_flash_nhd, basic_device<ce::memcpy_batch>>("nhd device memcpy_batch", {cap});
  round_trip<ly::vllm_flash_hnd, basic_device<ce::memcpy_batch>>("hnd device memcpy_batch", {cap});
  round_trip<ly::vllm_flash_nhd, basic_device<ce::cub_batched>>("nhd device cub_batched", {cap});
  round_trip<ly::mla_latent, basic_device<ce::cub_batched>>("mla device cub_batched", {cap});
  round_trip<ly::vllm_flash_nhd, pinned_host>("nhd pinned sm_kernel", {cap});
  round_trip<ly::vllm_flash_hnd, pinned_host>("hnd pinned sm_kernel", {cap});
  round_trip<ly::vllm_flash_nhd, pinned_host>("nhd pinned (registered) sm_kernel",
                                              {cap, pinning::host_register});
  round_trip<ly::vllm_flash_nhd, basic_pinned_host<ce::memcpy_batch>>("nhd pinned memcpy_batch",
                                                                      {cap});
  round_trip<ly::mla_latent, basic_pinned_host<ce::cub_batched>>("mla pinned cub_batched", {cap});
  pinned_with_disk();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "gpu tests passed", failures);
  return failures ? 1 : 0;
}
