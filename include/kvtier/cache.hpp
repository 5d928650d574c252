#pragma once
// kvtier::cache<Options...>: the composed KV cache an engine instantiates.

#include "kvtier/cache/cache_impl.hpp"
#include "kvtier/options.hpp"

namespace kvtier {

/// The KV cache, composed from kvtier::opt tags in any order (each has a default):
///
///   opt::chunk_tokens<N>         tokens per chunk (256)
///   opt::block_tokens<BS>        the engine block size, when known at compile time (0: at run
///   time) opt::layout<L>               the engine's KV layout (layout::vllm_flash_nhd)
///   opt::eviction<E>             eviction policy of every tier (eviction::lru)
///   opt::tiers<First, Lower...>  tier chain, memory tier first (tiers<tier::host>)
///   opt::hasher<H>               chunk-key hasher (key::xxh3_hasher)
///
/// A tag given twice is a compile error. The resolved policies are nested names:
/// layout_type, eviction_type, hasher_type, tier_list, chunk_tokens, tier_count, and
/// tier_configs (a std::tuple of each tier's config, in chain order).
///
/// Construction: `cache(model_shape, salt, tier_configs = {}, cache_config = {})` validates
/// the model (every field > 0, chunk_tokens a multiple of block_size), reserves every tier's
/// memory, file and index, and starts one write-through thread when there are lower tiers.
/// Afterwards no call allocates on the heap (except the text of a thrown error).
///
/// The engine's calls (all thread-safe; the lock is never held across a copy or I/O):
///
///  - `lease lookup(tokens)`: the longest cached prefix, walking tiers in order per chunk and
///    stopping at the first chunk no tier holds; the lease keeps those chunks from eviction.
///    O(tokens) hashing outside the lock + O(chunks) hash-table probes under it.
///  - `size_t retrieve(lease&, engine_kv, block_table)`: loads the lease's tokens into the
///    engine's blocks and consumes the lease. A chunk held only by a lower tier is first copied
///    into the first tier (promotion) and verified, or, from a tier in this process's memory
///    (tier::shared_host), scattered from there and verified as it is copied. Returns the tokens
///    actually loaded, always a prefix of lease.tokens(); a failed or corrupt read ends it there
///    (the blocks of tokens past it hold no promise: the engine computes them).
///  - `size_t store(tokens, engine_kv, block_table)`: copies the chunks of `tokens` from the
///    engine's blocks into the first tier, evicting as needed, and queues write-through to lower
///    tiers (a full queue drops, and counts, rather than blocking). A chunk is visible to lookup
///    only once all its bytes are in. Returns the tokens stored or already held, a prefix: when
///    nothing more is evictable it stores what fits.
///  - `release(lease&)`: gives the lease's chunks back without loading them.
///  - `pin(tokens)` / `unpin(tokens)`: a pinned chunk is never evicted from any tier that holds it,
///    including tiers it reaches after the pin (promotion, write-through); each unpin undoes one
///    pin. pin returns the tokens of the pinned prefix; unpin the tokens unpinned.
///  - `clear(tokens)` / `clear()`: removes unpinned chunks from every tier (bytes under a lease
///    stay valid until it ends). Return the tokens / chunk copies removed.
///  - `flush()`: waits until queued write-through has finished.
///  - `stats()`: a snapshot of the counters (per tier hits, misses, bytes, evictions, errors).
///  - `begin_store(tokens, kv, table)` / `begin_retrieve(lease&, kv, table)`: layer-wise
///    pipelines on host tiers (`store_layer(l)` / `retrieve_layer(l)` in order, `finish()`). A
///    retrieve pipeline proves every chunk it will load when it begins; a store pipeline
///    publishes only once every layer is stored. See host_pipeline.hpp.
///
/// With a GPU first tier (tier::device, tier::pinned_host from <kvtier/cuda.cuh>; then
/// `async_copies` is true) the engine's tensors are GPU memory and copies are asynchronous:
/// `store` / `retrieve` also take a gpu::stream_order, return once the batched copy is enqueued,
/// and stored chunks are published when it has completed; `begin_store` / `begin_retrieve` give
/// layer-wise pipelines (`store_layer(l)`, `retrieve_layer(l)`); `synchronize()` waits for every
/// copy. See docs/gpu.md.
///
/// Bad input (wrong tensor count or extent, block id out of range, a block table shorter than
/// the tokens, too many tokens, a lease of another cache) throws kvtier::invalid_argument naming
/// the value, before anything is changed.
namespace detail {
/// The implementation type an option pack resolves to.
template <class R>
using cache_impl_of = cache_impl<R::chunk_tokens, R::block_tokens, typename R::layout,
                                 typename R::eviction, typename R::hasher, typename R::tiers>;
}  // namespace detail

template <option... Options>
class cache : public detail::cache_impl_of<detail::resolve_options<Options...>> {
  using base = detail::cache_impl_of<detail::resolve_options<Options...>>;

 public:
  using base::base;
};

}  // namespace kvtier
