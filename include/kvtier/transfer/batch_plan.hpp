#pragma once
// The index arithmetic of a batched transfer between an engine's blocks and chunk slots, shared
// by the CUDA kernels, the DMA batch builders and the host tests (no CUDA header needed).
//
// A batch moves layers [layer_begin, layer_end) of many chunks in one launch. Its unit is the
// segment: one (chunk, layer, K/V plane, engine block) of the chunk. On the chunk side a
// segment is contiguous (tokens x heads x row bytes, chunk format); on the engine side it is
// the block's rows at token_stride / head_stride. Segment i is decoded from its index alone,
// block fastest, so consecutive thread blocks walk the chunk forward.

#include "kvtier/config.hpp"
#include "kvtier/layout/block_span.hpp"

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace kvtier::transfer {

/// Which way a batch moves bytes.
enum class way : std::uint8_t {
  to_chunk,   ///< gather: engine blocks -> chunk slots (store)
  to_engine,  ///< scatter: chunk slots -> engine blocks (retrieve)
};

/// One chunk of a batch: its slot (chunk format packed with `tokens` tokens) and where its
/// block ids start in the batch's block-id array.
struct batch_chunk {
  std::byte* data = nullptr;
  std::uint32_t tokens = 0;
  std::uint32_t block0 = 0;
};

/// One chunk of an operation as the cache names it: first-tier slot, tokens, first token.
struct staged_chunk {
  std::uint32_t slot = 0;
  std::uint32_t tokens = 0;
  std::size_t first_token = 0;
};

/// One segment resolved: `tokens` tokens of `heads` rows; 0 tokens for a block past the end
/// of a partial chunk (nothing to move).
struct segment {
  std::byte* engine = nullptr;  ///< slot 0, head 0 of the block
  std::byte* chunk = nullptr;   ///< first byte in the chunk; tokens * heads * row contiguous
  std::uint32_t tokens = 0;
};

/// Everything a launch needs, trivially copyable (passed to kernels by value). The three
/// pointers must be readable where the batch is resolved (device memory for a kernel).
struct batch_plan {
  layout::ref eng{};
  void* const* tensors = nullptr;
  const batch_chunk* chunks = nullptr;
  const std::int32_t* block_ids = nullptr;
  std::uint32_t chunk_count = 0;
  std::uint32_t planes = 2;
  std::uint32_t blocks_per_chunk = 0;  ///< chunk_tokens / block_size
  std::uint32_t layer_begin = 0;
  std::uint32_t layer_end = 0;

  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t row_bytes() const noexcept {
    return eng.row_bytes;
  }
  /// Bytes of one token of one (layer, plane) in the chunk format.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t token_bytes() const noexcept {
    return std::size_t{eng.heads} * eng.row_bytes;
  }
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint64_t segments() const noexcept {
    return std::uint64_t{chunk_count} * (layer_end - layer_begin) * planes * blocks_per_chunk;
  }
  /// True when a block's rows are one contiguous run in the engine too (NHD-like): a segment is
  /// then a single memcpy.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr bool engine_dense() const noexcept {
    return (eng.heads == 1 || eng.head_stride == eng.row_bytes) &&
           (eng.block_size == 1 || eng.token_stride == token_bytes());
  }
  /// True when one token's heads are contiguous in the engine (a token is one memcpy).
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr bool engine_token_dense() const noexcept {
    return eng.heads == 1 || eng.head_stride == eng.row_bytes;
  }

  KVTIER_HOST_DEVICE [[nodiscard]] constexpr segment at(std::uint64_t i) const noexcept {
    const std::uint32_t j = static_cast<std::uint32_t>(i % blocks_per_chunk);
    i /= blocks_per_chunk;
    const std::uint32_t plane = static_cast<std::uint32_t>(i % planes);
    i /= planes;
    const std::uint32_t nl = layer_end - layer_begin;
    const std::uint32_t layer = layer_begin + static_cast<std::uint32_t>(i % nl);
    const batch_chunk& c = chunks[i / nl];
    const std::uint32_t first = j * eng.block_size;
    segment s;
    if (first >= c.tokens) return s;
    s.tokens = c.tokens - first < eng.block_size ? c.tokens - first : eng.block_size;
    const layout::block_span b =
        eng.span(layer, plane, static_cast<std::size_t>(block_ids[c.block0 + j]));
    s.engine = static_cast<std::byte*>(tensors[b.tensor]) + b.offset;
    s.chunk = c.data + ((std::size_t{layer} * planes + plane) * c.tokens + first) * token_bytes();
    return s;
  }

  /// Byte offset of row (token t, head h) from a segment's engine base.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::size_t engine_row(std::size_t t,
                                                                    std::size_t h) const noexcept {
    return t * eng.token_stride + h * eng.head_stride;
  }

  /// DMA granularity: copies per segment (1 when engine_dense, one per token when a token's
  /// heads are contiguous, else one per row), and their bytes.
  KVTIER_HOST_DEVICE [[nodiscard]] constexpr std::uint32_t copies_per_segment() const noexcept {
    return engine_dense() ? 1u : engine_token_dense() ? eng.block_size : eng.block_size * eng.heads;
  }
  /// Copy k of segment s: engine and chunk address and bytes (0 bytes past a partial tail).
  KVTIER_HOST_DEVICE constexpr std::size_t copy_at(const segment& s, std::uint32_t k,
                                                   std::byte*& engine,
                                                   std::byte*& chunk) const noexcept {
    if (engine_dense()) {
      engine = s.engine;
      chunk = s.chunk;
      return s.tokens * token_bytes();
    }
    if (engine_token_dense()) {
      engine = s.engine + engine_row(k, 0);
      chunk = s.chunk + k * token_bytes();
      return k < s.tokens ? token_bytes() : 0;
    }
    const std::uint32_t t = k / eng.heads, h = k % eng.heads;
    engine = s.engine + engine_row(t, h);
    chunk = s.chunk + t * token_bytes() + std::size_t{h} * eng.row_bytes;
    return t < s.tokens ? std::size_t{eng.row_bytes} : 0;
  }
};

#if defined(__CUDA_ARCH__)
#define KVTIER_UNROLL _Pragma("unroll")
#else
#define KVTIER_UNROLL
#endif

/// What one thread (`lane` of `lanes`) of the block moving segment `s` copies: vectors of
/// sizeof(V) bytes in chunk order, `Unroll` loads in flight before their stores. `Dense` says the
/// engine side is contiguous too (plan.engine_dense()). The kernel runs exactly this; the host
/// tests run it for every lane to prove the index arithmetic.
template <class V, way W, bool Dense, unsigned Unroll = 4>
KVTIER_HOST_DEVICE inline void move_segment(const batch_plan& p, const segment& s,
                                            std::uint32_t lane, std::uint32_t lanes) noexcept {
  constexpr std::uint32_t vb = sizeof(V);
  const std::uint32_t per_row = p.eng.row_bytes / vb;
  const std::uint32_t n = s.tokens * p.eng.heads * per_row;
  const auto engine_at = [&](std::uint32_t v) -> std::byte* {
    if constexpr (Dense) {
      return s.engine + std::size_t{v} * vb;
    } else {
      const std::uint32_t row = v / per_row;
      return s.engine + p.engine_row(row / p.eng.heads, row % p.eng.heads) +
             std::size_t{v % per_row} * vb;
    }
  };
  for (std::uint32_t base = lane; base < n; base += lanes * Unroll) {
    // Value-initialised: the store loop reads r[u] under the same `v < n` test as the load
    // loop, which GCC -O3 cannot always pair up (-Wmaybe-uninitialized). A zero is never
    // stored: a lane stores only the vectors it loaded.
    V r[Unroll]{};
    KVTIER_UNROLL
    for (unsigned u = 0; u < Unroll; ++u) {
      const std::uint32_t v = base + u * lanes;
      if (v < n) {
        const std::byte* src = W == way::to_chunk ? engine_at(v) : s.chunk + std::size_t{v} * vb;
        r[u] = *reinterpret_cast<const V*>(src);
      }
    }
    KVTIER_UNROLL
    for (unsigned u = 0; u < Unroll; ++u) {
      const std::uint32_t v = base + u * lanes;
      if (v < n) {
        std::byte* dst = W == way::to_chunk ? s.chunk + std::size_t{v} * vb : engine_at(v);
        *reinterpret_cast<V*>(dst) = r[u];
      }
    }
  }
}

/// Thread blocks per segment for a kernel on `sms` multiprocessors: enough for 4 blocks per
/// multiprocessor when a batch has few segments (one layer of one chunk), at most one per 1024
/// vectors of `vb` bytes. Block `part` of a segment then runs move_segment with
/// lane = part * threads + thread and lanes = parts * threads.
[[nodiscard]] inline std::uint32_t parts_for(const batch_plan& p, std::uint32_t vb,
                                             std::uint32_t sms) noexcept {
  const std::uint64_t segs = p.segments();
  if (segs == 0) return 1;
  const std::uint64_t vectors = std::uint64_t{p.eng.block_size} * p.token_bytes() / vb;
  const std::uint64_t want = (4ull * sms + segs - 1) / segs;
  const std::uint64_t most = (vectors + 1023) / 1024;
  return static_cast<std::uint32_t>(want < most ? want : most > 0 ? most : 1);
}

/// The widest access (16, 8, 4, 2 or 1 bytes) every address of a batch is aligned to, given the
/// engine's strides, its tensor bases and the chunk slots' alignment.
[[nodiscard]] inline std::uint32_t vector_bytes(const layout::ref& e, void* const* tensors,
                                                std::size_t tensor_count,
                                                std::size_t slot_alignment) noexcept {
  std::uint64_t bits = e.row_bytes | e.token_stride | e.head_stride | e.block_stride |
                       e.layer_stride | e.kv_stride | slot_alignment;
  for (std::size_t i = 0; i < tensor_count; ++i) {
    bits |= static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(tensors[i]));
  }
  std::uint32_t v = 16;
  while (v > 1 && (bits & (v - 1)) != 0) v /= 2;
  return v;
}

/// Calls `fn(std::integral_constant<std::uint32_t, W>{})` with the access width W (16, 8, 4, 2
/// or 1 bytes) that a batch whose addresses are all `vb`-byte aligned (vector_bytes) moves in:
/// the widest that `vb` allows. The kernel launch and the host emulation both dispatch here.
template <class Fn>
constexpr void for_vector_width(std::uint32_t vb, Fn&& fn) {
  if (vb >= 16) {
    fn(std::integral_constant<std::uint32_t, 16>{});
  } else if (vb >= 8) {
    fn(std::integral_constant<std::uint32_t, 8>{});
  } else if (vb >= 4) {
    fn(std::integral_constant<std::uint32_t, 4>{});
  } else if (vb >= 2) {
    fn(std::integral_constant<std::uint32_t, 2>{});
  } else {
    fn(std::integral_constant<std::uint32_t, 1>{});
  }
}

}  // namespace kvtier::transfer
