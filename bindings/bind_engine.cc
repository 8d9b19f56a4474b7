// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of the cache engine (cpp/include/lmcache_cpp/cache_engine.h): EngineConfig, EngineKey,
// the reply types and CacheEngine. Keys hold their token / block-hash bytes as Python bytes
// objects, read in place (no copy) while the GIL is released for the engine call; the key object
// is kept alive by the call's argument reference.

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/redis_adapter.h"
#include "net/router_loop.h"
#include "wire/fast_path.h"

namespace lmcache_cpp::bindings {

namespace {

using namespace nb::literals;

struct PyEngineConfig {
  uint32_t chunk_size = 256;
  HashAlgorithm hash_algorithm = HashAlgorithm::kSha256;
  double sync_lookup_timeout_s = 0.2;
  double retrieve_wait_timeout_s = 30.0;
  double transfer_ttl_s = 120.0;
  double request_ttl_s = 600.0;
  double lookup_ttl_s = 240.0;
  double session_ttl_s = 600.0;
  size_t max_sessions = 65536;
  size_t max_registrations_per_client = 256;
  size_t max_transfers_per_client = 4096;
  size_t max_chunks_per_key = 16384;
  size_t max_requests = size_t{1} << 20;
  size_t max_keys_per_request = size_t{1} << 20;
  size_t max_requests_per_client = 65536;
  uint64_t max_reserved_bytes_per_client = 0;
  uint64_t max_session_bytes = uint64_t{1} << 30;
  size_t max_sessions_per_client = 8192;
  uint64_t max_session_bytes_per_client = uint64_t{256} << 20;

  EngineConfig ToCore(std::shared_ptr<Clock> clock) const {
    EngineConfig c;
    c.chunk_size = chunk_size;
    c.hash_algorithm = hash_algorithm;
    c.sync_lookup_timeout = Positive(sync_lookup_timeout_s, "sync_lookup_timeout_s");
    c.retrieve_wait_timeout = Positive(retrieve_wait_timeout_s, "retrieve_wait_timeout_s");
    c.transfer_ttl = Positive(transfer_ttl_s, "transfer_ttl_s");
    c.request_ttl = Positive(request_ttl_s, "request_ttl_s");
    c.lookup_ttl = Positive(lookup_ttl_s, "lookup_ttl_s");
    c.sessions.ttl = Positive(session_ttl_s, "session_ttl_s");
    c.sessions.max_sessions = max_sessions;
    c.max_registrations_per_client = max_registrations_per_client;
    c.max_transfers_per_client = max_transfers_per_client;
    c.max_chunks_per_key = max_chunks_per_key;
    c.max_requests = max_requests;
    c.max_keys_per_request = max_keys_per_request;
    c.max_requests_per_client = max_requests_per_client;
    c.max_reserved_bytes_per_client = max_reserved_bytes_per_client;
    c.sessions.max_bytes = max_session_bytes;
    c.sessions.max_sessions_per_owner = max_sessions_per_client;
    c.sessions.max_bytes_per_owner = max_session_bytes_per_client;
    c.clock = std::move(clock);
    return c;
  }

  static Duration Positive(double s, const char* what) {
    const Duration d = SecondsToDuration(s, what);
    if (d <= Duration::zero()) {
      throw StatusError(Status::InvalidArgument(std::string(what) + " must be > 0"));
    }
    return d;
  }
};

// An owning key: the strings and the data bytes object live as long as the Python key.
struct PyEngineKey {
  std::string model_name;
  uint32_t world_size = 1;
  int32_t worker_id = -1;
  std::string request_id;
  std::string cache_salt;
  KeyMode mode = KeyMode::kTokens;
  nb::bytes data;
  uint32_t block_hash_size = 32;
  uint64_t start = 0;
  int64_t end = -1;

  // REQUIRES: the GIL is held (reads the bytes object's buffer pointer).
  EngineKey View() const {
    EngineKey k;
    k.model_name = model_name;
    k.world_size = world_size;
    k.worker_id = worker_id;
    k.request_id = request_id;
    k.cache_salt = cache_salt;
    k.mode = mode;
    k.data = reinterpret_cast<const uint8_t*>(data.c_str());
    k.size = data.size();
    k.block_hash_size = block_hash_size;
    k.start = start;
    k.end = end < 0 ? UINT64_MAX : static_cast<uint64_t>(end);
    return k;
  }
};

// The engine's completion notices, queued for the server (CacheEngine::SetCompletionNotice), and
// an eventfd that becomes readable when the queue stops being empty. Shared by the notice (which
// the prefetch controller may still be calling) and the Python object, so the descriptor closes
// only after both are gone and is never written once its number may name another file.
struct CompletionQueue {
  static constexpr size_t kMaxQueued = 65536;  // beyond: `overflowed`, the server polls all
  int fd = -1;
  std::mutex mu;
  std::vector<std::pair<JobHandle, RequestId>> queued;  // GUARDED_BY(mu)
  bool overflowed = false;                              // GUARDED_BY(mu)
  CompletionQueue() : fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~CompletionQueue() {
    if (fd >= 0) ::close(fd);
  }
  CompletionQueue(const CompletionQueue&) = delete;
  CompletionQueue& operator=(const CompletionQueue&) = delete;

  void Push(const JobHandle& handle, RequestId request) {
    bool was_empty = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      was_empty = queued.empty() && !overflowed;
      if (queued.size() < kMaxQueued) {
        queued.emplace_back(handle, request);
      } else {
        overflowed = true;
      }
    }
    if (was_empty) {
      const uint64_t one = 1;
      (void)!::write(fd, &one, sizeof(one));  // non-blocking; never fails short
    }
  }
};

struct PyCacheEngine {
  std::shared_ptr<StorageManager> storage;  // destroyed after the engine
  std::unique_ptr<CacheEngine> engine;
  std::shared_ptr<CompletionQueue> completions;  // made by completion_fd()
};

std::optional<Duration> OptionalSeconds(std::optional<double> s, const char* what) {
  if (!s.has_value()) return std::nullopt;
  const Duration d = SecondsToDuration(*s, what);
  if (d < Duration::zero()) {
    throw StatusError(Status::InvalidArgument(std::string(what) + " must be >= 0"));
  }
  return d;
}

// Binds an engine call on (client, key, tp_size): views the key with the GIL held, then calls
// the engine with it released.
template <typename R>
auto KeyCall(Result<R> (CacheEngine::*call)(ClientId, const EngineKey&, uint32_t)) {
  return [call](PyCacheEngine& e, ClientId client, const PyEngineKey& key, uint32_t tp_size) {
    const EngineKey k = key.View();
    nb::gil_scoped_release release;
    return ValueOrThrow(((*e.engine).*call)(client, k, tp_size));
  };
}

// As KeyCall for a call that also takes an optional deadline (`timeout_s`, None: the engine's
// default), converted with the GIL held.
template <typename R>
auto KeyCallWithDeadline(Result<R> (CacheEngine::*call)(ClientId, const EngineKey&, uint32_t,
                                                        std::optional<Duration>)) {
  return [call](PyCacheEngine& e, ClientId client, const PyEngineKey& key, uint32_t tp_size,
                std::optional<double> timeout_s) {
    const EngineKey k = key.View();
    const auto t = OptionalSeconds(timeout_s, "timeout_s");
    nb::gil_scoped_release release;
    return ValueOrThrow(((*e.engine).*call)(client, k, tp_size, t));
  };
}

std::string LookupRepr(const LookupResult& r) {
  return "LookupResult(hit_chunks=" + std::to_string(r.hit_chunks) +
         ", hit_tokens=" + std::to_string(r.hit_tokens) +
         ", l1_chunks=" + std::to_string(r.l1_chunks) +
         ", l2_chunks=" + std::to_string(r.l2_chunks) + ")";
}

void BindTypes(nb::module_& m) {
  BindStats<EngineStats>(m, "EngineStats",
                         "Gauges and counters of a CacheEngine (stats()['engine']).");
  BindStats<ClientUsage>(m, "ClientUsage",
                         "What one client holds (the fields of each client_usage() entry besides "
                         "`client`).")
      .def_ro("client", &ClientUsage::client);
  nb::enum_<KeyMode>(m, "KeyMode")
      .value("TOKENS", KeyMode::kTokens)
      .value("BLOCK_HASHES", KeyMode::kBlockHashes);

  const PyEngineConfig d;
  nb::class_<PyEngineConfig>(m, "EngineConfig", "CacheEngine settings (durations in seconds).")
      .def(
          "__init__",
          [](PyEngineConfig* self, uint32_t chunk_size, HashAlgorithm hash_algorithm,
             double sync_lookup_timeout_s, double retrieve_wait_timeout_s, double transfer_ttl_s,
             double request_ttl_s, double lookup_ttl_s, double session_ttl_s, size_t max_sessions,
             size_t max_registrations_per_client, size_t max_transfers_per_client,
             size_t max_chunks_per_key, size_t max_requests, size_t max_keys_per_request,
             size_t max_requests_per_client, uint64_t max_reserved_bytes_per_client,
             uint64_t max_session_bytes, size_t max_sessions_per_client,
             uint64_t max_session_bytes_per_client) {
            new (self) PyEngineConfig{chunk_size,
                                      hash_algorithm,
                                      sync_lookup_timeout_s,
                                      retrieve_wait_timeout_s,
                                      transfer_ttl_s,
                                      request_ttl_s,
                                      lookup_ttl_s,
                                      session_ttl_s,
                                      max_sessions,
                                      max_registrations_per_client,
                                      max_transfers_per_client,
                                      max_chunks_per_key,
                                      max_requests,
                                      max_keys_per_request,
                                      max_requests_per_client,
                                      max_reserved_bytes_per_client,
                                      max_session_bytes,
                                      max_sessions_per_client,
                                      max_session_bytes_per_client};
          },
          nb::kw_only(), "chunk_size"_a = d.chunk_size, "hash_algorithm"_a = d.hash_algorithm,
          "sync_lookup_timeout_s"_a = d.sync_lookup_timeout_s,
          "retrieve_wait_timeout_s"_a = d.retrieve_wait_timeout_s,
          "transfer_ttl_s"_a = d.transfer_ttl_s, "request_ttl_s"_a = d.request_ttl_s,
          "lookup_ttl_s"_a = d.lookup_ttl_s, "session_ttl_s"_a = d.session_ttl_s,
          "max_sessions"_a = d.max_sessions,
          "max_registrations_per_client"_a = d.max_registrations_per_client,
          "max_transfers_per_client"_a = d.max_transfers_per_client,
          "max_chunks_per_key"_a = d.max_chunks_per_key, "max_requests"_a = d.max_requests,
          "max_keys_per_request"_a = d.max_keys_per_request,
          "max_requests_per_client"_a = d.max_requests_per_client,
          "max_reserved_bytes_per_client"_a = d.max_reserved_bytes_per_client,
          "max_session_bytes"_a = d.max_session_bytes,
          "max_sessions_per_client"_a = d.max_sessions_per_client,
          "max_session_bytes_per_client"_a = d.max_session_bytes_per_client)
      .def_rw("chunk_size", &PyEngineConfig::chunk_size)
      .def_rw("hash_algorithm", &PyEngineConfig::hash_algorithm)
      .def_rw("sync_lookup_timeout_s", &PyEngineConfig::sync_lookup_timeout_s)
      .def_rw("retrieve_wait_timeout_s", &PyEngineConfig::retrieve_wait_timeout_s)
      .def_rw("transfer_ttl_s", &PyEngineConfig::transfer_ttl_s)
      .def_rw("request_ttl_s", &PyEngineConfig::request_ttl_s)
      .def_rw("lookup_ttl_s", &PyEngineConfig::lookup_ttl_s)
      .def_rw("session_ttl_s", &PyEngineConfig::session_ttl_s)
      .def_rw("max_sessions", &PyEngineConfig::max_sessions)
      .def_rw("max_registrations_per_client", &PyEngineConfig::max_registrations_per_client)
      .def_rw("max_transfers_per_client", &PyEngineConfig::max_transfers_per_client)
      .def_rw("max_chunks_per_key", &PyEngineConfig::max_chunks_per_key)
      .def_rw("max_requests", &PyEngineConfig::max_requests)
      .def_rw("max_keys_per_request", &PyEngineConfig::max_keys_per_request)
      .def_rw("max_requests_per_client", &PyEngineConfig::max_requests_per_client)
      .def_rw("max_reserved_bytes_per_client", &PyEngineConfig::max_reserved_bytes_per_client)
      .def_rw("max_session_bytes", &PyEngineConfig::max_session_bytes)
      .def_rw("max_sessions_per_client", &PyEngineConfig::max_sessions_per_client)
      .def_rw("max_session_bytes_per_client", &PyEngineConfig::max_session_bytes_per_client);

  nb::class_<PyEngineKey>(m, "EngineKey",
                          "A request's key: model, ranks, request id and token range, by token "
                          "ids (packed little-endian uint32 bytes) or by engine block hashes.")
      .def(
          "__init__",
          [](PyEngineKey* self, std::string model_name, uint32_t world_size, int32_t worker_id,
             std::string request_id, std::string cache_salt, std::optional<nb::bytes> tokens,
             std::optional<nb::bytes> block_hashes, uint32_t block_hash_size, uint64_t start,
             int64_t end) {
            if (tokens.has_value() == block_hashes.has_value()) {
              throw StatusError(
                  Status::InvalidArgument("give exactly one of tokens and block_hashes"));
            }
            new (self) PyEngineKey{std::move(model_name),
                                   world_size,
                                   worker_id,
                                   std::move(request_id),
                                   std::move(cache_salt),
                                   tokens ? KeyMode::kTokens : KeyMode::kBlockHashes,
                                   tokens ? *tokens : *block_hashes,
                                   block_hash_size,
                                   start,
                                   end};
          },
          nb::kw_only(), "model_name"_a, "world_size"_a = 1, "worker_id"_a = -1,
          "request_id"_a = "", "cache_salt"_a = "", "tokens"_a = nb::none(),
          "block_hashes"_a = nb::none(), "block_hash_size"_a = 32, "start"_a = 0, "end"_a = -1)
      .def_ro("model_name", &PyEngineKey::model_name)
      .def_ro("world_size", &PyEngineKey::world_size)
      .def_ro("worker_id", &PyEngineKey::worker_id)
      .def_ro("request_id", &PyEngineKey::request_id)
      .def_ro("cache_salt", &PyEngineKey::cache_salt)
      .def_ro("mode", &PyEngineKey::mode)
      .def_prop_ro("tokens",
                   [](const PyEngineKey& k) -> std::optional<nb::bytes> {
                     if (k.mode != KeyMode::kTokens) return std::nullopt;
                     return k.data;
                   })
      .def_prop_ro("block_hashes",
                   [](const PyEngineKey& k) -> std::optional<nb::bytes> {
                     if (k.mode != KeyMode::kBlockHashes) return std::nullopt;
                     return k.data;
                   })
      .def_ro("block_hash_size", &PyEngineKey::block_hash_size)
      .def_ro("start", &PyEngineKey::start)
      .def_ro("end", &PyEngineKey::end)
      .def("__repr__", [](const PyEngineKey& k) {
        return "EngineKey(model_name='" + k.model_name +
               "', world_size=" + std::to_string(k.world_size) +
               ", worker_id=" + std::to_string(k.worker_id) + ", request_id='" + k.request_id +
               "', " + (k.mode == KeyMode::kTokens ? "tokens=" : "block_hashes=") +
               std::to_string(k.data.size()) + " bytes, start=" + std::to_string(k.start) +
               ", end=" + std::to_string(k.end) + ")";
      });

  nb::class_<Registration>(m, "Registration", "Reply of CacheEngine.register_kv_cache.")
      .def_ro("id", &Registration::id)
      .def_ro("chunk_size", &Registration::chunk_size)
      .def_ro("object_bytes", &Registration::object_bytes)
      .def_ro("fingerprint", &Registration::fingerprint)
      .def_ro("arena", &Registration::arena, "what a worker maps (AttachedArena(descriptor))")
      .def_prop_ro("arena_path", [](const Registration& r) { return r.arena.path; })
      .def_prop_ro("arena_size", [](const Registration& r) { return r.arena.size; });

  nb::class_<LookupResult>(m, "LookupResult", "Hits of a lookup, in chunks for every rank.")
      .def_ro("hit_chunks", &LookupResult::hit_chunks)
      .def_ro("hit_tokens", &LookupResult::hit_tokens)
      .def_ro("l1_chunks", &LookupResult::l1_chunks)
      .def_ro("l2_chunks", &LookupResult::l2_chunks)
      .def("__repr__", &LookupRepr);

  nb::class_<TransferTicket>(m, "TransferTicket",
                             "Reply of prepare_store / prepare_retrieve: arena offsets per key "
                             "(-1 = skipped store key) and the handle to commit with.")
      .def_ro("handle", &TransferTicket::handle)
      .def_ro("first_chunk", &TransferTicket::first_chunk)
      .def_ro("offsets", &TransferTicket::offsets)
      .def_ro("object_bytes", &TransferTicket::object_bytes);
}

void BindEngine(nb::module_& m) {
  using E = PyCacheEngine;
  nb::class_<E>(m, "CacheEngine",
                "The cache server's request semantics (docs/protocol.md) over a StorageManager. "
                "Every method releases the GIL; the blocking ones block only their caller.")
      .def(
          "__init__",
          [](E* self, const PyStorageManager& storage, const PyEngineConfig& config,
             const PyManualClock* clock) {
            std::shared_ptr<Clock> c;
            if (clock != nullptr) c = clock->clock;
            auto engine =
                ValueOrThrow(CacheEngine::Create(storage.manager.get(), config.ToCore(c)));
            new (self) E{storage.manager, std::move(engine), nullptr};
          },
          "storage"_a, "config"_a, nb::kw_only(), "clock"_a = nullptr)
      .def_prop_ro("chunk_size", [](const E& e) { return e.engine->chunk_size(); })
      .def_prop_ro(
          "retrieve_wait_timeout_s",
          [](const E& e) {
            return std::chrono::duration<double>(e.engine->config().retrieve_wait_timeout).count();
          },
          "How long prepare_retrieve / free_lookup_locks wait for a pending L2 load by default.")
      .def(
          "client_usage",
          [](const E& e) {
            std::vector<ClientUsage> usages;
            {
              nb::gil_scoped_release release;
              usages = e.engine->ClientUsages();
            }
            nb::list out;
            for (const ClientUsage& u : usages) {
              nb::dict d;
              d["client"] = u.client;
              d.update(StatsDict(u));
              out.append(d);
            }
            return out;
          },
          "What each client holds now, one dict per client that holds anything, by client id: "
          "`client` and the fields of ClientUsage.")
      .def_prop_ro("reserved_bytes_quota",
                   [](const E& e) { return e.engine->reserved_bytes_quota(); })
      .def(
          "start", [](E& e) { e.engine->Start(); }, Release())
      .def(
          "stop", [](E& e) { e.engine->Stop(); }, Release())
      .def(
          "register_kv_cache",
          [](E& e, ClientId client, const std::string& model_name, uint32_t world_size,
             int32_t worker_id, const KvCacheLayout& layout) {
            return ValueOrThrow(
                e.engine->RegisterKvCache(client, model_name, world_size, worker_id, layout));
          },
          "client"_a, "model_name"_a, "world_size"_a, "worker_id"_a, "layout"_a, Release())
      .def("unregister_kv_cache", CallThrough(&E::engine, &CacheEngine::UnregisterKvCache),
           "client"_a, "registration_id"_a, Release())
      .def("lookup", KeyCall(&CacheEngine::Lookup), "client"_a, "key"_a, "tp_size"_a = 1)
      .def("query_prefetch_status", CallThrough(&E::engine, &CacheEngine::QueryPrefetch),
           "client"_a, "handle"_a, Release())
      .def(
          "wait_prefetch_status",
          [](E& e, ClientId client, const JobHandle& handle, double timeout_s) {
            const Duration t = *OptionalSeconds(timeout_s, "timeout_s");
            nb::gil_scoped_release release;
            return ValueOrThrow(e.engine->WaitPrefetch(client, handle, t));
          },
          "client"_a, "handle"_a, "timeout_s"_a)
      .def("sync_lookup", KeyCallWithDeadline(&CacheEngine::SyncLookup), "client"_a, "key"_a,
           "tp_size"_a = 1, "timeout_s"_a = nb::none())
      .def("sync_lookup_in_l1", KeyCall(&CacheEngine::SyncLookupInL1), "client"_a, "key"_a,
           "tp_size"_a = 1)
      .def("free_lookup_locks", KeyCallWithDeadline(&CacheEngine::FreeLookupLocks), "client"_a,
           "key"_a, "tp_size"_a = 1, "timeout_s"_a = nb::none())
      .def(
          "pending_load",
          [](E& e, const std::string& model_name, const std::string& request_id) {
            return e.engine->PendingLoad(model_name, request_id);
          },
          "model_name"_a, "request_id"_a, Release(),
          "The engine's id of the request when prepare_retrieve / free_lookup_locks of it would "
          "wait now for its pending L2 load (starting a load its lookup did not start), else 0. "
          "Never blocks.")
      .def(
          "completion_fd",
          [](E& e) {
            if (!e.completions) {
              auto queue = std::make_shared<CompletionQueue>();
              if (queue->fd < 0) {
                throw StatusError(
                    Status::Internal(std::string("eventfd failed: ") + std::strerror(errno)));
              }
              e.completions = queue;
              e.engine->SetCompletionNotice(
                  [queue](const JobHandle& h, RequestId r) { queue->Push(h, r); });
            }
            return e.completions->fd;
          },
          "A non-blocking eventfd, owned by the engine, that becomes readable when lookup jobs "
          "complete or are cancelled, or L2 loads finish; take_completions() says which. Lets a "
          "server park waits instead of blocking threads on them.")
      .def(
          "take_completions",
          [](E& e) {
            std::vector<std::pair<JobHandle, RequestId>> taken;
            bool overflowed = false;
            if (e.completions) {
              nb::gil_scoped_release release;
              uint64_t drained = 0;
              (void)!::read(e.completions->fd, &drained, sizeof(drained));  // reset the eventfd
              std::lock_guard<std::mutex> lock(e.completions->mu);
              taken.swap(e.completions->queued);
              overflowed = e.completions->overflowed;
              e.completions->overflowed = false;
            }
            nb::list out;
            for (const auto& [h, r] : taken) {
              out.append(nb::make_tuple(
                  nb::bytes(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size()), r));
            }
            return nb::make_tuple(out, overflowed);
          },
          "(completions, overflowed): the (handle bytes, request id) of each job completed or "
          "cancelled since the last call (a zero handle and request 0: the engine stopped), and "
          "whether some were not queued (then anything may have changed).")
      .def("end_session", CallThrough(&E::engine, &CacheEngine::EndSession), "client"_a,
           "model_name"_a, "request_id"_a, Release())
      .def(
          "prepare_store",
          [](E& e, ClientId client, const PyEngineKey& key) {
            const EngineKey k = key.View();
            nb::gil_scoped_release release;
            return ValueOrThrow(e.engine->PrepareStore(client, k));
          },
          "client"_a, "key"_a)
      .def(
          "commit_store",
          [](E& e, ClientId client, const JobHandle& handle, bool success,
             std::optional<std::vector<uint32_t>> crc32c) {
            nb::gil_scoped_release release;
            return ValueOrThrow(e.engine->CommitStore(client, handle, success,
                                                      crc32c.has_value() ? &*crc32c : nullptr));
          },
          "client"_a, "handle"_a, "success"_a = true, "crc32c"_a = nb::none())
      .def(
          "prepare_retrieve",
          [](E& e, ClientId client, const PyEngineKey& key, std::optional<double> timeout_s) {
            const EngineKey k = key.View();
            const auto t = OptionalSeconds(timeout_s, "timeout_s");
            nb::gil_scoped_release release;
            return ValueOrThrow(e.engine->PrepareRetrieve(client, k, t));
          },
          "client"_a, "key"_a, "timeout_s"_a = nb::none())
      .def("commit_retrieve", CallThrough(&E::engine, &CacheEngine::CommitRetrieve), "client"_a,
           "handle"_a, Release())
      .def("set_client_process", CallThrough(&E::engine, &CacheEngine::SetClientProcess),
           "client"_a, "pid"_a, Release())
      .def(
          "end_client", [](E& e, ClientId client) { return e.engine->EndClient(client); },
          "client"_a, Release())
      .def(
          "clear", [](E& e, bool force) { return e.engine->Clear(force); }, "force"_a = false,
          Release())
      .def(
          "reap_expired", [](E& e) { return e.engine->ReapExpired(); }, Release())
      .def("stats", [](const E& e) {
        EngineStats es;
        StorageStats ss;
        // A Redis tier adds its own counters to its entry (stat_fields.h).
        std::vector<std::optional<RedisAdapterStats>> redis;
        {
          nb::gil_scoped_release release;
          es = e.engine->stats();
          ss = e.storage->stats();
          for (const std::shared_ptr<L2Adapter>& a : e.storage->adapters()) {
            const auto* r = dynamic_cast<const RedisL2Adapter*>(a.get());
            redis.push_back(r != nullptr ? std::optional(r->redis_stats()) : std::nullopt);
          }
        }
        nb::dict d;
        d["engine"] = StatsDict(es);
        d["l1"] = StatsDict(ss.l1);
        d["prefetch"] = StatsDict(ss.prefetch);
        d["store"] = StatsDict(ss.store);
        nb::list l2;
        for (size_t i = 0; i < ss.l2.size(); ++i) {
          nb::dict a = StatsDict(ss.l2[i]);
          if (i < redis.size() && redis[i].has_value()) {
            ForEachStat(*redis[i],
                        [&a](const StatField<RedisAdapterStats>& f, uint64_t v) { a[f.name] = v; });
          }
          l2.append(a);
        }
        d["l2"] = l2;
        return d;
      });
}

// The server's socket-thread codec for the per-prompt requests (cpp/src/wire/fast_path.h).
struct PyWireFastPath {
  wire::FastPath path;
};

nb::bytes Bytes(std::string_view s) { return nb::bytes(s.data(), s.size()); }

void BindWireFastPath(nb::module_& m) {
  nb::class_<PyWireFastPath>(
      m, "WireFastPath",
      "Decodes, runs and encodes the per-prompt requests (PING, LOOKUP, QUERY_PREFETCH_STATUS, "
      "SYNC_LOOKUP, END_SESSION) of the cache server's wire protocol in C++. handle() returns "
      "(reply header, reply payload, request type, status), or None for anything it leaves to "
      "the Python dispatcher. Keeps the engine alive.")
      .def(
          "__init__",
          [](PyWireFastPath* self, PyCacheEngine& engine, uint64_t max_frame_bytes,
             uint64_t max_header_bytes, uint64_t max_tokens, uint64_t max_string_bytes,
             double max_wait_s, bool has_l2) {
            wire::Limits limits{max_frame_bytes, max_header_bytes, max_tokens, max_string_bytes,
                                max_wait_s};
            new (self) PyWireFastPath{wire::FastPath(engine.engine.get(), limits, has_l2)};
          },
          "engine"_a, nb::kw_only(), "max_frame_bytes"_a, "max_header_bytes"_a, "max_tokens"_a,
          "max_string_bytes"_a, "max_wait_s"_a, "has_l2"_a, nb::keep_alive<1, 2>())
      .def_prop_ro_static(
          "CONSTANTS",
          [](nb::handle) {
            nb::dict types;
            for (const auto& t : wire::kRequestTypes) types[t.name] = t.id;
            nb::dict d;
            d["request_types"] = types;
            d["protocol_version"] = wire::kProtocolVersion;
            d["handle_size"] = wire::kHandleSize;
            d["max_error_message_chars"] = wire::kMaxErrorMessageChars;
            return d;
          },
          "The protocol constants the C++ codec was compiled with: request_types (name -> id, "
          "the requests it serves), protocol_version, handle_size, max_error_message_chars. "
          "Checked against lmcache_cpp.protocol by the tests.")
      .def(
          "handle",
          [](const PyWireFastPath& f, ClientId client, const nb::bytes& header,
             const nb::bytes& payload) -> std::optional<nb::tuple> {
            const std::string_view h(header.c_str(), header.size());
            const std::string_view p(payload.c_str(), payload.size());
            std::optional<wire::Reply> reply;
            {
              nb::gil_scoped_release release;  // the bytes objects are kept alive by the caller
              reply = f.path.Handle(client, h, p);
            }
            if (!reply.has_value()) return std::nullopt;
            return nb::make_tuple(Bytes(reply->header), Bytes(reply->payload), reply->request_type,
                                  reply->status);
          },
          "client"_a, "header"_a, "payload"_a);
}

struct PyRouterLoop {
  std::unique_ptr<net::RouterLoop> loop;
};

void BindRouterLoop(nb::module_& m) {
  nb::class_<PyRouterLoop>(
      m, "RouterLoop",
      "The cache server's receive loop for the requests WireFastPath serves, run in C++ on the "
      "server's ROUTER socket (a pyzmq socket's `underlying` address) without the GIL. "
      "drain() answers queued messages of admitted clients and returns the first one it "
      "leaves to Python. Socket-thread only, except stats(). Keeps the fast path alive; the "
      "socket must stay open while drain() may be called.")
      .def(
          "__init__",
          [](PyRouterLoop* self, PyWireFastPath& fast, uintptr_t socket,
             const std::string& libzmq_from, std::vector<double> buckets) {
            if (socket == 0) throw nb::value_error("socket is a null address");
            for (size_t i = 0; i < buckets.size(); ++i) {
              if (!std::isfinite(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1])) {
                throw nb::value_error("buckets must be finite and strictly increasing");
              }
            }
            std::string why;
            std::optional<net::Libzmq> zmq = net::Libzmq::Resolve(libzmq_from, &why);
            if (!zmq.has_value()) throw std::runtime_error(why);
            new (self) PyRouterLoop{std::make_unique<net::RouterLoop>(
                &fast.path, *zmq, reinterpret_cast<void*>(socket), std::move(buckets))};
          },
          "fast"_a, "socket"_a, nb::kw_only(), "libzmq_from"_a, "buckets"_a, nb::keep_alive<1, 2>(),
          "libzmq_from: the file of the loaded extension module whose libzmq owns the socket "
          "(pyzmq's backend). Raises RuntimeError when its libzmq functions cannot be found.")
      .def(
          "add_client",
          [](PyRouterLoop& l, const nb::bytes& identity, ClientId id) {
            l.loop->AddClient(std::string(identity.c_str(), identity.size()), id);
          },
          "identity"_a, "client"_a)
      .def(
          "remove_client",
          [](PyRouterLoop& l, const nb::bytes& identity) {
            l.loop->RemoveClient(std::string(identity.c_str(), identity.size()));
          },
          "identity"_a)
      .def(
          "last_seen",
          [](const PyRouterLoop& l, const nb::bytes& identity) {
            return l.loop->LastSeen(std::string(identity.c_str(), identity.size()));
          },
          "identity"_a, "time.monotonic() when the loop last received from the client, or None.")
      .def(
          "drain",
          [](PyRouterLoop& l, size_t max_messages, bool trace) {
            std::optional<net::RouterLoop::Drained> d;
            {
              nb::gil_scoped_release release;
              d.emplace(l.loop->Drain(max_messages, trace));
            }
            nb::object message = nb::none();
            if (d->unhandled.size() > 0) {
              nb::list frames;
              for (size_t i = 0; i < d->unhandled.size(); ++i) {
                frames.append(Bytes(d->unhandled.frame(i)));
              }
              message = std::move(frames);
            }
            nb::list failures;
            for (const auto& f : d->failures) {
              failures.append(nb::make_tuple(f.client, f.request_type, f.message));
            }
            nb::list traces;
            for (const auto& t : d->traces) {
              traces.append(nb::make_tuple(t.client, t.request_type, t.seq, t.status, t.seconds));
            }
            return nb::make_tuple(d->answered, message, d->tried, failures, d->error, traces);
          },
          "max_messages"_a, "trace"_a = false,
          "(answered, message or None, tried, failures, errno, traces): `message` is the first "
          "message left to Python (identity frame first), `tried` whether WireFastPath declined "
          "it, `failures` (client, request type, message) of requests answered with Internal, "
          "`errno` a libzmq error that stopped the loop (0: none), `traces` (client, request "
          "type, seq, status, seconds) of each request answered, when `trace` (else empty).")
      .def(
          "stats",
          [](const PyRouterLoop& l) {
            net::RouterLoop::Stats s;
            {
              nb::gil_scoped_release release;
              s = l.loop->Snapshot();
            }
            nb::dict counts, histograms;
            for (const auto& [key, n] : s.counts) counts[nb::make_tuple(key.first, key.second)] = n;
            for (const auto& [type, hist] : s.histograms) {
              histograms[nb::int_(type)] = nb::make_tuple(nb::cast(hist.first), hist.second);
            }
            return nb::make_tuple(counts, histograms, s.dropped_replies);
          },
          "({(request type, status): count}, {request type: (per-bucket counts, sum of "
          "seconds)}, dropped replies) of the requests the loop answered.");
}

}  // namespace

void BindCacheEngine(nb::module_& m) {
  BindTypes(m);
  BindEngine(m);
  BindWireFastPath(m);
  BindRouterLoop(m);
}

}  // namespace lmcache_cpp::bindings
