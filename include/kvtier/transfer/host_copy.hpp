#pragma once
// Host copy engine: gathers a chunk's tokens from engine blocks into the chunk format and
// scatters them back, with memcpy over the largest contiguous runs the two layouts share.

#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/detail/record.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/view.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace kvtier::transfer {

namespace detail {

#if defined(__SSE2__)
// Copies 64 bytes with streaming stores; `dst` is 16-byte aligned.
inline void stream64(std::byte* dst, const std::byte* src) noexcept {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
  const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
}
#endif

/// Copies n bytes. Copies of 256 bytes or more use streaming (non-temporal) stores where the
/// target has them: chunk bytes are not read again soon by this core, and streaming skips the
/// read-for-ownership of every destination line. Runs of 8 KiB or more are copied two pages at
/// a time, interleaved, with the source prefetched, which keeps several DRAM pages open at once
/// (glibc's memcpy does the same, but only above a size threshold far larger than a block).
/// Measured in bench/host_tier.cpp and docs/performance.md. The caller must fence() before
/// publishing what it wrote.
inline void copy_bytes(std::byte* dst, const std::byte* src, std::size_t n) noexcept {
#if defined(__SSE2__)
  if (n >= 256) {
    const std::size_t head = (16 - (reinterpret_cast<std::uintptr_t>(dst) & 15)) & 15;
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    constexpr std::size_t page = 4096, pages = 2;
    std::size_t i = 0;
    for (; i + pages * page <= n; i += pages * page) {
      for (std::size_t j = 0; j < page; j += 64) {
        for (std::size_t p = 0; p < pages; ++p) {
          const std::byte* s = src + i + p * page + j;
          _mm_prefetch(reinterpret_cast<const char*>(s + 512), _MM_HINT_T0);
          stream64(dst + i + p * page + j, s);
        }
      }
    }
    for (; i + 64 <= n; i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(src + i + 1024), _MM_HINT_T0);
      stream64(dst + i, src + i);
    }
    std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

/// Orders streaming stores before what follows (publishing a chunk to other threads).
inline void fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Copies `tokens` x `heads` rows of `row` bytes between two token/head-strided places, merging
/// into one memcpy per token or one per run when both sides are contiguous.
inline void copy_rows(std::byte* dst, std::size_t dst_token, std::size_t dst_head,
                      const std::byte* src, std::size_t src_token, std::size_t src_head,
                      std::size_t tokens, std::size_t heads, std::size_t row) noexcept {
  const bool dst_heads_dense = dst_head == row, src_heads_dense = src_head == row;
  if (dst_heads_dense && src_heads_dense) {
    const std::size_t token = heads * row;
    if (dst_token == token && src_token == token) {
      copy_bytes(dst, src, tokens * token);
      return;
    }
    for (std::size_t t = 0; t < tokens; ++t) {
      copy_bytes(dst + t * dst_token, src + t * src_token, token);
    }
    return;
  }
  // Heads strided on one side (HND): walk heads outside so the strided side reads forward.
  for (std::size_t h = 0; h < heads; ++h) {
    std::byte* d = dst + h * dst_head;
    const std::byte* s = src + h * src_head;
    for (std::size_t t = 0; t < tokens; ++t) copy_bytes(d + t * dst_token, s + t * src_token, row);
  }
}

enum class direction { gather, scatter };

// The transpose of copy_transposed with elements of N bytes (N = 0: `elem` bytes, known only at
// run time); memcpy of a constant size compiles to one unaligned load and store.
template <direction Dir, std::size_t N>
void transpose_rows(std::byte* chunk, std::size_t ctoken, std::byte* eng, std::size_t eng_head,
                    std::size_t eng_elem, std::size_t tokens, std::size_t heads, std::size_t row,
                    std::size_t elem) noexcept {
  const std::size_t es = N != 0 ? N : elem;
  for (std::size_t h = 0; h < heads; ++h) {
    for (std::size_t d = 0; d < row / es; ++d) {
      std::byte* e = eng + h * eng_head + d * eng_elem;  // the engine's tokens, es bytes apart
      std::byte* c = chunk + h * row + d * es;           // the chunk's, ctoken bytes apart
      for (std::size_t t = 0; t < tokens; ++t) {
        if constexpr (Dir == direction::gather) {
          std::memcpy(c + t * ctoken, e + t * es, N != 0 ? N : es);
        } else {
          std::memcpy(e + t * es, c + t * ctoken, N != 0 ? N : es);
        }
      }
    }
  }
}

/// Moves `tokens` x `heads` rows between the chunk (rows of `row` contiguous bytes, ctoken bytes
/// per token) and an engine plane whose tokens are one element (`elem` bytes) apart and a row's
/// elements `eng_elem` apart: K of a page::k_transposed layout, a transpose per head.
template <direction Dir>
void copy_transposed(std::byte* chunk, std::size_t ctoken, std::byte* eng, std::size_t eng_head,
                     std::size_t eng_elem, std::size_t tokens, std::size_t heads, std::size_t row,
                     std::size_t elem) noexcept {
  const auto run = [&]<std::size_t N>() {
    transpose_rows<Dir, N>(chunk, ctoken, eng, eng_head, eng_elem, tokens, heads, row, elem);
  };
  switch (elem) {
    case 1:
      return run.template operator()<1>();
    case 2:
      return run.template operator()<2>();
    case 4:
      return run.template operator()<4>();
    case 8:
      return run.template operator()<8>();
    default:
      return run.template operator()<0>();
  }
}

/// A plane hook that does nothing.
struct no_hook {
  void operator()(const std::byte*, std::size_t) const noexcept {}
};

/// Moves one chunk between the engine's blocks and the chunk format. `before(p, n)` is called
/// with each (layer, K/V) plane of the chunk, in chunk order (so over the whole chunk, once),
/// just before that plane is moved.
template <direction Dir, class L, class Hook = no_hook>
void move_chunk(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
                std::size_t first_token, std::size_t tokens, std::byte* chunk,
                Hook&& before = {}) noexcept {
  const layout::ref& e = v.resolved();
  const std::size_t row = f.row_bytes(), ctoken = f.token_bytes(), bs = e.block_size;
  for (std::size_t l = 0; l < f.layers; ++l) {
    for (std::size_t kv = 0; kv < f.kv_planes; ++kv) {
      before(chunk + f.offset(l, kv, 0, tokens), tokens * ctoken);
      std::size_t t = 0;
      while (t < tokens) {
        const std::size_t tok = first_token + t;
        const std::size_t block = static_cast<std::size_t>(table[tok / bs]);
        const std::size_t slot = tok % bs;
        const std::size_t run = std::min(bs - slot, tokens - t);
        layout::block_span s;
        std::byte* eng = v.base(l, kv, block, s) + slot * s.token_stride;
        std::byte* c = chunk + f.offset(l, kv, t, tokens);
        if (s.elem_stride != 0) {
          copy_transposed<Dir>(c, ctoken, eng, s.head_stride, s.elem_stride, run, e.heads, row,
                               s.token_stride);
        } else if constexpr (Dir == direction::gather) {
          copy_rows(c, ctoken, row, eng, s.token_stride, s.head_stride, run, e.heads, row);
        } else {
          copy_rows(eng, s.token_stride, s.head_stride, c, ctoken, row, run, e.heads, row);
        }
        t += run;
      }
    }
  }
  fence();
}

}  // namespace detail

/// Copies tokens [first_token, first_token + tokens) of the request whose blocks are `table`
/// from the engine into `chunk` (chunk format, `tokens` tokens). The view and table must have
/// been validated. Thread-safe for disjoint destinations; allocates nothing.
template <class L>
void gather(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
            std::size_t first_token, std::size_t tokens, std::byte* chunk) noexcept {
  detail::move_chunk<detail::direction::gather>(v, f, table, first_token, tokens, chunk);
}

/// The inverse of gather: writes `chunk` into the engine's blocks.
template <class L>
void scatter(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
             std::size_t first_token, std::size_t tokens, const std::byte* chunk) noexcept {
  detail::move_chunk<detail::direction::scatter>(v, f, table, first_token, tokens,
                                                 const_cast<std::byte*>(chunk));
}

/// scatter, which also returns the payload checksum of `chunk` (detail::payload_checksum under
/// `key`), each plane hashed just before it is copied out, while it is in cache: the check of a
/// chunk read in place costs about one pass over it instead of two.
template <class L>
std::uint64_t scatter_summed(const layout::view<L>& v, const layout::chunk_format& f,
                             block_table table, std::size_t first_token, std::size_t tokens,
                             const std::byte* chunk, const chunk_key& key) noexcept {
  kvtier::detail::payload_hasher h(key);
  detail::move_chunk<detail::direction::scatter>(
      v, f, table, first_token, tokens, const_cast<std::byte*>(chunk),
      [&h](const std::byte* p, std::size_t n) { h.update(p, n); });
  return h.digest();
}

}  // namespace kvtier::transfer
