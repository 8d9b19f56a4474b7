// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Internal helpers of lmcache_cpp::cuda: CUDA errors as Status values and a scoped current
// device. Host code only; includes the CUDA runtime header.
#ifndef LMCACHE_CPP_CUDA_CUDA_UTIL_H_
#define LMCACHE_CPP_CUDA_CUDA_UTIL_H_

#include <cuda_runtime.h>

#include <string>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace cuda {
namespace internal {

// "<what>: <cudaErrorName> (<description>)" with a code that says what the caller can do:
// Unavailable (no driver or device, a driver too old), ResourceExhausted (out of device or
// pinnable memory), AlreadyExists (host memory registered already), InvalidArgument (the runtime
// rejected a value), Internal (anything else). Clears the runtime's last error.
Status FromCuda(cudaError_t err, const std::string& what);

// Makes `device` the calling thread's current device for the scope and restores the previous
// one after (only when they differ). Neither changes nor waits for any device work.
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice();
  Status Set(int device);

 private:
  int previous_ = -1;  // -1: nothing to restore
};

}  // namespace internal
}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_CUDA_UTIL_H_
