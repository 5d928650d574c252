// The Redis tier on a three-master Redis Cluster started by a ctest fixture: keys spread over
// the masters by hash slot, and ASK and MOVED redirections during a slot migration are followed
// without serving a wrong byte.
#include "support.hpp"

namespace {

using test::raw;
using test::slot;

std::vector<int> cluster_ports() {
  auto ports = test::read_ports("cluster.ports");
  REQUIRE(ports.size() == 3);
  return ports;
}

remote::config cluster_config(const std::vector<int>& ports, std::string prefix) {
  remote::config rc;
  rc.cluster = true;
  rc.nodes = {"127.0.0.1:" + std::to_string(ports[0])};  // one seed: the rest is discovered
  rc.key_prefix = std::move(prefix);
  rc.timeout = 1000ms;
  return rc;
}

// The port of the master that owns `slot`, from CLUSTER SLOTS.
int owner_of(int any_port, unsigned s) {
  raw r(any_port);
  auto rep = r.cmd("CLUSTER SLOTS");
  REQUIRE(rep->type == REDIS_REPLY_ARRAY);
  for (std::size_t i = 0; i < rep->elements; ++i) {
    const redisReply* e = rep->element[i];
    if (s >= static_cast<unsigned>(e->element[0]->integer) &&
        s <= static_cast<unsigned>(e->element[1]->integer)) {
      return static_cast<int>(e->element[2]->element[1]->integer);
    }
  }
  FAIL("slot without owner");
  return 0;
}

}  // namespace

TEST_CASE("key slots follow Redis Cluster's CRC16 and hash tags") {
  using kvtier::tier::detail_redis::key_slot;
  CHECK(key_slot("123456789") == (0x31C3 & 16383));  // the CRC16-XMODEM check value
  CHECK(key_slot("{user1000}.following") == key_slot("{user1000}.followers"));
  CHECK(key_slot("foo{}{bar}") == key_slot("foo{}{bar}"));
  CHECK(key_slot("{}x") != key_slot("x"));  // an empty tag hashes the whole key
  // The same answer as a server gives.
  raw r(cluster_ports()[0]);
  for (const char* k : {"kvtier:abc", "a", "{tag}rest", "0123456789abcdef0123456789abcdef"}) {
    CHECK(key_slot(k) == r.integer("CLUSTER KEYSLOT %s", k));
  }
}

TEST_CASE("a cluster tier spreads chunks over the masters and loads them back exact") {
  const auto ports = cluster_ports();
  const auto rc = cluster_config(ports, "spread");
  test::engine<nhd> eng(test::small_model, 512, 1);
  const auto bt = test::shuffled_table(256, 512, 3);
  const auto p = test::tokens(1024, 21);  // 64 chunks
  {
    C writer(test::small_model, test::small_salt, {{128 * slot}, rc});
    REQUIRE(writer.store(p, eng.kv(), bt) == 1024);
    writer.flush();
    CHECK(writer.stats().tiers[1].writes == 64);
    CHECK(writer.tier<1>().stats().refreshes >= 1);
  }
  int masters_used = 0;
  for (int port : ports) {
    raw r(port);
    auto keys = r.cmd("KEYS spread:*");
    masters_used += keys->elements > 0;
  }
  CHECK(masters_used == 3);
  C reader(test::small_model, test::small_salt, {{128 * slot}, rc});
  auto l = reader.lookup(p);
  CHECK(l.hits_in(1) == 64);
  test::engine<nhd> dst(test::small_model, 512, 2);
  const auto bt2 = test::shuffled_table(256, 512, 4);
  CHECK(reader.retrieve(l, dst.kv(), bt2) == 1024);
  CHECK(test::same_tokens(eng, bt, dst, bt2, 0, 1024));
  CHECK(reader.tier<1>().stats().moved == 0);
}

TEST_CASE("ASK and MOVED during a slot migration are followed, and bytes stay exact") {
  const auto ports = cluster_ports();
  const auto rc = cluster_config(ports, "migrate");
  test::engine<nhd> eng(test::small_model, 64, 1);
  const auto bt = test::shuffled_table(16, 64, 3);
  const auto p = test::tokens(16, 31);  // one chunk
  C writer(test::small_model, test::small_salt, {{16 * slot}, rc});
  REQUIRE(writer.store(p, eng.kv(), bt) == 16);
  writer.flush();
  REQUIRE(writer.stats().tiers[1].writes == 1);
  std::array<kvtier::chunk_key, 1> k;
  writer.keys(p, k);
  const std::string key = writer.tier<1>().key_of(k[0]);
  const auto s = kvtier::tier::detail_redis::key_slot(key);
  // Two readers that learn the slot map now, before the migration.
  C ask_reader(test::small_model, test::small_salt, {{16 * slot}, rc});
  C moved_reader(test::small_model, test::small_salt, {{16 * slot}, rc});

  const int from = owner_of(ports[0], s);
  const int to = ports[0] == from ? ports[1] : ports[0];
  raw src(from), dst_node(to);
  const std::string src_id = src.str("CLUSTER MYID"), dst_id = dst_node.str("CLUSTER MYID");
  REQUIRE(dst_node.str("CLUSTER SETSLOT %u IMPORTING %s", s, src_id.c_str()) == "OK");
  REQUIRE(src.str("CLUSTER SETSLOT %u MIGRATING %s", s, dst_id.c_str()) == "OK");
  REQUIRE(src.str("MIGRATE 127.0.0.1 %d %s 0 5000", to, key.c_str()) == "OK");

  // The key now lives on `to` while `from` still owns the slot: `from` answers ASK.
  test::engine<nhd> out(test::small_model, 64, 2);
  const auto bt2 = test::shuffled_table(16, 64, 4);
  auto l = ask_reader.lookup(p);
  REQUIRE(l.hits_in(1) == 1);
  CHECK(ask_reader.retrieve(l, out.kv(), bt2) == 16);
  CHECK(test::same_tokens(eng, bt, out, bt2, 0, 16));
  CHECK(ask_reader.tier<1>().stats().ask >= 1);

  // The migration ends: every master learns the new owner, and `from` answers MOVED.
  for (int port : ports) {
    raw r(port);
    REQUIRE(r.str("CLUSTER SETSLOT %u NODE %s", s, dst_id.c_str()) == "OK");
  }
  out.wipe();
  auto m = moved_reader.lookup(p);
  REQUIRE(m.hits_in(1) == 1);
  CHECK(moved_reader.retrieve(m, out.kv(), bt2) == 16);
  CHECK(test::same_tokens(eng, bt, out, bt2, 0, 16));
  const auto st = moved_reader.tier<1>().stats();
  CHECK(st.moved >= 1);
  CHECK(st.refreshes >= 2);  // the map was reloaded after MOVED
  // Writes go to the new owner directly now.
  const auto q = test::tokens(16, 32);
  REQUIRE(moved_reader.store(q, eng.kv(), bt) == 16);
  moved_reader.flush();
  CHECK(moved_reader.stats().tiers[1].errors == 0);
}
