#pragma once
// A batch as a list of contiguous copies for the DMA engines (cudaMemcpyBatchAsync): one per
// batch_plan::copy_at, runs adjacent on both sides merged, gathered into caller-owned arrays of
// fixed capacity and handed over each time they fill. Plain C++, shared by the memcpy_batch
// engine and the host tests.

#include "kvtier/transfer/batch_plan.hpp"

#include <cstddef>
#include <cstdint>

namespace kvtier::transfer {

/// Fills `dst`, `src`, `size` (each `cap` > 0 entries) with the copies of batch `p` in direction
/// `w` and calls `flush(n)` whenever `cap` copies are gathered and once for the rest (never with
/// n == 0). A copy that continues the previous one on both sides extends it. Returns the number
/// of flushes. Allocates nothing; the arrays may be reused as soon as `flush` returns.
template <class Flush>
std::size_t gather_copies(const batch_plan& p, way w, std::size_t cap, void** dst, void** src,
                          std::size_t* size, Flush&& flush) {
  std::size_t n = 0, flushes = 0;
  const std::uint32_t per = p.copies_per_segment();
  const std::uint64_t segs = p.segments();
  for (std::uint64_t i = 0; i < segs; ++i) {
    const segment seg = p.at(i);
    for (std::uint32_t k = 0; k < per; ++k) {
      std::byte *e = nullptr, *c = nullptr;
      const std::size_t bytes = p.copy_at(seg, k, e, c);
      if (bytes == 0) continue;
      std::byte* to = w == way::to_chunk ? c : e;
      std::byte* from = w == way::to_chunk ? e : c;
      if (n > 0 && static_cast<std::byte*>(dst[n - 1]) + size[n - 1] == to &&
          static_cast<std::byte*>(src[n - 1]) + size[n - 1] == from) {
        size[n - 1] += bytes;  // continues the previous run on both sides
        continue;
      }
      if (n == cap) {
        flush(n);
        ++flushes;
        n = 0;
      }
      dst[n] = to;
      src[n] = from;
      size[n] = bytes;
      ++n;
    }
  }
  if (n > 0) {
    flush(n);
    ++flushes;
  }
  return flushes;
}

}  // namespace kvtier::transfer
