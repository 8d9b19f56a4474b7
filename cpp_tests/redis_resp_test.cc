// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The pure parts of the Redis client: the RESP encoder and reply parser (every split of the
// input), URL parsing, key slots and cluster-map parsing, keys and the value header check.

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "crc32c.h"
#include "redis/cluster.h"
#include "redis/resp.h"
#include "redis/url.h"
#include "redis/value.h"

namespace lmcache_cpp {
namespace redis {
namespace {

// Feeds `wire` to a fresh reader in pieces cut at `cuts` and returns every reply.
std::vector<Reply> ParseSplit(const std::string& wire, const std::vector<size_t>& cuts,
                              ReplyReader* reader) {
  std::vector<Reply> out;
  size_t pos = 0;
  auto drain = [&]() {
    for (;;) {
      Reply r;
      Result<bool> got = reader->Next(&r);
      EXPECT_TRUE(got.ok()) << got.status().ToString();
      if (!got.ok() || !*got) return;
      out.push_back(std::move(r));
    }
  };
  for (size_t cut : cuts) {
    reader->Feed(wire.data() + pos, cut - pos);
    pos = cut;
    drain();
  }
  reader->Feed(wire.data() + pos, wire.size() - pos);
  drain();
  return out;
}

const char kMixed[] =
    "+OK\r\n-ERR bad thing\r\n:-42\r\n$5\r\nhello\r\n$0\r\n\r\n$-1\r\n*-1\r\n"
    "*3\r\n:1\r\n*2\r\n+a\r\n$1\r\nb\r\n_\r\n"
    "%2\r\n+k1\r\n:1\r\n+k2\r\n#t\r\n~1\r\n,3.5\r\n(12345678901234567890\r\n"
    "!4\r\nOOPS\r\n=8\r\ntxt:abcd\r\n>2\r\n+pubsub\r\n+x\r\n|1\r\n+ttl\r\n:3\r\n:7\r\n*0\r\n";

void CheckMixed(const std::vector<Reply>& r) {
  ASSERT_EQ(r.size(), 17u);
  EXPECT_TRUE(r[0].IsStatus("OK"));
  EXPECT_TRUE(r[1].is_error());
  EXPECT_EQ(r[1].str, "ERR bad thing");
  EXPECT_EQ(r[2].type, ReplyType::kInteger);
  EXPECT_EQ(r[2].integer, -42);
  EXPECT_EQ(r[3].type, ReplyType::kBulkString);
  EXPECT_EQ(r[3].str, "hello");
  EXPECT_EQ(r[4].str, "");
  EXPECT_EQ(r[4].type, ReplyType::kBulkString);
  EXPECT_TRUE(r[5].is_null());
  EXPECT_TRUE(r[6].is_null());
  ASSERT_EQ(r[7].type, ReplyType::kArray);
  ASSERT_EQ(r[7].elements.size(), 3u);
  EXPECT_EQ(r[7].elements[1].elements[1].str, "b");
  EXPECT_TRUE(r[7].elements[2].is_null());
  ASSERT_EQ(r[8].type, ReplyType::kMap);
  ASSERT_EQ(r[8].elements.size(), 4u);
  EXPECT_EQ(r[8].elements[3].type, ReplyType::kBoolean);
  EXPECT_EQ(r[8].elements[3].integer, 1);
  EXPECT_EQ(r[9].type, ReplyType::kSet);
  EXPECT_EQ(r[9].elements[0].str, "3.5");
  EXPECT_EQ(r[10].type, ReplyType::kBigNumber);
  EXPECT_EQ(r[11].type, ReplyType::kError);
  EXPECT_EQ(r[11].str, "OOPS");
  EXPECT_EQ(r[12].str, "txt:abcd");
  EXPECT_EQ(r[13].type, ReplyType::kPush);
  // The attribute is dropped; the value it annotates follows.
  EXPECT_EQ(r[14].integer, 7);
  EXPECT_EQ(r[15].type, ReplyType::kArray);
  EXPECT_TRUE(r[15].elements.empty());
}

TEST(RespReaderTest, ParsesEveryTypeInOnePiece) {
  ReplyReader reader;
  std::vector<Reply> r = ParseSplit(std::string(kMixed) + "+end\r\n", {}, &reader);
  CheckMixed(r);
  EXPECT_TRUE(r[16].IsStatus("end"));
}

TEST(RespReaderTest, EverySplitPointAndByteByByteGiveTheSameReplies) {
  const std::string wire = std::string(kMixed) + "+end\r\n";
  for (size_t cut = 1; cut < wire.size(); ++cut) {
    ReplyReader reader;
    CheckMixed(ParseSplit(wire, {cut}, &reader));
  }
  std::vector<size_t> every;
  for (size_t i = 1; i < wire.size(); ++i) every.push_back(i);
  ReplyReader reader;
  CheckMixed(ParseSplit(wire, every, &reader));
}

TEST(RespReaderTest, RandomSplitsOfRandomBulkStrings) {
  std::mt19937_64 rng(7);
  for (int iter = 0; iter < 200; ++iter) {
    std::string wire;
    std::vector<std::string> values;
    const int count = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < count; ++i) {
      std::string v(rng() % 3000, '\0');
      for (char& c : v) c = static_cast<char>(rng());  // binary, CRLF included
      wire += "$" + std::to_string(v.size()) + "\r\n" + v + "\r\n";
      values.push_back(std::move(v));
    }
    std::vector<size_t> cuts;
    for (size_t p = 0; p < wire.size();) {
      p += 1 + rng() % 700;
      if (p < wire.size()) cuts.push_back(p);
    }
    ReplyReader reader;
    std::vector<Reply> r = ParseSplit(wire, cuts, &reader);
    ASSERT_EQ(r.size(), values.size());
    for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(r[i].str, values[i]);
  }
}

TEST(RespReaderTest, SinkReceivesAnExactBulkAndMismatchKeepsOnlyTheHead) {
  const std::string payload(1000, 'p');
  const std::string value = std::string(8, 'h') + payload;
  const std::string shorter = value.substr(0, 500);
  const std::string wire = "$" + std::to_string(value.size()) + "\r\n" + value + "\r\n" + "$" +
                           std::to_string(shorter.size()) + "\r\n" + shorter + "\r\n" + "$-1\r\n" +
                           "$3\r\nabc\r\n";
  for (size_t cut : {1u, 5u, 9u, 20u, 600u, 1100u, 1500u}) {
    uint8_t head1[8] = {}, head2[8] = {}, head3[8] = {};
    std::vector<uint8_t> body1(1000), body2(1000, 0xEE), body3(1000);
    BulkSink s1{head1, 8, body1.data(), 1000}, s2{head2, 8, body2.data(), 1000},
        s3{head3, 8, body3.data(), 1000};
    ReplyReader reader;
    reader.Expect(&s1);
    reader.Expect(&s2);
    reader.Expect(&s3);
    reader.Expect(nullptr);
    std::vector<Reply> r = ParseSplit(wire, {cut}, &reader);
    ASSERT_EQ(r.size(), 4u);
    EXPECT_EQ(r[0].sink, SinkOutcome::kFilled);
    EXPECT_TRUE(r[0].str.empty());
    EXPECT_EQ(std::string(reinterpret_cast<char*>(head1), 8), "hhhhhhhh");
    EXPECT_EQ(std::string(body1.begin(), body1.end()), payload);
    EXPECT_EQ(r[1].sink, SinkOutcome::kMismatch);
    EXPECT_EQ(r[1].length, 500u);
    EXPECT_EQ(std::string(reinterpret_cast<char*>(head2), 8), "hhhhhhhh");
    EXPECT_EQ(body2[0], 0xEE) << "a mismatched bulk must not write the body";
    EXPECT_TRUE(r[2].is_null());
    EXPECT_EQ(r[2].sink, SinkOutcome::kNone);
    EXPECT_EQ(r[3].str, "abc");
  }
}

TEST(RespReaderTest, ZeroCopyTargetsPutThePayloadStraightIntoTheSink) {
  std::string payload(100000, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7);
  const std::string wire = "$" + std::to_string(payload.size()) + "\r\n" + payload + "\r\n+OK\r\n";
  std::vector<uint8_t> body(payload.size());
  BulkSink sink{nullptr, 0, body.data(), body.size()};
  ReplyReader reader;
  reader.Expect(&sink);
  reader.Expect(nullptr);
  size_t pos = 0;
  std::vector<Reply> replies;
  while (pos < wire.size()) {
    iovec t[2];
    const int k = reader.ReadTargets(t);
    // A "socket read" of at most 4096 bytes over the targets.
    size_t n = std::min<size_t>(4096, wire.size() - pos), done = 0;
    for (int i = 0; i < k && done < n; ++i) {
      const size_t m = std::min(n - done, t[i].iov_len);
      std::memcpy(t[i].iov_base, wire.data() + pos + done, m);
      done += m;
    }
    reader.Commit(done);
    pos += done;
    Reply r;
    for (;;) {
      Result<bool> got = reader.Next(&r);
      ASSERT_TRUE(got.ok());
      if (!*got) break;
      replies.push_back(std::move(r));
    }
  }
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(replies[0].sink, SinkOutcome::kFilled);
  EXPECT_TRUE(std::memcmp(body.data(), payload.data(), payload.size()) == 0);
  EXPECT_TRUE(replies[1].IsStatus("OK"));
  // Only the guard read of the header ("$100000\r\n" + 7 bytes) went through the buffer.
  EXPECT_GE(reader.direct_bytes(), payload.size() - kSinkGuardRead);
}

TEST(RespReaderTest, ViolationsAndLimitsAreCorruption) {
  const char* bad[] = {"?x\r\n",   ":12a\r\n",    "$-2\r\n",
                       "+no-cr\n", "$3\r\nabcXY", "#x\r\n",
                       "*-5\r\n",  "_1\r\n",      ":99999999999999999999\r\n"};
  for (const char* b : bad) {
    ReplyReader reader;
    reader.Feed(b, std::strlen(b));
    Reply r;
    Result<bool> got = reader.Next(&r);
    ASSERT_FALSE(got.ok()) << b;
    EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << b;
  }
  ReaderLimits limits;
  limits.max_depth = 3;
  limits.max_bulk = 10;
  limits.max_elements = 5;
  limits.max_line = 16;
  for (const std::string& b :
       {std::string("*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"), std::string("$11\r\n"),
        std::string("*6\r\n"), std::string("+") + std::string(40, 'x')}) {
    ReplyReader reader(limits);
    reader.Feed(b.data(), b.size());
    Reply r;
    Result<bool> got = reader.Next(&r);
    EXPECT_FALSE(got.ok()) << b;
  }
}

TEST(RespEncoderTest, EncodesArraysOfBulkStringsAndReferencesLargePieces) {
  const std::string big(kCopyThreshold * 2, 'v');
  const uint8_t header[4] = {'H', 'D', 'R', '!'};
  EncodedBatch batch;
  batch.Append(Request::Of({"GET", "k"}));
  batch.Append(Request::Of({"SET", "key", Arg::Pieces(header, 4, big.data(), big.size())}));
  const std::string expect = "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$" +
                             std::to_string(4 + big.size()) + "\r\nHDR!" + big + "\r\n";
  EXPECT_EQ(batch.Flatten(), expect);
  EXPECT_EQ(batch.size_bytes(), expect.size());
  bool referenced = false;
  for (const iovec& v : batch.iovecs()) referenced |= v.iov_base == big.data();
  EXPECT_TRUE(referenced) << "the large payload must be sent from the caller's memory";
}

TEST(RedisUrlTest, ParsesTheSpellingsUsersWrite) {
  Result<RedisUrl> u = ParseRedisUrl("redis://127.0.0.1:7000");
  ASSERT_TRUE(u.ok());
  EXPECT_FALSE(u->tls);
  EXPECT_EQ(u->endpoint.ToString(), "127.0.0.1:7000");
  u = ParseRedisUrl("rediss://alice:p%40ss/w@cache.example:6380/3");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_TRUE(u->tls);
  EXPECT_EQ(u->username, "alice");
  EXPECT_EQ(u->password, "p@ss/w");
  EXPECT_EQ(u->endpoint.host, "cache.example");
  EXPECT_EQ(u->endpoint.port, 6380);
  EXPECT_EQ(u->db, 3);
  u = ParseRedisUrl("redis://[::1]:6390");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->endpoint.host, "::1");
  EXPECT_EQ(u->endpoint.ToString(), "[::1]:6390");
  u = ParseRedisUrl("redis://:secret@localhost");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->username, "");
  EXPECT_EQ(u->password, "secret");
  EXPECT_EQ(u->endpoint.port, 6379);
}

TEST(RedisUrlTest, RejectsMalformedUrlsWithoutEchoingThePassword) {
  for (const char* bad :
       {"http://host", "redis://", "redis://host:0", "redis://host:70000", "redis://host:x",
        "redis://::1:6379", "redis://[::1", "redis://host/abc", "redis://host?db=1",
        "redis://user:topsecret@host:99999", "redis://a:%zz@host", "redis://[1.2.3.4]:5"}) {
    Result<RedisUrl> u = ParseRedisUrl(bad);
    ASSERT_FALSE(u.ok()) << bad;
    EXPECT_EQ(u.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(u.status().message().find("topsecret"), std::string::npos);
  }
}

TEST(ClusterSlotTest, KeySlotMatchesRedisAndHonoursHashTags) {
  // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
  EXPECT_EQ(Crc16("123456789", 9), 0x31C3);
  EXPECT_EQ(KeySlot("foo"), 12182);
  EXPECT_EQ(KeySlot("bar"), 5061);
  EXPECT_EQ(KeySlot("{user1000}.following"), KeySlot("user1000"));
  EXPECT_EQ(KeySlot("foo{}{bar}"), KeySlot("foo{}{bar}"));  // empty tag: the whole key
  EXPECT_NE(KeySlot("foo{}{bar}"), KeySlot("bar"));
  EXPECT_EQ(KeySlot("foo{{bar}}zap"), KeySlot("{bar"));
}

TEST(ClusterSlotTest, ParsesShardsAndSlotsReplies) {
  auto bulk = [](std::string s) {
    Reply r;
    r.type = ReplyType::kBulkString;
    r.str = std::move(s);
    return r;
  };
  auto integer = [](int64_t v) {
    Reply r;
    r.type = ReplyType::kInteger;
    r.integer = v;
    return r;
  };
  auto array = [](std::vector<Reply> e) {
    Reply r;
    r.type = ReplyType::kArray;
    r.elements = std::move(e);
    return r;
  };
  Reply master = array({bulk("id"), bulk("abc"), bulk("port"), integer(7001), bulk("ip"),
                        bulk("10.0.0.1"), bulk("endpoint"), bulk("10.0.0.1"), bulk("role"),
                        bulk("master"), bulk("health"), bulk("online")});
  Reply replica = array({bulk("port"), integer(7002), bulk("ip"), bulk("10.0.0.2"), bulk("role"),
                         bulk("replica"), bulk("health"), bulk("online")});
  Reply shards =
      array({array({bulk("slots"), array({integer(0), integer(99), integer(200), integer(300)}),
                    bulk("nodes"), array({replica, master})})});
  Result<std::vector<SlotRange>> r = ParseClusterShards(shards, false, Endpoint{"seed", 1});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].master.ToString(), "10.0.0.1:7001");
  EXPECT_EQ((*r)[1].first, 200);
  EXPECT_EQ((*r)[1].last, 300);
  Reply slots = array({array({integer(0), integer(16383), array({bulk(""), integer(7005)})})});
  r = ParseClusterSlots(slots, Endpoint{"seed", 1});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].master.ToString(), "seed:7005");
  EXPECT_FALSE(ParseClusterSlots(array({array({integer(5), integer(2)})}), Endpoint{}).ok());
}

TEST(RedisValueTest, KeysHoldTheNamespaceChunkAndRankAndSpreadOverSlots) {
  const NamespaceDigest ns = MakeNamespaceDigest("model", "layout", "salt");
  EXPECT_NE(ns.fingerprint(), MakeNamespaceDigest("model", "layout", "salt2").fingerprint());
  EXPECT_NE(ns.fingerprint(), MakeNamespaceDigest("modell", "ayout", "salt").fingerprint());
  ObjectKey key;
  key.chunk.bytes.fill(0xAB);
  key.kv_rank = -3;
  const StoreKey k = MakeStoreKey("lmc:", ns, key);
  const std::string s(k.view());
  EXPECT_EQ(s.rfind("lmc:", 0), 0u);
  EXPECT_EQ(s.size(), 4 + 32 + 1 + 64 + 1 + 2);
  EXPECT_EQ(s.substr(s.size() - 3), ":-3");
  EXPECT_EQ(s.find('{'), std::string::npos);
  EXPECT_TRUE(ValidateKeyPrefix("lmcache:prod:").ok());
  EXPECT_FALSE(ValidateKeyPrefix("{tag}").ok());
  EXPECT_FALSE(ValidateKeyPrefix("a b").ok());
  EXPECT_FALSE(ValidateKeyPrefix(std::string(kMaxKeyPrefix + 1, 'x')).ok());
  // 4096 keys over 16384 slots land in many distinct slots and never all in one.
  std::vector<int> hits(kSlotCount, 0);
  std::mt19937_64 rng(1);
  int distinct = 0;
  for (int i = 0; i < 4096; ++i) {
    for (auto& b : key.chunk.bytes) b = static_cast<uint8_t>(rng());
    if (hits[KeySlot(MakeStoreKey("p:", ns, key).view())]++ == 0) ++distinct;
  }
  EXPECT_GT(distinct, 3300);  // ~3586 expected for uniform slots
}

TEST(RedisValueTest, HeaderCheckRejectsEveryKindOfBadValueWithItsReason) {
  const uint64_t fp = MakeNamespaceDigest("m", "l", "s").fingerprint();
  std::vector<uint8_t> payload(4096);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 31);
  uint8_t h[kValueHeaderSize];
  EncodeValueHeader(h, fp, payload.size(), internal::Crc32c(payload.data(), payload.size()));
  const uint64_t full = kValueHeaderSize + payload.size();
  EXPECT_EQ(CheckValue(h, full, fp, payload.size(), payload.data()), ValueCheck::kOk);
  // Truncated: fewer bytes than the header says, or than a header.
  EXPECT_EQ(CheckValue(h, full - 1, fp, payload.size(), nullptr), ValueCheck::kTruncated);
  EXPECT_EQ(CheckValue(h, 10, fp, payload.size(), nullptr), ValueCheck::kTruncated);
  // Torn: extra bytes, or a header that fails its own checksum.
  EXPECT_EQ(CheckValue(h, full + 1, fp, payload.size(), nullptr), ValueCheck::kTorn);
  uint8_t torn[kValueHeaderSize];
  std::memcpy(torn, h, sizeof(torn));
  torn[17] ^= 1;
  EXPECT_EQ(CheckValue(torn, full, fp, payload.size(), payload.data()), ValueCheck::kTorn);
  // Foreign: another namespace, another magic, another version.
  EXPECT_EQ(CheckValue(h, full, fp + 1, payload.size(), payload.data()), ValueCheck::kForeign);
  const char junk[kValueHeaderSize] = "some other application's value";
  EXPECT_EQ(CheckValue(reinterpret_cast<const uint8_t*>(junk), full, fp, payload.size(), nullptr),
            ValueCheck::kForeign);
  // Wrong size: intact, ours, another object size.
  EXPECT_EQ(CheckValue(h, full, fp, payload.size() + 8, nullptr), ValueCheck::kWrongSize);
  // Corrupt: one flipped payload bit.
  payload[1234] ^= 0x10;
  EXPECT_EQ(CheckValue(h, full, fp, payload.size(), payload.data()), ValueCheck::kCorrupt);
  for (size_t c = 0; c < kValueCheckCount; ++c) {
    EXPECT_STRNE(ValueCheckName(static_cast<ValueCheck>(c)), "unknown");
  }
}

}  // namespace
}  // namespace redis
}  // namespace lmcache_cpp
