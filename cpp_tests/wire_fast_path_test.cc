// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The server's C++ codec of the per-prompt requests (cpp/src/wire/fast_path.h) on a real engine:
// its msgpack reader and writer, what it serves and what it declines to the Python dispatcher,
// and the replies it encodes. tests/test_wire_fast_path.py checks it byte for byte against the
// Python codec; these tests need neither Python nor a socket.

#include "wire/fast_path.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/storage_manager.h"

namespace lmcache_cpp {
namespace {

using wire::FastPath;
using wire::Reader;
using wire::Reply;
using wire::Writer;

constexpr uint32_t kChunk = 16;
constexpr char kModel[] = "wire-model";
constexpr ClientId kClient = 7;

KvCacheLayout Layout() {
  KvCacheLayout l;
  l.layout = KvLayout::kNHD;
  l.num_layers = 1;
  l.block_size = kChunk;
  l.num_heads = 1;
  l.head_size = 8;
  l.element_size = 2;
  l.num_blocks = 16;
  return l;
}

std::string Header(uint64_t type, uint64_t seq, uint64_t version = wire::kProtocolVersion) {
  Writer w;
  w.FixArray(3);
  w.Uint(version);
  w.Uint(type);
  w.Uint(seq);
  return w.Take();
}

// A LOOKUP / SYNC_LOOKUP payload: {"key": {model_name, request_id, tokens}, "tp_size": 1}.
std::string KeyPayload(const std::vector<uint32_t>& tokens, std::string_view request_id) {
  Writer w;
  w.FixMap(2);
  w.Str("key");
  w.FixMap(3);
  w.Str("model_name");
  w.Str(kModel);
  w.Str("request_id");
  w.Str(request_id);
  w.Str("tokens");
  w.Bin(reinterpret_cast<const uint8_t*>(tokens.data()), tokens.size() * 4);
  w.Str("tp_size");
  w.Uint(1);
  return w.Take();
}

// The reply header [version, type, seq, status] and the payload's fields as read back.
struct Decoded {
  uint64_t version = 0, type = 0, seq = 0, status = 0;
};
Decoded DecodeHeader(const Reply& reply) {
  Reader r(reply.header);
  uint32_t n = 0;
  Decoded d;
  EXPECT_TRUE(r.ReadArrayHeader(&n));
  EXPECT_EQ(n, 4u);
  EXPECT_TRUE(r.ReadUint(0, UINT64_MAX, &d.version));
  EXPECT_TRUE(r.ReadUint(0, UINT64_MAX, &d.type));
  EXPECT_TRUE(r.ReadUint(0, UINT64_MAX, &d.seq));
  EXPECT_TRUE(r.ReadUint(0, UINT64_MAX, &d.status));
  EXPECT_TRUE(r.AtEnd());
  return d;
}
// The value of `field` (an unsigned int) in the reply's payload map.
std::optional<uint64_t> UintField(const Reply& reply, std::string_view field) {
  Reader r(reply.payload);
  uint32_t n = 0;
  if (!r.ReadMapHeader(&n)) return std::nullopt;
  for (uint32_t i = 0; i < n; ++i) {
    std::string_view key;
    if (!r.ReadStr(UINT32_MAX, &key)) return std::nullopt;
    uint64_t v = 0;
    bool b = false;
    if (key == field && r.ReadUint(0, UINT64_MAX, &v)) return v;
    if (!r.ReadUint(0, UINT64_MAX, &v) && !r.ReadBool(&b)) return std::nullopt;
  }
  return std::nullopt;
}

class WireFastPathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StorageManagerConfig sc;
    sc.arena.size_bytes = 8 << 20;
    auto storage = StorageManager::Create(std::move(sc));
    ASSERT_TRUE(storage.ok()) << storage.status().ToString();
    storage_ = std::move(storage).value();
    ASSERT_TRUE(storage_->Start().ok());
    EngineConfig ec;
    ec.chunk_size = kChunk;
    auto engine = CacheEngine::Create(storage_.get(), ec);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    engine_ = std::move(engine).value();
    ASSERT_TRUE(engine_->RegisterKvCache(kClient, kModel, 1, 0, Layout()).ok());
    path_.emplace(engine_.get(), wire::Limits{}, /*has_l2=*/false);
  }
  void TearDown() override {
    path_.reset();
    engine_.reset();
    if (storage_) storage_->Stop();
  }

  std::optional<Reply> Handle(const std::string& header, const std::string& payload) {
    return path_->Handle(kClient, header, payload);
  }

  std::unique_ptr<StorageManager> storage_;
  std::unique_ptr<CacheEngine> engine_;
  std::optional<FastPath> path_;
};

TEST(WireCodecTest, WriterAndReaderAgreeOnEveryIntegerWidth) {
  const uint64_t values[] = {
      0, 1, 127, 128, 255, 256, 65535, 65536, (1ull << 32) - 1, 1ull << 32, UINT64_MAX};
  for (uint64_t v : values) {
    Writer w;
    w.Uint(v);
    const std::string bytes = w.Take();
    Reader r(bytes);
    uint64_t got = 0;
    ASSERT_TRUE(r.ReadUint(0, UINT64_MAX, &got)) << v;
    EXPECT_EQ(got, v);
    EXPECT_TRUE(r.AtEnd());
    Reader bounded(bytes);
    EXPECT_EQ(bounded.ReadUint(0, v == 0 ? 0 : v - 1, &got), v == 0) << "the bound is checked";
  }
}

TEST(WireCodecTest, StringsMustBeValidUtf8AndWithinTheirBound) {
  for (const std::string& s : {std::string("plain"), std::string("\xc3\xa9t\xc3\xa9")}) {
    Writer w;
    w.Str(s);
    const std::string bytes = w.Take();
    Reader r(bytes);
    std::string_view got;
    ASSERT_TRUE(r.ReadStr(64, &got));
    EXPECT_EQ(got, s);
    Reader tight(bytes);
    EXPECT_FALSE(tight.ReadStr(s.size() - 1, &got));
  }
  Writer bad;
  bad.Str("\xff\xfe");
  const std::string bytes = bad.Take();
  Reader r(bytes);
  std::string_view got;
  EXPECT_FALSE(r.ReadStr(64, &got));
}

TEST_F(WireFastPathTest, PingIsAnsweredWithItsTypeAndSeq) {
  auto reply = Handle(Header(wire::kPing, 42), std::string(1, '\x80'));  // {}
  ASSERT_TRUE(reply.has_value());
  const Decoded d = DecodeHeader(*reply);
  EXPECT_EQ(d.version, wire::kProtocolVersion);
  EXPECT_EQ(d.type, wire::kPing);
  EXPECT_EQ(d.seq, 42u);
  EXPECT_EQ(d.status, 0u);
  EXPECT_EQ(reply->seq, 42u);
  EXPECT_EQ(reply->payload, std::string(1, '\x80'));
}

TEST_F(WireFastPathTest, SyncLookupAndEndSessionRunOnTheEngine) {
  std::vector<uint32_t> tokens(3 * kChunk);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i * 31 + 7);
  auto reply = Handle(Header(wire::kSyncLookup, 1), KeyPayload(tokens, "r"));
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(DecodeHeader(*reply).status, 0u);
  EXPECT_EQ(UintField(*reply, "hit_chunks"), 0u);  // nothing stored yet
  EXPECT_EQ(engine_->stats().requests, 1u);        // the request was interned on the engine

  Writer w;
  w.FixMap(2);
  w.Str("model_name");
  w.Str(kModel);
  w.Str("request_id");
  w.Str("r");
  auto ended = Handle(Header(wire::kEndSession, 2), w.Take());
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(DecodeHeader(*ended).status, 0u);
  EXPECT_EQ(UintField(*ended, "released"), 0u);
  EXPECT_EQ(engine_->stats().requests, 0u);
}

TEST_F(WireFastPathTest, AnEngineErrorIsAnErrorReplyWithTheEnginesCode) {
  std::vector<uint32_t> tokens(kChunk, 1);
  Writer w;
  w.FixMap(2);
  w.Str("key");
  w.FixMap(3);
  w.Str("model_name");
  w.Str("never-registered");
  w.Str("request_id");
  w.Str("r");
  w.Str("tokens");
  w.Bin(reinterpret_cast<const uint8_t*>(tokens.data()), tokens.size() * 4);
  w.Str("tp_size");
  w.Uint(1);
  auto reply = Handle(Header(wire::kLookup, 3), w.Take());
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(DecodeHeader(*reply).status, static_cast<uint64_t>(StatusCode::kNotFound));
  Reader r(reply->payload);
  uint32_t n = 0;
  std::string_view key, message;
  ASSERT_TRUE(r.ReadMapHeader(&n));
  ASSERT_TRUE(r.ReadStr(64, &key));
  EXPECT_EQ(key, "message");
  ASSERT_TRUE(r.ReadStr(UINT32_MAX, &message));
  EXPECT_NE(message.find("never-registered"), std::string_view::npos);
}

TEST_F(WireFastPathTest, WhatItDoesNotServeGoesToPython) {
  const std::string empty(1, '\x80');
  // Other request types, another protocol version, a malformed header or payload, an unknown
  // field: declined, never answered here, so the Python dispatcher words the reply.
  EXPECT_FALSE(Handle(Header(3 /* GET_CHUNK_SIZE */, 1), empty).has_value());
  EXPECT_FALSE(Handle(Header(wire::kPing, 1, /*version=*/2), empty).has_value());
  EXPECT_FALSE(Handle("\xc1", empty).has_value());
  EXPECT_FALSE(Handle(Header(wire::kPing, 1), "\xc1").has_value());
  Writer extra;
  extra.FixMap(1);
  extra.Str("surprise");
  extra.Uint(1);
  EXPECT_FALSE(Handle(Header(wire::kPing, 1), extra.Take()).has_value());
  std::vector<uint32_t> tokens(kChunk, 2);
  std::string truncated = KeyPayload(tokens, "r");
  truncated.resize(truncated.size() - 3);
  EXPECT_FALSE(Handle(Header(wire::kLookup, 1), truncated).has_value());
  EXPECT_EQ(engine_->stats().requests, 0u) << "a declined request changed nothing";
}

}  // namespace
}  // namespace lmcache_cpp
