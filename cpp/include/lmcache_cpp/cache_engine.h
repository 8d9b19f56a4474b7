// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CacheEngine: the request semantics of the cache server (docs/protocol.md), in C++, so that the
// Python dispatcher is only a codec and a C++ inference server can embed the same engine without
// Python or ZeroMQ (docs/embedding.md).
//
// Vocabulary.
//   * A client is one connection (one engine process: a scheduler or a worker); ClientId 0 is
//     invalid. Handles and tickets are bound to the client that created them.
//   * A model namespace is (model_name, world_size). Workers register their KV layout with
//     RegisterKvCache; all registrations of a namespace must agree on the layout fingerprint, which
//     is part of every chunk hash (engines with different layouts never read each other's bytes).
//     Requests that name an unregistered namespace fail with NotFound.
//   * A request is the engine's request id string within a model; the engine interns it to a
//     RequestId that owns the lookup leases (ObjectTable ledger), the hashing session and the
//     pending sync load. END_SESSION (EndSession) drops all of it; so does request_ttl of idleness.
//   * A key (EngineKey) names a token range [start, end) of a request, by token ids or by the
//     engine's block hashes, for one KV rank (worker_id) or all ranks (worker_id = -1,
//     chunk-major). Only whole chunks count.
//
// Leases. A lookup leases its hits for the request, `readers` = tp_size / world_size times each
// when tp_size > world_size (MLA: every tensor-parallel worker reads the same object; with a
// world size of 1 that is tp_size leases), else once. Each worker's retrieve returns one
// (CommitRetrieve). FreeLookupLocks and EndSession return the rest. Store reservations belong to
// the transfer ticket (an internal request id), not to the engine's request, so ending a request
// never breaks a store in flight and a worker that dies aborts only its own stores.
//
// Retrieve never reports partial success: PrepareRetrieve fails (KeyAbsent) unless every object
// of the range is present and leased by the request, and CommitRetrieve fails (LeaseNotHeld) when
// a lease expired or was released while the worker copied -- checked against the generation of
// each object handed out, so a lease released and taken again on a new object does not pass --
// in which case the copied bytes must not be used. A transfer range past the key's data is
// InvalidArgument, never a shorter transfer.
//
// Writers are fenced. A worker writes into the arena between PrepareStore and CommitStore. When
// its ticket is dropped without its commit (transfer_ttl, or its client ended), or its write
// lease expired, the reserved extents are quarantined, not freed (ObjectTable), and the ticket
// leaves a tombstone: a late CommitStore is refused (LeaseNotHeld) and frees them, and so does the
// exit of the writer's process when the host told the engine its pid (SetClientProcess). Every
// object carries a CRC32C from CommitStore on: the worker's, computed while it copied, or the
// engine's, computed at the commit.
//
// Thread safety: every method is thread-safe. The engine's mutex is a leaf: it is never held while
// calling the storage manager (table, controllers, adapters), so blocking calls (SyncLookup,
// WaitPrefetch, FreeLookupLocks, PrepareRetrieve) block only their caller.
//
// Lifetime: the storage manager must outlive the engine. Stop() (or the destructor) joins the
// reaper thread; it does not stop the storage manager.
//
// Stability: stable (docs/embedding.md), except what is marked unstable below.
#ifndef LMCACHE_CPP_CACHE_ENGINE_H_
#define LMCACHE_CPP_CACHE_ENGINE_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/hash_options.h"
#include "lmcache_cpp/ids.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_manager.h"

namespace lmcache_cpp {

// Unstable building blocks the engine drives (prefetch_controller.h; not installed).
struct PrefetchRequest;
struct PrefetchResult;
enum class SyncLookupScope : uint8_t;

// Internal request ids of engine transfer tickets (store reservations). Unstable.
inline constexpr RequestId kTransferRequestBase = kInternalRequestBit | (RequestId{1} << 61);

struct EngineConfig {
  EngineConfig() {}  // NOLINT
  uint32_t chunk_size = 256;
  HashAlgorithm hash_algorithm = HashAlgorithm::kSha256;
  // The L2 deadline of SyncLookup when the caller gives none.
  Duration sync_lookup_timeout = std::chrono::milliseconds(200);
  // How long PrepareRetrieve / FreeLookupLocks wait for the request's pending L2 load by default.
  Duration retrieve_wait_timeout = std::chrono::seconds(30);
  // Uncommitted transfer tickets are dropped (stores aborted) after this.
  Duration transfer_ttl = std::chrono::seconds(120);
  // A request id unused for this long is ended as by EndSession.
  Duration request_ttl = std::chrono::minutes(10);
  // How long a request id ended by EndSession stays ended: a lookup of it that arrives later (one
  // a server had queued before the END_SESSION overtook it) is Cancelled instead of bringing the
  // request back with leases nobody releases. Request ids are unique per request in practice;
  // zero disables it.
  Duration ended_request_ttl = std::chrono::seconds(30);
  // Lookup results not collected within this are forgotten (the prefetch controller's job_ttl
  // releases their leases).
  Duration lookup_ttl = std::chrono::seconds(240);
  HashSessionOptions sessions;
  size_t max_registrations_per_client = 256;
  size_t max_transfers_per_client = 4096;
  size_t max_chunks_per_key = 16384;  // InvalidArgument beyond
  // Object keys one request may name: chunks x ranks (a key for every rank of a world of W ranks
  // names W keys per chunk). ResourceExhausted beyond, before anything is hashed or leased: the
  // memory and time of one request are bounded by this, not by its chunks alone.
  size_t max_keys_per_request = size_t{1} << 20;
  size_t max_requests = 1 << 20;  // interned request ids; ResourceExhausted beyond
  // Request ids one client may have interned at once (its lookups create them; END_SESSION or
  // request_ttl ends them): one client cannot take the whole max_requests. ResourceExhausted
  // beyond.
  size_t max_requests_per_client = 65536;
  // Arena bytes one client may hold reserved for writing (uncommitted PREPARE_STOREs): one worker
  // cannot reserve the whole L1. 0 = half the arena. ResourceExhausted beyond, before reserving.
  uint64_t max_reserved_bytes_per_client = 0;
  Duration reap_interval = std::chrono::seconds(1);
  std::shared_ptr<Clock> clock;  // null = SteadyClock; used for TTLs only
};

// What one client holds in the engine now (CacheEngine::ClientUsages), against its quotas.
// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct ClientUsage {
  ClientId client = 0;
  uint64_t registrations = 0;
  uint64_t requests = 0;        // request ids it interned (its lookups' requests)
  uint64_t sessions = 0;        // hashing sessions charged to it
  uint64_t session_bytes = 0;   // their memory
  uint64_t jobs = 0;            // prefetch jobs (lookups not yet collected, sync lookups)
  uint64_t tickets = 0;         // uncommitted transfer tickets
  uint64_t reserved_bytes = 0;  // arena bytes reserved by its uncommitted stores
};

enum class KeyMode : uint8_t { kTokens = 0, kBlockHashes = 1 };

// A request's key. Non-owning: the views must stay valid for the duration of the call.
struct EngineKey {
  std::string_view model_name;
  uint32_t world_size = 1;
  int32_t worker_id = -1;  // KV rank in [0, world_size), or -1 for every rank
  std::string_view request_id;
  std::string_view cache_salt;  // optional tenant isolation; empty = none
  KeyMode mode = KeyMode::kTokens;
  // kTokens: little-endian uint32 token ids (size a multiple of 4). kBlockHashes: the engine's
  // chained per-block hashes, block_hash_size bytes each (blocks of the registered block size).
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint32_t block_hash_size = 32;
  uint64_t start = 0;         // first token of the range
  uint64_t end = UINT64_MAX;  // one past the last token; clipped to the key's length
};

struct Registration {
  uint64_t id = 0;  // random, bound to the client
  uint32_t chunk_size = 0;
  uint64_t object_bytes = 0;
  std::string fingerprint;  // namespace layout fingerprint
  ArenaDescriptor arena;    // what a worker maps (same host only)
};

struct LookupResult {
  uint64_t hit_chunks = 0;  // leading chunks present for every rank, leased for the request
  uint64_t hit_tokens = 0;  // hit_chunks * chunk_size
  uint64_t l1_chunks = 0;   // of which were in L1 at lookup time
  uint64_t l2_chunks = 0;   // of which come from L2
};

struct TransferTicket {
  JobHandle handle;
  uint64_t first_chunk = 0;  // start / chunk_size
  // One per key of the range (chunk-major for worker_id = -1): the arena offset of the object,
  // or -1 for a store key that was skipped (already present, or repeated in the range).
  std::vector<int64_t> offsets;
  uint64_t object_bytes = 0;
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct EngineStats {
  uint64_t registrations = 0;
  uint64_t namespaces = 0;
  uint64_t requests = 0;         // interned request ids
  uint64_t transfers = 0;        // outstanding tickets
  uint64_t pending_lookups = 0;  // two-phase lookups not yet collected
  uint64_t sessions = 0;         // hashing sessions (all namespaces)
  // Monotonic counters.
  uint64_t lookups = 0, sync_lookups = 0;
  uint64_t lookup_chunks = 0, hit_chunks = 0, l1_hit_chunks = 0, l2_hit_chunks = 0;
  uint64_t stores = 0, store_chunks = 0, store_skipped = 0, store_aborts = 0;
  uint64_t retrieves = 0, retrieve_chunks = 0, retrieve_failures = 0;
  // retrieve_failures by cause: objects absent or not leased, a pending L2 load not finished in
  // time, a lease lost (expired, released, or another generation) before COMMIT_RETRIEVE.
  uint64_t retrieve_absent = 0, retrieve_timeouts = 0, retrieve_lease_lost = 0;
  // COMMIT_STOREs refused because the reservation had expired or been dropped (nothing published).
  uint64_t store_expired = 0;
  // Objects whose CRC32C the engine computed at COMMIT_STORE (the worker sent none).
  uint64_t store_crc_computed = 0;
  uint64_t fenced_stores = 0;  // dropped store tickets whose writer may still write (gauge)
  uint64_t freed_leases = 0, ended_sessions = 0, ended_clients = 0;
  uint64_t reaped_transfers = 0, reaped_requests = 0;
};

class CacheEngine {
 public:
  // REQUIRES: `storage` outlives the engine. InvalidArgument for a chunk size of 0, NotSupported
  // for a hash algorithm this build lacks.
  static Result<std::unique_ptr<CacheEngine>> Create(StorageManager* storage,
                                                     EngineConfig config = {});
  ~CacheEngine();  // Stop()
  CacheEngine(const CacheEngine&) = delete;
  CacheEngine& operator=(const CacheEngine&) = delete;

  // Starts the reaper thread (ReapExpired every reap_interval). Optional: a host may call
  // ReapExpired itself instead. Idempotent.
  void Start();
  // Joins the reaper. Idempotent. Held leases and tickets stay until EndClient / the storage
  // manager's Stop.
  void Stop();

  uint32_t chunk_size() const noexcept { return config_.chunk_size; }
  const EngineConfig& config() const noexcept { return config_; }
  StorageManager* storage() const noexcept { return storage_; }

  // ---- registration ------------------------------------------------------------------------
  // Registers one worker's KV layout for (model_name, world_size); worker_id in [0, world_size).
  // Errors: InvalidArgument (bad layout, chunk size not a multiple of the block size, bad ids, a
  // world_size whose one chunk for every rank would not fit in L1),
  // AlreadyExists (the namespace is registered with a different layout fingerprint),
  // ResourceExhausted (client's registrations).
  Result<Registration> RegisterKvCache(ClientId client, std::string_view model_name,
                                       uint32_t world_size, int32_t worker_id,
                                       const KvCacheLayout& layout);
  // Errors: NotFound (unknown or already unregistered), PermissionDenied (another client's).
  Status UnregisterKvCache(ClientId client, uint64_t registration_id);

  // ---- lookup ------------------------------------------------------------------------------
  // Two-phase: leases the L1 prefix now, starts the L2 part, never waits for L2. The lookup
  // covers the whole chunks of [0, end). Errors: InvalidArgument (bad key, tp_size), NotFound
  // (unregistered model), ResourceExhausted, Unavailable.
  Result<JobHandle> Lookup(ClientId client, const EngineKey& key, uint32_t tp_size);
  // The result exactly once, nullopt while running. Errors: NotFound, PermissionDenied.
  Result<std::optional<LookupResult>> QueryPrefetch(ClientId client, const JobHandle& handle);
  // As QueryPrefetch, blocking up to `timeout` (condition variable).
  Result<std::optional<LookupResult>> WaitPrefetch(ClientId client, const JobHandle& handle,
                                                   Duration timeout);
  // L1 prefix + L2 existence with pins in one call, answered within `timeout` (nullopt =
  // config.sync_lookup_timeout) even when an adapter stalls; the L2->L1 load continues in the
  // background and PrepareRetrieve joins it. Errors: as Lookup.
  Result<LookupResult> SyncLookup(ClientId client, const EngineKey& key, uint32_t tp_size,
                                  std::optional<Duration> timeout = std::nullopt);
  // SyncLookup of a key whose every chunk is in L1 (or with no L2 adapters): the same result,
  // and it never waits, so a server may answer it on its socket thread. Otherwise nullopt, with
  // nothing leased: call SyncLookup where blocking is allowed. Errors: as Lookup.
  Result<std::optional<LookupResult>> SyncLookupInL1(ClientId client, const EngineKey& key,
                                                     uint32_t tp_size);
  // Releases every lease the request holds on the whole chunks of [start, end) (for the key's
  // rank, or every rank), after joining a pending sync load. Returns the leases released; an
  // empty range or an unknown request releases nothing. Errors: InvalidArgument, NotFound
  // (unregistered model), PermissionDenied (the caller neither looked the request up nor holds a
  // registration of its model: it may not act for the request).
  // `timeout` bounds the join (nullopt = retrieve_wait_timeout); past it, what the request holds
  // now is released.
  Result<uint64_t> FreeLookupLocks(ClientId client, const EngineKey& key, uint32_t tp_size,
                                   std::optional<Duration> timeout = std::nullopt);
  // The engine's id of the request when PrepareRetrieve / FreeLookupLocks of it would wait now,
  // for its pending sync load (starting a load its lookup did not start, as they would); 0 when
  // they would not (an unknown request, or no load pending). Never blocks: a server parks the
  // request under that id instead of blocking a thread, and runs it once the id's completion
  // notice arrives (or with a zero timeout at its deadline).
  RequestId PendingLoad(std::string_view model_name, std::string_view request_id);
  // Completion notices, for a server that parks waits: see
  // PrefetchController::SetCompletionNotice (the job's handle, and the engine's request id that
  // PendingLoad returned for the request).
  void SetCompletionNotice(JobCompletionNotice notice);
  // Drops the request's hashing session, jobs, pending loads and leases. Returns the leases
  // released (0 for an unknown request). Errors: PermissionDenied (as FreeLookupLocks).
  Result<uint64_t> EndSession(ClientId client, std::string_view model_name,
                              std::string_view request_id);

  // ---- engine-driven transfers (shared L1) ------------------------------------------------
  // Reserves the objects of the whole chunks of [start, end) (start must be chunk-aligned);
  // objects already present are skipped. The worker writes each reserved object at its offset,
  // then calls CommitStore. Errors: InvalidArgument, NotFound (model), PermissionDenied (the
  // client holds no registration of the key's namespace), OutOfMemory (L1 full of leased
  // objects), ResourceExhausted (client's tickets).
  Result<TransferTicket> PrepareStore(ClientId client, const EngineKey& key);
  // Publishes (success) or aborts the reserved objects. Returns the objects published.
  // `crc32c`, when given, holds one CRC32C per offset of the ticket (entries of skipped offsets
  // are ignored): the checksums of the bytes the worker wrote; without it the engine computes
  // them. Errors: NotFound (unknown ticket), InvalidArgument (a retrieve ticket; a wrong number
  // of checksums: nothing is published), PermissionDenied, LeaseNotHeld (the reservation expired
  // or was dropped: nothing was published).
  Result<uint64_t> CommitStore(ClientId client, const JobHandle& handle, bool success = true,
                               const std::vector<uint32_t>* crc32c = nullptr);
  // Joins the request's pending sync load (up to `timeout`, nullopt = retrieve_wait_timeout), then
  // returns the offsets of the objects of [start, end), each of which must be present and leased
  // by the request. Errors: InvalidArgument, NotFound (model), KeyAbsent (an object is missing or
  // not leased: nothing may be read), Timeout (the load is still running), ResourceExhausted.
  Result<TransferTicket> PrepareRetrieve(ClientId client, const EngineKey& key,
                                         std::optional<Duration> timeout = std::nullopt);
  // Returns one read lease per object of the ticket. Errors: NotFound, PermissionDenied,
  // LeaseNotHeld (a lease expired or was released while the worker copied: the bytes it copied
  // may be wrong and must not be used).
  Status CommitRetrieve(ClientId client, const JobHandle& handle);

  // ---- housekeeping ------------------------------------------------------------------------
  // The process behind `client` (same host, same pid namespace): the engine keeps a pidfd, so
  // that extents fenced for the client's writers are freed once the process has exited. Errors:
  // InvalidArgument (pid <= 0), NotFound (no such process), NotSupported (no pidfd_open).
  Status SetClientProcess(ClientId client, int pid);
  // A client disconnected: its jobs, leases, tickets and registrations go. Its uncommitted stores
  // are fenced (see above) unless its process is known to have exited. Returns the leases
  // released.
  uint64_t EndClient(ClientId client);
  // Removes every unleased L1 object (force: leased ones are detached and freed when released).
  uint64_t Clear(bool force = false);
  // Reaps tickets, lookup results and request ids past their TTLs, and idle hashing sessions.
  // Returns how many entries were dropped.
  uint64_t ReapExpired();
  EngineStats stats() const;
  // One entry per client that holds anything, ordered by client id.
  std::vector<ClientUsage> ClientUsages() const;
  // The effective max_reserved_bytes_per_client (0 in the config = half the arena).
  uint64_t reserved_bytes_quota() const;

 private:
  struct Namespace;
  struct Request;
  struct Ticket;
  struct PendingLookup;
  struct ResolvedKey;

  CacheEngine(StorageManager* storage, EngineConfig config);

  std::shared_ptr<Namespace> FindNamespace(std::string_view model_name, uint32_t world_size) const;
  // Interns (create = true) or finds the request id. Returns 0 when not found.
  Result<RequestId> InternRequest(std::string_view model_name, std::string_view request_id,
                                  bool create, ClientId client);
  // PermissionDenied unless `client` looked the request up (its owner) or holds a registration
  // of `model_name`. REQUIRES: mu_ held.
  Status CheckActsForLocked(ClientId client, std::string_view model_name, ClientId owner) const;
  // Hashes the key and selects the chunk range and the object keys. With a tp_size, also
  // checks it and sets out->readers. Every check runs before the request is interned, so a bad
  // key or tp_size creates nothing.
  enum class RangeKind : uint8_t { kLookup, kInner, kAligned };
  // What Resolve does with the key's request id: kOptional (may be empty; a known one is found),
  // kRequired (must be given; found, never created), kCreate (must be given; interned).
  enum class RequestIdUse : uint8_t { kOptional, kRequired, kCreate };
  Status Resolve(const EngineKey& key, RangeKind range, RequestIdUse request_id, ResolvedKey* out,
                 std::optional<uint32_t> tp_size = std::nullopt, ClientId client = 0);
  Result<uint32_t> Readers(const Namespace& ns, uint32_t tp_size) const;
  // After a lookup of `rk`: when its request was ended meanwhile, drops what the lookup left
  // under the request's id (leases, jobs, hashing session) and returns true.
  bool DropIfEnded(const EngineKey& key, const ResolvedKey& rk);
  // DropIfEnded, as the lookup's status: Cancelled when the request was ended, else OK.
  Status CancelIfEnded(const EngineKey& key, const ResolvedKey& rk);
  // Resolves `key` for a lookup by `client` (interning its request) into `rk`, and moves its
  // object keys into the prefetch request that leases each hit rk->readers times.
  Result<PrefetchRequest> ResolveLookup(ClientId client, const EngineKey& key, uint32_t tp_size,
                                        ResolvedKey* rk);
  // SyncLookup (kL1Only: SyncLookupInL1).
  Result<std::optional<LookupResult>> SyncLookupImpl(ClientId client, const EngineKey& key,
                                                     uint32_t tp_size, Duration timeout,
                                                     SyncLookupScope scope);
  Result<std::optional<LookupResult>> Collect(ClientId client, const JobHandle& handle,
                                              const Result<std::optional<PrefetchResult>>& result);
  // Stores the ticket under a fresh random handle. REQUIRES: mu_ held (the per-client count is
  // the caller's).
  JobHandle InsertTicketLocked(ClientId client, Ticket ticket);
  enum class TicketKind : uint8_t { kStore, kRetrieve };
  // Removes the client's ticket of that kind (NotFound, PermissionDenied, InvalidArgument).
  Result<Ticket> TakeTicket(ClientId client, const JobHandle& handle, TicketKind kind);
  // A ticket left tickets_: its client's ticket count and reserved bytes go down. REQUIRES mu_.
  void UnchargeTicketLocked(const Ticket& ticket);
  // A request id left requests_: its owner's count goes down. REQUIRES mu_.
  void UnchargeRequestLocked(ClientId owner);
  // Drops the namespace if nothing registers it any more (its sessions go with it; a call that
  // already resolved it keeps it alive). REQUIRES mu_.
  void PruneNamespaceLocked(const std::shared_ptr<Namespace>& ns);
  static Status ReservedQuotaExceeded(uint64_t held, uint64_t quota, uint64_t more = 0);
  // The writer aborted: frees its reservations.
  void AbortTicket(const Ticket& ticket);
  // Dropped without its writer (TTL, client ended): quarantines its reservations and leaves a
  // tombstone, unless the writer's process has exited.
  void FenceTicket(const JobHandle& handle, const Ticket& ticket);
  // Frees the quarantines of tombstones whose writer's process exited.
  void ReleaseExitedWriters();
  void ReapLoop();

  StorageManager* const storage_;
  ObjectTable* const table_;
  PrefetchController* const prefetch_;
  const EngineConfig config_;
  const std::shared_ptr<Clock> clock_;

  mutable std::mutex mu_;
  // "model_name \x1f world_size" -> namespace.                               GUARDED_BY(mu_)
  std::unordered_map<std::string, std::shared_ptr<Namespace>> namespaces_;
  struct RegistrationEntry {
    ClientId client = 0;
    std::shared_ptr<Namespace> ns;
  };
  std::unordered_map<uint64_t, RegistrationEntry> registrations_;       // GUARDED_BY(mu_)
  std::unordered_map<ClientId, size_t> registrations_per_client_;       // GUARDED_BY(mu_)
  std::unordered_map<std::string, std::unique_ptr<Request>> requests_;  // GUARDED_BY(mu_)
  // Request keys ended by EndSession, with when, oldest first (bounded).     GUARDED_BY(mu_)
  std::unordered_map<std::string, TimePoint> ended_;
  std::deque<std::pair<std::string, TimePoint>> ended_order_;
  std::unordered_map<JobHandle, std::unique_ptr<Ticket>, JobHandleHash> tickets_;  // mu_
  std::unordered_map<ClientId, size_t> tickets_per_client_;           // GUARDED_BY(mu_)
  std::unordered_map<ClientId, size_t> requests_per_client_;          // GUARDED_BY(mu_)
  std::unordered_map<ClientId, uint64_t> reserved_bytes_per_client_;  // GUARDED_BY(mu_)
  struct Tombstone {
    ClientId client = 0;
    RequestId request = 0;  // the ticket's internal request (its quarantine)
  };
  std::unordered_map<JobHandle, Tombstone, JobHandleHash> tombstones_;  // GUARDED_BY(mu_)
  struct ClientProcess {
    int pidfd = -1;       // closed once the process has exited
    bool exited = false;  // the process has exited: its writers are done
    bool ended = false;   // EndClient ran; kept while tombstones name the client
  };
  std::unordered_map<ClientId, ClientProcess> processes_;  // GUARDED_BY(mu_)
  std::unordered_map<JobHandle, std::unique_ptr<PendingLookup>, JobHandleHash> lookups_;  // mu_
  RequestId next_request_ = 1;                              // GUARDED_BY(mu_)
  RequestId next_transfer_request_ = kTransferRequestBase;  // GUARDED_BY(mu_)
  EngineStats counters_;                                    // GUARDED_BY(mu_)

  std::mutex reaper_mu_;
  std::condition_variable reaper_cv_;
  bool reaper_stop_ = false;  // GUARDED_BY(reaper_mu_)
  std::thread reaper_;        // started/joined under start_stop_mu_
  std::mutex start_stop_mu_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CACHE_ENGINE_H_
