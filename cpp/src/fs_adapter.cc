// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/fs_adapter.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <utility>

#include "crc32c.h"
#include "l2_submit_check.h"
#include "lmcache_cpp/logging.h"
#include "worker_pool.h"

namespace lmcache_cpp {
namespace {

using DoneFn = std::function<void(const Status&, const Bitmap&)>;

constexpr size_t kWholeBatch = std::numeric_limits<size_t>::max();
constexpr size_t kHeaderCrcOffset = 68;      // the header CRC covers [0, 68)
constexpr uint64_t kReadPiece = 512u << 10;  // buffered payload reads: checksum 512 KiB at a time
constexpr uint64_t kAlign = 4096;            // O_DIRECT alignment of buffers and sizes

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// REQUIRES: `h` holds kFsObjectHeaderSize bytes.
void EncodeHeader(uint8_t* h, const ObjectKey& key, uint64_t payload_size, uint32_t payload_crc) {
  std::memset(h, 0, kFsObjectHeaderSize);
  std::memcpy(h, kFsObjectMagic, sizeof(kFsObjectMagic));
  PutU32(h + 8, kFsObjectFormatVersion);
  PutU32(h + 12, static_cast<uint32_t>(kFsObjectHeaderSize));
  std::memcpy(h + 16, key.chunk.bytes.data(), kChunkHashSize);
  PutU32(h + 48, static_cast<uint32_t>(key.kv_rank));
  PutU64(h + 56, payload_size);
  PutU32(h + 64, payload_crc);
  PutU32(h + kHeaderCrcOffset, internal::Crc32c(h, kHeaderCrcOffset));
}

struct Header {
  ObjectKey key;
  uint64_t payload_size = 0;
  uint32_t payload_crc = 0;
};

// False unless `h` is an intact header of this format version.
bool DecodeHeader(const uint8_t* h, Header* out) {
  if (std::memcmp(h, kFsObjectMagic, sizeof(kFsObjectMagic)) != 0) return false;
  if (GetU32(h + 8) != kFsObjectFormatVersion) return false;
  if (GetU32(h + 12) != kFsObjectHeaderSize) return false;
  if (GetU32(h + kHeaderCrcOffset) != internal::Crc32c(h, kHeaderCrcOffset)) return false;
  std::memcpy(out->key.chunk.bytes.data(), h + 16, kChunkHashSize);
  out->key.kv_rank = static_cast<int32_t>(GetU32(h + 48));
  out->payload_size = GetU64(h + 56);
  out->payload_crc = GetU32(h + 64);
  return true;
}

std::string FileName(const ObjectKey& key) {
  return key.chunk.ToHex() + "." + std::to_string(key.kv_rank) + ".kv";
}

// Parses "<64 hex>.<rank>.kv" written exactly as FileName writes it.
bool ParseFileName(const std::string& name, ObjectKey* key) {
  if (name.size() < kChunkHashSize * 2 + 5 || name[kChunkHashSize * 2] != '.') return false;
  Result<ChunkHash> chunk = ChunkHash::FromHex(name.substr(0, kChunkHashSize * 2));
  if (!chunk.ok()) return false;
  const std::string rank =
      name.substr(kChunkHashSize * 2 + 1, name.size() - kChunkHashSize * 2 - 4);
  if (rank.empty() || rank.size() > 11) return false;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(rank.c_str(), &end, 10);
  if (errno != 0 || end != rank.c_str() + rank.size()) return false;
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
    return false;
  }
  key->chunk = *chunk;
  key->kv_rank = static_cast<int32_t>(v);
  return FileName(*key) == name;  // canonical spelling only
}

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

bool IsHexPair(const char* s) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  return s[0] != '\0' && s[1] != '\0' && s[2] == '\0' && hex(s[0]) && hex(s[1]);
}

// Closes the descriptor it owns.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now; returns close()'s errno (0 on success).
  int Reset() {
    int err = 0;
    if (fd_ >= 0 && ::close(fd_) != 0) err = errno;
    fd_ = -1;
    return err;
  }

 private:
  int fd_;
};

// Reads up to n bytes at `off`. Returns the count (less than n only at end of file) or -errno.
int64_t PreadFull(int fd, void* buf, uint64_t n, uint64_t off) {
  uint64_t done = 0;
  while (done < n) {
    const ssize_t r =
        ::pread(fd, static_cast<uint8_t*>(buf) + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) break;
    done += static_cast<uint64_t>(r);
  }
  return static_cast<int64_t>(done);
}

// Writes n bytes at `off`. Returns 0 or -errno.
int PwriteFull(int fd, const void* buf, uint64_t n, uint64_t off) {
  uint64_t done = 0;
  while (done < n) {
    const ssize_t r = ::pwrite(fd, static_cast<const uint8_t*>(buf) + done, n - done,
                               static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) return -EIO;
    done += static_cast<uint64_t>(r);
  }
  return 0;
}

// mkdir -p.
Status MakeDirs(const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return Status::FromErrno(errno, "mkdir " + prefix);
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "stat " + path);
  if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument(path + " is not a directory");
  return Status::Ok();
}

Status SyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + dir);
  Fd guard(fd);
  if (::fsync(fd) != 0) return Status::FromErrno(errno, "fsync " + dir);
  return Status::Ok();
}

}  // namespace

struct FileSystemL2Adapter::Batch {
  Batch(OpType batch_type, std::vector<ObjectKey> batch_keys, DoneFn batch_done,
        Status checked = Status())
      : type(batch_type),
        keys(std::move(batch_keys)),
        done(std::move(batch_done)),
        pre_status(std::move(checked)) {}

  OpType type = OpType::kStore;
  std::vector<ObjectKey> keys;
  std::vector<ConstBuffer> in;
  std::vector<MutableBuffer> out;
  DoneFn done;
  Status pre_status;                   // non-OK: completes with it, nothing runs
  std::unique_ptr<uint8_t[]> results;  // per key 0/1; each byte written by one task
  std::atomic<size_t> remaining{1};
  std::atomic<bool> cancelled{false};
};

Result<std::unique_ptr<FileSystemL2Adapter>> FileSystemL2Adapter::Create(
    FileSystemAdapterOptions options) {
  while (options.directory.size() > 1 && options.directory.back() == '/') {
    options.directory.pop_back();
  }
  if (options.directory.empty()) {
    return Status::InvalidArgument("FileSystemL2Adapter: directory is empty");
  }
  if (options.io_threads == 0) {
    return Status::InvalidArgument("FileSystemL2Adapter: io_threads must be >= 1");
  }
  std::unique_ptr<FileSystemL2Adapter> adapter(new FileSystemL2Adapter(std::move(options)));
  LMCACHE_RETURN_IF_ERROR(adapter->Recover());
  adapter->pool_->Start(adapter->options_.io_threads, [a = adapter.get()] { a->WorkerLoop(); });
  return adapter;
}

FileSystemL2Adapter::FileSystemL2Adapter(FileSystemAdapterOptions options)
    : options_(std::move(options)), pool_(std::make_unique<internal::WorkerPool>(&mu_)) {
  std::random_device rd;
  tmp_salt_ = (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

FileSystemL2Adapter::~FileSystemL2Adapter() { Close(); }

std::string FileSystemL2Adapter::PathFor(const ObjectKey& key) const {
  std::string hex = key.chunk.ToHex();
  std::string path;
  path.reserve(options_.directory.size() + 4 + hex.size() + 16);
  path += options_.directory;
  path += '/';
  path.append(hex, 0, 2);
  path += '/';
  path += hex;
  path += '.';
  path += std::to_string(key.kv_rank);
  path += ".kv";
  return path;
}

std::string FileSystemL2Adapter::TempSuffix() {
  uint64_t x =
      tmp_salt_ + tmp_counter_.fetch_add(1, std::memory_order_relaxed) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  static const char kHex[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 0; i < 16; ++i) s[i] = kHex[(x >> (4 * i)) & 0xF];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Start-up

Status FileSystemL2Adapter::Recover() {
  const std::string& dir = options_.directory;
  LMCACHE_RETURN_IF_ERROR(MakeDirs(dir));
  std::vector<std::string> subdirs;
  {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return Status::FromErrno(errno, "opendir " + dir);
    while (const dirent* de = ::readdir(d)) {
      if (IsHexPair(de->d_name)) subdirs.emplace_back(de->d_name);
    }
    ::closedir(d);
  }
  struct Found {
    ObjectKey key;
    uint64_t payload_size;
    int64_t mtime_ns;
  };
  std::vector<Found> found;
  uint8_t header[kFsObjectHeaderSize];
  for (const std::string& sub : subdirs) {
    const std::string subpath = dir + "/" + sub;
    DIR* d = ::opendir(subpath.c_str());
    if (d == nullptr) continue;  // not a directory, or unreadable: not ours to judge
    std::vector<std::string> names;
    while (const dirent* de = ::readdir(d)) names.emplace_back(de->d_name);
    ::closedir(d);
    for (const std::string& name : names) {
      if (name == "." || name == "..") continue;
      const std::string path = subpath + "/" + name;
      if (name.find(".tmp-") != std::string::npos) {
        if (::unlink(path.c_str()) == 0) ++recovery_.temp_files_removed;
        continue;
      }
      if (!EndsWith(name, ".kv")) continue;  // not ours
      ObjectKey key;
      bool valid = ParseFileName(name, &key) && name.compare(0, 2, sub) == 0;
      Found f{key, 0, 0};
      if (valid) {
        valid = false;
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;  // vanished or unreadable: leave it
        Fd guard(fd);
        struct stat st;
        Header h;
        if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
            PreadFull(fd, header, sizeof(header), 0) == static_cast<int64_t>(sizeof(header)) &&
            DecodeHeader(header, &h) && h.key == key &&
            static_cast<uint64_t>(st.st_size) == kFsObjectHeaderSize + h.payload_size) {
          valid = true;
          f.payload_size = h.payload_size;
          f.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
        }
      }
      if (!valid) {
        ::unlink(path.c_str());
        ++recovery_.dropped;
        ++stats_.corrupt_reads;
        continue;
      }
      found.push_back(f);
    }
  }
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) {
    if (a.mtime_ns != b.mtime_ns) return a.mtime_ns < b.mtime_ns;
    return a.key < b.key;
  });
  std::lock_guard<std::mutex> lk(mu_);
  for (const Found& f : found) {
    fifo_.push_back(f.key);
    Entry& e = index_[f.key];
    e.ready = true;
    e.payload_size = f.payload_size;
    e.generation = ++next_generation_;
    e.fifo_pos = std::prev(fifo_.end());
    used_ += kFsObjectHeaderSize + f.payload_size;
  }
  recovery_.indexed = found.size();
  const uint64_t cap = options_.capacity_bytes;
  while (cap != 0 && used_ > cap && !fifo_.empty()) {
    DropLocked(index_.find(fifo_.front()));
    ++recovery_.evicted;
    ++stats_.evictions;
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Submission and workers

void FileSystemL2Adapter::SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                                      StoreCallback done) {
  Status checked = internal::CheckSubmitBuffers("SubmitStore", keys.size(), buffers);
  auto batch = std::make_shared<Batch>(OpType::kStore, std::move(keys), std::move(done), checked);
  batch->in = std::move(buffers);
  Submit(std::move(batch));
}

void FileSystemL2Adapter::SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) {
  Submit(std::make_shared<Batch>(OpType::kLookup, std::move(keys), std::move(done)));
}

void FileSystemL2Adapter::SubmitLoad(std::vector<ObjectKey> keys,
                                     std::vector<MutableBuffer> buffers, LoadCallback done) {
  Status checked = internal::CheckSubmitBuffers("SubmitLoad", keys.size(), buffers);
  auto batch = std::make_shared<Batch>(OpType::kLoad, std::move(keys), std::move(done), checked);
  batch->out = std::move(buffers);
  Submit(std::move(batch));
}

void FileSystemL2Adapter::Submit(std::shared_ptr<Batch> batch) {
  const size_t n = batch->keys.size();
  batch->results = std::make_unique<uint8_t[]>(n == 0 ? 1 : n);  // zero-initialised
  std::unique_lock<std::mutex> lk(mu_);
  ++stats_.in_flight;
  if (pool_->closing() && batch->pre_status.ok()) {
    batch->pre_status = Status::Unavailable("file-system L2 adapter is closed");
  }
  if (!pool_->has_workers()) {
    // Close() has joined every worker: nobody else can run the callback.
    lk.unlock();
    Complete(*batch);
    return;
  }
  const bool per_key = batch->pre_status.ok() && n > 0 && batch->type != OpType::kLookup;
  if (!per_key) {
    batch->remaining.store(1, std::memory_order_relaxed);
    control_queue_.push_back(Task{std::move(batch), kWholeBatch});
    lk.unlock();
    pool_->NotifyOne();
    return;
  }
  batch->remaining.store(n, std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) io_queue_.push_back(Task{batch, i});
  lk.unlock();
  if (n == 1) {
    pool_->NotifyOne();
  } else {
    pool_->NotifyAll();
  }
}

void FileSystemL2Adapter::WorkerLoop() {
  // Header scratch, aligned for O_DIRECT.
  alignas(kAlign) uint8_t scratch[kFsObjectHeaderSize];
  for (;;) {
    Task task;
    bool cancel = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (!pool_->WaitForWork(lk,
                              [this] { return !control_queue_.empty() || !io_queue_.empty(); })) {
        return;  // closing and drained
      }
      std::deque<Task>& q = !control_queue_.empty() ? control_queue_ : io_queue_;
      task = std::move(q.front());
      q.pop_front();
      cancel = pool_->closing();
    }
    Batch& b = *task.batch;
    if (!b.pre_status.ok()) {
      // Completes with pre_status below.
    } else if (cancel) {
      b.cancelled.store(true, std::memory_order_relaxed);
    } else {
      RunTask(task, scratch);
    }
    FinishTask(task);
  }
}

void FileSystemL2Adapter::RunTask(const Task& task, uint8_t* scratch) {
  Batch& b = *task.batch;
  // A store or load of no keys is queued as one whole-batch task (Submit): nothing to run.
  if (b.type != OpType::kLookup && task.index == kWholeBatch) return;
  switch (b.type) {
    case OpType::kLookup: LookupBatch(b); break;
    case OpType::kStore:
      b.results[task.index] = StoreOne(b.keys[task.index], b.in[task.index], scratch) ? 1 : 0;
      break;
    case OpType::kLoad:
      b.results[task.index] = LoadOne(b.keys[task.index], b.out[task.index], scratch) ? 1 : 0;
      break;
  }
}

void FileSystemL2Adapter::FinishTask(const Task& task) {
  // acq_rel: the last finisher sees every other task's result byte.
  if (task.batch->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) Complete(*task.batch);
}

void FileSystemL2Adapter::Complete(Batch& b) {
  const size_t n = b.keys.size();
  Bitmap bits(n);
  Status st = b.pre_status;
  if (st.ok() && b.cancelled.load(std::memory_order_relaxed)) {
    st = Status::Cancelled("file-system L2 adapter closed before the operation ran");
  }
  if (st.ok()) {
    for (size_t i = 0; i < n; ++i) {
      if (b.results[i]) bits.Set(i);
    }
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    internal::CountFinishedCall(b.type, n, bits.Popcount(), &stats_);
    --stats_.in_flight;
  }
  if (b.done) b.done(st, bits);
}

// ---------------------------------------------------------------------------------------------
// Operations

void FileSystemL2Adapter::LookupBatch(Batch& b) {
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < b.keys.size(); ++i) {
    auto it = index_.find(b.keys[i]);
    if (it == index_.end() || !it->second.ready) continue;
    if (it->second.pins++ == 0) {
      pinned_used_ += kFsObjectHeaderSize + it->second.payload_size;
      ++stats_.pinned_objects;
    }
    ++stats_.pins;
    b.results[i] = 1;
  }
}

bool FileSystemL2Adapter::StoreOne(const ObjectKey& key, const ConstBuffer& buf, uint8_t* scratch) {
  const uint64_t file_size = kFsObjectHeaderSize + buf.size;
  {
    std::unique_lock<std::mutex> lk(mu_);
    // Another worker writing this key finishes without waiting for anything: wait for it.
    write_cv_.wait(lk, [&] {
      auto it = index_.find(key);
      return it == index_.end() || it->second.ready;
    });
    if (index_.count(key) != 0) return true;  // present: not rewritten
    if (!MakeRoomLocked(file_size)) return false;
    Entry& e = index_[key];
    e.ready = false;
    e.payload_size = buf.size;
    reserved_ += file_size;
  }
  const std::string path = PathFor(key);
  const std::string tmp = path + ".tmp-" + TempSuffix();
  Status st = WriteObjectFile(tmp, key, buf, scratch);
  {
    std::lock_guard<std::mutex> lk(mu_);
    reserved_ -= file_size;
    auto it = index_.find(key);  // our entry: only its writer touches a non-ready entry
    if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
      st = Status::FromErrno(errno, "rename " + tmp);
    }
    if (st.ok()) {
      fifo_.push_back(key);
      it->second.ready = true;
      it->second.generation = ++next_generation_;
      it->second.fifo_pos = std::prev(fifo_.end());
      used_ += file_size;
      stats_.bytes_written += buf.size;
    } else {
      index_.erase(it);
    }
  }
  write_cv_.notify_all();
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    if (!store_failure_logged_.exchange(true)) {
      Log(LogLevel::kWarning,
          name() + ": store failed (further failures are only counted): " + st.ToString());
    }
    return false;
  }
  if (options_.fsync) {
    const Status ds = SyncDirectory(path.substr(0, path.rfind('/')));
    if (!ds.ok()) return false;  // written and indexed, but not as durable as promised
  }
  return true;
}

Status FileSystemL2Adapter::WriteObjectFile(const std::string& tmp, const ObjectKey& key,
                                            const ConstBuffer& buf, uint8_t* scratch) {
  // The checksum committed with the object when known (the store controller verified the bytes
  // against it just before this store): bytes that changed since then fail it on load.
  EncodeHeader(scratch, key, buf.size,
               buf.has_crc32c ? buf.crc32c : internal::Crc32c(buf.data, buf.size));
  bool direct = WantDirect(buf.data, buf.size);
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (direct ? O_DIRECT : 0);
    int fd = ::open(tmp.c_str(), flags, 0644);
    if (fd < 0 && errno == ENOENT) {  // first object of this subdirectory
      const std::string sub = tmp.substr(0, tmp.rfind('/'));
      if (::mkdir(sub.c_str(), 0755) != 0 && errno != EEXIST) {
        return Status::FromErrno(errno, "mkdir " + sub);
      }
      fd = ::open(tmp.c_str(), flags, 0644);
    }
    if (fd < 0) {
      const int err = errno;
      if (direct && err == EINVAL) {
        DisableDirect(err);
        direct = false;
        continue;
      }
      return Status::FromErrno(err, "open " + tmp);
    }
    Fd guard(fd);
    int rc = PwriteFull(fd, scratch, kFsObjectHeaderSize, 0);
    if (rc == 0 && buf.size > 0) rc = PwriteFull(fd, buf.data, buf.size, kFsObjectHeaderSize);
    if (rc == 0 && options_.fsync && ::fdatasync(fd) != 0) rc = -errno;
    if (rc == 0) {
      const int err = guard.Reset();
      if (err != 0) rc = -err;
    }
    if (rc != 0) {
      guard.Reset();
      ::unlink(tmp.c_str());
      if (direct && rc == -EINVAL) {
        DisableDirect(EINVAL);
        direct = false;
        continue;
      }
      return Status::FromErrno(-rc, "write " + tmp);
    }
    if (direct) direct_io_files_.fetch_add(1, std::memory_order_relaxed);
    return Status::Ok();
  }
  return Status::IoError("write " + tmp + ": O_DIRECT fallback failed");
}

bool FileSystemL2Adapter::LoadOne(const ObjectKey& key, const MutableBuffer& buf,
                                  uint8_t* scratch) {
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = index_.find(key);
    if (it == index_.end() || !it->second.ready) return false;
    if (it->second.payload_size != buf.size) return false;  // caller's mistake; file kept
    generation = it->second.generation;
  }
  const std::string path = PathFor(key);
  ReadOutcome r = ReadOutcome::kTransient;
  bool direct = WantDirect(buf.data, buf.size);
  for (int attempt = 0; attempt < 2; ++attempt) {
    r = ReadObjectFile(path, key, buf, scratch, direct);
    if (r != ReadOutcome::kRetryBuffered) break;
    DisableDirect(EINVAL);
    direct = false;
  }
  if (r == ReadOutcome::kOk) {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.bytes_read += buf.size;
    return true;
  }
  if (r == ReadOutcome::kInvalid) DropCorrupt(key, generation);
  return false;
}

FileSystemL2Adapter::ReadOutcome FileSystemL2Adapter::ReadObjectFile(const std::string& path,
                                                                     const ObjectKey& key,
                                                                     const MutableBuffer& buf,
                                                                     uint8_t* scratch,
                                                                     bool direct) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd < 0) {
    if (direct && errno == EINVAL) return ReadOutcome::kRetryBuffered;
    return errno == ENOENT ? ReadOutcome::kInvalid : ReadOutcome::kTransient;
  }
  Fd guard(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return ReadOutcome::kTransient;
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != kFsObjectHeaderSize + buf.size) {
    return ReadOutcome::kInvalid;
  }
  if (!direct) ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  int64_t got = PreadFull(fd, scratch, kFsObjectHeaderSize, 0);
  if (got < 0) {
    if (direct && got == -EINVAL) return ReadOutcome::kRetryBuffered;
    return ReadOutcome::kTransient;
  }
  Header h;
  if (got != static_cast<int64_t>(kFsObjectHeaderSize) || !DecodeHeader(scratch, &h) ||
      h.key != key || h.payload_size != buf.size) {
    return ReadOutcome::kInvalid;
  }
  uint32_t crc = 0;
  if (direct) {
    got = PreadFull(fd, buf.data, buf.size, kFsObjectHeaderSize);
    if (got < 0) return got == -EINVAL ? ReadOutcome::kRetryBuffered : ReadOutcome::kTransient;
    if (static_cast<uint64_t>(got) != buf.size) return ReadOutcome::kInvalid;
    crc = internal::Crc32c(buf.data, buf.size);
    direct_io_files_.fetch_add(1, std::memory_order_relaxed);
  } else {
    // Piece by piece, so each piece is checksummed while it is still in cache and while the
    // kernel's read-ahead fetches the next one.
    for (uint64_t off = 0; off < buf.size; off += kReadPiece) {
      const uint64_t n = std::min(kReadPiece, buf.size - off);
      got = PreadFull(fd, buf.data + off, n, kFsObjectHeaderSize + off);
      if (got < 0) return ReadOutcome::kTransient;
      if (static_cast<uint64_t>(got) != n) return ReadOutcome::kInvalid;
      crc = internal::Crc32cExtend(crc, buf.data + off, n);
    }
  }
  return crc == h.payload_crc ? ReadOutcome::kOk : ReadOutcome::kInvalid;
}

// ---------------------------------------------------------------------------------------------
// Index maintenance

bool FileSystemL2Adapter::MakeRoomLocked(uint64_t file_size) {
  const uint64_t cap = options_.capacity_bytes;
  if (cap == 0) return true;
  // Invariants: used_ + reserved_ <= cap, pinned_used_ <= used_.
  if (file_size > cap - reserved_ - pinned_used_) return false;
  auto pos = fifo_.begin();
  while (used_ + reserved_ + file_size > cap) {
    // Unpinned ready files hold used_ - pinned_used_ bytes, more than the shortfall, so the
    // scan finds a victim before the end.
    auto it = index_.find(*pos);
    ++pos;
    if (it->second.pins > 0) continue;
    DropLocked(it);
    ++stats_.evictions;
  }
  return true;
}

void FileSystemL2Adapter::DropLocked(Index::iterator it) {
  const ObjectKey key = it->first;
  Entry& e = it->second;
  const uint64_t file_size = kFsObjectHeaderSize + e.payload_size;
  ::unlink(PathFor(key).c_str());
  fifo_.erase(e.fifo_pos);
  used_ -= file_size;
  if (e.pins > 0) {
    orphan_pins_[key] += e.pins;
    pinned_used_ -= file_size;
    --stats_.pinned_objects;
  }
  index_.erase(it);
}

void FileSystemL2Adapter::DropCorrupt(const ObjectKey& key, uint64_t generation) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = index_.find(key);
  // A different generation means the file we read was evicted and replaced meanwhile: the
  // failure was that race, not corruption of the current object.
  if (it == index_.end() || !it->second.ready || it->second.generation != generation) return;
  DropLocked(it);
  ++stats_.corrupt_reads;
}

void FileSystemL2Adapter::Unpin(const std::vector<ObjectKey>& keys) {
  std::lock_guard<std::mutex> lk(mu_);
  for (const ObjectKey& key : keys) {
    auto it = index_.find(key);
    if (it != index_.end() && it->second.pins > 0) {
      if (--it->second.pins == 0) {
        pinned_used_ -= kFsObjectHeaderSize + it->second.payload_size;
        --stats_.pinned_objects;
      }
      --stats_.pins;
      continue;
    }
    auto orphan = orphan_pins_.find(key);
    if (orphan != orphan_pins_.end()) {
      if (--orphan->second == 0) orphan_pins_.erase(orphan);
      --stats_.pins;
      continue;
    }
    ++stats_.bad_unpins;
  }
}

bool FileSystemL2Adapter::WantDirect(const void* data, uint64_t size) const {
  return options_.o_direct && direct_ok_.load(std::memory_order_relaxed) &&
         reinterpret_cast<uintptr_t>(data) % kAlign == 0 && size % kAlign == 0;
}

void FileSystemL2Adapter::DisableDirect(int err) {
  if (direct_ok_.exchange(false)) {
    Log(LogLevel::kWarning, name() + ": the file system refuses O_DIRECT (" + std::strerror(err) +
                                "); using buffered I/O");
  }
}

// ---------------------------------------------------------------------------------------------

void FileSystemL2Adapter::Close() { pool_->Close(); }

L2AdapterStats FileSystemL2Adapter::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return internal::WithGauges(stats_, fifo_.size(), used_, options_.capacity_bytes);
}

}  // namespace lmcache_cpp
