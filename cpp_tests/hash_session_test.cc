// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/hash_session.h"

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

namespace lmcache_cpp {
namespace {

constexpr size_t kChunk = 16;

ChunkHasher MakeHasher() {
  Result<ChunkHasher> h = ChunkHasher::Create({"model", "layout", ""}, kChunk);
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  return std::move(h).value();
}

std::vector<uint32_t> MakeTokens(size_t n, uint32_t stream) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = stream * 1000003u + static_cast<uint32_t>(i) * 2654435761u;
  return t;
}

class HashSessionTest : public ::testing::Test {
 protected:
  HashSessionTest() : hasher_(MakeHasher()), clock_(std::make_shared<ManualClock>()) {}

  std::unique_ptr<HashSessionCache> MakeCache(HashSessionOptions options = {}) {
    return std::make_unique<HashSessionCache>(&hasher_, options, clock_);
  }
  std::unique_ptr<HashSessionCache> MakeCacheWithTtl(std::chrono::seconds ttl) {
    HashSessionOptions options;
    options.ttl = ttl;
    return MakeCache(options);
  }
  std::vector<ChunkHash> Expected(const std::vector<uint32_t>& tokens, size_t n) const {
    return hasher_.HashTokens(tokens.data(), n);
  }

  ChunkHasher hasher_;
  std::shared_ptr<ManualClock> clock_;
};

TEST_F(HashSessionTest, SecondCallWithLongerTokensHashesOnlyNewChunks) {
  auto cache = MakeCache();
  const std::vector<uint32_t> tokens = MakeTokens(8 * kChunk + 3, 1);

  EXPECT_EQ(cache->HashTokens(7, tokens.data(), 3 * kChunk + 2), Expected(tokens, 3 * kChunk));
  HashSessionStats s = cache->stats();
  EXPECT_EQ(s.chunks_hashed, 3u);
  EXPECT_EQ(s.chunks_reused, 0u);
  EXPECT_EQ(s.sessions, 1u);

  EXPECT_EQ(cache->HashTokens(7, tokens.data(), tokens.size()), Expected(tokens, tokens.size()));
  s = cache->stats();
  EXPECT_EQ(s.chunks_hashed, 3u + 5u);
  EXPECT_EQ(s.chunks_reused, 3u);
  EXPECT_EQ(s.sessions_rebuilt, 0u);

  // The same list again is answered entirely from the session.
  EXPECT_EQ(cache->HashTokens(7, tokens.data(), tokens.size()), Expected(tokens, tokens.size()));
  s = cache->stats();
  EXPECT_EQ(s.chunks_hashed, 8u);
  EXPECT_EQ(s.chunks_reused, 3u + 8u);
}

TEST_F(HashSessionTest, ShorterCallIsAnsweredFromTheSession) {
  auto cache = MakeCache();
  const std::vector<uint32_t> tokens = MakeTokens(6 * kChunk, 2);
  (void)cache->HashTokens(1, tokens.data(), tokens.size());
  EXPECT_EQ(cache->HashTokens(1, tokens.data(), 2 * kChunk + 9), Expected(tokens, 2 * kChunk));
  EXPECT_EQ(cache->stats().chunks_hashed, 6u);
  // The session keeps its longer contents.
  EXPECT_EQ(cache->HashTokens(1, tokens.data(), tokens.size()), Expected(tokens, tokens.size()));
  EXPECT_EQ(cache->stats().chunks_hashed, 6u);
}

TEST_F(HashSessionTest, MismatchingPrefixRebuildsAndReturnsCorrectHashes) {
  auto cache = MakeCache();
  const std::vector<uint32_t> first = MakeTokens(4 * kChunk, 3);
  std::vector<uint32_t> second = MakeTokens(6 * kChunk, 3);
  second[kChunk + 1] ^= 0xDEAD;  // differs inside chunk 1 of the remembered tokens
  (void)cache->HashTokens(9, first.data(), first.size());

  EXPECT_EQ(cache->HashTokens(9, second.data(), second.size()), Expected(second, second.size()));
  HashSessionStats s = cache->stats();
  EXPECT_EQ(s.sessions_rebuilt, 1u);
  EXPECT_EQ(s.chunks_hashed, 4u + 6u);  // rebuilt from scratch

  // The session now holds the new tokens: extending them reuses all six chunks.
  std::vector<uint32_t> longer = second;
  for (uint32_t t : MakeTokens(kChunk, 33)) longer.push_back(t);
  EXPECT_EQ(cache->HashTokens(9, longer.data(), longer.size()), Expected(longer, longer.size()));
  s = cache->stats();
  EXPECT_EQ(s.chunks_hashed, 4u + 6u + 1u);
  EXPECT_EQ(s.sessions_rebuilt, 1u);
  // And the old tokens no longer match.
  EXPECT_EQ(cache->HashTokens(9, first.data(), first.size()), Expected(first, first.size()));
  EXPECT_EQ(cache->stats().sessions_rebuilt, 2u);
}

TEST_F(HashSessionTest, ShorterMismatchingCallIsRebuiltToo) {
  auto cache = MakeCache();
  const std::vector<uint32_t> first = MakeTokens(4 * kChunk, 4);
  const std::vector<uint32_t> other = MakeTokens(2 * kChunk, 5);
  (void)cache->HashTokens(2, first.data(), first.size());
  EXPECT_EQ(cache->HashTokens(2, other.data(), other.size()), Expected(other, other.size()));
  EXPECT_EQ(cache->stats().sessions_rebuilt, 1u);
}

TEST_F(HashSessionTest, FewerTokensThanAChunkReturnNothingAndCreateNoSession) {
  auto cache = MakeCache();
  const std::vector<uint32_t> tokens = MakeTokens(kChunk - 1, 6);
  EXPECT_TRUE(cache->HashTokens(3, tokens.data(), tokens.size()).empty());
  EXPECT_EQ(cache->size(), 0u);
  EXPECT_EQ(cache->stats().chunks_hashed, 0u);
}

TEST_F(HashSessionTest, RequestsHaveSeparateSessions) {
  auto cache = MakeCache();
  const std::vector<uint32_t> a = MakeTokens(3 * kChunk, 7);
  const std::vector<uint32_t> b = MakeTokens(3 * kChunk, 8);
  EXPECT_EQ(cache->HashTokens(1, a.data(), a.size()), Expected(a, a.size()));
  EXPECT_EQ(cache->HashTokens(2, b.data(), b.size()), Expected(b, b.size()));
  EXPECT_EQ(cache->HashTokens(1, a.data(), a.size()), Expected(a, a.size()));
  const HashSessionStats s = cache->stats();
  EXPECT_EQ(s.sessions, 2u);
  EXPECT_EQ(s.chunks_hashed, 6u);
  EXPECT_EQ(s.sessions_rebuilt, 0u);
}

TEST_F(HashSessionTest, EndSessionDropsTheSession) {
  auto cache = MakeCache();
  const std::vector<uint32_t> tokens = MakeTokens(2 * kChunk, 9);
  (void)cache->HashTokens(5, tokens.data(), tokens.size());
  EXPECT_EQ(cache->size(), 1u);
  EXPECT_TRUE(cache->EndSession(5));
  EXPECT_FALSE(cache->EndSession(5));
  EXPECT_FALSE(cache->EndSession(6));
  EXPECT_EQ(cache->size(), 0u);
  EXPECT_EQ(cache->HashTokens(5, tokens.data(), tokens.size()), Expected(tokens, tokens.size()));
  EXPECT_EQ(cache->stats().chunks_hashed, 4u);  // hashed again from scratch
}

TEST_F(HashSessionTest, ReapDropsSessionsIdleForTheTtl) {
  auto cache = MakeCacheWithTtl(std::chrono::seconds(30));
  const std::vector<uint32_t> tokens = MakeTokens(2 * kChunk, 10);
  (void)cache->HashTokens(1, tokens.data(), tokens.size());
  clock_->Advance(std::chrono::seconds(10));
  (void)cache->HashTokens(2, tokens.data(), tokens.size());

  clock_->Advance(std::chrono::seconds(20) - std::chrono::nanoseconds(1));
  EXPECT_EQ(cache->Reap(), 0u);
  EXPECT_EQ(cache->size(), 2u);
  clock_->Advance(std::chrono::nanoseconds(1));  // session 1 idle for exactly the ttl
  EXPECT_EQ(cache->Reap(), 1u);
  EXPECT_EQ(cache->size(), 1u);
  clock_->Advance(std::chrono::seconds(10));
  EXPECT_EQ(cache->Reap(), 1u);
  EXPECT_EQ(cache->size(), 0u);
  EXPECT_EQ(cache->stats().sessions_expired, 2u);
}

TEST_F(HashSessionTest, UseRefreshesTheTtl) {
  auto cache = MakeCacheWithTtl(std::chrono::seconds(30));
  const std::vector<uint32_t> tokens = MakeTokens(2 * kChunk, 11);
  (void)cache->HashTokens(1, tokens.data(), tokens.size());
  for (int i = 0; i < 5; ++i) {
    clock_->Advance(std::chrono::seconds(20));
    (void)cache->HashTokens(1, tokens.data(), tokens.size());  // a reuse is a use
    EXPECT_EQ(cache->Reap(), 0u);
  }
  EXPECT_EQ(cache->stats().chunks_hashed, 2u);
  clock_->Advance(std::chrono::seconds(30));
  EXPECT_EQ(cache->Reap(), 1u);
}

TEST_F(HashSessionTest, ExpiredSessionsAreReapedOnInsert) {
  auto cache = MakeCacheWithTtl(std::chrono::seconds(5));
  const std::vector<uint32_t> tokens = MakeTokens(kChunk, 12);
  for (uint64_t id = 0; id < 10; ++id) (void)cache->HashTokens(id, tokens.data(), tokens.size());
  EXPECT_EQ(cache->size(), 10u);
  clock_->Advance(std::chrono::seconds(5));
  (void)cache->HashTokens(100, tokens.data(), tokens.size());
  EXPECT_EQ(cache->size(), 1u);
  EXPECT_EQ(cache->stats().sessions_expired, 10u);
}

TEST_F(HashSessionTest, MaxSessionsEvictsTheLeastRecentlyUsed) {
  HashSessionOptions options;
  options.max_sessions = 3;
  auto cache = MakeCache(options);
  const std::vector<uint32_t> tokens = MakeTokens(kChunk, 13);
  for (uint64_t id = 1; id <= 3; ++id) (void)cache->HashTokens(id, tokens.data(), tokens.size());
  (void)cache->HashTokens(1, tokens.data(), tokens.size());  // 2 is now the least recent
  (void)cache->HashTokens(4, tokens.data(), tokens.size());
  HashSessionStats s = cache->stats();
  EXPECT_EQ(s.sessions, 3u);
  EXPECT_EQ(s.sessions_evicted, 1u);
  EXPECT_EQ(s.chunks_hashed, 4u);
  EXPECT_FALSE(cache->EndSession(2));
  // 1, 3 and 4 are still there (reused, not hashed).
  for (uint64_t id : {1u, 3u, 4u}) (void)cache->HashTokens(id, tokens.data(), tokens.size());
  EXPECT_EQ(cache->stats().chunks_hashed, 4u);
}

TEST_F(HashSessionTest, AnOwnerOverItsQuotaLosesOnlyItsOwnOldestSessions) {
  HashSessionOptions o;
  o.max_sessions_per_owner = 2;
  auto cache = MakeCache(o);
  const auto tokens = MakeTokens(4 * kChunk, 1);
  (void)cache->HashTokens(/*owner=*/7, /*request_id=*/1, tokens.data(), tokens.size());
  (void)cache->HashTokens(8, 2, tokens.data(), tokens.size());  // another owner's
  clock_->Advance(std::chrono::seconds(1));
  (void)cache->HashTokens(7, 3, tokens.data(), tokens.size());
  clock_->Advance(std::chrono::seconds(1));
  (void)cache->HashTokens(7, 4, tokens.data(), tokens.size());  // owner 7's third: 1 goes
  auto usage = cache->UsageByOwner();
  EXPECT_EQ(usage[7].sessions, 2u);
  EXPECT_EQ(usage[8].sessions, 1u) << "another owner's session is never evicted for 7's quota";
  EXPECT_EQ(cache->stats().sessions_over_quota, 1u);
  EXPECT_FALSE(cache->EndSession(1));
  EXPECT_TRUE(cache->EndSession(2));
  // The evicted request still gets the right hashes (rehashed).
  EXPECT_EQ(cache->HashTokens(7, 1, tokens.data(), tokens.size()), Expected(tokens, tokens.size()));
}

TEST_F(HashSessionTest, BytesAreChargedAndCappedPerOwnerAndInAll) {
  HashSessionOptions o;
  const auto big = MakeTokens(64 * kChunk, 2);  // 4 KiB of tokens, 2 KiB of hashes
  o.max_bytes_per_owner = 14 << 10;             // two sessions of 6336 bytes fit, three do not
  o.max_bytes = 18 << 10;
  auto cache = MakeCache(o);
  (void)cache->HashTokens(1, 10, big.data(), big.size());
  const uint64_t one = cache->UsageByOwner()[1].bytes;
  EXPECT_GT(one, big.size() * sizeof(uint32_t) + 64 * sizeof(ChunkHash));
  EXPECT_EQ(cache->stats().bytes, one);
  (void)cache->HashTokens(1, 11, big.data(), big.size());
  (void)cache->HashTokens(2, 12, big.data(), big.size());
  // Three sessions do not fit 18 KiB in all: the least recently used (owner 1's first) went.
  EXPECT_LE(cache->stats().bytes, o.max_bytes);
  EXPECT_FALSE(cache->EndSession(10));
  EXPECT_EQ(cache->stats().sessions_evicted, 1u);
  // A session larger than an owner may hold is answered but not kept.
  const auto huge = MakeTokens(1024 * kChunk, 3);
  EXPECT_EQ(cache->HashTokens(3, 13, huge.data(), huge.size()), Expected(huge, huge.size()));
  EXPECT_EQ(cache->UsageByOwner().count(3), 0u);
  EXPECT_EQ(cache->stats().sessions_over_quota, 1u);
  // Ending every session returns every byte.
  EXPECT_TRUE(cache->EndSession(11));
  EXPECT_TRUE(cache->EndSession(12));
  EXPECT_EQ(cache->stats().bytes, 0u);
  EXPECT_TRUE(cache->UsageByOwner().empty());
}

TEST_F(HashSessionTest, ConcurrentRequestsMatchSingleThreadedHashing) {
  HashSessionOptions options;
  options.max_sessions = 6;  // small enough that evictions happen during the run
  auto cache = MakeCache(options);
  constexpr int kThreads = 4;
  constexpr int kIterations = 40;
  constexpr size_t kMaxChunks = 12;
  // Token streams: one private per thread, two shared prefixes, one conflicting per thread.
  std::vector<std::vector<uint32_t>> streams;
  for (uint32_t s = 0; s < 2 * kThreads + 2; ++s) {
    streams.push_back(MakeTokens(kMaxChunks * kChunk, 50 + s));
  }
  std::vector<std::vector<ChunkHash>> expected;
  for (const auto& t : streams) expected.push_back(hasher_.HashTokens(t.data(), t.size()));

  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::vector<int> wrong(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.wait();
      for (int i = 0; i < kIterations; ++i) {
        const size_t chunks = 1 + static_cast<size_t>(i + t) % kMaxChunks;
        size_t stream;
        uint64_t request;
        switch (i % 3) {
          case 0:  // private request, growing
            stream = static_cast<size_t>(t);
            request = 1000 + static_cast<uint64_t>(t);
            break;
          case 1:  // shared request id, same tokens for everyone
            stream = static_cast<size_t>(2 * kThreads + (i / 3) % 2);
            request = 1 + (i / 3) % 2;
            break;
          default:  // shared request id, different tokens per thread (forces rebuilds)
            stream = static_cast<size_t>(kThreads + t);
            request = 3;
            break;
        }
        const std::vector<uint32_t>& tokens = streams[stream];
        const std::vector<ChunkHash> got =
            cache->HashTokens(request, tokens.data(), chunks * kChunk + static_cast<size_t>(t));
        const std::vector<ChunkHash> want(
            expected[stream].begin(),
            expected[stream].begin() + static_cast<std::ptrdiff_t>(chunks));
        if (got != want) ++wrong[t];
        if (i % 10 == 9) (void)cache->Reap();
        if (i == kIterations / 2 && t == 0) (void)cache->EndSession(3);
      }
    });
  }
  go.set_value();
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[t], 0) << "thread " << t;
  const HashSessionStats s = cache->stats();
  EXPECT_LE(s.sessions, 6u);
  EXPECT_EQ(s.chunks_hashed + s.chunks_reused, [&] {
    uint64_t total = 0;
    for (int t = 0; t < kThreads; ++t) {
      for (int i = 0; i < kIterations; ++i) total += 1 + static_cast<uint64_t>(i + t) % kMaxChunks;
    }
    return total;
  }());
  EXPECT_GT(s.chunks_reused, 0u);
}

}  // namespace
}  // namespace lmcache_cpp
