#pragma once
// What the engine tells kvtier about its model and its KV tensors at run time.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace kvtier {

/// Token ids as engines keep them (vLLM, SGLang and TensorRT-LLM all use 32-bit ids).
using token_id = std::int32_t;

/// The per-model numbers that do not shape code. All must be > 0.
struct model_shape {
  std::uint32_t layers = 0;      ///< attention layers (NL)
  std::uint32_t kv_heads = 0;    ///< KV heads held by this rank (H)
  std::uint32_t head_size = 0;   ///< elements per head (D)
  std::uint32_t dtype_size = 0;  ///< bytes per element (2 for bf16/fp16, 1 for fp8)
  std::uint32_t block_size = 0;  ///< tokens per engine block (BS)
};

/// Everything that must match for two caches' KV bytes to be interchangeable. The cache adds
/// the chunk-format fingerprint (layers, heads, head size, dtype size, chunk tokens) itself.
struct salt {
  std::string model_id;       ///< e.g. "meta-llama/Llama-3.1-8B-Instruct@<revision>"
  std::string kv_dtype;       ///< e.g. "bf16", "fp8_e4m3"
  std::uint32_t tp_rank = 0;  ///< tensor-parallel rank whose heads this cache holds
  std::uint32_t tp_size = 1;  ///< tensor-parallel size
  std::string tenant;         ///< optional isolation between users; empty = shared
};

/// The engine's KV tensors: one base pointer per tensor (as the layout's scope says: one, one
/// per layer, or one per K/V and layer), the shape every tensor has, outermost first, and
/// optionally their strides in elements, exactly as the engine's framework reports them (torch's
/// .shape and .stride()). Without strides the tensors are dense row-major. With them, padded or
/// permuted tensors work, provided the last dim is contiguous and no two elements overlap.
struct engine_kv {
  std::span<void* const> tensors;
  std::span<const std::int64_t> shape;
  std::span<const std::int64_t> strides = {};
};

/// The engine's block ids for one request, in token order: token t lives in
/// block_table[t / block_size] at slot t % block_size.
using block_table = std::span<const std::int32_t>;

}  // namespace kvtier
