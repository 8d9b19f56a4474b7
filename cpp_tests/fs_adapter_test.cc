// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/fs_adapter.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "l2_test_util.h"
#include "sync_point.h"
#include "test_util.h"
#include "testing/adapter_peers.h"

namespace lmcache_cpp {
namespace {

namespace fs = std::filesystem;
using namespace testutil;              // NOLINT(build/namespaces): the L2 test helpers
using namespace testutil::sync_calls;  // NOLINT(build/namespaces)
using FsPeer = testing::FileSystemAdapterPeer;

constexpr auto kLong = std::chrono::seconds(30);

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)),
                              std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void FlipByte(const std::string& path, size_t offset) {
  auto bytes = ReadFile(path);
  ASSERT_LT(offset, bytes.size());
  bytes[offset] ^= 0x5A;
  WriteFile(path, bytes);
}

uint32_t LoadU32(const std::vector<uint8_t>& b, size_t off) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(b[off + i]) << (8 * i);
  return v;
}
void StoreU32(std::vector<uint8_t>* b, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*b)[off + i] = static_cast<uint8_t>(v >> (8 * i));
}

// Files under `dir` whose name contains `part`.
size_t CountFiles(const std::string& dir, const std::string& part) {
  size_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file() && e.path().filename().string().find(part) != std::string::npos) ++n;
  }
  return n;
}

// A 4096-aligned buffer.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t n) : size(n) {
    void* p = nullptr;
    EXPECT_EQ(posix_memalign(&p, 4096, n == 0 ? 4096 : n), 0);
    data = static_cast<uint8_t*>(p);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data = nullptr;
  size_t size = 0;
};

class FileSystemAdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir();
    if (tmpl.empty() || tmpl.back() != '/') tmpl += '/';
    tmpl += "lmcache_fs_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    ASSERT_NE(::mkdtemp(buf.data()), nullptr);
    root_ = buf.data();
    dir_ = root_ + "/l2/objects";  // created (with its parent) by the adapter
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  std::unique_ptr<FileSystemL2Adapter> Open(FileSystemAdapterOptions o = {}) {
    o.directory = dir_;
    auto r = FileSystemL2Adapter::Create(o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return nullptr;
    return std::move(r).value();
  }

  std::string root_;
  std::string dir_;
};

TEST_F(FileSystemAdapterTest, CreateRejectsBadOptions) {
  FileSystemAdapterOptions o;
  auto r = FileSystemL2Adapter::Create(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  o.directory = dir_;
  o.io_threads = 0;
  r = FileSystemL2Adapter::Create(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  // A regular file where the directory should be.
  WriteFile(root_ + "/plain", {1, 2, 3});
  o.directory = root_ + "/plain";
  o.io_threads = 1;
  r = FileSystemL2Adapter::Create(o);
  EXPECT_FALSE(r.ok());
}

TEST_F(FileSystemAdapterTest, StoreLookupLoadRoundTripPreservesBytes) {
  auto a = Open();
  std::vector<ObjectKey> keys = {Key(0), Key(1, 3), Key(2, -1), Key(3), Key(4)};
  std::vector<std::vector<uint8_t>> data = {Pattern(0, 0), Pattern(1, 1), Pattern(2, 4096),
                                            Pattern(3, 100003), Pattern(4, 3u << 20)};
  Status st;
  EXPECT_TRUE(Store(*a, keys, data, &st).All());
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(Lookup(*a, keys, &st).All());
  std::vector<std::vector<uint8_t>> out;
  for (const auto& d : data) out.emplace_back(d.size(), 0);
  EXPECT_TRUE(Load(*a, keys, &out, &st).All());
  EXPECT_TRUE(st.ok());
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_EQ(out[i], data[i]) << "key " << i;
  a->Unpin(keys);
  L2AdapterStats s = a->stats();
  EXPECT_EQ(s.objects, keys.size());
  uint64_t bytes = 0;
  for (const auto& d : data) bytes += kFsObjectHeaderSize + d.size();
  EXPECT_EQ(s.bytes, bytes);
  EXPECT_EQ(s.pins, 0u);
  EXPECT_EQ(s.corrupt_reads, 0u);
  EXPECT_EQ(s.in_flight, 0u);
  EXPECT_EQ(CountFiles(dir_, ".tmp-"), 0u);
}

TEST_F(FileSystemAdapterTest, WritesTheDocumentedFileFormat) {
  auto a = Open();
  const ObjectKey key = Key(7, 5);
  const auto data = Pattern(7, 10000);
  Store(*a, {key}, {data});
  const std::string hex = key.chunk.ToHex();
  const std::string path = dir_ + "/" + hex.substr(0, 2) + "/" + hex + ".5.kv";
  EXPECT_EQ(a->PathFor(key), path);
  auto file = ReadFile(path);
  ASSERT_EQ(file.size(), kFsObjectHeaderSize + data.size());
  EXPECT_EQ(std::memcmp(file.data(), "LMCCPPKV", 8), 0);
  EXPECT_EQ(LoadU32(file, 8), 1u);
  EXPECT_EQ(LoadU32(file, 12), 4096u);
  EXPECT_EQ(std::memcmp(file.data() + 16, key.chunk.bytes.data(), 32), 0);
  EXPECT_EQ(static_cast<int32_t>(LoadU32(file, 48)), 5);
  EXPECT_EQ(LoadU32(file, 56), data.size());
  EXPECT_EQ(LoadU32(file, 60), 0u);
  EXPECT_EQ(LoadU32(file, 64), internal::Crc32c(data.data(), data.size()));
  EXPECT_EQ(LoadU32(file, 68), internal::Crc32c(file.data(), 68));
  EXPECT_TRUE(std::equal(data.begin(), data.end(), file.begin() + kFsObjectHeaderSize));
}

TEST_F(FileSystemAdapterTest, LookupPinsOnlyPresentKeysAndUnpinReturnsPinsToZero) {
  auto a = Open();
  Store(*a, Keys(0, 3), Patterns(0, 3, 100));
  std::vector<ObjectKey> asked = {Key(0), Key(50), Key(1), Key(51), Key(2)};
  EXPECT_EQ(Lookup(*a, asked).ToString(), "10101");
  EXPECT_EQ(Lookup(*a, {Key(0)}).ToString(), "1");
  EXPECT_EQ(FsPeer::PinCount(*a, Key(0)), 2u);
  EXPECT_EQ(FsPeer::PinCount(*a, Key(50)), 0u);
  EXPECT_EQ(FsPeer::TotalPins(*a), 4u);
  a->Unpin(Keys(0, 3));
  a->Unpin({Key(0)});
  EXPECT_EQ(FsPeer::TotalPins(*a), 0u);
  a->Unpin({Key(0), Key(50)});
  EXPECT_EQ(a->stats().bad_unpins, 2u);
  EXPECT_EQ(a->stats().pinned_objects, 0u);
}

TEST_F(FileSystemAdapterTest, StoreOfPresentKeyIsReportedStoredWithoutRewriting) {
  auto a = Open();
  Store(*a, {Key(1)}, {Pattern(1, 500)});
  EXPECT_TRUE(Store(*a, {Key(1)}, {Pattern(2, 500)}).All());
  ExpectLoadsPattern(*a, 1, 500);
}

TEST_F(FileSystemAdapterTest, DataSurvivesARestart) {
  auto keys = Keys(0, 6);
  auto data = Patterns(0, 6, 20000);
  {
    auto a = Open();
    EXPECT_TRUE(Store(*a, keys, data).All());
  }  // destroyed (closed)
  auto b = Open();
  EXPECT_EQ(b->recovery().indexed, 6u);
  EXPECT_EQ(b->recovery().dropped, 0u);
  EXPECT_TRUE(Lookup(*b, keys).All());
  auto out = Zeros(6, 20000);
  EXPECT_TRUE(Load(*b, keys, &out).All());
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_EQ(out[i], data[i]);
  b->Unpin(keys);
  EXPECT_EQ(b->stats().objects, 6u);
  EXPECT_EQ(b->stats().bytes, 6u * (kFsObjectHeaderSize + 20000));
}

// Stores key 0 (and neighbours), damages key 0's file with `damage`, and checks that a load of
// key 0 is a miss that never returns the stored bytes, counts one corrupt read, drops the file,
// and leaves the other keys intact.
class FileSystemAdapterCorruptionTest : public FileSystemAdapterTest {
 protected:
  void ExpectMissAfter(const std::function<void(const std::string& path)>& damage) {
    auto a = Open();
    auto data = Patterns(0, 3, 9000);
    ASSERT_TRUE(Store(*a, Keys(0, 3), data).All());
    const std::string path = a->PathFor(Key(0));
    damage(path);
    auto out = Zeros(3, 9000);
    Status st;
    Bitmap bits = Load(*a, Keys(0, 3), &out, &st);
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(bits.ToString(), "011");
    EXPECT_EQ(out[1], data[1]);
    EXPECT_EQ(out[2], data[2]);
    L2AdapterStats s = a->stats();
    EXPECT_EQ(s.corrupt_reads, 1u);
    EXPECT_EQ(s.objects, 2u);
    EXPECT_FALSE(FsPeer::Contains(*a, Key(0)));
    EXPECT_FALSE(fs::exists(path));
    EXPECT_EQ(Lookup(*a, {Key(0)}).ToString(), "0");
    // Loading again is a plain miss, not another corrupt read.
    EXPECT_EQ(Load(*a, {Key(0)}, &out).ToString(), "0");
    EXPECT_EQ(a->stats().corrupt_reads, 1u);
  }

  // Writes `damage` into key 0's file, restarts, and checks the file was dropped on start-up.
  void ExpectDroppedAtStartup(const std::function<void(const std::string& path)>& damage) {
    std::string path;
    {
      auto a = Open();
      ASSERT_TRUE(Store(*a, Keys(0, 2), Patterns(0, 2, 9000)).All());
      path = a->PathFor(Key(0));
    }
    damage(path);
    auto b = Open();
    EXPECT_EQ(b->recovery().indexed, 1u);
    EXPECT_EQ(b->recovery().dropped, 1u);
    EXPECT_EQ(b->stats().corrupt_reads, 1u);
    EXPECT_FALSE(fs::exists(path));
    EXPECT_EQ(Lookup(*b, Keys(0, 2)).ToString(), "01");
    b->Unpin({Key(1)});
  }
};

TEST_F(FileSystemAdapterCorruptionTest, TruncatedFileReadsAsAMiss) {
  ExpectMissAfter([](const std::string& p) { fs::resize_file(p, kFsObjectHeaderSize + 100); });
}

TEST_F(FileSystemAdapterCorruptionTest, TruncatedFileIsDroppedAtStartup) {
  ExpectDroppedAtStartup([](const std::string& p) { fs::resize_file(p, 4000); });
}

TEST_F(FileSystemAdapterCorruptionTest, FlippedPayloadByteReadsAsAMiss) {
  ExpectMissAfter([](const std::string& p) { FlipByte(p, kFsObjectHeaderSize + 4500); });
}

TEST_F(FileSystemAdapterCorruptionTest, FlippedHeaderByteReadsAsAMiss) {
  ExpectMissAfter([](const std::string& p) { FlipByte(p, 20); });  // inside the key
}

TEST_F(FileSystemAdapterCorruptionTest, FlippedHeaderByteIsDroppedAtStartup) {
  ExpectDroppedAtStartup([](const std::string& p) { FlipByte(p, 57); });  // payload size
}

void RewriteVersion(const std::string& path, uint32_t version) {
  auto b = ReadFile(path);
  StoreU32(&b, 8, version);
  StoreU32(&b, 68, internal::Crc32c(b.data(), 68));  // a well-formed header of another version
  WriteFile(path, b);
}

TEST_F(FileSystemAdapterCorruptionTest, OtherFormatVersionReadsAsAMiss) {
  ExpectMissAfter([](const std::string& p) { RewriteVersion(p, 2); });
}

TEST_F(FileSystemAdapterCorruptionTest, OtherFormatVersionIsDroppedAtStartup) {
  ExpectDroppedAtStartup([](const std::string& p) { RewriteVersion(p, 2); });
}

TEST_F(FileSystemAdapterTest, FileRenamedToAnotherKeysNameReadsAsAMiss) {
  auto a = Open();
  auto data = Patterns(0, 2, 9000);
  ASSERT_TRUE(Store(*a, Keys(0, 2), data).All());
  // Key 1's name now holds key 0's (valid, same-size) object.
  fs::rename(a->PathFor(Key(0)), a->PathFor(Key(1)));
  auto out = Zeros(1, 9000);
  Bitmap bits = Load(*a, {Key(1)}, &out);
  EXPECT_TRUE(bits.None());
  EXPECT_NE(out[0], data[0]);
  EXPECT_EQ(a->stats().corrupt_reads, 1u);
  EXPECT_FALSE(FsPeer::Contains(*a, Key(1)));
}

TEST_F(FileSystemAdapterCorruptionTest, FileRenamedToAnotherKeysNameIsDroppedAtStartup) {
  ExpectDroppedAtStartup([](const std::string& p) {
    // Key 0's name gets key 1's object (its file is in another subdirectory).
    std::string other;
    for (const auto& e :
         fs::recursive_directory_iterator(fs::path(p).parent_path().parent_path())) {
      if (e.is_regular_file() && e.path().string() != p) other = e.path().string();
    }
    ASSERT_FALSE(other.empty());
    fs::copy_file(other, p, fs::copy_options::overwrite_existing);
  });
}

TEST_F(FileSystemAdapterTest, LeftoverTempFilesAreRemovedAtStartupAndNeverIndexed) {
  std::string path0, path1;
  {
    auto a = Open();
    ASSERT_TRUE(Store(*a, {Key(0)}, {Pattern(0, 5000)}).All());
    path0 = a->PathFor(Key(0));
    path1 = a->PathFor(Key(1));
  }
  // Stores interrupted before their rename: a complete-looking temp file for key 1 and a
  // half-written one for key 0.
  fs::create_directories(fs::path(path1).parent_path());
  WriteFile(path1 + ".tmp-0123456789abcdef", ReadFile(path0));
  WriteFile(path0 + ".tmp-fedcba9876543210", {1, 2, 3});
  auto b = Open();
  EXPECT_EQ(b->recovery().temp_files_removed, 2u);
  EXPECT_EQ(b->recovery().indexed, 1u);
  EXPECT_EQ(b->recovery().dropped, 0u);
  EXPECT_EQ(CountFiles(dir_, ".tmp-"), 0u);
  EXPECT_EQ(Lookup(*b, {Key(0), Key(1)}).ToString(), "10");
  b->Unpin({Key(0)});
  ExpectLoadsPattern(*b, 0, 5000);
}

TEST_F(FileSystemAdapterTest, FilesThatAreNotObjectsAreLeftAlone) {
  {
    auto a = Open();
    ASSERT_TRUE(Store(*a, {Key(0)}, {Pattern(0, 100)}).All());
  }
  WriteFile(dir_ + "/README", {'h', 'i'});
  fs::create_directories(dir_ + "/zz");
  WriteFile(dir_ + "/zz/notes.txt", {'x'});
  auto b = Open();
  EXPECT_EQ(b->recovery().indexed, 1u);
  EXPECT_EQ(b->recovery().dropped, 0u);
  EXPECT_TRUE(fs::exists(dir_ + "/README"));
  EXPECT_TRUE(fs::exists(dir_ + "/zz/notes.txt"));
}

TEST_F(FileSystemAdapterTest, CapacityEvictsOldestUnpinnedFiles) {
  FileSystemAdapterOptions o;
  const uint64_t file = kFsObjectHeaderSize + 1000;
  o.capacity_bytes = 3 * file;
  auto a = Open(o);
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(Store(*a, {Key(i)}, {Pattern(i, 1000)}).All());
  Lookup(*a, {Key(0)});  // the oldest is pinned
  EXPECT_TRUE(Store(*a, {Key(3)}, {Pattern(3, 1000)}).All());
  EXPECT_TRUE(FsPeer::Contains(*a, Key(0)));
  EXPECT_FALSE(FsPeer::Contains(*a, Key(1)));
  EXPECT_FALSE(fs::exists(a->PathFor(Key(1))));
  EXPECT_TRUE(FsPeer::Contains(*a, Key(2)));
  EXPECT_TRUE(Store(*a, {Key(4)}, {Pattern(4, 1000)}).All());
  EXPECT_FALSE(FsPeer::Contains(*a, Key(2)));
  EXPECT_TRUE(FsPeer::Contains(*a, Key(0)));
  L2AdapterStats s = a->stats();
  EXPECT_EQ(s.evictions, 2u);
  EXPECT_LE(s.bytes, o.capacity_bytes);
  ExpectLoadsPattern(*a, 0, 1000);
  a->Unpin({Key(0)});
}

TEST_F(FileSystemAdapterTest, PinnedFilesAreNeverEvictedAndAStoreThatCannotFitFails) {
  FileSystemAdapterOptions o;
  const uint64_t file = kFsObjectHeaderSize + 1000;
  o.capacity_bytes = 3 * file;
  auto a = Open(o);
  ASSERT_TRUE(Store(*a, Keys(0, 3), Patterns(0, 3, 1000)).All());
  Lookup(*a, Keys(0, 2));
  // Needs more than the one evictable file frees: fails and evicts nothing.
  Status st;
  Bitmap bits = Store(*a, {Key(10)}, {Pattern(10, 1000 + file)}, &st);
  EXPECT_TRUE(st.ok());
  EXPECT_TRUE(bits.None());
  EXPECT_TRUE(FsPeer::Contains(*a, Key(2)));
  EXPECT_FALSE(fs::exists(a->PathFor(Key(10))));
  EXPECT_EQ(CountFiles(dir_, ".tmp-"), 0u);
  for (uint64_t i = 20; i < 30; ++i) EXPECT_TRUE(Store(*a, {Key(i)}, {Pattern(i, 1000)}).All());
  EXPECT_TRUE(FsPeer::Contains(*a, Key(0)));
  EXPECT_TRUE(FsPeer::Contains(*a, Key(1)));
  a->Unpin(Keys(0, 2));
  EXPECT_TRUE(Store(*a, {Key(10)}, {Pattern(10, 1000 + file)}).All());
  EXPECT_LE(a->stats().bytes, o.capacity_bytes);
}

TEST_F(FileSystemAdapterTest, RestartWithSmallerCapacityEvictsOldest) {
  {
    auto a = Open();
    for (uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(Store(*a, {Key(i)}, {Pattern(i, 1000)}).All());
  }
  // Distinct mtimes in store order, so "oldest" is well defined even on coarse clocks.
  {
    auto a = Open();  // only to get paths
    for (uint64_t i = 0; i < 4; ++i) {
      struct timespec ts[2] = {{static_cast<time_t>(1000000 + i), 0},
                               {static_cast<time_t>(1000000 + i), 0}};
      ASSERT_EQ(::utimensat(AT_FDCWD, a->PathFor(Key(i)).c_str(), ts, 0), 0);
    }
  }
  FileSystemAdapterOptions o;
  o.capacity_bytes = 2 * (kFsObjectHeaderSize + 1000);
  auto b = Open(o);
  EXPECT_EQ(b->recovery().evicted, 2u);
  EXPECT_EQ(Lookup(*b, Keys(0, 4)).ToString(), "0011");
  b->Unpin(Keys(2, 2));
}

TEST_F(FileSystemAdapterTest, LoadIntoWrongSizeBufferIsAMissAndKeepsTheFile) {
  auto a = Open();
  ASSERT_TRUE(Store(*a, {Key(0)}, {Pattern(0, 1000)}).All());
  std::vector<std::vector<uint8_t>> out = {std::vector<uint8_t>(999)};
  EXPECT_TRUE(Load(*a, {Key(0)}, &out).None());
  out = {std::vector<uint8_t>(1001)};
  EXPECT_TRUE(Load(*a, {Key(0)}, &out).None());
  EXPECT_EQ(a->stats().corrupt_reads, 0u);
  EXPECT_EQ(a->stats().load_misses, 2u);
  out = {std::vector<uint8_t>(1000)};
  EXPECT_TRUE(Load(*a, {Key(0)}, &out).All());
  EXPECT_EQ(out[0], Pattern(0, 1000));
}

TEST_F(FileSystemAdapterTest, CorruptPinnedObjectKeepsItsPinsForUnpin) {
  auto a = Open();
  ASSERT_TRUE(Store(*a, {Key(0)}, {Pattern(0, 1000)}).All());
  ASSERT_TRUE(Lookup(*a, {Key(0)}).All());
  FlipByte(a->PathFor(Key(0)), kFsObjectHeaderSize + 1);
  auto out = Zeros(1, 1000);
  EXPECT_TRUE(Load(*a, {Key(0)}, &out).None());
  EXPECT_FALSE(FsPeer::Contains(*a, Key(0)));
  EXPECT_EQ(FsPeer::PinCount(*a, Key(0)), 1u);
  a->Unpin({Key(0)});
  EXPECT_EQ(FsPeer::TotalPins(*a), 0u);
  EXPECT_EQ(a->stats().bad_unpins, 0u);
}

class FileSystemAdapterDirectIoTest : public FileSystemAdapterTest,
                                      public ::testing::WithParamInterface<bool> {};

TEST_P(FileSystemAdapterDirectIoTest, AlignedAndUnalignedBuffersGiveCorrectBytes) {
  FileSystemAdapterOptions o;
  o.o_direct = GetParam();
  o.fsync = true;
  auto a = Open(o);
  constexpr size_t kAligned = 64 * 4096;
  AlignedBuffer src(kAligned), dst(kAligned);
  const auto pattern = Pattern(1, kAligned);
  std::memcpy(src.data, pattern.data(), kAligned);
  auto odd = Pattern(2, 12345);  // unaligned size: buffered even with o_direct
  Completion s;
  a->SubmitStore({Key(1), Key(2)}, {ConstBuffer{src.data, kAligned}, In(odd)}, s.Callback());
  ASSERT_TRUE(s.Wait());
  ASSERT_TRUE(s.bits().All()) << s.status().ToString();
  std::vector<uint8_t> odd_out(odd.size());
  Completion l;
  a->SubmitLoad({Key(1), Key(2)}, {MutableBuffer{dst.data, kAligned}, Out(odd_out)}, l.Callback());
  ASSERT_TRUE(l.Wait());
  EXPECT_TRUE(l.bits().All()) << l.status().ToString();
  EXPECT_EQ(std::memcmp(dst.data, pattern.data(), kAligned), 0);
  EXPECT_EQ(odd_out, odd);
  if (!GetParam()) {
    EXPECT_EQ(a->direct_io_files(), 0u);
  }
  // With o_direct on this file system: either both aligned accesses used O_DIRECT, or it was
  // refused and the adapter fell back cleanly (bytes above are right either way).
  if (GetParam()) {
    EXPECT_TRUE(a->direct_io_files() == 2u || a->direct_io_files() == 0u);
  }
  // A flipped payload byte is caught on the direct path too.
  FlipByte(a->PathFor(Key(1)), kFsObjectHeaderSize + 4096 * 3);
  Completion l2;
  a->SubmitLoad({Key(1)}, {MutableBuffer{dst.data, kAligned}}, l2.Callback());
  ASSERT_TRUE(l2.Wait());
  EXPECT_TRUE(l2.bits().None());
  EXPECT_EQ(a->stats().corrupt_reads, 1u);
}

INSTANTIATE_TEST_SUITE_P(FileSystemODirect, FileSystemAdapterDirectIoTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "On" : "Off";
                         });

TEST_F(FileSystemAdapterTest, OneCallbackPerSubmitWhoseKeysSpreadOverThePool) {
  FileSystemAdapterOptions o;
  o.io_threads = 4;
  auto a = Open(o);
  auto keys = Keys(0, 32);
  auto data = Patterns(0, 32, 30000);
  EXPECT_TRUE(Store(*a, keys, data).All());
  auto out = Zeros(32, 30000);
  EXPECT_TRUE(Load(*a, keys, &out).All());
  for (size_t i = 0; i < keys.size(); ++i) ASSERT_EQ(out[i], data[i]);
  EXPECT_EQ(a->stats().in_flight, 0u);
}

TEST_F(FileSystemAdapterTest, CloseCancelsQueuedOperationsAndLaterSubmitsAreUnavailable) {
  LMCACHE_REQUIRE_SYNC_POINTS();
  FileSystemAdapterOptions o;
  o.io_threads = 1;
  auto a = Open(o);
  ASSERT_TRUE(Store(*a, {Key(0)}, {Pattern(0, 100)}).All());
  // The only worker is held inside a callback until Close() has begun.
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  Completion first;
  auto first_cb = first.Callback();
  a->SubmitLookupAndPin({Key(0)}, [&](const Status& s, const Bitmap& b) {
    first_cb(s, b);
    entered.set_value();
    released.wait();
  });
  entered.get_future().wait();
  constexpr int kQueued = 5;
  std::vector<std::unique_ptr<Completion>> queued;
  std::vector<uint8_t> d(100), out(100);
  for (int i = 0; i < kQueued; ++i) {
    queued.push_back(std::make_unique<Completion>());
    if (i % 2 == 0) {
      a->SubmitStore({Key(10 + i), Key(20 + i)}, {In(d), In(d)}, queued.back()->Callback());
    } else {
      a->SubmitLoad({Key(0)}, {Out(out)}, queued.back()->Callback());
    }
  }
  internal::SyncPoints::Reset();
  std::thread closer([&] { a->Close(); });
  ASSERT_TRUE(internal::SyncPoints::WaitFor("WorkerPool::Close:Closing", 1, kLong));
  // Submitted while Close runs: Unavailable, on the adapter's (still live) worker.
  Completion during;
  a->SubmitLookupAndPin({Key(0)}, during.Callback());
  release.set_value();
  closer.join();
  EXPECT_EQ(first.calls(), 1);
  EXPECT_TRUE(first.status().ok());
  for (auto& c : queued) {
    EXPECT_EQ(c->calls(), 1);
    EXPECT_EQ(c->status().code(), StatusCode::kCancelled);
    EXPECT_TRUE(c->bits().None());
    EXPECT_NE(c->thread(), std::this_thread::get_id());
  }
  EXPECT_EQ(during.calls(), 1);
  EXPECT_EQ(during.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(during.thread(), std::this_thread::get_id());
  EXPECT_FALSE(FsPeer::Contains(*a, Key(10)));
  // After Close: Unavailable, inline.
  Completion late;
  a->SubmitStore({Key(30)}, {In(d)}, late.Callback());
  EXPECT_EQ(late.calls(), 1);
  EXPECT_EQ(late.status().code(), StatusCode::kUnavailable);
  a->Close();  // idempotent
  EXPECT_EQ(a->stats().in_flight, 0u);
  a->Unpin({Key(0)});
  EXPECT_EQ(FsPeer::TotalPins(*a), 0u);
}

TEST_F(FileSystemAdapterTest, ConcurrentStoresOfOneKeyWriteItOnce) {
  auto a = Open();
  constexpr int kThreads = 6;
  const auto data = Pattern(9, 200000);
  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::atomic<int> stored{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      start.wait();
      Completion c;
      a->SubmitStore({Key(9)}, {In(data)}, c.Callback());
      ASSERT_TRUE(c.Wait());
      if (c.bits().All()) stored++;
    });
  }
  go.set_value();
  for (auto& th : threads) th.join();
  EXPECT_EQ(stored.load(), kThreads);
  EXPECT_EQ(a->stats().objects, 1u);
  EXPECT_EQ(a->stats().bytes_written, data.size());
  EXPECT_EQ(CountFiles(dir_, ".kv"), 1u);
  EXPECT_EQ(CountFiles(dir_, ".tmp-"), 0u);
}

TEST_F(FileSystemAdapterTest, ConcurrentSubmittersGetEveryCallbackExactlyOnceOffTheirThread) {
  FileSystemAdapterOptions o;
  o.io_threads = 3;
  o.capacity_bytes = 20 * (kFsObjectHeaderSize + 3000);  // evictions race with loads
  auto a = Open(o);
  testutil::StoreLookupLoadRounds(*a, /*threads=*/4, /*rounds=*/60, /*keys=*/30, /*size=*/3000);
  L2AdapterStats s = a->stats();
  EXPECT_EQ(s.pins, 0u);
  EXPECT_EQ(s.bad_unpins, 0u);
  EXPECT_EQ(s.corrupt_reads, 0u);
  EXPECT_EQ(s.in_flight, 0u);
  EXPECT_LE(s.bytes, o.capacity_bytes);
  EXPECT_EQ(CountFiles(dir_, ".kv"), s.objects);
}

}  // namespace
}  // namespace lmcache_cpp
