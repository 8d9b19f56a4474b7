// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The CUDA target's first translation unit: a device probe used by the build check and, later,
// by the GPU copy kernels' tests to skip cleanly on machines without a GPU.

#include <cuda_runtime.h>

namespace lmcache_cpp {
namespace cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device (never an error).
int VisibleDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace lmcache_cpp
