// XXH3 through kvtier/detail/xxhash.hpp, built at the build's own optimisation and again at -O0
// and -Os (test/CMakeLists.txt: host.xxhash, host.xxhash_O0, host.xxhash_Os). The run-time AVX2
// loop must work in any frame: at -O2 and -O3 GCC realigns the stack for it by itself, at -O0 and
// -Os (the Python extension's nanobind default) it gives the accumulators only the alignment the
// header asked for, and 16 bytes faulted there.
#include <kvtier/detail/record.hpp>
#include <kvtier/detail/xxhash.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

// The hash, called through a pointer (never inlined into a frame of known alignment) below a
// stack moved by `shift` bytes: XXH3's accumulators and derived secret live in the callee's
// frame, so some shift puts them 16 bytes off a 32-byte boundary.
using hash_fn = std::uint64_t (*)(const void*, std::size_t, std::uint64_t, bool);
std::uint64_t hash_once(const void* p, std::size_t n, std::uint64_t seed, bool streamed) {
  if (!streamed) return kvtier::detail::xxh3_64_seeded(p, n, seed);
  XXH3_state_t st{};
  (void)XXH3_64bits_reset_withSeed(&st, seed);
  kvtier::detail::xxh3_update(&st, p, n);
  return XXH3_64bits_digest(&st);
}
hash_fn volatile hash_through = hash_once;
[[gnu::noinline]] std::uint64_t hash_at_shift(std::size_t shift, const void* p, std::size_t n,
                                              std::uint64_t seed, bool streamed) {
  char* pad = static_cast<char*>(__builtin_alloca(shift + 1));
  asm volatile("" : : "r"(pad) : "memory");
  return hash_through(p, n, seed, streamed);
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> b(n);
  for (auto& x : b) x = static_cast<std::byte>(rng());
  return b;
}

}  // namespace

TEST_CASE("the run-time AVX2 loop runs in frames of any alignment") {
  MESSAGE("XXH3 loop: " << std::string(kvtier::detail::xxh3_loop()));
  const auto buf = random_bytes(8192, 12);
  for (const bool streamed : {false, true}) {
    for (const std::uint64_t seed : {std::uint64_t{0}, std::uint64_t{0x9e3779b97f4a7c15}}) {
      const std::uint64_t want = XXH3_64bits_withSeed(buf.data(), buf.size(), seed);
      for (std::size_t shift = 0; shift < 128; shift += 8) {
        INFO("streamed " << streamed << ", seed " << seed << ", stack moved by " << shift);
        CHECK(hash_at_shift(shift, buf.data(), buf.size(), seed, streamed) == want);
      }
    }
  }
}

// Every loop must give the same hashes as xxHash's own API (checksums in records written
// elsewhere depend on it), for every length and however a stream is split.
TEST_CASE("checksums are xxHash's own values on the loop chosen at run time") {
#if defined(__x86_64__) && !defined(__AVX2__) && !defined(__CUDACC__) && \
    !defined(KVTIER_NO_XXH_DISPATCH) && XXH_VERSION_NUMBER == 801
  // The dispatch must not turn itself off unnoticed where it can work.
  if (__builtin_cpu_supports("avx2")) {
    CHECK(std::string(kvtier::detail::xxh3_loop()) == "avx2 (run-time)");
  }
#endif
  std::mt19937_64 rng(11);
  const auto buf = random_bytes(300000, 13);
  const kvtier::chunk_key k{0x0123456789abcdefull, 0xfedcba9876543210ull};
  std::vector<std::size_t> lengths = {0,    1,    16,    17,         128,       129,
                                      240,  241,  255,   256,        1023,      1024,
                                      1025, 4096, 65536, 131072 + 3, buf.size()};
  for (int i = 0; i < 40; ++i) lengths.push_back(rng() % buf.size());
  for (const std::size_t n : lengths) {
    const std::size_t off = rng() % 64;  // unaligned starts too
    const std::size_t len = std::min(n, buf.size() - off);
    INFO("length " << len << " at offset " << off);
    const std::byte* p = buf.data() + off;
    const std::uint64_t want = XXH3_64bits_withSeed(p, len, k.lo ^ k.hi);
    CHECK(kvtier::detail::payload_checksum(k, p, len) == want);
    kvtier::detail::payload_hasher h(k);
    for (std::size_t at = 0; at < len;) {
      const std::size_t piece = std::min<std::size_t>(len - at, 1 + rng() % 70000);
      h.update(p + at, piece);
      at += piece;
    }
    CHECK(h.digest() == want);
  }
}
