// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/kv_copy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "kv_copy_plan.h"

namespace lmcache_cpp {
namespace {

constexpr uint32_t kLayers = 3;
constexpr uint32_t kBlockSize = 4;
constexpr uint32_t kHeads = 3;
constexpr uint32_t kHeadSize = 5;
constexpr uint8_t kPoison = 0xA5;

const KvLayout kAllLayouts[] = {KvLayout::kNHD, KvLayout::kHND, KvLayout::kFlashInfer,
                                KvLayout::kMLA};
const uint32_t kElementSizes[] = {1, 2, 4};

uint64_t RandomSeed() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

// Fresh random data every run: a generator with a random seed, which is printed with any failure
// while the generator lives. Declare it in the test body.
class TracedRng : public std::mt19937_64 {
 public:
  TracedRng() : TracedRng(RandomSeed()) {}

 private:
  explicit TracedRng(uint64_t seed)
      : std::mt19937_64(seed), trace_(__FILE__, __LINE__, "seed " + std::to_string(seed)) {}
  ::testing::ScopedTrace trace_;
};

void FillRandom(std::vector<uint8_t>* bytes, std::mt19937_64* rng) {
  for (uint8_t& b : *bytes) b = static_cast<uint8_t>((*rng)());
}

// An engine KV cache in test-owned memory: one buffer per layer, of exactly the extent the layout
// describes (so ASan catches any access outside it).
struct Cache {
  KvCacheLayout layout;
  std::vector<std::vector<uint8_t>> layers;

  KvCacheView View() {
    KvCacheView view;
    view.layout = layout;
    for (auto& l : layers) view.layers.push_back(l.data());
    return view;
  }
};

KvCacheLayout MakeLayout(KvLayout kind, uint32_t element_size, uint64_t num_blocks,
                         uint64_t block_stride = 0, uint64_t plane_stride = 0) {
  KvCacheLayout lay;
  lay.layout = kind;
  lay.num_layers = kLayers;
  lay.block_size = kBlockSize;
  lay.num_heads = kind == KvLayout::kMLA ? 1 : kHeads;
  lay.head_size = kHeadSize;
  lay.element_size = element_size;
  lay.num_blocks = num_blocks;
  lay.block_stride = block_stride;
  lay.plane_stride = plane_stride;
  return lay;
}

// Layer extent computed from the tensor definition, independently of the library.
uint64_t ExtentOf(const KvCacheLayout& lay, uint64_t block_stride, uint64_t plane_stride) {
  const uint64_t pbb = uint64_t{lay.block_size} * lay.num_heads * lay.head_size * lay.element_size;
  const uint64_t planes = lay.layout == KvLayout::kMLA ? 1 : 2;
  return (planes - 1) * plane_stride + (lay.num_blocks - 1) * block_stride + pbb;
}

struct Strides {
  uint64_t block = 0;
  uint64_t plane = 0;
};

// The strides the tensor definitions give for the dense case.
Strides DenseStrides(const KvCacheLayout& lay) {
  const uint64_t pbb = uint64_t{lay.block_size} * lay.num_heads * lay.head_size * lay.element_size;
  switch (lay.layout) {
    case KvLayout::kFlashInfer: return {2 * pbb, pbb};
    case KvLayout::kMLA: return {pbb, 0};
    default: return {pbb, lay.num_blocks * pbb};
  }
}

Strides EffectiveStrides(const KvCacheLayout& lay) {
  Strides s = DenseStrides(lay);
  if (lay.block_stride != 0) s.block = lay.block_stride;
  if (lay.plane_stride != 0) {
    s.plane = lay.plane_stride;
  } else if (lay.layout == KvLayout::kNHD || lay.layout == KvLayout::kHND) {
    s.plane = lay.num_blocks * s.block;
  }
  return s;
}

Cache MakeCache(const KvCacheLayout& lay, std::mt19937_64* rng, bool random_fill) {
  Cache c;
  c.layout = lay;
  const Strides s = EffectiveStrides(lay);
  for (uint32_t l = 0; l < lay.num_layers; ++l) {
    c.layers.emplace_back(ExtentOf(lay, s.block, s.plane), kPoison);
    if (random_fill) FillRandom(&c.layers.back(), rng);
  }
  return c;
}

// ---- naive reference: element by element, from the tensor index formulas -------------------

// Element index of (token t, head h, dim d) inside one block plane, in the tensor's own order.
uint64_t InnerElement(const KvCacheLayout& lay, uint64_t t, uint64_t h, uint64_t d) {
  switch (lay.layout) {
    case KvLayout::kHND: return (h * lay.block_size + t) * lay.head_size + d;  // [H, BS, D]
    case KvLayout::kMLA: return t * lay.head_size + d;                         // [BS, D]
    default: return (t * lay.num_heads + h) * lay.head_size + d;               // [BS, H, D]
  }
}

// Byte offset in a layer tensor of element (plane, block, t, h, d).
uint64_t EngineOffset(const KvCacheLayout& lay, uint64_t p, uint64_t b, uint64_t t, uint64_t h,
                      uint64_t d) {
  const Strides s = EffectiveStrides(lay);
  return p * s.plane + b * s.block + InnerElement(lay, t, h, d) * lay.element_size;
}

// Byte offset in an object of element (layer, plane, chunk block i, t, h, d).
uint64_t ObjectOffset(const KvCacheLayout& lay, uint64_t chunk_size, uint64_t l, uint64_t p,
                      uint64_t i, uint64_t t, uint64_t h, uint64_t d) {
  const uint64_t planes = lay.layout == KvLayout::kMLA ? 1 : 2;
  const uint64_t pbb = uint64_t{lay.block_size} * lay.num_heads * lay.head_size * lay.element_size;
  const uint64_t chunk_blocks = chunk_size / lay.block_size;
  return ((l * planes + p) * chunk_blocks + i) * pbb +
         InnerElement(lay, t, h, d) * lay.element_size;
}

// Calls fn(l, p, i, t, h, d, byte) for every byte of the first blocks.size() chunk blocks.
template <typename Fn>
void ForEachByte(const KvCacheLayout& lay, size_t num_chunk_blocks, Fn fn) {
  const uint64_t planes = lay.layout == KvLayout::kMLA ? 1 : 2;
  for (uint64_t l = 0; l < lay.num_layers; ++l)
    for (uint64_t p = 0; p < planes; ++p)
      for (uint64_t i = 0; i < num_chunk_blocks; ++i)
        for (uint64_t t = 0; t < lay.block_size; ++t)
          for (uint64_t h = 0; h < lay.num_heads; ++h)
            for (uint64_t d = 0; d < lay.head_size; ++d)
              for (uint64_t e = 0; e < lay.element_size; ++e) fn(l, p, i, t, h, d, e);
}

void ReferenceGather(const Cache& cache, uint64_t chunk_size, const std::vector<int64_t>& ids,
                     std::vector<uint8_t>* object) {
  const KvCacheLayout& lay = cache.layout;
  ForEachByte(lay, ids.size(), [&](auto l, auto p, auto i, auto t, auto h, auto d, auto e) {
    (*object)[ObjectOffset(lay, chunk_size, l, p, i, t, h, d) + e] =
        cache.layers[l][EngineOffset(lay, p, static_cast<uint64_t>(ids[i]), t, h, d) + e];
  });
}

void ReferenceScatter(const std::vector<uint8_t>& object, uint64_t chunk_size,
                      const std::vector<int64_t>& ids, uint64_t skip_tokens, Cache* cache) {
  const KvCacheLayout& lay = cache->layout;
  ForEachByte(lay, ids.size(), [&](auto l, auto p, auto i, auto t, auto h, auto d, auto e) {
    if (i * lay.block_size + t < skip_tokens) return;
    cache->layers[l][EngineOffset(lay, p, static_cast<uint64_t>(ids[i]), t, h, d) + e] =
        object[ObjectOffset(lay, chunk_size, l, p, i, t, h, d) + e];
  });
}

std::vector<int64_t> RandomDistinctIds(uint64_t num_blocks, size_t n, std::mt19937_64* rng) {
  std::vector<int64_t> all(num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), *rng);
  all.resize(n);
  return all;
}

std::string Describe(const KvCacheLayout& lay) {
  return lay.Fingerprint() + " NB=" + std::to_string(lay.num_blocks) +
         " block_stride=" + std::to_string(lay.block_stride) +
         " plane_stride=" + std::to_string(lay.plane_stride);
}

// Stride variants of one layout: dense, a padded block dimension, and (two planes) a non-default
// plane placement, e.g. a [NB, 2, ...] allocation seen through an NHD-shaped view.
std::vector<KvCacheLayout> StrideVariants(KvLayout kind, uint32_t element_size, uint64_t nb) {
  const KvCacheLayout dense = MakeLayout(kind, element_size, nb);
  const uint64_t pbb = dense.BlockPlaneBytes();
  std::vector<KvCacheLayout> out = {dense};
  switch (kind) {
    case KvLayout::kNHD:
    case KvLayout::kHND:
      out.push_back(MakeLayout(kind, element_size, nb, pbb + 3 * element_size));
      out.push_back(MakeLayout(kind, element_size, nb, 2 * pbb + 8, pbb + 4));
      out.push_back(MakeLayout(kind, element_size, nb, pbb, nb * pbb + 64));
      break;
    case KvLayout::kFlashInfer:
      out.push_back(MakeLayout(kind, element_size, nb, 2 * pbb + 16, pbb + 8));
      out.push_back(MakeLayout(kind, element_size, nb, pbb, nb * pbb));  // planes split apart
      break;
    case KvLayout::kMLA: out.push_back(MakeLayout(kind, element_size, nb, pbb + 32)); break;
  }
  return out;
}

// ---- layout description ---------------------------------------------------------------------

TEST(KvCopyLayoutTest, FingerprintNamesEveryFormatField) {
  KvCacheLayout lay;
  lay.layout = KvLayout::kNHD;
  lay.num_layers = 32;
  lay.block_size = 16;
  lay.num_heads = 8;
  lay.head_size = 128;
  lay.element_size = 2;
  lay.num_blocks = 1000;
  EXPECT_EQ(lay.Fingerprint(), "nhd:L32:BS16:H8:D128:E2");
  lay.block_stride = 1 << 20;  // strides and NB are not part of the format
  lay.num_blocks = 7;
  EXPECT_EQ(lay.Fingerprint(), "nhd:L32:BS16:H8:D128:E2");
  lay.layout = KvLayout::kHND;
  EXPECT_EQ(lay.Fingerprint(), "hnd:L32:BS16:H8:D128:E2");
  lay.layout = KvLayout::kFlashInfer;
  EXPECT_EQ(lay.Fingerprint(), "flashinfer:L32:BS16:H8:D128:E2");
  lay.layout = KvLayout::kMLA;
  lay.num_heads = 1;
  lay.head_size = 576;
  EXPECT_EQ(lay.Fingerprint(), "mla:L32:BS16:H1:D576:E2");
}

TEST(KvCopyLayoutTest, ObjectBytesFollowsTheFormula) {
  KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, 100);
  lay.num_layers = 32;
  lay.block_size = 16;
  lay.num_heads = 8;
  lay.head_size = 128;
  Result<uint64_t> bytes = lay.ObjectBytes(256);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  EXPECT_EQ(*bytes, uint64_t{32} * 2 * 16 * (16 * 8 * 128 * 2));
  lay.layout = KvLayout::kMLA;
  lay.num_heads = 1;
  lay.head_size = 576;
  bytes = lay.ObjectBytes(64);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(*bytes, uint64_t{32} * 4 * 16 * 576 * 2);
  EXPECT_EQ(lay.ObjectBytes(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(lay.ObjectBytes(24).status().code(), StatusCode::kInvalidArgument);
}

TEST(KvCopyLayoutTest, DenseStridesFollowTheTensorShapes) {
  for (KvLayout kind : kAllLayouts) {
    const KvCacheLayout lay = MakeLayout(kind, 2, 10);
    ASSERT_TRUE(lay.Validate().ok()) << lay.Validate().ToString();
    const Strides s = DenseStrides(lay);
    EXPECT_EQ(lay.BlockStride(), s.block) << KvLayoutName(kind);
    EXPECT_EQ(lay.PlaneStride(), s.plane) << KvLayoutName(kind);
  }
}

TEST(KvCopyLayoutTest, InvalidLayoutsAreRejected) {
  auto rejected = [](const KvCacheLayout& lay) {
    const Status st = lay.Validate();
    return st.code() == StatusCode::kInvalidArgument && !st.message().empty();
  };
  for (KvLayout kind : kAllLayouts) {
    const KvCacheLayout good = MakeLayout(kind, 2, 10);
    ASSERT_TRUE(good.Validate().ok());
    for (int field = 0; field < 6; ++field) {
      KvCacheLayout bad = good;
      switch (field) {
        case 0: bad.num_layers = 0; break;
        case 1: bad.block_size = 0; break;
        case 2: bad.num_heads = 0; break;
        case 3: bad.head_size = 0; break;
        case 4: bad.element_size = 0; break;
        case 5: bad.num_blocks = 0; break;
      }
      EXPECT_TRUE(rejected(bad)) << KvLayoutName(kind) << " field " << field;
    }
    KvCacheLayout small_stride = good;
    small_stride.block_stride = good.BlockPlaneBytes() - 1;
    EXPECT_TRUE(rejected(small_stride)) << KvLayoutName(kind);
    KvCacheLayout huge = good;
    huge.num_blocks = uint64_t{1} << 62;
    EXPECT_TRUE(rejected(huge)) << KvLayoutName(kind);
    KvCacheLayout wide = good;
    wide.head_size = 0xFFFFFFFFu;
    wide.element_size = 0xFFFFFFFFu;
    wide.block_size = 0xFFFFFFFFu;
    EXPECT_TRUE(rejected(wide)) << KvLayoutName(kind);
  }
  KvCacheLayout bad_kind = MakeLayout(KvLayout::kNHD, 2, 10);
  bad_kind.layout = static_cast<KvLayout>(9);
  EXPECT_TRUE(rejected(bad_kind));
  KvCacheLayout mla_heads = MakeLayout(KvLayout::kMLA, 2, 10);
  mla_heads.num_heads = 2;
  EXPECT_TRUE(rejected(mla_heads));
  KvCacheLayout mla_planes = MakeLayout(KvLayout::kMLA, 2, 10);
  mla_planes.plane_stride = 4096;
  EXPECT_TRUE(rejected(mla_planes));

  // K and V block planes must not overlap: pbb = 60 bytes at E=1.
  const KvCacheLayout base = MakeLayout(KvLayout::kNHD, 1, 10);
  const uint64_t pbb = base.BlockPlaneBytes();
  const struct {
    uint64_t block_stride, plane_stride;
    bool ok;
  } cases[] = {
      {pbb, pbb * 10, true},          // dense
      {pbb, pbb * 3, false},          // V block 0 is K block 3
      {pbb * 2, pbb, true},           // interleaved K0 V0 K1 V1 ...
      {pbb * 2, pbb - 1, false},      // V0 overlaps K0
      {pbb * 2, pbb * 3 + 1, false},  // V0 overlaps K2 (starts 1 byte past K1's V slot)
      {pbb * 2, pbb * 19, true},      // V block b sits in the gap after K block b + 9
      {pbb * 2, pbb * 20, true},      // V blocks all after the last K block
      {pbb * 2, pbb * 18, false},     // V block 0 is K block 9
  };
  for (const auto& c : cases) {
    KvCacheLayout lay = base;
    lay.block_stride = c.block_stride;
    lay.plane_stride = c.plane_stride;
    EXPECT_EQ(lay.Validate().ok(), c.ok)
        << "block_stride=" << c.block_stride << " plane_stride=" << c.plane_stride << ": "
        << lay.Validate().ToString();
  }
}

// Cross-checks Validate()'s closed-form overlap test against brute force over small strides.
TEST(KvCopyLayoutTest, PlaneOverlapCheckMatchesBruteForce) {
  KvCacheLayout base = MakeLayout(KvLayout::kNHD, 1, 1);
  base.num_layers = 1;
  base.block_size = 1;
  base.num_heads = 1;
  base.head_size = 3;  // pbb = 3
  for (uint64_t nb = 1; nb <= 5; ++nb) {
    for (uint64_t bs = 3; bs <= 9; ++bs) {
      for (uint64_t ps = 1; ps <= 40; ++ps) {
        KvCacheLayout lay = base;
        lay.num_blocks = nb;
        lay.block_stride = bs;
        lay.plane_stride = ps;
        bool overlap = false;
        for (uint64_t b = 0; b < nb; ++b) {
          for (uint64_t b2 = 0; b2 < nb; ++b2) {
            const uint64_t v = ps + b * bs;
            const uint64_t k = b2 * bs;
            if (v < k + 3 && k < v + 3) overlap = true;
          }
        }
        EXPECT_EQ(lay.Validate().ok(), !overlap) << "nb=" << nb << " bs=" << bs << " ps=" << ps;
      }
    }
  }
}

// ---- round trips and the object format --------------------------------------------------------

TEST(KvCopyTest, GatherMatchesReferenceAndScatterRestoresEveryLayoutAndElementSize) {
  TracedRng rng;
  constexpr uint64_t kNumBlocks = 24;
  constexpr uint64_t kChunkBlocks = 5;
  constexpr uint64_t kChunkSize = kChunkBlocks * kBlockSize;
  for (KvLayout kind : kAllLayouts) {
    for (uint32_t e : kElementSizes) {
      for (const KvCacheLayout& lay : StrideVariants(kind, e, kNumBlocks)) {
        SCOPED_TRACE(Describe(lay));
        ASSERT_TRUE(lay.Validate().ok()) << lay.Validate().ToString();
        Cache src = MakeCache(lay, &rng, /*random_fill=*/true);
        const std::vector<int64_t> src_ids = RandomDistinctIds(kNumBlocks, kChunkBlocks, &rng);
        const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);

        std::vector<uint8_t> object(object_bytes, kPoison);
        ASSERT_TRUE(Gather(src.View(), kChunkSize, BlockIdSpan(src_ids), kChunkSize, object.data(),
                           object.size())
                        .ok());
        std::vector<uint8_t> expected(object_bytes, kPoison);
        ReferenceGather(src, kChunkSize, src_ids, &expected);
        ASSERT_EQ(object, expected);

        // Scatter into a different set of blocks of a poisoned cache.
        Cache dst = MakeCache(lay, &rng, /*random_fill=*/false);
        const std::vector<int64_t> dst_ids = RandomDistinctIds(kNumBlocks, kChunkBlocks, &rng);
        ASSERT_TRUE(Scatter(dst.View(), kChunkSize, object.data(), object.size(),
                            BlockIdSpan(dst_ids), kChunkSize, 0)
                        .ok());
        // Every byte of every layer's K and V of the destination blocks equals the source
        // block's; every other byte keeps its poison.
        Cache want = MakeCache(lay, &rng, /*random_fill=*/false);
        ForEachByte(lay, kChunkBlocks, [&](auto l, auto p, auto i, auto t, auto h, auto d, auto b) {
          want.layers[l][EngineOffset(lay, p, static_cast<uint64_t>(dst_ids[i]), t, h, d) + b] =
              src.layers[l][EngineOffset(lay, p, static_cast<uint64_t>(src_ids[i]), t, h, d) + b];
        });
        for (uint32_t l = 0; l < kLayers; ++l) ASSERT_EQ(dst.layers[l], want.layers[l]) << l;
      }
    }
  }
}

TEST(KvCopyTest, PartialChunkTouchesOnlyItsBlockSlots) {
  TracedRng rng;
  constexpr uint64_t kChunkSize = 4 * kBlockSize;
  for (KvLayout kind : kAllLayouts) {
    const KvCacheLayout lay = MakeLayout(kind, 2, 16);
    SCOPED_TRACE(Describe(lay));
    Cache src = MakeCache(lay, &rng, true);
    const std::vector<int64_t> ids = RandomDistinctIds(16, 2, &rng);
    std::vector<uint8_t> object(*lay.ObjectBytes(kChunkSize), kPoison);
    ASSERT_TRUE(
        Gather(src.View(), kChunkSize, ids, 2 * kBlockSize, object.data(), object.size()).ok());
    std::vector<uint8_t> expected(object.size(), kPoison);
    ReferenceGather(src, kChunkSize, ids, &expected);
    EXPECT_EQ(object, expected);

    Cache dst = MakeCache(lay, &rng, false);
    Cache want = MakeCache(lay, &rng, false);
    ASSERT_TRUE(
        Scatter(dst.View(), kChunkSize, object.data(), object.size(), ids, 2 * kBlockSize, 0).ok());
    ReferenceScatter(object, kChunkSize, ids, 0, &want);
    for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(dst.layers[l], want.layers[l]);
  }
}

TEST(KvCopyTest, ScatterLeavesSkippedTokensUntouched) {
  TracedRng rng;
  constexpr uint64_t kNumBlocks = 20;
  constexpr uint64_t kChunkBlocks = 4;
  constexpr uint64_t kChunkSize = kChunkBlocks * kBlockSize;
  const uint64_t skips[] = {0,
                            1,
                            kBlockSize / 2,
                            kBlockSize,      // block boundary
                            kBlockSize + 3,  // mid-block
                            2 * kBlockSize,  // block boundary
                            kChunkSize - 1,  // all but the last token
                            kChunkSize};     // the whole chunk: nothing written
  for (KvLayout kind : kAllLayouts) {
    for (uint32_t e : kElementSizes) {
      for (const KvCacheLayout& lay : StrideVariants(kind, e, kNumBlocks)) {
        SCOPED_TRACE(Describe(lay));
        std::vector<uint8_t> object(*lay.ObjectBytes(kChunkSize));
        FillRandom(&object, &rng);
        for (uint64_t skip : skips) {
          SCOPED_TRACE("skip_tokens " + std::to_string(skip));
          // The destination holds "old" random values, not just poison.
          Cache dst = MakeCache(lay, &rng, true);
          Cache want = dst;
          const std::vector<int64_t> ids = RandomDistinctIds(kNumBlocks, kChunkBlocks, &rng);
          ASSERT_TRUE(
              Scatter(dst.View(), kChunkSize, object.data(), object.size(), ids, kChunkSize, skip)
                  .ok());
          ReferenceScatter(object, kChunkSize, ids, skip, &want);
          for (uint32_t l = 0; l < kLayers; ++l) ASSERT_EQ(dst.layers[l], want.layers[l]) << l;
        }
      }
    }
  }
}

TEST(KvCopyTest, Int32AndInt64BlockIdsAgree) {
  TracedRng rng;
  const KvCacheLayout lay = MakeLayout(KvLayout::kHND, 2, 12);
  Cache src = MakeCache(lay, &rng, true);
  const std::vector<int64_t> ids64 = RandomDistinctIds(12, 3, &rng);
  const std::vector<int32_t> ids32(ids64.begin(), ids64.end());
  const uint64_t chunk = 3 * kBlockSize;
  std::vector<uint8_t> a(*lay.ObjectBytes(chunk), kPoison);
  std::vector<uint8_t> b(a.size(), kPoison);
  ASSERT_TRUE(Gather(src.View(), chunk, ids64, chunk, a.data(), a.size()).ok());
  ASSERT_TRUE(Gather(src.View(), chunk, ids32, chunk, b.data(), b.size()).ok());
  EXPECT_EQ(a, b);
}

TEST(KvCopyTest, BatchEqualsOneCallPerChunk) {
  TracedRng rng;
  constexpr uint64_t kNumBlocks = 40;
  constexpr uint64_t kChunkSize = 3 * kBlockSize;
  for (KvLayout kind : kAllLayouts) {
    const KvCacheLayout lay = MakeLayout(kind, 2, kNumBlocks);
    SCOPED_TRACE(Describe(lay));
    Cache src = MakeCache(lay, &rng, true);
    const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);
    // Chunks of 3, 3, 2 and 0 blocks, over disjoint engine blocks.
    const std::vector<int64_t> all = RandomDistinctIds(kNumBlocks, 8, &rng);
    const std::vector<std::vector<int64_t>> ids = {
        {all[0], all[1], all[2]}, {all[3], all[4], all[5]}, {all[6], all[7]}, {}};
    const uint64_t skips[] = {0, kBlockSize + 1, 2, 0};
    std::vector<std::vector<uint8_t>> batch_objects(ids.size(),
                                                    std::vector<uint8_t>(object_bytes, kPoison));
    std::vector<std::vector<uint8_t>> single_objects = batch_objects;
    std::vector<ChunkCopy> gathers;
    for (size_t c = 0; c < ids.size(); ++c) {
      ChunkCopy cc;
      cc.block_ids = ids[c];
      cc.num_tokens = ids[c].size() * kBlockSize;
      cc.object = batch_objects[c].data();
      cc.object_size = object_bytes;
      gathers.push_back(cc);
      ASSERT_TRUE(Gather(src.View(), kChunkSize, ids[c], cc.num_tokens, single_objects[c].data(),
                         object_bytes)
                      .ok());
    }
    ASSERT_TRUE(GatherBatch(src.View(), kChunkSize, gathers).ok());
    EXPECT_EQ(batch_objects, single_objects);

    Cache batch_dst = MakeCache(lay, &rng, true);
    Cache single_dst = batch_dst;
    std::vector<ChunkCopy> scatters = gathers;
    for (size_t c = 0; c < ids.size(); ++c) {
      scatters[c].skip_tokens = std::min<uint64_t>(skips[c], scatters[c].num_tokens);
      ASSERT_TRUE(Scatter(single_dst.View(), kChunkSize, batch_objects[c].data(), object_bytes,
                          ids[c], scatters[c].num_tokens, scatters[c].skip_tokens)
                      .ok());
    }
    ASSERT_TRUE(ScatterBatch(batch_dst.View(), kChunkSize, scatters).ok());
    for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(batch_dst.layers[l], single_dst.layers[l]);
  }
}

// Large copies use non-temporal stores (a 16-byte loop, or 64-byte stores for pieces of 512 bytes
// and more where the CPU has AVX-512); they must write exactly the bytes memcpy writes, for
// pieces of any size and alignment: small and large block planes, sizes that are not a multiple
// of 64, padded strides that misalign the engine side.
TEST(KvCopyTest, StreamingStoresWriteTheSameBytesAsRegularOnes) {
  TracedRng rng;
  const struct {
    uint32_t block_size, heads, head_size, element_size;
  } shapes[] = {{4, 3, 5, 2}, {4, 2, 24, 2}, {16, 8, 128, 2}, {16, 3, 200, 1}, {16, 1, 577, 2}};
  for (KvLayout kind : kAllLayouts) {
    for (const auto& shape : shapes) {
      KvCacheLayout lay;
      lay.layout = kind;
      lay.num_layers = 2;
      lay.block_size = shape.block_size;
      lay.num_heads = kind == KvLayout::kMLA ? 1 : shape.heads;
      lay.head_size = shape.head_size;
      lay.element_size = shape.element_size;
      lay.num_blocks = 10;
      for (const uint64_t pad : {uint64_t{0}, uint64_t{4096 + 3}}) {
        if (pad != 0) {
          lay.block_stride = (kind == KvLayout::kFlashInfer ? 2 : 1) * lay.BlockPlaneBytes() + pad;
        }
        SCOPED_TRACE(Describe(lay));
        ASSERT_TRUE(lay.Validate().ok()) << lay.Validate().ToString();
        const uint64_t chunk_size = 3 * lay.block_size;
        Cache src = MakeCache(lay, &rng, true);
        const std::vector<int64_t> ids = RandomDistinctIds(lay.num_blocks, 3, &rng);
        std::vector<uint8_t> expected(*lay.ObjectBytes(chunk_size) + 7, kPoison);
        ReferenceGather(src, chunk_size, ids, &expected);
        Cache old = MakeCache(lay, &rng, true);
        const uint64_t skip = lay.block_size + 1;
        Cache want = old;
        ReferenceScatter(expected, chunk_size, ids, skip, &want);
        for (const bool streaming : {false, true}) {
          SCOPED_TRACE(streaming ? "streaming" : "regular");
          CopyOptions options;
          options.num_threads = 1;
          options.streaming_threshold_bytes = streaming ? 0 : UINT64_MAX;
          // Objects at an odd offset in their buffer: the object side is misaligned too.
          std::vector<uint8_t> buffer(expected.size() + 1, kPoison);
          uint8_t* object = buffer.data() + 1;
          ASSERT_TRUE(
              Gather(src.View(), chunk_size, ids, chunk_size, object, expected.size(), options)
                  .ok());
          ASSERT_EQ(std::vector<uint8_t>(object, object + expected.size()), expected);
          Cache dst = old;
          ASSERT_TRUE(Scatter(dst.View(), chunk_size, object, expected.size(), ids, chunk_size,
                              skip, options)
                          .ok());
          for (uint32_t l = 0; l < lay.num_layers; ++l) ASSERT_EQ(dst.layers[l], want.layers[l]);
        }
      }
    }
  }
}

// ---- checksums ---------------------------------------------------------------------------------

// The copy settings a checksummed gather must give the same bytes and checksums under: one
// thread or several (every copy split, pieces of one object on different threads), regular or
// streaming stores.
struct CopyMode {
  const char* name;
  size_t threads;
  bool streaming;
};
const CopyMode kCopyModes[] = {{"1 thread", 1, false},
                               {"1 thread, streaming", 1, true},
                               {"4 threads", 4, false},
                               {"4 threads, streaming", 4, true},
                               {"3 threads, streaming", 3, true}};

CopyOptions OptionsFor(const CopyMode& mode, CopyThreadPool* pool) {
  CopyOptions o;
  o.pool = pool;
  o.num_threads = mode.threads;
  o.parallel_threshold_bytes = 1;  // split even the smallest copies
  o.streaming_threshold_bytes = mode.streaming ? 0 : UINT64_MAX;
  return o;
}

// Gathers `num_chunks` chunks of `chunk_blocks` random distinct blocks each with a checksum for
// every chunk, in every CopyMode, once through GatherBatch and once per chunk through Gather,
// into objects with `slack` bytes of poison past ObjectBytes; checks the bytes against the
// reference gather and every checksum against Crc32c of the object's ObjectBytes bytes (the slack
// is not covered, and stays poison).
void CheckChecksummedGathers(const KvCacheLayout& lay, uint64_t chunk_blocks, size_t num_chunks,
                             uint64_t slack, CopyThreadPool* pool, std::mt19937_64* rng) {
  SCOPED_TRACE(Describe(lay));
  ASSERT_TRUE(lay.Validate().ok()) << lay.Validate().ToString();
  const uint64_t chunk_size = chunk_blocks * lay.block_size;
  Cache src = MakeCache(lay, rng, /*random_fill=*/true);
  const uint64_t object_bytes = *lay.ObjectBytes(chunk_size);
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<uint8_t>> expected;
  for (size_t c = 0; c < num_chunks; ++c) {
    ids.push_back(RandomDistinctIds(lay.num_blocks, chunk_blocks, rng));
    expected.emplace_back(object_bytes + slack, kPoison);
    ReferenceGather(src, chunk_size, ids.back(), &expected.back());
  }
  for (const CopyMode& mode : kCopyModes) {
    SCOPED_TRACE(mode.name);
    const CopyOptions options = OptionsFor(mode, pool);
    std::vector<std::vector<uint8_t>> objects(num_chunks,
                                              std::vector<uint8_t>(object_bytes + slack, kPoison));
    std::vector<uint32_t> crcs(num_chunks, 0);
    std::vector<ChunkCopy> chunks(num_chunks);
    for (size_t c = 0; c < num_chunks; ++c) {
      chunks[c].block_ids = ids[c];
      chunks[c].num_tokens = chunk_size;
      chunks[c].object = objects[c].data();
      chunks[c].object_size = objects[c].size();
      chunks[c].crc32c = &crcs[c];
    }
    ASSERT_TRUE(GatherBatch(src.View(), chunk_size, chunks, options).ok());
    for (size_t c = 0; c < num_chunks; ++c) {
      ASSERT_EQ(objects[c], expected[c]) << "chunk " << c;
      EXPECT_EQ(crcs[c], internal::Crc32c(objects[c].data(), object_bytes)) << "chunk " << c;
    }
    for (size_t c = 0; c < num_chunks; ++c) {
      std::vector<uint8_t> one(object_bytes + slack, kPoison);
      uint32_t crc = 0;
      ASSERT_TRUE(
          Gather(src.View(), chunk_size, ids[c], chunk_size, one.data(), one.size(), options, &crc)
              .ok());
      ASSERT_EQ(one, expected[c]) << "chunk " << c;
      EXPECT_EQ(crc, crcs[c]) << "chunk " << c;
    }
  }
}

TEST(KvCopyChecksumTest, ChecksumIsCrcOfTheObjectForEveryLayoutStrideAndThreadCount) {
  TracedRng rng;
  CopyThreadPool pool(3);
  constexpr uint64_t kNumBlocks = 24;
  for (KvLayout kind : kAllLayouts) {
    for (uint32_t e : kElementSizes) {
      for (const KvCacheLayout& lay : StrideVariants(kind, e, kNumBlocks)) {
        CheckChecksummedGathers(lay, /*chunk_blocks=*/5, /*num_chunks=*/3, /*slack=*/0, &pool,
                                &rng);
      }
    }
  }
}

// Block planes of 4 KiB and more take the checksum's folding path; one of 19 200 bytes is copied
// and checksummed in two steps (16 KiB, then the rest); padded block strides leave gaps between
// the engine's block planes that must not enter the checksum; objects with slack past
// ObjectBytes.
TEST(KvCopyChecksumTest, LargeBlockPlanesPaddedStridesAndSlackPastTheObject) {
  TracedRng rng;
  CopyThreadPool pool(3);
  const struct {
    uint32_t heads, head_size, element_size;
  } shapes[] = {{8, 128, 2}, {3, 200, 2}, {1, 576, 2}};
  for (KvLayout kind : kAllLayouts) {
    for (const auto& shape : shapes) {
      KvCacheLayout lay;
      lay.layout = kind;
      lay.num_layers = 2;
      lay.block_size = 16;
      lay.num_heads = kind == KvLayout::kMLA ? 1 : shape.heads;
      lay.head_size = shape.head_size;
      lay.element_size = shape.element_size;
      lay.num_blocks = 12;
      CheckChecksummedGathers(lay, /*chunk_blocks=*/4, /*num_chunks=*/3, /*slack=*/100, &pool,
                              &rng);
      const uint64_t pbb = lay.BlockPlaneBytes();
      lay.block_stride = (kind == KvLayout::kFlashInfer ? 2 * pbb : pbb) + 4096 + 64;
      CheckChecksummedGathers(lay, /*chunk_blocks=*/4, /*num_chunks=*/2, /*slack=*/1, &pool, &rng);
    }
  }
}

TEST(KvCopyChecksumTest, ChunksWithAndWithoutChecksumsMixInOneBatch) {
  TracedRng rng;
  CopyThreadPool pool(3);
  constexpr uint64_t kChunkSize = 3 * kBlockSize;
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, 30);
  Cache src = MakeCache(lay, &rng, true);
  const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);
  const std::vector<int64_t> all = RandomDistinctIds(30, 11, &rng);
  // Chunks: full with a checksum, full without, partial without, full with.
  const std::vector<std::vector<int64_t>> ids = {{all[0], all[1], all[2]},
                                                 {all[3], all[4], all[5]},
                                                 {all[6], all[7]},
                                                 {all[8], all[9], all[10]}};
  const bool want_crc[] = {true, false, false, true};
  for (const CopyMode& mode : kCopyModes) {
    SCOPED_TRACE(mode.name);
    std::vector<std::vector<uint8_t>> objects(ids.size(),
                                              std::vector<uint8_t>(object_bytes, kPoison));
    std::vector<uint32_t> crcs(ids.size(), 0x12345678u);
    std::vector<ChunkCopy> chunks(ids.size());
    for (size_t c = 0; c < ids.size(); ++c) {
      chunks[c].block_ids = ids[c];
      chunks[c].num_tokens = ids[c].size() * kBlockSize;
      chunks[c].object = objects[c].data();
      chunks[c].object_size = object_bytes;
      chunks[c].crc32c = want_crc[c] ? &crcs[c] : nullptr;
    }
    ASSERT_TRUE(GatherBatch(src.View(), kChunkSize, chunks, OptionsFor(mode, &pool)).ok());
    for (size_t c = 0; c < ids.size(); ++c) {
      std::vector<uint8_t> expected(object_bytes, kPoison);
      ReferenceGather(src, kChunkSize, ids[c], &expected);
      ASSERT_EQ(objects[c], expected) << c;
      if (want_crc[c]) {
        EXPECT_EQ(crcs[c], internal::Crc32c(objects[c].data(), object_bytes)) << c;
      } else {
        EXPECT_EQ(crcs[c], 0x12345678u) << c;  // not asked for, not written
      }
    }
  }
}

TEST(KvCopyChecksumTest, ChecksumOfAPartialCopyOrAScatterIsRejectedAndNothingIsCopied) {
  TracedRng rng;
  constexpr uint64_t kChunkSize = 3 * kBlockSize;
  const KvCacheLayout lay = MakeLayout(KvLayout::kHND, 2, 12);
  Cache cache = MakeCache(lay, &rng, true);
  const Cache original = cache;
  const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);
  std::vector<uint8_t> object(object_bytes, kPoison);
  std::vector<uint8_t> second(object_bytes, kPoison);
  const std::vector<int64_t> ids = {1, 4, 7};
  const std::vector<int64_t> two = {2, 5};
  uint32_t crc = 0xDEADBEEFu;
  uint32_t crc2 = 0xDEADBEEFu;

  // Gather of 2 of 3 blocks with a checksum.
  Status st = Gather(cache.View(), kChunkSize, two, 2 * kBlockSize, object.data(), object_bytes,
                     CopyOptions(), &crc);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("num_tokens 8 must equal chunk_size 12"), std::string::npos)
      << st.message();
  // A batch whose second chunk is partial: the first, valid, is not copied either.
  std::vector<ChunkCopy> batch(2);
  batch[0].block_ids = ids;
  batch[0].num_tokens = kChunkSize;
  batch[0].object = object.data();
  batch[0].object_size = object_bytes;
  batch[0].crc32c = &crc;
  batch[1] = batch[0];
  batch[1].block_ids = two;
  batch[1].num_tokens = 2 * kBlockSize;
  batch[1].object = second.data();
  batch[1].crc32c = &crc2;
  st = GatherBatch(cache.View(), kChunkSize, batch);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("chunk 1: a CRC32C covers a whole object"), std::string::npos)
      << st.message();
  EXPECT_EQ(object, std::vector<uint8_t>(object_bytes, kPoison));
  EXPECT_EQ(second, std::vector<uint8_t>(object_bytes, kPoison));
  EXPECT_EQ(crc, 0xDEADBEEFu);
  EXPECT_EQ(crc2, 0xDEADBEEFu);

  // Scatter does not checksum: a set crc32c is a mistake, and nothing is written to the engine.
  std::vector<uint8_t> data(object_bytes);
  FillRandom(&data, &rng);
  batch.resize(1);
  batch[0].object = data.data();
  st = ScatterBatch(cache.View(), kChunkSize, batch);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("Gather only"), std::string::npos) << st.message();
  for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(cache.layers[l], original.layers[l]);
  EXPECT_EQ(crc, 0xDEADBEEFu);

  // A copy engine that does not checksum (the CUDA one) rejects the request in planning.
  std::vector<internal::PlannedChunk> planned;
  batch[0].object = object.data();
  st = internal::PlanCopies(cache.View(), kChunkSize, batch.data(), batch.size(), /*scatter=*/false,
                            /*batch=*/true, &planned);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("does not compute CRC32C"), std::string::npos) << st.message();
  // With checksums the same chunk plans fine.
  planned.clear();
  EXPECT_TRUE(internal::PlanCopies(cache.View(), kChunkSize, batch.data(), batch.size(), false,
                                   true, &planned, /*checksums=*/true)
                  .ok());
  EXPECT_EQ(object, std::vector<uint8_t>(object_bytes, kPoison));
}

// ---- threads -----------------------------------------------------------------------------------

TEST(KvCopyTest, MultiThreadedCopiesEqualSingleThreaded) {
  TracedRng rng;
  CopyThreadPool pool(3);
  constexpr uint64_t kNumBlocks = 64;
  constexpr uint64_t kChunkBlocks = 6;
  constexpr uint64_t kChunkSize = kChunkBlocks * kBlockSize;
  constexpr size_t kChunks = 5;
  for (KvLayout kind : kAllLayouts) {
    const KvCacheLayout lay = MakeLayout(kind, 4, kNumBlocks);
    SCOPED_TRACE(Describe(lay));
    Cache src = MakeCache(lay, &rng, true);
    const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);
    const std::vector<int64_t> all = RandomDistinctIds(kNumBlocks, kChunks * kChunkBlocks, &rng);
    std::vector<std::vector<int64_t>> ids(kChunks);
    for (size_t c = 0; c < kChunks; ++c) {
      ids[c].assign(all.begin() + c * kChunkBlocks, all.begin() + (c + 1) * kChunkBlocks);
    }
    auto make_chunks = [&](std::vector<std::vector<uint8_t>>* objects) {
      std::vector<ChunkCopy> chunks;
      for (size_t c = 0; c < kChunks; ++c) {
        ChunkCopy cc;
        cc.block_ids = ids[c];
        cc.num_tokens = kChunkSize;
        cc.skip_tokens = c * 5 % kChunkSize;  // 0, 5, 10, 15, 20: mid-block and boundaries
        cc.object = (*objects)[c].data();
        cc.object_size = object_bytes;
        chunks.push_back(cc);
      }
      return chunks;
    };
    std::vector<std::vector<uint8_t>> one(kChunks, std::vector<uint8_t>(object_bytes, kPoison));
    std::vector<std::vector<uint8_t>> many = one;

    CopyOptions single;
    single.num_threads = 1;
    CopyOptions multi;
    multi.pool = &pool;
    multi.num_threads = 4;
    multi.parallel_threshold_bytes = 1;  // split even these small copies
    std::vector<ChunkCopy> g1 = make_chunks(&one);
    std::vector<ChunkCopy> gm = make_chunks(&many);
    for (auto& c : g1) c.skip_tokens = 0;
    for (auto& c : gm) c.skip_tokens = 0;
    ASSERT_TRUE(GatherBatch(src.View(), kChunkSize, g1, single).ok());
    ASSERT_TRUE(GatherBatch(src.View(), kChunkSize, gm, multi).ok());
    ASSERT_EQ(one, many);

    Cache dst1 = MakeCache(lay, &rng, true);
    Cache dstm = dst1;
    ASSERT_TRUE(ScatterBatch(dst1.View(), kChunkSize, make_chunks(&one), single).ok());
    ASSERT_TRUE(ScatterBatch(dstm.View(), kChunkSize, make_chunks(&many), multi).ok());
    for (uint32_t l = 0; l < kLayers; ++l) ASSERT_EQ(dst1.layers[l], dstm.layers[l]);

    // The default pool and threshold give the same bytes as well.
    std::vector<std::vector<uint8_t>> dflt(kChunks, std::vector<uint8_t>(object_bytes, kPoison));
    CopyOptions default_pool;
    default_pool.parallel_threshold_bytes = 1;
    std::vector<ChunkCopy> gd = make_chunks(&dflt);
    for (auto& c : gd) c.skip_tokens = 0;
    ASSERT_TRUE(GatherBatch(src.View(), kChunkSize, gd, default_pool).ok());
    ASSERT_EQ(one, dflt);
  }
}

TEST(CopyThreadPoolTest, ConcurrentLoopsRunEveryIndexExactlyOnce) {
  CopyThreadPool pool(3);
  constexpr size_t kCallers = 4;
  constexpr size_t kRounds = 50;
  constexpr size_t kTasks = 97;
  std::vector<std::vector<std::atomic<int>>> hits(kCallers);
  for (auto& h : hits) h = std::vector<std::atomic<int>>(kTasks);
  // A barrier: the callers start together so that their loops overlap.
  std::mutex mu;
  std::condition_variable cv;
  size_t arrived = 0;
  std::vector<std::thread> callers;
  for (size_t c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      {
        std::unique_lock<std::mutex> lock(mu);
        if (++arrived == kCallers) cv.notify_all();
        cv.wait(lock, [&] { return arrived == kCallers; });
      }
      for (size_t r = 0; r < kRounds; ++r) {
        pool.ParallelFor(kTasks, c + 1, [&](size_t i) { hits[c][i].fetch_add(1); });
      }
    });
  }
  for (auto& t : callers) t.join();
  for (size_t c = 0; c < kCallers; ++c) {
    for (size_t i = 0; i < kTasks; ++i) EXPECT_EQ(hits[c][i].load(), int{kRounds}) << c << " " << i;
  }
}

TEST(CopyThreadPoolTest, StopIsIdempotentAndLoopsStillRunAfterwards) {
  CopyThreadPool pool(2);
  std::vector<int> out(10, 0);
  pool.ParallelFor(out.size(), 0, [&](size_t i) { out[i] = static_cast<int>(i) + 1; });
  pool.Stop();
  pool.Stop();
  std::vector<int> after(10, 0);
  pool.ParallelFor(after.size(), 0, [&](size_t i) { after[i] = static_cast<int>(i) + 1; });
  EXPECT_EQ(out, after);
  CopyThreadPool none(0);
  std::vector<int> inline_only(5, 0);
  none.ParallelFor(inline_only.size(), 8, [&](size_t i) { inline_only[i] = 7; });
  EXPECT_EQ(inline_only, std::vector<int>(5, 7));
  EXPECT_EQ(none.num_workers(), 0u);
  EXPECT_GE(CopyThreadPool::Default()->num_workers(), 0u);
}

// ---- invalid inputs ----------------------------------------------------------------------------

TEST(KvCopyTest, InvalidCallsAreRejectedAndCopyNothing) {
  TracedRng rng;
  constexpr uint64_t kNumBlocks = 8;
  constexpr uint64_t kChunkSize = 2 * kBlockSize;
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, kNumBlocks);
  Cache cache = MakeCache(lay, &rng, true);
  const Cache original = cache;
  const KvCacheView view = cache.View();
  const uint64_t object_bytes = *lay.ObjectBytes(kChunkSize);
  std::vector<uint8_t> object(object_bytes, kPoison);
  const std::vector<int64_t> good = {3, 5};

  auto gather = [&](const KvCacheView& v, uint64_t chunk, std::vector<int64_t> ids, uint64_t tokens,
                    uint8_t* obj,
                    uint64_t size) { return Gather(v, chunk, ids, tokens, obj, size).code(); };
  auto scatter = [&](const KvCacheView& v, uint64_t chunk, std::vector<int64_t> ids,
                     uint64_t tokens, uint64_t skip, const uint8_t* obj, uint64_t size) {
    return Scatter(v, chunk, obj, size, ids, tokens, skip).code();
  };
  constexpr StatusCode kInvalid = StatusCode::kInvalidArgument;
  uint8_t* obj = object.data();

  ASSERT_EQ(gather(view, kChunkSize, good, kChunkSize, obj, object_bytes), StatusCode::kOk);
  const std::vector<uint8_t> gathered = object;
  std::fill(object.begin(), object.end(), kPoison);

  // The view.
  KvCacheView no_layers = view;
  no_layers.layers.pop_back();
  EXPECT_EQ(gather(no_layers, kChunkSize, good, kChunkSize, obj, object_bytes), kInvalid);
  KvCacheView null_layer = view;
  null_layer.layers[1] = nullptr;
  EXPECT_EQ(gather(null_layer, kChunkSize, good, kChunkSize, obj, object_bytes), kInvalid);
  KvCacheView bad_layout = view;
  bad_layout.layout.head_size = 0;
  EXPECT_EQ(gather(bad_layout, kChunkSize, good, kChunkSize, obj, object_bytes), kInvalid);
  // Chunk size and token counts.
  EXPECT_EQ(gather(view, 0, {}, 0, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize + 1, good, kChunkSize, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, good, kChunkSize - 1, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, {3, 5, 6}, kChunkSize + kBlockSize, obj, object_bytes + 4096),
            kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, {3}, kChunkSize, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, {3, 5, 6}, kChunkSize, obj, object_bytes), kInvalid);
  // Block ids.
  EXPECT_EQ(gather(view, kChunkSize, {3, -1}, kChunkSize, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, {3, kNumBlocks}, kChunkSize, obj, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, {int64_t{1} << 40, 0}, kChunkSize, obj, object_bytes),
            kInvalid);
  // The object.
  EXPECT_EQ(gather(view, kChunkSize, good, kChunkSize, nullptr, object_bytes), kInvalid);
  EXPECT_EQ(gather(view, kChunkSize, good, kChunkSize, obj, object_bytes - 1), kInvalid);
  EXPECT_EQ(scatter(view, kChunkSize, good, kChunkSize, 0, nullptr, object_bytes), kInvalid);
  // Skip tokens and duplicates.
  EXPECT_EQ(scatter(view, kChunkSize, good, kChunkSize, kChunkSize + 1, obj, object_bytes),
            kInvalid);
  EXPECT_EQ(scatter(view, kChunkSize, good, kBlockSize * 1, 0, obj, object_bytes), kInvalid);
  EXPECT_EQ(scatter(view, kChunkSize, {4, 4}, kChunkSize, 0, obj, object_bytes), kInvalid);
  EXPECT_EQ(scatter(view, kChunkSize, {4, 4}, kChunkSize, 1, obj, object_bytes), kInvalid);
  // Nothing was copied by any rejected call.
  EXPECT_EQ(object, std::vector<uint8_t>(object_bytes, kPoison));
  for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(cache.layers[l], original.layers[l]);

  // An object too small for the chunk size (a 2-block object for a 3-block chunk).
  EXPECT_EQ(
      scatter(view, 3 * kBlockSize, {0, 1, 6}, 3 * kBlockSize, 0, gathered.data(), gathered.size()),
      kInvalid);
  for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(cache.layers[l], original.layers[l]);

  // Allowed: a gather may read a block twice; a duplicate among fully skipped blocks is never
  // written; an empty copy.
  EXPECT_EQ(gather(view, kChunkSize, {4, 4}, kChunkSize, obj, object_bytes), StatusCode::kOk);
  std::vector<uint8_t> three(*lay.ObjectBytes(3 * kBlockSize), 0);
  EXPECT_EQ(scatter(view, 3 * kBlockSize, {4, 4, 6}, 3 * kBlockSize, 2 * kBlockSize, three.data(),
                    three.size()),
            StatusCode::kOk);
  EXPECT_EQ(gather(view, kChunkSize, {}, 0, obj, object_bytes), StatusCode::kOk);

  // Batches are validated as a whole: one bad chunk, nothing copied.
  std::fill(object.begin(), object.end(), kPoison);
  std::vector<uint8_t> second(object_bytes, kPoison);
  std::vector<ChunkCopy> batch(2);
  const std::vector<int64_t> ids0 = {1, 2};
  const std::vector<int64_t> ids1 = {2, 9};
  batch[0].block_ids = ids0;
  batch[0].num_tokens = kChunkSize;
  batch[0].object = object.data();
  batch[0].object_size = object_bytes;
  batch[1] = batch[0];
  batch[1].block_ids = ids1;
  batch[1].object = second.data();
  const Status st = GatherBatch(view, kChunkSize, batch);
  EXPECT_EQ(st.code(), kInvalid);
  EXPECT_NE(st.message().find("chunk 1"), std::string::npos) << st.message();
  EXPECT_EQ(object, std::vector<uint8_t>(object_bytes, kPoison));
  // A gather chunk with skip_tokens is a mistake.
  batch[1].block_ids = ids0;
  batch[1].skip_tokens = 1;
  EXPECT_EQ(GatherBatch(view, kChunkSize, batch).code(), kInvalid);
  // Two chunks writing the same engine block.
  const Cache before = cache;
  EXPECT_EQ(ScatterBatch(view, kChunkSize, batch).code(), kInvalid);
  for (uint32_t l = 0; l < kLayers; ++l) EXPECT_EQ(cache.layers[l], before.layers[l]);
  batch[1].skip_tokens = 2 * kBlockSize;  // chunk 1 writes nothing now
  EXPECT_EQ(ScatterBatch(view, kChunkSize, batch).code(), StatusCode::kOk);
}

}  // namespace
}  // namespace lmcache_cpp
