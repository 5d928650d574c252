#pragma once
// The self-describing record a non-memory tier keeps per chunk: a fixed header that carries the
// key, salt, format fingerprint, length and checksums, followed by the chunk's bytes.

#include "kvtier/detail/xxhash.hpp"
#include "kvtier/key/chunk_key.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvtier::detail {

inline constexpr char record_magic[8] = {'K', 'V', 'T', 'I', 'E', 'R', 'R', '1'};
inline constexpr std::uint32_t record_version = 1;
/// Header space in front of each payload on disk: one page, so the payload stays aligned for
/// O_DIRECT. A remote record's header takes just sizeof(record_header).
inline constexpr std::size_t record_header_bytes = 4096;

/// Serialized little-endian at the start of the header page.
struct record_header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;
  chunk_key key;
  chunk_key salt;
  std::uint64_t format_fingerprint;
  std::uint32_t tokens;
  std::uint32_t reserved;
  std::uint64_t payload_bytes;
  std::uint64_t payload_checksum;
  std::uint64_t header_checksum;  ///< XXH3-64 of every field above
};
static_assert(sizeof(record_header) == 88, "record_header must have no padding: it is hashed");
static_assert(sizeof(record_header) <= record_header_bytes);

/// Payload checksum, seeded by the key so bytes moved under another key fail the check too.
[[nodiscard]] inline std::uint64_t payload_checksum(const chunk_key& k, const std::byte* p,
                                                    std::size_t n) noexcept {
  return xxh3_64_seeded(p, n, k.lo ^ k.hi);
}

/// payload_checksum taken piece by piece (the same value over the same bytes, in order), so a
/// copy can hash each piece while it is in cache.
class payload_hasher {
 public:
  explicit payload_hasher(const chunk_key& k) noexcept {
    XXH3_INITSTATE(&st_);
    XXH3_64bits_reset_withSeed(&st_, k.lo ^ k.hi);
  }
  void update(const std::byte* p, std::size_t n) noexcept { xxh3_update(&st_, p, n); }
  [[nodiscard]] std::uint64_t digest() const noexcept { return XXH3_64bits_digest(&st_); }

 private:
  XXH3_state_t st_;
};

[[nodiscard]] inline std::uint64_t header_checksum(const record_header& h) noexcept {
  return XXH3_64bits(&h, offsetof(record_header, header_checksum));
}

[[nodiscard]] inline record_header make_record_header(
    const chunk_key& key, const chunk_key& salt, std::uint64_t fingerprint, std::uint32_t tokens,
    const std::byte* p, std::size_t n, std::size_t header_bytes = record_header_bytes) noexcept {
  record_header h{};
  std::memcpy(h.magic, record_magic, sizeof h.magic);
  h.version = record_version;
  h.header_bytes = static_cast<std::uint32_t>(header_bytes);
  h.key = key;
  h.salt = salt;
  h.format_fingerprint = fingerprint;
  h.tokens = tokens;
  h.payload_bytes = n;
  h.payload_checksum = payload_checksum(key, p, n);
  h.header_checksum = header_checksum(h);
  return h;
}

/// True when `h` is an intact header of exactly this record (key, salt, format, length).
[[nodiscard]] inline bool header_matches(const record_header& h, const chunk_key& key,
                                         const chunk_key& salt, std::uint64_t fingerprint,
                                         std::uint32_t tokens, std::size_t n,
                                         std::size_t header_bytes = record_header_bytes) noexcept {
  return std::memcmp(h.magic, record_magic, sizeof h.magic) == 0 && h.version == record_version &&
         h.header_bytes == header_bytes && h.header_checksum == header_checksum(h) &&
         h.key == key && h.salt == salt && h.format_fingerprint == fingerprint &&
         h.tokens == tokens && h.payload_bytes == n;
}

}  // namespace kvtier::detail
