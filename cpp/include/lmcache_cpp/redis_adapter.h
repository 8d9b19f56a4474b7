// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// RedisL2Adapter: an L2 tier on Redis or Valkey, standalone or cluster, shared by cache servers
// on different hosts (docs/l2-redis.md, docs/design/redis.md).
//
// Flow: Submit* enqueues under the adapter's mutex and returns. Worker threads (each owning its
// own connection, or cluster client, so no socket is shared) take a whole call, run it as one
// pipeline per node involved, and run the callback with no adapter lock held. Lookups and loads
// have their own queue, served first, and worker 0 never takes stores, so write-back never
// delays a lookup. Lookup: pipelined EXISTS. Load: pipelined GET, each value read by the socket
// straight into the caller's buffer, then checked (redis/value.h); anything but an intact value
// of the right size is a miss, counted by reason. Store: SET <key> <header><payload>, the
// payload sent from the caller's buffer.
//
// Redis cannot pin: SubmitLookupAndPin reports present keys and pins nothing, Unpin does
// nothing, and a key evicted between lookup and load makes that load a miss (counted as
// gone_after_lookup). Redis's maxmemory policy is the only eviction authority: the adapter never
// deletes and reports capacity_bytes 0.
//
// Bounds: stores accepted and not yet written hold at most max_inflight_store_bytes; a store
// past the bound completes at once with no bit set (counted). Every network wait is bounded by
// connect_timeout or op_timeout, and Close() wakes workers blocked in the network at once.
//
// Thread safety: all methods may be called from any thread.
//
// Stability: unstable (options and stats may change); use it through l2_adapter.h.
#ifndef LMCACHE_CPP_REDIS_ADAPTER_H_
#define LMCACHE_CPP_REDIS_ADAPTER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

struct RedisAdapterOptions {
  std::string url = "redis://127.0.0.1:6379";  // redis:// or rediss://; a seed node in a cluster
  bool cluster = false;
  std::string username;  // overrides the URL's when non-empty
  std::string password;  // overrides the URL's when non-empty
  std::string key_prefix = "lmc:";
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  uint32_t connect_timeout_ms = 2000;
  uint32_t op_timeout_ms = 5000;
  size_t connections_per_node = 4;  // worker threads (each owns a connection per node), >= 2
  uint64_t max_inflight_store_bytes = 1ull << 30;
  // Parts of the namespace digest in every key (redis/value.h): servers that share objects must
  // agree on them.
  std::string namespace_name = "lmcache_cpp";
};

// Each field is described once in stat_fields.h.
struct RedisAdapterStats {
  uint64_t misses_absent = 0;  // loads that found no value
  uint64_t misses_truncated = 0, misses_torn = 0, misses_foreign = 0;
  uint64_t misses_wrong_size = 0, misses_corrupt = 0;
  uint64_t gone_after_lookup = 0;  // loads of keys a lookup had found that were gone
  uint64_t node_errors = 0;        // keys whose node failed (timeout, I/O, refused, error reply)
  uint64_t reconnects = 0;         // connections opened after the first (standalone)
  uint64_t moved = 0, ask = 0;     // cluster redirections followed
  uint64_t stores_rejected = 0;    // stores refused: in-flight write-back bytes at their bound
  uint64_t inflight_store_bytes = 0;
};

class RedisL2Adapter final : public L2Adapter {
 public:
  // Validates the options and starts the workers. Tries one connection at once: a refused AUTH
  // is an error (PermissionDenied); an unreachable server is logged and retried by the workers.
  static Result<std::unique_ptr<RedisL2Adapter>> Create(RedisAdapterOptions options);
  ~RedisL2Adapter() override;

  std::string name() const override;
  // One SET of value header + payload per key, sent from the caller's buffer, pipelined per
  // node. Refused (not stored, counted) past max_inflight_store_bytes in flight.
  void SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                   StoreCallback done) override;
  // One pipelined EXISTS per node involved. Redis cannot pin: a key found here may be evicted
  // before its load, which is then a miss (counted as gone_after_lookup).
  void SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) override;
  // One GET per key, read straight into the caller's buffer behind the value header; a value
  // whose header or CRC32C does not check out is a miss, counted by reason, never loaded.
  void SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                  LoadCallback done) override;
  void Unpin(const std::vector<ObjectKey>& keys) override;  // nothing to do: no pins
  // Wakes workers waiting on a server (an eventfd every wait watches), fails queued work,
  // joins. Idempotent.
  void Close() override;
  L2AdapterStats stats() const override;  // capacity_bytes 0: Redis's maxmemory bounds it
  RedisAdapterStats redis_stats() const;

  // The Redis key of `key` (for tests and administration).
  std::string KeyFor(const ObjectKey& key) const;

 private:
  class Impl;
  explicit RedisL2Adapter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_REDIS_ADAPTER_H_
