// What the Redis tier tests share: a raw hiredis connection for checking and tampering with
// what the tier wrote, and the servers the ctest fixture started.
#pragma once
#include "../host/support.hpp"

#include "kvtier/tier/redis.hpp"

#include <hiredis/hiredis.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace o = kvtier::opt;
using nhd = kvtier::layout::vllm_flash_nhd;
using host = kvtier::tier::host;
using remote = kvtier::tier::redis;
/// The cache every Redis test uses: 16-token chunks of the small model, host + redis.
using C = kvtier::cache<o::chunk_tokens<16>, o::tiers<host, remote>>;
using namespace std::chrono_literals;

namespace test {

using kvtier::tier::detail_redis::reply_ptr;
/// One host-tier slot of the small model's 16-token chunk.
inline constexpr std::size_t slot = 4096;

inline std::string servers_dir() {
  const char* d = std::getenv("KVTIER_REDIS_DIR");
  REQUIRE(d != nullptr);
  return d;
}

/// The ports the fixture wrote to `file` (single.port, cluster.ports).
inline std::vector<int> read_ports(const std::string& file) {
  std::ifstream in(servers_dir() + "/" + file);
  std::vector<int> ports;
  for (int p; in >> p;) ports.push_back(p);
  REQUIRE(!ports.empty());
  return ports;
}

struct raw {
  redisContext* c;
  explicit raw(int port) : c(redisConnect("127.0.0.1", port)) { REQUIRE((c && !c->err)); }
  ~raw() { redisFree(c); }
  raw(const raw&) = delete;
  raw& operator=(const raw&) = delete;
  reply_ptr cmd(const char* fmt, auto... a) {
    return reply_ptr(static_cast<redisReply*>(redisCommand(c, fmt, a...)));
  }
  std::string str(const char* fmt, auto... a) {
    auto r = cmd(fmt, a...);
    REQUIRE(r);
    REQUIRE((r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS));
    return std::string(r->str, r->len);
  }
  long long integer(const char* fmt, auto... a) {
    auto r = cmd(fmt, a...);
    REQUIRE(r);
    REQUIRE(r->type == REDIS_REPLY_INTEGER);
    return r->integer;
  }
};

}  // namespace test
