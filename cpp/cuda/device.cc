// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/cuda/device.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cuda_util.h"
#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace cuda {

// ------------------------------------------------------------------------------------------
// Errors and the current device.

namespace internal {

Status FromCuda(cudaError_t err, const std::string& what) {
  (void)cudaGetLastError();  // a non-sticky error must not surface again in a later call
  std::string message = what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorStubLibrary:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorInitializationError: return Status::Unavailable(std::move(message));
    case cudaErrorMemoryAllocation: return Status::ResourceExhausted(std::move(message));
    case cudaErrorHostMemoryAlreadyRegistered: return Status::AlreadyExists(std::move(message));
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle: return Status::InvalidArgument(std::move(message));
    default: return Status::Internal(std::move(message));
  }
}

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

Status ScopedDevice::Set(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return FromCuda(err, "cudaGetDevice");
  if (current == device) return Status::Ok();
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return FromCuda(err, "cudaSetDevice(" + std::to_string(device) + ")");
  if (previous_ < 0) previous_ = current;
  return Status::Ok();
}

}  // namespace internal

using internal::FromCuda;

// ------------------------------------------------------------------------------------------
// ProbeRuntime

namespace {

std::string VersionString(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

RuntimeInfo Probe() {
  RuntimeInfo info;
  (void)cudaRuntimeGetVersion(&info.runtime_version);
  // Succeeds with 0 when no driver is installed.
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  const std::string runtime = "runtime " + VersionString(info.runtime_version);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  (void)cudaGetLastError();
  if (err == cudaSuccess && count > 0) {
    info.usable = true;
    info.device_count = count;
    return info;
  }
  if (info.driver_version == 0) {
    info.reason = "no CUDA driver: libcuda.so was not found (" + runtime + ")";
  } else if (err == cudaErrorInsufficientDriver) {
    info.reason = "the CUDA driver supports CUDA " + VersionString(info.driver_version) +
                  ", older than the " + runtime + " this build links";
  } else if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0)) {
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    info.reason = std::string("no CUDA device") +
                  (visible != nullptr ? std::string(" (CUDA_VISIBLE_DEVICES=") + visible + ")"
                                      : std::string()) +
                  " (driver " + VersionString(info.driver_version) + ", " + runtime + ")";
  } else {
    info.reason = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" +
                  cudaGetErrorString(err) + ")";
  }
  return info;
}

}  // namespace

RuntimeInfo ProbeRuntime() {
  // Devices and driver do not come and go within a process (CUDA reads CUDA_VISIBLE_DEVICES once).
  static const RuntimeInfo info = Probe();
  return info;
}

Status CheckUsable() {
  const RuntimeInfo& info = ProbeRuntime();
  if (info.usable) return Status::Ok();
  return Status::Unavailable("CUDA is not usable: " + info.reason);
}

// ------------------------------------------------------------------------------------------
// CudaEvent

Result<std::unique_ptr<CudaEvent>> CudaEvent::Create(int device) {
  LMCACHE_RETURN_IF_ERROR(CheckUsable());
  internal::ScopedDevice scoped;
  if (device >= 0) {
    if (device >= ProbeRuntime().device_count) {
      return Status::InvalidArgument("no CUDA device " + std::to_string(device) + " (" +
                                     std::to_string(ProbeRuntime().device_count) + " visible)");
    }
    LMCACHE_RETURN_IF_ERROR(scoped.Set(device));
  }
  cudaEvent_t event = nullptr;
  const cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  if (err != cudaSuccess) return FromCuda(err, "cudaEventCreateWithFlags");
  return std::unique_ptr<CudaEvent>(new CudaEvent(event));
}

CudaEvent::~CudaEvent() { (void)cudaEventDestroy(event_); }

Status CudaEvent::Record(Stream stream) {
  const cudaError_t err = cudaEventRecord(event_, stream);
  return err == cudaSuccess ? Status::Ok() : FromCuda(err, "cudaEventRecord");
}

Result<bool> CudaEvent::Query() {
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  return FromCuda(err, "cudaEventQuery");
}

Status CudaEvent::Synchronize() {
  const cudaError_t err = cudaEventSynchronize(event_);
  return err == cudaSuccess ? Status::Ok() : FromCuda(err, "cudaEventSynchronize");
}

// ------------------------------------------------------------------------------------------
// HostRegistration

namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Result<std::unique_ptr<HostRegistration>> HostRegistration::Register(
    void* base, uint64_t size, const HostRegistrationOptions& options) {
  const long page_size = sysconf(_SC_PAGESIZE);
  const uint64_t page = page_size > 0 ? static_cast<uint64_t>(page_size) : 4096;
  if (base == nullptr) return Status::InvalidArgument("host registration: base is null");
  if (reinterpret_cast<uintptr_t>(base) % page != 0) {
    return Status::InvalidArgument("host registration: base is not aligned to the page size " +
                                   std::to_string(page));
  }
  if (size == 0) return Status::InvalidArgument("host registration: size is 0");
  if (options.piece_bytes == 0 || options.piece_bytes % page != 0) {
    return Status::InvalidArgument(
        "host registration: piece_bytes " + std::to_string(options.piece_bytes) +
        " must be a positive multiple of the page size " + std::to_string(page));
  }
  LMCACHE_RETURN_IF_ERROR(CheckUsable());
  // Create the current device's primary context now (cudaSetDevice does since CUDA 12, and
  // queues no work), so that its cost is not counted as registration time.
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err != cudaSuccess) return FromCuda(err, "creating the CUDA context");

  std::unique_ptr<HostRegistration> reg(new HostRegistration(base, size, options.piece_bytes));
  auto* bytes = static_cast<uint8_t*>(base);
  for (uint64_t offset = 0; offset < size; offset += options.piece_bytes) {
    const uint64_t n = std::min(options.piece_bytes, size - offset);
    const auto start = std::chrono::steady_clock::now();
    err = cudaHostRegister(bytes + offset, n, cudaHostRegisterPortable | cudaHostRegisterMapped);
    const double seconds = SecondsSince(start);
    if (err != cudaSuccess) {
      Status st = FromCuda(err, "cudaHostRegister of bytes [" + std::to_string(offset) + ", " +
                                    std::to_string(offset + n) + ")");
      for (uint64_t done = 0; done < offset; done += options.piece_bytes) {
        (void)cudaHostUnregister(bytes + done);
      }
      (void)cudaGetLastError();
      return st;
    }
    reg->piece_seconds_.push_back(seconds);
    reg->register_seconds_ += seconds;
  }
  reg->registered_ = true;
  return reg;
}

HostRegistration::~HostRegistration() {
  const Status st = Unregister();
  if (!st.ok()) Log(LogLevel::kWarning, "HostRegistration: " + st.ToString());
}

Status HostRegistration::Unregister() {
  if (!registered_) return Status::Ok();
  registered_ = false;
  Status first;
  auto* bytes = static_cast<uint8_t*>(base_);
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t offset = 0; offset < size_; offset += piece_bytes_) {
    const cudaError_t err = cudaHostUnregister(bytes + offset);
    if (err != cudaSuccess && first.ok()) {
      first = FromCuda(err, "cudaHostUnregister at offset " + std::to_string(offset));
    }
  }
  unregister_seconds_ = SecondsSince(start);
  return first;
}

std::vector<uint64_t> HostRegistration::PieceOffsets() const {
  std::vector<uint64_t> offsets;
  for (uint64_t offset = 0; offset < size_; offset += piece_bytes_) offsets.push_back(offset);
  return offsets;
}

}  // namespace cuda
}  // namespace lmcache_cpp
