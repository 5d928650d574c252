#pragma once
// kvtier::group_cache: models whose KV lives in several layer groups (hybrid sliding-window /
// full-attention models, DeepSeek V4's compressed and indexer caches, per-slot state pages).

#include "kvtier/cache.hpp"
#include "kvtier/error.hpp"
#include "kvtier/model.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <tuple>
#include <utility>

namespace kvtier {

/// When a layer group's KV counts as present for a cached prefix of P tokens.
struct hit_rule {
  /// 0: every chunk of the prefix (full attention). Otherwise the chunks covering the prefix's
  /// last window_tokens tokens (sliding window: the engine attends to nothing older).
  std::size_t window_tokens = 0;

  [[nodiscard]] static constexpr hit_rule all_blocks() noexcept { return {0}; }
  [[nodiscard]] static constexpr hit_rule trailing_window(std::size_t tokens) noexcept {
    return {tokens};
  }
};

/// One layer group of a group_cache: its own model shape (layers, heads, head size, dtype size,
/// block size), tiers, settings and hit rule. Its layout, eviction and tier chain are those of
/// the cache type `Cache`.
template <class Cache>
struct group {
  model_shape model;
  typename Cache::tier_configs tiers{};
  cache_config config{};
  hit_rule rule{};
};

/// The smallest chunk size usable with engine block sizes `Bs...`: their least common multiple.
template <std::size_t... Bs>
inline constexpr std::size_t chunk_tokens_for = [] {
  std::size_t l = 1;
  ((l = std::lcm(l, Bs)), ...);
  return l;
}();

/// A cache over several KV layer groups, one kvtier::cache per group (`Caches...`, each with its
/// own layout, block size, width, dtype and tiers), sharing one chunk size. A prefix is a hit
/// only when every group holds what its hit rule needs for it:
///
///  - an all_blocks group (full attention) holds every chunk of the prefix;
///  - a trailing_window(W) group holds the chunks covering the prefix's last W tokens.
///
/// Opaque per-slot state (an indexer's keys, compressed caches) is a group too: a one-plane
/// layout such as layout::state_pages with dtype_size 1 and head_size = state bytes per slot.
///
/// Each group's chunks are keyed with the salt's model_id suffixed by "#group<g>", so groups
/// never share chunks. Thread-safe as its caches are.
template <class... Caches>
class group_cache {
  static_assert(sizeof...(Caches) >= 1, "kvtier::group_cache: at least one group");
  static constexpr std::size_t N =
      std::array<std::size_t, sizeof...(Caches)>{Caches::chunk_tokens...}[0];
  static_assert(((Caches::chunk_tokens == N) && ...),
                "kvtier::group_cache: every group must use one chunk size (a multiple of every "
                "group's block size: kvtier::chunk_tokens_for<block sizes...>)");
  static_assert(((Caches::block_tokens == 0 || N % Caches::block_tokens == 0) && ...),
                "kvtier::group_cache: the chunk size must be a multiple of every group's block "
                "size");
  static constexpr std::size_t G = sizeof...(Caches);
  using index_seq = std::index_sequence_for<Caches...>;

 public:
  static constexpr std::size_t chunk_tokens = N;
  static constexpr std::size_t group_count = G;
  using cache_types = std::tuple<Caches...>;

  /// The result of lookup: one lease per group and the combined hit. Move-only; must not
  /// outlive its group_cache.
  class lease {
   public:
    /// Tokens of the cached prefix: every group's rule holds for it.
    [[nodiscard]] std::size_t tokens() const noexcept { return tokens_; }
    [[nodiscard]] bool live() const noexcept { return live_; }
    /// Group g's lease (for its hits per tier, its first token).
    template <std::size_t I>
    [[nodiscard]] const auto& part() const noexcept {
      return std::get<I>(leases_);
    }
    void reset() noexcept {
      std::apply([](auto&... l) { (l.reset(), ...); }, leases_);
      live_ = false;
      tokens_ = 0;
    }

   private:
    friend class group_cache;
    std::tuple<typename Caches::lease...> leases_;
    std::size_t tokens_ = 0;
    bool live_ = false;
  };

  /// Builds every group's cache. Throws invalid_argument naming the group when the chunk size is
  /// not a multiple of its block size (with the smallest chunk size that fits all groups), when
  /// a group stores partial tails, or as the group's cache constructor does.
  explicit group_cache(const salt& s, const group<Caches>&... groups) : rules_{groups.rule...} {
    const std::array<std::uint32_t, G> bs{groups.model.block_size...};
    std::size_t l = 1;
    for (auto b : bs) l = b ? std::lcm(l, std::size_t{b}) : l;
    for (std::size_t g = 0; g < G; ++g) {
      if (bs[g] != 0 && N % bs[g] != 0) {
        throw invalid_argument("kvtier: group " + std::to_string(g) + " has block size " +
                               std::to_string(bs[g]) + "; chunk size " + std::to_string(N) +
                               " is not a multiple of it (the smallest that fits every group "
                               "is " +
                               std::to_string(l) + ")");
      }
    }
    const std::array<bool, G> partial{groups.config.store_partial_tail...};
    for (std::size_t g = 0; g < G; ++g) {
      if (partial[g]) {
        throw invalid_argument("kvtier: group " + std::to_string(g) +
                               " sets store_partial_tail; a group_cache stores full chunks only");
      }
    }
    build(s, index_seq{}, groups...);
  }

  /// The longest prefix of `tokens` for which every group's hit rule holds, with leases that
  /// keep what each group needs. O(groups x chunks) probes; a window group is asked again only
  /// when another group shortened the prefix.
  lease lookup(std::span<const token_id> tokens) {
    lease out;
    out.live_ = true;
    std::size_t p = tokens.size() / N;  // the prefix, in chunks
    for_each(out, [&](auto gi, auto& c, auto& l) {
      if (rules_[gi].window_tokens != 0) return;
      l = c.lookup(tokens);
      p = std::min(p, l.chunks());
    });
    for (bool changed = true; changed && p > 0;) {
      changed = false;
      for_each(out, [&](auto gi, auto& c, auto& l) {
        const std::size_t w = rules_[gi].window_tokens;
        if (w == 0 || p == 0) return;
        const std::size_t first = window_first_chunk(p, w);
        if (l.live() && l.first_token() <= first * N && l.end_token() >= p * N) return;
        l = c.lookup(tokens, first);
        const std::size_t end = first + l.chunks();
        if (end < p) {
          p = end;
          changed = true;
        }
      });
    }
    if (p == 0) {
      out.reset();
      out.live_ = true;
      return out;
    }
    out.tokens_ = p * N;
    return out;
  }

  /// Loads the lease's prefix into every group's blocks: group g from kvs[g] through tables[g]
  /// (a window group's table may hold -1 for blocks before its window). Validates every group
  /// before loading any. Returns the tokens loaded for which every group's rule holds: the
  /// lease's tokens, or less after a failed read (then the engine recomputes the rest).
  std::size_t retrieve(lease& l, std::span<const engine_kv> kvs,
                       std::span<const block_table> tables) {
    check_counts("retrieve", kvs.size(), tables.size());
    if (!l.live_) {
      throw invalid_argument("kvtier: retrieve of a group lease that is not live");
    }
    const std::size_t end = l.tokens_;
    for_each(l, [&](auto gi, auto& c, auto& gl) {
      if (end > 0) c.validate(kvs[gi], tables[gi], gl.live() ? gl.first_token() : 0, end);
    });
    if (end == 0) {
      l.reset();
      return 0;
    }
    std::array<std::size_t, G> first{}, loaded_end{};
    for_each(l, [&](auto gi, auto& c, auto& gl) {
      first[gi] = gl.first_token();
      loaded_end[gi] = first[gi] + c.retrieve(gl, kvs[gi], tables[gi], end);
    });
    l.reset();
    std::size_t p = end;
    for (std::size_t g = 0; g < G; ++g) p = std::min(p, loaded_end[g]);
    p -= p % N;
    // A window group must still cover the last window before p; it loaded [first, loaded_end).
    for (std::size_t g = 0; g < G && p > 0; ++g) {
      const std::size_t w = rules_[g].window_tokens;
      if (w != 0 && window_first_chunk(p / N, w) * N < first[g]) p = 0;
    }
    return p;
  }

  /// Stores the chunks of `tokens` in every group: group g from kvs[g] through tables[g],
  /// skipping chunks that start before first_tokens[g] (blocks the engine already freed, as a
  /// sliding-window group does; empty = 0 for every group). Validates every group before storing
  /// any. Returns the tokens of the prefix every full-attention group now holds (all groups'
  /// stored ends when none is full-attention).
  std::size_t store(std::span<const token_id> tokens, std::span<const engine_kv> kvs,
                    std::span<const block_table> tables,
                    std::span<const std::size_t> first_tokens = {}) {
    check_counts("store", kvs.size(), tables.size());
    if (!first_tokens.empty() && first_tokens.size() != G) {
      throw invalid_argument("kvtier: group store got " + std::to_string(first_tokens.size()) +
                             " first_tokens for " + std::to_string(G) + " groups");
    }
    const std::size_t end = tokens.size() / N * N;
    auto first_of = [&](std::size_t g) {
      const std::size_t f = first_tokens.empty() ? 0 : first_tokens[g];
      return (f + N - 1) / N * N;
    };
    for_each_cache([&](auto gi, auto& c) {
      if (first_tokens.size() == G && first_tokens[gi] > tokens.size()) {
        throw invalid_argument("kvtier: group " + std::to_string(gi) + " first_token " +
                               std::to_string(first_tokens[gi]) + " is past the " +
                               std::to_string(tokens.size()) + " tokens");
      }
      c.validate(kvs[gi], tables[gi], std::min(first_of(gi), end), end);
    });
    std::size_t full = SIZE_MAX, any = SIZE_MAX;
    for_each_cache([&](auto gi, auto& c) {
      const std::size_t f = std::min(first_of(gi), end);
      const std::size_t stored_end = f + c.store(tokens, kvs[gi], tables[gi], f);
      any = std::min(any, stored_end);
      if (rules_[gi].window_tokens == 0) full = std::min(full, stored_end);
    });
    return full != SIZE_MAX ? full : any;
  }

  /// Group I's cache (its stats, pins, clear, flush).
  template <std::size_t I>
  [[nodiscard]] auto& cache() noexcept {
    return *std::get<I>(caches_);
  }
  [[nodiscard]] const hit_rule& rule(std::size_t g) const noexcept { return rules_[g]; }

  /// Waits for every group's write-through.
  void flush() {
    std::apply([](auto&... c) { (c->flush(), ...); }, caches_);
  }

 private:
  // The first chunk of the window ending at chunk p (exclusive) for a window of w tokens.
  static std::size_t window_first_chunk(std::size_t p, std::size_t w) noexcept {
    return p * N > w ? (p * N - w) / N : 0;
  }

  void check_counts(const char* what, std::size_t kvs, std::size_t tables) const {
    if (kvs != G || tables != G) {
      throw invalid_argument(std::string("kvtier: group ") + what + " got " + std::to_string(kvs) +
                             " engine_kv and " + std::to_string(tables) + " block tables for " +
                             std::to_string(G) + " groups");
    }
  }

  template <std::size_t... I>
  void build(const salt& s, std::index_sequence<I...>, const group<Caches>&... groups) {
    ((std::get<I>(caches_) =
          std::make_unique<Caches>(groups.model, group_salt(s, I), groups.tiers, groups.config)),
     ...);
  }
  static salt group_salt(salt s, std::size_t g) {
    s.model_id += "#group" + std::to_string(g);
    return s;
  }

  // Calls f(std::integral_constant<g>, cache_g, lease_g) for each group g in order.
  template <class F>
  void for_each(lease& l, F&& f) {
    for_each_impl(l, f, index_seq{});
  }
  template <class F, std::size_t... I>
  void for_each_impl(lease& l, F& f, std::index_sequence<I...>) {
    (f(std::integral_constant<std::size_t, I>{}, *std::get<I>(caches_), std::get<I>(l.leases_)),
     ...);
  }
  // Calls f(std::integral_constant<g>, cache_g) for each group g in order.
  template <class F>
  void for_each_cache(F&& f) {
    for_each_cache_impl(f, index_seq{});
  }
  template <class F, std::size_t... I>
  void for_each_cache_impl(F& f, std::index_sequence<I...>) {
    (f(std::integral_constant<std::size_t, I>{}, *std::get<I>(caches_)), ...);
  }

  std::array<hit_rule, G> rules_;
  std::tuple<std::unique_ptr<Caches>...> caches_;
};

}  // namespace kvtier
