// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// FileSystemL2Adapter: an L2 tier on a local file system, one file per object.
//
// Layout. The object of key (chunk hash h, rank r) lives in
//   <directory>/<first 2 hex chars of h>/<64 hex chars of h>.<r>.kv
// (r in decimal, possibly negative). A file is a fixed 4096-byte header followed by the payload,
// so the payload is 4096-aligned for O_DIRECT. Header fields, little-endian, at these offsets:
//    0  magic "LMCCPPKV" (8 bytes)        8  format version u32 (= 1)
//   12  header size u32 (= 4096)          16  chunk hash (32 bytes)
//   48  kv_rank i32                       52  reserved u32 (0)
//   56  payload size u64                  64  payload CRC32C u32
//   68  header CRC32C u32 over bytes [0, 68); the rest of the header is zero.
//
// Store. A key already present is reported stored without rewriting. Otherwise the adapter
// reserves room (see Capacity), writes `<final name>.tmp-<random>` in the same directory
// (optionally fdatasync), renames it over the final name and, with fsync, fsyncs the directory.
// Readers never see a partial file; a store interrupted midway (crash, error) leaves at most a
// temp file, which is never indexed and is deleted at the next start-up. Two stores of one key
// at once write it once: the second waits for the first and reports the key stored if the first
// succeeded (if it failed, the second writes the file itself).
//
// Load. The key must be indexed and the buffer exactly its payload size; otherwise it is a plain
// miss (a wrong-size buffer is the caller's mistake: the file is kept and not counted corrupt).
// The file is then opened and validated: magic, version, header size, header CRC, key equal to
// the requested key, payload size equal to the buffer size, file size equal to 4096 + payload
// size, and the payload CRC32C (checked as the payload is read into the caller's buffer). Any
// mismatch makes the key a miss, counts it in stats().corrupt_reads, and drops the object from
// the index and unlinks it: bad bytes are never reported as data (the buffer's content is then
// unspecified). A transient error (out of file descriptors, EIO) is a miss that keeps the file.
//
// Lookup-and-pin is answered from the in-memory index (no I/O) on an adapter thread. Unpin is
// immediate. A pinned object is never evicted. If a pinned object is found corrupt and dropped,
// its pins are kept aside so the caller's Unpin calls still balance (they are not bad_unpins).
//
// Capacity counts whole files (4096-byte header + payload), as do stats().bytes. To make room a
// store evicts unpinned objects, oldest store first (FIFO; after a restart, by file mtime). A
// store that cannot fit even if every unpinned object were evicted evicts nothing and fails for
// that key. Files being written count against the capacity.
//
// O_DIRECT (option o_direct). Used for a file only when the caller's buffer address and size are
// multiples of 4096; otherwise that file is read or written through the page cache. If the file
// system refuses O_DIRECT (EINVAL, e.g. some tmpfs versions), the adapter logs one warning and
// uses buffered I/O from then on. direct_io_files() counts files actually accessed with O_DIRECT.
//
// Start-up (Create). Creates the directory if missing and rebuilds the index by scanning it:
// every `*.tmp-*` file is deleted; every `*.kv` file's header (not its payload) is validated
// against its name and size and the file is indexed, or deleted and counted in
// stats().corrupt_reads (bad header, wrong size, foreign format version, name/key mismatch).
// Other files are left alone. If the recovered files exceed the capacity, the oldest are
// evicted. So the data of a previous run survives a restart. REQUIRES: one adapter (one process)
// per directory at a time: a second one would delete the first one's temp files at start-up and
// the two indexes would disagree.
//
// Threads. A fixed pool of io_threads workers (the bound on I/O requests in flight) takes tasks
// from two FIFO queues, control first: a lookup (or a rejected call) is one control task; a store
// or load is one I/O task per key, so the keys of one call are spread over the pool. The
// callback runs once, on the worker that finishes the call's last task, outside every lock.
//
// Close(). Stops accepting work: queued tasks are dropped and their calls complete with Cancelled
// (a store or load that had some keys done still completes with Cancelled and no bits; its
// stored files stay valid objects). Tasks already doing I/O finish. Joins the workers. Submits
// made while Close runs complete with Unavailable on a worker; after it returns, inline on the
// caller's thread. Idempotent. REQUIRES: not called from this adapter's callback.
//
// Stats count keys, not calls (as MemoryL2Adapter); `in_flight` counts calls.
//
// Thread safety: every method may be called from any thread. Locks: the pool's close mutex (Close
// only) before mu_; mu_ guards the index and the queues and is held for metadata calls (rename into
// the final name, unlink of a final name) so those are ordered per key, never for reads or writes
// of data.
//
// Ownership: Create returns the only owner; hand it to StorageManagerConfig::adapters as a
// std::shared_ptr<L2Adapter>. The manager closes it in Stop.
//
// Stability: stable: FileSystemAdapterOptions, Create, recovery(), PathFor and the file layout
// above. A file whose format version this build does not read is deleted at start-up. Tests
// inspect pins and the index through testing::FileSystemAdapterPeer (not installed).
#ifndef LMCACHE_CPP_FS_ADAPTER_H_
#define LMCACHE_CPP_FS_ADAPTER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

namespace internal {
class WorkerPool;
}  // namespace internal
namespace testing {
class FileSystemAdapterPeer;
}  // namespace testing

inline constexpr uint64_t kFsObjectHeaderSize = 4096;
inline constexpr uint32_t kFsObjectFormatVersion = 1;
inline constexpr char kFsObjectMagic[8] = {'L', 'M', 'C', 'C', 'P', 'P', 'K', 'V'};

struct FileSystemAdapterOptions {
  std::string directory;        // REQUIRES: non-empty; created (with parents) if missing
  uint64_t capacity_bytes = 0;  // 0 = unbounded; counts header + payload of every file
  bool fsync = false;           // fdatasync each file and fsync its directory before reporting it
  bool o_direct = false;        // see the header comment
  size_t io_threads = 4;        // REQUIRES: >= 1
};

// What Create found in the directory.
// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct FsRecoveryReport {
  uint64_t indexed = 0;             // valid objects indexed
  uint64_t dropped = 0;             // invalid *.kv files deleted (also in corrupt_reads)
  uint64_t temp_files_removed = 0;  // leftover *.tmp-* files deleted
  uint64_t evicted = 0;             // valid objects evicted to fit the capacity
};

class FileSystemL2Adapter final : public L2Adapter {
 public:
  // Creates the directory, rebuilds the index, starts the workers. Returns InvalidArgument for
  // bad options, IoError (from errno) when the directory cannot be created or read.
  static Result<std::unique_ptr<FileSystemL2Adapter>> Create(FileSystemAdapterOptions options);

  // Closes (see Close).
  ~FileSystemL2Adapter() override;

  FileSystemL2Adapter(const FileSystemL2Adapter&) = delete;
  FileSystemL2Adapter& operator=(const FileSystemL2Adapter&) = delete;

  std::string name() const override { return "fs:" + options_.directory; }
  void SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                   StoreCallback done) override;
  void SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) override;
  void SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                  LoadCallback done) override;
  void Unpin(const std::vector<ObjectKey>& keys) override;
  void Close() override;
  L2AdapterStats stats() const override;

  // The final path of `key`'s file (whether or not it exists).
  std::string PathFor(const ObjectKey& key) const;
  const FsRecoveryReport& recovery() const { return recovery_; }
  uint64_t direct_io_files() const { return direct_io_files_.load(std::memory_order_relaxed); }

 private:
  friend class testing::FileSystemAdapterPeer;  // cpp/src/testing/, not installed

  enum class OpType : uint8_t { kStore, kLookup, kLoad };
  struct Batch;
  struct Task {
    std::shared_ptr<Batch> batch;
    size_t index;  // key index, or kWholeBatch
  };
  struct Entry {
    bool ready = false;  // false: a worker is writing it
    uint32_t pins = 0;
    uint64_t payload_size = 0;
    uint64_t generation = 0;
    std::list<ObjectKey>::iterator fifo_pos;  // valid when ready
  };
  using Index = std::unordered_map<ObjectKey, Entry, ObjectKeyHash>;

  explicit FileSystemL2Adapter(FileSystemAdapterOptions options);

  Status Recover();
  void Submit(std::shared_ptr<Batch> batch);
  void WorkerLoop();
  void RunTask(const Task& task, uint8_t* scratch);
  void FinishTask(const Task& task);
  void Complete(Batch& batch);

  bool StoreOne(const ObjectKey& key, const ConstBuffer& buf, uint8_t* scratch);
  Status WriteObjectFile(const std::string& tmp, const ObjectKey& key, const ConstBuffer& buf,
                         uint8_t* scratch);
  bool LoadOne(const ObjectKey& key, const MutableBuffer& buf, uint8_t* scratch);
  // What reading one object file came to.
  enum class ReadOutcome : uint8_t {
    kOk,             // `buf` holds the payload, checked against its CRC32C
    kInvalid,        // corrupt, torn, foreign or missing: a miss, and the file is dropped
    kTransient,      // an I/O error that may pass: a miss, the file is kept
    kRetryBuffered,  // O_DIRECT was refused: read it again buffered
  };
  // Validates and reads the file into `buf`, with O_DIRECT when `direct`.
  ReadOutcome ReadObjectFile(const std::string& path, const ObjectKey& key,
                             const MutableBuffer& buf, uint8_t* scratch, bool direct);
  void LookupBatch(Batch& batch);

  // mu_ held. Evicts so `file_size` more bytes fit; false (evicting nothing) if they cannot.
  bool MakeRoomLocked(uint64_t file_size);
  // mu_ held. Removes a ready entry from the index and unlinks its file.
  void DropLocked(Index::iterator it);
  void DropCorrupt(const ObjectKey& key, uint64_t generation);
  // Whether O_DIRECT may be tried for a buffer; counts nothing.
  bool WantDirect(const void* data, uint64_t size) const;
  void DisableDirect(int err);
  std::string TempSuffix();

  const FileSystemAdapterOptions options_;
  FsRecoveryReport recovery_;  // written by Create before the workers start

  std::atomic<bool> direct_ok_{true};
  std::atomic<bool> store_failure_logged_{false};
  std::atomic<uint64_t> direct_io_files_{0};
  std::atomic<uint64_t> tmp_counter_{0};
  uint64_t tmp_salt_ = 0;  // set in the constructor

  mutable std::mutex mu_;
  std::condition_variable write_cv_;  // an entry finished writing
  // Guarded by mu_ (with the pool's closing and live-worker state):
  std::deque<Task> control_queue_;
  std::deque<Task> io_queue_;
  Index index_;
  std::list<ObjectKey> fifo_;  // ready entries, oldest first
  std::unordered_map<ObjectKey, uint32_t, ObjectKeyHash> orphan_pins_;  // pins of dropped objects
  uint64_t used_ = 0;         // file bytes of ready entries
  uint64_t reserved_ = 0;     // file bytes of entries being written
  uint64_t pinned_used_ = 0;  // file bytes of ready entries with pins > 0
  uint64_t next_generation_ = 0;
  L2AdapterStats stats_;  // counters and the pin gauges; the rest is filled in by stats()

  // The workers (cpp/src/worker_pool.h), started by Create and joined by Close; declared after
  // mu_, which it uses.
  std::unique_ptr<internal::WorkerPool> pool_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_FS_ADAPTER_H_
