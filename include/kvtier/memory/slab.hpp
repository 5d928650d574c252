#pragma once
// Fixed-size chunk slots over one region.

#include "kvtier/detail/checked.hpp"
#include "kvtier/memory/region.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvtier::memory {

/// A region cut into `slots` slots of `slot_bytes` each (slot_bytes rounded up to the
/// alignment). Every chunk of a cache has one size, so a slot never fragments; which slots are
/// free is kept by the tier's index (entry i owns slot i), making allocate and free O(1).
class slab {
 public:
  slab() = default;
  slab(std::size_t slots, std::size_t slot_bytes, std::size_t alignment, bool lock,
       std::pmr::memory_resource* upstream = nullptr, bool prefault = false)
      : slot_bytes_(detail::checked_round_up(slot_bytes, alignment, "slab slot bytes")),
        slots_(slots),
        region_(checked_bytes(slots, slot_bytes_), alignment, lock, upstream, prefault) {}

  [[nodiscard]] std::byte* data(std::uint32_t slot) const noexcept {
    return region_.data() + static_cast<std::size_t>(slot) * slot_bytes_;
  }
  [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_bytes_; }
  [[nodiscard]] std::size_t slots() const noexcept { return slots_; }
  [[nodiscard]] const region& memory() const noexcept { return region_; }

  [[nodiscard]] static constexpr std::size_t round_up(std::size_t v, std::size_t a) noexcept {
    return (v + a - 1) / a * a;
  }

  /// Slots of `chunk_bytes` (rounded up to `alignment`) that `capacity_bytes` holds; throws
  /// invalid_argument naming `tier` when it holds none (or the rounding overflows).
  [[nodiscard]] static std::size_t slots_in(std::size_t capacity_bytes, std::size_t chunk_bytes,
                                            std::size_t alignment, const char* tier) {
    const std::size_t slot = detail::checked_round_up(chunk_bytes, alignment, "chunk slot bytes");
    if (capacity_bytes < slot) {
      throw invalid_argument(std::string("kvtier: ") + tier + " capacity_bytes " +
                             std::to_string(capacity_bytes) + " holds no chunk of " +
                             std::to_string(slot) + " bytes");
    }
    return capacity_bytes / slot;
  }

 private:
  static std::size_t checked_bytes(std::size_t slots, std::size_t slot_bytes) {
    if (slots == 0) throw invalid_argument("kvtier: slab of 0 slots");
    if (slot_bytes != 0 && slots > SIZE_MAX / slot_bytes) {
      throw invalid_argument("kvtier: slab of " + std::to_string(slots) + " slots of " +
                             std::to_string(slot_bytes) + " bytes overflows");
    }
    return slots * slot_bytes;
  }

  std::size_t slot_bytes_ = 0;
  std::size_t slots_ = 0;
  region region_;
};

}  // namespace kvtier::memory
