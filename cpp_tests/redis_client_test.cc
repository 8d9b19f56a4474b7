// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The Redis client against real servers: each test starts its own redis-server processes on free
// loopback ports (a standalone server, or a 3-master cluster made with redis-cli --cluster
// create) in a temporary directory and stops them when it ends, failed or not (they also die
// with the test process: PR_SET_PDEATHSIG). Without redis-server on PATH the tests skip, or fail
// when LMCACHE_CPP_REQUIRE_REDIS=1 (CI installs Debian's redis-server and sets it).

#include <fcntl.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "redis/cluster.h"
#include "redis/connection.h"
#include "redis/value.h"
#include "redis_test_servers.h"

namespace lmcache_cpp {
namespace redis {
namespace {

using namespace testing_servers;  // NOLINT(build/namespaces)
// A value as the L2 tier stores it: header, then payload.
struct StoredValue {
  uint8_t header[kValueHeaderSize];
  std::vector<uint8_t> payload;
};

constexpr uint64_t kFingerprint = 0x5eed5eed12345678ull;

StoredValue MakeValue(size_t size, uint64_t seed, uint64_t fingerprint = kFingerprint) {
  StoredValue v;
  v.payload.resize(size);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= size; i += 8) {
    const uint64_t x = rng();
    std::memcpy(&v.payload[i], &x, 8);
  }
  EncodeValueHeader(v.header, fingerprint, size, internal::Crc32c(v.payload.data(), size));
  return v;
}

Request SetRequest(const std::string& key, const StoredValue& v) {
  return Request::Of(
      {"SET", key, Arg::Pieces(v.header, kValueHeaderSize, v.payload.data(), v.payload.size())});
}

// Where a GET's reply goes: the value header, then the caller's ("L1") buffer.
struct LoadTarget {
  uint8_t head[kValueHeaderSize] = {};
  std::vector<uint8_t> body;
  explicit LoadTarget(size_t size) : body(size) {}
  BulkSink sink() { return {head, kValueHeaderSize, body.data(), body.size()}; }
  ValueCheck Check(const Reply& r) const {
    if (r.type != ReplyType::kBulkString) return ValueCheck::kTruncated;
    return CheckValue(head, r.length, kFingerprint, body.size(),
                      r.sink == SinkOutcome::kFilled ? body.data() : nullptr);
  }
};

// True for a "+OK" reply; says what came instead otherwise.
::testing::AssertionResult IsOk(const Result<Reply>& r) {
  if (!r.ok()) return ::testing::AssertionFailure() << r.status().ToString();
  if (!r->IsStatus("OK")) return ::testing::AssertionFailure() << r->ToString();
  return ::testing::AssertionSuccess();
}

std::string TestKey(int i) {
  return "lmc:test:" + std::to_string(i) + ":" + std::to_string(i * 7919);
}

// ---------------------------------------------------------------------------
// Standalone

TEST_F(RedisStandaloneTest, LargeValuesRoundTripByteExactStraightIntoTheCallerBuffer) {
  Connection c(server_->endpoint(), FastOptions());
  constexpr size_t kSize = 6 << 20;
  std::vector<StoredValue> values;
  std::vector<std::string> keys;
  std::vector<Request> sets;
  for (int i = 0; i < 3; ++i) {
    values.push_back(MakeValue(kSize + static_cast<size_t>(i) * 8, 100 + i));
    keys.push_back(TestKey(i));
  }
  for (int i = 0; i < 3; ++i) sets.push_back(SetRequest(keys[i], values[i]));
  std::vector<Reply> replies;
  ASSERT_TRUE(c.Execute(sets, &replies).ok());
  for (const Reply& r : replies) EXPECT_TRUE(r.IsStatus("OK")) << r.ToString();

  std::vector<LoadTarget> targets;
  std::vector<Request> gets;
  for (int i = 0; i < 3; ++i) targets.emplace_back(values[i].payload.size());
  for (int i = 0; i < 3; ++i) gets.push_back(Request::Of({"GET", keys[i]}).Into(targets[i].sink()));
  const uint64_t direct_before = c.stats().direct_bytes;
  ASSERT_TRUE(c.Execute(gets, &replies).ok());
  ASSERT_EQ(replies.size(), 3u);
  uint64_t payload_bytes = 0;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(replies[i].sink, SinkOutcome::kFilled);
    EXPECT_EQ(targets[i].Check(replies[i]), ValueCheck::kOk);
    EXPECT_TRUE(targets[i].body == values[i].payload) << "value " << i << " differs";
    payload_bytes += values[i].payload.size();
  }
  // Every payload byte was read by the socket straight into the caller's buffer (only the
  // "$<len>\r\n" lines and at most a guard read of each header went through the read buffer).
  EXPECT_GE(c.stats().direct_bytes - direct_before, payload_bytes);
}

TEST_F(RedisStandaloneTest, PipelinedBatchOf64GetsIsOneRoundTrip) {
  Connection c(server_->endpoint(), FastOptions());
  constexpr int kKeys = 64;
  std::vector<StoredValue> values;
  std::vector<std::string> keys;
  for (int i = 0; i < kKeys; ++i) {
    values.push_back(MakeValue(64 << 10, 1000 + i));
    keys.push_back(TestKey(i));
  }
  std::vector<Request> sets, gets;
  for (int i = 0; i < kKeys; ++i) sets.push_back(SetRequest(keys[i], values[i]));
  std::vector<Reply> replies;
  ASSERT_TRUE(c.Execute(sets, &replies).ok());
  std::vector<LoadTarget> targets;
  for (int i = 0; i < kKeys; ++i) targets.emplace_back(64 << 10);
  for (int i = 0; i < kKeys; ++i)
    gets.push_back(Request::Of({"GET", keys[i]}).Into(targets[i].sink()));
  gets.push_back(Request::Of({"EXISTS", "lmc:absent"}));
  const ConnectionStats before = c.stats();
  ASSERT_TRUE(c.Execute(gets, &replies).ok());
  EXPECT_EQ(c.stats().batches - before.batches, 1u);
  EXPECT_EQ(c.stats().connects, before.connects);  // no reconnect, one exchange
  ASSERT_EQ(replies.size(), static_cast<size_t>(kKeys + 1));
  for (int i = 0; i < kKeys; ++i) {
    ASSERT_EQ(targets[i].Check(replies[i]), ValueCheck::kOk) << i;
    EXPECT_TRUE(targets[i].body == values[i].payload) << i;
  }
  EXPECT_EQ(replies[kKeys].integer, 0);
}

TEST_F(RedisStandaloneTest, AclUserAuthenticatesAndAWrongPasswordIsPermissionDenied) {
  Connection admin(server_->endpoint(), FastOptions());
  Result<Reply> r = admin.Command({"ACL", "SETUSER", "cache", "on", ">s3cret", "~lmc:*", "+@all"});
  ASSERT_TRUE(IsOk(r));

  Result<RedisUrl> url =
      ParseRedisUrl("redis://cache:s3cret@127.0.0.1:" + std::to_string(server_->port()) + "/2");
  ASSERT_TRUE(url.ok());
  ConnectionOptions o = FastOptions();
  o.username = url->username;
  o.password = url->password;
  o.db = url->db;
  Connection user(url->endpoint, o);
  r = user.Command({"SET", "lmc:acl", "v"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->IsStatus("OK"));
  r = user.Command({"SET", "other:acl", "v"});  // outside the user's key pattern
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(ErrorCode(*r), "NOPERM");
  // SELECT 2 took effect: database 0 does not hold the key.
  r = admin.Command({"EXISTS", "lmc:acl"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->integer, 0);

  // RESP3 with HELLO AUTH, too.
  o.protocol = 3;
  Connection resp3(url->endpoint, o);
  r = resp3.Command({"GET", "lmc:acl"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->str, "v");

  for (int protocol : {2, 3}) {
    o.protocol = protocol;
    o.password = "not-the-s3cret";
    Connection bad(url->endpoint, o);
    const Status st = bad.Connect();
    EXPECT_EQ(st.code(), StatusCode::kPermissionDenied) << st.ToString();
    EXPECT_NE(st.message().find("WRONGPASS"), std::string::npos) << st.ToString();
    EXPECT_EQ(st.message().find("not-the-s3cret"), std::string::npos) << "password echoed";
  }
}

TEST_F(RedisStandaloneTest, StoppedServerTimesOutAndTheNextUseReconnects) {
  ConnectionOptions o = FastOptions();
  o.op_timeout = milliseconds(300);
  o.connect_timeout = milliseconds(300);
  o.reconnect_backoff = milliseconds(0);
  Connection c(server_->endpoint(), o);
  ASSERT_TRUE(c.Command({"PING"}).ok());
  server_->Signal(SIGSTOP);
  Clock::time_point t0 = Clock::now();
  Result<Reply> r = c.Command({"GET", "lmc:x"});
  EXPECT_EQ(r.status().code(), StatusCode::kTimeout) << r.status().ToString();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(3));
  EXPECT_FALSE(c.connected());
  // A fresh connection: the kernel accepts the TCP connection, the handshake (HELLO) times out.
  o.protocol = 3;
  Connection fresh(server_->endpoint(), o);
  t0 = Clock::now();
  EXPECT_EQ(fresh.Connect().code(), StatusCode::kTimeout);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(3));
  server_->Signal(SIGCONT);
  r = c.Command({"PING"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->IsStatus("PONG"));
  EXPECT_EQ(c.stats().connects, 2u);
}

TEST_F(RedisStandaloneTest, ServerDeathMidBatchIsACleanErrorAndRestartIsServed) {
  ConnectionOptions o = FastOptions();
  o.op_timeout = milliseconds(10000);
  o.reconnect_backoff = milliseconds(0);
  Connection c(server_->endpoint(), o);
  ASSERT_TRUE(c.Command({"PING"}).ok());
  // The server stops answering, then dies, while the batch waits for its replies: the batch
  // fails with an I/O error as soon as the socket closes, long before its timeout.
  server_->Signal(SIGSTOP);
  const StoredValue v = MakeValue(1 << 20, 5);
  const std::string key = TestKey(1);
  std::vector<Request> batch(8, SetRequest(key, v));
  std::promise<void> started;
  std::thread killer([&] {
    started.get_future().wait();
    server_->Kill();
  });
  const Clock::time_point t0 = Clock::now();
  std::vector<Reply> replies;
  started.set_value();
  const Status st = c.Execute(batch, &replies);
  killer.join();
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  EXPECT_FALSE(c.connected());
  // While down: connect fails fast.
  EXPECT_EQ(c.Command({"PING"}).status().code(), StatusCode::kUnavailable);
  ASSERT_TRUE(server_->Start());
  ASSERT_TRUE(c.Execute(batch, &replies).ok());
  EXPECT_TRUE(replies[7].IsStatus("OK"));
}

TEST_F(RedisStandaloneTest, CorruptForeignTruncatedAndWrongSizeValuesAreRejected) {
  Connection c(server_->endpoint(), FastOptions());
  constexpr size_t kSize = 256 << 10;
  const StoredValue good = MakeValue(kSize, 9);
  const StoredValue other_ns = MakeValue(kSize, 9, kFingerprint + 1);
  const StoredValue bigger = MakeValue(kSize + 64, 9);
  std::string truncated(reinterpret_cast<const char*>(good.header), kValueHeaderSize);
  truncated.append(reinterpret_cast<const char*>(good.payload.data()), kSize / 2);
  std::vector<Reply> replies;
  ASSERT_TRUE(c.Execute({SetRequest("lmc:good", good), SetRequest("lmc:corrupt", good),
                         SetRequest("lmc:ns", other_ns), SetRequest("lmc:bigger", bigger),
                         Request::Of({"SET", "lmc:trunc", truncated}),
                         Request::Of({"SET", "lmc:foreign", "someone else's value"}),
                         Request::Of({"SETRANGE", "lmc:corrupt", "1000", "X"})},
                        &replies)
                  .ok());
  const char* keys[] = {"lmc:good",   "lmc:corrupt", "lmc:ns",
                        "lmc:bigger", "lmc:trunc",   "lmc:foreign"};
  const ValueCheck expect[] = {ValueCheck::kOk,        ValueCheck::kCorrupt,
                               ValueCheck::kForeign,   ValueCheck::kWrongSize,
                               ValueCheck::kTruncated, ValueCheck::kForeign};
  std::vector<LoadTarget> targets;
  std::vector<Request> gets;
  for (int i = 0; i < 6; ++i) targets.emplace_back(kSize);
  for (int i = 0; i < 6; ++i) gets.push_back(Request::Of({"GET", keys[i]}).Into(targets[i].sink()));
  ASSERT_TRUE(c.Execute(gets, &replies).ok());
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(targets[i].Check(replies[i]), expect[i])
        << keys[i] << ": " << ValueCheckName(targets[i].Check(replies[i]));
  }
  EXPECT_TRUE(targets[0].body == good.payload);
}

TEST_F(RedisStandaloneTest, TlsVerifiesTheServerCertificateAndRoundTrips) {
  LMCACHE_REQUIRE_PROGRAMS("openssl");
  const std::string d = tmp_.path();
  const std::string log = d + "/openssl.log";
  {
    std::ofstream ext(d + "/san.ext");
    ext << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
  }
  for (const char* ca : {"ca", "other_ca"}) {
    ASSERT_EQ(
        RunProgram({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", d + "/" + ca + ".key",
                    "-out", d + "/" + ca + ".crt", "-days", "2", "-subj", std::string("/CN=") + ca},
                   log),
        0)
        << Tail(log);
  }
  ASSERT_EQ(RunProgram({"openssl", "req", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", d + "/server.key",
                        "-out", d + "/server.csr", "-subj", "/CN=localhost"},
                       log),
            0)
      << Tail(log);
  ASSERT_EQ(RunProgram({"openssl", "x509", "-req", "-in", d + "/server.csr", "-CA", d + "/ca.crt",
                        "-CAkey", d + "/ca.key", "-CAcreateserial", "-out", d + "/server.crt",
                        "-days", "2", "-extfile", d + "/san.ext"},
                       log),
            0)
      << Tail(log);
  const uint16_t port = FreePort();
  Server tls_server(
      d + "/tls", port,
      {"--tls-port", std::to_string(port), "--tls-cert-file", d + "/server.crt", "--tls-key-file",
       d + "/server.key", "--tls-ca-cert-file", d + "/ca.crt", "--tls-auth-clients", "no"});
  ConnectionOptions o = FastOptions();
  o.tls = true;
  o.tls_ca_file = d + "/ca.crt";
  ASSERT_TRUE(tls_server.Start(o, /*plain_port=*/false));

  Result<RedisUrl> url = ParseRedisUrl("rediss://127.0.0.1:" + std::to_string(port));
  ASSERT_TRUE(url.ok() && url->tls);
  Connection c(url->endpoint, o);
  const StoredValue v = MakeValue(3 << 20, 77);
  LoadTarget t(v.payload.size());
  std::vector<Reply> replies;
  ASSERT_TRUE(c.Execute({SetRequest("lmc:tls", v), Request::Of({"GET", "lmc:tls"}).Into(t.sink())},
                        &replies)
                  .ok());
  EXPECT_EQ(t.Check(replies[1]), ValueCheck::kOk);
  EXPECT_TRUE(t.body == v.payload);

  // A server whose certificate another CA signed is refused.
  o.tls_ca_file = d + "/other_ca.crt";
  Connection untrusting(url->endpoint, o);
  const Status st = untrusting.Connect();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("certificate"), std::string::npos) << st.ToString();
  // Plain TCP to the TLS port is not mistaken for a server.
  o.tls = false;
  Connection plain(url->endpoint, o);
  EXPECT_FALSE(plain.Command({"PING"}).ok());
}

// ---------------------------------------------------------------------------
// Cluster

TEST_F(RedisClusterTest, BatchOf64GetsIsOnePipelinePerNode) {
  ClusterClient client({nodes_[0]->endpoint()}, Options());
  ASSERT_TRUE(client.RefreshSlotMap().ok());
  constexpr int kKeys = 64;
  std::vector<StoredValue> values;
  std::vector<std::string> keys;
  std::vector<int> per_node(kNodes, 0);
  for (int i = 0; i < kKeys; ++i) {
    values.push_back(MakeValue(32 << 10, 500 + i));
    keys.push_back(TestKey(i));
    const Endpoint* owner = client.Owner(KeySlot(keys.back()));
    ASSERT_NE(owner, nullptr);
    ++per_node[NodeOf(*owner)];
  }
  for (int n : per_node) ASSERT_GT(n, 0) << "64 keys should reach all three masters";
  std::vector<Request> sets, gets;
  for (int i = 0; i < kKeys; ++i) sets.push_back(SetRequest(keys[i], values[i]));
  std::vector<Result<Reply>> results;
  client.Execute(sets.data(), sets.size(), &results);
  for (auto& r : results) ASSERT_TRUE(IsOk(r));

  std::vector<LoadTarget> targets;
  for (int i = 0; i < kKeys; ++i) targets.emplace_back(32 << 10);
  for (int i = 0; i < kKeys; ++i)
    gets.push_back(Request::Of({"GET", keys[i]}).Into(targets[i].sink()));
  const ClusterStats before = client.stats();
  client.Execute(gets.data(), gets.size(), &results);
  EXPECT_EQ(client.stats().node_batches - before.node_batches, static_cast<uint64_t>(kNodes));
  EXPECT_EQ(client.stats().moved, 0u);
  for (int i = 0; i < kKeys; ++i) {
    ASSERT_TRUE(results[i].ok()) << results[i].status().ToString();
    EXPECT_EQ(targets[i].Check(*results[i]), ValueCheck::kOk) << i;
    EXPECT_TRUE(targets[i].body == values[i].payload) << i;
  }
}

TEST_F(RedisClusterTest, AskDuringMigrationAndMovedAfterItAreFollowed) {
  ClusterClient client({nodes_[1]->endpoint()}, Options());
  ASSERT_TRUE(client.RefreshSlotMap().ok());
  const std::string key = "lmc:migrating";
  const uint16_t slot = KeySlot(key);
  const int from = NodeOf(*client.Owner(slot));
  ASSERT_GE(from, 0);
  const int to = (from + 1) % kNodes;
  const StoredValue v = MakeValue(100 << 10, 3);
  std::vector<Result<Reply>> results;
  const Request set = SetRequest(key, v);
  client.Execute(&set, 1, &results);
  ASSERT_TRUE(IsOk(results[0]));

  Connection src(nodes_[from]->endpoint(), FastOptions());
  Connection dst(nodes_[to]->endpoint(), FastOptions());
  const std::string slot_s = std::to_string(slot);
  const std::string from_id = NodeId(from), to_id = NodeId(to);
  ASSERT_TRUE(IsOk(dst.Command({"CLUSTER", "SETSLOT", slot_s, "IMPORTING", from_id})));
  ASSERT_TRUE(IsOk(src.Command({"CLUSTER", "SETSLOT", slot_s, "MIGRATING", to_id})));
  Result<Reply> m = src.Command(
      {"MIGRATE", "127.0.0.1", std::to_string(nodes_[to]->port()), "", "0", "5000", "KEYS", key});
  ASSERT_TRUE(IsOk(m));

  // Mid-migration the old owner answers ASK: ASKING + GET at the new one.
  LoadTarget t(v.payload.size());
  const Request get = Request::Of({"GET", key}).Into(t.sink());
  auto load_and_check = [&] {
    std::fill(t.body.begin(), t.body.end(), 0);
    client.Execute(&get, 1, &results);
    ASSERT_TRUE(results[0].ok()) << results[0].status().ToString();
    EXPECT_EQ(t.Check(*results[0]), ValueCheck::kOk);
    EXPECT_TRUE(t.body == v.payload);
  };
  load_and_check();
  EXPECT_EQ(client.stats().ask, 1u);
  EXPECT_EQ(NodeOf(*client.Owner(slot)), from) << "ASK must not change the map";

  // The migration ends: every node learns the new owner; the client's map is stale -> MOVED.
  for (int i : {to, from, (to + 1) % kNodes}) {
    Connection n(nodes_[i]->endpoint(), FastOptions());
    ASSERT_TRUE(IsOk(n.Command({"CLUSTER", "SETSLOT", slot_s, "NODE", to_id})));
  }
  load_and_check();
  EXPECT_EQ(client.stats().moved, 1u);
  EXPECT_EQ(NodeOf(*client.Owner(slot)), to) << "MOVED updates the map";
}

TEST_F(RedisClusterTest, KilledNodeFailsOnlyItsKeysAndIsServedAgainAfterRestart) {
  ClusterOptions o = Options();
  o.connection.op_timeout = milliseconds(2000);
  ClusterClient client({nodes_[0]->endpoint(), nodes_[1]->endpoint()}, o);
  ASSERT_TRUE(client.RefreshSlotMap().ok());
  constexpr int kKeys = 64;
  std::vector<StoredValue> values;
  std::vector<std::string> keys;
  std::vector<Request> sets, gets;
  for (int i = 0; i < kKeys; ++i) {
    values.push_back(MakeValue(16 << 10, 900 + i));
    keys.push_back(TestKey(i));
  }
  for (int i = 0; i < kKeys; ++i) sets.push_back(SetRequest(keys[i], values[i]));
  std::vector<Result<Reply>> results;
  client.Execute(sets.data(), sets.size(), &results);
  for (auto& r : results) ASSERT_TRUE(IsOk(r));
  std::vector<int> owner(kKeys);
  for (int i = 0; i < kKeys; ++i) owner[i] = NodeOf(*client.Owner(KeySlot(keys[i])));
  std::vector<LoadTarget> targets;
  for (int i = 0; i < kKeys; ++i) targets.emplace_back(16 << 10);
  for (int i = 0; i < kKeys; ++i)
    gets.push_back(Request::Of({"GET", keys[i]}).Into(targets[i].sink()));

  constexpr int kDead = 2;
  nodes_[kDead]->Kill();
  for (int round = 0; round < 2; ++round) {  // the second round runs within the backoff
    const Clock::time_point t0 = Clock::now();
    client.Execute(gets.data(), gets.size(), &results);
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(4));
    for (int i = 0; i < kKeys; ++i) {
      if (owner[i] == kDead) {
        EXPECT_FALSE(results[i].ok()) << "a dead node's key must fail, key " << i;
      } else {
        ASSERT_TRUE(results[i].ok()) << i << ": " << results[i].status().ToString();
        EXPECT_EQ(targets[i].Check(*results[i]), ValueCheck::kOk) << i;
      }
    }
  }

  // Back (empty: no persistence). Bounded wait while the client's backoff and map catch up.
  ASSERT_TRUE(nodes_[kDead]->Start());
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(15);
  for (;;) {
    client.Execute(sets.data(), sets.size(), &results);
    bool all = true;
    for (auto& r : results) all = all && r.ok() && r->IsStatus("OK");
    if (all) break;
    ASSERT_LT(Clock::now(), deadline) << "the restarted node was not served again";
    std::this_thread::sleep_for(milliseconds(100));
  }
  client.Execute(gets.data(), gets.size(), &results);
  for (int i = 0; i < kKeys; ++i) {
    ASSERT_TRUE(results[i].ok()) << i;
    EXPECT_EQ(targets[i].Check(*results[i]), ValueCheck::kOk) << i;
    EXPECT_TRUE(targets[i].body == values[i].payload) << i;
  }
}

}  // namespace
}  // namespace redis
}  // namespace lmcache_cpp
