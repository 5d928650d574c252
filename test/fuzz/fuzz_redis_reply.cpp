// libFuzzer target: the Redis tier's reply parsing. The input is what a server (or anything at
// its address) sends: it is read through the wire reader as GET replies into records
// (read_record), and as a redirection (parse_redirect). Nothing may crash, read or write out of
// bounds (ASan, UBSan) or write past the destination slot (a guard checked after each reply).
#include <kvtier/kvtier.hpp>
#include <kvtier/tier/redis.hpp>

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace {
namespace d = kvtier::detail;
namespace r = kvtier::tier::detail_redis;
constexpr kvtier::model_shape model{2, 2, 8, 2, 4};
const kvtier::layout::chunk_format fmt = kvtier::layout::chunk_format::from(model, 16, 2);
const kvtier::chunk_key salt = d::chunker<16, kvtier::key::xxh3_hasher>::make_salt_key(
    kvtier::salt{"fuzz-model", "bf16", 0, 1, ""}, fmt);
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 65536) return 0;
  (void)r::parse_redirect(std::string_view(reinterpret_cast<const char*>(data), size));
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 0;
  int big = 1 << 20;
  ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  const timeval tv{0, 50000};
  ::setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  for (std::size_t off = 0; off < size;) {
    const ssize_t w = ::send(sv[0], data + off, size - off, 0);
    if (w <= 0) break;
    off += static_cast<std::size_t>(w);
  }
  ::shutdown(sv[0], SHUT_WR);
  const kvtier::tier::context ctx{fmt, salt, model.block_size, 8, 4};
  r::wire w(sv[1]);
  alignas(4096) static std::byte dst[4096 + 64];
  std::memset(dst + 4096, 0xA5, 64);
  for (int i = 0; i < 8; ++i) {
    kvtier::tier::read_job j{0, kvtier::chunk_key{1, 2}, 16, dst, fmt.bytes(16)};
    std::string err;
    const r::outcome o = r::read_record(w, j, ctx, i % 2 == 1, err);
    for (std::size_t k = 4096; k < sizeof dst; ++k) {
      if (dst[k] != std::byte{0xA5}) __builtin_trap();  // wrote past the slot
    }
    if (o != r::outcome::ok) break;
  }
  ::close(sv[0]);
  ::close(sv[1]);
  return 0;
}
