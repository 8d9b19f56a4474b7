// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/hash_session.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace lmcache_cpp {

HashSessionCache::HashSessionCache(const ChunkHasher* hasher, HashSessionOptions options,
                                   std::shared_ptr<Clock> clock)
    : hasher_(hasher),
      options_(options),
      clock_(clock != nullptr ? std::move(clock) : SteadyClock::Default()) {}

namespace {

// What a session costs besides its vectors' elements: the map node, the two list nodes and the
// vectors' headers, rounded up.
constexpr uint64_t kSessionOverhead = 192;

}  // namespace

void HashSessionCache::TouchLocked(Session& s, TimePoint now) {
  s.last_used = now;
  lru_.splice(lru_.begin(), lru_, s.lru_pos);
  auto& owner_lru = owners_[s.owner].lru;
  owner_lru.splice(owner_lru.begin(), owner_lru, s.owner_pos);
}

void HashSessionCache::RechargeLocked(Session& s) {
  const uint64_t bytes =
      kSessionOverhead + s.tokens.size() * sizeof(uint32_t) + s.hashes.size() * sizeof(ChunkHash);
  HashSessionUsage& usage = owners_[s.owner].usage;
  usage.bytes = usage.bytes - s.bytes + bytes;
  bytes_ = bytes_ - s.bytes + bytes;
  s.bytes = bytes;
}

void HashSessionCache::EraseLocked(SessionMap::iterator it) {
  Session& s = it->second;
  auto owner = owners_.find(s.owner);
  owner->second.usage.bytes -= s.bytes;
  --owner->second.usage.sessions;
  owner->second.lru.erase(s.owner_pos);
  if (owner->second.usage.sessions == 0) owners_.erase(owner);
  bytes_ -= s.bytes;
  lru_.erase(s.lru_pos);
  sessions_.erase(it);
}

void HashSessionCache::EvictLocked(uint64_t keep) {
  auto self = sessions_.find(keep);
  const uint64_t owner_id = self->second.owner;
  const uint64_t owner_cap = std::min(options_.max_bytes_per_owner, options_.max_bytes);
  if (self->second.bytes > owner_cap) {
    EraseLocked(self);  // larger than its owner may ever hold: not kept
    ++stats_.sessions_over_quota;
    return;
  }
  const size_t owner_sessions = std::max<size_t>(options_.max_sessions_per_owner, 1);
  Owner& owner = owners_[owner_id];
  while (owner.usage.sessions > owner_sessions || owner.usage.bytes > owner_cap) {
    EraseLocked(sessions_.find(owner.lru.back()));  // never `keep`: it is at the front
    ++stats_.sessions_over_quota;
  }
  const size_t cap = std::max<size_t>(options_.max_sessions, 1);
  while (sessions_.size() > cap || bytes_ > options_.max_bytes) {
    EraseLocked(sessions_.find(lru_.back()));  // never `keep`: it is at the front
    ++stats_.sessions_evicted;
  }
}

std::vector<ChunkHash> HashSessionCache::HashTokens(uint64_t owner, uint64_t request_id,
                                                    const uint32_t* tokens, size_t n) {
  const size_t chunk_size = hasher_->chunk_size();
  const size_t full_chunks = n / chunk_size;
  std::vector<ChunkHash> result;
  if (full_chunks == 0) return result;
  result.reserve(full_chunks);

  // Phase 1 (locked): reuse the verified prefix of the session, if any.
  size_t reused = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(request_id);
    if (it != sessions_.end()) {
      Session& s = it->second;
      const size_t candidate = std::min(s.hashes.size(), full_chunks);
      if (std::memcmp(s.tokens.data(), tokens, candidate * chunk_size * sizeof(uint32_t)) == 0) {
        reused = candidate;
        result.assign(s.hashes.begin(), s.hashes.begin() + static_cast<std::ptrdiff_t>(reused));
      } else {
        ++stats_.sessions_rebuilt;  // the session is replaced in phase 3
      }
      TouchLocked(s, clock_->Now());
    }
    stats_.chunks_reused += reused;
    if (reused == full_chunks) return result;
    stats_.chunks_hashed += full_chunks - reused;
  }

  // Phase 2 (unlocked): hash the new chunks.
  const ChunkHash prev = reused > 0 ? result[reused - 1] : hasher_->seed();
  hasher_->AppendTokenChunks(prev, tokens + reused * chunk_size,
                             (full_chunks - reused) * chunk_size, &result);

  // Phase 3 (locked): store. A concurrent call may have changed the session meanwhile; the chain
  // makes an O(1) consistency check possible: equal hashes at chunk k-1 mean equal token prefixes
  // through chunk k-1 (and, in any case, identical chains from there on).
  std::lock_guard<std::mutex> lock(mu_);
  const TimePoint now = clock_->Now();
  auto it = sessions_.find(request_id);
  if (it == sessions_.end()) {
    ReapLocked(now);  // amortised: each session is reaped at most once
    lru_.push_front(request_id);
    Owner& o = owners_[owner];
    o.lru.push_front(request_id);
    ++o.usage.sessions;
    Session& s = sessions_[request_id];
    s.owner = owner;
    s.tokens.assign(tokens, tokens + full_chunks * chunk_size);
    s.hashes = result;
    s.last_used = now;
    s.lru_pos = lru_.begin();
    s.owner_pos = o.lru.begin();
    RechargeLocked(s);
    EvictLocked(request_id);
    return result;
  }
  Session& s = it->second;
  const size_t k = s.hashes.size();
  if (k >= full_chunks && s.hashes[full_chunks - 1] == result[full_chunks - 1]) {
    // A concurrent call stored the same prefix or a longer one: the longer result stays.
  } else if (k > 0 && k < full_chunks && s.hashes[k - 1] == result[k - 1]) {
    // The session is a prefix of ours: extend it.
    s.tokens.insert(s.tokens.end(), tokens + k * chunk_size, tokens + full_chunks * chunk_size);
    s.hashes.insert(s.hashes.end(), result.begin() + static_cast<std::ptrdiff_t>(k), result.end());
  } else {
    // Different tokens (a rebuild): ours replace the session.
    s.tokens.assign(tokens, tokens + full_chunks * chunk_size);
    s.hashes = result;
  }
  TouchLocked(s, now);
  RechargeLocked(s);
  EvictLocked(request_id);
  return result;
}

bool HashSessionCache::EndSession(uint64_t request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(request_id);
  if (it == sessions_.end()) return false;
  EraseLocked(it);
  return true;
}

size_t HashSessionCache::Reap() {
  std::lock_guard<std::mutex> lock(mu_);
  return ReapLocked(clock_->Now());
}

size_t HashSessionCache::ReapLocked(TimePoint now) {
  // lru_ is ordered by last use (every touch reads the clock under mu_ and moves the session to
  // the front), so the expired sessions are exactly a suffix of it.
  size_t reaped = 0;
  while (!lru_.empty()) {
    auto it = sessions_.find(lru_.back());
    if (now - it->second.last_used < options_.ttl) break;
    EraseLocked(it);
    ++reaped;
  }
  stats_.sessions_expired += reaped;
  return reaped;
}

size_t HashSessionCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_.size();
}

HashSessionStats HashSessionCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  HashSessionStats s = stats_;
  s.sessions = sessions_.size();
  s.bytes = bytes_;
  return s;
}

std::unordered_map<uint64_t, HashSessionUsage> HashSessionCache::UsageByOwner() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::unordered_map<uint64_t, HashSessionUsage> out;
  out.reserve(owners_.size());
  for (const auto& [id, owner] : owners_) out.emplace(id, owner.usage);
  return out;
}

}  // namespace lmcache_cpp
