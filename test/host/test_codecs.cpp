// The codecs: exact conversions (bf16, fp16, fp8 e4m3 against a brute-force nearest value),
// per-element error bounds of the lossy codecs derived from their grids, the error of attention
// output over decoded K/V against a bound derived from those, byte-exact lossless round trips,
// refusal of encodings that do not match, and no heap allocation on encode or decode.
#include "alloc_counter.hpp"
#include "synthetic_kv.hpp"

#include <kvtier/codec/fp8_e4m3.hpp>
#include <kvtier/codec/grouped_int.hpp>
#ifdef KVTIER_TEST_LOSSLESS
#include <kvtier/codec/lossless.hpp>
#endif

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using kvtier::codec::elem_type;
using kvtier::layout::chunk_format;
namespace codec = kvtier::codec;

// doctest::Contains for a std::string (doctest takes its own string type).
doctest::Contains contains(const std::string& s) { return doctest::Contains(s.c_str()); }

// 2 layers, 4 KV heads of 64, 128-token chunks of 2-byte elements.
const chunk_format fmt{2, 4, 64, 2, 128, 2};

std::uint16_t elem_at(const std::vector<std::byte>& b, std::size_t i) {
  std::uint16_t h;
  std::memcpy(&h, b.data() + 2 * i, 2);
  return h;
}

// Largest rounding error of the source type at `y` (half its unit roundoff times |y|, with
// binary16's subnormal spacing as a floor).
double half_ulp(elem_type t, double y) {
  return t == elem_type::bf16 ? std::fabs(y) * 0x1p-8 : std::max(std::fabs(y) * 0x1p-11, 0x1p-25);
}

// Relative Frobenius error of plane `plane` (0 K, 1 V) of `dec` against `ref`.
double plane_error(const chunk_format& f, elem_type t, const std::vector<std::byte>& ref,
                   const std::vector<std::byte>& dec, std::size_t tokens, std::size_t plane) {
  const std::size_t n = tokens * f.heads * f.head_size;
  double num = 0, den = 0;
  for (std::size_t l = 0; l < f.layers; ++l) {
    const std::size_t base = (l * f.kv_planes + plane) * n;
    for (std::size_t i = 0; i < n; ++i) {
      const double x = codec::to_float(t, elem_at(ref, base + i));
      const double y = codec::to_float(t, elem_at(dec, base + i));
      num += (x - y) * (x - y);
      den += x * x;
    }
  }
  return std::sqrt(num / den);
}

struct attention_check {
  double rel_error = 0;  // ||O' - O||_F / ||O||_F over every layer, head and query
  bool within_bound = true;
  double worst_share = 0;  // largest |O' - O| as a share of its bound
};

// Attention softmax(q K^T / sqrt(d)) V per (layer, head) over the raw and the decoded chunk, in
// double, with `nq` queries from K's distribution. The bound: with logits perturbed by at most
// delta = sum_e |q_e| max_t |dK_te| / sqrt(d), every weight moves by a factor in
// [e^-2delta, e^2delta], so sum_j |p'_j - p_j| <= e^2delta - 1, and
// |O'_k - O_k| <= (e^2delta - 1) max_j |V'_jk| + max_j |dV_jk|.
attention_check attention(const chunk_format& f, elem_type t, const std::vector<std::byte>& ref,
                          const std::vector<std::byte>& dec, std::size_t tokens,
                          test::synthetic_kv& gen, std::size_t nq) {
  attention_check r;
  const std::size_t d = f.head_size, row = f.heads * d, n = tokens * row;
  std::vector<double> k(tokens * d), k2(tokens * d), v(tokens * d), v2(tokens * d);
  std::vector<double> s(tokens), s2(tokens);
  double num = 0, den = 0;
  for (std::size_t l = 0; l < f.layers; ++l) {
    for (std::size_t h = 0; h < f.heads; ++h) {
      for (std::size_t tk = 0; tk < tokens; ++tk) {
        for (std::size_t e = 0; e < d; ++e) {
          const std::size_t i = tk * row + h * d + e, o = tk * d + e;
          k[o] = codec::to_float(t, elem_at(ref, l * 2 * n + i));
          k2[o] = codec::to_float(t, elem_at(dec, l * 2 * n + i));
          v[o] = codec::to_float(t, elem_at(ref, l * 2 * n + n + i));
          v2[o] = codec::to_float(t, elem_at(dec, l * 2 * n + n + i));
        }
      }
      std::vector<double> dk(d, 0), dv(d, 0), vmax(d, 0);
      for (std::size_t tk = 0; tk < tokens; ++tk) {
        for (std::size_t e = 0; e < d; ++e) {
          const std::size_t o = tk * d + e;
          dk[e] = std::max(dk[e], std::fabs(k2[o] - k[o]));
          dv[e] = std::max(dv[e], std::fabs(v2[o] - v[o]));
          vmax[e] = std::max(vmax[e], std::fabs(v2[o]));
        }
      }
      const auto q = gen.queries(l, h, nq);
      for (std::size_t qi = 0; qi < nq; ++qi) {
        const double* qv = q.data() + qi * d;
        double delta = 0;
        for (std::size_t e = 0; e < d; ++e) delta += std::fabs(qv[e]) * dk[e];
        delta /= std::sqrt(static_cast<double>(d));
        auto softmax = [&](const std::vector<double>& kk, std::vector<double>& out) {
          double top = -std::numeric_limits<double>::infinity();
          for (std::size_t tk = 0; tk < tokens; ++tk) {
            double dot = 0;
            for (std::size_t e = 0; e < d; ++e) dot += qv[e] * kk[tk * d + e];
            out[tk] = dot / std::sqrt(static_cast<double>(d));
            top = std::max(top, out[tk]);
          }
          double sum = 0;
          for (auto& x : out) sum += (x = std::exp(x - top));
          for (auto& x : out) x /= sum;
        };
        softmax(k, s);
        softmax(k2, s2);
        for (std::size_t e = 0; e < d; ++e) {
          double o = 0, o2 = 0;
          for (std::size_t tk = 0; tk < tokens; ++tk) {
            o += s[tk] * v[tk * d + e];
            o2 += s2[tk] * v2[tk * d + e];
          }
          num += (o2 - o) * (o2 - o);
          den += o * o;
          const double bound = std::expm1(2 * delta) * vmax[e] + dv[e] + 1e-12;
          r.worst_share = std::max(r.worst_share, std::fabs(o2 - o) / bound);
          if (std::fabs(o2 - o) > bound) r.within_bound = false;
        }
      }
    }
  }
  r.rel_error = std::sqrt(num / den);
  return r;
}

// Every value representable by e4m3, for the brute-force nearest search.
std::vector<std::pair<float, std::uint8_t>> fp8_values() {
  std::vector<std::pair<float, std::uint8_t>> v;
  for (unsigned b = 0; b < 256; ++b) {
    const float x = codec::fp8_e4m3_to_float(static_cast<std::uint8_t>(b));
    if (!std::isnan(x)) v.emplace_back(x, static_cast<std::uint8_t>(b));
  }
  return v;
}

}  // namespace

TEST_CASE("bf16 and fp16 convert exactly, and round to nearest even") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const float fb = codec::bf16_to_float(b), fh = codec::fp16_to_float(b);
    if (std::isnan(fb)) {
      CHECK(std::isnan(codec::bf16_to_float(codec::float_to_bf16(fb))));
    } else {
      CHECK(codec::float_to_bf16(fb) == b);
    }
    if (std::isnan(fh)) {
      CHECK(std::isnan(codec::fp16_to_float(codec::float_to_fp16(fh))));
    } else {
      CHECK(codec::float_to_fp16(fh) == b);
    }
  }
  // Ties: 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7 and goes to the even 1; 1 + 3 * 2^-8
  // goes up to the even 1 + 2^-6.
  CHECK(codec::float_to_bf16(1.0f + 0x1p-8f) == 0x3f80);
  CHECK(codec::float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);
  CHECK(codec::float_to_fp16(1.0f + 0x1p-11f) == 0x3c00);
  CHECK(codec::float_to_fp16(1.0f + 3 * 0x1p-11f) == 0x3c02);
  CHECK(codec::float_to_fp16(65520.0f) == 0x7c00);  // rounds past 65504
  CHECK(codec::float_to_fp16(65519.0f) == 0x7bff);
  CHECK(codec::float_to_fp16(0x1p-25f) == 0x0000);      // half the smallest subnormal: even 0
  CHECK(codec::float_to_fp16(3 * 0x1p-25f) == 0x0002);  // 1.5 units: even 2
  CHECK(codec::fp16_to_float(0x0001) == 0x1p-24f);
}

TEST_CASE("fp8 e4m3: every bf16 and fp16 value goes to the nearest e4m3 value, ties to even") {
  const auto values = fp8_values();
  CHECK(values.size() == 254);
  for (unsigned b = 0; b < 256; ++b) {
    const float x = codec::fp8_e4m3_to_float(static_cast<std::uint8_t>(b));
    if (std::isnan(x)) {
      CHECK((b & 0x7f) == 0x7f);
    } else if (x != 0 || b == 0) {
      CHECK(codec::float_to_fp8_e4m3(x) == b);
    }
  }
  for (elem_type t : {elem_type::bf16, elem_type::fp16}) {
    for (std::uint32_t h = 0; h < 65536; ++h) {
      const float x = codec::to_float(t, static_cast<std::uint16_t>(h));
      const std::uint8_t got = codec::float_to_fp8_e4m3(x);
      if (std::isnan(x)) {
        CHECK((got & 0x7f) == 0x7f);
        continue;
      }
      if (std::fabs(x) >= codec::fp8_e4m3_max) {
        CHECK(got == (std::signbit(x) ? 0xfe : 0x7e));  // saturates, infinities too
        continue;
      }
      double best = std::numeric_limits<double>::infinity();
      for (const auto& [v, code] : values) best = std::min(best, std::fabs(double(v) - x));
      const float y = codec::fp8_e4m3_to_float(got);
      REQUIRE(std::fabs(double(y) - x) == best);
      // A tie goes to the even code (mantissa bit 0 clear).
      int ties = 0;
      for (const auto& [v, code] : values) ties += std::fabs(double(v) - x) == best;
      if (ties == 2 && x != 0) CHECK((got & 1) == 0);
      CHECK(std::signbit(y) == std::signbit(x));
    }
  }
  CHECK(codec::float_to_fp8_e4m3(448.0f) == 0x7e);
  CHECK(codec::float_to_fp8_e4m3(1e9f) == 0x7e);
  CHECK(codec::float_to_fp8_e4m3(-std::numeric_limits<float>::infinity()) == 0xfe);
  CHECK(codec::float_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()) == 0x7f);
  CHECK(codec::float_to_fp8_e4m3(1.0625f) == 0x38);   // tie between 1 and 1.125: 1
  CHECK(codec::float_to_fp8_e4m3(1.1875f) == 0x3a);   // tie between 1.125 and 1.25: 1.25
  CHECK(codec::float_to_fp8_e4m3(0x1p-10f) == 0x00);  // half the smallest subnormal
  CHECK(codec::float_to_fp8_e4m3(3 * 0x1p-10f) == 0x02);
}

TEST_CASE("fp8 codec: errors within 2^-4 relative (2^-10 absolute below 2^-6), NaN kept") {
  for (elem_type t : {elem_type::bf16, elem_type::fp16}) {
    const std::string type_name = codec::name(t);
    CAPTURE(type_name);
    test::synthetic_kv gen(fmt, 11);
    auto ref = gen.chunk(t, fmt.chunk_tokens);
    const std::uint16_t nan = codec::from_float(t, std::numeric_limits<float>::quiet_NaN());
    std::memcpy(ref.data() + 6, &nan, 2);
    codec::fp8_e4m3_codec c(fmt, t);
    CHECK(!c.descriptor().lossy() == false);
    std::vector<std::byte> enc(c.max_encoded_bytes(fmt.chunk_tokens)), dec(ref.size());
    CHECK(enc.size() == codec::header_bytes + ref.size() / 2);
    const auto before = g_allocs.load();
    const std::size_t n = c.encode(ref, fmt.chunk_tokens, enc);
    const std::size_t tokens = c.decode(std::span(enc).first(n), dec);
    CHECK(g_allocs.load() == before);
    CHECK(tokens == fmt.chunk_tokens);
    CHECK(std::isnan(codec::to_float(t, elem_at(dec, 3))));
    for (std::size_t i = 0; i < ref.size() / 2; ++i) {
      if (i == 3) continue;
      const double x = codec::to_float(t, elem_at(ref, i)), y = codec::to_float(t, elem_at(dec, i));
      const double bound =
          std::fabs(x) > 448 ? std::fabs(x) - 448 : std::max(std::fabs(x) * 0x1p-4, 0x1p-10);
      REQUIRE(std::fabs(x - y) <= bound);
    }
    std::memcpy(ref.data() + 6, ref.data() + 4, 2);  // no NaN for the error measures
    REQUIRE(c.decode(std::span(enc).first(c.encode(ref, fmt.chunk_tokens, enc)), dec) == 128);
    const double ek = plane_error(fmt, t, ref, dec, 128, 0),
                 ev = plane_error(fmt, t, ref, dec, 128, 1);
    const auto a = attention(fmt, t, ref, dec, 128, gen, 16);
    MESSAGE("fp8_e4m3 ", std::string(codec::name(t)), ": K rel error ", ek, ", V rel error ", ev,
            ", attention rel error ", a.rel_error, " (worst ", a.worst_share, " of its bound)");
    CHECK(ek <= 0x1p-4);
    CHECK(ev <= 0x1p-4);
    CHECK(a.within_bound);
  }
}

TEST_CASE("grouped int8 and int4: errors within half a group's scale, attention within its bound") {
  struct shape_case {
    chunk_format f;
    std::size_t tokens;
  };
  // Full chunks, a partial tail with a partial K group, an odd element count (int4's last
  // nibble), a V row that is not a multiple of the group, and one latent plane.
  const shape_case shapes[] = {{fmt, 128},
                               {fmt, 100},
                               {{1, 1, 3, 2, 8, 2}, 5},
                               {{1, 3, 40, 2, 64, 2}, 64},
                               {{2, 1, 64, 2, 64, 1}, 64}};
  for (elem_type t : {elem_type::bf16, elem_type::fp16}) {
    for (unsigned bits : {8u, 4u}) {
      for (std::size_t g : {32u, 64u, 128u}) {
        for (const auto& sc : shapes) {
          const chunk_format& f = sc.f;
          const std::string type_name = codec::name(t);
          CAPTURE(type_name);
          CAPTURE(bits);
          CAPTURE(g);
          CAPTURE(f.heads * f.head_size);
          CAPTURE(sc.tokens);
          test::synthetic_kv gen(f, 7 + g);
          const auto ref = gen.chunk(t, sc.tokens);
          codec::grouped_int_codec c(f, t, bits, g);
          std::vector<std::byte> enc(c.max_encoded_bytes(sc.tokens)), dec(ref.size());
          const auto before = g_allocs.load();
          const std::size_t n = c.encode(ref, sc.tokens, enc);
          const std::size_t tokens = c.decode(enc, dec);
          CHECK(g_allocs.load() == before);
          REQUIRE(n == enc.size());
          REQUIRE(tokens == sc.tokens);
          // The bound from the group's range, computed here independently of the codec.
          const std::size_t row = f.heads * f.head_size, plane_n = sc.tokens * row;
          const double levels = bits == 8 ? 255 : 15;
          for (std::size_t l = 0; l < f.layers; ++l) {
            for (std::size_t p = 0; p < f.kv_planes; ++p) {
              const std::size_t base = (l * f.kv_planes + p) * plane_n;
              auto x_at = [&](std::size_t tk, std::size_t c_) {
                return double(codec::to_float(t, elem_at(ref, base + tk * row + c_)));
              };
              for (std::size_t tk = 0; tk < sc.tokens; ++tk) {
                for (std::size_t ch = 0; ch < row; ++ch) {
                  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
                  if (p == 0) {
                    for (std::size_t u = tk / g * g; u < std::min(sc.tokens, tk / g * g + g); ++u) {
                      lo = std::min(lo, x_at(u, ch));
                      hi = std::max(hi, x_at(u, ch));
                    }
                  } else {
                    for (std::size_t u = ch / g * g; u < std::min(row, ch / g * g + g); ++u) {
                      lo = std::min(lo, x_at(tk, u));
                      hi = std::max(hi, x_at(tk, u));
                    }
                  }
                  const double x = x_at(tk, ch);
                  const double y = codec::to_float(t, elem_at(dec, base + tk * row + ch));
                  const double scale = (hi - lo) / levels;
                  // Float arithmetic in the codec: a few units of 2^-24 of the group's magnitude.
                  const double bound = scale / 2 * (1 + 1e-5) +
                                       4 * 0x1p-24 * (std::fabs(lo) + std::fabs(hi)) +
                                       half_ulp(t, y);
                  REQUIRE(std::fabs(x - y) <= bound);
                }
              }
            }
          }
          if (f.kv_planes == 2 && sc.tokens == 128 && f.heads == 4) {
            const double ek = plane_error(f, t, ref, dec, 128, 0);
            const double ev = plane_error(f, t, ref, dec, 128, 1);
            const auto a = attention(f, t, ref, dec, 128, gen, 16);
            MESSAGE("int", bits, " group ", g, " ", std::string(codec::name(t)), ": ratio ",
                    double(ref.size()) / double(n), ", K rel error ", ek, ", V rel error ", ev,
                    ", attention rel error ", a.rel_error, " (worst ", a.worst_share,
                    " of its bound)");
            CHECK(a.within_bound);
            CHECK(ek < (bits == 8 ? 0.01 : 0.15));
            CHECK(ev < (bits == 8 ? 0.01 : 0.15));
          }
        }
      }
    }
  }
}

TEST_CASE("attention error of each lossy codec with and without outlier K channels") {
  for (double outliers : {0.0, 0.03}) {
    test::synthetic_kv gen(fmt, 17, outliers);
    const auto ref = gen.chunk(elem_type::bf16, 128);
    std::vector<std::byte> dec(ref.size());
    auto measure = [&](auto& c, const std::string& what) {
      std::vector<std::byte> enc(c.max_encoded_bytes(128));
      REQUIRE(c.decode(std::span(enc).first(c.encode(ref, 128, enc)), dec) == 128);
      const auto a = attention(fmt, elem_type::bf16, ref, dec, 128, gen, 16);
      MESSAGE(what, ", outlier share ", outliers, ": K ",
              plane_error(fmt, elem_type::bf16, ref, dec, 128, 0), ", V ",
              plane_error(fmt, elem_type::bf16, ref, dec, 128, 1), ", attention ", a.rel_error);
      CHECK(a.within_bound);
      return a.rel_error;
    };
    codec::fp8_e4m3_codec fp8(fmt, elem_type::bf16);
    codec::grouped_int_codec i8(fmt, elem_type::bf16, 8, 64), i4(fmt, elem_type::bf16, 4, 64);
    const double e_fp8 = measure(fp8, "fp8_e4m3"), e_i8 = measure(i8, "int8 g64");
    const double e_i4 = measure(i4, "int4 g64");
    CHECK(e_i8 < e_fp8);  // per-channel scales beat a fixed grid, with or without outliers
    CHECK(e_i8 < e_i4);
  }
}

TEST_CASE("grouped int: a constant group decodes exactly, NaN does not reach the codes") {
  const chunk_format f{1, 1, 8, 2, 8, 2};
  std::vector<std::byte> ref(f.bytes(8));
  const std::uint16_t one = codec::float_to_bf16(1.5f);
  for (std::size_t i = 0; i < ref.size() / 2; ++i) std::memcpy(ref.data() + 2 * i, &one, 2);
  const std::uint16_t nan = codec::float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  std::memcpy(ref.data() + ref.size() - 2, &nan, 2);
  for (unsigned bits : {8u, 4u}) {
    codec::grouped_int_codec c(f, elem_type::bf16, bits, 4);
    std::vector<std::byte> enc(c.max_encoded_bytes(8)), dec(ref.size());
    REQUIRE(c.decode(std::span(enc).first(c.encode(ref, 8, enc)), dec) == 8);
    for (std::size_t i = 0; i + 1 < ref.size() / 2; ++i) CHECK(elem_at(dec, i) == one);
  }
}

TEST_CASE("the calls docs/codecs.md shows") {
  const chunk_format format = fmt;
  const std::size_t tokens = 100;
  test::synthetic_kv gen(format, 2);
  const auto chunk = gen.chunk(elem_type::bf16, tokens);
  // clang-format off
  kvtier::codec::grouped_int_codec c(format, kvtier::codec::elem_type::bf16, /*bits=*/4,
                                     /*group_size=*/64);
  std::vector<std::byte> enc(c.max_encoded_bytes(tokens)), dec(format.bytes(tokens));
  const std::size_t n = c.encode(chunk, tokens, enc);  // chunk: format.bytes(tokens) bytes
  const std::size_t got = c.decode(std::span(enc).first(n), dec);  // got == tokens
  // clang-format on
  CHECK(got == tokens);
  CHECK(n == enc.size());
}

TEST_CASE("codecs refuse bad parameters and bad encode sizes, naming the value") {
  using E = kvtier::invalid_argument;
  CHECK_THROWS_WITH_AS(codec::grouped_int_codec(fmt, elem_type::bf16, 6, 32),
                       doctest::Contains("8 or 4 bits, not 6"), E);
  CHECK_THROWS_WITH_AS(codec::grouped_int_codec(fmt, elem_type::bf16, 8, 0),
                       doctest::Contains("group size 0"), E);
  CHECK_THROWS_WITH_AS(codec::fp8_e4m3_codec(fmt, elem_type::bytes),
                       doctest::Contains("bf16 or fp16 elements, not bytes"), E);
  CHECK_THROWS_WITH_AS(codec::fp8_e4m3_codec({1, 1, 8, 4, 8, 2}, elem_type::bf16),
                       doctest::Contains("2-byte elements, not 4"), E);
  // A format whose size overflows 2^64.
  CHECK_THROWS_WITH_AS(
      codec::fp8_e4m3_codec({1ull << 40, 1ull << 20, 128, 2, 256, 2}, elem_type::bf16),
      doctest::Contains("overflows 2^64"), E);
  codec::fp8_e4m3_codec c(fmt, elem_type::bf16);
  std::vector<std::byte> src(fmt.bytes(10)), out(c.max_encoded_bytes(10));
  CHECK_THROWS_WITH_AS(c.encode(src, 11, out),
                       contains("encode of " + std::to_string(src.size()) + " bytes"), E);
  CHECK_THROWS_WITH_AS(c.encode(src, 0, out), doctest::Contains("encode of 0 tokens"), E);
  CHECK_THROWS_WITH_AS(c.encode(src, 10, std::span(out).first(out.size() - 1)),
                       contains("the bound is " + std::to_string(out.size())), E);
  REQUIRE(c.encode(src, 10, out) == out.size());
  std::vector<std::byte> small(fmt.bytes(9));
  CHECK_THROWS_WITH_AS(c.decode(out, small), doctest::Contains("decode into"), E);
}

namespace {

// Every way an encoding can fail to match: each must throw codec_error, none may read or write
// outside the spans (the sanitized builds check that part).
template <class Codec>
void hostile(Codec& c, const std::vector<std::byte>& good, const std::string& who) {
  using E = codec::codec_error;
  CAPTURE(who);
  const chunk_format& f = c.format();
  std::vector<std::byte> out(f.chunk_bytes());
  for (std::size_t n : {std::size_t{0}, std::size_t{5}, codec::header_bytes - 1,
                        codec::header_bytes, good.size() / 2, good.size() - 1}) {
    CHECK_THROWS_AS(c.decode(std::span(good).first(n), out), E);
  }
  CHECK_THROWS_WITH_AS(c.decode(std::span(good).first(20), out), doctest::Contains("shorter"), E);
  auto patched = [&](std::size_t at, std::uint64_t v, int bytes) {
    auto b = good;
    for (int i = 0; i < bytes; ++i) b[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
    return b;
  };
  CHECK_THROWS_WITH_AS(c.decode(patched(0, 0x12345678, 4), out), doctest::Contains("magic"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(4, 99, 1), out), doctest::Contains("codec id 99"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(5, 7, 1), out), doctest::Contains("element type 7"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(6, 2, 1), out), doctest::Contains("flags 2"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(8, 1000, 4), out), doctest::Contains("group size 1000"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(12, 0, 4), out), doctest::Contains("has 0 tokens"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(12, f.chunk_tokens + 1, 4), out),
                       contains("has " + std::to_string(f.chunk_tokens + 1) + " tokens"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(16, 42, 8), out), doctest::Contains("fingerprint 42"), E);
  CHECK_THROWS_WITH_AS(c.decode(patched(24, 1ull << 62, 8), out),
                       contains("says " + std::to_string(1ull << 62)), E);
  auto longer = good;
  longer.push_back(std::byte{0});
  CHECK_THROWS_WITH_AS(c.decode(longer, out), doctest::Contains("payload bytes"), E);
  // Fewer tokens in the header than the payload holds: a size mismatch, not a short read.
  if (!c.descriptor().lossy()) return;
  CHECK_THROWS_WITH_AS(c.decode(patched(12, f.chunk_tokens - 1, 4), out),
                       doctest::Contains("payload bytes"), E);
}

}  // namespace

TEST_CASE("decode refuses encodings that do not match, naming the field") {
  test::synthetic_kv gen(fmt, 3);
  const auto ref = gen.chunk(elem_type::bf16, fmt.chunk_tokens);
  codec::fp8_e4m3_codec fp8(fmt, elem_type::bf16);
  codec::grouped_int_codec i8(fmt, elem_type::bf16, 8, 32), i4(fmt, elem_type::bf16, 4, 32);
  auto encode = [&](auto& c) {
    std::vector<std::byte> e(c.max_encoded_bytes(fmt.chunk_tokens));
    e.resize(c.encode(ref, fmt.chunk_tokens, e));
    return e;
  };
  const auto e_fp8 = encode(fp8), e_i8 = encode(i8), e_i4 = encode(i4);
  hostile(fp8, e_fp8, "fp8");
  hostile(i8, e_i8, "int8");
  hostile(i4, e_i4, "int4");
  std::vector<std::byte> out(ref.size());
  using E = codec::codec_error;
  CHECK_THROWS_WITH_AS(i8.decode(e_fp8, out), doctest::Contains("codec id 3, this codec is 4"), E);
  CHECK_THROWS_WITH_AS(i8.decode(e_i4, out), doctest::Contains("codec id 5"), E);
  CHECK_THROWS_WITH_AS(codec::grouped_int_codec(fmt, elem_type::bf16, 8, 64).decode(e_i8, out),
                       doctest::Contains("group size 32, expected 64"), E);
  CHECK_THROWS_WITH_AS(codec::fp8_e4m3_codec(fmt, elem_type::fp16).decode(e_fp8, out),
                       doctest::Contains("element type 1, expected fp16"), E);
  chunk_format other = fmt;
  other.heads = 2;
  CHECK_THROWS_WITH_AS(codec::fp8_e4m3_codec(other, elem_type::bf16).decode(e_fp8, out),
                       doctest::Contains("fingerprint"), E);
  // Any bytes after a valid header decode to some values without going out of bounds.
  std::mt19937 rng(5);
  for (auto* e : {&e_fp8, &e_i8, &e_i4}) {
    auto noisy = *e;
    for (std::size_t i = codec::header_bytes; i < noisy.size(); ++i) {
      noisy[i] = static_cast<std::byte>(rng());
    }
    if (e == &e_fp8) {
      CHECK(fp8.decode(noisy, out) == fmt.chunk_tokens);
    } else {
      CHECK((e == &e_i8 ? i8 : i4).decode(noisy, out) == fmt.chunk_tokens);
    }
  }
}

#ifdef KVTIER_TEST_LOSSLESS
TEST_CASE("lossless: zstd and lz4, shuffled or not, give back every byte") {
  test::synthetic_kv gen(fmt, 21);
  const auto kv = gen.chunk(elem_type::bf16, fmt.chunk_tokens);
  const auto tail = gen.chunk(elem_type::bf16, 37);
  std::vector<std::byte> noise(fmt.chunk_bytes());
  std::mt19937_64 rng(9);
  for (auto& b : noise) b = static_cast<std::byte>(rng());
  for (auto id : {codec::codec_id::zstd, codec::codec_id::lz4}) {
    double plain_ratio = 0, shuffled_ratio = 0;
    for (bool shuffle : {false, true}) {
      for (int level : {1, 3}) {
        const std::string codec_name = codec::name(id);
        CAPTURE(codec_name);
        CAPTURE(shuffle);
        CAPTURE(level);
        codec::lossless_codec c(fmt, id, level, shuffle);
        CHECK(!c.descriptor().lossy());
        std::vector<std::byte> enc(c.max_encoded_bytes(fmt.chunk_tokens)), dec(kv.size());
        const std::vector<std::byte>* sources[] = {&kv, &tail, &noise};
        for (const auto* src : sources) {
          const std::size_t tokens = src == &tail ? 37 : fmt.chunk_tokens;
          std::fill(dec.begin(), dec.end(), std::byte{0});
          const auto before = g_allocs.load();
          const std::size_t n = c.encode(*src, tokens, enc);
          const std::size_t got = c.decode(std::span(enc).first(n), dec);
          CHECK(g_allocs.load() == before);
          REQUIRE(got == tokens);
          CHECK(std::memcmp(dec.data(), src->data(), src->size()) == 0);
          if (src == &kv && level == 1) {
            const double ratio = double(kv.size()) / double(n);
            MESSAGE((std::string(codec::name(id)) + (shuffle ? " shuffled" : "")),
                    " on synthetic bf16 KV: ratio ", ratio);
            (shuffle ? shuffled_ratio : plain_ratio) = ratio;
          }
        }
        const std::size_t n = c.encode(kv, fmt.chunk_tokens, enc);
        hostile(c, std::vector<std::byte>(enc.begin(), enc.begin() + long(n)),
                std::string(codec::name(id)) + (shuffle ? " shuffled" : ""));
        // Corrupt payloads: refused, or decoded to other bytes, never out of bounds.
        std::vector<std::byte> bad(enc.begin(), enc.begin() + long(n));
        for (int k = 0; k < 64; ++k) {
          auto b = bad;
          b[codec::header_bytes + rng() % (n - codec::header_bytes)] ^= std::byte{0x5a};
          try {
            (void)c.decode(b, dec);
          } catch (const codec::codec_error&) {
          }
        }
      }
    }
    // The shuffle pays on bf16 KV (docs/codecs.md): the sign/exponent bytes compress together.
    CHECK(shuffled_ratio > plain_ratio * 1.1);
  }
  using E = kvtier::invalid_argument;
  CHECK_THROWS_WITH_AS(codec::lossless_codec(fmt, codec::codec_id::fp8_e4m3, 1, false),
                       doctest::Contains("zstd or lz4, not fp8_e4m3"), E);
  CHECK_THROWS_WITH_AS(codec::lossless_codec(fmt, codec::codec_id::zstd, 30, false),
                       doctest::Contains("level 30 is not 1 to 19"), E);
  CHECK_THROWS_WITH_AS(codec::lossless_codec(fmt, codec::codec_id::lz4, 0, false),
                       doctest::Contains("level 0"), E);
}
#endif
