// shared_node: one node, three processes, one tier::shared_host segment and no server, as an
// engine like vLLM is laid out: worker A prefills a document and stores its KV; the scheduler,
// which holds no KV, learns how much of a new request (the same document, another question) is
// cached and leases it; worker B adopts the lease, loads that prefix into its own blocks,
// computes only the question, and checks every byte. Then worker A is SIGKILLed in the middle of
// storing, and the segment is shown to have lost nothing and leaked nothing.
//
//   kvtier_shared_node [segment name]
#include "../common.hpp"

#include <kvtier/kvtier.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>

namespace {

constexpr kvtier::model_shape model{4, 2, 64, 2, 16};  // layers, KV heads, head size, bf16, block
const kvtier::salt salt{"example-model@rev", "bf16", 0, 1, ""};
using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<example::layout>,
                              kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::shared_host>>;

kvtier::tier::shared_host::config shared_config(const std::string& name) {
  kvtier::tier::shared_host::config c;
  c.name = name;                // engines usually leave it empty: "/kvtier-<salt key>"
  c.capacity_bytes = 64 << 20;  // the node's segment (the first process creates it)
  c.processes = 8;
  c.reap_interval = std::chrono::milliseconds(100);
  return c;
}
cache_t::tier_configs tiers(const std::string& name) {
  return {kvtier::tier::host::config{.capacity_bytes = 16 << 20}, shared_config(name)};
}

const auto document = example::tokens(1024, 7);  // 16 chunks
const auto question_b = example::tokens(100, 8);
std::vector<std::int32_t> table_for(std::size_t tokens, std::int32_t first) {
  std::vector<std::int32_t> t((tokens + model.block_size - 1) / model.block_size);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = first + static_cast<std::int32_t>(i);
  return t;
}

// Worker A: prefill the document, store it, flush (its writers copy it into the segment).
int worker_a(const std::string& name, bool forever) {
  cache_t cache(model, salt, tiers(name));
  example::paged_kv kv(model, 256);
  const auto table = table_for(document.size(), 3);
  kv.compute(document, table, 0, document.size());
  const std::size_t stored = cache.store(document, kv.kv(), table);
  cache.flush();
  std::printf("  worker A (pid %d): stored %zu tokens; segment %s\n", ::getpid(), stored,
              cache.tier<1>().created() ? "created" : "attached");
  std::fflush(stdout);
  for (std::uint64_t i = 0; forever; ++i) {  // keeps storing other documents until killed
    const auto other = example::tokens(512, 100 + i % 32);  // 32 documents: they all fit
    const auto t = table_for(other.size(), 100);
    kv.compute(other, t, 0, other.size());
    (void)cache.store(other, kv.kv(), t);
  }
  return stored == document.size() ? 0 : 1;
}

// The scheduler: no KV. Answers the cached prefix and leases it for worker B.
int scheduler(const std::string& name, int to_b) {
  kvtier::shared_lookup<cache_t> view(model, salt, shared_config(name));
  const auto request = example::concat(document, question_b);
  const std::size_t cached = view.cached_tokens(request);
  const auto ticket = view.lease(request);
  std::printf("  scheduler (pid %d): %zu of %zu tokens cached; ticket %llu holds %u chunks\n",
              ::getpid(), cached, request.size(), static_cast<unsigned long long>(ticket.value),
              ticket.chunks);
  std::fflush(stdout);
  const std::uint64_t msg[2] = {ticket.value, ticket.chunks};
  if (::write(to_b, msg, sizeof msg) != sizeof msg) return 1;
  pause();  // stays until the parent ends it: worker B has adopted the lease by then
  return 0;
}

// Worker B: adopt the lease, load the cached prefix, compute the rest, check every token.
int worker_b(const std::string& name, int from_scheduler) {
  std::uint64_t msg[2];
  if (::read(from_scheduler, msg, sizeof msg) != sizeof msg) return 1;
  cache_t cache(model, salt, tiers(name));
  auto held = cache.tier<1>().adopt({msg[0], static_cast<std::uint32_t>(msg[1])});
  example::paged_kv kv(model, 256);
  kv.scribble();
  const auto request = example::concat(document, question_b);
  const auto table = table_for(request.size(), 40);
  auto hit = cache.lookup(request);
  const std::size_t loaded = cache.retrieve(hit, kv.kv(), table);
  held.reset();                                        // loaded: the segment may evict them again
  kv.compute(request, table, loaded, request.size());  // only the question is computed
  const bool same = kv.matches(request, table, 0, request.size());
  std::printf(
      "  worker B (pid %d): adopted %u chunks, loaded %zu tokens from the segment, "
      "computed %zu; every byte as a full prefill: %s\n",
      ::getpid(), static_cast<unsigned>(msg[1]), loaded, request.size() - loaded,
      same ? "yes" : "NO");
  return same && loaded == document.size() ? 0 : 1;
}

template <class F>
pid_t spawn(F&& f) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 1;
    try {
      rc = f();
    } catch (const std::exception& e) {
      std::printf("  child %d: %s\n", ::getpid(), e.what());
    }
    std::fflush(stdout);
    ::_exit(rc);
  }
  return pid;
}
int wait_exit(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string name =
      argc > 1 ? argv[1] : "/kvtier-example-shared-node-" + std::to_string(::getpid());
  kvtier::tier::shared_host::handle::unlink(name);
  example::checks check("shared_node");
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("shared_node: segment %s\n", name.c_str());

  check(wait_exit(spawn([&] { return worker_a(name, false); })) == 0,
        "worker A stored the document and exited");
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) return 1;
  const pid_t sched = spawn([&] { return scheduler(name, pipe_fds[1]); });
  const pid_t b = spawn([&] { return worker_b(name, pipe_fds[0]); });
  check(wait_exit(b) == 0, "worker B loaded the cached prefix from another process, bytes exact");
  ::kill(sched, SIGTERM);
  (void)wait_exit(sched);

  // A crash: worker A again, storing in a loop, SIGKILLed mid-operation.
  const pid_t a = spawn([&] { return worker_a(name, true); });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ::kill(a, SIGKILL);
  check(wait_exit(a) == -SIGKILL, "worker A SIGKILLed while storing");

  kvtier::shared_lookup<cache_t> view(model, salt, shared_config(name));
  (void)view.handle().reap_now();
  const auto k = view.handle().census();
  const auto s = view.handle().stats();
  std::printf(
      "  after the kill: %u ready, %u free, %u writing, %llu references; %llu dead "
      "processes reclaimed (%llu references, %llu half-written slots)\n",
      k.ready, k.free, k.writing, static_cast<unsigned long long>(k.refs),
      static_cast<unsigned long long>(s.reclaimed_procs),
      static_cast<unsigned long long>(s.reclaimed_refs),
      static_cast<unsigned long long>(s.reclaimed_writes));
  check(k.writing == 0 && k.refs == 0 && k.free + k.ready == s.slots,
        "every slot is free or holds a whole chunk: nothing leaked, nothing half-written");
  check(s.processes == 1, "only this process is still attached");
  check(view.cached_tokens(document) == document.size(), "the document is still cached");
  kvtier::tier::shared_host::handle::unlink(name);
  return check.finish();
}
