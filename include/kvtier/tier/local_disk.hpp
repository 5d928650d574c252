#pragma once
// The local disk tier: one file of fixed-size record slots in a directory, accessed with
// aligned O_DIRECT I/O in batches (io_uring, or a thread pool where io_uring is unavailable).

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/detail/io_engine.hpp"
#include "kvtier/detail/record.hpp"
#include "kvtier/error.hpp"
#include "kvtier/tier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/memory/slab.hpp"
#include "kvtier/tier/context.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <system_error>

namespace kvtier::tier {

/// When written records reach stable storage.
enum class durability {
  none,        ///< the device's own pace: a power loss may lose (never corrupt) recent records
  each_batch,  ///< fdatasync after each batch of writes, before its chunks become visible
};

/// Local disk tier. Records live in `<path>/kvtier-<salt>.kvt`, slot i at byte
/// i * slot_bytes: a 4 KiB header (key, salt, format fingerprint, tokens, checksums) then the
/// payload, padded to 4 KiB. Every read verifies the header and the payload checksum against
/// the key asked for; a mismatch is a miss and a counted error, never data.
///
/// I/O is O_DIRECT (the page cache would hold a second copy of what the host tier holds) in
/// segments of `segment_bytes`, `queue_depth` in flight per batch, through io_uring when the
/// build has liburing (KVTIER_USE_IO_URING) and the kernel allows it, else through a pool of
/// threads doing pread/pwrite. A filesystem without O_DIRECT (tmpfs) gets buffered I/O.
///
/// The file is locked (flock) against a second cache using it at the same time. When it already
/// exists, the index is rebuilt from the headers of the records in it: a slot whose header is not
/// intact for this salt and format, or repeats a key, is dropped and counted; payloads are
/// verified when read. So a later process with the same salt, whatever its engine layout,
/// finds what an earlier one stored.
struct local_disk {
  static constexpr const char* name = "local_disk";
  static constexpr bool is_memory = false;
  static constexpr bool indexed = true;

  struct config {
    std::filesystem::path path;                          ///< directory; created if missing
    std::size_t capacity_bytes = std::size_t{16} << 30;  ///< file size limit
    durability sync = durability::none;                  ///< when records reach stable storage
    bool direct_io = true;                 ///< O_DIRECT where the filesystem supports it
    bool use_io_uring = true;              ///< false: always the thread-pool backend
    unsigned queue_depth = 32;             ///< segments in flight per batch
    std::size_t segment_bytes = 1u << 20;  ///< I/O size of one segment (multiple of 4 KiB)
    unsigned lanes = 4;                    ///< batches in flight at once (callers, writer)
    std::uint32_t admit_after_hits = 0;    ///< take a chunk only once hit this often above
    unsigned writers = 2;     ///< threads writing records (each with a batch in flight)
    bool preallocate = true;  ///< reserve the file's blocks at open (fallocate): no block
                              ///< allocation on the write path, no ENOSPC inside a record
    /// Fault injection for tests: every transfer of the tier (recovery, reads, writes,
    /// invalidations) goes through this hook once done (see disk_fault_hook). nullptr: none.
    detail::io_fault_hook* faults = nullptr;
  };
  /// What config::faults points to: `void after(io_op& op) noexcept` may change a completed
  /// transfer's result, its bytes or the file, or delay it.
  using fault_hook = detail::io_fault_hook;
  using io_op = detail::io_op;

  /// Records per write_batch/read_batch call the tier handles in one submission.
  static constexpr std::size_t max_batch = 8;

  template <class Eviction>
  class impl {
   public:
    impl(const config& c, const context& ctx)
        : ctx_(ctx),
          cfg_(checked(c)),
          slot_bytes_(
              memory::slab::round_up(detail::record_header_bytes + ctx.format.chunk_bytes(), 4096)),
          index_(slots_for(c, slot_bytes_)),
          io_(c.lanes, c.queue_depth, c.segment_bytes, c.use_io_uring) {
      io_.set_faults(c.faults);
      std::error_code ec;
      std::filesystem::create_directories(c.path, ec);
      if (ec) {
        throw tier_error("kvtier: local_disk path '" + c.path.string() +
                         "' cannot be created: " + ec.message());
      }
      file_ = c.path / ("kvtier-" + ctx.salt.hex() + ".kvt");
      fd_ = ::open(file_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd_ < 0) {
        throw tier_error("kvtier: local_disk path '" + c.path.string() +
                         "' is not writable: " + std::strerror(errno));
      }
      if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        const int err = errno;
        ::close(fd_);
        throw tier_error("kvtier: local_disk file '" + file_.string() +
                         "' is in use by another cache: " + std::strerror(err));
      }
      // A second descriptor for O_DIRECT; the buffered one serves unaligned buffers and
      // filesystems without O_DIRECT.
      if (c.direct_io) direct_fd_ = ::open(file_.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
      try {
        recover();
        preallocate(c);
      } catch (...) {
        close_all();
        throw;
      }
    }
    ~impl() { close_all(); }
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;

    [[nodiscard]] detail::chunk_index<Eviction>& index() noexcept { return index_; }
    [[nodiscard]] const std::filesystem::path& file() const noexcept { return file_; }
    [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_bytes_; }
    [[nodiscard]] const config& settings() const noexcept { return cfg_; }
    /// True when I/O bypasses the page cache (O_DIRECT accepted by the filesystem).
    [[nodiscard]] bool direct() const noexcept { return direct_fd_ >= 0; }
    /// "io_uring" or "threads".
    [[nodiscard]] const char* io_backend() const noexcept { return io_.name(); }

    /// Records found intact at construction, and slots dropped then (bad or repeated header).
    [[nodiscard]] std::size_t recovered() const noexcept { return recovered_; }
    [[nodiscard]] std::size_t dropped_at_open() const noexcept { return dropped_; }

    /// Writes each job's record (header and payload in one submission); sets each job's `ok`.
    /// With durability::each_batch, `ok` means the record is on stable storage. No lock held.
    void write_batch(std::span<write_job> jobs) noexcept {
      for (std::size_t b = 0; b < jobs.size(); b += max_batch) {
        write_some(jobs.subspan(b, std::min(max_batch, jobs.size() - b)));
      }
    }

    /// Makes the records in `slots` unrecoverable, as cheaply as a header write: each slot's
    /// header page is zeroed (what recovery takes for a never-written slot), synced under
    /// durability::each_batch. The cache calls it for cleared chunks before reusing their slots,
    /// so a clear lasts across a restart. No lock held.
    void invalidate(std::span<const std::uint32_t> slots) noexcept {
      alignas(4096) const page zero{};
      std::array<detail::io_op, max_batch> ops;
      for (std::size_t b = 0; b < slots.size(); b += max_batch) {
        const std::size_t n = std::min(max_batch, slots.size() - b);
        for (std::size_t k = 0; k < n; ++k) {
          ops[k] = {fd_for(zero.data(), 4096), true, const_cast<std::byte*>(zero.data()), 4096,
                    base(slots[b + k])};
        }
        io_.run({ops.data(), n});
      }
      if (cfg_.sync == durability::each_batch) (void)::fdatasync(fd_);
    }

    /// Reads each job's record into its `dst` and proves it is the job key's: intact header for
    /// this key, salt, format and length, and a matching payload checksum. No lock held.
    void read_batch(std::span<read_job> jobs) noexcept {
      for (std::size_t b = 0; b < jobs.size(); b += max_batch) {
        read_some(jobs.subspan(b, std::min(max_batch, jobs.size() - b)));
      }
    }

   private:
    using page = std::array<std::byte, detail::record_header_bytes>;

    off_t base(std::uint32_t slot) const noexcept {
      return static_cast<off_t>(slot) * static_cast<off_t>(slot_bytes_);
    }
    // The descriptor for a transfer: O_DIRECT when buffer and length allow it.
    int fd_for(const void* buf, std::size_t len) const noexcept {
      const bool aligned = reinterpret_cast<std::uintptr_t>(buf) % 4096 == 0 && len % 4096 == 0;
      return aligned && direct_fd_ >= 0 ? direct_fd_ : fd_;
    }
    static std::size_t padded(std::size_t n) noexcept { return memory::slab::round_up(n, 4096); }
    // A transfer that moved every byte it was asked to.
    static bool whole(const detail::io_op& op) noexcept {
      return op.res == static_cast<long>(op.len);
    }

    void write_some(std::span<write_job> jobs) noexcept {
      alignas(4096) std::array<page, max_batch> pages{};
      std::array<detail::io_op, 2 * max_batch> ops;
      std::size_t n = 0;
      for (std::size_t i = 0; i < jobs.size(); ++i) {
        write_job& j = jobs[i];
        const detail::record_header h = detail::make_record_header(
            j.key, ctx_.salt, ctx_.format.fingerprint(), j.tokens, j.src, j.bytes);
        std::memcpy(pages[i].data(), &h, sizeof h);
        ops[n++] = {fd_for(pages[i].data(), 4096), true, pages[i].data(), 4096, base(j.slot)};
        // The payload goes out padded to 4 KiB from the first-tier slot (which has the room);
        // a slot's record never reaches the next slot. Header and payload are written together:
        // a torn record fails its payload checksum whichever part landed.
        const std::size_t len = padded(j.bytes);
        void* src = const_cast<std::byte*>(j.src);
        ops[n++] = {fd_for(src, len), true, src, len,
                    base(j.slot) + off_t(detail::record_header_bytes)};
      }
      io_.run({ops.data(), n});
      bool synced = true;
      if (cfg_.sync == durability::each_batch) synced = ::fdatasync(fd_) == 0;
      for (std::size_t i = 0; i < jobs.size(); ++i) {
        jobs[i].ok = synced && whole(ops[2 * i]) && whole(ops[2 * i + 1]);
        for (const long res : {ops[2 * i].res, ops[2 * i + 1].res}) {
          if (res == -ENOSPC || res == -EDQUOT) jobs[i].no_space = true;
        }
      }
    }

    void read_some(std::span<read_job> jobs) noexcept {
      alignas(4096) std::array<page, max_batch> pages;
      std::array<detail::io_op, 2 * max_batch> ops;
      std::size_t n = 0;
      for (std::size_t i = 0; i < jobs.size(); ++i) {
        read_job& j = jobs[i];
        ops[n++] = {fd_for(pages[i].data(), 4096), false, pages[i].data(), 4096, base(j.slot)};
        const std::size_t len = padded(j.bytes);
        ops[n++] = {fd_for(j.dst, len), false, j.dst, len,
                    base(j.slot) + off_t(detail::record_header_bytes)};
      }
      io_.run({ops.data(), n});
      for (std::size_t i = 0; i < jobs.size(); ++i) {
        read_job& j = jobs[i];
        const long hr = ops[2 * i].res, pr = ops[2 * i + 1].res;
        if (hr == -ENODATA || pr == -ENODATA) {
          j.status = read_status::corrupt;  // the file ends inside this record: torn
          continue;
        }
        if (!whole(ops[2 * i]) || !whole(ops[2 * i + 1])) {
          j.status = read_status::io_error;  // failed, or fewer bytes than asked (never used)
          continue;
        }
        detail::record_header h;
        std::memcpy(&h, pages[i].data(), sizeof h);
        const bool good = detail::header_matches(h, j.key, ctx_.salt, ctx_.format.fingerprint(),
                                                 j.tokens, j.bytes) &&
                          detail::payload_checksum(j.key, j.dst, j.bytes) == h.payload_checksum;
        j.status = good ? read_status::ok : read_status::corrupt;
      }
    }

    void recover() {
      struct stat st {};
      if (::fstat(fd_, &st) != 0) {
        throw tier_error("kvtier: local_disk file '" + file_.string() +
                         "' cannot be read: " + std::strerror(errno));
      }
      // The last record may end before its slot does: count a slot whose header is there.
      const std::size_t present =
          (static_cast<std::size_t>(st.st_size) + slot_bytes_ - 1) / slot_bytes_;
      const std::size_t slots = std::min(present, index_.capacity());
      const std::uint64_t fp = ctx_.format.fingerprint();
      // Headers are read a window at a time, all in flight together.
      constexpr std::size_t window = 64;
      struct aligned_free {
        void operator()(void* p) const noexcept { std::free(p); }
      };
      std::unique_ptr<page[], aligned_free> pages(
          static_cast<page*>(std::aligned_alloc(4096, window * sizeof(page))));
      if (!pages) throw std::bad_alloc();
      std::array<detail::io_op, window> ops;
      for (std::size_t w = 0; w < slots; w += window) {
        const std::size_t n = std::min(window, slots - w);
        for (std::size_t k = 0; k < n; ++k) {
          ops[k] = {fd_for(pages[k].data(), 4096), false, pages[k].data(), 4096,
                    base(static_cast<std::uint32_t>(w + k))};
        }
        io_.run({ops.data(), n});
        for (std::size_t k = 0; k < n; ++k) {
          if (!whole(ops[k])) {  // a short last slot or an unreadable one
            ++dropped_;
            continue;
          }
          detail::record_header h;
          std::memcpy(&h, pages[k].data(), sizeof h);
          if (h.version == 0 && h.header_checksum == 0) continue;  // never written or cleared
          const std::uint32_t s = static_cast<std::uint32_t>(w + k);
          // A whole header over a payload the file does not hold (a write cut short by a full
          // filesystem, without preallocation) is torn, not a hit.
          const bool intact = h.tokens > 0 && h.tokens <= ctx_.format.chunk_tokens &&
                              detail::header_matches(h, h.key, ctx_.salt, fp, h.tokens,
                                                     ctx_.format.bytes(h.tokens)) &&
                              static_cast<std::size_t>(base(s)) + detail::record_header_bytes +
                                      padded(ctx_.format.bytes(h.tokens)) <=
                                  static_cast<std::size_t>(st.st_size);
          if (!intact) {
            ++dropped_;
            continue;
          }
          if (index_.find(h.key) != nullptr) {
            // A second record of one key (stored again after a clear whose invalidation a crash
            // cut off): the same chunk, not an error. The first is kept, this one invalidated.
            alignas(4096) const page zero{};
            (void)::pwrite(fd_, zero.data(), zero.size(), base(s));
            continue;
          }
          index_.claim(s, h.key, h.tokens);
          ++recovered_;
        }
      }
      // A file from a larger capacity keeps only the slots this capacity can address.
      if (present > index_.capacity()) {
        if (::ftruncate(fd_, static_cast<off_t>(index_.capacity() * slot_bytes_)) != 0) {
          throw tier_error("kvtier: local_disk file '" + file_.string() +
                           "' cannot be truncated: " + std::strerror(errno));
        }
      }
    }

    void preallocate(const config& c) {
      if (!c.preallocate) return;
      const auto size = static_cast<off_t>(index_.capacity() * slot_bytes_);
      const int r = ::fallocate(fd_, FALLOC_FL_KEEP_SIZE, 0, size);
      if (r != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
        throw tier_error("kvtier: local_disk file '" + file_.string() + "' cannot reserve " +
                         std::to_string(size) + " bytes: " + std::strerror(errno));
      }
    }

    void close_all() noexcept {
      if (direct_fd_ >= 0) ::close(direct_fd_);
      if (fd_ >= 0) ::close(fd_);
      direct_fd_ = fd_ = -1;
    }

    static config checked(const config& c) {
      if (const auto nul = c.path.native().find('\0'); nul != std::string::npos) {
        std::string shown = c.path.native();
        shown.replace(nul, 1, "\\0");
        throw invalid_argument("kvtier: local_disk path '" + shown + "' has a NUL byte at offset " +
                               std::to_string(nul) + " (the system would truncate it there)");
      }
      if (c.queue_depth == 0 || c.queue_depth > 4096) {
        throw invalid_argument("kvtier: local_disk queue_depth " + std::to_string(c.queue_depth) +
                               " is out of range 1..4096");
      }
      if (c.segment_bytes == 0 || c.segment_bytes % 4096 != 0) {
        throw invalid_argument("kvtier: local_disk segment_bytes " +
                               std::to_string(c.segment_bytes) +
                               " is not a positive multiple of 4096");
      }
      if (c.lanes == 0 || c.lanes > 256) {
        throw invalid_argument("kvtier: local_disk lanes " + std::to_string(c.lanes) +
                               " is out of range 1..256");
      }
      return c;
    }
    static std::size_t slots_for(const config& c, std::size_t slot_bytes) {
      // Every record's offset must fit off_t.
      constexpr std::size_t max_file = std::size_t{1} << 62;
      if (c.capacity_bytes > max_file) {
        throw invalid_argument("kvtier: local_disk capacity_bytes " +
                               std::to_string(c.capacity_bytes) + " is above the limit of " +
                               std::to_string(max_file) + " (2^62)");
      }
      if (c.capacity_bytes < slot_bytes) {
        throw invalid_argument("kvtier: local_disk capacity_bytes " +
                               std::to_string(c.capacity_bytes) + " holds no record of " +
                               std::to_string(slot_bytes) + " bytes");
      }
      return c.capacity_bytes / slot_bytes;
    }

    context ctx_;
    config cfg_;
    std::size_t slot_bytes_;
    detail::chunk_index<Eviction> index_;
    detail::io_engine io_;
    std::filesystem::path file_;
    int fd_ = -1;
    int direct_fd_ = -1;
    std::size_t recovered_ = 0;
    std::size_t dropped_ = 0;
  };
};

static_assert(indexed_lower_tier<local_disk::impl<eviction::lru>>);

}  // namespace kvtier::tier
