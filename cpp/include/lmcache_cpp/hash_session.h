// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// HashSessionCache: per-request memo of chunk hashes so a growing request (a prompt that is
// looked up, then stored chunk by chunk as decoding proceeds) is hashed once and extended.
//
// A session is keyed by a request id (the engine layer's 64-bit id for a request) and remembers
// the tokens of the chunks it hashed and their hashes. A later call with the same request id and a
// longer token list hashes only the new chunks. If the new tokens do not start with the remembered
// ones (a reused request id, a client bug), the session is rebuilt from scratch: the cache never
// returns hashes of tokens it was not given. The check costs one memcmp of the remembered tokens,
// far below the cost of re-hashing.
//
// Sessions expire after `ttl` without use and are capped at `max_sessions` and `max_bytes` (the
// least recently used goes first). Expiry is applied by Reap(now) and, amortised, on insert (the
// LRU list is ordered by last use, so a reap only looks at its expired tail). A max_sessions of 0
// acts as 1.
//
// Owners. Each session is charged to an owner (the engine's client id; 0 when none is given), and
// each owner is capped at `max_sessions_per_owner` sessions and `max_bytes_per_owner` bytes. An
// owner over its quota loses its own least recently used sessions, never another owner's: one
// client cannot evict everyone's memo. A session larger than an owner's whole quota (or than
// max_bytes) is not kept. Quotas only ever cost re-hashing, never a wrong or failed answer. Bytes
// count the remembered tokens and hashes plus a fixed per-session overhead.
//
// Thread safety: all methods are thread-safe (one internal mutex). Hashing of new chunks happens
// outside the mutex; two concurrent calls for the same request may both hash: when their tokens
// agree the longer result stays in the session, when they conflict the later store replaces it.
// Each call returns the hashes of its own tokens either way.
//
// Stability: unstable (not installed); HashSessionOptions (EngineConfig::sessions) is in
// hash_options.h.
#ifndef LMCACHE_CPP_HASH_SESSION_H_
#define LMCACHE_CPP_HASH_SESSION_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/hash_options.h"

namespace lmcache_cpp {

// What one owner's sessions hold.
struct HashSessionUsage {
  size_t sessions = 0;
  uint64_t bytes = 0;
};

class HashSessionCache {
 public:
  // `hasher` must outlive the cache. `clock` defaults to SteadyClock.
  HashSessionCache(const ChunkHasher* hasher, HashSessionOptions options,
                   std::shared_ptr<Clock> clock = nullptr);

  // Hashes of the full chunks of tokens[0, n) for `request_id`, reusing and extending its session,
  // which is charged to `owner` (a session first made by another owner stays charged to it).
  std::vector<ChunkHash> HashTokens(uint64_t owner, uint64_t request_id, const uint32_t* tokens,
                                    size_t n);
  // As above, owner 0.
  std::vector<ChunkHash> HashTokens(uint64_t request_id, const uint32_t* tokens, size_t n) {
    return HashTokens(0, request_id, tokens, n);
  }

  // Drops the session of `request_id`. Returns whether one existed.
  bool EndSession(uint64_t request_id);
  // Drops sessions unused since now - ttl. Returns how many.
  size_t Reap();
  size_t size() const;
  HashSessionStats stats() const;
  // Sessions and bytes per owner (owners with none are absent).
  std::unordered_map<uint64_t, HashSessionUsage> UsageByOwner() const;

 private:
  struct Session {
    uint64_t owner = 0;
    std::vector<uint32_t> tokens;  // tokens of the hashed full chunks
    std::vector<ChunkHash> hashes;
    uint64_t bytes = 0;  // charged to the owner
    TimePoint last_used;
    std::list<uint64_t>::iterator lru_pos;
    std::list<uint64_t>::iterator owner_pos;
  };
  struct Owner {
    HashSessionUsage usage;
    std::list<uint64_t> lru;  // the owner's sessions; front = most recent
  };
  using SessionMap = std::unordered_map<uint64_t, Session>;
  size_t ReapLocked(TimePoint now);
  // Moves the session to the front of both LRU lists. REQUIRES mu_.
  void TouchLocked(Session& s, TimePoint now);
  // Recharges the session's bytes to its owner after its vectors changed. REQUIRES mu_.
  void RechargeLocked(Session& s);
  void EraseLocked(SessionMap::iterator it);
  // Enforces the owner's quota, then the global caps, never evicting `keep`. REQUIRES mu_.
  void EvictLocked(uint64_t keep);

  const ChunkHasher* const hasher_;
  const HashSessionOptions options_;
  const std::shared_ptr<Clock> clock_;

  mutable std::mutex mu_;
  SessionMap sessions_;                         // GUARDED_BY(mu_)
  std::list<uint64_t> lru_;                     // GUARDED_BY(mu_); front = most recent
  std::unordered_map<uint64_t, Owner> owners_;  // GUARDED_BY(mu_)
  uint64_t bytes_ = 0;                          // GUARDED_BY(mu_)
  HashSessionStats stats_;                      // GUARDED_BY(mu_)
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_HASH_SESSION_H_
