#pragma once
// The host memory tier: the first tier of a chain, a slab of chunk slots in host memory.

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/error.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/memory/slab.hpp"
#include "kvtier/tier/context.hpp"

#include <cstddef>
#include <memory_resource>
#include <string>

namespace kvtier::tier {

/// Host memory tier. Chunk bytes live in one slab reserved at construction (or allocated from
/// the engine's std::pmr::memory_resource); readers and lower-tier writers use the slot in
/// place (zero-copy), protected by the entry's reference count.
struct host {
  static constexpr const char* name = "host";
  static constexpr bool is_memory = true;

  struct config {
    std::size_t capacity_bytes = std::size_t{1} << 30;  ///< slab size; holds floor(cap / chunk)
    bool lock_memory = false;                           ///< mlock the slab
    std::pmr::memory_resource* memory = nullptr;        ///< engine-provided memory, or nullptr
    bool prefault = true;  ///< touch every page at construction, not on the first stores
  };

  template <class Eviction>
  class impl {
   public:
    static constexpr std::size_t alignment = 4096;  // page-aligned: ready for O_DIRECT and DMA

    impl(const config& c, const context& ctx)
        : index_(slots_for(c, ctx)),
          slab_(index_.capacity(), ctx.format.chunk_bytes(), alignment, c.lock_memory, c.memory,
                c.prefault) {}

    [[nodiscard]] detail::chunk_index<Eviction>& index() noexcept { return index_; }
    [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept { return slab_.data(slot); }
    [[nodiscard]] const memory::slab& slab() const noexcept { return slab_; }

   private:
    static std::size_t slots_for(const config& c, const context& ctx) {
      return memory::slab::slots_in(c.capacity_bytes, ctx.format.chunk_bytes(), alignment, "host");
    }

    detail::chunk_index<Eviction> index_;
    memory::slab slab_;
  };
};

// The cache checks each tier where it is instantiated; these say so where the tier is defined.
static_assert(memory_tier<host::impl<eviction::lru>>);

}  // namespace kvtier::tier
