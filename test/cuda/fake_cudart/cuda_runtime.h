// A stand-in for <cuda_runtime.h> with only what kvtier/cuda/runtime_api.hpp uses, declared
// as the CUDA runtime of version KVTIER_FAKE_CUDART_VERSION declares it (given on the command
// line: 12060, 12080, 12090 or 13000). test/cuda/runtime_api.cpp compiles the header against
// each, so a call written for one signature fails to compile against another. The functions
// are defined here and record their arguments for the test to check.
#pragma once

#include <cstddef>

#ifndef KVTIER_FAKE_CUDART_VERSION
#error "define KVTIER_FAKE_CUDART_VERSION"
#endif
#define CUDART_VERSION KVTIER_FAKE_CUDART_VERSION

extern "C" {

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;

#if CUDART_VERSION >= 12080
enum cudaMemcpySrcAccessOrder {
  cudaMemcpySrcAccessOrderInvalid = 0,
  cudaMemcpySrcAccessOrderStream = 1,
};
enum cudaMemLocationType { cudaMemLocationTypeInvalid = 0, cudaMemLocationTypeDevice = 1 };
struct cudaMemLocation {
  enum cudaMemLocationType type;
  int id;
};
enum cudaMemcpyFlags { cudaMemcpyFlagDefault = 0, cudaMemcpyFlagPreferOverlapWithCompute = 1 };
struct cudaMemcpyAttributes {
  enum cudaMemcpySrcAccessOrder srcAccessOrder;
  struct cudaMemLocation srcLocHint;
  struct cudaMemLocation dstLocHint;
  unsigned int flags;
};

// What the last call received.
struct fake_batch_call {
  int calls;
  std::size_t count;
  void* const* dsts;
  const void* const* srcs;
  const std::size_t* sizes;
  struct cudaMemcpyAttributes attr;
  std::size_t attr_index;
  std::size_t num_attrs;
  bool fail_index_given;
  cudaStream_t stream;
};
inline fake_batch_call fake_last_batch{};

inline cudaError_t fake_record(void* const* dsts, const void* const* srcs, const std::size_t* sizes,
                               std::size_t count, struct cudaMemcpyAttributes* attrs,
                               std::size_t* attrsIdxs, std::size_t numAttrs, bool fail_index,
                               cudaStream_t stream) {
  fake_last_batch.calls += 1;
  fake_last_batch.count = count;
  fake_last_batch.dsts = dsts;
  fake_last_batch.srcs = srcs;
  fake_last_batch.sizes = sizes;
  fake_last_batch.attr = attrs[0];
  fake_last_batch.attr_index = attrsIdxs[0];
  fake_last_batch.num_attrs = numAttrs;
  fake_last_batch.fail_index_given = fail_index;
  fake_last_batch.stream = stream;
  return cudaSuccess;
}

#if CUDART_VERSION >= 13000
inline cudaError_t cudaMemcpyBatchAsync(void* const* dsts, const void* const* srcs,
                                        const std::size_t* sizes, std::size_t count,
                                        struct cudaMemcpyAttributes* attrs, std::size_t* attrsIdxs,
                                        std::size_t numAttrs, cudaStream_t stream) {
  return fake_record(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, false, stream);
}
#elif CUDART_VERSION >= 12090
inline cudaError_t cudaMemcpyBatchAsync(void* const* dsts, const void* const* srcs,
                                        const std::size_t* sizes, std::size_t count,
                                        struct cudaMemcpyAttributes* attrs, std::size_t* attrsIdxs,
                                        std::size_t numAttrs, std::size_t* failIdx,
                                        cudaStream_t stream) {
  return fake_record(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, failIdx != nullptr,
                     stream);
}
#else
inline cudaError_t cudaMemcpyBatchAsync(void** dsts, void** srcs, std::size_t* sizes,
                                        std::size_t count, struct cudaMemcpyAttributes* attrs,
                                        std::size_t* attrsIdxs, std::size_t numAttrs,
                                        std::size_t* failIdx, cudaStream_t stream) {
  return fake_record(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, failIdx != nullptr,
                     stream);
}
#endif

inline cudaError_t cudaStreamGetDevice(cudaStream_t stream, int* device) {
  *device = stream == nullptr ? 0 : 3;
  return cudaSuccess;
}
#endif  // CUDART_VERSION >= 12080
}
