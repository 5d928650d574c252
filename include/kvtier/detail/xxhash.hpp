#pragma once
// xxHash, inlined (XXH_INLINE_ALL) so a header-only kvtier links nothing; safe next to an engine
// that includes xxhash.h itself (the header supports both modes in one translation unit).
//
// Run-time AVX2. A default x86-64 build compiles XXH3's long-input loop for SSE2 only, which
// hashes at about a third of the AVX2 loop's rate (docs/performance.md, "Checksums"): every
// verified load and every store's checksum paid for it unless the engine built with -mavx2.
// Where it can, this header also compiles the AVX2 loop (a target attribute: no -mavx2 needed)
// and xxh3_64_seeded / xxh3_update pick it when the CPU has AVX2, as xxHash's own
// xxh_x86dispatch.c does. Every variant of XXH3 returns the same hashes, so records and keys do
// not depend on the CPU that wrote them. Off (the compile-time loop) when the build already
// targets AVX2, outside GCC/Clang on x86-64, in CUDA translation units, for an xxHash other than
// 0.8.1 (its internal calls are used), when xxhash.h's implementation was included before this
// header or XXH_ACC_ALIGN was set below 32, or with -DKVTIER_NO_XXH_DISPATCH.

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX2__) && \
    !defined(__CUDACC__) && !defined(KVTIER_NO_XXH_DISPATCH) && !defined(XXH_IMPLEM_13a8737387)
#define KVTIER_XXH_TRY_AVX2 1
#include <immintrin.h>
#ifndef XXH_DISPATCH_AVX2
#define XXH_DISPATCH_AVX2 1
#endif
#ifndef XXH_TARGET_AVX2
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#endif
// The AVX2 loop reads and writes its accumulators and derived secret as aligned 32-byte
// vectors; an SSE2 build aligns them to 16 only, so a frame 16 bytes off faults (vmovdqa).
// 64, as xxh_x86dispatch.c has it; an engine's own smaller value turns the dispatch off below.
#ifndef XXH_ACC_ALIGN
#define XXH_ACC_ALIGN 64
#endif
#endif

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#define KVTIER_DEFINED_XXH_INLINE_ALL
#endif
#include <xxhash.h>
#ifdef KVTIER_DEFINED_XXH_INLINE_ALL
#undef XXH_INLINE_ALL
#undef KVTIER_DEFINED_XXH_INLINE_ALL
#endif

#include <cstddef>
#include <cstdint>

#if defined(KVTIER_XXH_TRY_AVX2) && XXH_VERSION_NUMBER == 801 && XXH_DISPATCH_AVX2 && \
    XXH_ACC_ALIGN >= 32 && XXH_SEC_ALIGN >= 32
#define KVTIER_XXH_AVX2_DISPATCH 1
#else
#define KVTIER_XXH_AVX2_DISPATCH 0
#endif

namespace kvtier::detail {

#if KVTIER_XXH_AVX2_DISPATCH
/// True when this CPU (and its OS) runs AVX2; asked once.
inline bool xxh3_has_avx2() noexcept {
  static const bool yes = __builtin_cpu_supports("avx2") != 0;
  return yes;
}
XXH_TARGET_AVX2 inline std::uint64_t xxh3_long_seeded_avx2(const void* p, std::size_t n,
                                                           std::uint64_t seed) noexcept {
  return XXH3_hashLong_64b_withSeed_internal(p, n, seed, XXH3_accumulate_512_avx2,
                                             XXH3_scrambleAcc_avx2, XXH3_initCustomSecret_avx2);
}
XXH_TARGET_AVX2 inline void xxh3_update_avx2(XXH3_state_t* st, const void* p,
                                             std::size_t n) noexcept {
  (void)XXH3_update(st, static_cast<const xxh_u8*>(p), n, XXH3_accumulate_512_avx2,
                    XXH3_scrambleAcc_avx2);
}
#endif

/// The loop xxh3_64_seeded and xxh3_update run: "avx2" (chosen at run time) or the build's own.
[[nodiscard]] inline const char* xxh3_loop() noexcept {
#if KVTIER_XXH_AVX2_DISPATCH
  if (xxh3_has_avx2()) return "avx2 (run-time)";
#endif
#if defined(__AVX512F__)
  return "avx512 (build)";
#elif defined(__AVX2__)
  return "avx2 (build)";
#elif defined(__SSE2__)
  return "sse2 (build)";
#else
  return "scalar (build)";
#endif
}

/// XXH3_64bits_withSeed(p, n, seed), long inputs through the AVX2 loop when the CPU has one.
[[nodiscard]] inline std::uint64_t xxh3_64_seeded(const void* p, std::size_t n,
                                                  std::uint64_t seed) noexcept {
#if KVTIER_XXH_AVX2_DISPATCH
  if (n > XXH3_MIDSIZE_MAX && xxh3_has_avx2()) return xxh3_long_seeded_avx2(p, n, seed);
#endif
  return XXH3_64bits_withSeed(p, n, seed);
}

/// XXH3_64bits_update / XXH3_128bits_update (one routine for both), through the AVX2 loop when
/// the CPU has one. The state's digest is unchanged (it ends with the build's own loop, which
/// gives the same value).
inline void xxh3_update(XXH3_state_t* st, const void* p, std::size_t n) noexcept {
#if KVTIER_XXH_AVX2_DISPATCH
  if (xxh3_has_avx2()) {
    xxh3_update_avx2(st, p, n);
    return;
  }
#endif
  (void)XXH3_64bits_update(st, p, n);
}

}  // namespace kvtier::detail
