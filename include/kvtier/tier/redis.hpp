#pragma once
// The remote tier on Redis or Valkey (one server, or a Redis Cluster), through hiredis.
// Link kvtier::redis (kvtier + hiredis) to use it; kvtier.hpp does not include it. Its parts:
// redis/protocol.hpp (RESP, keys, replies), redis/connection.hpp (a pool per server, backoff),
// redis/cluster.hpp (servers and the slot map, MOVED/ASK), redis/record.hpp (a chunk's value).

#include "kvtier/error.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/tier/context.hpp"
#include "kvtier/tier/redis/cluster.hpp"
#include "kvtier/tier/redis/connection.hpp"
#include "kvtier/tier/redis/protocol.hpp"
#include "kvtier/tier/redis/record.hpp"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvtier::tier {

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
    /// Value bytes kept in flight per server connection by loads (GET replies) and writes (SET
    /// values), at least 2 commands: a sliding window, the next command sent as each reply is
    /// read. Deeper pipelines of large values run slower (docs/performance.md, "Redis").
    std::size_t window_bytes = std::size_t{1} << 20;
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

   public:
    impl(const config& c, const context& ctx)
        : cfg_(checked(c)), ctx_(ctx), topo_(cfg_.cluster, limits_of(cfg_)) {
      prefix_ = cfg_.key_prefix + ":" + ctx.salt.hex() + ":";
      if (prefix_.size() + 32 > detail_redis::key_len_max) {
        throw invalid_argument("kvtier: redis key_prefix '" + cfg_.key_prefix + "' is too long");
      }
      for (const auto& a : cfg_.nodes) topo_.add(a);
      // The tier must be reachable when the cache is made; later outages are survived.
      std::string why;
      for (std::size_t i = 0; i < topo_.size(); ++i) {
        detail_redis::server& s = topo_.at(i);
        if (cfg_.cluster ? topo_.load(s, why) : s.ping(why)) {
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
      c.refreshes = topo_.refreshes();
      c.connects = topo_.events().connects.load();
      c.failures = topo_.events().failures.load();
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
            n, [&](std::size_t i) { return key_text(keys[b + i]); }, detail_redis::keyed("EXISTS"),
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
        std::size_t largest = 1;
        for (auto& j : js) {
          j.status = read_status::io_error;
          largest = std::max(largest, j.bytes);
        }
        run_with(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); },
            detail_redis::keyed("GET"),
            [&](redisContext*, wire& w, std::size_t i, bool asking, std::string& err) {
              return detail_redis::read_record(w, js[i], ctx_, asking, err);
            },
            [&](std::size_t i) { js[i].status = read_status::io_error; }, true,
            window_for(largest));
      }
    }

    /// Writes each job's record (pipelined EXISTS, then SET of the chunks the servers lack).
    void write_batch(std::span<write_job> jobs) {
      for (std::size_t b = 0; b < jobs.size(); b += batch) {
        std::span<write_job> js = jobs.subspan(b, std::min(batch, jobs.size() - b));
        std::array<std::uint8_t, batch> state{};  // 0 unknown/failed, 1 held, 2 absent
        run(
            js.size(), [&](std::size_t i) { return key_text(js[i].key); },
            detail_redis::keyed("EXISTS"),
            [&](std::size_t i, redisReply* r) {
              if (r != nullptr && r->type == REDIS_REPLY_INTEGER) state[i] = r->integer ? 1 : 2;
            });
        std::array<std::size_t, batch> absent{};
        std::size_t m = 0, largest = 1;
        for (std::size_t i = 0; i < js.size(); ++i) {
          js[i].ok = state[i] == 1;
          if (state[i] == 2) {
            absent[m++] = i;
            largest = std::max(largest, js[i].bytes);
          }
        }
        if (m == 0) continue;
        run(
            m, [&](std::size_t i) { return key_text(js[absent[i]].key); },
            [&](redisContext* c, std::size_t i, const key_buf& k) {
              detail_redis::write_record(c, k, js[absent[i]], ctx_, cfg_.ttl);
            },
            [&](std::size_t i, redisReply* r) {
              js[absent[i]].ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
            },
            window_for(largest));
      }
    }

    /// Deletes the chunks of `keys`; returns how many the servers held.
    std::size_t remove(std::span<const chunk_key> keys) {
      std::size_t removed = 0;
      for (std::size_t b = 0; b < keys.size(); b += batch) {
        const std::size_t n = std::min(batch, keys.size() - b);
        run(
            n, [&](std::size_t i) { return key_text(keys[b + i]); }, detail_redis::keyed("DEL"),
            [&](std::size_t, redisReply* r) {
              if (r != nullptr && r->type == REDIS_REPLY_INTEGER) removed += r->integer > 0;
            });
      }
      return removed;
    }

    /// Deletes every chunk under this cache's salt on every (master) server: SCAN, then DEL.
    std::size_t remove_all() {
      std::size_t removed = 0;
      const std::string pattern = prefix_ + "*";
      for (detail_redis::server* n : topo_.masters()) {
        redisContext* c = n->acquire();
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
            detail_redis::append_keyed(c, "DEL", ks->element[i]->str, ks->element[i]->len);
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
        n->release(c, healthy);
      }
      return removed;
    }

   private:
    using key_buf = detail_redis::key_buf;
    using outcome = detail_redis::outcome;
    using wire = detail_redis::wire;

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
      if (c.window_bytes == 0) {
        throw invalid_argument("kvtier: redis window_bytes is 0 (at least one byte)");
      }
      if (c.ttl.count() < 0) {
        throw invalid_argument("kvtier: redis ttl " + std::to_string(c.ttl.count()) +
                               " ms is negative");
      }
      for (const auto& a : c.nodes) detail_redis::parse_address(a);
      return c;
    }
    static detail_redis::pool_limits limits_of(const config& c) noexcept {
      return {c.connections, c.timeout, c.backoff_min, c.backoff_max};
    }
    static std::string join(const std::vector<std::string>& v) {
      std::string s;
      for (const auto& a : v) s += (s.empty() ? "" : ",") + a;
      return s;
    }

    // Commands per connection in flight for values of up to `largest` bytes.
    std::size_t window_for(std::size_t largest) const noexcept {
      return std::clamp<std::size_t>(cfg_.window_bytes / largest, 2, batch);
    }

    key_buf key_text(const chunk_key& k) const noexcept {
      return detail_redis::key_text(prefix_, k);
    }

    // ---- pipelined execution --------------------------------------------------------------

    // Where a command goes: its server, and whether it must be preceded by ASKING.
    struct route {
      std::uint16_t node = 0;
      bool asking = false;
      bool done = false;
    };

    // Runs `n` commands: key(i) names command i's key, append(ctx, i, key) appends it, and
    // reply(i, r) takes its reply (nullptr when its server failed, was down or late).
    template <class KeyOf, class Append, class Reply>
    void run(std::size_t n, KeyOf key_of, Append append, Reply reply, std::size_t window = batch) {
      run_with(
          n, key_of, append, detail_redis::by_hiredis(reply),
          [&](std::size_t i) { reply(i, nullptr); }, false, window);
    }

    // The same with a reply reader of one's own: read(ctx, wire, i, asking, err) consumes
    // command i's reply (and the ASKING reply before it); fail(i) is called for a command whose
    // server failed, was down or late. Commands are grouped per server; each server gets its
    // first `window` commands before any is read, then one more as each reply is read (a
    // sliding window), and MOVED/ASK redirections are followed (up to 3 times per command).
    template <class KeyOf, class Append, class Read, class Fail>
    void run_with(std::size_t n, KeyOf key_of, Append append, Read read, Fail fail, bool direct,
                  std::size_t window) {
      std::array<route, batch> rt{};
      std::array<key_buf, batch> keys;
      {
        const auto lk = topo_.reading();
        for (std::size_t i = 0; i < n; ++i) {
          keys[i] = key_of(i);
          rt[i].node = topo_.owner({keys[i].s, keys[i].n});
        }
      }
      bool refresh = false;
      std::string err;
      for (int round = 0; round < 4; ++round) {
        // This round's pending commands grouped per server, in order: server s sends and reads
        // order[first[s] .. first[s + 1]). Fixed for the round: a redirect moves a command to
        // next round's list, never into one being sent.
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
        std::array<std::uint8_t, batch> order{};
        std::array<std::uint8_t, batch + 1> first{};
        std::size_t m = 0;
        for (std::size_t s = 0; s < ns; ++s) {
          first[s] = static_cast<std::uint8_t>(m);
          for (std::size_t i = 0; i < n; ++i) {
            if (!rt[i].done && rt[i].node == servers[s]) order[m++] = static_cast<std::uint8_t>(i);
          }
        }
        first[ns] = static_cast<std::uint8_t>(m);
        std::array<detail_redis::server*, batch> sn{};
        {
          const auto lk = topo_.reading();
          for (std::size_t s = 0; s < ns; ++s) sn[s] = &topo_.at_locked(servers[s]);
        }
        std::array<redisContext*, batch> ctx{};
        std::array<std::uint8_t, batch> sent{};  // per server: order[] positions sent so far
        const auto send_upto = [&](std::size_t s, std::size_t end) {
          for (; sent[s] < end; ++sent[s]) {
            const std::size_t i = order[sent[s]];
            if (rt[i].asking) redisAppendCommand(ctx[s], "ASKING");
            append(ctx[s], i, keys[i]);
          }
          detail_redis::flush_out(ctx[s]);
        };
        // Every server's first window first, so servers work in parallel.
        for (std::size_t s = 0; s < ns; ++s) {
          sent[s] = first[s];
          ctx[s] = sn[s]->acquire();
          if (ctx[s] == nullptr) {
            ++skipped_;
            continue;
          }
          send_upto(s, std::min<std::size_t>(first[s + 1], first[s] + window));
        }
        // Then read each server's replies in order, topping its window up after each.
        for (std::size_t s = 0; s < ns; ++s) {
          redisContext* c = ctx[s];
          bool healthy = c != nullptr && c->err == 0;
          wire w{c != nullptr ? c->fd : -1};
          for (std::size_t p = first[s]; p < first[s + 1]; ++p) {
            const std::size_t i = order[p];
            // Only sent commands have replies; one left unsent by a broken connection fails.
            const outcome o =
                healthy && p < sent[s] ? read(c, w, i, rt[i].asking, err) : outcome::broken;
            if (o == outcome::broken) healthy = false;
            if (healthy && sent[s] < first[s + 1]) send_upto(s, sent[s] + 1u);
            if (o == outcome::error && round < 3 && redirect(err, rt[i], refresh)) {
              continue;  // sent again next round
            }
            rt[i].done = true;
            if (o != outcome::ok) fail(i);
          }
          if (direct && !w.drained()) healthy = false;  // bytes nobody asked for: resync
          if (c != nullptr) sn[s]->release(c, healthy);
        }
      }
      for (std::size_t i = 0; i < n; ++i) {
        if (!rt[i].done) fail(i);
      }
      if (refresh) topo_.refresh();
    }

    // A MOVED or ASK error: points the command at the named server. MOVED also updates the
    // slot's owner and asks for a refresh of the whole map.
    bool redirect(std::string_view msg, route& rt, bool& refresh) {
      const auto to = detail_redis::parse_redirect(msg);
      if (!to) return false;
      const auto id = topo_.follow(*to);
      if (!id) return false;
      rt.node = *id;
      rt.asking = !to->moved;
      if (to->moved) {
        ++moved_;
        refresh = true;
      } else {
        ++ask_;
      }
      return true;
    }

    config cfg_;
    context ctx_;
    std::string prefix_;
    detail_redis::topology topo_;
    bool ready_ = false;
    std::atomic<std::uint64_t> moved_{0}, ask_{0}, skipped_{0};
  };
};

static_assert(remote_lower_tier<redis::impl<eviction::lru>>);

}  // namespace kvtier::tier
