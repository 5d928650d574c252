// The parts of the Redis tier that need no server: Redis Cluster's key slots, MOVED/ASK and
// CLUSTER SLOTS parsing, the slot map, server keys, and records on a socket pair: what the tier
// sends for a SET, and what it makes of hostile GET replies (truncated, oversize, another key's,
// another salt's, not RESP at all).
#include "kvtier/tier/redis/cluster.hpp"
#include "kvtier/tier/redis/protocol.hpp"
#include "kvtier/tier/redis/record.hpp"

#include <doctest/doctest.h>
#include <hiredis/hiredis.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace dr = kvtier::tier::detail_redis;
using dr::outcome;
using kvtier::chunk_key;
using kvtier::tier::read_status;
using namespace std::chrono_literals;

/// A connected pair of sockets: the code under test uses `near`, the test plays the server on
/// `far`.
struct socket_pair {
  int near = -1, far = -1;
  socket_pair() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    near = fds[0];
    far = fds[1];
  }
  ~socket_pair() {
    if (near >= 0) ::close(near);
    if (far >= 0) ::close(far);
  }
  socket_pair(const socket_pair&) = delete;
  socket_pair& operator=(const socket_pair&) = delete;

  void send(std::string_view s) {
    while (!s.empty()) {
      const ssize_t r = ::send(far, s.data(), s.size(), MSG_NOSIGNAL);
      REQUIRE(r > 0);
      s.remove_prefix(static_cast<std::size_t>(r));
    }
  }
  /// The server goes away: what it sent is all there will be.
  void hang_up() {
    ::close(far);
    far = -1;
  }
  /// Everything sent on `near` until it was closed.
  std::string received() {
    std::string out;
    char buf[4096];
    for (ssize_t r; (r = ::recv(far, buf, sizeof buf, 0)) > 0;) {
      out.append(buf, static_cast<std::size_t>(r));
    }
    return out;
  }
};

/// A hiredis reply parsed from RESP text.
dr::reply_ptr parse_resp(std::string_view text) {
  redisReader* r = redisReaderCreate();
  void* out = nullptr;
  const bool fed = redisReaderFeed(r, text.data(), text.size()) == REDIS_OK;
  const bool got = fed && redisReaderGetReply(r, &out) == REDIS_OK;
  redisReaderFree(r);
  REQUIRE(got);
  REQUIRE(out != nullptr);
  return dr::reply_ptr(static_cast<redisReply*>(out));
}

// Appends the pieces (not `"literal" + std::string`: GCC 12 at -O3 warns -Wrestrict on it,
// a false positive, and kvtier's own programs build with -Werror).
template <class... P>
std::string cat(const P&... p) {
  std::string s;
  (s.append(std::string_view(p)), ...);
  return s;
}

std::string bulk(std::string_view v) {
  return cat("$", std::to_string(v.size()), "\r\n", v, "\r\n");
}

const kvtier::tier::context ctx{kvtier::layout::chunk_format{2, 2, 8, 2, 16, 2},
                                chunk_key{0x1111, 0x2222}};
constexpr chunk_key key{0xabcdef, 0x123456};
constexpr std::uint32_t tokens = 16;

std::vector<std::byte> payload(std::size_t n, unsigned seed) {
  std::vector<std::byte> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((i * 31 + seed) & 0xff);
  return p;
}

/// The value the tier writes for a chunk: its record header, then its bytes.
std::string record(const chunk_key& k, const chunk_key& salt, std::uint64_t fingerprint,
                   std::uint32_t t, const std::vector<std::byte>& bytes) {
  const auto h = kvtier::detail::make_record_header(
      k, salt, fingerprint, t, bytes.data(), bytes.size(), sizeof(kvtier::detail::record_header));
  std::string v(reinterpret_cast<const char*>(&h), sizeof h);
  v.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return v;
}
std::string good_record(const std::vector<std::byte>& bytes) {
  return record(key, ctx.salt, ctx.format.fingerprint(), tokens, bytes);
}

/// A GET of chunk `key` into a slot of `bytes`.
struct get_job {
  std::vector<std::byte> slot;
  kvtier::tier::read_job job;
  std::string err;
  explicit get_job(std::size_t bytes) : slot(bytes) {
    job.key = key;
    job.tokens = tokens;
    job.dst = slot.data();
    job.bytes = bytes;
  }
  outcome read(dr::wire& w, bool asking = false) {
    return dr::read_record(w, job, ctx, asking, err);
  }
};

/// What read_record makes of `reply` as the server's whole answer to a GET of 256 bytes.
struct answer {
  outcome o;
  read_status status;
  bool drained;
};
answer get(std::string_view reply, bool asking = false) {
  socket_pair sp;
  sp.send(reply);
  sp.hang_up();
  get_job g(256);
  dr::wire w{sp.near};
  const outcome o = g.read(w, asking);
  return {o, g.job.status, w.drained()};
}

}  // namespace

TEST_CASE("key slots are Redis Cluster's (CLUSTER KEYSLOT)") {
  CHECK(dr::key_slot("foo") == 12182);
  CHECK(dr::key_slot("bar") == 5061);
  CHECK(dr::key_slot("hello") == 866);
  CHECK(dr::key_slot("123456789") == 12739);
  CHECK(dr::key_slot("") == 0);
  for (const char* k : {"a", "kvtier:0123456789abcdef", "\xff\xfe\x01"}) {
    CHECK(dr::key_slot(k) < dr::slot_count);
  }
}

TEST_CASE("a hash tag picks the slot: what stands between the first { and the next }") {
  const auto user = dr::key_slot("user");
  CHECK(user == 5474);
  CHECK(dr::key_slot("{user}x") == user);
  CHECK(dr::key_slot("x{user}y") == user);
  CHECK(dr::key_slot("{user}{other}") == user);
  CHECK(dr::key_slot("{user1000}.following") == dr::key_slot("{user1000}.followers"));
  CHECK(dr::key_slot("{user1000}.following") == 3443);
  CHECK(dr::key_slot("foo{{bar}}zap") == 4015);  // the tag is "{bar": up to the first }
  // No tag, so the whole key: an empty {} (even before a good tag), or no closing brace.
  CHECK(dr::key_slot("{}user") == 12192);
  CHECK(dr::key_slot("x{}{user}") == 6704);
  CHECK(dr::key_slot("{user") == 9243);
  CHECK(dr::key_slot("user}") == 5858);
}

TEST_CASE("MOVED and ASK errors name a slot and a server; other errors are not redirections") {
  const auto moved = dr::parse_redirect("MOVED 3999 127.0.0.1:6381");
  REQUIRE(moved.has_value());
  CHECK(moved->moved);
  CHECK(moved->slot == 3999);
  CHECK(moved->address == "127.0.0.1:6381");
  const auto ask = dr::parse_redirect("ASK 16383 10.0.0.7:7000");
  REQUIRE(ask.has_value());
  CHECK_FALSE(ask->moved);
  CHECK(ask->slot == 16383);
  CHECK(ask->address == "10.0.0.7:7000");
  for (std::string_view not_one : {"ERR unknown command", "MOVED 3999", "MOVED", "ASK",
                                   "MOVEDX 1 h:1", "moved 1 h:1", "WRONGTYPE Operation", ""}) {
    CAPTURE(not_one);
    CHECK_FALSE(dr::parse_redirect(not_one).has_value());
  }
}

TEST_CASE("CLUSTER SLOTS replies become ranges; malformed entries are passed over") {
  const auto r = parse_resp(
      "*4\r\n"
      "*4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$4\r\nid-a\r\n"
      "*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$4\r\nid-b\r\n"  // a replica: not a master
      "*2\r\n:5461\r\n:10922\r\n"                         // no master
      "*3\r\n:10923\r\n:16383\r\n*2\r\n$0\r\n\r\n:7002\r\n"
      "*3\r\n:1\r\n:2\r\n:5\r\n");  // a master that is not an array
  REQUIRE(r->type == REDIS_REPLY_ARRAY);
  const auto ranges = dr::parse_slots(*r, "10.1.2.3");
  REQUIRE(ranges.size() == 2);
  CHECK(ranges[0].first == 0);
  CHECK(ranges[0].last == 5460);
  CHECK(ranges[0].address == "127.0.0.1:7000");
  CHECK(ranges[1].first == 10923);
  CHECK(ranges[1].last == 16383);
  CHECK(ranges[1].address == "10.1.2.3:7002");  // "": the server the reply came from
  CHECK(dr::parse_slots(*parse_resp("*0\r\n"), "h").empty());
}

TEST_CASE("the slot map learns servers once and moves slots on MOVED, not on ASK") {
  dr::topology t(true, dr::pool_limits{});
  CHECK(t.add("127.0.0.1:7000") == 0);
  CHECK(t.add("127.0.0.1:7001") == 1);
  CHECK(t.add("127.0.0.1:7000") == 0);
  CHECK(t.size() == 2);
  CHECK(t.at(1).host() == "127.0.0.1");
  CHECK(t.at(1).port() == 7001);
  CHECK_THROWS_AS(t.add("no-port"), kvtier::invalid_argument);
  CHECK_THROWS_AS(t.add("127.0.0.1:0"), kvtier::invalid_argument);
  CHECK_THROWS_AS(t.add("127.0.0.1:65536"), kvtier::invalid_argument);
  CHECK_THROWS_AS(t.add(":7000"), kvtier::invalid_argument);
  CHECK(t.size() == 2);

  const std::string moved = cat("MOVED ", std::to_string(dr::key_slot("foo")), " 127.0.0.1:7002");
  const auto to = t.follow(*dr::parse_redirect(moved));
  REQUIRE(to.has_value());
  CHECK(*to == 2);
  const std::string ask = cat("ASK ", std::to_string(dr::key_slot("bar")), " 127.0.0.1:7001");
  CHECK(t.follow(*dr::parse_redirect(ask)) == std::optional<std::uint16_t>(1));
  CHECK_FALSE(t.follow(*dr::parse_redirect("MOVED 1 nowhere")).has_value());
  {
    const auto lk = t.reading();
    CHECK(t.owner("foo") == 2);
    CHECK(t.owner("{foo}bar") == 2);
    CHECK(t.owner("bar") == 0);  // ASK moves one command, not the slot
    CHECK(t.at_locked(2).port() == 7002);
  }
  const auto masters = t.masters();
  REQUIRE(masters.size() == 2);
  CHECK(masters[0] == &t.at(0));
  CHECK(masters[1] == &t.at(2));
  CHECK(t.refreshes() == 0);

  dr::topology single(false, dr::pool_limits{});
  single.add("127.0.0.1:6379");
  single.add("127.0.0.1:6380");
  const auto lk = single.reading();
  CHECK(single.owner("foo") == 0);  // without a cluster every key goes to the first server
  CHECK(single.owner("bar") == 0);
}

TEST_CASE("a server key is the prefix then the chunk key in hex") {
  const std::string prefix = "kvtier:" + ctx.salt.hex() + ":";
  const dr::key_buf b = dr::key_text(prefix, key);
  CHECK(std::string(b.s, b.n) == prefix + key.hex());
  CHECK(b.n == prefix.size() + 32);
  const dr::key_buf bare = dr::key_text("", chunk_key{~0ull, 0});
  CHECK(std::string(bare.s, bare.n) == "0000000000000000ffffffffffffffff");
}

TEST_CASE("a GET of an intact record fills the slot and verifies") {
  const auto bytes = payload(256, 7);
  socket_pair sp;
  sp.send(bulk(good_record(bytes)) + "+OK\r\n" + bulk(good_record(bytes)) + "$-1\r\n");
  get_job a(256), b(256), c(256);
  dr::wire w{sp.near};
  CHECK(a.read(w) == outcome::ok);
  CHECK(a.job.status == read_status::ok);
  CHECK(a.slot == bytes);
  CHECK(b.read(w, true) == outcome::ok);  // after an ASKING's +OK
  CHECK(b.job.status == read_status::ok);
  CHECK(b.slot == bytes);
  CHECK(c.read(w) == outcome::ok);
  CHECK(c.job.status == read_status::missing);
  CHECK(w.drained());
}

TEST_CASE("a GET of a value that is not this chunk's record is corrupt, never data") {
  const auto bytes = payload(256, 9);
  std::string value;
  SUBCASE("another chunk's record") {
    value =
        record(chunk_key{0xabcdef, 0x123457}, ctx.salt, ctx.format.fingerprint(), tokens, bytes);
  }
  SUBCASE("another salt's record") {
    value = record(key, chunk_key{0x1111, 0x2223}, ctx.format.fingerprint(), tokens, bytes);
  }
  SUBCASE("another format's record") {
    value = record(key, ctx.salt, ctx.format.fingerprint() ^ 1, tokens, bytes);
  }
  SUBCASE("another token count") {
    value = record(key, ctx.salt, ctx.format.fingerprint(), tokens - 1, bytes);
  }
  SUBCASE("a flipped payload byte") {
    value = good_record(bytes);
    value[value.size() - 3] ^= 0x5a;
  }
  SUBCASE("a flipped header byte") {
    value = good_record(bytes);
    value[20] ^= 0x01;
  }
  SUBCASE("a bad magic") {
    value = good_record(bytes);
    value[0] = 'X';
  }
  SUBCASE("a shorter value") { value = "short"; }
  SUBCASE("a longer value") { value = good_record(bytes) + "tail"; }
  SUBCASE("an empty value") { value = ""; }
  const auto a = get(bulk(value));
  CHECK(a.o == outcome::ok);
  CHECK(a.status == read_status::corrupt);
  CHECK(a.drained);  // a wrong-size value is read past: the next reply is in step
}

TEST_CASE("a wrong-size value is skipped and the next reply still reads") {
  const auto bytes = payload(256, 3);
  socket_pair sp;
  sp.send(bulk(std::string(20000, 'x')) + bulk(good_record(bytes)));
  get_job big(256), next(256);
  dr::wire w{sp.near};
  CHECK(big.read(w) == outcome::ok);
  CHECK(big.job.status == read_status::corrupt);
  CHECK(next.read(w) == outcome::ok);
  CHECK(next.job.status == read_status::ok);
  CHECK(next.slot == bytes);
}

TEST_CASE("a GET reply that is cut short or not RESP breaks the connection") {
  const std::string full = bulk(good_record(payload(256, 5)));
  for (std::size_t cut :
       {std::size_t{1}, std::size_t{6}, std::size_t{50}, full.size() - 3, full.size() - 1}) {
    CAPTURE(cut);
    CHECK(get(full.substr(0, cut)).o == outcome::broken);
  }
  CHECK(get("").o == outcome::broken);  // the server went away
  CHECK(get(cat("$", std::to_string(1 << 30), "\r\n")).o == outcome::broken);  // oversize, cut
  CHECK(get(full.substr(0, full.size() - 2) + "xx").o == outcome::broken);     // no CRLF after
  CHECK(get("hello\r\n").o == outcome::broken);
  CHECK(get("$abc\r\n").o == outcome::broken);
  CHECK(get("$344\n").o == outcome::broken);  // LF without CR
  CHECK(get("\r\n").o == outcome::broken);
  CHECK(get(":1\r\n").o == outcome::broken);
  CHECK(get(full, true).o == outcome::broken);               // ASKING's +OK missing
  CHECK(get(std::string(20000, 'x')).o == outcome::broken);  // a line longer than the buffer
  dr::wire nowhere{-1};
  std::string_view l;
  CHECK_FALSE(nowhere.line(l));
}

TEST_CASE("an error reply to a GET keeps its text for a redirection") {
  socket_pair sp;
  sp.send("-MOVED 12182 127.0.0.1:7001\r\n");
  get_job g(256);
  dr::wire w{sp.near};
  CHECK(g.read(w) == outcome::error);
  CHECK(g.err == "MOVED 12182 127.0.0.1:7001");
  CHECK(g.job.status == read_status::io_error);  // untouched
}

namespace {

/// What the tier sends for `j` through hiredis on a socket pair.
std::string sent_set(const kvtier::tier::write_job& j, std::chrono::milliseconds ttl) {
  socket_pair sp;
  redisContext* c = redisConnectFd(sp.near);
  REQUIRE(c != nullptr);
  sp.near = -1;  // redisFree closes it
  const std::string prefix = "kvtier:" + ctx.salt.hex() + ":";
  dr::write_record(c, dr::key_text(prefix, j.key), j, ctx, ttl);
  const bool ok = c->err == 0;
  redisFree(c);
  REQUIRE(ok);
  return sp.received();
}

}  // namespace

TEST_CASE("a SET carries the record, and what it sends reads back as the chunk") {
  const auto bytes = payload(256, 11);
  kvtier::tier::write_job j;
  j.key = key;
  j.tokens = tokens;
  j.src = bytes.data();
  j.bytes = bytes.size();
  std::chrono::milliseconds ttl{0};
  SUBCASE("without a ttl") { ttl = 0ms; }
  SUBCASE("with a ttl") { ttl = 60000ms; }
  const auto r = parse_resp(sent_set(j, ttl));
  REQUIRE(r->type == REDIS_REPLY_ARRAY);
  REQUIRE(r->elements == (ttl.count() > 0 ? 5u : 3u));
  if (ttl.count() > 0) {
    CHECK(std::string(r->element[3]->str, r->element[3]->len) == "PX");
    CHECK(std::string(r->element[4]->str, r->element[4]->len) == "60000");
  }
  CHECK(std::string(r->element[0]->str, r->element[0]->len) == "SET");
  CHECK(std::string(r->element[1]->str, r->element[1]->len) ==
        "kvtier:" + ctx.salt.hex() + ":" + key.hex());
  const std::string value(r->element[2]->str, r->element[2]->len);
  CHECK(value == good_record(bytes));
  // Served back by a GET, the value is the chunk.
  const auto a = get(bulk(value));
  CHECK(a.o == outcome::ok);
  CHECK(a.status == read_status::ok);
}

TEST_CASE("one-key commands are appended as RESP arrays") {
  socket_pair sp;
  redisContext* c = redisConnectFd(sp.near);
  REQUIRE(c != nullptr);
  sp.near = -1;
  const dr::key_buf k = dr::key_text("p:", key);
  dr::keyed("EXISTS")(c, 0, k);
  dr::append_keyed(c, "DEL", "a{b}", 4);
  const bool flushed = dr::flush_out(c);
  redisFree(c);
  REQUIRE(flushed);
  CHECK(sp.received() ==
        "*2\r\n$6\r\nEXISTS\r\n$34\r\np:" + key.hex() + "\r\n*2\r\n$3\r\nDEL\r\n$4\r\na{b}\r\n");
}

TEST_CASE("replies read through hiredis: errors kept, ASKING's reply dropped") {
  socket_pair sp;
  redisContext* c = redisConnectFd(sp.near);
  REQUIRE(c != nullptr);
  sp.near = -1;
  sp.send("-ASK 1 127.0.0.1:7000\r\n+OK\r\n:1\r\n:0\r\n");
  std::vector<long long> got;
  auto take = [&](std::size_t, redisReply* r) { got.push_back(r->integer); };
  auto read = dr::by_hiredis(take);
  dr::wire unused{-1};
  std::string err;
  CHECK(read(c, unused, 0, false, err) == outcome::error);
  CHECK(err == "ASK 1 127.0.0.1:7000");
  CHECK(read(c, unused, 0, true, err) == outcome::ok);
  CHECK(read(c, unused, 1, false, err) == outcome::ok);
  CHECK(got == std::vector<long long>{1, 0});
  sp.hang_up();
  CHECK(read(c, unused, 2, false, err) == outcome::broken);
  redisFree(c);
}
