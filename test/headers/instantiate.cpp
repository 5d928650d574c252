// kvtier's public headers with the flags engines build with (ctest label "headers"): this file
// is compiled, never run, by clang++ and g++ at -O3 -Wall -Wextra -Werror. It instantiates the
// public templates and calls every call of each, because a template member that is never
// instantiated is never checked, and -O3's flow-sensitive warnings (maybe-uninitialized,
// array-bounds, stringop-*) only fire where code is generated. exercise<> is explicitly
// instantiated and exercise_groups is not inline, so the compiler generates both whatever it
// inlines. No aggregate here leaves a field to its default, so -Wmissing-field-initializers (in
// -Wextra) checks kvtier's own aggregates only.
#include <kvtier/kvtier.hpp>
#if defined(KVTIER_HEADERS_REDIS)
#include <kvtier/tier/redis.hpp>
#endif
#include <kvtier/codec/byte_shuffle.hpp>
#include <kvtier/codec/concept.hpp>
#include <kvtier/codec/fp8_e4m3.hpp>
#include <kvtier/codec/grouped_int.hpp>
#if defined(KVTIER_HEADERS_LOSSLESS)
#include <kvtier/codec/lossless.hpp>
#endif

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace o = kvtier::opt;
namespace ly = kvtier::layout;
namespace tr = kvtier::tier;

// The README's cache: vLLM flash NHD, host then local disk.
using nhd_disk_t = kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                                 o::tiers<tr::host, tr::local_disk>>;
// Head-major layout with the block size fixed at compile time, host only.
using hnd_host_t =
    kvtier::cache<o::layout<ly::flashinfer_hnd>, o::block_tokens<16>, o::chunk_tokens<64>>;
// One-plane MLA latent, host then disk.
using mla_disk_t = kvtier::cache<o::chunk_tokens<64>, o::layout<ly::mla_latent>,
                                 o::tiers<tr::host, tr::local_disk>>;
// Per-slot state pages, the usual companion group of a hybrid model.
using state_t = kvtier::cache<o::chunk_tokens<64>, o::layout<ly::state_pages>>;
using groups_t = kvtier::group_cache<mla_disk_t, state_t>;

// The shared host tier between the host and disk tiers (several processes of a node).
using shared_t = kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                               o::tiers<tr::host, tr::shared_host, tr::local_disk>>;

template class kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                             o::tiers<tr::host, tr::local_disk>>;
template class kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                             o::tiers<tr::host, tr::shared_host, tr::local_disk>>;
template class kvtier::cache<o::layout<ly::flashinfer_hnd>, o::block_tokens<16>,
                             o::chunk_tokens<64>>;
template class kvtier::cache<o::chunk_tokens<64>, o::layout<ly::mla_latent>,
                             o::tiers<tr::host, tr::local_disk>>;
template class kvtier::group_cache<mla_disk_t, state_t>;
#if defined(KVTIER_HEADERS_REDIS)
// The Redis tier below the disk.
using redis_t = kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                              o::tiers<tr::host, tr::local_disk, tr::redis>>;
template class kvtier::cache<o::chunk_tokens<256>, o::layout<ly::vllm_flash_nhd>,
                             o::tiers<tr::host, tr::local_disk, tr::redis>>;
#endif

namespace headers {

// Every call of one cache, in the order an engine makes them.
template <class Cache>
std::size_t exercise(const kvtier::model_shape& model, const typename Cache::tier_configs& tiers,
                     const kvtier::cache_config& cfg, const kvtier::engine_kv& kv,
                     kvtier::block_table table, std::span<const kvtier::token_id> tokens,
                     std::span<kvtier::chunk_key> keys) {
  Cache c(model, kvtier::salt{"headers", "bf16", 0, 1, ""}, tiers, cfg);
  std::size_t n = c.store(tokens, kv, table);
  n += c.chunk_count(tokens.size());
  n += c.keys(tokens, keys);
  n += c.prefetch(tokens);
  auto hit = c.lookup(tokens);
  n += hit.tokens();
  n += c.retrieve(hit, kv, table);
  auto again = c.lookup(tokens, 1);
  c.release(again);
  auto pin = c.pin(tokens);
  n += pin.tokens() + c.unpin(pin);
  c.flush();
  n += c.clear(tokens);
  n += c.clear();
  const auto s = c.stats();
  n += static_cast<std::size_t>(s.tiers[0].hits);
  return n;
}

template std::size_t exercise<nhd_disk_t>(const kvtier::model_shape&,
                                          const nhd_disk_t::tier_configs&,
                                          const kvtier::cache_config&, const kvtier::engine_kv&,
                                          kvtier::block_table, std::span<const kvtier::token_id>,
                                          std::span<kvtier::chunk_key>);
template std::size_t exercise<hnd_host_t>(const kvtier::model_shape&,
                                          const hnd_host_t::tier_configs&,
                                          const kvtier::cache_config&, const kvtier::engine_kv&,
                                          kvtier::block_table, std::span<const kvtier::token_id>,
                                          std::span<kvtier::chunk_key>);
template std::size_t exercise<mla_disk_t>(const kvtier::model_shape&,
                                          const mla_disk_t::tier_configs&,
                                          const kvtier::cache_config&, const kvtier::engine_kv&,
                                          kvtier::block_table, std::span<const kvtier::token_id>,
                                          std::span<kvtier::chunk_key>);

template std::size_t exercise<shared_t>(const kvtier::model_shape&, const shared_t::tier_configs&,
                                        const kvtier::cache_config&, const kvtier::engine_kv&,
                                        kvtier::block_table, std::span<const kvtier::token_id>,
                                        std::span<kvtier::chunk_key>);

// A scheduler's view of the shared tier: every call.
std::size_t exercise_shared_lookup(const kvtier::model_shape& model,
                                   const tr::shared_host::config& c,
                                   std::span<const kvtier::token_id> tokens) {
  kvtier::shared_lookup<shared_t> view(model, kvtier::salt{"headers", "bf16", 0, 1, ""}, c);
  std::size_t n = view.cached_tokens(tokens);
  const auto t = view.lease(tokens);
  auto held = view.adopt(t);
  n += held.chunks();
  held.reset();
  n += view.release(t) ? 1 : 0;
  const auto s = view.handle().stats();
  n += static_cast<std::size_t>(s.writes) + view.handle().census().ready + view.handle().reap_now();
  return n;
}

// Every call of a group cache: an MLA group (full attention) and a state group (a window).
std::size_t exercise_groups(const kvtier::group<mla_disk_t>& mla,
                            const kvtier::group<state_t>& state,
                            std::span<const kvtier::engine_kv> kvs,
                            std::span<const kvtier::block_table> tables,
                            std::span<const kvtier::token_id> tokens,
                            std::span<const std::size_t> first_tokens) {
  groups_t g(kvtier::salt{"headers", "bf16", 0, 1, ""}, mla, state);
  std::size_t n = g.store(tokens, kvs, tables, first_tokens);
  auto hit = g.lookup(tokens);
  n += hit.tokens();
  n += g.retrieve(hit, kvs, tables);
  n += g.cache<0>().pin(tokens).tokens();
  n += g.rule(1).window_tokens;
  g.flush();
  return n;
}

// Every call of each codec (not in the umbrella: included above).
template <class Codec>
std::size_t exercise_codec(Codec& c, std::span<const std::byte> chunk, std::size_t tokens,
                           std::span<std::byte> encoded, std::span<std::byte> decoded) {
  std::size_t n = c.max_encoded_bytes(tokens) + c.format().chunk_tokens;
  n += c.descriptor().lossy() ? 1 : 0;
  const std::size_t size = c.encode(chunk, tokens, encoded);
  return n + c.decode(encoded.first(size), decoded);
}

std::size_t exercise_codecs(const ly::chunk_format& f, std::span<const std::byte> chunk,
                            std::size_t tokens, std::span<std::byte> encoded,
                            std::span<std::byte> decoded) {
  namespace cd = kvtier::codec;
  cd::fp8_e4m3_codec fp8(f, cd::elem_type::bf16);
  cd::grouped_int_codec i8(f, cd::elem_type::fp16, 8, 64), i4(f, cd::elem_type::bf16, 4, 32);
  std::size_t n = exercise_codec(fp8, chunk, tokens, encoded, decoded);
  n += exercise_codec(i8, chunk, tokens, encoded, decoded) + i8.bits() + i8.group_size();
  n += exercise_codec(i4, chunk, tokens, encoded, decoded) + i4.groups(1, tokens);
  n += cd::float_to_fp8_e4m3(cd::fp8_e4m3_to_float(static_cast<std::uint8_t>(n)));
  cd::byte_shuffle(chunk.data(), decoded.data(), chunk.size(), 2);
  cd::byte_unshuffle(chunk.data(), decoded.data(), chunk.size(), 2);
#if defined(KVTIER_HEADERS_LOSSLESS)
  cd::lossless_codec z(f, cd::codec_id::zstd, 1, true), l(f, cd::codec_id::lz4, 1, false);
  n += exercise_codec(z, chunk, tokens, encoded, decoded);
  n += exercise_codec(l, chunk, tokens, encoded, decoded);
#endif
  return n + std::string_view(cd::name(cd::codec_id::zstd)).size() +
         std::string_view(cd::name(cd::elem_type::bf16)).size();
}

#if defined(KVTIER_HEADERS_REDIS)
template std::size_t exercise<redis_t>(const kvtier::model_shape&, const redis_t::tier_configs&,
                                       const kvtier::cache_config&, const kvtier::engine_kv&,
                                       kvtier::block_table, std::span<const kvtier::token_id>,
                                       std::span<kvtier::chunk_key>);
#endif

}  // namespace headers
