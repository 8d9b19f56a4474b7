// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/cuda/kv_copy_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_util.h"
#include "kv_copy_cuda_internal.h"
#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace cuda {

const char* CopyEngineName(CopyEngine engine) {
  switch (engine) {
    case CopyEngine::kKernel: return "kernel";
    case CopyEngine::kDma: return "dma";
  }
  return "unknown";
}

namespace {

using internal::FromCuda;
using internal::KernelArgs;
using lmcache_cpp::internal::PlannedChunk;

std::string U64(uint64_t v) { return std::to_string(v); }

bool IsLegacyStream(Stream stream) {
  return stream == nullptr || stream == reinterpret_cast<Stream>(cudaStreamLegacy);
}

const char* MemoryTypeName(cudaMemoryType type) {
  switch (type) {
    case cudaMemoryTypeUnregistered: return "unregistered host memory";
    case cudaMemoryTypeHost: return "host memory";
    case cudaMemoryTypeDevice: return "device memory";
    case cudaMemoryTypeManaged: return "managed memory";
  }
  return "unknown memory";
}

// Checks where every pointer of the call lives; returns the device the copy runs on.
Result<int> CheckMemory(const KvCacheView& view, const std::vector<ChunkCopy>& chunks,
                        Stream stream) {
  int device = -1;
  for (size_t l = 0; l < view.layers.size(); ++l) {
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, view.layers[l]);
    if (err != cudaSuccess) {
      return FromCuda(err, "cudaPointerGetAttributes(layer " + U64(l) + ")");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      return Status::InvalidArgument("layer " + U64(l) + " is " + MemoryTypeName(attr.type) +
                                     ", not GPU memory");
    }
    if (device < 0) {
      device = attr.device;
    } else if (attr.device != device) {
      return Status::InvalidArgument("layer " + U64(l) + " is on device " +
                                     std::to_string(attr.device) + ", layer 0 on device " +
                                     std::to_string(device));
    }
  }
  for (size_t c = 0; c < chunks.size(); ++c) {
    const std::string where = "chunk " + U64(c) + ": object ";
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, chunks[c].object);
    if (err != cudaSuccess) return FromCuda(err, "cudaPointerGetAttributes(object)");
    switch (attr.type) {
      case cudaMemoryTypeHost:
        if (attr.devicePointer != static_cast<void*>(chunks[c].object)) {
          return Status::NotSupported(where +
                                      "is registered host memory that the device addresses "
                                      "elsewhere (no unified addressing of registered memory)");
        }
        break;
      case cudaMemoryTypeDevice:
        if (attr.device != device) {
          return Status::InvalidArgument(where + "is on device " + std::to_string(attr.device) +
                                         ", the KV cache on device " + std::to_string(device));
        }
        break;
      case cudaMemoryTypeManaged: break;
      case cudaMemoryTypeUnregistered:
      default:
        return Status::InvalidArgument(where + "is " + MemoryTypeName(attr.type) +
                                       ": register it with CUDA first (HostRegistration) or use "
                                       "pinned or device memory");
    }
  }
#if CUDART_VERSION >= 12080
  if (!IsLegacyStream(stream) && stream != reinterpret_cast<Stream>(cudaStreamPerThread)) {
    int stream_device = -1;
    const cudaError_t err = cudaStreamGetDevice(stream, &stream_device);
    if (err != cudaSuccess) return FromCuda(err, "cudaStreamGetDevice");
    if (stream_device != device) {
      return Status::InvalidArgument("the stream belongs to device " +
                                     std::to_string(stream_device) + ", the KV cache to device " +
                                     std::to_string(device));
    }
  }
#else
  (void)stream;
#endif
  return device;
}

// ------------------------------------------------------------------------------------------
// DMA path.

using internal::Segment;

// Cleared when the runtime or driver turns cudaMemcpyBatchAsync down, for the process.
std::atomic<bool> g_batch_api_works{true};

// True when the batch went through cudaMemcpyBatchAsync; false when the caller should issue the
// segments one by one (the API is missing or was refused). Errors other than a refusal return.
Result<bool> TryBatch(const std::vector<Segment>& segments, Stream stream) {
#if CUDART_VERSION >= 12080
  if (!g_batch_api_works.load(std::memory_order_relaxed)) return false;
  // Bounded batches keep the descriptor arrays small; the API has no documented maximum.
  constexpr size_t kMaxBatch = 4096;
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (size_t begin = 0; begin < segments.size(); begin += kMaxBatch) {
    const size_t n = std::min(kMaxBatch, segments.size() - begin);
    dsts.clear();
    srcs.clear();
    sizes.clear();
    for (size_t k = begin; k < begin + n; ++k) {
      dsts.push_back(segments[k].dst);
      srcs.push_back(segments[k].src);
      sizes.push_back(segments[k].size);
    }
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                                 &attr_index, 1, stream);
#else
    size_t fail_index = 0;
    const cudaError_t err =
        cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), n, &attr,
                             &attr_index, 1, &fail_index, stream);
#endif
    if (err == cudaSuccess) continue;
    if (begin == 0 && (err == cudaErrorNotSupported || err == cudaErrorCallRequiresNewerDriver ||
                       err == cudaErrorInvalidValue)) {
      // Refused before anything was queued: per-segment copies from here on, for the process.
      g_batch_api_works.store(false, std::memory_order_relaxed);
      Log(LogLevel::kWarning, std::string("cudaMemcpyBatchAsync refused (") +
                                  cudaGetErrorName(err) +
                                  "); the DMA path uses one cudaMemcpyAsync per segment");
      (void)cudaGetLastError();
      return false;
    }
    return FromCuda(err, "cudaMemcpyBatchAsync");
  }
  return true;
#else
  (void)segments;
  (void)stream;
  return false;
#endif
}

Status RunDma(const std::vector<Segment>& segments, const CudaCopyOptions& options,
              CudaCopyStats* stats) {
  stats->segments = segments.size();
  if (segments.empty()) return Status::Ok();
  if (options.use_batch_api && !IsLegacyStream(options.stream)) {
    bool batched = false;
    LMCACHE_ASSIGN_OR_RETURN(batched, TryBatch(segments, options.stream));
    if (batched) {
      stats->batch_api = true;
      return Status::Ok();
    }
  }
  for (const Segment& s : segments) {
    const cudaError_t err =
        cudaMemcpyAsync(s.dst, s.src, s.size, cudaMemcpyDefault, options.stream);
    if (err != cudaSuccess) return FromCuda(err, "cudaMemcpyAsync");
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------

Result<CudaCopyStats> RunAsync(const KvCacheView& view, uint64_t chunk_size,
                               const std::vector<ChunkCopy>& chunks, bool scatter,
                               const CudaCopyOptions& options) {
  Result<internal::GpuPlan> planned =
      internal::PlanGpuCopy(view, chunk_size, chunks, scatter, options);
  if (!planned.ok()) return planned.status();
  const internal::GpuPlan& plan = planned.value();
  LMCACHE_RETURN_IF_ERROR(CheckUsable());
  int device = 0;
  LMCACHE_ASSIGN_OR_RETURN(device, CheckMemory(view, chunks, options.stream));
  internal::ScopedDevice scoped;
  LMCACHE_RETURN_IF_ERROR(scoped.Set(device));

  CudaCopyStats stats;
  const lmcache_cpp::internal::CopyGeometry& geo = plan.geo;
  const uint64_t per_block = geo.planes * view.layout.num_layers;
  for (const PlannedChunk& ch : plan.chunks) {
    stats.pieces += ch.blocks * per_block;
    stats.bytes += ch.blocks * per_block * geo.piece_bytes -
                   per_block * ch.head_skip * geo.token_bytes * geo.outer;
  }
  if (options.engine == CopyEngine::kKernel) {
    LMCACHE_RETURN_IF_ERROR(internal::PackKernelLaunches(
        view, plan, kMaxKernelWords, options.max_blocks,
        [&](const KernelArgs& args, uint32_t blocks) {
          const cudaError_t err =
              internal::LaunchKvCopyKernel(args, blocks, options.threads_per_block, options.stream);
          if (err != cudaSuccess) return FromCuda(err, "launching the KV copy kernel");
          stats.launches += 1;
          return Status::Ok();
        }));
  } else {
    LMCACHE_RETURN_IF_ERROR(RunDma(internal::DmaSegments(view, plan), options, &stats));
  }
  if (options.done_event != nullptr) {
    const cudaError_t err = cudaEventRecord(options.done_event, options.stream);
    if (err != cudaSuccess) return FromCuda(err, "cudaEventRecord");
  }
  return stats;
}

}  // namespace

Result<CudaCopyStats> GatherBatchAsync(const KvCacheView& view, uint64_t chunk_size,
                                       const std::vector<ChunkCopy>& chunks,
                                       const CudaCopyOptions& options) {
  return RunAsync(view, chunk_size, chunks, /*scatter=*/false, options);
}

Result<CudaCopyStats> ScatterBatchAsync(const KvCacheView& view, uint64_t chunk_size,
                                        const std::vector<ChunkCopy>& chunks,
                                        const CudaCopyOptions& options) {
  return RunAsync(view, chunk_size, chunks, /*scatter=*/true, options);
}

// ------------------------------------------------------------------------------------------
// The steps without CUDA calls (kv_copy_cuda_internal.h).

Result<internal::GpuPlan> internal::PlanGpuCopy(const KvCacheView& view, uint64_t chunk_size,
                                                const std::vector<ChunkCopy>& chunks, bool scatter,
                                                const CudaCopyOptions& options) {
  std::vector<PlannedChunk> planned;
  LMCACHE_RETURN_IF_ERROR(lmcache_cpp::internal::PlanCopies(
      view, chunk_size, chunks.data(), chunks.size(), scatter, /*batch=*/true, &planned));
  if (options.engine != CopyEngine::kKernel && options.engine != CopyEngine::kDma) {
    return Status::InvalidArgument("unknown copy engine " +
                                   std::to_string(static_cast<int>(options.engine)));
  }
  GpuPlan plan(view.layout, chunk_size, scatter);
  plan.chunks = std::move(planned);
  if (options.engine == CopyEngine::kKernel) {
    const uint32_t t = options.threads_per_block;
    if (t < 32 || t > 1024 || t % 32 != 0) {
      return Status::InvalidArgument("threads_per_block " + std::to_string(t) +
                                     " must be a multiple of 32 in [32, 1024]");
    }
    const uint64_t layers = view.layout.num_layers;
    if (layers + kEntryHeaderWords + 1 > kMaxKernelWords) {
      return Status::NotSupported(
          "the kernel path addresses at most " + U64(kMaxKernelWords - kEntryHeaderWords - 1) +
          " layers per launch; this cache has " + U64(layers) + " (use the DMA path)");
    }
    if (plan.geo.chunk_blocks > 0xffffffffu) {
      return Status::NotSupported("the kernel path handles at most 2^32 - 1 blocks per chunk");
    }
  }
  return plan;
}

Status internal::PackKernelLaunches(const KvCacheView& view, const GpuPlan& plan,
                                    uint32_t max_words, uint32_t max_blocks,
                                    const LaunchFn& launch) {
  KernelArgs args{};
  args.plane_stride = plan.geo.plane_stride;
  args.piece_bytes = plan.geo.piece_bytes;
  args.segment_bytes = plan.geo.chunk_blocks * plan.geo.piece_bytes;
  args.token_bytes = plan.geo.token_bytes;
  args.block_size = static_cast<uint32_t>(plan.geo.block_size);
  args.outer = static_cast<uint32_t>(plan.geo.outer);
  args.num_layers = view.layout.num_layers;
  args.num_planes = static_cast<uint32_t>(plan.geo.planes);
  args.scatter = plan.scatter ? 1 : 0;
  for (uint32_t l = 0; l < args.num_layers; ++l) {
    args.words[l] = reinterpret_cast<uintptr_t>(view.layers[l]);
  }
  uint32_t next_word = args.num_layers;
  auto flush = [&]() -> Status {
    if (args.num_entries == 0) return Status::Ok();
    uint64_t blocks = args.total_pieces;
    if (max_blocks != 0) blocks = std::min<uint64_t>(blocks, max_blocks);
    blocks = std::min<uint64_t>(blocks, 0x7fffffff);
    LMCACHE_RETURN_IF_ERROR(launch(args, static_cast<uint32_t>(blocks)));
    args.num_entries = 0;
    args.total_pieces = 0;
    next_word = args.num_layers;
    return Status::Ok();
  };
  const uint64_t pieces_per_block = plan.geo.planes * view.layout.num_layers;
  for (const PlannedChunk& chunk : plan.chunks) {
    uint64_t j = 0;
    while (j < chunk.blocks) {
      if (max_words - next_word < kEntryHeaderWords + 1) LMCACHE_RETURN_IF_ERROR(flush());
      const uint64_t room = max_words - next_word - kEntryHeaderWords;
      const uint64_t n = std::min<uint64_t>(chunk.blocks - j, room);
      const uint64_t first = chunk.first_block + j;
      uint64_t* w = &args.words[next_word];
      w[0] = reinterpret_cast<uintptr_t>(chunk.object);
      w[1] = first | (n << 32);
      w[2] = (j == 0 ? chunk.head_skip : 0) | (args.total_pieces << 32);
      for (uint64_t k = 0; k < n; ++k) {
        w[kEntryHeaderWords + k] =
            static_cast<uint64_t>(chunk.block_ids[first + k]) * plan.geo.block_stride;
      }
      next_word += kEntryHeaderWords + static_cast<uint32_t>(n);
      args.num_entries += 1;
      args.total_pieces += pieces_per_block * n;
      j += n;
    }
  }
  return flush();
}

std::vector<Segment> internal::DmaSegments(const KvCacheView& view, const GpuPlan& plan) {
  std::vector<Segment> segments;
  auto append = [&](uint8_t* engine, uint8_t* object, uint64_t n) {
    void* dst = plan.scatter ? static_cast<void*>(engine) : static_cast<void*>(object);
    const void* src =
        plan.scatter ? static_cast<const void*>(object) : static_cast<const void*>(engine);
    if (!segments.empty()) {
      Segment& last = segments.back();
      if (static_cast<uint8_t*>(last.dst) + last.size == dst &&
          static_cast<const uint8_t*>(last.src) + last.size == src) {
        last.size += n;
        return;
      }
    }
    segments.push_back({dst, src, static_cast<size_t>(n)});
  };
  for (const PlannedChunk& ch : plan.chunks) {
    for (uint64_t l = 0; l < view.layout.num_layers; ++l) {
      for (uint64_t p = 0; p < plan.geo.planes; ++p) {
        for (uint64_t j = 0; j < ch.blocks; ++j) {
          const uint64_t i = ch.first_block + j;
          uint8_t* engine = view.layers[l] + p * plan.geo.plane_stride +
                            static_cast<uint64_t>(ch.block_ids[i]) * plan.geo.block_stride;
          uint8_t* object = ch.object + plan.geo.ObjectOffset(l, p, i);
          if (!plan.scatter || j != 0 || ch.head_skip == 0) {
            append(engine, object, plan.geo.piece_bytes);
            continue;
          }
          const uint64_t run = (plan.geo.block_size - ch.head_skip) * plan.geo.token_bytes;
          for (uint64_t o = 0; o < plan.geo.outer; ++o) {
            const uint64_t off = (o * plan.geo.block_size + ch.head_skip) * plan.geo.token_bytes;
            append(engine + off, object + off, run);
          }
        }
      }
    }
  }
  return segments;
}

}  // namespace cuda
}  // namespace lmcache_cpp
