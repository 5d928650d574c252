#pragma once
// What a codec is (its id and parameters) and the fixed header every encoded chunk starts with,
// which decode checks before it reads a byte of payload.

#include "kvtier/codec/float16.hpp"
#include "kvtier/detail/checked.hpp"
#include "kvtier/error.hpp"
#include "kvtier/layout/chunk_format.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

namespace kvtier::codec {

/// Encoded bytes that do not match the codec decoding them: another codec's, another chunk
/// format's, truncated, or corrupt. The message names the value that does not match.
class codec_error : public error {
 public:
  using error::error;
};

/// Which codec encoded a chunk. Values are stored in encoded chunks: never renumber.
enum class codec_id : std::uint8_t {
  zstd = 1,          ///< lossless, zstd
  lz4 = 2,           ///< lossless, lz4
  fp8_e4m3 = 3,      ///< lossy, one fp8 e4m3 byte per element
  int8_grouped = 4,  ///< lossy, 8-bit codes with a scale and minimum per group
  int4_grouped = 5,  ///< lossy, 4-bit codes with a scale and minimum per group
};

/// Name of `id` for messages and reports.
[[nodiscard]] constexpr const char* name(codec_id id) noexcept {
  switch (id) {
    case codec_id::zstd:
      return "zstd";
    case codec_id::lz4:
      return "lz4";
    case codec_id::fp8_e4m3:
      return "fp8_e4m3";
    case codec_id::int8_grouped:
      return "int8_grouped";
    case codec_id::int4_grouped:
      return "int4_grouped";
  }
  return "unknown";
}

/// A codec and its parameters: what a record carries so that a reader picks the same decoder,
/// and what a cache compares against the encodings it accepts. Trivially copyable, 8 bytes.
struct codec_descriptor {
  codec_id id = codec_id::zstd;
  elem_type source = elem_type::bytes;  ///< the element type decode gives back
  std::uint8_t level = 0;               ///< zstd level or lz4 acceleration; 0 for lossy codecs
  bool shuffle = false;                 ///< lossless: bytes of each element split into planes
  std::uint32_t group_size = 0;         ///< grouped codecs: elements per scale; 0 otherwise

  /// Whether decode may give back other bytes than were encoded.
  [[nodiscard]] constexpr bool lossy() const noexcept {
    return id != codec_id::zstd && id != codec_id::lz4;
  }
  friend constexpr bool operator==(const codec_descriptor&, const codec_descriptor&) = default;
};

static_assert(sizeof(codec_descriptor) == 8 && std::is_trivially_copyable_v<codec_descriptor>,
              "codec_descriptor is 8 trivially copyable bytes, what a record carries");

/// Size of the header that starts every encoded chunk.
inline constexpr std::size_t header_bytes = 32;

/// The header of an encoded chunk, little-endian on the wire:
/// `magic u32 | id u8 | source u8 | flags u8 (bit 0: shuffle) | level u8 | group_size u32 |
///  tokens u32 | chunk format fingerprint u64 | payload bytes u64`.
struct encoded_header {
  codec_descriptor codec;
  std::uint32_t tokens = 0;
  std::uint64_t format = 0;
  std::uint64_t payload = 0;
};

namespace detail {

inline constexpr std::uint32_t header_magic = 0x3143564bu;  // "KVC1"

inline void put_le(std::byte* p, std::uint64_t v, int n) noexcept {
  for (int i = 0; i < n; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffu);
}
[[nodiscard]] inline std::uint64_t get_le(const std::byte* p, int n) noexcept {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

inline void write_header(const encoded_header& h, std::byte* out) noexcept {
  put_le(out, header_magic, 4);
  put_le(out + 4, static_cast<std::uint8_t>(h.codec.id), 1);
  put_le(out + 5, static_cast<std::uint8_t>(h.codec.source), 1);
  put_le(out + 6, h.codec.shuffle ? 1u : 0u, 1);
  put_le(out + 7, h.codec.level, 1);
  put_le(out + 8, h.codec.group_size, 4);
  put_le(out + 12, h.tokens, 4);
  put_le(out + 16, h.format, 8);
  put_le(out + 24, h.payload, 8);
}

[[noreturn]] inline void bad(const std::string& what) {
  throw codec_error("kvtier: encoded chunk " + what);
}

/// Reads the header of `in` and checks it against the codec `expect` decoding it and its chunk
/// format `f`: the tokens are 1..f.chunk_tokens and the payload is what follows the header.
/// Returns the header; throws codec_error naming the first field that does not match.
[[nodiscard]] inline encoded_header read_header(std::span<const std::byte> in,
                                                const codec_descriptor& expect,
                                                const layout::chunk_format& f) {
  if (in.size() < header_bytes) {
    bad("of " + std::to_string(in.size()) + " bytes is shorter than its " +
        std::to_string(header_bytes) + "-byte header");
  }
  const std::byte* p = in.data();
  if (const auto m = get_le(p, 4); m != header_magic) bad("has magic " + std::to_string(m));
  encoded_header h;
  h.codec.id = static_cast<codec_id>(get_le(p + 4, 1));
  h.codec.source = static_cast<elem_type>(get_le(p + 5, 1));
  const auto flags = get_le(p + 6, 1);
  h.codec.shuffle = (flags & 1u) != 0;
  h.codec.level = static_cast<std::uint8_t>(get_le(p + 7, 1));
  h.codec.group_size = static_cast<std::uint32_t>(get_le(p + 8, 4));
  h.tokens = static_cast<std::uint32_t>(get_le(p + 12, 4));
  h.format = get_le(p + 16, 8);
  h.payload = get_le(p + 24, 8);
  if (h.codec.id != expect.id) {
    bad("has codec id " + std::to_string(static_cast<int>(h.codec.id)) + ", this codec is " +
        std::to_string(static_cast<int>(expect.id)) + " (" + name(expect.id) + ")");
  }
  if (flags > 1) bad("has flags " + std::to_string(flags));
  if (h.codec.source != expect.source) {
    bad("has element type " + std::to_string(static_cast<int>(h.codec.source)) + ", expected " +
        name(expect.source));
  }
  if (h.codec.shuffle != expect.shuffle) bad("has shuffle " + std::to_string(flags));
  if (h.codec.level != expect.level) bad("has level " + std::to_string(h.codec.level));
  if (h.codec.group_size != expect.group_size) {
    bad("has group size " + std::to_string(h.codec.group_size) + ", expected " +
        std::to_string(expect.group_size));
  }
  if (h.format != f.fingerprint()) {
    bad("has chunk format fingerprint " + std::to_string(h.format) + ", expected " +
        std::to_string(f.fingerprint()));
  }
  if (h.tokens == 0 || h.tokens > f.chunk_tokens) {
    bad("has " + std::to_string(h.tokens) + " tokens, expected 1 to " +
        std::to_string(f.chunk_tokens));
  }
  if (h.payload != in.size() - header_bytes) {
    bad("says " + std::to_string(h.payload) + " payload bytes, " +
        std::to_string(in.size() - header_bytes) + " follow its header");
  }
  return h;
}

/// Checks an encode call: `src` holds exactly `tokens` tokens of `f` and `out` holds at least
/// `bound` bytes. Throws invalid_argument naming the bad size.
inline void check_encode(const layout::chunk_format& f, std::size_t src, std::size_t tokens,
                         std::size_t out, std::size_t bound) {
  if (tokens == 0 || tokens > f.chunk_tokens) {
    throw invalid_argument("kvtier: encode of " + std::to_string(tokens) +
                           " tokens, expected 1 to " + std::to_string(f.chunk_tokens));
  }
  if (src != f.bytes(tokens)) {
    throw invalid_argument("kvtier: encode of " + std::to_string(src) + " bytes, " +
                           std::to_string(tokens) + " tokens of the chunk format are " +
                           std::to_string(f.bytes(tokens)));
  }
  if (out < bound) {
    throw invalid_argument("kvtier: encode into " + std::to_string(out) + " bytes, the bound is " +
                           std::to_string(bound));
  }
}

/// Checks a decode's output span against the decoded size of `tokens` tokens.
inline void check_decode_out(const layout::chunk_format& f, std::size_t tokens, std::size_t out) {
  if (out < f.bytes(tokens)) {
    throw invalid_argument("kvtier: decode into " + std::to_string(out) + " bytes, " +
                           std::to_string(tokens) + " tokens need " +
                           std::to_string(f.bytes(tokens)));
  }
}

/// The chunk format's full size with checked arithmetic (what f.bytes() computes unchecked).
[[nodiscard]] inline std::size_t checked_chunk_bytes(const layout::chunk_format& f,
                                                     std::size_t tokens) {
  using kvtier::detail::checked_mul;
  return checked_mul(
      checked_mul(checked_mul(f.layers, f.kv_planes, "chunk layers x planes"),
                  checked_mul(tokens, f.heads, "chunk tokens x heads"), "chunk rows"),
      checked_mul(f.head_size, f.dtype_size, "chunk row bytes"), "chunk bytes");
}

/// Checks what every lossy codec needs of a chunk format: a 16-bit element type, a source of
/// bf16 or fp16, and a size that fits 2^64.
inline void check_lossy_format(const layout::chunk_format& f, elem_type source, const char* who) {
  if (source != elem_type::bf16 && source != elem_type::fp16) {
    throw invalid_argument(std::string("kvtier: ") + who + " takes bf16 or fp16 elements, not " +
                           name(source));
  }
  if (f.dtype_size != 2) {
    throw invalid_argument(std::string("kvtier: ") + who + " takes 2-byte elements, not " +
                           std::to_string(f.dtype_size));
  }
  if (f.kv_planes != 1 && f.kv_planes != 2) {
    throw invalid_argument(std::string("kvtier: ") + who + " takes 1 or 2 kv planes, not " +
                           std::to_string(f.kv_planes));
  }
  if (f.chunk_tokens == 0 || f.chunk_tokens > 0xffffffffu) {
    throw invalid_argument(std::string("kvtier: ") + who + " takes 1 to 2^32-1 chunk tokens, not " +
                           std::to_string(f.chunk_tokens));
  }
  (void)checked_chunk_bytes(f, f.chunk_tokens);
}

}  // namespace detail
}  // namespace kvtier::codec
