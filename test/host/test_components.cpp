// The cache's parts on their own (include/kvtier/cache/): operation slots, chunking and keys,
// leases, the tier chain, background writers and the write policy, promotion, prefetch and the
// asynchronous first-tier path, each driven directly with a lower tier written here (an
// in-memory remote tier whose failures the tests choose).
#include "emulated_gpu.hpp"
#include "support.hpp"

#include <kvtier/cache/cache_impl.hpp>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <unordered_map>
#include <mutex>
#include <thread>
#include <vector>

namespace d = kvtier::detail;
using lru = kvtier::eviction::lru;
using host = kvtier::tier::host;
using kvtier::chunk_key;
using kvtier::tier::read_status;
using namespace std::chrono_literals;

namespace {

// An in-memory remote tier. Tests set what its reads answer, fail its writes, or hold its
// writer inside write_batch until released.
struct fake_store {
  std::mutex mu;
  std::condition_variable cv;
  std::unordered_map<chunk_key, std::vector<std::byte>, kvtier::chunk_key_hash> objects;
  read_status forced = read_status::ok;  // anything but ok: every read answers it
  bool fail_writes = false;
  bool hold_writes = false;
  int in_write = 0;  // write_batch calls inside the hold
  std::size_t reads = 0, removes = 0;

  void hold() {
    std::lock_guard lk(mu);
    hold_writes = true;
  }
  void release_writes() {
    std::lock_guard lk(mu);
    hold_writes = false;
    cv.notify_all();
  }
  bool wait_in_write(int n) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, 5s, [&] { return in_write >= n; });
  }
};

struct fake_remote {
  static constexpr const char* name = "fake_remote";
  static constexpr bool is_memory = false;
  struct config {
    fake_store* store = nullptr;
    std::uint32_t admit_after_hits = 0;
    unsigned writers = 1;
  };
  template <class Eviction>
  class impl {
   public:
    impl(const config& c, const kvtier::tier::context&) : s_(*c.store) {}
    std::size_t probe(std::span<const chunk_key> keys) {
      std::lock_guard lk(s_.mu);
      std::size_t n = 0;
      while (n < keys.size() && s_.objects.count(keys[n])) ++n;
      return n;
    }
    void read_batch(std::span<kvtier::tier::read_job> jobs) {
      std::lock_guard lk(s_.mu);
      for (auto& j : jobs) {
        ++s_.reads;
        auto it = s_.objects.find(j.key);
        if (s_.forced != read_status::ok) {
          j.status = s_.forced;
        } else if (it == s_.objects.end()) {
          j.status = read_status::missing;
        } else if (it->second.size() != j.bytes) {
          j.status = read_status::corrupt;
        } else {
          std::memcpy(j.dst, it->second.data(), j.bytes);
          j.status = read_status::ok;
        }
      }
    }
    void write_batch(std::span<kvtier::tier::write_job> jobs) {
      std::unique_lock lk(s_.mu);
      ++s_.in_write;
      s_.cv.notify_all();
      s_.cv.wait(lk, [&] { return !s_.hold_writes; });
      --s_.in_write;
      for (auto& j : jobs) {
        j.ok = !s_.fail_writes;
        if (j.ok) s_.objects[j.key].assign(j.src, j.src + j.bytes);
      }
    }
    std::size_t remove(std::span<const chunk_key> keys) {
      std::lock_guard lk(s_.mu);
      std::size_t n = 0;
      for (const auto& k : keys) n += s_.objects.erase(k);
      s_.removes += keys.size();
      return n;
    }
    std::size_t remove_all() {
      std::lock_guard lk(s_.mu);
      const std::size_t n = s_.objects.size();
      s_.objects.clear();
      return n;
    }

   private:
    fake_store& s_;
  };
};
static_assert(kvtier::tier::remote_lower_tier<fake_remote::impl<lru>>);
static_assert(!kvtier::tier::indexed_lower_tier<fake_remote::impl<lru>>);
static_assert(kvtier::tier::indexed_lower_tier<kvtier::tier::local_disk::impl<lru>>);
static_assert(!kvtier::tier::lower_tier<host::impl<lru>>);

constexpr std::size_t chunk_tokens = 16;
const auto fmt = kvtier::layout::chunk_format::from(test::small_model, chunk_tokens, 2);
const chunk_key salt =
    d::chunker<chunk_tokens, kvtier::key::xxh3_hasher>::make_salt_key(test::small_salt, fmt);
const kvtier::tier::context ctx{fmt, salt, 4, 8, 4};

chunk_key key(std::uint64_t i) { return chunk_key{i * 7919 + 1, i}; }

// A chain of host (`slots` chunks) and the fake remote tier, with the parts the tests drive.
struct rig {
  using chain_t = d::tier_chain<lru, host, fake_remote>;
  fake_store store;
  d::cache_state<2> st;
  chain_t chain;
  d::writers<chain_t> writers;
  d::write_policy<chain_t> policy;
  d::promoter<chain_t> promoter;

  explicit rig(std::size_t slots, kvtier::write_mode m = kvtier::write_mode::write_through,
               std::uint32_t admit = 0, std::size_t depth = 8)
      : chain({host::config{slots * 4096}, fake_remote::config{&store, admit}}, ctx),
        writers(chain, st, fmt, depth),
        policy(chain, st, writers, m),
        promoter(chain, st, policy, fmt) {}

  // Puts chunk `k` in the first tier, its bytes all `fill`. `stored`: as store() does (the
  // write policy hears of it, and the writers are woken after); else as a promotion or a
  // prefetch allocates (under the lock, no notify after). nullptr when nothing is evictable.
  d::index_entry* put(const chunk_key& k, std::byte fill, bool stored = true) {
    std::unique_lock lk(st.mu);
    d::index_entry* e = policy.allocate_first_locked();
    if (e == nullptr) return nullptr;
    auto& ix = chain.first_index();
    ix.insert_writing(*e, k, chunk_tokens);
    std::memset(chain.first().data(ix.slot(*e)), static_cast<int>(fill), fmt.chunk_bytes());
    ix.publish(*e);
    if (stored) policy.on_stored_locked(*e);
    ix.unref(*e);
    lk.unlock();
    if (stored) policy.notify();
    return e;
  }
  void flush() {
    std::unique_lock lk(st.mu);
    policy.flush(lk);
  }
  bool stored_remote(const chunk_key& k, std::byte fill) {
    std::lock_guard lk(store.mu);
    auto it = store.objects.find(k);
    if (it == store.objects.end() || it->second.size() != fmt.chunk_bytes()) return false;
    for (std::byte b : it->second) {
      if (b != fill) return false;
    }
    return true;
  }
  bool in_first(const chunk_key& k) {
    std::lock_guard lk(st.mu);
    return chain.first_index().find_ready(k) != nullptr;
  }
};

}  // namespace

TEST_CASE("op_table: slots are distinct, exhausted, reused, and their arrays do not overlap") {
  d::op_table ops(5, 3);
  CHECK(ops.capacity() == 3);
  const std::uint32_t a = ops.acquire(), b = ops.acquire(), c = ops.acquire();
  CHECK(ops.acquire() == d::op_table::no_op);
  CHECK(ops.available() == 0);
  CHECK((a != b && b != c && a != c));
  for (std::uint32_t op : {a, b, c}) {
    for (std::size_t i = 0; i < 5; ++i) ops.keys(op)[i] = chunk_key{op, i};
  }
  for (std::uint32_t op : {a, b, c}) {
    for (std::size_t i = 0; i < 5; ++i) CHECK(ops.keys(op)[i] == chunk_key{op, i});
  }
  ops.release(b);
  CHECK(ops.acquire() == b);
  CHECK_THROWS_WITH_AS(d::op_table(5, 0), test::contains("max_inflight 0"),
                       kvtier::invalid_argument);
  CHECK_THROWS_WITH_AS(d::op_table(SIZE_MAX / 8, 64), test::contains("max_tokens makes"),
                       kvtier::invalid_argument);
}

TEST_CASE("chunker: counts, chained keys, partial tails and bad salts") {
  using ch = d::chunker<chunk_tokens, kvtier::key::xxh3_hasher>;
  const ch whole(test::small_salt, fmt, false), tail(test::small_salt, fmt, true);
  CHECK(whole.count(40) == 2);
  CHECK(tail.count(40) == 3);
  CHECK(tail.count(32) == 2);
  CHECK(ch::tokens_at(2, 40) == 8);
  auto t = test::tokens(48, 1);
  std::array<chunk_key, 3> k1{}, k2{};
  CHECK(whole.keys(t, k1) == 3);
  t[20] += 1;  // chunk 1 changes: chunk 0 keeps its key, chunks 1 and 2 do not
  whole.keys(t, k2);
  CHECK(k1[0] == k2[0]);
  CHECK(k1[1] != k2[1]);
  CHECK(k1[2] != k2[2]);
  std::array<chunk_key, 2> small{};
  CHECK_THROWS_WITH_AS(whole.keys(t, small), test::contains("holds 2 keys"),
                       kvtier::invalid_argument);
  kvtier::salt other{"test-model", "bf16", 0, 1, "b"};  // small_salt, another tenant
  CHECK(ch(other, fmt, false).salt_key() != whole.salt_key());
  other.tp_rank = 1;
  CHECK_THROWS_WITH_AS(ch(other, fmt, false), test::contains("tp_rank 1"),
                       kvtier::invalid_argument);
}

namespace {
struct lease_owner {
  static constexpr std::size_t chunk_tokens = 16;
  using lease = d::basic_lease<lease_owner>;
  int released = 0;
  lease make(std::size_t first, std::size_t chunks) {
    lease l;
    l.cache_ = this;
    l.op_ = 7;
    l.first_ = first;
    l.chunks_ = chunks;
    l.tokens_ = chunks * chunk_tokens;
    return l;
  }
  void release(lease& l) noexcept {
    ++released;
    l.clear();
  }
  std::size_t lease_hits_in(const lease& l, std::size_t t) const noexcept {
    return t == 0 ? l.chunks_ : 0;
  }
};
}  // namespace

TEST_CASE("lease: one release per run, whatever moves it") {
  lease_owner o;
  {
    auto l = o.make(2, 3);
    CHECK(l.first_token() == 32);
    CHECK(l.end_token() == 80);
    CHECK(l.hits_in(0) == 3);
    auto m = std::move(l);
    CHECK_FALSE(l.live());
    CHECK(m.live());
    lease_owner::lease n;
    n = std::move(m);
    CHECK(o.released == 0);
  }
  CHECK(o.released == 1);
  auto l = o.make(0, 1);
  l.reset();
  l.reset();
  CHECK(o.released == 2);
  CHECK(l.hits_in(0) == 0);
}

TEST_CASE("tier_chain: tiers, their kinds and settings, remote calls") {
  fake_store s;
  s.objects[key(1)] = {};
  s.objects[key(2)] = {};
  using chain_t = d::tier_chain<lru, host, fake_remote>;
  static_assert(chain_t::tier_count == 2 && chain_t::remote_count == 1);
  chain_t c({host::config{4 * 4096}, fake_remote::config{&s, 3, 2}}, ctx);
  CHECK(c.index(0) == &c.first_index());
  CHECK(c.index(1) == nullptr);
  CHECK(c.first_index().capacity() == 4);
  CHECK(c.admit_after(1) == 3);
  CHECK(c.writers(1) == 2);
  CHECK(c.lower_mask() == 0b10);
  kvtier::cache_stats<2> st;
  c.init_stats(st);
  CHECK(std::string(st.tiers[1].name) == "fake_remote");
  std::array<std::uint8_t, 2> asked{};
  std::size_t tier = 0;
  const std::array<chunk_key, 3> ks{key(1), key(2), key(3)};
  CHECK(c.probe_remote(ks, asked, tier) == 2);
  CHECK(asked[1] == 1);
  CHECK(tier == 1);
  CHECK(c.remove_remote(ks) == 2);
  CHECK(s.objects.empty());
  CHECK_THROWS_WITH_AS(chain_t({host::config{4 * 4096}, fake_remote::config{&s, 0, 0}}, ctx),
                       test::contains("writers 0"), kvtier::invalid_argument);
  CHECK_THROWS_WITH_AS(chain_t({host::config{4 * 4096}, fake_remote::config{&s, 256, 1}}, ctx),
                       test::contains("admit_after_hits 256"), kvtier::invalid_argument);
}

TEST_CASE("writers and write_policy: write-through writes every stored chunk once") {
  rig r(4);
  for (std::uint64_t i = 0; i < 3; ++i) REQUIRE(r.put(key(i), std::byte(0x10 + i)) != nullptr);
  r.flush();
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(r.stored_remote(key(i), std::byte(0x10 + i)));
  CHECK(r.st.stats.tiers[1].writes == 3);
  CHECK(r.st.stats.tiers[1].bytes_written == 3 * fmt.chunk_bytes());
  CHECK(r.st.stats.tiers[1].dropped_writes == 0);
  // Written chunks are no longer referenced by the writers: all four slots can be reused.
  for (std::uint64_t i = 10; i < 14; ++i) CHECK(r.put(key(i), std::byte(1)) != nullptr);
}

TEST_CASE("writers: a full queue drops the write (counted) and never blocks the store") {
  rig r(4, kvtier::write_mode::write_through, 0, 1);
  r.store.hold();
  REQUIRE(r.put(key(0), std::byte(1)));
  REQUIRE(r.store.wait_in_write(1));     // the writer holds chunk 0 inside write_batch
  REQUIRE(r.put(key(1), std::byte(2)));  // queued (depth 1)
  REQUIRE(r.put(key(2), std::byte(3)));  // the queue is full: dropped
  {
    std::lock_guard lk(r.st.mu);
    CHECK(r.writers.queued_locked(1) == 1);
    CHECK(r.st.stats.tiers[1].dropped_writes == 1);
    // Held for writing, chunks 0 and 1 are not evictable; 2 and the free slot are.
    CHECK(r.chain.first_index().find(key(0))->refs == 1);
  }
  r.store.release_writes();
  r.flush();
  CHECK(r.stored_remote(key(0), std::byte(1)));
  CHECK(r.stored_remote(key(1), std::byte(2)));
  CHECK_FALSE(r.stored_remote(key(2), std::byte(3)));
}

TEST_CASE("writers: a failed write is an error and leaves no record; a cleared chunk is undone") {
  rig r(4);
  r.store.fail_writes = true;
  r.put(key(0), std::byte(1));
  r.flush();
  CHECK(r.st.stats.tiers[1].errors == 1);
  CHECK(r.st.stats.tiers[1].writes == 0);
  r.store.fail_writes = false;
  r.store.hold();
  r.put(key(1), std::byte(2));
  REQUIRE(r.store.wait_in_write(1));
  {
    std::lock_guard lk(r.st.mu);  // clear(tokens) while the write is in flight
    CHECK(r.chain.first_index().remove(*r.chain.first_index().find(key(1))));
  }
  r.store.release_writes();
  r.flush();
  CHECK(r.store.objects.count(key(1)) == 0);  // written, then deleted again
  CHECK(r.st.stats.tiers[1].errors == 1);
}

TEST_CASE("write_policy: write-back writes a chunk when evicted, then frees its slot") {
  rig r(2, kvtier::write_mode::write_back);
  r.put(key(0), std::byte(1));
  r.put(key(1), std::byte(2));
  r.flush();  // write-back: flush writes what is owed, and the chunks stay
  CHECK(r.st.stats.tiers[1].writes == 2);
  CHECK(r.in_first(key(0)));
  rig w(2, kvtier::write_mode::write_back);
  w.put(key(0), std::byte(1));
  w.put(key(1), std::byte(2));
  CHECK(w.st.stats.tiers[1].writes == 0);
  std::this_thread::sleep_for(50ms);  // the writer is asleep: only a notify wakes it
  // A third chunk: the LRU victim (chunk 0) still owes the lower tier, so it is queued instead
  // and the next victim (chunk 1, also owed) too: nothing is free until a write completes. The
  // allocation itself wakes the writer (a promotion or prefetch allocating notifies no one).
  CHECK(w.put(key(2), std::byte(3), false) == nullptr);
  for (int i = 0; i < 500 && !w.stored_remote(key(1), std::byte(2)); ++i) {
    std::this_thread::sleep_for(10ms);
  }
  REQUIRE(w.stored_remote(key(1), std::byte(2)));  // else the writer was never woken
  {
    std::unique_lock lk(w.st.mu);
    w.writers.wait_idle(lk);
  }
  CHECK(w.stored_remote(key(0), std::byte(1)));
  CHECK(w.stored_remote(key(1), std::byte(2)));
  CHECK(w.st.stats.tiers[1].write_backs == 2);
  CHECK_FALSE(w.in_first(key(0)));
  CHECK(w.put(key(2), std::byte(3)) != nullptr);
}

TEST_CASE("write_policy: admission after N hits") {
  rig r(4, kvtier::write_mode::write_through, 2);
  d::index_entry* e = r.put(key(0), std::byte(5));
  r.flush();
  CHECK(r.st.stats.tiers[1].writes == 0);
  {
    std::lock_guard lk(r.st.mu);
    r.policy.note_hit_locked(*e);
    CHECK(r.writers.queued_locked(1) + r.st.stats.tiers[1].writes == 0);
    r.policy.note_hit_locked(*e);
  }
  r.flush();
  CHECK(r.stored_remote(key(0), std::byte(5)));
}

namespace {
// Runs the promoter over refs to the fake tier's chunks 0..n-1 into the first tier.
std::array<d::chunk_ref, 4> promote(rig& r, std::size_t n) {
  std::array<chunk_key, 4> ks{key(0), key(1), key(2), key(3)};
  std::array<d::chunk_ref, 4> rs{};
  for (std::size_t i = 0; i < n; ++i) rs[i] = {0, 1, 0};
  r.promoter.promote(ks.data(), rs.data(), 0, n, 0, n * chunk_tokens, chunk_tokens,
                     [&](std::unique_lock<std::mutex>& lk) { r.st.state_cv.wait(lk); });
  return rs;
}
}  // namespace

TEST_CASE("promoter: verified chunks come into the first tier, failures are dropped") {
  rig r(4);
  for (std::uint64_t i = 0; i < 3; ++i) {
    r.store.objects[key(i)].assign(fmt.chunk_bytes(), std::byte(0x40 + i));
  }
  r.store.objects[key(2)].resize(10);  // its record is short: corrupt
  auto rs = promote(r, 4);             // chunk 3 is missing
  for (std::size_t i = 0; i < 2; ++i) {
    REQUIRE(rs[i].tier == 0);
    const std::byte* p = r.chain.first().data(rs[i].slot);
    CHECK(p[0] == std::byte(0x40 + i));
    CHECK(p[fmt.chunk_bytes() - 1] == std::byte(0x40 + i));
    CHECK(r.chain.first_index().at(rs[i].slot).refs == 1);  // the operation's reference
  }
  CHECK(rs[2].tier == d::dropped_tier);
  CHECK(rs[3].tier == d::dropped_tier);
  CHECK(r.st.stats.tiers[1].promotions == 2);
  CHECK(r.st.stats.tiers[1].errors == 1);     // the corrupt one; a miss is no error
  CHECK(r.store.objects.count(key(2)) == 0);  // deleted, so lookups stop reporting it
  CHECK_FALSE(r.in_first(key(2)));
  CHECK_FALSE(r.in_first(key(3)));
  // A second promotion of chunks already in: no read.
  const std::size_t reads = r.store.reads;
  std::array<chunk_key, 1> k0{key(0)};
  std::array<d::chunk_ref, 1> r0{{{0, 1, 0}}};
  r.promoter.promote(k0.data(), r0.data(), 0, 1, 0, chunk_tokens, chunk_tokens,
                     [&](std::unique_lock<std::mutex>& lk) { r.st.state_cv.wait(lk); });
  CHECK(r0[0].tier == 0);
  CHECK(r.store.reads == reads);
}

TEST_CASE("promoter: an I/O error is counted and the entry freed") {
  rig r(2);
  r.store.objects[key(0)].assign(fmt.chunk_bytes(), std::byte(1));
  r.store.forced = read_status::io_error;
  auto rs = promote(r, 1);
  CHECK(rs[0].tier == d::dropped_tier);
  CHECK(r.st.stats.tiers[1].errors == 1);
  CHECK(r.store.objects.count(key(0)) == 1);  // an I/O error does not delete the record
  std::lock_guard lk(r.st.mu);
  CHECK(r.chain.first_index().free_count() == 2);
}

TEST_CASE("prefetcher: queued chunks arrive in the first tier in the background") {
  rig r(4);
  d::prefetcher<rig::chain_t> pf(r.chain, r.st, r.policy, r.promoter, fmt, 2);
  for (std::uint64_t i = 0; i < 3; ++i) {
    r.store.objects[key(i)].assign(fmt.chunk_bytes(), std::byte(0x50 + i));
  }
  std::array<chunk_key, 3> ks{key(0), key(1), key(2)};
  std::size_t started = 0;
  {
    std::lock_guard lk(r.st.mu);
    started = pf.start_locked(ks.data(), 3, [](std::size_t) { return chunk_tokens; });
  }
  pf.notify();
  CHECK(started == 2 * chunk_tokens);  // the queue holds 2: the third is dropped, counted
  CHECK(r.st.stats.prefetch_dropped == 1);
  for (int i = 0; i < 2500 && !(r.in_first(key(0)) && r.in_first(key(1))); ++i) {
    std::this_thread::sleep_for(2ms);
  }
  CHECK(r.in_first(key(0)));
  CHECK(r.in_first(key(1)));
  CHECK_FALSE(r.in_first(key(2)));
  std::lock_guard lk(r.st.mu);
  CHECK(r.st.stats.prefetched == 2);
  const auto& e = *r.chain.first_index().find(key(1));
  CHECK(e.refs == 0);  // prefetch leaves its chunks unreferenced (evictable)
  CHECK(r.chain.first().data(r.chain.first_index().slot(e))[7] == std::byte(0x51));
}

TEST_CASE("async_path: nothing is pending without a GPU tier; a failed copy publishes nothing") {
  static_assert(!d::async_path<rig::chain_t>::enabled);
  using gchain = d::tier_chain<lru, test::emulated_gpu>;
  static_assert(d::async_path<gchain>::enabled);
  d::cache_state<1> st;
  gchain chain({test::emulated_gpu::config{4 * 4096}}, ctx);
  d::op_table ops(8, 4);
  d::writers<gchain> w(chain, st, fmt, 4);
  d::write_policy<gchain> pol(chain, st, w, kvtier::write_mode::write_through);
  d::async_path<gchain> a(chain, st, ops, pol, test::small_model.layers);
  auto& ix = chain.first_index();
  for (bool ok : {true, false}) {
    const std::uint32_t op = ops.acquire();
    d::chunk_ref* rs = ops.refs(op);
    {
      std::lock_guard lk(st.mu);
      for (std::size_t i = 0; i < 2; ++i) {
        d::index_entry* e = pol.allocate_first_locked();
        ix.insert_writing(*e, key(i + (ok ? 0 : 10)), chunk_tokens);
        rs[i] = {ix.slot(*e), 0, 1};
      }
      a.set_locked(op, {false, 0, 2, true});
      a.complete_locked(op, ok);
    }
    std::lock_guard lk(st.mu);
    CHECK((ix.find_ready(key(ok ? 0 : 10)) != nullptr) == ok);
    CHECK((ix.find_ready(key(ok ? 1 : 11)) != nullptr) == ok);
  }
  CHECK(st.stats.tiers[0].writes == 2);
  CHECK(st.stats.tiers[0].errors == 2);
  CHECK(ops.available() == 4);
  CHECK(ix.free_count() == 2);  // the failed store's entries were freed
}
