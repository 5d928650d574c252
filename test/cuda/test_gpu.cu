// GPU tests (ctest label `gpu`): the GPU tiers and copy engines on a real device. Exits 77
// (reported as skipped by ctest) when no CUDA device is present, as on CI.
//
// Each case stores a request's KV from device tensors in an engine layout, retrieves it into
// other blocks of a second set of tensors, and compares every byte of every tensor with an
// image built on the host (the tensors before, with the request's rows copied in): rows outside
// the request, the rest of a partial last block and other layers must be untouched. Every path
// runs: whole and layer-wise store and retrieve, run_on_stream, signal events, batches over 16
// chunks, rows and bases not 16-byte aligned. Then the ordering (separate store and retrieve
// streams, cub_batched never waiting on the host), the launch check, the device guard and the
// refusals. `test_gpu --fault` (ctest gpu.fault) provokes a faulting copy in a process of its
// own and checks it is counted and never served.
#include <kvtier/cuda.cuh>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <random>
#include <string>
#include <thread>
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

/// Engine KV tensors of layout L on the device, filled with seeded random bytes (each tensor
/// from its own seed), with a host image. `offset` moves every tensor's base off 16-byte
/// alignment (8: the kernel moves 8-byte vectors).
template <class L>
struct gpu_engine {
  using image = std::vector<std::vector<std::byte>>;
  kvtier::model_shape m;
  std::vector<std::int64_t> shape;
  std::vector<void*> alloc, dev;
  image host;
  std::size_t bytes = 0;
  gpu_engine(const kvtier::model_shape& ms, std::int64_t blocks, std::uint32_t seed,
             std::size_t offset = 0)
      : m(ms) {
    const auto s = ly::shape_of<L>(m, blocks);
    shape.assign(s.begin(), s.end());
    bytes = m.dtype_size;
    for (auto d : shape) bytes *= static_cast<std::size_t>(d);
    for (std::size_t t = 0; t < ly::tensor_count(L::scope, m); ++t) {
      std::mt19937_64 rng(seed * 1000003ull + t);
      host.emplace_back(bytes);
      for (auto& b : host.back()) b = static_cast<std::byte>(rng());
      void* p = nullptr;
      cuda_ok(cudaMalloc(&p, bytes + 16));
      alloc.push_back(p);
      dev.push_back(static_cast<std::byte*>(p) + offset);
      cuda_ok(cudaMemcpy(dev.back(), host.back().data(), bytes, cudaMemcpyHostToDevice));
    }
  }
  gpu_engine(const gpu_engine&) = delete;
  ~gpu_engine() {
    for (void* p : alloc) cudaFree(p);
  }
  kvtier::engine_kv kv() const { return {dev, shape}; }
  void download() {
    for (std::size_t t = 0; t < dev.size(); ++t) {
      cuda_ok(cudaMemcpy(host[t].data(), dev[t], bytes, cudaMemcpyDeviceToHost));
    }
  }
  // Row (layer, plane, block, slot, head) of `img`, addressed through the layout view.
  std::byte* row_in(image& img, std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                    std::size_t h) const {
    std::vector<void*> ptrs;
    for (auto& t : img) ptrs.push_back(t.data());
    const ly::view<L> v(m, {ptrs, shape});
    ly::block_span sp;
    return v.base(l, kv, b, sp) + s * sp.token_stride + h * sp.head_stride;
  }
  const std::byte* row(std::size_t l, std::size_t kv, std::size_t b, std::size_t s,
                       std::size_t h) const {
    return row_in(const_cast<image&>(host), l, kv, b, s, h);
  }
};

/// What `dst` must hold after tokens [0, tokens) of `src` (blocks `ts`) were retrieved into its
/// blocks `td`: its bytes now, with exactly those rows replaced.
template <class L>
typename gpu_engine<L>::image expected_after(const gpu_engine<L>& src,
                                             const std::vector<std::int32_t>& ts,
                                             const gpu_engine<L>& dst,
                                             const std::vector<std::int32_t>& td,
                                             std::size_t tokens) {
  auto img = dst.host;
  const std::size_t row = src.m.head_size * src.m.dtype_size, bs = src.m.block_size;
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t l = 0; l < src.m.layers; ++l)
      for (std::size_t kv = 0; kv < ly::traits<L>::kv_planes; ++kv)
        for (std::size_t h = 0; h < src.m.kv_heads; ++h) {
          std::memcpy(dst.row_in(img, l, kv, td[t / bs], t % bs, h),
                      src.row(l, kv, ts[t / bs], t % bs, h), row);
        }
  return img;
}

/// Every byte of every tensor of `dst` (downloaded now) equals `want`.
template <class L>
bool whole_tensors(gpu_engine<L>& dst, const typename gpu_engine<L>::image& want) {
  dst.download();
  return dst.host == want;
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

/// 4 layers, block 16; `head` x `dtype` bytes per row (default 64 x 2 for K/V layouts, MLA 576).
template <class L>
kvtier::model_shape model_for(std::uint32_t head = 0, std::uint32_t dtype = 2) {
  const bool kv = ly::traits<L>::kv_planes == 2;
  return {4, kv ? 4u : 1u, head != 0 ? head : kv ? 64u : 576u, dtype, 16};
}

struct shape_case {
  std::uint32_t head = 0, dtype = 2;  ///< row bytes = head x dtype (0: the layout's default)
  std::size_t offset = 0;             ///< tensor bases off 16-byte alignment by this
  std::size_t chunks = 5;             ///< full chunks of 64 tokens; then 24 more (a partial block)
};

template <class C>
auto& transfers_of(C& cache) {
  return cache.template tier<0>().transfers();
}

// Store, synchronize, lookup, retrieve: whole, layer-wise, on the engine's stream with a signal;
// then a layer-wise store with a signal, retrieved again. Every result checked whole-tensor.
template <class L, class Tier>
void round_trip(const char* what, typename Tier::config cfg, shape_case sc = {}) {
  std::printf("case %s\n", what);
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<Tier>>;
  const auto m = model_for<L>(sc.head, sc.dtype);
  kvtier::cache_config cc;
  cc.store_partial_tail = true;
  C cache(m, salt, {cfg}, cc);
  const std::size_t n = 64 * sc.chunks + 24, used = (n + 15) / 16;
  const auto blocks = static_cast<std::int32_t>(2 * used + 8);
  gpu_engine<L> src(m, blocks, 1, sc.offset), dst(m, blocks, 2, sc.offset);
  const auto toks = tokens(n, 3);
  const auto bt = shuffled(used, blocks, 4), bt2 = shuffled(used, blocks, 5);
  cudaStream_t s;
  cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  EXPECT(cache.store(toks, src.kv(), bt, kvtier::gpu::stream_order{s}) == n);
  cache.synchronize();
  {
    auto l = cache.lookup(toks);
    EXPECT(l.tokens() == n);
    const auto want = expected_after(src, bt, dst, bt2, n);
    EXPECT(cache.retrieve(l, dst.kv(), bt2, kvtier::gpu::stream_order{s}) == n);
    cuda_ok(cudaStreamSynchronize(s));
    EXPECT(whole_tensors(dst, want));
  }
  {  // layer by layer, ordered by the engine's stream
    gpu_engine<L> dst2(m, blocks, 6, sc.offset);
    const auto want = expected_after(src, bt, dst2, bt2, n);
    auto l = cache.lookup(toks);
    auto p = cache.begin_retrieve(l, dst2.kv(), bt2, kvtier::gpu::stream_order{s});
    for (std::size_t layer = 0; layer < m.layers; ++layer) {
      EXPECT(p.retrieve_layer(layer) != nullptr);
    }
    EXPECT(p.finish() == n);
    cuda_ok(cudaStreamSynchronize(s));
    EXPECT(whole_tensors(dst2, want));
  }
  {  // on the engine's stream itself; the signal event alone says the bytes are there
    gpu_engine<L> dst3(m, blocks, 7, sc.offset);
    const auto want = expected_after(src, bt, dst3, bt2, n);
    cudaEvent_t sig;
    cuda_ok(cudaEventCreateWithFlags(&sig, cudaEventDisableTiming));
    auto l = cache.lookup(toks);
    EXPECT(cache.retrieve(l, dst3.kv(), bt2, kvtier::gpu::stream_order{s, true, sig}) == n);
    cuda_ok(cudaEventSynchronize(sig));
    EXPECT(whole_tensors(dst3, want));
    cuda_ok(cudaEventDestroy(sig));
  }
  {  // a layer-wise store with a signal, then retrieved
    gpu_engine<L> src2(m, blocks, 8, sc.offset), dst4(m, blocks, 9, sc.offset);
    const auto toks2 = tokens(n, 10);
    cudaEvent_t sig;
    cuda_ok(cudaEventCreateWithFlags(&sig, cudaEventDisableTiming));
    auto st = cache.begin_store(toks2, src2.kv(), bt, kvtier::gpu::stream_order{s, false, sig});
    for (std::size_t layer = 0; layer < m.layers; ++layer) {
      EXPECT(st.store_layer(layer) != nullptr);
    }
    EXPECT(st.finish() == n);
    cuda_ok(cudaEventSynchronize(sig));
    auto l = cache.lookup(toks2);  // published by the first call that finds the copy complete
    EXPECT(l.tokens() == n);
    const auto want = expected_after(src2, bt, dst4, bt2, n);
    EXPECT(cache.retrieve(l, dst4.kv(), bt2, kvtier::gpu::stream_order{s}) == n);
    cuda_ok(cudaStreamSynchronize(s));
    EXPECT(whole_tensors(dst4, want));
  }
  // A host pointer is refused before anything changes.
  std::vector<std::byte> host_buf(src.bytes);
  std::vector<void*> bad = src.dev;
  bad[0] = host_buf.data();
  bool threw = false;
  try {
    cache.store(tokens(64, 11), {bad, src.shape}, bt);
  } catch (const kvtier::invalid_argument& e) {
    threw = std::string(e.what()).find("not device memory") != std::string::npos;
  }
  EXPECT(threw);
  if constexpr (std::is_same_v<typename Tier::copy_engine, ce::memcpy_batch>) {
    threw = false;  // the DMA batch cannot run on the legacy default stream
    try {
      cache.store(tokens(64, 12), src.kv(), bt, kvtier::gpu::stream_order{nullptr, true});
    } catch (const kvtier::invalid_argument& e) {
      threw = std::string(e.what()).find("legacy default stream") != std::string::npos;
    }
    EXPECT(threw);
  }
  EXPECT(cache.stats().tiers[0].errors == 0);
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
  const auto want = expected_after(src, bt, dst, bt2, 128);
  EXPECT(cache.retrieve(l, dst.kv(), bt2) == 128);
  cuda_ok(cudaDeviceSynchronize());
  EXPECT(whole_tensors(dst, want));
  std::filesystem::remove_all(dir);
}

// A kernel that holds a stream until the host sets *flag (mapped pinned memory).
__global__ void hold_until(volatile int* flag) {
  while (*flag == 0) {
  }
}

struct stream_hold {
  int* flag = nullptr;
  explicit stream_hold(cudaStream_t s) {
    cuda_ok(cudaHostAlloc(&flag, sizeof(int), cudaHostAllocMapped));
    *flag = 0;
    int* dev = nullptr;
    cuda_ok(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), flag, 0));
    hold_until<<<1, 1, 0, s>>>(dev);
    cuda_ok(cudaGetLastError());
  }
  void release() { __atomic_store_n(flag, 1, __ATOMIC_SEQ_CST); }
  ~stream_hold() {
    release();
    cudaDeviceSynchronize();
    cudaFreeHost(flag);
  }
};

// True once `s` has completed, polled for up to `seconds`.
bool completes(cudaStream_t s, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    if (cudaStreamQuery(s) == cudaSuccess) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// Stores and retrieves have their own high-priority streams: a retrieve ordered by one engine
// stream completes while a store waits for another that is held; a retrieve into blocks a
// pending store still reads waits for that store.
void separate_streams() {
  std::printf("case separate store and retrieve streams\n");
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::device>>;
  const auto m = model_for<L>();
  C cache(m, salt, {{std::size_t{64} << 20}});
  auto& x = transfers_of(cache);
  const cudaStream_t ss = x.transfer_stream(kvtier::transfer::way::to_chunk);
  const cudaStream_t rs = x.transfer_stream(kvtier::transfer::way::to_engine);
  EXPECT(ss != rs);
  int least = 0, greatest = 0, ps = 0, pr = 0;
  cuda_ok(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cuda_ok(cudaStreamGetPriority(ss, &ps));
  cuda_ok(cudaStreamGetPriority(rs, &pr));
  EXPECT(ps == greatest && pr == greatest);

  gpu_engine<L> src(m, 64, 1), dst(m, 64, 2);
  const auto a = tokens(128, 1), b = tokens(128, 2);
  const std::vector<std::int32_t> ta = {0, 1, 2, 3, 4, 5, 6, 7},
                                  tb = {10, 11, 12, 13, 14, 15, 16, 17},
                                  tr = {20, 21, 22, 23, 24, 25, 26, 27};
  EXPECT(cache.store(a, src.kv(), ta) == 128);
  cache.synchronize();
  cudaStream_t held, other;
  cuda_ok(cudaStreamCreateWithFlags(&held, cudaStreamNonBlocking));
  cuda_ok(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  {
    stream_hold h(held);
    EXPECT(cache.store(b, src.kv(), tb, kvtier::gpu::stream_order{held}) == 128);
    // Into other blocks: not held up by the waiting store.
    const auto want = expected_after(src, ta, dst, tr, 128);
    auto l = cache.lookup(a);
    EXPECT(cache.retrieve(l, dst.kv(), tr, kvtier::gpu::stream_order{other}) == 128);
    EXPECT(completes(other, 10));
    EXPECT(whole_tensors(dst, want));
    // Into the blocks the waiting store reads (tb, of src): waits for it.
    auto l2 = cache.lookup(a);
    EXPECT(cache.retrieve(l2, src.kv(), tb, kvtier::gpu::stream_order{other}) == 128);
    EXPECT(!completes(other, 0.2));
    h.release();
    EXPECT(completes(other, 10));
  }
  cache.synchronize();
  // b was stored from tb before the retrieve overwrote tb: its chunks hold the original rows.
  gpu_engine<L> orig(m, 64, 1), dst2(m, 64, 3);
  const auto want = expected_after(orig, tb, dst2, tr, 128);
  auto l = cache.lookup(b);
  EXPECT(l.tokens() == 128);
  EXPECT(cache.retrieve(l, dst2.kv(), tr, kvtier::gpu::stream_order{other}) == 128);
  cuda_ok(cudaStreamSynchronize(other));
  EXPECT(whole_tensors(dst2, want));
  cuda_ok(cudaStreamDestroy(held));
  cuda_ok(cudaStreamDestroy(other));
}

// cub_batched: a store of 80 chunks returns while the engine's stream is held (it used to wait
// on the host for a ring of 4 temporary buffers, one per window of 16 chunks, from the 5th on).
void cub_store_does_not_wait() {
  std::printf("case cub_batched store of 80 chunks returns at once\n");
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::basic_device<ce::cub_batched>>>;
  const auto m = model_for<L>();
  C cache(m, salt, {{std::size_t{128} << 20}});
  std::printf("  cub temporary storage per operation slot: %zu bytes\n",
              transfers_of(cache).engine().temp_bytes());
  gpu_engine<L> src(m, 400, 1), dst(m, 400, 2);
  const auto t = tokens(80 * 64, 3);
  const auto bt = shuffled(320, 400, 4), bt2 = shuffled(320, 400, 5);
  cudaStream_t held;
  cuda_ok(cudaStreamCreateWithFlags(&held, cudaStreamNonBlocking));
  {
    stream_hold h(held);
    auto f = std::async(std::launch::async, [&] {
      return cache.store(t, src.kv(), bt, kvtier::gpu::stream_order{held});
    });
    const bool returned = f.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    EXPECT(returned);
    h.release();
    EXPECT(f.get() == t.size());
  }
  cache.synchronize();
  auto l = cache.lookup(t);
  EXPECT(l.tokens() == t.size());
  const auto want = expected_after(src, bt, dst, bt2, t.size());
  EXPECT(cache.retrieve(l, dst.kv(), bt2, kvtier::gpu::stream_order{held}) == t.size());
  cuda_ok(cudaStreamSynchronize(held));
  EXPECT(whole_tensors(dst, want));
  cuda_ok(cudaStreamDestroy(held));
}

// The launch check reports the launch's own result: an error the engine's thread left pending
// is neither reported as a kvtier failure nor cleared. The current device is restored.
void launch_check_and_device() {
  std::printf("case launch check and current device\n");
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::device>>;
  const auto m = model_for<L>();
  int devices = 0;
  cuda_ok(cudaGetDeviceCount(&devices));
  {
    C cache(m, salt, {{std::size_t{16} << 20}});
    gpu_engine<L> src(m, 16, 1);
    EXPECT(cudaSetDevice(devices) == cudaErrorInvalidDevice);  // leaves an error pending
    bool threw = false;
    try {
      EXPECT(cache.store(tokens(128, 1), src.kv(), shuffled(8, 16, 2)) == 128);
    } catch (const std::exception& e) {
      std::printf("  store threw: %s\n", e.what());
      threw = true;
    }
    EXPECT(!threw);
    EXPECT(cudaGetLastError() == cudaErrorInvalidDevice);  // still the engine's to see
    cache.synchronize();
  }
  if (devices < 2) {
    std::printf("  one CUDA device: the tier-on-another-device part is skipped\n");
    return;
  }
  cuda_ok(cudaSetDevice(0));
  {
    gpu_engine<L>* src = nullptr;
    cuda_ok(cudaSetDevice(1));
    src = new gpu_engine<L>(m, 16, 1);
    cuda_ok(cudaSetDevice(0));
    {
      C cache(m, salt, {{std::size_t{16} << 20, 1}});
      int now = -1;
      EXPECT(cudaGetDevice(&now) == cudaSuccess && now == 0);
      EXPECT(cache.store(tokens(128, 1), src->kv(), shuffled(8, 16, 2)) == 128);
      EXPECT(cudaGetDevice(&now) == cudaSuccess && now == 0);
      cache.synchronize();
      auto l = cache.lookup(tokens(128, 1));
      EXPECT(cache.retrieve(l, src->kv(), shuffled(8, 16, 3)) == 128);
      EXPECT(cudaGetDevice(&now) == cudaSuccess && now == 0);
      // A stream of device 0 is refused for the tier on device 1.
      cudaStream_t s0;
      cuda_ok(cudaStreamCreate(&s0));
      bool threw = false;
      try {
        cache.store(tokens(128, 4), src->kv(), shuffled(8, 16, 2), kvtier::gpu::stream_order{s0});
      } catch (const kvtier::invalid_argument& e) {
        threw =
            std::string(e.what()).find("stream_order.stream is on device 0") != std::string::npos;
      }
      EXPECT(threw);
      cuda_ok(cudaStreamDestroy(s0));
    }
    int now = -1;
    EXPECT(cudaGetDevice(&now) == cudaSuccess && now == 0);  // after the tier's destructor too
    cuda_ok(cudaSetDevice(1));
    delete src;
    cuda_ok(cudaSetDevice(0));
  }
}

// In a process of its own (the fault is sticky): a copy that faults is counted in the tier's
// errors and its chunks are never served. The tensor is a small allocation claimed as a large
// one, and the block table points far past its end.
int fault_case() {
  std::printf("case a faulting copy is counted and not served\n");
  using L = ly::vllm_flash_nhd;
  using C = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<L>,
                          kvtier::opt::tiers<kvtier::tier::device>>;
  const auto m = model_for<L>();
  C cache(m, salt, {{std::size_t{16} << 20}});
  const std::int64_t blocks = 1 << 20;  // claimed: 2 x 1 Mi blocks of 128 KiB per layer tensor
  const auto shape = ly::shape_of<L>(m, blocks);
  std::vector<void*> t;
  for (std::size_t i = 0; i < ly::tensor_count(L::scope, m); ++i) {
    void* p = nullptr;
    cuda_ok(cudaMalloc(&p, 1 << 20));  // 1 MiB really
    t.push_back(p);
  }
  const std::vector<std::int64_t> sh(shape.begin(), shape.end());
  const std::vector<std::int32_t> far = {blocks - 8, blocks - 7, blocks - 6, blocks - 5,
                                         blocks - 4, blocks - 3, blocks - 2, blocks - 1};
  const auto toks = tokens(128, 1);
  EXPECT(cache.store(toks, {t, sh}, far) == 128);
  cache.synchronize();
  EXPECT(cache.stats().tiers[0].errors >= 1);
  EXPECT(cache.lookup(toks).tokens() == 0);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "gpu fault test passed", failures);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  if (argc > 1 && std::string(argv[1]) == "--fault") return fault_case();
  using namespace kvtier::tier;
  const std::size_t cap = std::size_t{64} << 20;
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel", {cap});
  round_trip<ly::vllm_flash_hnd, device>("hnd device sm_kernel", {cap});
  round_trip<ly::mla_latent, device>("mla device sm_kernel", {cap});
  round_trip<ly::vllm_cross_layer, device>("cross-layer device sm_kernel", {cap});
  round_trip<ly::fused_kv, device>("fused device sm_kernel", {cap});
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel, 8-byte rows", {cap}, {4, 2});
  round_trip<ly::vllm_flash_hnd, device>("hnd device sm_kernel, 2-byte rows", {cap}, {1, 2});
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel, 6-byte rows", {cap}, {3, 2});
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel, bases 8 off 16", {cap}, {0, 2, 8});
  round_trip<ly::vllm_flash_nhd, device>("nhd device sm_kernel, 20 chunks", {cap}, {0, 2, 0, 20});
  round_trip<ly::vllm_flash_nhd, basic_device<ce::memcpy_batch>>("nhd device memcpy_batch", {cap});
  round_trip<ly::vllm_flash_hnd, basic_device<ce::memcpy_batch>>("hnd device memcpy_batch", {cap});
  round_trip<ly::vllm_flash_nhd, basic_device<ce::memcpy_batch>>(
      "nhd device memcpy_batch, 20 chunks", {cap}, {0, 2, 0, 20});
  round_trip<ly::vllm_flash_hnd, basic_device<ce::memcpy_batch>>(
      "hnd device memcpy_batch, 20 chunks (several calls)", {cap}, {0, 2, 0, 20});
  round_trip<ly::vllm_flash_nhd, basic_device<ce::cub_batched>>("nhd device cub_batched", {cap});
  round_trip<ly::mla_latent, basic_device<ce::cub_batched>>("mla device cub_batched", {cap});
  round_trip<ly::vllm_flash_hnd, basic_device<ce::cub_batched>>(
      "hnd device cub_batched, 20 chunks (several calls)", {cap}, {0, 2, 0, 20});
  round_trip<ly::vllm_flash_nhd, pinned_host>("nhd pinned sm_kernel", {cap});
  round_trip<ly::vllm_flash_hnd, pinned_host>("hnd pinned sm_kernel", {cap});
  round_trip<ly::vllm_flash_nhd, pinned_host>("nhd pinned (registered) sm_kernel",
                                              {cap, pinning::host_register});
  round_trip<ly::vllm_flash_nhd, basic_pinned_host<ce::memcpy_batch>>("nhd pinned memcpy_batch",
                                                                      {cap});
  round_trip<ly::mla_latent, basic_pinned_host<ce::cub_batched>>("mla pinned cub_batched", {cap});
  pinned_with_disk();
  separate_streams();
  cub_store_does_not_wait();
  launch_check_and_device();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "gpu tests passed", failures);
  return failures ? 1 : 0;
}
