#pragma once
// kvtier-bench tier: store, lookup and load throughput and latency of a tier stack, each as a
// ratio to the stack's limit measured in the same run.

#include "common.hpp"
#include "disk_raw.hpp"
#include "redis_raw.hpp"

#include <numeric>
#include <optional>
#include <random>
#include <thread>

namespace bench {

struct tier_options {
  kvtier::model_shape model{8, 8, 128, 2, 16};
  std::string layout = "nhd";
  std::string stack = "host";            ///< host, disk (host + local_disk) or redis (host + redis)
  std::string redis = "127.0.0.1:6379";  ///< server of the redis stack
  std::string disk_io = "uring";         ///< the disk tier's backend: uring or threads
  std::size_t segment = 1u << 20;        ///< the disk tier's segment_bytes
  unsigned queue_depth = 32;             ///< the disk tier's queue_depth
  std::filesystem::path dir = "/tmp/kvtier-bench";
  std::size_t keys = 32;     ///< distinct chunks per run
  std::size_t batch = 4;     ///< chunks per store / lookup / load call
  std::size_t inflight = 1;  ///< concurrent callers
  std::string only;          ///< store, lookup, load, or empty for all
  bool verify = true;
  int iters = 3;
};

/// The engine of one benchmark: every prompt has its own blocks, so all can be stored at once.
template <class L>
struct bench_engine {
  std::vector<std::int64_t> shape;
  std::vector<std::unique_ptr<aligned_buffer>> tensors;
  std::vector<void*> ptrs;
  bench_engine(const kvtier::model_shape& m, std::int64_t blocks, std::uint64_t seed) {
    const auto s = kvtier::layout::shape_of<L>(m, blocks);
    shape.assign(s.begin(), s.end());
    std::size_t bytes = m.dtype_size;
    for (auto d : shape) bytes *= static_cast<std::size_t>(d);
    std::mt19937_64 rng(seed);
    for (std::size_t t = 0; t < kvtier::layout::tensor_count(L::scope, m); ++t) {
      tensors.push_back(std::make_unique<aligned_buffer>(bytes));
      auto* w = reinterpret_cast<std::uint64_t*>(tensors.back()->data);
      for (std::size_t i = 0; i < bytes / 8; ++i) w[i] = seed ? rng() : 0;
      ptrs.push_back(tensors.back()->data);
    }
  }
  [[nodiscard]] kvtier::engine_kv kv() const { return {ptrs, shape}; }
  [[nodiscard]] bool same_as(const bench_engine& o) const {
    for (std::size_t t = 0; t < tensors.size(); ++t)
      if (std::memcmp(tensors[t]->data, o.tensors[t]->data, tensors[t]->size) != 0) return false;
    return true;
  }
  void evict_all() const {
    for (const auto& t : tensors) evict(t->data, t->size);
  }
};

enum class stack_kind { host, disk, redis };

template <stack_kind S>
struct stack_tiers {
  using type = kvtier::opt::tiers<kvtier::tier::host>;
};
template <>
struct stack_tiers<stack_kind::disk> {
  using type = kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk>;
};
#ifdef KVTIER_BENCH_REDIS
template <>
struct stack_tiers<stack_kind::redis> {
  using type = kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::redis>;
};
#endif

template <class L, std::size_t N, stack_kind S>
void run_tier(const tier_options& o, report& rep) {
  constexpr bool Disk = S == stack_kind::disk;
  constexpr bool Lower = S != stack_kind::host;  // loads come from the lower tier
  using tiers = typename stack_tiers<S>::type;
  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<N>, kvtier::opt::layout<L>, tiers>;
  const auto& m = o.model;
  const std::size_t batch = std::max<std::size_t>(1, o.batch);
  const std::size_t prompts = std::max<std::size_t>(1, o.keys / batch);
  const std::size_t chunks = prompts * batch;
  const std::size_t ptoks = batch * N;
  const auto f = kvtier::layout::chunk_format::from(m, N, kvtier::layout::traits<L>::kv_planes);
  const std::size_t chunk_bytes = f.chunk_bytes();
  const std::size_t slot = kvtier::memory::slab::round_up(chunk_bytes, 4096);
  const std::size_t bpp = ptoks / m.block_size;  // blocks per prompt
  const auto blocks = static_cast<std::int64_t>(prompts * bpp);

  bench_engine<L> src(m, blocks, 1), dst(m, blocks, 0);
  std::vector<std::vector<std::int32_t>> tables(prompts);
  std::vector<std::int32_t> all(static_cast<std::size_t>(blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(7));
  std::vector<std::vector<kvtier::token_id>> toks(prompts);
  std::mt19937 rng(11);
  for (std::size_t p = 0; p < prompts; ++p) {
    tables[p].assign(all.begin() + static_cast<std::ptrdiff_t>(p * bpp),
                     all.begin() + static_cast<std::ptrdiff_t>((p + 1) * bpp));
    toks[p].resize(ptoks);
    for (auto& t : toks[p]) t = static_cast<kvtier::token_id>(rng() % 128000);
  }

  const kvtier::salt salt{"kvtier-bench", "bf16", 0, 1, ""};
  kvtier::cache_config cfg;
  cfg.max_tokens = ptoks;
  cfg.max_inflight = std::max<std::size_t>(64, 2 * o.inflight);
  cfg.write_queue_depth = chunks + 16;
  const std::filesystem::path dir = o.dir / ("run-" + std::to_string(::getpid()));
  // Stores go through a host tier that holds every chunk. For the disk stack, loads then come
  // from a second cache over the same directory (its index rebuilt from the records) whose host
  // tier is too small to keep anything, with the file dropped from the page cache: every loaded
  // chunk is read from the device and verified.
  auto configs = [&](std::size_t host_slots) {
    typename cache_t::tier_configs tc{};
    std::get<0>(tc).capacity_bytes = host_slots * slot;
    if constexpr (Disk) {
      std::get<1>(tc).path = dir;
      std::get<1>(tc).capacity_bytes = (chunks + 8) * (slot + 4096);
      std::get<1>(tc).use_io_uring = o.disk_io == "uring";
      std::get<1>(tc).segment_bytes = o.segment;
      std::get<1>(tc).queue_depth = o.queue_depth;
    }
#ifdef KVTIER_BENCH_REDIS
    if constexpr (S == stack_kind::redis) {
      std::get<1>(tc).nodes = {o.redis};
      std::get<1>(tc).key_prefix = "kvtier-bench-" + std::to_string(::getpid());
      std::get<1>(tc).timeout = std::chrono::milliseconds(10000);
    }
#endif
    return tc;
  };
  const auto store_tiers = configs(chunks + batch * o.inflight);
  const auto load_tiers = configs(Lower ? 2 * batch * o.inflight : chunks + batch * o.inflight);

  // Runs fn(prompt) for every prompt across o.inflight threads; per-call latencies, and the wall
  // time from releasing the threads to the last call's end.
  auto run = [&](auto&& fn, std::vector<double>& lat) {
    std::vector<std::vector<double>> per(o.inflight);
    std::atomic<std::size_t> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> th;
    for (std::size_t t = 0; t < o.inflight; ++t) {
      th.emplace_back([&, t] {
        ++ready;
        while (!go.load(std::memory_order_acquire)) {
        }
        for (std::size_t p = t; p < prompts; p += o.inflight) {
          const auto c0 = clock_type::now();
          fn(p);
          per[t].push_back(seconds_since(c0));
        }
      });
    }
    while (ready.load() < o.inflight) {
    }
    const auto t0 = clock_type::now();
    go.store(true, std::memory_order_release);
    for (auto& x : th) x.join();
    const double wall = seconds_since(t0);
    for (auto& v : per) lat.insert(lat.end(), v.begin(), v.end());
    return wall;
  };
  auto evict_slab = [](auto& c) {
    const auto& r = c.template tier<0>().slab().memory();
    evict(r.data(), r.size());
  };

  std::vector<double> lat_store, lat_lookup, lat_load;
  double best_store = 1e30, best_lookup = 1e30, best_load = 1e30;
  bool verified = true;
  std::size_t from_disk = 0, loaded_total = 0;
  progress bar(std::string("tier ") + L::name, static_cast<std::size_t>(o.iters));
  std::optional<cache_t> cache;
  for (int it = 0; it < o.iters; ++it) {
    if (Lower || !cache) {
      cache.reset();
      std::filesystem::remove_all(dir);
      cache.emplace(m, salt, store_tiers, cfg);
    }
    cache->clear();
    src.evict_all();
    evict_slab(*cache);
    std::atomic<std::size_t> short_store{0};
    double w = run(
        [&](std::size_t p) {
          if (cache->store(toks[p], src.kv(), tables[p]) != ptoks) ++short_store;
        },
        lat_store);
    if constexpr (Lower) {
      const auto t0 = clock_type::now();
      cache->flush();
      w += seconds_since(t0);
      if (cache->stats().tiers[1].writes != chunks) {
        throw std::runtime_error("the lower tier did not take every stored chunk");
      }
      cache.reset();  // writes finished; the next cache finds the records below
      cache.emplace(m, salt, load_tiers, cfg);
      if (Disk && cache->stats().tiers[1].recovered != chunks) {
        throw std::runtime_error("the disk tier did not hold every stored chunk");
      }
    }
    best_store = std::min(best_store, w);
    if (short_store) throw std::runtime_error("a store did not fit: raise capacity");
    best_lookup = std::min(best_lookup,
                           run([&](std::size_t p) { cache->lookup(toks[p]).reset(); }, lat_lookup));
    if constexpr (Disk) drop_page_cache(cache->template tier<1>().file());
    dst.evict_all();
    evict_slab(*cache);
    std::atomic<std::size_t> disk_hits{0}, loaded{0};
    best_load = std::min(best_load, run(
                                        [&](std::size_t p) {
                                          auto l = cache->lookup(toks[p]);
                                          if constexpr (Lower) disk_hits += l.hits_in(1);
                                          loaded += cache->retrieve(l, dst.kv(), tables[p]);
                                        },
                                        lat_load));
    from_disk += disk_hits;
    loaded_total += loaded;
    if (o.verify && (loaded != prompts * ptoks || !dst.same_as(src))) verified = false;
    bar.step();
  }
  std::string backend;
  if constexpr (Disk) backend = cache->template tier<1>().io_backend();
  if constexpr (S == stack_kind::redis) cache->clear();  // leaves the server as it found it
  cache.reset();
  if constexpr (Disk) std::filesystem::remove_all(dir);

  const double bytes = static_cast<double>(chunks * chunk_bytes);
  double limit_w = 0, limit_r = 0;
  if constexpr (Disk) {
    // The device's best: raw O_DIRECT swept over request size and threads (disk_raw.hpp).
    const disk_limit l =
        raw_disk_limit(o.dir, chunks * (slot + 4096), std::min(o.iters, 2), slot + 4096);
    limit_w = l.write_gbps;
    limit_r = l.read_gbps;
  } else if constexpr (S == stack_kind::redis) {
#ifdef KVTIER_BENCH_REDIS
    // The raw RESP client's best over connections and pipeline depth (redis_raw.hpp), values of
    // the record's size.
    const redis_limit l = raw_redis_limit(
        o.redis, sizeof(kvtier::detail::record_header) + chunk_bytes, chunks, std::min(o.iters, 2));
    limit_w = l.set_gbps;
    limit_r = l.get_gbps;
    // The limit counts value bytes; the tier's rate counts payload bytes: compare like bytes.
    const double scale = static_cast<double>(chunk_bytes) /
                         static_cast<double>(sizeof(kvtier::detail::record_header) + chunk_bytes);
    limit_w *= scale;
    limit_r *= scale;
#endif
  } else {
    limit_w = limit_r = host_copy_limit(chunk_bytes, chunks, o.iters, o.inflight);
  }
  const std::string stack = Disk ? "host+disk" : (Lower ? "host+redis" : "host");
  auto add = [&](const char* op, double best, const std::vector<double>& lat, double limit) {
    if (!o.only.empty() && o.only != op) return;
    std::vector<std::pair<std::string, cell>> r{
        {"layout", std::string(L::name)},
        {"chunk", static_cast<double>(N)},
        {"stack", stack},
        {"op", std::string(op)},
        {"calls/s", static_cast<double>(prompts) / best},
        {"GB/s", std::string(op) == "lookup" ? cell(std::string("-")) : cell(bytes / best / 1e9)},
        {"p50 us", percentile(lat, 0.5) * 1e6},
        {"p99 us", percentile(lat, 0.99) * 1e6},
    };
    if (limit > 0) {
      r.emplace_back("limit GB/s", limit);
      r.emplace_back("ratio", bytes / best / 1e9 / limit);
    }
    rep.row(std::move(r));
  };
  add("store", best_store, lat_store, limit_w);
  add("lookup", best_lookup, lat_lookup, 0);
  add("load", best_load, lat_load, limit_r);
  char buf[256];
  std::snprintf(
      buf, sizeof buf,
      "%s chunk %zu: %zu chunks of %.2f MiB, %zu per call, %zu in flight; loads %s%s", L::name, N,
      chunks, static_cast<double>(chunk_bytes) / 1048576.0, batch, o.inflight,
      o.verify ? (verified ? "verified byte-exact" : "FAILED verification") : "not verified",
      Lower ? (", " + std::to_string(from_disk) + " of " + std::to_string(loaded_total / N) +
               " chunks from " + (Disk ? "disk (" + backend + ")" : std::string("redis")))
                  .c_str()
            : "");
  rep.note(buf);
  if (!verified) throw std::runtime_error("loaded bytes differ from stored bytes");
}

inline void tier_command(args& a, bool json, const std::string& plot) {
  tier_options o;
  o.model = {static_cast<std::uint32_t>(a.num("layers", 8)),
             static_cast<std::uint32_t>(a.num("heads", 8)),
             static_cast<std::uint32_t>(a.num("head-size", 128)),
             static_cast<std::uint32_t>(a.num("dtype-size", 2)),
             static_cast<std::uint32_t>(a.num("block", 16))};
  o.layout = a.str("layout", "nhd");
  o.stack = a.str("stack", "host");
  o.redis = a.str("redis", "127.0.0.1:6379");
  o.disk_io = a.str("disk-io", "uring");
  o.segment = a.num("segment", 1u << 20);
  o.queue_depth = static_cast<unsigned>(a.num("queue-depth", 32));
  o.dir = a.str("dir", "/tmp/kvtier-bench");
  o.keys = a.num("keys", 32);
  o.batch = a.num("batch", 4);
  o.inflight = std::max<std::size_t>(1, a.num("inflight", 1));
  o.only = a.str("only", "");
  o.verify = !a.flag("no-verify");
  o.iters = static_cast<int>(a.num("iters", 3));
  const auto chunks = a.list("chunk", "256");
  a.check_all_used();
  if (!o.only.empty() && o.only != "store" && o.only != "lookup" && o.only != "load") {
    throw std::invalid_argument("--only takes store, lookup or load, not '" + o.only + "'");
  }
  if (o.stack != "host" && o.stack != "disk" && o.stack != "redis") {
    throw std::invalid_argument("--stack takes host, disk or redis, not '" + o.stack + "'");
  }
#ifndef KVTIER_BENCH_REDIS
  if (o.stack == "redis") {
    throw std::invalid_argument("--stack redis: kvtier-bench was built without hiredis");
  }
#endif
  if (o.disk_io != "uring" && o.disk_io != "threads") {
    throw std::invalid_argument("--disk-io takes uring or threads, not '" + o.disk_io + "'");
  }
  report rep(
      "kvtier-bench tier: " + o.stack +
      " stack, ratios to the limit measured in this run"
      " (host: best contiguous copy, cold caches; disk: raw O_DIRECT on the same dir,"
      " best of a sweep of request size and threads; redis: raw RESP client, best of a sweep of"
      " connections and pipeline depth)");
  for (std::size_t n : chunks) {
    with_chunk_size(n, [&]<std::size_t N>() {
      auto go = [&]<class L>() {
        if (o.stack == "disk") {
          run_tier<L, N, stack_kind::disk>(o, rep);
#ifdef KVTIER_BENCH_REDIS
        } else if (o.stack == "redis") {
          run_tier<L, N, stack_kind::redis>(o, rep);
#endif
        } else {
          run_tier<L, N, stack_kind::host>(o, rep);
        }
      };
      if (o.layout == "nhd") {
        go.template operator()<kvtier::layout::vllm_flash_nhd>();
      } else if (o.layout == "trt") {
        go.template operator()<kvtier::layout::trtllm_packed>();
      } else if (o.layout == "sglang") {
        go.template operator()<kvtier::layout::sglang_split_kv>();
      } else if (o.layout == "cpu") {
        go.template operator()<kvtier::layout::vllm_cpu>();
      } else {
        throw std::invalid_argument("--layout takes nhd, trt, sglang or cpu, not '" + o.layout +
                                    "'");
      }
    });
  }
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
  if (!plot.empty()) rep.plot(plot, "chunk", "GB/s", "op", "chunk tokens", "GB/s");
}

}  // namespace bench
