#pragma once
// Seeded synthetic KV for the codec tests and kvtier-bench codec: one chunk in kvtier's chunk
// format, bf16 or fp16, shaped like what attention layers produce. K has a per-channel offset and
// spread, with a few outlier channels an order of magnitude larger (the structure KIVI quantizes
// K per channel for); V is centred with a per-token spread. Queries are drawn from K's
// distribution.

#include <kvtier/codec/float16.hpp>
#include <kvtier/layout/chunk_format.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace test {

/// The distribution of one chunk's K and V, drawn from `seed`.
class synthetic_kv {
 public:
  synthetic_kv(const kvtier::layout::chunk_format& f, std::uint64_t seed,
               double outlier_share = 0.03)
      : f_(f), rng_(seed) {
    const std::size_t channels = f.layers * f.heads * f.head_size;
    k_mean_.resize(channels);
    k_std_.resize(channels);
    std::uniform_real_distribution<double> u(0, 1);
    for (std::size_t c = 0; c < channels; ++c) {
      k_mean_[c] = 0.5 * normal();
      k_std_[c] = std::exp(0.3 * normal());
      if (u(rng_) < outlier_share) {
        k_mean_[c] = (u(rng_) < 0.5 ? -1 : 1) * (8 + 7 * u(rng_));
        k_std_[c] *= 1.5;
      }
    }
  }

  /// A chunk of `tokens` tokens as `type` elements (bf16 or fp16), in chunk order.
  std::vector<std::byte> chunk(kvtier::codec::elem_type type, std::size_t tokens) {
    std::vector<std::byte> out(f_.bytes(tokens));
    const std::size_t row = f_.heads * f_.head_size;
    std::byte* o = out.data();
    for (std::size_t l = 0; l < f_.layers; ++l) {
      for (std::size_t p = 0; p < f_.kv_planes; ++p) {
        for (std::size_t t = 0; t < tokens; ++t) {
          const double v_spread = std::exp(0.25 * normal());
          for (std::size_t c = 0; c < row; ++c) {
            const std::size_t ch = l * row + c;
            const double x =
                p == 0 ? k_mean_[ch] + k_std_[ch] * normal() : 0.8 * v_spread * normal();
            const std::uint16_t h = kvtier::codec::from_float(type, static_cast<float>(x));
            std::memcpy(o, &h, 2);
            o += 2;
          }
        }
      }
    }
    return out;
  }

  /// `n` queries for head `head` of layer `layer`, from K's distribution there (n x head_size).
  std::vector<double> queries(std::size_t layer, std::size_t head, std::size_t n) {
    std::vector<double> q(n * f_.head_size);
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t e = 0; e < f_.head_size; ++e) {
        const std::size_t ch = (layer * f_.heads + head) * f_.head_size + e;
        q[i * f_.head_size + e] = k_mean_[ch] + k_std_[ch] * normal();
      }
    }
    return q;
  }

 private:
  double normal() { return n_(rng_); }

  kvtier::layout::chunk_format f_;
  std::mt19937_64 rng_;
  std::normal_distribution<double> n_{0.0, 1.0};
  std::vector<double> k_mean_, k_std_;
};

}  // namespace test
