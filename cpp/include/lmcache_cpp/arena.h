// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Arena: one shared-memory region holding every L1 object, mappable read-write by other processes
// on the host (engine workers gather into and scatter out of it directly).
//
// Backends:
//   kMemfd     an anonymous memfd (default). Nothing is left behind if the process dies. Other
//              processes of the same user open it through attach_path() = "/proc/<pid>/fd/<fd>".
//   kPosixShm  a named POSIX shared-memory object ("/dev/shm/<name>"), unlinked when the owning
//              Arena is destroyed; use it where /proc/<pid>/fd cannot be opened (other users,
//              sandboxes).
// Huge pages: with huge_pages = true the arena first tries explicit huge pages (MFD_HUGETLB) and,
// when none are reserved, logs a warning and continues with normal pages plus MADV_HUGEPAGE.
//
// Ownership: the creating Arena owns the region (and the POSIX name). AttachedArena is a mapping
// of an existing region in another process (or the same one, in tests); it never unlinks.
//
// Thread safety: immutable after construction; base()/size() may be read from any thread. The
// bytes themselves are synchronised by the object table's leases, not by the arena.
//
// Stability: stable: ArenaOptions, ArenaDescriptor, Arena (base, size, descriptor) and
// AttachedArena.
#ifndef LMCACHE_CPP_ARENA_H_
#define LMCACHE_CPP_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

enum class ArenaBackend : int32_t { kMemfd = 0, kPosixShm = 1 };

struct ArenaOptions {
  size_t size_bytes = 0;  // REQUIRES: > 0; rounded up to the page size in use
  ArenaBackend backend = ArenaBackend::kMemfd;
  std::string name;         // kPosixShm: object name without '/'; empty = generated
  bool huge_pages = false;  // try huge pages, fall back with a warning
  bool prefault = false;    // touch every page at creation (MAP_POPULATE)
};

// What another process needs to map the arena.
struct ArenaDescriptor {
  std::string path;         // a path to open(2) O_RDWR: "/proc/<pid>/fd/<n>" or "/dev/shm/<name>"
  size_t size = 0;          // bytes to map
  bool huge_pages = false;  // whether the region is backed by explicit huge pages
};

class Arena {
 public:
  // Creates and maps the region. Errors: InvalidArgument (size 0, bad name), IoError (memfd_create,
  // shm_open, ftruncate or mmap failed; the message names the call and errno).
  static Result<std::unique_ptr<Arena>> Create(const ArenaOptions& options);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  uint8_t* base() const noexcept { return base_; }
  size_t size() const noexcept { return size_; }
  bool huge_pages() const noexcept { return huge_pages_; }
  ArenaBackend backend() const noexcept { return backend_; }
  int fd() const noexcept { return fd_; }
  ArenaDescriptor descriptor() const;

 private:
  Arena() = default;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
  bool huge_pages_ = false;
  ArenaBackend backend_ = ArenaBackend::kMemfd;
  std::string shm_name_;  // non-empty when this Arena must shm_unlink it
};

// A read-write mapping of an arena created elsewhere.
class AttachedArena {
 public:
  // Errors: InvalidArgument (empty path, size 0), IoError (open, fstat, mmap), InvalidArgument if
  // the file is smaller than descriptor.size.
  static Result<std::unique_ptr<AttachedArena>> Attach(const ArenaDescriptor& descriptor);
  ~AttachedArena();
  AttachedArena(const AttachedArena&) = delete;
  AttachedArena& operator=(const AttachedArena&) = delete;

  uint8_t* base() const noexcept { return base_; }
  size_t size() const noexcept { return size_; }

 private:
  AttachedArena() = default;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_ARENA_H_
