// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CUDA IPC for the server-driven mode (ipc.h).

#include "ipc.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "cuda_util.h"

namespace lmcache_cpp {
namespace cuda {

using internal::FromCuda;

namespace {

// CUDA usable and `device` one of its devices, made current for the scope.
Status UseDevice(int device, internal::ScopedDevice* scoped) {
  LMCACHE_RETURN_IF_ERROR(CheckUsable());
  const int count = ProbeRuntime().device_count;
  if (device < 0 || device >= count) {
    return Status::InvalidArgument("no CUDA device " + std::to_string(device) + " (" +
                                   std::to_string(count) + " visible)");
  }
  return scoped->Set(device);
}

// The host function queued after the wait: opens the latch it was given and drops its share.
void CUDART_CB OpenLatch(void* data) {
  auto* latch = static_cast<std::shared_ptr<DeadlineLatch>*>(data);
  (*latch)->Open();
  delete latch;
}

// A handle the driver refused: InvalidArgument (it names nothing this process can open) unless
// CUDA itself is the problem (Unavailable, ResourceExhausted...).
Status Refused(cudaError_t err, const char* call, const char* what) {
  Status st = FromCuda(err, call);
  if (st.code() == StatusCode::kInternal || st.code() == StatusCode::kInvalidArgument) {
    return Status::InvalidArgument(std::string(what) + " (" + st.message() + ")");
  }
  return st;
}

}  // namespace

Result<IpcHandle> ParseIpcHandle(const uint8_t* data, size_t size) {
  if (data == nullptr || size != kIpcHandleBytes) {
    return Status::InvalidArgument("a CUDA IPC handle is " + std::to_string(kIpcHandleBytes) +
                                   " bytes, got " + std::to_string(size));
  }
  IpcHandle handle;
  std::memcpy(handle.data(), data, kIpcHandleBytes);
  return handle;
}

namespace {

// The runtime's handle type H from the wire bytes, with `device` made current for `scoped`.
template <typename H>
Result<H> ReadHandle(const uint8_t* data, size_t size, int device, internal::ScopedDevice* scoped) {
  static_assert(sizeof(H) == kIpcHandleBytes, "CUDA IPC handles are 64 bytes");
  LMCACHE_ASSIGN_OR_RETURN(IpcHandle bytes, ParseIpcHandle(data, size));
  LMCACHE_RETURN_IF_ERROR(UseDevice(device, scoped));
  H h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  return h;
}

}  // namespace

Result<std::unique_ptr<IpcMemory>> IpcMemory::Open(const uint8_t* handle, size_t size, int device) {
  internal::ScopedDevice scoped;
  LMCACHE_ASSIGN_OR_RETURN(cudaIpcMemHandle_t h,
                           ReadHandle<cudaIpcMemHandle_t>(handle, size, device, &scoped));
  void* base = nullptr;
  const cudaError_t err = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    return Refused(err, "cudaIpcOpenMemHandle",
                   "the KV handle names no device allocation this process can open");
  }
  return std::unique_ptr<IpcMemory>(new IpcMemory(base, device));
}

IpcMemory::~IpcMemory() {
  internal::ScopedDevice scoped;
  if (scoped.Set(device_).ok()) (void)cudaIpcCloseMemHandle(base_);
}

Result<std::unique_ptr<ImportedEvent>> ImportedEvent::Open(const uint8_t* handle, size_t size,
                                                           int device) {
  internal::ScopedDevice scoped;
  LMCACHE_ASSIGN_OR_RETURN(cudaIpcEventHandle_t h,
                           ReadHandle<cudaIpcEventHandle_t>(handle, size, device, &scoped));
  cudaEvent_t event = nullptr;
  const cudaError_t err = cudaIpcOpenEventHandle(&event, h);
  if (err != cudaSuccess) {
    return Refused(err, "cudaIpcOpenEventHandle", "the event handle names no interprocess event");
  }
  return std::unique_ptr<ImportedEvent>(new ImportedEvent(event, device));
}

ImportedEvent::~ImportedEvent() { (void)cudaEventDestroy(event_); }

Result<bool> ImportedEvent::WaitFor(double timeout_s) {
  if (!(timeout_s >= 0) || !std::isfinite(timeout_s)) {
    return Status::InvalidArgument("timeout_s must be a finite number >= 0");
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  internal::ScopedDevice scoped;
  LMCACHE_RETURN_IF_ERROR(scoped.Set(device_));
  cudaStream_t stream = nullptr;
  cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) return FromCuda(err, "cudaStreamCreateWithFlags");
  auto latch = std::make_shared<DeadlineLatch>();
  err = cudaStreamWaitEvent(stream, event_, 0);
  if (err == cudaSuccess) {
    auto* share = new std::shared_ptr<DeadlineLatch>(latch);
    err = cudaLaunchHostFunc(stream, &OpenLatch, share);
    if (err != cudaSuccess) delete share;
  }
  if (err != cudaSuccess) {
    Status st = FromCuda(err, "queueing the wait for the engine's event");
    (void)cudaStreamDestroy(stream);
    return st;
  }
  const bool done = latch->WaitUntil(deadline);
  // Returns at once; the driver frees the stream when its work (the wait) completes. Nothing
  // else is ever queued on it.
  (void)cudaStreamDestroy(stream);
  return done;
}

Result<std::unique_ptr<ExportedEvent>> ExportedEvent::Create(int device) {
  internal::ScopedDevice scoped;
  LMCACHE_RETURN_IF_ERROR(UseDevice(device, &scoped));
  cudaEvent_t event = nullptr;
  cudaError_t err =
      cudaEventCreateWithFlags(&event, cudaEventInterprocess | cudaEventDisableTiming);
  if (err != cudaSuccess) return FromCuda(err, "cudaEventCreateWithFlags(interprocess)");
  cudaIpcEventHandle_t h;
  err = cudaIpcGetEventHandle(&h, event);
  if (err != cudaSuccess) {
    Status st = FromCuda(err, "cudaIpcGetEventHandle");
    (void)cudaEventDestroy(event);
    return st;
  }
  IpcHandle bytes;
  std::memcpy(bytes.data(), &h, kIpcHandleBytes);
  return std::unique_ptr<ExportedEvent>(new ExportedEvent(event, bytes));
}

ExportedEvent::~ExportedEvent() { (void)cudaEventDestroy(event_); }

Status ExportedEvent::Record(Stream stream) {
  const cudaError_t err = cudaEventRecord(event_, stream);
  return err == cudaSuccess ? Status::Ok() : FromCuda(err, "cudaEventRecord");
}

Result<std::unique_ptr<OwnedStream>> OwnedStream::Create(int device) {
  internal::ScopedDevice scoped;
  LMCACHE_RETURN_IF_ERROR(UseDevice(device, &scoped));
  cudaStream_t stream = nullptr;
  const cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) return FromCuda(err, "cudaStreamCreateWithFlags");
  return std::unique_ptr<OwnedStream>(new OwnedStream(stream));
}

OwnedStream::~OwnedStream() { (void)cudaStreamDestroy(stream_); }

}  // namespace cuda
}  // namespace lmcache_cpp
