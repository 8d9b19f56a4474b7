// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The KV copy kernel: one thread block per piece (a grid-stride loop when the grid is capped),
// each piece copied by kernel::CopyPiece (kv_copy_kernel.h). Pieces never share bytes, so blocks
// never wait for each other and need no shared memory or barriers.

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_copy_kernel.h"

namespace lmcache_cpp {
namespace cuda {
namespace internal {
namespace {

__global__ void KvCopyKernel(const __grid_constant__ KernelArgs args) {
  for (uint64_t p = blockIdx.x; p < args.total_pieces; p += gridDim.x) {
    kernel::CopyPiece(args, p, threadIdx.x, blockDim.x);
  }
}

}  // namespace

cudaError_t LaunchKvCopyKernel(const KernelArgs& args, uint32_t blocks, uint32_t threads,
                               cudaStream_t stream) {
  KvCopyKernel<<<blocks, threads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace internal
}  // namespace cuda
}  // namespace lmcache_cpp
