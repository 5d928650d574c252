// Fault injection into the disk tier's I/O (local_disk::config::faults): failed transfers,
// short transfers, a full device, torn records, bit flips in what a read brings in, and a device
// that hangs, at random under threads that store and load; every loaded byte is checked, and a
// restart over the same file (no faults) loads only exact chunks.
#include "stress.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using disk = kvtier::tier::local_disk;

using stress::N;

namespace {

using cache_t = kvtier::cache<o::chunk_tokens<N>, o::tiers<host, disk>>;
using stress::fill;
using stress::prompt;

// Each completed transfer, with probability 1/period per kind, becomes one fault.
class random_faults final : public disk::fault_hook {
 public:
  enum kind { eio, short_transfer, no_space, torn, bit_flip, hang, kinds };
  std::atomic<bool> on{true};
  std::array<std::atomic<std::uint64_t>, kinds> count{};
  std::atomic<std::uint64_t> transfers{0};

  void after(disk::io_op& op) noexcept override {
    ++transfers;
    if (!on || op.res != static_cast<long>(op.len)) return;
    thread_local std::mt19937 rng(
        static_cast<std::uint32_t>(std::hash<std::thread::id>{}(std::this_thread::get_id())));
    switch (rng() % 16) {
      case 0:
        op.res = -EIO;
        ++count[eio];
        break;
      case 1:
        op.res = static_cast<long>(op.len / 2);  // fewer bytes than asked, no error
        if (!op.write) {                         // and what was not read is not there
          std::memset(static_cast<unsigned char*>(op.buf) + op.len / 2, 0, op.len - op.len / 2);
        }
        ++count[short_transfer];
        break;
      case 2:
        // A full device, once the file has filled: the tier then stops using never-filled
        // slots and evicts instead (earlier, it would leave the disk tier nearly empty).
        if (op.write && transfers > 1500 && count[no_space] < 3) {
          op.res = -ENOSPC;
          ++count[no_space];
        }
        break;
      case 3:
        if (op.write && op.len >= 4096) {
          // The device kept something else: the first page it wrote (a header or a payload) is
          // garbage, yet it reports success. Reads must find the record torn.
          alignas(4096) static const std::array<unsigned char, 4096> junk = [] {
            std::array<unsigned char, 4096> j{};
            for (std::size_t i = 0; i < j.size(); ++i) j[i] = static_cast<unsigned char>(i * 7 + 3);
            return j;
          }();
          (void)::pwrite(op.fd, junk.data(), junk.size(), op.off);
          ++count[torn];
        }
        break;
      case 4:
        if (!op.write) {
          static_cast<unsigned char*>(op.buf)[rng() % op.len] ^= 0x10;  // the bytes read differ
          ++count[bit_flip];
        }
        break;
      case 5:
        if (rng() % 8 == 0) {
          std::this_thread::sleep_for(std::chrono::milliseconds(30));  // a device that stalls
          ++count[hang];
        }
        break;
      default:
        break;
    }
  }
};

}  // namespace

TEST_CASE("disk faults of every kind under threads: no wrong byte served, none after restart") {
  random_faults faults;
  const auto dir = test::temp_dir("faults");
  disk::config dc{.path = dir, .capacity_bytes = 40 * 8192};
  dc.faults = &faults;
  std::atomic<std::size_t> wrong{0}, loaded{0}, ops{0};
  {
    cache_t cache(test::small_model, test::small_salt, {{6 * 4096}, dc});
    std::vector<std::thread> pool;
    for (int w = 0; w < 3; ++w) {
      pool.emplace_back([&, w] {
        std::mt19937 rng(static_cast<std::uint32_t>(w + 1));
        test::engine<nhd> eng(test::small_model, 64, 1), want(test::small_model, 64, 0);
        for (int i = 0; i < 600; ++i) {
          const auto toks = prompt(rng() % 36);
          const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, rng());
          ++ops;
          if (rng() % 3 == 0) {
            fill(cache, eng, bt, toks);
            (void)cache.store(toks, eng.kv(), bt);
          } else {
            auto l = cache.lookup(toks);
            eng.wipe();
            const std::size_t n = cache.retrieve(l, eng.kv(), bt);
            fill(cache, want, bt, toks);
            if (!test::same_tokens(eng, bt, want, bt, 0, n)) ++wrong;
            loaded += n;
          }
        }
      });
    }
    for (auto& t : pool) t.join();
    cache.flush();
    const auto s = cache.stats();
    CHECK(s.tiers[1].errors > 0);      // corrupt and failed reads, counted
    CHECK(s.tiers[1].promotions > 0);  // and good ones served
  }
  CHECK(wrong == 0);
  CHECK(loaded > 0);
  for (std::size_t k = 0; k < random_faults::kinds; ++k) {
    INFO("fault kind " << k);
    CHECK(faults.count[k].load() > 0);
  }
  // A restart over the file, without faults: whatever was recovered loads exact or not at all.
  faults.on = false;
  std::size_t after = 0;
  {
    cache_t again(test::small_model, test::small_salt, {{64 * 4096}, dc});
    test::engine<nhd> eng(test::small_model, 64, 3), want(test::small_model, 64, 0);
    for (std::size_t p = 0; p < 36; ++p) {
      const auto toks = prompt(p);
      const auto bt = test::shuffled_table(test::blocks_for(toks.size(), 4), 64, 5);
      eng.wipe();
      auto l = again.lookup(toks);
      const std::size_t n = again.retrieve(l, eng.kv(), bt);
      fill(again, want, bt, toks);
      if (!test::same_tokens(eng, bt, want, bt, 0, n)) ++wrong;
      after += n;
    }
    MESSAGE("restart: " << again.stats().tiers[1].recovered << " records recovered, "
                        << again.stats().tiers[1].errors << " dropped at open or failed reads");
  }
  CHECK(wrong == 0);
  MESSAGE(ops.load() << " operations on 3 threads, " << faults.transfers.load()
                     << " transfers; faults: EIO " << faults.count[0].load() << ", short "
                     << faults.count[1].load() << ", ENOSPC " << faults.count[2].load() << ", torn "
                     << faults.count[3].load() << ", bit flips " << faults.count[4].load()
                     << ", stalls " << faults.count[5].load() << "; "
                     << (loaded.load() + after) * 128 << " bytes loaded and verified, "
                     << wrong.load() << " wrong");
}
