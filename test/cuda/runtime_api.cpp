// kvtier/cuda/runtime_api.hpp against a declaration of each CUDA runtime signature
// (fake_cudart/cuda_runtime.h, version KVTIER_FAKE_CUDART_VERSION): it compiles with CUDA 12.6
// (no cudaMemcpyBatchAsync), 12.8 (9 arguments, void**), 12.9 (9 arguments, const) and 13.0
// (8 arguments), and passes each the copies, one attribute set and the stream. ctest runs one
// executable per version (label cuda_compile); no GPU and no CUDA toolkit needed.
#include "kvtier/cuda/runtime_api.hpp"

#include <cstdio>

namespace {

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  namespace d = kvtier::gpu::detail_gpu;
  std::printf("CUDART_VERSION %d\n", CUDART_VERSION);
  expect(d::has_memcpy_batch == (CUDART_VERSION >= 12080), "has_memcpy_batch follows the version");
  int device = -1;
  bool known = true;
  auto* stream = reinterpret_cast<cudaStream_t>(0x1000);
  expect(d::stream_device(stream, device, known) == cudaSuccess, "stream_device succeeds");
#if KVTIER_HAS_MEMCPY_BATCH
  expect(known && device == 3, "stream_device asks cudaStreamGetDevice");
  char a[8] = {}, b[8] = {}, c[8] = {}, e[8] = {};
  void* dst[2] = {a, b};
  void* src[2] = {c, e};
  std::size_t size[2] = {8, 4};
  expect(d::memcpy_batch_async(dst, src, size, 2, 5, stream) == cudaSuccess, "the call succeeds");
  const auto& call = fake_last_batch;
  expect(call.calls == 1, "one call");
  expect(call.count == 2 && call.dsts == dst && call.srcs == src && call.sizes == size,
         "the arrays and their length are passed");
  expect(call.num_attrs == 1 && call.attr_index == 0, "one attribute set, for every copy");
  expect(call.attr.srcAccessOrder == cudaMemcpySrcAccessOrderStream,
         "sources are read in stream order");
  expect(call.attr.srcLocHint.type == cudaMemLocationTypeDevice && call.attr.srcLocHint.id == 5 &&
             call.attr.dstLocHint.type == cudaMemLocationTypeDevice && call.attr.dstLocHint.id == 5,
         "location hints name the tier's device");
  expect(call.attr.flags == cudaMemcpyFlagPreferOverlapWithCompute, "overlap with compute");
  expect(call.stream == stream, "the stream is passed");
  expect(call.fail_index_given == (CUDART_VERSION < 13000), "12.x gets a failIdx");
#else
  expect(!known, "before 12.8 a stream's device is not known");
#endif
  std::printf("%s\n", failures == 0 ? "runtime_api: ok" : "runtime_api: FAILED");
  return failures == 0 ? 0 : 1;
}
