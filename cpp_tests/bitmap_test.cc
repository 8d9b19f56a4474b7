// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/bitmap.h"

#include <gtest/gtest.h>

#include <vector>

namespace lmcache_cpp {
namespace {

// A bitmap of `size` bits whose bit i is pred(i).
template <typename Pred>
Bitmap Pattern(size_t size, Pred pred) {
  Bitmap b(size);
  for (size_t i = 0; i < size; ++i) b.Assign(i, pred(i));
  return b;
}

TEST(BitmapTest, ConstructedBitsAllHaveTheGivenValue) {
  Bitmap zeros(100);
  Bitmap ones(100, true);
  EXPECT_EQ(zeros.size(), 100u);
  EXPECT_FALSE(zeros.empty());
  EXPECT_EQ(zeros.Popcount(), 0u);
  EXPECT_EQ(ones.Popcount(), 100u);
  for (size_t i = 0; i < 100; ++i) {
    EXPECT_FALSE(zeros.Test(i));
    EXPECT_TRUE(ones.Test(i));
  }
  EXPECT_TRUE(Bitmap().empty());
  EXPECT_TRUE(Bitmap().All());
  EXPECT_EQ(Bitmap().LeadingOnes(), 0u);
}

TEST(BitmapTest, SetResetAndAssignChangeOneBit) {
  Bitmap b(70);
  b.Set(69);
  b.Set(3);
  b.Assign(40, true);
  EXPECT_EQ(b.ToString().find('1'), 3u);
  EXPECT_TRUE(b.Test(40));
  b.Reset(3);
  b.Assign(40, false);
  EXPECT_FALSE(b.Test(3));
  EXPECT_FALSE(b.Test(40));
  EXPECT_TRUE(b.Test(69));
  EXPECT_EQ(b.Popcount(), 1u);
}

TEST(BitmapTest, LeadingOnesIsExactAtWordBoundaries) {
  for (size_t size : {63u, 64u, 65u, 128u}) {
    SCOPED_TRACE(size);
    Bitmap full(size, true);
    EXPECT_EQ(full.LeadingOnes(), size);
    EXPECT_EQ(full.FindFirstZero(), size);
    EXPECT_TRUE(full.All());
    for (size_t hole : {0u, 1u, 62u, 63u, 64u, 65u, 127u}) {
      if (hole >= size) continue;
      SCOPED_TRACE(hole);
      Bitmap b = full;
      b.Reset(hole);
      EXPECT_EQ(b.LeadingOnes(), hole);
      EXPECT_FALSE(b.All());
      // A second hole further on does not matter.
      if (hole + 1 < size) {
        b.Reset(size - 1);
        EXPECT_EQ(b.LeadingOnes(), hole);
      }
    }
  }
}

TEST(BitmapTest, PopcountCountsSetBitsAcrossWords) {
  EXPECT_EQ(Pattern(200, [](size_t i) { return i % 3 == 0; }).Popcount(), 67u);
  EXPECT_EQ(Bitmap(129, true).Popcount(), 129u);
  EXPECT_EQ(Bitmap(64, true).Popcount(), 64u);
}

TEST(BitmapTest, AndOrCombineDifferentPatterns) {
  const size_t n = 130;
  Bitmap even = Pattern(n, [](size_t i) { return i % 2 == 0; });
  Bitmap third = Pattern(n, [](size_t i) { return i % 3 == 0; });
  Bitmap both = even & third;
  Bitmap either = even | third;
  ASSERT_EQ(both.size(), n);
  ASSERT_EQ(either.size(), n);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(both.Test(i), i % 6 == 0) << i;
    EXPECT_EQ(either.Test(i), i % 2 == 0 || i % 3 == 0) << i;
  }
  // The compound forms modify in place.
  Bitmap x = even;
  x &= third;
  EXPECT_EQ(x, both);
  x = even;
  x |= third;
  EXPECT_EQ(x, either);
}

TEST(BitmapTest, MismatchedSizesGiveTheSmallerSize) {
  Bitmap small(10, true);
  Bitmap big(100, true);
  Bitmap a = small & big;
  Bitmap o = small | big;
  Bitmap o2 = big | small;
  EXPECT_EQ(a.size(), 10u);
  EXPECT_EQ(a.Popcount(), 10u);
  EXPECT_EQ(o.size(), 10u);
  EXPECT_EQ(o.Popcount(), 10u);  // bits of `big` past 10 were not carried over
  EXPECT_EQ(o2.size(), 10u);
  EXPECT_EQ(o2.Popcount(), 10u);
  EXPECT_EQ(o, Bitmap(10, true));
}

TEST(BitmapTest, TruncateToClearsEveryBitFromN) {
  for (size_t n : {0u, 1u, 63u, 64u, 65u, 129u, 130u}) {
    SCOPED_TRACE(n);
    Bitmap b(130, true);
    b.TruncateTo(n);
    EXPECT_EQ(b.size(), 130u);
    EXPECT_EQ(b.Popcount(), n);
    EXPECT_EQ(b.LeadingOnes(), n);
    EXPECT_EQ(b.FindNextSet(n), 130u);
  }
}

TEST(BitmapTest, ResizeKeepsExistingBitsAndFillsNewOnes) {
  Bitmap b = Pattern(70, [](size_t i) { return i % 5 == 0; });
  Bitmap grown = b;
  grown.Resize(200, true);
  ASSERT_EQ(grown.size(), 200u);
  for (size_t i = 0; i < 200; ++i) EXPECT_EQ(grown.Test(i), i >= 70 || i % 5 == 0) << i;

  Bitmap zero_grown = b;
  zero_grown.Resize(200);
  for (size_t i = 0; i < 200; ++i) EXPECT_EQ(zero_grown.Test(i), i < 70 && i % 5 == 0) << i;

  // Shrinking drops the bits past the new size: growing again brings back zeros, not old bits.
  Bitmap ones(130, true);
  ones.Resize(65);
  EXPECT_EQ(ones.Popcount(), 65u);
  EXPECT_TRUE(ones.All());
  ones.Resize(130);
  EXPECT_EQ(ones.Popcount(), 65u);
  EXPECT_EQ(ones.LeadingOnes(), 65u);
}

TEST(BitmapTest, ComplementFlipsBitsAndKeepsTheTailClear) {
  for (size_t size : {1u, 63u, 64u, 65u, 130u}) {
    SCOPED_TRACE(size);
    Bitmap zero(size);
    Bitmap flipped = ~zero;
    EXPECT_EQ(flipped.Popcount(), size);
    EXPECT_TRUE(flipped.All());
    EXPECT_EQ(flipped, Bitmap(size, true));
    EXPECT_EQ(~flipped, zero);
    // Growing after a complement brings in zeros, so no stray tail bits existed.
    flipped.Resize(size + 70);
    EXPECT_EQ(flipped.Popcount(), size);
  }
  Bitmap odd = Pattern(100, [](size_t i) { return i % 2 == 1; });
  EXPECT_EQ(~odd, Pattern(100, [](size_t i) { return i % 2 == 0; }));
}

TEST(BitmapTest, FindNextSetSkipsToTheNextSetBit) {
  Bitmap b(130);
  b.Set(3);
  b.Set(64);
  b.Set(129);
  EXPECT_EQ(b.FindNextSet(0), 3u);
  EXPECT_EQ(b.FindNextSet(3), 3u);
  EXPECT_EQ(b.FindNextSet(4), 64u);
  EXPECT_EQ(b.FindNextSet(64), 64u);
  EXPECT_EQ(b.FindNextSet(65), 129u);
  EXPECT_EQ(b.FindNextSet(129), 129u);
  EXPECT_EQ(b.FindNextSet(130), 130u);
  EXPECT_EQ(b.FindNextSet(1000), 130u);
  EXPECT_EQ(Bitmap(200).FindNextSet(0), 200u);
  EXPECT_EQ(Bitmap().FindNextSet(0), 0u);
}

TEST(BitmapTest, SetAllResetAllAnyNone) {
  Bitmap b(77);
  EXPECT_TRUE(b.None());
  EXPECT_FALSE(b.Any());
  b.SetAll();
  EXPECT_TRUE(b.All());
  EXPECT_EQ(b.Popcount(), 77u);
  b.ResetAll();
  EXPECT_TRUE(b.None());
  b.Set(76);
  EXPECT_TRUE(b.Any());
  EXPECT_FALSE(b.All());
}

TEST(BitmapTest, EqualityNeedsEqualSizeAndBits) {
  EXPECT_EQ(Bitmap(10), Bitmap(10));
  EXPECT_NE(Bitmap(10), Bitmap(11));
  Bitmap a(10);
  a.Set(9);
  EXPECT_NE(a, Bitmap(10));
}

TEST(BitmapTest, ToStringListsBitZeroFirst) {
  Bitmap b(6);
  b.Set(0);
  b.Set(1);
  b.Set(3);
  EXPECT_EQ(b.ToString(), "110100");
  EXPECT_EQ(Bitmap().ToString(), "");
}

}  // namespace
}  // namespace lmcache_cpp
