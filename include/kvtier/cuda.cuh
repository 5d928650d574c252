#pragma once
// kvtier with its GPU path: the host umbrella plus the CUDA copy engines and the GPU tiers
// (tier::device, tier::pinned_host). Include from a .cu file compiled by nvcc (C++20), and link
// the CUDA runtime (CMake: kvtier::cuda).

#include "kvtier/cuda/copy_engine.cuh"
#include "kvtier/cuda/tiers.cuh"
#include "kvtier/cuda/transfers.cuh"
#include "kvtier/kvtier.hpp"
