#pragma once
// The Python package's view of a kvtier cache: one abstract interface (cache_base, lease_base)
// over the concrete cache types, which are compile-time compositions of chunk size, layout and
// tier chain. The package instantiates a fixed menu of them (settings.hpp lists it) and picks
// one at run time from the configuration.

#include "settings.hpp"

#include <kvtier/kvtier.hpp>

#include <memory>
#include <optional>
#include <utility>
#include <span>
#include <string>
#include <vector>

namespace kvtier_py {

using kvtier::block_table;
using kvtier::engine_kv;
using kvtier::token_id;
using tokens_view = std::span<const token_id>;

/// A cache's counters, flattened (the per-tier array's length is the chain's).
struct stats_out {
  kvtier::cache_counters cache;
  std::vector<kvtier::tier_stats> tiers;
};

class lease_base {
 public:
  virtual ~lease_base() = default;
  [[nodiscard]] virtual std::size_t tokens() const noexcept = 0;
  [[nodiscard]] virtual std::size_t first_token() const noexcept = 0;
  [[nodiscard]] virtual std::size_t end_token() const noexcept = 0;
  [[nodiscard]] virtual std::size_t chunks() const noexcept = 0;
  [[nodiscard]] virtual std::size_t hits_in(std::size_t tier) const noexcept = 0;
  [[nodiscard]] virtual bool live() const noexcept = 0;
  virtual void release() noexcept = 0;
};

/// The engine's KV tensors and block table, owned for a layer-wise pipeline's life (kvtier's
/// pipelines keep pointers into them until they finish).
struct kv_owned {
  std::vector<void*> ptrs;
  std::vector<std::int64_t> shape, strides;
  std::vector<std::int32_t> table;
  [[nodiscard]] engine_kv view() const { return {ptrs, shape, strides}; }
};

/// A layer-wise store or retrieve (kvtier's host pipelines): layer(l) for l = 0, 1, ... in
/// order, then finish().
class pipeline_base {
 public:
  virtual ~pipeline_base() = default;
  [[nodiscard]] virtual std::size_t tokens() const noexcept = 0;
  virtual void layer(std::size_t l) = 0;
  virtual std::size_t finish() = 0;
};

template <class P, bool Store>
class pipeline_box final : public pipeline_base {
 public:
  template <class Begin>
  pipeline_box(kv_owned k, Begin&& begin) : k_(std::move(k)), p_(begin(k_.view(), k_.table)) {}
  std::size_t tokens() const noexcept override { return p_.tokens(); }
  void layer(std::size_t l) override {
    if constexpr (Store) {
      p_.store_layer(l);
    } else {
      p_.retrieve_layer(l);
    }
  }
  std::size_t finish() override { return p_.finish(); }

 private:
  kv_owned k_;  // before p_: it outlives the pipeline
  P p_;
};

class cache_base {
 public:
  virtual ~cache_base() = default;
  virtual std::size_t store(tokens_view t, const engine_kv& kv, block_table bt,
                            std::size_t first_token) = 0;
  virtual std::unique_ptr<lease_base> lookup(tokens_view t, std::size_t first_chunk) = 0;
  virtual std::size_t retrieve(lease_base& l, const engine_kv& kv, block_table bt,
                               std::size_t end_token) = 0;
  virtual std::unique_ptr<pipeline_base> begin_store(tokens_view t, kv_owned k,
                                                     std::size_t first_token) = 0;
  virtual std::unique_ptr<pipeline_base> begin_retrieve(lease_base& l, kv_owned k,
                                                        std::size_t end_token) = 0;
  virtual std::size_t prefetch(tokens_view t) = 0;
  virtual std::size_t clear(tokens_view t) = 0;
  virtual std::size_t clear_all() = 0;
  virtual void flush() = 0;
  [[nodiscard]] virtual stats_out stats() const = 0;
  [[nodiscard]] virtual std::size_t chunk_tokens() const noexcept = 0;
  [[nodiscard]] virtual std::size_t tier_count() const noexcept = 0;
  [[nodiscard]] virtual std::vector<std::string> tier_names() const = 0;
  [[nodiscard]] virtual std::uint64_t format_fingerprint() const noexcept = 0;
};

/// A process that holds no KV (vLLM's scheduler): how much of a prompt the node's shared
/// segment holds, without touching bytes.
class lookup_base {
 public:
  virtual ~lookup_base() = default;
  virtual std::size_t cached_tokens(tokens_view t) = 0;
};

template <class C>
class lease_box final : public lease_base {
 public:
  explicit lease_box(typename C::lease l) : l_(std::move(l)) {}
  std::size_t tokens() const noexcept override { return l_.tokens(); }
  std::size_t first_token() const noexcept override { return l_.first_token(); }
  std::size_t end_token() const noexcept override { return l_.end_token(); }
  std::size_t chunks() const noexcept override { return l_.chunks(); }
  std::size_t hits_in(std::size_t t) const noexcept override { return l_.hits_in(t); }
  bool live() const noexcept override { return l_.live(); }
  void release() noexcept override { l_.reset(); }
  typename C::lease& get() noexcept { return l_; }

 private:
  typename C::lease l_;
};

template <class C>
class cache_box final : public cache_base {
 public:
  cache_box(const settings& s, const typename C::tier_configs& tiers)
      : c_(s.model, s.salt, tiers, s.cfg) {}

  std::size_t store(tokens_view t, const engine_kv& kv, block_table bt,
                    std::size_t first) override {
    return c_.store(t, kv, bt, first);
  }
  std::unique_ptr<lease_base> lookup(tokens_view t, std::size_t first_chunk) override {
    return std::make_unique<lease_box<C>>(c_.lookup(t, first_chunk));
  }
  std::size_t retrieve(lease_base& l, const engine_kv& kv, block_table bt,
                       std::size_t end) override {
    return c_.retrieve(mine(l), kv, bt, end);
  }
  std::unique_ptr<pipeline_base> begin_store(tokens_view t, kv_owned k,
                                             std::size_t first) override {
    return std::make_unique<pipeline_box<typename C::store_pipeline, true>>(
        std::move(k),
        [&](const engine_kv& kv, block_table bt) { return c_.begin_store(t, kv, bt, first); });
  }
  std::unique_ptr<pipeline_base> begin_retrieve(lease_base& l, kv_owned k,
                                                std::size_t end) override {
    auto& lease = mine(l);
    return std::make_unique<pipeline_box<typename C::retrieve_pipeline, false>>(
        std::move(k),
        [&](const engine_kv& kv, block_table bt) { return c_.begin_retrieve(lease, kv, bt, end); });
  }
  std::size_t prefetch(tokens_view t) override { return c_.prefetch(t); }
  std::size_t clear(tokens_view t) override { return c_.clear(t); }
  std::size_t clear_all() override { return c_.clear(); }
  void flush() override { c_.flush(); }
  stats_out stats() const override {
    const auto s = c_.stats();
    stats_out o{s, {}};
    o.tiers.assign(s.tiers.begin(), s.tiers.end());
    return o;
  }
  std::size_t chunk_tokens() const noexcept override { return C::chunk_tokens; }
  std::size_t tier_count() const noexcept override { return C::tier_count; }
  std::vector<std::string> tier_names() const override {
    std::vector<std::string> n;
    for (const auto& t : c_.stats().tiers) n.emplace_back(t.name);
    return n;
  }
  std::uint64_t format_fingerprint() const noexcept override { return c_.format().fingerprint(); }

 private:
  static typename C::lease& mine(lease_base& l) {
    auto* m = dynamic_cast<lease_box<C>*>(&l);
    if (m == nullptr) throw kvtier::invalid_argument("kvtier: the lease comes from another cache");
    return m->get();
  }

  C c_;
};

template <class C>
class lookup_box final : public lookup_base {
 public:
  explicit lookup_box(const settings& s) : v_(s.model, s.salt, *s.shared, s.cfg) {}
  std::size_t cached_tokens(tokens_view t) override { return v_.cached_tokens(t); }

 private:
  kvtier::shared_lookup<C> v_;
};

/// The tier config each tier type of a chain takes from the settings.
template <class Tier>
typename Tier::config config_for(const settings& s) {
  if constexpr (std::is_same_v<Tier, kvtier::tier::host>) {
    return s.host;
  } else if constexpr (std::is_same_v<Tier, kvtier::tier::shared_host>) {
    return *s.shared;
  } else {
    static_assert(std::is_same_v<Tier, kvtier::tier::local_disk>);
    return *s.disk;
  }
}

/// Calls fn.template operator()<L>() with the layout type named by `name`, one of layout_names.
template <class Fn>
auto with_layout(const std::string& name, Fn&& fn) {
  if (name == layout_names[0]) return fn.template operator()<kvtier::layout::vllm_cpu>();
  if (name == layout_names[1]) return fn.template operator()<kvtier::layout::vllm_flash_nhd>();
  throw kvtier::invalid_argument("kvtier: config layout '" + name +
                                 "' is not built into the Python package (" + listed(layout_names) +
                                 ")");
}

/// Calls fn.template operator()<N>() with chunk size `n`, one of chunk_sizes.
template <class Fn, std::size_t... I>
auto with_chunk_at(std::size_t n, Fn& fn, std::index_sequence<I...>) {
  std::optional<decltype(fn.template operator()<chunk_sizes[0]>())> r;
  ((n == chunk_sizes[I] && (r = fn.template operator()<chunk_sizes[I]>(), true)) || ...);
  if (!r) {
    throw kvtier::invalid_argument("kvtier: config chunk_tokens " + std::to_string(n) +
                                   " is not built into the Python package (" + listed(chunk_sizes) +
                                   ")");
  }
  return std::move(*r);
}
template <class Fn>
auto with_chunk(std::size_t n, Fn&& fn) {
  return with_chunk_at(n, fn, std::make_index_sequence<chunk_sizes.size()>{});
}

template <class... Tiers>
std::shared_ptr<cache_base> make_cache(const settings& s) {
  return with_chunk(s.chunk_tokens, [&]<std::size_t N>() {
    return with_layout(s.layout, [&]<class L>() -> std::shared_ptr<cache_base> {
      using C = kvtier::cache<kvtier::opt::chunk_tokens<N>, kvtier::opt::layout<L>,
                              kvtier::opt::tiers<Tiers...>>;
      return std::make_shared<cache_box<C>>(s, typename C::tier_configs{config_for<Tiers>(s)...});
    });
  });
}

// One per tier chain, each in its own translation unit (chain_*.cpp).
std::shared_ptr<cache_base> make_host(const settings& s);
std::shared_ptr<cache_base> make_host_disk(const settings& s);
std::shared_ptr<cache_base> make_host_shared(const settings& s);
std::shared_ptr<cache_base> make_host_shared_disk(const settings& s);
std::shared_ptr<lookup_base> make_shared_lookup(const settings& s);

}  // namespace kvtier_py
