// The local disk tier: write-through, promotion, capacity eviction, verification of every
// record read, recovery after a restart, and sharing across layouts through the disk.
#include "support.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using trt = kvtier::layout::trtllm_packed;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;
using C = kvtier::cache<o::chunk_tokens<16>, o::tiers<host, disk>>;

namespace {

constexpr std::size_t slot = 4096;  // one 16-token chunk of the small model, page-rounded
constexpr std::size_t record = 4096 + 4096;

// Flips one byte of the file at `off`.
void flip(const std::filesystem::path& f, off_t off) {
  const int fd = ::open(f.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  unsigned char b = 0;
  REQUIRE(::pread(fd, &b, 1, off) == 1);
  b ^= 0xff;
  REQUIRE(::pwrite(fd, &b, 1, off) == 1);
  ::close(fd);
}

// A cache whose host tier holds 4 chunks and whose disk holds 8.
struct fixture {
  std::filesystem::path dir = test::temp_dir("disk");
  C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
  test::engine<nhd> eng{test::small_model, 64, 1};
  std::vector<std::int32_t> bt = test::shuffled_table(16, 64, 3);

  // Stores 4 unrelated chunks, which evict everything else from the host tier (LRU), and
  // waits for write-through, so earlier chunks live only on disk.
  void push_out() {
    REQUIRE(cache.store(test::tokens(64, 999), eng.kv(), bt) == 64);
    cache.flush();
  }
};

}  // namespace

TEST_CASE("stores propagate to disk and disk hits are promoted and exact") {
  fixture f;
  const auto p = test::tokens(48, 1);
  CHECK(f.cache.store(p, f.eng.kv(), f.bt) == 48);
  f.cache.flush();
  auto s = f.cache.stats();
  CHECK(s.tiers[1].writes == 3);
  CHECK(s.tiers[1].bytes_written == 3 * f.cache.format().bytes(16));
  CHECK(s.tiers[1].used_chunks == 3);
  CHECK(f.cache.lookup(p).hits_in(0) == 3);  // still in host memory
  f.push_out();
  CHECK(f.cache.stats().tiers[0].evictions == 3);
  auto l = f.cache.lookup(p);
  CHECK(l.tokens() == 48);
  CHECK(l.hits_in(1) == 3);
  test::engine<nhd> dst(test::small_model, 64, 2);
  const auto bt2 = test::shuffled_table(16, 64, 4);
  CHECK(f.cache.retrieve(l, dst.kv(), bt2) == 48);
  CHECK(test::same_tokens(f.eng, f.bt, dst, bt2, 0, 48));
  s = f.cache.stats();
  CHECK(s.tiers[1].promotions == 3);
  CHECK(f.cache.lookup(p).hits_in(0) == 3);  // promoted into host memory
  CHECK(s.tiers[1].errors == 0);
}

TEST_CASE("the disk tier evicts at its capacity") {
  fixture f;
  for (std::uint32_t i = 0; i < 12; ++i) {
    CHECK(f.cache.store(test::tokens(16, 100 + i), f.eng.kv(), f.bt) == 16);
    f.cache.flush();
  }
  const auto s = f.cache.stats();
  CHECK(s.tiers[1].capacity_chunks == 8);
  CHECK(s.tiers[1].used_chunks == 8);
  CHECK(s.tiers[1].evictions == 4);
  CHECK(f.cache.lookup(test::tokens(16, 100)).tokens() == 0);  // oldest gone
  CHECK(f.cache.lookup(test::tokens(16, 111)).tokens() == 16);
}

TEST_CASE("a corrupt payload on disk is a miss and a counted error, never data") {
  fixture f;
  const auto p = test::tokens(32, 1);
  REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 32);
  f.cache.flush();
  f.push_out();
  flip(f.cache.tier<1>().file(), 4096 + 100);  // chunk 0's record is in disk slot 0
  test::engine<nhd> dst(test::small_model, 64, 2);
  const auto before = dst.storage;
  auto l = f.cache.lookup(p);
  REQUIRE(l.tokens() == 32);
  REQUIRE(l.hits_in(1) == 2);
  CHECK(f.cache.retrieve(l, dst.kv(), f.bt) == 0);  // stops at the bad first chunk
  CHECK(dst.storage == before);                     // nothing served
  const auto s = f.cache.stats();
  CHECK(s.tiers[1].errors == 1);
  CHECK(s.tiers[1].used_chunks == 5);  // the bad record was dropped (2 + 4 filler - 1)
  CHECK(f.cache.lookup(p).tokens() == 0);
}

TEST_CASE("a corrupt record header is a miss and a counted error") {
  // magic, key, salt, tokens, payload checksum, header checksum
  for (off_t off : {off_t{0}, off_t{20}, off_t{40}, off_t{57}, off_t{75}, off_t{80}}) {
    CAPTURE(off);
    fixture f;
    const auto p = test::tokens(32, 1);
    REQUIRE(f.cache.store(p, f.eng.kv(), f.bt) == 32);
    f.cache.flush();
    f.push_out();
    flip(f.cache.tier<1>().file(), off);
    test::engine<nhd> dst(test::small_model, 64, 2);
    const auto before = dst.storage;
    auto l = f.cache.lookup(p);
    CHECK(f.cache.retrieve(l, dst.kv(), f.bt) == 0);
    CHECK(dst.storage == before);
    CHECK(f.cache.stats().tiers[1].errors == 1);
  }
}

TEST_CASE("a record moved to another slot is not served for the other key") {
  fixture f;
  const auto a = test::tokens(16, 1), b = test::tokens(16, 2), c = test::tokens(16, 3);
  f.cache.store(a, f.eng.kv(), f.bt);
  f.cache.flush();
  f.cache.store(b, f.eng.kv(), f.bt);
  f.cache.flush();
  f.cache.store(c, f.eng.kv(), f.bt);
  f.cache.flush();
  f.push_out();
  // Copy a's whole record over b's slot (slot 1): valid record, wrong key for slot 1.
  const auto file = f.cache.tier<1>().file();
  std::vector<char> rec(record);
  const int fd = ::open(file.c_str(), O_RDWR);
  REQUIRE(::pread(fd, rec.data(), record, 0) == static_cast<ssize_t>(record));
  REQUIRE(::pwrite(fd, rec.data(), record, record) == static_cast<ssize_t>(record));
  ::close(fd);
  auto l = f.cache.lookup(b);
  REQUIRE(l.hits_in(1) == 1);
  test::engine<nhd> dst(test::small_model, 64, 2);
  CHECK(f.cache.retrieve(l, dst.kv(), f.bt) == 0);
  CHECK(f.cache.stats().tiers[1].errors == 1);
}

TEST_CASE("a restarted cache rebuilds its disk index and drops torn records") {
  const auto dir = test::temp_dir("restart");
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(64, 1);
  {
    C cache(test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}});
    REQUIRE(cache.store(p, eng.kv(), bt) == 64);
  }  // destruction finishes the write-through
  std::filesystem::path file;
  {
    C cache(test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}});
    const auto s = cache.stats();
    CHECK(s.tiers[1].recovered == 4);
    CHECK(s.tiers[1].errors == 0);
    auto l = cache.lookup(p);
    CHECK(l.tokens() == 64);
    test::engine<nhd> dst(test::small_model, 64, 2);
    CHECK(cache.retrieve(l, dst.kv(), bt) == 64);
    CHECK(test::same_tokens(eng, bt, dst, bt, 0, 64));
    file = cache.tier<1>().file();
  }
  flip(file, 2 * record + 30);  // tear the third record's header
  {
    C cache(test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}});
    const auto s = cache.stats();
    CHECK(s.tiers[1].recovered == 3);
    CHECK(s.tiers[1].errors == 1);
    CHECK(cache.lookup(p).tokens() == 32);  // the prefix before the torn chunk
  }
  {  // Another salt never sees these records (its own file).
    kvtier::salt other = test::small_salt;
    other.tenant = "someone-else";
    C cache(test::small_model, other, {{slot}, {dir, 8 * record}});
    CHECK(cache.stats().tiers[1].recovered == 0);
    CHECK(cache.lookup(p).tokens() == 0);
  }
}

TEST_CASE("a chunk stored from vLLM NHD loads into a TensorRT-LLM pool through the disk") {
  const auto dir = test::temp_dir("xlayout");
  const auto p = test::tokens(48, 8);
  test::engine<nhd> a(test::small_model, 64, 1);
  const auto ta = test::shuffled_table(12, 64, 2);
  {
    kvtier::cache<o::chunk_tokens<16>, o::tiers<host, disk>, o::layout<nhd>> vllm(
        test::small_model, test::small_salt, {{8 * slot}, {dir, 8 * record}});
    REQUIRE(vllm.store(p, a.kv(), ta) == 48);
  }
  kvtier::cache<o::chunk_tokens<16>, o::tiers<host, disk>, o::layout<trt>> trtllm(
      test::small_model, test::small_salt, {{8 * slot}, {dir, 8 * record}});
  test::engine<trt> b(test::small_model, 64, 3);
  const auto tb = test::shuffled_table(12, 64, 4);
  auto l = trtllm.lookup(p);
  REQUIRE(l.tokens() == 48);
  CHECK(l.hits_in(1) == 3);
  CHECK(trtllm.retrieve(l, b.kv(), tb) == 48);
  CHECK(test::same_tokens(a, ta, b, tb, 0, 48));
}

TEST_CASE("a disk directory that cannot be written is a tier_error naming it") {
  if (::geteuid() == 0) {
    // root ignores permissions: use a path under a regular file instead.
    const auto dir = test::temp_dir("unwritable");
    const auto file = dir / "file";
    {
      std::FILE* fp = std::fopen(file.c_str(), "w");
      std::fclose(fp);
    }
    const auto bad = file / "sub";
    CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{slot}, {bad, 8 * record}}),
                         test::contains(bad.string()), kvtier::tier_error);
  } else {
    const auto dir = test::temp_dir("unwritable");
    ::chmod(dir.c_str(), 0500);
    CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{slot}, {dir, 8 * record}}),
                         test::contains(dir.string()), kvtier::tier_error);
    ::chmod(dir.c_str(), 0700);
  }
}

TEST_CASE("two caches cannot use one disk file at once") {
  const auto dir = test::temp_dir("locked");
  C first(test::small_model, test::small_salt, {{slot}, {dir, 8 * record}});
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{slot}, {dir, 8 * record}}),
                       doctest::Contains("in use by another cache"), kvtier::tier_error);
}

TEST_CASE("disk capacity below one record is rejected, naming it") {
  const auto dir = test::temp_dir("small");
  CHECK_THROWS_WITH_AS(C(test::small_model, test::small_salt, {{slot}, {dir, 5000}}),
                       doctest::Contains("capacity_bytes 5000"), kvtier::invalid_argument);
}

TEST_CASE("a chunk cleared while its write-through is queued is not written to disk") {
  const auto dir = test::temp_dir("clear-queued");
  kvtier::cache_config cfg;
  cfg.write_queue_depth = 64;
  C cache(test::small_model, test::small_salt, {{16 * slot}, {dir, 64 * record}}, cfg);
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 3);
  // Many chunks queued at once; clear them right away. Whatever the worker had not started yet
  // must not appear on disk afterwards.
  std::vector<std::vector<kvtier::token_id>> ps;
  for (std::uint32_t i = 0; i < 12; ++i) ps.push_back(test::tokens(16, 500 + i));
  for (const auto& p : ps) REQUIRE(cache.store(p, eng.kv(), bt) == 16);
  std::size_t cleared = 0;
  for (const auto& p : ps) cleared += cache.clear(p) / 16;
  cache.flush();
  std::size_t on_disk = 0;
  for (const auto& p : ps) on_disk += cache.lookup(p).hits_in(1);
  // A chunk was either already on disk when cleared (removed there too), or never written.
  CHECK(cleared == 12);
  CHECK(on_disk == 0);
  CHECK(cache.stats().tiers[1].used_chunks == 0);
}

// Issue 16, item 2: pins belonged to tiers, not to their holders. A pin taken while the chunk
// was only on disk, then unpinned after the chunk was promoted, dropped another caller's host
// pin, and two stores later that caller's pinned chunk was evicted. A pin now covers the chunk
// in every tier, including the ones it reaches later, so each unpin undoes exactly one pin.
TEST_CASE("an unpin undoes its own pin, not another holder's, across a promotion") {
  fixture f;
  const auto x = test::tokens(16, 7);
  REQUIRE(f.cache.store(x, f.eng.kv(), f.bt) == 16);
  f.cache.flush();
  f.push_out();
  REQUIRE(f.cache.lookup(x).hits_in(1) == 1);  // only on disk now
  auto a = f.cache.pin(x);                     // holder A, while the chunk is on disk only
  CHECK(a.tokens() == 16);
  {
    auto l = f.cache.lookup(x);  // promoted into the host tier by the retrieve
    test::engine<nhd> dst(test::small_model, 64, 5);
    REQUIRE(f.cache.retrieve(l, dst.kv(), f.bt) == 16);
  }
  REQUIRE(f.cache.lookup(x).hits_in(0) == 1);
  auto b = f.cache.pin(x);  // holder B, with the chunk in the host tier
  CHECK(b.tokens() == 16);
  CHECK(f.cache.unpin(a) == 16);  // A lets go
  // Two stores of 4 chunks each would evict every unpinned host chunk.
  for (std::uint32_t s = 1001; s <= 1002; ++s) {
    f.cache.store(test::tokens(64, s), f.eng.kv(), f.bt);
    f.cache.flush();
  }
  CHECK(f.cache.lookup(x).hits_in(0) == 1);  // B's pin still holds it in host memory
  CHECK(f.cache.unpin(b) == 16);             // B lets go
  CHECK(f.cache.unpin(b) == 0);              // nothing left to undo
  for (std::uint32_t s = 1003; s <= 1004; ++s) {
    f.cache.store(test::tokens(64, s), f.eng.kv(), f.bt);
    f.cache.flush();
  }
  CHECK(f.cache.lookup(x).hits_in(0) == 0);  // unpinned everywhere: evicted as usual
}

// A pin lost with its chunk: the chunk's only copy (on disk) fails verification and is discarded
// while A holds a pin on it. Stored again and pinned by B, it is a new chunk: A's unpin must not
// take B's pin (without the pin table's lost marks, it dropped B's only pin and the chunk was
// evicted by the next stores).
TEST_CASE("a pin whose chunk was discarded as corrupt does not undo a later holder's pin") {
  fixture f;
  const auto x = test::tokens(16, 7);
  REQUIRE(f.cache.store(x, f.eng.kv(), f.bt) == 16);
  f.cache.flush();
  f.push_out();
  auto a = f.cache.pin(x);  // holder A, the chunk on disk only
  REQUIRE(a.tokens() == 16);
  flip(f.cache.tier<1>().file(), 4096 + 100);  // its record is in disk slot 0
  {
    auto l = f.cache.lookup(x);
    test::engine<nhd> dst(test::small_model, 64, 5);
    REQUIRE(f.cache.retrieve(l, dst.kv(), f.bt) == 0);  // corrupt: discarded, pins and all
  }
  REQUIRE(f.cache.lookup(x).tokens() == 0);
  REQUIRE(f.cache.store(x, f.eng.kv(), f.bt) == 16);
  auto b = f.cache.pin(x);  // holder B, on the new copy
  REQUIRE(b.tokens() == 16);
  CHECK(f.cache.unpin(a) == 16);
  for (std::uint32_t s = 1001; s <= 1002; ++s) {
    f.cache.store(test::tokens(64, s), f.eng.kv(), f.bt);
    f.cache.flush();
  }
  CHECK(f.cache.lookup(x).hits_in(0) == 1);  // B's pin holds it in host memory
  CHECK(f.cache.unpin(b) == 16);
}

TEST_CASE("a disk copy written after a pin is pinned too, and the unpin releases both") {
  const auto dir = test::temp_dir("disk-pin");
  // The disk takes a chunk only once a lookup hit it: the write comes after the pin.
  C cache{
      test::small_model,
      test::small_salt,
      {{4 * slot}, disk::config{.path = dir, .capacity_bytes = 8 * record, .admit_after_hits = 1}}};
  test::engine<nhd> eng{test::small_model, 64, 1};
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto x = test::tokens(16, 8);
  REQUIRE(cache.store(x, eng.kv(), bt) == 16);
  auto pin = cache.pin(x);
  REQUIRE(pin.tokens() == 16);
  cache.flush();
  REQUIRE(cache.stats().tiers[1].writes == 0);
  REQUIRE(cache.lookup(x).hits_in(0) == 1);  // the hit that admits it
  cache.flush();
  REQUIRE(cache.stats().tiers[1].writes == 1);
  kvtier::chunk_key k;
  REQUIRE(cache.keys(x, {&k, 1}) == 1);
  auto pins = [&](auto& ix) {
    const auto* e = ix.find_ready(k);
    return e ? e->pins : 99u;
  };
  CHECK(pins(cache.tier<0>().index()) == 1);
  CHECK(pins(cache.tier<1>().index()) == 1);  // was 0: the disk copy was evictable
  CHECK(cache.unpin(pin) == 16);
  CHECK(pins(cache.tier<0>().index()) == 0);
  CHECK(pins(cache.tier<1>().index()) == 0);
  CHECK(cache.unpin(pin) == 0);
}

// Issue 16, item 5: a clear lasts on disk. clear(tokens) and clear() used to drop only the disk
// tier's index entries, leaving intact records that a cache rebuilt over the same directory
// recovered and hit again. The cleared records are now invalidated (their header pages zeroed)
// before their slots are reused.
TEST_CASE("a clear lasts across a restart, and a chunk stored again after it is one record") {
  const auto dir = test::temp_dir("disk-clear");
  test::engine<nhd> eng{test::small_model, 64, 1};
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(48, 11), q = test::tokens(32, 12), r = test::tokens(16, 13);
  const std::vector<kvtier::token_id> p1(p.begin(), p.begin() + 16);
  {
    C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
    for (const auto* t : {&p, &q, &r}) {  // each written through before the next
      REQUIRE(cache.store(*t, eng.kv(), bt) == t->size());
      cache.flush();
    }
    REQUIRE(cache.stats().tiers[1].used_chunks == 6);
    CHECK(cache.clear(p1) == 16);  // p's first chunk, from the host tier and the disk
    CHECK(cache.clear(q) == 32);
    REQUIRE(cache.store(r, eng.kv(), bt) == 16);  // still held: nothing new
    cache.clear(r);
    REQUIRE(cache.store(r, eng.kv(), bt) == 16);  // stored again after its clear
    cache.flush();
  }
  C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
  const auto s = cache.stats();
  CHECK(s.tiers[1].recovered == 3);      // p's last two chunks and r, once
  CHECK(s.tiers[1].errors == 0);         // r's two records (if both remained) are no error
  CHECK(cache.lookup(p).tokens() == 0);  // the prefix starts with the cleared chunk
  CHECK(cache.lookup(q).tokens() == 0);
  auto l = cache.lookup(r);
  CHECK(l.hits_in(1) == 1);
  test::engine<nhd> dst(test::small_model, 64, 5);
  CHECK(cache.retrieve(l, dst.kv(), bt) == 16);
  CHECK(test::same_tokens(eng, bt, dst, bt, 0, 16));
  // clear() of everything lasts too.
  cache.clear();
  cache.flush();
}

TEST_CASE("clear() of every chunk lasts across a restart") {
  const auto dir = test::temp_dir("disk-clear-all");
  test::engine<nhd> eng{test::small_model, 64, 1};
  const auto bt = test::shuffled_table(16, 64, 3);
  {
    C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
    REQUIRE(cache.store(test::tokens(64, 21), eng.kv(), bt) == 64);
    cache.flush();
    CHECK(cache.clear() == 8);  // 4 chunks in host memory and on disk
  }
  C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
  CHECK(cache.stats().tiers[1].recovered == 0);
  CHECK(cache.lookup(test::tokens(64, 21)).tokens() == 0);
}

// Issue 16, item 4: disk edge cases.
TEST_CASE("recovery rejects a whole header over a payload the file does not hold") {
  const auto dir = test::temp_dir("disk-short");
  test::engine<nhd> eng{test::small_model, 64, 1};
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto x = test::tokens(16, 31);
  std::filesystem::path file;
  {
    C cache{test::small_model,
            test::small_salt,
            {{4 * slot},
             disk::config{.path = dir, .capacity_bytes = 8 * record, .preallocate = false}}};
    REQUIRE(cache.store(x, eng.kv(), bt) == 16);
    cache.flush();
    file = cache.tier<1>().file();
  }
  // As a write cut short by a full filesystem leaves it: the header, and 100 payload bytes.
  std::filesystem::resize_file(file, 4096 + 100);
  C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
  const auto s = cache.stats();
  CHECK(s.tiers[1].recovered == 0);  // was 1: a hit that then failed to read
  CHECK(s.tiers[1].errors == 1);
  CHECK(cache.lookup(x).tokens() == 0);
}

TEST_CASE("a disk path with an embedded NUL is refused, not truncated") {
  const auto dir = test::temp_dir("disk-nul");
  const std::string bad = dir.string() + std::string("\0/elsewhere", 11);
  CHECK_THROWS_WITH_AS(
      C(test::small_model, test::small_salt, {{4 * slot}, {bad, 8 * record}}),
      test::contains("has a NUL byte at offset " + std::to_string(dir.string().size())),
      kvtier::invalid_argument);
}

TEST_CASE("a leased disk chunk that is cleared stays readable until the lease ends") {
  const auto dir = test::temp_dir("disk-clear-lease");
  test::engine<nhd> eng{test::small_model, 64, 1};
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto x = test::tokens(16, 41);
  {
    C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
    REQUIRE(cache.store(x, eng.kv(), bt) == 16);
    cache.flush();
    REQUIRE(cache.store(test::tokens(64, 42), eng.kv(), bt) == 64);  // x only on disk now
    cache.flush();
    auto l = cache.lookup(x);
    REQUIRE(l.hits_in(1) == 1);
    CHECK(cache.clear(x) == 16);
    cache.flush();  // the record is not invalidated under the lease
    test::engine<nhd> dst(test::small_model, 64, 5);
    CHECK(cache.retrieve(l, dst.kv(), bt) == 16);
    CHECK(test::same_tokens(eng, bt, dst, bt, 0, 16));
    CHECK(cache.stats().tiers[1].errors == 0);
    cache.flush();  // now it is
  }
  C cache{test::small_model, test::small_salt, {{4 * slot}, {dir, 8 * record}}};
  CHECK(cache.stats().tiers[1].recovered == 4);  // the other four chunks, not x
  CHECK(cache.lookup(x).tokens() == 0);
}
