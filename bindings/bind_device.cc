// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of the server-driven mode's CUDA primitives (cpp/cuda/ipc.h), in CUDA builds only;
// python/lmcache_cpp/device/cuda.py builds the server's CUDA device layer on them.
//
// CudaIpcMemory(handle, device)        another process's allocation; .address, .close()
// CudaImportedEvent(handle, device)    an engine's event; .wait(timeout_s) -> bool, .close()
// CudaExportedEvent(device)            the server's event; .handle (bytes), .record(stream)
// CudaStream(device)                   a non-blocking stream the server owns; .handle (int)
//
// Handles are 64-byte `bytes`. GIL: released around every call that may block (opening a
// handle, the deadline wait). Errors raise lmcache_cpp.errors classes (InvalidArgument for a
// handle that names nothing, Unavailable without CUDA). close() is idempotent; a closed object
// raises Unavailable.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "bind_common.h"
#include "ipc.h"

namespace lmcache_cpp::bindings {

void BindDevice(nb::module_& m);

namespace {

using namespace nb::literals;

template <typename T>
T& Live(const std::unique_ptr<T>& p, const char* what) {
  if (!p) throw StatusError(Status::Unavailable(std::string(what) + " is closed"));
  return *p;
}

template <typename T, typename Open>
std::unique_ptr<T> OpenHandle(nb::bytes handle, Open open) {
  const auto* data = reinterpret_cast<const uint8_t*>(handle.c_str());
  const size_t size = handle.size();
  Result<std::unique_ptr<T>> r = Status::Internal("not run");
  {
    nb::gil_scoped_release release;
    r = open(data, size);
  }
  return ValueOrThrow(std::move(r));
}

struct PyIpcMemory {
  std::unique_ptr<cuda::IpcMemory> memory;
};
struct PyImportedEvent {
  std::unique_ptr<cuda::ImportedEvent> event;
};
struct PyExportedEvent {
  std::unique_ptr<cuda::ExportedEvent> event;
};
struct PyStream {
  std::unique_ptr<cuda::OwnedStream> stream;
};

// `__init__(device)` of a holder of what kCreate(device) makes, e.g. `.def(InitOnDevice<
// &cuda::OwnedStream::Create>())`.
template <auto kCreate>
struct InitOnDevice : nb::def_visitor<InitOnDevice<kCreate>> {
  template <typename Class, typename... Extra>
  static void execute(Class& cls, const Extra&...) {
    using H = typename Class::Type;
    cls.def(
        "__init__", [](H* self, int device) { new (self) H{ValueOrThrow(kCreate(device))}; },
        "device"_a);
  }
};

}  // namespace

void BindDevice(nb::module_& m) {
  nb::class_<PyIpcMemory>(m, "CudaIpcMemory",
                          "Another process's device allocation opened from its CUDA IPC handle.")
      .def(
          "__init__",
          [](PyIpcMemory* self, nb::bytes handle, int device) {
            auto memory = OpenHandle<cuda::IpcMemory>(handle, [device](const uint8_t* d, size_t n) {
              return cuda::IpcMemory::Open(d, n, device);
            });
            new (self) PyIpcMemory{std::move(memory)};
          },
          "handle"_a, "device"_a)
      .def_prop_ro(
          "address", [](const PyIpcMemory& s) { return Live(s.memory, "CudaIpcMemory").address(); },
          "The allocation's first byte in this process.")
      .def(
          "close",
          [](PyIpcMemory& s) {
            nb::gil_scoped_release release;
            s.memory.reset();
          },
          "Closes the mapping; copies that use it must have finished. Idempotent.");

  nb::class_<PyImportedEvent>(m, "CudaImportedEvent",
                              "An engine's interprocess event, imported from its IPC handle.")
      .def(
          "__init__",
          [](PyImportedEvent* self, nb::bytes handle, int device) {
            auto event =
                OpenHandle<cuda::ImportedEvent>(handle, [device](const uint8_t* d, size_t n) {
                  return cuda::ImportedEvent::Open(d, n, device);
                });
            new (self) PyImportedEvent{std::move(event)};
          },
          "handle"_a, "device"_a)
      .def(
          "wait",
          [](PyImportedEvent& s, double timeout_s) {
            cuda::ImportedEvent& event = Live(s.event, "CudaImportedEvent");
            Result<bool> r = Status::Internal("not run");
            {
              nb::gil_scoped_release release;
              r = event.WaitFor(timeout_s);
            }
            return ValueOrThrow(std::move(r));
          },
          "timeout_s"_a,
          "True once the engine's recorded work finished; False when timeout_s passed first.")
      .def(
          "close", [](PyImportedEvent& s) { s.event.reset(); }, "Idempotent.");

  nb::class_<PyExportedEvent>(m, "CudaExportedEvent",
                              "The server's interprocess event, whose handle goes to the engine.")
      .def(InitOnDevice<&cuda::ExportedEvent::Create>())
      .def_prop_ro(
          "handle",
          [](const PyExportedEvent& s) {
            const cuda::IpcHandle& h = Live(s.event, "CudaExportedEvent").handle();
            return nb::bytes(reinterpret_cast<const char*>(h.data()), h.size());
          },
          "The 64-byte cudaIpcEventHandle_t.")
      .def(
          "record",
          [](PyExportedEvent& s, uintptr_t stream) {
            ThrowIfError(
                Live(s.event, "CudaExportedEvent").Record(reinterpret_cast<cuda::Stream>(stream)));
          },
          "stream"_a, "Records the event after the work queued on `stream` so far.")
      .def(
          "close", [](PyExportedEvent& s) { s.event.reset(); }, "Idempotent.");

  nb::class_<PyStream>(m, "CudaStream", "A non-blocking CUDA stream the server owns.")
      .def(InitOnDevice<&cuda::OwnedStream::Create>())
      .def_prop_ro(
          "handle",
          [](const PyStream& s) {
            return reinterpret_cast<uintptr_t>(Live(s.stream, "CudaStream").handle());
          },
          "The cudaStream_t as an int.")
      .def(
          "close", [](PyStream& s) { s.stream.reset(); }, "Idempotent.");
}

}  // namespace lmcache_cpp::bindings
