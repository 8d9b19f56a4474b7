// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Internal: the KV copy kernel's argument block and the work of one piece, shared by the kernel
// (kv_copy_kernel.cu, compiled by nvcc) and the host-side packing (kv_copy_cuda.cc). CopyPiece is
// a host-and-device function so that the tests can run the kernel's exact indexing on the CPU
// (every thread of every block in turn) and compare it with the CPU kernels without a GPU.
//
// KernelArgs travels by value as the kernel's only parameter, so a launch needs no device memory
// of its own and nothing to keep alive after it is queued.
//
// words[0, num_layers): each layer's tensor base address (device).
// Then num_entries entries, each a run of blocks of one chunk:
//   words[w]       object base address (device view; the whole object, not the entry's part)
//   words[w + 1]   first object slot of the entry (low 32 bits) | blocks in the entry (high 32)
//   words[w + 2]   tokens of the entry's first block to leave alone (Scatter; low 32 bits) |
//                  index of the entry's first piece within the launch (high 32)
//   words[w + 3 + j]  byte offset of the entry's block j in a layer tensor (block id * stride)
// Pieces are numbered entry by entry, then layer, plane, block, as the CPU kernels order them.
#ifndef LMCACHE_CPP_CUDA_KV_COPY_KERNEL_H_
#define LMCACHE_CPP_CUDA_KV_COPY_KERNEL_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "lmcache_cpp/cuda/kv_copy_cuda.h"

#if defined(__CUDACC__)
#define LMCACHE_CPP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMCACHE_CPP_HOST_DEVICE inline
#endif

namespace lmcache_cpp {
namespace cuda {
namespace internal {

inline constexpr uint32_t kEntryHeaderWords = 3;

struct KernelArgs {
  uint64_t plane_stride;   // engine bytes from plane 0 to plane 1 of a block
  uint64_t piece_bytes;    // bytes of one block plane
  uint64_t segment_bytes;  // object bytes of one (layer, plane): chunk blocks * piece_bytes
  uint64_t token_bytes;    // bytes of one token within a run (HND: D * E; else H * D * E)
  uint64_t total_pieces;   // pieces in this launch
  uint32_t block_size;     // tokens per block
  uint32_t outer;          // runs of tokens per block plane: H for HND, else 1
  uint32_t num_layers;
  uint32_t num_planes;
  uint32_t num_entries;
  uint32_t scatter;  // 0: engine -> object (gather); 1: object -> engine (scatter)
  uint64_t words[kMaxKernelWords];
};
// The classic kernel parameter limit (4 KiB) holds it, so no large-parameter support is needed.
static_assert(sizeof(KernelArgs) <= 4000, "kernel arguments must fit the 4 KiB parameter space");

// Queues the kernel on `stream`: `blocks` thread blocks (a grid-stride loop covers the rest of
// the pieces) of `threads` threads. Returns the launch's error (cudaSuccess when queued).
cudaError_t LaunchKvCopyKernel(const KernelArgs& args, uint32_t blocks, uint32_t threads,
                               cudaStream_t stream);

namespace kernel {

// sizeof(V) bytes at p: a plain (vector) access on the device; memcpy on the host, where V is a
// CUDA vector type aliasing bytes.
template <typename V>
LMCACHE_CPP_HOST_DEVICE V Load(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <typename V>
LMCACHE_CPP_HOST_DEVICE void Store(uint8_t* p, const V& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(V));
#endif
}

// Thread `thread` of `threads` copies its share of `runs` runs of `run` bytes, `pitch` bytes
// apart in both src and dst, with accesses of sizeof(V) bytes: four loads in flight before the
// stores. REQUIRES: src, dst, run and (runs > 1) pitch are multiples of sizeof(V).
template <typename V>
LMCACHE_CPP_HOST_DEVICE void CopyRunsAs(uint8_t* dst, const uint8_t* src, uint64_t run,
                                        uint64_t pitch, uint32_t runs, uint32_t thread,
                                        uint32_t threads) {
  constexpr uint64_t kV = sizeof(V);
  const uint64_t n = run / kV;
  const uint64_t step = threads;
  for (uint32_t r = 0; r < runs; ++r) {
    const uint8_t* s = src + r * pitch;
    uint8_t* d = dst + r * pitch;
    uint64_t i = thread;
    for (; i + 3 * step < n; i += 4 * step) {
      const V a = Load<V>(s + i * kV);
      const V b = Load<V>(s + (i + step) * kV);
      const V c = Load<V>(s + (i + 2 * step) * kV);
      const V e = Load<V>(s + (i + 3 * step) * kV);
      Store<V>(d + i * kV, a);
      Store<V>(d + (i + step) * kV, b);
      Store<V>(d + (i + 2 * step) * kV, c);
      Store<V>(d + (i + 3 * step) * kV, e);
    }
    for (; i < n; i += step) Store<V>(d + i * kV, Load<V>(s + i * kV));
  }
}

// The widest access that every address and length allows.
LMCACHE_CPP_HOST_DEVICE void CopyRuns(uint8_t* dst, const uint8_t* src, uint64_t run,
                                      uint64_t pitch, uint32_t runs, uint32_t thread,
                                      uint32_t threads) {
  const uint64_t align = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(dst)) |
                         static_cast<uint64_t>(reinterpret_cast<uintptr_t>(src)) | run |
                         (runs > 1 ? pitch : 0);
  if ((align & 15) == 0) {
    CopyRunsAs<uint4>(dst, src, run, pitch, runs, thread, threads);
  } else if ((align & 7) == 0) {
    CopyRunsAs<uint2>(dst, src, run, pitch, runs, thread, threads);
  } else if ((align & 3) == 0) {
    CopyRunsAs<uint32_t>(dst, src, run, pitch, runs, thread, threads);
  } else if ((align & 1) == 0) {
    CopyRunsAs<uint16_t>(dst, src, run, pitch, runs, thread, threads);
  } else {
    CopyRunsAs<uint8_t>(dst, src, run, pitch, runs, thread, threads);
  }
}

// Thread `thread` of the `threads` of a thread block does its share of piece `p` of the launch.
// REQUIRES: p < args.total_pieces.
LMCACHE_CPP_HOST_DEVICE void CopyPiece(const KernelArgs& args, uint64_t p, uint32_t thread,
                                       uint32_t threads) {
  const uint64_t pieces_per_block = uint64_t{args.num_layers} * args.num_planes;
  // The entry holding piece p: entries are few (a launch's words are bounded), so walk them.
  uint32_t w = args.num_layers;
  uint64_t slot_blocks = args.words[w + 1];
  uint64_t skip_start = args.words[w + 2];
  for (uint32_t e = 0; e + 1 < args.num_entries; ++e) {
    const uint64_t blocks = slot_blocks >> 32;
    if (p < (skip_start >> 32) + pieces_per_block * blocks) break;
    w += kEntryHeaderWords + static_cast<uint32_t>(blocks);
    slot_blocks = args.words[w + 1];
    skip_start = args.words[w + 2];
  }
  const uint64_t blocks = slot_blocks >> 32;
  const uint64_t slot = slot_blocks & 0xffffffffu;
  const uint64_t head_skip = skip_start & 0xffffffffu;
  const uint64_t local = p - (skip_start >> 32);
  const uint64_t j = local % blocks;
  const uint64_t layer_plane = local / blocks;
  const uint64_t plane = layer_plane % args.num_planes;
  const uint64_t layer = layer_plane / args.num_planes;

  uint8_t* engine = reinterpret_cast<uint8_t*>(args.words[layer]) + plane * args.plane_stride +
                    args.words[w + kEntryHeaderWords + j];
  uint8_t* object = reinterpret_cast<uint8_t*>(args.words[w]) + layer_plane * args.segment_bytes +
                    (slot + j) * args.piece_bytes;
  uint64_t offset = 0;
  uint64_t run = args.piece_bytes;
  uint64_t pitch = args.piece_bytes;
  uint32_t runs = 1;
  if (args.scatter != 0 && j == 0 && head_skip != 0) {
    // A partly skipped block: only tokens >= head_skip, one run per head for HND.
    offset = head_skip * args.token_bytes;
    run = (args.block_size - head_skip) * args.token_bytes;
    pitch = uint64_t{args.block_size} * args.token_bytes;
    runs = args.outer;
  }
  if (args.scatter != 0) {
    CopyRuns(engine + offset, object + offset, run, pitch, runs, thread, threads);
  } else {
    CopyRuns(object + offset, engine + offset, run, pitch, runs, thread, threads);
  }
}

}  // namespace kernel
}  // namespace internal
}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_KV_COPY_KERNEL_H_
