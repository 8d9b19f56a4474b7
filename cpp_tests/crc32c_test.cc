// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "crc32c.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace lmcache_cpp {
namespace internal {
namespace {

// `n` bytes drawn from `rng`.
std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> data(n);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  return data;
}

// Whether `extend` (a Crc32cExtend* path) agrees with the software path on
// data[offset, offset + len) extended from `seed`.
template <typename Extend>
::testing::AssertionResult AgreesWithSoftware(Extend extend, uint32_t seed,
                                              const std::vector<uint8_t>& data, size_t offset,
                                              size_t len) {
  const uint32_t got = extend(seed, data.data() + offset, len);
  const uint32_t want = Crc32cExtendSoftware(seed, data.data() + offset, len);
  if (got == want) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "offset " << offset << " len " << len << " seed " << seed
                                       << ": " << got << " != " << want;
}

TEST(Crc32cTest, KnownAnswerOfCheckString) {
  const char* s = "123456789";
  EXPECT_EQ(Crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32cExtendSoftware(0, s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32cExtendHardware(0, s, 9), 0xE3069283u);
}

TEST(Crc32cTest, KnownAnswersFromRfc3720) {
  // iSCSI (RFC 3720, B.4) test vectors.
  std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xFF), inc(32), dec(32);
  for (int i = 0; i < 32; ++i) {
    inc[i] = static_cast<uint8_t>(i);
    dec[i] = static_cast<uint8_t>(31 - i);
  }
  EXPECT_EQ(Crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(ones.data(), ones.size()), 0x62A8AB43u);
  EXPECT_EQ(Crc32c(inc.data(), inc.size()), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(dec.data(), dec.size()), 0x113FDB5Cu);
}

TEST(Crc32cTest, EmptyInputLeavesCrcUnchanged) {
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
  EXPECT_EQ(Crc32cExtend(0x12345678u, nullptr, 0), 0x12345678u);
}

TEST(Crc32cTest, ExtendEqualsOneShotOverConcatenation) {
  std::mt19937_64 rng(7);
  const std::vector<uint8_t> data = RandomBytes(rng, 200000);
  const uint32_t whole = Crc32c(data.data(), data.size());
  for (int trial = 0; trial < 50; ++trial) {
    size_t cut = rng() % (data.size() + 1);
    uint32_t first = Crc32c(data.data(), cut);
    EXPECT_EQ(Crc32cExtend(first, data.data() + cut, data.size() - cut), whole) << "cut " << cut;
  }
}

TEST(Crc32cTest, HardwareMatchesSoftwareOnRandomLengthsAndAlignments) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937_64 rng(12345);
  // Large enough to cross both interleaved block sizes (3 x 8 KiB and 3 x 256 bytes).
  const std::vector<uint8_t> data = RandomBytes(rng, 3 * 8192 * 4 + 4096);
  for (int trial = 0; trial < 400; ++trial) {
    size_t offset = rng() % 64;
    size_t max_len = data.size() - offset;
    // Mix of short, medium and long lengths.
    size_t len = 0;
    switch (trial % 3) {
      case 0: len = rng() % 64; break;
      case 1: len = rng() % 4096; break;
      default: len = rng() % (max_len + 1); break;
    }
    uint32_t seed = (trial % 2) ? static_cast<uint32_t>(rng()) : 0u;
    ASSERT_TRUE(AgreesWithSoftware(Crc32cExtendHardware, seed, data, offset, len));
  }
}

TEST(Crc32cTest, HardwareMatchesSoftwareAtInterleaveBoundaries) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937_64 rng(99);
  const std::vector<uint8_t> data = RandomBytes(rng, 3 * 8192 * 2 + 3 * 256 + 64);
  for (size_t len : {size_t{767}, size_t{768}, size_t{769}, size_t{24575}, size_t{24576},
                     size_t{24577}, size_t{24576 + 768}, size_t{49152}, data.size()}) {
    EXPECT_TRUE(AgreesWithSoftware(Crc32cExtendHardware, 0, data, 0, len));
  }
}

TEST(Crc32cTest, Sse42PathMatchesSoftware) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937_64 rng(4242);
  const std::vector<uint8_t> data = RandomBytes(rng, 200000);
  for (int trial = 0; trial < 200; ++trial) {
    size_t offset = rng() % 16;
    size_t len = rng() % (data.size() - offset + 1);
    uint32_t seed = static_cast<uint32_t>(rng());
    ASSERT_TRUE(AgreesWithSoftware(Crc32cExtendSse42, seed, data, offset, len));
  }
}

TEST(Crc32cTest, FoldingPathMatchesSoftwareAroundItsStrides) {
  if (!Crc32cFoldAvailable()) GTEST_SKIP() << "no AVX-512 VPCLMULQDQ on this CPU";
  std::mt19937_64 rng(31337);
  const std::vector<uint8_t> data = RandomBytes(rng, 3 * 65536 + 512);
  // The folding path takes inputs >= 4 KiB in 256-byte strides; the rest goes to SSE4.2.
  std::vector<size_t> lengths;
  for (size_t base : {size_t{4096}, size_t{8192}, size_t{65536}, size_t{3 * 65536}}) {
    for (size_t d : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{255}, size_t{256},
                     size_t{257}, size_t{511}}) {
      lengths.push_back(base + d);
    }
    lengths.push_back(base - 1);
  }
  for (size_t len : lengths) {
    for (size_t offset : {size_t{0}, size_t{1}, size_t{3}, size_t{63}}) {
      if (offset + len > data.size()) continue;
      for (uint32_t seed : {0u, 0xFFFFFFFFu, 0x12345678u}) {
        ASSERT_TRUE(AgreesWithSoftware(Crc32cExtendHardware, seed, data, offset, len));
      }
    }
  }
}

TEST(Crc32cTest, CombineEqualsChecksumOfConcatenation) {
  std::mt19937_64 rng(2024);
  const std::vector<uint8_t> data = RandomBytes(rng, 300000);
  const uint32_t whole = Crc32c(data.data(), data.size());
  std::vector<size_t> cuts = {0, 1, 2, 3, 4, 7, 8, 255, 4096, data.size() - 1, data.size()};
  for (int trial = 0; trial < 100; ++trial) cuts.push_back(rng() % (data.size() + 1));
  for (size_t cut : cuts) {
    const uint32_t a = Crc32c(data.data(), cut);
    const uint32_t b = Crc32c(data.data() + cut, data.size() - cut);
    EXPECT_EQ(Crc32cCombine(a, b, data.size() - cut), whole) << "cut " << cut;
  }
  // Short pieces of every length up to 64 bytes, after prefixes of every length up to 16.
  for (size_t la = 0; la <= 16; ++la) {
    for (size_t lb = 0; lb <= 64; ++lb) {
      const uint32_t a = Crc32c(data.data(), la);
      const uint32_t b = Crc32c(data.data() + la, lb);
      ASSERT_EQ(Crc32cCombine(a, b, lb), Crc32c(data.data(), la + lb)) << la << " + " << lb;
    }
  }
}

TEST(Crc32cTest, CombineWithEmptyPiecesIsTheIdentity) {
  const char* s = "123456789";
  const uint32_t crc = Crc32c(s, 9);
  EXPECT_EQ(Crc32cCombine(crc, Crc32c(nullptr, 0), 0), crc);  // b empty
  EXPECT_EQ(Crc32cCombine(Crc32c(nullptr, 0), crc, 9), crc);  // a empty
  EXPECT_EQ(Crc32cCombine(0, 0, 0), 0u);
}

TEST(Crc32cTest, CombineOfManyPiecesInOrderEqualsWhole) {
  std::mt19937_64 rng(77);
  const std::vector<uint8_t> data = RandomBytes(rng, 1 << 20);
  uint32_t combined = 0;
  size_t pos = 0;
  while (pos < data.size()) {
    const size_t n = std::min<size_t>(data.size() - pos, rng() % 70000);
    combined = Crc32cCombine(combined, Crc32c(data.data() + pos, n), n);
    pos += n;
  }
  EXPECT_EQ(combined, Crc32c(data.data(), data.size()));
}

// Lengths whose bit count (8 * len) reaches 2^32 and passes 2^35: b is a 1 MiB random block
// repeated (then 3 more bytes), checksummed by extension, so the expected values come from the
// bytes themselves.
TEST(Crc32cTest, CombineHandlesLengthsBeyondFourGigabytes) {
  std::mt19937_64 rng(5);
  std::vector<uint8_t> block(1 << 20);
  for (auto& b : block) b = static_cast<uint8_t>(rng());
  std::vector<uint8_t> prefix(100);
  for (auto& b : prefix) b = static_cast<uint8_t>(rng());
  const uint32_t crc_a = Crc32c(prefix.data(), prefix.size());
  uint32_t crc_b = 0;
  uint32_t crc_ab = crc_a;
  for (uint64_t blocks = 1; blocks <= 4096; ++blocks) {
    crc_b = Crc32cExtend(crc_b, block.data(), block.size());
    crc_ab = Crc32cExtend(crc_ab, block.data(), block.size());
    if (blocks == 512) {  // 512 MiB: 8 * len == 2^32
      ASSERT_EQ(Crc32cCombine(crc_a, crc_b, uint64_t{512} << 20), crc_ab);
    }
  }
  crc_b = Crc32cExtend(crc_b, block.data(), 3);
  crc_ab = Crc32cExtend(crc_ab, block.data(), 3);
  EXPECT_EQ(Crc32cCombine(crc_a, crc_b, (uint64_t{1} << 32) + 3), crc_ab);
}

TEST(Crc32cTest, CombineIsAssociativeForHugeLengths) {
  // (a || b) || c == a || (b || c) for lengths no buffer could hold.
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const auto a = static_cast<uint32_t>(rng());
    const auto b = static_cast<uint32_t>(rng());
    const auto c = static_cast<uint32_t>(rng());
    const uint64_t lb = rng() >> (rng() % 64);
    const uint64_t lc = rng() >> (rng() % 64);
    if (lb + lc < lb) continue;  // the sum must fit in 64 bits
    EXPECT_EQ(Crc32cCombine(Crc32cCombine(a, b, lb), c, lc),
              Crc32cCombine(a, Crc32cCombine(b, c, lc), lb + lc))
        << lb << " " << lc;
  }
}

// Crc32cCopy copies exactly and returns Crc32cExtend of the source, in one pass (the folding path,
// 4 KiB and more) or not, with regular or streaming stores, for any alignment of either side.
TEST(Crc32cTest, CopyCopiesAndChecksumsTheSource) {
  std::mt19937_64 rng(8);
  std::vector<uint8_t> src(70000 + 128);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  std::vector<size_t> lengths = {0,          1,          63,        255,       4095,
                                 4096,       4097,       4096 + 63, 4096 + 64, 4096 + 255,
                                 4096 + 256, 4096 + 257, 32768,     70000};
  for (int i = 0; i < 20; ++i) lengths.push_back(rng() % 70001);
  for (size_t len : lengths) {
    for (size_t src_offset : {size_t{0}, size_t{5}}) {
      for (size_t dst_offset : {size_t{0}, size_t{1}, size_t{17}, size_t{63}}) {
        for (bool streaming : {false, true}) {
          const uint32_t seed = static_cast<uint32_t>(rng());
          std::vector<uint8_t> dst(len + 128, 0x5A);
          const uint32_t crc =
              Crc32cCopy(seed, dst.data() + dst_offset, src.data() + src_offset, len, streaming);
          ASSERT_EQ(crc, Crc32cExtendSoftware(seed, src.data() + src_offset, len))
              << "len " << len << " src+" << src_offset << " dst+" << dst_offset;
          ASSERT_TRUE(std::equal(src.begin() + src_offset, src.begin() + src_offset + len,
                                 dst.begin() + dst_offset))
              << "len " << len << " src+" << src_offset << " dst+" << dst_offset;
          // Nothing written around the destination.
          ASSERT_TRUE(std::all_of(dst.begin(), dst.begin() + dst_offset,
                                  [](uint8_t b) { return b == 0x5A; }));
          ASSERT_TRUE(std::all_of(dst.begin() + dst_offset + len, dst.end(),
                                  [](uint8_t b) { return b == 0x5A; }));
        }
      }
    }
  }
}

TEST(Crc32cTest, SingleBitFlipChangesChecksum) {
  std::vector<uint8_t> data(65536, 0xA5);
  uint32_t before = Crc32c(data.data(), data.size());
  for (size_t pos : {size_t{0}, size_t{1000}, data.size() - 1}) {
    data[pos] ^= 0x10;
    EXPECT_NE(Crc32c(data.data(), data.size()), before) << "pos " << pos;
    data[pos] ^= 0x10;
  }
  EXPECT_EQ(Crc32c(data.data(), data.size()), before);
}

}  // namespace
}  // namespace internal
}  // namespace lmcache_cpp
