#pragma once
// Lossless codecs over zstd or lz4 (optional dependencies: this header needs libzstd and liblz4,
// CMake target kvtier::lossless), with an optional byte shuffle of the chunk's elements first.

#include "kvtier/codec/byte_shuffle.hpp"
#include "kvtier/codec/concept.hpp"
#include "kvtier/codec/descriptor.hpp"
#include "kvtier/detail/checked.hpp"
#include "kvtier/layout/chunk_format.hpp"

#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_initStaticCCtx: contexts in memory this codec owns
#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kvtier::codec {

/// zstd or lz4 over a chunk's bytes, optionally byte-shuffled first (see byte_shuffle: it pays
/// on 16-bit floats, whose high bytes hold the sign and exponent; docs/codecs.md has the
/// measurements). Decode gives back exactly the encoded bytes.
///
/// Encoded: the 32-byte header, then the zstd frame or lz4 block of the (shuffled) chunk.
/// zstd runs in static contexts and lz4 in a state, all sized and reserved at construction with
/// the shuffle's scratch, so encode and decode allocate nothing; O(bytes). Both use that memory:
/// one thread per codec object.
class lossless_codec {
 public:
  /// `id` zstd (level 1 to 19) or lz4 (level: acceleration, 1 to 255, 1 the strongest).
  /// Throws invalid_argument for another id, a level out of range, or a chunk over lz4's 2 GiB.
  lossless_codec(const layout::chunk_format& f, codec_id id, int level, bool shuffle)
      : format_(f), id_(id), level_(level), shuffle_(shuffle) {
    if (id != codec_id::zstd && id != codec_id::lz4) {
      throw invalid_argument(std::string("kvtier: lossless_codec takes zstd or lz4, not ") +
                             name(id));
    }
    const int top = id == codec_id::zstd ? 19 : 255;
    if (level < 1 || level > top) {
      throw invalid_argument("kvtier: lossless_codec " + std::string(name(id)) + " level " +
                             std::to_string(level) + " is not 1 to " + std::to_string(top));
    }
    if (f.chunk_tokens == 0 || f.chunk_tokens > 0xffffffffu) {
      throw invalid_argument("kvtier: lossless_codec takes 1 to 2^32-1 chunk tokens, not " +
                             std::to_string(f.chunk_tokens));
    }
    raw_ = detail::checked_chunk_bytes(f, f.chunk_tokens);
    if (id == codec_id::lz4 && raw_ > static_cast<std::size_t>(LZ4_MAX_INPUT_SIZE)) {
      throw invalid_argument("kvtier: lossless_codec lz4 takes chunks up to " +
                             std::to_string(LZ4_MAX_INPUT_SIZE) + " bytes, not " +
                             std::to_string(raw_));
    }
    (void)max_encoded_bytes(f.chunk_tokens);
    auto reserve = [](const char* what, std::size_t n) {
      return kvtier::detail::reserving(what, n, [n] { return std::vector<std::byte>(n); });
    };
    if (shuffle) scratch_ = reserve("the lossless codec's shuffle scratch", raw_);
    if (id == codec_id::zstd) {
      const auto params = ZSTD_getCParams(level, raw_, 0);
      cctx_mem_ = reserve("zstd's compression context", ZSTD_estimateCCtxSize_usingCParams(params));
      dctx_mem_ = reserve("zstd's decompression context", ZSTD_estimateDCtxSize());
      cctx_ = ZSTD_initStaticCCtx(cctx_mem_.data(), cctx_mem_.size());
      dctx_ = ZSTD_initStaticDCtx(dctx_mem_.data(), dctx_mem_.size());
      if (cctx_ == nullptr || dctx_ == nullptr) {
        throw error("kvtier: zstd refused its static contexts (" +
                    std::to_string(cctx_mem_.size()) + " and " + std::to_string(dctx_mem_.size()) +
                    " bytes)");
      }
      // Parameters fixed here, as the estimate assumed; the source size is pledged per call.
      ZSTD_CCtx_setParameter(cctx_, ZSTD_c_compressionLevel, level);
      ZSTD_CCtx_setParameter(cctx_, ZSTD_c_checksumFlag, 0);
    } else {
      lz4_state_ = reserve("lz4's state", static_cast<std::size_t>(LZ4_sizeofState()));
    }
  }
  lossless_codec(const lossless_codec&) = delete;  // the zstd contexts point into this object
  lossless_codec& operator=(const lossless_codec&) = delete;

  [[nodiscard]] codec_descriptor descriptor() const noexcept {
    return {id_, elem_type::bytes, static_cast<std::uint8_t>(level_), shuffle_, 0};
  }
  [[nodiscard]] const layout::chunk_format& format() const noexcept { return format_; }

  /// Upper bound on the encoded size of `tokens` tokens (header included): the compressor's own
  /// worst case, for incompressible bytes. Checked arithmetic.
  [[nodiscard]] std::size_t max_encoded_bytes(std::size_t tokens) const {
    const std::size_t n = detail::checked_chunk_bytes(format_, tokens);
    const std::size_t bound = id_ == codec_id::zstd
                                  ? ZSTD_compressBound(n)
                                  : static_cast<std::size_t>(LZ4_compressBound(static_cast<int>(
                                        std::min<std::size_t>(n, LZ4_MAX_INPUT_SIZE))));
    if (bound < n) {
      throw invalid_argument("kvtier: lossless_codec bound of " + std::to_string(n) +
                             " bytes overflows");
    }
    return kvtier::detail::checked_add(header_bytes, bound, "lossless encoded bytes");
  }

  /// Encodes `src`, `tokens` tokens in the chunk format, into `out` (at least
  /// max_encoded_bytes(tokens)); returns the bytes written. Throws invalid_argument on bad sizes,
  /// kvtier::error if the compressor fails.
  std::size_t encode(std::span<const std::byte> src, std::size_t tokens, std::span<std::byte> out) {
    detail::check_encode(format_, src.size(), tokens, out.size(), max_encoded_bytes(tokens));
    const std::byte* in = src.data();
    if (shuffle_) {
      byte_shuffle(src.data(), scratch_.data(), src.size(), format_.dtype_size);
      in = scratch_.data();
    }
    std::byte* o = out.data() + header_bytes;
    const std::size_t cap = out.size() - header_bytes;
    std::size_t written = 0;
    if (id_ == codec_id::zstd) {
      ZSTD_CCtx_reset(cctx_, ZSTD_reset_session_only);
      ZSTD_CCtx_setPledgedSrcSize(cctx_, src.size());
      written = ZSTD_compress2(cctx_, o, cap, in, src.size());
      if (ZSTD_isError(written)) {
        throw error(std::string("kvtier: zstd failed to encode a chunk: ") +
                    ZSTD_getErrorName(written));
      }
    } else {
      const int r = LZ4_compress_fast_extState(
          lz4_state_.data(), reinterpret_cast<const char*>(in), reinterpret_cast<char*>(o),
          static_cast<int>(src.size()), static_cast<int>(std::min<std::size_t>(cap, 0x7fffffff)),
          level_);
      if (r <= 0)
        throw error("kvtier: lz4 failed to encode a chunk of " + std::to_string(src.size()) +
                    " bytes");
      written = static_cast<std::size_t>(r);
    }
    detail::write_header(
        {descriptor(), static_cast<std::uint32_t>(tokens), format_.fingerprint(), written},
        out.data());
    return header_bytes + written;
  }

  /// Decodes `in` into `out` (at least format().bytes(tokens)); returns the tokens decoded.
  /// Throws codec_error when `in` is not this codec's encoding of this chunk format, or does not
  /// decompress to exactly the chunk's bytes.
  std::size_t decode(std::span<const std::byte> in, std::span<std::byte> out) {
    const encoded_header h = detail::read_header(in, descriptor(), format_);
    const std::size_t n = format_.bytes(h.tokens);
    detail::check_decode_out(format_, h.tokens, out.size());
    std::byte* dst = shuffle_ ? scratch_.data() : out.data();
    const std::byte* src = in.data() + header_bytes;
    std::size_t got = 0;
    if (id_ == codec_id::zstd) {
      got = ZSTD_decompressDCtx(dctx_, dst, n, src, h.payload);
      if (ZSTD_isError(got)) {
        detail::bad(std::string("does not decompress with zstd: ") + ZSTD_getErrorName(got));
      }
    } else {
      if (h.payload > 0x7fffffffu) detail::bad("has " + std::to_string(h.payload) + " lz4 bytes");
      const int r =
          LZ4_decompress_safe(reinterpret_cast<const char*>(src), reinterpret_cast<char*>(dst),
                              static_cast<int>(h.payload), static_cast<int>(n));
      if (r < 0) detail::bad("does not decompress with lz4 (" + std::to_string(r) + ")");
      got = static_cast<std::size_t>(r);
    }
    if (got != n) {
      detail::bad("decompresses to " + std::to_string(got) + " bytes, " + std::to_string(h.tokens) +
                  " tokens are " + std::to_string(n));
    }
    if (shuffle_) byte_unshuffle(scratch_.data(), out.data(), n, format_.dtype_size);
    return h.tokens;
  }

 private:
  layout::chunk_format format_;
  codec_id id_;
  int level_;
  bool shuffle_;
  std::size_t raw_ = 0;
  std::vector<std::byte> scratch_, cctx_mem_, dctx_mem_, lz4_state_;
  ZSTD_CCtx* cctx_ = nullptr;
  ZSTD_DCtx* dctx_ = nullptr;
};

static_assert(chunk_codec<lossless_codec>, "lossless_codec must model kvtier::codec::chunk_codec");

}  // namespace kvtier::codec
