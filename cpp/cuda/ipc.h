// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The CUDA primitives of the server-driven transfer mode (docs/design/gpu.md, "Server-driven
// mode"): another process's device memory and events opened from their IPC handles, the wait on
// an imported event with a deadline, and the interprocess event the server records for the
// engine. Internal to lmcache_cpp::cuda (not an installed header); bound into _core by
// bindings/bind_device.cc and driven by python/lmcache_cpp/device/cuda.py.
//
// Every wait here has a deadline. A CUDA event cannot be waited on with a timeout by the runtime
// (cudaEventSynchronize has none, and polling cudaEventQuery would spin), so ImportedEvent::WaitFor
// queues, on a private stream, a wait for the event and after it a host function that opens a
// DeadlineLatch; the calling thread waits on the latch until its deadline. When the deadline
// passes first, the private stream is abandoned (destroyed: the driver frees it once the event
// fires, or with the context) and nothing else is ever queued behind it, so a never-signalled
// event costs one idle stream, never a thread and never a copy that runs late.
#ifndef LMCACHE_CPP_CUDA_IPC_H_
#define LMCACHE_CPP_CUDA_IPC_H_

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include "lmcache_cpp/cuda/device.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace cuda {

// Bytes of a cudaIpcMemHandle_t and of a cudaIpcEventHandle_t (both 64 in every CUDA release).
inline constexpr size_t kIpcHandleBytes = 64;
using IpcHandle = std::array<uint8_t, kIpcHandleBytes>;

// A one-shot latch that one thread (or a CUDA host function) opens and another waits on with a
// deadline. Needs no CUDA; thread-safe. Shared (std::shared_ptr) between the waiter and the
// opener, so that an opener that runs after the waiter gave up touches live memory.
class DeadlineLatch {
 public:
  // Opens the latch and wakes the waiters. Idempotent; may run on any thread.
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  // True once the latch is open; false when `deadline` passed first.
  bool WaitUntil(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, deadline, [this] { return open_; });
  }
  bool is_open() {
    std::lock_guard<std::mutex> lock(mu_);
    return open_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;  // GUARDED_BY(mu_)
};

// InvalidArgument unless `size` is kIpcHandleBytes; else the handle. Needs no CUDA.
Result<IpcHandle> ParseIpcHandle(const uint8_t* data, size_t size);

// Another process's device allocation, opened with cudaIpcOpenMemHandle
// (cudaIpcMemLazyEnablePeerAccess) on `device`. address() is the allocation's first byte in this
// process. The destructor closes the mapping (cudaIpcCloseMemHandle); copies that use it must
// have finished (REQUIRES). The allocation's size is not known to the runtime API: the caller's
// records say where the layers are, and the exporting process vouches for them. Not thread-safe.
class IpcMemory {
 public:
  // InvalidArgument: a handle of the wrong size, or one the driver refuses (it names no
  // allocation of a live process on this host). Unavailable: CUDA unusable.
  static Result<std::unique_ptr<IpcMemory>> Open(const uint8_t* handle, size_t size, int device);
  ~IpcMemory();
  IpcMemory(const IpcMemory&) = delete;
  IpcMemory& operator=(const IpcMemory&) = delete;

  uintptr_t address() const noexcept { return reinterpret_cast<uintptr_t>(base_); }
  int device() const noexcept { return device_; }

 private:
  IpcMemory(void* base, int device) : base_(base), device_(device) {}
  void* base_;
  int device_;
};

// An engine's event, imported with cudaIpcOpenEventHandle (the engine created it with
// cudaEventInterprocess | cudaEventDisableTiming). Not thread-safe: one WaitFor at a time.
class ImportedEvent {
 public:
  // As IpcMemory::Open.
  static Result<std::unique_ptr<ImportedEvent>> Open(const uint8_t* handle, size_t size,
                                                     int device);
  ~ImportedEvent();
  ImportedEvent(const ImportedEvent&) = delete;
  ImportedEvent& operator=(const ImportedEvent&) = delete;

  // True once the work before the engine's last record of the event has finished; false when
  // `timeout_s` passed first (see the header comment). Blocks the calling thread for at most
  // `timeout_s`. Internal when the runtime refuses to queue the wait.
  Result<bool> WaitFor(double timeout_s);

 private:
  ImportedEvent(Event event, int device) : event_(event), device_(device) {}
  Event event_;
  int device_;
};

// The server's interprocess event: recorded after the copies of a transfer, its handle sent to
// the engine, which waits on it. Not thread-safe.
class ExportedEvent {
 public:
  // Unavailable: CUDA unusable; Internal: the runtime failed.
  static Result<std::unique_ptr<ExportedEvent>> Create(int device);
  ~ExportedEvent();
  ExportedEvent(const ExportedEvent&) = delete;
  ExportedEvent& operator=(const ExportedEvent&) = delete;

  const IpcHandle& handle() const noexcept { return handle_; }
  Status Record(Stream stream);

 private:
  ExportedEvent(Event event, const IpcHandle& handle) : event_(event), handle_(handle) {}
  Event event_;
  IpcHandle handle_;
};

// A non-blocking stream of `device` owned by the server (its copies run there). Not thread-safe.
class OwnedStream {
 public:
  static Result<std::unique_ptr<OwnedStream>> Create(int device);
  ~OwnedStream();
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  Stream handle() const noexcept { return stream_; }

 private:
  explicit OwnedStream(Stream stream) : stream_(stream) {}
  Stream stream_;
};

}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_IPC_H_
