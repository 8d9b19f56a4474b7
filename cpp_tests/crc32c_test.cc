// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "crc32c.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace lmcache_cpp {
namespace internal {
namespace {

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
  std::vector<uint8_t> data(200000);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
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
  std::vector<uint8_t> data(3 * 8192 * 4 + 4096);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
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
    ASSERT_EQ(Crc32cExtendHardware(seed, data.data() + offset, len),
              Crc32cExtendSoftware(seed, data.data() + offset, len))
        << "offset " << offset << " len " << len;
  }
}

TEST(Crc32cTest, HardwareMatchesSoftwareAtInterleaveBoundaries) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937_64 rng(99);
  std::vector<uint8_t> data(3 * 8192 * 2 + 3 * 256 + 64);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (size_t len : {size_t{767}, size_t{768}, size_t{769}, size_t{24575}, size_t{24576},
                     size_t{24577}, size_t{24576 + 768}, size_t{49152}, data.size()}) {
    EXPECT_EQ(Crc32cExtendHardware(0, data.data(), len), Crc32cExtendSoftware(0, data.data(), len))
        << "len " << len;
  }
}

TEST(Crc32cTest, Sse42PathMatchesSoftware) {
  if (!Crc32cHardwareAvailable()) GTEST_SKIP() << "no SSE4.2 on this CPU";
  std::mt19937_64 rng(4242);
  std::vector<uint8_t> data(200000);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (int trial = 0; trial < 200; ++trial) {
    size_t offset = rng() % 16;
    size_t len = rng() % (data.size() - offset + 1);
    uint32_t seed = static_cast<uint32_t>(rng());
    ASSERT_EQ(Crc32cExtendSse42(seed, data.data() + offset, len),
              Crc32cExtendSoftware(seed, data.data() + offset, len))
        << "offset " << offset << " len " << len;
  }
}

TEST(Crc32cTest, FoldingPathMatchesSoftwareAroundItsStrides) {
  if (!Crc32cFoldAvailable()) GTEST_SKIP() << "no AVX-512 VPCLMULQDQ on this CPU";
  std::mt19937_64 rng(31337);
  std::vector<uint8_t> data(3 * 65536 + 512);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
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
        ASSERT_EQ(Crc32cExtendHardware(seed, data.data() + offset, len),
                  Crc32cExtendSoftware(seed, data.data() + offset, len))
            << "offset " << offset << " len " << len << " seed " << seed;
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
