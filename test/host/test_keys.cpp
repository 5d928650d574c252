// Chunk keys: deterministic across processes and machines, chained, salted.
#include "support.hpp"

#include <kvtier/detail/xxhash.hpp>

#include <set>

using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<16>>;

namespace {

std::vector<kvtier::token_id> iota_tokens(std::size_t n) {
  std::vector<kvtier::token_id> t(n);
  std::iota(t.begin(), t.end(), 0);
  return t;
}

std::vector<kvtier::chunk_key> keys_of(const cache_t& c, const std::vector<kvtier::token_id>& t) {
  std::vector<kvtier::chunk_key> k(c.chunk_count(t.size()));
  c.keys(t, k);
  return k;
}

cache_t make(const kvtier::salt& s, kvtier::cache_config cfg = {}) {
  return cache_t(test::small_model, s, {{std::size_t{1} << 20}}, cfg);
}

// The spec of docs/keys.md, re-derived with the raw xxHash API (not through kvtier's hasher).
kvtier::chunk_key spec_salt_key(const kvtier::salt& s, std::uint64_t fingerprint) {
  std::string b = "kvtier.salt.v1";
  auto u64 = [&](std::uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<char>(v >> (8 * i)));
  };
  auto str = [&](const std::string& v) {
    u64(v.size());
    b += v;
  };
  str(s.model_id);
  str(s.kv_dtype);
  u64(fingerprint);
  u64(s.tp_rank);
  u64(s.tp_size);
  str(s.tenant);
  str("xxh3_128");
  const XXH128_hash_t h = XXH3_128bits(b.data(), b.size());
  return {h.low64, h.high64};
}

kvtier::chunk_key spec_next(kvtier::chunk_key prev, const kvtier::token_id* t, std::size_t n) {
  std::vector<unsigned char> b;
  for (std::uint64_t w : {prev.lo, prev.hi})
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<unsigned char>(w >> (8 * i)));
  for (std::size_t i = 0; i < n; ++i) {
    const auto v = static_cast<std::uint32_t>(t[i]);
    for (int j = 0; j < 4; ++j) b.push_back(static_cast<unsigned char>(v >> (8 * j)));
  }
  const XXH128_hash_t h = XXH3_128bits(b.data(), b.size());
  return {h.low64, h.high64};
}

}  // namespace

TEST_CASE("keys match pinned values (stable across processes, machines and releases)") {
  const auto c = make(test::small_salt);
  // Pinned once; a change here changes every stored key and must be a deliberate format bump.
  CHECK(c.format().fingerprint() == 6238354583096102012ull);
  CHECK(c.salt_key().hex() == "32705dd21287d96fce08c2441522727c");
  const auto k = keys_of(c, iota_tokens(48));
  REQUIRE(k.size() == 3);
  CHECK(k[0].hex() == "835b4b71a1507f9b70502c0666fb1c6f");
  CHECK(k[1].hex() == "b5ca8531287a2f401e61f7ae3a1e562d");
  CHECK(k[2].hex() == "5905bf23bf8c33c71b8e44b2ed517603");
}

TEST_CASE("keys follow the documented spec exactly") {
  for (const kvtier::salt& s :
       {test::small_salt, kvtier::salt{"llama-3-8b", "fp8_e4m3", 3, 8, "tenant-a"}}) {
    const auto c = make(s);
    const auto seed = spec_salt_key(s, c.format().fingerprint());
    CHECK(c.salt_key() == seed);
    const auto t = test::tokens(16 * 5, 42);
    const auto k = keys_of(c, t);
    kvtier::chunk_key prev = seed;
    for (std::size_t i = 0; i < k.size(); ++i) {
      prev = spec_next(prev, t.data() + i * 16, 16);
      CHECK(k[i] == prev);
    }
  }
}

TEST_CASE("keys are chained on the prefix") {
  const auto c = make(test::small_salt);
  auto a = test::tokens(64, 1), b = a;
  b[3] ^= 1;  // differ only in the first chunk
  const auto ka = keys_of(c, a), kb = keys_of(c, b);
  for (std::size_t i = 0; i < ka.size(); ++i) CHECK(ka[i] != kb[i]);
  auto d = a;
  d[40] ^= 1;  // differ only in the third chunk
  const auto kd = keys_of(c, d);
  CHECK(kd[0] == ka[0]);
  CHECK(kd[1] == ka[1]);
  CHECK(kd[2] != ka[2]);
  CHECK(kd[3] != ka[3]);
  // The same chunk tokens after a different prefix give a different key.
  std::vector<kvtier::token_id> x(a.begin() + 16, a.end());
  CHECK(keys_of(c, x)[0] != ka[1]);
}

TEST_CASE("every salt field separates keys") {
  const auto t = test::tokens(32, 7);
  std::set<std::string> seen;
  const kvtier::salt base = test::small_salt;
  std::vector<kvtier::salt> salts(6, base);
  salts[1].model_id = "other-model";
  salts[2].kv_dtype = "fp16";
  salts[3].tp_rank = 1, salts[3].tp_size = 2;
  salts[4].tp_size = 2;
  salts[5].tenant = "tenant-b";
  for (const auto& s : salts) seen.insert(keys_of(make(s), t)[0].hex());
  CHECK(seen.size() == salts.size());
  // The chunk format is part of the salt: another head size never shares keys.
  kvtier::model_shape m = test::small_model;
  m.head_size = 16;
  cache_t other(m, base, {{std::size_t{1} << 20}});
  CHECK(keys_of(other, t)[0] != keys_of(make(base), t)[0]);
}

TEST_CASE("only full chunks have keys unless the partial tail is enabled") {
  const auto t = test::tokens(16 * 2 + 5, 3);
  const auto full = make(test::small_salt);
  CHECK(full.chunk_count(t.size()) == 2);
  kvtier::cache_config cfg;
  cfg.store_partial_tail = true;
  const auto part = make(test::small_salt, cfg);
  CHECK(part.chunk_count(t.size()) == 3);
  const auto kf = keys_of(full, t), kp = keys_of(part, t);
  CHECK(kp[0] == kf[0]);
  CHECK(kp[1] == kf[1]);
  // A partial tail's key differs from the full chunk that extends it.
  auto longer = t;
  longer.resize(16 * 3, 9);
  std::copy(t.begin() + 32, t.end(), longer.begin() + 32);
  CHECK(keys_of(part, longer)[2] != kp[2]);
}

TEST_CASE("keys() rejects a short output span, naming the sizes") {
  const auto c = make(test::small_salt);
  const auto t = test::tokens(64, 1);
  std::vector<kvtier::chunk_key> out(2);
  CHECK_THROWS_WITH_AS(c.keys(t, out), doctest::Contains("holds 2 keys, 64 tokens make 4 chunks"),
                       kvtier::invalid_argument);
}

// Chunk keys on the XXH3 loop chosen at run time (kvtier/detail/xxhash.hpp; its checksums are
// tested in test_xxhash.cpp): every loop must give the keys other processes computed.
TEST_CASE("keys of long chunks are the spec's on the loop chosen at run time") {
  // Long chunks' tokens go through the streaming loop; the spec hashes them in one shot.
  const kvtier::chunk_key prev{42, 43};
  for (const std::size_t n : {16u, 60u, 64u, 256u, 1000u, 4096u}) {
    const auto t = test::tokens(n, static_cast<std::uint32_t>(n));
    CHECK(kvtier::key::xxh3_hasher::next(prev, t) == spec_next(prev, t.data(), t.size()));
  }
}
