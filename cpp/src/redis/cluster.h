// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Redis Cluster routing for the Redis L2 client (docs/design/redis.md, "Cluster").
//
// KeySlot maps a key to one of 16384 slots: CRC16 (XMODEM) of the key, or of its hash tag (the
// bytes between the first '{' and the next '}' when that span is non-empty), modulo 16384.
//
// ClusterClient executes batches of single-key commands against a cluster. Flow: group the
// requests by the master that owns each key's slot (the slot map, from CLUSTER SHARDS, or
// CLUSTER SLOTS on servers without it), send each group as one pipelined batch on that node's
// connection, then follow redirections: "MOVED <slot> <node>" updates that slot's owner and
// retries there (and the whole map is refreshed after the batch), "ASK <slot> <node>" retries
// once at that node preceded by ASKING (the slot is migrating; the map is unchanged). Rounds are
// bounded by max_redirects. A node that cannot be reached fails only its own requests (its
// connection reconnects on a later batch, after its backoff), and the map is refreshed after the
// batch, asking the nodes in turn, so a failover is picked up.
//
// Results: results[i] is requests[i]'s reply (error replies other than redirections included,
// e.g. CLUSTERDOWN), or the status of its node's failure (Unavailable, Timeout, IoError), or
// Unavailable when the slot has no owner or the redirections did not settle.
//
// Thread safety: one thread at a time (each worker of the adapter owns a client). Nodes are
// served one after the other in a batch; a batch costs one pipelined round trip per node
// involved (plus one per redirection round).
#ifndef LMCACHE_CPP_SRC_REDIS_CLUSTER_H_
#define LMCACHE_CPP_SRC_REDIS_CLUSTER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "lmcache_cpp/status.h"
#include "redis/connection.h"
#include "redis/resp.h"
#include "redis/url.h"

namespace lmcache_cpp {
namespace redis {

inline constexpr uint16_t kSlotCount = 16384;

// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster uses.
uint16_t Crc16(const void* data, size_t n);
uint16_t KeySlot(std::string_view key);

struct SlotRange {
  uint16_t first = 0, last = 0;  // inclusive
  Endpoint master;
};

// Parses a CLUSTER SHARDS reply (RESP2 arrays or RESP3 maps) into the ranges of the online master
// of each shard; `tls` picks "tls-port" over "port"; `asked` stands in for an unknown endpoint.
// Returns Corruption on a malformed reply.
Result<std::vector<SlotRange>> ParseClusterShards(const Reply& reply, bool tls,
                                                  const Endpoint& asked);
// The same from a CLUSTER SLOTS reply.
Result<std::vector<SlotRange>> ParseClusterSlots(const Reply& reply, const Endpoint& asked);

struct ClusterOptions {
  ConnectionOptions connection;  // db is ignored (a cluster has only database 0)
  int max_redirects = 5;
};

struct ClusterStats {
  uint64_t batches = 0;
  uint64_t node_batches = 0;  // pipelined batches sent to nodes
  uint64_t moved = 0, ask = 0;
  uint64_t refreshes = 0, refresh_failures = 0;
  uint64_t node_failures = 0;  // node batches that failed (their requests failed)
};

class ClusterClient {
 public:
  ClusterClient(std::vector<Endpoint> seeds, ClusterOptions options);
  ~ClusterClient();
  ClusterClient(const ClusterClient&) = delete;
  ClusterClient& operator=(const ClusterClient&) = delete;

  // Loads the slot map from the first node that answers (known nodes, then the seeds).
  // Returns Unavailable when none does, or the last node's error.
  Status RefreshSlotMap();

  // Executes requests[0, n) (each with its key at args[key_index]) as described above; results
  // is resized to n. Loads the slot map first if there is none.
  void Execute(const Request* requests, size_t n, std::vector<Result<Reply>>* results);

  // The master that serves `slot` in the current map, if any.
  const Endpoint* Owner(uint16_t slot) const;
  size_t node_count() const { return nodes_.size(); }
  const ClusterStats& stats() const { return stats_; }
  // The connection to `endpoint` (created if new). For tests and administration.
  Connection* NodeConnection(const Endpoint& endpoint) { return nodes_[NodeIndex(endpoint)].get(); }

 private:
  static constexpr uint16_t kNoNode = 0xFFFF;
  size_t NodeIndex(const Endpoint& endpoint);

  std::vector<Endpoint> seeds_;
  ClusterOptions options_;
  std::vector<std::unique_ptr<Connection>> nodes_;
  std::array<uint16_t, kSlotCount> owner_;  // node index per slot, kNoNode if unserved
  bool have_map_ = false;
  ClusterStats stats_;
};

}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_REDIS_CLUSTER_H_
