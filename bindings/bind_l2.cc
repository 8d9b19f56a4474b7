// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of the L2 tier: the L2Adapter interface (with blocking submit-and-wait glue for tests
// and tools), MemoryL2Adapter, FileSystemL2Adapter, and PythonL2Adapter, the hook that lets a
// Python class be an L2 tier.
//
// Ownership. Adapters are held by std::shared_ptr: the storage manager (and its controllers)
// keep the adapters of their configuration alive. A C++ shared_ptr made from a Python adapter
// object holds a reference to that object (nanobind's shared_ptr caster), so a Python adapter in
// a manager lives at least as long as the manager, and its state dict with it. MemoryL2Adapter and
// FileSystemL2Adapter are created by nb::new_ from a shared_ptr that only their Python object
// holds; every other holder goes through the Python object. Their last release therefore happens
// in the Python object's dealloc, with the GIL held; the deleter releases the GIL while the
// destructor closes the adapter and joins its threads (a worker may need the GIL to log).
//
// PythonL2Adapter. PythonL2AdapterBase is a SyncL2Adapter (sync_adapter.h) whose four blocking
// methods convert their arguments and call four more virtuals with Python arguments; the
// trampoline (NB_TRAMPOLINE / NB_OVERRIDE_PURE_NAME) routes those to the Python subclass's
// store / lookup_and_pin / load / unpin. Per call, on a SyncL2Adapter worker thread:
//   1. take the GIL (nb::gil_scoped_acquire); nothing else on the worker ever holds it: the
//      worker waits for work, runs completion callbacks (the prefetch and store pipelines) and
//      queues unpins without it;
//   2. build the arguments: keys as a list of ObjectKey, buffers as zero-copy 1-D numpy uint8
//      arrays over the caller's memory (read-only for store, writable for load). The arrays do
//      not own the memory and are valid only during the call: an adapter that keeps bytes must
//      copy them (bytes(view), view.copy());
//   3. call the Python method; convert its answer (a Bitmap or a sequence of truthy values, one
//      per key) to a Bitmap. Checksums: store() gets each object's CRC32C (the one committed
//      with it, or computed here) and keeps it with the bytes; load() returns it per key (None
//      for a miss), and the base checks the loaded bytes against it before setting the bit. A
//      mismatch is a miss (corrupt_reads); bytes without a checksum never load;
//   4. release the GIL and return to the base, which runs the completion callback.
// A Python exception (or an answer of the wrong type or length) fails the call with IoError; the
// base logs it and the pipelines treat it as a miss. It never propagates into C++ threads.
// The Python object is destroyed in its dealloc (GIL held): the destructor marks it dying (a
// worker that then gets the GIL fails its call with Cancelled instead of touching the object),
// releases the GIL, and closes the adapter, joining its workers.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/trampoline.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/fs_adapter.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/redis_adapter.h"
#include "lmcache_cpp/sync_adapter.h"
#include "testing/adapter_peers.h"
#include "testing/memory_adapter.h"

namespace lmcache_cpp::bindings {

void BindL2(nb::module_& m);

namespace {

using namespace nb::literals;

// ------------------------------------------------------------------------------------------
// PythonL2Adapter.

using ReadOnlyBytes = nb::ndarray<nb::numpy, const uint8_t, nb::ndim<1>, nb::c_contig>;
using WritableBytes = nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>, nb::c_contig>;

class PythonL2AdapterBase : public SyncL2Adapter {
 public:
  PythonL2AdapterBase(size_t worker_threads, std::string name)
      : SyncL2Adapter(SyncAdapterOptions{worker_threads}), name_(std::move(name)) {}
  ~PythonL2AdapterBase() override { CloseFromDealloc(); }

  std::string name() const override { return name_; }

  // The Python methods (trampoline below). REQUIRE the GIL.
  virtual nb::object PyStore(nb::list keys, nb::list buffers, nb::list checksums) = 0;
  virtual nb::object PyLookupAndPin(nb::list keys) = 0;
  virtual nb::object PyLoad(nb::list keys, nb::list buffers) = 0;
  virtual nb::object PyUnpin(nb::list keys) = 0;

 protected:
  // Runs in the Python object's dealloc, with the GIL held. Idempotent.
  void CloseFromDealloc() {
    dying_ = true;  // read by workers only while they hold the GIL
    nb::gil_scoped_release release;
    Close();
  }

  Result<Bitmap> Store(const Keys& keys, const std::vector<ConstBuffer>& buffers) override {
    Bitmap bits;
    LMCACHE_RETURN_IF_ERROR(WithPython("store", [&] {
      nb::list views;
      nb::list checksums;
      for (const ConstBuffer& b : buffers) {
        views.append(View(b.data, b.size));
        checksums.append(b.has_crc32c ? b.crc32c : PayloadCrc32c(b.data, b.size));
      }
      return ToBitmap(PyStore(KeyList(keys), views, checksums), keys.size(), "store", &bits);
    }));
    return bits;
  }

  Result<Bitmap> LookupAndPin(const Keys& keys) override {
    Bitmap bits;
    LMCACHE_RETURN_IF_ERROR(WithPython("lookup_and_pin", [&] {
      return ToBitmap(PyLookupAndPin(KeyList(keys)), keys.size(), "lookup_and_pin", &bits);
    }));
    return bits;
  }

  Result<Bitmap> Load(const Keys& keys, const std::vector<MutableBuffer>& buffers) override {
    Bitmap bits;
    LMCACHE_RETURN_IF_ERROR(WithPython("load", [&] {
      nb::list views;
      for (const MutableBuffer& b : buffers) views.append(View(b.data, b.size));
      return LoadedAndVerified(PyLoad(KeyList(keys), views), buffers, &bits);
    }));
    return bits;
  }

  void AddStats(L2AdapterStats* stats) const override {
    stats->corrupt_reads += corrupt_reads_.load(std::memory_order_relaxed);
  }

  void UnpinKeys(const Keys& keys) override {
    const Status st = WithPython("unpin", [&] {
      PyUnpin(KeyList(keys));
      return Status::Ok();
    });
    if (!st.ok()) {
      Log(LogLevel::kWarning,
          "unpin of " + std::to_string(keys.size()) + " keys failed: " + st.ToString());
    }
  }

 private:
  static nb::list KeyList(const Keys& keys) {
    nb::list list;
    for (const ObjectKey& k : keys) list.append(nb::cast(k, nb::rv_policy::copy));  // owned copies
    return list;
  }

  // A numpy array over [data, data + size) that does not own it (rv_policy::reference).
  static nb::object View(const uint8_t* data, uint64_t size) {
    static const uint8_t kEmpty = 0;
    const size_t shape[1] = {static_cast<size_t>(size)};
    ReadOnlyBytes a(size > 0 ? data : &kEmpty, 1, shape, nb::handle());
    return nb::cast(a, nb::rv_policy::reference);
  }
  static nb::object View(uint8_t* data, uint64_t size) {
    static uint8_t empty = 0;
    const size_t shape[1] = {static_cast<size_t>(size)};
    WritableBytes a(size > 0 ? data : &empty, 1, shape, nb::handle());
    return nb::cast(a, nb::rv_policy::reference);
  }

  // One bit per key from a Bitmap or an iterable of truthy values, into *bits. REQUIRES the GIL.
  Status ToBitmap(nb::handle answer, size_t n, const char* method, Bitmap* bits) const {
    if (nb::isinstance<Bitmap>(answer)) {
      const Bitmap& b = nb::cast<const Bitmap&>(answer);
      if (b.size() != n) {
        return Failure(method, "returned a Bitmap of " + std::to_string(b.size()) + " bits for " +
                                   std::to_string(n) + " keys");
      }
      *bits = b;
      return Status::Ok();
    }
    if (answer.is_none()) return Failure(method, "returned None; expected one bool per key");
    *bits = Bitmap(n);
    size_t i = 0;
    for (nb::handle item : answer) {
      const int truth = PyObject_IsTrue(item.ptr());
      if (truth < 0) throw nb::python_error();
      if (truth > 0 && i < n) bits->Set(i);
      ++i;
    }
    if (i != n) {
      *bits = Bitmap(n);
      return Failure(
          method, "returned " + std::to_string(i) + " results for " + std::to_string(n) + " keys");
    }
    return Status::Ok();
  }

  // load()'s answer: one item per key, None or False for a miss, else the checksum store() was
  // given with those bytes. Bit i is set when buffers[i] now matches its checksum; a mismatch
  // is a miss counted in corrupt_reads. Any other answer (True, a Bitmap: bytes without a
  // checksum) fails the call: unverified bytes never load. REQUIRES the GIL.
  Status LoadedAndVerified(nb::handle answer, const std::vector<MutableBuffer>& buffers,
                           Bitmap* bits) {
    const size_t n = buffers.size();
    if (answer.is_none() || nb::isinstance<Bitmap>(answer)) {
      return Failure("load", std::string("returned ") + (answer.is_none() ? "None" : "a Bitmap") +
                                 "; expected one item per key: the checksum store() was given "
                                 "with the bytes, or None for a miss");
    }
    Bitmap loaded(n);
    uint64_t corrupt = 0;
    size_t i = 0;
    for (nb::handle item : answer) {
      if (i >= n) {
        ++i;
        continue;
      }
      if (item.is_none() || (PyBool_Check(item.ptr()) && item.ptr() == Py_False)) {
        ++i;
        continue;  // a miss
      }
      if (PyBool_Check(item.ptr()) || !PyLong_Check(item.ptr())) {
        return Failure("load", "returned " + std::string(Py_TYPE(item.ptr())->tp_name) +
                                   " for key " + std::to_string(i) +
                                   "; expected the checksum store() was given with its bytes "
                                   "(an int) or None for a miss");
      }
      uint32_t want = 0;
      if (!nb::try_cast<uint32_t>(item, want)) {
        return Failure("load", "returned a checksum out of range for key " + std::to_string(i));
      }
      if (PayloadCrc32c(buffers[i].data, buffers[i].size) == want) {
        loaded.Set(i);
      } else {
        ++corrupt;
      }
      ++i;
    }
    if (i != n) {
      return Failure(
          "load", "returned " + std::to_string(i) + " results for " + std::to_string(n) + " keys");
    }
    if (corrupt > 0) {
      corrupt_reads_.fetch_add(corrupt, std::memory_order_relaxed);
      Log(LogLevel::kWarning, "Python L2 adapter '" + name_ + "': " + std::to_string(corrupt) +
                                  " loaded object(s) failed their checksum; read as misses");
    }
    *bits = std::move(loaded);
    return Status::Ok();
  }

  Status Failure(const char* method, const std::string& what) const {
    return Status::IoError("Python L2 adapter '" + name_ + "': " + method + "() " + what);
  }

  // Steps 1-4 of the header comment: runs `body` (which builds the arguments, calls the Python
  // method and converts its answer) with the GIL, turning any exception into IoError.
  template <typename F>
  Status WithPython(const char* method, F&& body) {
    nb::gil_scoped_acquire gil;
    if (!gil.is_valid()) return Status::Unavailable("the Python interpreter is shutting down");
    if (dying_) return Status::Cancelled("the Python L2 adapter is being destroyed");
    try {
      return body();
    } catch (nb::python_error& e) {
      return Failure(method, std::string("raised ") + e.what());
    } catch (const std::exception& e) {
      return Failure(method, std::string("failed: ") + e.what());
    }
  }

  const std::string name_;
  bool dying_ = false;  // guarded by the GIL
  std::atomic<uint64_t> corrupt_reads_{0};
};

class PythonL2AdapterTrampoline final : public PythonL2AdapterBase {
 public:
  NB_TRAMPOLINE(PythonL2AdapterBase);

  // The most-derived destructor closes: workers must not call the overrides below on a
  // half-destroyed object.
  ~PythonL2AdapterTrampoline() override { CloseFromDealloc(); }

  nb::object PyStore(nb::list keys, nb::list buffers, nb::list checksums) override {
    NB_OVERRIDE_PURE_NAME("store", PyStore, keys, buffers, checksums);
  }
  nb::object PyLookupAndPin(nb::list keys) override {
    NB_OVERRIDE_PURE_NAME("lookup_and_pin", PyLookupAndPin, keys);
  }
  nb::object PyLoad(nb::list keys, nb::list buffers) override {
    NB_OVERRIDE_PURE_NAME("load", PyLoad, keys, buffers);
  }
  nb::object PyUnpin(nb::list keys) override { NB_OVERRIDE_PURE_NAME("unpin", PyUnpin, keys); }
};

[[noreturn]] void NotOverridden(const char* method) {
  PyErr_Format(PyExc_NotImplementedError,
               "PythonL2Adapter subclasses must implement %s(); the base class has none", method);
  throw nb::python_error();
}

// ------------------------------------------------------------------------------------------
// Blocking glue over the asynchronous interface.

using InBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutBytes = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// One submitted call. Shared with its callback, which may run after the waiter gave up (a
// timeout), so it owns every buffer the adapter may still read or write.
struct PendingCall {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;  // GUARDED_BY(mu)
  Status status;      // GUARDED_BY(mu)
  Bitmap bits;        // GUARDED_BY(mu)
  std::vector<std::vector<uint8_t>> buffers;
};

std::function<void(const Status&, const Bitmap&)> Completer(std::shared_ptr<PendingCall> call) {
  return [call](const Status& st, const Bitmap& bits) {
    {
      std::lock_guard<std::mutex> lk(call->mu);
      call->done = true;
      call->status = st;
      call->bits = bits;
    }
    call->cv.notify_all();
  };
}

// REQUIRES the GIL released.
Bitmap Await(PendingCall& call, Duration timeout, const char* what) {
  std::unique_lock<std::mutex> lk(call.mu);
  if (!call.cv.wait_for(lk, timeout, [&] { return call.done; })) {
    throw StatusError(Status::Timeout(std::string(what) + " did not complete in time"));
  }
  ThrowIfError(call.status);
  return call.bits;
}

Duration Timeout(double seconds) {
  const Duration d = SecondsToDuration(seconds, "timeout_s");
  if (d < Duration::zero()) throw StatusError(Status::InvalidArgument("timeout_s must be >= 0"));
  return d;
}

Bitmap StoreAndWait(L2Adapter& a, const Keys& keys, const std::vector<InBytes>& arrays,
                    double timeout_s) {
  const Duration timeout = Timeout(timeout_s);
  auto call = std::make_shared<PendingCall>();
  call->buffers.reserve(arrays.size());
  for (const InBytes& arr : arrays) call->buffers.emplace_back(arr.data(), arr.data() + arr.size());
  std::vector<ConstBuffer> bufs;
  for (const auto& b : call->buffers) bufs.push_back(ConstBuffer{b.data(), b.size()});
  nb::gil_scoped_release release;
  a.SubmitStore(keys, std::move(bufs), Completer(call));
  return Await(*call, timeout, "store");
}

Bitmap LookupAndWait(L2Adapter& a, const Keys& keys, double timeout_s) {
  const Duration timeout = Timeout(timeout_s);
  auto call = std::make_shared<PendingCall>();
  nb::gil_scoped_release release;
  a.SubmitLookupAndPin(keys, Completer(call));
  return Await(*call, timeout, "lookup_and_pin");
}

Bitmap LoadAndWait(L2Adapter& a, const Keys& keys, const std::vector<OutBytes>& arrays,
                   double timeout_s) {
  const Duration timeout = Timeout(timeout_s);
  auto call = std::make_shared<PendingCall>();
  call->buffers.reserve(arrays.size());
  for (const OutBytes& arr : arrays) call->buffers.emplace_back(arr.size(), 0);
  std::vector<MutableBuffer> bufs;
  for (auto& b : call->buffers) bufs.push_back(MutableBuffer{b.data(), b.size()});
  nb::gil_scoped_release release;
  a.SubmitLoad(keys, std::move(bufs), Completer(call));
  Bitmap bits = Await(*call, timeout, "load");
  // The call is complete: nothing touches call->buffers any more. The arrays are kept alive by
  // the argument list of this binding.
  for (size_t i = 0; i < arrays.size() && i < bits.size(); ++i) {
    if (bits.Test(i) && arrays[i].size() > 0) {
      std::memcpy(arrays[i].data(), call->buffers[i].data(), arrays[i].size());
    }
  }
  return bits;
}

// Deleter of the shared_ptr an adapter's Python object holds (see the header comment): runs in
// that object's dealloc, GIL held.
template <typename T>
void DeleteWithoutGil(T* adapter) {
  nb::gil_scoped_release release;
  delete adapter;
}

// The Python object of a new adapter: T::Create runs without the GIL (it may scan a directory
// or connect to a server; a failure throws StatusError, which needs no GIL), and the object
// deletes the adapter without the GIL too.
template <typename T, typename Options>
std::shared_ptr<T> CreateAdapter(Options options) {
  std::unique_ptr<T> adapter;
  {
    nb::gil_scoped_release release;
    adapter = ValueOrThrow(T::Create(std::move(options)));
  }
  return std::shared_ptr<T>(adapter.release(), &DeleteWithoutGil<T>);
}

void BindEnumsAndStats(nb::module_& m) {
  BindStats<L2AdapterStats>(m, "L2AdapterStats",
                            "Gauges and counters of an L2 adapter (keys, not calls).");

  BindStats<SyncAdapterStats>(m, "SyncAdapterStats",
                              "The queue of a PythonL2Adapter (calls, not keys).");

  BindStats<RedisAdapterStats>(m, "RedisAdapterStats",
                               "Counters of a RedisL2Adapter beyond L2AdapterStats.");

  BindStats<FsRecoveryReport>(m, "FsRecoveryReport",
                              "What a FileSystemL2Adapter found in its directory at start-up.");

  nb::enum_<L2Op>(m, "L2Op", "The operation types MemoryL2Adapter faults can target.")
      .value("STORE", L2Op::kStore)
      .value("LOOKUP", L2Op::kLookup)
      .value("LOAD", L2Op::kLoad);

  nb::enum_<Fault::Kind>(m, "FaultKind", "What an injected MemoryL2Adapter fault does.")
      .value("FAIL", Fault::Kind::kFail, "no effect; completes with IoError")
      .value("DELAY", Fault::Kind::kDelay, "adds delay_s to the operation")
      .value("CORRUPT", Fault::Kind::kCorrupt,
             "loads: flips a byte of the first object read; its checksum makes it a miss")
      .value("STALL", Fault::Kind::kStall, "waits for the next set_stalled(False)");
}

void BindAdapterBase(nb::module_& m) {
  nb::class_<L2Adapter>(
      m, "L2Adapter",
      "An L2 tier (asynchronous in C++). Pass adapters to StorageManagerConfig. The submit_* "
      "methods call the asynchronous interface and wait for the completion with the GIL "
      "released (test and tool glue; they copy the buffers).")
      .def_prop_ro("name", &L2Adapter::name)
      .def("submit_store", &StoreAndWait, "keys"_a, "buffers"_a, nb::kw_only(),
           "timeout_s"_a = 60.0,
           "Stores one 1-D uint8 buffer per key and waits; bit i: keys[i] is in the tier. A "
           "failed call raises its status; DeadlineExceededError after timeout_s.")
      .def("submit_lookup_and_pin", &LookupAndWait, "keys"_a, nb::kw_only(), "timeout_s"_a = 60.0,
           "Looks up and pins the keys it has, and waits; bit i: keys[i] is present and pinned.")
      .def("submit_load", &LoadAndWait, "keys"_a, "buffers"_a.noconvert(), nb::kw_only(),
           "timeout_s"_a = 60.0,
           "Loads keys into writable 1-D uint8 arrays of exactly the objects' sizes, and waits; "
           "bit i: buffers[i] holds keys[i]'s bytes.")
      .def(
          "submit_unpin", [](L2Adapter& a, const Keys& keys) { a.Unpin(keys); }, "keys"_a,
          Release(), "Drops one pin per key (fire-and-forget).")
      .def(
          "close", [](L2Adapter& a) { a.Close(); }, Release(),
          "Cancels queued work, waits for what runs, joins the adapter's threads. Idempotent.")
      .def(
          "stats", [](const L2Adapter& a) { return a.stats(); }, Release());
}

void BindMemoryAdapter(nb::module_& m) {
  const MemoryAdapterOptions d;
  nb::class_<MemoryL2Adapter, L2Adapter>(
      m, "MemoryL2Adapter",
      "An in-process L2 tier for tests and benchmarks: capacity with FIFO eviction that skips "
      "pinned keys, simulated latency and bandwidth, fault injection, a global stall.")
      .def(nb::new_([](uint64_t capacity_bytes, uint64_t bandwidth_bytes_per_sec, double latency_s,
                       size_t worker_threads) {
             MemoryAdapterOptions o;
             o.capacity_bytes = capacity_bytes;
             o.bandwidth_bytes_per_sec = bandwidth_bytes_per_sec;
             o.latency = Timeout(latency_s);
             o.worker_threads = worker_threads;
             return CreateAdapter<MemoryL2Adapter>(o);
           }),
           nb::kw_only(), "capacity_bytes"_a = d.capacity_bytes,
           "bandwidth_bytes_per_sec"_a = d.bandwidth_bytes_per_sec, "latency_s"_a = 0.0,
           "worker_threads"_a = d.worker_threads)
      .def(
          "inject_fault",
          [](MemoryL2Adapter& a, L2Op op, uint64_t nth, Fault::Kind kind, double delay_s) {
            Fault f;
            f.kind = kind;
            f.delay = Timeout(delay_s);
            nb::gil_scoped_release release;
            a.InjectFault(op, nth, f);
          },
          "op"_a, "nth"_a, "kind"_a, "delay_s"_a = 0.0,
          "Arms a fault for the nth submit of `op` from now (1 = the next one).")
      .def("set_stalled", &MemoryL2Adapter::SetStalled, "stalled"_a, Release(),
           "While stalled, workers hold their next operation; False releases them.")
      .def("pin_count", &MemoryL2Adapter::PinCount, "key"_a, Release())
      .def("total_pins", &MemoryL2Adapter::TotalPins, Release())
      .def("contains", &MemoryL2Adapter::Contains, "key"_a, Release())
      .def(
          "wait_for_blocked_operations",
          [](const MemoryL2Adapter& a, size_t n, double timeout_s) {
            return a.WaitForBlockedOperations(n, Timeout(timeout_s));
          },
          "n"_a, "timeout_s"_a, Release(),
          "Waits until n operations are held (stalled or in simulated time); returns whether.");
}

void BindRedisAdapter(nb::module_& m) {
  const RedisAdapterOptions d;
  nb::class_<RedisL2Adapter, L2Adapter>(
      m, "RedisL2Adapter",
      "An L2 tier on Redis or Valkey (standalone or cluster), shared by cache servers on "
      "different hosts. Redis cannot pin, and its maxmemory policy is the eviction authority.")
      .def(nb::new_([](std::string url, bool cluster, std::string username, std::string password,
                       std::string key_prefix, std::string tls_ca_file, std::string tls_cert_file,
                       std::string tls_key_file, uint32_t connect_timeout_ms,
                       uint32_t op_timeout_ms, size_t connections_per_node,
                       uint64_t max_inflight_store_bytes, std::string namespace_name) {
             RedisAdapterOptions o;
             o.url = std::move(url);
             o.cluster = cluster;
             o.username = std::move(username);
             o.password = std::move(password);
             o.key_prefix = std::move(key_prefix);
             o.tls_ca_file = std::move(tls_ca_file);
             o.tls_cert_file = std::move(tls_cert_file);
             o.tls_key_file = std::move(tls_key_file);
             o.connect_timeout_ms = connect_timeout_ms;
             o.op_timeout_ms = op_timeout_ms;
             o.connections_per_node = connections_per_node;
             o.max_inflight_store_bytes = max_inflight_store_bytes;
             o.namespace_name = std::move(namespace_name);
             return CreateAdapter<RedisL2Adapter>(std::move(o));  // connects once
           }),
           "url"_a = d.url, nb::kw_only(), "cluster"_a = d.cluster, "username"_a = d.username,
           "password"_a = d.password, "key_prefix"_a = d.key_prefix,
           "tls_ca_file"_a = d.tls_ca_file, "tls_cert_file"_a = d.tls_cert_file,
           "tls_key_file"_a = d.tls_key_file, "connect_timeout_ms"_a = d.connect_timeout_ms,
           "op_timeout_ms"_a = d.op_timeout_ms, "connections_per_node"_a = d.connections_per_node,
           "max_inflight_store_bytes"_a = d.max_inflight_store_bytes,
           "namespace_name"_a = d.namespace_name)
      .def("redis_stats", &RedisL2Adapter::redis_stats, Release(),
           "Misses by reason, node errors, reconnects, redirections, rejected stores.")
      .def("key_for", &RedisL2Adapter::KeyFor, "key"_a, "The Redis key that holds `key`.");
}

void BindFileSystemAdapter(nb::module_& m) {
  const FileSystemAdapterOptions d;
  nb::class_<FileSystemL2Adapter, L2Adapter>(
      m, "FileSystemL2Adapter",
      "An L2 tier on a local file system, one validated file per object; the index is rebuilt "
      "from the directory at start-up, so objects survive a restart.")
      .def(nb::new_([](std::string directory, uint64_t capacity_bytes, bool fsync, bool o_direct,
                       size_t io_threads) {
             FileSystemAdapterOptions o;
             o.directory = std::move(directory);
             o.capacity_bytes = capacity_bytes;
             o.fsync = fsync;
             o.o_direct = o_direct;
             o.io_threads = io_threads;
             return CreateAdapter<FileSystemL2Adapter>(std::move(o));  // scans the directory
           }),
           "directory"_a, nb::kw_only(), "capacity_bytes"_a = d.capacity_bytes, "fsync"_a = d.fsync,
           "o_direct"_a = d.o_direct, "io_threads"_a = d.io_threads)
      .def("path_for", &FileSystemL2Adapter::PathFor, "key"_a,
           "The path of key's file (whether or not it exists).")
      .def_prop_ro("recovery", &FileSystemL2Adapter::recovery,
                   "What start-up found in the directory.")
      .def("direct_io_files", &FileSystemL2Adapter::direct_io_files)
      // Test views (testing::FileSystemAdapterPeer; not part of the C++ class), kept under the
      // names the memory tier and PythonL2Adapter's tests share.
      .def("pin_count", &testing::FileSystemAdapterPeer::PinCount, "key"_a, Release())
      .def("total_pins", &testing::FileSystemAdapterPeer::TotalPins, Release())
      .def("contains", &testing::FileSystemAdapterPeer::Contains, "key"_a, Release());
}

void BindPythonAdapter(nb::module_& m) {
  nb::class_<PythonL2AdapterBase, L2Adapter, PythonL2AdapterTrampoline>(
      m, "PythonL2Adapter",
      "Base class of L2 tiers written in Python. Subclasses implement store, lookup_and_pin, "
      "load and unpin as plain blocking methods; they run on the adapter's own worker threads "
      "(worker_threads, FIFO), which take the GIL only for the call. Buffers are zero-copy 1-D "
      "numpy uint8 arrays, read-only for store and writable for load, valid only during the "
      "call. A method that raises fails the operation (LMCacheIOError in C++ terms, logged): "
      "the pipelines treat it as a miss. store() is given each object's CRC32C and load() "
      "returns it; the base verifies every loaded object against it.")
      .def(nb::init<size_t, std::string>(), nb::kw_only(), "worker_threads"_a = 1,
           "name"_a = "python")
      .def(
          "store",
          [](PythonL2AdapterBase&, nb::list, nb::list, nb::list) -> nb::object {
            NotOverridden("store");
          },
          "keys"_a, "buffers"_a, "checksums"_a,
          "Stores buffers[i] (read-only, valid during the call) under keys[i], with checksums[i] "
          "(an int, the CRC32C of the bytes as committed): keep it with the bytes, load() returns "
          "it. Returns one bool per key (or a Bitmap): stored.")
      .def(
          "lookup_and_pin",
          [](PythonL2AdapterBase&, nb::list) -> nb::object { NotOverridden("lookup_and_pin"); },
          "keys"_a, "Pins every present key once more. Returns one bool per key: present, pinned.")
      .def(
          "load",
          [](PythonL2AdapterBase&, nb::list, nb::list) -> nb::object { NotOverridden("load"); },
          "keys"_a, "buffers"_a,
          "Writes keys[i]'s bytes into buffers[i] (writable, exactly the object's size, valid "
          "during the call). Returns one item per key: the checksum store() was given with "
          "those bytes, or None for a miss. The base checks the bytes against it; a mismatch is "
          "a miss counted in corrupt_reads, never data. True, or a Bitmap, fails the call.")
      .def(
          "unpin", [](PythonL2AdapterBase&, nb::list) { NotOverridden("unpin"); }, "keys"_a,
          "Drops one pin per key.")
      .def(
          "sync_stats", [](const PythonL2AdapterBase& a) { return a.sync_stats(); }, Release(),
          "The adapter's queue: queued, executing, completed, failed, cancelled calls.")
      .def_prop_ro("worker_threads", &PythonL2AdapterBase::worker_threads);
}

}  // namespace

void BindL2(nb::module_& m) {
  m.def(
      "crc32c", [](InBytes data) { return PayloadCrc32c(data.data(), data.size()); }, "data"_a,
      Release(),
      "The CRC32C (Castagnoli) of a 1-D uint8 array: the checksum L2 tiers keep with each object "
      "(PythonL2Adapter.store's checksums).");
  m.def(
      "crc32c", [](nb::bytes data) { return PayloadCrc32c(data.c_str(), data.size()); }, "data"_a,
      "The CRC32C (Castagnoli) of bytes.");
  BindEnumsAndStats(m);
  BindAdapterBase(m);
  BindMemoryAdapter(m);
  BindFileSystemAdapter(m);
  BindRedisAdapter(m);
  BindPythonAdapter(m);
}

}  // namespace lmcache_cpp::bindings
