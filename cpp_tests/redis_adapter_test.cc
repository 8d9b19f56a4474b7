// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// RedisL2Adapter against real servers (redis_test_servers.h): byte-exact round trips standalone
// and over a 3-master cluster, misses by reason (absent, gone after lookup, corrupt, wrong size),
// a dead server that fails fast and is used again after a restart, and Close() waking a worker
// blocked on a stopped server.

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "l2_test_util.h"
#include "lmcache_cpp/redis_adapter.h"
#include "redis_test_servers.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace redis {
namespace {

using namespace testing_servers;  // NOLINT(build/namespaces)
using testutil::Completion;
using testutil::Keys;
using testutil::Patterns;
using testutil::SyncLoad;
using testutil::SyncLookup;
using testutil::SyncStore;
using testutil::Zeros;

std::unique_ptr<RedisL2Adapter> MakeAdapter(const Endpoint& ep, bool cluster = false,
                                            uint32_t op_timeout_ms = 5000) {
  RedisAdapterOptions o;
  o.url = "redis://" + ep.ToString();
  o.cluster = cluster;
  o.connect_timeout_ms = 500;
  o.op_timeout_ms = op_timeout_ms;
  Result<std::unique_ptr<RedisL2Adapter>> a = RedisL2Adapter::Create(o);
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return a.ok() ? std::move(*a) : nullptr;
}

TEST_F(RedisStandaloneTest, AdapterRoundTripsByteExactAndCountsMissesByReason) {
  std::unique_ptr<RedisL2Adapter> a = MakeAdapter(server_->endpoint());
  ASSERT_NE(a, nullptr);
  const std::vector<ObjectKey> keys = Keys(1, 64);
  const auto data = Patterns(7, keys.size(), 70000);
  EXPECT_EQ(SyncStore(*a, keys, data).Popcount(), keys.size());
  EXPECT_EQ(SyncLookup(*a, keys).Popcount(), keys.size());
  auto out = Zeros(keys.size(), 70000);
  EXPECT_EQ(SyncLoad(*a, keys, &out).Popcount(), keys.size());
  EXPECT_EQ(out, data);
  EXPECT_EQ(SyncLookup(*a, Keys(1000, 3)).Popcount(), 0u);

  // Gone after lookup (what maxmemory eviction does): a miss, counted.
  Connection c(server_->endpoint(), FastOptions());
  ASSERT_TRUE(c.Command({"DEL", a->KeyFor(keys[0])}).ok());
  // A payload byte flipped: corrupt. Another size asked for: wrong size.
  ASSERT_TRUE(c.Command({"SETRANGE", a->KeyFor(keys[1]), "100", "X"}).ok());
  out = Zeros(2, 70000);
  Bitmap bits = SyncLoad(*a, {keys[0], keys[1]}, &out);
  EXPECT_EQ(bits.Popcount(), 0u);
  auto small = Zeros(1, 500);
  EXPECT_EQ(SyncLoad(*a, {keys[2]}, &small).Popcount(), 0u);
  const RedisAdapterStats rs = a->redis_stats();
  EXPECT_EQ(rs.gone_after_lookup, 1u);
  EXPECT_EQ(rs.misses_corrupt, 1u);
  EXPECT_EQ(rs.misses_wrong_size, 1u);
  const L2AdapterStats s = a->stats();
  EXPECT_EQ(s.loads, keys.size());
  EXPECT_EQ(s.load_misses, 3u);
  EXPECT_EQ(s.corrupt_reads, 1u);
  EXPECT_EQ(s.capacity_bytes, 0u);
  EXPECT_EQ(s.pins, 0u);
  a->Close();
}

TEST_F(RedisStandaloneTest, DeadServerFailsFastAndIsUsedAgainAfterRestart) {
  std::unique_ptr<RedisL2Adapter> a = MakeAdapter(server_->endpoint());
  ASSERT_NE(a, nullptr);
  const std::vector<ObjectKey> keys = Keys(1, 4);
  const auto data = Patterns(9, keys.size(), 4096);
  server_->Kill();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(SyncStore(*a, keys, data).Popcount(), 0u);
  EXPECT_EQ(SyncLookup(*a, keys).Popcount(), 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_GT(a->redis_stats().node_errors, 0u);
  ASSERT_TRUE(server_->Start());
  // Each worker's connection retries after its own backoff (1 s after its failed connect).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (SyncStore(*a, keys, data).Popcount() != keys.size()) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  auto out = Zeros(keys.size(), 4096);
  while (SyncLoad(*a, keys, &out).Popcount() != keys.size()) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(out, data);
}

TEST_F(RedisStandaloneTest, CloseWakesAWorkerBlockedOnAStoppedServer) {
  std::unique_ptr<RedisL2Adapter> a = MakeAdapter(server_->endpoint(), false, 30000);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(SyncLookup(*a, Keys(1, 1)).Popcount(), 0u);  // connected
  server_->Signal(SIGSTOP);
  Completion c;
  a->SubmitLookupAndPin(Keys(1, 2), c.Callback());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(c.calls(), 0);  // blocked on the stopped server
  const auto t0 = std::chrono::steady_clock::now();
  a->Close();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_EQ(c.calls(), 1);
  server_->Signal(SIGCONT);
  // After Close, submits complete at once with Unavailable.
  Completion late;
  a->SubmitLookupAndPin(Keys(1, 1), late.Callback());
  EXPECT_EQ(late.calls(), 1);
  EXPECT_EQ(late.status().code(), StatusCode::kUnavailable);
}

TEST_F(RedisStandaloneTest, WriteBackPastTheInFlightBoundIsRefusedNotQueued) {
  RedisAdapterOptions o;
  o.url = "redis://" + server_->endpoint().ToString();
  o.max_inflight_store_bytes = 10000;
  Result<std::unique_ptr<RedisL2Adapter>> a = RedisL2Adapter::Create(o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  const auto data = Patterns(3, 2, 8000);
  EXPECT_EQ(SyncStore(**a, Keys(1, 2), data).Popcount(), 0u);  // 16000 bytes > 10000
  EXPECT_EQ((*a)->redis_stats().stores_rejected, 2u);
  EXPECT_EQ(SyncStore(**a, Keys(1, 1), {data[0]}).Popcount(), 1u);
}

TEST_F(RedisStandaloneTest, AWrongPasswordStopsCreateAndKeyPrefixIsValidated) {
  Connection c(server_->endpoint(), FastOptions());
  ASSERT_TRUE(c.Command({"CONFIG", "SET", "requirepass", "pw"}).ok());
  RedisAdapterOptions o;
  o.url = "redis://" + server_->endpoint().ToString();
  o.password = "wrong";
  EXPECT_EQ(RedisL2Adapter::Create(o).status().code(), StatusCode::kPermissionDenied);
  o.password = "pw";
  o.key_prefix = "{tag}";
  EXPECT_EQ(RedisL2Adapter::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.key_prefix = "lmc:";
  EXPECT_TRUE(RedisL2Adapter::Create(o).ok());
}

TEST_F(RedisClusterTest, AdapterRoundTripsOverThreeMasters) {
  std::unique_ptr<RedisL2Adapter> a = MakeAdapter(nodes_[1]->endpoint(), true);
  ASSERT_NE(a, nullptr);
  const std::vector<ObjectKey> keys = Keys(1, 64);
  const auto data = Patterns(11, keys.size(), 20000);
  EXPECT_EQ(SyncStore(*a, keys, data).Popcount(), keys.size());
  for (auto& n : nodes_) {
    Connection c(n->endpoint(), FastOptions());
    Result<Reply> r = c.Command({"DBSIZE"});
    ASSERT_TRUE(r.ok());
    EXPECT_GT(r->integer, 0);  // every master holds some
  }
  EXPECT_EQ(SyncLookup(*a, keys).Popcount(), keys.size());
  auto out = Zeros(keys.size(), 20000);
  EXPECT_EQ(SyncLoad(*a, keys, &out).Popcount(), keys.size());
  EXPECT_EQ(out, data);
  EXPECT_EQ(a->redis_stats().node_errors, 0u);
}

}  // namespace
}  // namespace redis
}  // namespace lmcache_cpp
