#pragma once
// Host copy engine: gathers a chunk's tokens from engine blocks into the chunk format and
// scatters them back, with memcpy over the largest contiguous runs the two layouts share.

#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/layout/view.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace kvtier::transfer {

namespace detail {

/// Copies `tokens` x `heads` rows of `row` bytes between two token/head-strided places, merging
/// into one memcpy per token or one per run when both sides are contiguous.
inline void copy_rows(std::byte* dst, std::size_t dst_token, std::size_t dst_head,
                      const std::byte* src, std::size_t src_token, std::size_t src_head,
                      std::size_t tokens, std::size_t heads, std::size_t row) noexcept {
  const bool dst_heads_dense = dst_head == row, src_heads_dense = src_head == row;
  if (dst_heads_dense && src_heads_dense) {
    const std::size_t token = heads * row;
    if (dst_token == token && src_token == token) {
      std::memcpy(dst, src, tokens * token);
      return;
    }
    for (std::size_t t = 0; t < tokens; ++t) {
      std::memcpy(dst + t * dst_token, src + t * src_token, token);
    }
    return;
  }
  // Heads strided on one side (HND): walk heads outside so the strided side reads forward.
  for (std::size_t h = 0; h < heads; ++h) {
    std::byte* d = dst + h * dst_head;
    const std::byte* s = src + h * src_head;
    for (std::size_t t = 0; t < tokens; ++t) std::memcpy(d + t * dst_token, s + t * src_token, row);
  }
}

enum class direction { gather, scatter };

template <direction Dir, class L>
void move_chunk(const layout::view<L>& v, const layout::chunk_format& f, block_table table,
                std::size_t first_token, std::size_t tokens, std::byte* chunk) noexcept {
  const auto& e = v.ext();
  const std::size_t row = f.row_bytes(), ctoken = f.token_bytes();
  for (std::size_t l = 0; l < f.layers; ++l) {
    for (std::size_t kv = 0; kv < layout::chunk_format::kv_planes; ++kv) {
      std::size_t t = 0;
      while (t < tokens) {
        const std::size_t tok = first_token + t;
        const std::size_t block = static_cast<std::size_t>(table[tok / e.block_size]);
        const std::size_t slot = tok % e.block_size;
        const std::size_t run = std::min(e.block_size - slot, tokens - t);
        layout::block_span s;
        std::byte* eng = v.base(l, kv, block, s) + slot * s.token_stride;
        std::byte* c = chunk + f.offset(l, kv, t, tokens);
        if constexpr (Dir == direction::gather) {
          copy_rows(c, ctoken, row, eng, s.token_stride, s.head_stride, run, e.heads, row);
        } else {
          copy_rows(eng, s.token_stride, s.head_stride, c, ctoken, row, run, e.heads, row);
        }
        t += run;
      }
    }
  }
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

}  // namespace kvtier::transfer
