#pragma once
// Helpers of the swept limits (disk_raw.hpp, redis_raw.hpp) and of kvtier-bench lower: run work
// on n threads and time it; keep the best write and read time of each point of a 2-D sweep.

#include "common.hpp"

namespace bench {

/// Runs work(t) for t in [0, n), t = 0 on the calling thread; wall seconds from start to the
/// last thread's end.
template <class F>
double timed_threads(std::size_t n, F&& work) {
  const auto t0 = clock_type::now();
  std::vector<std::thread> th;
  for (std::size_t t = 1; t < n; ++t) th.emplace_back(work, t);
  work(std::size_t{0});
  for (auto& x : th) x.join();
  return seconds_since(t0);
}

/// Best (shortest) {write, read} seconds of pass(write, x, y) over `iters` sweeps of xs x ys,
/// points interleaved; stops early once `ok` is false.
template <class Pass>
std::map<std::pair<std::size_t, std::size_t>, std::pair<double, double>> sweep_best(
    int iters, const std::vector<std::size_t>& xs, const std::vector<std::size_t>& ys,
    const std::atomic<bool>& ok, Pass&& pass) {
  std::map<std::pair<std::size_t, std::size_t>, std::pair<double, double>> best;
  for (int i = 0; i < iters && ok; ++i) {
    for (std::size_t x : xs) {
      for (std::size_t y : ys) {
        auto [it, fresh] = best.try_emplace({x, y}, 1e30, 1e30);
        it->second.first = std::min(it->second.first, pass(true, x, y));
        it->second.second = std::min(it->second.second, pass(false, x, y));
      }
    }
  }
  return best;
}

}  // namespace bench
