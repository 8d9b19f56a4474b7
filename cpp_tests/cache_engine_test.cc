// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CacheEngine against a real storage manager (shared-memory arena, object table, store and
// prefetch controllers) with an in-memory L2 adapter that can stall or slow down: registration,
// lookups (two-phase and synchronous), engine-driven stores and retrieves with exact lease
// accounting, MLA readers, sessions, client teardown, TTLs, key modes and validation, and a
// concurrent workload that must leave the table consistent and lease-free.

#include "lmcache_cpp/cache_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <future>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/prefetch_controller.h"
#include "lmcache_cpp/storage_manager.h"
#include "testing/memory_adapter.h"
#include "testing/reference_crc32c.h"

namespace lmcache_cpp {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::ReferenceCrc32c;

constexpr uint32_t kCs = 32;          // tokens per chunk (EngineConfig::chunk_size)
constexpr uint32_t kBlock = 16;       // tokens per engine block: two blocks per chunk
constexpr uint64_t kNumBlocks = 64;   // engine blocks per layer
constexpr uint64_t kObjBytes = 4096;  // NHD, L2, BS16, H2, D8, E2: 2*2*2*16*2*8*2
constexpr char kModel[] = "test-model";
constexpr Duration kWait = seconds(30);  // generous upper bound for anything asynchronous

KvCacheLayout MakeLayout(KvLayout kind = KvLayout::kNHD) {
  KvCacheLayout l;
  l.layout = kind;
  l.num_layers = 2;
  l.block_size = kBlock;
  l.num_heads = kind == KvLayout::kMLA ? 1 : 2;
  l.head_size = 8;
  l.element_size = 2;
  l.num_blocks = kNumBlocks;
  return l;
}

// n token ids of sequence `seed`; different seeds share no chunk.
std::vector<uint32_t> Tokens(size_t n, uint32_t seed) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = (seed << 20) | static_cast<uint32_t>(i);
  return t;
}

// `blocks` engine block hashes of `size` bytes each.
std::vector<uint8_t> BlockHashes(size_t blocks, uint8_t seed, size_t size = 32) {
  std::vector<uint8_t> v(blocks * size);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(seed * 131 + i * 7 + i / 13);
  return v;
}

// A key of `mode` over data..data+size for one rank of a single-rank model.
EngineKey SingleRankKey(KeyMode mode, const uint8_t* data, size_t size, std::string_view request) {
  EngineKey k;
  k.model_name = kModel;
  k.world_size = 1;
  k.worker_id = 0;
  k.request_id = request;
  k.mode = mode;
  k.data = data;
  k.size = size;
  return k;
}

// A token key for one rank of a single-rank model. The vector must outlive the key.
EngineKey TokenKey(const std::vector<uint32_t>& tokens, std::string_view request,
                   uint64_t start = 0, uint64_t end = UINT64_MAX) {
  EngineKey k = SingleRankKey(KeyMode::kTokens, reinterpret_cast<const uint8_t*>(tokens.data()),
                              tokens.size() * sizeof(uint32_t), request);
  k.start = start;
  k.end = end;
  return k;
}

// A token key of every rank of a `world_size`-rank model.
EngineKey AllRanksKey(const std::vector<uint32_t>& tokens, std::string_view request,
                      uint32_t world_size) {
  EngineKey k = TokenKey(tokens, request);
  k.world_size = world_size;
  k.worker_id = -1;
  return k;
}

EngineKey HashKey(const std::vector<uint8_t>& block_hashes, std::string_view request,
                  uint32_t block_hash_size = 32) {
  EngineKey k =
      SingleRankKey(KeyMode::kBlockHashes, block_hashes.data(), block_hashes.size(), request);
  k.block_hash_size = block_hash_size;
  return k;
}

// The object keys the engine derives for the first `chunks` chunks of `tokens` (unsalted token
// mode), per docs/design/engine.md: the hasher is seeded with the model name and
// "<layout fingerprint>|ws=<world size>".
std::vector<ObjectKey> ExpectedKeys(const std::vector<uint32_t>& tokens, size_t chunks,
                                    int32_t rank = 0, uint32_t world_size = 1,
                                    const KvCacheLayout& layout = MakeLayout(),
                                    std::string_view model = kModel) {
  NamespaceConfig ns{std::string(model), layout.Fingerprint() + "|ws=" + std::to_string(world_size),
                     ""};
  auto hasher = ChunkHasher::Create(ns, kCs);
  EXPECT_TRUE(hasher.ok()) << hasher.status().ToString();
  if (!hasher.ok()) return {};
  return KeysForRank(hasher->HashTokens(tokens.data(), chunks * kCs), rank);
}

// Fills an object with a byte pattern that depends on `tag` (so a misplaced object is visible).
void FillObject(uint8_t* p, uint64_t n, uint64_t tag) {
  for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(tag * 37 + i * 11 + (i >> 8));
}

// Counts objects the table removed as aborted (uncommitted stores); waiters block on a condition
// variable with a deadline.
class AbortCounter : public ObjectTableListener {
 public:
  void OnObjectsRemoved(const std::vector<ObjectKey>& keys, RemovalReason reason) override {
    if (reason != RemovalReason::kAborted) return;
    std::lock_guard<std::mutex> l(mu_);
    aborted_ += keys.size();
    cv_.notify_all();
  }
  bool WaitFor(size_t n, Duration timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return aborted_ >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  size_t aborted_ = 0;
};

// An engine KV cache in test-owned memory (one vector per layer) and its view.
struct EngineCache {
  explicit EngineCache(KvCacheLayout l) : layout(l) {
    const uint64_t extent = layout.num_planes() * layout.num_blocks * layout.BlockPlaneBytes();
    for (uint32_t i = 0; i < layout.num_layers; ++i) layers.emplace_back(extent, 0);
  }
  KvCacheView View() {
    KvCacheView v;
    v.layout = layout;
    for (auto& l : layers) v.layers.push_back(l.data());
    return v;
  }
  const uint8_t* BlockPlane(uint32_t layer, uint32_t plane, uint64_t block) const {
    return layers[layer].data() + plane * layout.PlaneStride() + block * layout.BlockStride();
  }
  KvCacheLayout layout;
  std::vector<std::vector<uint8_t>> layers;
};

// Kills and reaps a forked child process when it goes out of scope.
struct ChildReaper {
  pid_t pid;
  ~ChildReaper() {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
};

class CacheEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { Build(); }
  void TearDown() override { Shutdown(); }

  void Build(EngineConfig config = {}, size_t objects = 256, ObjectTableOptions table = {},
             bool prefetch_on_test_clock = false) {
    Shutdown();
    clock_ = std::make_shared<ManualClock>();
    adapter_ = std::shared_ptr<MemoryL2Adapter>(
        MemoryL2Adapter::Create(MemoryAdapterOptions{}).value().release());
    StorageManagerConfig sc;
    sc.arena.size_bytes = objects * kObjBytes;
    sc.table = table;
    if (prefetch_on_test_clock) sc.prefetch.clock = clock_;
    sc.adapters.push_back(adapter_);
    auto storage = StorageManager::Create(std::move(sc));
    ASSERT_TRUE(storage.ok()) << storage.status().ToString();
    storage_ = std::move(storage).value();
    ASSERT_TRUE(storage_->Start().ok());
    config.chunk_size = kCs;
    config.clock = clock_;
    auto engine = CacheEngine::Create(storage_.get(), config);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    engine_ = std::move(engine).value();
  }
  void Shutdown() {
    engine_.reset();
    if (adapter_) adapter_->SetStalled(false);
    if (storage_) storage_->Stop();
    storage_.reset();
    adapter_.reset();
  }

  ObjectTable* table() const { return storage_->table(); }

  Registration Register(ClientId client, int32_t worker = 0, uint32_t world_size = 1,
                        const KvCacheLayout& layout = MakeLayout(),
                        std::string_view model = kModel) {
    auto r = engine_->RegisterKvCache(client, model, world_size, worker, layout);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : Registration{};
  }

  // PrepareStore, writes every reserved object, CommitStore, then waits until the store
  // controller has copied the objects to L2 (and returned its leases). Returns the objects
  // published.
  uint64_t Store(ClientId client, const EngineKey& key) {
    auto t = engine_->PrepareStore(client, key);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    if (!t.ok()) return 0;
    for (size_t i = 0; i < t->offsets.size(); ++i) {
      if (t->offsets[i] >= 0) {
        FillObject(table()->data(static_cast<uint64_t>(t->offsets[i])), t->object_bytes,
                   t->first_chunk + i);
      }
    }
    auto n = engine_->CommitStore(client, t->handle);
    EXPECT_TRUE(n.ok()) << n.status().ToString();
    EXPECT_TRUE(storage_->store()->WaitIdle(kWait));
    return n.ok() ? *n : 0;
  }

  // Registers client 1 and stores `key` for it, expecting `chunks` objects published.
  void RegisterAndStore(const EngineKey& key, uint64_t chunks) {
    Register(1);
    ASSERT_EQ(Store(1, key), chunks);
  }

  // Two-phase lookup, collected with WaitPrefetch.
  // Opens request "a" (a two-phase lookup) and "b" (a sync lookup) for `client`, then returns
  // what a lookup of a third request, "c", got.
  Status OpenTwoRequestsThenAThird(ClientId client, const std::vector<uint32_t>& tokens) {
    EXPECT_TRUE(engine_->Lookup(client, TokenKey(tokens, "a"), 1).ok());
    EXPECT_TRUE(engine_->SyncLookup(client, TokenKey(tokens, "b"), 1).ok());
    return engine_->Lookup(client, TokenKey(tokens, "c"), 1).status();
  }
  LookupResult LookupAndWait(ClientId client, const EngineKey& key, uint32_t tp_size = 1) {
    auto h = engine_->Lookup(client, key, tp_size);
    EXPECT_TRUE(h.ok()) << h.status().ToString();
    if (!h.ok()) return {};
    auto r = engine_->WaitPrefetch(client, *h, kWait);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return {};
    EXPECT_TRUE(r->has_value()) << "lookup did not finish within the wait";
    return r->value_or(LookupResult{});
  }

  Status Retrieve(ClientId client, const EngineKey& key) {
    auto t = engine_->PrepareRetrieve(client, key);
    if (!t.ok()) return t.status();
    return engine_->CommitRetrieve(client, t->handle);
  }

  // Read leases on `key`, all requests together (0 when absent).
  uint32_t Readers(const ObjectKey& key) const {
    auto info = table()->Info(key);
    return info.has_value() ? info->readers : 0;
  }

  // Stores `chunks` chunks, flushes L1, so they are in L2 only.
  void StoreInL2Only(const std::vector<uint32_t>& tokens, size_t chunks) {
    ASSERT_EQ(Store(1, TokenKey(tokens, "", 0, chunks * kCs)), chunks);
    for (const ObjectKey& k : ExpectedKeys(tokens, chunks)) ASSERT_TRUE(adapter_->Contains(k));
    ASSERT_EQ(engine_->Clear(false), chunks);
    ASSERT_EQ(table()->stats().objects, 0u);
  }

  // Registers client 1 and puts `chunks` chunks of `tokens` in L2 only, then sync-looks them up
  // as client 2's request "r" while the adapter holds the load. Expects all of them from L2.
  void SyncLookupFromL2WithItsLoadHeld(const std::vector<uint32_t>& tokens, size_t chunks) {
    Register(1);
    ASSERT_NO_FATAL_FAILURE(StoreInL2Only(tokens, chunks));
    adapter_->InjectFault(L2Op::kLoad, 1, Fault{Fault::Kind::kStall, {}});
    auto sync = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait);
    ASSERT_TRUE(sync.ok()) << sync.status().ToString();
    EXPECT_EQ(sync->l2_chunks, chunks);
    ASSERT_TRUE(adapter_->WaitForBlockedOperations(1, kWait));
  }

  // Expects no read or write lease, request or temporary object in the table, no pin in the
  // adapter and no request in the engine.
  void ExpectNoLeasesRequestsOrPins() {
    const ObjectTableStats s = table()->stats();
    EXPECT_EQ(s.read_leases, 0u);
    EXPECT_EQ(s.write_leases, 0u);
    EXPECT_EQ(s.requests, 0u);
    EXPECT_EQ(s.temporary, 0u);
    EXPECT_EQ(adapter_->TotalPins(), 0u);
    EXPECT_EQ(engine_->stats().requests, 0u);
  }

  std::shared_ptr<ManualClock> clock_;
  std::shared_ptr<MemoryL2Adapter> adapter_;
  std::unique_ptr<StorageManager> storage_;
  std::unique_ptr<CacheEngine> engine_;
};

// ---- registration -------------------------------------------------------------------------

TEST(CacheEngineCreateTest, BadConfigurationIsAnInvalidArgument) {
  EXPECT_EQ(CacheEngine::Create(nullptr).status().code(), StatusCode::kInvalidArgument);
  StorageManagerConfig sc;
  sc.arena.size_bytes = 1 << 20;
  auto storage = StorageManager::Create(std::move(sc));
  ASSERT_TRUE(storage.ok());
  EngineConfig zero;
  zero.chunk_size = 0;
  EXPECT_EQ(CacheEngine::Create(storage->get(), zero).status().code(),
            StatusCode::kInvalidArgument);
  EngineConfig no_chunks;
  no_chunks.max_chunks_per_key = 0;
  EXPECT_EQ(CacheEngine::Create(storage->get(), no_chunks).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(CacheEngineTest, RegistrationDescribesTheObjectsAndTheArena) {
  const Registration reg = Register(1);
  EXPECT_NE(reg.id, 0u);
  EXPECT_EQ(reg.chunk_size, kCs);
  EXPECT_EQ(reg.object_bytes, kObjBytes);
  EXPECT_EQ(reg.fingerprint, MakeLayout().Fingerprint());
  EXPECT_EQ(reg.arena.path, table()->arena()->descriptor().path);
  EXPECT_GE(reg.arena.size, 256 * kObjBytes);
  EXPECT_EQ(engine_->stats().registrations, 1u);
  EXPECT_EQ(engine_->stats().namespaces, 1u);
}

TEST_F(CacheEngineTest, UnregisterSucceedsOnceAndOnlyForTheOwner) {
  const Registration reg = Register(1);
  EXPECT_EQ(engine_->UnregisterKvCache(2, reg.id).code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->stats().registrations, 1u) << "a refused unregister changes nothing";
  EXPECT_TRUE(engine_->UnregisterKvCache(1, reg.id).ok());
  EXPECT_EQ(engine_->stats().registrations, 0u);
  EXPECT_EQ(engine_->UnregisterKvCache(1, reg.id).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->UnregisterKvCache(1, reg.id + 1).code(), StatusCode::kNotFound);
}

TEST_F(CacheEngineTest, ALiveNamespaceRefusesADifferentLayoutUntilItsRegistrationsAreGone) {
  const Registration a = Register(1, 0);
  const KvCacheLayout hnd = MakeLayout(KvLayout::kHND);
  EXPECT_EQ(engine_->RegisterKvCache(2, kModel, 1, 0, hnd).status().code(),
            StatusCode::kAlreadyExists);
  // The same layout joins the namespace; another world size is another namespace.
  const Registration b = Register(2, 0);
  auto other_ws = engine_->RegisterKvCache(3, kModel, 2, 1, hnd);
  ASSERT_TRUE(other_ws.ok()) << other_ws.status().ToString();
  EXPECT_EQ(engine_->stats().namespaces, 2u);

  ASSERT_TRUE(engine_->UnregisterKvCache(1, a.id).ok());
  EXPECT_EQ(engine_->RegisterKvCache(2, kModel, 1, 0, hnd).status().code(),
            StatusCode::kAlreadyExists)
      << "b still holds the namespace";
  ASSERT_TRUE(engine_->UnregisterKvCache(2, b.id).ok());
  auto replaced = engine_->RegisterKvCache(2, kModel, 1, 0, hnd);
  ASSERT_TRUE(replaced.ok()) << replaced.status().ToString();
  EXPECT_EQ(replaced->fingerprint, hnd.Fingerprint());
  EXPECT_EQ(engine_->stats().namespaces, 2u);
}

TEST_F(CacheEngineTest, RequestsForAnUnregisteredNamespaceAreNotFound) {
  Register(1);
  auto tokens = Tokens(4 * kCs, 1);
  EngineKey other_model = TokenKey(tokens, "r");
  other_model.model_name = "other-model";
  EngineKey other_ws = TokenKey(tokens, "r");
  other_ws.world_size = 2;
  for (const EngineKey& k : {other_model, other_ws}) {
    EXPECT_EQ(engine_->Lookup(2, k, 1).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(engine_->SyncLookup(2, k, 1).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(engine_->PrepareStore(2, k).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(engine_->PrepareRetrieve(2, k).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(engine_->FreeLookupLocks(2, k, 1).status().code(), StatusCode::kNotFound);
  }
  EXPECT_EQ(engine_->stats().requests, 0u);
}

TEST_F(CacheEngineTest, MalformedRegistrationsAreInvalidArguments) {
  const KvCacheLayout good = MakeLayout();
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 1, -1, good).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 2, 2, good).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 0, 0, good).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->RegisterKvCache(0, kModel, 1, 0, good).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->RegisterKvCache(1, "", 1, 0, good).status().code(),
            StatusCode::kInvalidArgument);
  KvCacheLayout odd_block = good;
  odd_block.block_size = 24;  // 32-token chunks are not whole blocks
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 1, 0, odd_block).status().code(),
            StatusCode::kInvalidArgument);
  KvCacheLayout no_layers = good;
  no_layers.num_layers = 0;
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 1, 0, no_layers).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->stats().registrations, 0u);
  EXPECT_EQ(engine_->stats().namespaces, 0u);
}

// ---- lookup --------------------------------------------------------------------------------

TEST_F(CacheEngineTest, StoredChunksAreFoundByALookupAndNeverStoredOnesAreNot) {
  auto tokens = Tokens(10 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 10));
  const auto keys = ExpectedKeys(tokens, 10);
  for (const ObjectKey& k : keys) {
    auto info = table()->Info(k);
    ASSERT_TRUE(info.has_value()) << "the engine names objects as engine.md describes";
    EXPECT_EQ(info->state, ObjectState::kReady);
    EXPECT_EQ(info->readers, 0u);
  }

  EngineKey lk = TokenKey(tokens, "r1");
  lk.worker_id = -1;
  const LookupResult hit = LookupAndWait(2, lk);
  EXPECT_EQ(hit.hit_chunks, 10u);
  EXPECT_EQ(hit.hit_tokens, 10u * kCs);
  EXPECT_EQ(hit.l1_chunks, 10u);
  EXPECT_EQ(hit.l2_chunks, 0u);
  for (const ObjectKey& k : keys) EXPECT_EQ(Readers(k), 1u);

  auto fresh = Tokens(5 * kCs, 2);
  const LookupResult miss = LookupAndWait(2, TokenKey(fresh, "r2"));
  EXPECT_EQ(miss.hit_chunks, 0u);
  EXPECT_EQ(miss.hit_tokens, 0u);

  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.lookups, 2u);
  EXPECT_EQ(s.lookup_chunks, 15u);
  EXPECT_EQ(s.hit_chunks, 10u);
  EXPECT_EQ(s.pending_lookups, 0u);
  EXPECT_EQ(s.requests, 2u);
}

TEST_F(CacheEngineTest, ALookupEndingMidChunkCountsOnlyWholeChunks) {
  auto tokens = Tokens(6 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 6));
  const LookupResult r = LookupAndWait(2, TokenKey(tokens, "r", 0, 4 * kCs + kCs / 2));
  EXPECT_EQ(r.hit_chunks, 4u);
  EXPECT_EQ(r.hit_tokens, 4u * kCs);
  const auto keys = ExpectedKeys(tokens, 6);
  EXPECT_EQ(Readers(keys[3]), 1u);
  EXPECT_EQ(Readers(keys[4]), 0u) << "a partial chunk is neither counted nor leased";
}

TEST_F(CacheEngineTest, ALookupResultIsDeliveredExactlyOnce) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 4));
  auto h = engine_->Lookup(2, TokenKey(tokens, "r"), 1);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  // Every chunk is in L1, so the result is ready without L2.
  auto first = engine_->QueryPrefetch(2, *h);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(first->has_value());
  EXPECT_EQ((*first)->hit_chunks, 4u);
  EXPECT_EQ(engine_->QueryPrefetch(2, *h).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->WaitPrefetch(2, *h, milliseconds(1)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->QueryPrefetch(2, JobHandle::Random()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->stats().pending_lookups, 0u);
}

TEST_F(CacheEngineTest, ALookupHandleIsBoundToTheClientThatCreatedIt) {
  auto tokens = Tokens(3 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 3));
  auto h = engine_->Lookup(2, TokenKey(tokens, "r"), 1);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(engine_->QueryPrefetch(3, *h).status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->WaitPrefetch(3, *h, milliseconds(1)).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->stats().pending_lookups, 1u) << "a foreign query must not consume it";
  auto mine = engine_->WaitPrefetch(2, *h, kWait);
  ASSERT_TRUE(mine.ok()) << mine.status().ToString();
  ASSERT_TRUE(mine->has_value());
  EXPECT_EQ((*mine)->hit_chunks, 3u);
  EXPECT_EQ(engine_->stats().pending_lookups, 0u);
}

// ---- retrieve ------------------------------------------------------------------------------

TEST_F(CacheEngineTest, RetrieveSucceedsForExactlyTheLookedUpChunksAndCopiesBytesExactly) {
  Register(1);
  const KvCacheLayout layout = MakeLayout();
  EngineCache src(layout), dst(layout);
  for (size_t l = 0; l < src.layers.size(); ++l)
    FillObject(src.layers[l].data(), src.layers[l].size(), 1000 + l);
  auto tokens = Tokens(60 * kCs, 1);

  // Chunk i of the source lives in blocks {2i, 2i + 1}.
  auto st = engine_->PrepareStore(1, TokenKey(tokens, "", 0, 30 * kCs));
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  ASSERT_EQ(st->offsets.size(), 30u);
  ASSERT_EQ(st->object_bytes, kObjBytes);
  for (size_t i = 0; i < 30; ++i) {
    ASSERT_GE(st->offsets[i], 0);
    const std::vector<int32_t> blocks = {static_cast<int32_t>(2 * i),
                                         static_cast<int32_t>(2 * i + 1)};
    ASSERT_TRUE(Gather(src.View(), kCs, blocks, kCs,
                       table()->data(static_cast<uint64_t>(st->offsets[i])), st->object_bytes)
                    .ok());
  }
  auto published = engine_->CommitStore(1, st->handle);
  ASSERT_TRUE(published.ok()) << published.status().ToString();
  EXPECT_EQ(*published, 30u);
  ASSERT_TRUE(storage_->store()->WaitIdle(kWait));

  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 30u);
  for (uint64_t i = 0; i < 60; ++i) {
    const Status s = Retrieve(3, TokenKey(tokens, "r", i * kCs, (i + 1) * kCs));
    if (i < 30) {
      EXPECT_TRUE(s.ok()) << "chunk " << i << ": " << s.ToString();
    } else {
      EXPECT_EQ(s.code(), StatusCode::kKeyAbsent) << "chunk " << i << ": " << s.ToString();
    }
  }
  const auto keys = ExpectedKeys(tokens, 30);
  for (const ObjectKey& k : keys) EXPECT_EQ(Readers(k), 0u) << "each commit returned its lease";
  EXPECT_EQ(engine_->stats().retrieve_failures, 30u);
  EXPECT_EQ(Retrieve(3, TokenKey(tokens, "r", 0, kCs)).code(), StatusCode::kKeyAbsent)
      << "a returned lease cannot be retrieved on again";

  // Again, scattering into different blocks of another engine: chunk i -> {62 - 2i, 63 - 2i}.
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 30u);
  for (uint64_t i = 0; i < 30; ++i) {
    auto rt = engine_->PrepareRetrieve(3, TokenKey(tokens, "r", i * kCs, (i + 1) * kCs));
    ASSERT_TRUE(rt.ok()) << "chunk " << i << ": " << rt.status().ToString();
    ASSERT_EQ(rt->offsets.size(), 1u);
    EXPECT_EQ(rt->first_chunk, i);
    const std::vector<int32_t> blocks = {static_cast<int32_t>(62 - 2 * i),
                                         static_cast<int32_t>(63 - 2 * i)};
    ASSERT_TRUE(Scatter(dst.View(), kCs, table()->data(static_cast<uint64_t>(rt->offsets[0])),
                        rt->object_bytes, blocks, kCs, 0)
                    .ok());
    ASSERT_TRUE(engine_->CommitRetrieve(3, rt->handle).ok());
  }
  const uint64_t plane_bytes = layout.BlockPlaneBytes();
  for (uint32_t l = 0; l < layout.num_layers; ++l) {
    for (uint32_t p = 0; p < layout.num_planes(); ++p) {
      for (uint64_t i = 0; i < 30; ++i) {
        for (uint64_t j = 0; j < 2; ++j) {
          EXPECT_EQ(std::memcmp(src.BlockPlane(l, p, 2 * i + j),
                                dst.BlockPlane(l, p, 62 - 2 * i + j), plane_bytes),
                    0)
              << "layer " << l << (p == 0 ? " K" : " V") << " chunk " << i << " block " << j;
        }
      }
      for (uint64_t b = 0; b < 4; ++b) {
        const uint8_t* untouched = dst.BlockPlane(l, p, b);
        EXPECT_EQ(std::count(untouched, untouched + plane_bytes, 0),
                  static_cast<ptrdiff_t>(plane_bytes))
            << "blocks outside the retrieve stay untouched";
      }
    }
  }
}

TEST_F(CacheEngineTest, RetrieveOfARequestThatLookedNothingUpIsKeyAbsent) {
  auto tokens = Tokens(2 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 2));
  EXPECT_EQ(Retrieve(3, TokenKey(tokens, "never-looked-up", 0, 2 * kCs)).code(),
            StatusCode::kKeyAbsent);
  EXPECT_EQ(engine_->stats().requests, 0u) << "a retrieve does not create requests";
  // Leases of another request do not count.
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "other")).hit_chunks, 2u);
  EXPECT_EQ(Retrieve(3, TokenKey(tokens, "mine", 0, 2 * kCs)).code(), StatusCode::kKeyAbsent);
}

// ---- freeing lookup locks ------------------------------------------------------------------

TEST_F(CacheEngineTest, FreeLookupLocksReleasesOnlyTheRequestsLeasesOnWholeChunks) {
  auto tokens = Tokens(8 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 8));
  const auto keys = ExpectedKeys(tokens, 8);
  // Request a holds two leases per object (a two-phase and a sync lookup), b holds one.
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "a")).hit_chunks, 8u);
  auto sync = engine_->SyncLookup(2, TokenKey(tokens, "a"), 1, kWait);
  ASSERT_TRUE(sync.ok()) << sync.status().ToString();
  EXPECT_EQ(sync->hit_chunks, 8u);
  EXPECT_EQ(LookupAndWait(3, TokenKey(tokens, "b")).hit_chunks, 8u);
  for (const ObjectKey& k : keys) ASSERT_EQ(Readers(k), 3u);

  // [0, 5.5 chunks): chunks 0..4 are whole, chunk 5 is only partly covered.
  auto freed = engine_->FreeLookupLocks(2, TokenKey(tokens, "a", 0, 5 * kCs + kCs / 2), 1);
  ASSERT_TRUE(freed.ok()) << freed.status().ToString();
  EXPECT_EQ(*freed, 10u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(Readers(keys[i]), i < 5 ? 1u : 3u) << "chunk " << i;

  // An empty range releases nothing.
  auto none = engine_->FreeLookupLocks(2, TokenKey(tokens, "a", 6 * kCs, 6 * kCs), 1);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, 0u);
  // A range starting inside chunk 5 skips it: only chunks 6 and 7 are whole.
  auto tail = engine_->FreeLookupLocks(2, TokenKey(tokens, "a", 5 * kCs + 1, 8 * kCs), 1);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(*tail, 4u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(Readers(keys[i]), i == 5 ? 3u : 1u) << "chunk " << i;
  // Freed chunks are not freed twice, and an unknown request frees nothing.
  auto again = engine_->FreeLookupLocks(2, TokenKey(tokens, "a", 0, 5 * kCs), 1);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0u);
  auto unknown = engine_->FreeLookupLocks(2, TokenKey(tokens, "nobody"), 1);
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(*unknown, 0u);
  EXPECT_EQ(engine_->stats().freed_leases, 14u);

  // b's leases are intact: it can retrieve every chunk.
  EXPECT_TRUE(Retrieve(4, TokenKey(tokens, "b", 0, 8 * kCs)).ok());
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(Readers(keys[i]), i == 5 ? 2u : 0u) << "chunk " << i;
}

TEST_F(CacheEngineTest, FreeLookupLocksJoinsThePendingSyncLoadBeforeReleasing) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(SyncLookupFromL2WithItsLoadHeld(tokens, 4));
  EXPECT_EQ(table()->stats().read_leases, 0u) << "the loaded objects' leases come with the load";

  // The free starts while the load is held; the leases it must release arrive only afterwards.
  std::promise<void> calling;
  auto freed = std::async(std::launch::async, [&] {
    calling.set_value();
    return engine_->FreeLookupLocks(2, TokenKey(tokens, "r"), 1);
  });
  calling.get_future().wait();
  adapter_->SetStalled(false);
  auto n = freed.get();
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 4u);
  ASSERT_TRUE(storage_->prefetch()->WaitIdle(kWait));
  EXPECT_EQ(table()->stats().read_leases, 0u);
  EXPECT_EQ(table()->stats().objects, 0u) << "the temporary objects went with their leases";
}

// ---- MLA -----------------------------------------------------------------------------------

TEST_F(CacheEngineTest, EachMlaWorkerReturnsOneLeaseAndTheLastMakesTheObjectEvictable) {
  const KvCacheLayout mla = MakeLayout(KvLayout::kMLA);
  Register(1, 0, 1, mla);
  auto tokens = Tokens(3 * kCs, 1);
  ASSERT_EQ(Store(1, TokenKey(tokens, "")), 3u);
  const auto keys = ExpectedKeys(tokens, 3, 0, 1, mla);
  EXPECT_EQ(table()->stats().evictable, 3u);

  EngineKey scheduler = TokenKey(tokens, "r");
  scheduler.worker_id = -1;
  EXPECT_EQ(LookupAndWait(10, scheduler, /*tp_size=*/4).hit_chunks, 3u);
  for (const ObjectKey& k : keys) EXPECT_EQ(Readers(k), 4u);
  EXPECT_EQ(table()->stats().evictable, 0u);

  // Four tensor-parallel workers (four connections) retrieve the same objects for the request.
  for (ClientId worker = 11; worker <= 14; ++worker) {
    const Status s = Retrieve(worker, TokenKey(tokens, "r", 0, 3 * kCs));
    ASSERT_TRUE(s.ok()) << "worker " << worker << ": " << s.ToString();
    for (const ObjectKey& k : keys) EXPECT_EQ(Readers(k), 14 - worker);
  }
  const ObjectTableStats s = table()->stats();
  EXPECT_EQ(s.read_leases, 0u);
  EXPECT_EQ(s.evictable, 3u);
  EXPECT_EQ(Retrieve(15, TokenKey(tokens, "r", 0, 3 * kCs)).code(), StatusCode::kKeyAbsent)
      << "a fifth reader has no lease left";

  // Ending a request returns every reader's lease: 3 objects x 4 readers.
  EngineKey other = scheduler;
  other.request_id = "r2";
  EXPECT_EQ(LookupAndWait(10, other, 4).hit_chunks, 3u);
  EXPECT_EQ(*engine_->EndSession(10, kModel, "r2"), 12u);
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

TEST_F(CacheEngineTest, TpSizeMustBeAPositiveMultipleOfTheWorldSize) {
  Register(1, 0, 2);
  Register(2, 1, 2);
  auto tokens = Tokens(2 * kCs, 1);
  const EngineKey k = AllRanksKey(tokens, "r", 2);
  for (uint32_t bad : {0u, 3u, 5u}) {
    EXPECT_EQ(engine_->Lookup(3, k, bad).status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(engine_->SyncLookup(3, k, bad).status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(engine_->SyncLookupInL1(3, k, bad).status().code(), StatusCode::kInvalidArgument)
        << bad;
    EXPECT_EQ(engine_->FreeLookupLocks(3, k, bad).status().code(), StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(engine_->stats().requests, 0u) << "a refused tp_size interns no request";
  for (uint32_t good : {1u, 2u, 4u}) EXPECT_TRUE(engine_->SyncLookup(3, k, good).ok()) << good;
  EXPECT_EQ(engine_->stats().requests, 1u);
}

TEST_F(CacheEngineTest, AStoreAfterEndSessionDoesNotBringTheRequestBack) {
  Register(1);
  auto tokens = Tokens(4 * kCs, 3);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 0u);
  EXPECT_EQ(engine_->stats().requests, 1u);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "r"), 0u);
  EXPECT_EQ(engine_->stats().requests, 0u);
  // The worker's stores of the finished request land after END_SESSION.
  EXPECT_EQ(Store(1, TokenKey(tokens, "r", 0, 2 * kCs)), 2u);
  EXPECT_EQ(Store(1, TokenKey(tokens, "r", 2 * kCs, 4 * kCs)), 2u);
  EXPECT_EQ(engine_->stats().requests, 0u) << "no request (or hashing session) came back";
  EXPECT_EQ(engine_->stats().sessions, 0u);
  // What they stored is found by the next request with the same prompt.
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "next")).hit_chunks, 4u);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "next"), 4u);
}

TEST_F(CacheEngineTest, AQueryAfterTheEngineReapedItsLookupIsNotFoundNotAMiscount) {
  EngineConfig c;
  c.lookup_ttl = seconds(10);
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1, 0, 2);
  Register(1, 1, 2);
  auto tokens = Tokens(2 * kCs, 4);
  EngineKey all_ranks = AllRanksKey(tokens, "", 2);
  for (int32_t rank : {0, 1}) {
    EngineKey k = all_ranks;
    k.worker_id = rank;
    ASSERT_EQ(Store(1, k), 2u);
  }
  all_ranks.request_id = "r";
  auto h = engine_->Lookup(2, all_ranks, 2);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE(storage_->prefetch()->WaitIdle(kWait));
  clock_->Advance(seconds(11));
  EXPECT_GE(engine_->ReapExpired(), 1u);
  // The prefetch job still holds the result (4 keys: 2 chunks x 2 ranks); without the lookup's
  // rank count the engine cannot turn it into chunks, so the handle is reported expired.
  auto q = engine_->QueryPrefetch(2, *h);
  EXPECT_EQ(q.status().code(), StatusCode::kNotFound) << q.status().ToString();
  EXPECT_EQ(*engine_->EndSession(2, kModel, "r"), 4u)
      << "4 objects, one reader each: released here";
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

// ---- store ---------------------------------------------------------------------------------

TEST_F(CacheEngineTest, StoringObjectsThatArePresentSkipsThem) {
  auto tokens = Tokens(10 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 5 * kCs), 5));

  auto again = engine_->PrepareStore(1, TokenKey(tokens, "", 0, 5 * kCs));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->offsets, std::vector<int64_t>(5, -1));
  EXPECT_EQ(table()->stats().write_leases, 0u);
  auto none = engine_->CommitStore(1, again->handle);
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  EXPECT_EQ(*none, 0u);

  auto wider = engine_->PrepareStore(1, TokenKey(tokens, "", 0, 10 * kCs));
  ASSERT_TRUE(wider.ok()) << wider.status().ToString();
  ASSERT_EQ(wider->offsets.size(), 10u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(wider->offsets[i] < 0, i < 5) << "chunk " << i;
  for (size_t i = 5; i < 10; ++i) {
    FillObject(table()->data(static_cast<uint64_t>(wider->offsets[i])), wider->object_bytes, i);
  }
  auto five = engine_->CommitStore(1, wider->handle);
  ASSERT_TRUE(five.ok()) << five.status().ToString();
  EXPECT_EQ(*five, 5u);
  EXPECT_EQ(engine_->stats().store_skipped, 10u);
  EXPECT_EQ(engine_->stats().store_chunks, 10u);
  EXPECT_EQ(engine_->stats().transfers, 0u);
}

TEST_F(CacheEngineTest, AnAbortedStoreLeavesNothingBehind) {
  Register(1);
  auto tokens = Tokens(4 * kCs, 1);
  auto t = engine_->PrepareStore(1, TokenKey(tokens, ""));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->first_chunk, 0u);
  EXPECT_EQ(t->offsets.size(), 4u);
  EXPECT_EQ(table()->stats().writing, 4u);
  EXPECT_EQ(table()->stats().write_leases, 4u);
  EXPECT_EQ(engine_->stats().transfers, 1u);

  auto aborted = engine_->CommitStore(1, t->handle, /*success=*/false);
  ASSERT_TRUE(aborted.ok()) << aborted.status().ToString();
  EXPECT_EQ(*aborted, 0u);
  const ObjectTableStats s = table()->stats();
  EXPECT_EQ(s.objects, 0u);
  EXPECT_EQ(s.write_leases, 0u);
  EXPECT_EQ(s.requests, 0u);
  for (const ObjectKey& k : ExpectedKeys(tokens, 4)) EXPECT_FALSE(table()->Info(k).has_value());
  EXPECT_EQ(engine_->stats().store_aborts, 1u);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  EXPECT_EQ(engine_->CommitStore(1, t->handle).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 0u);
}

TEST_F(CacheEngineTest, TicketsAreBoundToTheirClientAndTheirKind) {
  Register(1);
  auto tokens = Tokens(2 * kCs, 1);
  EXPECT_EQ(engine_->CommitStore(1, JobHandle::Random()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->CommitRetrieve(1, JobHandle::Random()).code(), StatusCode::kNotFound);

  auto store = engine_->PrepareStore(1, TokenKey(tokens, ""));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  for (int64_t off : store->offsets) {
    FillObject(table()->data(static_cast<uint64_t>(off)), store->object_bytes, 1);
  }
  EXPECT_EQ(engine_->CommitStore(2, store->handle).status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->CommitRetrieve(1, store->handle).code(), StatusCode::kInvalidArgument);
  auto published = engine_->CommitStore(1, store->handle);
  ASSERT_TRUE(published.ok()) << "the owner still commits: " << published.status().ToString();
  EXPECT_EQ(*published, 2u);

  EXPECT_EQ(LookupAndWait(3, TokenKey(tokens, "r")).hit_chunks, 2u);
  auto retrieve = engine_->PrepareRetrieve(4, TokenKey(tokens, "r"));
  ASSERT_TRUE(retrieve.ok()) << retrieve.status().ToString();
  EXPECT_EQ(engine_->CommitRetrieve(5, retrieve->handle).code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->CommitStore(4, retrieve->handle).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine_->CommitRetrieve(4, retrieve->handle).ok());
  EXPECT_EQ(engine_->CommitRetrieve(4, retrieve->handle).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->stats().transfers, 0u);
}

// ---- L2: synchronous and two-phase lookups ------------------------------------------------

TEST_F(CacheEngineTest, SyncLookupAnswersWithinItsDeadlineWhenL2Stalls) {
  Register(1);
  auto tokens = Tokens(6 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(StoreInL2Only(tokens, 6));
  adapter_->SetStalled(true);

  const Duration deadline = milliseconds(200);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, deadline);
  const auto elapsed = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LT(elapsed, deadline + seconds(10));
  EXPECT_EQ(r->hit_chunks, 0u);
  EXPECT_EQ(r->l2_chunks, 0u);
  EXPECT_EQ(storage_->prefetch()->stats().l2_lookup_timeouts, 1u);
  // The timed-out lookup has nothing to load: a retrieve is refused at once, not after a wait.
  EXPECT_EQ(Retrieve(3, TokenKey(tokens, "r", 0, kCs)).code(), StatusCode::kKeyAbsent);

  adapter_->SetStalled(false);
  ASSERT_TRUE(storage_->prefetch()->WaitIdle(kWait));
  EXPECT_EQ(adapter_->TotalPins(), 0u) << "late pins are dropped";
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

TEST_F(CacheEngineTest, SyncLookupInL1AnswersKeysL1HoldsWhollyAndLeavesOthersUntouched) {
  auto tokens = Tokens(6 * kCs, 7);
  ASSERT_NO_FATAL_FAILURE(
      RegisterAndStore(TokenKey(tokens, "", 0, 4 * kCs), 4));  // chunks 0-3 in L1 (and L2)
  adapter_->SetStalled(true);                                  // nothing below may touch L2

  // Every chunk in L1: SyncLookup's answer and leases, without waiting.
  auto whole = engine_->SyncLookupInL1(2, TokenKey(tokens, "a", 0, 4 * kCs), 2);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  ASSERT_TRUE(whole->has_value());
  EXPECT_EQ((*whole)->hit_chunks, 4u);
  EXPECT_EQ((*whole)->l1_chunks, 4u);
  EXPECT_EQ((*whole)->l2_chunks, 0u);
  EXPECT_EQ((*whole)->hit_tokens, 4u * kCs);
  EXPECT_EQ(table()->stats().read_leases, 8u) << "tp_size 2: two leases per object";
  const EngineStats after_hit = engine_->stats();
  EXPECT_EQ(after_hit.sync_lookups, 1u);

  // A key reaching past L1 would have to ask L2: nullopt, nothing leased, nothing counted.
  auto partial = engine_->SyncLookupInL1(3, TokenKey(tokens, "b"), 1);
  ASSERT_TRUE(partial.ok()) << partial.status().ToString();
  EXPECT_FALSE(partial->has_value());
  EXPECT_EQ(table()->stats().read_leases, 8u);
  EXPECT_EQ(engine_->stats().sync_lookups, 1u);
  EXPECT_EQ(adapter_->TotalPins(), 0u);

  // The request's workers retrieve what the in-L1 lookup leased, one lease each.
  EXPECT_TRUE(Retrieve(2, TokenKey(tokens, "a", 0, 4 * kCs)).ok());
  EXPECT_TRUE(Retrieve(2, TokenKey(tokens, "a", 0, 4 * kCs)).ok());
  EXPECT_EQ(table()->stats().read_leases, 0u);

  // Errors are SyncLookup's.
  EXPECT_EQ(engine_->SyncLookupInL1(2, TokenKey(tokens, "c"), 0).status().code(),
            StatusCode::kInvalidArgument);
  EngineKey unknown = TokenKey(tokens, "c");
  unknown.model_name = "no-such-model";
  EXPECT_EQ(engine_->SyncLookupInL1(2, unknown, 1).status().code(), StatusCode::kNotFound);

  // With L2 answering, the full SyncLookup of the longer key finds L1's 4 and L2's 2.
  adapter_->SetStalled(false);
  auto full = engine_->SyncLookup(3, TokenKey(tokens, "b"), 1, kWait);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  EXPECT_EQ(full->l1_chunks, 4u);
  EXPECT_EQ(full->hit_chunks, 4u) << "chunks 4-5 were never stored";
  EXPECT_EQ(*engine_->EndSession(3, kModel, "b"), 4u);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "a"), 0u);
}

TEST_F(CacheEngineTest, RetrievesOfASyncLookupJoinItsSingleL2Load) {
  Register(1);
  auto tokens = Tokens(6 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(StoreInL2Only(tokens, 6));
  const uint64_t loads_before = adapter_->stats().loads;
  adapter_->InjectFault(L2Op::kLoad, 1, Fault{Fault::Kind::kDelay, milliseconds(300)});

  // tp_size 4 on a single-rank namespace: every object is read by four workers.
  auto r = engine_->SyncLookup(10, TokenKey(tokens, "r"), 4, kWait);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->hit_chunks, 6u);
  EXPECT_EQ(r->l1_chunks, 0u);
  EXPECT_EQ(r->l2_chunks, 6u);

  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::vector<Status> results(4);
  std::vector<std::thread> workers;
  for (size_t i = 0; i < 4; ++i) {
    workers.emplace_back([&, i] {
      start.wait();
      results[i] = Retrieve(11 + i, TokenKey(tokens, "r", 0, 6 * kCs));
    });
  }
  go.set_value();
  for (auto& w : workers) w.join();
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(results[i].ok()) << i << ": " << results[i].ToString();
  EXPECT_EQ(adapter_->stats().loads - loads_before, 6u) << "one load per object, not per worker";
  const ObjectTableStats s = table()->stats();
  EXPECT_EQ(s.read_leases, 0u);
  EXPECT_EQ(s.objects, 0u) << "loaded objects are temporary and go with their last lease";
}

TEST_F(CacheEngineTest, TwoPhaseLookupNeverWaitsForAStalledL2) {
  Register(1);
  auto tokens = Tokens(5 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(StoreInL2Only(tokens, 5));
  adapter_->SetStalled(true);

  auto submitted =
      std::async(std::launch::async, [&] { return engine_->Lookup(2, TokenKey(tokens, "r"), 1); });
  if (submitted.wait_for(kWait) != std::future_status::ready) {
    adapter_->SetStalled(false);
    FAIL() << "Lookup waited for the stalled adapter";
  }
  auto h = submitted.get();
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_TRUE(adapter_->WaitForBlockedOperations(1, kWait));
  for (int i = 0; i < 2; ++i) {
    auto q = engine_->QueryPrefetch(2, *h);
    ASSERT_TRUE(q.ok()) << q.status().ToString();
    EXPECT_FALSE(q->has_value()) << "not ready while the adapter is stalled";
  }

  adapter_->SetStalled(false);
  auto r = engine_->WaitPrefetch(2, *h, kWait);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->hit_chunks, 5u);
  EXPECT_EQ((*r)->l1_chunks, 0u);
  EXPECT_EQ((*r)->l2_chunks, 5u);
  EXPECT_EQ(engine_->stats().l2_hit_chunks, 5u);
}

TEST_F(CacheEngineTest, ARetrieveWhoseLoadOutlastsItsDeadlineTimesOut) {
  auto tokens = Tokens(2 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(SyncLookupFromL2WithItsLoadHeld(tokens, 2));
  EXPECT_EQ(engine_->PrepareRetrieve(3, TokenKey(tokens, "r"), milliseconds(20)).status().code(),
            StatusCode::kTimeout);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  adapter_->SetStalled(false);
  EXPECT_TRUE(Retrieve(3, TokenKey(tokens, "r")).ok()) << "the default deadline outlasts the load";
}

// ---- sessions and clients ------------------------------------------------------------------

TEST_F(CacheEngineTest, EndSessionLeavesNothingBehind) {
  Register(1);
  auto tokens = Tokens(8 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(StoreInL2Only(tokens, 8));
  ASSERT_EQ(Store(1, TokenKey(tokens, "", 0, 4 * kCs)), 4u);  // chunks 0..3 back in L1

  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r", 0, 4 * kCs)).hit_chunks, 4u);
  auto ticket = engine_->PrepareRetrieve(3, TokenKey(tokens, "r", 0, kCs));
  ASSERT_TRUE(ticket.ok()) << ticket.status().ToString();

  // A sync lookup whose L2 load (chunks 4..7) is held in the adapter.
  adapter_->InjectFault(L2Op::kLoad, 1, Fault{Fault::Kind::kStall, {}});
  auto sync = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait);
  ASSERT_TRUE(sync.ok()) << sync.status().ToString();
  EXPECT_EQ(sync->hit_chunks, 8u);
  EXPECT_EQ(sync->l1_chunks, 4u);
  ASSERT_TRUE(adapter_->WaitForBlockedOperations(1, kWait));
  EXPECT_EQ(table()->stats().read_leases, 8u);
  EXPECT_EQ(table()->stats().temporary, 4u);

  EXPECT_EQ(engine_->stats().sessions, 1u);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "r"), 8u) << "the leases released, not objects";
  EXPECT_EQ(engine_->stats().requests, 0u);
  EXPECT_EQ(engine_->stats().sessions, 0u) << "the hashing session went with the request";
  EXPECT_EQ(engine_->stats().ended_sessions, 1u);
  EXPECT_EQ(storage_->prefetch()->stats().jobs, 0u) << "the pending sync load is gone";
  EXPECT_EQ(table()->stats().read_leases, 0u);
  EXPECT_EQ(engine_->CommitRetrieve(3, ticket->handle).code(), StatusCode::kLeaseNotHeld);
  // No load is left to join: the retrieve is refused at once, not after its deadline.
  EXPECT_EQ(engine_->PrepareRetrieve(3, TokenKey(tokens, "r", 0, kCs), kWait).status().code(),
            StatusCode::kKeyAbsent);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "r"), 0u);

  adapter_->SetStalled(false);  // releases the held load, whose objects are then discarded
  ASSERT_TRUE(storage_->prefetch()->WaitIdle(kWait));
  ExpectNoLeasesRequestsOrPins();
  EXPECT_EQ(table()->stats().objects, 4u);
}

TEST_F(CacheEngineTest, EndClientAbortsItsStoresAndDropsItsTicketsRegistrationsAndLeases) {
  const Registration gone = Register(5);
  Register(6);
  auto stored = Tokens(4 * kCs, 1);
  ASSERT_EQ(Store(6, TokenKey(stored, "")), 4u);

  EXPECT_EQ(LookupAndWait(5, TokenKey(stored, "r5")).hit_chunks, 4u);
  EXPECT_EQ(LookupAndWait(6, TokenKey(stored, "r6")).hit_chunks, 4u);
  auto retrieve = engine_->PrepareRetrieve(5, TokenKey(stored, "r5", 0, kCs));
  ASSERT_TRUE(retrieve.ok()) << retrieve.status().ToString();
  auto fresh = Tokens(3 * kCs, 2);
  auto store = engine_->PrepareStore(5, TokenKey(fresh, ""));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto pending = engine_->Lookup(5, TokenKey(stored, "r5"), 1);  // never collected
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(table()->stats().write_leases, 3u);
  EXPECT_EQ(engine_->stats().transfers, 2u);

  EXPECT_EQ(engine_->EndClient(5), 8u) << "r5's read leases (the store was aborted first)";
  const ObjectTableStats s = table()->stats();
  EXPECT_EQ(s.write_leases, 0u);
  EXPECT_EQ(s.writing, 0u);
  EXPECT_EQ(s.read_leases, 4u) << "client 6's request keeps its leases";
  for (const ObjectKey& k : ExpectedKeys(fresh, 3)) EXPECT_FALSE(table()->Info(k).has_value());
  const EngineStats e = engine_->stats();
  EXPECT_EQ(e.registrations, 1u);
  EXPECT_EQ(e.transfers, 0u);
  EXPECT_EQ(e.pending_lookups, 0u);
  EXPECT_EQ(e.ended_clients, 1u);
  EXPECT_EQ(engine_->UnregisterKvCache(5, gone.id).code(), StatusCode::kNotFound);
  // The dropped store's extents stay fenced until its writer commits (late) or its process exits.
  EXPECT_EQ(table()->stats().quarantined, 3u);
  EXPECT_EQ(engine_->stats().fenced_stores, 1u);
  EXPECT_EQ(engine_->CommitStore(5, store->handle).status().code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table()->stats().quarantined, 0u);
  EXPECT_EQ(engine_->stats().fenced_stores, 0u);
  EXPECT_EQ(engine_->CommitStore(5, store->handle).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->CommitRetrieve(5, retrieve->handle).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->QueryPrefetch(5, *pending).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(Retrieve(6, TokenKey(stored, "r6", 0, 4 * kCs)).ok());

  // The aborted objects can be stored again, by anyone.
  EXPECT_EQ(Store(6, TokenKey(fresh, "")), 3u);
}

// ---- TTLs ----------------------------------------------------------------------------------

TEST_F(CacheEngineTest, AnUncommittedStoreTicketIsReapedAfterTheTransferTtl) {
  EngineConfig c;
  c.transfer_ttl = seconds(10);
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  auto tokens = Tokens(3 * kCs, 1);
  auto t = engine_->PrepareStore(1, TokenKey(tokens, ""));
  ASSERT_TRUE(t.ok()) << t.status().ToString();

  clock_->Advance(seconds(9));
  engine_->ReapExpired();
  EXPECT_EQ(table()->stats().writing, 3u);
  EXPECT_EQ(engine_->stats().reaped_transfers, 0u);

  clock_->Advance(seconds(2));
  EXPECT_GE(engine_->ReapExpired(), 1u);
  const ObjectTableStats s = table()->stats();
  EXPECT_EQ(s.writing, 0u);
  EXPECT_EQ(s.write_leases, 0u);
  for (const ObjectKey& k : ExpectedKeys(tokens, 3)) EXPECT_FALSE(table()->Info(k).has_value());
  EXPECT_EQ(engine_->stats().reaped_transfers, 1u);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  EXPECT_EQ(s.quarantined, 3u) << "the late writer's extents are not reused";
  EXPECT_EQ(engine_->CommitStore(1, t->handle).status().code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table()->stats().quarantined, 0u);
  EXPECT_EQ(table()->stats().used_bytes, 0u);
  EXPECT_EQ(engine_->stats().store_expired, 1u);
}

TEST_F(CacheEngineTest, AnIdleRequestIsEndedAfterTheRequestTtl) {
  EngineConfig c;
  c.request_ttl = seconds(60);
  ASSERT_NO_FATAL_FAILURE(Build(c));
  auto tokens = Tokens(3 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 3));
  const auto keys = ExpectedKeys(tokens, 3);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "idle")).hit_chunks, 3u);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "busy")).hit_chunks, 3u);

  clock_->Advance(seconds(40));
  auto touch = engine_->FreeLookupLocks(2, TokenKey(tokens, "busy", 0, 0), 1);  // frees nothing
  ASSERT_TRUE(touch.ok());
  EXPECT_EQ(*touch, 0u);
  clock_->Advance(seconds(30));
  EXPECT_GE(engine_->ReapExpired(), 1u);
  EXPECT_EQ(engine_->stats().reaped_requests, 1u);
  EXPECT_EQ(engine_->stats().requests, 1u);
  for (const ObjectKey& k : keys) EXPECT_EQ(Readers(k), 1u) << "only busy's lease is left";
  EXPECT_EQ(Retrieve(3, TokenKey(tokens, "idle", 0, 3 * kCs)).code(), StatusCode::kKeyAbsent);

  clock_->Advance(seconds(61));
  engine_->ReapExpired();
  EXPECT_EQ(engine_->stats().reaped_requests, 2u);
  EXPECT_EQ(engine_->stats().requests, 0u);
  EXPECT_EQ(table()->stats().read_leases, 0u);
  EXPECT_EQ(table()->stats().requests, 0u);
}

TEST_F(CacheEngineTest, TheReaperThreadReapsAndStartAndStopAreIdempotent) {
  EngineConfig c;
  c.transfer_ttl = seconds(10);
  c.reap_interval = milliseconds(1);
  ASSERT_NO_FATAL_FAILURE(Build(c));
  auto aborts = std::make_shared<AbortCounter>();
  table()->AddListener(aborts);
  Register(1);
  auto tokens = Tokens(2 * kCs, 1);
  auto t = engine_->PrepareStore(1, TokenKey(tokens, ""));
  ASSERT_TRUE(t.ok()) << t.status().ToString();

  engine_->Start();
  engine_->Start();
  clock_->Advance(seconds(11));
  EXPECT_TRUE(aborts->WaitFor(2, kWait)) << "the reaper aborted the expired reservation";
  engine_->Stop();
  engine_->Stop();
  EXPECT_EQ(engine_->stats().reaped_transfers, 1u);
  EXPECT_EQ(table()->stats().write_leases, 0u);
  engine_->Start();  // restartable; the destructor stops it
  table()->RemoveListener(aborts.get());
}

// ---- forced clear ------------------------------------------------------------------------

// After a forced Clear the request's lease stays on the detached generation of the object while
// the index may hold a newer, unleased one: PrepareRetrieve must hand out the offset of the
// generation the request leases (or refuse), never the unleased one.
TEST_F(CacheEngineTest, RetrieveAfterAForcedClearNeverHandsOutAnUnleasedGeneration) {
  auto tokens = Tokens(kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 1));
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 1u);
  const ObjectKey key = ExpectedKeys(tokens, 1)[0];
  const auto leased = table()->Info(key);
  ASSERT_TRUE(leased.has_value());
  EXPECT_EQ(engine_->Clear(/*force=*/true), 1u);
  ASSERT_EQ(Store(1, TokenKey(tokens, "")), 1u);  // a new, unleased generation
  const auto fresh = table()->Info(key);
  ASSERT_TRUE(fresh.has_value());
  ASSERT_NE(fresh->offset, leased->offset);

  auto t = engine_->PrepareRetrieve(3, TokenKey(tokens, "r"));
  if (t.ok()) {
    ASSERT_EQ(t->offsets.size(), 1u);
    EXPECT_EQ(static_cast<uint64_t>(t->offsets[0]), leased->offset)
        << "the offset handed out belongs to a generation the request does not lease";
  } else {
    EXPECT_EQ(t.status().code(), StatusCode::kKeyAbsent) << t.status().ToString();
  }
}

// ---- ranks and key modes -------------------------------------------------------------------

TEST_F(CacheEngineTest, AnAllRankLookupCountsOnlyChunksPresentForEveryRank) {
  Register(1, 0, 2);
  Register(2, 1, 2);
  auto tokens = Tokens(6 * kCs, 1);
  EngineKey rank0 = TokenKey(tokens, "", 0, 6 * kCs);
  rank0.world_size = 2;
  EngineKey rank1 = TokenKey(tokens, "", 0, 4 * kCs);
  rank1.world_size = 2;
  rank1.worker_id = 1;
  ASSERT_EQ(Store(1, rank0), 6u);
  ASSERT_EQ(Store(2, rank1), 4u);

  EngineKey all = TokenKey(tokens, "r");
  all.world_size = 2;
  all.worker_id = -1;
  const LookupResult r = LookupAndWait(3, all, 2);
  EXPECT_EQ(r.hit_chunks, 4u);
  EXPECT_EQ(r.hit_tokens, 4u * kCs);

  EngineKey only0 = TokenKey(tokens, "r0");
  only0.world_size = 2;
  EXPECT_EQ(LookupAndWait(3, only0, 2).hit_chunks, 6u);
  EngineKey only1 = only0;
  only1.request_id = "r1";
  only1.worker_id = 1;
  EXPECT_EQ(LookupAndWait(3, only1, 2).hit_chunks, 4u);

  // Each worker retrieves its own rank of the hit range.
  EngineKey w0 = TokenKey(tokens, "r", 0, 4 * kCs);
  w0.world_size = 2;
  EngineKey w1 = w0;
  w1.worker_id = 1;
  EXPECT_TRUE(Retrieve(1, w0).ok());
  EXPECT_TRUE(Retrieve(2, w1).ok());
}

TEST_F(CacheEngineTest, HashModeKeysHitHashModeObjectsOnly) {
  Register(1);
  auto hashes = BlockHashes(20, 1);  // 20 blocks of 16 tokens = 10 chunks
  ASSERT_EQ(Store(1, HashKey(hashes, "")), 10u);
  EXPECT_EQ(LookupAndWait(2, HashKey(hashes, "h")).hit_chunks, 10u);
  EngineKey prefix = HashKey(hashes, "h2");
  prefix.end = 5 * kCs;
  EXPECT_EQ(LookupAndWait(2, prefix).hit_chunks, 5u);

  // The same bytes read as token ids name other objects, and the other way round.
  std::vector<uint32_t> as_tokens(hashes.size() / 4);
  std::memcpy(as_tokens.data(), hashes.data(), hashes.size());
  EXPECT_EQ(LookupAndWait(2, TokenKey(as_tokens, "t")).hit_chunks, 0u);
  auto tokens = Tokens(10 * kCs, 2);
  ASSERT_EQ(Store(1, TokenKey(tokens, "")), 10u);
  std::vector<uint8_t> as_hashes(tokens.size() * 4);
  std::memcpy(as_hashes.data(), tokens.data(), as_hashes.size());
  EXPECT_EQ(LookupAndWait(2, HashKey(as_hashes, "h3")).hit_chunks, 0u);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "t2")).hit_chunks, 10u);
}

TEST_F(CacheEngineTest, ACacheSaltSeparatesTenants) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 4));
  EngineKey tenant_a = TokenKey(tokens, "a");
  tenant_a.cache_salt = "tenant-a";
  EXPECT_EQ(LookupAndWait(2, tenant_a).hit_chunks, 0u);

  EngineKey store_a = TokenKey(tokens, "");
  store_a.cache_salt = "tenant-a";
  EXPECT_EQ(Store(1, store_a), 4u) << "salted objects are new objects";
  EngineKey tenant_a2 = TokenKey(tokens, "a2");
  tenant_a2.cache_salt = "tenant-a";
  EXPECT_EQ(LookupAndWait(2, tenant_a2).hit_chunks, 4u);
  EngineKey tenant_b = TokenKey(tokens, "b");
  tenant_b.cache_salt = "tenant-b";
  EXPECT_EQ(LookupAndWait(2, tenant_b).hit_chunks, 0u);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "plain")).hit_chunks, 4u);

  auto hashes = BlockHashes(8, 3);
  ASSERT_EQ(Store(1, HashKey(hashes, "")), 4u);
  EngineKey salted_hash = HashKey(hashes, "hs");
  salted_hash.cache_salt = "tenant-a";
  EXPECT_EQ(LookupAndWait(2, salted_hash).hit_chunks, 0u);
}

// ---- validation ----------------------------------------------------------------------------

TEST_F(CacheEngineTest, MalformedKeysAreInvalidArguments) {
  Register(1);
  auto tokens = Tokens(4 * kCs, 1);
  auto expect_invalid = [&](const EngineKey& k, const char* what) {
    EXPECT_EQ(engine_->Lookup(2, k, 1).status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(engine_->SyncLookup(2, k, 1).status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(engine_->PrepareStore(2, k).status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(engine_->PrepareRetrieve(2, k).status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(engine_->FreeLookupLocks(2, k, 1).status().code(), StatusCode::kInvalidArgument)
        << what;
  };
  EngineKey ragged = TokenKey(tokens, "r");
  ragged.size = 4 * kCs * 4 - 2;
  expect_invalid(ragged, "token bytes not a multiple of 4");
  EngineKey null_data = TokenKey(tokens, "r");
  null_data.data = nullptr;
  expect_invalid(null_data, "null data");
  EngineKey bad_worker = TokenKey(tokens, "r");
  bad_worker.worker_id = 1;
  expect_invalid(bad_worker, "worker_id >= world_size");
  bad_worker.worker_id = -2;
  expect_invalid(bad_worker, "worker_id < -1");
  EngineKey no_ws = TokenKey(tokens, "r");
  no_ws.world_size = 0;
  expect_invalid(no_ws, "world_size 0");
  EngineKey no_model = TokenKey(tokens, "r");
  no_model.model_name = "";
  expect_invalid(no_model, "empty model name");
  auto hashes = BlockHashes(8, 1);
  EngineKey zero_hash = HashKey(hashes, "r", 0);
  expect_invalid(zero_hash, "block_hash_size 0");
  EngineKey huge_hash = HashKey(hashes, "r", kMaxBlockHashSize + 1);
  expect_invalid(huge_hash, "block_hash_size too large");
  EngineKey ragged_hash = HashKey(hashes, "r", 32);
  ragged_hash.size -= 1;
  expect_invalid(ragged_hash, "block hashes not a multiple of their size");
  EXPECT_EQ(engine_->stats().requests, 0u) << "a malformed key creates no request";

  // Transfers need a chunk-aligned start; lookups and frees need a request id.
  EngineKey unaligned = TokenKey(tokens, "r", kCs / 2);
  EXPECT_EQ(engine_->PrepareStore(2, unaligned).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->PrepareRetrieve(2, unaligned).status().code(), StatusCode::kInvalidArgument);
  EngineKey anonymous = TokenKey(tokens, "");
  EXPECT_EQ(engine_->Lookup(2, anonymous, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->SyncLookup(2, anonymous, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->PrepareRetrieve(2, anonymous).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->FreeLookupLocks(2, anonymous, 1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->PrepareStore(0, TokenKey(tokens, "")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->PrepareRetrieve(0, TokenKey(tokens, "r")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  EXPECT_EQ(table()->stats().write_leases, 0u);
}

TEST_F(CacheEngineTest, KeysCoveringMoreChunksThanTheLimitAreRejected) {
  EngineConfig c;
  c.max_chunks_per_key = 4;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  auto tokens = Tokens(5 * kCs, 1);
  EXPECT_EQ(engine_->Lookup(2, TokenKey(tokens, "r"), 1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->PrepareStore(2, TokenKey(tokens, "")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine_->Lookup(2, TokenKey(tokens, "r", 0, 4 * kCs), 1).ok()) << "end clips";
  EXPECT_TRUE(engine_->Lookup(2, TokenKey(tokens, "r", 0, 5 * kCs - 1), 1).ok())
      << "a partial chunk does not count";
  auto hashes = BlockHashes(10, 1);  // 5 chunks
  EXPECT_EQ(engine_->Lookup(2, HashKey(hashes, "h"), 1).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(CacheEngineTest, EachClientHasABoundedNumberOfOpenTransfers) {
  EngineConfig c;
  c.max_transfers_per_client = 2;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, ""), 4));
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 4u);

  auto first = engine_->PrepareStore(1, TokenKey(Tokens(kCs, 2), ""));
  ASSERT_TRUE(first.ok());
  auto second = engine_->PrepareRetrieve(1, TokenKey(tokens, "r", 0, kCs));
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(engine_->PrepareStore(1, TokenKey(Tokens(kCs, 3), "")).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(engine_->PrepareRetrieve(1, TokenKey(tokens, "r", kCs, 2 * kCs)).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(table()->stats().write_leases, 1u) << "a refused store reserves nothing";
  EXPECT_TRUE(engine_->PrepareRetrieve(4, TokenKey(tokens, "r", kCs, 2 * kCs)).ok())
      << "other clients are not limited";

  ASSERT_TRUE(engine_->CommitRetrieve(1, second->handle).ok());
  EXPECT_TRUE(engine_->PrepareRetrieve(1, TokenKey(tokens, "r", kCs, 2 * kCs)).ok());
  auto aborted = engine_->CommitStore(1, first->handle, false);
  ASSERT_TRUE(aborted.ok());
  EXPECT_TRUE(engine_->PrepareStore(1, TokenKey(Tokens(kCs, 3), "")).ok());
}

TEST_F(CacheEngineTest, EachClientHasABoundedNumberOfRegistrations) {
  EngineConfig c;
  c.max_registrations_per_client = 2;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  const Registration a = Register(1, 0, 2);
  Register(1, 1, 2);
  EXPECT_EQ(engine_->RegisterKvCache(1, kModel, 1, 0, MakeLayout()).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_TRUE(engine_->RegisterKvCache(2, kModel, 1, 0, MakeLayout()).ok())
      << "other clients are not limited";
  ASSERT_TRUE(engine_->UnregisterKvCache(1, a.id).ok());
  EXPECT_TRUE(engine_->RegisterKvCache(1, kModel, 1, 0, MakeLayout()).ok());
}

TEST_F(CacheEngineTest, TheNumberOfOpenRequestsIsBounded) {
  EngineConfig c;
  c.max_requests = 2;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  auto tokens = Tokens(kCs, 1);
  EXPECT_EQ(OpenTwoRequestsThenAThird(2, tokens).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(engine_->Lookup(2, TokenKey(tokens, "a"), 1).ok()) << "known requests still work";
  (void)engine_->EndSession(2, kModel, "b");
  EXPECT_TRUE(engine_->Lookup(2, TokenKey(tokens, "c"), 1).ok());
  EXPECT_EQ(engine_->stats().requests, 2u);
}

TEST_F(CacheEngineTest, OneClientCannotTakeEveryOpenRequest) {
  EngineConfig c;
  c.max_requests_per_client = 2;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  auto tokens = Tokens(kCs, 1);
  const Status refused = OpenTwoRequestsThenAThird(2, tokens);
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("--max-requests-per-client"), std::string::npos);
  EXPECT_TRUE(engine_->Lookup(3, TokenKey(tokens, "c"), 1).ok()) << "another client's are its own";
  auto usage = engine_->ClientUsages();
  ASSERT_EQ(usage.size(), 3u);  // client 1 (its registration), 2 and 3
  EXPECT_EQ(usage[1].client, 2u);
  EXPECT_EQ(usage[1].requests, 2u);
  EXPECT_EQ(usage[1].jobs, 2u) << "the uncollected lookup and the sync lookup's job";
  EXPECT_EQ(usage[1].sessions, 2u);
  EXPECT_GT(usage[1].session_bytes, 0u);
  EXPECT_EQ(usage[2].requests, 1u);
  // Ended requests are given back.
  ASSERT_TRUE(engine_->EndSession(2, kModel, "a").ok());
  EXPECT_TRUE(engine_->Lookup(2, TokenKey(tokens, "d"), 1).ok());
}

TEST_F(CacheEngineTest, OneClientCannotReserveMoreArenaThanItsQuota) {
  EngineConfig c;
  c.max_reserved_bytes_per_client = 3 * kObjBytes;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  Register(5);
  auto first = engine_->PrepareStore(1, TokenKey(Tokens(2 * kCs, 1), ""));
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  // Two more objects would make four: refused before anything is reserved.
  auto second = engine_->PrepareStore(1, TokenKey(Tokens(2 * kCs, 2), ""));
  EXPECT_EQ(second.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(table()->stats().write_leases, 2u);
  EXPECT_EQ(engine_->ClientUsages()[0].reserved_bytes, 2 * kObjBytes);
  // Another client has its own quota.
  EXPECT_TRUE(engine_->PrepareStore(5, TokenKey(Tokens(2 * kCs, 3), "")).ok());
  // Committing gives the bytes back; a store of objects already present reserves nothing.
  ASSERT_TRUE(engine_->CommitStore(1, first->handle).ok());
  auto third = engine_->PrepareStore(1, TokenKey(Tokens(2 * kCs, 2), ""));
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  auto again = engine_->PrepareStore(1, TokenKey(Tokens(2 * kCs, 1), ""));
  ASSERT_TRUE(again.ok()) << "present objects are skipped and not charged";
  for (const ClientUsage& u : engine_->ClientUsages()) {
    if (u.client == 1) {
      EXPECT_EQ(u.reserved_bytes, 2 * kObjBytes);
    }
  }
  ASSERT_TRUE(engine_->CommitStore(1, third->handle, false).ok());
  ASSERT_TRUE(engine_->CommitStore(1, again->handle).ok());
  for (const ClientUsage& u : engine_->ClientUsages()) {
    if (u.client == 1) {
      EXPECT_EQ(u.reserved_bytes, 0u);
    }
  }
}

TEST_F(CacheEngineTest, ANamespaceGoesWithItsLastRegistration) {
  const uint64_t reg = Register(1).id;
  EXPECT_EQ(engine_->stats().namespaces, 1u);
  auto tokens = Tokens(2 * kCs, 1);
  ASSERT_EQ(Store(1, TokenKey(tokens, "")), 2u);
  ASSERT_TRUE(engine_->UnregisterKvCache(1, reg).ok());
  EXPECT_EQ(engine_->stats().namespaces, 0u);
  EXPECT_EQ(engine_->Lookup(2, TokenKey(tokens, "r"), 1).status().code(), StatusCode::kNotFound);
  // Registered again, the same model finds what was stored (objects outlive namespaces).
  Register(3);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, 2u);
  engine_->EndClient(3);
  EXPECT_EQ(engine_->stats().namespaces, 0u);
}

TEST_F(CacheEngineTest, AStoreIntoAnL1FullOfLeasedObjectsIsOutOfMemoryAndReservesNothing) {
  EngineConfig c;
  c.max_transfers_per_client = 1;
  c.max_reserved_bytes_per_client = uint64_t{1} << 40;  // the arena is the only bound here
  ObjectTableOptions no_background_eviction;
  no_background_eviction.high_watermark = 1.0;
  no_background_eviction.low_watermark = 1.0;
  ASSERT_NO_FATAL_FAILURE(Build(c, /*objects=*/6, no_background_eviction));
  Register(1);
  const uint64_t fit = table()->stats().capacity_bytes / kObjBytes;  // objects the arena holds
  ASSERT_GE(fit, 2u);
  auto tokens = Tokens(fit * kCs, 1);
  ASSERT_EQ(Store(1, TokenKey(tokens, "")), fit);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "r")).hit_chunks, fit);  // nothing is evictable
  EXPECT_EQ(engine_->PrepareStore(1, TokenKey(Tokens(kCs, 2), "")).status().code(),
            StatusCode::kOutOfMemory);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  EXPECT_EQ(table()->stats().write_leases, 0u);
  ASSERT_TRUE(engine_->FreeLookupLocks(2, TokenKey(tokens, "r"), 1).ok());
  EXPECT_EQ(Store(1, TokenKey(Tokens(kCs, 2), "")), 1u)
      << "the failed store gave its transfer slot back; an unleased object was evicted";
}

// ---- concurrency ---------------------------------------------------------------------------

TEST_F(CacheEngineTest, LookupsRacingEndSessionOfTheirRequestLeaveNoLeases) {
  EngineConfig c;
  c.ended_request_ttl = Duration::zero();  // the request id is reused on purpose
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1);
  Register(3);  // the ender acts for the request: it holds a registration of the model
  auto tokens = Tokens(4 * kCs, 9);
  ASSERT_EQ(Store(1, TokenKey(tokens, "", 0, 4 * kCs)), 4u);
  // One thread looks the same request up over and over while another keeps ending it: whatever
  // the interleaving, a lookup whose request ended under it must not keep leases.
  std::atomic<bool> stop{false};
  std::thread ender([&] {
    while (!stop.load()) (void)engine_->EndSession(3, kModel, "r");
  });
  // Cancelled: the request ended during the lookup (nothing of it is left behind).
  size_t cancelled = 0;
  for (int i = 0; i < 3000; ++i) {
    Status st;
    if (i % 2 == 0) {
      st = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait).status();
    } else {
      auto h = engine_->Lookup(2, TokenKey(tokens, "r"), 1);
      st = h.status();
      if (h.ok()) (void)engine_->WaitPrefetch(2, *h, kWait);
    }
    if (!st.ok()) {
      EXPECT_EQ(st.code(), StatusCode::kCancelled) << st.ToString();
      ++cancelled;
    }
  }
  stop.store(true);
  ender.join();
  (void)engine_->EndSession(3, kModel, "r");
  EXPECT_EQ(table()->stats().read_leases, 0u) << cancelled << " lookups were cancelled";
  EXPECT_EQ(engine_->stats().requests, 0u);
  EXPECT_EQ(engine_->stats().sessions, 0u);
}

TEST_F(CacheEngineTest, ConcurrentTrafficKeepsTheTableConsistentAndLeavesNoLeases) {
  EngineConfig reused_ids;
  reused_ids.ended_request_ttl = Duration::zero();  // ids are reused after END_SESSION on purpose
  ASSERT_NO_FATAL_FAILURE(Build(reused_ids));
  Register(1);
  constexpr size_t kThreads = 4;
  for (size_t t = 0; t < kThreads; ++t) Register(21 + t);  // every client may act for any
  constexpr size_t kIterations = 150;
  constexpr size_t kChunks = 10;
  const std::vector<uint32_t> tokens = Tokens(kChunks * kCs, 1);
  const char* const requests[] = {"c0", "c1", "c2"};
  const uint64_t ends[] = {6 * kCs, 8 * kCs, 10 * kCs};

  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::mutex errors_mu;
  std::vector<std::string> errors;  // GUARDED_BY(errors_mu)
  auto check = [&](const Status& s, std::initializer_list<StatusCode> allowed, const char* op) {
    for (StatusCode c : allowed) {
      if (s.code() == c) return;
    }
    std::lock_guard<std::mutex> l(errors_mu);
    errors.push_back(std::string(op) + ": " + s.ToString());
  };

  std::vector<std::thread> threads;
  for (size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const ClientId client = 21 + t;
      start.wait();
      uint64_t x = 0x9E3779B97F4A7C15ull * (t + 1);
      for (size_t i = 0; i < kIterations; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        const size_t r = x % 3;
        const EngineKey key = TokenKey(tokens, requests[r], 0, ends[r]);
        switch ((x >> 8) % 8) {
          case 0: {  // two-phase lookup, collected (Cancelled: its request ended meanwhile)
            auto h = engine_->Lookup(client, key, 1);
            check(h.status(), {StatusCode::kOk, StatusCode::kCancelled}, "Lookup");
            if (!h.ok()) break;
            auto res = engine_->WaitPrefetch(client, *h, kWait);
            // A concurrent EndSession of the request cancels the job.
            check(res.status(), {StatusCode::kOk, StatusCode::kNotFound}, "WaitPrefetch");
            break;
          }
          case 1: {  // two-phase lookup left uncollected
            auto h = engine_->Lookup(client, key, 1);
            check(h.status(), {StatusCode::kOk, StatusCode::kCancelled}, "Lookup");
            break;
          }
          case 2: {  // a concurrent sync lookup of the same request supersedes this one
            auto res = engine_->SyncLookup(client, key, 1, seconds(5));
            check(res.status(), {StatusCode::kOk, StatusCode::kCancelled}, "SyncLookup");
            break;
          }
          case 3: {
            const uint64_t first = (x >> 16) % (kChunks - 1);
            auto st = engine_->PrepareStore(
                client, TokenKey(tokens, requests[r], first * kCs, (first + 2) * kCs));
            check(st.status(), {StatusCode::kOk}, "PrepareStore");
            if (!st.ok()) break;
            for (size_t j = 0; j < st->offsets.size(); ++j) {
              if (st->offsets[j] >= 0) {
                FillObject(table()->data(static_cast<uint64_t>(st->offsets[j])), st->object_bytes,
                           first + j);
              }
            }
            const bool commit = ((x >> 24) % 4) != 0;
            check(engine_->CommitStore(client, st->handle, commit).status(), {StatusCode::kOk},
                  "CommitStore");
            break;
          }
          case 4: {
            const uint64_t c = (x >> 16) % kChunks;
            auto rt = engine_->PrepareRetrieve(
                client, TokenKey(tokens, requests[r], c * kCs, (c + 1) * kCs));
            check(rt.status(), {StatusCode::kOk, StatusCode::kKeyAbsent}, "PrepareRetrieve");
            if (!rt.ok()) break;
            check(engine_->CommitRetrieve(client, rt->handle),
                  {StatusCode::kOk, StatusCode::kLeaseNotHeld}, "CommitRetrieve");
            break;
          }
          case 5: {
            auto freed = engine_->FreeLookupLocks(client, key, 1);
            check(freed.status(), {StatusCode::kOk}, "FreeLookupLocks");
            break;
          }
          case 6: (void)engine_->EndSession(client, kModel, requests[r]); break;
          case 7: (void)engine_->Clear(false); break;
        }
      }
    });
  }
  go.set_value();
  for (auto& th : threads) th.join();
  for (const std::string& e : errors) ADD_FAILURE() << e;
  Status inv = table()->CheckInvariants();
  EXPECT_TRUE(inv.ok()) << inv.ToString();

  for (const char* r : requests) (void)engine_->EndSession(1, kModel, r);
  for (size_t t = 0; t < kThreads; ++t) (void)engine_->EndClient(21 + t);
  ASSERT_TRUE(storage_->prefetch()->WaitIdle(kWait));
  ASSERT_TRUE(storage_->store()->WaitIdle(kWait));
  inv = table()->CheckInvariants();
  EXPECT_TRUE(inv.ok()) << inv.ToString();
  ExpectNoLeasesRequestsOrPins();
  EXPECT_EQ(table()->stats().writing, 0u);
  const EngineStats e = engine_->stats();
  EXPECT_EQ(e.transfers, 0u);
  EXPECT_EQ(e.pending_lookups, 0u);
}

// ---- integrity: leases, generations, fences (docs/design/integrity.md) ----------------------

// A lookup repeated for a request (as after a preemption) must not take back the leases of the
// request's new lookup: the first job returns only what it still holds.
TEST_F(CacheEngineTest, ASyncLookupRepeatedAfterARetrieveLeavesTheNextRetrieveItsLeases) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 4 * kCs), 4));
  const auto keys = ExpectedKeys(tokens, 4);

  auto first = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(first->hit_chunks, 4u);
  ASSERT_TRUE(Retrieve(3, TokenKey(tokens, "r", 0, 4 * kCs)).ok());
  EXPECT_EQ(table()->stats().read_leases, 0u);

  auto again = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->hit_chunks, 4u);
  EXPECT_EQ(table()->stats().read_leases, 4u) << "the second lookup's leases are all there";
  Status st = Retrieve(3, TokenKey(tokens, "r", 0, 4 * kCs));
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(table()->stats().read_leases, 0u);
  EXPECT_TRUE(table()->CheckInvariants().ok());
}

// The other order: looked up twice before any retrieve. The first lookup's leases go back when
// the second supersedes it, so one retrieve leaves nothing behind.
TEST_F(CacheEngineTest, ASyncLookupRepeatedBeforeItsRetrieveHoldsOneSetOfLeases) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 4 * kCs), 4));
  for (int i = 0; i < 3; ++i) {
    auto r = engine_->SyncLookup(2, TokenKey(tokens, "r"), 1, kWait);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->hit_chunks, 4u);
    EXPECT_EQ(table()->stats().read_leases, 4u);
  }
  EXPECT_TRUE(Retrieve(3, TokenKey(tokens, "r", 0, 4 * kCs)).ok());
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

// MLA: two workers read each object. One worker's retrieve consumed one lease per object; the
// repeated lookup returns exactly the other one, then both workers' retrieves succeed.
TEST_F(CacheEngineTest, ARepeatedSyncLookupReturnsOnlyWhatTheFirstStillHeldWithExtraReaders) {
  auto tokens = Tokens(2 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 2 * kCs), 2));
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "m"), 2, kWait).ok());
  EXPECT_EQ(table()->stats().read_leases, 4u);
  ASSERT_TRUE(Retrieve(3, TokenKey(tokens, "m", 0, 2 * kCs)).ok());
  EXPECT_EQ(table()->stats().read_leases, 2u);
  auto again = engine_->SyncLookup(2, TokenKey(tokens, "m"), 2, kWait);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(table()->stats().read_leases, 4u);
  EXPECT_TRUE(Retrieve(3, TokenKey(tokens, "m", 0, 2 * kCs)).ok());
  EXPECT_TRUE(Retrieve(4, TokenKey(tokens, "m", 0, 2 * kCs)).ok());
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

// A sync lookup whose job outlives job_ttl: the reaper returns what the job still holds (here
// nothing, the retrieve consumed it), never the leases of the request's next lookup.
TEST_F(CacheEngineTest, AnExpiredSyncLookupNeverTakesTheLeasesOfTheRequestsNextLookup) {
  ASSERT_NO_FATAL_FAILURE(Build({}, 256, {}, /*prefetch_on_test_clock=*/true));
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 4 * kCs), 4));
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "t"), 1, kWait).ok());
  ASSERT_TRUE(Retrieve(3, TokenKey(tokens, "t", 0, 4 * kCs)).ok());
  clock_->Advance(seconds(119));
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "t"), 1, kWait).ok());
  clock_->Advance(seconds(2));
  storage_->prefetch()->ReapExpired();
  EXPECT_EQ(table()->stats().read_leases, 4u);
  EXPECT_TRUE(Retrieve(3, TokenKey(tokens, "t", 0, 4 * kCs)).ok());
  // The second job expires unconsumed: its leases go back, and only those.
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "t"), 1, kWait).ok());
  ASSERT_TRUE(engine_->SyncLookup(5, TokenKey(tokens, "other"), 1, kWait).ok());
  EXPECT_EQ(table()->stats().read_leases, 8u);
  clock_->Advance(seconds(121));
  storage_->prefetch()->ReapExpired();
  EXPECT_EQ(table()->stats().read_leases, 0u);
  EXPECT_TRUE(table()->CheckInvariants().ok());
}

TEST_F(CacheEngineTest, ARetrieveOrStorePastTheKeysDataIsAnErrorNotAShortTransfer) {
  auto tokens = Tokens(4 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 4 * kCs), 4));
  ASSERT_EQ(LookupAndWait(2, TokenKey(tokens, "p")).hit_chunks, 4u);
  auto past = engine_->PrepareRetrieve(2, TokenKey(tokens, "p", 0, 6 * kCs));
  EXPECT_EQ(past.status().code(), StatusCode::kInvalidArgument) << past.status().ToString();
  EXPECT_EQ(engine_->PrepareStore(2, TokenKey(tokens, "", 0, 5 * kCs)).status().code(),
            StatusCode::kInvalidArgument);
  std::vector<uint8_t> hashes = BlockHashes(4, 9);  // 4 blocks = 2 chunks
  Register(2, 0, 1, MakeLayout(), "hash-model");
  EngineKey hk = HashKey(hashes, "p");
  hk.model_name = "hash-model";
  hk.end = 3 * kCs;
  EXPECT_EQ(engine_->PrepareStore(2, hk).status().code(), StatusCode::kInvalidArgument);
  hk.end = 2 * kCs;
  auto ok = engine_->PrepareStore(2, hk);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->offsets.size(), 2u);
  // Exactly the data, and an open end, are fine.
  auto whole = engine_->PrepareRetrieve(2, TokenKey(tokens, "p", 0, 4 * kCs));
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_EQ(whole->offsets.size(), 4u);
  EXPECT_TRUE(engine_->CommitRetrieve(2, whole->handle).ok());
}

// The bytes a worker copies between PREPARE_RETRIEVE and COMMIT_RETRIEVE are accepted only if
// every lease is still on the object whose offset was handed out.
TEST_F(CacheEngineTest, CommitRetrieveRefusesALeaseTakenAgainOnAnotherGenerationOfTheObject) {
  auto tokens = Tokens(2 * kCs, 1);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 2 * kCs), 2));
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "g"), 1, kWait).ok());
  auto ticket = engine_->PrepareRetrieve(3, TokenKey(tokens, "g", 0, 2 * kCs));
  ASSERT_TRUE(ticket.ok()) << ticket.status().ToString();
  // Meanwhile: L1 is force-cleared, the chunks are stored again (new objects), the request's
  // old leases are returned (the detached objects are freed) and it looks the chunks up again.
  EXPECT_EQ(engine_->Clear(true), 2u);
  ASSERT_EQ(Store(1, TokenKey(tokens, "", 0, 2 * kCs)), 2u);
  ASSERT_TRUE(engine_->FreeLookupLocks(2, TokenKey(tokens, "g", 0, 2 * kCs), 1).ok());
  ASSERT_TRUE(engine_->SyncLookup(2, TokenKey(tokens, "g"), 1, kWait).ok());
  EXPECT_EQ(table()->stats().read_leases, 2u);
  Status st = engine_->CommitRetrieve(3, ticket->handle);
  EXPECT_EQ(st.code(), StatusCode::kLeaseNotHeld) << st.ToString();
  EXPECT_EQ(table()->stats().read_leases, 2u) << "the new lookup's leases are untouched";
  EXPECT_EQ(engine_->stats().retrieve_lease_lost, 1u);
  EXPECT_TRUE(Retrieve(3, TokenKey(tokens, "g", 0, 2 * kCs)).ok());
}

// A worker that stalls past its write lease and then writes at the offsets it was given must
// not change any other object's bytes, and its commit must fail.
TEST_F(CacheEngineTest, AWriterWhoseLeaseExpiredNeverWritesIntoAnotherObject) {
  EngineConfig c;
  c.transfer_ttl = seconds(10);
  ObjectTableOptions t;
  t.write_lease_ttl = seconds(5);
  t.high_watermark = t.low_watermark = 1.0;  // no background eviction
  ASSERT_NO_FATAL_FAILURE(Build(c, /*objects=*/4, t));
  Register(1);
  auto slow_tokens = Tokens(2 * kCs, 1);
  auto slow = engine_->PrepareStore(1, TokenKey(slow_tokens, ""));
  ASSERT_TRUE(slow.ok()) << slow.status().ToString();
  clock_->Advance(seconds(11));
  table()->ReapExpired();
  engine_->ReapExpired();
  EXPECT_EQ(table()->stats().quarantined, 2u);

  // Another client stores into what is left of the (4-object) arena, then fills it entirely.
  Register(2);
  auto other = Tokens(2 * kCs, 2);
  ASSERT_EQ(Store(2, TokenKey(other, "", 0, 2 * kCs)), 2u);
  ASSERT_EQ(LookupAndWait(3, TokenKey(other, "reader")).hit_chunks, 2u);  // not evictable
  auto full = engine_->PrepareStore(2, TokenKey(Tokens(kCs, 3), ""));
  EXPECT_EQ(full.status().code(), StatusCode::kOutOfMemory) << "the fenced extents stay out";
  const auto other_keys = ExpectedKeys(other, 2);
  std::vector<std::vector<uint8_t>> before;
  for (const ObjectKey& k : other_keys) {
    auto info = table()->Info(k);
    ASSERT_TRUE(info.has_value());
    const uint8_t* p = table()->data(info->offset);
    before.emplace_back(p, p + info->size);
    for (int64_t off : slow->offsets) EXPECT_NE(static_cast<uint64_t>(off), info->offset);
  }
  // The stalled worker wakes up and writes.
  for (int64_t off : slow->offsets) {
    std::memset(table()->data(static_cast<uint64_t>(off)), 0xEE, slow->object_bytes);
  }
  for (size_t i = 0; i < other_keys.size(); ++i) {
    auto info = table()->Info(other_keys[i]);
    const uint8_t* p = table()->data(info->offset);
    EXPECT_TRUE(std::equal(p, p + info->size, before[i].begin())) << "object " << i;
  }
  EXPECT_EQ(engine_->CommitStore(1, slow->handle).status().code(), StatusCode::kLeaseNotHeld);
  for (const ObjectKey& k : ExpectedKeys(slow_tokens, 2)) EXPECT_FALSE(table()->Info(k));
  EXPECT_EQ(table()->stats().quarantined, 0u) << "its commit freed them";
  EXPECT_EQ(Store(2, TokenKey(slow_tokens, "", 0, 2 * kCs)), 2u);
}

// A client dropped (heartbeats missed) while its worker was copying: its extents stay fenced
// while its process lives, and are freed once the process has exited.
TEST_F(CacheEngineTest, AnEndedClientsFencedStoresAreFreedWhenItsProcessExits) {
  Register(7);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // the "worker process": waits until killed
    close(ready[0]);
    pause();
    _exit(0);
  }
  close(ready[1]);
  close(ready[0]);
  ChildReaper reaper{child};  // the child never outlives the test, whatever fails
  Status set = engine_->SetClientProcess(7, child);
  ASSERT_TRUE(set.ok() || set.code() == StatusCode::kNotSupported) << set.ToString();
  auto tokens = Tokens(2 * kCs, 4);
  auto ticket = engine_->PrepareStore(7, TokenKey(tokens, ""));
  ASSERT_TRUE(ticket.ok());
  engine_->EndClient(7);
  EXPECT_EQ(table()->stats().quarantined, 2u);
  engine_->ReapExpired();
  EXPECT_EQ(table()->stats().quarantined, 2u) << "the process is alive: it may still write";
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  engine_->ReapExpired();
  if (set.ok()) {
    EXPECT_EQ(table()->stats().quarantined, 0u);
    EXPECT_EQ(engine_->stats().fenced_stores, 0u);
  }
  EXPECT_EQ(engine_->SetClientProcess(8, 0).code(), StatusCode::kInvalidArgument);
}

// The usual order when a worker is killed mid-store: the reaper sees the process gone before the
// heartbeat grace ends the client. Its stores must still be freed, not fenced for good.
TEST_F(CacheEngineTest, AStoreOfAProcessThatExitedBeforeItsClientEndedIsNotFenced) {
  Register(9);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    pause();
    _exit(0);
  }
  ChildReaper reaper{child};  // the child never outlives the test, whatever fails
  Status set = engine_->SetClientProcess(9, child);
  if (!set.ok()) GTEST_SKIP() << "no pidfd_open on this kernel: " << set.ToString();
  auto tokens = Tokens(2 * kCs, 5);
  ASSERT_TRUE(engine_->PrepareStore(9, TokenKey(tokens, "")).ok());
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  engine_->ReapExpired();  // notices the exit first
  engine_->EndClient(9);   // then the grace ends the client
  engine_->ReapExpired();
  EXPECT_EQ(table()->stats().quarantined, 0u);
  EXPECT_EQ(engine_->stats().fenced_stores, 0u);
  EXPECT_EQ(table()->stats().used_bytes, 0u);
}

// Every committed object carries a CRC32C: the worker's, or one the engine computes.
TEST_F(CacheEngineTest, CommitStoreRecordsTheWorkersChecksumsOrComputesThem) {
  auto tokens = Tokens(3 * kCs, 5);
  ASSERT_NO_FATAL_FAILURE(
      RegisterAndStore(TokenKey(tokens, "", 0, kCs), 1));  // chunk 0 present: skipped below
  auto t = engine_->PrepareStore(1, TokenKey(tokens, "", 0, 3 * kCs));
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(t->offsets.size(), 3u);
  EXPECT_EQ(t->offsets[0], -1);
  std::vector<uint32_t> wrong_count = {1, 2};
  EXPECT_EQ(engine_->CommitStore(1, t->handle, true, &wrong_count).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(table()->Info(ExpectedKeys(tokens, 2)[1]).has_value()) << "nothing published";

  t = engine_->PrepareStore(1, TokenKey(tokens, "", 0, 3 * kCs));
  ASSERT_TRUE(t.ok());
  std::vector<uint32_t> crcs = {0xDEAD};  // the skipped entry's value is ignored
  for (size_t i = 1; i < 3; ++i) {
    uint8_t* obj = table()->data(static_cast<uint64_t>(t->offsets[i]));
    FillObject(obj, t->object_bytes, 10 + i);
    crcs.push_back(ReferenceCrc32c(obj, t->object_bytes));
  }
  auto n = engine_->CommitStore(1, t->handle, true, &crcs);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2u);
  const auto keys = ExpectedKeys(tokens, 3);
  EXPECT_TRUE(table()->Info(keys[1])->has_crc32c);
  EXPECT_EQ(table()->Info(keys[1])->crc32c, crcs[1]);
  EXPECT_EQ(table()->Info(keys[2])->crc32c, crcs[2]);
  EXPECT_TRUE(storage_->store()->WaitIdle(kWait));
  EXPECT_TRUE(adapter_->Contains(keys[2]));
  // Chunk 0 went through Store() without checksums: the engine computed its CRC.
  auto info = table()->Info(keys[0]);
  ASSERT_TRUE(info.has_value());
  EXPECT_TRUE(info->has_crc32c);
  std::vector<uint8_t> expect(kObjBytes);
  FillObject(expect.data(), kObjBytes, 0);
  EXPECT_EQ(info->crc32c, ReferenceCrc32c(expect.data(), kObjBytes));
  EXPECT_GE(engine_->stats().store_crc_computed, 1u);
}

// A stray write into a published object (bytes that no longer match the checksum committed with
// them) is caught before the object reaches L2: it is dropped from L1 and never stored.
TEST_F(CacheEngineTest, AnObjectWhoseBytesNoLongerMatchItsChecksumNeverReachesL2) {
  Register(1);
  auto tokens = Tokens(2 * kCs, 6);
  auto t = engine_->PrepareStore(1, TokenKey(tokens, ""));
  ASSERT_TRUE(t.ok());
  std::vector<uint32_t> crcs;
  for (size_t i = 0; i < 2; ++i) {
    uint8_t* obj = table()->data(static_cast<uint64_t>(t->offsets[i]));
    FillObject(obj, t->object_bytes, i);
    crcs.push_back(ReferenceCrc32c(obj, t->object_bytes));
  }
  // Chunk 1 changes after its checksum was taken (a worker writing where it no longer may).
  table()->data(static_cast<uint64_t>(t->offsets[1]))[100] ^= 0x01;
  ASSERT_TRUE(engine_->CommitStore(1, t->handle, true, &crcs).ok());
  EXPECT_TRUE(storage_->store()->WaitIdle(kWait));
  const auto keys = ExpectedKeys(tokens, 2);
  EXPECT_TRUE(adapter_->Contains(keys[0]));
  EXPECT_FALSE(adapter_->Contains(keys[1])) << "corrupt bytes never reach L2";
  EXPECT_FALSE(table()->Info(keys[1]).has_value()) << "and leave L1";
  EXPECT_EQ(storage_->store()->stats().corrupt_in_l1, 1u);
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "x")).hit_chunks, 1u);
}

// ---- bounded work per request ---------------------------------------------------------------

TEST_F(CacheEngineTest, ARequestNamingMoreObjectsThanTheCapIsRefusedBeforeAnyWork) {
  EngineConfig c;
  c.max_keys_per_request = 64;
  ASSERT_NO_FATAL_FAILURE(Build(c));
  Register(1, 0, /*world_size=*/16);
  auto tokens = Tokens(5 * kCs, 1);  // 5 chunks x 16 ranks = 80 objects
  auto lookup = engine_->Lookup(2, AllRanksKey(tokens, "big", 16), 1);
  EXPECT_EQ(lookup.status().code(), StatusCode::kResourceExhausted) << lookup.status().ToString();
  EXPECT_EQ(engine_->SyncLookup(2, AllRanksKey(tokens, "big", 16), 1).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(engine_->stats().requests, 0u) << "nothing was interned";
  EXPECT_EQ(engine_->stats().sessions, 0u) << "nothing was hashed";
  // 4 chunks x 16 ranks = 64: at the cap, served.
  auto four = Tokens(4 * kCs, 1);
  EXPECT_TRUE(engine_->SyncLookup(2, AllRanksKey(four, "ok", 16), 1).ok());
  // One rank's key names one object per chunk.
  EngineKey one = AllRanksKey(tokens, "one", 16);
  one.worker_id = 3;
  EXPECT_TRUE(engine_->SyncLookup(2, one, 1).ok());
}

TEST_F(CacheEngineTest, AWorldWhoseChunkForEveryRankCannotFitInL1IsRefused) {
  ASSERT_NO_FATAL_FAILURE(Build({}, /*objects=*/8));
  auto too_wide = engine_->RegisterKvCache(1, kModel, 9, 0, MakeLayout());
  EXPECT_EQ(too_wide.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine_->RegisterKvCache(1, kModel, 8, 0, MakeLayout()).ok());
}

// A SYNC_LOOKUP that a server queued before the END_SESSION of its request overtook it: the
// lookup must not bring the request back with leases nobody will release.
TEST_F(CacheEngineTest, ALookupArrivingAfterItsRequestsEndSessionIsCancelled) {
  auto tokens = Tokens(2 * kCs, 8);
  ASSERT_NO_FATAL_FAILURE(RegisterAndStore(TokenKey(tokens, "", 0, 2 * kCs), 2));
  EXPECT_EQ(*engine_->EndSession(2, kModel, "late"), 0u);  // END_SESSION first
  auto late = engine_->SyncLookup(2, TokenKey(tokens, "late"), 1, kWait);
  EXPECT_EQ(late.status().code(), StatusCode::kCancelled) << late.status().ToString();
  EXPECT_EQ(engine_->Lookup(2, TokenKey(tokens, "late"), 1).status().code(),
            StatusCode::kCancelled);
  EXPECT_EQ(engine_->stats().requests, 0u);
  EXPECT_EQ(table()->stats().read_leases, 0u);
  // Other requests are unaffected, and the id is usable again once ended_request_ttl passed.
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "other")).hit_chunks, 2u);
  clock_->Advance(seconds(31));
  engine_->ReapExpired();
  EXPECT_EQ(LookupAndWait(2, TokenKey(tokens, "late")).hit_chunks, 2u);
}

// ---- authorization ----------------------------------------------------------------------------

TEST_F(CacheEngineTest, OnlyTheRequestsOwnerOrItsEngineMayEndOrFreeIt) {
  Register(1);  // a worker of the engine
  auto tokens = Tokens(2 * kCs, 12);
  ASSERT_EQ(Store(1, TokenKey(tokens, "", 0, 2 * kCs)), 2u);
  ASSERT_EQ(LookupAndWait(2, TokenKey(tokens, "mine")).hit_chunks, 2u);  // the scheduler
  // A stranger (no registration, not the owner) can neither end nor free the request.
  EXPECT_EQ(engine_->EndSession(66, kModel, "mine").status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(engine_->FreeLookupLocks(66, TokenKey(tokens, "mine", 0, 2 * kCs), 1).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(table()->stats().read_leases, 2u) << "a refusal changes nothing";
  // The engine's worker (a registration of the model) and the owner may.
  EXPECT_EQ(*engine_->FreeLookupLocks(1, TokenKey(tokens, "mine", 0, kCs), 1), 1u);
  EXPECT_EQ(*engine_->EndSession(2, kModel, "mine"), 1u);
  EXPECT_EQ(table()->stats().read_leases, 0u);
}

TEST_F(CacheEngineTest, PrepareStoreNeedsARegistrationOfTheNamespace) {
  Register(1);
  auto tokens = Tokens(2 * kCs, 13);
  EXPECT_EQ(engine_->PrepareStore(5, TokenKey(tokens, "")).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(table()->stats().writing, 0u);
  EXPECT_EQ(engine_->stats().transfers, 0u);
  EXPECT_TRUE(engine_->PrepareStore(1, TokenKey(tokens, "")).ok());
}

}  // namespace
}  // namespace lmcache_cpp
