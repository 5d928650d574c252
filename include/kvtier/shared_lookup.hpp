#pragma once
// kvtier::shared_lookup<Cache>: the view of a shared host segment for a process that holds no KV
// tensors (an engine's scheduler). It names chunks exactly as a `Cache` of the same model and
// salt does, answers how many leading tokens of a prompt the segment holds, and takes leases
// that another process (the worker that will load them) adopts. It never touches KV bytes.

#include "kvtier/cache/chunker.hpp"
#include "kvtier/cache/config.hpp"
#include "kvtier/layout/chunk_format.hpp"
#include "kvtier/layout/dims.hpp"
#include "kvtier/model.hpp"
#include "kvtier/tier/shared_host.hpp"

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <span>
#include <vector>

namespace kvtier {

template <class Cache>
class shared_lookup {
  using chunker_type = detail::chunker<Cache::chunk_tokens, typename Cache::hasher_type>;
  static constexpr std::size_t kv_planes = layout::traits<typename Cache::layout_type>::kv_planes;

 public:
  using ticket = tier::shared_host::ticket;
  using held = tier::shared_host::held;

  /// Attaches to (or, with config.create, creates) the segment a `Cache` made with `model`,
  /// `s`, a shared_host tier configured as `c` and `cc` would use.
  shared_lookup(const model_shape& model, const salt& s, const tier::shared_host::config& c,
                const cache_config& cc = {})
      : format_(layout::chunk_format::from(
            detail::checked_model<Cache::chunk_tokens, Cache::block_tokens, kv_planes>(model),
            Cache::chunk_tokens, kv_planes)),
        cfg_(detail::checked_config(cc)),
        chunker_(s, format_, cfg_.store_partial_tail),
        handle_(c, tier::context{format_, chunker_.salt_key(), model.block_size,
                                 detail::max_chunks(cfg_, Cache::chunk_tokens), cfg_.max_inflight}),
        keys_(detail::max_chunks(cfg_, Cache::chunk_tokens)) {}

  /// Leading tokens of `tokens` whose chunks the segment holds now (full chunks; the partial
  /// tail too when cache_config.store_partial_tail). Thread-safe; allocates nothing.
  std::size_t cached_tokens(std::span<const token_id> tokens) {
    detail::check_tokens("shared_lookup", tokens.size(), cfg_);
    std::lock_guard lk(mu_);
    const std::size_t n = chunker_.keys(tokens, keys_);
    const std::size_t found = handle_.probe({keys_.data(), n});
    return std::min(found * Cache::chunk_tokens, tokens.size());
  }

  /// Holds the leading chunks of `tokens` the segment has, for another process to adopt (pass
  /// ticket.value to it). ticket.chunks * chunk_tokens (at most tokens.size()) tokens are held.
  ticket lease(std::span<const token_id> tokens) {
    detail::check_tokens("shared_lookup", tokens.size(), cfg_);
    std::lock_guard lk(mu_);
    const std::size_t n = chunker_.keys(tokens, keys_);
    return handle_.lease({keys_.data(), n});
  }
  /// Takes over a ticket leased by another process; the chunks stay held while the result lives.
  held adopt(ticket t) { return handle_.adopt(t); }
  /// Gives back a ticket this process leased and no one adopted.
  bool release(ticket t) noexcept { return handle_.release(t); }

  [[nodiscard]] tier::shared_host::handle& handle() noexcept { return handle_; }
  [[nodiscard]] const chunk_key& salt_key() const noexcept { return chunker_.salt_key(); }

 private:
  layout::chunk_format format_;
  cache_config cfg_;
  chunker_type chunker_;
  tier::shared_host::handle handle_;
  std::mutex mu_;  // keys_
  std::vector<chunk_key> keys_;
};

}  // namespace kvtier
