// A tier chain an operator copies and edits: host memory, then the local NVMe disk, then a Redis
// (or Valkey) server shared by every engine replica, with each policy set and explained.
//
// Replica 1 stores a prompt; its disk takes it at once, Redis only once a lookup has hit it
// (admission). Replica 2, an engine with empty host memory and disk of its own, is served from
// Redis. Every loaded byte is checked; per-tier counters are printed after each step.
//
//   kvtier_operator_chain [host:port [scratch-directory]]   or KVTIER_REDIS=host:port
//   KVTIER_WRITE_MODE=write_back             the other write mode (default write_through)
#include "../common.hpp"

#include <kvtier/tier/redis.hpp>  // link kvtier::redis (hiredis); not part of kvtier.hpp

#include <chrono>
#include <cstdlib>
#include <numeric>

namespace {

using namespace std::chrono_literals;
using cache_t = kvtier::cache<
    kvtier::opt::chunk_tokens<64>,  // tokens per chunk: the unit of lookup, storage and reuse
    kvtier::opt::layout<example::layout>,
    kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk, kvtier::tier::redis>>;

// The model, cut small so the example runs in a moment: 4 KiB of KV per token, 256 KiB a chunk.
constexpr kvtier::model_shape model{
    .layers = 4, .kv_heads = 4, .head_size = 64, .dtype_size = 2, .block_size = 16};

// The chain's policies. Sizes here are tiny; the comments give what a real deployment sets.
cache_t::tier_configs operator_tiers(const std::filesystem::path& disk, const std::string& redis) {
  cache_t::tier_configs t;
  auto& host = std::get<0>(t);
  host.capacity_bytes = std::size_t{4} << 20;  // the slab: 16 chunks here; tens of GiB in use
  host.lock_memory = false;                    // true: mlock it (needs RLIMIT_MEMLOCK)
  host.prefault = true;                        // touch every page now, not on the first stores
  host.memory = nullptr;  // the engine's std::pmr::memory_resource (examples/engine_allocator)

  auto& ssd = std::get<1>(t);
  ssd.path = disk;                             // a directory on local NVMe
  ssd.capacity_bytes = std::size_t{16} << 20;  // file size limit; the LRU reuses slots past it
  ssd.sync = kvtier::tier::durability::none;   // each_batch: fdatasync before a chunk counts
  ssd.direct_io = true;                        // O_DIRECT: no second copy in the page cache
  ssd.use_io_uring = true;                     // false: the pread/pwrite thread pool
  ssd.queue_depth = 32;                        // segments in flight per batch
  ssd.segment_bytes = std::size_t{1} << 20;    // I/O size of one segment
  ssd.lanes = 4;                               // batches in flight at once
  ssd.admit_after_hits = 0;                    // take every chunk (SSD endurance: raise it)
  ssd.writers = 2;                             // threads writing records
  ssd.preallocate = true;                      // fallocate the whole file at open

  auto& net = std::get<2>(t);
  net.nodes = {redis};                // "host:port"; for a Redis Cluster: seed nodes, and
  net.cluster = false;                //   cluster = true
  net.connections = 4;                // pool per server, shared by engine threads and writers
  net.timeout = 200ms;                // connect and each reply; past it the server is "down"
  net.backoff_min = 20ms;             // a down server is skipped this long, doubling up to
  net.backoff_max = 2000ms;           //   backoff_max, then tried again
  net.ttl = std::chrono::hours(24);   // chunks expire after a day (PX); 0: never
  net.key_prefix = "kvtier-example";  // keys are <prefix>:<salt hex>:<chunk hex>
  net.admit_after_hits = 1;           // only chunks a lookup has hit once: spares the network
  net.writers = 2;                    // threads writing chunks
  return t;
}

kvtier::cache_config operator_config() {
  kvtier::cache_config c;
  c.max_tokens = 32768;          // the longest prompt the engine accepts
  c.max_inflight = 64;           // live leases + concurrent calls; beyond it a miss (stats().busy)
  c.write_queue_depth = 1024;    // chunks queued per lower tier; when full writes drop (counted)
  c.prefetch_queue_depth = 256;  // chunks prefetch() may have queued for loading
  c.write_hold_percent = 50;     // most host slots lower-tier writes in progress may hold
  c.store_partial_tail = false;  // true: also the last, partial chunk (a hit only when exact)
  // write_through: a lower tier gets a chunk when it is stored (or admitted). write_back: when
  // the host tier evicts it, and on flush(): less traffic, but a crash loses what was owed.
  const char* mode = std::getenv("KVTIER_WRITE_MODE");
  c.mode = mode && std::string(mode) == "write_back" ? kvtier::write_mode::write_back
                                                     : kvtier::write_mode::write_through;
  return c;
}

void print(const char* what, cache_t& cache) {
  std::printf("%s\n", what);
  example::print_tiers(cache.stats());
  const auto r = cache.tier<2>().stats();  // the Redis tier's own connection counters
  std::printf("  redis: %llu connects, %llu failures, %llu batches skipped (server down)\n",
              (unsigned long long)r.connects, (unsigned long long)r.failures,
              (unsigned long long)r.skipped);
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("KVTIER_REDIS");
  const std::string redis = argc > 1 ? argv[1] : env ? env : "127.0.0.1:6379";
  example::scratch_dir dir(argc > 2 ? argv[2] : nullptr, "kvtier-operator-chain");
  // The salt names what makes KV bytes interchangeable. The tenant is one per run here, so runs
  // against a shared server never see each other's chunks; clear() removes this run's at the end.
  const kvtier::salt salt{.model_id = "example/operator-chain@1",
                          .kv_dtype = "bf16",
                          .tenant = "run-" + std::to_string(::getpid())};
  example::checks check("operator_chain");
  example::paged_kv engine(model, 64);
  const auto prompt = example::tokens(8 * 64 + 10, 11);  // 8 full chunks and a 10-token tail
  const std::size_t full = 8 * 64;
  std::vector<std::int32_t> table(33);
  std::iota(table.begin(), table.end(), 7);
  const auto cfg = operator_config();
  std::printf("operator_chain: host -> local_disk -> redis at %s, %s\n", redis.c_str(),
              cfg.mode == kvtier::write_mode::write_back ? "write_back" : "write_through");

  cache_t replica1(model, salt, operator_tiers(dir.fresh("replica1-disk"), redis), cfg);
  engine.compute(prompt, table, 0, prompt.size());
  const std::size_t stored = replica1.store(prompt, engine.kv(), table);
  replica1.flush();
  print("replica 1: prefill, store, flush", replica1);
  check(stored == full, "stored %zu tokens", stored);
  check(replica1.stats().tiers[1].writes == 8, "local_disk took all 8 chunks (admit_after_hits 0)");
  check(replica1.stats().tiers[2].writes == 0, "redis took none yet (admit_after_hits 1)");

  // A second request with the same prefix, on replica 1: a hit in host memory.
  engine.scribble();
  auto lease = replica1.lookup(prompt);
  const std::size_t found = lease.tokens(), in_host = lease.hits_in(0);
  const std::size_t loaded = replica1.retrieve(lease, engine.kv(), table);
  replica1.flush();
  print("replica 1: lookup, retrieve, flush", replica1);
  check(found == full && in_host == 8, "lookup found %zu tokens, %zu chunks in host", found,
        in_host);
  check(loaded == full && engine.matches(prompt, table, 0, full),
        "retrieve loaded %zu tokens, byte-exact", loaded);
  check(replica1.stats().tiers[2].writes == 8, "the hit admitted all 8 chunks to redis");

  // Replica 2: another engine. Its host memory and disk are empty; Redis has the prompt.
  {
    cache_t replica2(model, salt, operator_tiers(dir.fresh("replica2-disk"), redis), cfg);
    engine.scribble();
    auto lease2 = replica2.lookup(prompt);
    const std::size_t found2 = lease2.tokens(), in_redis = lease2.hits_in(2);
    const std::size_t loaded2 = replica2.retrieve(lease2, engine.kv(), table);
    print("replica 2: lookup, retrieve", replica2);
    check(found2 == full && in_redis == 8, "lookup found %zu tokens, %zu chunks in redis", found2,
          in_redis);
    check(loaded2 == full && engine.matches(prompt, table, 0, full),
          "retrieve loaded %zu tokens from redis, byte-exact", loaded2);
    const auto s = replica2.stats();
    check(s.tiers[2].promotions == 8 && s.tiers[2].errors == 0,
          "8 chunks promoted from redis into host memory, no errors");
  }
  // Remove this run's chunks from every tier (Redis: SCAN and DEL of this salt's keys only).
  const std::size_t removed = replica1.clear();
  check(removed == 24, "clear() removed %zu chunk copies (8 each in host, disk and redis)",
        removed);
  return check.finish();
}
