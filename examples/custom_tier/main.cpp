// A lower tier written outside kvtier: an object store kept in a directory (a local stand-in for
// S3, a NFS mount or a blob service), one object per chunk, composed after kvtier's own tiers:
//
//   kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk, object_store>
//
// Node 1 stores a prompt; write-through puts it on its disk and in the object store. Node 2, with
// empty host memory and disk of its own, is served from the object store, byte-exact. Node 3
// finds one object damaged: retrieval stops at that chunk (a counted error, never wrong bytes),
// the damaged object is deleted, and the engine recomputes and stores it again.
//
//   kvtier_custom_tier [scratch-directory]
#include "../common.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <fstream>
#include <numeric>
#include <type_traits>

// ---- the tier -------------------------------------------------------------------------------

/// The tier tag: what the cache reads at compile time, the config, and the implementation.
struct object_store {
  static constexpr const char* name = "object_store";  // in stats().tiers[i].name
  static constexpr bool is_memory = false;  // a lower tier (the first tier must be memory)
  static constexpr bool indexed = false;    // no index in the cache: it asks probe() instead

  struct config {
    std::filesystem::path path;          ///< the store's directory
    std::uint32_t admit_after_hits = 0;  ///< read by the cache: take a chunk after N hits above
    unsigned writers = 2;                ///< read by the cache: its threads calling write_batch
    bool durable = false;  ///< fdatasync each object, and its directory, before it counts
  };

  /// One object per chunk: `<path>/<salt key hex>/<chunk key hex>`, the 88-byte record header
  /// then the payload. The salt directory keeps models, dtypes, TP ranks and tenants apart.
  /// The cache calls every member without its lock, from writer threads and engine threads at
  /// once. The only state shared between calls is an atomic counter: each call works on its own
  /// file descriptors, and an object appears all at once (rename), so no lock is needed.
  template <class Eviction>  // every tier is a template over the cache's eviction policy
  class impl {
    using record_header = kvtier::tier::record_header;
    using read_status = kvtier::tier::read_status;
    static constexpr std::size_t header_bytes = sizeof(record_header);

   public:
    impl(const config& c, const kvtier::tier::context& ctx)
        : ctx_(ctx), cfg_(c), dir_(c.path / ctx.salt.hex()) {
      std::error_code ec;
      std::filesystem::create_directories(dir_, ec);
      if (ec || ::access(dir_.c_str(), W_OK) != 0) {
        throw kvtier::tier_error("object_store: '" + dir_.string() + "' is not writable");
      }
    }

    /// The length of the leading run of `keys` that have an object (lookup asks for the chunks
    /// no tier above holds). Existence only: reads verify.
    std::size_t probe(std::span<const kvtier::chunk_key> keys) {
      std::size_t n = 0;
      while (n < keys.size() && ::access(object(keys[n]).c_str(), F_OK) == 0) ++n;
      return n;
    }

    /// Reads each job's object into job.dst (a first-tier slot) and sets job.status: ok only
    /// once header and payload checksum prove it is that chunk's bytes.
    void read_batch(std::span<kvtier::tier::read_job> jobs) {
      for (auto& j : jobs) j.status = read_one(j);
    }

    /// Writes each job's object from job.src (a first-tier slot) and sets job.ok.
    void write_batch(std::span<kvtier::tier::write_job> jobs) {
      for (auto& j : jobs) j.ok = write_one(j);
    }

    /// Deletes the objects of `keys` (clear(tokens), a read that failed verification, a write
    /// that raced a clear); returns how many existed.
    std::size_t remove(std::span<const kvtier::chunk_key> keys) {
      std::size_t n = 0;
      for (const auto& k : keys) n += ::unlink(object(k).c_str()) == 0;
      return n;
    }

    /// Deletes every object of this salt (clear()); returns how many there were.
    std::size_t remove_all() {
      std::size_t n = 0;
      std::error_code ec;
      for (std::filesystem::directory_iterator it(dir_, ec), end; !ec && it != end;
           it.increment(ec)) {
        const bool is_object = it->path().filename().string().size() == 32;  // not a ".tmp"
        if (is_object && ::unlink(it->path().c_str()) == 0) ++n;
      }
      return n;
    }

    /// Where chunk `k`'s object is (for tools and for this example's tampering).
    std::filesystem::path object(const kvtier::chunk_key& k) const { return dir_ / k.hex(); }

   private:
    read_status read_one(kvtier::tier::read_job& j) const {
      const int fd = ::open(object(j.key).c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return errno == ENOENT ? read_status::missing : read_status::io_error;
      record_header h;
      struct stat st {};
      read_status s = read_status::ok;
      if (::fstat(fd, &st) != 0) {
        s = read_status::io_error;
      } else if (static_cast<std::size_t>(st.st_size) != header_bytes + j.bytes) {
        s = read_status::corrupt;  // truncated, or another chunk's
      } else if (!transfer(::pread, fd, &h, header_bytes, 0) ||
                 !transfer(::pread, fd, j.dst, j.bytes, header_bytes)) {
        s = read_status::io_error;
      } else if (!kvtier::tier::header_matches(h, j.key, ctx_.salt, ctx_.format.fingerprint(),
                                               j.tokens, j.bytes, header_bytes) ||
                 kvtier::tier::payload_checksum(j.key, j.dst, j.bytes) != h.payload_checksum) {
        s = read_status::corrupt;  // the cache counts it, deletes it and never serves it
      }
      ::close(fd);
      return s;
    }

    bool write_one(const kvtier::tier::write_job& j) {
      const auto dst = object(j.key);
      // Equal keys mean equal bytes: an object already there (another node's) is this write.
      if (::access(dst.c_str(), F_OK) == 0) return true;
      // Written under a temporary name, then renamed: a reader sees no object or a whole one.
      // The name is unique per process and call; O_EXCL turns a clash into a failed write.
      const auto tmp = dir_ / ("." + j.key.hex() + "." + std::to_string(::getpid()) + "." +
                               std::to_string(seq_.fetch_add(1)) + ".tmp");
      const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd < 0) return false;
      const record_header h = kvtier::tier::make_record_header(
          j.key, ctx_.salt, ctx_.format.fingerprint(), j.tokens, j.src, j.bytes, header_bytes);
      bool ok = transfer(::pwrite, fd, &h, header_bytes, 0) &&
                transfer(::pwrite, fd, j.src, j.bytes, header_bytes) &&
                (!cfg_.durable || ::fdatasync(fd) == 0);
      ok = ::close(fd) == 0 && ok;
      ok = ok && ::rename(tmp.c_str(), dst.c_str()) == 0 && (!cfg_.durable || sync_dir());
      if (!ok) ::unlink(tmp.c_str());  // a crash before this leaves a ".tmp" file, never seen
      return ok;
    }

    // pread/pwrite of all `n` bytes, resumed after short transfers and EINTR.
    template <class Call, class Buf>
    static bool transfer(Call call, int fd, Buf* p, std::size_t n, std::size_t off) {
      auto* b = reinterpret_cast<std::conditional_t<std::is_const_v<Buf>, const char, char>*>(p);
      while (n > 0) {
        const ssize_t r = call(fd, b, n, static_cast<off_t>(off));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        b += r, off += static_cast<std::size_t>(r), n -= static_cast<std::size_t>(r);
      }
      return true;
    }

    bool sync_dir() const {  // makes the rename itself survive a power loss
      const int fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      const bool ok = fd >= 0 && ::fsync(fd) == 0;
      if (fd >= 0) ::close(fd);
      return ok;
    }

    kvtier::tier::context ctx_;
    config cfg_;
    std::filesystem::path dir_;
    std::atomic<std::uint64_t> seq_{0};
  };
};
// The cache checks this too where it is instantiated; here a missing member fails at its tier.
static_assert(kvtier::tier::remote_lower_tier<object_store::impl<kvtier::eviction::lru>>);

// ---- the engine -----------------------------------------------------------------------------

namespace {

using cache_t =
    kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::layout<example::layout>,
                  kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk, object_store>>;

// A small model so the example runs in a moment: 4 KiB of KV per token, 256 KiB per chunk.
constexpr kvtier::model_shape model{
    .layers = 4, .kv_heads = 4, .head_size = 64, .dtype_size = 2, .block_size = 16};

// One engine node's tiers: host memory and a disk of its own, and the object store all share.
cache_t::tier_configs node_tiers(const example::scratch_dir& dir, const char* disk,
                                 const std::filesystem::path& objects) {
  return {kvtier::tier::host::config{.capacity_bytes = 4 << 20},  // 16 chunks
          kvtier::tier::local_disk::config{.path = dir.fresh(disk), .capacity_bytes = 8 << 20},
          object_store::config{.path = objects, .writers = 2}};
}

std::size_t objects_in(const std::filesystem::path& d) {
  std::size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(d))
    n += e.path().filename().string().size() == 32;  // objects, not ".tmp" files
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  example::scratch_dir dir(argc > 1 ? argv[1] : nullptr, "kvtier-custom-tier");
  const auto objects = dir.fresh("objects");
  const kvtier::salt salt{.model_id = "example/custom-tier@1", .kv_dtype = "bf16"};
  example::checks check("custom_tier");
  example::paged_kv engine(model, 64);
  const auto prompt = example::tokens(8 * 64 + 40, 7);  // 8 full chunks and a 40-token tail
  const std::size_t full = 8 * 64;
  std::vector<std::int32_t> table(35);  // the request's blocks, scattered over the pool
  std::iota(table.rbegin(), table.rend(), 20);

  std::printf("node 1: prefill %zu tokens, store, flush\n", prompt.size());
  {
    cache_t node1(model, salt, node_tiers(dir, "node1-disk", objects));
    engine.compute(prompt, table, 0, prompt.size());
    const std::size_t stored = node1.store(prompt, engine.kv(), table);
    node1.flush();  // write-through to disk and object store is done
    const auto s = node1.stats();
    example::print_tiers(s);
    check(stored == full, "stored %zu tokens (the 40-token tail is not a full chunk)", stored);
    check(s.tiers[2].writes == 8 && objects_in(objects / node1.salt_key().hex()) == 8,
          "the object store wrote %llu objects", (unsigned long long)s.tiers[2].writes);
  }

  std::printf("node 2: empty host memory and disk, the same object store\n");
  {
    cache_t node2(model, salt, node_tiers(dir, "node2-disk", objects));
    engine.scribble();  // the engine's blocks hold other requests' KV now
    auto lease = node2.lookup(prompt);
    check(lease.tokens() == full && lease.hits_in(2) == 8,
          "lookup found %zu tokens, %zu chunks in the object store", lease.tokens(),
          lease.hits_in(2));
    const std::size_t loaded = node2.retrieve(lease, engine.kv(), table);
    check(loaded == full && engine.matches(prompt, table, 0, full),
          "retrieve loaded %zu tokens, byte-exact against what node 1 stored", loaded);
    const auto s = node2.stats();
    example::print_tiers(s);
    check(s.tiers[2].hits == 8 && s.tiers[2].promotions == 8 && s.tiers[2].errors == 0,
          "stats: 8 hits and 8 promotions from tier 2 (object_store), no errors");
  }

  std::printf("node 3: chunk 5's object is damaged on the storage\n");
  {
    cache_t node3(model, salt, node_tiers(dir, "node3-disk", objects));
    std::vector<kvtier::chunk_key> keys(8);
    node3.keys(prompt, keys);
    const auto victim = node3.tier<2>().object(keys[5]);
    {
      std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(4096);  // one byte inside the payload
      const char c = static_cast<char>(f.get() ^ 0x01);
      f.seekp(4096);
      f.put(c);
    }
    engine.scribble();
    auto lease = node3.lookup(prompt);  // still 8 chunks: lookup only asks whether objects exist
    const std::size_t found = lease.tokens();
    const std::size_t loaded = node3.retrieve(lease, engine.kv(), table);
    const auto s = node3.stats();
    example::print_tiers(s);
    check(found == full && loaded == 5 * 64 && engine.matches(prompt, table, 0, loaded),
          "lookup found %zu tokens; retrieve stopped at chunk 5: %zu tokens, byte-exact", found,
          loaded);
    check(engine.scribbled(table, loaded, full), "no byte of chunks 5..7 reached the engine");
    check(s.tiers[2].errors == 1, "the damaged object counts as an error in tier 2");
    check(!std::filesystem::exists(victim), "the cache deleted the damaged object");
    check(node3.lookup(prompt).tokens() == loaded, "a new lookup now ends at chunk 5");

    // The engine computes what was not loaded and stores the prompt: chunk 5 is written again.
    engine.compute(prompt, table, loaded, prompt.size());
    node3.store(prompt, engine.kv(), table);
    node3.flush();
    check(std::filesystem::exists(victim), "after the engine recomputed it, chunk 5 is stored");
  }
  return check.finish();
}
