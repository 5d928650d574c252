// An engine's paged-KV block manager with kvtier inside it: a pool of blocks per layer in the
// engine's memory, a free list, per-request block tables and reference counts for prefix blocks
// that live requests share. On admission a request
//   1. maps the blocks of the whole chunks a live request already holds (no copy, no compute),
//   2. takes blocks of its own for the rest of the prompt,
//   3. looks up what kvtier holds after the shared chunks and retrieves it into those blocks,
//   4. computes ("prefills") only what is left.
// When it ends, its full chunks are stored in kvtier, and then its blocks are freed.
//
// kvtier's host tier lives in memory the engine reserved (pinned memory registered with the GPU
// driver, a huge-page arena), handed over as a std::pmr::memory_resource.
#include "../common.hpp"

#include <algorithm>
#include <list>
#include <memory_resource>
#include <stdexcept>

namespace {

// The host tier only: a single process that keeps its reusable KV in host memory.
using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<example::layout>,
                              kvtier::opt::tiers<kvtier::tier::host>>;
constexpr kvtier::model_shape model{
    .layers = 4, .kv_heads = 4, .head_size = 64, .dtype_size = 2, .block_size = 16};
constexpr std::size_t chunk = cache_t::chunk_tokens;
constexpr std::size_t bs = model.block_size;

/// The memory the engine reserved for kvtier: one buffer, handed out by a monotonic resource.
/// kvtier asks once, at construction, for the whole slab (4 KiB aligned, hence the slack); the
/// null upstream makes a request the buffer cannot meet fail (a tier_error from the cache's
/// constructor) instead of quietly falling back to the heap.
struct engine_memory {
  std::vector<std::byte> buffer;
  std::pmr::monotonic_buffer_resource resource;
  explicit engine_memory(std::size_t bytes)
      : buffer(bytes + 4096),
        resource(buffer.data(), buffer.size(), std::pmr::null_memory_resource()) {}
  bool holds(const std::byte* p, std::size_t n) const {
    return p >= buffer.data() && p + n <= buffer.data() + buffer.size();
  }
};

class block_manager {
 public:
  struct request {
    const char* name;
    std::vector<kvtier::token_id> tokens;              // prompt, then generated tokens
    std::vector<std::int32_t> table;                   // token t is in block table[t / bs]
    std::size_t shared = 0, loaded = 0, computed = 0;  // prompt tokens by where their KV came from
  };

  block_manager(cache_t& cache, std::int64_t blocks)
      : cache_(cache), pool_(model, blocks), refs_(static_cast<std::size_t>(blocks), 0) {
    for (std::int32_t b = static_cast<std::int32_t>(blocks); b-- > 0;) free_.push_back(b);
  }

  request& admit(const char* name, std::vector<kvtier::token_id> prompt) {
    request& r = live_.emplace_back(request{name, std::move(prompt), {}});
    const std::size_t n = r.tokens.size();
    // 1. The live request sharing the most whole chunks of prefix: map its blocks. They are
    //    full, so this request never writes into them (its own tokens go to blocks it owns).
    const request* donor = nullptr;
    std::size_t shared_chunks = 0;
    for (const request& o : live_) {
      if (&o == &r) continue;
      const auto [end, _] =
          std::mismatch(o.tokens.begin(), o.tokens.end(), r.tokens.begin(), r.tokens.end());
      const auto c = static_cast<std::size_t>(end - o.tokens.begin()) / chunk;
      if (c > shared_chunks) donor = &o, shared_chunks = c;
    }
    for (std::size_t i = 0; i < shared_chunks * chunk / bs; ++i) {
      r.table.push_back(donor->table[i]);
      ++refs_[static_cast<std::size_t>(donor->table[i])];
    }
    r.shared = shared_chunks * chunk;
    // 2. Blocks of its own for the rest of the prompt. A block from the free list holds what its
    //    last user left; poisoning it here makes the checks prove where each byte came from.
    while (r.table.size() * bs < n) r.table.push_back(take());
    pool_.scribble(r.table, r.shared, n);
    // 3. kvtier's cached run from the first chunk not shared, loaded into this request's blocks.
    auto lease = cache_.lookup(r.tokens, shared_chunks);
    r.loaded = cache_.retrieve(lease, pool_.kv(), r.table);
    // 4. Prefill computes the rest.
    pool_.compute(r.tokens, r.table, r.shared + r.loaded, n);
    r.computed = n - r.shared - r.loaded;
    return r;
  }

  /// Generates `steps` tokens: each gets a slot, a new block when the last one is full.
  void decode(request& r, std::size_t steps, std::uint64_t seed) {
    for (const kvtier::token_id t : example::tokens(steps, seed)) {
      r.tokens.push_back(t);
      if (r.table.size() * bs < r.tokens.size()) r.table.push_back(take());
      pool_.compute(r.tokens, r.table, r.tokens.size() - 1, r.tokens.size());
    }
  }

  /// The request ends: its full chunks (prompt and output) go to kvtier, then its blocks are
  /// given back. Returns the tokens stored (or already held).
  std::size_t finish(request& r) {
    const std::size_t stored = cache_.store(r.tokens, pool_.kv(), r.table);
    for (const std::int32_t b : r.table) give(b);
    live_.remove_if([&](const request& x) { return &x == &r; });
    return stored;
  }

  example::paged_kv& pool() { return pool_; }
  std::size_t free_blocks() const { return free_.size(); }
  bool no_refs() const {
    return std::all_of(refs_.begin(), refs_.end(), [](unsigned c) { return c == 0; });
  }

 private:
  std::int32_t take() {
    if (free_.empty()) throw std::runtime_error("out of KV blocks");  // an engine preempts here
    const std::int32_t b = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(b)] = 1;
    return b;
  }
  void give(std::int32_t b) {
    if (--refs_[static_cast<std::size_t>(b)] == 0) free_.push_back(b);
  }

  cache_t& cache_;
  example::paged_kv pool_;
  std::vector<std::int32_t> free_;
  std::vector<unsigned> refs_;  // requests using each block
  std::list<request> live_;
};

}  // namespace

int main() {
  example::checks check("engine_allocator");
  engine_memory memory(std::size_t{4} << 20);  // 16 chunks of 256 KiB
  cache_t cache(model, kvtier::salt{.model_id = "example/engine-allocator@1", .kv_dtype = "bf16"},
                {kvtier::tier::host::config{.capacity_bytes = std::size_t{4} << 20,
                                            .memory = &memory.resource}});
  const auto& slab = cache.tier<0>().slab();
  check(memory.holds(slab.memory().data(), slab.memory().size()),
        "the host tier's slab (%zu slots, %zu bytes) lies inside the engine's buffer", slab.slots(),
        slab.memory().size());

  constexpr std::int64_t pool_blocks = 64;
  block_manager engine(cache, pool_blocks);
  std::size_t prompt_tokens = 0, shared = 0, loaded = 0, computed = 0;
  // Admits a request, checks where its KV came from and that every byte is what prefill gives.
  auto admit = [&](const char* name, std::vector<kvtier::token_id> prompt, std::size_t want_shared,
                   std::size_t want_loaded) -> block_manager::request& {
    auto& r = engine.admit(name, std::move(prompt));
    std::printf(
        "%s: %zu prompt tokens: %zu shared with a live request, %zu loaded from kvtier, "
        "%zu computed\n",
        name, r.tokens.size(), r.shared, r.loaded, r.computed);
    check(r.shared == want_shared && r.loaded == want_loaded,
          "%s: %zu shared and %zu loaded, as expected", name, want_shared, want_loaded);
    check(engine.pool().matches(r.tokens, r.table, 0, r.tokens.size()),
          "%s: all its blocks hold exactly what prefill computes", name);
    prompt_tokens += r.tokens.size();
    shared += r.shared;
    loaded += r.loaded;
    computed += r.computed;
    return r;
  };
  auto finish = [&](block_manager::request& r, std::size_t want) {
    const char* name = r.name;
    const std::size_t n = r.tokens.size();
    check(engine.pool().matches(r.tokens, r.table, 0, n), "%s: its KV is intact at the end", name);
    const std::size_t stored = engine.finish(r);
    check(stored == want, "%s ends after %zu tokens: stored %zu in kvtier, blocks freed", name, n,
          stored);
  };

  // A system prompt of 3 chunks that every request starts with, then each user's question.
  const auto system = example::tokens(3 * chunk, 1);
  auto& a = admit("A", example::concat(system, example::tokens(100, 2)), 0, 0);
  auto& b = admit("B", example::concat(system, example::tokens(80, 3)), 192, 0);
  engine.decode(a, 20, 4);
  engine.decode(b, 20, 5);
  const auto a_history = a.tokens, b_history = b.tokens;
  finish(a, 256);  // 312 tokens: 4 full chunks
  finish(b, 256);  // 292 tokens: 4 full chunks, 3 of them already in kvtier (A stored them)
  check(engine.free_blocks() == pool_blocks, "no request live: every block is free");

  // A's conversation goes on: its history is in kvtier (4 chunks), the new turn is computed.
  auto& c = admit("C", example::concat(a_history, example::tokens(60, 6)), 0, 256);
  // Another user's first turn while C runs: the system prompt is in C's blocks.
  auto& d = admit("D", example::concat(system, example::tokens(50, 7)), 192, 0);
  // B's conversation goes on: the system prompt from a live request, B's 4th chunk from kvtier.
  auto& e = admit("E", example::concat(b_history, example::tokens(40, 8)), 192, 64);
  finish(c, 320);
  finish(d, 192);
  finish(e, 320);

  std::printf("prefill computed %zu of %zu prompt tokens; %zu were shared, %zu loaded\n", computed,
              prompt_tokens, shared, loaded);
  check(computed == 292 + 80 + 116 + 50 + 76, "hits skipped prefill: only %zu tokens computed",
        computed);
  check(engine.free_blocks() == pool_blocks && engine.no_refs(),
        "all %lld blocks are back on the free list, no references left", (long long)pool_blocks);
  const auto s = cache.stats();
  example::print_tiers(s);
  check(s.retrieved_tokens == 320, "kvtier loaded %llu tokens into the engine's blocks",
        (unsigned long long)s.retrieved_tokens);
  return check.finish();
}
