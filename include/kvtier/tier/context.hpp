#pragma once
// What every tier is told about the cache it serves.

#include "kvtier/key/chunk_key.hpp"
#include "kvtier/layout/chunk_format.hpp"

namespace kvtier::tier {

/// The cache's identity, given to each tier at construction: the chunk format (sizes every slot
/// and record) and the salt key (namespaces files and records, and is checked on every read).
struct context {
  layout::chunk_format format;
  chunk_key salt;
};

}  // namespace kvtier::tier
