// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Internal: the host half of the GPU copies (kv_copy_cuda.cc) split into the steps that make no
// CUDA call (checking the arguments, packing kernel launches, cutting DMA segments), so that the
// tests can run them on machines without a GPU: the packed launches through kernel::CopyPiece on
// the CPU, the segments through memcpy, both against the CPU kernels.
#ifndef LMCACHE_CPP_CUDA_KV_COPY_CUDA_INTERNAL_H_
#define LMCACHE_CPP_CUDA_KV_COPY_CUDA_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "kv_copy_kernel.h"
#include "kv_copy_plan.h"
#include "lmcache_cpp/cuda/kv_copy_cuda.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace cuda {
namespace internal {

// A checked copy: the layout's arithmetic and the chunks with something to copy.
struct GpuPlan {
  GpuPlan(const KvCacheLayout& layout, uint64_t chunk_size, bool is_scatter)
      : scatter(is_scatter), geo(layout, chunk_size) {}

  bool scatter;
  lmcache_cpp::internal::CopyGeometry geo;
  std::vector<lmcache_cpp::internal::PlannedChunk> chunks;
};

// Every argument check of GatherBatchAsync/ScatterBatchAsync that needs no CUDA call: those of
// the CPU kernels (same messages), then the options (copy engine, threads per block) and the
// kernel path's limits.
Result<GpuPlan> PlanGpuCopy(const KvCacheView& view, uint64_t chunk_size,
                            const std::vector<ChunkCopy>& chunks, bool scatter,
                            const CudaCopyOptions& options);

// Packs the plan's pieces into kernel launches of at most `max_words` argument words (at most
// kMaxKernelWords; smaller in tests) and calls launch(args, thread_blocks) for each, in order,
// stopping at the first error. thread_blocks = the launch's pieces, capped by max_blocks when
// that is not 0. REQUIRES: the plan came from PlanGpuCopy for `view`;
// view.layout.num_layers + kEntryHeaderWords + 1 <= max_words <= kMaxKernelWords.
using LaunchFn = std::function<Status(const KernelArgs& args, uint32_t thread_blocks)>;
Status PackKernelLaunches(const KvCacheView& view, const GpuPlan& plan, uint32_t max_words,
                          uint32_t max_blocks, const LaunchFn& launch);

// One memcpy of the DMA path.
struct Segment {
  void* dst;
  const void* src;
  size_t size;
};

// The plan's pieces as memcpy segments in object order, a piece that continues the previous
// segment in both source and destination merged into it.
std::vector<Segment> DmaSegments(const KvCacheView& view, const GpuPlan& plan);

}  // namespace internal
}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_KV_COPY_CUDA_INTERNAL_H_
