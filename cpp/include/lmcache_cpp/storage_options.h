// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The options and statistics of the L1 object table and of the prefetch controller, the parts of
// them the stable StorageManagerConfig and StorageStats hold. Split out of object_table.h and
// prefetch_controller.h (whose classes stay unstable).
//
// Stability: stable; the structs may gain fields.
#ifndef LMCACHE_CPP_STORAGE_OPTIONS_H_
#define LMCACHE_CPP_STORAGE_OPTIONS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "lmcache_cpp/clock.h"

namespace lmcache_cpp {

struct ObjectTableOptions {
  ObjectTableOptions() {}  // NOLINT: out-of-line-initialisable aggregate with defaults
  Duration read_lease_ttl = std::chrono::seconds(300);
  Duration write_lease_ttl = std::chrono::seconds(120);
  // Background eviction starts above high_watermark * capacity and stops below low_watermark *
  // capacity. 1.0 disables background eviction (synchronous eviction still happens).
  double high_watermark = 0.95;
  double low_watermark = 0.90;
  // How often the maintenance thread reaps expired leases.
  Duration reap_interval = std::chrono::seconds(1);
  std::string eviction_policy = "lru";
  uint64_t alignment = 4096;
  // Read leases one object may carry at once; grants past it are refused (ResourceExhausted),
  // never wrapped. At most 2^31.
  uint32_t max_leases_per_object = uint32_t{1} << 24;
  std::shared_ptr<Clock> clock;  // null = SteadyClock
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct ObjectTableStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t objects = 0;  // in the index (writing + ready), excluding detached
  uint64_t writing = 0;
  uint64_t ready = 0;
  uint64_t temporary = 0;
  uint64_t detached = 0;
  uint64_t evictable = 0;
  uint64_t evictable_bytes = 0;
  uint64_t leased_objects = 0;  // objects with at least one read lease
  uint64_t read_leases = 0;     // sum of read lease counts
  uint64_t write_leases = 0;
  uint64_t requests = 0;  // ledgers
  uint64_t evictions = 0;
  uint64_t evicted_bytes = 0;
  uint64_t expired_leases = 0;      // ledger entries dropped by TTL
  uint64_t reserve_failures = 0;    // ReserveWrite calls that returned OutOfMemory
  uint64_t lease_cap_refusals = 0;  // read lease grants refused at max_leases_per_object
  uint64_t quarantined = 0;         // objects held out of the allocator for a fenced writer
  uint64_t quarantined_bytes = 0;
  uint64_t discarded = 0;  // objects removed by Discard (failed a checksum in L1)
};

struct PrefetchOptions {
  PrefetchOptions() {}                // NOLINT
  size_t max_in_flight = 16;          // two-phase lookups in their L2 phase at once
  size_t max_jobs_per_client = 4096;  // ResourceExhausted beyond
  Duration job_ttl = std::chrono::seconds(120);
  Duration reap_interval = std::chrono::seconds(1);
  std::shared_ptr<Clock> clock;  // null = SteadyClock; used for TTLs only
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct PrefetchStats {
  uint64_t jobs = 0;       // in the table (any phase)
  uint64_t in_flight = 0;  // in an L2 phase
  uint64_t queued = 0;     // waiting for an L2 slot
  uint64_t submitted = 0, completed = 0, cancelled = 0, reaped = 0;
  uint64_t l1_hit_keys = 0, l2_hit_keys = 0;
  uint64_t l2_lookup_timeouts = 0;  // sync lookups answered without an adapter
  uint64_t load_failures = 0;       // keys planned from L2 that did not load
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct AllocatorStats {
  uint64_t capacity = 0;      // bytes managed
  uint64_t used = 0;          // bytes in live extents (rounded sizes)
  uint64_t free = 0;          // capacity - used
  uint64_t largest_free = 0;  // the largest single allocation that would succeed now
  uint64_t live_extents = 0;
  uint64_t free_extents = 0;        // number of holes
  uint64_t allocations = 0;         // successful Allocate calls (batch items count one each)
  uint64_t failed_allocations = 0;  // Allocate/AllocateBatch calls that returned nullopt/error
  uint64_t frees = 0;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_STORAGE_OPTIONS_H_
