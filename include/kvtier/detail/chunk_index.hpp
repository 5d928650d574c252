#pragma once
// A tier's index: a preallocated entry pool in an intrusive hash set, eviction list and free
// list. Not thread-safe: the cache calls it under its lock. Allocates only in the constructor.

#include "kvtier/detail/checked.hpp"
#include "kvtier/detail/index_entry.hpp"
#include "kvtier/error.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace kvtier::detail {

template <class Eviction>
class chunk_index {
  using set_type =
      bi::unordered_set<index_entry, bi::key_of_value<entry_key_of>, bi::hash<chunk_key_hash>,
                        bi::constant_time_size<true>, bi::power_2_buckets<true>>;

 public:
  using bucket_type = typename set_type::bucket_type;

  explicit chunk_index(std::size_t capacity)
      : capacity_(checked_capacity(capacity)),
        entries_(reserving("a tier index", capacity * sizeof(index_entry),
                           [&] { return std::make_unique<index_entry[]>(capacity); })),
        // One bucket per 1-2 entries: chains stay short and index metadata stays within 64 bytes
        // per chunk (56-byte entry + at most 8 bytes of buckets).
        bucket_count_(std::bit_floor(capacity < 8 ? std::size_t{8} : capacity)),
        buckets_(reserving("a tier index", bucket_count_ * sizeof(bucket_type),
                           [&] { return std::make_unique<bucket_type[]>(bucket_count_); })),
        set_(typename set_type::bucket_traits(buckets_.get(), bucket_count_)) {
    for (std::size_t i = 0; i < capacity; ++i) free_.push_back(entries_[i]);
  }
  ~chunk_index() {
    set_.clear();
    free_.clear();
    evictable_.clear();
    invalidate_.clear();
    retired_.clear();
  }
  chunk_index(const chunk_index&) = delete;
  chunk_index& operator=(const chunk_index&) = delete;

  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  /// Entries in the hash set (writing or ready).
  [[nodiscard]] std::size_t size() const noexcept { return set_.size(); }
  [[nodiscard]] std::size_t free_count() const noexcept { return free_.size(); }
  /// Bytes of index metadata in all (entries and hash buckets), fixed at construction.
  [[nodiscard]] std::size_t metadata_bytes() const noexcept {
    return capacity_ * sizeof(index_entry) + bucket_count_ * sizeof(bucket_type);
  }
  [[nodiscard]] std::uint32_t slot(const index_entry& e) const noexcept {
    return static_cast<std::uint32_t>(&e - entries_.get());
  }
  [[nodiscard]] index_entry& at(std::uint32_t slot) noexcept { return entries_[slot]; }

  /// The entry for `k` in the hash set (writing or ready), or nullptr.
  [[nodiscard]] index_entry* find(const chunk_key& k) noexcept {
    auto it = set_.find(k);
    return it == set_.end() ? nullptr : &*it;
  }
  /// The ready entry for `k`, or nullptr.
  [[nodiscard]] index_entry* find_ready(const chunk_key& k) noexcept {
    index_entry* e = find(k);
    return e && e->state == entry_state::ready ? e : nullptr;
  }

  /// Takes a free entry, evicting the policy's victim when none is free. Returns nullptr when
  /// nothing is free or evictable. `evicted` is incremented for each eviction. `keep(victim)`
  /// may keep a victim instead (write-back: its bytes are still owed to a lower tier); it must
  /// then take a reference to it, which takes it off the eviction list.
  template <class Keep>
  [[nodiscard]] index_entry* allocate(std::uint64_t& evicted, Keep&& keep) noexcept {
    if (!free_.empty()) {
      index_entry& e = free_.front();
      free_.pop_front();
      return &e;
    }
    for (;;) {
      index_entry* v = Eviction::victim(evictable_);
      if (v == nullptr) return nullptr;
      if (keep(*v)) continue;
      evictable_.erase(evictable_.iterator_to(*v));
      set_.erase(set_.iterator_to(*v));
      v->state = entry_state::free;
      ++evicted;
      return v;
    }
  }
  [[nodiscard]] index_entry* allocate(std::uint64_t& evicted) noexcept {
    return allocate(evicted, [](index_entry&) { return false; });
  }
  /// Takes the free entry of `slot` as a ready, unreferenced entry of `k` (rebuilding an index
  /// from storage). The slot must be free and `k` absent.
  void claim(std::uint32_t slot, const chunk_key& k, std::uint32_t tokens) noexcept {
    index_entry& e = entries_[slot];
    free_.erase(free_.iterator_to(e));
    insert_writing(e, k, tokens);
    publish(e);
    unref(e);
  }

  /// Publishes an allocated entry as `writing` under `k`, referenced once by the writer.
  void insert_writing(index_entry& e, const chunk_key& k, std::uint32_t tokens) noexcept {
    e.key = k;
    e.tokens = tokens;
    e.refs = 1;
    e.pins = 0;
    e.hits = 0;
    e.owed = 0;
    e.evict_after_write = 0;
    e.state = entry_state::writing;
    set_.insert(e);
  }
  /// The writer's bytes are whole: the entry becomes visible. The writer's reference remains.
  void publish(index_entry& e) noexcept { e.state = entry_state::ready; }
  /// The writer failed: the entry leaves the hash set and is freed by the writer's unref.
  void abort(index_entry& e) noexcept { make_zombie(e); }

  void ref(index_entry& e) noexcept {
    if (e.evictable()) evictable_.erase(evictable_.iterator_to(e));
    ++e.refs;
  }
  void unref(index_entry& e) noexcept {
    --e.refs;
    settle(e);
  }
  /// Marks a use of an unreferenced entry (a store of bytes already held): moves it in the order.
  void touch(index_entry& e) noexcept {
    if (e.evictable()) {
      evictable_.erase(evictable_.iterator_to(e));
      Eviction::on_evictable(evictable_, e);
    }
  }
  void pin(index_entry& e) noexcept {
    if (e.evictable()) evictable_.erase(evictable_.iterator_to(e));
    ++e.pins;
  }
  /// Returns false when the entry was not pinned.
  bool unpin(index_entry& e) noexcept {
    if (e.pins == 0) return false;
    --e.pins;
    settle(e);
    return true;
  }
  /// Removes a ready, unpinned entry from lookup; its slot is freed once no reference remains.
  /// Returns false (and changes nothing) for a pinned or writing entry.
  bool remove(index_entry& e) noexcept {
    if (e.pins != 0 || e.state != entry_state::ready) return false;
    if (e.evictable()) evictable_.erase(evictable_.iterator_to(e));
    make_zombie(e);
    settle(e);
    return true;
  }
  /// Removes a ready, unpinned entry from lookup, as remove(), and queues its slot for its record
  /// in storage to be invalidated (a tier whose records outlive the process) once no reader
  /// references it (a lease's bytes stay readable until it ends): the slot is not reused before
  /// finish_invalidation(slot). Returns false (and changes nothing) for a pinned or writing entry.
  bool remove_durably(index_entry& e) noexcept {
    if (e.pins != 0 || e.state != entry_state::ready) return false;
    if (e.evictable()) evictable_.erase(evictable_.iterator_to(e));
    make_zombie(e);
    e.owed = 1;  // settle() queues it for invalidation instead of freeing it
    settle(e);
    return true;
  }
  /// A writing entry whose record was written but must not stay (cleared meanwhile): leaves
  /// lookup and queues its slot for invalidation; the writer's reference becomes the
  /// invalidation's.
  void abort_durably(index_entry& e) noexcept {
    make_zombie(e);
    invalidate_.push_back(e);
  }
  /// Whether slots wait for their records to be invalidated.
  [[nodiscard]] bool invalidations_pending() const noexcept { return !invalidate_.empty(); }
  /// Takes up to `max` slots queued for invalidation into `out`; returns how many.
  std::size_t take_invalidations(std::uint32_t* out, std::size_t max) noexcept {
    std::size_t n = 0;
    for (; n < max && !invalidate_.empty(); ++n) {
      index_entry& e = invalidate_.front();
      invalidate_.pop_front();
      out[n] = slot(e);
    }
    return n;
  }
  /// The record of a slot from take_invalidations is invalidated (or the attempt failed): the
  /// slot is freed once nothing else references it.
  void finish_invalidation(std::uint32_t s) noexcept { unref(entries_[s]); }

  /// The storage is full (a write failed with ENOSPC): the free entries are set aside, so that
  /// new chunks evict the policy's victims, whose slots the storage holds, rather than fail one
  /// by one on slots it has no room for. Entries freed later are used again.
  void retire_free() noexcept {
    while (!free_.empty()) {
      index_entry& e = free_.front();
      free_.pop_front();
      retired_.push_back(e);
    }
  }
  /// Entries set aside by retire_free().
  [[nodiscard]] std::size_t retired() const noexcept { return retired_.size(); }

  /// Removes a ready entry from lookup even if pinned (its bytes failed verification).
  void discard(index_entry& e) noexcept {
    if (e.state != entry_state::ready) return;
    if (e.evictable()) evictable_.erase(evictable_.iterator_to(e));
    e.pins = 0;
    make_zombie(e);
    settle(e);
  }

 private:
  // Checked before anything is reserved for it.
  static std::size_t checked_capacity(std::size_t capacity) {
    if (capacity == 0 || capacity > UINT32_MAX) {
      throw invalid_argument("kvtier: tier capacity of " + std::to_string(capacity) +
                             " chunks is out of range 1.." + std::to_string(UINT32_MAX));
    }
    return capacity;
  }
  void make_zombie(index_entry& e) noexcept {
    set_.erase(set_.iterator_to(e));
    e.state = entry_state::zombie;
    e.owed = 0;  // nothing is owed of a removed chunk; remove_durably then marks it
  }
  // Puts an entry whose refs or pins just dropped where it now belongs.
  void settle(index_entry& e) noexcept {
    if (e.refs != 0) return;
    if (e.state == entry_state::zombie && e.owed != 0) {
      e.owed = 0;
      ++e.refs;  // the invalidation's, dropped by finish_invalidation
      invalidate_.push_back(e);
    } else if (e.state == entry_state::zombie) {
      e.state = entry_state::free;
      free_.push_back(e);
    } else if (e.evictable()) {
      Eviction::on_evictable(evictable_, e);
    }
  }

  std::size_t capacity_;
  std::unique_ptr<index_entry[]> entries_;
  std::size_t bucket_count_;
  std::unique_ptr<bucket_type[]> buckets_;
  set_type set_;
  eviction_list evictable_;
  eviction_list free_;
  eviction_list invalidate_;  // zombies whose records in storage are still to be invalidated
  eviction_list retired_;     // free entries set aside when the storage filled up
};

}  // namespace kvtier::detail
