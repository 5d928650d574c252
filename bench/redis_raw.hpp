#pragma once
// The Redis limit of kvtier-bench: the fastest plain SET/GET client this bench can be, written
// straight on sockets (no hiredis, no reply objects). One connection per thread, commands
// pipelined `depth` deep, a SET's header and value leave in one writev from the caller's buffer,
// a GET's value is received straight into its destination. Connection count and depth are swept
// and the best of each operation is the limit, so it measures the server and the loopback, not a
// client's copies.

#include "common.hpp"
#include "sweep.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <charconv>
#include <string_view>

namespace bench {

/// One blocking RESP connection that moves values without copying them in user space.
class resp_socket {
 public:
  explicit resp_socket(const std::string& address) {
    const auto colon = address.rfind(':');
    if (colon == std::string::npos) throw std::invalid_argument("redis address '" + address + "'");
    const std::string host = address.substr(0, colon), port = address.substr(colon + 1);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
      throw std::runtime_error("cannot resolve redis address " + address);
    }
    for (addrinfo* a = res; a != nullptr && fd_ < 0; a = a->ai_next) {
      fd_ = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd_ >= 0 && ::connect(fd_, a->ai_addr, a->ai_addrlen) != 0) {
        ::close(fd_);
        fd_ = -1;
      }
    }
    ::freeaddrinfo(res);
    if (fd_ < 0) throw std::runtime_error("cannot connect to redis at " + address);
    // The send buffer is raised past the kernel's autotuning ceiling (tcp_wmem, 4 MiB here);
    // the receive buffer is left to autotuning, whose ceiling (tcp_rmem, 32 MiB here) is above
    // what SO_RCVBUF may ask for (rmem_max): setting it would shrink it.
    const int one = 1, big = 8 << 20;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  }
  ~resp_socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  resp_socket(const resp_socket&) = delete;
  resp_socket& operator=(const resp_socket&) = delete;

  /// Sends every byte of `iov[0, n)`, resuming after partial writes.
  void send(iovec* iov, std::size_t n) {
    while (n > 0) {
      const std::size_t part = std::min<std::size_t>(n, IOV_MAX);
      ssize_t w = ::writev(fd_, iov, static_cast<int>(part));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw std::runtime_error("redis: write failed");
      auto left = static_cast<std::size_t>(w);
      while (n > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        ++iov;
        --n;
      }
      if (n > 0) {
        iov->iov_base = static_cast<char*>(iov->iov_base) + left;
        iov->iov_len -= left;
      }
    }
  }

  /// The next reply line without its CRLF (valid until the next read).
  std::string_view line() {
    for (;;) {
      const char* b = buf_.data() + pos_;
      const void* lf = std::memchr(b, '\n', len_ - pos_);
      if (lf != nullptr) {
        const auto n = static_cast<std::size_t>(static_cast<const char*>(lf) - b);
        pos_ += n + 1;
        return {b, n > 0 && b[n - 1] == '\r' ? n - 1 : n};
      }
      fill();
    }
  }

  /// Reads exactly `n` bytes into `dst`: what is already buffered, then straight from the socket.
  void read_into(void* dst, std::size_t n) {
    auto* d = static_cast<char*>(dst);
    const std::size_t have = std::min(n, len_ - pos_);
    std::memcpy(d, buf_.data() + pos_, have);
    pos_ += have;
    for (std::size_t got = have; got < n;) {
      const ssize_t r = ::recv(fd_, d + got, n - got, MSG_WAITALL);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw std::runtime_error("redis: connection closed in a value");
      got += static_cast<std::size_t>(r);
    }
  }

 private:
  void fill() {
    if (pos_ == len_) {
      pos_ = len_ = 0;
    } else if (len_ == buf_.size()) {
      if (pos_ == 0) throw std::runtime_error("redis: reply line too long");
      std::memmove(buf_.data(), buf_.data() + pos_, len_ - pos_);
      len_ -= pos_;
      pos_ = 0;
    }
    ssize_t r;
    do {
      r = ::recv(fd_, buf_.data() + len_, buf_.size() - len_, 0);
    } while (r < 0 && errno == EINTR);
    if (r <= 0) throw std::runtime_error("redis: connection closed");
    len_ += static_cast<std::size_t>(r);
  }

  int fd_ = -1;
  // Small on purpose: a GET's value bypasses it, so at most one value's head lands here.
  std::array<char, 4096> buf_{};
  std::size_t pos_ = 0, len_ = 0;
};

/// The raw client's best rate over a sweep of connections (one thread each) and pipeline depths.
struct redis_limit {
  double set_gbps = 0, get_gbps = 0;  ///< value bytes per second, best over the sweep
  std::size_t set_conns = 0, set_depth = 0, get_conns = 0, get_depth = 0;
  report sweep{"raw RESP client sweep"};
};

/// SET then GET `count` values of `bytes` on the server at `address` with every pair of
/// `conns` x `depths`, `iters` times, interleaved; every GET is checked (length and a sampled
/// word). The keys are deleted afterwards.
inline redis_limit raw_redis_limit(const std::string& address, std::size_t bytes, std::size_t count,
                                   int iters, const std::vector<std::size_t>& conns = {1, 2, 4, 8},
                                   const std::vector<std::size_t>& depths = {1, 4, 16}) {
  const std::size_t max_conns = *std::max_element(conns.begin(), conns.end());
  std::vector<std::unique_ptr<resp_socket>> socks;
  for (std::size_t i = 0; i < max_conns; ++i) {
    socks.push_back(std::make_unique<resp_socket>(address));
  }
  aligned_buffer src(bytes), dst(bytes * max_conns);
  for (std::size_t i = 0; i < bytes; ++i) src.data[i] = static_cast<std::byte>(i * 31 + 7);
  std::vector<std::string> keys(count);
  for (std::size_t i = 0; i < count; ++i) {
    keys[i] = "kvtier-bench-raw-" + std::to_string(::getpid()) + ":" + std::to_string(i);
  }
  std::atomic<bool> ok{true};
  // One pass: thread t owns keys t, t + n, ... and pipelines them `depth` at a time.
  auto pass = [&](bool set, std::size_t n, std::size_t depth) {
    auto work = [&](std::size_t t) {
      resp_socket& s = *socks[t];
      std::vector<std::array<char, 160>> heads(depth);
      std::vector<iovec> iov(3 * depth);
      std::vector<std::size_t> mine;
      for (std::size_t k = t; k < count; k += n) mine.push_back(k);
      static char crlf[] = "\r\n";
      try {
        for (std::size_t b = 0; b < mine.size(); b += depth) {
          const std::size_t m = std::min(depth, mine.size() - b);
          std::size_t v = 0;
          for (std::size_t i = 0; i < m; ++i) {
            const std::string& k = keys[mine[b + i]];
            char* h = heads[i].data();
            const int len =
                set ? std::snprintf(h, heads[i].size(), "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$%zu\r\n",
                                    k.size(), k.c_str(), bytes)
                    : std::snprintf(h, heads[i].size(), "*2\r\n$3\r\nGET\r\n$%zu\r\n%s\r\n",
                                    k.size(), k.c_str());
            iov[v++] = {h, static_cast<std::size_t>(len)};
            if (set) {
              iov[v++] = {src.data, bytes};
              iov[v++] = {crlf, 2};
            }
          }
          s.send(iov.data(), v);
          for (std::size_t i = 0; i < m; ++i) {
            const std::string_view l = s.line();
            if (set) {
              if (l != "+OK") ok = false;
              continue;
            }
            std::size_t n_bytes = 0;
            if (l.size() < 2 || l[0] != '$' ||
                std::from_chars(l.data() + 1, l.data() + l.size(), n_bytes).ec != std::errc{} ||
                n_bytes != bytes) {
              ok = false;
              return;
            }
            std::byte* d = dst.data + t * bytes;
            s.read_into(d, bytes);
            char tail[2];
            s.read_into(tail, 2);
            if (d[bytes / 2] != src.data[bytes / 2] || d[bytes - 1] != src.data[bytes - 1]) {
              ok = false;
            }
          }
        }
      } catch (const std::exception&) {
        ok = false;
      }
    };
    return timed_threads(n, work);
  };
  const auto best = sweep_best(iters, conns, depths, ok, pass);
  // Deletes the keys, pipelined on the first connection.
  for (std::size_t b = 0; b < count && ok; b += 64) {
    std::string cmd;
    const std::size_t m = std::min<std::size_t>(64, count - b);
    for (std::size_t i = 0; i < m; ++i) {
      const std::string& k = keys[b + i];
      cmd += "*2\r\n$3\r\nDEL\r\n$" + std::to_string(k.size()) + "\r\n" + k + "\r\n";
    }
    iovec v{cmd.data(), cmd.size()};
    socks[0]->send(&v, 1);
    for (std::size_t i = 0; i < m; ++i) (void)socks[0]->line();
  }
  if (!ok) throw std::runtime_error("raw redis SET/GET failed at " + address);
  redis_limit r;
  const double total = static_cast<double>(bytes * count);
  for (const auto& [cfg, s] : best) {
    const double w = total / s.first / 1e9, g = total / s.second / 1e9;
    r.sweep.row({{"connections", static_cast<double>(cfg.first)},
                 {"depth", static_cast<double>(cfg.second)},
                 {"SET GB/s", w},
                 {"GET GB/s", g}});
    if (w > r.set_gbps) r.set_gbps = w, r.set_conns = cfg.first, r.set_depth = cfg.second;
    if (g > r.get_gbps) r.get_gbps = g, r.get_conns = cfg.first, r.get_depth = cfg.second;
  }
  return r;
}

}  // namespace bench
