#pragma once
// The cache's tiers: the first (memory) tier and the lower tiers in chain order, constructed from
// their configs, with the per-tier settings the chain policy reads (admission, writer threads)
// and the calls that reach a lower tier by its position. Not thread-safe for index access (the
// cache's lock guards every index); the I/O calls take no lock.

#include "kvtier/cache/op_table.hpp"
#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/stats.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/tier/context.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace kvtier::detail {

/// Whether lower tiers can read a tier's slots (a tier without the member: yes).
template <class T>
inline constexpr bool host_visible_v = true;
template <class T>
requires requires { T::host_visible; }
inline constexpr bool host_visible_v<T> = T::host_visible;

template <class Eviction, class First, class... Lower>
class tier_chain {
 public:
  using index_type = chunk_index<Eviction>;
  using first_impl = typename First::template impl<Eviction>;
  using configs = std::tuple<typename First::config, typename Lower::config...>;
  static constexpr std::size_t tier_count = 1 + sizeof...(Lower);
  static constexpr bool has_lower = sizeof...(Lower) > 0;
  /// A lower tier with an index in this process (else it is asked by key: a remote tier).
  template <class T>
  static constexpr bool is_indexed = requires(std::remove_cvref_t<T>& x) {
    x.index();
  };
  static constexpr std::size_t remote_count =
      (std::size_t{0} + ... + !is_indexed<typename Lower::template impl<Eviction>>);
  /// A lower tier whose chunks are in this process's memory and can be read in place
  /// (`static constexpr bool maps_reads` and `read_mapped(jobs, use)`: tier::shared_host).
  template <class T>
  static constexpr bool maps_reads = requires {
    requires std::remove_cvref_t<T>::maps_reads;
  };
  static constexpr bool has_mapped =
      (false || ... || maps_reads<typename Lower::template impl<Eviction>>);
  /// The first lower tier that reads in place (tier_count without one).
  static constexpr std::size_t first_mapped = [] {
    constexpr bool m[] = {false, maps_reads<typename Lower::template impl<Eviction>>...};
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (m[t]) return t;
    }
    return tier_count;
  }();

  static_assert(sizeof...(Lower) < 8, "kvtier: a tier chain has at most 8 tiers");
  static_assert(host_visible_v<First> || sizeof...(Lower) == 0,
                "kvtier::opt::tiers<tier::device, ...>: lower tiers need a host-visible first "
                "tier; use tier::pinned_host first");
  static_assert(tier::check_memory_tier<first_impl>());
  static_assert((tier::check_lower_tier<typename Lower::template impl<Eviction>>() && ...));

  tier_chain(const configs& c, const tier::context& ctx) {
    first_ = std::make_unique<first_impl>(std::get<0>(c), ctx);
    index_[0] = &first_->index();
    make_lower(c, ctx, std::index_sequence_for<Lower...>{});
  }

  [[nodiscard]] first_impl& first() noexcept { return *first_; }
  [[nodiscard]] index_type& first_index() noexcept { return *index_[0]; }
  /// Tier t's index, or nullptr for a remote tier.
  [[nodiscard]] index_type* index(std::size_t t) const noexcept { return index_[t]; }
  /// Lookup hits in the first tier before lower tier t takes a chunk (0: at once).
  [[nodiscard]] std::uint32_t admit_after(std::size_t t) const noexcept { return admit_[t]; }
  /// Threads writing into lower tier t.
  [[nodiscard]] std::size_t writers(std::size_t t) const noexcept { return writers_[t]; }
  /// Bit t set for every lower tier t.
  [[nodiscard]] std::uint8_t lower_mask() const noexcept { return lower_mask_; }

  template <std::size_t I>
  [[nodiscard]] auto& tier() noexcept {
    if constexpr (I == 0) {
      return *first_;
    } else {
      return *std::get<I - 1>(lower_);
    }
  }

  /// Names each tier and reports what lower tiers found in storage at construction.
  template <class Stats>
  void init_stats(Stats& s) {
    const char* names[] = {First::name, Lower::name...};
    for (std::size_t t = 0; t < tier_count; ++t) s.tiers[t].name = names[t];
    for (std::size_t t = 1; t < tier_count; ++t) {
      with_lower(t, [&](auto& impl) {
        if constexpr (requires { impl.recovered(); }) {
          s.tiers[t].recovered = impl.recovered();
          s.tiers[t].errors = impl.dropped_at_open();
        }
      });
    }
  }

  /// Calls f(impl) with lower tier t's impl (1 <= t < tier_count).
  template <class F>
  void with_lower(std::size_t t, F&& f) {
    with_lower_impl(t - 1, f, std::index_sequence_for<Lower...>{});
  }

  /// Whether indexed tier t keeps records that outlive the process and can invalidate them
  /// (`invalidate(std::span<const std::uint32_t> slots)`, the local disk).
  [[nodiscard]] bool durable(std::size_t t) const noexcept { return durable_[t]; }
  /// Removes entry `e` of the index `ix` (one of this chain's) from lookup, for a clear: as
  /// chunk_index::remove, and in a durable tier its record is then invalidated in storage by
  /// that tier's writer threads (wake them after) before its slot is reused. Under the lock.
  bool remove_locked(index_type& ix, index_entry& e) noexcept {
    for (std::size_t t = 1; t < tier_count; ++t) {
      if (index_[t] == &ix && durable_[t]) return ix.remove_durably(e);
    }
    return ix.remove(e);
  }
  /// Durable tier t invalidates the records of `slots` in storage (no lock held).
  void invalidate(std::size_t t, std::span<const std::uint32_t> slots) {
    with_lower(t, [&](auto& impl) {
      if constexpr (requires { impl.invalidate(slots); }) impl.invalidate(slots);
    });
  }

  /// Lower tier t's batch calls (no lock held; see tier/concepts.hpp).
  void read(std::size_t t, std::span<tier::read_job> jobs) {
    with_lower(t, [&](auto& impl) { impl.read_batch(jobs); });
  }
  void write(std::size_t t, std::span<tier::write_job> jobs) {
    with_lower(t, [&](auto& impl) { impl.write_batch(jobs); });
  }
  /// Whether lower tier t reads in place.
  [[nodiscard]] bool mapped(std::size_t t) {
    bool m = false;
    with_lower(t, [&](auto& impl) { m = maps_reads<decltype(impl)>; });
    return m;
  }
  /// The leading run of `keys` the first lower tier that reads in place holds (0 without one).
  std::size_t probe_mapped(std::span<const chunk_key> keys) {
    std::size_t found = 0;
    if constexpr (first_mapped < tier_count) {
      with_lower(first_mapped, [&](auto& impl) {
        if constexpr (maps_reads<decltype(impl)>) found = impl.probe(keys);
      });
    }
    return found;
  }
  /// Lower tier t's in-place reads (a tier that does not read in place: nothing happens).
  template <class Use>
  void read_mapped(std::size_t t, std::span<tier::read_job> jobs, Use&& use) {
    with_lower(t, [&](auto& impl) {
      if constexpr (maps_reads<decltype(impl)>) impl.read_mapped(jobs, use);
    });
  }

  /// The first tier that reads in place holds the leading run of `n` chunks for a layer-wise
  /// retrieve (tier::shared_host::hold). Only in chains with such a tier.
  template <class KeyOf, class TokensOf>
  auto hold_mapped(std::size_t n, KeyOf&& key_of, TokensOf&& tokens_of,
                   std::size_t* corrupt) requires has_mapped {
    return this->template tier<first_mapped>().hold(n, key_of, tokens_of, corrupt);
  }

  /// Asks remote tiers, in chain order, for the leading run of `keys` they hold, until one holds
  /// some. Returns that run's length and sets `tier` to the tier that answered; `asked[t]` is
  /// set for each tier asked.
  std::size_t probe_remote(std::span<const chunk_key> keys,
                           std::array<std::uint8_t, tier_count>& asked, std::size_t& tier) {
    std::size_t found = 0;
    for (std::size_t t = 1; t < tier_count && found == 0; ++t) {
      with_lower(t, [&](auto& impl) {
        if constexpr (!is_indexed<decltype(impl)>) {
          found = impl.probe(keys);
          asked[t] = 1;
          tier = t;
        }
      });
    }
    return found;
  }
  /// Deletes `keys` from every remote tier; returns the most any one of them held.
  std::size_t remove_remote(std::span<const chunk_key> keys) {
    std::size_t removed = 0;
    for (std::size_t t = 1; t < tier_count; ++t) {
      with_lower(t, [&](auto& impl) {
        if constexpr (!is_indexed<decltype(impl)>) removed = std::max(removed, impl.remove(keys));
      });
    }
    return removed;
  }
  /// Deletes `keys` from remote tier t (no-op for an indexed tier).
  void remove_from(std::size_t t, std::span<const chunk_key> keys) {
    with_lower(t, [&](auto& impl) {
      if constexpr (!is_indexed<decltype(impl)>) (void)impl.remove(keys);
    });
  }
  /// Deletes every record of this cache's salt from every remote tier; returns how many.
  std::size_t remove_all_remote() {
    std::size_t removed = 0;
    for (std::size_t t = 1; t < tier_count; ++t) {
      with_lower(t, [&](auto& impl) {
        if constexpr (!is_indexed<decltype(impl)>) removed += impl.remove_all();
      });
    }
    return removed;
  }

  /// Publishes tier t's writing entry `e`, pinned as often as the chunk is in the other indexed
  /// tiers holding it. A pin covers a chunk in every tier, including those it reaches after the
  /// pin (a promotion, a write-through), so every ready copy of a chunk has the same pin count
  /// and an unpin undoes exactly one pin wherever the chunk is. Under the lock.
  void publish_locked(std::size_t t, index_entry& e) noexcept {
    index_[t]->publish(e);
    for (std::size_t u = 0; u < tier_count; ++u) {
      if (u == t || index_[u] == nullptr) continue;
      if (const index_entry* o = index_[u]->find_ready(e.key)) {
        e.pins = o->pins;  // the writer's reference keeps `e` off the eviction list
        return;
      }
    }
  }

  /// True when some indexed tier holds chunk `k` ready. Under the lock.
  [[nodiscard]] bool held_locked(const chunk_key& k) noexcept {
    for (index_type* ix : index_) {
      if (ix != nullptr && ix->find_ready(k) != nullptr) return true;
    }
    return false;
  }

  /// Drops an operation's reference to the chunk `r` names (none for a remote or dropped one).
  void unref_locked(const chunk_ref& r) noexcept {
    if (r.tier == dropped_tier || index_[r.tier] == nullptr) return;
    index_type& ix = *index_[r.tier];
    ix.unref(ix.at(r.slot));
  }

 private:
  template <std::size_t... I>
  void make_lower(const configs& c, const tier::context& ctx, std::index_sequence<I...>) {
    ((std::get<I>(lower_) =
          std::make_unique<typename Lower::template impl<Eviction>>(std::get<I + 1>(c), ctx),
      admit_[I + 1] = admit_after_of(std::get<I + 1>(c)),
      writers_[I + 1] = writers_of(std::get<I + 1>(c)),
      lower_mask_ |= static_cast<std::uint8_t>(1u << (I + 1))),
     ...);
    (set_index<I>(), ...);
  }
  template <std::size_t I>
  void set_index() noexcept {
    if constexpr (is_indexed<decltype(*std::get<I>(lower_))>) {
      index_[I + 1] = &std::get<I>(lower_)->index();
      durable_[I + 1] = requires(std::span<const std::uint32_t> s) {
        std::get<I>(lower_)->invalidate(s);
      };
    }
  }
  template <class F, std::size_t... I>
  void with_lower_impl(std::size_t j, F& f, std::index_sequence<I...>) {
    ((j == I ? (f(*std::get<I>(lower_)), 0) : 0), ...);
  }

  // Threads writing into a lower tier: its config's `writers`, else 1.
  template <class Config>
  static std::size_t writers_of(const Config& c) {
    if constexpr (requires { c.writers; }) {
      if (c.writers == 0 || c.writers > 64) {
        throw invalid_argument("kvtier: writers " + std::to_string(c.writers) +
                               " is out of range 1..64");
      }
      return c.writers;
    } else {
      return 1;
    }
  }
  template <class Config>
  static std::uint32_t admit_after_of(const Config& c) {
    if constexpr (requires { c.admit_after_hits; }) {
      if (c.admit_after_hits > 255) {
        throw invalid_argument("kvtier: admit_after_hits " + std::to_string(c.admit_after_hits) +
                               " is above 255");
      }
      return static_cast<std::uint32_t>(c.admit_after_hits);
    } else {
      return 0;
    }
  }

  std::unique_ptr<first_impl> first_;
  std::tuple<std::unique_ptr<typename Lower::template impl<Eviction>>...> lower_;
  std::array<index_type*, tier_count> index_{};  // nullptr for a remote tier
  std::array<bool, tier_count> durable_{};
  std::array<std::uint32_t, tier_count> admit_{};
  std::array<std::size_t, tier_count> writers_{};
  std::uint8_t lower_mask_ = 0;
};

}  // namespace kvtier::detail
