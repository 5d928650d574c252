// kvtier-bench: tier throughput, control-path cost and workload simulation, always as ratios to
// the physical limit measured in the same run.
//
//   kvtier-bench tier     [--stack host|disk|redis] [--layout nhd|trt|sglang|cpu] [--chunk
//   64,...,512]
//                         [--redis 127.0.0.1:6379] [--disk-io uring|threads] [--segment 1048576]
//                         [--queue-depth 32]
//                         [--layers 8 --heads 8 --head-size 128 --dtype-size 2 --block 16]
//                         [--keys 32] [--batch 4] [--inflight 1] [--only store|lookup|load]
//                         [--no-verify] [--iters 3] [--dir /tmp/kvtier-bench]
//   kvtier-bench disk     [--record-kib 8192] [--records 16] [--queue-depth 32] [--segment 1048576]
//                         [--threads 8] [--iters 5] [--dir /tmp/kvtier-bench]
//   kvtier-bench lower    [--stack disk|redis] [--object-kib 256] [--objects 64] [--batch 8]
//                         [--inflight 1] [--iters 3] [--no-limits] [--redis H:P] [--dir DIR]
//   kvtier-bench limits   [--object-kib 256] [--objects 64] [--iters 2] [--redis H:P] [--dir DIR]
//   kvtier-bench lookup   [--tokens 1024,...,131072] [--chunk 256] [--iters 100]
//   kvtier-bench workload [--trace all|chat|chat-truncated|docqa|FILE.jsonl] [--host-chunks
//   256,...]
//                         [--disk-chunks 0] [--chunk 256] [--prefill-tps 10000] [--truncate 4096]
//                         [--sessions 8 --rounds 6 --docs 12 --doc-tokens 6000 ...] [--seed 1]
//   kvtier-bench codec    [--layers 8 --heads 8 --head-size 128 --chunk 256] [--dtype bf16|fp16]
//                         [--group 64] [--iters 5] [--seed 1]
//   kvtier-bench shared   [--tokens 131072] [--keys 32] [--iters 5] [--lookups 50]
//                         [--layers 8 --heads 8 --head-size 128 --dtype-size 2 --block 16]
//   every subcommand:     [--json] [--plot out.png]
#include "codec_cmd.hpp"
#include "common.hpp"
#include "disk_cmd.hpp"
#include "lookup_cmd.hpp"
#include "lower_cmd.hpp"
#include "shared_cmd.hpp"
#include "tier.hpp"
#include "workload.hpp"

#include <new>

namespace bench {
std::atomic<std::uint64_t> allocations{0};
}

// Counts heap allocations (for "allocations per operation"); forwards to malloc.
void* operator new(std::size_t n) {
  bench::allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  bench::allocations.fetch_add(1, std::memory_order_relaxed);
  const auto al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {
const char* usage =
    "usage: kvtier-bench tier|disk|lower|limits|lookup|shared|workload|codec [options] [--json] "
    "[--plot out.png]\n"
    "  tier      store, lookup and load throughput and latency of a tier stack, against the\n"
    "            stack's limit (host: best contiguous copy; disk: raw O_DIRECT, swept; redis: raw\n"
    "            RESP client, swept) in the same run\n"
    "  disk      the disk tier's I/O engine (io_uring, threads) against raw O_DIRECT on the\n"
    "            same file, interleaved\n"
    "  lower     a lower tier alone (disk or redis, no gather/scatter), contiguous objects,\n"
    "            against the swept raw limits in the same run\n"
    "  limits    the swept raw limits (O_DIRECT; a raw RESP client) next to the older baselines\n"
    "  lookup    hashing and lookup latency for 1k-128k-token prompts, 0/50/100 % cached;\n"
    "            per-chunk overhead, heap allocations per operation, metadata per chunk\n"
    "  shared    the shared host tier from another process: lookup of a cached prompt and\n"
    "            loads, against tier::host in-process and memcpy, interleaved\n"
    "  codec     compression ratio and encode/decode GB/s of each codec on one synthetic chunk,\n"
    "            against memcpy of the same bytes, interleaved\n"
    "  workload  trace-driven simulation (chat, chat-truncated, docqa, or a JSONL trace of\n"
    "            {\"tokens\": [...]} lines): hit ratio per tier, bytes moved, time to first token\n"
    "See docs/performance.md for every option.\n";
}

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    bench::args a(argc, argv, 2, {"json", "no-verify", "no-limits"});
    const bool json = a.flag("json");
    const std::string plot = a.str("plot", "");
    if (cmd == "tier") {
      bench::tier_command(a, json, plot);
    } else if (cmd == "disk") {
      bench::disk_command(a, json, plot);
    } else if (cmd == "lower") {
      bench::lower_command(a, json, plot);
    } else if (cmd == "limits") {
      bench::limits_command(a, json, plot);
    } else if (cmd == "lookup") {
      bench::lookup_command(a, json, plot);
    } else if (cmd == "shared") {
      bench::shared_command(a, json, plot);
    } else if (cmd == "codec") {
      bench::codec_command(a, json, plot);
    } else if (cmd == "workload") {
      bench::workload_command(a, json, plot);
    } else {
      std::fprintf(stderr, "kvtier-bench: unknown subcommand '%s'\n%s", cmd.c_str(), usage);
      return 2;
    }
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "kvtier-bench %s: %s\n", cmd.c_str(), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtier-bench %s: %s\n", cmd.c_str(), e.what());
    return 1;
  }
  return 0;
}
