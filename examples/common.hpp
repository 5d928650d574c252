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
    expected(tokens, table, begin, end, [](std::uint64_t& w, std::uint64_t want) { w = want; });
  }
  /// True when tokens [begin, end) in the blocks of `table` hold exactly what compute() writes.
  bool matches(const std::vector<kvtier::token_id>& tokens, kvtier::block_table table,
               std::size_t begin, std::size_t end) {
    bool same = true;
    expected(tokens, table, begin, end,
             [&](std::uint64_t& w, std::uint64_t want) { same = same && w == want; });
    return same;
  }
  /// Overwrites every block, as if the engine had reused its memory for other requests.
  void scribble() {
    for (auto& l : layers_) std::memset(l.data(), 0xA5, l.size());
  }
  /// Overwrites tokens [begin, end) of `table` the same way.
  void scribble(kvtier::block_table table, std::size_t begin, std::size_t end) {
    rows(table, begin, end, [](std::size_t, std::size_t, std::uint64_t& w) { w = poison; });
  }
  /// True when tokens [begin, end) of `table` still hold what scribble() wrote.
  bool scribbled(kvtier::block_table table, std::size_t begin, std::size_t end) {
    bool same = true;
    rows(table, begin, end,
         [&](std::size_t, std::size_t, std::uint64_t& w) { same = same && w == poison; });
    return same;
  }

 private:
  static constexpr std::uint64_t poison = 0xA5A5A5A5A5A5A5A5ull;
  static std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }
  // f(token, which, word) for every 8-byte word of tokens [begin, end) in the blocks of `table`;
  // `which` numbers the word within the token's KV (layer, K/V, head, position in the row).
  template <class F>
  void rows(kvtier::block_table table, std::size_t begin, std::size_t end, F&& f) {
    const std::size_t words = std::size_t{m_.head_size} * m_.dtype_size / 8;
    const auto nb = static_cast<std::size_t>(blocks_);
    for (std::size_t l = 0; l < m_.layers; ++l)
      for (std::size_t kv = 0; kv < 2; ++kv)
        for (std::size_t t = begin; t < end; ++t) {
          const auto b = static_cast<std::size_t>(table[t / m_.block_size]);
          const std::size_t slot = ((kv * nb + b) * m_.block_size + t % m_.block_size);
          auto* w =
              reinterpret_cast<std::uint64_t*>(layers_[l].data()) + slot * m_.kv_heads * words;
          for (std::size_t i = 0; i < m_.kv_heads * words; ++i) {
            f(t, ((l * 2 + kv) * m_.kv_heads * words + i), w[i]);
          }
        }
  }
  // f(word, want) with what compute() writes into each word of tokens [begin, end).
  template <class F>
  void expected(const std::vector<kvtier::token_id>& tokens, kvtier::block_table table,
                std::size_t begin, std::size_t end, F&& f) {
    std::vector<std::uint64_t> prefix(end + 1, 0);  // prefix[t + 1]: hash of tokens [0, t]
    for (std::size_t t = 0; t < end; ++t) {
      prefix[t + 1] = mix(prefix[t] ^ static_cast<std::uint32_t>(tokens[t]));
    }
    rows(table, begin, end, [&](std::size_t t, std::size_t which, std::uint64_t& w) {
      f(w, mix(prefix[t + 1] + which));
    });
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
