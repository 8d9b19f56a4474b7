// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// SyncL2Adapter: the asynchronous L2Adapter contract on top of four plain blocking methods, for
// tiers whose natural API is synchronous (a client library that blocks, a key-value store reached
// through a blocking call, an adapter written in Python).
//
// A subclass implements Store, LookupAndPin, Load and UnpinKeys (protected pure virtuals below);
// each is called on one of the base's worker threads and may block for as long as it needs. The
// base provides everything else: the Submit* calls queue one operation each (FIFO, one queue for
// the adapter), Unpin queues an unpin operation (fire-and-forget: the caller never waits for the
// subclass), `worker_threads` workers take operations in order, call the subclass outside every
// lock of the base, and run the completion callback on the same worker, also outside the locks.
// Workers wait on a condition variable; an idle adapter uses no CPU.
//
// Results. A method returns a Bitmap with one bit per key, or a non-OK Status when the whole call
// failed. A failed store, lookup or load completes with that status and no bits set (the status is
// passed through as is; a subclass maps its own errors, an I/O failure to IoError). A returned
// bitmap whose size is not keys.size() is a bug in the subclass: the call completes with Internal.
// A lookup that fails must not leave pins behind; a load whose bytes are wrong must report the
// key as not loaded (a miss), never as data.
//
// Close(). Stops accepting work and wakes the workers. Queued store, lookup and load operations
// complete with Cancelled, on a worker, without calling the subclass; an operation the subclass is
// executing finishes normally; queued unpins still run (pins must balance). Then the workers are
// joined: after Close returns no callback runs and the subclass is not called from a worker
// again. Submits made while Close runs complete with Unavailable on a worker; after it returns,
// inline on the caller's thread. An Unpin after Close returns calls UnpinKeys inline on the
// caller's thread. Idempotent. REQUIRES: not called from a callback of this adapter or from one
// of the subclass's methods (a worker would join itself).
//
// Lifetime. REQUIRES: the most-derived class calls Close() in its destructor, before its own
// members are destroyed; workers call the subclass's virtuals, which must not run on a half-
// destroyed object. If Close has not been called when ~SyncL2Adapter runs, it logs an error,
// cancels what is queued without calling the subclass (unpins are dropped) and joins; an operation
// the subclass was executing at that moment is undefined behaviour.
//
// Stats. stats() fills the counters the base observes (keys, not calls, as the other adapters:
// stores / store_failures, lookups, loads / load_misses, bytes_written / bytes_read of the keys
// reported done, in_flight = store, lookup and load calls submitted and not completed) and then
// calls AddStats, where a subclass adds what only it knows (objects, bytes, capacity, pins,
// evictions, corrupt reads, bad unpins). sync_stats() reports the queue itself.
//
// Thread safety: every public method may be called from any thread concurrently. The subclass's
// methods are called from up to `worker_threads` workers at once (and UnpinKeys, after Close,
// from any thread), so a subclass with more than one worker synchronises its own state. Locks:
// the pool's close mutex (Close only) before mu_; no subclass method and no callback runs while
// either is held.
//
// Stability: stable: the base for a host's own blocking L2 tier (Store, LookupAndPin, Load,
// UnpinKeys, AddStats and SyncAdapterOptions); sync_stats() may gain fields.
#ifndef LMCACHE_CPP_SYNC_ADAPTER_H_
#define LMCACHE_CPP_SYNC_ADAPTER_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

namespace internal {
class WorkerPool;
}  // namespace internal

struct SyncAdapterOptions {
  size_t worker_threads = 1;  // 0 is treated as 1
};

// The queue of a SyncL2Adapter. Gauges are a snapshot; counters count operations (calls).
// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct SyncAdapterStats {
  uint64_t queued = 0;     // operations waiting for a worker (unpins included)
  uint64_t executing = 0;  // operations a worker is running (subclass call or callback)
  uint64_t completed = 0;  // store, lookup and load calls the subclass answered with a bitmap
  uint64_t failed = 0;     // calls the subclass answered with a non-OK status (or a bad bitmap)
  uint64_t cancelled = 0;  // calls cancelled by Close before they ran
  uint64_t rejected = 0;   // calls refused before they ran (InvalidArgument, Unavailable)
  uint64_t unpins = 0;     // Unpin calls passed to the subclass
  uint64_t dropped_unpins = 0;  // Unpin calls dropped (the subclass was already destroyed)
};

class SyncL2Adapter : public L2Adapter {
 public:
  // See "Lifetime" above.
  ~SyncL2Adapter() override;

  SyncL2Adapter(const SyncL2Adapter&) = delete;
  SyncL2Adapter& operator=(const SyncL2Adapter&) = delete;

  void SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                   StoreCallback done) final;
  void SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) final;
  void SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                  LoadCallback done) final;
  // Queues the unpin and returns; never waits for the subclass (except after Close, see above).
  void Unpin(const std::vector<ObjectKey>& keys) final;
  void Close() final;
  L2AdapterStats stats() const override;

  SyncAdapterStats sync_stats() const;
  size_t worker_threads() const { return num_workers_; }

 protected:
  // Starts the workers. They call the virtuals below only for operations submitted after the
  // object is fully constructed.
  explicit SyncL2Adapter(SyncAdapterOptions options = {});

  // Stores objects; keys.size() == buffers.size() (checked by the base). Bit i: keys[i] is now
  // in the tier. Called on a worker.
  virtual Result<Bitmap> Store(const std::vector<ObjectKey>& keys,
                               const std::vector<ConstBuffer>& buffers) = 0;
  // Bit i: keys[i] is present and now pinned (one more pin). Called on a worker.
  virtual Result<Bitmap> LookupAndPin(const std::vector<ObjectKey>& keys) = 0;
  // Reads objects into the buffers (each exactly the object's size; a mismatch is a miss). Bit i:
  // buffers[i] holds keys[i]'s exact bytes. Called on a worker.
  virtual Result<Bitmap> Load(const std::vector<ObjectKey>& keys,
                              const std::vector<MutableBuffer>& buffers) = 0;
  // Drops one pin per key; a key without a pin is ignored (and counted by the subclass in
  // bad_unpins). Called on a worker, or inline after Close.
  virtual void UnpinKeys(const std::vector<ObjectKey>& keys) = 0;
  // Adds the subclass's own gauges and counters to `stats`. Called by stats() on the caller's
  // thread, without the base's locks. Default: nothing.
  virtual void AddStats(L2AdapterStats* stats) const { (void)stats; }

 private:
  enum class OpType : uint8_t { kStore, kLookup, kLoad, kUnpin };
  struct Op {
    OpType type = OpType::kStore;
    std::vector<ObjectKey> keys;
    std::vector<ConstBuffer> in;     // stores
    std::vector<MutableBuffer> out;  // loads
    std::function<void(const Status&, const Bitmap&)> done;
    Status pre_status;  // non-OK: completes with it, never reaches the subclass
  };

  void Enqueue(Op op);
  void WorkerLoop();
  // Runs one operation (subclass call unless `cancel`), updates the counters, calls back.
  void Execute(Op& op, bool cancel);
  // Completes `op` on the caller's thread when no worker remains (after Close).
  void RunInline(Op& op);

  const size_t num_workers_;

  mutable std::mutex mu_;
  // Guarded by mu_ (with the pool's closing and live-worker state):
  std::deque<Op> queue_;
  bool subclass_gone_ = false;  // ~SyncL2Adapter ran before Close: never call the subclass
  SyncAdapterStats sync_;       // counters; gauges filled in by sync_stats()
  L2AdapterStats counters_;     // what the base observes; the rest comes from AddStats

  // The workers (cpp/src/worker_pool.h), started by the constructor and joined by Close; declared
  // after mu_, which it uses.
  std::unique_ptr<internal::WorkerPool> pool_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SYNC_ADAPTER_H_
