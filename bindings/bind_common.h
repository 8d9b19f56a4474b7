// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Shared glue for the nanobind module lmcache_cpp._core: the one Status -> exception path, the
// zero-copy byte views over arena memory, token-array conversion, second/Duration conversion and
// the small Python-facing holder types.
//
// Exceptions. Every binding turns a non-OK Status into a C++ StatusError (ThrowIfError /
// ValueOrThrow). StatusError carries no Python state, so it may be thrown while the GIL is
// released. One translator (RegisterStatusTranslator, core_module.cc) turns it into an instance
// of the class that lmcache_cpp.errors.from_code() picks for the code. That is the only place
// a StatusCode meets a Python exception type.
//
// GIL. Bindings of calls that can block or take a core lock release the GIL, either with
// nb::call_guard<nb::gil_scoped_release>() (when the arguments were fully converted to C++
// values before the call) or with an explicit nb::gil_scoped_release scope after the binding has
// read what it needs from Python objects. Nothing in a released region touches a Python object.
#ifndef LMCACHE_CPP_BINDINGS_BIND_COMMON_H_
#define LMCACHE_CPP_BINDINGS_BIND_COMMON_H_

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lmcache_cpp/arena.h"
#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/stat_fields.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_manager.h"

namespace lmcache_cpp::bindings {

namespace nb = nanobind;

// A non-OK Status crossing from a binding to the exception translator.
class StatusError : public std::exception {
 public:
  explicit StatusError(Status status) : status_(std::move(status)) {}
  const Status& status() const noexcept { return status_; }
  const char* what() const noexcept override { return status_.message().c_str(); }

 private:
  Status status_;
};

// The call guard of bindings whose arguments are fully converted before the call (see GIL above).
using Release = nb::call_guard<nb::gil_scoped_release>;

// A batch of object keys, as the table, storage and L2 bindings take them.
using Keys = std::vector<ObjectKey>;

inline void ThrowIfError(const Status& status) {
  if (!status.ok()) throw StatusError(status);
}

template <typename T>
T ValueOrThrow(Result<T>&& result) {
  if (!result.ok()) throw StatusError(result.status());
  return std::move(result).value();
}

// A binding that calls `method` on what the holder's pointer member `core` points to, with the
// Python call's arguments as nanobind converted them, and throws StatusError for a non-OK Status
// or Result (returning the Result's value). E.g. `.def("cancel", CallThrough(&PyX::ctl,
// &PrefetchController::Cancel), "client"_a, "handle"_a, Release())`.
template <typename Holder, typename Ptr, typename R, typename Core, typename... Args>
auto CallThrough(Ptr Holder::*core, R (Core::*method)(Args...)) {
  return [core, method](Holder& h, Args... args) {
    Core& target = *(h.*core);
    if constexpr (std::is_same_v<R, Status>) {
      ThrowIfError((target.*method)(std::forward<Args>(args)...));
    } else {
      return ValueOrThrow((target.*method)(std::forward<Args>(args)...));
    }
  };
}

// Installs the StatusError translator (core_module.cc).
void RegisterStatusTranslator();

// Seconds (a Python float) to a Duration. InvalidArgument for NaN, infinities and magnitudes
// a Duration cannot hold; the sign is left for the callee to judge.
Duration SecondsToDuration(double seconds, const char* what);
double DurationToSeconds(Duration d);

// A writable 1-D numpy uint8 array over [base + offset, base + offset + size) of a region of
// `region_size` bytes. The array's owner holds `keep_alive` (the region's shared_ptr), so the
// mapping outlives every Python object but the views. `size` defaults to the rest of the region.
// InvalidArgument when the range does not lie inside the region.
using ByteView = nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>, nb::c_contig>;
ByteView MakeByteView(std::shared_ptr<const void> keep_alive, uint8_t* base, uint64_t region_size,
                      uint64_t offset, std::optional<uint64_t> size);

// Token ids from Python as contiguous uint32. A 1-D C-contiguous uint32 CPU array is used in
// place; any other 1-D integer array or a sequence of ints is converted once, with a range check
// (InvalidArgument for ids outside [0, 2**32)); anything else is a TypeError.
// REQUIRES: the GIL is held while constructing and destroying; data() may be read without it.
class TokenBuffer {
 public:
  explicit TokenBuffer(nb::handle tokens);
  const uint32_t* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }

 private:
  nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> array_;
  std::vector<uint32_t> converted_;
  const uint32_t* data_ = nullptr;
  size_t size_ = 0;
};

// Copies `n` integers of type T spaced `stride` elements apart into *out as U, calling
// `check(value, index)` on each first; the check throws for a value that U must not hold.
template <typename T, typename U, typename Check>
void CopyStrided(const void* data, int64_t stride, size_t n, std::vector<U>* out,
                 const Check& check) {
  const T* p = static_cast<const T*>(data);
  out->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const T v = p[static_cast<int64_t>(i) * stride];
    check(v, i);
    (*out)[i] = static_cast<U>(v);
  }
}

// CopyStrided from an integer array whose element type is known only at run time: `bits` wide
// (8, 16, 32 or 64), signed or not. `check` takes every element type. Returns false, copying
// nothing, for another width.
template <typename U, typename Check>
bool CopyStridedIntegers(uint8_t bits, bool is_signed, const void* data, int64_t stride, size_t n,
                         std::vector<U>* out, const Check& check) {
  const auto copy = [&](auto type) { CopyStrided<decltype(type)>(data, stride, n, out, check); };
  switch (bits) {
    case 8: is_signed ? copy(int8_t{}) : copy(uint8_t{}); return true;
    case 16: is_signed ? copy(int16_t{}) : copy(uint16_t{}); return true;
    case 32: is_signed ? copy(int32_t{}) : copy(uint32_t{}); return true;
    case 64: is_signed ? copy(int64_t{}) : copy(uint64_t{}); return true;
    default: return false;
  }
}

// Value semantics for a bound class, as `cls.def(ValueOps<Hash>())`: __eq__ and __ne__ from the
// C++ operators, __lt__ too when kOrdered, and __hash__ from Hash, in that order.
template <typename Hash, bool kOrdered = false>
struct ValueOps : nb::def_visitor<ValueOps<Hash, kOrdered>> {
  template <typename Class, typename... Extra>
  static void execute(Class& cls, const Extra&...) {
    using T = typename Class::Type;
    cls.def(
        "__eq__", [](const T& a, const T& b) { return a == b; }, nb::is_operator());
    cls.def(
        "__ne__", [](const T& a, const T& b) { return a != b; }, nb::is_operator());
    if constexpr (kOrdered) {
      cls.def(
          "__lt__", [](const T& a, const T& b) { return a < b; }, nb::is_operator());
    }
    cls.def("__hash__", [](const T& v) { return static_cast<int64_t>(Hash{}(v)); });
  }
};

// Python "ManualClock": a clock shared with the tables and session caches it is passed to.
struct PyManualClock {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>();
};

// Python "Arena": shared ownership, so views and tables keep the mapping alive.
struct PyArena {
  std::shared_ptr<Arena> arena;
};

// Python "AttachedArena".
struct PyAttachedArena {
  std::shared_ptr<AttachedArena> arena;
};

// Python "ObjectTableOptions": the C++ options with durations in float seconds. Defaults come
// from a default-constructed ObjectTableOptions.
struct PyObjectTableOptions {
  double read_lease_ttl_s = 0;
  double write_lease_ttl_s = 0;
  double high_watermark = 0;
  double low_watermark = 0;
  double reap_interval_s = 0;
  std::string eviction_policy;
  uint64_t alignment = 0;

  static PyObjectTableOptions Defaults();
  ObjectTableOptions ToCore(std::shared_ptr<Clock> clock) const;
};

// Python "StatField": one row of a stats table (stat_fields.h), as the stats classes' fields()
// return it. Bound in core_module.cc, before any stats class.
struct PyStatField {
  std::string name;
  std::string kind;                   // "gauge" or "counter" (the Prometheus TYPE)
  std::optional<std::string> metric;  // without the "lmcache_cpp_" prefix; None: not exported
  std::string help;
};

// A stats snapshot as a dict {field name: value}, in table order.
template <typename S>
nb::dict StatsDict(const S& stats) {
  nb::dict d;
  ForEachStat(stats, [&d](const StatField<S>& f, uint64_t value) { d[f.name] = value; });
  return d;
}

// Binds the stats struct S from its table (StatTable<S>), so a field is named in one place: a
// read-only attribute per field (its help as the docstring), to_dict(), the static fields(), a
// repr and a constructor of all zeros. Returns the class for any further members.
template <typename S>
nb::class_<S> BindStats(nb::handle scope, const char* name, const char* doc) {
  nb::class_<S> cls(scope, name, doc);
  cls.def(nb::init<>(), "All fields 0.");
  for (const StatField<S>& f : StatTable<S>::kFields) cls.def_ro(f.name, f.member, f.help);
  cls.def("to_dict", &StatsDict<S>, "The fields as a dict, in fields() order.");
  cls.def_static(
      "fields",
      [] {
        std::vector<PyStatField> out;
        for (const StatField<S>& f : StatTable<S>::kFields) {
          out.push_back({f.name, f.kind == StatKind::kGauge ? "gauge" : "counter",
                         f.metric ? std::optional<std::string>(f.metric) : std::nullopt, f.help});
        }
        return out;
      },
      "The fields, each once: name, kind, Prometheus metric and help.");
  cls.def("__repr__", [name](const S& s) {
    std::string out = std::string(name) + "(";
    const char* sep = "";
    ForEachStat(s, [&](const StatField<S>& f, uint64_t value) {
      out += sep + std::string(f.name) + "=" + std::to_string(value);
      sep = ", ";
    });
    return out + ")";
  });
  return cls;
}

// Python "ObjectTable": a standalone table (created from Python, owns it) or the table of a
// StorageManager (an aliasing shared_ptr that keeps the manager alive; the manager starts and
// stops it). Defined here because both bind_object_table.cc and bind_storage.cc create it.
struct PyObjectTable {
  std::shared_ptr<ObjectTable> table;
  bool managed = false;

  PyObjectTable(std::shared_ptr<ObjectTable> t, bool is_managed)
      : table(std::move(t)), managed(is_managed) {}
  PyObjectTable(PyObjectTable&&) noexcept = default;
  PyObjectTable(const PyObjectTable&) = delete;
  PyObjectTable& operator=(const PyObjectTable&) = delete;
  // Runs from the Python object's dealloc, with the GIL held. A standalone table joins its
  // maintenance thread, which may need the GIL to log on its way out: release it meanwhile. A
  // managed table may hold the manager's last reference, whose deleter expects the GIL held (it
  // releases it around Stop itself and needs it to drop Python adapters).
  ~PyObjectTable() {
    if (!table) return;
    if (managed) {
      table.reset();
      return;
    }
    nb::gil_scoped_release release;
    table.reset();
  }
};

void BindStatusAndLogging(nb::module_& m);
void BindKeysAndHashing(nb::module_& m);
void BindArena(nb::module_& m);
void BindObjectTable(nb::module_& m);

// Python "StorageManager" (bind_storage.cc); the engine binding (bind_engine.cc) shares it.
struct PyStorageManager {
  std::shared_ptr<StorageManager> manager;
};

}  // namespace lmcache_cpp::bindings

#endif  // LMCACHE_CPP_BINDINGS_BIND_COMMON_H_
