// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/eviction_policy.h"

#include <gtest/gtest.h>

namespace lmcache_cpp {
namespace {

TEST(LruPolicyTest, VictimIsTheLeastRecentlyInsertedOrTouched) {
  auto p = NewLruPolicy();
  EXPECT_FALSE(p->Victim().has_value());
  p->Insert(3);
  p->Insert(1);
  p->Insert(7);
  EXPECT_EQ(p->size(), 3u);
  EXPECT_EQ(*p->Victim(), 3u);
  p->Touch(3);
  EXPECT_EQ(*p->Victim(), 1u);
  p->Remove(1);
  EXPECT_EQ(*p->Victim(), 7u);
  EXPECT_FALSE(p->Contains(1));
  EXPECT_TRUE(p->Contains(3));
  p->Remove(7);
  p->Remove(3);
  EXPECT_FALSE(p->Victim().has_value());
  EXPECT_EQ(p->size(), 0u);
}

TEST(LruPolicyTest, ReinsertedSlotBecomesMostRecent) {
  auto p = NewLruPolicy();
  for (SlotId s = 0; s < 5; ++s) p->Insert(s);
  p->Remove(0);
  p->Insert(0);
  EXPECT_EQ(*p->Victim(), 1u);
  p->Touch(4);  // touching the head is a no-op
  p->Touch(1);
  EXPECT_EQ(*p->Victim(), 2u);
}

TEST(LruPolicyTest, HandlesSparseLargeSlotIds) {
  auto p = NewLruPolicy();
  p->Insert(100000);
  p->Insert(5);
  EXPECT_EQ(*p->Victim(), 100000u);
  EXPECT_FALSE(p->Contains(99999));
}

TEST(EvictionPolicyFactoryTest, UnknownNameIsInvalidArgument) {
  EXPECT_TRUE(NewEvictionPolicy("lru").ok());
  EXPECT_EQ(NewEvictionPolicy("mru").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lmcache_cpp
