// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/arena.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <random>
#include <string>
#include <utility>

#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace {

constexpr size_t kHugePageSize = size_t{2} << 20;  // 2 MiB
// MFD_HUGE_2MB from <linux/memfd.h>: log2(2 MiB) << MFD_HUGE_SHIFT. Spelled out here because
// <linux/memfd.h> and <sys/mman.h> define the other MFD_* macros with different spellings.
constexpr unsigned kMfdHuge2Mb = 21U << 26;
constexpr int kGeneratedNameAttempts = 4;

// Rounds `size` up to `page` (a power of two); false on overflow.
bool RoundUpTo(size_t size, size_t page, size_t* out) {
  if (size > SIZE_MAX - (page - 1)) return false;
  *out = (size + page - 1) & ~(page - 1);
  return true;
}

size_t NormalPageSize() {
  const long page = sysconf(_SC_PAGESIZE);
  return page > 0 ? static_cast<size_t>(page) : size_t{4096};
}

// A POSIX shm name (without the leading '/') that shm_open accepts as one component of /dev/shm.
Status ValidateShmName(const std::string& name) {
  if (name.size() > NAME_MAX) {
    return Status::InvalidArgument("shm name longer than " + std::to_string(NAME_MAX) + " bytes");
  }
  if (name == "." || name == "..") return Status::InvalidArgument("shm name '" + name + "'");
  for (const char c : name) {
    if (c == '/' || c == '\0') {
      return Status::InvalidArgument("shm name must not contain '/' or NUL: '" + name + "'");
    }
  }
  return Status::Ok();
}

std::string GenerateShmName() {
  std::random_device rd;
  const uint64_t bits = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[64];
  std::snprintf(buf, sizeof(buf), "lmcache_cpp-%ld-%016" PRIx64, static_cast<long>(getpid()), bits);
  return buf;
}

void CloseQuietly(int fd) {
  if (fd >= 0) (void)close(fd);
}

// Sizes `fd` to `size` bytes and maps it shared read-write. On failure returns the status and
// leaves `fd` open (the caller owns it).
Result<uint8_t*> SizeAndMap(int fd, size_t size, bool prefault) {
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    return Status::FromErrno(err, "ftruncate(" + std::to_string(size) + ")");
  }
  int flags = MAP_SHARED;
  if (prefault) flags |= MAP_POPULATE;
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return Status::FromErrno(err, "mmap(" + std::to_string(size) + ", MAP_SHARED)");
  }
  return static_cast<uint8_t*>(p);
}

}  // namespace

Result<std::unique_ptr<Arena>> Arena::Create(const ArenaOptions& options) {
  if (options.size_bytes == 0) return Status::InvalidArgument("arena size must be > 0");
  const bool shm = options.backend == ArenaBackend::kPosixShm;
  if (!shm && options.backend != ArenaBackend::kMemfd) {
    return Status::InvalidArgument("unknown arena backend");
  }
  if (shm && !options.name.empty()) LMCACHE_RETURN_IF_ERROR(ValidateShmName(options.name));

  size_t normal_size = 0;
  if (!RoundUpTo(options.size_bytes, NormalPageSize(), &normal_size)) {
    return Status::InvalidArgument("arena size too large");
  }

  std::unique_ptr<Arena> arena(new Arena());
  arena->backend_ = options.backend;

  // Explicit huge pages: only the memfd backend can ask for them (/dev/shm is not hugetlbfs).
  if (options.huge_pages && !shm) {
    size_t huge_size = 0;
    Status st;
    if (!RoundUpTo(options.size_bytes, kHugePageSize, &huge_size)) {
      st = Status::InvalidArgument("arena size too large for huge pages");
    } else {
      const int fd = memfd_create("lmcache_cpp_arena", MFD_CLOEXEC | MFD_HUGETLB | kMfdHuge2Mb);
      if (fd < 0) {
        const int err = errno;
        st = Status::FromErrno(err, "memfd_create(MFD_HUGETLB)");
      } else {
        Result<uint8_t*> mapped = SizeAndMap(fd, huge_size, options.prefault);
        if (mapped.ok()) {
          arena->fd_ = fd;
          arena->base_ = *mapped;
          arena->size_ = huge_size;
          arena->huge_pages_ = true;
          return Result<std::unique_ptr<Arena>>(std::move(arena));
        }
        st = mapped.status();
        CloseQuietly(fd);
      }
    }
    Log(LogLevel::kWarning, "arena: explicit huge pages unavailable (" + st.ToString() +
                                "); using normal pages with MADV_HUGEPAGE");
  } else if (options.huge_pages) {
    Log(LogLevel::kWarning,
        "arena: explicit huge pages are not available for the POSIX shm backend; using normal "
        "pages with MADV_HUGEPAGE");
  }

  int fd = -1;
  if (shm) {
    const bool generated = options.name.empty();
    int err = 0;
    for (int attempt = 0; attempt < (generated ? kGeneratedNameAttempts : 1); ++attempt) {
      std::string name = generated ? GenerateShmName() : options.name;
      const std::string path = "/" + name;
      // glibc's shm_open adds O_CLOEXEC (and O_NOFOLLOW) itself.
      fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      err = errno;
      if (fd >= 0) {
        arena->shm_name_ = std::move(name);
        break;
      }
      if (!generated || err != EEXIST) break;
    }
    if (fd < 0) {
      const std::string what = generated ? "<generated name>" : "/" + options.name;
      return Status::FromErrno(err, "shm_open(" + what + ")");
    }
  } else {
    fd = memfd_create("lmcache_cpp_arena", MFD_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "memfd_create");
  }
  // From here the destructor releases fd (and unlinks the shm name) on every error return.
  arena->fd_ = fd;

  Result<uint8_t*> mapped = SizeAndMap(fd, normal_size, options.prefault);
  if (!mapped.ok()) return mapped.status();
  arena->base_ = *mapped;
  arena->size_ = normal_size;
  if (options.huge_pages) {
    // Best effort: transparent huge pages for shmem may be disabled; the arena works either way.
    (void)madvise(arena->base_, arena->size_, MADV_HUGEPAGE);
  }
  return Result<std::unique_ptr<Arena>>(std::move(arena));
}

Arena::~Arena() {
  if (base_ != nullptr) (void)munmap(base_, size_);
  CloseQuietly(fd_);
  if (!shm_name_.empty()) (void)shm_unlink(("/" + shm_name_).c_str());
}

ArenaDescriptor Arena::descriptor() const {
  ArenaDescriptor d;
  if (backend_ == ArenaBackend::kPosixShm) {
    d.path = "/dev/shm/" + shm_name_;
  } else {
    d.path = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd_);
  }
  d.size = size_;
  d.huge_pages = huge_pages_;
  return d;
}

Result<std::unique_ptr<AttachedArena>> AttachedArena::Attach(const ArenaDescriptor& descriptor) {
  if (descriptor.path.empty()) return Status::InvalidArgument("arena path is empty");
  if (descriptor.size == 0) return Status::InvalidArgument("arena size must be > 0");

  const int fd = open(descriptor.path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return Status::FromErrno(err, "open(" + descriptor.path + ")");
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    CloseQuietly(fd);
    return Status::FromErrno(err, "fstat(" + descriptor.path + ")");
  }
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < descriptor.size) {
    CloseQuietly(fd);
    return Status::InvalidArgument("arena file " + descriptor.path + " has " +
                                   std::to_string(st.st_size) + " bytes, fewer than the " +
                                   std::to_string(descriptor.size) + " to map");
  }
  // A huge-page arena's size is already a multiple of the huge page size; map it as is.
  void* p = mmap(nullptr, descriptor.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  CloseQuietly(fd);  // the mapping keeps the region alive
  if (p == MAP_FAILED) {
    return Status::FromErrno(
        err, "mmap(" + descriptor.path + ", " + std::to_string(descriptor.size) + ", MAP_SHARED)");
  }
  std::unique_ptr<AttachedArena> attached(new AttachedArena());
  attached->base_ = static_cast<uint8_t*>(p);
  attached->size_ = descriptor.size;
  return Result<std::unique_ptr<AttachedArena>>(std::move(attached));
}

AttachedArena::~AttachedArena() {
  if (base_ != nullptr) (void)munmap(base_, size_);
}

}  // namespace lmcache_cpp
