// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of lmcache_cpp::cuda (cpp/include/lmcache_cpp/cuda/): compiled into lmcache_cpp._core
// only in builds with LMCACHE_CPP_ENABLE_CUDA=ON. lmcache_cpp.cuda wraps them and says why CUDA
// is unusable where it is.
//
// cuda_info() -> dict        the runtime probe (never raises)
// CudaEvent                  a completion event: record(stream), query(), synchronize()
// CudaHostRegistration       host memory (an arena view) registered with CUDA in pieces, timed
// CudaKvCacheView            per-layer CUDA tensors (torch, through DLPack, any dtype) with
//                            gather/scatter (and _batch forms) on a caller-given stream
//
// Streams are int handles (torch.cuda.Stream.cuda_stream; 0 = the legacy default stream). Block
// ids are CPU integer arrays or sequences (the copy's plan is built on the host). Objects are 1-D
// C-contiguous uint8 arrays on any device: registered host memory (arena views) or CUDA memory;
// the core checks which. No binding synchronises the device; the copies only queue work, so the
// caller keeps the objects and tensors alive until the event (or the stream) says they finished.
//
// GIL: arguments are converted first; core calls that can block (registration, copies, event
// synchronisation) run with the GIL released. Core errors raise lmcache_cpp.errors classes.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "bind_kv_view.h"
#include "lmcache_cpp/cuda/device.h"
#include "lmcache_cpp/cuda/kv_copy_cuda.h"
#include "lmcache_cpp/kv_copy.h"

namespace lmcache_cpp::bindings {

void BindCuda(nb::module_& m);

namespace {

using namespace nb::literals;

using AnyCudaArray = nb::ndarray<nb::device::cuda>;
using OutObject = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig>;       // any device
using InObject = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig>;  // any device
using HostBytes = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

constexpr const char* kOutObject =
    "a writable 1-D C-contiguous uint8 array (registered host or CUDA)";
constexpr const char* kInObject = "a 1-D C-contiguous uint8 array (registered host or CUDA memory)";

cuda::Stream ToStream(uintptr_t handle) { return reinterpret_cast<cuda::Stream>(handle); }

nb::dict CudaInfo() {
  const cuda::RuntimeInfo info = cuda::ProbeRuntime();
  nb::dict d;
  d["built"] = true;
  d["usable"] = info.usable;
  d["device_count"] = info.device_count;
  d["runtime_version"] = info.runtime_version;
  d["driver_version"] = info.driver_version;
  d["reason"] = info.reason;
  return d;
}

struct PyCudaEvent {
  std::unique_ptr<cuda::CudaEvent> event;
};

// Declared in this order so that the registration is undone before the memory is released.
struct PyHostRegistration {
  HostBytes memory;
  std::unique_ptr<cuda::HostRegistration> registration;
};

struct PyCudaKvCacheView {
  KvCacheView view;
  std::vector<AnyCudaArray> arrays;
  // A view of device pointers (from_pointers): what keeps them valid, and their device.
  nb::object owner;
  int device_id = -1;
};

struct CopyArgs {
  uintptr_t stream = 0;
  PyCudaEvent* event = nullptr;
  cuda::CopyEngine engine = cuda::CopyEngine::kKernel;
  uint32_t threads_per_block = 256;
  uint32_t max_blocks = 0;
  bool use_batch_api = true;
};

template <typename Object>
cuda::CudaCopyStats RunCopies(const PyCudaKvCacheView& self, uint64_t chunk_size,
                              const ChunkArgs<Object>& args, bool scatter, const CopyArgs& copy) {
  cuda::CudaCopyOptions options;
  options.engine = copy.engine;
  options.stream = ToStream(copy.stream);
  options.done_event = copy.event != nullptr ? copy.event->event->handle() : nullptr;
  options.threads_per_block = copy.threads_per_block;
  options.max_blocks = copy.max_blocks;
  options.use_batch_api = copy.use_batch_api;
  Result<cuda::CudaCopyStats> result = Status::Internal("not run");
  {
    nb::gil_scoped_release release;
    result = scatter ? cuda::ScatterBatchAsync(self.view, chunk_size, args.chunks, options)
                     : cuda::GatherBatchAsync(self.view, chunk_size, args.chunks, options);
  }
  return ValueOrThrow(std::move(result));
}

cuda::CudaCopyStats GatherMany(const PyCudaKvCacheView& self, uint64_t chunk_size,
                               nb::handle block_ids, nb::handle objects,
                               std::optional<std::vector<uint64_t>> num_tokens,
                               const CopyArgs& copy) {
  ChunkArgs<OutObject> args;
  ConvertChunks(self.view.layout, block_ids, objects, num_tokens, std::nullopt, kOutObject, &args);
  return RunCopies(self, chunk_size, args, /*scatter=*/false, copy);
}

cuda::CudaCopyStats ScatterMany(const PyCudaKvCacheView& self, uint64_t chunk_size,
                                nb::handle objects, nb::handle block_ids,
                                std::optional<std::vector<uint64_t>> num_tokens,
                                std::optional<std::vector<uint64_t>> skip_tokens,
                                const CopyArgs& copy) {
  ChunkArgs<InObject> args;
  ConvertChunks(self.view.layout, block_ids, objects, num_tokens, skip_tokens, kInObject, &args);
  return RunCopies(self, chunk_size, args, /*scatter=*/true, copy);
}

void Unregister(PyHostRegistration& r) {
  Status st;
  {
    nb::gil_scoped_release release;
    st = r.registration->Unregister();
  }
  ThrowIfError(st);
}

std::optional<std::vector<uint64_t>> OneOrNone(std::optional<uint64_t> v) {
  if (!v) return std::nullopt;
  return std::vector<uint64_t>{*v};
}

CopyArgs MakeCopyArgs(uintptr_t stream, PyCudaEvent* event, cuda::CopyEngine engine,
                      uint32_t threads_per_block, uint32_t max_blocks, bool use_batch_api) {
  return CopyArgs{stream, event, engine, threads_per_block, max_blocks, use_batch_api};
}

}  // namespace

void BindCuda(nb::module_& m) {
  m.def("cuda_info", &CudaInfo,
        "The CUDA runtime probe of a CUDA build: built, usable, device_count, runtime_version, "
        "driver_version and reason (why not usable; '' when usable). Never raises.");

  nb::enum_<cuda::CopyEngine>(m, "CopyEngine", "How the GPU copies move bytes.")
      .value("KERNEL", cuda::CopyEngine::kKernel, "one kernel launch per batch")
      .value("DMA", cuda::CopyEngine::kDma, "the copy engines (cudaMemcpyBatchAsync)");

  nb::class_<cuda::CudaCopyStats>(m, "CudaCopyStats", "What one GPU copy call queued.")
      .def_ro("bytes", &cuda::CudaCopyStats::bytes)
      .def_ro("pieces", &cuda::CudaCopyStats::pieces)
      .def_ro("launches", &cuda::CudaCopyStats::launches)
      .def_ro("segments", &cuda::CudaCopyStats::segments)
      .def_ro("batch_api", &cuda::CudaCopyStats::batch_api)
      .def("__repr__", [](const cuda::CudaCopyStats& s) {
        return "CudaCopyStats(bytes=" + std::to_string(s.bytes) +
               ", pieces=" + std::to_string(s.pieces) + ", launches=" + std::to_string(s.launches) +
               ", segments=" + std::to_string(s.segments) +
               ", batch_api=" + (s.batch_api ? "True" : "False") + ")";
      });

  nb::class_<PyCudaEvent>(m, "CudaEvent",
                          "A CUDA event (no timing) marking the end of queued GPU copies.")
      .def(
          "__init__",
          [](PyCudaEvent* self, std::optional<int> device) {
            new (self) PyCudaEvent{ValueOrThrow(cuda::CudaEvent::Create(device.value_or(-1)))};
          },
          "device"_a.none() = nb::none(),
          "An event of `device` (default: the current one), recordable on its streams only. "
          "Raises UnavailableError when CUDA is unusable here.")
      .def_prop_ro(
          "handle",
          [](const PyCudaEvent& e) { return reinterpret_cast<uintptr_t>(e.event->handle()); },
          "The cudaEvent_t as an int.")
      .def(
          "record",
          [](PyCudaEvent& e, uintptr_t stream) { ThrowIfError(e.event->Record(ToStream(stream))); },
          "stream"_a, "Records the event after the work queued on `stream` so far.")
      .def(
          "query", [](PyCudaEvent& e) { return ValueOrThrow(e.event->Query()); },
          "True when the recorded work has finished; raises if it failed.")
      .def(
          "synchronize",
          [](PyCudaEvent& e) {
            Status st;
            {
              nb::gil_scoped_release release;
              st = e.event->Synchronize();
            }
            ThrowIfError(st);
          },
          "Blocks (GIL released) until the recorded work has finished. Waits for this event "
          "only, never for the whole device.");

  nb::class_<PyHostRegistration>(
      m, "CudaHostRegistration",
      "Host memory (a 1-D uint8 CPU array such as Arena.view(); page-aligned) registered with "
      "CUDA in pieces, timed. Keeps the array alive; unregistered by unregister() or when "
      "collected.")
      .def(
          "__init__",
          [](PyHostRegistration* self, HostBytes memory, uint64_t piece_bytes) {
            cuda::HostRegistrationOptions options;
            options.piece_bytes = piece_bytes;
            void* base = memory.data();
            const uint64_t size = memory.shape(0);
            Result<std::unique_ptr<cuda::HostRegistration>> reg = Status::Internal("not run");
            {
              nb::gil_scoped_release release;
              reg = cuda::HostRegistration::Register(base, size, options);
            }
            new (self) PyHostRegistration{std::move(memory), ValueOrThrow(std::move(reg))};
          },
          "memory"_a.noconvert(), nb::kw_only(), "piece_bytes"_a = uint64_t{1} << 30)
      .def_prop_ro("size", [](const PyHostRegistration& r) { return r.registration->size(); })
      .def_prop_ro("registered",
                   [](const PyHostRegistration& r) { return r.registration->registered(); })
      .def_prop_ro(
          "piece_offsets",
          [](const PyHostRegistration& r) { return r.registration->PieceOffsets(); },
          "Offsets of the registration pieces from the start of the memory.")
      .def_prop_ro(
          "piece_seconds",
          [](const PyHostRegistration& r) { return r.registration->piece_seconds(); },
          "Seconds each cudaHostRegister call took (context creation excluded).")
      .def_prop_ro("register_seconds",
                   [](const PyHostRegistration& r) { return r.registration->register_seconds(); })
      .def_prop_ro("unregister_seconds",
                   [](const PyHostRegistration& r) { return r.registration->unregister_seconds(); })
      .def("unregister", &Unregister,
           "Unregisters every piece; idempotent. In-flight copies using the memory must have "
           "finished.")
      .def("__enter__", [](nb::handle self) { return self; })
      .def(
          "__exit__",
          [](PyHostRegistration& r, nb::handle, nb::handle, nb::handle) { Unregister(r); },
          "exc_type"_a.none(), "exc"_a.none(), "tb"_a.none());

  nb::class_<PyCudaKvCacheView>(
      m, "CudaKvCacheView",
      "An engine's per-layer KV tensors on one CUDA device (torch CUDA tensors of any dtype, "
      "through DLPack), for gathering blocks into chunk objects and scattering them back on a "
      "CUDA stream. Same layouts, object format and argument checks as KvCacheView. Keeps the "
      "tensors alive.")
      .def(
          "__init__",
          [](PyCudaKvCacheView* self, nb::handle tensors, KvLayout layout) {
            std::vector<AnyCudaArray> arrays =
                CastLayers<AnyCudaArray>(tensors, "a CUDA tensor (DLPack device type cuda)");
            KvCacheView view = ViewOfLayers(arrays, layout);
            new (self) PyCudaKvCacheView{std::move(view), std::move(arrays), nb::object(), -1};
          },
          "tensors"_a, "layout"_a)
      .def_static(
          "from_pointers",
          [](std::vector<uintptr_t> layers, const KvCacheLayout& layout, int device,
             nb::object owner) {
            KvCacheView view{layout, {}};
            for (uintptr_t p : layers) view.layers.push_back(reinterpret_cast<uint8_t*>(p));
            ThrowIfError(view.Validate());
            return PyCudaKvCacheView{std::move(view), {}, std::move(owner), device};
          },
          "layers"_a, "layout"_a, "device"_a, "owner"_a,
          "A view of per-layer device addresses (another process's tensors opened by CUDA IPC: "
          "lmcache_cpp.device.cuda). `owner` keeps the mappings alive. REQUIRES: each address "
          "holds a tensor of `layout` on `device`.")
      .def_prop_ro(
          "layout", [](const PyCudaKvCacheView& v) { return v.view.layout; },
          "The KvCacheLayout read from the tensors (a copy).")
      .def_prop_ro(
          "device",
          [](const PyCudaKvCacheView& v) {
            return v.arrays.empty() ? v.device_id : v.arrays[0].device_id();
          },
          "The CUDA device index of the tensors.")
      .def(LayoutQueries())
      .def(
          "gather",
          [](const PyCudaKvCacheView& self, uint64_t chunk_size, nb::handle block_ids,
             nb::handle out, std::optional<uint64_t> num_tokens, uintptr_t stream,
             PyCudaEvent* event, cuda::CopyEngine engine, uint32_t threads_per_block,
             uint32_t max_blocks, bool use_batch_api) {
            return GatherMany(
                self, chunk_size, nb::make_tuple(block_ids), nb::make_tuple(out),
                OneOrNone(num_tokens),
                MakeCopyArgs(stream, event, engine, threads_per_block, max_blocks, use_batch_api));
          },
          "chunk_size"_a, "block_ids"_a, "out"_a, "num_tokens"_a.none() = nb::none(), nb::kw_only(),
          "stream"_a, "event"_a.none() = nb::none(), "engine"_a = cuda::CopyEngine::kKernel,
          "threads_per_block"_a = 256, "max_blocks"_a = 0, "use_batch_api"_a = true,
          "Queues on `stream` the copy of the blocks holding the chunk's first num_tokens tokens "
          "into the object `out`, then records `event` if given. Returns CudaCopyStats.")
      .def(
          "scatter",
          [](const PyCudaKvCacheView& self, uint64_t chunk_size, nb::handle object,
             nb::handle block_ids, std::optional<uint64_t> num_tokens, uint64_t skip_tokens,
             uintptr_t stream, PyCudaEvent* event, cuda::CopyEngine engine,
             uint32_t threads_per_block, uint32_t max_blocks, bool use_batch_api) {
            return ScatterMany(
                self, chunk_size, nb::make_tuple(object), nb::make_tuple(block_ids),
                OneOrNone(num_tokens), std::vector<uint64_t>{skip_tokens},
                MakeCopyArgs(stream, event, engine, threads_per_block, max_blocks, use_batch_api));
          },
          "chunk_size"_a, "object"_a, "block_ids"_a, "num_tokens"_a.none() = nb::none(),
          "skip_tokens"_a = 0, nb::kw_only(), "stream"_a, "event"_a.none() = nb::none(),
          "engine"_a = cuda::CopyEngine::kKernel, "threads_per_block"_a = 256, "max_blocks"_a = 0,
          "use_batch_api"_a = true,
          "Queues on `stream` the copy of an object into the engine blocks, leaving the chunk's "
          "first skip_tokens tokens untouched, then records `event` if given.")
      .def(
          "gather_batch",
          [](const PyCudaKvCacheView& self, uint64_t chunk_size, nb::handle block_ids,
             nb::handle objects, std::optional<std::vector<uint64_t>> num_tokens, uintptr_t stream,
             PyCudaEvent* event, cuda::CopyEngine engine, uint32_t threads_per_block,
             uint32_t max_blocks, bool use_batch_api) {
            return GatherMany(
                self, chunk_size, block_ids, objects, std::move(num_tokens),
                MakeCopyArgs(stream, event, engine, threads_per_block, max_blocks, use_batch_api));
          },
          "chunk_size"_a, "block_ids"_a, "objects"_a, "num_tokens"_a.none() = nb::none(),
          nb::kw_only(), "stream"_a, "event"_a.none() = nb::none(),
          "engine"_a = cuda::CopyEngine::kKernel, "threads_per_block"_a = 256, "max_blocks"_a = 0,
          "use_batch_api"_a = true,
          "gather for several chunks in one call (one launch where the arguments fit); all are "
          "checked before anything is queued.")
      .def(
          "scatter_batch",
          [](const PyCudaKvCacheView& self, uint64_t chunk_size, nb::handle objects,
             nb::handle block_ids, std::optional<std::vector<uint64_t>> num_tokens,
             std::optional<std::vector<uint64_t>> skip_tokens, uintptr_t stream, PyCudaEvent* event,
             cuda::CopyEngine engine, uint32_t threads_per_block, uint32_t max_blocks,
             bool use_batch_api) {
            return ScatterMany(
                self, chunk_size, objects, block_ids, std::move(num_tokens), std::move(skip_tokens),
                MakeCopyArgs(stream, event, engine, threads_per_block, max_blocks, use_batch_api));
          },
          "chunk_size"_a, "objects"_a, "block_ids"_a, "num_tokens"_a.none() = nb::none(),
          "skip_tokens"_a.none() = nb::none(), nb::kw_only(), "stream"_a,
          "event"_a.none() = nb::none(), "engine"_a = cuda::CopyEngine::kKernel,
          "threads_per_block"_a = 256, "max_blocks"_a = 0, "use_batch_api"_a = true,
          "scatter for several chunks in one call; all are checked before anything is queued.")
      .def("__repr__", [](const PyCudaKvCacheView& v) {
        return "CudaKvCacheView(" + LayoutRepr(v.view.layout) + ")";
      });
}

}  // namespace lmcache_cpp::bindings
