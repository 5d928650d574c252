#pragma once
// The self-describing record of a chunk outside memory, for tiers written outside kvtier: the
// same header the local disk and Redis tiers keep (key, salt, format fingerprint, tokens, payload
// and header checksums), so a user's tier can prove what it reads is the chunk asked for.

#include "kvtier/detail/record.hpp"

namespace kvtier::tier {

/// The header in front of a record's payload: 88 bytes, little-endian, hashed field by field.
using detail::record_header;
/// Space a page-aligned store reserves for the header (the payload then stays 4 KiB aligned).
using detail::record_header_bytes;
/// make_record_header(key, salt, format_fingerprint, tokens, payload, bytes, header_bytes):
/// the header of a record, its payload checksum seeded by the key.
using detail::make_record_header;
/// header_matches(h, key, salt, format_fingerprint, tokens, bytes, header_bytes): true only for
/// an intact header of exactly that record. A read must also compare payload_checksum().
using detail::header_matches;
/// payload_checksum(key, payload, bytes): XXH3-64 of the payload, seeded by the key.
using detail::payload_checksum;

}  // namespace kvtier::tier
