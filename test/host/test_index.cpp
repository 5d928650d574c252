// The tier index and slab: O(1) allocate/free, eviction order, pins, references, zombies.
#include "support.hpp"

#include <kvtier/detail/chunk_index.hpp>

using index_t = kvtier::detail::chunk_index<kvtier::eviction::lru>;
using kvtier::detail::entry_state;

namespace {
kvtier::chunk_key key(std::uint64_t i) { return {i, ~i}; }
// Inserts and publishes `k`, leaving it unreferenced.
kvtier::detail::index_entry& put(index_t& ix, std::uint64_t k, std::uint64_t& ev) {
  auto* e = ix.allocate(ev);
  REQUIRE(e != nullptr);
  ix.insert_writing(*e, key(k), 16);
  ix.publish(*e);
  ix.unref(*e);
  return *e;
}
}  // namespace

TEST_CASE("metadata per cached chunk is at most 64 bytes, hash buckets included") {
  CHECK(sizeof(kvtier::detail::index_entry) <= 64);
  for (std::size_t cap : {1u, 7u, 8u, 9u, 100u, 513u, 1000u, 4096u, 4097u, 100000u}) {
    CAPTURE(cap);
    index_t ix(cap);
    // Tiny indexes keep a floor of 8 buckets; past that, <= 64 bytes per chunk in all.
    if (cap >= 8) CHECK(ix.metadata_bytes() <= 64 * cap);
  }
}

TEST_CASE("allocate takes free entries, then evicts least recently used") {
  index_t ix(3);
  std::uint64_t ev = 0;
  put(ix, 1, ev), put(ix, 2, ev), put(ix, 3, ev);
  CHECK(ix.free_count() == 0);
  CHECK(ev == 0);
  // Use 1 (a lease: ref then unref) so 2 becomes the oldest.
  auto* e1 = ix.find_ready(key(1));
  ix.ref(*e1);
  ix.unref(*e1);
  put(ix, 4, ev);
  CHECK(ev == 1);
  CHECK(ix.find(key(2)) == nullptr);
  CHECK(ix.find(key(1)) != nullptr);
  CHECK(ix.size() == 3);
}

TEST_CASE("referenced, pinned and writing entries are never evicted") {
  index_t ix(3);
  std::uint64_t ev = 0;
  auto& a = put(ix, 1, ev);
  auto& b = put(ix, 2, ev);
  ix.ref(a);
  ix.pin(b);
  auto* w = ix.allocate(ev);
  ix.insert_writing(*w, key(3), 16);  // writing: not published
  CHECK(ix.allocate(ev) == nullptr);  // nothing evictable
  CHECK(ev == 0);
  CHECK(ix.find_ready(key(3)) == nullptr);  // invisible while writing
  ix.unpin(b);
  auto* got = ix.allocate(ev);
  CHECK(got == &b);  // b was the only evictable one
  CHECK(ix.find(key(2)) == nullptr);
  CHECK(ix.find(key(1)) == &a);
}

TEST_CASE("a removed entry under reference is freed by its last unref") {
  index_t ix(2);
  std::uint64_t ev = 0;
  auto& a = put(ix, 1, ev);
  ix.ref(a);
  CHECK(ix.remove(a));
  CHECK(a.state == entry_state::zombie);
  CHECK(ix.find(key(1)) == nullptr);
  CHECK(ix.free_count() == 1);  // a is not free yet
  ix.unref(a);
  CHECK(a.state == entry_state::free);
  CHECK(ix.free_count() == 2);
}

TEST_CASE("remove refuses pinned entries; discard does not") {
  index_t ix(2);
  std::uint64_t ev = 0;
  auto& a = put(ix, 1, ev);
  ix.pin(a);
  CHECK_FALSE(ix.remove(a));
  CHECK(ix.find_ready(key(1)) == &a);
  ix.discard(a);
  CHECK(ix.find(key(1)) == nullptr);
  CHECK(ix.free_count() == 2);
}

TEST_CASE("aborted writes free their entry") {
  index_t ix(1);
  std::uint64_t ev = 0;
  auto* e = ix.allocate(ev);
  ix.insert_writing(*e, key(5), 16);
  ix.abort(*e);
  ix.unref(*e);
  CHECK(ix.find(key(5)) == nullptr);
  CHECK(ix.free_count() == 1);
}

TEST_CASE("claim rebuilds an entry at a chosen slot") {
  index_t ix(4);
  ix.claim(2, key(9), 7);
  auto* e = ix.find_ready(key(9));
  REQUIRE(e != nullptr);
  CHECK(ix.slot(*e) == 2);
  CHECK(e->tokens == 7);
  CHECK(ix.free_count() == 3);
  std::uint64_t ev = 0;
  for (int i = 0; i < 3; ++i) CHECK(ix.allocate(ev) != nullptr);
  CHECK(ix.allocate(ev) == e);  // the claimed entry is evictable like any other
  CHECK(ev == 1);
}

TEST_CASE("index capacity is validated") { CHECK_THROWS_AS(index_t(0), kvtier::invalid_argument); }

TEST_CASE("slab slots are aligned, disjoint and sized up to the alignment") {
  kvtier::memory::slab s(5, 1000, 4096, false);
  CHECK(s.slot_bytes() == 4096);
  for (std::uint32_t i = 0; i < 5; ++i) {
    CHECK(reinterpret_cast<std::uintptr_t>(s.data(i)) % 4096 == 0);
    if (i) CHECK(s.data(i) - s.data(i - 1) == 4096);
  }
  std::memset(s.data(0), 1, 5 * 4096);  // the whole region is addressable
  CHECK_THROWS_AS(kvtier::memory::slab(0, 1000, 4096, false), kvtier::invalid_argument);
}
