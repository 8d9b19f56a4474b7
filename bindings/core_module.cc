// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The nanobind module lmcache_cpp._core: module entry point, the Status -> exception translator,
// logging bridge, version and build information, and the helpers declared in bind_common.h.
// The per-area bindings live in bind_hashing.cc, bind_arena.cc and bind_object_table.cc.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/status.h"

#ifndef LMCACHE_CPP_VERSION_STRING
#define LMCACHE_CPP_VERSION_STRING "0.0.0+unknown"
#endif

namespace lmcache_cpp::bindings {

using namespace nb::literals;

// ------------------------------------------------------------------------------------------
// Status -> Python exception: the one mapping point.

void RegisterStatusTranslator() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      // Runs with the GIL held. The hierarchy is pure Python (lmcache_cpp/errors.py); importing
      // it here, lazily, keeps the native module free of the class list.
      try {
        nb::object errors = nb::module_::import_("lmcache_cpp.errors");
        nb::object exc =
            errors.attr("from_code")(static_cast<int32_t>(e.status().code()), e.status().message());
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      } catch (nb::python_error& import_failure) {
        import_failure.restore();  // surfaces the import or from_code failure itself
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Conversions.

Duration SecondsToDuration(double seconds, const char* what) {
  // Duration is int64 nanoseconds: +-292 years. Refuse anything near that instead of overflowing.
  constexpr double kMaxSeconds = 1e9;
  if (!std::isfinite(seconds) || std::fabs(seconds) > kMaxSeconds) {
    throw StatusError(Status::InvalidArgument(std::string(what) +
                                              " must be a finite number of "
                                              "seconds below 1e9, got " +
                                              std::to_string(seconds)));
  }
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(seconds));
}

double DurationToSeconds(Duration d) { return std::chrono::duration<double>(d).count(); }

ByteView MakeByteView(std::shared_ptr<const void> keep_alive, uint8_t* base, uint64_t region_size,
                      uint64_t offset, std::optional<uint64_t> size) {
  if (offset > region_size) {
    throw StatusError(Status::InvalidArgument("view offset " + std::to_string(offset) +
                                              " is past the end of a region of " +
                                              std::to_string(region_size) + " bytes"));
  }
  const uint64_t length = size.value_or(region_size - offset);
  if (length > region_size - offset) {
    throw StatusError(Status::InvalidArgument(
        "view [" + std::to_string(offset) + ", +" + std::to_string(length) +
        ") does not fit in a region of " + std::to_string(region_size) + " bytes"));
  }
  auto holder = std::make_unique<std::shared_ptr<const void>>(std::move(keep_alive));
  nb::capsule owner(holder.get(),
                    [](void* p) noexcept { delete static_cast<std::shared_ptr<const void>*>(p); });
  holder.release();  // owned by the capsule from here
  const size_t shape[1] = {static_cast<size_t>(length)};
  return ByteView(base + offset, 1, shape, owner);
}

namespace {

// The range check of token ids copied into uint32 (CopyStrided): none negative, none too large.
struct CheckToken {
  template <typename T>
  void operator()(T v, size_t i) const {
    if constexpr (std::is_signed_v<T>) {
      if (v < 0) {
        throw StatusError(Status::InvalidArgument("token " + std::to_string(i) + " is negative (" +
                                                  std::to_string(v) + ")"));
      }
    }
    if constexpr (sizeof(T) > sizeof(uint32_t)) {
      if (static_cast<uint64_t>(v) > std::numeric_limits<uint32_t>::max()) {
        throw StatusError(Status::InvalidArgument("token " + std::to_string(i) + " (" +
                                                  std::to_string(v) + ") does not fit in uint32"));
      }
    }
  }
};

}  // namespace

TokenBuffer::TokenBuffer(nb::handle tokens) {
  if (nb::try_cast(tokens, array_, /*convert=*/false)) {
    data_ = array_.data();
    size_ = array_.shape(0);
    return;
  }
  nb::ndarray<nb::ro, nb::ndim<1>, nb::device::cpu> any;
  if (nb::try_cast(tokens, any, /*convert=*/false)) {
    const nb::dlpack::dtype dt = any.dtype();
    const size_t n = any.shape(0);
    const int64_t stride = any.stride(0);
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    const bool is_int = code == nb::dlpack::dtype_code::Int;
    const bool is_uint = code == nb::dlpack::dtype_code::UInt;
    if (dt.lanes == 1 && (is_int || is_uint)) {
      if (!CopyStridedIntegers(dt.bits, is_int, any.data(), stride, n, &converted_, CheckToken{})) {
        throw nb::type_error("tokens: unsupported integer width");
      }
      data_ = converted_.data();
      size_ = converted_.size();
      return;
    }
    throw nb::type_error("tokens must be a 1-D array of integers");
  }
  // A sequence of ints: straight to uint32 when every id fits; otherwise through int64 so the
  // error names the offending id.
  if (nb::try_cast(tokens, converted_, /*convert=*/false)) {
    data_ = converted_.data();
    size_ = converted_.size();
    return;
  }
  std::vector<int64_t> ints;
  if (!nb::try_cast(tokens, ints, /*convert=*/false)) {
    throw nb::type_error(
        "tokens must be a 1-D integer numpy array (uint32 is used without a copy) or a sequence "
        "of ints");
  }
  CopyStrided<int64_t>(ints.data(), 1, ints.size(), &converted_, CheckToken{});
  data_ = converted_.data();
  size_ = converted_.size();
}

PyObjectTableOptions PyObjectTableOptions::Defaults() {
  const ObjectTableOptions core;
  PyObjectTableOptions o;
  o.read_lease_ttl_s = DurationToSeconds(core.read_lease_ttl);
  o.write_lease_ttl_s = DurationToSeconds(core.write_lease_ttl);
  o.high_watermark = core.high_watermark;
  o.low_watermark = core.low_watermark;
  o.reap_interval_s = DurationToSeconds(core.reap_interval);
  o.eviction_policy = core.eviction_policy;
  o.alignment = core.alignment;
  return o;
}

ObjectTableOptions PyObjectTableOptions::ToCore(std::shared_ptr<Clock> clock) const {
  ObjectTableOptions core;
  core.read_lease_ttl = SecondsToDuration(read_lease_ttl_s, "read_lease_ttl_s");
  core.write_lease_ttl = SecondsToDuration(write_lease_ttl_s, "write_lease_ttl_s");
  core.high_watermark = high_watermark;
  core.low_watermark = low_watermark;
  core.reap_interval = SecondsToDuration(reap_interval_s, "reap_interval_s");
  core.eviction_policy = eviction_policy;
  core.alignment = alignment;
  core.clock = std::move(clock);
  return core;
}

// ------------------------------------------------------------------------------------------
// Logging bridge.

namespace {

// The Python callable that receives core log lines. Guarded by the GIL. Heap-allocated and never
// destroyed by a static destructor (that would decref after the interpreter is gone); the
// Python package clears it from an atexit handler.
nb::object* g_log_handler = nullptr;
// Whether the core's sink points at ForwardLog; read without the GIL by logging threads.
std::atomic<bool> g_forwarding{false};

void ForwardLog(LogLevel level, const std::string& message) {
  // May run on any thread, with or without the GIL. Log() calls this outside the core's locks.
  if (!g_forwarding.load(std::memory_order_acquire) || !Py_IsInitialized()) return;
  nb::gil_scoped_acquire gil;
  if (g_log_handler == nullptr || !g_log_handler->is_valid()) return;
  nb::object handler = *g_log_handler;  // own a reference: the handler may be replaced meanwhile
  try {
    handler(static_cast<int>(level), message);
  } catch (nb::python_error& e) {
    e.discard_as_unraisable("lmcache_cpp._core log handler");
  } catch (const std::exception&) {
    // A C++ exception from the call machinery (e.g. a cast failure): drop the line.
  }
}

void SetLogHandler(nb::object handler, int min_level) {
  const auto level = static_cast<LogLevel>(min_level);
  if (handler.is_none()) {
    g_forwarding.store(false, std::memory_order_release);
    SetLogSink(LogSink(), level);  // back to stderr
    if (g_log_handler != nullptr) *g_log_handler = nb::object();
    return;
  }
  if (!PyCallable_Check(handler.ptr())) throw nb::type_error("log handler must be callable");
  if (g_log_handler == nullptr) g_log_handler = new nb::object();
  *g_log_handler = std::move(handler);
  g_forwarding.store(true, std::memory_order_release);
  SetLogSink(ForwardLog, level);
}

nb::dict BuildInfo() {
  nb::dict info;
  info["version"] = LMCACHE_CPP_VERSION_STRING;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(NDEBUG)
  info["optimized"] = true;
#else
  info["optimized"] = false;
#endif
  info["nanobind"] = std::to_string(NB_VERSION_MAJOR) + "." + std::to_string(NB_VERSION_MINOR) +
                     "." + std::to_string(NB_VERSION_PATCH);
#if defined(Py_LIMITED_API)
  info["stable_abi"] = true;
#else
  info["stable_abi"] = false;
#endif
  // xxhash support is a property of how the core library was built; ask the core.
  info["xxhash"] = ChunkHasher::Create(NamespaceConfig{}, 1, HashAlgorithm::kXxh3).ok();
#if defined(LMCACHE_CPP_WITH_CUDA)
  info["cuda"] = true;  // built with the GPU kernels; cuda_info() says whether usable here
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

void BindStatusAndLogging(nb::module_& m) {
  nb::class_<PyStatField>(m, "StatField",
                          "One field of a stats class, from its fields(): the one description "
                          "the bindings, STATUS and /metrics are generated from.")
      .def_ro("name", &PyStatField::name, "the attribute and to_dict() key")
      .def_ro("kind", &PyStatField::kind, "'gauge' or 'counter'")
      .def_ro("metric", &PyStatField::metric,
              "the Prometheus family without the lmcache_cpp_ prefix; None: not exported")
      .def_ro("help", &PyStatField::help, "one line of help (the metric's HELP text)")
      .def("__repr__", [](const PyStatField& f) {
        return "StatField(" + f.name + ", " + f.kind + ", " + f.metric.value_or("None") + ")";
      });

  nb::enum_<StatusCode>(m, "StatusCode", nb::is_arithmetic(),
                        "Stable status codes of the core (append-only; they travel on the wire).")
      .value("OK", StatusCode::kOk)
      .value("INVALID_ARGUMENT", StatusCode::kInvalidArgument)
      .value("KEY_ABSENT", StatusCode::kKeyAbsent)
      .value("NOT_READABLE", StatusCode::kNotReadable)
      .value("NOT_WRITABLE", StatusCode::kNotWritable)
      .value("WRONG_STATE", StatusCode::kWrongState)
      .value("LOCKED", StatusCode::kLocked)
      .value("OUT_OF_MEMORY", StatusCode::kOutOfMemory)
      .value("LEASE_NOT_HELD", StatusCode::kLeaseNotHeld)
      .value("NOT_FOUND", StatusCode::kNotFound)
      .value("ALREADY_EXISTS", StatusCode::kAlreadyExists)
      .value("RESOURCE_EXHAUSTED", StatusCode::kResourceExhausted)
      .value("TIMEOUT", StatusCode::kTimeout)
      .value("CANCELLED", StatusCode::kCancelled)
      .value("IO_ERROR", StatusCode::kIoError)
      .value("CORRUPTION", StatusCode::kCorruption)
      .value("PERMISSION_DENIED", StatusCode::kPermissionDenied)
      .value("UNAVAILABLE", StatusCode::kUnavailable)
      .value("NOT_SUPPORTED", StatusCode::kNotSupported)
      .value("INTERNAL", StatusCode::kInternal);

  m.def(
      "status_code_name",
      [](int32_t code) { return std::string(StatusCodeName(static_cast<StatusCode>(code))); },
      "code"_a, "The core's name for a status code, e.g. 'KeyAbsent' ('Unknown' if unassigned).");

  m.def(
      "raise_status",
      [](int32_t code, std::string message) {
        ThrowIfError(Status(static_cast<StatusCode>(code), std::move(message)));
      },
      "code"_a, "message"_a = "",
      "Raises exactly what a core call failing with `code` raises (nothing for OK). Exercises "
      "the module's single Status -> exception mapping.");

  m.def("set_log_handler", &SetLogHandler, "handler"_a.none(),
        "min_level"_a = static_cast<int>(LogLevel::kWarning),
        "Forwards core log lines at or above `min_level` to handler(level, message), called with "
        "the GIL from whichever thread logged. None restores the core's stderr sink.");

  m.def(
      "emit_log",
      [](int level, const std::string& message, bool from_cpp_thread) {
        const auto lvl = static_cast<LogLevel>(level);
        if (!from_cpp_thread) {
          Log(lvl, message);
          return;
        }
        nb::gil_scoped_release release;  // the new thread needs the GIL to reach the handler
        std::thread t([lvl, message] { Log(lvl, message); });
        t.join();
      },
      "level"_a, "message"_a, "from_cpp_thread"_a = false,
      "Logs through the core's logger, optionally from a fresh C++ thread (tests the bridge).");

  m.def(
      "version", [] { return std::string(LMCACHE_CPP_VERSION_STRING); },
      "The version of the native module.");
  m.def("build_info", &BuildInfo,
        "How the native module was built: version, compiler, optimized, nanobind, stable_abi, "
        "xxhash, cuda.");

  nb::class_<PyManualClock>(m, "ManualClock",
                            "A clock that moves only when told to; pass it as clock= to tables and "
                            "session caches to test TTLs without sleeping.")
      .def(nb::init<>())
      .def(
          "advance",
          [](PyManualClock& self, double seconds) {
            const Duration d = SecondsToDuration(seconds, "seconds");
            if (d < Duration::zero()) {
              throw StatusError(Status::InvalidArgument("a clock cannot move backwards"));
            }
            self.clock->Advance(d);
          },
          "seconds"_a, "Moves the clock forward by `seconds` (>= 0).")
      .def(
          "now_ns",
          [](const PyManualClock& self) {
            return static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            self.clock->Now().time_since_epoch())
                                            .count());
          },
          "Current reading in nanoseconds since the clock's epoch.");
}

// The L2 tier and the storage manager (bind_l2.cc, bind_storage.cc).
void BindL2(nb::module_& m);
void BindStorage(nb::module_& m);
// The CPU KV copy kernels (bind_kv_copy.cc).
void BindKvCopy(nb::module_& m);
// The cache engine (bind_engine.cc).
void BindCacheEngine(nb::module_& m);
void BindZmq(nb::module_& m);
#if defined(LMCACHE_CPP_WITH_CUDA)
// The GPU copy kernels, host registration and events (bind_cuda.cc; CUDA builds only).
void BindCuda(nb::module_& m);
void BindDevice(nb::module_& m);
#endif

}  // namespace lmcache_cpp::bindings

NB_MODULE(_core, m) {
  namespace b = lmcache_cpp::bindings;
  m.doc() =
      "lmcache_cpp native core: the storage engine (hashing, the shared-memory arena and L1 object "
      "table, L2 adapters, the prefetch and store controllers, the cache engine) and the "
      "server's C++ receive path. Its type stub, _core.pyi, is generated from this module.";
  b::RegisterStatusTranslator();
  b::BindStatusAndLogging(m);
  b::BindKeysAndHashing(m);
  b::BindArena(m);
  b::BindObjectTable(m);
  b::BindL2(m);
  b::BindStorage(m);
  b::BindKvCopy(m);
  b::BindCacheEngine(m);
  b::BindZmq(m);
#if defined(LMCACHE_CPP_WITH_CUDA)
  b::BindCuda(m);
  b::BindDevice(m);
#endif
}
