// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// libFuzzer target: the server's C++ wire decoder (cpp/src/wire/fast_path.h), FastPath::Handle
// and its msgpack Reader, run against a real CacheEngine over a small L1-only StorageManager.
//
// The engine (built in LLVMFuzzerInitialize, and again every kInputsPerWorld inputs so that its
// manual clock, advanced a day per input, never overflows) has the namespace kModel registered for
// a world size of 1 and of 2, and holds kStoredChunks chunks of the token ids 0, 1, 2, ... (both
// world sizes) and of the block hashes of StoredBlockHashes() (world size 1), so a key the fuzzer
// sends can decode all the way, resolve, hash, hit and lease. fuzz/make_corpus.py writes seeds
// with these keys.
//
// Input:
//   options:u8  then requests, each  header_len:u8 header[header_len] payload_len:u16le payload
// A length past the end of the input takes what is left. options bit 0: serve as a server with
// an L2 tier (FastPath has_l2 = true: SYNC_LOOKUP answers from L1 only). A bin16 handle of 16 zero
// bytes in a payload is replaced by the handle of this input's latest LOOKUP reply, so that
// QUERY_PREFETCH_STATUS reaches a live lookup.
//
// Checks, besides the sanitizers: every reply's header is [1, type, seq, status] for the
// request's type and seq, with the Reply's own status; its payload is one msgpack map ({"message":
// str} for an error); only the five fast-path types are ever answered. After each input the
// fuzzing client is ended and every TTL passed (EndClient, ReapExpired on a manual clock): no
// request, lookup, ticket or read lease may then remain -- leases leaked by any request sequence
// would show up here.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/clock.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/storage_manager.h"
#include "wire/fast_path.h"

namespace lmcache_cpp::fuzz {
namespace {

constexpr char kModel[] = "fuzz-model";
constexpr uint32_t kChunk = 16;        // tokens per chunk
constexpr uint32_t kStoredChunks = 4;  // chunks stored at start-up
constexpr ClientId kOwner = 1;         // registers the namespaces, stores the chunks
constexpr ClientId kFuzzClient = 2;    // sends the fuzzed requests
constexpr uint32_t kBlockHashSize = 32;
// A day per input on the manual clock: 10^4 days stay far from overflowing its int64 nanoseconds.
constexpr auto kPastEveryTtl = std::chrono::hours(24);
constexpr uint64_t kInputsPerWorld = 10000;

// Aborts with a message: libFuzzer saves the input that led here.
[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "wire_fast_path_fuzzer: check failed: %s\n", what);
  std::abort();
}
#define FUZZ_CHECK(cond)      \
  do {                        \
    if (!(cond)) Fail(#cond); \
  } while (0)

KvCacheLayout Layout() {
  KvCacheLayout l;
  l.layout = KvLayout::kNHD;
  l.num_layers = 2;
  l.block_size = kChunk;  // one engine block per chunk
  l.num_heads = 1;
  l.head_size = 8;
  l.element_size = 2;
  l.num_blocks = 64;
  return l;
}

// Block hash i of the stored block-hash key: byte j is (i * 32 + j) * 7 + 1 (fuzz/make_corpus.py).
std::vector<uint8_t> StoredBlockHashes() {
  std::vector<uint8_t> v(kStoredChunks * kBlockHashSize);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(i * 7 + 1);
  return v;
}

struct World {
  std::shared_ptr<ManualClock> clock;
  std::unique_ptr<StorageManager> storage;
  std::unique_ptr<CacheEngine> engine;
  std::optional<wire::FastPath> l1_only;
  std::optional<wire::FastPath> with_l2;
  uint64_t objects = 0;  // in L1 after start-up
  uint64_t inputs = 0;   // run against this world
};
World* world = nullptr;

void Store(const EngineKey& key) {
  Result<TransferTicket> t = world->engine->PrepareStore(kOwner, key);
  if (!t.ok()) Fail(("PrepareStore: " + t.status().ToString()).c_str());
  for (size_t i = 0; i < t->offsets.size(); ++i) {
    if (t->offsets[i] < 0) continue;
    std::memset(world->storage->table()->data(static_cast<uint64_t>(t->offsets[i])),
                static_cast<int>(i + 1), t->object_bytes);
  }
  Result<uint64_t> n = world->engine->CommitStore(kOwner, t->handle);
  if (!n.ok()) Fail(("CommitStore: " + n.status().ToString()).c_str());
  FUZZ_CHECK(world->storage->store()->WaitIdle(std::chrono::seconds(30)));
}

void NewWorld() {
  world = new World;
  world->clock = std::make_shared<ManualClock>();
  StorageManagerConfig sc;
  sc.arena.size_bytes = 1 << 20;
  sc.prefetch.clock = world->clock;
  Result<std::unique_ptr<StorageManager>> storage = StorageManager::Create(std::move(sc));
  if (!storage.ok()) Fail(("StorageManager::Create: " + storage.status().ToString()).c_str());
  world->storage = std::move(storage).value();
  FUZZ_CHECK(world->storage->Start().ok());
  EngineConfig config;
  config.chunk_size = kChunk;
  config.clock = world->clock;
  Result<std::unique_ptr<CacheEngine>> engine = CacheEngine::Create(world->storage.get(), config);
  if (!engine.ok()) Fail(("CacheEngine::Create: " + engine.status().ToString()).c_str());
  world->engine = std::move(engine).value();
  FUZZ_CHECK(world->engine->RegisterKvCache(kOwner, kModel, 1, 0, Layout()).ok());
  FUZZ_CHECK(world->engine->RegisterKvCache(kOwner, kModel, 2, 0, Layout()).ok());
  FUZZ_CHECK(world->engine->RegisterKvCache(kOwner, kModel, 2, 1, Layout()).ok());

  std::vector<uint32_t> tokens(kStoredChunks * kChunk);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
  EngineKey key;
  key.model_name = kModel;
  key.worker_id = 0;
  key.mode = KeyMode::kTokens;
  key.data = reinterpret_cast<const uint8_t*>(tokens.data());
  key.size = tokens.size() * sizeof(uint32_t);
  Store(key);  // world size 1, rank 0
  key.world_size = 2;
  key.worker_id = -1;
  Store(key);  // world size 2, both ranks
  const std::vector<uint8_t> hashes = StoredBlockHashes();
  EngineKey hkey;
  hkey.model_name = kModel;
  hkey.worker_id = 0;
  hkey.mode = KeyMode::kBlockHashes;
  hkey.data = hashes.data();
  hkey.size = hashes.size();
  hkey.block_hash_size = kBlockHashSize;
  Store(hkey);
  world->objects = world->storage->table()->stats().objects;
  FUZZ_CHECK(world->objects == 4 * kStoredChunks);  // 1 + 2 ranks of tokens, 1 of block hashes

  wire::Limits limits;  // the server's defaults (ProtocolLimits)
  world->l1_only.emplace(world->engine.get(), limits, false);
  world->with_l2.emplace(world->engine.get(), limits, true);
}

// The request header's type and seq, read independently of the code under test; nullopt when it
// is not [1, uint, uint] in the encodings a fixarray header allows.
struct HeaderFields {
  uint64_t type = 0, seq = 0;
};
std::optional<HeaderFields> ParseHeader(std::string_view h) {
  wire::Reader r(h);
  uint32_t n = 0;
  uint64_t version = 0;
  HeaderFields f;
  if (!r.ReadArrayHeader(&n) || n != 3 || !r.ReadUint(0, UINT64_MAX, &version) ||
      !r.ReadUint(0, UINT64_MAX, &f.type) || !r.ReadUint(0, UINT64_MAX, &f.seq) || !r.AtEnd()) {
    return std::nullopt;
  }
  return f;
}

// Replaces each bin16 handle of zeros in `payload` with `handle`.
void SubstituteHandle(std::string* payload, const JobHandle& handle) {
  static const std::string kZeroHandle = [] {
    std::string s("\xc4\x10", 2);
    s.append(wire::kHandleSize, '\0');
    return s;
  }();
  for (size_t pos = payload->find(kZeroHandle); pos != std::string::npos;
       pos = payload->find(kZeroHandle, pos + kZeroHandle.size())) {
    std::memcpy(&(*payload)[pos + 2], handle.bytes.data(), wire::kHandleSize);
  }
}

void CheckReply(const wire::Reply& reply, uint64_t type, uint64_t seq,
                std::optional<JobHandle>* last_handle) {
  FUZZ_CHECK(type == wire::kPing || type == wire::kLookup || type == wire::kQueryPrefetchStatus ||
             type == wire::kSyncLookup || type == wire::kEndSession);
  FUZZ_CHECK(reply.request_type == type);
  wire::Reader h(reply.header);
  uint32_t n = 0;
  uint64_t version = 0, rtype = 0, rseq = 0, status = 0;
  FUZZ_CHECK(h.ReadArrayHeader(&n) && n == 4);
  FUZZ_CHECK(h.ReadUint(0, UINT64_MAX, &version) && version == wire::kProtocolVersion);
  FUZZ_CHECK(h.ReadUint(0, UINT64_MAX, &rtype) && rtype == type);
  FUZZ_CHECK(h.ReadUint(0, UINT64_MAX, &rseq) && rseq == seq);
  FUZZ_CHECK(h.ReadUint(0, UINT64_MAX, &status) && status == reply.status);
  FUZZ_CHECK(h.AtEnd());
  wire::Reader p(reply.payload);
  FUZZ_CHECK(p.ReadMapHeader(&n));
  if (reply.status != 0) {
    std::string_view name, message;
    FUZZ_CHECK(n == 1 && p.ReadStr(16, &name) && name == "message");
    FUZZ_CHECK(p.ReadStr(UINT64_MAX, &message) && p.AtEnd());
    return;
  }
  if (type == wire::kLookup) {
    std::string_view name, handle;
    FUZZ_CHECK(n == 1 && p.ReadStr(16, &name) && name == "handle");
    FUZZ_CHECK(p.ReadBin(&handle) && handle.size() == wire::kHandleSize && p.AtEnd());
    JobHandle j;
    std::memcpy(j.bytes.data(), handle.data(), wire::kHandleSize);
    *last_handle = j;
  }
}

void DeleteWorld() {
  world->l1_only.reset();
  world->with_l2.reset();
  world->engine.reset();
  world->storage->Stop();
  world->storage.reset();
  delete world;
  world = nullptr;
}

// Ends the fuzzing client and passes every TTL; then nothing of this input may remain.
void ResetAndCheck() {
  CacheEngine& engine = *world->engine;
  engine.EndClient(kFuzzClient);
  world->clock->Advance(kPastEveryTtl);
  engine.ReapExpired();
  const EngineStats s = engine.stats();
  FUZZ_CHECK(s.requests == 0);
  FUZZ_CHECK(s.pending_lookups == 0);
  FUZZ_CHECK(s.transfers == 0);
  const ObjectTableStats t = world->storage->table()->stats();
  FUZZ_CHECK(t.read_leases == 0);
  FUZZ_CHECK(t.write_leases == 0);
  FUZZ_CHECK(t.objects == world->objects);  // nothing the fast path does stores or evicts
}

}  // namespace
}  // namespace lmcache_cpp::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The core's warnings (none are expected) would interleave with libFuzzer's status lines.
  lmcache_cpp::SetLogSink([](lmcache_cpp::LogLevel, const std::string&) {},
                          lmcache_cpp::LogLevel::kError);
  lmcache_cpp::fuzz::NewWorld();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lmcache_cpp::fuzz;
  if (size == 0) return 0;
  const lmcache_cpp::wire::FastPath& path = (data[0] & 1) ? *world->with_l2 : *world->l1_only;
  size_t pos = 1;
  auto take = [&](size_t n) {
    n = std::min(n, size - pos);
    std::string s(reinterpret_cast<const char*>(data + pos), n);
    pos += n;
    return s;
  };
  std::optional<lmcache_cpp::JobHandle> last_handle;
  while (pos < size) {
    const size_t header_len = data[pos++];
    const std::string header = take(header_len);
    size_t payload_len = 0;
    if (pos < size) payload_len = data[pos++];
    if (pos < size) payload_len |= static_cast<size_t>(data[pos++]) << 8;
    std::string payload = take(payload_len);
    if (last_handle.has_value()) SubstituteHandle(&payload, *last_handle);
    std::optional<lmcache_cpp::wire::Reply> reply = path.Handle(kFuzzClient, header, payload);
    if (!reply.has_value()) continue;
    const std::optional<HeaderFields> h = ParseHeader(header);
    FUZZ_CHECK(h.has_value());  // a reply implies a well-formed header
    CheckReply(*reply, h->type, h->seq, &last_handle);
  }
  ResetAndCheck();
  if (++world->inputs == kInputsPerWorld) {
    DeleteWorld();
    NewWorld();
  }
  return 0;
}
