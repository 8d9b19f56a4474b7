// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of object_table.h. Every ObjectTable method takes the table's mutex, so every binding
// releases the GIL around it; arguments (key lists) are converted to C++ before the release and
// results converted back after it. Listeners are not bound yet.
//
// Why every one: the core may log while holding the table's mutex (and the log bridge takes the
// GIL), so a thread that held the GIL while waiting for that mutex could deadlock. No binding
// here waits for a core lock or joins a core thread with the GIL held.

#include <nanobind/nanobind.h>
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
#include "lmcache_cpp/object_table.h"

namespace lmcache_cpp::bindings {
namespace {

using namespace nb::literals;

Status ManagedCheck(const PyObjectTable& t) {
  if (t.managed) {
    return Status::InvalidArgument(
        "this is a StorageManager's table: its manager starts and stops it");
  }
  return Status::Ok();
}

void BindValueTypes(nb::module_& m) {
  nb::class_<LeaseOwner> owner(m, "LeaseOwner",
                               "Who takes a lease: the client (connection) acting for a request.");
  owner.attr("__hash__") = nb::none();  // mutable, compares by value
  owner.def(nb::init<ClientId, RequestId>(), "client"_a, "request"_a)
      .def_rw("client", &LeaseOwner::client)
      .def_rw("request", &LeaseOwner::request)
      .def(
          "__eq__",
          [](const LeaseOwner& a, const LeaseOwner& b) {
            return a.client == b.client && a.request == b.request;
          },
          nb::is_operator())
      .def("__repr__", [](const LeaseOwner& o) {
        return "LeaseOwner(client=" + std::to_string(o.client) +
               ", request=" + std::to_string(o.request) + ")";
      });

  nb::enum_<ObjectState>(m, "ObjectState")
      .value("WRITING", ObjectState::kWriting)
      .value("READY", ObjectState::kReady);

  nb::enum_<ReserveMode>(m, "ReserveMode")
      .value("NEW_ONLY", ReserveMode::kNewOnly, "existing keys are reported as skipped")
      .value("STRICT", ReserveMode::kStrict, "an existing key fails the batch (NotWritableError)");

  nb::class_<Reservation>(m, "Reservation", "One key of a reserve_write batch.")
      .def_prop_ro("key", [](const Reservation& r) { return r.key; })
      .def_ro("skipped", &Reservation::skipped, "the key existed; nothing was reserved")
      .def_ro("offset", &Reservation::offset, "offset into the arena (valid when not skipped)")
      .def_ro("size", &Reservation::size, "requested object size")
      .def("__repr__", [](const Reservation& r) {
        return "Reservation(key=" + r.key.ToShortString() +
               ", skipped=" + (r.skipped ? "True" : "False") +
               ", offset=" + std::to_string(r.offset) + ", size=" + std::to_string(r.size) + ")";
      });

  nb::class_<ObjectInfo>(m, "ObjectInfo", "A snapshot of one object's entry.")
      .def_prop_ro("key", [](const ObjectInfo& i) { return i.key; })
      .def_ro("state", &ObjectInfo::state)
      .def_ro("offset", &ObjectInfo::offset)
      .def_ro("size", &ObjectInfo::size)
      .def_ro("readers", &ObjectInfo::readers, "read leases outstanding")
      .def_ro("temporary", &ObjectInfo::temporary)
      .def_ro("detached", &ObjectInfo::detached)
      .def_ro("generation", &ObjectInfo::generation, "unique per reservation")
      .def_prop_ro(
          "crc32c",
          [](const ObjectInfo& i) -> std::optional<uint32_t> {
            return i.has_crc32c ? std::optional<uint32_t>(i.crc32c) : std::nullopt;
          },
          "CRC32C committed with the object, or None")
      .def("__repr__", [](const ObjectInfo& i) {
        return "ObjectInfo(key=" + i.key.ToShortString() +
               ", state=" + (i.state == ObjectState::kReady ? "READY" : "WRITING") +
               ", offset=" + std::to_string(i.offset) + ", size=" + std::to_string(i.size) +
               ", readers=" + std::to_string(i.readers) +
               ", temporary=" + (i.temporary ? "True" : "False") +
               ", detached=" + (i.detached ? "True" : "False") + ")";
      });

  BindStats<ObjectTableStats>(m, "ObjectTableStats", "Gauges and counters of an ObjectTable.");

  const PyObjectTableOptions d = PyObjectTableOptions::Defaults();
  nb::class_<PyObjectTableOptions>(m, "ObjectTableOptions",
                                   "ObjectTable settings; durations in seconds.")
      .def(
          "__init__",
          [](PyObjectTableOptions* self, double read_lease_ttl_s, double write_lease_ttl_s,
             double high_watermark, double low_watermark, double reap_interval_s,
             std::string eviction_policy, uint64_t alignment) {
            new (self) PyObjectTableOptions{
                read_lease_ttl_s, write_lease_ttl_s,          high_watermark, low_watermark,
                reap_interval_s,  std::move(eviction_policy), alignment};
          },
          nb::kw_only(), "read_lease_ttl_s"_a = d.read_lease_ttl_s,
          "write_lease_ttl_s"_a = d.write_lease_ttl_s, "high_watermark"_a = d.high_watermark,
          "low_watermark"_a = d.low_watermark, "reap_interval_s"_a = d.reap_interval_s,
          "eviction_policy"_a = d.eviction_policy, "alignment"_a = d.alignment)
      .def_rw("read_lease_ttl_s", &PyObjectTableOptions::read_lease_ttl_s)
      .def_rw("write_lease_ttl_s", &PyObjectTableOptions::write_lease_ttl_s)
      .def_rw("high_watermark", &PyObjectTableOptions::high_watermark,
              "background eviction starts above this fraction of capacity (1.0 = off)")
      .def_rw("low_watermark", &PyObjectTableOptions::low_watermark,
              "background eviction stops below this fraction")
      .def_rw("reap_interval_s", &PyObjectTableOptions::reap_interval_s)
      .def_rw("eviction_policy", &PyObjectTableOptions::eviction_policy)
      .def_rw("alignment", &PyObjectTableOptions::alignment)
      .def("__repr__", [](const PyObjectTableOptions& o) {
        return nb::str(
                   "ObjectTableOptions(read_lease_ttl_s={!r}, write_lease_ttl_s={!r}, "
                   "high_watermark={!r}, low_watermark={!r}, reap_interval_s={!r}, "
                   "eviction_policy={!r}, alignment={!r})")
            .format(o.read_lease_ttl_s, o.write_lease_ttl_s, o.high_watermark, o.low_watermark,
                    o.reap_interval_s, o.eviction_policy, o.alignment);
      });
}

void BindTable(nb::module_& m) {
  nb::class_<PyObjectTable>(m, "ObjectTable",
                            "The L1 manager: keys -> arena byte ranges, per-object state machine, "
                            "per-request leases with TTLs, eviction. Thread-safe; every method "
                            "releases the GIL.")
      .def(
          "__init__",
          [](PyObjectTable* self, const PyArena& arena,
             const std::optional<PyObjectTableOptions>& options, const PyManualClock* clock) {
            const PyObjectTableOptions& o = options ? *options : PyObjectTableOptions::Defaults();
            std::shared_ptr<Clock> c;
            if (clock != nullptr) c = clock->clock;
            std::shared_ptr<ObjectTable> table =
                ValueOrThrow(ObjectTable::Create(arena.arena, o.ToCore(std::move(c))));
            new (self) PyObjectTable(std::move(table), /*is_managed=*/false);
          },
          "arena"_a, "options"_a.none() = nb::none(), nb::kw_only(), "clock"_a.none() = nb::none(),
          Release())
      .def(
          "start",
          [](PyObjectTable& t) {
            ThrowIfError(ManagedCheck(t));
            t.table->Start();
          },
          Release(),
          "Starts the maintenance thread (watermark eviction, lease reaping). Idempotent. A "
          "StorageManager's table is started and stopped by its manager (InvalidArgumentError).")
      .def(
          "stop",
          [](PyObjectTable& t) {
            ThrowIfError(ManagedCheck(t));
            t.table->Stop();
          },
          Release(), "Stops and joins the maintenance thread. Idempotent.")
      .def(
          "reserve_write",
          [](PyObjectTable& t, const LeaseOwner& owner, const Keys& keys, uint64_t object_size,
             ReserveMode mode, bool temporary) {
            ReserveOptions options;
            options.mode = mode;
            options.temporary = temporary;
            return ValueOrThrow(t.table->ReserveWrite(owner, keys, object_size, options));
          },
          "owner"_a, "keys"_a, "object_size"_a, nb::kw_only(), "mode"_a = ReserveMode::kNewOnly,
          "temporary"_a = false, Release(),
          "Reserves keys for writing with a write lease for `owner`; all or nothing in memory.")
      .def(
          "finish_write",
          [](PyObjectTable& t, RequestId request, const Keys& keys, uint32_t read_leases) {
            ThrowIfError(t.table->FinishWrite(request, keys, read_leases));
          },
          "request"_a, "keys"_a, "read_leases"_a = 0, Release(),
          "writing -> ready for every key, atomically; grants `read_leases` read leases on each.")
      .def("abort_write", CallThrough(&PyObjectTable::table, &ObjectTable::AbortWrite), "request"_a,
           "keys"_a, Release(), "writing -> absent, atomically.")
      .def(
          "release_quarantine",
          [](PyObjectTable& t, RequestId request) { return t.table->ReleaseQuarantine(request); },
          "request"_a, Release(),
          "The writer is done: frees the objects quarantined for it (its write lease was "
          "dropped by someone else). Returns how many.")
      .def("acquire_read", CallThrough(&PyObjectTable::table, &ObjectTable::AcquireRead), "owner"_a,
           "keys"_a, "count"_a = 1, Release(),
           "Takes `count` read leases on every key, atomically.")
      .def(
          "acquire_read_prefix",
          [](PyObjectTable& t, const LeaseOwner& owner, const Keys& keys, uint32_t count) {
            return t.table->AcquireReadPrefix(owner, keys, count);
          },
          "owner"_a, "keys"_a, "count"_a = 1, Release(),
          "Leases the longest readable prefix of `keys`; returns its length.")
      .def(
          "release_read",
          [](PyObjectTable& t, RequestId request, const Keys& keys, uint32_t count) {
            ThrowIfError(t.table->ReleaseRead(request, keys, count));
          },
          "request"_a, "keys"_a, "count"_a = 1, Release(),
          "Returns `count` read leases per key, atomically.")
      .def(
          "contains",
          [](const PyObjectTable& t, const Keys& keys) { return t.table->Contains(keys); },
          "keys"_a, Release(), "Which keys are ready (no lease, no touch).")
      .def(
          "touch_prefix",
          [](PyObjectTable& t, const Keys& keys) { return t.table->TouchPrefix(keys); }, "keys"_a,
          Release(), "Length of the ready prefix; touches it. No lease.")
      .def(
          "release_request",
          [](PyObjectTable& t, RequestId request) { return t.table->ReleaseRequest(request); },
          "request"_a, Release(), "Drops every lease of the request; returns entries dropped.")
      .def(
          "release_client",
          [](PyObjectTable& t, ClientId client) { return t.table->ReleaseClient(client); },
          "client"_a, Release(), "Drops the ledgers of every request first seen from `client`.")
      .def(
          "reap_expired", [](PyObjectTable& t) { return t.table->ReapExpired(); }, Release(),
          "Drops lease entries past their TTL; returns how many.")
      .def(
          "delete", [](PyObjectTable& t, const Keys& keys) { ThrowIfError(t.table->Delete(keys)); },
          "keys"_a, Release(), "Deletes ready, unleased objects, atomically.")
      .def(
          "clear", [](PyObjectTable& t, bool force) { return t.table->Clear(force); },
          "force"_a = false, Release(), "Removes objects; returns how many left the index.")
      .def(
          "evict_bytes",
          [](PyObjectTable& t, uint64_t bytes) { return t.table->EvictBytes(bytes); }, "bytes"_a,
          Release(), "Evicts least recently used objects; returns bytes freed.")
      .def(
          "info", [](const PyObjectTable& t, const ObjectKey& key) { return t.table->Info(key); },
          "key"_a, Release())
      .def(
          "leases_held",
          [](const PyObjectTable& t, RequestId request, const ObjectKey& key) {
            return t.table->LeasesHeld(request, key);
          },
          "request"_a, "key"_a, Release())
      .def(
          "stats", [](const PyObjectTable& t) { return t.table->stats(); }, Release())
      .def(
          "check_invariants",
          [](const PyObjectTable& t) { ThrowIfError(t.table->CheckInvariants()); }, Release())
      .def_prop_ro(
          "capacity", [](const PyObjectTable& t) { return t.table->arena()->size(); },
          "Size of the arena in bytes.")
      .def(
          "view",
          [](const PyObjectTable& t, uint64_t offset, uint64_t size) {
            const std::shared_ptr<Arena>& arena = t.table->arena();
            return MakeByteView(arena, arena->base(), arena->size(), offset, size);
          },
          "offset"_a, "size"_a,
          "Writable zero-copy uint8 view of arena bytes [offset, offset + size). The view keeps "
          "the arena mapped after the table and the Arena object are gone.");
}

}  // namespace

void BindObjectTable(nb::module_& m) {
  BindValueTypes(m);
  BindTable(m);
}

}  // namespace lmcache_cpp::bindings
