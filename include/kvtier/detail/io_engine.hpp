#pragma once
// Batched positional file I/O for the disk tier: io_uring where liburing is available and the
// kernel allows it (KVTIER_USE_IO_URING, set by the CMake target when liburing is found), and a
// pool of threads doing pread/pwrite otherwise. Each call runs a batch of operations with up to
// `depth` segments in flight and returns when all completed. Nothing allocates after
// construction.

#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#if defined(KVTIER_USE_IO_URING) && __has_include(<liburing.h>)
#include <liburing.h>
#define KVTIER_HAS_IO_URING 1
#else
#define KVTIER_HAS_IO_URING 0
#endif

namespace kvtier::detail {

/// One read or write of `len` bytes at file offset `off`. `res` is set to `len` on success and
/// to -errno on failure (-ENODATA for an end of file before `len` bytes).
struct io_op {
  int fd = -1;
  bool write = false;
  void* buf = nullptr;
  std::size_t len = 0;
  off_t off = 0;
  long res = 0;
};

/// A hook into every transfer of an io_engine, for fault injection (tier::local_disk's
/// config::faults; tests): after each operation has completed, after(op) may change what it
/// did — its result (an error such as -EIO or -ENOSPC, a short count), the bytes a read brought
/// in, what the file now holds (a torn record) — or take time (a slow or hung device). Called
/// from the thread that ran the batch, concurrently for concurrent batches.
struct io_fault_hook {
  virtual ~io_fault_hook() = default;
  virtual void after(io_op& op) noexcept = 0;
};

class io_engine {
 public:
  enum class backend { io_uring, threads };

  /// `lanes` callers may run batches at the same time; each keeps `depth` segments of at most
  /// `segment` bytes in flight. `prefer_uring` false, or an io_uring the kernel refuses, selects
  /// the thread pool: min(32, lanes * depth) threads sharing one bounded queue of segments.
  io_engine(unsigned lanes, unsigned depth, std::size_t segment, bool prefer_uring)
      : depth_(std::max(1u, depth)), segment_(std::max<std::size_t>(4096, segment)) {
    lanes = std::max(1u, lanes);
#if KVTIER_HAS_IO_URING
    if (prefer_uring) {
      rings_ = std::make_unique<ring[]>(lanes);
      unsigned made = 0;
      for (; made < lanes; ++made) {
        if (io_uring_queue_init(depth_, &rings_[made].r, 0) != 0) break;
        rings_[made].inflight = std::make_unique<segment_state[]>(depth_);
        rings_[made].ok = true;
      }
      if (made == lanes) {
        backend_ = backend::io_uring;
        free_rings_.reserve(lanes);
        free_tags_ = std::make_unique<std::vector<std::uint32_t>[]>(lanes);
        for (unsigned i = 0; i < lanes; ++i) {
          free_rings_.push_back(i);
          free_tags_[i].reserve(depth_);
        }
        lanes_ = lanes;
        return;
      }
      close_rings(lanes);  // io_uring refused (seccomp, sysctl): fall back to threads
    }
#else
    (void)prefer_uring;
#endif
    backend_ = backend::threads;
    queue_.resize(std::size_t{lanes} * depth_);
    const unsigned n = std::min(32u, lanes * depth_);
    workers_.reserve(n);
    for (unsigned i = 0; i < n; ++i) workers_.emplace_back([this] { worker(); });
  }

  ~io_engine() {
    if (backend_ == backend::threads) {
      {
        std::lock_guard lk(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      for (auto& t : workers_) t.join();
    }
#if KVTIER_HAS_IO_URING
    close_rings(lanes_);
#endif
  }
  io_engine(const io_engine&) = delete;
  io_engine& operator=(const io_engine&) = delete;

  [[nodiscard]] backend which() const noexcept { return backend_; }
  [[nodiscard]] const char* name() const noexcept {
    return backend_ == backend::io_uring ? "io_uring" : "threads";
  }

  /// Runs every op; true when all succeeded. Thread-safe.
  bool run(std::span<io_op> ops) noexcept {
    for (auto& op : ops) op.res = 0;
#if KVTIER_HAS_IO_URING
    const bool ok = backend_ == backend::io_uring ? run_uring(ops) : run_threads(ops);
#else
    const bool ok = run_threads(ops);
#endif
    if (faults_ == nullptr) return ok;
    bool all = true;
    for (auto& op : ops) {
      faults_->after(op);
      all = all && op.res == static_cast<long>(op.len);
    }
    return all;
  }
  /// Every later transfer goes through `f` (nullptr: none). Set before any transfer runs.
  void set_faults(io_fault_hook* f) noexcept { faults_ = f; }

 private:
  struct segment_state {
    io_op* op = nullptr;
    std::size_t done = 0;  // bytes of this segment already transferred
    std::size_t off = 0;   // segment offset within op
    std::size_t len = 0;
  };

  // Splits ops into segments in order: (op index, offset within op).
  struct cursor {
    std::span<io_op> ops;
    std::size_t i = 0, off = 0;
    bool next(std::size_t seg, segment_state& s) noexcept {
      while (i < ops.size() && off >= ops[i].len) {
        ++i;
        off = 0;
      }
      if (i == ops.size()) return false;
      s = {&ops[i], 0, off, std::min(seg, ops[i].len - off)};
      off += s.len;
      return true;
    }
  };

  // Adds a segment's outcome to its op: bytes add up; the first error sticks. Atomic, since
  // the threads backend finishes the segments of one op on several threads.
  static void finish(segment_state& s, long r) noexcept {
    std::atomic_ref<long> res(s.op->res);
    long cur = res.load(std::memory_order_relaxed);
    while (cur >= 0 &&
           !res.compare_exchange_weak(cur, r < 0 ? r : cur + r, std::memory_order_relaxed)) {
    }
  }

  // Transfers what is left of `s` synchronously; used by the threads backend.
  static void transfer(segment_state& s) noexcept {
    char* b = static_cast<char*>(s.op->buf) + s.off;
    std::size_t left = s.len;
    off_t pos = s.op->off + static_cast<off_t>(s.off);
    while (left > 0) {
      const ssize_t r =
          s.op->write ? ::pwrite(s.op->fd, b, left, pos) : ::pread(s.op->fd, b, left, pos);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        finish(s, r < 0 ? -errno : -ENODATA);
        return;
      }
      b += r;
      pos += r;
      left -= static_cast<std::size_t>(r);
    }
    finish(s, static_cast<long>(s.len));
  }

  static bool all_ok(std::span<io_op> ops) noexcept {
    bool ok = true;
    for (auto& op : ops) {
      if (op.res >= 0 && static_cast<std::size_t>(op.res) != op.len) op.res = -ENODATA;
      ok = ok && op.res >= 0;
    }
    return ok;
  }

  // ---- threads backend: a bounded queue of segments; the caller works too ----------------

  struct batch {
    std::size_t pending = 0;  // segments queued or running; guarded by mu_
    std::condition_variable done;
  };
  struct item {
    segment_state s;
    batch* b = nullptr;
  };

  bool run_threads(std::span<io_op> ops) noexcept {
    batch b;
    cursor c{ops};
    segment_state s;
    std::unique_lock lk(mu_);
    while (c.next(segment_, s)) {
      if (count_ == queue_.size()) {  // queue full: the caller does this segment itself
        ++b.pending;
        lk.unlock();
        transfer(s);
        lk.lock();
        --b.pending;
        continue;
      }
      queue_[(head_ + count_) % queue_.size()] = {s, &b};
      ++count_;
      ++b.pending;
      cv_.notify_one();
    }
    // Help with what is queued, then wait for the rest.
    while (b.pending > 0) {
      if (count_ > 0) {
        item it = pop_locked();
        lk.unlock();
        transfer(it.s);
        lk.lock();
        if (--it.b->pending == 0 && it.b != &b) it.b->done.notify_all();
        continue;
      }
      b.done.wait(lk);
    }
    lk.unlock();
    return all_ok(ops);
  }

  item pop_locked() noexcept {
    item it = queue_[head_];
    head_ = (head_ + 1) % queue_.size();
    --count_;
    return it;
  }

  void worker() {
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [this] { return stop_ || count_ > 0; });
      if (count_ == 0) return;
      item it = pop_locked();
      lk.unlock();
      transfer(it.s);
      lk.lock();
      if (--it.b->pending == 0) it.b->done.notify_all();
    }
  }

  // ---- io_uring backend: a pool of rings, one per concurrent caller -----------------------

#if KVTIER_HAS_IO_URING
  struct ring {
    io_uring r{};
    std::unique_ptr<segment_state[]> inflight;
    bool ok = false;
  };

  void close_rings(unsigned n) noexcept {
    if (!rings_) return;
    for (unsigned i = 0; i < n; ++i) {
      if (rings_[i].ok) io_uring_queue_exit(&rings_[i].r);
      rings_[i].ok = false;
    }
  }

  static void prep(io_uring_sqe* sqe, segment_state& s, std::uint64_t tag) noexcept {
    char* b = static_cast<char*>(s.op->buf) + s.off + s.done;
    const unsigned n = static_cast<unsigned>(s.len - s.done);
    const off_t pos = s.op->off + static_cast<off_t>(s.off + s.done);
    if (s.op->write) {
      io_uring_prep_write(sqe, s.op->fd, b, n, static_cast<__u64>(pos));
    } else {
      io_uring_prep_read(sqe, s.op->fd, b, n, static_cast<__u64>(pos));
    }
    io_uring_sqe_set_data64(sqe, tag);
  }

  bool run_uring(std::span<io_op> ops) noexcept {
    unsigned lane;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [this] { return !free_rings_.empty(); });
      lane = free_rings_.back();
      free_rings_.pop_back();
    }
    ring& rg = rings_[lane];
    // Segments are at most 2 GiB - 4 KiB: one SQE's length is 32 bits.
    const std::size_t seg = std::min<std::size_t>(segment_, (std::size_t{1} << 31) - 4096);
    cursor c{ops};
    std::vector<std::uint32_t>& free_tags = free_tags_[lane];
    free_tags.clear();
    for (std::uint32_t t = depth_; t-- > 0;) free_tags.push_back(t);
    unsigned inflight = 0;
    bool more = true;
    for (;;) {
      while (more && !free_tags.empty()) {
        segment_state& s = rg.inflight[free_tags.back()];
        if (!c.next(seg, s)) {
          more = false;
          break;
        }
        io_uring_sqe* sqe = io_uring_get_sqe(&rg.r);
        if (sqe == nullptr) break;
        prep(sqe, s, free_tags.back());
        free_tags.pop_back();
        ++inflight;
      }
      if (inflight == 0) break;
      int r;
      do {
        r = io_uring_submit_and_wait(&rg.r, 1);
      } while (r == -EINTR);
      if (r < 0) {  // cannot submit: finish the in-flight segments synchronously
        for (std::uint32_t t = 0; t < depth_; ++t) {
          if (std::find(free_tags.begin(), free_tags.end(), t) != free_tags.end()) continue;
          transfer_rest(rg.inflight[t]);
        }
        break;
      }
      // (peek_batch rather than the io_uring_for_each_cqe macro, whose assignment-as-condition
      // nvcc's host compilation warns about)
      std::array<io_uring_cqe*, 64> cqes;
      const unsigned seen = io_uring_peek_batch_cqe(&rg.r, cqes.data(), cqes.size());
      for (unsigned k = 0; k < seen; ++k) {
        io_uring_cqe* cqe = cqes[k];
        const auto tag = static_cast<std::uint32_t>(io_uring_cqe_get_data64(cqe));
        segment_state& s = rg.inflight[tag];
        const int res = cqe->res;
        if (res == -EINTR || res == -EAGAIN || (res > 0 && s.done + std::size_t(res) < s.len)) {
          if (res > 0) s.done += static_cast<std::size_t>(res);
          io_uring_sqe* sqe = io_uring_get_sqe(&rg.r);
          if (sqe != nullptr) {
            prep(sqe, s, tag);  // short or interrupted transfer: resubmit the rest
            continue;
          }
          transfer_rest(s);
        } else {
          finish(s, res < 0 ? res : (res == 0 ? -ENODATA : static_cast<long>(s.len)));
        }
        free_tags.push_back(tag);
        --inflight;
      }
      io_uring_cq_advance(&rg.r, seen);
    }
    // Any segment not submitted (submission failure) is done synchronously.
    segment_state s;
    while (c.next(seg, s)) transfer(s);
    {
      std::lock_guard lk(mu_);
      free_rings_.push_back(lane);
    }
    cv_.notify_one();
    return all_ok(ops);
  }

  static void transfer_rest(segment_state& s) noexcept {
    segment_state rest{s.op, 0, s.off + s.done, s.len - s.done};
    if (s.done > 0) {
      finish(s, static_cast<long>(s.done));
    }
    transfer(rest);
  }

  std::unique_ptr<ring[]> rings_;
  std::vector<unsigned> free_rings_;
  std::unique_ptr<std::vector<std::uint32_t>[]> free_tags_ = nullptr;
  unsigned lanes_ = 0;
#endif

  unsigned depth_;
  std::size_t segment_;
  io_fault_hook* faults_ = nullptr;
  backend backend_ = backend::threads;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<item> queue_;
  std::size_t head_ = 0, count_ = 0;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvtier::detail
