// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Stability: stable.
//
// The fields of every stats struct, each described once: its name, whether it is a gauge or a
// counter, the Prometheus metric it is exported as, and one line of help. Everything that shows
// stats to a user is generated from these tables: the Python classes' attributes, to_dict() and
// fields() (bindings/), the server's STATUS reply and its /metrics page (python/). The structs
// themselves stay plain values in their own headers.
//
// Adding a counter: add the member to its struct, then a row to the struct's table below. The
// static_assert after each table fails the build of anything that includes this header (the
// bindings, cpp_tests/stat_fields_test.cc) when a member has no row.
//
// Thread safety: the tables are constexpr data; ForEachStat reads a snapshot the caller owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/fs_adapter.h"
#include "lmcache_cpp/hash_options.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/redis_adapter.h"
#include "lmcache_cpp/storage_options.h"
#include "lmcache_cpp/store_controller.h"
#include "lmcache_cpp/sync_adapter.h"

namespace lmcache_cpp {

enum class StatKind : uint8_t {
  kGauge,    // a level that goes up and down (objects held, bytes in use)
  kCounter,  // a count that only grows while its component lives
};

// One row of a stats table.
template <typename S>
struct StatField {
  const char* name;  // the member's name: the Python attribute and the STATUS key
  uint64_t S::*member;
  StatKind kind;
  // The Prometheus family without the "lmcache_cpp_" prefix (a counter's ends in _total), or
  // nullptr for a struct the server does not export.
  const char* metric;
  const char* help;  // one line: the metric's HELP text and the Python attribute's docstring
};

// StatTable<S>::kFields: the rows of the stats struct S, in export order. Specialised below for
// each stats struct.
template <typename S>
struct StatTable;

// Whether StatTable<S> has a row for each member of S: S holds `extra_bytes` of members that are
// not stats (ClientUsage's client id) and one uint64_t per row.
template <typename S>
constexpr bool DescribesEveryField(size_t extra_bytes = 0) {
  return sizeof(S) == extra_bytes + std::size(StatTable<S>::kFields) * sizeof(uint64_t);
}

// Calls visit(field, value) for each row of S's table, in table order.
template <typename S, typename Visit>
void ForEachStat(const S& stats, Visit&& visit) {
  for (const StatField<S>& field : StatTable<S>::kFields) visit(field, stats.*field.member);
}

template <>
struct StatTable<EngineStats> {
  static constexpr StatField<EngineStats> kFields[] = {
      {"registrations", &EngineStats::registrations, StatKind::kGauge, "engine_registrations",
       "KV-cache registrations of connected engines."},
      {"namespaces", &EngineStats::namespaces, StatKind::kGauge, "engine_namespaces",
       "Distinct hashing namespaces (model, layout, salt)."},
      {"requests", &EngineStats::requests, StatKind::kGauge, "engine_requests",
       "Request ids tracked (holding leases or pending loads)."},
      {"transfers", &EngineStats::transfers, StatKind::kGauge, "engine_transfers",
       "Outstanding transfer tickets (prepared, not committed)."},
      {"pending_lookups", &EngineStats::pending_lookups, StatKind::kGauge, "engine_pending_lookups",
       "Two-phase lookups not yet collected."},
      {"sessions", &EngineStats::sessions, StatKind::kGauge, "engine_sessions",
       "Hashing sessions."},
      {"lookups", &EngineStats::lookups, StatKind::kCounter, "engine_lookups_total",
       "Two-phase LOOKUP requests."},
      {"sync_lookups", &EngineStats::sync_lookups, StatKind::kCounter, "engine_sync_lookups_total",
       "SYNC_LOOKUP requests."},
      {"lookup_chunks", &EngineStats::lookup_chunks, StatKind::kCounter,
       "engine_lookup_chunks_total", "Chunks asked for by lookups."},
      {"hit_chunks", &EngineStats::hit_chunks, StatKind::kCounter, "engine_hit_chunks_total",
       "Chunks hit by lookups (L1 or L2)."},
      {"l1_hit_chunks", &EngineStats::l1_hit_chunks, StatKind::kCounter,
       "engine_l1_hit_chunks_total", "Chunks hit in L1 by lookups."},
      {"l2_hit_chunks", &EngineStats::l2_hit_chunks, StatKind::kCounter,
       "engine_l2_hit_chunks_total", "Chunks hit in L2 by lookups."},
      {"stores", &EngineStats::stores, StatKind::kCounter, "engine_stores_total",
       "Store transfers prepared."},
      {"store_chunks", &EngineStats::store_chunks, StatKind::kCounter, "engine_store_chunks_total",
       "Chunks published by committed stores."},
      {"store_skipped", &EngineStats::store_skipped, StatKind::kCounter,
       "engine_store_skipped_chunks_total", "Store chunks already present."},
      {"store_aborts", &EngineStats::store_aborts, StatKind::kCounter, "engine_store_aborts_total",
       "Store transfers aborted or reaped."},
      {"retrieves", &EngineStats::retrieves, StatKind::kCounter, "engine_retrieves_total",
       "Retrieve transfers prepared."},
      {"retrieve_chunks", &EngineStats::retrieve_chunks, StatKind::kCounter,
       "engine_retrieve_chunks_total", "Chunks handed out for retrieval."},
      {"retrieve_failures", &EngineStats::retrieve_failures, StatKind::kCounter,
       "engine_retrieve_failures_total", "Retrieves that failed."},
      {"retrieve_absent", &EngineStats::retrieve_absent, StatKind::kCounter,
       "engine_retrieve_absent_total", "Retrieves that failed: an object absent or not leased."},
      {"retrieve_timeouts", &EngineStats::retrieve_timeouts, StatKind::kCounter,
       "engine_retrieve_timeouts_total",
       "Retrieves that failed: the request's L2 load did not finish in time."},
      {"retrieve_lease_lost", &EngineStats::retrieve_lease_lost, StatKind::kCounter,
       "engine_retrieve_lease_lost_total",
       "Retrieves refused at COMMIT_RETRIEVE: a lease expired or moved to another object."},
      {"store_expired", &EngineStats::store_expired, StatKind::kCounter,
       "engine_store_expired_total",
       "COMMIT_STOREs refused because the reservation had expired (nothing published)."},
      {"store_crc_computed", &EngineStats::store_crc_computed, StatKind::kCounter,
       "engine_store_crc_computed_total",
       "Objects whose CRC32C the server computed at COMMIT_STORE (the worker sent none)."},
      {"fenced_stores", &EngineStats::fenced_stores, StatKind::kGauge, "engine_fenced_stores",
       "Dropped stores whose writer may still write."},
      {"freed_leases", &EngineStats::freed_leases, StatKind::kCounter, "engine_freed_leases_total",
       "Leases released by FREE_LOOKUP_LOCKS."},
      {"ended_sessions", &EngineStats::ended_sessions, StatKind::kCounter,
       "engine_ended_sessions_total", "END_SESSION requests handled."},
      {"ended_clients", &EngineStats::ended_clients, StatKind::kCounter,
       "engine_ended_clients_total", "Clients ended (disconnect or timeout)."},
      {"reaped_transfers", &EngineStats::reaped_transfers, StatKind::kCounter,
       "engine_reaped_transfers_total", "Transfer tickets reaped by TTL."},
      {"reaped_requests", &EngineStats::reaped_requests, StatKind::kCounter,
       "engine_reaped_requests_total", "Idle request ids reaped by TTL."},
  };
};
static_assert(DescribesEveryField<EngineStats>());

template <>
struct StatTable<ClientUsage> {
  static constexpr StatField<ClientUsage> kFields[] = {
      {"registrations", &ClientUsage::registrations, StatKind::kGauge, "client_registrations",
       "KV-cache registrations the client holds."},
      {"requests", &ClientUsage::requests, StatKind::kGauge, "client_requests",
       "Request ids the client has open (its lookups' requests)."},
      {"sessions", &ClientUsage::sessions, StatKind::kGauge, "client_hash_sessions",
       "Hashing sessions charged to the client."},
      {"session_bytes", &ClientUsage::session_bytes, StatKind::kGauge, "client_hash_session_bytes",
       "Memory of the client's hashing sessions."},
      {"jobs", &ClientUsage::jobs, StatKind::kGauge, "client_lookup_jobs",
       "Prefetch jobs the client holds."},
      {"tickets", &ClientUsage::tickets, StatKind::kGauge, "client_transfer_tickets",
       "Uncommitted transfer tickets of the client."},
      {"reserved_bytes", &ClientUsage::reserved_bytes, StatKind::kGauge, "client_reserved_bytes",
       "Arena bytes reserved by the client's uncommitted stores."},
  };
};
static_assert(DescribesEveryField<ClientUsage>(sizeof(ClientId)));

template <>
struct StatTable<ObjectTableStats> {
  static constexpr StatField<ObjectTableStats> kFields[] = {
      {"capacity_bytes", &ObjectTableStats::capacity_bytes, StatKind::kGauge, "l1_capacity_bytes",
       "L1 arena capacity in bytes."},
      {"used_bytes", &ObjectTableStats::used_bytes, StatKind::kGauge, "l1_used_bytes",
       "L1 bytes held by objects."},
      {"objects", &ObjectTableStats::objects, StatKind::kGauge, "l1_objects", "Objects in L1."},
      {"writing", &ObjectTableStats::writing, StatKind::kGauge, "l1_writing_objects",
       "L1 objects being written (reserved, not committed)."},
      {"ready", &ObjectTableStats::ready, StatKind::kGauge, "l1_ready_objects",
       "L1 objects ready to read."},
      {"temporary", &ObjectTableStats::temporary, StatKind::kGauge, "l1_temporary_objects",
       "L1 objects loaded from L2 for one request."},
      {"detached", &ObjectTableStats::detached, StatKind::kGauge, "l1_detached_objects",
       "L1 objects removed but still leased."},
      {"evictable", &ObjectTableStats::evictable, StatKind::kGauge, "l1_evictable_objects",
       "L1 objects that could be evicted now."},
      {"evictable_bytes", &ObjectTableStats::evictable_bytes, StatKind::kGauge,
       "l1_evictable_bytes", "L1 bytes that could be evicted now."},
      {"leased_objects", &ObjectTableStats::leased_objects, StatKind::kGauge, "l1_leased_objects",
       "L1 objects holding at least one lease."},
      {"read_leases", &ObjectTableStats::read_leases, StatKind::kGauge, "l1_read_leases",
       "Read leases held on L1 objects."},
      {"write_leases", &ObjectTableStats::write_leases, StatKind::kGauge, "l1_write_leases",
       "Write leases held on L1 objects."},
      {"requests", &ObjectTableStats::requests, StatKind::kGauge, "l1_lease_holders",
       "Request ids holding L1 leases."},
      {"evictions", &ObjectTableStats::evictions, StatKind::kCounter, "l1_evictions_total",
       "L1 objects evicted."},
      {"evicted_bytes", &ObjectTableStats::evicted_bytes, StatKind::kCounter,
       "l1_evicted_bytes_total", "L1 bytes evicted."},
      {"expired_leases", &ObjectTableStats::expired_leases, StatKind::kCounter,
       "l1_expired_leases_total", "L1 leases released by TTL expiry."},
      {"reserve_failures", &ObjectTableStats::reserve_failures, StatKind::kCounter,
       "l1_reserve_failures_total", "L1 reservations that found no space."},
      {"lease_cap_refusals", &ObjectTableStats::lease_cap_refusals, StatKind::kCounter,
       "l1_lease_cap_refusals_total", "L1 read leases refused at the per-object cap."},
      {"quarantined", &ObjectTableStats::quarantined, StatKind::kGauge, "l1_quarantined_objects",
       "L1 extents held for writers still at work."},
      {"quarantined_bytes", &ObjectTableStats::quarantined_bytes, StatKind::kGauge,
       "l1_quarantined_bytes", "Bytes of quarantined L1 extents."},
      {"discarded", &ObjectTableStats::discarded, StatKind::kCounter, "l1_discarded_total",
       "L1 objects dropped for failing their checksum."},
  };
};
static_assert(DescribesEveryField<ObjectTableStats>());

template <>
struct StatTable<PrefetchStats> {
  static constexpr StatField<PrefetchStats> kFields[] = {
      {"jobs", &PrefetchStats::jobs, StatKind::kGauge, "prefetch_jobs",
       "Prefetch jobs outstanding (not yet claimed or reaped)."},
      {"in_flight", &PrefetchStats::in_flight, StatKind::kGauge, "prefetch_in_flight",
       "Prefetch jobs running."},
      {"queued", &PrefetchStats::queued, StatKind::kGauge, "prefetch_queued",
       "Prefetch jobs waiting for a running slot."},
      {"submitted", &PrefetchStats::submitted, StatKind::kCounter, "prefetch_submitted_total",
       "Prefetch jobs submitted."},
      {"completed", &PrefetchStats::completed, StatKind::kCounter, "prefetch_completed_total",
       "Prefetch jobs completed."},
      {"cancelled", &PrefetchStats::cancelled, StatKind::kCounter, "prefetch_cancelled_total",
       "Prefetch jobs cancelled."},
      {"reaped", &PrefetchStats::reaped, StatKind::kCounter, "prefetch_reaped_total",
       "Prefetch jobs dropped by TTL expiry."},
      {"l1_hit_keys", &PrefetchStats::l1_hit_keys, StatKind::kCounter, "prefetch_l1_hit_keys_total",
       "Keys found in L1 by lookups."},
      {"l2_hit_keys", &PrefetchStats::l2_hit_keys, StatKind::kCounter, "prefetch_l2_hit_keys_total",
       "Keys found in L2 by lookups."},
      {"l2_lookup_timeouts", &PrefetchStats::l2_lookup_timeouts, StatKind::kCounter,
       "prefetch_l2_lookup_timeouts_total", "L2 lookups that missed their deadline."},
      {"load_failures", &PrefetchStats::load_failures, StatKind::kCounter,
       "prefetch_load_failures_total", "L2 to L1 loads that failed."},
  };
};
static_assert(DescribesEveryField<PrefetchStats>());

template <>
struct StatTable<StoreControllerStats> {
  static constexpr StatField<StoreControllerStats> kFields[] = {
      {"queued", &StoreControllerStats::queued, StatKind::kGauge, "store_queued_keys",
       "Objects waiting to be stored to L2."},
      {"in_flight_batches", &StoreControllerStats::in_flight_batches, StatKind::kGauge,
       "store_in_flight_batches", "L2 store batches in flight."},
      {"announced", &StoreControllerStats::announced, StatKind::kCounter, "store_announced_total",
       "Objects announced to the L2 store controller."},
      {"submitted", &StoreControllerStats::submitted, StatKind::kCounter, "store_submitted_total",
       "Objects submitted to L2 adapters."},
      {"stored", &StoreControllerStats::stored, StatKind::kCounter, "store_stored_total",
       "Objects stored to L2."},
      {"failed", &StoreControllerStats::failed, StatKind::kCounter, "store_failed_total",
       "Objects whose L2 store failed."},
      {"skipped_evicted", &StoreControllerStats::skipped_evicted, StatKind::kCounter,
       "store_skipped_evicted_total", "Objects evicted before their L2 store."},
      {"corrupt_in_l1", &StoreControllerStats::corrupt_in_l1, StatKind::kCounter,
       "store_corrupt_in_l1_total",
       "Objects whose L1 bytes failed their checksum before the L2 store (not stored)."},
      {"dropped", &StoreControllerStats::dropped, StatKind::kCounter, "store_dropped_total",
       "Objects not stored to L2 because the queue was full."},
      {"freed_from_l1", &StoreControllerStats::freed_from_l1, StatKind::kCounter,
       "store_freed_from_l1_total", "Objects dropped from L1 after the L2 store."},
  };
};
static_assert(DescribesEveryField<StoreControllerStats>());

template <>
struct StatTable<L2AdapterStats> {
  static constexpr StatField<L2AdapterStats> kFields[] = {
      {"objects", &L2AdapterStats::objects, StatKind::kGauge, "l2_objects",
       "Objects in the L2 adapter."},
      {"bytes", &L2AdapterStats::bytes, StatKind::kGauge, "l2_bytes", "Bytes in the L2 adapter."},
      {"capacity_bytes", &L2AdapterStats::capacity_bytes, StatKind::kGauge, "l2_capacity_bytes",
       "Capacity of the L2 adapter in bytes (0 = unbounded)."},
      {"pinned_objects", &L2AdapterStats::pinned_objects, StatKind::kGauge, "l2_pinned_objects",
       "L2 objects pinned by lookups."},
      {"pins", &L2AdapterStats::pins, StatKind::kGauge, "l2_pins", "Pins held on L2 objects."},
      {"in_flight", &L2AdapterStats::in_flight, StatKind::kGauge, "l2_in_flight",
       "L2 operations in flight."},
      {"stores", &L2AdapterStats::stores, StatKind::kCounter, "l2_stores_total",
       "Objects stored to the L2 adapter."},
      {"store_failures", &L2AdapterStats::store_failures, StatKind::kCounter,
       "l2_store_failures_total", "L2 stores that failed."},
      {"lookups", &L2AdapterStats::lookups, StatKind::kCounter, "l2_lookups_total",
       "Keys looked up in the L2 adapter."},
      {"loads", &L2AdapterStats::loads, StatKind::kCounter, "l2_loads_total",
       "Objects loaded from the L2 adapter."},
      {"load_misses", &L2AdapterStats::load_misses, StatKind::kCounter, "l2_load_misses_total",
       "L2 loads that found no valid object."},
      {"evictions", &L2AdapterStats::evictions, StatKind::kCounter, "l2_evictions_total",
       "Objects evicted from the L2 adapter."},
      {"corrupt_reads", &L2AdapterStats::corrupt_reads, StatKind::kCounter,
       "l2_corrupt_reads_total", "L2 reads that failed validation."},
      {"bad_unpins", &L2AdapterStats::bad_unpins, StatKind::kCounter, "l2_bad_unpins_total",
       "L2 unpins of keys that were not pinned."},
      {"bytes_written", &L2AdapterStats::bytes_written, StatKind::kCounter,
       "l2_written_bytes_total", "Bytes written to the L2 adapter."},
      {"bytes_read", &L2AdapterStats::bytes_read, StatKind::kCounter, "l2_read_bytes_total",
       "Bytes read from the L2 adapter."},
  };
};
static_assert(DescribesEveryField<L2AdapterStats>());

template <>
struct StatTable<SyncAdapterStats> {
  static constexpr StatField<SyncAdapterStats> kFields[] = {
      {"queued", &SyncAdapterStats::queued, StatKind::kGauge, nullptr,
       "operations waiting for a worker"},
      {"executing", &SyncAdapterStats::executing, StatKind::kGauge, nullptr,
       "operations a worker is running"},
      {"completed", &SyncAdapterStats::completed, StatKind::kCounter, nullptr,
       "calls answered with a result"},
      {"failed", &SyncAdapterStats::failed, StatKind::kCounter, nullptr,
       "calls that failed (e.g. a Python exception)"},
      {"cancelled", &SyncAdapterStats::cancelled, StatKind::kCounter, nullptr,
       "calls cancelled by close()"},
      {"rejected", &SyncAdapterStats::rejected, StatKind::kCounter, nullptr,
       "calls refused before they ran"},
      {"unpins", &SyncAdapterStats::unpins, StatKind::kCounter, nullptr,
       "unpin calls passed to the adapter"},
      {"dropped_unpins", &SyncAdapterStats::dropped_unpins, StatKind::kCounter, nullptr,
       "unpin calls dropped"},
  };
};
static_assert(DescribesEveryField<SyncAdapterStats>());

template <>
struct StatTable<FsRecoveryReport> {
  static constexpr StatField<FsRecoveryReport> kFields[] = {
      {"indexed", &FsRecoveryReport::indexed, StatKind::kCounter, nullptr, "valid objects indexed"},
      {"dropped", &FsRecoveryReport::dropped, StatKind::kCounter, nullptr,
       "invalid object files deleted"},
      {"temp_files_removed", &FsRecoveryReport::temp_files_removed, StatKind::kCounter, nullptr,
       "leftover temporary files deleted"},
      {"evicted", &FsRecoveryReport::evicted, StatKind::kCounter, nullptr,
       "valid objects evicted to fit the capacity"},
  };
};
static_assert(DescribesEveryField<FsRecoveryReport>());

template <>
struct StatTable<AllocatorStats> {
  static constexpr StatField<AllocatorStats> kFields[] = {
      {"capacity", &AllocatorStats::capacity, StatKind::kGauge, nullptr, "bytes managed"},
      {"used", &AllocatorStats::used, StatKind::kGauge, nullptr, "bytes in live extents"},
      {"free", &AllocatorStats::free, StatKind::kGauge, nullptr, "capacity - used"},
      {"largest_free", &AllocatorStats::largest_free, StatKind::kGauge, nullptr,
       "largest allocation possible now"},
      {"live_extents", &AllocatorStats::live_extents, StatKind::kGauge, nullptr,
       "extents handed out"},
      {"free_extents", &AllocatorStats::free_extents, StatKind::kGauge, nullptr, "holes"},
      {"allocations", &AllocatorStats::allocations, StatKind::kCounter, nullptr,
       "successful allocations"},
      {"failed_allocations", &AllocatorStats::failed_allocations, StatKind::kCounter, nullptr,
       "failed allocate calls"},
      {"frees", &AllocatorStats::frees, StatKind::kCounter, nullptr, "frees"},
  };
};
static_assert(DescribesEveryField<AllocatorStats>());

template <>
struct StatTable<HashSessionStats> {
  static constexpr StatField<HashSessionStats> kFields[] = {
      {"sessions", &HashSessionStats::sessions, StatKind::kGauge, nullptr, "live sessions"},
      {"bytes", &HashSessionStats::bytes, StatKind::kGauge, nullptr, "memory the sessions hold"},
      {"chunks_hashed", &HashSessionStats::chunks_hashed, StatKind::kCounter, nullptr,
       "chunks that were hashed"},
      {"chunks_reused", &HashSessionStats::chunks_reused, StatKind::kCounter, nullptr,
       "chunks answered from a session"},
      {"sessions_rebuilt", &HashSessionStats::sessions_rebuilt, StatKind::kCounter, nullptr,
       "prefix mismatches"},
      {"sessions_expired", &HashSessionStats::sessions_expired, StatKind::kCounter, nullptr,
       "dropped by TTL"},
      {"sessions_evicted", &HashSessionStats::sessions_evicted, StatKind::kCounter, nullptr,
       "dropped for max_sessions or max_bytes"},
      {"sessions_over_quota", &HashSessionStats::sessions_over_quota, StatKind::kCounter, nullptr,
       "dropped for their owner's quota"},
  };
};
static_assert(DescribesEveryField<HashSessionStats>());

template <>
struct StatTable<RedisAdapterStats> {
  static constexpr StatField<RedisAdapterStats> kFields[] = {
      {"misses_absent", &RedisAdapterStats::misses_absent, StatKind::kCounter,
       "l2_redis_misses_absent_total", "loads of keys Redis did not hold"},
      {"misses_truncated", &RedisAdapterStats::misses_truncated, StatKind::kCounter,
       "l2_redis_misses_truncated_total", "loads of values shorter than their header says"},
      {"misses_torn", &RedisAdapterStats::misses_torn, StatKind::kCounter,
       "l2_redis_misses_torn_total",
       "loads of values whose header failed its checksum or with trailing bytes"},
      {"misses_foreign", &RedisAdapterStats::misses_foreign, StatKind::kCounter,
       "l2_redis_misses_foreign_total", "loads of values another program or namespace wrote"},
      {"misses_wrong_size", &RedisAdapterStats::misses_wrong_size, StatKind::kCounter,
       "l2_redis_misses_wrong_size_total",
       "loads of intact values of another size than the L1 object"},
      {"misses_corrupt", &RedisAdapterStats::misses_corrupt, StatKind::kCounter,
       "l2_redis_misses_corrupt_total", "loads of values whose payload failed its CRC32C"},
      {"gone_after_lookup", &RedisAdapterStats::gone_after_lookup, StatKind::kCounter,
       "l2_redis_gone_after_lookup_total",
       "loads of keys gone since their lookup (Redis cannot pin)"},
      {"node_errors", &RedisAdapterStats::node_errors, StatKind::kCounter,
       "l2_redis_node_errors_total",
       "keys whose Redis node failed (timeout, I/O, refusal, error reply)"},
      {"reconnects", &RedisAdapterStats::reconnects, StatKind::kCounter,
       "l2_redis_reconnects_total", "connections opened after the first (standalone)"},
      {"moved", &RedisAdapterStats::moved, StatKind::kCounter, "l2_redis_moved_total",
       "MOVED redirections followed"},
      {"ask", &RedisAdapterStats::ask, StatKind::kCounter, "l2_redis_ask_total",
       "ASK redirections followed"},
      {"stores_rejected", &RedisAdapterStats::stores_rejected, StatKind::kCounter,
       "l2_redis_stores_rejected_total", "stores refused at the in-flight write-back bound"},
      {"inflight_store_bytes", &RedisAdapterStats::inflight_store_bytes, StatKind::kGauge,
       "l2_redis_inflight_store_bytes", "store bytes accepted and not yet written"},
  };
};
static_assert(DescribesEveryField<RedisAdapterStats>());

}  // namespace lmcache_cpp
