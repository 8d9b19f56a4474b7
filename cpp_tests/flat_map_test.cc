// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The object table's internal open-addressing map, checked against std::unordered_map.

#include "flat_map.h"

#include <gtest/gtest.h>

#include <random>
#include <unordered_map>

#include "lmcache_cpp/object_key.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace {

using Map = internal::FlatMap<ObjectKey, uint64_t, ObjectKeyHash>;
using testutil::Key;

TEST(FlatMapTest, InsertFindEraseBasics) {
  Map m;
  EXPECT_TRUE(m.empty());
  EXPECT_EQ(m.Find(Key(1)), nullptr);
  auto [v, inserted] = m.Insert(Key(1));
  ASSERT_TRUE(inserted);
  *v = 11;
  auto [v2, inserted2] = m.Insert(Key(1));
  EXPECT_FALSE(inserted2);
  EXPECT_EQ(*v2, 11u);
  EXPECT_EQ(m.size(), 1u);
  EXPECT_TRUE(m.Erase(Key(1)));
  EXPECT_FALSE(m.Erase(Key(1)));
  EXPECT_EQ(m.Find(Key(1)), nullptr);
  EXPECT_TRUE(m.empty());
}

TEST(FlatMapTest, PointersSurviveErasureOfOtherElements) {
  Map m;
  m.Reserve(100);
  std::vector<uint64_t*> ptrs;
  for (uint64_t i = 0; i < 100; ++i) {
    uint64_t* p = m.Insert(Key(i)).first;
    *p = i;
  }
  for (uint64_t i = 0; i < 100; ++i) ptrs.push_back(m.Find(Key(i)));
  for (uint64_t i = 0; i < 100; i += 2) m.EraseValue(ptrs[i]);
  for (uint64_t i = 1; i < 100; i += 2) {
    EXPECT_EQ(*ptrs[i], i);
    EXPECT_EQ(m.Find(Key(i)), ptrs[i]);
  }
  EXPECT_EQ(m.size(), 50u);
}

TEST(FlatMapTest, ReserveAvoidsRehashAndResetKeepsCapacity) {
  Map m;
  m.Reserve(64);
  const size_t cap = m.capacity();
  uint64_t* first = m.Insert(Key(0)).first;
  for (uint64_t i = 1; i < 64; ++i) m.Insert(Key(i));
  EXPECT_EQ(m.capacity(), cap);
  EXPECT_EQ(m.Find(Key(0)), first) << "no rehash moved the first element";
  m.Reset();
  EXPECT_TRUE(m.empty());
  EXPECT_EQ(m.capacity(), cap);
  EXPECT_EQ(m.Find(Key(5)), nullptr);
}

TEST(FlatMapTest, RanksOfOneChunkDoNotCollide) {
  Map m;
  for (int32_t r = 0; r < 8; ++r) *m.Insert(Key(3, r)).first = static_cast<uint64_t>(r);
  for (int32_t r = 0; r < 8; ++r) EXPECT_EQ(*m.Find(Key(3, r)), static_cast<uint64_t>(r));
}

TEST(FlatMapTest, RandomOperationsMatchUnorderedMap) {
  Map m;
  std::unordered_map<ObjectKey, uint64_t, ObjectKeyHash> ref;
  std::mt19937_64 rng(7);
  for (int op = 0; op < 200000; ++op) {
    const ObjectKey k = Key(rng() % 3000, static_cast<int32_t>(rng() % 2));
    switch (rng() % 4) {
      case 0:
      case 1: {
        const uint64_t v = rng();
        *m.Insert(k).first = v;
        ref[k] = v;
        break;
      }
      case 2: ASSERT_EQ(m.Erase(k), ref.erase(k) == 1); break;
      case 3: {
        const uint64_t* p = m.Find(k);
        auto it = ref.find(k);
        ASSERT_EQ(p != nullptr, it != ref.end());
        if (p != nullptr) {
          ASSERT_EQ(*p, it->second);
        }
        break;
      }
    }
    ASSERT_EQ(m.size(), ref.size());
  }
  size_t seen = 0;
  m.ForEach([&](const ObjectKey& k, uint64_t v) {
    ++seen;
    ASSERT_EQ(ref.at(k), v);
  });
  EXPECT_EQ(seen, ref.size());
}

}  // namespace
}  // namespace lmcache_cpp
