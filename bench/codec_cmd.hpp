#pragma once
// kvtier-bench codec: compression ratio and encode/decode throughput of each codec on one
// synthetic chunk, against memcpy of the same bytes, passes interleaved so that frequency and
// cache swings hit memcpy and the codecs alike.

#include "common.hpp"

#include <kvtier/codec/fp8_e4m3.hpp>
#include <kvtier/codec/grouped_int.hpp>
#ifdef KVTIER_BENCH_LOSSLESS
#include <kvtier/codec/lossless.hpp>
#endif
#include <synthetic_kv.hpp>

#include <functional>

namespace bench {

inline void codec_command(args& a, bool json, const std::string& plot) {
  if (!plot.empty()) throw std::invalid_argument("codec has no plot (its rows are not a series)");
  const std::size_t layers = a.num("layers", 8), heads = a.num("heads", 8);
  const std::size_t head_size = a.num("head-size", 128), tokens = a.num("chunk", 256);
  const std::size_t group = a.num("group", 64);
  const std::string dtype = a.str("dtype", "bf16");
  const int iters = static_cast<int>(a.num("iters", 5));
  const std::size_t seed = a.num("seed", 1);
  a.check_all_used();
  if (dtype != "bf16" && dtype != "fp16") {
    throw std::invalid_argument("--dtype takes bf16 or fp16, not '" + dtype + "'");
  }
  const auto type =
      dtype == "bf16" ? kvtier::codec::elem_type::bf16 : kvtier::codec::elem_type::fp16;
  const kvtier::layout::chunk_format f{layers, heads, head_size, 2, tokens, 2};
  test::synthetic_kv gen(f, seed);
  const auto src = gen.chunk(type, tokens);
  const std::size_t n = src.size();

  struct entry {
    std::string name;
    std::function<std::size_t(std::span<std::byte>)> encode;
    std::function<std::size_t(std::span<const std::byte>, std::span<std::byte>)> decode;
    std::size_t bound;
  };
  std::vector<entry> codecs;
  // `c` a shared_ptr to a codec: shared because lossless_codec cannot move (its zstd contexts
  // point into it), so every codec is built in place.
  auto add = [&](std::string name, auto c) {
    codecs.push_back(
        {std::move(name),
         [c, &src, tokens](std::span<std::byte> out) { return c->encode(src, tokens, out); },
         [c](std::span<const std::byte> in, std::span<std::byte> out) {
           return c->decode(in, out);
         },
         c->max_encoded_bytes(tokens)});
  };
  namespace cd = kvtier::codec;
  add("fp8_e4m3", std::make_shared<cd::fp8_e4m3_codec>(f, type));
  add("int8 g" + std::to_string(group), std::make_shared<cd::grouped_int_codec>(f, type, 8, group));
  add("int4 g" + std::to_string(group), std::make_shared<cd::grouped_int_codec>(f, type, 4, group));
#ifdef KVTIER_BENCH_LOSSLESS
  for (bool shuffle : {false, true}) {
    const std::string s = shuffle ? " shuffled" : "";
    add("zstd-1" + s, std::make_shared<cd::lossless_codec>(f, cd::codec_id::zstd, 1, shuffle));
    add("zstd-3" + s, std::make_shared<cd::lossless_codec>(f, cd::codec_id::zstd, 3, shuffle));
    add("lz4" + s, std::make_shared<cd::lossless_codec>(f, cd::codec_id::lz4, 1, shuffle));
  }
#endif

  aligned_buffer copy(n), dec(n);
  std::vector<std::unique_ptr<aligned_buffer>> enc;
  for (const auto& c : codecs) enc.push_back(std::make_unique<aligned_buffer>(c.bound));
  std::vector<std::size_t> sizes(codecs.size());
  std::vector<double> best_enc(codecs.size(), 1e30), best_dec(codecs.size(), 1e30);
  std::vector<std::uint64_t> allocs(codecs.size(), 0);
  double best_copy = 1e30;
  auto bytes = [](aligned_buffer& b, std::size_t size) { return std::span(b.data, size); };
  progress bar("codec", static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    for (std::size_t k = 0; k < codecs.size(); ++k) {
      // memcpy before each codec, so that every codec has a copy measured next to it.
      auto t0 = clock_type::now();
      std::memcpy(copy.data, src.data(), n);
      best_copy = std::min(best_copy, seconds_since(t0));
      const auto a0 = allocations.load();
      t0 = clock_type::now();
      sizes[k] = codecs[k].encode(bytes(*enc[k], codecs[k].bound));
      best_enc[k] = std::min(best_enc[k], seconds_since(t0));
      t0 = clock_type::now();
      const std::size_t got = codecs[k].decode(bytes(*enc[k], sizes[k]), bytes(dec, n));
      best_dec[k] = std::min(best_dec[k], seconds_since(t0));
      allocs[k] += allocations.load() - a0;
      if (got != tokens) throw std::runtime_error(codecs[k].name + " decoded the wrong tokens");
      if (codecs[k].name.rfind("zstd", 0) == 0 || codecs[k].name.rfind("lz4", 0) == 0) {
        if (std::memcmp(dec.data, src.data(), n) != 0) {
          throw std::runtime_error(codecs[k].name + " did not give back the chunk's bytes");
        }
      }
    }
    bar.step();
  }
  if (std::memcmp(copy.data, src.data(), n) != 0) throw std::runtime_error("memcpy went wrong");

  report rep(
      "kvtier-bench codec: one chunk per codec against memcpy of the same bytes, passes "
      "interleaved");
  const double copy_gbps = static_cast<double>(n) / best_copy / 1e9;
  for (std::size_t k = 0; k < codecs.size(); ++k) {
    const double e = static_cast<double>(n) / best_enc[k] / 1e9;
    const double d = static_cast<double>(n) / best_dec[k] / 1e9;
    rep.row({{"codec", codecs[k].name},
             {"ratio", static_cast<double>(n) / static_cast<double>(sizes[k])},
             {"encode GB/s", e},
             {"decode GB/s", d},
             {"memcpy GB/s", copy_gbps},
             {"encode / memcpy", e / copy_gbps},
             {"decode / memcpy", d / copy_gbps},
             {"allocations", static_cast<double>(allocs[k])}});
  }
  char note[240];
  std::snprintf(note, sizeof note,
                "one chunk of %zu bytes (%zu layers, %zu heads of %zu, %zu tokens, %s, synthetic "
                "KV with outlier K channels, seed %zu); one thread; GB/s of chunk bytes; best of "
                "%d",
                n, layers, heads, head_size, tokens, dtype.c_str(), seed, iters);
  rep.note(note);
  rep.print(json);
}

}  // namespace bench
