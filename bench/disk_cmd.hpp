#pragma once
// kvtier-bench disk: the disk tier's I/O layer (kvtier::detail::io_engine, io_uring or threads)
// against raw O_DIRECT pread/pwrite of the same records on the same file, interleaved pass by
// pass so that a virtual disk's swings hit both alike.

#include "common.hpp"

namespace bench {

inline void disk_command(args& a, bool json, const std::string& plot) {
  const std::filesystem::path dir = a.str("dir", "/tmp/kvtier-bench");
  const std::size_t record = a.num("record-kib", 8192) * 1024;
  const std::size_t records = a.num("records", 16);
  const auto depth = static_cast<unsigned>(a.num("queue-depth", 32));
  const std::size_t segment = a.num("segment", 1u << 20);
  const auto threads = static_cast<unsigned>(a.num("threads", 8));
  const int iters = static_cast<int>(a.num("iters", 5));
  a.check_all_used();
  if (record == 0 || record % 4096 != 0) {
    throw std::invalid_argument("--record-kib must make a positive multiple of 4 KiB");
  }
  std::filesystem::create_directories(dir);
  const auto path = dir / ("kvtier-bench-disk-" + std::to_string(::getpid()));
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) throw std::runtime_error("O_DIRECT is refused in " + dir.string());
  const std::size_t total = record * records;
  if (::fallocate(fd, 0, 0, static_cast<off_t>(total)) != 0) {
    throw std::runtime_error("cannot allocate " + std::to_string(total) + " bytes in " +
                             dir.string());
  }
  aligned_buffer buf(total);
  std::memset(buf.data, 0x5a, total);

  auto raw = [&](bool write) {  // `threads` threads, one whole record per call
    std::atomic<std::size_t> next{0};
    std::atomic<bool> ok{true};
    auto work = [&] {
      for (std::size_t c; (c = next++) < records;) {
        char* p = reinterpret_cast<char*>(buf.data) + c * record;
        const auto off = static_cast<off_t>(c * record);
        if ((write ? ::pwrite(fd, p, record, off) : ::pread(fd, p, record, off)) !=
            static_cast<ssize_t>(record)) {
          ok = false;
        }
      }
    };
    const auto t0 = clock_type::now();
    std::vector<std::thread> th;
    for (unsigned t = 1; t < threads; ++t) th.emplace_back(work);
    work();
    for (auto& x : th) x.join();
    if (!ok) throw std::runtime_error("raw O_DIRECT I/O failed");
    return seconds_since(t0);
  };
  std::vector<kvtier::detail::io_op> ops(records);
  auto engine = [&](kvtier::detail::io_engine& io, bool write) {
    for (std::size_t c = 0; c < records; ++c) {
      ops[c] = {fd, write, reinterpret_cast<char*>(buf.data) + c * record, record,
                static_cast<off_t>(c * record)};
    }
    const auto t0 = clock_type::now();
    if (!io.run(ops)) throw std::runtime_error("io_engine I/O failed");
    return seconds_since(t0);
  };

  report rep(
      "kvtier-bench disk: the disk tier's I/O engine against raw O_DIRECT on the same "
      "file, passes interleaved");
  kvtier::detail::io_engine uring(1, depth, segment, true), pool(1, depth, segment, false);
  std::map<std::string, double> best;
  auto keep = [&](const std::string& k, double s) {
    auto [it, fresh] = best.emplace(k, s);
    if (!fresh) it->second = std::min(it->second, s);
  };
  progress bar("disk", static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    for (bool write : {true, false}) {
      const std::string op = write ? "write" : "read";
      keep("raw " + op, raw(write));
      keep(std::string(uring.name()) + " " + op, engine(uring, write));
      if (uring.which() != kvtier::detail::io_engine::backend::threads) {
        keep("threads " + op, engine(pool, write));
      }
    }
    bar.step();
  }
  ::close(fd);
  std::filesystem::remove(path);
  for (const char* op : {"write", "read"}) {
    const double limit = static_cast<double>(total) / best["raw " + std::string(op)] / 1e9;
    for (const auto& [k, s] : best) {
      const std::string suffix = " " + std::string(op);
      if (k.size() < suffix.size() ||
          k.compare(k.size() - suffix.size(), suffix.size(), suffix) != 0 ||
          k.rfind("raw", 0) == 0) {
        continue;
      }
      const double gbps = static_cast<double>(total) / s / 1e9;
      rep.row({{"backend", k.substr(0, k.find(' '))},
               {"op", std::string(op)},
               {"GB/s", gbps},
               {"raw GB/s", limit},
               {"ratio", gbps / limit}});
    }
  }
  char note[200];
  std::snprintf(note, sizeof note,
                "%zu records of %zu KiB; engine: queue depth %u, %zu KiB segments; raw: %u "
                "threads, one record per call; best of %d",
                records, record / 1024, depth, segment / 1024, threads, iters);
  rep.note(note);
  if (json) {
    rep.print_json(stdout);
  } else {
    rep.print_table(stdout);
  }
  if (!plot.empty()) rep.plot(plot, "backend", "GB/s", "op", "backend", "GB/s");
}

}  // namespace bench
