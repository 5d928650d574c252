#pragma once
// Reading in place: lower tiers whose chunks are in this process's memory (tier::shared_host,
// `maps_reads`) are not promoted into the first tier. A retrieve scatters their chunks straight
// into the engine's blocks, verified as they are copied, and a store skips the leading chunks
// they already hold. Without the cache's lock except to count.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/cache/state.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/model.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/transfer/host_copy.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>

namespace kvtier::detail {

template <class Chain>
class in_place_reader {
  static constexpr std::size_t tier_count = Chain::tier_count;
  using state_type = cache_state<tier_count>;

 public:
  static constexpr std::size_t window = batch_chunks;
  /// Per chunk of a window: 0 not read in place, 1 loaded, 2 failed (the prefix ends there).
  using outcome = std::array<std::uint8_t, window>;

  in_place_reader(Chain& chain, state_type& st, const layout::chunk_format& f,
                  std::size_t chunk_tokens) noexcept
      : chain_(chain), st_(st), format_(f), chunk_tokens_(chunk_tokens) {}

  /// A store of chunks [first, n) of `ks`: the leading ones a tier reading in place holds are
  /// stored already (another process stored them; copying them would write them twice, here and
  /// in every tier below). Their refs become dropped_tier; returns the first chunk to store.
  std::size_t skip_held(const chunk_key* ks, chunk_ref* rs, std::size_t first, std::size_t n) {
    const std::size_t held = chain_.probe_mapped({ks + first, n - first});
    for (std::size_t i = first; i < first + held; ++i) rs[i] = {0, dropped_tier, 0};
    return first + held;
  }

  /// Scatters the chunks [lo, hi) of a lease (keys `ks`, refs `rs`; chunk i is chunk
  /// first_chunk + i of a run ending at token abs_end) held by tiers that read in place straight
  /// from there into the engine's blocks, each verified as it is copied; sets out[i - lo]. The
  /// tier stops at its first chunk that is missing or fails: nothing after it is copied, and
  /// only the bytes of a chunk that failed its checksum can be in blocks of tokens retrieve does
  /// not report as loaded (the engine computes those anew). Their refs become dropped_tier (a
  /// remote tier's chunk holds no reference here).
  template <class View>
  void load(const chunk_key* ks, chunk_ref* rs, std::size_t first_chunk, std::size_t lo,
            std::size_t hi, std::size_t abs_end, const View& v, block_table table, outcome& out) {
    auto tokens_at = [&](std::size_t c) {
      return std::min(chunk_tokens_, abs_end - c * chunk_tokens_);
    };
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (!chain_.mapped(t)) continue;
      std::array<tier::read_job, window> jobs;
      std::array<std::uint32_t, window> at{};
      std::size_t nj = 0;
      for (std::size_t i = lo; i < hi; ++i) {
        if (rs[i].tier != t) continue;
        const std::size_t ntok = tokens_at(first_chunk + i);
        jobs[nj] = {0, ks[i], static_cast<std::uint32_t>(ntok), nullptr, format_.bytes(ntok)};
        at[nj++] = static_cast<std::uint32_t>(i);
      }
      if (nj == 0) continue;
      chain_.read_mapped(t, {jobs.data(), nj},
                         [&](std::size_t j, const std::byte* src, bool verify) -> std::uint64_t {
                           const std::size_t c = first_chunk + at[j];
                           const std::size_t first_token = c * chunk_tokens_, ntok = tokens_at(c);
                           if (verify) {
                             return transfer::scatter_summed(v, format_, table, first_token, ntok,
                                                             src, jobs[j].key);
                           }
                           transfer::scatter(v, format_, table, first_token, ntok, src);
                           return 0;
                         });
      std::size_t read = 0, errors = 0;
      for (std::size_t j = 0; j < nj; ++j) {
        const bool ok = jobs[j].status == tier::read_status::ok;
        out[at[j] - lo] = ok ? 1 : 2;
        if (ok) read += jobs[j].bytes;
        if (!ok && jobs[j].status != tier::read_status::missing) ++errors;
        rs[at[j]] = {0, dropped_tier, 0};
      }
      std::lock_guard lk(st_.mu);
      st_.stats.tiers[t].bytes_read += read;
      st_.stats.tiers[t].errors += errors;
    }
  }

 private:
  Chain& chain_;
  state_type& st_;
  const layout::chunk_format format_;
  const std::size_t chunk_tokens_;
};

}  // namespace kvtier::detail
