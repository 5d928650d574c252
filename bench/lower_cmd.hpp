#pragma once
// kvtier-bench lower: a lower tier alone (local_disk or redis), without the cache around it: no
// gather from engine blocks, no scatter into them, no index or host tier. Contiguous objects go
// to the tier's write_batch and come back through its read_batch, which still writes and checks
// the record header and the payload checksum. This is the fair pair of a benchmark that moves
// contiguous objects (LMCache's `bench l2`). Ratios are to the limits measured in the same run.

#include "common.hpp"
#include "disk_raw.hpp"
#include "redis_raw.hpp"
#include "sweep.hpp"

#include <optional>
#include <random>
#include <span>

namespace bench {

struct lower_options {
  std::string stack = "disk";
  std::size_t object = 256u << 10;  ///< bytes per object
  std::size_t objects = 64;
  std::size_t batch = 8;  ///< objects per write_batch / read_batch call
  std::size_t inflight = 1;
  int iters = 3;
  bool limits = true;
  std::string redis = "127.0.0.1:6379";
  std::string disk_io = "uring";
  std::filesystem::path dir = "/tmp/kvtier-bench";
};

template <class Tier, bool Disk>
void run_lower(const lower_options& o, report& rep) {
  using impl_t = typename Tier::template impl<kvtier::eviction::lru>;
  // One "token" of object / 256 bytes, 256 tokens: chunk_bytes() is the object size.
  const kvtier::layout::chunk_format fmt{1, 1, o.object / 256, 1, 256, 1};
  kvtier::tier::context ctx{fmt, kvtier::chunk_key{0x6b767469657262ull, ::getpid() + 0ull}, 1,
                            o.batch, o.inflight + 1};
  typename Tier::config cfg{};
  const auto dir = o.dir / ("lower-" + std::to_string(::getpid()));
  if constexpr (Disk) {
    cfg.path = dir;
    cfg.capacity_bytes = (o.objects + 8) * (kvtier::memory::slab::round_up(o.object, 4096) + 4096);
    cfg.use_io_uring = o.disk_io == "uring";
    cfg.lanes = static_cast<unsigned>(std::max<std::size_t>(4, o.inflight));
  } else {
    cfg.nodes = {o.redis};
    cfg.connections = std::max<std::size_t>(4, o.inflight);
    cfg.timeout = std::chrono::milliseconds(20000);
    cfg.key_prefix = "kvtier-bench-lower";
  }
  impl_t tier(cfg, ctx);

  const std::size_t padded = kvtier::memory::slab::round_up(o.object, 4096);
  aligned_buffer src(padded * o.objects), dst(padded * o.objects);
  {
    std::mt19937_64 rng(5);
    auto* w = reinterpret_cast<std::uint64_t*>(src.data);
    for (std::size_t i = 0; i < src.size / 8; ++i) w[i] = rng();
  }
  std::vector<kvtier::tier::write_job> writes(o.objects);
  std::vector<kvtier::tier::read_job> reads(o.objects);
  std::vector<kvtier::chunk_key> keys(o.objects);
  const std::size_t batches = (o.objects + o.batch - 1) / o.batch;
  // Runs the tier's call on every batch of `jobs` over o.inflight threads; wall seconds.
  auto run = [&](auto& jobs, auto&& call) {
    std::atomic<std::size_t> next{0};
    return timed_threads(o.inflight, [&](std::size_t) {
      for (std::size_t b; (b = next++) < batches;) {
        call(std::span(jobs).subspan(b * o.batch, std::min(o.batch, o.objects - b * o.batch)));
      }
    });
  };
  // Fills what write and read jobs share: object i in slot i under keys[i].
  auto fill = [&](auto& jobs) {
    for (std::size_t i = 0; i < o.objects; ++i) {
      jobs[i].slot = static_cast<std::uint32_t>(i);
      jobs[i].key = keys[i];
      jobs[i].tokens = 256;
      jobs[i].bytes = o.object;
    }
  };
  double best_w = 1e30, best_r = 1e30;
  bool ok = true;
  for (int it = 0; it < o.iters && ok; ++it) {
    // Fresh keys each iteration: the redis tier skips values the server already holds.
    for (std::size_t i = 0; i < o.objects; ++i) keys[i] = {i + 1, (std::uint64_t(it) << 32) | 7};
    fill(writes);
    fill(reads);
    for (std::size_t i = 0; i < o.objects; ++i) {
      writes[i].src = src.data + i * padded;
      reads[i].dst = dst.data + i * padded;
    }
    best_w = std::min(best_w, run(writes, [&](auto js) { tier.write_batch(js); }));
    std::memset(dst.data, 0, dst.size);
    evict(src.data, src.size);
    evict(dst.data, dst.size);
    best_r = std::min(best_r, run(reads, [&](auto js) { tier.read_batch(js); }));
    const std::size_t stored =
        std::count_if(writes.begin(), writes.end(), [](auto& j) { return j.ok; });
    const std::size_t loaded = std::count_if(reads.begin(), reads.end(), [](auto& j) {
      return j.status == kvtier::tier::read_status::ok;
    });
    for (std::size_t i = 0; i < o.objects; ++i) {
      if (std::memcmp(src.data + i * padded, dst.data + i * padded, o.object) != 0) ok = false;
    }
    if (stored != o.objects || loaded != o.objects) ok = false;
    if constexpr (!Disk) (void)tier.remove(keys);
  }
  if constexpr (Disk) std::filesystem::remove_all(dir);
  if (!ok) throw std::runtime_error("the tier alone lost or changed objects");

  const double bytes = static_cast<double>(o.object * o.objects);
  double lim_w = 0, lim_r = 0;
  std::string lim_note;
  if (o.limits) {
    const int li = std::max(1, std::min(o.iters, 2));
    if constexpr (Disk) {
      const disk_limit l = raw_disk_limit(o.dir, o.object * o.objects, li, o.object);
      lim_w = l.write_gbps, lim_r = l.read_gbps;
      lim_note = "disk limit: raw O_DIRECT, best write " + std::to_string(l.write_request >> 10) +
                 " KiB x " + std::to_string(l.write_threads) + " threads, best read " +
                 std::to_string(l.read_request >> 10) + " KiB x " + std::to_string(l.read_threads) +
                 " threads";
    } else {
      const redis_limit l = raw_redis_limit(o.redis, o.object, o.objects, li);
      lim_w = l.set_gbps, lim_r = l.get_gbps;
      lim_note = "redis limit: raw RESP client, best SET " + std::to_string(l.set_conns) +
                 " connections x depth " + std::to_string(l.set_depth) + ", best GET " +
                 std::to_string(l.get_conns) + " x " + std::to_string(l.get_depth);
    }
  }
  const std::string stack = std::string(Disk ? "disk" : "redis") + " alone";
  for (const bool w : {true, false}) {
    std::vector<std::pair<std::string, cell>> r{
        {"stack", stack},
        {"object KiB", static_cast<double>(o.object >> 10)},
        {"op", std::string(w ? "store" : "load")},
        {"GB/s", bytes / (w ? best_w : best_r) / 1e9},
    };
    const double lim = w ? lim_w : lim_r;
    if (lim > 0) {
      r.emplace_back("limit GB/s", lim);
      r.emplace_back("ratio", bytes / (w ? best_w : best_r) / 1e9 / lim);
    }
    rep.row(std::move(r));
  }
  char note[200];
  std::snprintf(note, sizeof note,
                "%zu objects of %zu KiB, %zu per call, %zu in flight, best of %d; every load "
                "verified by the tier and compared byte for byte",
                o.objects, o.object >> 10, o.batch, o.inflight, o.iters);
  rep.note(note);
  if (!lim_note.empty()) rep.note(lim_note);
}

inline void lower_command(args& a, bool json, const std::string& plot) {
  lower_options o;
  o.stack = a.str("stack", "disk");
  o.object = a.num("object-kib", 256) * 1024;
  o.objects = std::max<std::size_t>(1, a.num("objects", 64));
  o.batch = std::max<std::size_t>(1, a.num("batch", 8));
  o.inflight = std::max<std::size_t>(1, a.num("inflight", 1));
  o.iters = static_cast<int>(std::max<std::size_t>(1, a.num("iters", 3)));
  o.limits = !a.flag("no-limits");
  o.redis = a.str("redis", "127.0.0.1:6379");
  o.disk_io = a.str("disk-io", "uring");
  o.dir = a.str("dir", "/tmp/kvtier-bench");
  a.check_all_used();
  if (o.object == 0 || o.object % 4096 != 0) {
    throw std::invalid_argument("--object-kib must make a positive multiple of 4 KiB");
  }
  report rep(
      "kvtier-bench lower: a lower tier alone (no gather, scatter, index or host tier),"
      " ratios to the limits measured in this run");
  if (o.stack == "disk") {
    run_lower<kvtier::tier::local_disk, true>(o, rep);
#ifdef KVTIER_BENCH_REDIS
  } else if (o.stack == "redis") {
    run_lower<kvtier::tier::redis, false>(o, rep);
#endif
  } else {
    throw std::invalid_argument("--stack takes disk or redis (built with hiredis), not '" +
                                o.stack + "'");
  }
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
  if (!plot.empty()) rep.plot(plot, "object KiB", "GB/s", "op", "object KiB", "GB/s");
}

// kvtier-bench limits: the disk and Redis limits with their sweeps, next to the older
// baselines (raw_direct_io: record-size I/O at queue depth 1 and 8; raw_pipelined_redis: one
// hiredis connection), for the same object size and bytes.
inline void limits_command(args& a, bool json, const std::string&) {
  const std::filesystem::path dir = a.str("dir", "/tmp/kvtier-bench");
  const std::string redis = a.str("redis", "");
  const std::size_t object = a.num("object-kib", 256) * 1024;
  const std::size_t objects = std::max<std::size_t>(1, a.num("objects", 64));
  const int iters = static_cast<int>(std::max<std::size_t>(1, a.num("iters", 2)));
  a.check_all_used();
  if (object == 0 || object % 4096 != 0) {
    throw std::invalid_argument("--object-kib must make a positive multiple of 4 KiB");
  }
  report rep("kvtier-bench limits: new limits (swept) against the older baselines");
  auto row = [&](const char* what, const char* kind, double w, double r, std::string how) {
    rep.row({{"what", std::string(what)},
             {"limit", std::string(kind)},
             {"object KiB", static_cast<double>(object >> 10)},
             {"write GB/s", w},
             {"read GB/s", r},
             {"best at", std::move(how)}});
  };
  const disk_limit d = raw_disk_limit(dir, object * objects, iters, object);
  const auto old_d = raw_direct_io(dir, object + 4096, objects, iters);
  row("disk", "new", d.write_gbps, d.read_gbps,
      "write " + std::to_string(d.write_request >> 10) + " KiB x " +
          std::to_string(d.write_threads) + ", read " + std::to_string(d.read_request >> 10) +
          " KiB x " + std::to_string(d.read_threads));
  row("disk", "old", old_d.first, old_d.second, "record-size, better of 1 and 8 threads");
  std::optional<redis_limit> rl;
  if (!redis.empty()) {
    const redis_limit& r = rl.emplace(raw_redis_limit(redis, object, objects, iters));
    row("redis", "new", r.set_gbps, r.get_gbps,
        "SET " + std::to_string(r.set_conns) + " conns x " + std::to_string(r.set_depth) +
            ", GET " + std::to_string(r.get_conns) + " x " + std::to_string(r.get_depth));
#ifdef KVTIER_BENCH_REDIS
    const auto old_r = raw_pipelined_redis(redis, object, objects, 16, iters);
    row("redis", "old", old_r.first, old_r.second, "one hiredis connection, 16 deep");
#endif
  }
  if (json) {
    rep.print_json(stdout);
    return;
  }
  rep.print_table(stdout);
  d.sweep.print_table(stdout);
  if (rl) rl->sweep.print_table(stdout);
}

}  // namespace bench
