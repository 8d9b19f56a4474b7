// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// StoreController: writes every object that finished writing in L1 to the L2 adapters, in the
// background, holding one L1 read lease per object until every adapter it was sent to has read
// it. Temporary objects (loaded from L2 for a request) are never announced ready by the object
// table, so they are never written back.
//
// Flow: ObjectTable::OnObjectsReady -> queue (bounded; the oldest keys are dropped, and counted,
// when producers outrun the adapters) -> worker thread forms batches -> AcquireReadAvailable (a key
// evicted meanwhile is skipped) -> each object's bytes checked against the CRC32C committed with
// it (a mismatch -- a stray write into a published object -- drops it from L1, counted in
// corrupt_in_l1, and it reaches no tier) -> SubmitStore on each target adapter (StorePolicy),
// the checksum passed along in the ConstBuffer -> the last
// completion releases the batch's leases and, with free_l1_after_store ("L1 as a write buffer"),
// deletes the L1 copies that every target adapter stored.
//
// The worker waits on a condition variable (new keys, a free in-flight slot, or stop); it never
// polls. At most max_in_flight_batches batches are with the adapters at once.
//
// Thread safety: every method is thread-safe. StoreController::mu_ is never held while calling
// the object table or an adapter. Lifetime: close the adapters before destroying the controller
// (no callback may run afterwards); StorageManager does this.
//
// Stability: unstable (a building block of StorageManager), except StorePolicy,
// AllAdaptersStorePolicy, StoreControllerOptions, StoreControllerStats and WaitIdle; the option and
// stats structs may gain fields.
#ifndef LMCACHE_CPP_STORE_CONTROLLER_H_
#define LMCACHE_CPP_STORE_CONTROLLER_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/ids.h"
#include "lmcache_cpp/l2_adapter.h"

namespace lmcache_cpp {

class ObjectTable;  // object_table.h (not installed)

// Store leases are taken under request ids kStoreRequestBase + n (internal range).
inline constexpr RequestId kStoreRequestBase = (RequestId{1} << 63) | (RequestId{1} << 62);

// Which adapters an object is written to.
class StorePolicy {
 public:
  virtual ~StorePolicy() = default;
  // Indices into the adapter list, each at most once. Called on the worker thread.
  virtual std::vector<size_t> Targets(const ObjectKey& key, size_t num_adapters) const = 0;
};

// The default: every adapter.
class AllAdaptersStorePolicy final : public StorePolicy {
 public:
  std::vector<size_t> Targets(const ObjectKey& key, size_t num_adapters) const override;
};

struct StoreControllerOptions {
  StoreControllerOptions() {}        // NOLINT
  size_t max_batch = 64;             // keys per SubmitStore
  size_t max_in_flight_batches = 8;  // batches with the adapters at once
  size_t max_queued_keys = 1 << 16;  // beyond this the oldest queued keys are dropped
  bool free_l1_after_store = false;  // delete the L1 copy once every target adapter has it
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct StoreControllerStats {
  uint64_t queued = 0;  // keys waiting
  uint64_t in_flight_batches = 0;
  uint64_t announced = 0;        // keys received from the table
  uint64_t submitted = 0;        // key x adapter stores submitted
  uint64_t stored = 0;           // key x adapter stores that succeeded
  uint64_t failed = 0;           // key x adapter stores that failed
  uint64_t skipped_evicted = 0;  // keys gone from L1 before they could be leased
  uint64_t corrupt_in_l1 = 0;    // objects whose L1 bytes no longer matched their checksum
  uint64_t dropped = 0;          // keys dropped from a full queue
  uint64_t freed_from_l1 = 0;    // keys deleted from L1 (free_l1_after_store)
};

class StoreController {
 public:
  // `table` must outlive the controller. `policy` null = AllAdaptersStorePolicy.
  StoreController(ObjectTable* table, std::vector<std::shared_ptr<L2Adapter>> adapters,
                  StoreControllerOptions options = {},
                  std::shared_ptr<StorePolicy> policy = nullptr);
  ~StoreController();
  StoreController(const StoreController&) = delete;
  StoreController& operator=(const StoreController&) = delete;

  // Subscribes to the table and starts the worker. Idempotent. With no adapters it does nothing.
  void Start();
  // Unsubscribes, drops the queue, joins the worker. Idempotent. Batches already with the
  // adapters complete (or are cancelled by L2Adapter::Close) and release their leases.
  void Stop();
  // Blocks until the queue is empty and no batch is in flight, or the timeout passes.
  bool WaitIdle(Duration timeout);

  // Queues keys for storing (what the table listener calls). Thread-safe.
  void Enqueue(const std::vector<ObjectKey>& keys);

  StoreControllerStats stats() const;

 private:
  class Listener;
  struct Batch;

  void WorkerLoop();
  void RunBatch(std::vector<ObjectKey> keys);
  void OnAdapterDone(const std::shared_ptr<Batch>& batch, size_t adapter, const Status& status,
                     const Bitmap& stored);

  ObjectTable* const table_;
  const std::vector<std::shared_ptr<L2Adapter>> adapters_;
  const StoreControllerOptions options_;
  const std::shared_ptr<StorePolicy> policy_;
  std::shared_ptr<Listener> listener_;

  mutable std::mutex mu_;
  std::condition_variable cv_;                  // work available, slot freed, idle, stop
  std::deque<ObjectKey> queue_;                 // GUARDED_BY(mu_)
  size_t in_flight_ = 0;                        // GUARDED_BY(mu_)
  bool busy_ = false;                           // GUARDED_BY(mu_): the worker is forming a batch
  bool stop_ = false;                           // GUARDED_BY(mu_)
  bool running_ = false;                        // GUARDED_BY(mu_)
  RequestId next_request_ = kStoreRequestBase;  // GUARDED_BY(mu_)
  StoreControllerStats counters_;               // GUARDED_BY(mu_)

  std::mutex start_stop_mu_;
  std::thread worker_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_STORE_CONTROLLER_H_
