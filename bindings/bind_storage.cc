// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of storage_manager.h and of the two controllers it owns (prefetch_controller.h,
// store_controller.h).
//
// Ownership. The Python StorageManager holds the core manager by std::shared_ptr. Everything it
// hands out that lives inside the manager (its object table, its controllers) is returned as a
// Python object holding an aliasing shared_ptr, so it keeps the whole manager alive: a table or
// controller object never dangles, whatever the order in which Python drops them. The manager
// holds its adapters (and, through them, Python adapter objects). The manager's last release runs
// in a Python dealloc, with the GIL held: the deleter releases the GIL while Stop() closes the
// adapters and joins every thread (a Python adapter's worker needs the GIL to finish its call).
//
// GIL. Every method that takes a core lock, waits, or joins releases the GIL (call_guard, or an
// explicit scope once the arguments are C++ values). Nothing in a released region touches a
// Python object.
//
// The manager's table is an ObjectTable (bind_object_table.cc) that keeps the manager alive; its
// start/stop belong to the manager.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/prefetch_controller.h"
#include "lmcache_cpp/storage_manager.h"
#include "lmcache_cpp/store_controller.h"

namespace lmcache_cpp::bindings {

void BindStorage(nb::module_& m);

namespace {

using namespace nb::literals;

// Python "PrefetchOptions": the C++ options with durations in float seconds.
struct PyPrefetchOptions {
  size_t max_in_flight = 0;
  size_t max_jobs_per_client = 0;
  double job_ttl_s = 0;
  double reap_interval_s = 0;

  static PyPrefetchOptions Defaults() {
    const PrefetchOptions core;
    return {core.max_in_flight, core.max_jobs_per_client, DurationToSeconds(core.job_ttl),
            DurationToSeconds(core.reap_interval)};
  }
  PrefetchOptions ToCore(std::shared_ptr<Clock> clock) const {
    PrefetchOptions core;
    core.max_in_flight = max_in_flight;
    core.max_jobs_per_client = max_jobs_per_client;
    core.job_ttl = SecondsToDuration(job_ttl_s, "job_ttl_s");
    core.reap_interval = SecondsToDuration(reap_interval_s, "reap_interval_s");
    core.clock = std::move(clock);
    return core;
  }
};

// Python "StorageManagerConfig".
struct PyStorageConfig {
  uint64_t arena_size = 0;
  ArenaBackend arena_backend = ArenaBackend::kMemfd;
  bool arena_huge_pages = false;
  PyObjectTableOptions table = PyObjectTableOptions::Defaults();
  PyPrefetchOptions prefetch = PyPrefetchOptions::Defaults();
  StoreControllerOptions store;
  std::vector<std::shared_ptr<L2Adapter>> adapters;  // each holds its Python object
};

// The manager's controllers (and its table, a PyObjectTable): aliasing shared_ptrs that keep the
// manager alive.
struct PyPrefetchController {
  std::shared_ptr<PrefetchController> ctl;
};
struct PyStoreController {
  std::shared_ptr<StoreController> ctl;
};

Duration NonNegative(double seconds, const char* what) {
  const Duration d = SecondsToDuration(seconds, what);
  if (d < Duration::zero()) {
    throw StatusError(Status::InvalidArgument(std::string(what) + " must be >= 0"));
  }
  return d;
}

std::string ResultRepr(const PrefetchResult& r) {
  return "PrefetchResult(hits=" + std::to_string(r.hits) +
         ", l1_hits=" + std::to_string(r.l1_hits) + ", l2_hits=" + std::to_string(r.l2_hits) + ")";
}

void BindOptions(nb::module_& m) {
  const PyPrefetchOptions pd = PyPrefetchOptions::Defaults();
  nb::class_<PyPrefetchOptions>(m, "PrefetchOptions", "PrefetchController settings (seconds).")
      .def(
          "__init__",
          [](PyPrefetchOptions* self, size_t max_in_flight, size_t max_jobs_per_client,
             double job_ttl_s, double reap_interval_s) {
            new (self)
                PyPrefetchOptions{max_in_flight, max_jobs_per_client, job_ttl_s, reap_interval_s};
          },
          nb::kw_only(), "max_in_flight"_a = pd.max_in_flight,
          "max_jobs_per_client"_a = pd.max_jobs_per_client, "job_ttl_s"_a = pd.job_ttl_s,
          "reap_interval_s"_a = pd.reap_interval_s)
      .def_rw("max_in_flight", &PyPrefetchOptions::max_in_flight,
              "two-phase lookups in their L2 phase at once")
      .def_rw("max_jobs_per_client", &PyPrefetchOptions::max_jobs_per_client,
              "ResourceExhaustedError beyond")
      .def_rw("job_ttl_s", &PyPrefetchOptions::job_ttl_s, "uncollected results are reaped after")
      .def_rw("reap_interval_s", &PyPrefetchOptions::reap_interval_s)
      .def("__repr__", [](const PyPrefetchOptions& o) {
        return nb::str(
                   "PrefetchOptions(max_in_flight={!r}, max_jobs_per_client={!r}, job_ttl_s={!r}, "
                   "reap_interval_s={!r})")
            .format(o.max_in_flight, o.max_jobs_per_client, o.job_ttl_s, o.reap_interval_s);
      });

  const StoreControllerOptions sd;
  nb::class_<StoreControllerOptions>(m, "StoreControllerOptions",
                                     "StoreController settings: batching, back-pressure, and "
                                     "whether L1 is a write buffer.")
      .def(
          "__init__",
          [](StoreControllerOptions* self, size_t max_batch, size_t max_in_flight_batches,
             size_t max_queued_keys, bool free_l1_after_store) {
            auto* o = new (self) StoreControllerOptions();
            o->max_batch = max_batch;
            o->max_in_flight_batches = max_in_flight_batches;
            o->max_queued_keys = max_queued_keys;
            o->free_l1_after_store = free_l1_after_store;
          },
          nb::kw_only(), "max_batch"_a = sd.max_batch,
          "max_in_flight_batches"_a = sd.max_in_flight_batches,
          "max_queued_keys"_a = sd.max_queued_keys,
          "free_l1_after_store"_a = sd.free_l1_after_store)
      .def_rw("max_batch", &StoreControllerOptions::max_batch, "keys per adapter store call")
      .def_rw("max_in_flight_batches", &StoreControllerOptions::max_in_flight_batches)
      .def_rw("max_queued_keys", &StoreControllerOptions::max_queued_keys,
              "beyond this the oldest queued keys are dropped")
      .def_rw("free_l1_after_store", &StoreControllerOptions::free_l1_after_store,
              "delete the L1 copy once every target adapter has it")
      .def("__repr__", [](const StoreControllerOptions& o) {
        return nb::str(
                   "StoreControllerOptions(max_batch={!r}, max_in_flight_batches={!r}, "
                   "max_queued_keys={!r}, free_l1_after_store={!r})")
            .format(o.max_batch, o.max_in_flight_batches, o.max_queued_keys, o.free_l1_after_store);
      });

  nb::class_<PyStorageConfig>(m, "StorageManagerConfig",
                              "Everything a StorageManager is built from. `adapters` are the L2 "
                              "tiers in lookup priority order; the manager keeps them alive.")
      .def(
          "__init__",
          [](PyStorageConfig* self, uint64_t arena_size, ArenaBackend arena_backend,
             bool arena_huge_pages, const std::optional<PyObjectTableOptions>& table,
             const std::optional<PyPrefetchOptions>& prefetch,
             const std::optional<StoreControllerOptions>& store,
             std::vector<std::shared_ptr<L2Adapter>> adapters) {
            auto* c = new (self) PyStorageConfig();
            c->arena_size = arena_size;
            c->arena_backend = arena_backend;
            c->arena_huge_pages = arena_huge_pages;
            if (table) c->table = *table;
            if (prefetch) c->prefetch = *prefetch;
            if (store) c->store = *store;
            c->adapters = std::move(adapters);
          },
          "arena_size"_a, nb::kw_only(), "arena_backend"_a = ArenaBackend::kMemfd,
          "arena_huge_pages"_a = false, "table"_a.none() = nb::none(),
          "prefetch"_a.none() = nb::none(), "store"_a.none() = nb::none(),
          "adapters"_a = std::vector<std::shared_ptr<L2Adapter>>())
      .def_rw("arena_size", &PyStorageConfig::arena_size, "bytes of the shared-memory arena (L1)")
      .def_rw("arena_backend", &PyStorageConfig::arena_backend)
      .def_rw("arena_huge_pages", &PyStorageConfig::arena_huge_pages,
              "back the arena with explicit huge pages when the system has enough free "
              "(falls back to normal pages with a warning; see Arena.huge_pages)")
      .def_rw("table", &PyStorageConfig::table)
      .def_rw("prefetch", &PyStorageConfig::prefetch)
      .def_rw("store", &PyStorageConfig::store)
      .def_rw("adapters", &PyStorageConfig::adapters,
              "the L2 tiers, in lookup priority order (reading returns a new list)");
}

void BindResults(nb::module_& m) {
  nb::class_<JobHandle> handle(m, "JobHandle",
                               "An unguessable 128-bit prefetch job handle, bound to the client "
                               "that created it.");
  handle.def("hex", &JobHandle::ToHex, "32 lower-case hex characters.")
      .def_static(
          "from_hex",
          [](const std::string& text) { return ValueOrThrow(JobHandle::FromHex(text)); }, "text"_a)
      .def(ValueOps<JobHandleHash>())
      .def("__repr__", [](const JobHandle& h) { return "JobHandle('" + h.ToHex() + "')"; });

  nb::class_<PrefetchResult>(m, "PrefetchResult", "The outcome of a prefetch.")
      .def_ro("hits", &PrefetchResult::hits, "leading keys now leased in L1 for the request")
      .def_ro("l1_hits", &PrefetchResult::l1_hits, "of which were already in L1")
      .def_ro("l2_hits", &PrefetchResult::l2_hits, "of which were loaded from L2")
      .def("__repr__", &ResultRepr);

  nb::class_<SyncLookupResult>(m, "SyncLookupResult", "The answer of a synchronous lookup.")
      .def_ro("handle", &SyncLookupResult::handle)
      .def_ro("hits", &SyncLookupResult::hits, "L1 prefix + keys planned from L2")
      .def_ro("l1_hits", &SyncLookupResult::l1_hits)
      .def_ro("l2_planned", &SyncLookupResult::l2_planned, "keys loading in the background")
      .def_ro("l2_timed_out", &SyncLookupResult::l2_timed_out,
              "an adapter had not answered by the deadline (counted as a miss)")
      .def("__repr__", [](const SyncLookupResult& r) {
        return "SyncLookupResult(hits=" + std::to_string(r.hits) +
               ", l1_hits=" + std::to_string(r.l1_hits) +
               ", l2_planned=" + std::to_string(r.l2_planned) +
               ", l2_timed_out=" + (r.l2_timed_out ? "True" : "False") + ")";
      });

  BindStats<PrefetchStats>(m, "PrefetchStats", "Gauges and counters of a PrefetchController.");

  BindStats<StoreControllerStats>(m, "StoreControllerStats",
                                  "Gauges and counters of a StoreController.");

  nb::class_<StorageStats>(m, "StorageStats", "A StorageManager's stats, per component.")
      .def_ro("l1", &StorageStats::l1)
      .def_ro("prefetch", &StorageStats::prefetch)
      .def_ro("store", &StorageStats::store)
      .def_ro("l2", &StorageStats::l2, "per adapter, in configuration order");
}

void BindControllers(nb::module_& m) {
  using P = PyPrefetchController;
  nb::class_<P>(m, "PrefetchController",
                "Brings the longest cached prefix of a request's keys into L1 and leases it for "
                "the request. Obtained from StorageManager.prefetch_controller(); keeps the "
                "manager alive. Every method releases the GIL.")
      .def(
          "submit",
          [](P& p, const LeaseOwner& owner, Keys keys, uint64_t object_size, uint32_t extra_count) {
            return ValueOrThrow(p.ctl->Submit(
                PrefetchRequest::Of(owner, std::move(keys), object_size, extra_count)));
          },
          "owner"_a, "keys"_a, "object_size"_a, nb::kw_only(), "extra_count"_a = 0, Release(),
          "Leases the L1 prefix now, starts the L2 part, returns the job's handle at once.")
      .def("query", CallThrough(&P::ctl, &PrefetchController::Query), "client"_a, "handle"_a,
           Release(), "The result once (then the handle is gone), or None while the job runs.")
      .def(
          "wait",
          [](P& p, ClientId client, const JobHandle& handle, double timeout_s) {
            const Duration timeout = NonNegative(timeout_s, "timeout_s");
            return ValueOrThrow(p.ctl->Wait(client, handle, timeout));
          },
          "client"_a, "handle"_a, "timeout_s"_a, Release(),
          "As query, waiting up to timeout_s for the result (None on timeout).")
      .def("cancel", CallThrough(&P::ctl, &PrefetchController::Cancel), "client"_a, "handle"_a,
           Release(), "Drops the job and everything it holds.")
      .def(
          "lookup_and_pin",
          [](P& p, const LeaseOwner& owner, Keys keys, uint64_t object_size, double timeout_s,
             uint32_t extra_count, bool start_load) {
            const Duration timeout = NonNegative(timeout_s, "timeout_s");
            return ValueOrThrow(p.ctl->LookupAndPin(
                PrefetchRequest::Of(owner, std::move(keys), object_size, extra_count), timeout,
                start_load));
          },
          "owner"_a, "keys"_a, "object_size"_a, "timeout_s"_a, nb::kw_only(), "extra_count"_a = 0,
          "start_load"_a = true, Release(),
          "Synchronous lookup: the hit count within timeout_s (an adapter that has not answered "
          "counts as a miss); the load then runs in the background (see wait_load).")
      .def("start_load", CallThrough(&P::ctl, &PrefetchController::StartLoad), "client"_a,
           "handle"_a, Release())
      .def(
          "wait_load",
          [](P& p, RequestId request, double timeout_s) {
            const Duration timeout = NonNegative(timeout_s, "timeout_s");
            return ValueOrThrow(p.ctl->WaitLoad(request, timeout));
          },
          "request"_a, "timeout_s"_a, Release(),
          "Joins the request's pending sync load; every joiner sees the same result.")
      .def(
          "end_request", [](P& p, RequestId request) { return p.ctl->EndRequest(request); },
          "request"_a, Release(),
          "Drops the request's jobs (its leases are left to the table; prefer "
          "StorageManager.end_request).")
      .def(
          "end_client", [](P& p, ClientId client) { return p.ctl->EndClient(client); }, "client"_a,
          Release())
      .def(
          "reap_expired", [](P& p) { return p.ctl->ReapExpired(); }, Release())
      .def(
          "wait_idle",
          [](P& p, double timeout_s) {
            return p.ctl->WaitIdle(NonNegative(timeout_s, "timeout_s"));
          },
          "timeout_s"_a, Release(), "Waits until no job is in an L2 phase; returns whether.")
      .def(
          "stats", [](const P& p) { return p.ctl->stats(); }, Release())
      .def_prop_ro("num_adapters", [](const P& p) { return p.ctl->num_adapters(); });

  using S = PyStoreController;
  nb::class_<S>(m, "StoreController",
                "Writes objects that finished writing in L1 to the L2 adapters in the background. "
                "Obtained from StorageManager.store_controller(); keeps the manager alive.")
      .def(
          "wait_idle",
          [](S& s, double timeout_s) {
            return s.ctl->WaitIdle(NonNegative(timeout_s, "timeout_s"));
          },
          "timeout_s"_a, Release(), "Waits until nothing is queued or in flight; returns whether.")
      .def(
          "enqueue", [](S& s, const Keys& keys) { s.ctl->Enqueue(keys); }, "keys"_a, Release(),
          "Queues keys for storing (what the table does for every finished write).")
      .def(
          "stats", [](const S& s) { return s.ctl->stats(); }, Release());
}

// A StorageManager accessor returning the component `get` gives as the Python holder H, whose
// pointer shares ownership of the manager (keeps it alive).
template <typename H, typename T>
auto ManagerPart(T* (StorageManager::*get)() const) {
  return [get](const PyStorageManager& s) {
    return H{std::shared_ptr<T>(s.manager, ((*s.manager).*get)())};
  };
}

void BindManager(nb::module_& m) {
  using M = PyStorageManager;
  nb::class_<M>(m, "StorageManager",
                "One host's storage: the shared-memory arena, the L1 object table, the L2 "
                "adapters and the store and prefetch controllers. start() / stop() are explicit "
                "and idempotent (also a context manager); stop() closes the adapters and joins "
                "every thread. Every method that can block releases the GIL.")
      .def(
          "__init__",
          [](M* self, const PyStorageConfig& config, const PyManualClock* clock) {
            if (config.arena_size == 0) {
              throw StatusError(Status::InvalidArgument("arena_size must be > 0"));
            }
            std::shared_ptr<Clock> c;
            if (clock != nullptr) c = clock->clock;
            StorageManagerConfig core;
            core.arena.size_bytes = config.arena_size;
            core.arena.backend = config.arena_backend;
            core.arena.huge_pages = config.arena_huge_pages;
            core.table = config.table.ToCore(c);
            core.prefetch = config.prefetch.ToCore(c);
            core.store = config.store;
            core.adapters = config.adapters;
            std::unique_ptr<StorageManager> manager;
            {
              nb::gil_scoped_release release;
              manager = ValueOrThrow(StorageManager::Create(std::move(core)));
            }
            // The last release happens in a Python dealloc (see the header comment).
            new (self) M{std::shared_ptr<StorageManager>(manager.release(), [](StorageManager* p) {
              {
                nb::gil_scoped_release release;
                p->Stop();
              }
              delete p;
            })};
          },
          "config"_a, nb::kw_only(), "clock"_a.none() = nb::none(),
          "Builds the arena, the table and both controllers; threads start with start(). "
          "`clock` (tests) drives lease and job TTLs.")
      .def(
          "start", [](M& s) { ThrowIfError(s.manager->Start()); }, Release(),
          "Starts the table's maintenance thread and both controllers. Idempotent; "
          "UnavailableError after stop().")
      .def(
          "stop", [](M& s) { s.manager->Stop(); }, Release(),
          "Stops the prefetch and store controllers, closes every adapter, waits for the "
          "pipelines to drain, stops the table. Idempotent.")
      .def(
          "__enter__",
          [](nb::handle self) {
            M& s = nb::cast<M&>(self);
            {
              nb::gil_scoped_release release;
              ThrowIfError(s.manager->Start());
            }
            return nb::borrow(self);
          },
          "Starts the manager and returns it.")
      .def(
          "__exit__",
          [](M& s, nb::args) {
            nb::gil_scoped_release release;
            s.manager->Stop();
          },
          "Stops the manager.")
      .def(
          "table",
          [](const M& s) {
            return PyObjectTable(std::shared_ptr<ObjectTable>(s.manager, s.manager->table()),
                                 /*is_managed=*/true);
          },
          "The L1 object table (keeps the manager alive).")
      .def("prefetch_controller", ManagerPart<PyPrefetchController>(&StorageManager::prefetch),
           "The prefetch controller (keeps the manager alive).")
      .def("store_controller", ManagerPart<PyStoreController>(&StorageManager::store),
           "The store controller (keeps the manager alive).")
      .def(
          "arena", [](const M& s) { return PyArena{s.manager->arena()}; },
          "The shared-memory arena (its descriptor lets other processes map it).")
      .def(
          "adapters", [](const M& s) { return s.manager->adapters(); },
          "The L2 adapters, in configuration order.")
      .def(
          "end_request", [](M& s, RequestId request) { return s.manager->EndRequest(request); },
          "request"_a, Release(),
          "END_SESSION: drops the request's prefetch jobs, then every lease it holds. Returns "
          "the number of leases released.")
      .def(
          "end_client", [](M& s, ClientId client) { return s.manager->EndClient(client); },
          "client"_a, Release(), "A client disconnected: the same for everything it created.")
      .def(
          "stats", [](const M& s) { return s.manager->stats(); }, Release());
}

}  // namespace

void BindStorage(nb::module_& m) {
  BindOptions(m);
  BindResults(m);
  BindControllers(m);
  BindManager(m);
}

}  // namespace lmcache_cpp::bindings
