// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// GPU copy kernels between an engine's paged KV cache in GPU memory and chunk objects in host
// memory registered with CUDA (the L1 arena, see HostRegistration) or in GPU memory (a staging
// buffer). Part of lmcache_cpp::cuda (builds with LMCACHE_CPP_ENABLE_CUDA=ON).
//
// Same layouts, object format, skip semantics and argument checks as the CPU kernels of
// kv_copy.h: a GatherBatchAsync/ScatterBatchAsync writes exactly the bytes GatherBatch/ScatterBatch
// would write, and rejects exactly the calls they reject, with the same InvalidArgument message,
// before any CUDA call. The view's layer pointers are device addresses here.
//
// Two copy engines do the same copies:
//   kKernel  one kernel launch per batch (more only when the launch arguments overflow 4 KiB: at
//            most kMaxKernelWords words of layer pointers, chunk headers and block offsets per
//            launch; a chunk's layers always share its launch). One thread block per
//            (chunk, layer, plane, block) piece, 16-byte accesses where every address and length
//            allows, else the widest that does. Reads and writes host memory over the bus.
//   kDma     the copy engines: the pieces become memcpy segments (adjacent ones merged), issued as
//            one cudaMemcpyBatchAsync where the runtime has it (CUDA >= 12.8) and the stream is
//            not the legacy default stream, else one cudaMemcpyAsync per segment.
//
// Asynchrony: both only queue work on options.stream and return; options.done_event, when set,
// is recorded on the stream after the copies (a CudaEvent's handle or any cudaEvent_t). No call
// synchronises the device or the stream. The memory named by the call must stay valid, and
// objects must not be reused, until that work has finished (REQUIRES).
//
// Checks beyond kv_copy.h's, after its checks and before any launch: CUDA usable (Unavailable),
// the kernel path's argument space (NotSupported for more layers than a launch can address),
// layer pointers in device memory of one device (InvalidArgument), each object's first byte in
// registered or pinned host memory, managed memory or device memory of that device
// (InvalidArgument; unregistered pageable memory would make the DMA path synchronous and the
// kernel path fault), and a stream of that device. The copy runs with that device current; the
// caller's current device is restored. Not checkable (REQUIRES): that the whole extent of each
// tensor and object is such memory, and that objects and engine tensors do not overlap.
//
// Thread safety: reentrant; calls on different streams run concurrently on the GPU, calls that
// write the same bytes race.
//
// Stability: unstable until the GPU path has run on a GPU (docs/design/gpu.md).
#ifndef LMCACHE_CPP_CUDA_KV_COPY_CUDA_H_
#define LMCACHE_CPP_CUDA_KV_COPY_CUDA_H_

#include <cstdint>
#include <vector>

#include "lmcache_cpp/cuda/device.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace cuda {

enum class CopyEngine : uint8_t {
  kKernel = 0,
  kDma = 1,
};

// "kernel" or "dma".
const char* CopyEngineName(CopyEngine engine);

// 64-bit words of kernel arguments per launch: num_layers, then 3 + (blocks) per chunk part.
inline constexpr uint32_t kMaxKernelWords = 480;

struct CudaCopyOptions {
  CudaCopyOptions() {}  // NOLINT
  CopyEngine engine = CopyEngine::kKernel;
  Stream stream = nullptr;     // where the work is queued; nullptr = the legacy default stream
  Event done_event = nullptr;  // recorded on `stream` after the copies when not null
  uint32_t threads_per_block = 256;  // kernel: a multiple of 32 in [32, 1024]
  uint32_t max_blocks = 0;           // kernel: thread blocks per launch; 0 = one per piece
  bool use_batch_api = true;         // DMA: false forces one cudaMemcpyAsync per segment
};

// What one call queued.
struct CudaCopyStats {
  uint64_t bytes = 0;      // bytes copied
  uint64_t pieces = 0;     // (chunk, layer, plane, block) pieces
  uint32_t launches = 0;   // kernel launches (kKernel)
  uint64_t segments = 0;   // memcpy segments after merging adjacent pieces (kDma)
  bool batch_api = false;  // kDma: the segments went through cudaMemcpyBatchAsync
};

// Engine blocks -> objects for every chunk (ChunkCopy::skip_tokens must be 0), queued on
// options.stream. Errors: as GatherBatch in kv_copy.h, then as listed above; Internal when the
// runtime fails a launch or copy (nothing is queued after the failing one).
Result<CudaCopyStats> GatherBatchAsync(const KvCacheView& view, uint64_t chunk_size,
                                       const std::vector<ChunkCopy>& chunks,
                                       const CudaCopyOptions& options = CudaCopyOptions());

// Objects -> engine blocks, leaving each chunk's first skip_tokens tokens untouched. Errors: as
// ScatterBatch in kv_copy.h (including a block written twice), then as GatherBatchAsync.
Result<CudaCopyStats> ScatterBatchAsync(const KvCacheView& view, uint64_t chunk_size,
                                        const std::vector<ChunkCopy>& chunks,
                                        const CudaCopyOptions& options = CudaCopyOptions());

}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_KV_COPY_CUDA_H_
