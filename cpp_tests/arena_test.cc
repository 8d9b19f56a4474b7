// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/arena.h"

#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "arena_pattern.h"
#include "lmcache_cpp/logging.h"
#include "test_util.h"

extern char** environ;

namespace lmcache_cpp {
namespace {

using testutil::kSpan;
using testutil::PatternByte;

size_t PageSize() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

bool PathExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

long ReservedHugePages() {
  std::ifstream in("/proc/sys/vm/nr_hugepages");
  long n = 0;
  return (in >> n) ? n : 0;
}

std::unique_ptr<Arena> MustCreate(const ArenaOptions& options) {
  auto arena = Arena::Create(options);
  EXPECT_TRUE(arena.ok()) << arena.status().ToString();
  return arena.ok() ? std::move(arena).value() : nullptr;
}

// Collects the log lines emitted while it is alive. Tests run one at a time, so installing a sink
// here does not race with Log() calls of another test.
class LogCapture {
 public:
  LogCapture() {
    SetLogSink(
        [this](LogLevel level, const std::string& message) {
          std::lock_guard<std::mutex> lock(mu_);
          lines_.push_back({level, message});
        },
        LogLevel::kWarning);
  }
  ~LogCapture() { SetLogSink(nullptr, LogLevel::kWarning); }

  std::vector<std::pair<LogLevel, std::string>> lines() const {
    std::lock_guard<std::mutex> lock(mu_);
    return lines_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<LogLevel, std::string>> lines_;  // GUARDED_BY(mu_)
};

// Runs the peer executable on `descriptor` and returns its exit status (-1 if it did not exit).
int RunPeer(const ArenaDescriptor& descriptor, size_t offset, uint64_t seed) {
  std::vector<std::string> args = {LMCACHE_CPP_ARENA_PEER_PATH, descriptor.path,
                                   std::to_string(descriptor.size), std::to_string(offset),
                                   std::to_string(seed)};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ);
  EXPECT_EQ(rc, 0) << "posix_spawn(" << argv[0] << "): " << std::strerror(rc);
  if (rc != 0) return -1;
  int status = 0;
  pid_t waited;
  do {
    waited = waitpid(pid, &status, 0);
  } while (waited < 0 && errno == EINTR);
  EXPECT_EQ(waited, pid) << std::strerror(errno);
  if (waited != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// The parent writes one pattern, the peer process checks it and writes another, the parent
// checks the peer's bytes through its own mapping.
void ExpectSecondProcessSharesBytes(ArenaBackend backend) {
  ArenaOptions options;
  options.size_bytes = 1 << 20;
  options.backend = backend;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  const size_t offset = 3 * PageSize() + 123;
  const uint64_t seed = 0xC0FFEE;
  for (size_t i = 0; i < kSpan; ++i) arena->base()[offset + i] = PatternByte(seed, i);

  EXPECT_EQ(RunPeer(arena->descriptor(), offset, seed), 0);

  size_t mismatches = 0;
  for (size_t i = 0; i < kSpan; ++i) {
    if (arena->base()[offset + kSpan + i] != PatternByte(seed + 1, i)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0u);
  // The parent's own pattern is untouched.
  for (size_t i = 0; i < kSpan; ++i) {
    ASSERT_EQ(arena->base()[offset + i], PatternByte(seed, i)) << i;
  }
}

TEST(ArenaTest, MemfdArenaIsWritableAndDescribedByProcFdPath) {
  ArenaOptions options;
  options.size_bytes = 1 << 20;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  EXPECT_EQ(arena->backend(), ArenaBackend::kMemfd);
  EXPECT_EQ(arena->size(), size_t{1} << 20);
  EXPECT_GE(arena->fd(), 0);
  EXPECT_FALSE(arena->huge_pages());
  ASSERT_NE(arena->base(), nullptr);
  EXPECT_EQ(arena->base()[0], 0);  // a fresh memfd reads as zeros
  std::memset(arena->base(), 0xAB, arena->size());
  EXPECT_EQ(arena->base()[arena->size() - 1], 0xAB);

  const ArenaDescriptor d = arena->descriptor();
  EXPECT_EQ(d.path, "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(arena->fd()));
  EXPECT_EQ(d.size, arena->size());
  EXPECT_FALSE(d.huge_pages);
  EXPECT_TRUE(PathExists(d.path));
}

TEST(ArenaTest, SizeIsRoundedUpToThePageSize) {
  for (const ArenaBackend backend : {ArenaBackend::kMemfd, ArenaBackend::kPosixShm}) {
    ArenaOptions options;
    options.backend = backend;
    options.size_bytes = 1;
    auto one = MustCreate(options);
    ASSERT_NE(one, nullptr);
    EXPECT_EQ(one->size(), PageSize());
    options.size_bytes = PageSize() + 1;
    auto two = MustCreate(options);
    ASSERT_NE(two, nullptr);
    EXPECT_EQ(two->size(), 2 * PageSize());
    EXPECT_EQ(two->descriptor().size, 2 * PageSize());
  }
}

TEST(ArenaTest, ZeroSizeIsRejected) {
  for (const ArenaBackend backend : {ArenaBackend::kMemfd, ArenaBackend::kPosixShm}) {
    ArenaOptions options;
    options.backend = backend;
    auto arena = Arena::Create(options);
    ASSERT_FALSE(arena.ok());
    EXPECT_EQ(arena.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(ArenaTest, BadShmNameIsRejected) {
  const std::vector<std::string> bad = {
      "a/b", "/leading", ".", "..", std::string(300, 'x'), std::string("nul\0inside", 10)};
  for (const std::string& name : bad) {
    ArenaOptions options;
    options.size_bytes = 4096;
    options.backend = ArenaBackend::kPosixShm;
    options.name = name;
    auto arena = Arena::Create(options);
    ASSERT_FALSE(arena.ok()) << name;
    EXPECT_EQ(arena.status().code(), StatusCode::kInvalidArgument) << name;
  }
}

TEST(ArenaTest, PosixShmNameIsGeneratedAndUnlinkedOnDestruction) {
  ArenaOptions options;
  options.size_bytes = 64 * 1024;
  options.backend = ArenaBackend::kPosixShm;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  EXPECT_EQ(arena->backend(), ArenaBackend::kPosixShm);
  const ArenaDescriptor d = arena->descriptor();
  const std::string prefix = "/dev/shm/lmcache_cpp-" + std::to_string(getpid()) + "-";
  EXPECT_EQ(d.path.compare(0, prefix.size(), prefix), 0) << d.path;
  EXPECT_GT(d.path.size(), prefix.size());
  ASSERT_TRUE(PathExists(d.path)) << d.path;
  arena->base()[0] = 7;

  arena.reset();
  EXPECT_FALSE(PathExists(d.path)) << d.path << " survived the arena";
}

TEST(ArenaTest, ExplicitShmNameIsUsedAndNotReusedWhileTaken) {
  ArenaOptions options;
  options.size_bytes = 4096;
  options.backend = ArenaBackend::kPosixShm;
  options.name = "lmcache_cpp_test_" + std::to_string(getpid()) + "_explicit";
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  EXPECT_EQ(arena->descriptor().path, "/dev/shm/" + options.name);

  auto second = Arena::Create(options);  // O_EXCL: never adopts someone else's object
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kIoError);
  EXPECT_NE(second.status().message().find("shm_open"), std::string::npos)
      << second.status().ToString();

  arena.reset();
  EXPECT_FALSE(PathExists("/dev/shm/" + options.name));
}

TEST(ArenaTest, HugePagesFallBackToNormalPagesWithAWarning) {
  for (const ArenaBackend backend : {ArenaBackend::kMemfd, ArenaBackend::kPosixShm}) {
    LogCapture capture;
    ArenaOptions options;
    options.size_bytes = 3 * 1024 * 1024 + 1;
    options.backend = backend;
    options.huge_pages = true;
    auto arena = MustCreate(options);
    ASSERT_NE(arena, nullptr);
    const bool explicit_possible = backend == ArenaBackend::kMemfd && ReservedHugePages() > 0;
    if (!explicit_possible) {
      EXPECT_FALSE(arena->huge_pages());
      EXPECT_FALSE(arena->descriptor().huge_pages);
      EXPECT_EQ(arena->size() % PageSize(), 0u);
      EXPECT_GE(arena->size(), options.size_bytes);
      const auto lines = capture.lines();
      ASSERT_EQ(lines.size(), 1u);
      EXPECT_EQ(lines[0].first, LogLevel::kWarning);
      EXPECT_NE(lines[0].second.find("huge pages"), std::string::npos) << lines[0].second;
    } else if (arena->huge_pages()) {
      EXPECT_EQ(arena->size() % (size_t{2} << 20), 0u);
    }
    // Either way the arena works end to end.
    std::memset(arena->base(), 0x5A, arena->size());
    EXPECT_EQ(arena->base()[arena->size() - 1], 0x5A);
  }
}

TEST(ArenaTest, PrefaultedArenaReadsAsZeros) {
  ArenaOptions options;
  options.size_bytes = 256 * 1024;
  options.prefault = true;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  size_t nonzero = 0;
  for (size_t i = 0; i < arena->size(); ++i) nonzero += arena->base()[i] != 0;
  EXPECT_EQ(nonzero, 0u);
}

TEST(ArenaTest, SecondProcessSeesAndWritesBytesThroughMemfd) {
  ExpectSecondProcessSharesBytes(ArenaBackend::kMemfd);
}

TEST(ArenaTest, SecondProcessSeesAndWritesBytesThroughPosixShm) {
  ExpectSecondProcessSharesBytes(ArenaBackend::kPosixShm);
}

TEST(ArenaTest, PeerReportsAMismatchedPattern) {
  // Guards the cross-process tests against a peer that always succeeds.
  ArenaOptions options;
  options.size_bytes = 1 << 20;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  EXPECT_NE(RunPeer(arena->descriptor(), 0, 42), 0);  // nothing was written: all zeros
}

TEST(ArenaAttachTest, SameProcessAttachmentSharesBytes) {
  for (const ArenaBackend backend : {ArenaBackend::kMemfd, ArenaBackend::kPosixShm}) {
    ArenaOptions options;
    options.size_bytes = 128 * 1024;
    options.backend = backend;
    auto arena = MustCreate(options);
    ASSERT_NE(arena, nullptr);
    auto attached = AttachedArena::Attach(arena->descriptor());
    ASSERT_TRUE(attached.ok()) << attached.status().ToString();
    ASSERT_EQ((*attached)->size(), arena->size());
    EXPECT_NE((*attached)->base(), arena->base());  // a second mapping of the same bytes
    arena->base()[100] = 0x11;
    (*attached)->base()[arena->size() - 1] = 0x22;
    EXPECT_EQ((*attached)->base()[100], 0x11);
    EXPECT_EQ(arena->base()[arena->size() - 1], 0x22);
  }
}

TEST(ArenaAttachTest, MissingPathIsAnIoError) {
  ArenaDescriptor d;
  d.path = "/dev/shm/lmcache_cpp-missing-" + std::to_string(getpid());
  d.size = 4096;
  auto attached = AttachedArena::Attach(d);
  ASSERT_FALSE(attached.ok());
  EXPECT_EQ(attached.status().code(), StatusCode::kIoError);
  EXPECT_NE(attached.status().message().find("open("), std::string::npos)
      << attached.status().ToString();
}

TEST(ArenaAttachTest, SizeLargerThanTheFileIsRejected) {
  ArenaOptions options;
  options.size_bytes = 64 * 1024;
  auto arena = MustCreate(options);
  ASSERT_NE(arena, nullptr);
  ArenaDescriptor d = arena->descriptor();
  d.size = arena->size() + 1;
  EXPECT_TRUE(testutil::FailsWith(AttachedArena::Attach(d), StatusCode::kInvalidArgument));
}

TEST(ArenaAttachTest, EmptyPathOrZeroSizeIsRejected) {
  ArenaDescriptor d;
  d.size = 4096;
  EXPECT_TRUE(testutil::FailsWith(AttachedArena::Attach(d), StatusCode::kInvalidArgument));
  d.path = "/dev/null";
  d.size = 0;
  EXPECT_TRUE(testutil::FailsWith(AttachedArena::Attach(d), StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace lmcache_cpp
