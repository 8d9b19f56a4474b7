// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// How the engine hashes token chunks into object keys (EngineConfig::hash_algorithm) and bounds
// its per-request hashing sessions (EngineConfig::sessions). Split out of chunk_hash.h and
// hash_session.h (whose classes stay unstable).
//
// Stability: stable; HashSessionOptions may gain fields.
#ifndef LMCACHE_CPP_HASH_OPTIONS_H_
#define LMCACHE_CPP_HASH_OPTIONS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "lmcache_cpp/clock.h"

namespace lmcache_cpp {

enum class HashAlgorithm : int32_t { kSha256 = 0, kXxh3 = 1 };

struct HashSessionOptions {
  Duration ttl = std::chrono::minutes(10);
  size_t max_sessions = 65536;
  uint64_t max_bytes = uint64_t{1} << 30;  // all sessions
  size_t max_sessions_per_owner = 8192;
  uint64_t max_bytes_per_owner = uint64_t{256} << 20;
};

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct HashSessionStats {
  uint64_t sessions = 0;
  uint64_t bytes = 0;             // held by all sessions (gauge)
  uint64_t chunks_hashed = 0;     // chunks that went through the hash function
  uint64_t chunks_reused = 0;     // chunks answered from a session
  uint64_t sessions_rebuilt = 0;  // prefix mismatch on an existing session
  uint64_t sessions_expired = 0;
  uint64_t sessions_evicted = 0;     // dropped for max_sessions or max_bytes
  uint64_t sessions_over_quota = 0;  // dropped for their owner's quota (or too large to keep)
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_HASH_OPTIONS_H_
