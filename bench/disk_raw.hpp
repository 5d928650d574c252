#pragma once
// The disk limit of kvtier-bench: raw O_DIRECT pwrite/pread on one preallocated file, swept over
// request size and thread count (each thread one request in flight, so threads = queue depth),
// the best of each direction being the limit: what the device gives to any client that keeps
// enough large requests in flight, whatever the object size of the client measured against it.

#include "common.hpp"
#include "sweep.hpp"

namespace bench {

/// The best raw O_DIRECT rates found by a sweep, and the sweep itself.
struct disk_limit {
  double write_gbps = 0, read_gbps = 0;  ///< best over the sweep; 0 when O_DIRECT is refused
  std::size_t write_request = 0, write_threads = 0, read_request = 0, read_threads = 0;
  report sweep{"raw O_DIRECT sweep"};
};

/// Writes then reads `total` bytes (rounded up to the largest request) of a file in `dir` with
/// every pair of `requests` (bytes, multiples of 4 KiB) x `threads`, `iters` times, pairs
/// interleaved so that a virtual disk's swings hit all alike. Each write pass goes to a fresh,
/// preallocated file and ends with fdatasync.
/// `object` (0: none) joins the request sizes, so the sweep covers the older record-size
/// baseline too.
inline disk_limit raw_disk_limit(const std::filesystem::path& dir, std::size_t total, int iters,
                                 std::size_t object = 0,
                                 std::vector<std::size_t> requests = {1u << 20, 4u << 20,
                                                                      16u << 20},
                                 const std::vector<std::size_t>& threads = {1, 4, 8, 16}) {
  disk_limit out;
  if (object > 0 && object % 4096 == 0 &&
      std::find(requests.begin(), requests.end(), object) == requests.end()) {
    requests.insert(requests.begin(), object);
  }
  const std::size_t max_req = *std::max_element(requests.begin(), requests.end());
  const std::size_t max_threads = *std::max_element(threads.begin(), threads.end());
  total = std::max<std::size_t>(1, (total + max_req - 1) / max_req) * max_req;
  std::filesystem::create_directories(dir);
  const auto path = dir / ("kvtier-bench-limit-" + std::to_string(::getpid()));
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) return out;
  std::vector<std::unique_ptr<aligned_buffer>> bufs;
  for (std::size_t t = 0; t < max_threads; ++t) {
    bufs.push_back(std::make_unique<aligned_buffer>(max_req));
  }
  std::atomic<bool> ok{true};
  auto pass = [&](bool write, std::size_t req, std::size_t n) {
    if (write && (::ftruncate(fd, 0) != 0 ||
                  ::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(total)) != 0)) {
      ok = false;
    }
    const std::size_t pieces = total / req;
    std::atomic<std::size_t> next{0};
    auto work = [&](std::size_t t) {
      for (std::size_t p; (p = next++) < pieces && ok;) {
        const auto off = static_cast<off_t>(p * req);
        const ssize_t r =
            write ? ::pwrite(fd, bufs[t]->data, req, off) : ::pread(fd, bufs[t]->data, req, off);
        if (r != static_cast<ssize_t>(req)) ok = false;
      }
    };
    double s = timed_threads(n, work);
    if (write) {
      const auto t0 = clock_type::now();
      if (::fdatasync(fd) != 0) ok = false;
      s += seconds_since(t0);
    }
    return s;
  };
  const auto best = sweep_best(iters, requests, threads, ok, pass);
  ::close(fd);
  std::filesystem::remove(path);
  if (!ok) return out;
  const auto bytes = static_cast<double>(total);
  for (const auto& [cfg, s] : best) {
    const double w = bytes / s.first / 1e9, r = bytes / s.second / 1e9;
    out.sweep.row({{"request KiB", static_cast<double>(cfg.first / 1024)},
                   {"threads", static_cast<double>(cfg.second)},
                   {"write GB/s", w},
                   {"read GB/s", r}});
    if (w > out.write_gbps)
      out.write_gbps = w, out.write_request = cfg.first, out.write_threads = cfg.second;
    if (r > out.read_gbps)
      out.read_gbps = r, out.read_request = cfg.first, out.read_threads = cfg.second;
  }
  return out;
}

}  // namespace bench
