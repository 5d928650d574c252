#pragma once
// One concept per policy kind. Each names exactly the members kvtier uses.

#include "kvtier/detail/index_entry.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/dims.hpp"
#include "kvtier/model.hpp"
#include "kvtier/tier/context.hpp"

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

namespace kvtier {

/// An engine KV layout, described by the role of each dim of its tensors and which tensors the
/// engine passes (see layout/dims.hpp); kvtier derives shapes, strides and copies from that.
template <class L>
concept layout_policy = requires {
  { L::name } -> std::convertible_to<const char*>;
  { L::scope } -> std::convertible_to<layout::tensors>;
  { L::dims[0] } -> std::convertible_to<layout::dim>;
  { L::dims.size() } -> std::convertible_to<std::size_t>;
};

/// An eviction policy orders the evictable entries of a tier and picks the victim.
template <class P>
concept eviction_policy = requires(detail::eviction_list& list, detail::index_entry& e) {
  { P::name } -> std::convertible_to<const char*>;
  P::on_evictable(list, e);
  { P::victim(list) } -> std::same_as<detail::index_entry*>;
};

/// A chunk hasher: a seed key from the salt's bytes, and the next key from the previous key and
/// a chunk's tokens. Must be deterministic across processes and machines.
template <class H>
concept key_hasher = requires(std::span<const std::byte> bytes, std::span<const token_id> tokens,
                              const chunk_key& prev) {
  { H::name } -> std::convertible_to<const char*>;
  { H::seed(bytes) } -> std::same_as<chunk_key>;
  { H::next(prev, tokens) } -> std::same_as<chunk_key>;
};

/// A storage tier tag: its config, whether it is a memory tier (usable as the first tier) and
/// its implementation template over the eviction policy.
template <class T>
concept tier_policy = requires {
  { T::name } -> std::convertible_to<const char*>;
  { T::is_memory } -> std::convertible_to<bool>;
  typename T::config;
  typename T::template impl<struct tier_policy_probe_eviction>;
};

}  // namespace kvtier
