#pragma once
// The shared host tier: one slab and index in a named shared-memory segment that every process
// of a node maps, with no server. A lower tier asked by key (like Redis, at memory speed), under
// each process's own first tier. Linux (POSIX shared memory, robust mutexes, /proc).

#include "kvtier/detail/record.hpp"
#include "kvtier/error.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/tier/shared/index.hpp"
#include "kvtier/tier/shared/layout.hpp"
#include "kvtier/tier/shared/owner.hpp"
#include "kvtier/tier/shared/segment.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace kvtier::detail_shared {
/// Copies n bytes from src to dst and returns the payload checksum (detail::payload_checksum of
/// key) of the bytes at dst (hash_dst) or src, a piece at a time so that each piece is hashed
/// while it is still in cache: the same value as hashing the whole buffer, at about the cost of
/// the copy alone.
inline std::uint64_t copy_and_sum(std::byte* dst, const std::byte* src, std::size_t n,
                                  const chunk_key& key, bool hash_dst) noexcept {
  constexpr std::size_t piece = 128 * 1024;
  ::kvtier::detail::payload_hasher h(key);
  for (std::size_t off = 0; off < n; off += piece) {
    const std::size_t len = std::min(piece, n - off);
    std::memcpy(dst + off, src + off, len);
    h.update((hash_dst ? dst : src) + off, len);
  }
  return h.digest();
}
}  // namespace kvtier::detail_shared

namespace kvtier::tier {

/// Shared host tier. The segment (`config::name`, by default "/kvtier-<salt key>") holds the
/// slots, the key index, the LRU order, the lease records and counters at fixed offsets; the
/// first process with this salt and chunk format creates it, later ones attach, and one made for
/// another salt, format or kvtier version is refused. Every process's cache puts it below its own
/// first tier: a chunk one process stores is written into the segment once (by that process's
/// writer threads), and every other process finds it by lookup and loads it at memory speed.
///
/// Guarantees from any attached process: a chunk is served only once all its bytes are in
/// (published under the lock after the copy), a slot referenced by a lease is never evicted or
/// overwritten, reads verify the payload checksum (`verify`), the lock is never held while bytes
/// move, and no call allocates. Each lease and each half-written slot is tagged with its owner
/// (pid and start time); what a process held when it died (SIGKILL included) is given back when
/// another process notices (every `reap_interval`, and whenever slots or lease records run out),
/// and a holder that died with the lock makes the next locker rebuild the index (robust mutex).
struct shared_host {
  static constexpr const char* name = "shared_host";
  static constexpr bool is_memory = false;
  static constexpr bool indexed = false;

  struct config {
    std::string name;  ///< segment name ("/..."); empty: "/kvtier-<salt key hex>"
    std::size_t capacity_bytes = std::size_t{1} << 30;  ///< slab size, when this process creates it
    std::size_t processes = 64;  ///< processes attached at once, when this process creates it
    std::size_t leases = 0;      ///< lease records, when creating it; 0: 16 per process
    bool create = true;          ///< create the segment when absent (else attach only)
    bool verify = true;          ///< check each read's payload checksum
    std::chrono::milliseconds timeout{1000};        ///< lock waits; waiting for a creator
    std::chrono::milliseconds reap_interval{1000};  ///< how often dead owners are looked for
    std::uint32_t admit_after_hits = 0;             ///< take a chunk only once hit this often above
    unsigned writers = 1;  ///< this process's threads writing into the segment
  };

  /// The segment's counters (every attached process's events) and its occupancy.
  struct counters : detail_shared::seg_counters {
    std::uint32_t slots = 0;      ///< chunk slots in the segment
    std::uint32_t ready = 0;      ///< slots holding a served chunk
    std::uint32_t writing = 0;    ///< slots being written
    std::uint32_t processes = 0;  ///< processes attached
    std::uint64_t bytes = 0;      ///< size of the segment
  };

  /// Chunks held by a lease record, to be adopted by another process (see handle::lease).
  struct ticket {
    std::uint64_t value = 0;  ///< pass this number to the other process
    std::uint32_t chunks = 0;
    explicit operator bool() const noexcept { return chunks != 0; }
  };

  class handle;
  /// Chunks this process holds through an adopted ticket; given back when destroyed.
  class held {
   public:
    held() = default;
    held(held&& o) noexcept : h_(o.h_), rec_(o.rec_), id_(o.id_), chunks_(o.chunks_) {
      o.h_ = nullptr;
      o.chunks_ = 0;
    }
    held& operator=(held&& o) noexcept {
      if (this != &o) {
        reset();
        h_ = o.h_, rec_ = o.rec_, id_ = o.id_, chunks_ = o.chunks_;
        o.h_ = nullptr;
        o.chunks_ = 0;
      }
      return *this;
    }
    ~held() { reset(); }
    [[nodiscard]] std::uint32_t chunks() const noexcept { return chunks_; }
    /// The bytes of the k-th chunk held (k < chunks()), in the segment: they do not change while
    /// held (writers fill free slots only).
    [[nodiscard]] const std::byte* data(std::uint32_t k) const noexcept;
    void reset() noexcept;

   private:
    friend class handle;
    handle* h_ = nullptr;
    std::uint32_t rec_ = 0, id_ = 0, chunks_ = 0;
  };

  /// An attachment to the segment. The tier's impl is one; a process that holds no KV (a
  /// scheduler) uses one alone to ask how much of a prompt is cached and to take leases for
  /// another process (shared_lookup.hpp wraps it with the cache's keys).
  class handle {
    static constexpr std::size_t batch = 64;  // chunks per lock round

   public:
    handle(const config& c, const context& ctx)
        : cfg_(checked(c)),
          ctx_(ctx),
          seg_(segment_name(c, ctx), {ctx.salt, ctx.format.fingerprint(), ctx.format.chunk_bytes()},
               detail_shared::make_geometry(c.capacity_bytes, ctx.format.chunk_bytes(), c.processes,
                                            leases_of(c),
                                            std::clamp<std::size_t>(ctx.max_chunks, 64, 65536)),
               c.create, c.timeout),
          ix_(seg_),
          scratch_(seg_.hdr().procs),
          deferred_leases_(seg_.hdr().leases),
          pid_(::getpid()) {
      const detail_shared::owner_id self = detail_shared::self_id();
      for (int attempt = 0; attempt < 2 && me_ == detail_shared::nil; ++attempt) {
        if (!ix_.lock(cfg_.timeout)) break;
        me_ = ix_.register_proc(self);
        unlock();
        if (me_ == detail_shared::nil) (void)ix_.reap(scratch_, me_, cfg_.timeout);
      }
      if (me_ == detail_shared::nil) {
        throw tier_error("kvtier: shared_host segment '" + seg_.name() + "' has no free process " +
                         "record (" + std::to_string(seg_.hdr().procs) + " processes attached)");
      }
      gen_ = seg_.proc(me_).gen;
      reap_now();
    }
    /// Gives back this process's leases and half-written slots and leaves the process table.
    ~handle() {
      if (::getpid() != pid_) return;  // a forked child: the parent still owns the record
      if (lock()) {
        (void)ix_.release_proc(me_, gen_);
        unlock();
      }
    }
    handle(const handle&) = delete;
    handle& operator=(const handle&) = delete;

    [[nodiscard]] const std::string& segment_name() const noexcept { return seg_.name(); }
    /// True when this process created the segment.
    [[nodiscard]] bool created() const noexcept { return seg_.created(); }

    /// The length of the leading run of `keys` the segment holds. 0 when its lock is not taken
    /// within the timeout. Marks each found chunk used.
    std::size_t probe(std::span<const chunk_key> keys) {
      check_process();
      maybe_reap();
      if (!lock()) return 0;
      std::size_t n = 0;
      for (; n < keys.size(); ++n) {
        const std::uint32_t i = ix_.find_ready(keys[n]);
        if (i == detail_shared::nil) break;
        ix_.touch(i);
      }
      auto& c = ix_.hdr().counters;
      c.hits += n;
      if (n < keys.size()) ++c.misses;
      unlock();
      return n;
    }

    /// Copies each job's chunk into job.dst and proves it (key, tokens, length, checksum).
    void read_batch(std::span<read_job> jobs) {
      check_process();
      maybe_reap();
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        read_group(jobs.subspan(b, std::min(batch, jobs.size() - b)),
                   [this](std::size_t, read_job& job, const std::byte* src, std::uint64_t sum) {
                     // The checksum is of the bytes now in job.dst: what the engine will get.
                     if (!cfg_.verify) {
                       std::memcpy(job.dst, src, job.bytes);
                       return true;
                     }
                     return detail_shared::copy_and_sum(job.dst, src, job.bytes, job.key, true) ==
                            sum;
                   });
      }
    }

    /// Reads the leading run of jobs' chunks in place: `use(j, src, verify)` gets the bytes of
    /// job j in the segment (held under a lease while it runs) and, when `verify`, returns their
    /// payload checksum (computed as it reads them); job.status is then ok only if that checksum
    /// is the one the writer recorded. The run ends at the first job that is not ok: no later
    /// job is given to `use` (each is left `missing`), so the only bytes outside the run that
    /// can have been delivered are those of a chunk that failed its checksum. job.dst is not
    /// used. The cache scatters straight from the segment into the engine's blocks this way:
    /// one copy instead of two, and nothing past the prefix it reports loaded but that chunk.
    static constexpr bool maps_reads = true;
    template <class Use>
    void read_mapped(std::span<read_job> jobs, Use&& use) {
      check_process();
      maybe_reap();
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        const auto group = jobs.subspan(b, std::min(batch, jobs.size() - b));
        read_group<true>(group,
                         [&](std::size_t j, read_job&, const std::byte* src, std::uint64_t sum) {
                           const std::uint64_t got = use(b + j, src, cfg_.verify);
                           return !cfg_.verify || got == sum;
                         });
        if (group.back().status != read_status::ok) {
          for (read_job& j : jobs.subspan(b + group.size())) j.status = read_status::missing;
          return;
        }
      }
    }

    /// Holds the leading run of the `n` chunks key_of(j) (tokens_of(j) tokens each) that the
    /// segment has, up to one lease record's capacity, under a lease of this process until the
    /// result is reset: reads in place that span calls (a layer-wise retrieve) use held::data.
    /// When verifying, each held chunk's bytes are proven against its writer's checksum first,
    /// without the lock; the run ends before a chunk that fails, which is removed (never served
    /// again). An empty result when none is held, the lock is not taken or no record is free.
    /// `*corrupt` (when given) is incremented for a chunk found but not this chunk's bytes.
    template <class KeyOf, class TokensOf>
    held hold(std::size_t n, KeyOf&& key_of, TokensOf&& tokens_of,
              std::size_t* corrupt = nullptr);  // shared/hold.inl

    /// Writes each job's chunk into the segment; a chunk it already holds (or one another process
    /// is writing) is answered ok without a copy.
    void write_batch(std::span<write_job> jobs) {
      check_process();
      maybe_reap();
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        write_group(jobs.subspan(b, std::min(batch, jobs.size() - b)));
      }
    }

    /// Removes `keys`' chunks (those under a lease are freed when it ends); returns how many
    /// were held.
    std::size_t remove(std::span<const chunk_key> keys) {
      check_process();
      if (!lock()) return 0;
      std::size_t n = 0;
      for (const chunk_key& k : keys) {
        const std::uint32_t i = ix_.find_ready(k);
        if (i == detail_shared::nil) continue;
        ix_.remove(i);
        ++n;
      }
      unlock();
      return n;
    }
    /// Removes every chunk of the segment (it holds one salt's chunks only).
    std::size_t remove_all() {
      check_process();
      if (!lock()) return 0;
      const std::size_t n = ix_.remove_all();
      unlock();
      return n;
    }

    /// Holds the leading run of `keys` the segment has (up to the segment's lease size) in a
    /// lease record owned by this process, until another process adopts it or this one releases
    /// it or ends. An empty ticket when none is held or no lease record is free.
    ticket lease(std::span<const chunk_key> keys) {
      check_process();
      maybe_reap();
      if (!lock()) return {};
      std::uint32_t l = ix_.lease_take(me_);
      if (l == detail_shared::nil) {
        unlock();
        reap_now();
        if (!lock()) return {};
        l = ix_.lease_take(me_);
        if (l == detail_shared::nil) {
          unlock();
          return {};
        }
      }
      const std::size_t cap = std::min<std::size_t>(keys.size(), ix_.lease_capacity());
      std::uint32_t n = 0;
      for (; n < cap; ++n) {
        const std::uint32_t i = ix_.find_ready(keys[n]);
        if (i == detail_shared::nil) break;
        ix_.lease_add(l, i);
      }
      ticket t;
      if (n == 0) {
        (void)ix_.lease_drop(l);
      } else {
        t = {(std::uint64_t{l} << 32) | ix_.lease(l).id, n};
      }
      unlock();
      return t;
    }
    /// Takes over a ticket another process (or this one) leased: its chunks are held by this
    /// process from now on (reclaimed if it dies). An empty result for a ticket already adopted,
    /// released, or whose holder died.
    held adopt(ticket t) {
      check_process();
      held h;
      const auto l = static_cast<std::uint32_t>(t.value >> 32);
      const auto id = static_cast<std::uint32_t>(t.value);
      if (t.chunks == 0 || l >= seg_.hdr().leases || !lock()) return h;
      detail_shared::lease_head& r = ix_.lease(l);
      if (r.owner != detail_shared::nil && r.id == id && r.count > 0) {
        r.owner_gen = gen_;
        r.owner = me_;
        h.h_ = this;
        h.rec_ = l;
        h.id_ = id;
        h.chunks_ = r.count;
      }
      unlock();
      return h;
    }
    /// Gives back a ticket this process leased and no one adopted. False when it is not held.
    bool release(ticket t) noexcept {
      return drop_record(static_cast<std::uint32_t>(t.value >> 32),
                         static_cast<std::uint32_t>(t.value));
    }

    /// The segment's counters and occupancy (takes the lock; zeros when it is not taken).
    [[nodiscard]] counters stats() {
      counters c;
      if (!lock()) return c;
      const auto& h = ix_.hdr();
      static_cast<detail_shared::seg_counters&>(c) = h.counters;
      const auto k = ix_.count();
      c.slots = h.slots;
      c.ready = k.ready;
      c.writing = k.writing;
      for (std::uint32_t p = 0; p < h.procs; ++p) c.processes += seg_.proc(p).who.pid != 0;
      unlock();
      c.bytes = seg_.bytes();
      return c;
    }
    /// Every slot by state and every reference, with the lists' lengths (for tests: each slot is
    /// free, indexed, or held by a live owner).
    [[nodiscard]] detail_shared::shared_index::census census() {
      detail_shared::shared_index::census k;
      if (!lock()) return k;
      k = ix_.count();
      unlock();
      return k;
    }
    /// Looks for processes that ended now; returns how many were reclaimed.
    std::size_t reap_now() {
      last_reap_.store(now_ms(), std::memory_order_relaxed);
      std::unique_lock lk(reap_mu_, std::try_to_lock);  // another thread is reaping: enough
      return lk.owns_lock() ? ix_.reap(scratch_, me_, cfg_.timeout) : 0;
    }

    /// Removes segment `name` from the namespace; processes attached keep their mapping.
    static bool unlink(const std::string& name) { return detail_shared::segment::unlink(name); }
    /// The name a segment gets for this config and context.
    static std::string segment_name(const config& c, const context& ctx) {
      return c.name.empty() ? "/kvtier-" + ctx.salt.hex() : c.name;
    }

   private:
    friend class held;

    static config checked(const config& c) {
      if (c.timeout.count() <= 0) {
        throw invalid_argument("kvtier: shared_host timeout " + std::to_string(c.timeout.count()) +
                               " ms must be positive");
      }
      if (c.writers == 0 || c.writers > 64) {
        throw invalid_argument("kvtier: shared_host writers " + std::to_string(c.writers) +
                               " is out of range 1..64");
      }
      return c;
    }
    static std::int64_t now_ms() noexcept {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::steady_clock::now().time_since_epoch())
          .count();
    }
    void check_process() const {
      if (::getpid() != pid_) {
        throw tier_error("kvtier: shared_host segment '" + seg_.name() +
                         "' used in a forked child through its parent's attachment; attach anew");
      }
    }
    void maybe_reap() {
      const std::int64_t t = now_ms();
      std::int64_t last = last_reap_.load(std::memory_order_relaxed);
      if (t - last < cfg_.reap_interval.count()) return;
      if (!last_reap_.compare_exchange_strong(last, t)) return;  // another thread reaps
      (void)reap_now();
    }
    static std::size_t leases_of(const config& c) noexcept {
      if (c.leases != 0) return c.leases;
      return c.processes > 4096 ? c.processes : 16 * c.processes;  // (out of range: refused)
    }

    // Takes the lock, then gives back lease records whose drop an earlier lock timeout deferred.
    bool lock() {
      if (!ix_.lock(cfg_.timeout)) return false;
      if (deferred_count_.load(std::memory_order_acquire) != 0) {
        std::lock_guard g(defer_mu_);
        for (std::size_t j = 0; j < deferred_count_; ++j) {
          const auto [l, id] = deferred_leases_[j];
          if (ix_.lease(l).owner == me_ && ix_.lease(l).id == id) (void)ix_.lease_drop(l);
        }
        deferred_count_.store(0, std::memory_order_release);
      }
      return true;
    }
    void unlock() noexcept { ix_.unlock(); }

    bool drop_record(std::uint32_t l, std::uint32_t id) noexcept {
      if (l >= seg_.hdr().leases) return false;
      try {
        if (!lock()) {
          defer(l, id);
          return false;
        }
      } catch (...) {
        return false;
      }
      detail_shared::lease_head& r = ix_.lease(l);
      const bool mine = r.owner == me_ && r.owner_gen == gen_ && r.id == id;
      if (mine) (void)ix_.lease_drop(l);
      unlock();
      return mine;
    }
    // A lease whose drop timed out on the lock: dropped at this process's next lock (or, when
    // the list is full, when this process detaches or dies).
    void defer(std::uint32_t l, std::uint32_t id) noexcept {
      std::lock_guard g(defer_mu_);
      const std::size_t j = deferred_count_.load(std::memory_order_relaxed);
      if (j < deferred_leases_.size()) {
        deferred_leases_[j] = {l, id};
        deferred_count_.store(j + 1, std::memory_order_release);
      }
    }

    // One lock round of reads: references the jobs' chunks under a lease, has deliver(j, job,
    // src, checksum) move and check each without the lock (true: the bytes are the chunk's),
    // then removes chunks that failed and drops the lease. Leading: only the jobs before the
    // first one that is not ok are delivered; the rest are left missing.
    template <bool Leading = false, class Deliver>
    void read_group(std::span<read_job> jobs, Deliver&& deliver) {
      std::array<std::uint32_t, batch> slot;
      std::array<std::uint64_t, batch> sum{};
      if (!lock()) {
        for (read_job& j : jobs) j.status = read_status::io_error;
        return;
      }
      std::uint32_t l = ix_.lease_take(me_);
      if (l == detail_shared::nil) {
        unlock();
        reap_now();
        if (!lock()) {
          for (read_job& j : jobs) j.status = read_status::io_error;
          return;
        }
        l = ix_.lease_take(me_);
      }
      if (l == detail_shared::nil) {
        unlock();
        for (read_job& j : jobs) j.status = read_status::io_error;
        return;
      }
      auto& c = ix_.hdr().counters;
      for (read_job& job : jobs) job.status = read_status::missing;
      std::fill_n(slot.begin(), jobs.size(), detail_shared::nil);
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        read_job& job = jobs[j];
        const std::uint32_t i = ix_.find_ready(job.key);
        if (i == detail_shared::nil) {
          ++c.misses;
          if (Leading) break;
          continue;
        }
        const detail_shared::entry& e = ix_.at(i);
        if (e.tokens != job.tokens || job.bytes != ctx_.format.bytes(job.tokens) ||
            job.bytes > seg_.hdr().slot_bytes) {
          job.status = read_status::corrupt;  // a record of this key that is not this chunk
          ++c.corrupt;
          if (Leading) break;
          continue;
        }
        ix_.lease_add(l, i);
        slot[j] = i;
        sum[j] = e.checksum;
        ++c.hits;
      }
      const std::uint32_t id = ix_.lease(l).id;
      unlock();
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        if (slot[j] == detail_shared::nil) {
          if (Leading) break;
          continue;
        }
        read_job& job = jobs[j];
        const bool good = deliver(j, job, seg_.data(slot[j]), sum[j]);
        job.status = good ? read_status::ok : read_status::corrupt;
        if (Leading && !good) break;
      }
      if (!lock()) {
        defer(l, id);
        return;
      }
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        // Failed its checksum (a job not delivered is left missing and stays served).
        if (slot[j] == detail_shared::nil || jobs[j].status != read_status::corrupt) continue;
        ix_.remove(slot[j]);  // its bytes are not the chunk's: never served again
        ++c.corrupt;
      }
      (void)ix_.lease_drop(l);
      unlock();
    }

    void write_group(std::span<write_job> jobs) {
      std::array<std::uint32_t, batch> slot;
      if (!lock()) {
        for (write_job& j : jobs) j.ok = false;
        return;
      }
      auto& c = ix_.hdr().counters;
      bool full = false;
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        write_job& job = jobs[j];
        slot[j] = detail_shared::nil;
        job.ok = false;
        if (job.bytes != ctx_.format.bytes(job.tokens) || job.bytes > seg_.hdr().slot_bytes) {
          continue;
        }
        if (const std::uint32_t i = ix_.find(job.key); i != detail_shared::nil) {
          if (ix_.at(i).state == detail_shared::slot_state::ready) ix_.touch(i);
          ++c.duplicates;
          job.ok = true;
          continue;
        }
        slot[j] = ix_.reserve(job.key, job.tokens, me_);
        full = full || slot[j] == detail_shared::nil;
      }
      unlock();
      if (full) reap_now();  // slots may be held by processes that died
      std::array<std::uint64_t, batch> sum{};
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        if (slot[j] == detail_shared::nil) continue;
        sum[j] = detail_shared::copy_and_sum(seg_.data(slot[j]), jobs[j].src, jobs[j].bytes,
                                             jobs[j].key, false);
      }
      // Publishing must happen: wait for the lock (its holders never hold it across I/O). A
      // reserved slot left unpublished is freed when this process detaches or dies.
      while (!lock()) {
      }
      for (std::size_t j = 0; j < jobs.size(); ++j) {
        const std::uint32_t i = slot[j];
        if (i == detail_shared::nil) continue;
        const detail_shared::entry& e = ix_.at(i);
        // Still this write's reservation (nothing takes a live writer's slot).
        if (e.state == detail_shared::slot_state::writing && e.writer == me_ &&
            e.key == jobs[j].key) {
          ix_.publish(i, sum[j]);
          jobs[j].ok = true;
        }
      }
      unlock();
    }

    config cfg_;
    context ctx_;
    detail_shared::segment seg_;
    detail_shared::shared_index ix_;
    std::vector<detail_shared::proc_rec> scratch_;
    std::vector<std::pair<std::uint32_t, std::uint32_t>> deferred_leases_;
    std::atomic<std::size_t> deferred_count_{0};
    std::mutex defer_mu_;  // deferred_leases_
    std::mutex reap_mu_;   // scratch_
    std::uint32_t me_ = detail_shared::nil;
    std::uint32_t gen_ = 0;
    pid_t pid_;
    std::atomic<std::int64_t> last_reap_{0};
  };

  template <class Eviction>
  class impl : public handle {
   public:
    using handle::handle;
  };
};

static_assert(remote_lower_tier<shared_host::impl<eviction::lru>>);

}  // namespace kvtier::tier

#include "kvtier/tier/shared/hold.inl"
