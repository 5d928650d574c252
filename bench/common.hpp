#pragma once
// kvtier-bench plumbing: arguments, statistics, the physical limits, reports (table, JSON,
// gnuplot), a progress bar, and a heap-allocation counter.

#include <kvtier/kvtier.hpp>
#ifdef KVTIER_BENCH_REDIS
#include <kvtier/tier/redis.hpp>
#endif

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace bench {

/// Heap allocations made by this process (counted by the bench's global operator new).
extern std::atomic<std::uint64_t> allocations;

using clock_type = std::chrono::steady_clock;
inline double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// ---- arguments ---------------------------------------------------------------------------------

/// `--name value` and `--flag` arguments; every name must be known to the subcommand.
class args {
 public:
  args(int argc, char** argv, int first, std::vector<std::string> flags)
      : flags_(std::move(flags)) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + a + "'");
      a = a.substr(2);
      if (std::find(flags_.begin(), flags_.end(), a) != flags_.end()) {
        values_[a] = "1";
      } else if (i + 1 < argc) {
        values_[a] = argv[++i];
      } else {
        throw std::invalid_argument("--" + a + " needs a value");
      }
    }
  }
  std::string str(const std::string& k, const std::string& def) {
    used_.push_back(k);
    auto it = values_.find(k);
    return it == values_.end() ? def : it->second;
  }
  std::size_t num(const std::string& k, std::size_t def) {
    const std::string v = str(k, std::to_string(def));
    std::size_t pos = 0;
    const unsigned long long n = std::stoull(v, &pos);
    if (pos != v.size()) throw std::invalid_argument("--" + k + " takes a number, not '" + v + "'");
    return static_cast<std::size_t>(n);
  }
  double real(const std::string& k, double def) { return std::stod(str(k, std::to_string(def))); }
  bool flag(const std::string& k) { return str(k, "") == "1"; }
  std::vector<std::size_t> list(const std::string& k, const std::string& def) {
    std::vector<std::size_t> out;
    std::string v = str(k, def);
    std::size_t start = 0;
    while (start <= v.size()) {
      const std::size_t comma = v.find(',', start);
      const std::string part =
          v.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!part.empty()) out.push_back(std::stoull(part));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    return out;
  }
  /// Throws for a given argument no subcommand option read.
  void check_all_used() const {
    for (const auto& [k, v] : values_) {
      if (std::find(used_.begin(), used_.end(), k) == used_.end()) {
        throw std::invalid_argument("unknown option --" + k);
      }
    }
  }

 private:
  std::vector<std::string> flags_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> used_;
};

// ---- statistics --------------------------------------------------------------------------------

inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p * static_cast<double>(v.size() - 1);
  return v[static_cast<std::size_t>(std::lround(idx))];
}

// ---- reports -----------------------------------------------------------------------------------

using cell = std::variant<std::string, double>;

/// Rows of named cells, printed as an aligned table or as JSON.
class report {
 public:
  explicit report(std::string title) : title_(std::move(title)) {}
  void row(std::vector<std::pair<std::string, cell>> r) { rows_.push_back(std::move(r)); }
  void note(std::string n) { notes_.push_back(std::move(n)); }
  [[nodiscard]] const auto& rows() const { return rows_; }

  void print_table(std::FILE* f) const {
    std::fprintf(f, "%s\n", title_.c_str());
    std::vector<std::string> cols;
    for (const auto& r : rows_)
      for (const auto& [k, v] : r)
        if (std::find(cols.begin(), cols.end(), k) == cols.end()) cols.push_back(k);
    std::vector<std::vector<std::string>> text;
    std::vector<std::size_t> width;
    for (const auto& c : cols) width.push_back(c.size());
    for (const auto& r : rows_) {
      std::vector<std::string> line;
      for (std::size_t i = 0; i < cols.size(); ++i) {
        std::string s = "-";
        for (const auto& [k, v] : r)
          if (k == cols[i]) s = format(v);
        width[i] = std::max(width[i], s.size());
        line.push_back(s);
      }
      text.push_back(std::move(line));
    }
    for (std::size_t i = 0; i < cols.size(); ++i)
      std::fprintf(f, "%s%*s", i ? "  " : "  ", static_cast<int>(width[i]), cols[i].c_str());
    std::fprintf(f, "\n");
    for (const auto& line : text) {
      for (std::size_t i = 0; i < line.size(); ++i)
        std::fprintf(f, "%s%*s", "  ", static_cast<int>(width[i]), line[i].c_str());
      std::fprintf(f, "\n");
    }
    for (const auto& n : notes_) std::fprintf(f, "  %s\n", n.c_str());
  }

  /// print_json or print_table, to stdout.
  void print(bool json) const {
    if (json) {
      print_json(stdout);
    } else {
      print_table(stdout);
    }
  }
  void print_json(std::FILE* f) const {
    std::fprintf(f, "{\"title\": %s, \"rows\": [", quote(title_).c_str());
    for (std::size_t r = 0; r < rows_.size(); ++r) {
      std::fprintf(f, "%s\n  {", r ? "," : "");
      for (std::size_t i = 0; i < rows_[r].size(); ++i) {
        const auto& [k, v] = rows_[r][i];
        std::fprintf(f, "%s%s: %s", i ? ", " : "", quote(k).c_str(),
                     std::holds_alternative<double>(v) ? number(std::get<double>(v)).c_str()
                                                       : quote(std::get<std::string>(v)).c_str());
      }
      std::fprintf(f, "}");
    }
    std::fprintf(f, "\n], \"notes\": [");
    for (std::size_t i = 0; i < notes_.size(); ++i)
      std::fprintf(f, "%s%s", i ? ", " : "", quote(notes_[i]).c_str());
    std::fprintf(f, "]}\n");
  }

  /// Plots column `y` against column `x`, one line per distinct value of column `series`, with
  /// gnuplot (Debian gnuplot-nox) into a PNG. Throws when gnuplot is missing or fails.
  void plot(const std::string& png, const std::string& x, const std::string& y,
            const std::string& series, const std::string& xlabel, const std::string& ylabel) const {
    auto get = [](const auto& r, const std::string& k) -> const cell* {
      for (const auto& [key, v] : r)
        if (key == k) return &v;
      return nullptr;
    };
    std::vector<std::string> names;  // series with at least one numeric point
    for (const auto& r : rows_) {
      const cell* s = get(r, series);
      const cell* xv = get(r, x);
      const cell* yv = get(r, y);
      const std::string n = s ? format(*s) : y;
      if (xv && yv && std::holds_alternative<double>(*xv) && std::holds_alternative<double>(*yv) &&
          std::find(names.begin(), names.end(), n) == names.end()) {
        names.push_back(n);
      }
    }
    if (names.empty()) throw std::runtime_error("nothing to plot: no numeric " + y + " values");
    const std::string data = png + ".dat";
    std::FILE* d = std::fopen(data.c_str(), "w");
    if (!d) throw std::runtime_error("cannot write " + data);
    for (const auto& n : names) {
      std::fprintf(d, "# %s\n", n.c_str());
      for (const auto& r : rows_) {
        const cell* s = get(r, series);
        if ((s ? format(*s) : y) != n) continue;
        const cell* xv = get(r, x);
        const cell* yv = get(r, y);
        if (xv && yv && std::holds_alternative<double>(*xv) && std::holds_alternative<double>(*yv))
          std::fprintf(d, "%.6g %.6g\n", std::get<double>(*xv), std::get<double>(*yv));
      }
      std::fprintf(d, "\n\n");
    }
    std::fclose(d);
    const std::string title = title_.substr(0, title_.find(" ("));  // without the notes
    std::string script = "set terminal png size 900,560 noenhanced; set output " + quote(png) +
                         "; set grid; set key top left; set title " + quote(title) +
                         "; set xlabel " + quote(xlabel) + "; set ylabel " + quote(ylabel) +
                         "; set logscale x 2; plot ";
    for (std::size_t i = 0; i < names.size(); ++i) {
      script += (i ? ", " : "") + quote(data) + " index " + std::to_string(i) +
                " with linespoints lw 2 title " + quote(names[i]);
    }
    std::FILE* g = ::popen("gnuplot 2>&1", "w");
    if (!g) throw std::runtime_error("cannot run gnuplot (Debian: apt-get install gnuplot-nox)");
    std::fprintf(g, "%s\n", script.c_str());
    if (::pclose(g) != 0) {
      throw std::runtime_error("gnuplot failed (Debian: apt-get install gnuplot-nox)");
    }
    std::filesystem::remove(data);
  }

  static std::string format(const cell& v) {
    if (const auto* s = std::get_if<std::string>(&v)) return *s;
    const double d = std::get<double>(v);
    char buf[64];
    if (d == std::floor(d) && std::fabs(d) < 1e15) {
      std::snprintf(buf, sizeof buf, "%.0f", d);
    } else if (std::fabs(d) >= 100) {
      std::snprintf(buf, sizeof buf, "%.1f", d);
    } else {
      std::snprintf(buf, sizeof buf, "%.3g", d);
    }
    return buf;
  }

 private:
  static std::string quote(const std::string& s) {
    std::string o = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') o += '\\';
      if (static_cast<unsigned char>(c) < 0x20) {
        o += ' ';
        continue;
      }
      o += c;
    }
    return o + "\"";
  }
  static std::string number(double d) {
    if (!std::isfinite(d)) return "null";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", d);
    return buf;
  }

  std::string title_;
  std::vector<std::vector<std::pair<std::string, cell>>> rows_;
  std::vector<std::string> notes_;
};

// ---- progress ----------------------------------------------------------------------------------

/// A progress bar on stderr, only when stderr is a terminal.
class progress {
 public:
  progress(std::string what, std::size_t total)
      : what_(std::move(what)), total_(total), on_(::isatty(2) != 0) {}
  void step(std::size_t n = 1) {
    done_ += n;
    if (!on_ || total_ == 0) return;
    const int pct = static_cast<int>(100 * done_ / total_);
    if (pct == last_) return;
    last_ = pct;
    const int bar = pct * 30 / 100;
    std::fprintf(stderr, "\r%-18s [%.*s%*s] %3d%%", what_.c_str(), bar,
                 "==============================", 30 - bar, "", pct);
    if (done_ >= total_) std::fprintf(stderr, "\n");
  }

 private:
  std::string what_;
  std::size_t total_, done_ = 0;
  int last_ = -1;
  bool on_;
};

// ---- limits ------------------------------------------------------------------------------------

/// Flushes [p, p + n) from every cache level, so a timed copy starts from DRAM.
inline void evict(const void* p, std::size_t n) {
#if defined(__SSE2__)
  const auto* b = static_cast<const char*>(p);
  for (std::size_t i = 0; i < n; i += 64) _mm_clflush(b + i);
  _mm_mfence();
#else
  (void)p, (void)n;
#endif
}

/// Page-aligned heap buffer.
struct aligned_buffer {
  explicit aligned_buffer(std::size_t n)
      : size(n), data(static_cast<std::byte*>(std::aligned_alloc(4096, (n + 4095) / 4096 * 4096))) {
    if (!data) throw std::bad_alloc();
    std::memset(data, 1, n);
  }
  ~aligned_buffer() { std::free(data); }
  aligned_buffer(const aligned_buffer&) = delete;
  aligned_buffer& operator=(const aligned_buffer&) = delete;
  std::size_t size;
  std::byte* data;
};

/// The host copy limit for `pieces` copies of `piece` bytes by `threads` threads at once: the
/// fastest of glibc memcpy per piece, glibc memcpy of each thread's share in one call, and
/// kvtier's copy, cold caches, best of `iters`. GB/s.
inline double host_copy_limit(std::size_t piece, std::size_t pieces, int iters,
                              std::size_t threads = 1) {
  threads = std::max<std::size_t>(1, std::min(threads, pieces));
  const std::size_t total = piece * pieces;
  aligned_buffer src(total), dst(total);
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    for (int method = 0; method < 3; ++method) {
      evict(src.data, total);
      evict(dst.data, total);
      auto work = [&](std::size_t t) {
        const std::size_t first = pieces * t / threads, last = pieces * (t + 1) / threads;
        std::byte* d = dst.data + first * piece;
        const std::byte* s = src.data + first * piece;
        if (method == 1) {
          std::memcpy(d, s, (last - first) * piece);
          return;
        }
        for (std::size_t p = 0; p < last - first; ++p) {
          if (method == 0) {
            std::memcpy(d + p * piece, s + p * piece, piece);
          } else {
            kvtier::transfer::detail::copy_bytes(d + p * piece, s + p * piece, piece);
          }
        }
        kvtier::transfer::detail::fence();
      };
      const auto t0 = clock_type::now();
      std::vector<std::thread> th;
      for (std::size_t t = 1; t < threads; ++t) th.emplace_back(work, t);
      work(0);
      for (auto& x : th) x.join();
      best = std::min(best, seconds_since(t0));
    }
  }
  return static_cast<double>(total) / best / 1e9;
}

/// Raw O_DIRECT write and read of `count` records of `bytes` (a multiple of 4096) in a file in
/// `dir`: the disk tier's limit on the same directory. Each pass is timed twice, with one
/// synchronous pwrite/pread per record (queue depth 1) and with 8 threads each taking records
/// (queue depth 8), and the better is the limit: GB/s {write, read}; {0, 0} when the file system
/// refuses O_DIRECT. Each write pass goes to a fresh, preallocated file (the tier's file is new
/// in each benchmark iteration) and ends with fdatasync.
inline std::pair<double, double> raw_direct_io(const std::filesystem::path& dir, std::size_t bytes,
                                               std::size_t count, int iters) {
  std::filesystem::create_directories(dir);
  const auto path = dir / ("kvtier-bench-raw-" + std::to_string(::getpid()));
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) return {0, 0};
  constexpr std::size_t depth = 8;
  std::vector<std::unique_ptr<aligned_buffer>> bufs;
  for (std::size_t i = 0; i < depth; ++i) {
    bufs.push_back(std::make_unique<aligned_buffer>(bytes));
    std::memset(bufs.back()->data, static_cast<int>(i + 1), bytes);
  }
  std::atomic<bool> ok{true};
  // One pass over every record with `threads` threads; seconds.
  auto pass = [&](bool write, std::size_t threads) {
    std::atomic<std::size_t> next{0};
    auto work = [&](std::size_t t) {
      for (std::size_t c; (c = next++) < count && ok;) {
        const auto off = static_cast<off_t>(c * bytes);
        const ssize_t r = write ? ::pwrite(fd, bufs[t]->data, bytes, off)
                                : ::pread(fd, bufs[t]->data, bytes, off);
        if (r != static_cast<ssize_t>(bytes)) ok = false;
      }
    };
    if (write) {
      // A fresh, preallocated file each pass, as the tier's file is in the benchmark: the
      // first write of a block costs more than an overwrite on most file systems.
      if (::ftruncate(fd, 0) != 0 ||
          ::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(bytes * count)) != 0) {
        ok = false;
      }
    }
    const auto t0 = clock_type::now();
    std::vector<std::thread> th;
    for (std::size_t t = 1; t < threads; ++t) th.emplace_back(work, t);
    work(0);
    for (auto& x : th) x.join();
    if (write && ::fdatasync(fd) != 0) ok = false;
    return seconds_since(t0);
  };
  double best_w = 1e30, best_r = 1e30;
  for (int i = 0; i < iters && ok; ++i) {
    for (std::size_t threads : {std::size_t{1}, depth}) {
      best_w = std::min(best_w, pass(true, threads));
      best_r = std::min(best_r, pass(false, threads));
    }
  }
  ::close(fd);
  std::filesystem::remove(path);
  if (!ok) return {0, 0};
  const double total = static_cast<double>(bytes * count);
  return {total / best_w / 1e9, total / best_r / 1e9};
}

#ifdef KVTIER_BENCH_REDIS
/// Raw pipelined hiredis SET and GET of `count` values of `bytes` on the server at `address`,
/// `depth` commands per round trip: the redis tier's limit on the same server. GB/s of value
/// bytes {write, read}; the keys are deleted afterwards.
inline std::pair<double, double> raw_pipelined_redis(const std::string& address, std::size_t bytes,
                                                     std::size_t count, std::size_t depth,
                                                     int iters) {
  const auto colon = address.rfind(':');
  redisContext* c =
      redisConnect(address.substr(0, colon).c_str(), std::stoi(address.substr(colon + 1)));
  if (c == nullptr || c->err) throw std::runtime_error("cannot connect to redis at " + address);
  std::vector<char> value(bytes);
  for (std::size_t i = 0; i < bytes; ++i) value[i] = static_cast<char>(i * 31 + 7);
  const std::string prefix = "kvtier-bench-raw-" + std::to_string(::getpid()) + ":";
  auto key = [&](std::size_t i) { return prefix + std::to_string(i); };
  bool ok = true;
  auto round = [&](bool set) {
    const auto t0 = clock_type::now();
    for (std::size_t b = 0; b < count && ok; b += depth) {
      const std::size_t n = std::min(depth, count - b);
      for (std::size_t i = 0; i < n; ++i) {
        const std::string k = key(b + i);
        if (set) {
          redisAppendCommand(c, "SET %b %b", k.data(), k.size(), value.data(), value.size());
        } else {
          redisAppendCommand(c, "GET %b", k.data(), k.size());
        }
      }
      for (std::size_t i = 0; i < n; ++i) {
        void* r = nullptr;
        if (redisGetReply(c, &r) != REDIS_OK) {
          ok = false;
          break;
        }
        const auto* rep = static_cast<redisReply*>(r);
        if (set ? rep->type != REDIS_REPLY_STATUS
                : (rep->type != REDIS_REPLY_STRING || rep->len != bytes)) {
          ok = false;
        }
        freeReplyObject(r);
      }
    }
    return seconds_since(t0);
  };
  double best_w = 1e30, best_r = 1e30;
  for (int i = 0; i < iters && ok; ++i) {
    best_w = std::min(best_w, round(true));
    best_r = std::min(best_r, round(false));
  }
  for (std::size_t i = 0; i < count; ++i) {
    const std::string k = key(i);
    freeReplyObject(redisCommand(c, "DEL %b", k.data(), k.size()));
  }
  redisFree(c);
  if (!ok) throw std::runtime_error("raw redis SET/GET failed at " + address);
  const double total = static_cast<double>(bytes * count);
  return {total / best_w / 1e9, total / best_r / 1e9};
}
#endif

/// Drops a file's pages from the page cache, so the next reads come from the device.
inline void drop_page_cache(const std::filesystem::path& f) {
  const int fd = ::open(f.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

/// Calls f.template operator()<N>() for the chunk size n (64, 128, 256 or 512).
template <class F>
void with_chunk_size(std::size_t n, F&& f) {
  switch (n) {
    case 64:
      f.template operator()<64>();
      break;
    case 128:
      f.template operator()<128>();
      break;
    case 256:
      f.template operator()<256>();
      break;
    case 512:
      f.template operator()<512>();
      break;
    default:
      throw std::invalid_argument("--chunk " + std::to_string(n) +
                                  " is not built in (64, 128, 256 or 512)");
  }
}

}  // namespace bench
