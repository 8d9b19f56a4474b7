// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// MemoryL2Adapter: an in-process L2 tier that keeps objects as byte vectors, for tests and
// benchmarks. It can simulate a slow tier (a per-operation latency and a bandwidth shared by all
// operations), a bounded one (capacity with FIFO eviction that never evicts a pinned object),
// and a faulty one (fault injection on the n-th operation of a type, a global stall).
//
// Threads. Create() starts `worker_threads` workers. Every Submit* queues one operation; a worker
// takes operations in FIFO order and, for each: waits while the adapter is stalled, waits out a
// kStall fault, waits out the simulated time (a condition-variable wait with a deadline), then
// executes it and runs its callback, outside the adapter's lock. Callbacks therefore run on
// worker threads, never on the submitting thread (see Close for the one exception).
//
// Simulated time of one operation: the transfer of its bytes (the sum of its buffer sizes; 0 for
// lookups) is scheduled on one link shared by all workers at bandwidth_bytes_per_sec, then
// `latency` and any kDelay fault are added. All three waits are interrupted by Close().
//
// Capacity. A store inserts its keys in order; a key that does not fit evicts the oldest stored
// objects that have no pin (FIFO by insertion) until it fits. If it cannot fit even after every
// unpinned object were evicted, nothing is evicted for it and its bit stays clear. A pinned
// object is never evicted. Keys already present are reported stored and not rewritten.
//
// Faults. InjectFault(op, nth, fault) arms `fault` for the nth Submit of that type counted from
// the call (nth = 1: the next one); every Submit of that type counts, including rejected ones.
// Several faults may target one operation; they combine.
//   kFail    the operation has no effect and completes with IoError (no bits set, no pins).
//   kDelay   `delay` is added to the operation's simulated time.
//   kStall   the operation waits, before executing, until the next SetStalled(false) issued
//            after it began waiting (or Close(), which cancels it).
//   kCorrupt loads only (ignored for stores and lookups): one byte of the first object read is
//            flipped as it is copied out, as a bad disk or link would. The adapter's checksum
//            catches it: that key reads as a miss and counts in corrupt_reads.
//
// Checksums. Each object keeps the CRC32C it was stored with (ConstBuffer::crc32c, or computed at
// store when none is given). A load checks the bytes it copied into the caller's buffer against
// it; a mismatch is a miss (corrupt_reads), never data. So bytes a stray writer changed between
// the checksum and the store never load either.
//
// Stats (stats()) count keys, not calls: `stores` = keys submitted for store, `store_failures`
// = those not stored; `lookups` = keys looked up; `loads` = keys submitted for load,
// `load_misses` = those not loaded. `in_flight` counts operations (calls).
//
// Thread safety: every method may be called from any thread concurrently. Lock order: mu_ is the
// adapter's only lock besides the pool's close mutex (held only by Close, taken before mu_); no
// callback runs while either is held.
//
// Internal (cpp/src/testing/, the lmcache_cpp_testing library, not installed): a tool for tests and
// benchmarks, and the server's `{"type": "memory"}` tier, not a production tier.
#ifndef LMCACHE_CPP_SRC_TESTING_MEMORY_ADAPTER_H_
#define LMCACHE_CPP_SRC_TESTING_MEMORY_ADAPTER_H_

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

#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

namespace internal {
class WorkerPool;
}  // namespace internal

struct MemoryAdapterOptions {
  uint64_t capacity_bytes = 0;           // 0 = unbounded; counts payload bytes
  uint64_t bandwidth_bytes_per_sec = 0;  // 0 = infinite
  Duration latency{};                    // added to every operation
  size_t worker_threads = 2;             // REQUIRES: >= 1
};

// The operation types faults can target.
enum class L2Op { kStore, kLookup, kLoad };

struct Fault {
  enum class Kind { kFail, kDelay, kCorrupt, kStall };
  Kind kind = Kind::kFail;
  Duration delay{};  // kDelay only
};

class MemoryL2Adapter final : public L2Adapter {
 public:
  // Starts the workers. Returns InvalidArgument when worker_threads == 0.
  static Result<std::unique_ptr<MemoryL2Adapter>> Create(MemoryAdapterOptions options);

  // Closes (see Close).
  ~MemoryL2Adapter() override;

  MemoryL2Adapter(const MemoryL2Adapter&) = delete;
  MemoryL2Adapter& operator=(const MemoryL2Adapter&) = delete;

  std::string name() const override { return "memory"; }
  void SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                   StoreCallback done) override;
  void SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) override;
  void SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                  LoadCallback done) override;
  // Immediate (no queueing, no simulated time, no faults).
  void Unpin(const std::vector<ObjectKey>& keys) override;
  // Stops accepting work and wakes every stalled or waiting worker. Queued operations, and
  // operations still stalled or in their simulated wait, complete with Cancelled; an operation
  // already executing completes normally. Joins the workers. Submits made while Close runs
  // complete with Unavailable on a worker; after it returns, inline on the caller's thread.
  // Idempotent. REQUIRES: not called from a callback of this adapter (it would join itself).
  void Close() override;
  L2AdapterStats stats() const override;

  // Fault injection; see the header comment. Thread-safe, callable at any time.
  void InjectFault(L2Op op, uint64_t nth, Fault fault);
  // While stalled, workers hold their next operation before executing it. SetStalled(false)
  // releases them and every operation held by a kStall fault.
  void SetStalled(bool stalled);

  // Test helpers.
  uint32_t PinCount(const ObjectKey& key) const;
  bool Contains(const ObjectKey& key) const;
  uint64_t TotalPins() const;
  // Blocks until at least `n` operations are held by a worker without executing (stalled, or
  // in their simulated wait), or `timeout` passes. Returns whether the count was reached.
  bool WaitForBlockedOperations(size_t n, Duration timeout) const;

 private:
  struct Op;
  struct Entry {
    std::shared_ptr<const std::vector<uint8_t>> bytes;  // immutable once stored
    uint32_t crc32c = 0;  // of *bytes as committed: given with the store, or computed then
    uint32_t pins = 0;
    std::list<ObjectKey>::iterator fifo_pos;
  };
  struct ArmedFault {
    uint64_t seq;  // the op sequence number it fires on
    Fault fault;
  };

  explicit MemoryL2Adapter(MemoryAdapterOptions options);

  void Enqueue(std::unique_ptr<Op> op);
  void WorkerLoop();
  // Waits (mu_ held via `lk`) for stall, fault stall and simulated time. Returns false when
  // Close() interrupted it.
  bool WaitBeforeExecuting(std::unique_lock<std::mutex>& lk, const Op& op);
  Bitmap ExecuteStore(const Op& op);
  Bitmap ExecuteLookup(const Op& op);
  Bitmap ExecuteLoad(const Op& op);
  // mu_ held. Evicts unpinned objects, oldest first, so `size` more bytes fit. Returns false
  // (evicting nothing) if they cannot.
  bool MakeRoomLocked(uint64_t size);
  void EraseLocked(std::unordered_map<ObjectKey, Entry, ObjectKeyHash>::iterator it);

  const MemoryAdapterOptions options_;

  mutable std::mutex mu_;
  std::condition_variable state_cv_;            // stalled_, release_epoch_, closing changed
  mutable std::condition_variable blocked_cv_;  // blocked_ grew
  // Guarded by mu_ (with the pool's closing and live-worker state):
  std::deque<std::unique_ptr<Op>> queue_;
  bool stalled_ = false;
  uint64_t release_epoch_ = 0;  // bumped by SetStalled(false)
  size_t blocked_ = 0;
  TimePoint link_free_at_{};           // when the simulated link finishes its scheduled transfers
  uint64_t submitted_[3] = {0, 0, 0};  // per L2Op
  std::vector<ArmedFault> faults_[3];  // per L2Op
  std::unordered_map<ObjectKey, Entry, ObjectKeyHash> objects_;
  std::list<ObjectKey> fifo_;  // insertion order, oldest first
  uint64_t bytes_ = 0;
  uint64_t pinned_bytes_ = 0;  // bytes of objects with pins > 0
  L2AdapterStats stats_;       // counters; gauges are filled in by stats()

  // The workers (cpp/src/worker_pool.h), started by Create and joined by Close; declared after
  // mu_, which it uses.
  std::unique_ptr<internal::WorkerPool> pool_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_TESTING_MEMORY_ADAPTER_H_
