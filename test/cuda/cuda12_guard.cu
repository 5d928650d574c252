// The GPU path compiled as for a CUDA runtime older than 12.8 (KVTIER_CUDART_VERSION=12060 on
// the command line, against this toolkit's headers): everything but copy_engine::memcpy_batch
// must compile, and a tier using memcpy_batch must fail with kvtier's one-line message
// (KVTIER_COMPILE_FAIL; ctest checks the message). Label cuda_compile.
#include <kvtier/cuda.cuh>

static_assert(!kvtier::gpu::detail_gpu::has_memcpy_batch);

// Explicit instantiation compiles every member, as an engine's use of the tiers would.
template class kvtier::gpu::transfers<kvtier::gpu::copy_engine::sm_kernel>;
template class kvtier::gpu::transfers<kvtier::gpu::copy_engine::cub_batched>;
template class kvtier::tier::basic_device<kvtier::gpu::copy_engine::sm_kernel>::impl<
    kvtier::eviction::lru>;
template class kvtier::tier::basic_pinned_host<kvtier::gpu::copy_engine::cub_batched>::impl<
    kvtier::eviction::lru>;

#ifdef KVTIER_COMPILE_FAIL
template class kvtier::gpu::transfers<kvtier::gpu::copy_engine::memcpy_batch>;
#endif
