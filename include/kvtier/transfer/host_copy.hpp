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

// Transposes a matrix of `rows` x `cols` elements of N bytes (N = 0: `es` bytes, known only at
// run time): row r of `src` starts at src + r * ss, its elements contiguous; element (r, c) goes
// to dst + c * ds + r * N. memcpy of a constant size compiles to one unaligned load and store.
template <std::size_t N>
void transpose_scalar(std::byte* dst, std::size_t ds, const std::byte* src, std::size_t ss,
                      std::size_t rows, std::size_t cols, std::size_t es) noexcept {
  const std::size_t n = N != 0 ? N : es;
  for (std::size_t c = 0; c < cols; ++c) {
    for (std::size_t r = 0; r < rows; ++r) {
      std::memcpy(dst + c * ds + r * n, src + r * ss + c * n, N != 0 ? N : n);
    }
  }
}

#if defined(__SSE2__)
// One tile of transpose() in 16-byte registers: 8 x 8 elements of 2 bytes or 4 x 4 of 4 bytes
// (8 rows of 16 bytes in, 8 out: three rounds of interleaves, or two).
template <std::size_t N>
inline void transpose_tile(std::byte* dst, std::size_t ds, const std::byte* src,
                           std::size_t ss) noexcept {
  static_assert(N == 2 || N == 4);
  constexpr std::size_t T = 16 / N;
  __m128i r[T];
  for (std::size_t i = 0; i < T; ++i) {
    r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss));
  }
  __m128i c[T];
  if constexpr (N == 2) {
    __m128i a[8], b[8];
    for (std::size_t i = 0; i < 4; ++i) {
      a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (std::size_t i = 0; i < 2; ++i) {  // rows 4i..4i+3: a[4i..4i+3]
      b[4 * i] = _mm_unpacklo_epi32(a[4 * i], a[4 * i + 2]);
      b[4 * i + 1] = _mm_unpackhi_epi32(a[4 * i], a[4 * i + 2]);
      b[4 * i + 2] = _mm_unpacklo_epi32(a[4 * i + 1], a[4 * i + 3]);
      b[4 * i + 3] = _mm_unpackhi_epi32(a[4 * i + 1], a[4 * i + 3]);
    }
    for (std::size_t i = 0; i < 4; ++i) {  // b[i]: columns 2i, 2i+1 of rows 0-3; b[4+i]: 4-7
      c[2 * i] = _mm_unpacklo_epi64(b[i], b[4 + i]);
      c[2 * i + 1] = _mm_unpackhi_epi64(b[i], b[4 + i]);
    }
  } else {
    const __m128i a0 = _mm_unpacklo_epi32(r[0], r[1]), a1 = _mm_unpackhi_epi32(r[0], r[1]);
    const __m128i a2 = _mm_unpacklo_epi32(r[2], r[3]), a3 = _mm_unpackhi_epi32(r[2], r[3]);
    c[0] = _mm_unpacklo_epi64(a0, a2);
    c[1] = _mm_unpackhi_epi64(a0, a2);
    c[2] = _mm_unpacklo_epi64(a1, a3);
    c[3] = _mm_unpackhi_epi64(a1, a3);
  }
  for (std::size_t i = 0; i < T; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * ds), c[i]);
  }
}
#endif

/// transpose_scalar, in tiles of 16 x 16 bytes where the element size has a tile kernel (2 and
/// 4 bytes: bf16, fp16, fp32), the edges element by element. The tiles go along the source's
/// rows (SrcRowsOuter) or the destination's: walking the engine's side in order measured faster
/// both ways (bench: kvtier-bench tier --layout cpu; the engine's rows are a page's elements).
template <std::size_t N, bool SrcRowsOuter>
void transpose(std::byte* dst, std::size_t ds, const std::byte* src, std::size_t ss,
               std::size_t rows, std::size_t cols, std::size_t es) noexcept {
#if defined(__SSE2__)
  if constexpr (N == 2 || N == 4) {
    constexpr std::size_t T = 16 / N;
    const std::size_t rt = rows / T * T, ct = cols / T * T;
    const auto tile = [&](std::size_t r, std::size_t c) {
      transpose_tile<N>(dst + c * ds + r * N, ds, src + r * ss + c * N, ss);
    };
    if constexpr (SrcRowsOuter) {
      for (std::size_t r = 0; r < rt; r += T) {
        for (std::size_t c = 0; c < ct; c += T) tile(r, c);
      }
    } else {
      for (std::size_t c = 0; c < ct; c += T) {
        for (std::size_t r = 0; r < rt; r += T) tile(r, c);
      }
    }
    if (ct < cols) transpose_scalar<N>(dst + ct * ds, ds, src + ct * N, ss, rows, cols - ct, es);
    if (rt < rows) transpose_scalar<N>(dst + rt * N, ds, src + rt * ss, ss, rows - rt, ct, es);
    return;
  }
#endif
  transpose_scalar<N>(dst, ds, src, ss, rows, cols, es);
}

/// Moves `tokens` x `heads` rows between the chunk (rows of `row` contiguous bytes, ctoken bytes
/// per token) and an engine plane whose tokens are one element (`elem` bytes) apart and a row's
/// elements `eng_elem` apart: K of a page::k_transposed layout, a transpose per head (the
/// chunk's [token][element] against the engine's [element][token]).
template <direction Dir>
void copy_transposed(std::byte* chunk, std::size_t ctoken, std::byte* eng, std::size_t eng_head,
                     std::size_t eng_elem, std::size_t tokens, std::size_t heads, std::size_t row,
                     std::size_t elem) noexcept {
  const auto run = [&]<std::size_t N>() {
    for (std::size_t h = 0; h < heads; ++h) {
      std::byte* e = eng + h * eng_head;
      std::byte* c = chunk + h * row;
      if constexpr (Dir == direction::gather) {
        transpose<N, true>(c, ctoken, e, eng_elem, row / elem, tokens, elem);
      } else {
        transpose<N, false>(e, eng_elem, c, ctoken, tokens, row / elem, elem);
      }
    }
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

/// Moves layers [l0, l1) of one chunk between the engine's blocks and the chunk format.
/// `before(p, n)` is called with each (layer, K/V) plane moved, in chunk order (so over the
/// whole chunk, once, when every layer is moved), just before that plane is moved.
template <direction Dir, class L, class Hook = no_hook>
void move_chunk(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
                std::size_t first_token, std::size_t tokens, std::byte* chunk, Hook&& before = {},
                std::size_t l0 = 0, std::size_t l1 = SIZE_MAX) noexcept {
  const layout::ref& e = v.resolved();
  const std::size_t row = f.row_bytes(), ctoken = f.token_bytes(), bs = e.block_size;
  for (std::size_t l = l0; l < std::min<std::size_t>(l1, f.layers); ++l) {
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

/// gather and scatter of layer `l` only (a layer-wise store or retrieve on host tiers).
template <class L>
void gather_layer(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
                  std::size_t first_token, std::size_t tokens, std::byte* chunk,
                  std::size_t l) noexcept {
  detail::move_chunk<detail::direction::gather>(v, f, table, first_token, tokens, chunk, {}, l,
                                                l + 1);
}
template <class L>
void scatter_layer(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
                   std::size_t first_token, std::size_t tokens, const std::byte* chunk,
                   std::size_t l) noexcept {
  detail::move_chunk<detail::direction::scatter>(v, f, table, first_token, tokens,
                                                 const_cast<std::byte*>(chunk), {}, l, l + 1);
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
