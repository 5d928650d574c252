#pragma once
// The Redis tier's connections: a pool per server, bounded by a timeout on every wait, and a
// server that fails marked down until a reconnect after an exponential backoff succeeds.

#include "kvtier/error.hpp"
#include "kvtier/tier/redis/protocol.hpp"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvtier::tier::detail_redis {

inline timeval to_timeval(std::chrono::milliseconds ms) noexcept {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000);
  return tv;
}

/// Holds SIGPIPE blocked on this thread while alive, and swallows one it raised; the thread's
/// signal mask is restored after.
class sigpipe_guard {
 public:
  sigpipe_guard() noexcept {
    const sigset_t pipe = pipe_set();
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe, &old_);
  }
  ~sigpipe_guard() {
    sigset_t pending;
    sigpending(&pending);
    if (!was_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      const sigset_t pipe = pipe_set();
      const timespec zero{0, 0};
      while (sigtimedwait(&pipe, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

 private:
  static sigset_t pipe_set() noexcept {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    return s;
  }

  sigset_t old_{};
  bool was_pending_ = false;
};

/// Writes out hiredis' output buffer with SIGPIPE held off: a server that went away must not
/// kill the engine's process (hiredis writes with write(2)).
inline bool flush_out(redisContext* c) {
  sigpipe_guard guard;
  int done = 0;
  while (!done) {
    if (redisBufferWrite(c, &done) != REDIS_OK) return false;
  }
  return true;
}

/// "host:port" split in two; throws invalid_argument unless the port is in 1..65535.
inline std::pair<std::string, int> parse_address(std::string_view a) {
  const auto colon = a.rfind(':');
  int port = 0;
  if (colon == std::string_view::npos || colon == 0 ||
      std::from_chars(a.data() + colon + 1, a.data() + a.size(), port).ec != std::errc{} ||
      port <= 0 || port > 65535) {
    throw invalid_argument("kvtier: redis node '" + std::string(a) +
                           "' is not host:port with a port in 1..65535");
  }
  return {std::string(a.substr(0, colon)), port};
}

/// What a server's pool may do: how many connections, how long each wait, how long to back off.
struct pool_limits {
  std::size_t connections = 4;
  std::chrono::milliseconds timeout{1000};
  std::chrono::milliseconds backoff_min{20};
  std::chrono::milliseconds backoff_max{2000};
};

/// Connection events, counted over all the servers of a tier.
struct pool_events {
  std::atomic<std::uint64_t> connects{0};  ///< connections opened (first ones and reconnects)
  std::atomic<std::uint64_t> failures{0};  ///< connections lost or refused
};

/// One server: its address, a pool of connections and its health.
class server {
 public:
  server(std::string host, int port, const pool_limits& limits, pool_events& events)
      : host_(std::move(host)),
        port_(port),
        limits_(limits),
        events_(&events),
        backoff_(limits.backoff_min) {}
  ~server() {
    for (auto* c : idle_) redisFree(c);
  }
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  [[nodiscard]] const std::string& host() const noexcept { return host_; }
  [[nodiscard]] int port() const noexcept { return port_; }

  /// An idle connection, or a new one while the pool is not full, else the first one released
  /// within the timeout. nullptr while the server is backed off, or when none came in time.
  redisContext* acquire() {
    const auto deadline = std::chrono::steady_clock::now() + limits_.timeout;
    std::unique_lock lk(mu_);
    for (;;) {
      if (std::chrono::steady_clock::now() < down_until_) return nullptr;  // backing off
      if (!idle_.empty()) {
        redisContext* c = idle_.back();
        idle_.pop_back();
        return c;
      }
      if (open_ < limits_.connections) {
        ++open_;
        lk.unlock();
        redisContext* c =
            redisConnectWithTimeout(host_.c_str(), port_, to_timeval(limits_.timeout));
        if (c != nullptr && c->err == 0 &&
            redisSetTimeout(c, to_timeval(limits_.timeout)) == REDIS_OK) {
          ++events_->connects;
          lk.lock();
          backoff_ = limits_.backoff_min;
          return c;
        }
        if (c != nullptr) redisFree(c);
        lk.lock();
        --open_;
        mark_down_locked();
        return nullptr;
      }
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) return nullptr;
    }
  }

  /// Returns a connection to the pool; a broken one is freed, the server marked down for the
  /// current backoff, and the other idle connections (likely broken too) freed.
  void release(redisContext* c, bool healthy) {
    std::unique_lock lk(mu_);
    if (healthy && c->err == 0) {
      idle_.push_back(c);
    } else {
      redisFree(c);
      --open_;
      for (auto* i : idle_) redisFree(i);
      open_ -= idle_.size();
      idle_.clear();
      mark_down_locked();
    }
    lk.unlock();
    cv_.notify_one();
  }

  /// One command outside any batch: its reply, or nullptr with `why` set.
  reply_ptr command(const char* cmd, std::string& why) {
    redisContext* c = acquire();
    if (c == nullptr) {
      why = "cannot connect to " + host_ + ":" + std::to_string(port_);
      return nullptr;
    }
    sigpipe_guard guard;
    reply_ptr r(static_cast<redisReply*>(redisCommand(c, cmd)));
    if (!r) why = c->errstr;
    release(c, r != nullptr);
    return r;
  }

  /// True when the server answers PING; else false with `why` set.
  bool ping(std::string& why) {
    const auto r = command("PING", why);
    if (r && r->type != REDIS_REPLY_STATUS) why = r->str ? r->str : "bad reply";
    return r && r->type == REDIS_REPLY_STATUS;
  }

 private:
  void mark_down_locked() {
    ++events_->failures;
    down_until_ = std::chrono::steady_clock::now() + backoff_;
    backoff_ = std::min(limits_.backoff_max, backoff_ * 2);
  }

  std::string host_;
  int port_ = 0;
  pool_limits limits_;
  pool_events* events_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<redisContext*> idle_;
  std::size_t open_ = 0;  // connections made and not freed (idle or in use)
  std::chrono::steady_clock::time_point down_until_{};
  std::chrono::milliseconds backoff_;
};

}  // namespace kvtier::tier::detail_redis
