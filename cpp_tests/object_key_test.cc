// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/object_key.h"

#include <gtest/gtest.h>

#include <cctype>
#include <set>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <vector>

namespace lmcache_cpp {
namespace {

ChunkHash MakeHash(uint8_t start, uint8_t step = 1) {
  ChunkHash h;
  for (size_t i = 0; i < kChunkHashSize; ++i) h.bytes[i] = static_cast<uint8_t>(start + i * step);
  return h;
}

TEST(ObjectKeyTest, KeysAreTriviallyCopyableValues) {
  EXPECT_TRUE(std::is_trivially_copyable<ChunkHash>::value);
  EXPECT_TRUE(std::is_trivially_copyable<ObjectKey>::value);
  EXPECT_EQ(sizeof(ChunkHash), kChunkHashSize);
}

TEST(ChunkHashTest, HexIsLowerCaseAndRoundTrips) {
  ChunkHash h = MakeHash(0);
  h.bytes[31] = 0xAB;
  const std::string hex = h.ToHex();
  EXPECT_EQ(hex, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1eab");
  Result<ChunkHash> back = ChunkHash::FromHex(hex);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, h);
}

TEST(ChunkHashTest, FromHexAcceptsUpperCase) {
  ChunkHash h = MakeHash(0xF0, 3);
  std::string hex = h.ToHex();
  for (char& c : hex) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  Result<ChunkHash> back = ChunkHash::FromHex(hex);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, h);
}

TEST(ChunkHashTest, FromHexRejectsWrongLengthAndNonHexCharacters) {
  const std::string good = MakeHash(7).ToHex();
  EXPECT_EQ(ChunkHash::FromHex("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkHash::FromHex(good.substr(1)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkHash::FromHex(good + "0").status().code(), StatusCode::kInvalidArgument);
  for (size_t pos : {0u, 17u, 63u}) {
    for (char bad : {'g', 'G', ' ', 'x', '\0'}) {
      std::string s = good;
      s[pos] = bad;
      EXPECT_EQ(ChunkHash::FromHex(s).status().code(), StatusCode::kInvalidArgument)
          << "pos " << pos << " char " << static_cast<int>(bad);
    }
  }
}

TEST(ChunkHashTest, FromBytesNeedsExactlyThirtyTwoBytes) {
  const ChunkHash h = MakeHash(9);
  Result<ChunkHash> ok = ChunkHash::FromBytes(h.bytes.data(), kChunkHashSize);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, h);
  EXPECT_EQ(ChunkHash::FromBytes(h.bytes.data(), 31).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkHash::FromBytes(h.bytes.data(), 0).status().code(), StatusCode::kInvalidArgument);
}

TEST(ChunkHashTest, OrderingFollowsBytes) {
  ChunkHash a = MakeHash(0);
  ChunkHash b = a;
  b.bytes[31] = 0xFF;
  EXPECT_LT(a, b);
  EXPECT_FALSE(b < a);
  EXPECT_FALSE(a < a);
}

TEST(ObjectKeyTest, ShortStringIsHashPrefixAtRank) {
  ObjectKey k{MakeHash(0), 3};
  EXPECT_EQ(k.ToShortString(), "0001020304050607@3");
}

TEST(ObjectKeyTest, EqualityAndOrderingAreChunkMajor) {
  ObjectKey a{MakeHash(0), 5};
  ObjectKey b{MakeHash(1), 0};
  ObjectKey c{MakeHash(0), 6};
  EXPECT_LT(a, b);
  EXPECT_LT(a, c);
  EXPECT_LT(c, b);
  EXPECT_NE(a, c);
  EXPECT_EQ(a, (ObjectKey{MakeHash(0), 5}));
}

TEST(ObjectKeyTest, ExpandToAllRanksIsChunkMajor) {
  const std::vector<ChunkHash> chunks = {MakeHash(0), MakeHash(100), MakeHash(200)};
  Result<std::vector<ObjectKey>> keys = ExpandToAllRanks(chunks, 4);
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->size(), 12u);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int32_t r = 0; r < 4; ++r) {
      const ObjectKey& k = (*keys)[c * 4 + static_cast<size_t>(r)];
      EXPECT_EQ(k.chunk, chunks[c]);
      EXPECT_EQ(k.kv_rank, r);
    }
  }
}

TEST(ObjectKeyTest, ExpandToAllRanksWithOneRankEqualsKeysForRankZero) {
  const std::vector<ChunkHash> chunks = {MakeHash(1), MakeHash(2)};
  Result<std::vector<ObjectKey>> keys = ExpandToAllRanks(chunks, 1);
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(*keys, KeysForRank(chunks, 0));
  Result<std::vector<ObjectKey>> none = ExpandToAllRanks({}, 8);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(ObjectKeyTest, ExpandToAllRanksRejectsWorldSizeBelowOne) {
  const std::vector<ChunkHash> chunks = {MakeHash(1)};
  EXPECT_EQ(ExpandToAllRanks(chunks, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpandToAllRanks(chunks, -3).status().code(), StatusCode::kInvalidArgument);
}

TEST(ObjectKeyTest, KeysForRankKeepsChunkOrder) {
  const std::vector<ChunkHash> chunks = {MakeHash(5), MakeHash(6), MakeHash(7)};
  std::vector<ObjectKey> keys = KeysForRank(chunks, 2);
  ASSERT_EQ(keys.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(keys[i].chunk, chunks[i]);
    EXPECT_EQ(keys[i].kv_rank, 2);
  }
}

TEST(ObjectKeyHashTest, RanksOfOneChunkSpreadOverPowerOfTwoBuckets) {
  for (uint8_t start : {uint8_t{0}, uint8_t{1}, uint8_t{77}, uint8_t{200}}) {
    const ChunkHash chunk = MakeHash(start, 13);
    for (size_t buckets : {8u, 16u, 64u, 1024u}) {
      std::set<size_t> seen;
      for (int32_t r = 0; r < 8; ++r) seen.insert(ObjectKeyHash{}(ObjectKey{chunk, r}) % buckets);
      EXPECT_EQ(seen.size(), 8u) << "start " << int{start} << " buckets " << buckets;
    }
    // Every one of 1024 ranks gets its own slot in a 1024-bucket table.
    std::set<size_t> slots;
    for (int32_t r = 0; r < 1024; ++r) slots.insert(ObjectKeyHash{}(ObjectKey{chunk, r}) % 1024);
    EXPECT_EQ(slots.size(), 1024u);
  }
}

TEST(ObjectKeyHashTest, IsDeterministicAndUsableInHashTables) {
  const ObjectKey k{MakeHash(3), 1};
  EXPECT_EQ(ObjectKeyHash{}(k), ObjectKeyHash{}(ObjectKey{MakeHash(3), 1}));
  EXPECT_EQ(ChunkHashHash{}(k.chunk), ChunkHashHash{}(MakeHash(3)));
  std::unordered_set<ObjectKey, ObjectKeyHash> table;
  for (uint8_t c = 0; c < 16; ++c) {
    for (int32_t r = 0; r < 4; ++r) table.insert(ObjectKey{MakeHash(c, 3), r});
  }
  EXPECT_EQ(table.size(), 64u);
  EXPECT_EQ(table.count(ObjectKey{MakeHash(5, 3), 2}), 1u);
  EXPECT_EQ(table.count(ObjectKey{MakeHash(5, 3), 4}), 0u);
}

}  // namespace
}  // namespace lmcache_cpp
