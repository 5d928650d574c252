// The Redis tier's GET pipeline against a scripted server on loopback (no redis-server): a load
// keeps at most its window of GETs in flight per connection and tops it up as replies are read,
// every value lands in its own job's slot, and a server that hangs up mid-window fails exactly
// the GETs it did not answer.
#include "kvtier/tier/redis.hpp"

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using kvtier::chunk_key;
using kvtier::tier::read_status;
using tier = kvtier::tier::redis::impl<kvtier::eviction::lru>;

const kvtier::tier::context ctx{kvtier::layout::chunk_format{2, 2, 8, 2, 16, 2},
                                chunk_key{0x1111, 0x2222}};
constexpr std::uint32_t tokens = 16;

/// The first complete RESP array of bulk strings at the front of `in` (removed from it), or
/// nothing while it is incomplete.
bool take_command(std::string& in, std::vector<std::string>& argv) {
  argv.clear();
  std::size_t pos = 0;
  const auto number = [&](char tag, long long& v) {
    const std::size_t eol = in.find("\r\n", pos);
    if (eol == std::string::npos) return false;
    REQUIRE(in[pos] == tag);
    REQUIRE(std::from_chars(in.data() + pos + 1, in.data() + eol, v).ec == std::errc{});
    pos = eol + 2;
    return true;
  };
  long long n = 0;
  if (!number('*', n)) return false;
  for (long long a = 0; a < n; ++a) {
    long long len = 0;
    if (!number('$', len)) return false;
    if (in.size() < pos + static_cast<std::size_t>(len) + 2) return false;
    argv.emplace_back(in, pos, static_cast<std::size_t>(len));
    pos += static_cast<std::size_t>(len) + 2;
  }
  in.erase(0, pos);
  return true;
}

/// A Redis stand-in on a free loopback port, answering PING, EXISTS, GET and SET (on its own
/// `values`). PING and EXISTS are answered at once; GETs and SETs one at a time, and only once
/// its connections have been quiet for 20 ms, so every command the client has sent by then has
/// arrived: the GETs and SETs it holds unanswered at that moment are the client's pipeline
/// depth. Instead of its `hang_up_after`-th GET reply (counting from 0) it closes the
/// connection.
class scripted_server {
 public:
  explicit scripted_server(std::map<std::string, std::string> values,
                           std::size_t hang_up_after = SIZE_MAX)
      : values_(std::move(values)), hang_up_after_(hang_up_after) {
    listen_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(listen_ >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listen_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(listen_, 8) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(listen_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~scripted_server() {
    stop_ = true;
    thread_.join();
    for (auto& c : conns_) {
      if (c.fd >= 0) ::close(c.fd);
    }
    ::close(listen_);
  }
  scripted_server(const scripted_server&) = delete;
  scripted_server& operator=(const scripted_server&) = delete;

  [[nodiscard]] std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  /// The most GETs and SETs one connection had sent and not yet been answered (read after the
  /// call), and a fresh count from now on.
  [[nodiscard]] std::size_t max_in_flight() const { return max_in_flight_.load(); }
  void reset_in_flight() { max_in_flight_ = 0; }
  [[nodiscard]] std::size_t gets_answered() const { return answered_.load(); }

 private:
  struct conn {
    int fd;
    std::string in;
    std::deque<std::vector<std::string>> pending;
  };

  void serve() {
    std::vector<pollfd> fds;
    while (!stop_) {
      fds.assign(1, pollfd{listen_, POLLIN, 0});
      for (auto& c : conns_) fds.push_back(pollfd{c.fd, POLLIN, 0});
      const int r = ::poll(fds.data(), fds.size(), 20);
      if (r > 0) {
        if (fds[0].revents & POLLIN) {
          const int fd = ::accept(listen_, nullptr, nullptr);
          if (fd >= 0) conns_.push_back(conn{fd, {}, {}});
        }
        for (std::size_t i = 1; i < fds.size(); ++i) {
          if (fds[i].revents == 0) continue;
          conn& c = conns_[i - 1];
          char buf[65536];
          const ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
          if (n <= 0) {  // a closed client: nothing more to answer
            ::close(c.fd);
            c.fd = -1;  // poll passes over it
            c.pending.clear();
            continue;
          }
          c.in.append(buf, static_cast<std::size_t>(n));
          std::vector<std::string> argv;
          while (take_command(c.in, argv)) c.pending.push_back(argv);
          answer_ready(c);
        }
        continue;
      }
      // Quiet: every connection's depth is what it sent; answer its oldest GET or SET.
      for (auto& c : conns_) {
        if (c.pending.empty()) continue;
        std::size_t held = 0;
        for (const auto& a : c.pending) held += a[0] == "GET" || a[0] == "SET";
        if (held > max_in_flight_) max_in_flight_ = held;
        answer(c);
        answer_ready(c);
      }
    }
  }
  // Answers the commands at the front of `c` that are not held back (PING, EXISTS).
  void answer_ready(conn& c) {
    while (!c.pending.empty() && c.pending.front()[0] != "GET" && c.pending.front()[0] != "SET") {
      answer(c);
    }
  }
  void answer(conn& c) {
    const std::vector<std::string> a = c.pending.front();
    c.pending.pop_front();
    if (a[0] == "PING") {
      send_all(c.fd, "+PONG\r\n");
    } else if (a[0] == "EXISTS" && a.size() == 2) {
      send_all(c.fd, values_.count(a[1]) ? ":1\r\n" : ":0\r\n");
    } else if (a[0] == "SET" && a.size() == 3) {
      values_[a[1]] = a[2];
      send_all(c.fd, "+OK\r\n");
    } else if (a[0] == "GET" && a.size() == 2) {
      if (answered_ == hang_up_after_) {
        ::shutdown(c.fd, SHUT_RDWR);
        c.pending.clear();
        return;
      }
      ++answered_;  // before the reply: the client may return as soon as it has it
      const auto v = values_.find(a[1]);
      send_all(c.fd, v == values_.end()
                         ? std::string("$-1\r\n")
                         : "$" + std::to_string(v->second.size()) + "\r\n" + v->second + "\r\n");
    } else {
      send_all(c.fd, "-ERR unexpected command\r\n");
    }
  }
  static void send_all(int fd, std::string_view s) {
    while (!s.empty()) {
      const ssize_t r = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
      if (r <= 0) return;
      s.remove_prefix(static_cast<std::size_t>(r));
    }
  }

  std::map<std::string, std::string> values_;
  std::size_t hang_up_after_;
  int listen_ = -1;
  int port_ = 0;
  std::vector<conn> conns_;
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> max_in_flight_{0}, answered_{0};
  std::thread thread_;
};

std::vector<std::byte> payload(std::size_t n, unsigned seed) {
  std::vector<std::byte> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((i * 131 + seed * 7) & 0xff);
  return p;
}

/// `count` chunks of `bytes` each: their records on the scripted server, and slots to load into.
struct chunks {
  std::vector<chunk_key> keys;
  std::vector<std::vector<std::byte>> want, slot;
  std::vector<kvtier::tier::read_job> jobs;
  std::map<std::string, std::string> values;

  chunks(std::size_t count, std::size_t bytes) {
    const std::string prefix = "kvtier:" + ctx.salt.hex() + ":";
    for (std::size_t i = 0; i < count; ++i) {
      keys.push_back(chunk_key{0x5000 + i, 0x77 * (i + 1)});
      want.push_back(payload(bytes, static_cast<unsigned>(i)));
      slot.emplace_back(bytes, std::byte{0xee});
      const auto h = kvtier::detail::make_record_header(keys[i], ctx.salt, ctx.format.fingerprint(),
                                                        tokens, want[i].data(), bytes,
                                                        sizeof(kvtier::detail::record_header));
      std::string v(reinterpret_cast<const char*>(&h), sizeof h);
      v.append(reinterpret_cast<const char*>(want[i].data()), bytes);
      values[prefix + keys[i].hex()] = std::move(v);
    }
    for (std::size_t i = 0; i < count; ++i) {
      kvtier::tier::read_job j;
      j.key = keys[i];
      j.tokens = tokens;
      j.dst = slot[i].data();
      j.bytes = bytes;
      jobs.push_back(j);
    }
  }
};

kvtier::tier::redis::config config_for(const scripted_server& s, std::size_t window_bytes) {
  kvtier::tier::redis::config c;
  c.nodes = {s.address()};
  c.connections = 1;
  c.timeout = std::chrono::milliseconds(2000);
  c.window_bytes = window_bytes;
  return c;
}

}  // namespace

TEST_CASE("a redis load keeps its window of GETs in flight and every value lands in its slot") {
  constexpr std::size_t bytes = 4096, count = 24;
  struct expect {
    std::size_t window_bytes, depth;
  };
  for (const expect e : {expect{4 * bytes, 4}, expect{1, 2}, expect{5 * bytes + 100, 5},
                         expect{std::size_t{2} << 20, count}}) {
    INFO("window_bytes " << e.window_bytes);
    chunks ch(count, bytes);
    scripted_server srv(ch.values);
    tier t(config_for(srv, e.window_bytes), ctx);
    t.read_batch(ch.jobs);
    CHECK(srv.max_in_flight() == e.depth);
    CHECK(srv.gets_answered() == count);
    for (std::size_t i = 0; i < count; ++i) {
      INFO("chunk " << i);
      CHECK(ch.jobs[i].status == read_status::ok);
      CHECK(ch.slot[i] == ch.want[i]);
    }
  }
}

TEST_CASE("a redis server that hangs up mid-window fails exactly the GETs it did not answer") {
  constexpr std::size_t bytes = 4096, count = 12, answered = 5;
  chunks ch(count, bytes);
  // Chunk 2 is absent from the server: a miss in the middle keeps the pipeline in step.
  const std::string prefix = "kvtier:" + ctx.salt.hex() + ":";
  ch.values.erase(prefix + ch.keys[2].hex());
  scripted_server srv(ch.values, answered);
  tier t(config_for(srv, 3 * bytes), ctx);
  t.read_batch(ch.jobs);
  CHECK(srv.max_in_flight() == 3);
  for (std::size_t i = 0; i < count; ++i) {
    INFO("chunk " << i);
    if (i == 2) {
      CHECK(ch.jobs[i].status == read_status::missing);
    } else if (i < answered) {
      CHECK(ch.jobs[i].status == read_status::ok);
      CHECK(ch.slot[i] == ch.want[i]);
    } else {
      CHECK(ch.jobs[i].status == read_status::io_error);
      CHECK(ch.slot[i] == std::vector<std::byte>(bytes, std::byte{0xee}));
    }
  }
}

TEST_CASE("a redis write keeps its window of SETs in flight, and what it stored loads back") {
  constexpr std::size_t bytes = 8192, count = 20;
  chunks ch(count, bytes);
  scripted_server srv({});  // empty: every chunk is absent, so every one is SET
  tier t(config_for(srv, 3 * bytes), ctx);
  std::vector<kvtier::tier::write_job> writes(count);
  for (std::size_t i = 0; i < count; ++i) {
    writes[i].key = ch.keys[i];
    writes[i].tokens = tokens;
    writes[i].src = ch.want[i].data();
    writes[i].bytes = bytes;
  }
  t.write_batch(writes);
  CHECK(srv.max_in_flight() == 3);
  for (std::size_t i = 0; i < count; ++i) CHECK(writes[i].ok);
  srv.reset_in_flight();
  t.read_batch(ch.jobs);
  CHECK(srv.max_in_flight() == 3);
  for (std::size_t i = 0; i < count; ++i) {
    INFO("chunk " << i);
    CHECK(ch.jobs[i].status == read_status::ok);
    CHECK(ch.slot[i] == ch.want[i]);
  }
}

TEST_CASE("a redis window_bytes of 0 is refused, naming it") {
  kvtier::tier::redis::config c;
  c.window_bytes = 0;
  CHECK_THROWS_WITH_AS(tier(c, ctx), doctest::Contains("window_bytes is 0"),
                       kvtier::invalid_argument);
}
