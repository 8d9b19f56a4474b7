// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of arena.h and allocator.h.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/allocator.h"
#include "lmcache_cpp/arena.h"

namespace lmcache_cpp::bindings {
namespace {

using namespace nb::literals;

// `view`, for both arena classes (Python "Arena" and "AttachedArena"): a byte view that keeps the
// mapping alive.
struct ArenaView : nb::def_visitor<ArenaView> {
  template <typename Class, typename... Extra>
  static void execute(Class& cls, const Extra&...) {
    using A = typename Class::Type;
    cls.def(
        "view",
        [](const A& a, uint64_t offset, std::optional<uint64_t> size) {
          return MakeByteView(a.arena, a.arena->base(), a.arena->size(), offset, size);
        },
        "offset"_a = 0, "size"_a.none() = nb::none(),
        "Writable zero-copy uint8 view of [offset, offset + size); size defaults to the rest.");
  }
};

void BindArenaTypes(nb::module_& m) {
  nb::enum_<ArenaBackend>(m, "ArenaBackend")
      .value("MEMFD", ArenaBackend::kMemfd)
      .value("POSIX_SHM", ArenaBackend::kPosixShm);

  using DescriptorState = std::tuple<std::string, size_t, bool>;
  nb::class_<ArenaDescriptor>(m, "ArenaDescriptor",
                              "What another process needs to map an arena. Picklable.")
      .def(
          "__init__",
          [](ArenaDescriptor* self, std::string path, size_t size, bool huge_pages) {
            new (self) ArenaDescriptor{std::move(path), size, huge_pages};
          },
          "path"_a = "", "size"_a = 0, "huge_pages"_a = false)
      .def_rw("path", &ArenaDescriptor::path, "Path to open(2) O_RDWR.")
      .def_rw("size", &ArenaDescriptor::size, "Bytes to map.")
      .def_rw("huge_pages", &ArenaDescriptor::huge_pages)
      .def("__getstate__",
           [](const ArenaDescriptor& d) { return DescriptorState(d.path, d.size, d.huge_pages); })
      .def("__setstate__",
           [](ArenaDescriptor& self, const DescriptorState& s) {
             new (&self) ArenaDescriptor{std::get<0>(s), std::get<1>(s), std::get<2>(s)};
           })
      .def("__repr__", [](const ArenaDescriptor& d) {
        return "ArenaDescriptor(path=" + std::string(nb::repr(nb::str(d.path.c_str())).c_str()) +
               ", size=" + std::to_string(d.size) +
               ", huge_pages=" + (d.huge_pages ? "True" : "False") + ")";
      });

  nb::class_<PyArena>(m, "Arena",
                      "A shared-memory region holding L1 objects, mappable by other processes "
                      "through its descriptor. Freed when the last Arena, table or view over it "
                      "is gone.")
      .def(
          "__init__",
          [](PyArena* self, size_t size_bytes, ArenaBackend backend, std::string name,
             bool huge_pages, bool prefault) {
            ArenaOptions options;
            options.size_bytes = size_bytes;
            options.backend = backend;
            options.name = std::move(name);
            options.huge_pages = huge_pages;
            options.prefault = prefault;
            std::unique_ptr<Arena> arena = ValueOrThrow(Arena::Create(options));
            new (self) PyArena{std::shared_ptr<Arena>(std::move(arena))};
          },
          "size_bytes"_a, nb::kw_only(), "backend"_a = ArenaBackend::kMemfd, "name"_a = "",
          "huge_pages"_a = false, "prefault"_a = false, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("size", [](const PyArena& a) { return a.arena->size(); })
      .def_prop_ro("huge_pages", [](const PyArena& a) { return a.arena->huge_pages(); })
      .def_prop_ro("backend", [](const PyArena& a) { return a.arena->backend(); })
      .def_prop_ro("fd", [](const PyArena& a) { return a.arena->fd(); })
      .def_prop_ro("descriptor", [](const PyArena& a) { return a.arena->descriptor(); })
      .def(ArenaView());

  nb::class_<PyAttachedArena>(m, "AttachedArena",
                              "A read-write mapping of an arena created elsewhere (another "
                              "process, or this one in tests). Never unlinks.")
      .def(
          "__init__",
          [](PyAttachedArena* self, const ArenaDescriptor& descriptor) {
            std::unique_ptr<AttachedArena> arena = ValueOrThrow(AttachedArena::Attach(descriptor));
            new (self) PyAttachedArena{std::shared_ptr<AttachedArena>(std::move(arena))};
          },
          "descriptor"_a, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("size", [](const PyAttachedArena& a) { return a.arena->size(); })
      .def(ArenaView());
}

void BindAllocator(nb::module_& m) {
  nb::class_<Extent> extent(m, "Extent", "A byte range of the arena: offset and allocated length.");
  extent.attr("__hash__") = nb::none();  // mutable, compares by value
  extent.def(nb::init<uint64_t, uint64_t>(), "offset"_a = 0, "length"_a = 0)
      .def_rw("offset", &Extent::offset)
      .def_rw("length", &Extent::length)
      .def(
          "__eq__", [](const Extent& a, const Extent& b) { return a == b; }, nb::is_operator())
      .def(
          "__ne__", [](const Extent& a, const Extent& b) { return !(a == b); }, nb::is_operator())
      .def("__repr__", [](const Extent& e) {
        return "Extent(offset=" + std::to_string(e.offset) +
               ", length=" + std::to_string(e.length) + ")";
      });

  BindStats<AllocatorStats>(m, "AllocatorStats", "Counters of an ExtentAllocator.");

  nb::class_<ExtentAllocator>(m, "ExtentAllocator",
                              "Best-fit allocator of aligned byte ranges. Thread-safe.")
      .def(
          "__init__",
          [](ExtentAllocator* self, uint64_t capacity, uint64_t alignment) {
            // The constructor aborts on a violated REQUIRES; refuse it here instead.
            if (alignment < 8 || (alignment & (alignment - 1)) != 0) {
              throw StatusError(Status::InvalidArgument("alignment must be a power of two >= 8"));
            }
            new (self) ExtentAllocator(capacity, alignment);
          },
          "capacity"_a, "alignment"_a = 4096)
      .def_prop_ro("alignment", &ExtentAllocator::alignment)
      .def_prop_ro("capacity", &ExtentAllocator::capacity)
      .def("round_up", &ExtentAllocator::RoundUp, "size"_a)
      .def("allocate", &ExtentAllocator::Allocate, "size"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "One range of at least `size` bytes, or None when no hole is large enough.")
      .def(
          "allocate_batch",
          [](ExtentAllocator& a, const std::vector<uint64_t>& sizes) {
            return ValueOrThrow(a.AllocateBatch(sizes));
          },
          "sizes"_a, nb::call_guard<nb::gil_scoped_release>(),
          "All ranges or none (OutOfMemoryError, nothing allocated).")
      .def(
          "free", [](ExtentAllocator& a, const Extent& e) { ThrowIfError(a.Free(e)); }, "extent"_a,
          nb::call_guard<nb::gil_scoped_release>())
      .def("stats", &ExtentAllocator::stats, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "check_invariants", [](const ExtentAllocator& a) { ThrowIfError(a.CheckInvariants()); },
          nb::call_guard<nb::gil_scoped_release>());
}

}  // namespace

void BindArena(nb::module_& m) {
  BindArenaTypes(m);
  BindAllocator(m);
}

}  // namespace lmcache_cpp::bindings
