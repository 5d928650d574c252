#pragma once
// The remote tier on Redis or Valkey (one server, or a Redis Cluster), through hiredis.
// Link kvtier::redis (kvtier + hiredis) to use it; kvtier.hpp does not include it.

#include "kvtier/detail/record.hpp"
#include "kvtier/error.hpp"
#include "kvtier/tier/context.hpp"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
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

}  // namespace detail_redis

/// Remote tier on Redis or Valkey. Each chunk is one value: a record header (key, salt, format
/// fingerprint, tokens, checksums) then the chunk's bytes, under the key
/// `<key_prefix>:<salt hex>:<chunk key hex>`; every read verifies the record against the key
/// asked for, so a value that is not this chunk's is a miss and a counted error, never data.
///
/// Commands are pipelined per batch (EXISTS for lookup, GET for loads, EXISTS then SET for
/// writes), over a pool of connections per server. Every wait for a server is bounded by
/// `timeout`. A server that fails is marked down and skipped (lookups miss, writes are dropped
/// and counted) until a reconnect after an exponential backoff succeeds, so a restarted server
/// is used again without restarting the engine. With `cluster`, keys map to hash slots learnt
/// from CLUSTER SLOTS; MOVED and ASK redirections are followed and MOVED refreshes the map.
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
            n, [&](std::size_t i) { return key_text(keys[b + i]); },
            [&](redisContext* c, std::size_t, const key_buf& k) {
              const char* argv[] = {"EXISTS", k.s};
              const std::size_t len[] = {6, k.n};
              redisAppendCommandArgv(c, 2, argv, len);
            },
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

    /// Loads each job's record (pipelined GET), verifies it and copies its payload to `dst`.
    void read_batch(std::span<read_job> jobs) {
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        std::span<read_job> js = jobs.subspan(b, std::min(batch, jobs.size() - b));
        for (auto& j : js) j.status = read_status::io_error;
        run(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); },
            [&](redisContext* c, std::size_t, const key_buf& k) {
              const char* argv[] = {"GET", k.s};
              const std::size_t len[] = {3, k.n};
              redisAppendCommandArgv(c, 2, argv, len);
            },
            [&](std::size_t i, redisReply* r) { js[i].status = verify(js[i], r); });
      }
    }

    /// Writes each job's record (pipelined EXISTS, then SET of the chunks the servers lack).
    void write_batch(std::span<write_job> jobs) {
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        std::span<write_job> js = jobs.subspan(b, std::min(batch, jobs.size() - b));
        std::array<std::uint8_t, batch> state{};  // 0 unknown/failed, 1 held, 2 absent
        run(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); },
            [&](redisContext* c, std::size_t, const key_buf& k) {
              const char* argv[] = {"EXISTS", k.s};
              const std::size_t len[] = {6, k.n};
              redisAppendCommandArgv(c, 2, argv, len);
            },
            [&](std::size_t i, redisReply* r) {
              if (r != nullptr && r->type == REDIS_REPLY_INTEGER) state[i] = r->integer ? 1 : 2;
            });
        std::array<std::size_t, batch> todo{};
        std::size_t m = 0;
        for (std::size_t i = 0; i < js.size(); ++i) {
          js[i].ok = state[i] == 1;
          if (state[i] == 2) todo[m++] = i;
        }
        if (m == 0) continue;
        run(
            m, [&](std::size_t i) { return key_text(js[todo[i]].key); },
            [&](redisContext* c, std::size_t i, const key_buf& k) {
              append_set(c, k, js[todo[i]]);
            },
            [&](std::size_t i, redisReply* r) {
              js[todo[i]].ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
            });
      }
    }

    /// Deletes the chunks of `keys`; returns how many the servers held.
    std::size_t remove(std::span<const chunk_key> keys) {
      std::size_t removed = 0;
      for (std::size_t b = 0; b < keys.size(); b += batch) {
        const std::size_t n = std::min(batch, keys.size() - b);
        run(
            n, [&](std::size_t i) { return key_text(keys[b + i]); },
            [&](redisContext* c, std::size_t, const key_buf& k) {
              const char* argv[] = {"DEL", k.s};
              const std::size_t len[] = {3, k.n};
              redisAppendCommandArgv(c, 2, argv, len);
            },
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
            const char* argv[] = {"DEL", ks->element[i]->str};
            const std::size_t len[] = {3, ks->element[i]->len};
            redisAppendCommandArgv(c, 2, argv, len);
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

    bool ping(node& n, std::string& why) {
      redisContext* c = acquire(n);
      if (c == nullptr) {
        why = "cannot connect to " + n.host + ":" + std::to_string(n.port);
        return false;
      }
      detail_redis::reply_ptr r(static_cast<redisReply*>(redisCommand(c, "PING")));
      const bool ok = r && r->type == REDIS_REPLY_STATUS;
      if (!ok) why = r ? std::string(r->str ? r->str : "bad reply") : std::string(c->errstr);
      release(n, c, r != nullptr);
      return ok;
    }

    // Loads the slot map from `n` with CLUSTER SLOTS.
    bool load_slots(node& n, std::string& why) {
      redisContext* c = acquire(n);
      if (c == nullptr) {
        why = "cannot connect to " + n.host + ":" + std::to_string(n.port);
        return false;
      }
      detail_redis::reply_ptr r(static_cast<redisReply*>(redisCommand(c, "CLUSTER SLOTS")));
      const std::string host = n.host;
      release(n, c, r != nullptr);
      if (!r || r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        why = r ? (r->type == REDIS_REPLY_ERROR ? std::string(r->str) : "no slots assigned")
                : "connection lost";
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

    // Runs `n` commands: key(i) names command i's key, append(ctx, i, key) appends it, and
    // reply(i, r) takes its reply (nullptr when its server failed, was down or late). Commands
    // are grouped per server, all servers are written before any is read, and MOVED/ASK
    // redirections are followed (up to 3 times per command).
    template <class KeyOf, class Append, class Reply>
    void run(std::size_t n, KeyOf key_of, Append append, Reply reply) {
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
          int done = 0;
          while (!done) {
            if (redisBufferWrite(ctx[s], &done) != REDIS_OK) break;
          }
        }
        // Then read the replies in order.
        for (std::size_t s = 0; s < ns; ++s) {
          redisContext* c = ctx[s];
          bool healthy = c != nullptr;
          for (std::size_t i = 0; i < n; ++i) {
            if (rt[i].done || rt[i].node != servers[s]) continue;
            if (healthy && rt[i].asking) healthy = discard_reply(c);
            void* p = nullptr;
            if (healthy && redisGetReply(c, &p) != REDIS_OK) healthy = false;
            detail_redis::reply_ptr r(static_cast<redisReply*>(p));
            if (!healthy) {
              rt[i].done = true;
              reply(i, nullptr);
              continue;
            }
            if (r->type == REDIS_REPLY_ERROR && round < 3 && redirect(r.get(), rt[i], refresh)) {
              continue;  // sent again next round
            }
            rt[i].done = true;
            reply(i, r->type == REDIS_REPLY_ERROR ? nullptr : r.get());
          }
          if (c != nullptr) release(*sn[s], c, healthy);
        }
      }
      for (std::size_t i = 0; i < n; ++i) {
        if (!rt[i].done) reply(i, nullptr);
      }
      if (refresh) refresh_slots();
    }

    static bool discard_reply(redisContext* c) {
      void* p = nullptr;
      if (redisGetReply(c, &p) != REDIS_OK) return false;
      freeReplyObject(p);
      return true;
    }

    // A MOVED or ASK error: points the command at the named server. MOVED also updates the
    // slot's owner and asks for a refresh of the whole map.
    bool redirect(const redisReply* r, route& rt, bool& refresh) {
      const std::string_view msg(r->str, r->len);
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

    // SET key <header + payload> [PX ttl], formatted in place: the payload is appended once,
    // straight from the first tier's slot.
    void append_set(redisContext* c, const key_buf& k, const write_job& j) {
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
      redisAppendFormattedCommand(c, pre, static_cast<std::size_t>(m));
      redisAppendFormattedCommand(c, reinterpret_cast<const char*>(j.src), j.bytes);
      char post[64];
      int q = 2;
      std::memcpy(post, "\r\n", 2);
      if (ttl) {
        const std::string ms = std::to_string(cfg_.ttl.count());
        q += std::snprintf(post + q, sizeof post - 2, "$2\r\nPX\r\n$%zu\r\n%s\r\n", ms.size(),
                           ms.c_str());
      }
      redisAppendFormattedCommand(c, post, static_cast<std::size_t>(q));
    }

    read_status verify(read_job& j, const redisReply* r) const noexcept {
      if (r == nullptr) return read_status::io_error;
      if (r->type == REDIS_REPLY_NIL) return read_status::missing;
      constexpr std::size_t hb = sizeof(detail::record_header);
      if (r->type != REDIS_REPLY_STRING || r->len != hb + j.bytes) return read_status::corrupt;
      detail::record_header h;
      std::memcpy(&h, r->str, hb);
      if (!detail::header_matches(h, j.key, ctx_.salt, ctx_.format.fingerprint(), j.tokens, j.bytes,
                                  hb)) {
        return read_status::corrupt;
      }
      const auto* payload = reinterpret_cast<const std::byte*>(r->str + hb);
      if (detail::payload_checksum(j.key, payload, j.bytes) != h.payload_checksum) {
        return read_status::corrupt;
      }
      std::memcpy(j.dst, payload, j.bytes);
      return read_status::ok;
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
