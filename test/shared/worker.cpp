// A process of the shared host tier's tests (started by test_shared with fork + exec):
//
//   worker run <segment> <seed> <iterations> <families> <shared bytes>
//       lookups, loads and stores of random prompts of a few families; every loaded byte and every
//       byte around it is checked against the reference model. iterations 0: until killed.
//       Prints "loads=N loaded=T stored=S wrong=W" and exits 3 when W > 0.
//   worker lease <segment> <family> <tokens> <shared bytes>
//       leases family's prompt for another process, prints "ticket=V chunks=C", then sleeps
//       until killed.
//   worker die-locked <segment> <shared bytes>
//       takes the segment's lock, starts reserving a slot, and SIGKILLs itself holding the lock.
//   worker die-writing <segment> <shared bytes>
//       reserves a slot for family 999's first chunk, copies half of it, and SIGKILLs itself.

#define DOCTEST_CONFIG_DISABLE  // support.hpp's checks are the tests'; a worker reports
#include "common.hpp"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>

using namespace shared_test;

namespace {

int run(const std::string& name, std::uint32_t seed, std::size_t iterations, std::uint32_t families,
        std::size_t shared_bytes) {
  cache_t cache(model, salt, configs(name, shared_bytes));
  engine_t e(model, engine_blocks, seed);
  std::mt19937 rng(seed);
  std::size_t loads = 0, loaded_total = 0, stored_total = 0, wrong = 0;
  for (std::size_t it = 0; iterations == 0 || it < iterations; ++it) {
    const std::uint32_t f = rng() % families;
    const std::size_t n = 16 + rng() % (max_prompt - 16);
    const auto toks = prompt(f, n);
    const auto bt = test::shuffled_table(test::blocks_for(n, model.block_size), engine_blocks,
                                         static_cast<std::uint32_t>(rng()));
    e.wipe(untouched);
    auto hit = cache.lookup(toks);
    const std::size_t got = cache.retrieve(hit, e.kv(), bt);
    ++loads;
    loaded_total += got;
    if (const std::size_t w = wrong_bytes(e, bt, f, got); w != 0) {
      // Which bytes: of the tokens reported loaded, or of blocks past them (a chunk that failed
      // its proof after it reached the engine's blocks).
      const std::size_t in_loaded = wrong_bytes(e, bt, f, got, n);
      std::fprintf(stderr,
                   "worker %u: load %zu of family %u: %zu of %zu tokens loaded, %zu wrong bytes "
                   "(%zu in the loaded tokens)\n",
                   seed, loads, f, got, n, w, in_loaded);
      wrong += w;
    }
    fill(e, bt, f, n);
    stored_total += cache.store(toks, e.kv(), bt);
    if (rng() % 8 == 0) cache.flush();
  }
  cache.flush();
  std::printf("loads=%zu loaded=%zu stored=%zu wrong=%zu\n", loads, loaded_total, stored_total,
              wrong);
  std::fflush(stdout);
  return wrong == 0 ? 0 : 3;
}

kvtier::shared_lookup<cache_t> attach(const std::string& name, std::size_t shared_bytes) {
  return kvtier::shared_lookup<cache_t>(model, salt, std::get<1>(configs(name, shared_bytes)));
}

int lease(const std::string& name, std::uint32_t family, std::size_t n, std::size_t shared_bytes) {
  auto view = attach(name, shared_bytes);
  const auto t = view.lease(prompt(family, n));
  std::printf("ticket=%llu chunks=%u\n", static_cast<unsigned long long>(t.value), t.chunks);
  std::fflush(stdout);
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// The raw structures of the segment `view` is attached to (what a crash can interrupt).
struct raw {
  kvtier::detail_shared::segment seg;
  kvtier::detail_shared::shared_index ix;
  explicit raw(kvtier::shared_lookup<cache_t>& view)
      : seg(view.handle().segment_name(), identity(view), kvtier::detail_shared::geometry{}, false,
            std::chrono::milliseconds(1000)),
        ix(seg) {}
  static kvtier::detail_shared::identity identity(kvtier::shared_lookup<cache_t>& view) {
    const auto f = kvtier::layout::chunk_format::from(model, cache_t::chunk_tokens, 2);
    return {view.salt_key(), f.fingerprint(), f.chunk_bytes()};
  }
};

int die_locked(const std::string& name, std::size_t shared_bytes) {
  auto view = attach(name, shared_bytes);
  raw r(view);
  if (!r.ix.lock(std::chrono::milliseconds(1000))) return 4;
  // Half of a reservation, made as reserve() makes one, by a process record of its own.
  auto& h = r.ix.hdr();
  const std::uint32_t me = r.ix.register_proc(kvtier::detail_shared::self_id());
  const std::uint32_t i = h.free_head;
  if (me != kvtier::detail_shared::nil && i != kvtier::detail_shared::nil) {
    h.free_head = r.ix.at(i).after;
    r.ix.at(i).writer = me;
    r.ix.at(i).writer_gen = r.seg.proc(me).gen;
    r.ix.at(i).state = kvtier::detail_shared::slot_state::writing;
  }
  std::raise(SIGKILL);
  return 5;
}

int die_writing(const std::string& name, std::size_t shared_bytes) {
  auto view = attach(name, shared_bytes);
  raw r(view);
  std::vector<kvtier::chunk_key> keys(1);
  kvtier::detail::chunker<16, kvtier::key::xxh3_hasher> ch(
      salt, kvtier::layout::chunk_format::from(model, 16, 2), false);
  ch.keys(prompt(999, 16), keys);
  if (!r.ix.lock(std::chrono::milliseconds(1000))) return 4;
  const std::uint32_t me = r.ix.register_proc(kvtier::detail_shared::self_id());
  const std::uint32_t slot = r.ix.reserve(keys[0], 16, me);
  r.ix.unlock();
  if (slot == kvtier::detail_shared::nil) return 6;
  std::memset(r.seg.data(slot), 0x5A, 1024);  // half of the 2048-byte chunk
  std::raise(SIGKILL);
  return 5;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: worker run|lease|die-locked|die-writing <segment> ...\n");
    return 2;
  }
  const std::string mode = argv[1], name = argv[2];
  auto arg = [&](int i) { return static_cast<std::size_t>(std::strtoull(argv[i], nullptr, 10)); };
  try {
    if (mode == "run" && argc == 7) {
      return run(name, static_cast<std::uint32_t>(arg(3)), arg(4),
                 static_cast<std::uint32_t>(arg(5)), arg(6));
    }
    if (mode == "lease" && argc == 6) {
      return lease(name, static_cast<std::uint32_t>(arg(3)), arg(4), arg(5));
    }
    if (mode == "die-locked" && argc == 4) return die_locked(name, arg(3));
    if (mode == "die-writing" && argc == 4) return die_writing(name, arg(3));
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "worker %s: %s\n", mode.c_str(), ex.what());
    return 1;
  }
  std::fprintf(stderr, "worker: bad arguments for %s\n", mode.c_str());
  return 2;
}
