// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// PrefetchController: brings the longest cached prefix of a request's keys into L1 and leases it
// for the request, from L1 directly or by loading from the L2 adapters.
//
// Pipeline of one lookup (docs/design/l2-and-prefetch.md has the lease/pin table per phase):
//   1. L1 prefix scan: the present prefix is leased for the request (1 + extra_count each).
//   2. L2 lookup-and-pin of the remaining keys on every adapter, in parallel.
//   3. Plan: the contiguous prefix of remaining keys that some adapter has; each key comes from
//      the first adapter (in configuration order) that has it.
//   4. Temporary L1 objects are reserved for the plan under an internal request id (so ending
//      the user's request cannot free memory an adapter is writing into).
//   5. Pins not needed for the plan are dropped; the planned keys are loaded.
//   6. The loaded contiguous prefix is published to the request with 1 + extra_count read leases
//      each; objects after a gap or a failed load are discarded (fully released).
//   7. The remaining pins are dropped. Every pin taken in step 2 is dropped on every path.
// No thread waits for L2: steps 2-7 run in the adapters' completion callbacks. Callers that
// want to wait block on a condition variable with a deadline (Wait, LookupAndPin, WaitLoad).
//
// Two entry styles:
//   * two-phase: Submit returns a handle at once; Query (non-blocking) or Wait (blocking up to a
//     timeout) deliver the result exactly once. Handles are 128-bit random and bound to the
//     client that created them. At most max_in_flight lookups are in their L2 phase; the rest
//     wait in FIFO order.
//   * synchronous (SYNC_LOOKUP): LookupAndPin does steps 1-3 and returns the hit count within
//     its timeout (an adapter that has not answered by then counts as a miss and its late pins
//     are dropped); it then starts the load (steps 4-7) in the background, which any number of
//     the request's workers join with WaitLoad. Sync lookups are not subject to max_in_flight.
//     A request has at most one pending sync lookup; a new one cancels the previous, which
//     returns what it still holds before the new one leases anything.
//
// Ownership and cleanup: a job's leases belong to the user's request (LeaseOwner). Cancel and
// the TTL reaper release what the job still holds: its leases, less any the request returned
// meanwhile (a retrieve or FreeLookupLocks), never another lookup's (ReleaseReadUpTo). EndRequest /
// EndClient drop jobs without releasing their leases: the caller then drops the request's whole
// ledger (ObjectTable::ReleaseRequest / ReleaseClient). Results not collected within job_ttl are
// reaped (their leases released).
//
// Request ids with the top bit set are reserved for internal use (kInternalRequestBit).
//
// Thread safety: every method is thread-safe. Lock order: PrefetchController::mu_ is a leaf with
// respect to ObjectTable and the adapters: it is never held while calling them.
//
// Lifetime: REQUIRES that no adapter callback can run after destruction: close the adapters
// (L2Adapter::Close) before destroying the controller. StorageManager does this.
//
// Stability: unstable (a building block of CacheEngine; not installed). The parts the stable API
// uses are in ids.h (JobHandle, the handle of CacheEngine lookups and transfer tickets) and
// storage_options.h (PrefetchOptions, PrefetchStats).
#ifndef LMCACHE_CPP_PREFETCH_CONTROLLER_H_
#define LMCACHE_CPP_PREFETCH_CONTROLLER_H_

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/ids.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_options.h"

namespace lmcache_cpp {

struct PrefetchRequest {
  LeaseOwner owner;
  std::vector<ObjectKey> keys;  // in prefix order (chunk-major for several ranks)
  uint32_t extra_count = 0;     // every hit is leased 1 + extra_count times
  uint64_t object_size = 0;     // bytes of one object; REQUIRES > 0 when adapters exist

  // The request of `owner` for `keys`, each hit leased 1 + extra_count times.
  static PrefetchRequest Of(LeaseOwner owner, std::vector<ObjectKey> keys, uint64_t object_size,
                            uint32_t extra_count = 0) {
    PrefetchRequest r;
    r.owner = owner;
    r.keys = std::move(keys);
    r.extra_count = extra_count;
    r.object_size = object_size;
    return r;
  }
};

// Where a sync lookup may find its hits: in L1 and L2 (LookupAndPin), or in L1 only
// (LookupAndPinInL1: nothing is leased when L2 would have to be asked).
enum class SyncLookupScope : uint8_t { kL1AndL2, kL1Only };

struct PrefetchResult {
  size_t hits = 0;     // length of the leading run of keys now leased in L1 for the request
  size_t l1_hits = 0;  // of which were already in L1
  size_t l2_hits = 0;  // of which were loaded from L2
};

struct SyncLookupResult {
  JobHandle handle;
  size_t hits = 0;  // L1 prefix + keys planned from L2 (available once the load joins)
  size_t l1_hits = 0;
  size_t l2_planned = 0;  // keys being loaded in the background
  bool l2_timed_out = false;
};

class PrefetchController {
 public:
  // `table` must outlive the controller; adapters are shared.
  PrefetchController(ObjectTable* table, std::vector<std::shared_ptr<L2Adapter>> adapters,
                     PrefetchOptions options = {});
  ~PrefetchController();
  PrefetchController(const PrefetchController&) = delete;
  PrefetchController& operator=(const PrefetchController&) = delete;

  // Starts the TTL reaper thread. Idempotent.
  void Start();
  // Rejects new work (Unavailable), cancels every job (in-flight jobs release their pins and
  // leases as their callbacks arrive), releases the leases of uncollected results, and joins the
  // reaper. Idempotent. Close the adapters afterwards, then call WaitIdle.
  void Stop();
  // Blocks until no job is in an L2 phase, or the timeout passes. Returns whether idle.
  bool WaitIdle(Duration timeout);

  // ---- two-phase lookup ------------------------------------------------------------------
  // Leases the L1 prefix now and starts the L2 part. Errors: InvalidArgument (request id with
  // the internal bit, object_size 0 with adapters), ResourceExhausted (client's job limit),
  // Unavailable (stopped).
  Result<JobHandle> Submit(PrefetchRequest request);
  // The result once (then the handle is gone), or nullopt while the job runs. Errors: NotFound
  // (unknown, collected, cancelled or reaped handle), PermissionDenied (another client's).
  Result<std::optional<PrefetchResult>> Query(ClientId client, const JobHandle& handle);
  // As Query, waiting up to `timeout` for the result (condition variable; nullopt on timeout).
  Result<std::optional<PrefetchResult>> Wait(ClientId client, const JobHandle& handle,
                                             Duration timeout);
  // Drops the job and releases every pin and lease it holds (now, or when its in-flight step
  // completes). Errors: NotFound, PermissionDenied.
  Status Cancel(ClientId client, const JobHandle& handle);

  // ---- synchronous lookup ------------------------------------------------------------------
  // Steps 1-3 within `timeout`, then starts the load when `start_load`. Errors: as Submit.
  Result<SyncLookupResult> LookupAndPin(PrefetchRequest request, Duration timeout,
                                        bool start_load = true);
  // LookupAndPin of a request whose every key is in L1 (or with no adapters), which never
  // waits. Otherwise nullopt, with nothing leased or changed: the caller then uses LookupAndPin
  // on a thread that may block. Errors: as Submit.
  Result<std::optional<SyncLookupResult>> LookupAndPinInL1(PrefetchRequest request);
  // Starts the load of a sync lookup made with start_load = false. Idempotent.
  // Errors: NotFound, PermissionDenied.
  Status StartLoad(ClientId client, const JobHandle& handle);
  // Joins the pending sync load of `request`: waits up to `timeout` and returns its result.
  // Several callers may join; all see the same result, which stays until EndRequest or the TTL.
  // Errors: NotFound (no sync lookup pending for the request), Timeout, Cancelled.
  Result<PrefetchResult> WaitLoad(RequestId request, Duration timeout);

  // Whether a WaitLoad of `request` would wait now: its sync lookup's load (or L2 lookup) is
  // still running. Starts a load the lookup did not start, as a joiner does. Never blocks.
  bool LoadPending(RequestId request);

  // ---- completion notices (for servers that park waits instead of blocking a thread) -------
  // `notice(handle, request)` is called each time a job completes or is cancelled (a sync
  // lookup's load finishing completes its job), with the job's handle and request, and once with
  // a zero handle and request 0 when the controller stops (anything may have changed). It runs on
  // the thread that completed the job, outside every lock of the controller, after the result is
  // visible to Query / WaitLoad / LoadPending; it must be short, must not block and must not call
  // back into the controller (append to a queue, write to an eventfd).
  using CompletionNotice = JobCompletionNotice;
  void SetCompletionNotice(CompletionNotice notice);

  // ---- cleanup -----------------------------------------------------------------------------
  // Drops the request's jobs and pending loads (pins and temporary objects are released; the
  // request's leases are left for ObjectTable::ReleaseRequest). Returns how many jobs.
  size_t EndRequest(RequestId request);
  // The same for every job created by `client`.
  size_t EndClient(ClientId client);
  // Reaps jobs older than job_ttl (results uncollected, or still running). Returns how many.
  size_t ReapExpired();

  PrefetchStats stats() const;
  // Jobs held per client (clients with none are absent).
  std::unordered_map<ClientId, size_t> JobsByClient() const;
  size_t num_adapters() const { return adapters_.size(); }

 private:
  struct Job;
  // kCancelled: the job releases what it leased. kEnded: the request (or client) ended and its
  // whole ledger is dropped by the caller, so the job only drops its pins and temporaries.
  enum class CancelKind : uint8_t { kNone, kCancelled, kEnded };
  // What the caller of MarkCancelledLocked must do after releasing mu_.
  enum class CancelAction : uint8_t { kNothing, kReleaseLeases, kReleasePrefix, kAbandonIdle };

  // LookupAndPin; with kL1Only, nullopt (nothing leased) when L2 would have to be asked.
  Result<std::optional<SyncLookupResult>> SyncLookupImpl(PrefetchRequest request, Duration timeout,
                                                         bool start_load, SyncLookupScope scope);
  void StartL2Lookup(const std::shared_ptr<Job>& job);
  void OnLookupDone(const std::shared_ptr<Job>& job, size_t adapter, const Status& status,
                    const Bitmap& pinned);
  void StartLoadPhase(const std::shared_ptr<Job>& job);
  void OnLoadDone(const std::shared_ptr<Job>& job, size_t group, const Status& status,
                  const Bitmap& loaded);
  void FinishLoad(const std::shared_ptr<Job>& job);
  // Drops every pin the job still holds (outside mu_).
  void UnpinAll(Job* job);
  // Completes the job, wakes waiters, starts queued jobs. REQUIRES mu_ not held.
  void Complete(const std::shared_ptr<Job>& job, PrefetchResult result, Status status);
  // Marks the job cancelled and removes it from the tables. REQUIRES: the caller holds a
  // shared_ptr to the job (the table's reference is dropped here).
  CancelAction MarkCancelledLocked(Job* job, CancelKind kind);
  void RunCancelAction(const std::shared_ptr<Job>& job, CancelAction action);
  size_t EndMatching(const std::function<bool(const Job&)>& match);
  void ReleaseJobLeases(const Job& job);
  // Calls the completion notice, if one is set. REQUIRES mu_ not held.
  void Notice(const JobHandle& handle, RequestId request);
  Result<std::shared_ptr<Job>> FindLocked(ClientId client, const JobHandle& handle);
  void ReapLoop();

  ObjectTable* const table_;
  const std::vector<std::shared_ptr<L2Adapter>> adapters_;
  const PrefetchOptions options_;
  const std::shared_ptr<Clock> clock_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // any job completed or changed phase; stop
  std::unordered_map<JobHandle, std::shared_ptr<Job>, JobHandleHash> jobs_;  // GUARDED_BY(mu_)
  std::unordered_map<RequestId, JobHandle> sync_by_request_;                 // GUARDED_BY(mu_)
  std::unordered_map<ClientId, size_t> jobs_per_client_;                     // GUARDED_BY(mu_)
  std::deque<std::shared_ptr<Job>> queue_;                                   // GUARDED_BY(mu_)
  size_t in_flight_ = 0;                                                     // GUARDED_BY(mu_)
  size_t active_ = 0;         // jobs with L2 work outstanding        // GUARDED_BY(mu_)
  bool stopped_ = false;      // GUARDED_BY(mu_)
  bool reaper_stop_ = false;  // GUARDED_BY(mu_)
  RequestId next_internal_request_ = kInternalRequestBit;  // GUARDED_BY(mu_)
  PrefetchStats counters_;                                 // GUARDED_BY(mu_)

  std::mutex notice_mu_;  // guards notice_ (the pointer); never held while calling it
  std::shared_ptr<const CompletionNotice> notice_;

  std::condition_variable reaper_cv_;  // wakes the reaper for Stop only
  std::mutex start_stop_mu_;
  std::thread reaper_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_PREFETCH_CONTROLLER_H_
