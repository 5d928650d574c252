#pragma once
// The remote tier on Redis or Valkey (one server, or a Redis Cluster), through hiredis.
// Link kvtier::redis (kvtier + hiredis) to use it; kvtier.hpp does not include it.

#include "kvtier/detail/record.hpp"
#include "kvtier/error.hpp"
#include "kvtier/tier/context.hpp"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <csignal>
#include <sys/time.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvtier::tier {

namespace detail_redis {

// CRC16-CCITT (XMODEM), the hash of Redis Cluster's key slots.
inline constexpr std::array<std::uint16_t, 256> crc16_table = [] {
  std::array<std::uint16_t, 256> t{};
  for (unsigned i = 0; i < 256; ++i) {
    std::uint16_t c = static_cast<std::uint16_t>(i << 8);
    for (int k = 0; k < 8; ++k) {
      c = static_cast<std::uint16_t>((c & 0x8000) ? (c << 1) ^ 0x1021 : c << 1);
    }
    t[i] = c;
  }
  return t;
}();

/// The cluster slot of `key` (0..16383), honouring a {hash tag}.
[[nodiscard]] inline std::uint16_t key_slot(std::string_view key) noexcept {
  if (const auto open = key.find('{'); open != std::string_view::npos) {
    const auto close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  std::uint16_t crc = 0;
  for (unsigned char ch : key) {
    crc = static_cast<std::uint16_t>((crc << 8) ^ crc16_table[((crc >> 8) ^ ch) & 0xff]);
  }
  return static_cast<std::uint16_t>(crc & 16383);
}

struct reply_deleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

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
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe, &old_);
  }
  ~sigpipe_guard() {
    sigset_t pending;
    sigpending(&pending);
    if (!was_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      sigset_t pipe;
      sigemptyset(&pipe);
      sigaddset(&pipe, SIGPIPE);
      const timespec zero{0, 0};
      while (sigtimedwait(&pipe, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  sigpipe_guard(const sigpipe_guard&) = delete;
  sigpipe_guard& operator=(const sigpipe_guard&) = delete;

 private:
  sigset_t old_{};
  bool was_pending_ = false;
};

}  // namespace detail_redis

/// Remote tier on Redis or Valkey. Each chunk is one value: a record header (key, salt, format
/// fingerprint, tokens, checksums) then the chunk's bytes, under the key
/// `<key_prefix>:<salt hex>:<chunk key hex>`; every read verifies the record against the key
/// asked for, so a value that is not this chunk's is a miss and a counted error, never data.
///
/// Commands are pipelined per batch (EXISTS for lookup, GET for loads, EXISTS then SET for
/// writes); a GET's value is read from the socket straight into the first tier's slot, over a pool
/// of connections per server. Every wait for a server is bounded by `timeout`. A server that fails
/// is marked down and skipped (lookups miss, writes are dropped and counted) until a reconnect
/// after an exponential backoff succeeds, so a restarted server is used again without restarting
/// the engine. With `cluster`, keys map to hash slots learnt from CLUSTER SLOTS; MOVED and ASK
/// redirections are followed and MOVED refreshes the map.
struct redis {
  static constexpr const char* name = "redis";
  static constexpr bool is_memory = false;
  static constexpr bool indexed = false;

  struct config {
    std::vector<std::string> nodes = {"127.0.0.1:6379"};  ///< "host:port"; cluster: seed nodes
    bool cluster = false;                                 ///< Redis Cluster (hash slots)
    std::size_t connections = 4;                          ///< pool size per server
    std::chrono::milliseconds timeout{1000};              ///< connect and each wait for a reply
    std::chrono::milliseconds backoff_min{20};            ///< first wait before reconnecting
    std::chrono::milliseconds backoff_max{2000};          ///< longest wait before reconnecting
    std::chrono::milliseconds ttl{0};                     ///< expiry of written chunks; 0: none
    std::string key_prefix = "kvtier";
    std::uint32_t admit_after_hits = 0;  ///< take a chunk only once hit this often above
    unsigned writers = 2;  ///< threads writing chunks (each with a pipelined batch in flight)
  };

  /// Counters of the tier's own events (the cache counts hits, writes and errors).
  struct counters {
    std::uint64_t moved = 0;      ///< MOVED redirections followed
    std::uint64_t ask = 0;        ///< ASK redirections followed
    std::uint64_t refreshes = 0;  ///< cluster slot maps loaded
    std::uint64_t connects = 0;   ///< connections opened (first ones and reconnects)
    std::uint64_t failures = 0;   ///< connections lost or refused
    std::uint64_t skipped = 0;    ///< batches not sent because their server was down
  };

  template <class Eviction>
  class impl {
    static constexpr std::size_t batch = 64;  // commands per pipelined round
    static constexpr std::size_t key_len_max = 160;

   public:
    impl(const config& c, const context& ctx) : cfg_(checked(c)), ctx_(ctx) {
      prefix_ = cfg_.key_prefix + ":" + ctx.salt.hex() + ":";
      if (prefix_.size() + 32 > key_len_max) {
        throw invalid_argument("kvtier: redis key_prefix '" + cfg_.key_prefix + "' is too long");
      }
      for (const auto& a : cfg_.nodes) add_node(a);
      // The tier must be reachable when the cache is made; later outages are survived.
      std::string why;
      for (std::size_t i = 0; i < nodes_.size(); ++i) {
        if (cfg_.cluster ? load_slots(*nodes_[i], why) : ping(*nodes_[i], why)) {
          ready_ = true;
          break;
        }
      }
      if (!ready_) {
        throw tier_error("kvtier: redis " + std::string(cfg_.cluster ? "cluster " : "") + "at '" +
                         join(cfg_.nodes) + "' is unreachable: " + why);
      }
    }
    ~impl() = default;
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;

    [[nodiscard]] counters stats() const noexcept {
      counters c;
      c.moved = moved_.load();
      c.ask = ask_.load();
      c.refreshes = refreshes_.load();
      c.connects = connects_.load();
      c.failures = failures_.load();
      c.skipped = skipped_.load();
      return c;
    }
    /// The server key of a chunk (for diagnostics and tests).
    [[nodiscard]] std::string key_of(const chunk_key& k) const { return prefix_ + k.hex(); }

    /// The length of the prefix of `keys` the servers hold (pipelined EXISTS). 0 when a server
    /// is down or late.
    std::size_t probe(std::span<const chunk_key> keys) {
      std::size_t found = 0;
      for (std::size_t b = 0; b < keys.size(); b += batch) {
        const std::size_t n = std::min(batch, keys.size() - b);
        std::array<std::uint8_t, batch> hit{};
        run(
            n, [&](std::size_t i) { return key_text(keys[b + i]); }, keyed("EXISTS"),
            [&](std::size_t i, redisReply* r) {
              hit[i] = r != nullptr && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
            });
        std::size_t i = 0;
        while (i < n && hit[i]) ++i;
        found += i;
        if (i < n) break;
      }
      return found;
    }

    /// Loads each job's record (pipelined GET) straight into its `dst` and verifies it.
    void read_batch(std::span<read_job> jobs) {
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        std::span<read_job> js = jobs.subspan(b, std::min(batch, jobs.size() - b));
        for (auto& j : js) j.status = read_status::io_error;
        run_with(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); }, keyed("GET"),
            [&](redisContext*, wire& w, std::size_t i, bool asking, std::string& err) {
              return read_get(w, js[i], asking, err);
            },
            [&](std::size_t i) { js[i].status = read_status::io_error; }, true);
      }
    }

    /// Writes each job's record (pipelined EXISTS, then SET of the chunks the servers lack).
    void write_batch(std::span<write_job> jobs) {
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        std::span<write_job> js = jobs.subspan(b, std::min(batch, jobs.size() - b));
        std::array<std::uint8_t, batch> state{};  // 0 unknown/failed, 1 held, 2 absent
        run(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); }, keyed("EXISTS"),
            [&](std::size_t i, redisReply* r) {
              if (r != nullptr && r->type == REDIS_REPLY_INTEGER) state[i] = r->integer ? 1 : 2;
            });
        std::array<std::size_t, batch> absent{};
        std::size_t m = 0;
        for (std::size_t i = 0; i < js.size(); ++i) {
          js[i].ok = state[i] == 1;
          if (state[i] == 2) absent[m++] = i;
        }
        if (m == 0) continue;
        run(
            m, [&](std::size_t i) { return key_text(js[absent[i]].key); },
            [&](redisContext* c, std::size_t i, const key_buf& k) {
              append_set(c, k, js[absent[i]]);
            },
            [&](std::size_t i, redisReply* r) {
              js[absent[i]].ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
            });
      }
    }

    /// Deletes the chunks of `keys`; returns how many the servers held.
    std::size_t remove(std::span<const chunk_key> keys) {
      std::size_t removed = 0;
      for (std::size_t b = 0; b < keys.size(); b += batch) {
        const std::size_t n = std::min(batch, keys.size() - b);
        run(
            n, [&](std::size_t i) { return key_text(keys[b + i]); }, keyed("DEL"),
            [&](std::size_t, redisReply* r) {
              if (r != nullptr && r->type == REDIS_REPLY_INTEGER) removed += r->integer > 0;
            });
      }
      return removed;
    }

    /// Deletes every chunk under this cache's salt on every (master) server: SCAN, then DEL.
    std::size_t remove_all() {
      std::vector<node*> masters;
      {
        std::shared_lock lk(topo_mu_);
        if (!cfg_.cluster) {
          masters.push_back(nodes_[0].get());
        } else {
          for (std::size_t s = 0; s < slot_owner_.size(); ++s) {
            node* n = nodes_[slot_owner_[s]].get();
            if (std::find(masters.begin(), masters.end(), n) == masters.end()) masters.push_back(n);
          }
        }
      }
      std::size_t removed = 0;
      const std::string pattern = prefix_ + "*";
      for (node* n : masters) {
        redisContext* c = acquire(*n);
        if (c == nullptr) continue;
        bool healthy = true;
        std::string cursor = "0";
        detail_redis::sigpipe_guard guard;
        do {
          detail_redis::reply_ptr r(static_cast<redisReply*>(redisCommand(
              c, "SCAN %s MATCH %b COUNT 1000", cursor.c_str(), pattern.data(), pattern.size())));
          if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            healthy = r != nullptr;
            break;
          }
          cursor.assign(r->element[0]->str, r->element[0]->len);
          const redisReply* ks = r->element[1];
          for (std::size_t i = 0; i < ks->elements; ++i) {
            append_keyed(c, "DEL", ks->element[i]->str, ks->element[i]->len);
          }
          for (std::size_t i = 0; i < ks->elements && healthy; ++i) {
            void* p = nullptr;
            if (redisGetReply(c, &p) != REDIS_OK) {
              healthy = false;
              break;
            }
            detail_redis::reply_ptr d(static_cast<redisReply*>(p));
            if (d->type == REDIS_REPLY_INTEGER) removed += d->integer > 0;
          }
        } while (healthy && cursor != "0");
        release(*n, c, healthy);
      }
      return removed;
    }

   private:
    struct key_buf {
      char s[key_len_max];
      std::size_t n = 0;
    };

    // One server: its address, a pool of connections and its health.
    struct node {
      std::string host;
      int port = 0;
      std::mutex mu;
      std::condition_variable cv;
      std::vector<redisContext*> idle;
      std::size_t open = 0;  // connections made and not freed (idle or in use)
      std::chrono::steady_clock::time_point down_until{};
      std::chrono::milliseconds backoff{0};
      ~node() {
        for (auto* c : idle) redisFree(c);
      }
    };

    static config checked(const config& c) {
      if (c.nodes.empty()) throw invalid_argument("kvtier: redis config has no nodes");
      if (c.connections == 0) throw invalid_argument("kvtier: redis connections is 0");
      if (c.timeout.count() <= 0) {
        throw invalid_argument("kvtier: redis timeout " + std::to_string(c.timeout.count()) +
                               " ms is not positive");
      }
      if (c.backoff_min.count() <= 0 || c.backoff_max < c.backoff_min) {
        throw invalid_argument("kvtier: redis backoff_min " +
                               std::to_string(c.backoff_min.count()) + " ms / backoff_max " +
                               std::to_string(c.backoff_max.count()) +
                               " ms are not 0 < min <= max");
      }
      if (c.ttl.count() < 0) {
        throw invalid_argument("kvtier: redis ttl " + std::to_string(c.ttl.count()) +
                               " ms is negative");
      }
      for (const auto& a : c.nodes) parse_address(a);
      return c;
    }

    static std::pair<std::string, int> parse_address(std::string_view a) {
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
    static std::string join(const std::vector<std::string>& v) {
      std::string s;
      for (const auto& a : v) s += (s.empty() ? "" : ",") + a;
      return s;
    }

    // The node for an address, added if new. Caller holds topo_mu_ exclusively (or constructs).
    std::uint16_t add_node(std::string_view address) {
      auto [host, port] = parse_address(address);
      for (std::size_t i = 0; i < nodes_.size(); ++i) {
        if (nodes_[i]->host == host && nodes_[i]->port == port)
          return static_cast<std::uint16_t>(i);
      }
      auto n = std::make_unique<node>();
      n->host = host;
      n->port = port;
      n->backoff = cfg_.backoff_min;
      nodes_.push_back(std::move(n));
      return static_cast<std::uint16_t>(nodes_.size() - 1);
    }

    // Appends `cmd key` (a one-key command) to a connection's pipeline.
    static void append_keyed(redisContext* c, const char* cmd, const char* key, std::size_t n) {
      const char* argv[] = {cmd, key};
      const std::size_t len[] = {std::strlen(cmd), n};
      redisAppendCommandArgv(c, 2, argv, len);
    }
    // The append step of run() for a one-key command.
    static auto keyed(const char* cmd) {
      return
          [cmd](redisContext* c, std::size_t, const key_buf& k) { append_keyed(c, cmd, k.s, k.n); };
    }

    key_buf key_text(const chunk_key& k) const noexcept {
      key_buf b;
      std::memcpy(b.s, prefix_.data(), prefix_.size());
      static constexpr char hexd[] = "0123456789abcdef";
      char* p = b.s + prefix_.size();
      for (std::uint64_t w : {k.hi, k.lo}) {
        for (int sh = 60; sh >= 0; sh -= 4) *p++ = hexd[(w >> sh) & 0xf];
      }
      b.n = static_cast<std::size_t>(p - b.s);
      return b;
    }

    // ---- connections ----------------------------------------------------------------------

    redisContext* acquire(node& n) {
      const auto deadline = std::chrono::steady_clock::now() + cfg_.timeout;
      std::unique_lock lk(n.mu);
      for (;;) {
        if (std::chrono::steady_clock::now() < n.down_until) return nullptr;  // backing off
        if (!n.idle.empty()) {
          redisContext* c = n.idle.back();
          n.idle.pop_back();
          return c;
        }
        if (n.open < cfg_.connections) {
          ++n.open;
          lk.unlock();
          redisContext* c = redisConnectWithTimeout(n.host.c_str(), n.port,
                                                    detail_redis::to_timeval(cfg_.timeout));
          if (c != nullptr && c->err == 0 &&
              redisSetTimeout(c, detail_redis::to_timeval(cfg_.timeout)) == REDIS_OK) {
            ++connects_;
            lk.lock();
            n.backoff = cfg_.backoff_min;
            return c;
          }
          if (c != nullptr) redisFree(c);
          lk.lock();
          --n.open;
          mark_down_locked(n);
          return nullptr;
        }
        if (n.cv.wait_until(lk, deadline) == std::cv_status::timeout) return nullptr;
      }
    }

    // Returns a connection to its pool; a broken one is freed, the server marked down for the
    // current backoff, and the other idle connections (likely broken too) freed.
    void release(node& n, redisContext* c, bool healthy) {
      std::unique_lock lk(n.mu);
      if (healthy && c->err == 0) {
        n.idle.push_back(c);
      } else {
        redisFree(c);
        --n.open;
        for (auto* i : n.idle) redisFree(i);
        n.open -= n.idle.size();
        n.idle.clear();
        mark_down_locked(n);
      }
      lk.unlock();
      n.cv.notify_one();
    }

    void mark_down_locked(node& n) {
      ++failures_;
      n.down_until = std::chrono::steady_clock::now() + n.backoff;
      n.backoff = std::min(cfg_.backoff_max, n.backoff * 2);
    }

    // One command on one server, outside any batch: its reply, or nullptr with `why` set.
    detail_redis::reply_ptr command(node& n, const char* cmd, std::string& why) {
      redisContext* c = acquire(n);
      if (c == nullptr) {
        why = "cannot connect to " + n.host + ":" + std::to_string(n.port);
        return nullptr;
      }
      detail_redis::sigpipe_guard guard;
      detail_redis::reply_ptr r(static_cast<redisReply*>(redisCommand(c, cmd)));
      if (!r) why = c->errstr;
      release(n, c, r != nullptr);
      return r;
    }

    bool ping(node& n, std::string& why) {
      const auto r = command(n, "PING", why);
      if (r && r->type != REDIS_REPLY_STATUS) why = r->str ? r->str : "bad reply";
      return r && r->type == REDIS_REPLY_STATUS;
    }

    // Loads the slot map from `n` with CLUSTER SLOTS.
    bool load_slots(node& n, std::string& why) {
      const auto r = command(n, "CLUSTER SLOTS", why);
      const std::string host = n.host;
      if (!r) return false;
      if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        why = r->type == REDIS_REPLY_ERROR ? std::string(r->str) : "no slots assigned";
        return false;
      }
      std::unique_lock lk(topo_mu_);
      for (std::size_t i = 0; i < r->elements; ++i) {
        const redisReply* e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) continue;
        const redisReply* m = e->element[2];
        if (m->type != REDIS_REPLY_ARRAY || m->elements < 2) continue;
        std::string ip(m->element[0]->str, m->element[0]->len);
        if (ip.empty()) ip = host;  // "" means: the address this reply came from
        const std::uint16_t id =
            add_node(ip + ":" + std::to_string(static_cast<long long>(m->element[1]->integer)));
        for (long long s = e->element[0]->integer; s <= e->element[1]->integer && s < 16384; ++s) {
          slot_owner_[static_cast<std::size_t>(s)] = id;
        }
      }
      ++refreshes_;
      return true;
    }

    // Refreshes the slot map from any node that answers (after a MOVED).
    void refresh_slots() {
      std::vector<node*> all;
      {
        std::shared_lock lk(topo_mu_);
        for (auto& n : nodes_) all.push_back(n.get());
      }
      std::string why;
      for (node* n : all) {
        if (load_slots(*n, why)) return;
      }
    }

    // ---- pipelined execution --------------------------------------------------------------

    // Where a command goes: its node, and whether it must be preceded by ASKING.
    struct route {
      std::uint16_t node = 0;
      bool asking = false;
      bool done = false;
    };

    enum class outcome { ok, error, broken };

    // Reads replies straight from a connection's socket, bypassing hiredis' reader: a GET's
    // value goes from the socket into the first tier's slot with no copy in between. Only used
    // for a batch whose every reply it reads, on a connection with nothing else pending.
    struct wire {
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
      // One reply line without its CRLF; valid until the next call.
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

    // A reader through hiredis: hands each reply to reply(i, r).
    template <class Reply>
    static auto by_hiredis(Reply& reply) {
      return [&reply](redisContext* c, wire&, std::size_t i, bool asking, std::string& err) {
        if (asking && !discard_reply(c)) return outcome::broken;
        void* p = nullptr;
        if (redisGetReply(c, &p) != REDIS_OK) return outcome::broken;
        detail_redis::reply_ptr r(static_cast<redisReply*>(p));
        if (r->type == REDIS_REPLY_ERROR) {
          err.assign(r->str, r->len);
          return outcome::error;
        }
        reply(i, r.get());
        return outcome::ok;
      };
    }

    // Runs `n` commands: key(i) names command i's key, append(ctx, i, key) appends it, and
    // reply(i, r) takes its reply (nullptr when its server failed, was down or late).
    template <class KeyOf, class Append, class Reply>
    void run(std::size_t n, KeyOf key_of, Append append, Reply reply) {
      run_with(
          n, key_of, append, by_hiredis(reply), [&](std::size_t i) { reply(i, nullptr); }, false);
    }

    // The same with a reply reader of one's own: read(ctx, wire, i, asking, err) consumes
    // command i's reply (and the ASKING reply before it); fail(i) is called for a command whose
    // server failed, was down or late. Commands are grouped per server, all servers are written
    // before any is read, and MOVED/ASK redirections are followed (up to 3 times per command).
    template <class KeyOf, class Append, class Read, class Fail>
    void run_with(std::size_t n, KeyOf key_of, Append append, Read read, Fail fail, bool direct) {
      std::array<route, batch> rt{};
      std::array<key_buf, batch> keys;
      {
        std::shared_lock lk(topo_mu_);
        for (std::size_t i = 0; i < n; ++i) {
          keys[i] = key_of(i);
          rt[i].node = cfg_.cluster ? slot_owner_[detail_redis::key_slot({keys[i].s, keys[i].n})]
                                    : std::uint16_t{0};
        }
      }
      bool refresh = false;
      std::string err;
      for (int round = 0; round < 4; ++round) {
        // The servers of this round's pending commands.
        std::array<std::uint16_t, batch> servers{};
        std::size_t ns = 0;
        for (std::size_t i = 0; i < n; ++i) {
          if (rt[i].done) continue;
          if (std::find(servers.begin(), servers.begin() + ns, rt[i].node) ==
              servers.begin() + ns) {
            servers[ns++] = rt[i].node;
          }
        }
        if (ns == 0) break;
        std::array<node*, batch> sn{};
        {
          std::shared_lock lk(topo_mu_);
          for (std::size_t s = 0; s < ns; ++s) sn[s] = nodes_[servers[s]].get();
        }
        // Write every server's commands first, so servers work in parallel.
        std::array<redisContext*, batch> ctx{};
        for (std::size_t s = 0; s < ns; ++s) {
          ctx[s] = acquire(*sn[s]);
          if (ctx[s] == nullptr) {
            ++skipped_;
            continue;
          }
          for (std::size_t i = 0; i < n; ++i) {
            if (rt[i].done || rt[i].node != servers[s]) continue;
            if (rt[i].asking) redisAppendCommand(ctx[s], "ASKING");
            append(ctx[s], i, keys[i]);
          }
          flush_out(ctx[s]);
        }
        // Then read the replies in order.
        for (std::size_t s = 0; s < ns; ++s) {
          redisContext* c = ctx[s];
          bool healthy = c != nullptr && c->err == 0;
          wire w{c != nullptr ? c->fd : -1};
          for (std::size_t i = 0; i < n; ++i) {
            if (rt[i].done || rt[i].node != servers[s]) continue;
            const outcome o = healthy ? read(c, w, i, rt[i].asking, err) : outcome::broken;
            if (o == outcome::broken) healthy = false;
            if (o == outcome::error && round < 3 && redirect(err, rt[i], refresh)) {
              continue;  // sent again next round
            }
            rt[i].done = true;
            if (o != outcome::ok) fail(i);
          }
          if (direct && !w.drained()) healthy = false;  // bytes nobody asked for: resync
          if (c != nullptr) release(*sn[s], c, healthy);
        }
      }
      for (std::size_t i = 0; i < n; ++i) {
        if (!rt[i].done) fail(i);
      }
      if (refresh) refresh_slots();
    }

    static bool discard_reply(redisContext* c) {
      void* p = nullptr;
      if (redisGetReply(c, &p) != REDIS_OK) return false;
      freeReplyObject(p);
      return true;
    }

    // One GET reply read off the socket: the record's header into a local, its payload straight
    // into the job's slot, then verified.
    outcome read_get(wire& w, read_job& j, bool asking, std::string& err) const {
      std::string_view l;
      if (asking && (!w.line(l) || l != "+OK")) return outcome::broken;
      if (!w.line(l) || l.empty()) return outcome::broken;
      if (l[0] == '-') {
        err.assign(l.substr(1));
        return outcome::error;
      }
      long long len = 0;
      if (l[0] != '$' ||
          std::from_chars(l.data() + 1, l.data() + l.size(), len).ec != std::errc{}) {
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
      const bool good = detail::header_matches(h, j.key, ctx_.salt, ctx_.format.fingerprint(),
                                               j.tokens, j.bytes, hb) &&
                        detail::payload_checksum(j.key, j.dst, j.bytes) == h.payload_checksum;
      j.status = good ? read_status::ok : read_status::corrupt;
      return outcome::ok;
    }

    // A MOVED or ASK error: points the command at the named server. MOVED also updates the
    // slot's owner and asks for a refresh of the whole map.
    bool redirect(std::string_view msg, route& rt, bool& refresh) {
      const bool moved = msg.rfind("MOVED ", 0) == 0, ask = msg.rfind("ASK ", 0) == 0;
      if (!moved && !ask) return false;
      const auto sp1 = msg.find(' '), sp2 = msg.find(' ', sp1 + 1);
      if (sp2 == std::string_view::npos) return false;
      unsigned slot = 0;
      std::from_chars(msg.data() + sp1 + 1, msg.data() + sp2, slot);
      std::uint16_t id;
      try {
        std::unique_lock lk(topo_mu_);
        id = add_node(msg.substr(sp2 + 1));
        if (moved && slot < 16384) slot_owner_[slot] = id;
      } catch (const error&) {
        return false;
      }
      rt.node = id;
      rt.asking = ask;
      if (moved) {
        ++moved_;
        refresh = true;
      } else {
        ++ask_;
      }
      return true;
    }

    // SET key <header + payload> [PX ttl], sent in place: whatever hiredis holds for this
    // connection (an ASKING) is flushed, then the command goes out with one sendmsg of three
    // pieces, the payload straight from the first tier's slot (no copy into hiredis' buffer).
    // A failed send marks the context broken, so its replies are not waited for.
    void append_set(redisContext* c, const key_buf& k, const write_job& j) {
      if (c->err) return;
      const detail::record_header h =
          detail::make_record_header(j.key, ctx_.salt, ctx_.format.fingerprint(), j.tokens, j.src,
                                     j.bytes, sizeof(detail::record_header));
      const bool ttl = cfg_.ttl.count() > 0;
      char pre[key_len_max + 64 + sizeof h];
      int m = std::snprintf(pre, sizeof pre, "*%d\r\n$3\r\nSET\r\n$%zu\r\n", ttl ? 5 : 3, k.n);
      std::memcpy(pre + m, k.s, k.n);
      m += static_cast<int>(k.n);
      m += std::snprintf(pre + m, sizeof pre - static_cast<std::size_t>(m), "\r\n$%zu\r\n",
                         sizeof h + j.bytes);
      std::memcpy(pre + m, &h, sizeof h);
      m += static_cast<int>(sizeof h);
      char post[64];
      int q = 2;
      std::memcpy(post, "\r\n", 2);
      if (ttl) {
        const std::string ms = std::to_string(cfg_.ttl.count());
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

    // Writes out hiredis' output buffer with SIGPIPE held off: a server that went away must
    // not kill the engine's process (hiredis writes with write(2)).
    static bool flush_out(redisContext* c) {
      detail_redis::sigpipe_guard guard;
      int done = 0;
      while (!done) {
        if (redisBufferWrite(c, &done) != REDIS_OK) return false;
      }
      return true;
    }

    config cfg_;
    context ctx_;
    std::string prefix_;
    mutable std::shared_mutex topo_mu_;
    std::vector<std::unique_ptr<node>> nodes_;
    std::array<std::uint16_t, 16384> slot_owner_{};
    bool ready_ = false;
    std::atomic<std::uint64_t> moved_{0}, ask_{0}, refreshes_{0}, connects_{0}, failures_{0},
        skipped_{0};
  };
};

}  // namespace kvtier::tier
