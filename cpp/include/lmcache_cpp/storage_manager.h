// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// StorageManager: the facade over one host's storage: the shared-memory arena, the L1 object
// table, the L2 adapters and the store and prefetch controllers. The cache engine (and a C++
// host embedding the engine) calls this.
//
// Start/Stop are explicit and idempotent. Stop, in order: the prefetch controller stops taking
// work and cancels its jobs; the store controller stops; every adapter is closed (so every
// outstanding L2 callback has run and released its leases and pins); the controllers are waited
// on until idle; the table's maintenance thread stops. No thread is left behind and no lease or
// pin taken by an in-flight operation survives Stop.
//
// Thread safety: every method is thread-safe; the accessors return components that are
// themselves thread-safe and live as long as the manager.
//
// Ownership: the manager owns the arena, the table and the controllers; it shares ownership of
// the adapters (StorageManagerConfig::adapters), closes them in Stop, and they must not be given
// to a second manager. A CacheEngine built on the manager holds a raw pointer: destroy the
// engine first.
//
// Embedding (docs/embedding.md): Create, Start, build a CacheEngine on it; at shutdown call
// store()->WaitIdle() (Stop drops the keys still queued for L2), destroy the engine, then Stop.
// Requests go through the engine; EndRequest / EndClient here take the engine's internal ids.
//
// Stability: stable: StorageManagerConfig, Create, Start, Stop, arena(), adapters(), stats() and
// store()->WaitIdle(). The option structs of the components (ArenaOptions, ObjectTableOptions,
// PrefetchOptions, StoreControllerOptions) may gain fields; table(), prefetch(), store() and
// EndRequest / EndClient expose building blocks and are unstable (ObjectTable and
// PrefetchController are only forward-declared: their headers are not installed).
#ifndef LMCACHE_CPP_STORAGE_MANAGER_H_
#define LMCACHE_CPP_STORAGE_MANAGER_H_

#include <memory>
#include <mutex>
#include <vector>

#include "lmcache_cpp/arena.h"
#include "lmcache_cpp/ids.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_options.h"
#include "lmcache_cpp/store_controller.h"

namespace lmcache_cpp {

// Unstable building blocks (object_table.h, prefetch_controller.h; not installed). The accessors
// below hand them out to code built inside this project.
class ObjectTable;
class PrefetchController;

struct StorageManagerConfig {
  StorageManagerConfig() {}  // NOLINT
  ArenaOptions arena;
  ObjectTableOptions table;
  PrefetchOptions prefetch;
  StoreControllerOptions store;
  std::shared_ptr<StorePolicy> store_policy;  // null = every adapter
  // In lookup priority order: a key is loaded from the first adapter that has it.
  std::vector<std::shared_ptr<L2Adapter>> adapters;
};

struct StorageStats {
  ObjectTableStats l1;
  PrefetchStats prefetch;
  StoreControllerStats store;
  std::vector<L2AdapterStats> l2;  // per adapter, in configuration order
};

class StorageManager {
 public:
  // Creates the arena and the table (errors from Arena::Create / ObjectTable::Create). Threads
  // start with Start(). Errors: InvalidArgument (a null adapter, an arena size of 0, bad table
  // options), IoError (the arena could not be created or mapped).
  static Result<std::unique_ptr<StorageManager>> Create(StorageManagerConfig config);
  ~StorageManager();  // Stop()
  StorageManager(const StorageManager&) = delete;
  StorageManager& operator=(const StorageManager&) = delete;

  // Starts the table's maintenance thread and both controllers. Idempotent; Unavailable after
  // Stop. Until it runs, nothing is written to L2 and leases do not expire.
  Status Start();
  // See the header comment. Idempotent; afterwards lookups fail with Unavailable. REQUIRES: not
  // called from an adapter callback.
  void Stop();

  ObjectTable* table() const { return table_.get(); }
  PrefetchController* prefetch() const { return prefetch_.get(); }
  StoreController* store() const { return store_.get(); }
  // The arena every ticket offset refers to: object i of a TransferTicket is at
  // arena()->base() + offsets[i] (another process maps it with arena()->descriptor()).
  const std::shared_ptr<Arena>& arena() const { return arena_; }
  const std::vector<std::shared_ptr<L2Adapter>>& adapters() const { return adapters_; }

  // END_SESSION: the request's jobs and pending loads are dropped (pins and temporary objects
  // released) and then every lease it holds. Returns the number of leases released.
  size_t EndRequest(RequestId request);
  // A client disconnected: the same for every job and ledger it created.
  size_t EndClient(ClientId client);

  StorageStats stats() const;

 private:
  StorageManager() = default;

  std::shared_ptr<Arena> arena_;
  std::unique_ptr<ObjectTable> table_;
  std::vector<std::shared_ptr<L2Adapter>> adapters_;
  std::unique_ptr<StoreController> store_;
  std::unique_ptr<PrefetchController> prefetch_;

  std::mutex mu_;
  bool started_ = false;  // GUARDED_BY(mu_)
  bool stopped_ = false;  // GUARDED_BY(mu_)
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_STORAGE_MANAGER_H_
