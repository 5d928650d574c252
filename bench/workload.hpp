#pragma once
// kvtier-bench workload: trace-driven simulation of a serving workload through a real kvtier
// cache, with hit ratios per tier, bytes moved and the time to first token with and without it.

#include "common.hpp"

#include <fstream>
#include <numeric>
#include <random>

namespace bench {

struct request {
  std::vector<kvtier::token_id> prompt;  ///< what the engine prefills (looked up first)
  std::vector<kvtier::token_id> stored;  ///< what it stores afterwards (prompt + its reply)
};

struct workload_options {
  std::size_t sessions = 8, rounds = 6, system_tokens = 1024, user_tokens = 200,
              reply_tokens = 300;  // chat
  std::size_t truncate = 2048;     // chat-truncated: the context window, oldest turns dropped
  std::size_t docs = 12, doc_tokens = 6000, questions = 4, question_tokens = 50;  // docqa
  std::uint32_t seed = 1;
};

inline std::vector<kvtier::token_id> random_tokens(std::mt19937& rng, std::size_t n) {
  std::vector<kvtier::token_id> t(n);
  for (auto& x : t) x = static_cast<kvtier::token_id>(rng() % 128000);
  return t;
}

/// Multi-round chat: each session's prompt is the shared system prompt, the whole history and
/// the new user turn; the reply joins the history. With `window`, the oldest turns are dropped
/// until the prompt fits (the context-truncation scenario: the history after the system prompt
/// then starts elsewhere, so its chunks' keys change).
inline std::vector<request> chat_trace(const workload_options& o, std::size_t window) {
  std::mt19937 rng(o.seed);
  const auto system = random_tokens(rng, o.system_tokens);
  struct turn {
    std::vector<kvtier::token_id> user, reply;
  };
  std::vector<std::vector<turn>> history(o.sessions);
  std::vector<std::size_t> first_kept(o.sessions, 0);
  std::vector<request> out;
  for (std::size_t r = 0; r < o.rounds; ++r) {
    for (std::size_t s = 0; s < o.sessions; ++s) {
      history[s].push_back({random_tokens(rng, o.user_tokens), random_tokens(rng, o.reply_tokens)});
      auto length = [&] {
        std::size_t n = system.size();
        for (std::size_t i = first_kept[s]; i < history[s].size(); ++i)
          n += history[s][i].user.size() +
               (i + 1 < history[s].size() ? history[s][i].reply.size() : 0);
        return n;
      };
      while (window && length() > window && first_kept[s] + 1 < history[s].size()) ++first_kept[s];
      request q;
      q.prompt = system;
      for (std::size_t i = first_kept[s]; i < history[s].size(); ++i) {
        q.prompt.insert(q.prompt.end(), history[s][i].user.begin(), history[s][i].user.end());
        if (i + 1 < history[s].size())
          q.prompt.insert(q.prompt.end(), history[s][i].reply.begin(), history[s][i].reply.end());
      }
      q.stored = q.prompt;
      const auto& reply = history[s].back().reply;
      q.stored.insert(q.stored.end(), reply.begin(), reply.end());
      out.push_back(std::move(q));
    }
  }
  return out;
}

/// Long-document QA: questions about a set of documents, in a seeded random order; the prompt
/// is a system prompt, the document and the question.
inline std::vector<request> docqa_trace(const workload_options& o) {
  std::mt19937 rng(o.seed + 100);
  const auto system = random_tokens(rng, 256);
  std::vector<std::vector<kvtier::token_id>> docs;
  for (std::size_t d = 0; d < o.docs; ++d) docs.push_back(random_tokens(rng, o.doc_tokens));
  std::vector<std::pair<std::size_t, std::size_t>> order;
  for (std::size_t d = 0; d < o.docs; ++d)
    for (std::size_t q = 0; q < o.questions; ++q) order.emplace_back(d, q);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<request> out;
  for (auto [d, q] : order) {
    request r;
    r.prompt = system;
    r.prompt.insert(r.prompt.end(), docs[d].begin(), docs[d].end());
    const auto question = random_tokens(rng, o.question_tokens);
    r.prompt.insert(r.prompt.end(), question.begin(), question.end());
    r.stored = r.prompt;
    out.push_back(std::move(r));
  }
  return out;
}

/// A JSONL trace: one request per line, `{"tokens": [1, 2, 3]}` (other fields are ignored);
/// the prompt is looked up, then stored.
inline std::vector<request> jsonl_trace(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("cannot read trace " + path);
  std::vector<request> out;
  std::string line;
  std::size_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::size_t key = line.find("\"tokens\"");
    const std::size_t open = key == std::string::npos ? key : line.find('[', key);
    const std::size_t close = open == std::string::npos ? open : line.find(']', open);
    if (close == std::string::npos) {
      throw std::invalid_argument(path + ":" + std::to_string(no) + ": no \"tokens\": [...] array");
    }
    request r;
    std::size_t i = open + 1;
    while (i < close) {
      while (i < close && (line[i] == ' ' || line[i] == ',')) ++i;
      if (i >= close) break;
      std::size_t used = 0;
      const long long v = std::stoll(line.substr(i, close - i), &used);
      if (used == 0 || v < INT32_MIN || v > INT32_MAX) {
        throw std::invalid_argument(path + ":" + std::to_string(no) + ": bad token id");
      }
      r.prompt.push_back(static_cast<kvtier::token_id>(v));
      i += used;
    }
    r.stored = r.prompt;
    out.push_back(std::move(r));
  }
  return out;
}

struct sim_result {
  std::size_t requests = 0, prompt_tokens = 0, hit_tokens = 0, host_chunks_hit = 0,
              disk_chunks_hit = 0;
  double ttft_without = 0, ttft_with = 0;
  std::vector<double> ttft_with_all, ttft_without_all;
};

/// Runs `trace` through a kvtier cache of `host_chunks` (and `disk_chunks`) chunk slots.
template <std::size_t N, bool Disk>
sim_result simulate(const std::vector<request>& trace, std::size_t host_chunks,
                    std::size_t disk_chunks, const std::filesystem::path& dir,
                    std::size_t chunk_bytes, double tps, double host_gbps, double disk_gbps) {
  using host = kvtier::tier::host;
  using disk = kvtier::tier::local_disk;
  using tiers = std::conditional_t<Disk, kvtier::opt::tiers<host, disk>, kvtier::opt::tiers<host>>;
  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<N>, tiers>;
  // Tiny payloads (1 layer, 1 head of 8 one-byte elements): hit ratios depend on capacity in
  // chunks, and bytes and times are computed with the real model's chunk size.
  const kvtier::model_shape m{1, 1, 8, 1, 16};
  std::size_t max_tokens = 16;
  for (const auto& r : trace) max_tokens = std::max({max_tokens, r.prompt.size(), r.stored.size()});
  max_tokens = (max_tokens + 15) / 16 * 16;
  kvtier::cache_config cfg;
  cfg.max_tokens = max_tokens;
  cfg.write_queue_depth = 4096;
  typename cache_t::tier_configs tc{};
  std::get<0>(tc).capacity_bytes = std::max<std::size_t>(host_chunks, 1) * 4096;
  const auto run_dir = dir / ("workload-" + std::to_string(::getpid()));
  if constexpr (Disk) {
    std::get<1>(tc).path = run_dir;
    std::get<1>(tc).capacity_bytes = disk_chunks * 8192;
  }
  sim_result res;
  {
    cache_t cache(m, {"kvtier-bench-workload", "bf16", 0, 1, ""}, tc, cfg);
    const auto blocks = static_cast<std::int64_t>(max_tokens / 16);
    const auto sa = kvtier::layout::shape_of<kvtier::layout::vllm_flash_nhd>(m, blocks);
    std::vector<std::int64_t> shape(sa.begin(), sa.end());
    aligned_buffer layer(static_cast<std::size_t>(2 * blocks * 16 * 8));
    std::vector<void*> ptrs{layer.data};
    const kvtier::engine_kv kv{ptrs, shape};
    std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
    std::iota(table.begin(), table.end(), 0);
    for (const auto& r : trace) {
      auto l = cache.lookup(r.prompt);
      const std::size_t hit = l.tokens();
      const std::size_t h0 = l.hits_in(0), h1 = Disk ? l.hits_in(1) : 0;
      const std::size_t loaded = cache.retrieve(l, kv, table);
      (void)cache.store(r.stored, kv, table);
      if constexpr (Disk) cache.flush();  // the next request sees this one's write-through
      ++res.requests;
      res.prompt_tokens += r.prompt.size();
      res.hit_tokens += loaded;
      res.host_chunks_hit += h0;
      res.disk_chunks_hit += h1;
      (void)hit;
      const double without = static_cast<double>(r.prompt.size()) / tps;
      const double with = static_cast<double>(r.prompt.size() - loaded) / tps +
                          static_cast<double>(h0 * chunk_bytes) / (host_gbps * 1e9) +
                          (Disk ? static_cast<double>(h1 * chunk_bytes) / (disk_gbps * 1e9) : 0);
      res.ttft_without_all.push_back(without);
      res.ttft_with_all.push_back(with);
      res.ttft_without += without;
      res.ttft_with += with;
    }
  }
  if constexpr (Disk) std::filesystem::remove_all(run_dir);
  return res;
}

inline void workload_command(args& a, bool json, const std::string& plot) {
  workload_options o;
  o.sessions = a.num("sessions", o.sessions);
  o.rounds = a.num("rounds", o.rounds);
  o.system_tokens = a.num("system-tokens", o.system_tokens);
  o.user_tokens = a.num("user-tokens", o.user_tokens);
  o.reply_tokens = a.num("reply-tokens", o.reply_tokens);
  o.truncate = a.num("truncate", o.truncate);
  o.docs = a.num("docs", o.docs);
  o.doc_tokens = a.num("doc-tokens", o.doc_tokens);
  o.questions = a.num("questions", o.questions);
  o.seed = static_cast<std::uint32_t>(a.num("seed", 1));
  const std::string trace = a.str("trace", "all");
  const auto host_list = a.list("host-chunks", "256");
  const std::size_t disk_chunks = a.num("disk-chunks", 0);
  const std::filesystem::path dir = a.str("dir", "/tmp/kvtier-bench");
  const std::size_t chunk = a.num("chunk", 256);
  const kvtier::model_shape model{static_cast<std::uint32_t>(a.num("layers", 32)),
                                  static_cast<std::uint32_t>(a.num("heads", 8)),
                                  static_cast<std::uint32_t>(a.num("head-size", 128)),
                                  static_cast<std::uint32_t>(a.num("dtype-size", 2)), 16};
  const double tps = a.real("prefill-tps", 10000);
  double host_gbps = a.real("host-gbps", 0), disk_gbps = a.real("disk-gbps", 0);
  a.check_all_used();

  std::vector<std::pair<std::string, std::vector<request>>> traces;
  if (trace == "chat" || trace == "all") traces.emplace_back("chat", chat_trace(o, 0));
  if (trace == "chat-truncated" || trace == "all") {
    traces.emplace_back("chat-truncated", chat_trace(o, o.truncate));
  }
  if (trace == "docqa" || trace == "all") traces.emplace_back("docqa", docqa_trace(o));
  if (traces.empty()) traces.emplace_back(trace, jsonl_trace(trace));

  const std::size_t chunk_bytes = kvtier::layout::chunk_format::from(model, chunk).chunk_bytes();
  // Tier bandwidths for the time-to-first-token model: given, or the limits measured now.
  std::string bw_source = "given";
  if (host_gbps <= 0) {
    host_gbps = host_copy_limit(8u << 20, 16, 3);
    bw_source = "measured in this run";
  }
  if (disk_chunks > 0 && disk_gbps <= 0) {
    disk_gbps = raw_direct_io(dir, 8u << 20, 16, 2).second;
    if (disk_gbps <= 0) throw std::runtime_error("O_DIRECT refused in --dir; pass --disk-gbps");
  }
  report rep("kvtier-bench workload: hit ratio and time to first token, " +
             std::to_string(model.layers) + " layers x " + std::to_string(model.kv_heads) +
             " heads x " + std::to_string(model.head_size) + ", chunk " + std::to_string(chunk) +
             ", prefill " + report::format(tps) + " tokens/s");
  progress bar("workload", traces.size() * host_list.size());
  for (const auto& [name, t] : traces) {
    for (std::size_t host_chunks : host_list) {
      sim_result r;
      with_chunk_size(chunk, [&]<std::size_t N>() {
        r = disk_chunks > 0 ? simulate<N, true>(t, host_chunks, disk_chunks, dir, chunk_bytes, tps,
                                                host_gbps, disk_gbps)
                            : simulate<N, false>(t, host_chunks, 0, dir, chunk_bytes, tps,
                                                 host_gbps, disk_gbps);
      });
      const double pt = static_cast<double>(r.prompt_tokens);
      const double n = static_cast<double>(r.requests);
      rep.row({{"trace", name},
               {"requests", n},
               {"prompt tokens", pt},
               {"host chunks", static_cast<double>(host_chunks)},
               {"disk chunks", static_cast<double>(disk_chunks)},
               {"hit ratio", static_cast<double>(r.hit_tokens) / pt},
               {"host hit %", 100.0 * static_cast<double>(r.host_chunks_hit * chunk) / pt},
               {"disk hit %", 100.0 * static_cast<double>(r.disk_chunks_hit * chunk) / pt},
               {"GB moved",
                static_cast<double>((r.host_chunks_hit + r.disk_chunks_hit) * chunk_bytes) / 1e9},
               {"TTFT ms, no cache", 1e3 * r.ttft_without / n},
               {"TTFT ms, kvtier", 1e3 * r.ttft_with / n},
               {"TTFT p99 ms, kvtier", 1e3 * percentile(r.ttft_with_all, 0.99)},
               {"speedup", r.ttft_without / r.ttft_with}});
      bar.step();
    }
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "TTFT model: uncached tokens / prefill rate + hit bytes / tier bandwidth; host "
                "%.2f GB/s%s (%s: the tiers' limits, so a best case for kvtier); chunk %.1f MiB",
                host_gbps,
                disk_chunks > 0 ? (", disk " + report::format(disk_gbps) + " GB/s").c_str() : "",
                bw_source.c_str(), static_cast<double>(chunk_bytes) / 1048576.0);
  rep.note(buf);
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
  if (!plot.empty())
    rep.plot(plot, "host chunks", "hit ratio", "trace", "host tier capacity (chunks)", "hit ratio");
}

}  // namespace bench
