#pragma once
// RESP for the Redis tier: the text of a chunk's server key, one-key commands appended to a
// pipeline, and the replies read back, through hiredis or straight off the socket.

#include "kvtier/key/chunk_key.hpp"

#include <hiredis/hiredis.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

namespace kvtier::tier::detail_redis {

/// Owns a hiredis reply.
struct reply_deleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

/// The longest server key: a prefix and the chunk key's 32 hex digits.
inline constexpr std::size_t key_len_max = 160;

/// A server key, built without allocating.
struct key_buf {
  char s[key_len_max];
  std::size_t n = 0;
};

/// `prefix` then `k` in 32 lowercase hex digits (chunk_key::hex()); `prefix` leaves room for
/// them (prefix.size() + 32 <= key_len_max).
[[nodiscard]] inline key_buf key_text(std::string_view prefix, const chunk_key& k) noexcept {
  key_buf b;
  std::memcpy(b.s, prefix.data(), prefix.size());
  static constexpr char hexd[] = "0123456789abcdef";
  char* p = b.s + prefix.size();
  for (std::uint64_t w : {k.hi, k.lo}) {
    for (int sh = 60; sh >= 0; sh -= 4) *p++ = hexd[(w >> sh) & 0xf];
  }
  b.n = static_cast<std::size_t>(p - b.s);
  return b;
}

/// Appends `cmd key` (a one-key command) to a connection's pipeline.
inline void append_keyed(redisContext* c, const char* cmd, const char* key, std::size_t n) {
  const char* argv[] = {cmd, key};
  const std::size_t len[] = {std::strlen(cmd), n};
  redisAppendCommandArgv(c, 2, argv, len);
}

/// The append step of a pipelined batch for a one-key command.
inline auto keyed(const char* cmd) {
  return [cmd](redisContext* c, std::size_t, const key_buf& k) { append_keyed(c, cmd, k.s, k.n); };
}

/// How reading one reply went: `ok`, an error reply (`error`, its text kept), or a connection
/// that cannot be trusted for the next reply (`broken`).
enum class outcome { ok, error, broken };

/// Reads replies straight from a connection's socket, bypassing hiredis' reader: a GET's value
/// goes from the socket into the first tier's slot with no copy in between. Only used for a
/// batch whose every reply it reads, on a connection with nothing else pending.
struct wire {
  // The buffer is left unset (16 KiB per batch is not zeroed); fill() writes before reads.
  explicit wire(int f) noexcept : fd(f) {}
  int fd;
  std::size_t pos = 0, len = 0;
  char buf[16384];

  bool fill() {
    if (pos == len) pos = len = 0;
    ssize_t r;
    do {
      r = ::recv(fd, buf + len, sizeof buf - len, 0);
    } while (r < 0 && errno == EINTR);
    if (r <= 0) return false;  // closed, failed, or the timeout passed
    len += static_cast<std::size_t>(r);
    return true;
  }
  /// One reply line without its CRLF; valid until the next call.
  bool line(std::string_view& out) {
    for (;;) {
      if (const void* p = std::memchr(buf + pos, '\n', len - pos)) {
        const auto end = static_cast<std::size_t>(static_cast<const char*>(p) - buf);
        if (end == pos || buf[end - 1] != '\r') return false;
        out = {buf + pos, end - 1 - pos};
        pos = end + 1;
        return true;
      }
      if (pos > 0) {
        std::memmove(buf, buf + pos, len - pos);
        len -= pos;
        pos = 0;
      }
      if (len == sizeof buf || !fill()) return false;
    }
  }
  bool read(void* dst, std::size_t n) {
    auto* d = static_cast<char*>(dst);
    const std::size_t k = std::min(n, len - pos);
    std::memcpy(d, buf + pos, k);
    pos += k;
    d += k;
    n -= k;
    while (n > 0) {
      const ssize_t r = ::recv(fd, d, n, MSG_WAITALL);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      d += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  bool skip(std::size_t n) {
    char tmp[4096];
    while (n > 0) {
      const std::size_t k = std::min(n, sizeof tmp);
      if (!read(tmp, k)) return false;
      n -= k;
    }
    return true;
  }
  [[nodiscard]] bool drained() const noexcept { return pos == len; }
};

/// Reads one reply through hiredis and drops it; false when the connection failed.
inline bool discard_reply(redisContext* c) {
  void* p = nullptr;
  if (redisGetReply(c, &p) != REDIS_OK) return false;
  freeReplyObject(p);
  return true;
}

/// A reply reader through hiredis: hands each reply that is not an error to reply(i, r).
template <class Reply>
auto by_hiredis(Reply& reply) {
  return [&reply](redisContext* c, wire&, std::size_t i, bool asking, std::string& err) {
    if (asking && !discard_reply(c)) return outcome::broken;
    void* p = nullptr;
    if (redisGetReply(c, &p) != REDIS_OK) return outcome::broken;
    reply_ptr r(static_cast<redisReply*>(p));
    if (r->type == REDIS_REPLY_ERROR) {
      err.assign(r->str, r->len);
      return outcome::error;
    }
    reply(i, r.get());
    return outcome::ok;
  };
}

}  // namespace kvtier::tier::detail_redis
