// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// libFuzzer target: the file-system L2 adapter (cpp/src/fs_adapter.cc) over object files made of
// fuzzer bytes -- its file-name and header parsing, the index it rebuilds at start-up, and the
// validation of every load.
//
// Each input is a directory's worth of files, written into an empty temporary directory; then the
// adapter is created over it, every key the files name is looked up, pinned, loaded and unpinned,
// and the adapter is closed and created again (a restart).
//
// Input:
//   options:u8  then files, each
//   flags:u8  name_len:u8 name[name_len]  header_len:u8 header[header_len]
//   payload_len:u16le payload[payload_len]
// A length past the end of the input takes what is left. The file's bytes are the header, zero
// padded to 4096 bytes when flags bit 3 is set, then the payload. To get past the checks a
// mutation rarely satisfies, flags may fix fields up (in this order):
//   bit 4: header bytes 56..63 = the payload's length;  bit 2: 64..67 = the payload's CRC32C;
//   bit 1: 68..71 = the CRC32C of header bytes 0..67.
// The file's name is `name` (at most 200 bytes; '/' and NUL read as '_'), or with flags bit 0 the
// canonical name of the key in header bytes 16..51 ("<64 hex>.<rank>.kv"). Its directory (flags
// bits 5-6): 0 = the name's first two characters, 1 = "ff", 2 = "zz" (never scanned), 3 = the top
// level (never scanned). A later file of the same path replaces an earlier one. options bits 0-1
// pick the capacity (0 = unbounded, else room for about 1, 2 or 3 small files), bit 2 turns on
// o_direct, bit 3 runs 2 I/O threads instead of 1.
//
// The harness validates every file independently of the adapter (its own CRC32C, name parser and
// header reader) and checks: start-up indexes exactly the *.kv files of a hex-pair directory whose
// canonical name, header and size agree, deletes the other *.kv files and every *.tmp-* file there,
// and leaves all other files alone; a lookup pins only such keys (every one, when the capacity is
// unbounded); a load succeeds exactly for the keys whose payload CRC32C matches too, and then
// yields exactly the payload; a load with a buffer of the wrong size is a miss that keeps the
// file; pins balance; and a restart indexes exactly what the first adapter still held, dropping
// nothing; calls with no keys complete with no bits. Any failure aborts, and libFuzzer saves the
// input.

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/fs_adapter.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/object_key.h"
#include "testing/adapter_peers.h"
#include "testing/reference_crc32c.h"

namespace lmcache_cpp::fuzz {
namespace {
using FsPeer = testing::FileSystemAdapterPeer;
using testing::ReferenceCrc32c;

constexpr uint64_t kHeader = kFsObjectHeaderSize;
constexpr auto kWait = std::chrono::seconds(60);

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fs_adapter_fuzzer: check failed: %s\n", what.c_str());
  std::abort();
}
#define FUZZ_CHECK(cond)      \
  do {                        \
    if (!(cond)) Fail(#cond); \
  } while (0)

uint32_t Le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint64_t Le64(const uint8_t* p) { return Le32(p) | static_cast<uint64_t>(Le32(p + 4)) << 32; }
void PutLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutLe64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

std::string Hex(const uint8_t* p, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += kDigits[p[i] >> 4];
    s += kDigits[p[i] & 15];
  }
  return s;
}

// The key in a header (bytes 16..51). REQUIRES: at least 52 bytes.
ObjectKey HeaderKey(const uint8_t* h) {
  ObjectKey k;
  std::memcpy(k.chunk.bytes.data(), h + 16, kChunkHashSize);
  k.kv_rank = static_cast<int32_t>(Le32(h + 48));
  return k;
}

std::string CanonicalName(const ObjectKey& k) {
  return Hex(k.chunk.bytes.data(), kChunkHashSize) + "." + std::to_string(k.kv_rank) + ".kv";
}

bool IsLowerHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

// The key a file name spells canonically: 64 lowercase hex digits, '.', a decimal int32 without
// '+' or leading zeros ("-0" is not one), ".kv".
std::optional<ObjectKey> ParseCanonicalName(const std::string& name) {
  constexpr size_t kHexChars = 2 * kChunkHashSize;
  if (name.size() < kHexChars + 5 || name[kHexChars] != '.') return std::nullopt;
  if (name.compare(name.size() - 3, 3, ".kv") != 0) return std::nullopt;
  ObjectKey k;
  for (size_t i = 0; i < kHexChars; ++i) {
    if (!IsLowerHex(name[i])) return std::nullopt;
  }
  for (size_t i = 0; i < kChunkHashSize; ++i) {
    auto v = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    k.chunk.bytes[i] = static_cast<uint8_t>(v(name[2 * i]) * 16 + v(name[2 * i + 1]));
  }
  const std::string rank = name.substr(kHexChars + 1, name.size() - kHexChars - 4);
  size_t i = 0;
  const bool negative = !rank.empty() && rank[0] == '-';
  if (negative) i = 1;
  if (i >= rank.size() || rank.size() - i > 10) return std::nullopt;
  if (rank[i] == '0' && (negative || rank.size() - i > 1)) return std::nullopt;
  int64_t v = 0;
  for (; i < rank.size(); ++i) {
    if (rank[i] < '0' || rank[i] > '9') return std::nullopt;
    v = v * 10 + (rank[i] - '0');
  }
  if (negative) v = -v;
  if (v < INT32_MIN || v > INT32_MAX) return std::nullopt;
  k.kv_rank = static_cast<int32_t>(v);
  return k;
}

// What the format (fs_adapter.h) says of one file.
struct Expect {
  enum Kind { kIgnored, kTemp, kInvalid, kIndexed } kind = kIgnored;
  std::optional<ObjectKey> key;  // the key its name spells, if any
  bool payload_ok = false;       // kIndexed and the payload's CRC32C matches the header's
  std::string payload;           // kIndexed: the bytes after the header
};

Expect Judge(const std::string& sub, const std::string& name, const std::string& bytes) {
  Expect e;
  const bool scanned = sub.size() == 2 && IsLowerHex(sub[0]) && IsLowerHex(sub[1]);
  if (!scanned) return e;
  if (name.find(".tmp-") != std::string::npos) {
    e.kind = Expect::kTemp;
    return e;
  }
  if (name.size() < 3 || name.compare(name.size() - 3, 3, ".kv") != 0) return e;
  e.kind = Expect::kInvalid;
  e.key = ParseCanonicalName(name);
  if (!e.key.has_value() || name.compare(0, 2, sub) != 0 || bytes.size() < kHeader) return e;
  const auto* h = reinterpret_cast<const uint8_t*>(bytes.data());
  if (std::memcmp(h, kFsObjectMagic, sizeof(kFsObjectMagic)) != 0) return e;
  if (Le32(h + 8) != kFsObjectFormatVersion || Le32(h + 12) != kHeader) return e;
  if (Le32(h + 68) != ReferenceCrc32c(h, 68)) return e;
  if (HeaderKey(h) != *e.key) return e;
  if (Le64(h + 56) != bytes.size() - kHeader) return e;
  e.kind = Expect::kIndexed;
  e.payload = bytes.substr(kHeader);
  e.payload_ok = Le32(h + 64) == ReferenceCrc32c(h + kHeader, e.payload.size());
  return e;
}

std::string* base_dir = nullptr;

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
void RemoveTree(const std::string& path) {
  ::nftw(path.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Fail("open " + path + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w <= 0) Fail("write " + path);
    done += static_cast<size_t>(w);
  }
  ::close(fd);
}

// One buffer aligned for O_DIRECT, so the adapter's direct path is reachable.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t n)
      : size(n),
        data(static_cast<uint8_t*>(
            std::aligned_alloc(4096, (std::max<size_t>(n, 1) + 4095) / 4096 * 4096))) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  size_t size;
  uint8_t* data;
};

// Waits for an adapter callback; fails the input if none comes within kWait (a lost callback).
Bitmap Await(const std::function<void(LoadCallback)>& submit) {
  auto done = std::make_shared<std::promise<std::pair<Status, Bitmap>>>();
  std::future<std::pair<Status, Bitmap>> result = done->get_future();
  submit([done](const Status& s, const Bitmap& b) { done->set_value({s, b}); });
  if (result.wait_for(kWait) != std::future_status::ready) Fail("adapter callback never ran");
  std::pair<Status, Bitmap> r = result.get();
  if (!r.first.ok()) Fail("adapter call failed: " + r.first.ToString());
  return r.second;
}

struct File {
  std::string sub, name, bytes;
};

std::map<std::string, File> ParseInput(const uint8_t* data, size_t size) {
  std::map<std::string, File> files;  // by relative path; a later file replaces an earlier one
  size_t pos = 1;
  auto byte = [&]() -> uint8_t { return pos < size ? data[pos++] : 0; };
  auto take = [&](size_t n) {
    n = std::min(n, size - pos);
    std::string s(reinterpret_cast<const char*>(data + pos), n);
    pos += n;
    return s;
  };
  while (pos < size) {
    const uint8_t flags = byte();
    std::string name = take(byte());
    std::string header = take(byte());
    size_t payload_len = byte();
    payload_len |= static_cast<size_t>(byte()) << 8;
    const std::string payload = take(payload_len);
    if (flags & 8) header.resize(std::max<size_t>(header.size(), kHeader), '\0');
    auto* h = reinterpret_cast<uint8_t*>(header.data());
    const auto* p = reinterpret_cast<const uint8_t*>(payload.data());
    if ((flags & 16) && header.size() >= 64) PutLe64(h + 56, payload.size());
    if ((flags & 4) && header.size() >= 68) PutLe32(h + 64, ReferenceCrc32c(p, payload.size()));
    if ((flags & 2) && header.size() >= 72) PutLe32(h + 68, ReferenceCrc32c(h, 68));
    if ((flags & 1) && header.size() >= 52) name = CanonicalName(HeaderKey(h));
    for (char& c : name) {
      if (c == '/' || c == '\0') c = '_';
    }
    if (name.size() > 200) name.resize(200);  // NAME_MAX is 255
    if (name.empty() || name == "." || name == "..") name += "_";
    File f;
    switch ((flags >> 5) & 3) {
      case 0: f.sub = name.size() >= 2 ? name.substr(0, 2) : "00"; break;
      case 1: f.sub = "ff"; break;
      case 2: f.sub = "zz"; break;
      default: f.sub = ""; break;
    }
    if (f.sub == "." || f.sub == ".." || f.sub.find('.') != std::string::npos) f.sub = "zz";
    f.name = std::move(name);
    f.bytes = header + payload;
    std::string rel = f.sub.empty() ? f.name : f.sub + "/" + f.name;
    // A file and a directory of the same name cannot both exist; keep the directory.
    if (f.sub.empty() && f.name.size() == 2) f.name += "_", rel = f.name;
    files[rel] = std::move(f);
  }
  return files;
}

void RunOne(const uint8_t* data, size_t size) {
  const uint8_t options = data[0];
  const std::string dir = *base_dir + "/objects";
  RemoveTree(dir);
  FUZZ_CHECK(::mkdir(dir.c_str(), 0755) == 0);
  std::map<std::string, File> files = ParseInput(data, size);
  for (const auto& [rel, f] : files) {
    if (!f.sub.empty()) ::mkdir((dir + "/" + f.sub).c_str(), 0755);
    WriteFile(dir + "/" + rel, f.bytes);
  }

  static constexpr uint64_t kCapacities[] = {0, kHeader + 64, 2 * kHeader + 256,
                                             3 * (kHeader + 128)};
  FileSystemAdapterOptions opts;
  opts.directory = dir;
  opts.capacity_bytes = kCapacities[options & 3];
  opts.o_direct = (options & 4) != 0;
  opts.io_threads = (options & 8) ? 2 : 1;
  const bool unbounded = opts.capacity_bytes == 0;

  // The model of start-up.
  uint64_t want_indexed = 0, want_dropped = 0, want_temp = 0;
  std::map<ObjectKey, Expect> by_key;  // keys named by *.kv files, with the best verdict
  for (const auto& [rel, f] : files) {
    Expect e = Judge(f.sub, f.name, f.bytes);
    if (e.kind == Expect::kTemp) ++want_temp;
    if (e.kind == Expect::kInvalid) ++want_dropped;
    if (e.kind == Expect::kIndexed) ++want_indexed;
    if (e.key.has_value()) {
      auto it = by_key.find(*e.key);
      if (it == by_key.end() || e.kind == Expect::kIndexed) by_key[*e.key] = e;
    }
  }

  Result<std::unique_ptr<FileSystemL2Adapter>> created = FileSystemL2Adapter::Create(opts);
  if (!created.ok()) Fail("Create: " + created.status().ToString());
  std::unique_ptr<FileSystemL2Adapter> adapter = std::move(created).value();
  const FsRecoveryReport rec = adapter->recovery();
  FUZZ_CHECK(rec.indexed == want_indexed);
  FUZZ_CHECK(rec.dropped == want_dropped);
  FUZZ_CHECK(rec.temp_files_removed == want_temp);
  FUZZ_CHECK(rec.evicted <= rec.indexed);
  if (unbounded) FUZZ_CHECK(rec.evicted == 0);
  uint64_t kept = 0;
  for (const auto& [rel, f] : files) {
    const Expect e = Judge(f.sub, f.name, f.bytes);
    const bool exists = Exists(dir + "/" + rel);
    if (e.kind == Expect::kIgnored) FUZZ_CHECK(exists);  // not ours: left alone
    if (e.kind == Expect::kTemp || e.kind == Expect::kInvalid) FUZZ_CHECK(!exists);
    if (e.kind == Expect::kIndexed && exists) ++kept;
  }
  FUZZ_CHECK(kept == rec.indexed - rec.evicted);
  FUZZ_CHECK(adapter->stats().objects == kept);

  // Look up (and pin) every key a file names, plus one nobody wrote.
  std::vector<ObjectKey> keys;
  for (const auto& [key, e] : by_key) keys.push_back(key);
  ObjectKey absent;
  absent.chunk.bytes.fill(0xa5);
  absent.kv_rank = 7;
  if (by_key.count(absent) == 0) keys.push_back(absent);
  const Bitmap pinned =
      Await([&](LookupCallback cb) { adapter->SubmitLookupAndPin(keys, std::move(cb)); });
  std::vector<ObjectKey> pinned_keys;
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = by_key.find(keys[i]);
    const bool indexed = it != by_key.end() && it->second.kind == Expect::kIndexed;
    if (pinned.Test(i)) {
      FUZZ_CHECK(indexed);
      pinned_keys.push_back(keys[i]);
    } else if (unbounded) {
      FUZZ_CHECK(!indexed);
    }
  }
  FUZZ_CHECK(pinned_keys.size() == kept);

  // Calls with no keys complete, with no bits (fs_adapter.cc once indexed keys[SIZE_MAX] here).
  FUZZ_CHECK(Await([&](StoreCallback cb) {
               adapter->SubmitStore({}, {}, std::move(cb));
             }).Popcount() == 0);
  FUZZ_CHECK(
      Await([&](LoadCallback cb) { adapter->SubmitLoad({}, {}, std::move(cb)); }).Popcount() == 0);

  // A buffer of the wrong size is the caller's mistake: a miss that keeps the file.
  if (!pinned_keys.empty()) {
    const ObjectKey& k = pinned_keys.front();
    AlignedBuffer wrong(by_key[k].payload.size() + 1);
    const Bitmap got = Await([&](LoadCallback cb) {
      adapter->SubmitLoad({k}, {MutableBuffer{wrong.data, wrong.size}}, std::move(cb));
    });
    FUZZ_CHECK(!got.Test(0));
    FUZZ_CHECK(FsPeer::Contains(*adapter, k));
    FUZZ_CHECK(adapter->stats().corrupt_reads == rec.dropped);
  }

  // Load what is pinned: exactly the payload, or a miss when its checksum does not match.
  std::vector<std::unique_ptr<AlignedBuffer>> buffers;
  std::vector<MutableBuffer> views;
  uint64_t want_corrupt = 0;
  for (const ObjectKey& k : pinned_keys) {
    const Expect& e = by_key[k];
    buffers.push_back(std::make_unique<AlignedBuffer>(e.payload.size()));
    views.push_back(MutableBuffer{buffers.back()->data, buffers.back()->size});
    if (!e.payload_ok) ++want_corrupt;
  }
  const Bitmap loaded =
      Await([&](LoadCallback cb) { adapter->SubmitLoad(pinned_keys, views, std::move(cb)); });
  for (size_t i = 0; i < pinned_keys.size(); ++i) {
    const Expect& e = by_key[pinned_keys[i]];
    FUZZ_CHECK(loaded.Test(i) == e.payload_ok);  // bad bytes are never reported as data
    if (loaded.Test(i)) {
      FUZZ_CHECK(std::memcmp(buffers[i]->data, e.payload.data(), e.payload.size()) == 0);
    }
    FUZZ_CHECK(FsPeer::Contains(*adapter, pinned_keys[i]) == e.payload_ok);  // corrupt: dropped
  }
  FUZZ_CHECK(adapter->stats().corrupt_reads == rec.dropped + want_corrupt);

  adapter->Unpin(pinned_keys);
  L2AdapterStats st = adapter->stats();
  FUZZ_CHECK(st.pins == 0);
  FUZZ_CHECK(st.pinned_objects == 0);
  FUZZ_CHECK(st.bad_unpins == 0);
  FUZZ_CHECK(FsPeer::TotalPins(*adapter) == 0);
  const uint64_t held = st.objects;
  FUZZ_CHECK(held == kept - want_corrupt);
  adapter->Close();
  adapter.reset();

  // Restart: exactly what the first adapter held comes back; nothing is left to drop.
  created = FileSystemL2Adapter::Create(opts);
  if (!created.ok()) Fail("Create after restart: " + created.status().ToString());
  adapter = std::move(created).value();
  FUZZ_CHECK(adapter->recovery().indexed == held);
  FUZZ_CHECK(adapter->recovery().dropped == 0);
  FUZZ_CHECK(adapter->recovery().temp_files_removed == 0);
  FUZZ_CHECK(adapter->recovery().evicted == 0);
  for (const ObjectKey& k : pinned_keys) {
    FUZZ_CHECK(FsPeer::Contains(*adapter, k) == by_key[k].payload_ok);
  }
}

}  // namespace
}  // namespace lmcache_cpp::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace lmcache_cpp;
  // The adapter warns once per adapter when a file system refuses O_DIRECT; that is expected.
  SetLogSink([](LogLevel, const std::string&) {}, LogLevel::kError);
  const char* env = std::getenv("FUZZ_TMPDIR");
  std::string parent = env != nullptr && *env != '\0' ? env : "";
  if (parent.empty()) parent = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  std::string tmpl = parent + "/lmcache_fs_fuzz.XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    std::perror("fs_adapter_fuzzer: mkdtemp");
    std::abort();
  }
  fuzz::base_dir = new std::string(tmpl);
  // Runs when libFuzzer ends with exit(); .ci/fuzz removes $FUZZ_TMPDIR for the _Exit() cases.
  std::atexit([] { fuzz::RemoveTree(*fuzz::base_dir); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  lmcache_cpp::fuzz::RunOne(data, size);
  return 0;
}
