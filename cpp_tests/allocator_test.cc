// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <future>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <thread>
#include <vector>

namespace lmcache_cpp {
namespace {

constexpr uint64_t kUnit = 4096;

// Every field, so "nothing changed" is checked in full.
void ExpectSameStats(const AllocatorStats& a, const AllocatorStats& b) {
  EXPECT_EQ(a.capacity, b.capacity);
  EXPECT_EQ(a.used, b.used);
  EXPECT_EQ(a.free, b.free);
  EXPECT_EQ(a.largest_free, b.largest_free);
  EXPECT_EQ(a.live_extents, b.live_extents);
  EXPECT_EQ(a.free_extents, b.free_extents);
  EXPECT_EQ(a.allocations, b.allocations);
  EXPECT_EQ(a.failed_allocations, b.failed_allocations);
  EXPECT_EQ(a.frees, b.frees);
}

Extent MustAllocate(ExtentAllocator& alloc, uint64_t size) {
  std::optional<Extent> e = alloc.Allocate(size);
  EXPECT_TRUE(e.has_value()) << "Allocate(" << size << ")";
  return e.value_or(Extent{});
}

void ExpectInvariants(const ExtentAllocator& alloc) {
  const Status st = alloc.CheckInvariants();
  EXPECT_TRUE(st.ok()) << st.ToString();
}

TEST(ExtentAllocatorTest, SizesAreRoundedUpToTheAlignment) {
  ExtentAllocator alloc(1 << 20);
  EXPECT_EQ(alloc.alignment(), 4096u);
  const Extent a = MustAllocate(alloc, 1);
  const Extent b = MustAllocate(alloc, 4097);
  const Extent c = MustAllocate(alloc, 4096);
  EXPECT_EQ(a.length, 4096u);
  EXPECT_EQ(b.length, 8192u);
  EXPECT_EQ(c.length, 4096u);
  for (const Extent& e : {a, b, c}) EXPECT_EQ(e.offset % 4096, 0u);
  EXPECT_EQ(alloc.stats().used, 16384u);
  ExpectInvariants(alloc);

  ExtentAllocator small(1000, 64);
  EXPECT_EQ(small.capacity(), 960u);  // rounded down to the alignment
  EXPECT_EQ(MustAllocate(small, 65).length, 128u);
  EXPECT_EQ(small.RoundUp(0), 0u);
  EXPECT_EQ(small.RoundUp(64), 64u);
  ExpectInvariants(small);
}

TEST(ExtentAllocatorTest, ZeroSizeAndOversizeRequestsFail) {
  ExtentAllocator alloc(16 * kUnit);
  EXPECT_FALSE(alloc.Allocate(0).has_value());
  EXPECT_FALSE(alloc.Allocate(16 * kUnit + 1).has_value());
  EXPECT_FALSE(alloc.Allocate(UINT64_MAX).has_value());  // no wrap-around in the rounding
  const AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.failed_allocations, 3u);
  EXPECT_EQ(s.allocations, 0u);
  EXPECT_EQ(s.used, 0u);
  ExpectInvariants(alloc);
}

TEST(ExtentAllocatorTest, ExhaustionReturnsNulloptAndCountsTheFailure) {
  ExtentAllocator alloc(8 * kUnit);
  for (int i = 0; i < 4; ++i) MustAllocate(alloc, 2 * kUnit);
  EXPECT_FALSE(alloc.Allocate(1).has_value());
  const AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.used, 8 * kUnit);
  EXPECT_EQ(s.free, 0u);
  EXPECT_EQ(s.largest_free, 0u);
  EXPECT_EQ(s.free_extents, 0u);
  EXPECT_EQ(s.live_extents, 4u);
  EXPECT_EQ(s.allocations, 4u);
  EXPECT_EQ(s.failed_allocations, 1u);
  ExpectInvariants(alloc);
}

TEST(ExtentAllocatorTest, FreeingCoalescesNeighboursBackIntoOneExtent) {
  ExtentAllocator alloc(8 * kUnit);
  std::vector<Extent> e;
  for (int i = 0; i < 4; ++i) e.push_back(MustAllocate(alloc, 2 * kUnit));

  ASSERT_TRUE(alloc.Free(e[1]).ok());
  EXPECT_EQ(alloc.stats().free_extents, 1u);
  ASSERT_TRUE(alloc.Free(e[3]).ok());
  EXPECT_EQ(alloc.stats().free_extents, 2u);
  ASSERT_TRUE(alloc.Free(e[0]).ok());  // merges with e[1]'s hole
  EXPECT_EQ(alloc.stats().free_extents, 2u);
  EXPECT_EQ(alloc.stats().largest_free, 4 * kUnit);
  ExpectInvariants(alloc);
  ASSERT_TRUE(alloc.Free(e[2]).ok());  // merges with both sides
  const AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.free_extents, 1u);
  EXPECT_EQ(s.largest_free, alloc.capacity());
  EXPECT_EQ(s.used, 0u);
  EXPECT_EQ(s.frees, 4u);
  ExpectInvariants(alloc);
  EXPECT_EQ(MustAllocate(alloc, 8 * kUnit).offset, 0u);  // the whole region is one hole again
}

TEST(ExtentAllocatorTest, BestFitChoosesTheSmallestHoleThatFits) {
  // Layout in units: [a:3][b:1][c:1][d:1][e:2][f:1][g:1] = 10, then free a, c, e to leave holes
  // of 3 (at 0), 1 (at 4) and 2 (at 6), separated by live extents.
  ExtentAllocator alloc(10 * kUnit);
  const Extent a = MustAllocate(alloc, 3 * kUnit);
  MustAllocate(alloc, kUnit);
  const Extent c = MustAllocate(alloc, kUnit);
  MustAllocate(alloc, kUnit);
  const Extent e = MustAllocate(alloc, 2 * kUnit);
  MustAllocate(alloc, kUnit);
  MustAllocate(alloc, kUnit);
  ASSERT_TRUE(alloc.Free(a).ok());
  ASSERT_TRUE(alloc.Free(c).ok());
  ASSERT_TRUE(alloc.Free(e).ok());
  ASSERT_EQ(alloc.stats().free_extents, 3u);

  EXPECT_EQ(MustAllocate(alloc, 2 * kUnit).offset, 6 * kUnit);  // the 2-hole, not the 3-hole
  EXPECT_EQ(MustAllocate(alloc, kUnit).offset, 4 * kUnit);      // the 1-hole
  EXPECT_EQ(MustAllocate(alloc, kUnit).offset, 0u);             // only the 3-hole remains
  EXPECT_EQ(alloc.stats().largest_free, 2 * kUnit);             // its remainder
  ExpectInvariants(alloc);
}

TEST(ExtentAllocatorTest, AllocateBatchReturnsEveryExtentOrNone) {
  ExtentAllocator alloc(8 * kUnit);
  MustAllocate(alloc, 3 * kUnit);
  const AllocatorStats before = alloc.stats();

  // Too large in total: rejected up front.
  auto too_big = alloc.AllocateBatch({2 * kUnit, 2 * kUnit, 2 * kUnit});
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), StatusCode::kOutOfMemory);
  AllocatorStats expected = before;
  expected.failed_allocations += 1;
  ExpectSameStats(alloc.stats(), expected);

  // A zero size: InvalidArgument, nothing allocated.
  auto zero = alloc.AllocateBatch({kUnit, 0});
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  expected.failed_allocations += 1;
  ExpectSameStats(alloc.stats(), expected);

  auto ok = alloc.AllocateBatch({kUnit, 4 * kUnit});
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  ASSERT_EQ(ok->size(), 2u);
  EXPECT_EQ((*ok)[0].length, kUnit);
  EXPECT_EQ((*ok)[1].length, 4 * kUnit);
  EXPECT_EQ(alloc.stats().allocations, before.allocations + 2);
  EXPECT_EQ(alloc.stats().free, 0u);
  ExpectInvariants(alloc);

  auto empty = alloc.AllocateBatch({});
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(ExtentAllocatorTest, FailedBatchRollsBackPartialAllocations) {
  // Eight 1-unit extents; freeing every other one leaves 4 free units in 4 separate holes. A
  // batch {1, 1, 2} fits by total but not by shape: the first two items succeed, the third fails
  // and the first two must be returned.
  ExtentAllocator alloc(8 * kUnit);
  std::vector<Extent> e;
  for (int i = 0; i < 8; ++i) e.push_back(MustAllocate(alloc, kUnit));
  for (int i = 0; i < 8; i += 2) ASSERT_TRUE(alloc.Free(e[i]).ok());
  const AllocatorStats before = alloc.stats();
  ASSERT_EQ(before.free_extents, 4u);

  auto batch = alloc.AllocateBatch({kUnit, kUnit, 2 * kUnit});
  ASSERT_FALSE(batch.ok());
  EXPECT_EQ(batch.status().code(), StatusCode::kOutOfMemory);
  AllocatorStats expected = before;
  expected.failed_allocations += 1;
  ExpectSameStats(alloc.stats(), expected);
  ExpectInvariants(alloc);
  // The very same holes are still there.
  for (int i = 0; i < 8; i += 2) EXPECT_EQ(MustAllocate(alloc, kUnit).offset, e[i].offset);
}

TEST(ExtentAllocatorTest, DoubleAndForeignFreesAreRejectedWithoutChange) {
  ExtentAllocator alloc(16 * kUnit);
  const Extent a = MustAllocate(alloc, 2 * kUnit);
  const Extent b = MustAllocate(alloc, 2 * kUnit);
  ASSERT_TRUE(alloc.Free(a).ok());
  const AllocatorStats before = alloc.stats();

  const std::vector<Extent> bad = {
      a,                             // double free
      {b.offset, b.length + kUnit},  // wrong length
      {b.offset, kUnit},             // a prefix of a live extent
      {b.offset + kUnit, kUnit},     // the inside of a live extent
      {10 * kUnit, kUnit},           // never allocated (inside the free hole)
      {100 * kUnit, kUnit},          // outside the capacity
  };
  for (const Extent& e : bad) {
    const Status st = alloc.Free(e);
    EXPECT_EQ(st.code(), StatusCode::kInternal) << e.offset << "+" << e.length;
    ExpectSameStats(alloc.stats(), before);
    ExpectInvariants(alloc);
  }
  EXPECT_TRUE(alloc.Free(b).ok());
  EXPECT_EQ(alloc.stats().free_extents, 1u);
}

TEST(ExtentAllocatorTest, UniformSizeChurnNeverFragments) {
  // Object size 3 units (not a power of two), 64 slots plus a tail too small for one more.
  constexpr uint64_t kObject = 3 * kUnit;
  constexpr uint64_t kSlots = 64;
  ExtentAllocator alloc(kSlots * kObject + 2 * kUnit);
  std::mt19937_64 rng(20240611);
  std::vector<Extent> live;
  int times_full = 0;
  for (int step = 0; step < 20000; ++step) {
    // Biased towards allocating so the arena is driven to full over and over.
    if (live.size() == kSlots) ++times_full;
    const bool do_free = !live.empty() && (live.size() == kSlots || rng() % 3 == 0);
    if (do_free) {
      const size_t i = rng() % live.size();
      ASSERT_TRUE(alloc.Free(live[i]).ok());
      live[i] = live.back();
      live.pop_back();
    } else {
      // used < capacity in whole objects: an allocation must always succeed.
      std::optional<Extent> e = alloc.Allocate(kObject);
      ASSERT_TRUE(e.has_value()) << "step " << step << " with " << live.size() << " live";
      EXPECT_EQ(e->offset % kObject, 0u);  // holes stay on object boundaries
      live.push_back(*e);
    }
    if (step % 1000 == 0) ExpectInvariants(alloc);
  }
  EXPECT_GT(times_full, 100);
  while (live.size() < kSlots) live.push_back(MustAllocate(alloc, kObject));
  EXPECT_FALSE(alloc.Allocate(kObject).has_value());  // only the 2-unit tail is left
  EXPECT_EQ(alloc.stats().free, 2 * kUnit);
  for (const Extent& e : live) ASSERT_TRUE(alloc.Free(e).ok());
  const AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.free_extents, 1u);
  EXPECT_EQ(s.largest_free, alloc.capacity());
  EXPECT_EQ(s.failed_allocations, 1u);
  ExpectInvariants(alloc);
}

TEST(ExtentAllocatorTest, RandomMixedSizesKeepInvariants) {
  ExtentAllocator alloc(1024 * kUnit);
  std::mt19937_64 rng(7);
  std::map<uint64_t, uint64_t> model;  // offset -> length, as handed out
  uint64_t failures = 0;
  for (int step = 0; step < 20000; ++step) {
    if (!model.empty() && rng() % 100 < 45) {
      auto it = model.begin();
      std::advance(it, static_cast<long>(rng() % model.size()));
      ASSERT_TRUE(alloc.Free({it->first, it->second}).ok());
      model.erase(it);
    } else {
      const uint64_t size = 1 + rng() % (24 * kUnit);  // unaligned sizes up to 24 units
      std::optional<Extent> e = alloc.Allocate(size);
      if (!e) {
        ++failures;
        EXPECT_LT(alloc.stats().largest_free, alloc.RoundUp(size));
        continue;
      }
      EXPECT_EQ(e->length, alloc.RoundUp(size));
      EXPECT_EQ(e->offset % kUnit, 0u);
      ASSERT_LE(e->offset + e->length, alloc.capacity());
      // No overlap with anything already handed out.
      auto next = model.lower_bound(e->offset);
      if (next != model.end()) {
        ASSERT_LE(e->offset + e->length, next->first);
      }
      if (next != model.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, e->offset);
      }
      model.emplace(e->offset, e->length);
    }
    if (step % 250 == 0) {
      ASSERT_TRUE(alloc.CheckInvariants().ok()) << alloc.CheckInvariants().ToString();
      uint64_t used = 0;
      for (const auto& [offset, length] : model) used += length;
      ASSERT_EQ(alloc.stats().used, used);
      ASSERT_EQ(alloc.stats().live_extents, model.size());
    }
  }
  EXPECT_GT(failures, 0u);  // the test did reach exhaustion
  EXPECT_EQ(alloc.stats().failed_allocations, failures);
  for (const auto& [offset, length] : model) ASSERT_TRUE(alloc.Free({offset, length}).ok());
  EXPECT_EQ(alloc.stats().free_extents, 1u);
  EXPECT_EQ(alloc.stats().largest_free, alloc.capacity());
  ExpectInvariants(alloc);
}

TEST(ExtentAllocatorTest, ConcurrentAllocateAndFreeKeepInvariants) {
  constexpr int kThreads = 4;
  constexpr int kSteps = 3000;
  ExtentAllocator alloc(256 * kUnit);
  std::promise<void> start;
  std::shared_future<void> go = start.get_future().share();
  std::vector<std::thread> threads;
  std::vector<uint64_t> successes(kThreads, 0);    // each thread writes only its own slot
  std::vector<uint64_t> free_errors(kThreads, 0);  // each thread writes only its own slot
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&alloc, go, t, &successes, &free_errors] {
      std::mt19937_64 rng(1000 + t);
      std::vector<Extent> mine;
      go.wait();
      for (int step = 0; step < kSteps; ++step) {
        const uint64_t r = rng() % 10;
        if (!mine.empty() && (r < 4 || mine.size() > 16)) {
          const size_t i = rng() % mine.size();
          if (!alloc.Free(mine[i]).ok()) ++free_errors[t];
          mine[i] = mine.back();
          mine.pop_back();
        } else if (r < 8) {
          std::optional<Extent> e = alloc.Allocate((1 + rng() % 4) * kUnit - rng() % 100);
          if (e) {
            mine.push_back(*e);
            ++successes[t];
          }
        } else {
          auto batch = alloc.AllocateBatch({kUnit, 2 * kUnit, 3 * kUnit});
          if (batch.ok()) {
            mine.insert(mine.end(), batch->begin(), batch->end());
            successes[t] += batch->size();
          }
        }
      }
      for (const Extent& e : mine) {
        if (!alloc.Free(e).ok()) ++free_errors[t];
      }
    });
  }
  start.set_value();
  for (std::thread& th : threads) th.join();

  ExpectInvariants(alloc);
  const AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.used, 0u);
  EXPECT_EQ(s.live_extents, 0u);
  EXPECT_EQ(s.free_extents, 1u);
  uint64_t total = 0;
  for (const uint64_t n : successes) total += n;
  for (const uint64_t n : free_errors) EXPECT_EQ(n, 0u);
  EXPECT_EQ(s.allocations, total);
  EXPECT_EQ(s.frees, total);
}

}  // namespace
}  // namespace lmcache_cpp
