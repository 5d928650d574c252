#pragma once
// kvtier-bench shared: the shared host tier seen from a process that stored nothing. A child
// process fills two segments and exits; this process then measures, interleaved in each round,
// (1) the lookup of a fully cached prompt (default 128k tokens) through shared_lookup (a
// scheduler's handle) and through a cache whose own tier is empty, against the same lookup
// in-process on tier::host, and (2) loads of the whole stored prompt from the segment into its
// engine tensors, with and without checksum verification, against tier::host in-process and
// against memcpy of the same bytes.

#include "common.hpp"
#include "tier.hpp"

#include <kvtier/shared_lookup.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <numeric>

namespace bench {

namespace shared_bench {

using nhd = kvtier::layout::vllm_flash_nhd;
template <class... T>
using tiers = kvtier::opt::tiers<T...>;
using host = kvtier::tier::host;
using shm = kvtier::tier::shared_host;
constexpr std::size_t N = 256;
using tiny_shared = kvtier::cache<kvtier::opt::chunk_tokens<N>, tiers<host, shm>>;
using tiny_host = kvtier::cache<kvtier::opt::chunk_tokens<N>, tiers<host>>;
using load_shared = kvtier::cache<kvtier::opt::chunk_tokens<N>, tiers<host, shm>>;
using load_host = kvtier::cache<kvtier::opt::chunk_tokens<N>, tiers<host>>;

const kvtier::model_shape tiny{1, 1, 8, 1, 16};  // payload bytes do not matter for lookups
const kvtier::salt salt{"kvtier-bench-shared", "bf16", 0, 1, ""};

inline std::vector<kvtier::token_id> prompt(std::size_t n, std::size_t seed) {
  std::vector<kvtier::token_id> p(n);
  for (std::size_t i = 0; i < n; ++i)
    p[i] = static_cast<kvtier::token_id>((i * 7919 + seed) % 128000);
  return p;
}

inline shm::config segment(const std::string& name, std::size_t bytes, bool verify = true) {
  shm::config c;
  c.name = name;
  c.capacity_bytes = bytes;
  c.processes = 8;
  c.verify = verify;
  return c;
}

struct setup {
  kvtier::model_shape m;
  std::size_t lookup_tokens, keys;
  std::string lookup_name, load_name;
  std::size_t lookup_bytes() const { return (lookup_tokens / N + 8) * 4096; }
  std::size_t chunk_bytes() const { return kvtier::layout::chunk_format::from(m, N).chunk_bytes(); }
  std::size_t load_bytes() const { return (keys + 2) * ((chunk_bytes() + 4095) / 4096 * 4096); }
  std::int64_t blocks() const { return static_cast<std::int64_t>(keys * N / m.block_size); }
};

// The child: stores the lookup prompt and the load prompt, flushes, exits.
[[noreturn]] inline void fill_segments(const setup& s) {
  int rc = 0;
  try {
    kvtier::cache_config cfg;
    cfg.max_tokens = s.lookup_tokens;
    {
      tiny_shared c(tiny, salt,
                    {{(s.lookup_tokens / N + 8) * 4096}, segment(s.lookup_name, s.lookup_bytes())},
                    cfg);
      const auto blocks = static_cast<std::int64_t>(s.lookup_tokens / 16);
      bench_engine<nhd> e(tiny, blocks, 1);
      std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
      std::iota(table.begin(), table.end(), 0);
      if (c.store(prompt(s.lookup_tokens, 1), e.kv(), table) != s.lookup_tokens) rc = 3;
      c.flush();
    }
    {
      load_shared c(s.m, salt,
                    {{(s.keys + 2) * s.chunk_bytes()}, segment(s.load_name, s.load_bytes())});
      bench_engine<nhd> e(s.m, s.blocks(), 7);
      std::vector<std::int32_t> table(static_cast<std::size_t>(s.blocks()));
      std::iota(table.begin(), table.end(), 0);
      if (c.store(prompt(s.keys * N, 2), e.kv(), table) != s.keys * N) rc = 4;
      c.flush();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtier-bench shared (filling process): %s\n", e.what());
    rc = 1;
  }
  std::fflush(stderr);
  ::_exit(rc);
}

}  // namespace shared_bench

inline void shared_command(args& a, bool json, const std::string& plot) {
  using namespace shared_bench;
  setup s;
  s.m = {static_cast<std::uint32_t>(a.num("layers", 8)),
         static_cast<std::uint32_t>(a.num("heads", 8)),
         static_cast<std::uint32_t>(a.num("head-size", 128)),
         static_cast<std::uint32_t>(a.num("dtype-size", 2)),
         static_cast<std::uint32_t>(a.num("block", 16))};
  s.lookup_tokens = a.num("tokens", 131072) / N * N;
  s.keys = a.num("keys", 32);
  const int iters = static_cast<int>(a.num("iters", 5));
  const int lookups = static_cast<int>(a.num("lookups", 50));
  (void)plot;
  a.check_all_used();
  if (s.lookup_tokens == 0 || s.keys == 0 || iters <= 0 || lookups <= 0) {
    throw std::invalid_argument("--tokens, --keys, --iters and --lookups must be positive");
  }
  const std::string tag = std::to_string(::getpid());
  s.lookup_name = "/kvtier-bench-lookup-" + tag;
  s.load_name = "/kvtier-bench-load-" + tag;
  shm::handle::unlink(s.lookup_name);
  shm::handle::unlink(s.load_name);
  struct unlink_at_end {
    const setup& s;
    ~unlink_at_end() {
      shm::handle::unlink(s.lookup_name);
      shm::handle::unlink(s.load_name);
    }
  } cleanup{s};

  // Another process stores; this one has stored nothing when it measures.
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) fill_segments(s);
  int st = 0;
  ::waitpid(pid, &st, 0);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    throw std::runtime_error("the process filling the segments failed (status " +
                             std::to_string(st) + ")");
  }

  report rep(
      "kvtier-bench shared: the shared host tier from a process that stored nothing, "
      "against tier::host in-process and memcpy, interleaved in each round");

  // ---- lookup ----
  kvtier::cache_config cfg;
  cfg.max_tokens = s.lookup_tokens;
  const auto lp = prompt(s.lookup_tokens, 1);
  kvtier::shared_lookup<tiny_shared> view(tiny, salt, segment(s.lookup_name, s.lookup_bytes()),
                                          cfg);
  tiny_shared worker(tiny, salt, {{64 * 4096}, segment(s.lookup_name, s.lookup_bytes())}, cfg);
  tiny_host local(tiny, salt, {{(s.lookup_tokens / N + 8) * 4096}}, cfg);
  {
    const auto blocks = static_cast<std::int64_t>(s.lookup_tokens / 16);
    bench_engine<nhd> e(tiny, blocks, 1);
    std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
    std::iota(table.begin(), table.end(), 0);
    if (local.store(lp, e.kv(), table) != s.lookup_tokens) throw std::runtime_error("host store");
  }
  std::vector<kvtier::chunk_key> keys(s.lookup_tokens / N + 1);
  std::vector<double> t_hash, t_view, t_worker, t_local;
  for (int i = 0; i < lookups; ++i) {
    auto t0 = clock_type::now();
    local.keys(lp, keys);
    t_hash.push_back(seconds_since(t0));
    t0 = clock_type::now();
    const std::size_t v = view.cached_tokens(lp);
    t_view.push_back(seconds_since(t0));
    t0 = clock_type::now();
    auto l = worker.lookup(lp);
    t_worker.push_back(seconds_since(t0));
    const std::size_t w = l.tokens();
    worker.release(l);
    t0 = clock_type::now();
    auto h = local.lookup(lp);
    t_local.push_back(seconds_since(t0));
    if (v != s.lookup_tokens || w != s.lookup_tokens || h.tokens() != s.lookup_tokens) {
      throw std::runtime_error("a lookup found the wrong prefix");
    }
  }
  const double local50 = percentile(t_local, 0.5);
  auto lookup_row = [&](const char* what, const std::vector<double>& t) {
    rep.row({{"what", std::string(what)},
             {"tokens", static_cast<double>(s.lookup_tokens)},
             {"p50 us", percentile(t, 0.5) * 1e6},
             {"p99 us", percentile(t, 0.99) * 1e6},
             {"vs host lookup", percentile(t, 0.5) / local50}});
  };
  lookup_row("lookup: hashing alone", t_hash);
  lookup_row("lookup: tier::host, in-process", t_local);
  lookup_row("lookup: shared_lookup (scheduler)", t_view);
  lookup_row("lookup: cache over shared_host", t_worker);

  // ---- load ----
  const std::size_t cb = s.chunk_bytes();
  const auto pp = prompt(s.keys * N, 2);
  std::vector<std::int32_t> table(static_cast<std::size_t>(s.blocks()));
  std::iota(table.begin(), table.end(), 0);
  bench_engine<nhd> src(s.m, s.blocks(), 7);  // the bytes the other process stored
  bench_engine<nhd> dst(s.m, s.blocks(), 0);
  // Each round loads through caches made for it: their first tier starts empty, so every load
  // reads the segment (a cache's lease holds its first-tier copies until retrieved, so the first
  // tier must hold the whole prompt).
  const kvtier::tier::host::config first{(s.keys + 2) * ((cb + 4095) / 4096 * 4096)};
  load_host in_proc(s.m, salt, {first});
  if (in_proc.store(pp, src.kv(), table) != pp.size()) throw std::runtime_error("host store");
  std::vector<double> g_memcpy, g_host, g_shm, g_shm_nv;
  const double total = static_cast<double>(cb * s.keys);
  auto load = [&](auto& cache, std::vector<double>& out) {
    for (const auto& t : dst.tensors) std::memset(t->data, 0, t->size);
    dst.evict_all();
    const auto t0 = clock_type::now();
    auto l = cache.lookup(pp);
    const std::size_t got = cache.retrieve(l, dst.kv(), table);
    const double sec = seconds_since(t0);
    if (got != pp.size())
      throw std::runtime_error("a load loaded " + std::to_string(got) + " tokens");
    if (!dst.same_as(src)) throw std::runtime_error("a load's bytes differ from the stored bytes");
    out.push_back(total / sec / 1e9);
  };
  shm::counters sc;
  progress bar("shared", static_cast<std::size_t>(iters));
  for (int r = 0; r < iters; ++r) {
    g_memcpy.push_back(host_copy_limit(cb, s.keys, 1));
    load(in_proc, g_host);
    {
      load_shared c(s.m, salt, {first, segment(s.load_name, s.load_bytes(), true)});
      load(c, g_shm);
    }
    {
      load_shared c(s.m, salt, {first, segment(s.load_name, s.load_bytes(), false)});
      load(c, g_shm_nv);
      if (r + 1 == iters) sc = c.tier<1>().stats();
    }
    bar.step();
  }
  const double mem = percentile(g_memcpy, 0.5), hst = percentile(g_host, 0.5);
  auto load_row = [&](const char* what, const std::vector<double>& g) {
    rep.row({{"what", std::string(what)},
             {"tokens", static_cast<double>(pp.size())},
             {"GB/s", percentile(g, 0.5)},
             {"vs memcpy", percentile(g, 0.5) / mem},
             {"vs host load", percentile(g, 0.5) / hst}});
  };
  load_row("load: memcpy of the same bytes", g_memcpy);
  load_row("load: tier::host, in-process", g_host);
  load_row("load: shared_host, verified", g_shm);
  load_row("load: shared_host, verify off", g_shm_nv);
  char note[256];
  std::snprintf(note, sizeof note,
                "%zu chunks of %zu bytes; medians of %d interleaved rounds; segment: %llu writes, "
                "%llu hits, %llu corrupt, %u processes attached",
                s.keys, cb, iters, static_cast<unsigned long long>(sc.writes),
                static_cast<unsigned long long>(sc.hits),
                static_cast<unsigned long long>(sc.corrupt), sc.processes);
  rep.note(note);
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
}

}  // namespace bench
