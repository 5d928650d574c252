#pragma once
// Version, feature macros and the host/device annotation used by code shared with CUDA kernels.

#define KVTIER_VERSION_MAJOR 0
#define KVTIER_VERSION_MINOR 1
#define KVTIER_VERSION_PATCH 0

#if defined(__CUDACC__)
#define KVTIER_HOST_DEVICE __host__ __device__
#else
#define KVTIER_HOST_DEVICE
#endif

namespace kvtier {
/// Library version as {major, minor, patch}.
struct version_info {
  int major, minor, patch;
};
inline constexpr version_info version{KVTIER_VERSION_MAJOR, KVTIER_VERSION_MINOR,
                                      KVTIER_VERSION_PATCH};
}  // namespace kvtier
