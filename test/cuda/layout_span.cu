// The layout index arithmetic is usable from device code: kernels receive layout::ref by value
// and call span() (compiled by nvcc in the cuda_compile test; run by the GPU path's tests).
#include <kvtier/layout/block_span.hpp>
#include <kvtier/layout/chunk_format.hpp>

__global__ void spans(kvtier::layout::ref r, kvtier::layout::chunk_format f,
                      unsigned long long* out) {
  const kvtier::layout::block_span s = r.span(threadIdx.x, threadIdx.y, blockIdx.x);
  out[threadIdx.x] = s.offset + s.token_stride * 3 + s.head_stride + s.tensor +
                     f.offset(threadIdx.x, threadIdx.y, 5, f.chunk_tokens);
}

// The same function is constexpr on the host: one definition for both sides.
constexpr kvtier::layout::ref nhd{kvtier::layout::tensors::per_layer,
                                  2,
                                  8,
                                  16,
                                  256,
                                  100,
                                  100 * 16 * 8 * 256,
                                  0,
                                  16 * 8 * 256,
                                  8 * 256,
                                  256};
static_assert(nhd.span(1, 1, 3).tensor == 1);
static_assert(nhd.span(1, 1, 3).offset == 100 * 16 * 8 * 256 + 3 * 16 * 8 * 256);

int main() { return 0; }
