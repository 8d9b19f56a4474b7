// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The CUDA side of the process: whether CUDA can be used here and why not, completion events,
// and the registration of host memory (the shared L1 arena) with CUDA. Part of lmcache_cpp::cuda,
// which exists only in builds with LMCACHE_CPP_ENABLE_CUDA=ON.
//
// This header needs no CUDA header: Stream and Event are the types cudaStream_t and cudaEvent_t
// name (pointers to the driver's opaque CUstream_st / CUevent_st), so a caller passes a
// cudaStream_t, a torch stream's handle or a CUstream as it is.
//
// The CUDA runtime is linked statically into lmcache_cpp::cuda and finds the driver
// (libcuda.so) when first used: a program linked with it starts on a machine with no driver and
// no GPU, and every call here then reports why CUDA is unusable (ProbeRuntime()) or returns
// Unavailable. Several CUDA runtimes in one process (ours and, say, PyTorch's) share the driver's
// primary context of each device, so streams, events and registrations pass between them.
//
// Nothing here synchronises the device: no call waits for work other than its own, except
// CudaEvent::Synchronize(), which waits for the one event.
//
// Stability: unstable until the GPU path has run on a GPU (docs/design/gpu.md).
#ifndef LMCACHE_CPP_CUDA_DEVICE_H_
#define LMCACHE_CPP_CUDA_DEVICE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lmcache_cpp/status.h"

struct CUstream_st;
struct CUevent_st;

namespace lmcache_cpp {
namespace cuda {

using Stream = CUstream_st*;  // == cudaStream_t; nullptr is the legacy default stream
using Event = CUevent_st*;    // == cudaEvent_t

// What ProbeRuntime() found.
struct RuntimeInfo {
  bool usable = false;      // at least one device, through a driver new enough for the runtime
  int device_count = 0;     // visible devices (0 unless usable)
  int runtime_version = 0;  // of the linked runtime, e.g. 13000 for 13.0
  int driver_version = 0;   // CUDA version the driver supports; 0 = no driver found
  std::string reason;       // why not usable ("" when usable), e.g. "no CUDA driver (...)"
};

// Asks the runtime for devices and versions. Never fails and never throws; cheap after the first
// call (which loads the driver). Thread-safe.
RuntimeInfo ProbeRuntime();

// Unavailable with ProbeRuntime().reason when CUDA is not usable, else OK.
Status CheckUsable();

// A CUDA event without timing (cudaEventDisableTiming): the completion signal of the asynchronous
// copies. Owns the event; destroying a CudaEvent that is still pending is allowed (the driver
// releases it once it completes). Not thread-safe: one thread at a time per CudaEvent.
class CudaEvent {
 public:
  // An event of `device` (-1: the calling thread's current device); it can be recorded on that
  // device's streams only. Unavailable when CUDA is unusable; InvalidArgument for a device that
  // does not exist; Internal when the runtime fails.
  static Result<std::unique_ptr<CudaEvent>> Create(int device = -1);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  Event handle() const noexcept { return event_; }
  // Records the event on `stream` (after the work queued on it so far). Internal on failure.
  Status Record(Stream stream);
  // True when the work before the last Record() has finished (or nothing was recorded).
  // Internal when that work failed (the message is the runtime's).
  Result<bool> Query();
  // Blocks the calling thread until the work before the last Record() has finished. Waits for
  // this event only, never for the whole device. Internal when that work failed.
  Status Synchronize();

 private:
  explicit CudaEvent(Event event) : event_(event) {}
  Event event_;
};

struct HostRegistrationOptions {
  HostRegistrationOptions() {}  // NOLINT
  // Bytes registered per cudaHostRegister call: single registrations of many GiB are slow and
  // can fail. A positive multiple of the page size.
  uint64_t piece_bytes = uint64_t{1} << 30;
};

// A host range (the L1 arena, or any memory the process mapped) registered with CUDA
// (cudaHostRegister, portable and mapped) in pieces of HostRegistrationOptions::piece_bytes, so
// that the GPU copies can read and write it directly and DMA can reach it without staging.
// Registering is all or nothing: when a piece fails, the pieces before it are unregistered.
// The range is unregistered by Unregister() or the destructor; the memory must stay mapped until
// then and must not be unmapped while copies that use it are in flight (REQUIRES).
//
// A copy may span two pieces; the kernel path treats the pieces as one range. The DMA path hands
// each segment to the driver as it is; a segment across a piece boundary is correct but may be
// staged by the driver (see docs/design/gpu.md).
//
// Not thread-safe; Unregister() is idempotent.
class HostRegistration {
 public:
  // REQUIRES: [base, base + size) is mapped and not registered with CUDA already.
  // InvalidArgument: base null or not page-aligned, size 0, piece_bytes 0 or not a multiple of
  // the page size. Unavailable: CUDA unusable. Internal (or ResourceExhausted when the driver is
  // out of pinnable memory): a cudaHostRegister call failed; nothing stays registered then.
  static Result<std::unique_ptr<HostRegistration>> Register(
      void* base, uint64_t size,
      const HostRegistrationOptions& options = HostRegistrationOptions());
  ~HostRegistration();  // Unregister(); failures are logged
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;

  // Unregisters every piece (all of them are tried). Internal names the first failure.
  Status Unregister();

  void* base() const noexcept { return base_; }
  uint64_t size() const noexcept { return size_; }
  bool registered() const noexcept { return registered_; }
  // Seconds each cudaHostRegister call took, in address order, and their sum. The CUDA context
  // is created before the first piece is timed, so context creation is not part of them.
  const std::vector<double>& piece_seconds() const noexcept { return piece_seconds_; }
  double register_seconds() const noexcept { return register_seconds_; }
  // Seconds the last Unregister() took (0 before).
  double unregister_seconds() const noexcept { return unregister_seconds_; }
  // The piece boundaries' offsets from base: 0, piece_bytes, 2 * piece_bytes, ...
  std::vector<uint64_t> PieceOffsets() const;

 private:
  HostRegistration(void* base, uint64_t size, uint64_t piece_bytes)
      : base_(base), size_(size), piece_bytes_(piece_bytes) {}

  void* base_;
  uint64_t size_;
  uint64_t piece_bytes_;
  bool registered_ = false;
  std::vector<double> piece_seconds_;
  double register_seconds_ = 0;
  double unregister_seconds_ = 0;
};

}  // namespace cuda
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CUDA_DEVICE_H_
