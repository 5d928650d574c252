#pragma once
// The servers the Redis tier knows and, in a Redis Cluster, which of them owns each hash slot:
// the CRC16 key slot, the slot map learnt from CLUSTER SLOTS, and MOVED/ASK redirections.

#include "kvtier/error.hpp"
#include "kvtier/tier/redis/connection.hpp"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

namespace kvtier::tier::detail_redis {

/// Hash slots of a Redis Cluster.
inline constexpr std::size_t slot_count = 16384;

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
  return static_cast<std::uint16_t>(crc & (slot_count - 1));
}

/// A MOVED or ASK error: where the slot's keys are (MOVED) or this one key is (ASK).
struct redirection {
  bool moved = false;  ///< MOVED; else ASK
  unsigned slot = 0;
  std::string_view address;  ///< "host:port", unchecked; a view into the message
};

/// The redirection an error reply names ("MOVED 3999 127.0.0.1:6381"), or nullopt for any
/// other error. A slot that does not parse reads as 0.
[[nodiscard]] inline std::optional<redirection> parse_redirect(std::string_view msg) noexcept {
  const bool moved = msg.rfind("MOVED ", 0) == 0, ask = msg.rfind("ASK ", 0) == 0;
  if (!moved && !ask) return std::nullopt;
  const auto sp1 = msg.find(' '), sp2 = msg.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return std::nullopt;
  redirection r;
  r.moved = moved;
  std::from_chars(msg.data() + sp1 + 1, msg.data() + sp2, r.slot);
  r.address = msg.substr(sp2 + 1);
  return r;
}

/// One range of slots and its master, as a CLUSTER SLOTS reply lists them.
struct slot_range {
  long long first = 0, last = 0;
  std::string address;  ///< "host:port" of the master
};

/// The ranges of a CLUSTER SLOTS reply `r`, received from `host`. Entries without a master are
/// passed over; a master with an empty address is `host`.
[[nodiscard]] inline std::vector<slot_range> parse_slots(const redisReply& r,
                                                         const std::string& host) {
  std::vector<slot_range> out;
  for (std::size_t i = 0; i < r.elements; ++i) {
    const redisReply* e = r.element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) continue;
    const redisReply* m = e->element[2];
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 2) continue;
    std::string ip(m->element[0]->str, m->element[0]->len);
    if (ip.empty()) ip = host;  // "" means: the address this reply came from
    out.push_back({e->element[0]->integer, e->element[1]->integer,
                   ip + ":" + std::to_string(static_cast<long long>(m->element[1]->integer))});
  }
  return out;
}

/// The servers of a tier, in the order they were learnt (ids are indexes; a server is never
/// removed, so a reference to one stays valid), and with `cluster` the owner of each slot.
/// Without a cluster every key goes to server 0.
class topology {
 public:
  topology(bool cluster, const pool_limits& limits) : cluster_(cluster), limits_(limits) {}
  topology(const topology&) = delete;
  topology& operator=(const topology&) = delete;

  /// The id of the server at `address`, added if new; throws invalid_argument on a bad one.
  std::uint16_t add(std::string_view address) {
    std::unique_lock lk(mu_);
    return add_locked(address);
  }

  [[nodiscard]] std::size_t size() const {
    std::shared_lock lk(mu_);
    return servers_.size();
  }
  [[nodiscard]] server& at(std::size_t id) const {
    std::shared_lock lk(mu_);
    return *servers_[id];
  }

  /// Holds the map for reading while alive: for owner() and at_locked() over a whole batch.
  [[nodiscard]] std::shared_lock<std::shared_mutex> reading() const {
    return std::shared_lock(mu_);
  }
  /// The id of the server that holds `key`. The caller holds reading().
  [[nodiscard]] std::uint16_t owner(std::string_view key) const noexcept {
    return cluster_ ? owner_[key_slot(key)] : std::uint16_t{0};
  }
  /// The server `id`. The caller holds reading().
  [[nodiscard]] server& at_locked(std::uint16_t id) const noexcept { return *servers_[id]; }

  /// Every master: server 0 without a cluster, else each server that owns a slot.
  [[nodiscard]] std::vector<server*> masters() const {
    std::vector<server*> out;
    std::shared_lock lk(mu_);
    if (!cluster_) {
      out.push_back(servers_[0].get());
    } else {
      for (std::size_t s = 0; s < owner_.size(); ++s) {
        server* n = servers_[owner_[s]].get();
        if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
      }
    }
    return out;
  }

  /// Loads the slot map from `s` with CLUSTER SLOTS; false with `why` set when it cannot.
  bool load(server& s, std::string& why) {
    const auto r = s.command("CLUSTER SLOTS", why);
    const std::string host = s.host();
    if (!r) return false;
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
      why = r->type == REDIS_REPLY_ERROR ? std::string(r->str) : "no slots assigned";
      return false;
    }
    const std::vector<slot_range> ranges = parse_slots(*r, host);
    std::unique_lock lk(mu_);
    for (const slot_range& range : ranges) {
      const std::uint16_t id = add_locked(range.address);
      for (long long i = range.first; i <= range.last && i < static_cast<long long>(slot_count);
           ++i) {
        owner_[static_cast<std::size_t>(i)] = id;
      }
    }
    ++refreshes_;
    return true;
  }

  /// Reloads the slot map from any server that answers (after a MOVED).
  void refresh() {
    std::vector<server*> all;
    {
      std::shared_lock lk(mu_);
      for (auto& s : servers_) all.push_back(s.get());
    }
    std::string why;
    for (server* s : all) {
      if (load(*s, why)) return;
    }
  }

  /// The id of the server `r` points to, added if new; a MOVED also makes it the slot's owner.
  /// nullopt when the address is not host:port.
  std::optional<std::uint16_t> follow(const redirection& r) {
    try {
      std::unique_lock lk(mu_);
      const std::uint16_t id = add_locked(r.address);
      if (r.moved && r.slot < slot_count) owner_[r.slot] = id;
      return id;
    } catch (const error&) {
      return std::nullopt;
    }
  }

  [[nodiscard]] const pool_events& events() const noexcept { return events_; }
  /// Slot maps loaded.
  [[nodiscard]] std::uint64_t refreshes() const noexcept { return refreshes_.load(); }

 private:
  std::uint16_t add_locked(std::string_view address) {
    auto [host, port] = parse_address(address);
    for (std::size_t i = 0; i < servers_.size(); ++i) {
      if (servers_[i]->host() == host && servers_[i]->port() == port) {
        return static_cast<std::uint16_t>(i);
      }
    }
    servers_.push_back(std::make_unique<server>(host, port, limits_, events_));
    return static_cast<std::uint16_t>(servers_.size() - 1);
  }

  bool cluster_;
  pool_limits limits_;
  pool_events events_;
  mutable std::shared_mutex mu_;
  std::vector<std::unique_ptr<server>> servers_;
  std::array<std::uint16_t, slot_count> owner_{};
  std::atomic<std::uint64_t> refreshes_{0};
};

}  // namespace kvtier::tier::detail_redis
