// libFuzzer target: the codecs' decode. The first input byte picks a codec, the rest is what a
// tier hands back as an encoded chunk. Decode must either throw codec_error or decode; nothing
// may crash, read or write out of bounds (ASan, UBSan) or write past the decoded chunk (a guard
// checked after each decode). The seeds are valid encodings of each codec (the first byte picks
// the codec that made them), so that mutations reach past the header.
#include <kvtier/codec/fp8_e4m3.hpp>
#include <kvtier/codec/grouped_int.hpp>
#if defined(KVTIER_FUZZ_LOSSLESS)
#include <kvtier/codec/lossless.hpp>
#endif

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

namespace {
namespace cd = kvtier::codec;
const kvtier::layout::chunk_format fmt{2, 2, 8, 2, 16, 2};
constexpr std::size_t guard = 64;
// Built once: a codec's tables and contexts cost more than a decode.
cd::fp8_e4m3_codec fp8(fmt, cd::elem_type::bf16);
cd::grouped_int_codec int8(fmt, cd::elem_type::bf16, 8, 4);
cd::grouped_int_codec int4(fmt, cd::elem_type::fp16, 4, 3);
#if defined(KVTIER_FUZZ_LOSSLESS)
cd::lossless_codec zstd(fmt, cd::codec_id::zstd, 1, true);
cd::lossless_codec lz4(fmt, cd::codec_id::lz4, 1, false);
#endif

template <class Codec>
void decode(Codec& c, std::span<const std::byte> in) {
  std::vector<std::byte> out(fmt.chunk_bytes() + guard, std::byte{0xa5});
  try {
    (void)c.decode(in, std::span(out).first(fmt.chunk_bytes()));
  } catch (const cd::codec_error&) {
  }
  for (std::size_t i = fmt.chunk_bytes(); i < out.size(); ++i) {
    if (out[i] != std::byte{0xa5}) std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > 65536) return 0;
  const std::span in(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  switch (data[0] % 6) {
    case 0:
      decode(fp8, in);
      break;
    case 1:
      decode(int8, in);
      break;
    case 2:
      decode(int4, in);
      break;
#if defined(KVTIER_FUZZ_LOSSLESS)
    case 3:
      decode(zstd, in);
      break;
    case 4:
      decode(lz4, in);
      break;
#endif
    default:
      break;
  }
  return 0;
}
