#pragma once
// The calls of kvtier::cache that name chunks without moving bytes to or from the engine:
// prefetch, pin and unpin, clear. Member definitions of cache_impl (cache_impl.hpp, which
// declares and documents them and includes this file at its end).

#include "kvtier/cache/cache_impl.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <tuple>

namespace kvtier::detail {

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
std::size_t cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher,
                       std::tuple<First, Lower...>>::prefetch(std::span<const token_id> tokens) {
  if constexpr (!has_lower) {
    check_tokens("prefetch", tokens.size(), cfg_);
    return 0;
  } else {
    std::unique_lock lk(st_.mu, std::defer_lock);
    const auto [op, n] = begin_call("prefetch", tokens, lk);
    if (op == no_op) return 0;
    const std::size_t started = prefetcher_.start_locked(
        ops_.keys(op), n, [&](std::size_t i) { return tokens_at(i, tokens.size()); });
    ops_.release(op);
    lk.unlock();
    if (started > 0) prefetcher_.notify();
    return started;
  }
}

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
auto cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher,
                std::tuple<First, Lower...>>::pin(std::span<const token_id> tokens) -> pin_handle {
  check_tokens("pin", tokens.size(), cfg_);
  pin_handle p;
  const std::size_t n = chunk_count(tokens.size());
  if (n == 0) return p;
  std::unique_lock lk(st_.mu);
  const std::uint32_t slot = pins_.acquire_locked();
  if (slot == no_op) {
    ++st_.stats.pins_refused;
    return p;
  }
  lk.unlock();
  keys(tokens, {pins_.keys(slot), n});  // n <= max_chunks (check_tokens): cannot throw
  lk.lock();
  async_.poll_locked();
  p.chunks_ = pins_.pin_locked(slot, n);
  if (p.chunks_ == 0) return p;
  p.cache_ = this;
  p.slot_ = slot;
  p.tokens_ = std::min(p.chunks_ * ChunkTokens, tokens.size());  // the tail chunk comes last
  return p;
}

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
std::size_t cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher,
                       std::tuple<First, Lower...>>::unpin(pin_handle& p) noexcept {
  if (p.cache_ != this) return 0;
  std::lock_guard lk(st_.mu);
  pins_.unpin_locked(p.slot_, p.chunks_);
  const std::size_t tokens = p.tokens_;
  p.clear();
  return tokens;
}

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
std::size_t cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher,
                       std::tuple<First, Lower...>>::clear(std::span<const token_id> tokens) {
  std::unique_lock lk(st_.mu, std::defer_lock);
  const auto [op, n] = begin_call("clear", tokens, lk);
  if (op == no_op) return 0;
  const chunk_key* ks = ops_.keys(op);
  std::size_t done = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bool any = false;
    for (std::size_t t = 0; t < tier_count; ++t) {
      index_type* ix = chain_.index(t);
      if (ix == nullptr) continue;
      if (index_entry* e = ix->find_ready(ks[i])) any = chain_.remove_locked(*ix, *e) || any;
    }
    if (any) done += tokens_at(i, tokens.size());
  }
  lk.unlock();
  policy_.notify();  // the writers invalidate cleared records on disk
  // Remote tiers are cleared by key; what only they held counts too (the tail chunk last).
  const std::size_t removed = chain_.remove_remote(std::span<const chunk_key>(ks, n));
  done = std::max(done, std::min(removed * ChunkTokens, tokens.size()));
  lk.lock();
  ops_.release(op);
  return done;
}

template <std::size_t ChunkTokens, std::size_t BlockTokens, class Layout, class Eviction,
          class Hasher, class First, class... Lower>
std::size_t cache_impl<ChunkTokens, BlockTokens, Layout, Eviction, Hasher,
                       std::tuple<First, Lower...>>::clear() {
  std::unique_lock lk(st_.mu);
  async_.poll_locked();
  std::size_t removed = 0;
  for (std::size_t t = 0; t < tier_count; ++t) {
    index_type* ix = chain_.index(t);
    if (ix == nullptr) continue;
    for (std::uint32_t s = 0; s < ix->capacity(); ++s) {
      index_entry& e = ix->at(s);
      if (e.state == entry_state::ready && chain_.remove_locked(*ix, e)) ++removed;
    }
  }
  lk.unlock();
  policy_.notify();  // the writers invalidate cleared records on disk
  if constexpr (remote_count > 0) removed += chain_.remove_all_remote();
  return removed;
}

}  // namespace kvtier::detail
