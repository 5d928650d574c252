#pragma once
// Who owns what in a shared segment: a process is named by its pid and its start time (the
// kernel's starttime in /proc/<pid>/stat, in clock ticks since boot), so a pid reused by a new
// process is not mistaken for the old owner. Linux only.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace kvtier::detail_shared {

/// A process as the segment records it. pid 0: nobody.
struct owner_id {
  std::int32_t pid = 0;
  std::uint64_t start = 0;

  friend constexpr bool operator==(const owner_id&, const owner_id&) = default;
};

/// What /proc says of a pid: its start time and whether it still runs (a zombie, killed but not
/// yet reaped by its parent, no longer runs). Allocates nothing.
struct proc_status {
  bool exists = false;
  bool running = false;
  std::uint64_t start = 0;
};

inline proc_status read_proc_status(std::int32_t pid) noexcept {
  proc_status s;
  char path[48];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return s;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return s;
  buf[n] = '\0';
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are counted
  // after the last ')'. state is field 3, starttime field 22.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return s;
  ++p;
  int field = 2;
  char state = '?';
  while (*p != '\0') {
    while (*p == ' ') ++p;
    if (*p == '\0') break;
    ++field;
    if (field == 3) state = *p;
    if (field == 22) {
      s.start = std::strtoull(p, nullptr, 10);
      s.exists = true;
      s.running = state != 'Z' && state != 'X' && state != 'x';
      return s;
    }
    while (*p != ' ' && *p != '\0') ++p;
  }
  return s;
}

/// The PID namespace of this process (the inode of /proc/self/ns/pid), 0 when unknown. Owners
/// are told apart by pid, so every process of a segment must be in one namespace.
inline std::uint64_t pid_namespace() noexcept {
  struct stat st {};
  return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<std::uint64_t>(st.st_ino) : 0;
}

/// This process.
inline owner_id self_id() noexcept {
  const std::int32_t pid = static_cast<std::int32_t>(::getpid());
  return {pid, read_proc_status(pid).start};
}

/// False only when `o` has certainly ended: no such pid, a zombie, or the pid now names a process
/// that started at another time. An unreadable /proc entry counts as alive (never reclaim what a
/// live process may hold).
inline bool alive(const owner_id& o) noexcept {
  if (o.pid <= 0) return false;
  const proc_status s = read_proc_status(o.pid);
  if (!s.exists) {
    // /proc may be unreadable (hidepid); kill(pid, 0) still tells whether the pid exists.
    return ::kill(o.pid, 0) == 0 || errno == EPERM;
  }
  return s.running && s.start == o.start;
}

}  // namespace kvtier::detail_shared
