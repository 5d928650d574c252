#pragma once
// The structures of a shared host segment, run under its robust lock: the hash of chunk keys,
// the LRU and free lists, lease records (references tagged with their owner) and the process
// table. What a dead process held is reclaimed: its leases are dropped and its half-written
// slots freed, when another process notices it is gone (reap) or, when it died holding the lock,
// by rebuilding every list from the entries (recover).

#include "kvtier/error.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/tier/shared/layout.hpp"
#include "kvtier/tier/shared/owner.hpp"
#include "kvtier/tier/shared/segment.hpp"

#include <pthread.h>

#if defined(__SANITIZE_THREAD__)
#define KVTIER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVTIER_TSAN 1
#endif
#endif
#ifndef KVTIER_TSAN
#define KVTIER_TSAN 0
#endif
#if KVTIER_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace kvtier::detail_shared {

class shared_index {
 public:
  explicit shared_index(segment& s) : s_(s), h_(s.hdr()) {}

  // ---- the lock -------------------------------------------------------------------------------

  /// Takes the lock, waiting at most `timeout`; false (counted) when it was not taken. When the
  /// holder died with it, rebuilds the structures first.
  [[nodiscard]] bool lock(std::chrono::milliseconds timeout) {
    timespec until{};
    ::clock_gettime(CLOCK_REALTIME, &until);
    const auto ns = until.tv_nsec + (timeout.count() % 1000) * 1000000;
    until.tv_sec += static_cast<time_t>(timeout.count() / 1000 + ns / 1000000000);
    until.tv_nsec = static_cast<long>(ns % 1000000000);
    const int rc = ::pthread_mutex_timedlock(&h_.mu, &until);
    if (rc == 0) return true;
    if (rc == EOWNERDEAD) {
#if KVTIER_TSAN
      // ThreadSanitizer's timedlock does not count a lock taken from a dead owner as taken.
      __tsan_mutex_pre_lock(&h_.mu, 0);
      __tsan_mutex_post_lock(&h_.mu, 0, 0);
#endif
      recover();
      ::pthread_mutex_consistent(&h_.mu);
      return true;
    }
    if (rc == ETIMEDOUT) {
      std::atomic_ref<std::uint64_t>(h_.counters.lock_timeouts)
          .fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    throw tier_error("kvtier: shared_host segment '" + s_.name() +
                     "': lock failed: " + std::strerror(rc));
  }
  void unlock() noexcept { ::pthread_mutex_unlock(&h_.mu); }

  // ---- entries (under the lock) ---------------------------------------------------------------

  [[nodiscard]] entry& at(std::uint32_t slot) const noexcept { return s_.at(slot); }
  [[nodiscard]] header& hdr() const noexcept { return h_; }

  /// The entry of `k` (writing or ready), or nil.
  [[nodiscard]] std::uint32_t find(const chunk_key& k) const noexcept {
    for (std::uint32_t i = s_.buckets()[bucket(k)]; i != nil; i = s_.at(i).next) {
      if (s_.at(i).key == k) return i;
    }
    return nil;
  }
  [[nodiscard]] std::uint32_t find_ready(const chunk_key& k) const noexcept {
    const std::uint32_t i = find(k);
    return i != nil && s_.at(i).state == slot_state::ready ? i : nil;
  }

  /// Reserves a slot for `k` (a free one, else the least recently used unreferenced one) as
  /// writing by proc record `me`; nil when every slot is referenced or being written.
  [[nodiscard]] std::uint32_t reserve(const chunk_key& k, std::uint32_t tokens,
                                      std::uint32_t me) noexcept {
    std::uint32_t i = h_.free_head;
    if (i != nil) {
      h_.free_head = s_.at(i).after;
    } else if ((i = h_.lru_head) != nil) {
      entry& v = s_.at(i);
      v.state = slot_state::free;  // first: a death from here on leaves a free slot
      lru_erase(i);
      hash_erase(i);
      ++h_.counters.evictions;
    } else {
      ++h_.counters.full;
      return nil;
    }
    entry& e = s_.at(i);
    e.writer = me;
    e.writer_gen = s_.proc(me).gen;
    e.refs = 0;
    e.state = slot_state::writing;  // before the key: a death now frees the slot
    e.key = k;
    e.tokens = tokens;
    hash_insert(i);
    return i;
  }
  /// The writer's bytes are whole (checksum `sum`): the entry is served from now on.
  void publish(std::uint32_t i, std::uint64_t sum) noexcept {
    entry& e = s_.at(i);
    e.checksum = sum;
    e.stamp = ++h_.clock;
    e.writer = nil;
    e.state = slot_state::ready;
    ++h_.counters.writes;
    settle(i);
  }
  /// The writer gave up: the slot is freed.
  void abort(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    e.state = slot_state::zombie;
    hash_erase(i);
    settle(i);
  }
  /// Takes `i` off lookup (removed or corrupt); freed once no lease references it.
  void remove(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    if (e.state != slot_state::ready) return;
    if (e.refs == 0) lru_erase(i);
    e.state = slot_state::zombie;
    hash_erase(i);
    ++h_.counters.removed;
    settle(i);
  }
  /// Removes every ready entry; returns how many.
  std::size_t remove_all() noexcept {
    std::size_t n = 0;
    for (std::uint32_t i = 0; i < h_.slots; ++i) {
      if (s_.at(i).state == slot_state::ready) {
        remove(i);
        ++n;
      }
    }
    return n;
  }
  /// A use of ready entry `i`: moves it to the LRU's new end.
  void touch(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    e.stamp = ++h_.clock;
    if (e.state == slot_state::ready && e.refs == 0) {
      lru_erase(i);
      lru_push(i);
    }
  }

  // ---- leases (under the lock) ----------------------------------------------------------------

  /// A free lease record, owned by proc record `me`; nil when none is free.
  [[nodiscard]] std::uint32_t lease_take(std::uint32_t me) noexcept {
    const std::uint32_t l = h_.free_leases;
    if (l == nil) return nil;
    lease_head& r = s_.lease(l);
    h_.free_leases = r.next_free;
    r.count = 0;
    r.id = ++h_.lease_seq == 0 ? ++h_.lease_seq : h_.lease_seq;
    r.owner_gen = s_.proc(me).gen;
    r.owner = me;  // last: the record is the owner's once this is set
    return l;
  }
  [[nodiscard]] std::uint32_t lease_capacity() const noexcept { return h_.lease_chunks; }
  /// References ready entry `i` under lease `l` (which has room).
  void lease_add(std::uint32_t l, std::uint32_t i) noexcept {
    lease_head& r = s_.lease(l);
    s_.lease_slots(l)[r.count] = i;
    ++r.count;
    entry& e = s_.at(i);
    if (e.state == slot_state::ready && e.refs == 0) lru_erase(i);
    ++e.refs;
  }
  /// Drops every reference of lease `l` and frees it; returns how many it held.
  std::uint32_t lease_drop(std::uint32_t l) noexcept {
    lease_head& r = s_.lease(l);
    const std::uint32_t n = r.count;
    const std::uint32_t* slots = s_.lease_slots(l);
    for (std::uint32_t j = 0; j < n; ++j) {
      entry& e = s_.at(slots[j]);
      if (e.refs > 0) --e.refs;
      settle(slots[j]);
    }
    r.count = 0;
    r.owner = nil;
    r.next_free = h_.free_leases;
    h_.free_leases = l;
    return n;
  }
  [[nodiscard]] lease_head& lease(std::uint32_t l) const noexcept { return s_.lease(l); }
  [[nodiscard]] const std::uint32_t* lease_slots(std::uint32_t l) const noexcept {
    return s_.lease_slots(l);
  }

  // ---- processes ------------------------------------------------------------------------------

  /// Takes a process record for `who`; nil when every record is taken (under the lock).
  [[nodiscard]] std::uint32_t register_proc(const owner_id& who) noexcept {
    for (std::uint32_t p = 0; p < h_.procs; ++p) {
      proc_rec& r = s_.proc(p);
      if (r.who.pid != 0) continue;
      ++r.gen;
      r.who = who;
      return p;
    }
    return nil;
  }
  /// Gives back everything proc record `p` (generation `gen`) holds and frees the record. Under
  /// the lock. Returns false when the record has since been taken by another process.
  bool release_proc(std::uint32_t p, std::uint32_t gen) noexcept {
    proc_rec& r = s_.proc(p);
    if (r.gen != gen || r.who.pid == 0) return false;
    for (std::uint32_t l = 0; l < h_.leases; ++l) {
      lease_head& x = s_.lease(l);
      if (x.owner == p && x.owner_gen == gen) h_.counters.reclaimed_refs += lease_drop(l);
    }
    for (std::uint32_t i = 0; i < h_.slots; ++i) {
      entry& e = s_.at(i);
      if (e.state == slot_state::writing && e.writer == p && e.writer_gen == gen) {
        abort(i);
        ++h_.counters.reclaimed_writes;
      }
    }
    r.who = owner_id{};
    return true;
  }

  /// Finds attached processes that have ended (reading /proc without the lock) and gives back
  /// what they held. `scratch` holds a copy of the process table (sized at attach: no
  /// allocation). Returns how many were reclaimed. Takes the lock itself; `me` is skipped.
  std::size_t reap(std::vector<proc_rec>& scratch, std::uint32_t me,
                   std::chrono::milliseconds timeout) {
    if (!lock(timeout)) return 0;
    std::copy_n(&s_.proc(0), h_.procs, scratch.begin());
    unlock();
    std::size_t dead = 0;
    for (std::uint32_t p = 0; p < scratch.size(); ++p) {
      if (p == me || scratch[p].who.pid == 0 || alive(scratch[p].who)) {
        scratch[p].who.pid = 0;
      } else {
        ++dead;
      }
    }
    if (dead == 0 || !lock(timeout)) return 0;
    std::size_t n = 0;
    for (std::uint32_t p = 0; p < scratch.size(); ++p) {
      if (scratch[p].who.pid == 0 || !(s_.proc(p).who == scratch[p].who)) continue;
      if (release_proc(p, scratch[p].gen)) {
        ++h_.counters.reclaimed_procs;
        ++n;
      }
    }
    unlock();
    return n;
  }

  /// Slots by state, and references held by live lease records; for tests and stats. Under the
  /// lock.
  struct census {
    std::uint32_t free = 0, writing = 0, ready = 0, zombie = 0;
    std::uint64_t refs = 0, lease_refs = 0;
    std::uint32_t held = 0;  ///< ready entries with references
    std::uint32_t free_listed = 0, lru_listed = 0, leases_free = 0;
  };
  [[nodiscard]] census count() const noexcept {
    census c;
    for (std::uint32_t i = 0; i < h_.slots; ++i) {
      const entry& e = s_.at(i);
      c.refs += e.refs;
      switch (e.state) {
        case slot_state::free:
          ++c.free;
          break;
        case slot_state::writing:
          ++c.writing;
          break;
        case slot_state::ready:
          ++c.ready;
          c.held += e.refs != 0;
          break;
        case slot_state::zombie:
          ++c.zombie;
          break;
      }
    }
    for (std::uint32_t l = 0; l < h_.leases; ++l) {
      if (s_.lease(l).owner != nil) c.lease_refs += s_.lease(l).count;
    }
    for (std::uint32_t i = h_.free_head; i != nil && c.free_listed <= h_.slots;
         i = s_.at(i).after) {
      ++c.free_listed;
    }
    for (std::uint32_t i = h_.lru_head; i != nil && c.lru_listed <= h_.slots; i = s_.at(i).after) {
      ++c.lru_listed;
    }
    for (std::uint32_t l = h_.free_leases; l != nil && c.leases_free <= h_.leases;
         l = s_.lease(l).next_free) {
      ++c.leases_free;
    }
    return c;
  }

 private:
  [[nodiscard]] std::uint32_t bucket(const chunk_key& k) const noexcept {
    return static_cast<std::uint32_t>(chunk_key_hash{}(k) & (h_.buckets - 1));
  }
  void hash_insert(std::uint32_t i) noexcept {
    std::uint32_t& head = s_.buckets()[bucket(s_.at(i).key)];
    s_.at(i).next = head;
    head = i;
    ++h_.indexed;
  }
  void hash_erase(std::uint32_t i) noexcept {
    std::uint32_t* link = &s_.buckets()[bucket(s_.at(i).key)];
    while (*link != nil && *link != i) link = &s_.at(*link).next;
    if (*link == nil) return;
    *link = s_.at(i).next;
    s_.at(i).next = nil;
    --h_.indexed;
  }
  void lru_push(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    e.prev = h_.lru_tail;
    e.after = nil;
    if (h_.lru_tail != nil) {
      s_.at(h_.lru_tail).after = i;
    } else {
      h_.lru_head = i;
    }
    h_.lru_tail = i;
  }
  void lru_erase(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    if (e.prev != nil) {
      s_.at(e.prev).after = e.after;
    } else {
      h_.lru_head = e.after;
    }
    if (e.after != nil) {
      s_.at(e.after).prev = e.prev;
    } else {
      h_.lru_tail = e.prev;
    }
    e.prev = e.after = nil;
  }
  void free_push(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    e.state = slot_state::free;
    e.prev = nil;
    e.after = h_.free_head;
    h_.free_head = i;
  }
  // Puts an entry whose references just dropped where it belongs.
  void settle(std::uint32_t i) noexcept {
    entry& e = s_.at(i);
    if (e.refs != 0) return;
    if (e.state == slot_state::zombie) {
      free_push(i);
    } else if (e.state == slot_state::ready) {
      lru_push(i);
    }
  }

  // The lock's holder died: its changes may be half made. Every list is rebuilt from what each
  // entry's state says, references are recounted from live lease records, and what dead
  // processes held is given back. Entries change state in an order that makes this exact (see
  // entry in layout.hpp). Allocates (a sort of the LRU order): recovery is rare, not a hot path.
  void recover() {
    ++h_.counters.recoveries;
    std::vector<std::uint8_t> dead(h_.procs, 0);
    for (std::uint32_t p = 0; p < h_.procs; ++p) {
      proc_rec& r = s_.proc(p);
      if (r.who.pid != 0 && !alive(r.who)) {
        dead[p] = 1;
        r.who = owner_id{};
        ++h_.counters.reclaimed_procs;
      }
    }
    auto live = [&](std::uint32_t p, std::uint32_t gen) {
      return p < h_.procs && !dead[p] && s_.proc(p).who.pid != 0 && s_.proc(p).gen == gen;
    };
    for (std::uint32_t i = 0; i < h_.slots; ++i) s_.at(i).refs = 0;
    h_.free_leases = nil;
    for (std::uint32_t l = h_.leases; l-- > 0;) {
      lease_head& r = s_.lease(l);
      if (r.owner != nil && live(r.owner, r.owner_gen) && r.count <= h_.lease_chunks) {
        for (std::uint32_t j = 0; j < r.count; ++j) {
          const std::uint32_t slot = s_.lease_slots(l)[j];
          if (slot < h_.slots) ++s_.at(slot).refs;
        }
        continue;
      }
      if (r.owner != nil) h_.counters.reclaimed_refs += r.count;
      r.owner = nil;
      r.count = 0;
      r.next_free = h_.free_leases;
      h_.free_leases = l;
    }
    std::uint32_t* b = s_.buckets();
    for (std::uint32_t i = 0; i < h_.buckets; ++i) b[i] = nil;
    h_.indexed = 0;
    h_.free_head = h_.lru_head = h_.lru_tail = nil;
    std::vector<std::uint32_t> order;
    for (std::uint32_t i = h_.slots; i-- > 0;) {
      entry& e = s_.at(i);
      e.next = e.prev = e.after = nil;
      if (e.state == slot_state::writing && !live(e.writer, e.writer_gen)) {
        e.state = slot_state::free;
        ++h_.counters.reclaimed_writes;
      }
      if (e.state == slot_state::zombie && e.refs == 0) e.state = slot_state::free;
      if (e.state == slot_state::ready && find(e.key) != nil) e.state = slot_state::free;  // dup
      switch (e.state) {
        case slot_state::free:
          free_push(i);
          break;
        case slot_state::writing:
          hash_insert(i);
          break;
        case slot_state::ready:
          hash_insert(i);
          if (e.refs == 0) order.push_back(i);
          break;
        case slot_state::zombie:
          break;
        default:
          e.state = slot_state::free, free_push(i);
      }
    }
    std::sort(order.begin(), order.end(),
              [&](std::uint32_t a, std::uint32_t c) { return s_.at(a).stamp < s_.at(c).stamp; });
    for (std::uint32_t i : order) lru_push(i);
  }

  segment& s_;
  header& h_;
};

}  // namespace kvtier::detail_shared
