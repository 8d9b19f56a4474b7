// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// bench_fs_adapter: FileSystemL2Adapter write and read bandwidth against plain files.
//
// For objects of 2, 8 and 32 MiB (256 MiB of objects per case) it measures, in one directory:
//   * the floor: a plain sequential loop over files of the same size, one at a time: open,
//     write() the whole object, fsync, close (write); open, read, close (read; see below);
//   * the adapter (fsync = true, buffered I/O, io_threads = 8): stores and loads of one object
//     per SubmitStore/SubmitLoad call, with 1 call in flight (submit, wait, submit the next) and
//     with 8 calls in flight (8 concurrent calls of one object each; a new one is submitted when
//     one completes).
// Writes are run kWritePasses times (new files each time), floor and adapter alternating, and the
// fastest pass of each is kept; reads use the files of the last write pass.
// Before every read pass the files' cached pages are dropped with posix_fadvise(DONTNEED) (they
// are clean: both sides fsync), so reads come from the device, for the floor and the adapter
// alike. A read includes the adapter's header validation and payload CRC32C. The plain read is
// the faster of two readers: one read() of the whole file, and the adapter's pattern without the
// adapter (POSIX_FADV_SEQUENTIAL, a 4 KiB read, then 1 MiB reads), which on a device with a large
// read-ahead can be much faster. Reads are run kReadPasses times, each pass measuring both plain
// readers and the adapter, and the fastest pass of each series is kept. Ratios are adapter /
// plain sequential.
//
// Usage: bench_fs_adapter [directory]   (default: a fresh directory under /tmp, removed at exit)

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lmcache_cpp/fs_adapter.h"

namespace {

using lmcache_cpp::Bitmap;
using lmcache_cpp::ConstBuffer;
using lmcache_cpp::FileSystemAdapterOptions;
using lmcache_cpp::FileSystemL2Adapter;
using lmcache_cpp::MutableBuffer;
using lmcache_cpp::ObjectKey;
using lmcache_cpp::Status;
using lmcache_cpp::bench::GBps;
using lmcache_cpp::bench::SecondsSince;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kBytesPerCase = 256 * kMiB;
constexpr int kInFlightMany = 8;
constexpr int kWritePasses = 2;
constexpr int kReadPasses = 4;

// Warns on stderr when some of a series' adapter calls (`what`: "stores", "loads") failed.
void WarnIfFailed(uint64_t failures, const char* what) {
  if (failures != 0) {
    std::fprintf(stderr, "warning: %llu %s failed\n", static_cast<unsigned long long>(failures),
                 what);
  }
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_fs_adapter: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

void DropCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) Die("open " + path);
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void PlainWrite(const std::string& path, const uint8_t* data, uint64_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Die("open " + path);
  uint64_t done = 0;
  while (done < size) {
    const ssize_t w = ::write(fd, data + done, size - done);
    if (w <= 0) Die("write " + path);
    done += static_cast<uint64_t>(w);
  }
  if (::fsync(fd) != 0) Die("fsync " + path);
  ::close(fd);
}

// Reads a whole file: kWhole = one read() of everything; kPieces = posix_fadvise(SEQUENTIAL),
// a 4 KiB read, then 1 MiB reads (the adapter's I/O pattern, without the adapter).
enum class ReadMode { kWhole, kPieces };

void PlainRead(const std::string& path, uint8_t* data, uint64_t size, ReadMode mode) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) Die("open " + path);
  uint64_t done = 0;
  if (mode == ReadMode::kPieces) ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  while (done < size) {
    uint64_t want = size - done;
    if (mode == ReadMode::kPieces) want = std::min<uint64_t>(want, done == 0 ? 4096 : kMiB);
    const ssize_t r = ::read(fd, data + done, want);
    if (r <= 0) Die("read " + path);
    done += static_cast<uint64_t>(r);
  }
  ::close(fd);
}

ObjectKey MakeKey(uint64_t i) {
  ObjectKey k;
  std::mt19937_64 rng(i * 7919 + 17);
  for (size_t b = 0; b < k.chunk.bytes.size(); b += 8) {
    const uint64_t x = rng();
    std::memcpy(k.chunk.bytes.data() + b, &x, 8);
  }
  return k;
}

// Runs `count` single-object operations with at most `window` in flight. `submit(i, done)`
// starts operation i and arranges for done(ok) to be called on completion.
template <typename SubmitFn>
uint64_t RunWindowed(int count, int window, SubmitFn submit) {
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0;
  int completed = 0;
  uint64_t failures = 0;
  auto done = [&](bool ok) {
    // Notifies under the lock: RunWindowed may return (destroying mu and cv) once it sees the
    // last completion.
    std::lock_guard<std::mutex> lk(mu);
    --in_flight;
    ++completed;
    if (!ok) ++failures;
    cv.notify_all();
  };
  for (int i = 0; i < count; ++i) {
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return in_flight < window; });
      ++in_flight;
    }
    submit(i, done);
  }
  std::unique_lock<std::mutex> lk(mu);
  cv.wait(lk, [&] { return completed == count; });
  return failures;
}

struct CaseResult {
  uint64_t size = 0;
  double plain_write = 0, plain_read = 0;
  double plain_whole = 0, plain_pieces = 0;  // the two plain readers
  double write[2] = {0, 0};                  // x1, x8
  double read[2] = {0, 0};
};

CaseResult RunCase(const std::string& dir, uint64_t size, uint64_t* key_base) {
  CaseResult res;
  res.size = size;
  const int count = static_cast<int>(kBytesPerCase / size);
  const uint64_t total = static_cast<uint64_t>(count) * size;

  // Source objects (distinct random contents) and read buffers for the 8-in-flight case.
  std::vector<std::vector<uint8_t>> src(kInFlightMany), dst(kInFlightMany);
  std::mt19937_64 rng(size);
  for (int i = 0; i < kInFlightMany; ++i) {
    src[i].resize(size);
    for (uint64_t b = 0; b + 8 <= size; b += 8) {
      const uint64_t x = rng();
      std::memcpy(src[i].data() + b, &x, 8);
    }
    dst[i].resize(size);
  }

  const std::string plain_dir = dir + "/plain";
  std::filesystem::create_directories(plain_dir);
  FileSystemAdapterOptions options;
  options.directory = dir + "/adapter";
  options.fsync = true;
  options.io_threads = kInFlightMany;
  auto created = FileSystemL2Adapter::Create(options);
  if (!created.ok()) {
    std::fprintf(stderr, "bench_fs_adapter: %s\n", created.status().ToString().c_str());
    std::exit(1);
  }
  std::unique_ptr<FileSystemL2Adapter> adapter = std::move(created).value();
  const int windows[2] = {1, kInFlightMany};

  // Writes: every pass writes new files (plain) and new keys (adapter); floor and adapter
  // alternate, the fastest pass of each is kept. Reads use the files of the last pass.
  std::vector<std::string> plain_paths;
  std::vector<ObjectKey> keys[2];
  for (int pass = 0; pass < kWritePasses; ++pass) {
    plain_paths.clear();
    for (int i = 0; i < count; ++i) {
      plain_paths.push_back(plain_dir + "/f" + std::to_string(pass) + "_" + std::to_string(i));
    }
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < count; ++i) {
      PlainWrite(plain_paths[i], src[i % kInFlightMany].data(), size);
    }
    res.plain_write = std::max(res.plain_write, GBps(total, SecondsSince(t0)));
    for (int w = 0; w < 2; ++w) {
      keys[w].clear();
      for (int i = 0; i < count; ++i) keys[w].push_back(MakeKey((*key_base)++));
      t0 = std::chrono::steady_clock::now();
      const uint64_t failures = RunWindowed(count, windows[w], [&](int i, auto done) {
        const auto& buf = src[i % kInFlightMany];
        adapter->SubmitStore({keys[w][i]}, {ConstBuffer{buf.data(), size}},
                             [done](const Status& s, const Bitmap& b) { done(s.ok() && b.All()); });
      });
      res.write[w] = std::max(res.write[w], GBps(total, SecondsSince(t0)));
      WarnIfFailed(failures, "stores");
    }
  }

  // Reads: each pass measures both plain readers and the adapter with 1 and 8 in flight; the
  // fastest pass of each series is kept, and the floor is the faster plain reader.
  double plain_best[2] = {0, 0};
  for (int pass = 0; pass < kReadPasses; ++pass) {
    for (int m = 0; m < 2; ++m) {
      const ReadMode mode = m == 0 ? ReadMode::kWhole : ReadMode::kPieces;
      for (const auto& p : plain_paths) DropCache(p);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < count; ++i) PlainRead(plain_paths[i], dst[0].data(), size, mode);
      plain_best[m] = std::max(plain_best[m], GBps(total, SecondsSince(t0)));
    }
    for (int w = 0; w < 2; ++w) {
      for (const auto& k : keys[w]) DropCache(adapter->PathFor(k));
      const auto t0 = std::chrono::steady_clock::now();
      // With w windows the buffers in use are distinct: slot i % window.
      const uint64_t failures = RunWindowed(count, windows[w], [&](int i, auto done) {
        auto& buf = dst[i % windows[w]];
        adapter->SubmitLoad({keys[w][i]}, {MutableBuffer{buf.data(), size}},
                            [done](const Status& s, const Bitmap& b) { done(s.ok() && b.All()); });
      });
      res.read[w] = std::max(res.read[w], GBps(total, SecondsSince(t0)));
      WarnIfFailed(failures, "loads");
    }
  }
  res.plain_read = std::max(plain_best[0], plain_best[1]);
  res.plain_whole = plain_best[0];
  res.plain_pieces = plain_best[1];
  // Spot check: the last load (8-in-flight pass, slot (count - 1) % 8) returned its source bytes.
  if (dst[(count - 1) % kInFlightMany] != src[(count - 1) % kInFlightMany]) {
    std::fprintf(stderr, "bench_fs_adapter: loaded bytes differ from the stored ones\n");
    std::exit(1);
  }
  adapter->Close();
  std::filesystem::remove_all(plain_dir);
  std::filesystem::remove_all(options.directory);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  bool remove_dir = false;
  if (argc > 1) {
    dir = argv[1];
    std::filesystem::create_directories(dir);
  } else {
    char tmpl[] = "/tmp/bench_fs_adapter_XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) Die("mkdtemp");
    dir = tmpl;
    remove_dir = true;
  }
  std::printf(
      "bench_fs_adapter: directory %s, %llu MiB per case, adapter fsync=on buffered "
      "io_threads=%d; in flight = concurrent Submit calls of one object each\n",
      dir.c_str(), static_cast<unsigned long long>(kBytesPerCase / kMiB), kInFlightMany);
  std::printf(
      "page cache dropped (fdatasync + POSIX_FADV_DONTNEED) before every read pass; "
      "floor = plain sequential write+fsync / read (best of whole-file read() and "
      "SEQUENTIAL 1 MiB reads) of files of the same size; reads best of %d passes\n",
      kReadPasses);
  uint64_t key_base = 1;
  std::vector<CaseResult> results;
  for (uint64_t mib : {2, 8, 32}) {
    results.push_back(RunCase(dir, mib * kMiB, &key_base));
    const CaseResult& r = results.back();
    std::printf(
        "  %2lluMiB: plain write %.2f GB/s, read %.2f GB/s (whole %.2f, pieces %.2f) | "
        "adapter write x1 %.2f x8 %.2f GB/s, read x1 %.2f x8 %.2f GB/s\n",
        static_cast<unsigned long long>(mib), r.plain_write, r.plain_read, r.plain_whole,
        r.plain_pieces, r.write[0], r.write[1], r.read[0], r.read[1]);
    std::fflush(stdout);
  }
  const int windows[2] = {1, kInFlightMany};
  for (const CaseResult& r : results) {
    for (int w = 0; w < 2; ++w) {
      std::printf("fs_adapter write %lluMiB x%d: %.2f GB/s, plain write %.2f GB/s, ratio %.2f\n",
                  static_cast<unsigned long long>(r.size / kMiB), windows[w], r.write[w],
                  r.plain_write, r.write[w] / r.plain_write);
    }
  }
  for (const CaseResult& r : results) {
    for (int w = 0; w < 2; ++w) {
      std::printf(
          "fs_adapter read %lluMiB x%d: %.2f GB/s, plain read %.2f GB/s, ratio %.2f (target >= "
          "0.9)\n",
          static_cast<unsigned long long>(r.size / kMiB), windows[w], r.read[w], r.plain_read,
          r.read[w] / r.plain_read);
    }
  }
  if (remove_dir) std::filesystem::remove_all(dir);
  return 0;
}
