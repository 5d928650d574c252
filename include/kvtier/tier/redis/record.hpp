#pragma once
// A chunk as a Redis value: the record header (detail/record.hpp) then the chunk's bytes, sent
// with one SET from the first tier's slot, and read back by GET into the slot and verified.

#include "kvtier/detail/record.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/tier/redis/connection.hpp"
#include "kvtier/tier/redis/protocol.hpp"

#include <hiredis/hiredis.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

namespace kvtier::tier::detail_redis {

/// One GET reply read off the wire into job `j`: the record's header into a local, its payload
/// straight into `j.dst`, then verified against `j` and `ctx`. `asking`: an ASKING's +OK comes
/// first. Sets `j.status` on `ok` (missing: no value; corrupt: a value that is not this
/// record), keeps an error reply's text in `err`, and is `broken` on anything that is not RESP.
inline outcome read_record(wire& w, read_job& j, const context& ctx, bool asking,
                           std::string& err) {
  std::string_view l;
  if (asking && (!w.line(l) || l != "+OK")) return outcome::broken;
  if (!w.line(l) || l.empty()) return outcome::broken;
  if (l[0] == '-') {
    err.assign(l.substr(1));
    return outcome::error;
  }
  long long len = 0;
  if (l[0] != '$' || std::from_chars(l.data() + 1, l.data() + l.size(), len).ec != std::errc{}) {
    return outcome::broken;
  }
  if (len < 0) {
    j.status = read_status::missing;
    return outcome::ok;
  }
  constexpr std::size_t hb = sizeof(detail::record_header);
  char crlf[2];
  if (static_cast<std::size_t>(len) != hb + j.bytes) {
    if (!w.skip(static_cast<std::size_t>(len)) || !w.read(crlf, 2)) return outcome::broken;
    j.status = read_status::corrupt;
    return outcome::ok;
  }
  detail::record_header h;
  if (!w.read(&h, hb) || !w.read(j.dst, j.bytes) || !w.read(crlf, 2) || crlf[0] != '\r' ||
      crlf[1] != '\n') {
    return outcome::broken;
  }
  const bool good =
      detail::header_matches(h, j.key, ctx.salt, ctx.format.fingerprint(), j.tokens, j.bytes, hb) &&
      detail::payload_checksum(j.key, j.dst, j.bytes) == h.payload_checksum;
  j.status = good ? read_status::ok : read_status::corrupt;
  return outcome::ok;
}

/// SET key <header + payload> [PX ttl] of job `j`, sent in place: whatever hiredis holds for
/// this connection (an ASKING) is flushed, then the command goes out with one sendmsg of three
/// pieces, the payload straight from the first tier's slot (no copy into hiredis' buffer). A
/// failed send marks the context broken, so its replies are not waited for. `ttl` 0: none.
inline void write_record(redisContext* c, const key_buf& k, const write_job& j, const context& ctx,
                         std::chrono::milliseconds ttl) {
  if (c->err) return;
  const detail::record_header h =
      detail::make_record_header(j.key, ctx.salt, ctx.format.fingerprint(), j.tokens, j.src,
                                 j.bytes, sizeof(detail::record_header));
  const bool expires = ttl.count() > 0;
  char pre[key_len_max + 64 + sizeof h];
  int m = std::snprintf(pre, sizeof pre, "*%d\r\n$3\r\nSET\r\n$%zu\r\n", expires ? 5 : 3, k.n);
  std::memcpy(pre + m, k.s, k.n);
  m += static_cast<int>(k.n);
  m += std::snprintf(pre + m, sizeof pre - static_cast<std::size_t>(m), "\r\n$%zu\r\n",
                     sizeof h + j.bytes);
  std::memcpy(pre + m, &h, sizeof h);
  m += static_cast<int>(sizeof h);
  char post[64];
  int q = 2;
  std::memcpy(post, "\r\n", 2);
  if (expires) {
    const std::string ms = std::to_string(ttl.count());
    q += std::snprintf(post + q, sizeof post - 2, "$2\r\nPX\r\n$%zu\r\n%s\r\n", ms.size(),
                       ms.c_str());
  }
  if (!flush_out(c)) return;
  iovec iov[3] = {{pre, static_cast<std::size_t>(m)},
                  {const_cast<std::byte*>(j.src), j.bytes},
                  {post, static_cast<std::size_t>(q)}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 3;
  while (msg.msg_iovlen > 0) {
    const ssize_t r = ::sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {  // closed, failed, or the send timeout passed
      c->err = REDIS_ERR_IO;
      return;
    }
    auto left = static_cast<std::size_t>(r);
    while (msg.msg_iovlen > 0 && left >= msg.msg_iov->iov_len) {
      left -= msg.msg_iov->iov_len;
      ++msg.msg_iov;
      --msg.msg_iovlen;
    }
    if (msg.msg_iovlen > 0) {
      msg.msg_iov->iov_base = static_cast<char*>(msg.msg_iov->iov_base) + left;
      msg.msg_iov->iov_len -= left;
    }
  }
}

}  // namespace kvtier::tier::detail_redis
