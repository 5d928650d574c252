#pragma once
// The local disk tier: one file of fixed-size record slots in a directory.

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/detail/record.hpp"
#include "kvtier/error.hpp"
#include "kvtier/memory/slab.hpp"
#include "kvtier/tier/context.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <type_traits>

namespace kvtier::tier {

/// Outcome of reading a record back.
enum class read_status { ok, io_error, corrupt };

/// Local disk tier. Records live in `<path>/kvtier-<salt>.kvt`, slot i at byte
/// i * slot_bytes: a 4 KiB header (key, salt, format fingerprint, tokens, checksums) then the
/// payload. Every read verifies the header and the payload checksum against the key asked
/// for; a mismatch is a miss and a counted error, never data.
///
/// The file is locked (flock) against a second cache using it at the same time. When it already
/// exists, the index is rebuilt from the headers of the records in it: a slot whose header is not
/// intact for this salt and format, or repeats a key, is dropped and counted; payloads are
/// verified when read. So a later process with the same salt, whatever its engine layout,
/// finds what an earlier one stored.
struct local_disk {
  static constexpr const char* name = "local_disk";
  static constexpr bool is_memory = false;

  struct config {
    std::filesystem::path path;                          ///< directory; created if missing
    std::size_t capacity_bytes = std::size_t{16} << 30;  ///< file size limit
  };

  template <class Eviction>
  class impl {
   public:
    impl(const config& c, const context& ctx)
        : ctx_(ctx),
          slot_bytes_(
              memory::slab::round_up(detail::record_header_bytes + ctx.format.chunk_bytes(), 4096)),
          index_(slots_for(c, slot_bytes_)) {
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
      recover();
    }
    ~impl() {
      if (fd_ >= 0) ::close(fd_);
    }
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;

    [[nodiscard]] detail::chunk_index<Eviction>& index() noexcept { return index_; }
    [[nodiscard]] const std::filesystem::path& file() const noexcept { return file_; }
    [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_bytes_; }

    /// Writes the record of `key` into `slot`. No lock held; returns false on an I/O error.
    [[nodiscard]] bool write(std::uint32_t slot, const chunk_key& key, std::uint32_t tokens,
                             const std::byte* src, std::size_t bytes) noexcept {
      alignas(64) std::byte page[detail::record_header_bytes] = {};
      const off_t base = static_cast<off_t>(slot) * static_cast<off_t>(slot_bytes_);
      // Old header cleared first (with the still-zero page), new header last: a torn write never
      // leaves a valid header over bytes it does not describe (the payload checksum would catch
      // it anyway).
      if (!io_all(::pwrite, page, sizeof(detail::record_header), base) ||
          !io_all(::pwrite, src, bytes, base + off_t(detail::record_header_bytes))) {
        return false;
      }
      const detail::record_header h =
          detail::make_record_header(key, ctx_.salt, ctx_.format.fingerprint(), tokens, src, bytes);
      std::memcpy(page, &h, sizeof h);
      return io_all(::pwrite, page, sizeof page, base);
    }

    /// Records found intact at construction, and slots dropped then (bad or repeated header).
    [[nodiscard]] std::size_t recovered() const noexcept { return recovered_; }
    [[nodiscard]] std::size_t dropped_at_open() const noexcept { return dropped_; }

    /// Reads the record in `slot` into `dst` and proves it is `key`'s: intact header for this
    /// key, salt, format and length, and a matching payload checksum. No lock held.
    [[nodiscard]] read_status read(std::uint32_t slot, const chunk_key& key, std::uint32_t tokens,
                                   std::byte* dst, std::size_t bytes) noexcept {
      alignas(64) std::byte page[detail::record_header_bytes];
      const off_t base = static_cast<off_t>(slot) * static_cast<off_t>(slot_bytes_);
      if (!io_all(::pread, page, sizeof page, base)) return read_status::io_error;
      detail::record_header h;
      std::memcpy(&h, page, sizeof h);
      if (!detail::header_matches(h, key, ctx_.salt, ctx_.format.fingerprint(), tokens, bytes)) {
        return read_status::corrupt;
      }
      if (!io_all(::pread, dst, bytes, base + off_t(detail::record_header_bytes))) {
        return read_status::io_error;
      }
      return detail::payload_checksum(key, dst, bytes) == h.payload_checksum ? read_status::ok
                                                                             : read_status::corrupt;
    }

   private:
    void recover() {
      struct stat st {};
      if (::fstat(fd_, &st) != 0) {
        const int err = errno;
        ::close(fd_);
        throw tier_error("kvtier: local_disk file '" + file_.string() +
                         "' cannot be read: " + std::strerror(err));
      }
      // The last record may end before its slot does: count a slot whose header is there.
      const std::size_t present =
          (static_cast<std::size_t>(st.st_size) + slot_bytes_ - 1) / slot_bytes_;
      const std::size_t slots = std::min(present, index_.capacity());
      alignas(64) std::byte page[sizeof(detail::record_header)];
      const std::uint64_t fp = ctx_.format.fingerprint();
      for (std::size_t i = 0; i < slots; ++i) {
        const off_t base = static_cast<off_t>(i) * static_cast<off_t>(slot_bytes_);
        if (!io_all(::pread, page, sizeof page, base)) break;
        detail::record_header h;
        std::memcpy(&h, page, sizeof h);
        if (h.version == 0 && h.header_checksum == 0) continue;  // never written or cleared
        const std::uint32_t slot = static_cast<std::uint32_t>(i);
        const bool intact =
            h.tokens > 0 && h.tokens <= ctx_.format.chunk_tokens &&
            detail::header_matches(h, h.key, ctx_.salt, fp, h.tokens, ctx_.format.bytes(h.tokens));
        if (!intact || index_.find(h.key) != nullptr) {
          ++dropped_;
          continue;
        }
        index_.claim(slot, h.key, h.tokens);
        ++recovered_;
      }
      // A file from a larger capacity keeps only the slots this capacity can address.
      if (present > index_.capacity()) {
        if (::ftruncate(fd_, static_cast<off_t>(index_.capacity() * slot_bytes_)) != 0) {
          const int err = errno;
          ::close(fd_);
          throw tier_error("kvtier: local_disk file '" + file_.string() +
                           "' cannot be truncated: " + std::strerror(err));
        }
      }
    }

    static std::size_t slots_for(const config& c, std::size_t slot_bytes) {
      if (c.capacity_bytes < slot_bytes) {
        throw invalid_argument("kvtier: local_disk capacity_bytes " +
                               std::to_string(c.capacity_bytes) + " holds no record of " +
                               std::to_string(slot_bytes) + " bytes");
      }
      return c.capacity_bytes / slot_bytes;
    }
    // Loops over short transfers; false on error or end of file.
    template <class Fn, class Ptr>
    bool io_all(Fn fn, Ptr p, std::size_t n, off_t off) noexcept {
      auto* b = reinterpret_cast<
          std::conditional_t<std::is_const_v<std::remove_pointer_t<Ptr>>, const char*, char*>>(p);
      while (n > 0) {
        const ssize_t r = fn(fd_, b, n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        b += r;
        n -= static_cast<std::size_t>(r);
        off += r;
      }
      return true;
    }

    context ctx_;
    std::size_t slot_bytes_;
    detail::chunk_index<Eviction> index_;
    std::filesystem::path file_;
    int fd_ = -1;
    std::size_t recovered_ = 0;
    std::size_t dropped_ = 0;
  };
};

}  // namespace kvtier::tier
