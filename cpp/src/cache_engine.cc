// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/cache_engine.h"

#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <utility>

#include "crc32c.h"
#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/hash_session.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/prefetch_controller.h"

namespace lmcache_cpp {

namespace {

constexpr size_t kMaxModelNameBytes = 1024;
constexpr size_t kMaxRequestIdBytes = 1024;
constexpr size_t kMaxSaltBytes = 1024;
constexpr uint32_t kMaxReaders = 1024;
constexpr uint32_t kMaxWorldSize = 1 << 16;

std::string NamespaceKey(std::string_view model_name, uint32_t world_size) {
  std::string k;
  k.reserve(model_name.size() + 12);
  k.append(model_name);
  k.push_back('\x1f');
  k.append(std::to_string(world_size));
  return k;
}

std::string RequestKey(std::string_view model_name, std::string_view request_id) {
  std::string k;
  k.reserve(model_name.size() + request_id.size() + 1);
  k.append(model_name);
  k.push_back('\x1f');
  k.append(request_id);
  return k;
}

// LeaseNotHeld saying `what` was lost, followed by the table's reason: "<what> (<cause>)".
Status LeaseLost(std::string_view what, const Status& cause) {
  return Status::LeaseNotHeld(std::string(what) + " (" + cause.message() + ")");
}

uint64_t RandomId() {
  JobHandle h = JobHandle::Random();
  uint64_t v = 0;
  std::memcpy(&v, h.bytes.data(), sizeof(v));
  return v == 0 ? 1 : v;
}

}  // namespace

struct CacheEngine::Namespace {
  Namespace(std::string model, uint32_t ws, KvCacheLayout l, uint64_t bytes, ChunkHasher h,
            HashSessionOptions session_options, std::shared_ptr<Clock> clock)
      : model_name(std::move(model)),
        world_size(ws),
        layout(l),
        fingerprint(l.Fingerprint()),
        hash_fingerprint(fingerprint + "|ws=" + std::to_string(ws)),
        object_bytes(bytes),
        hasher(std::move(h)),
        sessions(&hasher, session_options, std::move(clock)) {}
  const std::string model_name;
  const uint32_t world_size;
  const KvCacheLayout layout;
  const std::string fingerprint;
  const std::string hash_fingerprint;  // what the chunk hashes are seeded with
  const uint64_t object_bytes;
  const ChunkHasher hasher;  // unsalted
  HashSessionCache sessions;
  size_t live_registrations = 0;  // GUARDED_BY(CacheEngine::mu_)
};

struct CacheEngine::Request {
  RequestId id = 0;
  ClientId owner = 0;  // the client that looked the request up first
  TimePoint last_used{};
  bool load_failure_logged = false;  // a failed retrieve is logged once per request
};

struct CacheEngine::Ticket {
  ClientId client = 0;
  bool store = false;
  RequestId request = 0;  // store: the ticket's internal request; retrieve: the engine request
  std::vector<ObjectKey> keys;  // store: the reserved keys; retrieve: every key of the range
  // Store: per reserved key, its index among the ticket's offsets, and its arena offset.
  std::vector<uint32_t> positions;
  std::vector<uint64_t> offsets;
  size_t num_offsets = 0;
  uint64_t object_bytes = 0;
  uint64_t reserved_bytes = 0;  // store: charged to the client's quota while the ticket lives
  // Retrieve: per key, the generation of the object whose offset was handed out.
  std::vector<uint64_t> generations;
  TimePoint created{};
};

struct CacheEngine::PendingLookup {
  ClientId client = 0;
  uint32_t ranks = 1;  // keys per chunk
  TimePoint created{};
};

struct CacheEngine::ResolvedKey {
  std::shared_ptr<Namespace> ns;
  RequestId request = 0;  // 0 when the key names no (known) request
  uint32_t readers = 1;   // leases per object for the tp_size given to Resolve
  uint32_t ranks = 1;     // keys per chunk
  uint64_t first_chunk = 0;
  std::vector<ObjectKey> keys;  // chunk-major
};

// ---------------------------------------------------------------------------------------------

Result<std::unique_ptr<CacheEngine>> CacheEngine::Create(StorageManager* storage,
                                                         EngineConfig config) {
  if (storage == nullptr) return Status::InvalidArgument("CacheEngine: storage is null");
  if (config.chunk_size == 0) return Status::InvalidArgument("CacheEngine: chunk_size is 0");
  if (config.max_chunks_per_key == 0 || config.max_keys_per_request == 0) {
    return Status::InvalidArgument(
        "CacheEngine: max_chunks_per_key and max_keys_per_request must be >= 1");
  }
  // Fails early for a hash algorithm this build lacks.
  LMCACHE_ASSIGN_OR_RETURN(
      auto probe, ChunkHasher::Create(NamespaceConfig{}, config.chunk_size, config.hash_algorithm));
  (void)probe;
  return std::unique_ptr<CacheEngine>(new CacheEngine(storage, std::move(config)));
}

CacheEngine::CacheEngine(StorageManager* storage, EngineConfig config)
    : storage_(storage),
      table_(storage->table()),
      prefetch_(storage->prefetch()),
      config_(std::move(config)),
      clock_(config_.clock ? config_.clock : SteadyClock::Default()) {}

CacheEngine::~CacheEngine() {
  Stop();
  for (auto& [client, p] : processes_) {
    if (p.pidfd >= 0) close(p.pidfd);
  }
}

void CacheEngine::Start() {
  std::lock_guard<std::mutex> ss(start_stop_mu_);
  if (reaper_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(reaper_mu_);
    reaper_stop_ = false;
  }
  reaper_ = std::thread([this] { ReapLoop(); });
}

void CacheEngine::Stop() {
  std::lock_guard<std::mutex> ss(start_stop_mu_);
  if (!reaper_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(reaper_mu_);
    reaper_stop_ = true;
  }
  reaper_cv_.notify_all();
  reaper_.join();
}

void CacheEngine::ReapLoop() {
  std::unique_lock<std::mutex> l(reaper_mu_);
  while (!reaper_stop_) {
    reaper_cv_.wait_for(l, config_.reap_interval, [this] { return reaper_stop_; });
    if (reaper_stop_) break;
    l.unlock();
    ReapExpired();
    l.lock();
  }
}

// ---- registration ----------------------------------------------------------------------------

Result<Registration> CacheEngine::RegisterKvCache(ClientId client, std::string_view model_name,
                                                  uint32_t world_size, int32_t worker_id,
                                                  const KvCacheLayout& layout) {
  if (client == 0) return Status::InvalidArgument("client id 0 is invalid");
  if (model_name.empty() || model_name.size() > kMaxModelNameBytes) {
    return Status::InvalidArgument("model_name must have 1 to 1024 bytes");
  }
  if (world_size == 0 || world_size > kMaxWorldSize) {
    return Status::InvalidArgument("world_size must be in [1, 65536], got " +
                                   std::to_string(world_size));
  }
  if (worker_id < 0 || static_cast<uint32_t>(worker_id) >= world_size) {
    return Status::InvalidArgument("worker_id " + std::to_string(worker_id) +
                                   " is outside [0, world_size = " + std::to_string(world_size) +
                                   ")");
  }
  LMCACHE_ASSIGN_OR_RETURN(uint64_t object_bytes, layout.ObjectBytes(config_.chunk_size));
  // One chunk for every rank must fit in L1, or every lookup of the namespace's keys for all
  // ranks would name more objects than L1 can ever hold.
  const uint64_t arena_objects = table_->arena()->size() / std::max<uint64_t>(object_bytes, 1);
  if (world_size > arena_objects) {
    return Status::InvalidArgument("world_size " + std::to_string(world_size) + " needs " +
                                   std::to_string(world_size) + " objects of " +
                                   std::to_string(object_bytes) + " bytes per chunk; L1 holds " +
                                   std::to_string(arena_objects));
  }
  const std::string fingerprint = layout.Fingerprint();
  NamespaceConfig nsc{std::string(model_name), fingerprint + "|ws=" + std::to_string(world_size),
                      ""};
  LMCACHE_ASSIGN_OR_RETURN(ChunkHasher hasher,
                           ChunkHasher::Create(nsc, config_.chunk_size, config_.hash_algorithm));
  const std::string nskey = NamespaceKey(model_name, world_size);

  Registration reg;
  reg.chunk_size = config_.chunk_size;
  reg.object_bytes = object_bytes;
  reg.fingerprint = fingerprint;
  reg.arena = table_->arena()->descriptor();

  std::lock_guard<std::mutex> l(mu_);
  auto held = registrations_per_client_.find(client);
  const size_t per_client = held == registrations_per_client_.end() ? 0 : held->second;
  if (per_client >= config_.max_registrations_per_client) {
    return Status::ResourceExhausted("client holds " + std::to_string(per_client) +
                                     " registrations (the limit)");
  }
  auto it = namespaces_.find(nskey);
  if (it != namespaces_.end() && it->second->fingerprint != fingerprint) {
    if (it->second->live_registrations > 0) {
      return Status::AlreadyExists("model '" + std::string(model_name) + "' (world size " +
                                   std::to_string(world_size) + ") is registered with layout " +
                                   it->second->fingerprint + ", not " + fingerprint);
    }
    namespaces_.erase(it);
    it = namespaces_.end();
  }
  if (it == namespaces_.end()) {
    auto ns = std::make_shared<Namespace>(std::string(model_name), world_size, layout, object_bytes,
                                          std::move(hasher), config_.sessions, config_.clock);
    it = namespaces_.emplace(nskey, std::move(ns)).first;
  }
  uint64_t id = RandomId();
  while (registrations_.count(id) != 0) id = RandomId();
  registrations_.emplace(id, RegistrationEntry{client, it->second});
  ++it->second->live_registrations;
  ++registrations_per_client_[client];
  reg.id = id;
  return reg;
}

Status CacheEngine::UnregisterKvCache(ClientId client, uint64_t registration_id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = registrations_.find(registration_id);
  if (it == registrations_.end()) {
    return Status::NotFound("registration " + std::to_string(registration_id) +
                            " is unknown or already unregistered");
  }
  if (it->second.client != client) {
    return Status::PermissionDenied("registration belongs to another client");
  }
  std::shared_ptr<Namespace> ns = it->second.ns;
  --ns->live_registrations;
  auto pc = registrations_per_client_.find(client);
  if (pc != registrations_per_client_.end() && --pc->second == 0) {
    registrations_per_client_.erase(pc);
  }
  registrations_.erase(it);
  PruneNamespaceLocked(ns);
  return Status::Ok();
}

// ---- keys ------------------------------------------------------------------------------------

std::shared_ptr<CacheEngine::Namespace> CacheEngine::FindNamespace(std::string_view model_name,
                                                                   uint32_t world_size) const {
  const std::string k = NamespaceKey(model_name, world_size);
  std::lock_guard<std::mutex> l(mu_);
  auto it = namespaces_.find(k);
  return it == namespaces_.end() ? nullptr : it->second;
}

Status CacheEngine::CheckActsForLocked(ClientId client, std::string_view model_name,
                                       ClientId owner) const {
  if (client == owner) return Status::Ok();
  for (const auto& [id, reg] : registrations_) {
    if (reg.client == client && reg.ns->model_name == model_name) return Status::Ok();
  }
  return Status::PermissionDenied(
      "the request's leases belong to another client, and this client holds no registration of "
      "model '" +
      std::string(model_name) + "'");
}

Result<RequestId> CacheEngine::InternRequest(std::string_view model_name,
                                             std::string_view request_id, bool create,
                                             ClientId client) {
  std::string k = RequestKey(model_name, request_id);
  const TimePoint now = clock_->Now();
  std::lock_guard<std::mutex> l(mu_);
  auto it = requests_.find(k);
  if (it != requests_.end()) {
    it->second->last_used = now;
    return it->second->id;
  }
  if (!create) return RequestId{0};
  auto ended = ended_.find(k);
  if (ended != ended_.end() && now - ended->second < config_.ended_request_ttl) {
    return Status::Cancelled("request '" + std::string(request_id) +
                             "' was ended by END_SESSION; a lookup that arrives after it is void");
  }
  if (requests_.size() >= config_.max_requests) {
    return Status::ResourceExhausted("too many open requests (" + std::to_string(requests_.size()) +
                                     "); end sessions with END_SESSION");
  }
  size_t& mine = requests_per_client_[client];
  if (mine >= config_.max_requests_per_client) {
    return Status::ResourceExhausted("this client has " + std::to_string(mine) +
                                     " open requests (the limit, "
                                     "--max-requests-per-client); end them with END_SESSION");
  }
  ++mine;
  auto r = std::make_unique<Request>();
  r->id = next_request_++;
  r->owner = client;
  r->last_used = now;
  RequestId id = r->id;
  requests_.emplace(std::move(k), std::move(r));
  return id;
}

Status CacheEngine::Resolve(const EngineKey& key, RangeKind range, RequestIdUse request_id,
                            ResolvedKey* out, std::optional<uint32_t> tp_size, ClientId client) {
  if (key.model_name.empty() || key.model_name.size() > kMaxModelNameBytes) {
    return Status::InvalidArgument("key.model_name must have 1 to 1024 bytes");
  }
  if (key.request_id.size() > kMaxRequestIdBytes || key.cache_salt.size() > kMaxSaltBytes) {
    return Status::InvalidArgument("key.request_id and key.cache_salt are limited to 1024 bytes");
  }
  if (request_id != RequestIdUse::kOptional && key.request_id.empty()) {
    return Status::InvalidArgument("key.request_id is required");
  }
  if (key.world_size == 0) return Status::InvalidArgument("key.world_size must be >= 1");
  if (key.worker_id < -1 ||
      (key.worker_id >= 0 && static_cast<uint32_t>(key.worker_id) >= key.world_size)) {
    return Status::InvalidArgument("key.worker_id " + std::to_string(key.worker_id) +
                                   " is outside [-1, world_size)");
  }
  if (key.size > 0 && key.data == nullptr) return Status::InvalidArgument("key data is null");
  out->ns = FindNamespace(key.model_name, key.world_size);
  if (out->ns == nullptr) {
    return Status::NotFound("model '" + std::string(key.model_name) + "' with world size " +
                            std::to_string(key.world_size) +
                            " is not registered (REGISTER_KV_CACHE first)");
  }
  const Namespace& ns = *out->ns;
  const uint64_t cs = config_.chunk_size;

  // The key's shape is validated before its request is interned: a malformed key creates nothing.
  uint64_t n = 0;       // kTokens: tokens hashed
  uint64_t blocks = 0;  // kBlockHashes: block hashes used
  const uint64_t bs = ns.layout.block_size;
  if (key.mode == KeyMode::kTokens) {
    if (key.size % 4 != 0) {
      return Status::InvalidArgument("key.tokens must be packed uint32 (byte length " +
                                     std::to_string(key.size) + " is not a multiple of 4)");
    }
    n = std::min<uint64_t>(key.size / 4, key.end);
    if (n / cs > config_.max_chunks_per_key) {
      return Status::InvalidArgument("key covers " + std::to_string(n / cs) +
                                     " chunks; the limit is " +
                                     std::to_string(config_.max_chunks_per_key));
    }
  } else {
    if (key.block_hash_size == 0 || key.block_hash_size > kMaxBlockHashSize) {
      return Status::InvalidArgument("key.block_hash_size must be in [1, " +
                                     std::to_string(kMaxBlockHashSize) + "]");
    }
    if (key.size % key.block_hash_size != 0) {
      return Status::InvalidArgument("key.block_hashes length " + std::to_string(key.size) +
                                     " is not a multiple of block_hash_size " +
                                     std::to_string(key.block_hash_size));
    }
    blocks = std::min<uint64_t>(key.size / key.block_hash_size, key.end / bs);
    if (blocks * bs / cs > config_.max_chunks_per_key) {
      return Status::InvalidArgument("key covers " + std::to_string(blocks * bs / cs) +
                                     " chunks; the limit is " +
                                     std::to_string(config_.max_chunks_per_key));
    }
  }

  {
    // The work of a request is its chunks times its ranks: bounded before anything is hashed,
    // expanded or leased.
    const uint64_t chunks = key.mode == KeyMode::kTokens ? n / cs : blocks * bs / cs;
    const uint64_t ranks = key.worker_id < 0 ? ns.world_size : 1;
    if (chunks * ranks > config_.max_keys_per_request) {
      return Status::ResourceExhausted(
          "key names " + std::to_string(chunks) + " chunks x " + std::to_string(ranks) +
          " ranks = " + std::to_string(chunks * ranks) + " objects; one request may name at most " +
          std::to_string(config_.max_keys_per_request) + " (max_keys_per_request)");
    }
  }
  if (range == RangeKind::kAligned && key.start % cs != 0) {
    return Status::InvalidArgument("key.start " + std::to_string(key.start) +
                                   " is not a multiple of the chunk size " + std::to_string(cs));
  }
  if (tp_size.has_value()) {
    LMCACHE_ASSIGN_OR_RETURN(out->readers, Readers(ns, *tp_size));
  }

  if (!key.request_id.empty()) {
    LMCACHE_ASSIGN_OR_RETURN(
        out->request,
        InternRequest(key.model_name, key.request_id, request_id == RequestIdUse::kCreate, client));
  }

  std::vector<ChunkHash> hashes;
  if (key.mode == KeyMode::kTokens) {
    const uint32_t* tokens = reinterpret_cast<const uint32_t*>(key.data);
    std::vector<uint32_t> aligned;
    if (reinterpret_cast<uintptr_t>(key.data) % alignof(uint32_t) != 0) {
      aligned.resize(n);
      if (n > 0) std::memcpy(aligned.data(), key.data, n * 4);
      tokens = aligned.data();
    }
    if (!key.cache_salt.empty()) {
      LMCACHE_ASSIGN_OR_RETURN(
          ChunkHasher salted,
          ChunkHasher::Create(
              NamespaceConfig{ns.model_name, ns.hash_fingerprint, std::string(key.cache_salt)}, cs,
              config_.hash_algorithm));
      hashes = salted.HashTokens(tokens, n);
    } else if (out->request != 0) {
      hashes = out->ns->sessions.HashTokens(client, out->request, tokens, n);
    } else {
      hashes = ns.hasher.HashTokens(tokens, n);
    }
  } else {
    const ChunkHasher* hasher = &ns.hasher;
    std::optional<ChunkHasher> salted;
    if (!key.cache_salt.empty()) {
      LMCACHE_ASSIGN_OR_RETURN(
          salted, ChunkHasher::Create(NamespaceConfig{ns.model_name, ns.hash_fingerprint,
                                                      std::string(key.cache_salt)},
                                      cs, config_.hash_algorithm));
      hasher = &*salted;
    }
    LMCACHE_ASSIGN_OR_RETURN(
        hashes, hasher->HashFromBlockHashes(key.data, blocks, key.block_hash_size, bs));
  }

  if (range == RangeKind::kAligned && key.end != UINT64_MAX) {
    // A transfer names exactly the tokens it moves: a range past the key's data is an error,
    // never a shorter transfer that the caller would take for the whole.
    const uint64_t have = key.mode == KeyMode::kTokens ? n : blocks * bs;
    if (key.end > have) {
      return Status::InvalidArgument("key.end " + std::to_string(key.end) + " is past the key's " +
                                     std::to_string(have) + " tokens of data");
    }
  }
  const uint64_t total = std::min<uint64_t>(hashes.size(), key.end / cs);
  uint64_t first = 0;
  switch (range) {
    case RangeKind::kLookup: first = 0; break;
    case RangeKind::kInner: first = key.start / cs + (key.start % cs != 0 ? 1 : 0); break;
    case RangeKind::kAligned:  // start validated above
      first = key.start / cs;
      break;
  }
  first = std::min(first, total);
  hashes.erase(hashes.begin() + static_cast<ptrdiff_t>(total), hashes.end());
  hashes.erase(hashes.begin(), hashes.begin() + static_cast<ptrdiff_t>(first));
  out->first_chunk = first;
  if (key.worker_id < 0) {
    out->ranks = ns.world_size;
    LMCACHE_ASSIGN_OR_RETURN(out->keys,
                             ExpandToAllRanks(hashes, static_cast<int32_t>(ns.world_size)));
  } else {
    out->ranks = 1;
    out->keys = KeysForRank(hashes, key.worker_id);
  }
  return Status::Ok();
}

Result<uint32_t> CacheEngine::Readers(const Namespace& ns, uint32_t tp_size) const {
  if (tp_size == 0) return Status::InvalidArgument("tp_size must be >= 1");
  if (tp_size <= ns.world_size) return uint32_t{1};
  if (tp_size % ns.world_size != 0) {
    return Status::InvalidArgument("tp_size " + std::to_string(tp_size) +
                                   " is not a multiple of the KV world size " +
                                   std::to_string(ns.world_size));
  }
  const uint32_t readers = tp_size / ns.world_size;
  if (readers > kMaxReaders) return Status::InvalidArgument("tp_size is too large");
  return readers;
}

// ---- lookup ----------------------------------------------------------------------------------

Result<JobHandle> CacheEngine::Lookup(ClientId client, const EngineKey& key, uint32_t tp_size) {
  ResolvedKey rk;
  LMCACHE_ASSIGN_OR_RETURN(PrefetchRequest req, ResolveLookup(client, key, tp_size, &rk));
  const size_t chunks = req.keys.size() / rk.ranks;
  LMCACHE_ASSIGN_OR_RETURN(JobHandle handle, prefetch_->Submit(std::move(req)));
  LMCACHE_RETURN_IF_ERROR(CancelIfEnded(key, rk));
  auto pending = std::make_unique<PendingLookup>();
  pending->client = client;
  pending->ranks = rk.ranks;
  pending->created = clock_->Now();
  std::lock_guard<std::mutex> l(mu_);
  lookups_[handle] = std::move(pending);
  ++counters_.lookups;
  counters_.lookup_chunks += chunks;
  return handle;
}

Result<PrefetchRequest> CacheEngine::ResolveLookup(ClientId client, const EngineKey& key,
                                                   uint32_t tp_size, ResolvedKey* rk) {
  LMCACHE_RETURN_IF_ERROR(
      Resolve(key, RangeKind::kLookup, RequestIdUse::kCreate, rk, tp_size, client));
  return PrefetchRequest::Of(LeaseOwner{client, rk->request}, std::move(rk->keys),
                             rk->ns->object_bytes, rk->readers - 1);
}

Status CacheEngine::CancelIfEnded(const EngineKey& key, const ResolvedKey& rk) {
  if (!DropIfEnded(key, rk)) return Status::Ok();
  return Status::Cancelled("request '" + std::string(key.request_id) +
                           "' ended (END_SESSION) during its lookup");
}

bool CacheEngine::DropIfEnded(const EngineKey& key, const ResolvedKey& rk) {
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = requests_.find(RequestKey(key.model_name, key.request_id));
    if (it != requests_.end() && it->second->id == rk.request) return false;
  }
  // EndSession ran between interning the request and its lookup's leases: what the lookup (and
  // its hashing) created belongs to an id nobody will end again. Ids are never reused.
  rk.ns->sessions.EndSession(rk.request);
  (void)storage_->EndRequest(rk.request);
  return true;
}

Result<std::optional<LookupResult>> CacheEngine::Collect(
    ClientId client, const JobHandle& handle, const Result<std::optional<PrefetchResult>>& result) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = lookups_.find(handle);
  const bool mine = it != lookups_.end() && it->second->client == client;
  if (!result.ok()) {
    if (mine && result.status().code() == StatusCode::kNotFound) lookups_.erase(it);
    return result.status();
  }
  if (!result->has_value()) return std::optional<LookupResult>();
  if (!mine) {
    // The engine reaped the lookup (lookup_ttl) and with it the rank count its hits need; its
    // leases stay with the request until END_SESSION or request_ttl.
    return Status::NotFound("lookup " + handle.ToHex() + " expired before it was collected");
  }
  const uint32_t ranks = it->second->ranks;
  lookups_.erase(it);
  const PrefetchResult& p = **result;
  LookupResult r;
  r.hit_chunks = p.hits / ranks;
  r.l1_chunks = std::min<uint64_t>(p.l1_hits / ranks, r.hit_chunks);
  r.l2_chunks = r.hit_chunks - r.l1_chunks;
  r.hit_tokens = r.hit_chunks * config_.chunk_size;
  counters_.hit_chunks += r.hit_chunks;
  counters_.l1_hit_chunks += r.l1_chunks;
  counters_.l2_hit_chunks += r.l2_chunks;
  return std::optional<LookupResult>(r);
}

Result<std::optional<LookupResult>> CacheEngine::QueryPrefetch(ClientId client,
                                                               const JobHandle& handle) {
  auto r = prefetch_->Query(client, handle);
  return Collect(client, handle, r);
}

Result<std::optional<LookupResult>> CacheEngine::WaitPrefetch(ClientId client,
                                                              const JobHandle& handle,
                                                              Duration timeout) {
  auto r = prefetch_->Wait(client, handle, timeout);
  return Collect(client, handle, r);
}

Result<LookupResult> CacheEngine::SyncLookup(ClientId client, const EngineKey& key,
                                             uint32_t tp_size, std::optional<Duration> timeout) {
  LMCACHE_ASSIGN_OR_RETURN(
      std::optional<LookupResult> r,
      SyncLookupImpl(client, key, tp_size, timeout.value_or(config_.sync_lookup_timeout),
                     SyncLookupScope::kL1AndL2));
  return *r;
}

Result<std::optional<LookupResult>> CacheEngine::SyncLookupInL1(ClientId client,
                                                                const EngineKey& key,
                                                                uint32_t tp_size) {
  return SyncLookupImpl(client, key, tp_size, Duration::zero(), SyncLookupScope::kL1Only);
}

Result<std::optional<LookupResult>> CacheEngine::SyncLookupImpl(ClientId client,
                                                                const EngineKey& key,
                                                                uint32_t tp_size, Duration timeout,
                                                                SyncLookupScope scope) {
  ResolvedKey rk;
  LMCACHE_ASSIGN_OR_RETURN(PrefetchRequest req, ResolveLookup(client, key, tp_size, &rk));
  const size_t chunks = req.keys.size() / rk.ranks;
  SyncLookupResult s;
  if (scope == SyncLookupScope::kL1Only) {
    LMCACHE_ASSIGN_OR_RETURN(std::optional<SyncLookupResult> found,
                             prefetch_->LookupAndPinInL1(std::move(req)));
    if (!found.has_value()) {
      (void)DropIfEnded(key, rk);  // nothing leased, but its hashing may have made a session
      return std::optional<LookupResult>();
    }
    s = *found;
  } else {
    LMCACHE_ASSIGN_OR_RETURN(s, prefetch_->LookupAndPin(std::move(req), timeout));
  }
  LMCACHE_RETURN_IF_ERROR(CancelIfEnded(key, rk));
  LookupResult r;
  r.hit_chunks = s.hits / rk.ranks;
  r.l1_chunks = std::min<uint64_t>(s.l1_hits / rk.ranks, r.hit_chunks);
  r.l2_chunks = r.hit_chunks - r.l1_chunks;
  r.hit_tokens = r.hit_chunks * config_.chunk_size;
  std::lock_guard<std::mutex> l(mu_);
  ++counters_.sync_lookups;
  counters_.lookup_chunks += chunks;
  counters_.hit_chunks += r.hit_chunks;
  counters_.l1_hit_chunks += r.l1_chunks;
  counters_.l2_hit_chunks += r.l2_chunks;
  return std::optional<LookupResult>(r);
}

Result<uint64_t> CacheEngine::FreeLookupLocks(ClientId client, const EngineKey& key,
                                              uint32_t tp_size, std::optional<Duration> timeout) {
  ResolvedKey rk;
  LMCACHE_RETURN_IF_ERROR(Resolve(key, RangeKind::kInner, RequestIdUse::kRequired, &rk, tp_size));
  if (rk.request == 0 || rk.keys.empty()) return uint64_t{0};
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = requests_.find(RequestKey(key.model_name, key.request_id));
    if (it != requests_.end()) {
      LMCACHE_RETURN_IF_ERROR(CheckActsForLocked(client, key.model_name, it->second->owner));
    }
  }
  // Leases of a pending sync load arrive when it finishes: join it first.
  (void)prefetch_->WaitLoad(rk.request, timeout.value_or(config_.retrieve_wait_timeout));
  uint64_t released = 0;
  // Tail first, so the prefix chain dies from its tail in the eviction order as well.
  for (auto it = rk.keys.rbegin(); it != rk.keys.rend(); ++it) {
    const uint32_t held = table_->LeasesHeld(rk.request, *it);
    if (held == 0) continue;
    if (table_->ReleaseRead(rk.request, {*it}, held).ok()) released += held;
  }
  std::lock_guard<std::mutex> l(mu_);
  counters_.freed_leases += released;
  return released;
}

RequestId CacheEngine::PendingLoad(std::string_view model_name, std::string_view request_id) {
  RequestId request = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = requests_.find(RequestKey(model_name, request_id));
    if (it == requests_.end()) return 0;
    request = it->second->id;
  }
  return prefetch_->LoadPending(request) ? request : 0;
}

void CacheEngine::SetCompletionNotice(PrefetchController::CompletionNotice notice) {
  prefetch_->SetCompletionNotice(std::move(notice));
}

Result<uint64_t> CacheEngine::EndSession(ClientId client, std::string_view model_name,
                                         std::string_view request_id) {
  std::unique_ptr<Request> req;
  std::vector<std::shared_ptr<Namespace>> spaces;
  {
    std::lock_guard<std::mutex> l(mu_);
    std::string key = RequestKey(model_name, request_id);
    if (config_.ended_request_ttl > Duration::zero()) {
      // Remembered even when the request is unknown: its lookup may still be queued.
      constexpr size_t kMaxEnded = size_t{1} << 16;
      const TimePoint now = clock_->Now();
      if (ended_.size() >= kMaxEnded) {
        auto& oldest = ended_order_.front();
        auto e = ended_.find(oldest.first);
        if (e != ended_.end() && e->second == oldest.second) ended_.erase(e);
        ended_order_.pop_front();
      }
      ended_[key] = now;
      ended_order_.emplace_back(key, now);
    }
    auto it = requests_.find(key);
    if (it == requests_.end()) return uint64_t{0};
    LMCACHE_RETURN_IF_ERROR(CheckActsForLocked(client, model_name, it->second->owner));
    req = std::move(it->second);
    requests_.erase(it);
    UnchargeRequestLocked(req->owner);
    ++counters_.ended_sessions;
    for (const auto& [k, ns] : namespaces_) {
      if (ns->model_name == model_name) spaces.push_back(ns);
    }
  }
  for (const auto& ns : spaces) ns->sessions.EndSession(req->id);
  return storage_->EndRequest(req->id);
}

// ---- transfers -------------------------------------------------------------------------------

JobHandle CacheEngine::InsertTicketLocked(ClientId client, Ticket ticket) {
  JobHandle h = JobHandle::Random();
  while (tickets_.count(h) != 0) h = JobHandle::Random();
  ticket.client = client;
  ticket.created = clock_->Now();
  tickets_.emplace(h, std::make_unique<Ticket>(std::move(ticket)));
  return h;
}

Result<CacheEngine::Ticket> CacheEngine::TakeTicket(ClientId client, const JobHandle& handle,
                                                    TicketKind kind) {
  const bool store = kind == TicketKind::kStore;
  std::lock_guard<std::mutex> l(mu_);
  auto it = tickets_.find(handle);
  if (it == tickets_.end()) {
    return Status::NotFound("transfer ticket " + handle.ToHex() +
                            " is unknown, already committed or expired");
  }
  if (it->second->client != client) {
    return Status::PermissionDenied("transfer ticket belongs to another client");
  }
  if (it->second->store != store) {
    return Status::InvalidArgument(std::string("transfer ticket is a ") +
                                   (it->second->store ? "store" : "retrieve") + " ticket");
  }
  Ticket t = std::move(*it->second);
  tickets_.erase(it);
  UnchargeTicketLocked(t);
  return t;
}

void CacheEngine::UnchargeTicketLocked(const Ticket& ticket) {
  auto pc = tickets_per_client_.find(ticket.client);
  if (pc != tickets_per_client_.end() && --pc->second == 0) tickets_per_client_.erase(pc);
  if (ticket.reserved_bytes == 0) return;
  auto rb = reserved_bytes_per_client_.find(ticket.client);
  if (rb == reserved_bytes_per_client_.end()) return;
  rb->second -= std::min(rb->second, ticket.reserved_bytes);
  if (rb->second == 0) reserved_bytes_per_client_.erase(rb);
}

void CacheEngine::UnchargeRequestLocked(ClientId owner) {
  auto it = requests_per_client_.find(owner);
  if (it != requests_per_client_.end() && --it->second == 0) requests_per_client_.erase(it);
}

void CacheEngine::PruneNamespaceLocked(const std::shared_ptr<Namespace>& ns) {
  if (ns->live_registrations > 0) return;
  auto it = namespaces_.find(NamespaceKey(ns->model_name, ns->world_size));
  if (it != namespaces_.end() && it->second == ns) namespaces_.erase(it);
}

uint64_t CacheEngine::reserved_bytes_quota() const {
  if (config_.max_reserved_bytes_per_client != 0) return config_.max_reserved_bytes_per_client;
  return std::max<uint64_t>(table_->arena()->size() / 2, 1);
}

std::vector<ClientUsage> CacheEngine::ClientUsages() const {
  std::map<ClientId, ClientUsage> by_client;
  auto at = [&](ClientId c) -> ClientUsage& {
    ClientUsage& u = by_client[c];
    u.client = c;
    return u;
  };
  std::vector<std::shared_ptr<Namespace>> spaces;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [c, n] : registrations_per_client_) at(c).registrations = n;
    for (const auto& [c, n] : requests_per_client_) at(c).requests = n;
    for (const auto& [c, n] : tickets_per_client_) at(c).tickets = n;
    for (const auto& [c, n] : reserved_bytes_per_client_) at(c).reserved_bytes = n;
    spaces.reserve(namespaces_.size());
    for (const auto& [k, ns] : namespaces_) spaces.push_back(ns);
  }
  for (const auto& ns : spaces) {
    for (const auto& [owner, usage] : ns->sessions.UsageByOwner()) {
      if (owner == 0) continue;  // sessions of calls without a client (tests, tools)
      ClientUsage& u = at(owner);
      u.sessions += usage.sessions;
      u.session_bytes += usage.bytes;
    }
  }
  for (const auto& [c, n] : prefetch_->JobsByClient()) at(c).jobs = n;
  std::vector<ClientUsage> out;
  out.reserve(by_client.size());
  for (const auto& [c, u] : by_client) out.push_back(u);
  return out;
}

void CacheEngine::AbortTicket(const Ticket& ticket) {
  if (!ticket.store) return;  // a retrieve's leases belong to the request
  if (!ticket.keys.empty()) (void)table_->AbortWrite(ticket.request, ticket.keys);
  table_->ReleaseRequest(ticket.request);
  (void)table_->ReleaseQuarantine(ticket.request);  // reservations whose lease had expired
}

void CacheEngine::FenceTicket(const JobHandle& handle, const Ticket& ticket) {
  if (!ticket.store || ticket.keys.empty()) return;
  // The writer may still be copying into the reserved extents: they leave the index and stay out
  // of the allocator (quarantined) until the writer's late commit, or its process's exit.
  table_->ReleaseRequest(ticket.request);
  bool exited = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto p = processes_.find(ticket.client);
    if (p != processes_.end()) {
      exited = p->second.exited;
      if (!exited && p->second.pidfd >= 0) {
        pollfd pfd{p->second.pidfd, POLLIN, 0};
        exited = poll(&pfd, 1, 0) > 0;
      }
    }
    if (!exited) {
      tombstones_[handle] = Tombstone{ticket.client, ticket.request};
      counters_.fenced_stores = tombstones_.size();
    }
  }
  if (exited) (void)table_->ReleaseQuarantine(ticket.request);
}

void CacheEngine::ReleaseExitedWriters() {
  std::vector<RequestId> release;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (processes_.empty()) return;
    std::vector<ClientId> exited;
    for (auto it = processes_.begin(); it != processes_.end();) {
      ClientProcess& p = it->second;
      if (!p.exited && p.pidfd >= 0) {
        pollfd pfd{p.pidfd, POLLIN, 0};
        if (poll(&pfd, 1, 0) > 0) {
          // Remembered (not forgotten) until EndClient: stores the client still holds are fenced
          // then, and must find their writer gone.
          p.exited = true;
          close(p.pidfd);
          p.pidfd = -1;
          exited.push_back(it->first);
        }
      }
      if (p.ended && (p.exited || p.pidfd < 0)) {
        if (p.pidfd >= 0) close(p.pidfd);
        it = processes_.erase(it);
      } else {
        ++it;
      }
    }
    if (exited.empty()) return;
    for (auto it = tombstones_.begin(); it != tombstones_.end();) {
      if (std::find(exited.begin(), exited.end(), it->second.client) != exited.end()) {
        release.push_back(it->second.request);
        it = tombstones_.erase(it);
      } else {
        ++it;
      }
    }
    counters_.fenced_stores = tombstones_.size();
  }
  for (RequestId r : release) (void)table_->ReleaseQuarantine(r);
}

Result<TransferTicket> CacheEngine::PrepareStore(ClientId client, const EngineKey& key) {
  if (client == 0) return Status::InvalidArgument("client id 0 is invalid");
  ResolvedKey rk;
  // A store never creates the request: one stored after END_SESSION must not bring it back
  // (it would live on until request_ttl). A live request lends its hashing session.
  LMCACHE_RETURN_IF_ERROR(
      Resolve(key, RangeKind::kAligned, RequestIdUse::kOptional, &rk, std::nullopt, client));
  const uint64_t quota = reserved_bytes_quota();
  uint64_t held = 0;
  RequestId tr = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    bool registered = false;
    for (const auto& [id, reg] : registrations_) {
      registered = registered || (reg.client == client && reg.ns == rk.ns);
    }
    if (!registered) {
      return Status::PermissionDenied("PREPARE_STORE needs a registration of model '" +
                                      std::string(key.model_name) + "' (world size " +
                                      std::to_string(key.world_size) +
                                      ") by this client (REGISTER_KV_CACHE)");
    }
    size_t& n = tickets_per_client_[client];
    if (n >= config_.max_transfers_per_client) {
      return Status::ResourceExhausted("client has " + std::to_string(n) +
                                       " uncommitted transfers (the limit)");
    }
    held = reserved_bytes_per_client_.count(client) ? reserved_bytes_per_client_[client] : 0;
    if (held >= quota) return ReservedQuotaExceeded(held, quota);
    ++n;  // taken back on failure below
    tr = next_transfer_request_++;
  }
  auto untake = [&] {
    std::lock_guard<std::mutex> l(mu_);
    Ticket none;
    none.client = client;
    UnchargeTicketLocked(none);
  };
  TransferTicket out;
  out.first_chunk = rk.first_chunk;
  out.object_bytes = rk.ns->object_bytes;
  Ticket t;
  t.store = true;
  t.request = tr;
  if (!rk.keys.empty()) {
    auto res = table_->ReserveWrite(LeaseOwner{client, tr}, rk.keys, rk.ns->object_bytes);
    if (!res.ok()) {
      untake();
      return res.status();
    }
    out.offsets.reserve(res->size());
    for (const Reservation& r : *res) {
      if (r.skipped) {
        out.offsets.push_back(-1);
      } else {
        t.positions.push_back(static_cast<uint32_t>(out.offsets.size()));
        t.offsets.push_back(r.offset);
        out.offsets.push_back(static_cast<int64_t>(r.offset));
        t.keys.push_back(r.key);
      }
    }
  }
  t.num_offsets = out.offsets.size();
  t.object_bytes = rk.ns->object_bytes;
  t.client = client;
  t.reserved_bytes = t.keys.size() * rk.ns->object_bytes;
  const uint64_t reserved = t.keys.size();
  const uint64_t skipped = rk.keys.size() - reserved;
  {
    // Charged for what was reserved (skipped objects reserve nothing), under the lock, so that
    // concurrent stores of one client cannot pass the quota together.
    std::lock_guard<std::mutex> l(mu_);
    uint64_t& mine = reserved_bytes_per_client_[client];
    held = mine;
    if (t.reserved_bytes <= quota - std::min(quota, mine)) {
      mine += t.reserved_bytes;
      if (mine == 0) reserved_bytes_per_client_.erase(client);
      out.handle = InsertTicketLocked(client, std::move(t));
      ++counters_.stores;
      counters_.store_skipped += skipped;
      return out;
    }
    if (mine == 0) reserved_bytes_per_client_.erase(client);
  }
  AbortTicket(t);  // over the quota: nothing stays reserved
  untake();
  return ReservedQuotaExceeded(held, quota, t.reserved_bytes);
}

Status CacheEngine::ReservedQuotaExceeded(uint64_t held, uint64_t quota, uint64_t more) {
  return Status::ResourceExhausted(
      "the client holds " + std::to_string(held) + " arena bytes reserved by uncommitted stores" +
      (more > 0 ? " and this store needs " + std::to_string(more) + " more" : "") + " (limit " +
      std::to_string(quota) + ", --max-reserved-bytes-per-client): commit those stores first");
}

Result<uint64_t> CacheEngine::CommitStore(ClientId client, const JobHandle& handle, bool success,
                                          const std::vector<uint32_t>* crc32c) {
  Result<Ticket> taken = TakeTicket(client, handle, TicketKind::kStore);
  if (!taken.ok()) {
    if (taken.status().code() != StatusCode::kNotFound) return taken.status();
    // A ticket dropped while its writer was still at work: the writer is done now.
    RequestId fenced = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = tombstones_.find(handle);
      if (it == tombstones_.end()) return taken.status();
      fenced = it->second.request;
      tombstones_.erase(it);
      counters_.fenced_stores = tombstones_.size();
      if (success) ++counters_.store_expired;
    }
    (void)table_->ReleaseQuarantine(fenced);
    if (!success) return uint64_t{0};
    return Status::LeaseNotHeld(
        "the store's reservation expired before COMMIT_STORE (transfer_ttl); nothing was "
        "published");
  }
  Ticket t = std::move(*taken);
  if (success && crc32c != nullptr && crc32c->size() != t.num_offsets) {
    AbortTicket(t);
    std::lock_guard<std::mutex> l(mu_);
    ++counters_.store_aborts;
    return Status::InvalidArgument("COMMIT_STORE carries " + std::to_string(crc32c->size()) +
                                   " checksums for " + std::to_string(t.num_offsets) +
                                   " offsets; nothing was published");
  }
  if (!success) {
    AbortTicket(t);
    std::lock_guard<std::mutex> l(mu_);
    ++counters_.store_aborts;
    return uint64_t{0};
  }
  // Every object carries its checksum from here on: the worker's (computed from the bytes it
  // copied), or ours, over the bytes now in the arena.
  std::vector<uint32_t> crcs(t.keys.size());
  for (size_t i = 0; i < t.keys.size(); ++i) {
    crcs[i] = crc32c != nullptr ? (*crc32c)[t.positions[i]]
                                : internal::Crc32c(table_->data(t.offsets[i]), t.object_bytes);
  }
  Status st =
      t.keys.empty() ? Status::Ok() : table_->FinishWrite(t.request, t.keys, 0, crcs.data());
  table_->ReleaseRequest(t.request);  // nothing is left on success
  // A write lease that expired before the commit left its object quarantined; the writer is done.
  (void)table_->ReleaseQuarantine(t.request);
  std::lock_guard<std::mutex> l(mu_);
  if (crc32c == nullptr) counters_.store_crc_computed += t.keys.size();
  if (!st.ok()) {
    ++counters_.store_aborts;
    if (st.code() == StatusCode::kLeaseNotHeld) {
      ++counters_.store_expired;
      return LeaseLost("the store's write lease expired before COMMIT_STORE; nothing was published",
                       st);
    }
    return st;
  }
  counters_.store_chunks += t.keys.size();
  return static_cast<uint64_t>(t.keys.size());
}

Result<TransferTicket> CacheEngine::PrepareRetrieve(ClientId client, const EngineKey& key,
                                                    std::optional<Duration> timeout) {
  if (client == 0) return Status::InvalidArgument("client id 0 is invalid");
  ResolvedKey rk;
  LMCACHE_RETURN_IF_ERROR(Resolve(key, RangeKind::kAligned, RequestIdUse::kRequired, &rk));
  auto fail = [&](Status st) {
    bool log = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      ++counters_.retrieve_failures;
      if (st.code() == StatusCode::kTimeout) {
        ++counters_.retrieve_timeouts;
      } else {
        ++counters_.retrieve_absent;
      }
      auto it = requests_.find(RequestKey(key.model_name, key.request_id));
      if (it != requests_.end() && !it->second->load_failure_logged) {
        it->second->load_failure_logged = true;
        log = true;
      }
    }
    if (log) {
      Log(LogLevel::kWarning, "retrieve of request '" + std::string(key.request_id) + "' chunks [" +
                                  std::to_string(key.start / config_.chunk_size) + ", " +
                                  std::to_string(key.end / config_.chunk_size) +
                                  ") failed; the engine recomputes them: " + st.ToString() +
                                  " (further failures of this request are only counted)");
    }
    return st;
  };
  if (rk.request == 0 && !rk.keys.empty()) {
    return fail(Status::KeyAbsent("request '" + std::string(key.request_id) +
                                  "' holds no leases (look it up first)"));
  }
  if (rk.request != 0) {
    auto joined = prefetch_->WaitLoad(rk.request, timeout.value_or(config_.retrieve_wait_timeout));
    if (!joined.ok() && joined.status().code() == StatusCode::kTimeout) {
      return fail(Status::Timeout("the request's L2 load has not finished"));
    }
  }
  TransferTicket out;
  out.first_chunk = rk.first_chunk;
  out.object_bytes = rk.ns->object_bytes;
  out.offsets.reserve(rk.keys.size());
  std::vector<uint64_t> generations;
  generations.reserve(rk.keys.size());
  for (size_t i = 0; i < rk.keys.size(); ++i) {
    const ObjectKey& k = rk.keys[i];
    // The generation the request leases (after a forced Clear the index may already hold a
    // newer, unleased one at another offset).
    const std::optional<ObjectInfo> info = table_->LeasedInfo(rk.request, k);
    if (!info.has_value() || info->state != ObjectState::kReady) {
      return fail(Status::KeyAbsent("chunk " + std::to_string(rk.first_chunk + i / rk.ranks) +
                                    " (rank " + std::to_string(k.kv_rank) +
                                    ") is not present and leased by request '" +
                                    std::string(key.request_id) + "'; nothing may be retrieved"));
    }
    out.offsets.push_back(static_cast<int64_t>(info->offset));
    generations.push_back(info->generation);
  }
  Ticket t;
  t.store = false;
  t.request = rk.request;
  t.keys = std::move(rk.keys);
  t.generations = std::move(generations);
  const uint64_t n = t.keys.size();
  {
    std::lock_guard<std::mutex> l(mu_);
    size_t& per = tickets_per_client_[client];
    if (per >= config_.max_transfers_per_client) {
      ++counters_.retrieve_failures;
      ++counters_.retrieve_absent;
      return Status::ResourceExhausted("client has " + std::to_string(per) +
                                       " uncommitted transfers (the limit)");
    }
    ++per;
    out.handle = InsertTicketLocked(client, std::move(t));
    ++counters_.retrieves;
    counters_.retrieve_chunks += n;
  }
  return out;
}

Status CacheEngine::CommitRetrieve(ClientId client, const JobHandle& handle) {
  LMCACHE_ASSIGN_OR_RETURN(Ticket t, TakeTicket(client, handle, TicketKind::kRetrieve));
  if (t.keys.empty()) return Status::Ok();
  Status st = table_->ReleaseRead(t.request, t.keys, 1, t.generations.data());
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    ++counters_.retrieve_failures;
    ++counters_.retrieve_lease_lost;
    return LeaseLost(
        "a lease of this retrieve was released or expired before the commit; the copied bytes "
        "must not be used",
        st);
  }
  return st;
}

// ---- housekeeping ----------------------------------------------------------------------------

Status CacheEngine::SetClientProcess(ClientId client, int pid) {
  if (pid <= 0) return Status::InvalidArgument("pid must be > 0");
#ifdef SYS_pidfd_open
  const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    const int err = errno;
    if (err == ESRCH) return Status::NotFound("no process " + std::to_string(pid));
    return Status::NotSupported(std::string("pidfd_open: ") + std::strerror(err));
  }
  std::lock_guard<std::mutex> l(mu_);
  ClientProcess& p = processes_[client];
  if (p.pidfd >= 0) close(p.pidfd);
  p.pidfd = fd;
  p.exited = false;
  return Status::Ok();
#else
  (void)client;
  return Status::NotSupported("pidfd_open is not available on this system");
#endif
}

uint64_t CacheEngine::EndClient(ClientId client) {
  std::vector<std::pair<JobHandle, Ticket>> dropped;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = tickets_.begin(); it != tickets_.end();) {
      if (it->second->client == client) {
        dropped.emplace_back(it->first, std::move(*it->second));
        it = tickets_.erase(it);
      } else {
        ++it;
      }
    }
    tickets_per_client_.erase(client);
    reserved_bytes_per_client_.erase(client);
    for (auto it = registrations_.begin(); it != registrations_.end();) {
      if (it->second.client == client) {
        std::shared_ptr<Namespace> ns = it->second.ns;
        --ns->live_registrations;
        it = registrations_.erase(it);
        PruneNamespaceLocked(ns);
      } else {
        ++it;
      }
    }
    registrations_per_client_.erase(client);
    for (auto it = lookups_.begin(); it != lookups_.end();) {
      it = it->second->client == client ? lookups_.erase(it) : std::next(it);
    }
    auto p = processes_.find(client);
    if (p != processes_.end()) p->second.ended = true;
    ++counters_.ended_clients;
  }
  for (const auto& [h, t] : dropped) FenceTicket(h, t);
  const uint64_t released = storage_->EndClient(client);
  // The process's pidfd stays while tombstones name the client (ReleaseExitedWriters).
  {
    std::lock_guard<std::mutex> l(mu_);
    auto p = processes_.find(client);
    if (p != processes_.end()) {
      bool named = false;
      for (const auto& [h, ts] : tombstones_) named = named || ts.client == client;
      if (!named || p->second.exited) {
        if (p->second.pidfd >= 0) close(p->second.pidfd);
        processes_.erase(p);
      }
    }
  }
  return released;
}

uint64_t CacheEngine::Clear(bool force) { return table_->Clear(force); }

uint64_t CacheEngine::ReapExpired() {
  ReleaseExitedWriters();
  const TimePoint now = clock_->Now();
  std::vector<std::pair<JobHandle, Ticket>> tickets;
  std::vector<RequestId> requests;
  std::vector<std::shared_ptr<Namespace>> spaces;
  uint64_t dropped = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = tickets_.begin(); it != tickets_.end();) {
      if (now - it->second->created >= config_.transfer_ttl) {
        UnchargeTicketLocked(*it->second);
        tickets.emplace_back(it->first, std::move(*it->second));
        it = tickets_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = lookups_.begin(); it != lookups_.end();) {
      if (now - it->second->created >= config_.lookup_ttl) {
        it = lookups_.erase(it);
        ++dropped;
      } else {
        ++it;
      }
    }
    for (auto it = requests_.begin(); it != requests_.end();) {
      if (now - it->second->last_used >= config_.request_ttl) {
        requests.push_back(it->second->id);
        UnchargeRequestLocked(it->second->owner);
        it = requests_.erase(it);
      } else {
        ++it;
      }
    }
    while (!ended_order_.empty() &&
           now - ended_order_.front().second >= config_.ended_request_ttl) {
      auto e = ended_.find(ended_order_.front().first);
      if (e != ended_.end() && e->second == ended_order_.front().second) ended_.erase(e);
      ended_order_.pop_front();
    }
    counters_.reaped_transfers += tickets.size();
    counters_.reaped_requests += requests.size();
    for (const auto& [k, ns] : namespaces_) spaces.push_back(ns);
  }
  for (const auto& [h, t] : tickets) FenceTicket(h, t);
  for (RequestId r : requests) {
    for (const auto& ns : spaces) ns->sessions.EndSession(r);
    storage_->EndRequest(r);
  }
  for (const auto& ns : spaces) dropped += ns->sessions.Reap();
  if (!tickets.empty() || !requests.empty()) {
    Log(LogLevel::kInfo, "engine: reaped " + std::to_string(tickets.size()) +
                             " expired transfer tickets and " + std::to_string(requests.size()) +
                             " idle requests");
  }
  return dropped + tickets.size() + requests.size();
}

EngineStats CacheEngine::stats() const {
  std::vector<std::shared_ptr<Namespace>> spaces;
  EngineStats s;
  {
    std::lock_guard<std::mutex> l(mu_);
    s = counters_;
    s.registrations = registrations_.size();
    s.namespaces = namespaces_.size();
    s.requests = requests_.size();
    s.transfers = tickets_.size();
    s.pending_lookups = lookups_.size();
    s.fenced_stores = tombstones_.size();
    for (const auto& [k, ns] : namespaces_) spaces.push_back(ns);
  }
  for (const auto& ns : spaces) s.sessions += ns->sessions.size();
  return s;
}

}  // namespace lmcache_cpp
