// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// ObjectTable: the L1 manager. It maps ObjectKeys to byte ranges of the shared arena, runs the
// per-object state machine, owns every lease, and evicts.
//
// State machine (docs/design/l1.md has the full table):
//
//   absent --ReserveWrite--> writing --FinishWrite--> ready <--AcquireRead--> reading(n)
//     ^  ^                     |  |                     |      --ReleaseRead-->
//     |  +----AbortWrite-------+  |                     |
//     |                           v                     +--evict / Delete / Clear (when n == 0)
//     +--ReleaseQuarantine-- quarantined (the write lease expired or was dropped by anyone but
//                                         the writer, who may still be writing)
//
// "reading(n)" is "ready with n read leases". A temporary object (loaded from L2 for one request)
// is never evictable and is freed when its last read lease goes; a permanent object is evictable
// whenever it is ready with no lease.
//
// Leases. Every lease belongs to a request (RequestId) and is recorded in that request's ledger
// with the client that took it and an expiry time (now + TTL, refreshed when the request takes the
// lease again). A request can release only what its ledger holds: a release of anything else is
// refused with LeaseNotHeld and changes nothing. Several clients may act for one request (the
// tensor-parallel workers of one engine release the leases its scheduler took), so releases name
// the request only. ReleaseRequest drops a request's whole ledger; ReleaseClient drops the ledgers
// created by a client (it disconnected); ReapExpired drops leases past their TTL. An expired write
// lease discards the half-written object: it never becomes readable.
//
// extra_count: AcquireRead(..., count = 1 + e) takes e + 1 read leases at once (MLA models, where
// every tensor-parallel worker reads the same object); each worker's ReleaseRead(count = 1)
// returns one.
//
// Eviction. When a reservation does not fit, the table evicts synchronously (least recently used
// first, never a leased or temporary object) until it fits; it fails with OutOfMemory, evicting
// nothing, when even evicting every evictable object could not free enough bytes. A background
// maintenance thread (Start/Stop) evicts down to the low watermark when usage crosses the high
// one and reaps expired leases periodically.
//
// Fences (docs/design/integrity.md). Every object has a generation, unique for the table's life,
// given when it is reserved; a lease records the generation it was granted on, and LeasedInfo and
// ReleaseRead(generations) check it, so an offset handed out for one object is never taken for
// another that reuses the key or the extent. Read lease counts are capped
// (ObjectTableOptions::max_leases_per_object): a grant past the cap is refused with
// ResourceExhausted (a prefix or "available" grant stops or skips there), never wrapped. A writer
// that maps the arena (an engine worker) may still write after its write lease expired or its
// request was dropped by someone else (TTL, client reaped): such an object is *quarantined*
// instead of freed -- gone from the index, its extent kept out of the allocator -- until the writer
// is known to be done (ReleaseQuarantine: it committed or aborted late, or its process exited).
// An object can carry the CRC32C of its bytes, given when its write finishes (FinishWrite).
//
// Listeners are called after the table's mutex is released, on the thread that made the change
// (the maintenance thread for background eviction and expiry). They may call back into the table.
//
// Thread safety: every method is thread-safe. Lock order: ObjectTable::mu_ -> ExtentAllocator::mu_.
// maint_mu_ and listeners_mu_ are leaves, never held together with mu_.
//
// Stability: unstable (a building block of StorageManager and CacheEngine; not installed). The
// parts the stable API uses are in ids.h (ClientId, RequestId) and storage_options.h
// (ObjectTableOptions, ObjectTableStats).
#ifndef LMCACHE_CPP_OBJECT_TABLE_H_
#define LMCACHE_CPP_OBJECT_TABLE_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lmcache_cpp/allocator.h"
#include "lmcache_cpp/arena.h"
#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/eviction_policy.h"
#include "lmcache_cpp/ids.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_options.h"

namespace lmcache_cpp {
namespace internal {
template <typename K, typename V, typename Hash>
class FlatMap;
}  // namespace internal

// Who takes a lease: the request it is for, and the client (connection) acting for it.
struct LeaseOwner {
  ClientId client = 0;
  RequestId request = 0;
};

enum class ObjectState : uint8_t { kWriting = 0, kReady = 1 };

enum class RemovalReason : uint8_t {
  kEvicted = 0,        // made room (synchronous or watermark)
  kDeleted = 1,        // Delete()
  kCleared = 2,        // Clear()
  kAborted = 3,        // AbortWrite, or a write lease expired / was released with its request
  kTemporaryFreed = 4  // a temporary object lost its last reader
};

struct ObjectInfo {
  ObjectKey key;
  ObjectState state = ObjectState::kWriting;
  uint64_t offset = 0;   // into the arena
  uint64_t size = 0;     // requested object size (the allocation may be rounded up)
  uint32_t readers = 0;  // read leases outstanding
  bool temporary = false;
  bool detached = false;    // removed by a forced Clear or Discard, freed when its leases drain
  uint64_t generation = 0;  // unique per reservation for the table's life (never 0)
  bool has_crc32c = false;  // crc32c was given when the write finished
  uint32_t crc32c = 0;      // CRC32C of the object's `size` bytes as committed
};

enum class ReserveMode : uint8_t {
  // Keys that exist (any state) are returned as skipped, not as errors. Tensor-parallel ranks that
  // store the same MLA object are harmless.
  kNewOnly = 0,
  // Any existing key fails the whole batch with NotWritable.
  kStrict = 1,
};

struct ReserveOptions {
  ReserveMode mode = ReserveMode::kNewOnly;
  // Temporary objects are freed when their last read lease is released, are never evictable and
  // are not announced to listeners as ready (so they are never written back to L2).
  bool temporary = false;
};

struct Reservation {
  ObjectKey key;
  bool skipped = false;  // the key existed; nothing was reserved
  uint64_t offset = 0;   // valid when !skipped
  uint64_t size = 0;
};

class ObjectTableListener {
 public:
  virtual ~ObjectTableListener() = default;
  // Permanent objects finished writing and are readable (never temporary ones).
  virtual void OnObjectsReady(const std::vector<ObjectKey>& keys) { (void)keys; }
  // Objects left the table (or, for a forced Clear, left the index).
  virtual void OnObjectsRemoved(const std::vector<ObjectKey>& keys, RemovalReason reason) {
    (void)keys;
    (void)reason;
  }
};

class ObjectTable {
 public:
  // Errors: InvalidArgument (null arena, watermarks outside 0 < low <= high <= 1, zero TTLs, bad
  // alignment, unknown policy).
  static Result<std::unique_ptr<ObjectTable>> Create(std::shared_ptr<Arena> arena,
                                                     ObjectTableOptions options = {});
  // Stops the maintenance thread. Outstanding leases die with the table.
  ~ObjectTable();
  ObjectTable(const ObjectTable&) = delete;
  ObjectTable& operator=(const ObjectTable&) = delete;

  // Starts the maintenance thread (watermark eviction, lease reaping). Idempotent.
  void Start();
  // Stops and joins it; wakes it if waiting. Idempotent. Leases stay (see ReleaseAll).
  void Stop();

  // ---- writing -----------------------------------------------------------------------------
  // Reserves `keys` for writing, each `object_size` bytes, with a write lease for `owner`. All or
  // nothing in memory: OutOfMemory leaves nothing allocated. Duplicate keys within the batch are
  // reserved once (later copies are reported skipped). Errors: InvalidArgument (object_size 0),
  // NotWritable (kStrict and a key exists), NotReadable (the request still holds a lease on a
  // detached generation of a key), OutOfMemory.
  Result<std::vector<Reservation>> ReserveWrite(const LeaseOwner& owner,
                                                const std::vector<ObjectKey>& keys,
                                                uint64_t object_size,
                                                const ReserveOptions& options = {});
  // writing -> ready for every key, atomically (validated first; nothing changes on error), and
  // gives the request `read_leases` read leases on each (0 for a plain store; 1 + extra_count for
  // an object loaded for this request). `crc32c`, when not null, holds keys.size() checksums of
  // the objects' bytes, kept with the objects (ObjectInfo::crc32c). Errors: KeyAbsent, WrongState
  // (not writing), LeaseNotHeld (this request does not hold the write lease: it expired or was
  // dropped, and the object is quarantined or gone), InvalidArgument (read_leases above the cap).
  Status FinishWrite(RequestId request, const std::vector<ObjectKey>& keys,
                     uint32_t read_leases = 0, const uint32_t* crc32c = nullptr);
  // As FinishWrite, but the `read_leases` read leases go to `reader`'s ledger instead of the
  // writer's. The prefetch controller reserves loads under its own request id (so an END_SESSION
  // of the user's request cannot free memory an adapter is still writing into) and hands the
  // finished objects to the user's request here. Errors: as FinishWrite, plus NotReadable when
  // `reader` still holds a lease on a detached generation of a key.
  Status FinishWriteFor(RequestId writer, const std::vector<ObjectKey>& keys,
                        const LeaseOwner& reader, uint32_t read_leases);
  // writing -> absent (memory freed), atomically. Errors: as FinishWrite.
  Status AbortWrite(RequestId request, const std::vector<ObjectKey>& keys);
  // The writer `request` is done writing (it committed or aborted after its lease was dropped, or
  // its process exited): frees the objects quarantined for it. Returns how many.
  size_t ReleaseQuarantine(RequestId request);

  // ---- reading -----------------------------------------------------------------------------
  // Takes `count` read leases on every key, atomically. Errors: InvalidArgument (count 0),
  // KeyAbsent, NotReadable (still being written), ResourceExhausted (an object at the lease cap).
  Status AcquireRead(const LeaseOwner& owner, const std::vector<ObjectKey>& keys,
                     uint32_t count = 1);
  // Takes `count` read leases on the longest readable prefix of `keys` and returns its length;
  // keys after the first miss (or the first object at the lease cap) are not leased.
  size_t AcquireReadPrefix(const LeaseOwner& owner, const std::vector<ObjectKey>& keys,
                           uint32_t count = 1);
  // Takes `count` read leases on each key that is ready, skipping the others; bit i is set when
  // keys[i] was leased. Used by the store controller, for which a key evicted meanwhile is fine.
  Bitmap AcquireReadAvailable(const LeaseOwner& owner, const std::vector<ObjectKey>& keys,
                              uint32_t count = 1);
  // Returns `count` read leases per key, atomically. With `generations` (keys.size() values, from
  // LeasedInfo), each lease must still be on that generation of its key. Errors: InvalidArgument
  // (count 0), LeaseNotHeld (the request holds fewer than `count` read leases on some key, or
  // holds them on another generation: the object was released and leased again meanwhile).
  Status ReleaseRead(RequestId request, const std::vector<ObjectKey>& keys, uint32_t count = 1,
                     const uint64_t* generations = nullptr);
  // Returns up to `count` read leases per key: as many as the request holds, never more. Never
  // fails. Returns the number of leases returned.
  uint64_t ReleaseReadUpTo(RequestId request, const std::vector<ObjectKey>& keys, uint32_t count);
  // The ready (readable) keys, without leasing or touching.
  Bitmap Contains(const std::vector<ObjectKey>& keys) const;
  // Length of the ready prefix; touches it (chunk 0 ends most recently used). No lease.
  size_t TouchPrefix(const std::vector<ObjectKey>& keys);

  // ---- releasing in bulk ------------------------------------------------------------------
  // Drops every lease of the request (read leases returned, writes aborted). Returns the number
  // of ledger entries dropped (0 when the request holds nothing); adds the number of leases
  // (read leases plus write leases) dropped to *leases_released when it is not null.
  size_t ReleaseRequest(RequestId request, uint64_t* leases_released = nullptr);
  // Drops the ledgers of every request first seen from `client`. Returns and counts as
  // ReleaseRequest.
  size_t ReleaseClient(ClientId client, uint64_t* leases_released = nullptr);
  // Drops ledger entries whose TTL has passed (clock->Now()). Returns how many.
  size_t ReapExpired();

  // ---- removing ----------------------------------------------------------------------------
  // Deletes ready, unleased objects, atomically. Errors: KeyAbsent, Locked (leased or being
  // written).
  Status Delete(const std::vector<ObjectKey>& keys);
  // Removes `key` from the index if its live object is generation `generation` (its bytes were
  // found corrupt): freed now when unleased, else when its leases drain (detached). Returns
  // whether it was removed.
  bool Discard(const ObjectKey& key, uint64_t generation);
  // Removes every ready unleased object. With force, leased and writing objects are also removed
  // from the index (lookups stop seeing them) and freed when their leases are released or expire.
  // Returns the number of objects removed from the index.
  size_t Clear(bool force = false);
  // Evicts least recently used objects until at least `bytes` were freed or nothing evictable
  // remains. Returns bytes freed.
  uint64_t EvictBytes(uint64_t bytes);

  // ---- introspection -----------------------------------------------------------------------
  std::optional<ObjectInfo> Info(const ObjectKey& key) const;
  // Read leases `request` holds on `key` (0 if none).
  uint32_t LeasesHeld(RequestId request, const ObjectKey& key) const;
  // The object the request's read lease on `key` refers to (which may be a detached generation
  // after a forced Clear), or nullopt when the request holds no read lease on it. The lease's
  // recorded generation and key are checked against the object before it is returned.
  std::optional<ObjectInfo> LeasedInfo(RequestId request, const ObjectKey& key) const;
  ObjectTableStats stats() const;
  // Verifies every cross-structure invariant (index, slots, ledgers, policy, allocator). Tests.
  Status CheckInvariants() const;

  // Arena the offsets refer to.
  const std::shared_ptr<Arena>& arena() const noexcept { return arena_; }
  uint8_t* data(uint64_t offset) const noexcept { return arena_->base() + offset; }

  void AddListener(std::shared_ptr<ObjectTableListener> listener);
  void RemoveListener(const ObjectTableListener* listener);

 private:
  struct Slot {
    ObjectKey key;
    Extent extent;
    uint64_t size = 0;
    uint32_t readers = 0;
    ObjectState state = ObjectState::kWriting;
    bool in_use = false;
    bool temporary = false;
    bool detached = false;
    bool quarantined = false;  // write lease lost while the writer may still write
    bool has_crc = false;
    uint32_t crc = 0;
    uint64_t generation = 0;
    RequestId writer = 0;  // valid while writing
  };
  struct LeaseEntry {
    SlotId slot = 0;
    uint32_t reads = 0;
    bool write = false;
    uint64_t seq = 0;         // acquisition order, so bulk releases can run in reverse chunk order
    uint64_t generation = 0;  // of the slot when the lease was granted
    TimePoint expiry{};
  };
  using LeaseMap = internal::FlatMap<ObjectKey, LeaseEntry, ObjectKeyHash>;
  using IndexMap = internal::FlatMap<ObjectKey, SlotId, ObjectKeyHash>;
  struct Ledger {
    Ledger();
    ~Ledger();
    Ledger(Ledger&&) noexcept;
    ClientId client = 0;
    uint64_t next_seq = 0;
    std::unique_ptr<LeaseMap> entries;  // never null once created by LedgerLocked
  };
  // Work to do after mu_ is released.
  struct Events {
    std::vector<ObjectKey> ready;
    std::vector<std::pair<ObjectKey, RemovalReason>> removed;
    bool wake_maintenance = false;
  };

  ObjectTable(std::shared_ptr<Arena> arena, ObjectTableOptions options,
              std::unique_ptr<EvictionPolicy> policy);

  // All *Locked helpers REQUIRE mu_ held.
  SlotId NewSlotLocked();
  void FreeSlotLocked(SlotId s, RemovalReason reason, Events* ev);
  // Frees slot `s` when it is ready and unread; else takes it out of the index and the policy
  // and marks it detached (freed when its last lease goes). Either way listeners hear it
  // removed for `reason`.
  void RemoveSlotLocked(SlotId s, RemovalReason reason, Events* ev);
  // Evicts the least recently used unleased object; returns the bytes freed (0: none left).
  uint64_t EvictOneLocked(Events* ev);
  // Ready, unleased, permanent and indexed: may be evicted.
  static bool IsEvictable(const Slot& slot);
  // Accounts for slot `s` having just become evictable and makes it most recent.
  void BecameEvictableLocked(SlotId s);
  void ReturnReadsLocked(SlotId s, uint32_t n, Events* ev);
  void DropLedgerEntryLocked(const LeaseEntry& e, Events* ev);
  // Drops the ledger's entries (all, or only those expired at `now`), last acquired first.
  size_t DropEntriesLocked(Ledger* ledger, bool only_expired, TimePoint now, Events* ev,
                           uint64_t* leases = nullptr);
  // Adds `count` read leases on slot `s` to the ledger. Returns false (changing nothing) when the
  // ledger holds `key` for another slot: a detached generation.
  bool GrantReadLocked(Ledger* ledger, const ObjectKey& key, SlotId s, uint32_t count,
                       TimePoint now);
  using LedgerMap = std::unordered_map<RequestId, Ledger>;
  // The request's ledger, created (with a recycled lease map when one is spare) if absent.
  Ledger* LedgerLocked(const LeaseOwner& owner);
  LedgerMap::iterator EraseLedgerLocked(LedgerMap::iterator it);
  Status FinishWriteImpl(RequestId writer, const std::vector<ObjectKey>& keys, uint32_t read_leases,
                         const LeaseOwner* reader, const uint32_t* crc32c);
  // A write lease was dropped by someone other than its writer: keeps the extent (quarantine).
  void QuarantineLocked(SlotId s, Events* ev);
  // Whether slot `s` can take `count` more read leases; counts a refusal.
  bool UnderLeaseCapLocked(SlotId s, uint32_t count);
  ObjectInfo InfoLocked(SlotId s) const;
  Status ValidateWriteLocked(RequestId request, const std::vector<ObjectKey>& keys,
                             std::vector<SlotId>* slots) const;
  void Dispatch(Events* ev);
  void MaintenanceLoop();
  // Evicts down to the low watermark; with only_above_high, only if usage exceeds the high one.
  void EvictToLowWatermark(bool only_above_high);

  const std::shared_ptr<Arena> arena_;
  const ObjectTableOptions options_;
  const std::shared_ptr<Clock> clock_;

  mutable std::mutex mu_;
  ExtentAllocator allocator_;                                // internally locked; under mu_
  std::unique_ptr<EvictionPolicy> policy_;                   // GUARDED_BY(mu_)
  std::unique_ptr<IndexMap> index_;                          // GUARDED_BY(mu_)
  std::vector<Slot> slots_;                                  // GUARDED_BY(mu_)
  std::vector<SlotId> free_slots_;                           // GUARDED_BY(mu_)
  LedgerMap ledgers_;                                        // GUARDED_BY(mu_)
  std::vector<std::unique_ptr<LeaseMap>> spare_lease_maps_;  // GUARDED_BY(mu_)
  uint64_t evictable_bytes_ = 0;                             // GUARDED_BY(mu_)
  uint64_t evictable_count_ = 0;                             // GUARDED_BY(mu_)
  uint64_t next_generation_ = 1;                             // GUARDED_BY(mu_)
  // Writer request -> its quarantined slots.                           GUARDED_BY(mu_)
  std::unordered_map<RequestId, std::vector<SlotId>> quarantine_;
  ObjectTableStats counters_;  // GUARDED_BY(mu_): only the monotonic counters are kept here

  std::mutex listeners_mu_;
  std::vector<std::shared_ptr<ObjectTableListener>> listeners_;  // GUARDED_BY(listeners_mu_)

  std::mutex maint_mu_;
  std::condition_variable maint_cv_;
  bool maint_stop_ = false;             // GUARDED_BY(maint_mu_)
  bool maint_evict_requested_ = false;  // GUARDED_BY(maint_mu_)
  std::thread maint_thread_;            // started/joined under start_stop_mu_
  std::mutex start_stop_mu_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_OBJECT_TABLE_H_
