// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The GPU copy kernels (lmcache_cpp/cuda/kv_copy_cuda.h) against the CPU kernels of kv_copy.h,
// byte for byte, plus host registration, events and the no-GPU behaviour.
//
// Without a GPU the host half still runs: the argument checks, and the packed kernel launches
// executed on the CPU through the kernel's own per-piece code (kernel::CopyPiece, every thread of
// every block in turn) and the DMA segments executed with memcpy, both compared with the CPU
// kernels. What only a GPU shows is the CUDA runtime's part: launches, DMA, registration.
//
// Tests that need a GPU skip with "no CUDA device: <why>" where cudaGetDeviceCount fails or
// finds none; with LMCACHE_CPP_REQUIRE_GPU=1 in the environment (scripts/gpu_check.sh sets it)
// they fail instead, so a GPU run cannot pass by skipping. The argument checks and the no-device
// paths need no GPU and run everywhere.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kv_copy_cuda_internal.h"  // cpp/cuda: the host-side steps, run here without a GPU
#include "kv_copy_kernel.h"         // cpp/cuda: kernel::CopyPiece, the kernel's per-piece code
#include "lmcache_cpp/cuda/device.h"
#include "lmcache_cpp/cuda/kv_copy_cuda.h"
#include "lmcache_cpp/kv_copy.h"

namespace lmcache_cpp {
namespace {

using cuda::CopyEngine;
using cuda::CudaCopyOptions;
using cuda::CudaCopyStats;

constexpr uint8_t kPoison = 0xA5;
constexpr uint64_t kPage = 4096;

// Why this machine cannot run GPU tests ("" when it can), asked of the runtime directly (not of
// ProbeRuntime, which a test below checks against this).
std::string NoDeviceReason() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  (void)cudaGetLastError();
  if (err != cudaSuccess) {
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + " (" +
           cudaGetErrorString(err) + ")";
  }
  return n == 0 ? "cudaGetDeviceCount found 0 devices" : "";
}

bool GpuRequired() {
  const char* v = std::getenv("LMCACHE_CPP_REQUIRE_GPU");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

#define SKIP_WITHOUT_GPU()                                                                  \
  do {                                                                                      \
    const std::string why = NoDeviceReason();                                               \
    if (!why.empty()) {                                                                     \
      if (GpuRequired()) FAIL() << "LMCACHE_CPP_REQUIRE_GPU=1 but no CUDA device: " << why; \
      GTEST_SKIP() << "no CUDA device: " << why;                                            \
    }                                                                                       \
  } while (0)

#define CUDA_OK(expr)                                                              \
  do {                                                                             \
    const cudaError_t _err = (expr);                                               \
    ASSERT_EQ(_err, cudaSuccess) << #expr << ": " << cudaGetErrorName(_err) << " " \
                                 << cudaGetErrorString(_err);                      \
  } while (0)

std::mt19937_64 MakeRng() {
  std::random_device rd;
  const uint64_t seed = (uint64_t{rd()} << 32) ^ rd();
  std::printf("[ seed     ] %llu\n", static_cast<unsigned long long>(seed));
  return std::mt19937_64(seed);
}

void FillRandom(uint8_t* p, uint64_t n, std::mt19937_64* rng) {
  for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>((*rng)());
}

KvCacheLayout MakeLayout(KvLayout kind, uint32_t element_size, uint32_t head_size,
                         uint64_t num_blocks, uint32_t layers = 3, uint64_t block_stride = 0,
                         uint64_t plane_stride = 0) {
  KvCacheLayout lay;
  lay.layout = kind;
  lay.num_layers = layers;
  lay.block_size = 4;
  lay.num_heads = kind == KvLayout::kMLA ? 1 : 3;
  lay.head_size = head_size;
  lay.element_size = element_size;
  lay.num_blocks = num_blocks;
  lay.block_stride = block_stride;
  lay.plane_stride = plane_stride;
  return lay;
}

uint64_t LayerExtent(const KvCacheLayout& lay) {
  return (lay.num_planes() - 1) * lay.PlaneStride() + (lay.num_blocks - 1) * lay.BlockStride() +
         lay.BlockPlaneBytes();
}

// Page-aligned host memory, freed on destruction.
struct HostBuffer {
  explicit HostBuffer(uint64_t n) : size(n) {
    data = static_cast<uint8_t*>(std::aligned_alloc(kPage, (n + kPage - 1) / kPage * kPage));
  }
  ~HostBuffer() { std::free(data); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  uint8_t* data;
  uint64_t size;
};

// ------------------------------------------------------------------------------------------
// Everywhere: the probe, the argument checks, the no-device paths.

TEST(CudaRuntimeTest, ProbeAgreesWithTheRuntime) {
  const cuda::RuntimeInfo info = cuda::ProbeRuntime();
  const std::string why = NoDeviceReason();
  EXPECT_EQ(info.usable, why.empty()) << info.reason;
  EXPECT_EQ(info.reason.empty(), info.usable) << info.reason;
  EXPECT_EQ(info.runtime_version, CUDART_VERSION);
  if (info.usable) {
    EXPECT_GT(info.device_count, 0);
    EXPECT_GE(info.driver_version, info.runtime_version);
    EXPECT_TRUE(cuda::CheckUsable().ok());
  } else {
    EXPECT_EQ(cuda::CheckUsable().code(), StatusCode::kUnavailable);
    std::printf("[ info     ] CUDA unusable here: %s\n", info.reason.c_str());
  }
}

TEST(CudaRuntimeTest, WithoutADeviceEveryCallIsUnavailable) {
  if (NoDeviceReason().empty()) GTEST_SKIP() << "a CUDA device is present (covered elsewhere)";
  EXPECT_EQ(cuda::CudaEvent::Create().status().code(), StatusCode::kUnavailable);
  HostBuffer buf(4 * kPage);
  EXPECT_EQ(cuda::HostRegistration::Register(buf.data, buf.size).status().code(),
            StatusCode::kUnavailable);
  // A call that passes every argument check reaches the runtime check.
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, 8, 4);
  HostBuffer layer(LayerExtent(lay));
  KvCacheView view;
  view.layout = lay;
  view.layers.assign(lay.num_layers, layer.data);
  HostBuffer object(lay.ObjectBytes(8).value());
  std::vector<int64_t> ids = {1, 2};
  ChunkCopy chunk;
  chunk.block_ids = ids;
  chunk.num_tokens = 8;
  chunk.object = object.data;
  chunk.object_size = object.size;
  for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
    CudaCopyOptions options;
    options.engine = engine;
    EXPECT_EQ(cuda::GatherBatchAsync(view, 8, {chunk}, options).status().code(),
              StatusCode::kUnavailable);
    EXPECT_EQ(cuda::ScatterBatchAsync(view, 8, {chunk}, options).status().code(),
              StatusCode::kUnavailable);
  }
}

// The CPU kernels' answer to `chunks`, for comparison.
Status CpuStatus(const KvCacheView& view, uint64_t chunk_size, const std::vector<ChunkCopy>& chunks,
                 bool scatter) {
  return scatter ? ScatterBatch(view, chunk_size, chunks) : GatherBatch(view, chunk_size, chunks);
}

Status GpuStatus(const KvCacheView& view, uint64_t chunk_size, const std::vector<ChunkCopy>& chunks,
                 bool scatter, CopyEngine engine) {
  CudaCopyOptions options;
  options.engine = engine;
  return scatter ? cuda::ScatterBatchAsync(view, chunk_size, chunks, options).status()
                 : cuda::GatherBatchAsync(view, chunk_size, chunks, options).status();
}

TEST(CudaKvCopyValidationTest, RejectsWhatTheCpuKernelsRejectWithTheSameMessage) {
  // Host pointers throughout: every call below fails its argument checks, which come before any
  // CUDA call, so nothing is ever dereferenced and no GPU is needed.
  const KvCacheLayout lay = MakeLayout(KvLayout::kHND, 2, 8, 6);
  HostBuffer layer(LayerExtent(lay));
  KvCacheView view;
  view.layout = lay;
  view.layers.assign(lay.num_layers, layer.data);
  const uint64_t cs = 8;
  HostBuffer object(lay.ObjectBytes(cs).value());
  const std::vector<int64_t> ids2 = {0, 1};
  const std::vector<int64_t> ids1 = {0};
  const std::vector<int64_t> bad_id = {0, 6};
  const std::vector<int64_t> negative = {-1, 1};
  const std::vector<int64_t> twice = {3, 3};
  auto chunk = [&](const std::vector<int64_t>& ids, uint64_t tokens, uint64_t skip = 0) {
    ChunkCopy c;
    c.block_ids = ids;
    c.num_tokens = tokens;
    c.skip_tokens = skip;
    c.object = object.data;
    c.object_size = object.size;
    return c;
  };
  struct Case {
    const char* name;
    KvCacheView view;
    uint64_t chunk_size;
    std::vector<ChunkCopy> chunks;
    bool scatter;
  };
  std::vector<Case> cases;
  cases.push_back({"chunk size not a multiple", view, 6, {chunk(ids2, 8)}, false});
  cases.push_back({"tokens not a multiple", view, cs, {chunk(ids2, 6)}, false});
  cases.push_back({"too many tokens", view, cs, {chunk(ids2, 12)}, true});
  cases.push_back({"wrong id count", view, cs, {chunk(ids1, 8)}, false});
  cases.push_back({"skip on gather", view, cs, {chunk(ids2, 8, 1)}, false});
  cases.push_back({"skip beyond tokens", view, cs, {chunk(ids2, 8, 9)}, true});
  cases.push_back({"id out of range", view, cs, {chunk(bad_id, 8)}, false});
  cases.push_back({"negative id", view, cs, {chunk(negative, 8)}, true});
  cases.push_back({"block written twice", view, cs, {chunk(twice, 8)}, true});
  cases.push_back(
      {"block written by two chunks", view, cs, {chunk(ids2, 8), chunk(ids2, 8)}, true});
  ChunkCopy null_object = chunk(ids2, 8);
  null_object.object = nullptr;
  cases.push_back({"null object", view, cs, {null_object}, false});
  ChunkCopy small = chunk(ids2, 8);
  small.object_size -= 1;
  cases.push_back({"object too small", view, cs, {chunk(ids2, 8), small}, true});
  KvCacheView null_layer = view;
  null_layer.layers[1] = nullptr;
  cases.push_back({"null layer", null_layer, cs, {chunk(ids2, 8)}, false});
  KvCacheView bad_layout = view;
  bad_layout.layout.num_heads = 0;
  cases.push_back({"bad layout", bad_layout, cs, {chunk(ids2, 8)}, true});
  KvCacheView overlapping = view;
  overlapping.layout.plane_stride = 1;
  cases.push_back({"overlapping planes", overlapping, cs, {chunk(ids2, 8)}, false});
  for (const Case& c : cases) {
    const Status cpu = CpuStatus(c.view, c.chunk_size, c.chunks, c.scatter);
    ASSERT_EQ(cpu.code(), StatusCode::kInvalidArgument) << c.name;
    for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
      EXPECT_EQ(GpuStatus(c.view, c.chunk_size, c.chunks, c.scatter, engine), cpu)
          << c.name << " (" << cuda::CopyEngineName(engine) << ")";
    }
  }
}

TEST(CudaKvCopyValidationTest, KernelOptionsAndCapacityAreCheckedBeforeTheRuntime) {
  HostBuffer object(kPage);
  const std::vector<int64_t> ids = {0};
  ChunkCopy chunk;
  chunk.block_ids = ids;
  chunk.num_tokens = 4;
  chunk.object = object.data;
  chunk.object_size = object.size;
  {
    const KvCacheLayout lay = MakeLayout(KvLayout::kMLA, 1, 4, 2);
    HostBuffer layer(LayerExtent(lay));
    KvCacheView view;
    view.layout = lay;
    view.layers.assign(lay.num_layers, layer.data);
    for (uint32_t threads : {0u, 16u, 33u, 2048u}) {
      CudaCopyOptions options;
      options.threads_per_block = threads;
      EXPECT_EQ(cuda::GatherBatchAsync(view, 4, {chunk}, options).status().code(),
                StatusCode::kInvalidArgument)
          << threads;
    }
    CudaCopyOptions options;
    options.engine = static_cast<CopyEngine>(7);
    EXPECT_EQ(cuda::GatherBatchAsync(view, 4, {chunk}, options).status().code(),
              StatusCode::kInvalidArgument);
  }
  {
    // More layers than one launch's arguments can name: the kernel path says so; the DMA path
    // has no such limit and gets as far as the memory checks.
    const KvCacheLayout lay = MakeLayout(KvLayout::kMLA, 1, 4, 2, cuda::kMaxKernelWords);
    HostBuffer layer(LayerExtent(lay));
    KvCacheView view;
    view.layout = lay;
    view.layers.assign(lay.num_layers, layer.data);
    HostBuffer big(lay.ObjectBytes(4).value());
    chunk.object = big.data;
    chunk.object_size = big.size;
    CudaCopyOptions options;
    EXPECT_EQ(cuda::GatherBatchAsync(view, 4, {chunk}, options).status().code(),
              StatusCode::kNotSupported);
    options.engine = CopyEngine::kDma;
    const StatusCode dma = cuda::GatherBatchAsync(view, 4, {chunk}, options).status().code();
    EXPECT_TRUE(dma == StatusCode::kUnavailable || dma == StatusCode::kInvalidArgument)
        << StatusCodeName(dma);  // no GPU here / host memory as "layers" there
  }
}

TEST(HostRegistrationTest, RejectsBadArgumentsBeforeTheRuntime) {
  HostBuffer buf(8 * kPage);
  auto code = [](void* base, uint64_t size, uint64_t piece) {
    cuda::HostRegistrationOptions options;
    options.piece_bytes = piece;
    return cuda::HostRegistration::Register(base, size, options).status().code();
  };
  EXPECT_EQ(code(nullptr, kPage, kPage), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(buf.data + 1, kPage, kPage), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(buf.data, 0, kPage), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(buf.data, kPage, 0), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(buf.data, kPage, kPage + 1), StatusCode::kInvalidArgument);
}

// ------------------------------------------------------------------------------------------
// Everywhere: the kernel's indexing and the DMA segments, run on the CPU.

struct CopyCase {
  KvLayout layout;
  uint32_t element_size;
  uint32_t head_size;
  bool padded;  // block stride padded by 64 bytes (and planes placed apart for NHD/HND)
};

std::string CaseName(const CopyCase& c) {
  return std::string(KvLayoutName(c.layout)) + " E" + std::to_string(c.element_size) + " D" +
         std::to_string(c.head_size) + (c.padded ? " padded" : "");
}

std::vector<CopyCase> AllCases() {
  std::vector<CopyCase> cases;
  for (KvLayout layout : {KvLayout::kNHD, KvLayout::kHND, KvLayout::kFlashInfer, KvLayout::kMLA}) {
    for (uint32_t e : {1u, 2u, 4u}) {
      for (uint32_t d : {5u, 64u}) cases.push_back({layout, e, d, false});
    }
    cases.push_back({layout, 2, 64, true});
  }
  return cases;
}

KvCacheLayout LayoutOf(const CopyCase& c, uint64_t num_blocks) {
  KvCacheLayout lay = MakeLayout(c.layout, c.element_size, c.head_size, num_blocks);
  if (c.padded) {
    const uint64_t pbb = lay.BlockPlaneBytes();
    lay.block_stride = (c.layout == KvLayout::kFlashInfer ? 2 * pbb : pbb) + 64;
    if (c.layout == KvLayout::kNHD || c.layout == KvLayout::kHND) {
      lay.plane_stride = num_blocks * lay.block_stride + 192;
    }
  }
  return lay;
}

// Block ids for chunks of `tokens` tokens each (tokens / block_size blocks) in [0, num_blocks):
// all distinct across the chunks (what a scatter needs), or drawn independently (a gather may
// read a block twice).
std::vector<std::vector<int64_t>> BlockIdsFor(const std::vector<uint64_t>& tokens,
                                              uint64_t block_size, uint64_t num_blocks,
                                              bool distinct, std::mt19937_64* rng) {
  std::vector<int64_t> perm(num_blocks);
  for (uint64_t b = 0; b < num_blocks; ++b) perm[b] = static_cast<int64_t>(b);
  std::shuffle(perm.begin(), perm.end(), *rng);
  std::vector<std::vector<int64_t>> ids;
  size_t next = 0;
  for (uint64_t t : tokens) {
    std::vector<int64_t> v;
    for (uint64_t b = 0; b < t / block_size; ++b) {
      v.push_back(distinct ? perm[next++] : static_cast<int64_t>((*rng)() % num_blocks));
    }
    ids.push_back(v);
  }
  return ids;
}

// One ChunkCopy per chunk: blocks ids[i], tokens[i] tokens, skips[i] skipped (none given: 0), the
// object at base + i * object_bytes.
std::vector<ChunkCopy> MakeChunks(const std::vector<std::vector<int64_t>>& ids,
                                  const std::vector<uint64_t>& tokens,
                                  const std::vector<uint64_t>& skips, uint8_t* base,
                                  uint64_t object_bytes) {
  std::vector<ChunkCopy> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    ChunkCopy ch;
    ch.block_ids = ids[i];
    ch.num_tokens = tokens[i];
    ch.skip_tokens = skips.empty() ? 0 : skips[i];
    ch.object = base + i * object_bytes;
    ch.object_size = object_bytes;
    out.push_back(ch);
  }
  return out;
}

// Host memory standing in for the GPU: an engine cache and objects, with a copy of each for the
// CPU kernels.
struct HostCopyFixture {
  HostCopyFixture(const KvCacheLayout& lay, uint64_t bytes_per_object, size_t count,
                  std::mt19937_64* rng)
      : layout(lay), object_bytes(bytes_per_object) {
    for (uint32_t l = 0; l < lay.num_layers; ++l) {
      layers.emplace_back(LayerExtent(lay));
      FillRandom(layers.back().data(), layers.back().size(), rng);
    }
    reference_layers = layers;
    objects.assign(object_bytes * count, kPoison);
    reference_objects = objects;
  }
  static KvCacheView ViewOf(const KvCacheLayout& lay, std::vector<std::vector<uint8_t>>* ls) {
    KvCacheView v;
    v.layout = lay;
    for (auto& l : *ls) v.layers.push_back(l.data());
    return v;
  }
  KvCacheView view() { return ViewOf(layout, &layers); }
  KvCacheView reference_view() { return ViewOf(layout, &reference_layers); }
  std::vector<ChunkCopy> Chunks(bool reference, const std::vector<std::vector<int64_t>>& ids,
                                const std::vector<uint64_t>& tokens,
                                const std::vector<uint64_t>& skips) {
    return MakeChunks(ids, tokens, skips, reference ? reference_objects.data() : objects.data(),
                      object_bytes);
  }

  KvCacheLayout layout;
  uint64_t object_bytes;
  std::vector<std::vector<uint8_t>> layers;
  std::vector<std::vector<uint8_t>> reference_layers;
  std::vector<uint8_t> objects;
  std::vector<uint8_t> reference_objects;
};

// How the copy is carried out on the CPU.
struct Emulation {
  bool dma = false;
  uint32_t max_words = cuda::kMaxKernelWords;
  uint32_t max_blocks = 0;
  uint32_t threads = 32;
};

std::string EmulationName(const Emulation& e) {
  if (e.dma) return "dma segments";
  return "kernel words=" + std::to_string(e.max_words) + " blocks=" + std::to_string(e.max_blocks) +
         " threads=" + std::to_string(e.threads);
}

// Runs the copy the GPU path would queue, on the CPU; returns the number of launches (kernel) or
// segments (DMA).
Result<uint64_t> Emulate(const KvCacheView& view, uint64_t chunk_size,
                         const std::vector<ChunkCopy>& chunks, bool scatter, const Emulation& e) {
  CudaCopyOptions options;
  options.engine = e.dma ? CopyEngine::kDma : CopyEngine::kKernel;
  options.threads_per_block = e.threads;
  Result<cuda::internal::GpuPlan> planned =
      cuda::internal::PlanGpuCopy(view, chunk_size, chunks, scatter, options);
  if (!planned.ok()) return planned.status();
  const cuda::internal::GpuPlan& plan = planned.value();
  if (e.dma) {
    const std::vector<cuda::internal::Segment> segments = cuda::internal::DmaSegments(view, plan);
    for (const auto& seg : segments) std::memmove(seg.dst, seg.src, seg.size);
    return uint64_t{segments.size()};
  }
  uint64_t launches = 0;
  LMCACHE_RETURN_IF_ERROR(cuda::internal::PackKernelLaunches(
      view, plan, e.max_words, e.max_blocks,
      [&](const cuda::internal::KernelArgs& args, uint32_t blocks) {
        if (blocks == 0 || blocks > args.total_pieces) {
          return Status::Internal("bad grid of " + std::to_string(blocks) + " blocks");
        }
        // The kernel's grid-stride loop, block by block, thread by thread.
        for (uint32_t b = 0; b < blocks; ++b) {
          for (uint64_t p = b; p < args.total_pieces; p += blocks) {
            for (uint32_t t = 0; t < e.threads; ++t) {
              cuda::internal::kernel::CopyPiece(args, p, t, e.threads);
            }
          }
        }
        ++launches;
        return Status::Ok();
      }));
  return launches;
}

std::vector<Emulation> Emulations(uint32_t num_layers) {
  return {
      {false, cuda::kMaxKernelWords, 0, 32},
      {false, cuda::kMaxKernelWords, 3, 64},  // grid-stride over pieces
      {false, num_layers + cuda::internal::kEntryHeaderWords + 1, 0, 32},  // a block per launch
      {false, num_layers + cuda::internal::kEntryHeaderWords + 3, 2, 96},  // entries split
      {true, 0, 0, 0},
  };
}

TEST(CudaKvCopyHostTest, GatherAsPackedForTheKernelMatchesTheCpuKernels) {
  std::mt19937_64 rng = MakeRng();
  constexpr uint64_t kNumBlocks = 24;
  constexpr uint64_t kChunk = 16;  // 4 blocks of 4 tokens
  const std::vector<uint64_t> tokens = {kChunk, 8, kChunk, 4};
  for (const CopyCase& c : AllCases()) {
    const KvCacheLayout lay = LayoutOf(c, kNumBlocks);
    ASSERT_TRUE(lay.Validate().ok()) << CaseName(c);
    const auto ids = BlockIdsFor(tokens, lay.block_size, kNumBlocks, /*distinct=*/false, &rng);
    for (const Emulation& e : Emulations(lay.num_layers)) {
      SCOPED_TRACE(CaseName(c) + ", " + EmulationName(e));
      HostCopyFixture f(lay, lay.ObjectBytes(kChunk).value(), tokens.size(), &rng);
      auto runs = Emulate(f.view(), kChunk, f.Chunks(false, ids, tokens, {}), false, e);
      ASSERT_TRUE(runs.ok()) << runs.status().ToString();
      ASSERT_TRUE(GatherBatch(f.reference_view(), kChunk, f.Chunks(true, ids, tokens, {})).ok());
      EXPECT_TRUE(f.objects == f.reference_objects);
      EXPECT_TRUE(f.layers == f.reference_layers);  // the source is left alone
      if (!e.dma && e.max_words < 20) {
        EXPECT_GT(*runs, 1u);
      }
    }
  }
}

TEST(CudaKvCopyHostTest, ScatterAsPackedForTheKernelMatchesTheCpuKernelsWithSkips) {
  std::mt19937_64 rng = MakeRng();
  constexpr uint64_t kNumBlocks = 40;
  constexpr uint64_t kChunk = 16;
  const std::vector<uint64_t> tokens = {kChunk, kChunk, kChunk, kChunk, kChunk, kChunk, 8};
  const std::vector<uint64_t> skips = {0, 1, 4, 6, 15, 16, 3};
  for (const CopyCase& c : AllCases()) {
    const KvCacheLayout lay = LayoutOf(c, kNumBlocks);
    const auto ids = BlockIdsFor(tokens, lay.block_size, kNumBlocks, /*distinct=*/true, &rng);
    for (const Emulation& e : Emulations(lay.num_layers)) {
      SCOPED_TRACE(CaseName(c) + ", " + EmulationName(e));
      HostCopyFixture f(lay, lay.ObjectBytes(kChunk).value(), tokens.size(), &rng);
      FillRandom(f.objects.data(), f.objects.size(), &rng);
      f.reference_objects = f.objects;
      auto runs = Emulate(f.view(), kChunk, f.Chunks(false, ids, tokens, skips), true, e);
      ASSERT_TRUE(runs.ok()) << runs.status().ToString();
      ASSERT_TRUE(
          ScatterBatch(f.reference_view(), kChunk, f.Chunks(true, ids, tokens, skips)).ok());
      EXPECT_TRUE(f.layers == f.reference_layers);
      EXPECT_TRUE(f.objects == f.reference_objects);  // the source is left alone
    }
  }
}

TEST(CudaKvCopyHostTest, DmaSegmentsMergeAdjacentPieces) {
  // Dense NHD, consecutive block ids: each (layer, plane) of the object is one segment; with
  // the ids reversed nothing merges.
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, 16, 8, 2);
  std::vector<std::vector<uint8_t>> layers(lay.num_layers, std::vector<uint8_t>(LayerExtent(lay)));
  const KvCacheView view = HostCopyFixture::ViewOf(lay, &layers);
  std::vector<uint8_t> object(lay.ObjectBytes(16).value());
  const std::vector<int64_t> forward = {2, 3, 4, 5};
  const std::vector<int64_t> backward = {5, 4, 3, 2};
  for (const auto* ids : {&forward, &backward}) {
    ChunkCopy ch;
    ch.block_ids = *ids;
    ch.num_tokens = 16;
    ch.object = object.data();
    ch.object_size = object.size();
    CudaCopyOptions options;
    options.engine = CopyEngine::kDma;
    auto plan = cuda::internal::PlanGpuCopy(view, 16, {ch}, false, options);
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    const auto segments = cuda::internal::DmaSegments(view, *plan);
    EXPECT_EQ(segments.size(), ids == &forward ? 4u : 16u);
    uint64_t total = 0;
    for (const auto& seg : segments) total += seg.size;
    EXPECT_EQ(total, object.size());
  }
}

// ------------------------------------------------------------------------------------------
// On a GPU: byte-exact against the CPU kernels.

// An engine KV cache in GPU memory with a host mirror the CPU kernels work on.
class DeviceCache {
 public:
  explicit DeviceCache(const KvCacheLayout& lay) : layout_(lay), extent_(LayerExtent(lay)) {
    for (uint32_t l = 0; l < lay.num_layers; ++l) {
      host_.emplace_back(extent_);
      void* p = nullptr;
      if (cudaMalloc(&p, extent_) != cudaSuccess) p = nullptr;
      device_.push_back(static_cast<uint8_t*>(p));
    }
  }
  ~DeviceCache() {
    for (uint8_t* p : device_) (void)cudaFree(p);
  }
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  bool ok() const {
    for (uint8_t* p : device_) {
      if (p == nullptr) return false;
    }
    return true;
  }
  void Randomize(std::mt19937_64* rng) {
    for (auto& h : host_) FillRandom(h.data(), h.size(), rng);
  }
  cudaError_t Upload() {
    for (size_t l = 0; l < host_.size(); ++l) {
      const cudaError_t err =
          cudaMemcpy(device_[l], host_[l].data(), extent_, cudaMemcpyHostToDevice);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  // The device bytes of every layer, concatenated.
  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> out(extent_ * host_.size());
    for (size_t l = 0; l < host_.size(); ++l) {
      if (cudaMemcpy(out.data() + l * extent_, device_[l], extent_, cudaMemcpyDeviceToHost) !=
          cudaSuccess) {
        out.clear();
        break;
      }
    }
    return out;
  }
  std::vector<uint8_t> HostBytes() const {
    std::vector<uint8_t> out;
    for (const auto& h : host_) out.insert(out.end(), h.begin(), h.end());
    return out;
  }
  KvCacheView HostView() {
    KvCacheView v;
    v.layout = layout_;
    for (auto& h : host_) v.layers.push_back(h.data());
    return v;
  }
  KvCacheView DeviceView() const {
    KvCacheView v;
    v.layout = layout_;
    v.layers = device_;
    return v;
  }

 private:
  KvCacheLayout layout_;
  uint64_t extent_;
  std::vector<std::vector<uint8_t>> host_;
  std::vector<uint8_t*> device_;
};

enum class ObjectPlace { kRegisteredHost, kDevice };

const char* PlaceName(ObjectPlace p) {
  return p == ObjectPlace::kDevice ? "device" : "registered host";
}

// `count` objects of `object_bytes` each, back to back, where the copies can reach them, plus a
// host buffer of the same size for the CPU reference.
class Objects {
 public:
  Objects(ObjectPlace place, uint64_t object_bytes, size_t count, uint64_t piece_bytes = 1 << 30)
      : place_(place),
        object_bytes_(object_bytes),
        host_(object_bytes * count),
        reference_(object_bytes * count, kPoison) {
    if (place == ObjectPlace::kDevice) {
      void* p = nullptr;
      if (cudaMalloc(&p, host_.size) == cudaSuccess) device_ = static_cast<uint8_t*>(p);
    } else {
      cuda::HostRegistrationOptions options;
      options.piece_bytes = piece_bytes;
      auto reg = cuda::HostRegistration::Register(host_.data, host_.size, options);
      if (reg.ok()) registration_ = std::move(reg).value();
    }
  }
  ~Objects() {
    if (device_ != nullptr) (void)cudaFree(device_);
  }
  Objects(const Objects&) = delete;
  Objects& operator=(const Objects&) = delete;

  bool ok() const { return place_ == ObjectPlace::kDevice ? device_ != nullptr : !!registration_; }
  uint8_t* gpu(size_t i) {
    return (place_ == ObjectPlace::kDevice ? device_ : host_.data) + i * object_bytes_;
  }
  uint8_t* cpu(size_t i) { return reference_.data() + i * object_bytes_; }
  uint64_t object_bytes() const { return object_bytes_; }

  cudaError_t Poison() {
    std::memset(host_.data, kPoison, host_.size);
    if (device_ == nullptr) return cudaSuccess;
    return cudaMemset(device_, kPoison, host_.size);
  }
  cudaError_t SetFrom(const std::vector<uint8_t>& bytes) {
    reference_ = bytes;
    std::memcpy(host_.data, bytes.data(), host_.size);
    if (device_ == nullptr) return cudaSuccess;
    return cudaMemcpy(device_, bytes.data(), host_.size, cudaMemcpyHostToDevice);
  }
  std::vector<uint8_t> GpuBytes() const {
    std::vector<uint8_t> out(host_.size);
    if (device_ == nullptr) {
      std::memcpy(out.data(), host_.data, host_.size);
    } else if (cudaMemcpy(out.data(), device_, host_.size, cudaMemcpyDeviceToHost) != cudaSuccess) {
      out.clear();
    }
    return out;
  }
  const std::vector<uint8_t>& reference() const { return reference_; }
  void ResetReference() { reference_.assign(reference_.size(), kPoison); }

 private:
  ObjectPlace place_;
  uint64_t object_bytes_;
  HostBuffer host_;
  std::vector<uint8_t> reference_;
  uint8_t* device_ = nullptr;
  std::unique_ptr<cuda::HostRegistration> registration_;
};

// A stream and an event for one test.
class StreamAndEvent {
 public:
  StreamAndEvent() {
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess)
      stream_ = nullptr;
    auto ev = cuda::CudaEvent::Create();
    if (ev.ok()) event_ = std::move(ev).value();
  }
  ~StreamAndEvent() {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  StreamAndEvent(const StreamAndEvent&) = delete;
  StreamAndEvent& operator=(const StreamAndEvent&) = delete;
  bool ok() const { return stream_ != nullptr && event_ != nullptr; }
  CudaCopyOptions Options(CopyEngine engine) const {
    CudaCopyOptions o;
    o.engine = engine;
    o.stream = stream_;
    o.done_event = event_->handle();
    return o;
  }
  cuda::CudaEvent& event() { return *event_; }

 private:
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::CudaEvent> event_;
};

class CudaKvCopyTest : public ::testing::TestWithParam<ObjectPlace> {};

TEST_P(CudaKvCopyTest, GatherMatchesTheCpuKernelsForEveryLayoutAndElementSize) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng = MakeRng();
  constexpr uint64_t kNumBlocks = 24;
  constexpr uint64_t kChunk = 16;  // 4 blocks
  for (const CopyCase& c : AllCases()) {
    const KvCacheLayout lay = LayoutOf(c, kNumBlocks);
    ASSERT_TRUE(lay.Validate().ok()) << CaseName(c);
    DeviceCache cache(lay);
    ASSERT_TRUE(cache.ok());
    cache.Randomize(&rng);
    CUDA_OK(cache.Upload());
    // Three chunks: full, partial (2 of 4 blocks), full, ids drawn at random (a chunk may
    // repeat a block: gathers may read a block twice).
    const std::vector<uint64_t> tokens = {kChunk, 8, kChunk};
    const auto ids = BlockIdsFor(tokens, lay.block_size, kNumBlocks, /*distinct=*/false, &rng);
    const uint64_t ob = lay.ObjectBytes(kChunk).value();
    for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
      SCOPED_TRACE(CaseName(c) + " " + cuda::CopyEngineName(engine) + " into " +
                   PlaceName(GetParam()));
      Objects objects(GetParam(), ob, tokens.size());
      ASSERT_TRUE(objects.ok());
      CUDA_OK(objects.Poison());
      const std::vector<ChunkCopy> gpu_chunks = MakeChunks(ids, tokens, {}, objects.gpu(0), ob);
      const std::vector<ChunkCopy> cpu_chunks = MakeChunks(ids, tokens, {}, objects.cpu(0), ob);
      StreamAndEvent se;
      ASSERT_TRUE(se.ok());
      auto stats =
          cuda::GatherBatchAsync(cache.DeviceView(), kChunk, gpu_chunks, se.Options(engine));
      ASSERT_TRUE(stats.ok()) << stats.status().ToString();
      ASSERT_TRUE(se.event().Synchronize().ok());
      ASSERT_TRUE(GatherBatch(cache.HostView(), kChunk, cpu_chunks).ok());
      EXPECT_EQ(stats->bytes, (2 * kChunk + 8) / lay.block_size * lay.num_planes() *
                                  lay.num_layers * lay.BlockPlaneBytes());
      const std::vector<uint8_t> got = objects.GpuBytes();
      ASSERT_EQ(got.size(), objects.reference().size());
      EXPECT_TRUE(got == objects.reference()) << "object bytes differ from the CPU kernels'";
    }
  }
}

TEST_P(CudaKvCopyTest, ScatterMatchesTheCpuKernelsWithSkippedTokens) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng = MakeRng();
  constexpr uint64_t kNumBlocks = 40;
  constexpr uint64_t kChunk = 16;  // 4 blocks of 4 tokens
  for (const CopyCase& c : AllCases()) {
    const KvCacheLayout lay = LayoutOf(c, kNumBlocks);
    const uint64_t ob = lay.ObjectBytes(kChunk).value();
    // Chunks with every kind of skip: none, inside the first block, a whole block, into the
    // second block, all but one token, everything, and a partial chunk with a skip.
    const std::vector<uint64_t> tokens = {kChunk, kChunk, kChunk, kChunk, kChunk, kChunk, 8};
    const std::vector<uint64_t> skips = {0, 1, 4, 6, 15, 16, 3};
    for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
      SCOPED_TRACE(CaseName(c) + " " + cuda::CopyEngineName(engine) + " from " +
                   PlaceName(GetParam()));
      DeviceCache cache(lay);
      ASSERT_TRUE(cache.ok());
      cache.Randomize(&rng);  // the "old" contents that skipped tokens must keep
      CUDA_OK(cache.Upload());
      Objects objects(GetParam(), ob, tokens.size());
      ASSERT_TRUE(objects.ok());
      std::vector<uint8_t> fresh(ob * tokens.size());
      FillRandom(fresh.data(), fresh.size(), &rng);
      CUDA_OK(objects.SetFrom(fresh));
      // Distinct blocks across the batch (a scatter may not write a block twice).
      const auto ids = BlockIdsFor(tokens, lay.block_size, kNumBlocks, /*distinct=*/true, &rng);
      const std::vector<ChunkCopy> gpu_chunks = MakeChunks(ids, tokens, skips, objects.gpu(0), ob);
      const std::vector<ChunkCopy> cpu_chunks = MakeChunks(ids, tokens, skips, objects.cpu(0), ob);
      StreamAndEvent se;
      ASSERT_TRUE(se.ok());
      auto stats =
          cuda::ScatterBatchAsync(cache.DeviceView(), kChunk, gpu_chunks, se.Options(engine));
      ASSERT_TRUE(stats.ok()) << stats.status().ToString();
      ASSERT_TRUE(se.event().Synchronize().ok());
      ASSERT_TRUE(ScatterBatch(cache.HostView(), kChunk, cpu_chunks).ok());
      const std::vector<uint8_t> got = cache.Download();
      ASSERT_FALSE(got.empty());
      EXPECT_TRUE(got == cache.HostBytes()) << "engine bytes differ from the CPU kernels'";
    }
  }
}

TEST_P(CudaKvCopyTest, LargeBatchesSpanSeveralLaunchesAndStayExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng = MakeRng();
  // 60 chunks of 16 blocks: (3 + 16) words each, far beyond one launch's arguments.
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 2, 16, 1000, 4);
  const uint64_t chunk = 64;
  const size_t count = 60;
  DeviceCache cache(lay);
  ASSERT_TRUE(cache.ok());
  cache.Randomize(&rng);
  CUDA_OK(cache.Upload());
  const uint64_t ob = lay.ObjectBytes(chunk).value();
  Objects objects(GetParam(), ob, count);
  ASSERT_TRUE(objects.ok());
  CUDA_OK(objects.Poison());
  const std::vector<uint64_t> tokens(count, chunk);
  const auto ids = BlockIdsFor(tokens, lay.block_size, lay.num_blocks, /*distinct=*/true, &rng);
  const std::vector<ChunkCopy> gpu_chunks = MakeChunks(ids, tokens, {}, objects.gpu(0), ob);
  const std::vector<ChunkCopy> cpu_chunks = MakeChunks(ids, tokens, {}, objects.cpu(0), ob);
  StreamAndEvent se;
  ASSERT_TRUE(se.ok());
  CudaCopyOptions options = se.Options(CopyEngine::kKernel);
  options.max_blocks = 64;  // the grid-stride loop covers the rest
  auto stats = cuda::GatherBatchAsync(cache.DeviceView(), chunk, gpu_chunks, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_GT(stats->launches, 1u);
  ASSERT_TRUE(se.event().Synchronize().ok());
  ASSERT_TRUE(GatherBatch(cache.HostView(), chunk, cpu_chunks).ok());
  EXPECT_TRUE(objects.GpuBytes() == objects.reference());

  // And back, into a poisoned cache, through the same path.
  DeviceCache target(lay);
  ASSERT_TRUE(target.ok());
  KvCacheView host_target = target.HostView();
  for (auto* l : host_target.layers) std::memset(l, kPoison, LayerExtent(lay));
  CUDA_OK(target.Upload());
  stats = cuda::ScatterBatchAsync(target.DeviceView(), chunk, gpu_chunks, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_TRUE(se.event().Synchronize().ok());
  ASSERT_TRUE(ScatterBatch(host_target, chunk, cpu_chunks).ok());
  EXPECT_TRUE(target.Download() == target.HostBytes());
}

INSTANTIATE_TEST_SUITE_P(Places, CudaKvCopyTest,
                         ::testing::Values(ObjectPlace::kRegisteredHost, ObjectPlace::kDevice),
                         [](const ::testing::TestParamInfo<ObjectPlace>& param) {
                           return param.param == ObjectPlace::kDevice
                                      ? std::string("Device")
                                      : std::string("RegisteredHost");
                         });

TEST(CudaKvCopyGpuTest, ObjectsAcrossRegistrationPiecesCopyExactly) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng = MakeRng();
  // Objects of 3 pages in registration pieces of 2 pages: most objects straddle a boundary.
  const KvCacheLayout lay = MakeLayout(KvLayout::kNHD, 4, 32, 64, 2);  // pbb = 4*3*32*4 = 1536
  const uint64_t chunk = 8;
  const uint64_t ob = lay.ObjectBytes(chunk).value();  // 2 * 2 * 2 * 1536 = 12288 = 3 pages
  ASSERT_EQ(ob, 3 * kPage);
  DeviceCache cache(lay);
  ASSERT_TRUE(cache.ok());
  cache.Randomize(&rng);
  CUDA_OK(cache.Upload());
  const size_t count = 8;
  for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
    SCOPED_TRACE(cuda::CopyEngineName(engine));
    Objects objects(ObjectPlace::kRegisteredHost, ob, count, 2 * kPage);
    ASSERT_TRUE(objects.ok());
    CUDA_OK(objects.Poison());
    std::vector<std::vector<int64_t>> ids;
    for (size_t i = 0; i < count; ++i) ids.push_back({int64_t(2 * i), int64_t(2 * i + 1)});
    const std::vector<ChunkCopy> gpu_chunks =
        MakeChunks(ids, std::vector<uint64_t>(count, chunk), {}, objects.gpu(0), ob);
    const std::vector<ChunkCopy> cpu_chunks =
        MakeChunks(ids, std::vector<uint64_t>(count, chunk), {}, objects.cpu(0), ob);
    StreamAndEvent se;
    ASSERT_TRUE(se.ok());
    auto stats = cuda::GatherBatchAsync(cache.DeviceView(), chunk, gpu_chunks, se.Options(engine));
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    ASSERT_TRUE(se.event().Synchronize().ok());
    ASSERT_TRUE(GatherBatch(cache.HostView(), chunk, cpu_chunks).ok());
    EXPECT_TRUE(objects.GpuBytes() == objects.reference());
  }
}

TEST(CudaKvCopyGpuTest, MemoryTheGpuCannotReachIsRejected) {
  SKIP_WITHOUT_GPU();
  const KvCacheLayout lay = MakeLayout(KvLayout::kMLA, 2, 64, 8);
  DeviceCache cache(lay);
  ASSERT_TRUE(cache.ok());
  const uint64_t ob = lay.ObjectBytes(8).value();
  std::vector<uint8_t> pageable(ob);  // never registered
  const std::vector<int64_t> ids = {0, 1};
  ChunkCopy ch;
  ch.block_ids = ids;
  ch.num_tokens = 8;
  ch.object = pageable.data();
  ch.object_size = ob;
  for (CopyEngine engine : {CopyEngine::kKernel, CopyEngine::kDma}) {
    CudaCopyOptions options;
    options.engine = engine;
    EXPECT_EQ(cuda::GatherBatchAsync(cache.DeviceView(), 8, {ch}, options).status().code(),
              StatusCode::kInvalidArgument);
    // Host memory as "GPU" layers.
    KvCacheView host_layers = cache.HostView();
    Objects objects(ObjectPlace::kDevice, ob, 1);
    ASSERT_TRUE(objects.ok());
    ChunkCopy dev = ch;
    dev.object = objects.gpu(0);
    EXPECT_EQ(cuda::GatherBatchAsync(host_layers, 8, {dev}, options).status().code(),
              StatusCode::kInvalidArgument);
  }
}

TEST(CudaKvCopyGpuTest, DmaUsesTheBatchApiExceptOnTheLegacyStream) {
  SKIP_WITHOUT_GPU();
  const KvCacheLayout lay = MakeLayout(KvLayout::kHND, 2, 64, 8);
  DeviceCache cache(lay);
  ASSERT_TRUE(cache.ok());
  const uint64_t ob = lay.ObjectBytes(8).value();
  Objects objects(ObjectPlace::kDevice, ob, 1);
  ASSERT_TRUE(objects.ok());
  const std::vector<int64_t> ids = {0, 1};  // adjacent blocks: merged segments
  ChunkCopy ch;
  ch.block_ids = ids;
  ch.num_tokens = 8;
  ch.object = objects.gpu(0);
  ch.object_size = ob;
  StreamAndEvent se;
  ASSERT_TRUE(se.ok());
  auto stats = cuda::GatherBatchAsync(cache.DeviceView(), 8, {ch}, se.Options(CopyEngine::kDma));
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->batch_api, CUDART_VERSION >= 12080);
  // 3 layers x 2 planes, each plane's two adjacent blocks one segment.
  EXPECT_EQ(stats->segments, 6u);
  ASSERT_TRUE(se.event().Synchronize().ok());
  CudaCopyOptions legacy;
  legacy.engine = CopyEngine::kDma;
  stats = cuda::GatherBatchAsync(cache.DeviceView(), 8, {ch}, legacy);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_FALSE(stats->batch_api);
  CUDA_OK(cudaStreamSynchronize(nullptr));
}

TEST(CudaEventTest, ReportsCompletion) {
  SKIP_WITHOUT_GPU();
  EXPECT_EQ(cuda::CudaEvent::Create(cuda::ProbeRuntime().device_count).status().code(),
            StatusCode::kInvalidArgument);
  auto event = cuda::CudaEvent::Create(0);
  ASSERT_TRUE(event.ok()) << event.status().ToString();
  auto done = (*event)->Query();
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(*done);  // nothing recorded yet
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_TRUE((*event)->Record(stream).ok());
  ASSERT_TRUE((*event)->Synchronize().ok());
  done = (*event)->Query();
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(*done);
  CUDA_OK(cudaStreamDestroy(stream));
}

TEST(HostRegistrationTest, RegistersInPiecesTimesThemAndUnregisters) {
  SKIP_WITHOUT_GPU();
  HostBuffer buf(10 * kPage);
  cuda::HostRegistrationOptions options;
  options.piece_bytes = 4 * kPage;
  auto reg = cuda::HostRegistration::Register(buf.data, buf.size, options);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  EXPECT_TRUE((*reg)->registered());
  EXPECT_EQ((*reg)->piece_seconds().size(), 3u);
  EXPECT_EQ((*reg)->PieceOffsets(), (std::vector<uint64_t>{0, 4 * kPage, 8 * kPage}));
  double sum = 0;
  for (double s : (*reg)->piece_seconds()) {
    EXPECT_GE(s, 0.0);
    sum += s;
  }
  EXPECT_DOUBLE_EQ(sum, (*reg)->register_seconds());
  cudaPointerAttributes attr{};
  CUDA_OK(cudaPointerGetAttributes(&attr, buf.data + 9 * kPage));
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  // Registering an overlapping range fails and leaves nothing of its own registered.
  auto again = cuda::HostRegistration::Register(buf.data, buf.size, options);
  EXPECT_FALSE(again.ok());
  ASSERT_TRUE((*reg)->Unregister().ok());
  EXPECT_FALSE((*reg)->registered());
  EXPECT_TRUE((*reg)->Unregister().ok());  // idempotent
  CUDA_OK(cudaPointerGetAttributes(&attr, buf.data));
  EXPECT_EQ(attr.type, cudaMemoryTypeUnregistered);
  // Once unregistered, the range can be registered again.
  auto third = cuda::HostRegistration::Register(buf.data, buf.size, options);
  ASSERT_TRUE(third.ok()) << third.status().ToString();
}

TEST(HostRegistrationTest, AFailedPieceUndoesTheEarlierOnes) {
  SKIP_WITHOUT_GPU();
  HostBuffer buf(8 * kPage);
  cuda::HostRegistrationOptions small;
  small.piece_bytes = kPage;
  // Register the last page alone, then ask for the whole range: the last piece fails.
  auto tail = cuda::HostRegistration::Register(buf.data + 7 * kPage, kPage, small);
  ASSERT_TRUE(tail.ok()) << tail.status().ToString();
  auto whole = cuda::HostRegistration::Register(buf.data, buf.size, small);
  EXPECT_FALSE(whole.ok());
  cudaPointerAttributes attr{};
  CUDA_OK(cudaPointerGetAttributes(&attr, buf.data));
  EXPECT_EQ(attr.type, cudaMemoryTypeUnregistered);
  CUDA_OK(cudaPointerGetAttributes(&attr, buf.data + 6 * kPage));
  EXPECT_EQ(attr.type, cudaMemoryTypeUnregistered);
}

}  // namespace
}  // namespace lmcache_cpp
