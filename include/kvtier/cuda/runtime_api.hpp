#pragma once
// The CUDA runtime calls the GPU path uses whose presence or signature depends on the CUDA
// version, chosen by CUDART_VERSION so that the GPU path compiles on every CUDA 12 and 13.
//
// cudaMemcpyBatchAsync exists from CUDA 12.8, with two signatures:
//
//   13.x       (void* const* dsts, const void* const* srcs, const size_t* sizes, size_t count,
//               cudaMemcpyAttributes* attrs, size_t* attrsIdxs, size_t numAttrs,
//               cudaStream_t stream)
//   12.8-12.9  the same plus `size_t* failIdx` before the stream (12.8 declares the arrays
//               without const: void**, void**, size_t*)
//
// and before 12.8 neither the call nor cudaMemcpyAttributes exists (only
// copy_engine::memcpy_batch needs it). cudaStreamGetDevice also exists from 12.8; before, the
// device of a stream is not checked. Host code only: it needs the CUDA runtime's declarations,
// not nvcc (test/cuda/runtime_api.cpp checks it against a declaration of each signature).

#include <cuda_runtime.h>

#include <cstddef>

// The runtime version the choice follows: CUDART_VERSION, unless a test defines it lower to
// compile the older branches against a newer toolkit (test/cuda/cuda12_guard.cu).
#ifndef KVTIER_CUDART_VERSION
#define KVTIER_CUDART_VERSION CUDART_VERSION
#endif

#if KVTIER_CUDART_VERSION >= 12080
#define KVTIER_HAS_MEMCPY_BATCH 1
#else
#define KVTIER_HAS_MEMCPY_BATCH 0
#endif

namespace kvtier::gpu::detail_gpu {

/// Whether this CUDA runtime has cudaMemcpyBatchAsync (12.8 or newer).
inline constexpr bool has_memcpy_batch = KVTIER_HAS_MEMCPY_BATCH != 0;

#if KVTIER_HAS_MEMCPY_BATCH
/// Enqueues `count` copies (dst[i] <- src[i], size[i] bytes) on `stream` with one attribute set
/// for all: source read in stream order, location hints of `device`, overlap with compute
/// preferred. The arrays are read before the call returns.
inline cudaError_t memcpy_batch_async(void** dst, void** src, std::size_t* size, std::size_t count,
                                      int device, cudaStream_t stream) {
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.srcLocHint.type = cudaMemLocationTypeDevice;  // hints; unused unless managed
  attr.srcLocHint.id = device;
  attr.dstLocHint.type = cudaMemLocationTypeDevice;
  attr.dstLocHint.id = device;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  std::size_t first = 0;
#if KVTIER_CUDART_VERSION >= 13000
  return cudaMemcpyBatchAsync(dst, src, size, count, &attr, &first, 1, stream);
#else
  // 12.8 declares void**, 12.9 void* const* / const void* const*: mutable arrays fit both.
  std::size_t failed = 0;
  return cudaMemcpyBatchAsync(dst, src, size, count, &attr, &first, 1, &failed, stream);
#endif
}
#endif

/// Writes the device `stream` belongs to into `device` and sets `known`; `known` is false when
/// this runtime cannot tell (before 12.8). Returns the query's result. The legacy and
/// per-thread default streams are the current device's.
inline cudaError_t stream_device(cudaStream_t stream, int& device, bool& known) {
#if KVTIER_HAS_MEMCPY_BATCH
  known = true;
  return cudaStreamGetDevice(stream, &device);
#else
  (void)stream;
  (void)device;
  known = false;
  return cudaSuccess;
#endif
}

}  // namespace kvtier::gpu::detail_gpu
