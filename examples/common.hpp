// What the examples share: a stand-in for an engine's paged KV memory, a deterministic
// "prefill" that fills it from token ids, and the printing and checking every example does.
// None of this is kvtier; an engine has its own versions of all of it.
#pragma once
#include <kvtier/kvtier.hpp>

#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace example {

/// Every example's engine keeps vLLM's flash layout: one [2, blocks, block_size, heads, head_size]
/// tensor per layer.
using layout = kvtier::layout::vllm_flash_nhd;

/// The engine's paged KV: one tensor per layer in the engine's own memory, addressed by block.
class paged_kv {
 public:
  paged_kv(const kvtier::model_shape& m, std::int64_t blocks) : m_(m), blocks_(blocks) {
    const auto s = kvtier::layout::shape_of<layout>(m, blocks);
    shape_.assign(s.begin(), s.end());
    const std::size_t bytes = 2 * blocks * m.block_size * m.kv_heads * m.head_size * m.dtype_size;
    for (std::uint32_t l = 0; l < m.layers; ++l) {
      layers_.emplace_back(bytes);
      ptrs_.push_back(layers_.back().data());
    }
  }

  /// What kvtier's store and retrieve are given: the tensors and their shape.
  kvtier::engine_kv kv() const { return {ptrs_, shape_}; }
  std::int64_t blocks() const { return blocks_; }

  /// "Prefill" of tokens [begin, end) of `tokens` into the blocks of `table`: each head row is
  /// filled from a hash of the token's whole prefix, as a real model's KV depends on it.
  void compute(const std::vector<kvtier::token_id>& tokens, kvtier::block_table table,
               std::size_t begin, std::size_t end) {
    visit(tokens, table, begin, end, [](std::uint64_t* row, std::uint64_t want) { *row = want; });
  }
  /// True when tokens [begin, end) in the blocks of `table` hold exactly what compute() writes.
  bool matches(const std::vector<kvtier::token_id>& tokens, kvtier::block_table table,
               std::size_t begin, std::size_t end) {
    bool same = true;
    visit(tokens, table, begin, end,
          [&](std::uint64_t* row, std::uint64_t want) { same = same && *row == want; });
    return same;
  }
  /// Overwrites every block, as if the engine had reused its memory for other requests.
  void scribble() {
    for (auto& l : layers_) std::memset(l.data(), 0xA5, l.size());
  }
  /// True when tokens [begin, end) of `table` still hold what scribble() wrote.
  bool scribbled(kvtier::block_table table, std::size_t begin, std::size_t end) {
    for (std::size_t l = 0; l < m_.layers; ++l)
      for (std::size_t kv = 0; kv < 2; ++kv)
        for (std::size_t t = begin; t < end; ++t)
          for (std::size_t h = 0; h < m_.kv_heads; ++h) {
            const std::byte* p = row(l, kv, table, t, h);
            for (std::size_t i = 0; i < row_bytes(); ++i)
              if (p[i] != std::byte{0xA5}) return false;
          }
    return true;
  }

 private:
  std::size_t row_bytes() const { return std::size_t{m_.head_size} * m_.dtype_size; }
  // Head row (layer, K or V, token t of the request whose blocks are `table`, head h).
  std::byte* row(std::size_t l, std::size_t kv, kvtier::block_table table, std::size_t t,
                 std::size_t h) {
    const auto b = static_cast<std::size_t>(table[t / m_.block_size]);
    const std::size_t slot = t % m_.block_size;
    const std::size_t nb = static_cast<std::size_t>(blocks_);
    const std::size_t elem = (((kv * nb + b) * m_.block_size + slot) * m_.kv_heads + h);
    return layers_[l].data() + elem * row_bytes();
  }
  static std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }
  template <class F>
  void visit(const std::vector<kvtier::token_id>& tokens, kvtier::block_table table,
             std::size_t begin, std::size_t end, F&& f) {
    std::uint64_t prefix = 0;
    for (std::size_t t = 0; t < end; ++t) {
      prefix = mix(prefix ^ static_cast<std::uint32_t>(tokens[t]));
      if (t < begin) continue;
      for (std::size_t l = 0; l < m_.layers; ++l)
        for (std::size_t kv = 0; kv < 2; ++kv)
          for (std::size_t h = 0; h < m_.kv_heads; ++h) {
            auto* p = reinterpret_cast<std::uint64_t*>(row(l, kv, table, t, h));
            const std::uint64_t seed = mix(prefix + ((l * 2 + kv) * m_.kv_heads + h));
            for (std::size_t i = 0; i < row_bytes() / 8; ++i) f(p + i, mix(seed + i));
          }
    }
  }

  kvtier::model_shape m_;
  std::int64_t blocks_;
  std::vector<std::vector<std::byte>> layers_;
  std::vector<void*> ptrs_;
  std::vector<std::int64_t> shape_;
};

/// `n` token ids drawn from `seed` (a stand-in for a tokenizer's output).
inline std::vector<kvtier::token_id> tokens(std::size_t n, std::uint64_t seed) {
  std::vector<kvtier::token_id> t(n);
  for (auto& x : t) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<kvtier::token_id>((seed >> 33) % 128000);
  }
  return t;
}
inline std::vector<kvtier::token_id> concat(std::vector<kvtier::token_id> a,
                                            const std::vector<kvtier::token_id>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

/// A scratch directory for the example's files: `given` when not null, else one under the
/// system's temporary directory, removed at the end.
struct scratch_dir {
  std::filesystem::path path;
  bool own;
  scratch_dir(const char* given, const char* name)
      : path(given ? std::filesystem::path(given)
                   : std::filesystem::temp_directory_path() /
                         (std::string(name) + "-" + std::to_string(::getpid()))),
        own(given == nullptr) {}
  ~scratch_dir() {
    if (own) std::filesystem::remove_all(path);
  }
  /// path/sub, emptied: what an earlier run left there is gone.
  std::filesystem::path fresh(const char* sub) const {
    std::filesystem::remove_all(path / sub);
    return path / sub;
  }
};

/// One line per tier of a cache's counters.
template <class Stats>
void print_tiers(const Stats& s) {
  for (const auto& t : s.tiers) {
    std::printf("  %-12s hits %3llu  misses %3llu  writes %3llu  promotions %3llu  errors %llu\n",
                t.name, (unsigned long long)t.hits, (unsigned long long)t.misses,
                (unsigned long long)t.writes, (unsigned long long)t.promotions,
                (unsigned long long)t.errors);
  }
}

/// Counts checks; each prints "ok" or "FAILED" and what it checked. finish() prints
/// "<name>: all checks passed" only when none failed, and gives main's exit status.
class checks {
 public:
  explicit checks(const char* name) : name_(name) {}
  bool operator()(bool ok, const char* fmt, ...) __attribute__((format(printf, 3, 4))) {
    std::printf("  %s: ", ok ? "ok" : "FAILED");
    va_list a;
    va_start(a, fmt);
    std::vprintf(fmt, a);
    va_end(a);
    std::printf("\n");
    failed_ += !ok;
    return ok;
  }
  int finish() const {
    if (failed_ == 0) {
      std::printf("%s: all checks passed\n", name_);
    } else {
      std::printf("%s: %d checks FAILED\n", name_, failed_);
    }
    return failed_ == 0 ? 0 : 1;
  }

 private:
  const char* name_;
  int failed_ = 0;
};

}  // namespace example
