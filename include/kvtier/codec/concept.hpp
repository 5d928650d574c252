#pragma once
// What the cache will call on a codec (issue 14, item 1): one concept naming exactly those
// members, checked right after each codec class.

#include "kvtier/codec/descriptor.hpp"
#include "kvtier/layout/chunk_format.hpp"

#include <concepts>
#include <cstddef>
#include <span>

namespace kvtier::codec {

/// A codec of one chunk format: its descriptor, its format, a checked bound on the encoded size
/// of `tokens` tokens, encode of `tokens` tokens into a buffer of at least that bound (returns
/// the bytes written) and decode of an encoding into the chunk's bytes (returns the tokens).
template <class C>
concept chunk_codec = requires(C& c, const C& cc, std::span<const std::byte> in,
                               std::span<std::byte> out, std::size_t tokens) {
  { cc.descriptor() } -> std::same_as<codec_descriptor>;
  { cc.format() } -> std::same_as<const layout::chunk_format&>;
  { cc.max_encoded_bytes(tokens) } -> std::same_as<std::size_t>;
  { c.encode(in, tokens, out) } -> std::same_as<std::size_t>;
  { c.decode(in, out) } -> std::same_as<std::size_t>;
};

}  // namespace kvtier::codec
