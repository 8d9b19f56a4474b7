// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// embed_example: a toy C++ inference server that embeds the lmcache_cpp cache engine in-process,
// without Python or ZeroMQ. docs/embedding.md walks through it.
//
//   1. Opens the cache: a StorageManager (an L1 shared-memory arena and a file-system L2 in DIR)
//      and a CacheEngine on top of it.
//   2. Registers the layout of its own paged KV cache: one host buffer per layer in vLLM's NHD
//      layout [2, NB, BS, H, D].
//   3. "Prefills" three prompts (two share a system prompt), then stores their whole chunks
//      through the arena with the C++ copy kernels: PrepareStore -> GatherBatch -> CommitStore.
//      It waits until the store controller has written them to the L2 files.
//   4. Restarts: destroys the engine and the storage manager and opens new ones on the same
//      directory. L1 and the paged cache start empty; only the L2 files remain.
//   5. Serves the prompts again: looks them up (two-phase Lookup / QueryPrefetch / WaitPrefetch,
//      and SyncLookup), retrieves the hits from L2 into freshly allocated (shuffled) blocks of a
//      zeroed paged cache (PrepareRetrieve -> ScatterBatch -> CommitRetrieve) and checks every
//      byte of the paged cache.
//
// Usage: embed_example [DIR]
//   DIR holds the L2 files; default: a new temporary directory, removed at exit.
// Exit status: 0 when every check passed, 1 otherwise.

#include <stdlib.h>  // mkdtemp

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "lmcache_cpp/lmcache_cpp.h"
#include "lmcache_cpp/stat_fields.h"

namespace {

using lmcache_cpp::BlockIdSpan;
using lmcache_cpp::CacheEngine;
using lmcache_cpp::ChunkCopy;
using lmcache_cpp::ClientId;
using lmcache_cpp::EngineConfig;
using lmcache_cpp::EngineKey;
using lmcache_cpp::FileSystemAdapterOptions;
using lmcache_cpp::FileSystemL2Adapter;
using lmcache_cpp::KvCacheLayout;
using lmcache_cpp::KvCacheView;
using lmcache_cpp::KvLayout;
using lmcache_cpp::LookupResult;
using lmcache_cpp::Status;
using lmcache_cpp::StorageManager;
using lmcache_cpp::StorageManagerConfig;
using lmcache_cpp::TransferTicket;

constexpr char kModel[] = "example-model";
constexpr uint32_t kChunkTokens = 64;  // EngineConfig::chunk_size
constexpr uint32_t kBlockTokens = 16;  // the paged cache's block size: 4 blocks per chunk
constexpr uint32_t kBlocksPerChunk = kChunkTokens / kBlockTokens;
constexpr uint64_t kNumBlocks = 64;               // blocks per layer in the paged cache
constexpr size_t kArenaBytes = size_t{16} << 20;  // L1
// One client per engine process. A scheduler looks requests up and a worker moves the bytes;
// leases belong to the request, so the worker retrieves what the scheduler's lookup leased.
constexpr ClientId kScheduler = 1;
constexpr ClientId kWorker = 2;
constexpr auto kWait = std::chrono::seconds(30);  // upper bound for anything asynchronous

KvCacheLayout PagedLayout() {
  KvCacheLayout l;
  l.layout = KvLayout::kNHD;
  l.num_layers = 4;
  l.block_size = kBlockTokens;
  l.num_heads = 4;
  l.head_size = 32;
  l.element_size = 2;  // e.g. bf16
  l.num_blocks = kNumBlocks;
  return l;  // dense strides (block_stride = plane_stride = 0)
}

// Report a failed step; return false so that `return Fail(...)` ends a bool function.
bool Fail(const char* step, const Status& st) {
  std::fprintf(stderr, "embed_example: %s failed: %s\n", step, st.ToString().c_str());
  return false;
}

bool Fail(const std::string& what) {
  std::fprintf(stderr, "embed_example: %s\n", what.c_str());
  return false;
}

// ---- the host's own paged KV cache ---------------------------------------------------------

// One tensor per layer, [2, NB, BS, H, D], in host memory, and a free list of block ids.
class PagedKvCache {
 public:
  // `shuffle_seed` != 0 hands out blocks in a shuffled order (so a restarted server places a
  // request's blocks elsewhere than the first run did).
  PagedKvCache(const KvCacheLayout& layout, uint32_t shuffle_seed) : layout_(layout) {
    const uint64_t extent = layout_.num_planes() * layout_.num_blocks * layout_.BlockPlaneBytes();
    for (uint32_t i = 0; i < layout_.num_layers; ++i) layers_.emplace_back(extent, 0);
    for (uint64_t b = layout_.num_blocks; b > 0; --b) free_.push_back(static_cast<int32_t>(b - 1));
    if (shuffle_seed != 0) {
      std::mt19937 rng(shuffle_seed);
      std::shuffle(free_.begin(), free_.end(), rng);
    }
  }

  const KvCacheLayout& layout() const { return layout_; }

  // The view the copy kernels take. Non-owning: valid while this cache lives.
  KvCacheView View() {
    KvCacheView v;
    v.layout = layout_;
    for (auto& layer : layers_) v.layers.push_back(layer.data());
    return v;
  }

  // `n` block ids, or an empty vector when the cache is full.
  std::vector<int32_t> Allocate(size_t n) {
    if (n > free_.size()) return {};
    std::vector<int32_t> ids(free_.end() - static_cast<std::ptrdiff_t>(n), free_.end());
    free_.resize(free_.size() - n);
    std::reverse(ids.begin(), ids.end());
    return ids;
  }

  uint8_t* BlockPlane(uint32_t layer, uint32_t plane, uint64_t block) {
    return layers_[layer].data() + plane * layout_.PlaneStride() + block * layout_.BlockStride();
  }

 private:
  KvCacheLayout layout_;
  std::vector<std::vector<uint8_t>> layers_;
  std::vector<int32_t> free_;  // popped from the back
};

// ---- the "model" ---------------------------------------------------------------------------

struct Prompt {
  std::string request_id;
  std::vector<uint32_t> tokens;
  std::vector<int32_t> blocks;  // this run's block table: block j holds tokens [j*BS, (j+1)*BS)
};

uint64_t Mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// As in a transformer, the KV of block j depends on every token up to the end of the block: two
// prompts with the same first tokens have the same KV for those blocks.
uint64_t BlockSeed(const std::vector<uint32_t>& tokens, uint64_t block) {
  const uint64_t end = std::min<uint64_t>(tokens.size(), (block + 1) * kBlockTokens);
  uint64_t h = 0x6C6D63616368ull;
  for (uint64_t i = 0; i < end; ++i) h = Mix(h ^ tokens[i]);
  return h;
}

// The KV bytes of one block of one (layer, plane).
void ModelKv(uint64_t seed, uint32_t layer, uint32_t plane, uint8_t* out, uint64_t n) {
  uint64_t s = Mix(seed ^ (uint64_t{layer} << 40) ^ (uint64_t{plane} << 32));
  for (uint64_t i = 0; i < n; i += 8) {
    s = Mix(s);
    std::memcpy(out + i, &s, std::min<uint64_t>(8, n - i));
  }
}

// "Prefill": computes the KV of every block of the prompt into its blocks.
void Prefill(PagedKvCache& cache, const Prompt& p) {
  const KvCacheLayout& l = cache.layout();
  for (uint64_t j = 0; j < p.blocks.size(); ++j) {
    const uint64_t seed = BlockSeed(p.tokens, j);
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        ModelKv(seed, layer, plane, cache.BlockPlane(layer, plane, p.blocks[j]),
                l.BlockPlaneBytes());
      }
    }
  }
}

std::vector<uint32_t> Tokens(size_t n, uint32_t seed) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(Mix(seed * 1000003ull + i) % 32000);
  return t;
}

std::vector<uint32_t> Concat(std::vector<uint32_t> a, const std::vector<uint32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// ---- the cache -----------------------------------------------------------------------------

struct Cache {
  std::unique_ptr<StorageManager> storage;
  std::unique_ptr<CacheEngine> engine;  // declared last: destroyed first (storage outlives it)
  uint64_t recovered = 0;               // L2 objects found in the directory at start-up
};

// The key of prompt `p`'s tokens [0, end), for every KV rank (world size 1: one rank).
// Non-owning: `p` must outlive the key.
EngineKey KeyFor(const Prompt& p, uint64_t end = UINT64_MAX) {
  EngineKey k;
  k.model_name = kModel;
  k.world_size = 1;
  k.worker_id = 0;
  k.request_id = p.request_id;
  k.mode = lmcache_cpp::KeyMode::kTokens;
  // Little-endian uint32 token ids: the host's own layout on x86-64 and AArch64.
  k.data = reinterpret_cast<const uint8_t*>(p.tokens.data());
  k.size = p.tokens.size() * sizeof(uint32_t);
  k.start = 0;
  k.end = end;
  return k;
}

bool OpenCache(const std::string& dir, Cache* cache) {
  FileSystemAdapterOptions fs;
  fs.directory = dir;
  fs.io_threads = 2;
  auto adapter = FileSystemL2Adapter::Create(fs);
  if (!adapter.ok()) return Fail("FileSystemL2Adapter::Create", adapter.status());
  cache->recovered = (*adapter)->recovery().indexed;

  StorageManagerConfig sc;
  sc.arena.size_bytes = kArenaBytes;
  sc.adapters.push_back(std::shared_ptr<lmcache_cpp::L2Adapter>(std::move(adapter).value()));
  auto storage = StorageManager::Create(std::move(sc));
  if (!storage.ok()) return Fail("StorageManager::Create", storage.status());
  cache->storage = std::move(storage).value();
  Status st = cache->storage->Start();
  if (!st.ok()) return Fail("StorageManager::Start", st);

  EngineConfig ec;
  ec.chunk_size = kChunkTokens;
  auto engine = CacheEngine::Create(cache->storage.get(), ec);
  if (!engine.ok()) return Fail("CacheEngine::Create", engine.status());
  cache->engine = std::move(engine).value();
  cache->engine->Start();  // the TTL reaper
  return true;
}

// Graceful shutdown: lets the store controller finish writing L1 objects to L2 (Stop drops what
// is still queued), then destroys the engine before the storage manager.
bool CloseCache(Cache* cache) {
  const bool flushed = cache->storage->store()->WaitIdle(kWait);
  cache->engine.reset();
  cache->storage->Stop();
  cache->storage.reset();
  return flushed || Fail("the store controller did not drain within the deadline");
}

// Registers the paged cache's layout (what each worker does at start-up).
bool Register(Cache& cache, const KvCacheLayout& layout) {
  auto reg =
      cache.engine->RegisterKvCache(kWorker, kModel, /*world_size=*/1, /*worker_id=*/0, layout);
  if (!reg.ok()) return Fail("RegisterKvCache", reg.status());
  return true;
}

// One copy per object of the ticket: chunk first_chunk + i of the prompt <-> the object at
// offsets[i] in the arena. Offsets of -1 (a store skipped an object already present) are left out.
std::vector<ChunkCopy> ChunkCopies(const Cache& cache, const Prompt& p, const TransferTicket& t) {
  uint8_t* const arena = cache.storage->arena()->base();
  std::vector<ChunkCopy> copies;
  for (size_t i = 0; i < t.offsets.size(); ++i) {
    if (t.offsets[i] < 0) continue;
    ChunkCopy c;
    c.block_ids =
        BlockIdSpan(p.blocks.data() + (t.first_chunk + i) * kBlocksPerChunk, kBlocksPerChunk);
    c.num_tokens = kChunkTokens;
    c.object = arena + t.offsets[i];
    c.object_size = t.object_bytes;
    copies.push_back(c);
  }
  return copies;
}

// Stores the whole chunks of `p` from its blocks. Returns the chunks written (chunks already in
// L1 are skipped by PrepareStore), or nullopt on an error.
std::optional<uint64_t> Store(Cache& cache, PagedKvCache& paged, const Prompt& p) {
  const uint64_t chunks = p.tokens.size() / kChunkTokens;
  auto ticket = cache.engine->PrepareStore(kWorker, KeyFor(p, chunks * kChunkTokens));
  if (!ticket.ok()) {
    Fail("PrepareStore", ticket.status());
    return std::nullopt;
  }
  const std::vector<ChunkCopy> copies = ChunkCopies(cache, p, *ticket);
  const Status gathered = lmcache_cpp::GatherBatch(paged.View(), kChunkTokens, copies);
  // Commit either way: success publishes the objects, failure aborts the reservations.
  auto published = cache.engine->CommitStore(kWorker, ticket->handle, gathered.ok());
  if (!gathered.ok() || !published.ok()) {
    Fail(gathered.ok() ? "CommitStore" : "GatherBatch",
         gathered.ok() ? published.status() : gathered);
    return std::nullopt;
  }
  return *published;
}

// Copies the first `tokens` tokens of `p` (whole chunks, leased by a lookup) from L1 into its
// blocks.
bool Retrieve(Cache& cache, PagedKvCache& paged, const Prompt& p, uint64_t tokens) {
  auto ticket = cache.engine->PrepareRetrieve(kWorker, KeyFor(p, tokens));
  if (!ticket.ok()) return Fail("PrepareRetrieve", ticket.status());
  const std::vector<ChunkCopy> copies = ChunkCopies(cache, p, *ticket);
  const Status scattered = lmcache_cpp::ScatterBatch(paged.View(), kChunkTokens, copies);
  // Commit either way, to return the leases. A commit error means a lease expired while we
  // copied: the bytes must not be used (a real server recomputes those tokens).
  const Status committed = cache.engine->CommitRetrieve(kWorker, ticket->handle);
  if (!scattered.ok()) return Fail("ScatterBatch", scattered);
  if (!committed.ok()) return Fail("CommitRetrieve", committed);
  return true;
}

// Two-phase lookup: Lookup returns at once; a scheduler polls QueryPrefetch once per step and
// here, having nothing else to do, blocks in WaitPrefetch.
std::optional<LookupResult> TwoPhaseLookup(Cache& cache, const Prompt& p) {
  auto handle = cache.engine->Lookup(kScheduler, KeyFor(p), /*tp_size=*/1);
  if (!handle.ok()) {
    Fail("Lookup", handle.status());
    return std::nullopt;
  }
  auto result = cache.engine->QueryPrefetch(kScheduler, *handle);
  if (result.ok() && !result->has_value()) {
    result = cache.engine->WaitPrefetch(kScheduler, *handle, kWait);
  }
  if (!result.ok()) {
    Fail("QueryPrefetch/WaitPrefetch", result.status());
    return std::nullopt;
  }
  if (!result->has_value()) {
    Fail("the lookup did not finish in time");
    return std::nullopt;
  }
  return **result;
}

std::optional<LookupResult> SyncLookup(Cache& cache, const Prompt& p) {
  // The L2 existence check must answer within the deadline (the default is 200 ms); the L2 -> L1
  // load continues in the background and PrepareRetrieve joins it.
  auto result =
      cache.engine->SyncLookup(kScheduler, KeyFor(p), /*tp_size=*/1, std::chrono::seconds(5));
  if (!result.ok()) {
    Fail("SyncLookup", result.status());
    return std::nullopt;
  }
  return *result;
}

// Every byte of the paged cache: blocks that received retrieved tokens hold the model's KV of
// those tokens, every other block is still zero.
uint64_t CountMismatches(PagedKvCache& paged, const std::vector<const Prompt*>& prompts,
                         const std::vector<uint64_t>& retrieved_tokens, uint64_t* bytes) {
  const KvCacheLayout& l = paged.layout();
  const uint64_t n = l.BlockPlaneBytes();
  std::vector<std::optional<uint64_t>> seeds(l.num_blocks);  // expected seed per block
  for (size_t r = 0; r < prompts.size(); ++r) {
    for (uint64_t j = 0; j < retrieved_tokens[r] / kBlockTokens; ++j) {
      seeds[prompts[r]->blocks[j]] = BlockSeed(prompts[r]->tokens, j);
    }
  }
  std::vector<uint8_t> expected(n);
  uint64_t mismatches = 0;
  *bytes = 0;
  for (uint64_t b = 0; b < l.num_blocks; ++b) {
    for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
      for (uint32_t plane = 0; plane < l.num_planes(); ++plane) {
        if (seeds[b].has_value()) {
          ModelKv(*seeds[b], layer, plane, expected.data(), n);
        } else {
          std::fill(expected.begin(), expected.end(), 0);
        }
        const uint8_t* got = paged.BlockPlane(layer, plane, b);
        for (uint64_t i = 0; i < n; ++i) mismatches += got[i] != expected[i];
        *bytes += n;
      }
    }
  }
  return mismatches;
}

uint64_t ChunksOf(const Prompt& p) { return p.tokens.size() / kChunkTokens; }

bool AllocateBlocks(PagedKvCache& paged, Prompt& p) {
  p.blocks = paged.Allocate((p.tokens.size() + kBlockTokens - 1) / kBlockTokens);
  return !p.blocks.empty() || Fail("the paged cache is full");
}

int Run(const std::string& dir) {
  const KvCacheLayout layout = PagedLayout();
  const uint64_t object_bytes = layout.ObjectBytes(kChunkTokens).value();
  std::printf("lmcache_cpp %s embedded: L1 arena %zu MiB, L2 files in %s\n",
              lmcache_cpp::kVersionString, kArenaBytes >> 20, dir.c_str());
  std::printf("paged KV cache %s, %" PRIu64 " blocks/layer; chunk %u tokens = %" PRIu64
              " KiB object\n",
              layout.Fingerprint().c_str(), layout.num_blocks, kChunkTokens, object_bytes >> 10);

  // Prompts: a and b share a 128-token system prompt (2 chunks); c is unrelated.
  const std::vector<uint32_t> system_prompt = Tokens(128, 1);
  std::vector<Prompt> first = {
      {"req-a", Concat(system_prompt, Tokens(72, 2)), {}},   // 200 tokens: 3 chunks + 8
      {"req-b", Concat(system_prompt, Tokens(128, 3)), {}},  // 256 tokens: 4 chunks
      {"req-c", Tokens(130, 4), {}},                         // 130 tokens: 2 chunks + 2
  };

  // ---- first run: prefill and store ----
  uint64_t stored = 0;
  {
    Cache cache;
    if (!OpenCache(dir, &cache) || !Register(cache, layout)) return 1;
    PagedKvCache paged(layout, /*shuffle_seed=*/0);
    std::printf("run 1 (L2 held %" PRIu64 " objects at start-up):\n", cache.recovered);
    for (Prompt& p : first) {
      if (!AllocateBlocks(paged, p)) return 1;
      Prefill(paged, p);
      const std::optional<uint64_t> written = Store(cache, paged, p);
      if (!written.has_value()) return 1;
      stored += *written;
      std::printf("  %s: %zu tokens, stored %" PRIu64 " of %" PRIu64 " chunks",
                  p.request_id.c_str(), p.tokens.size(), *written, ChunksOf(p));
      if (*written < ChunksOf(p))
        std::printf(" (%" PRIu64 " already in L1)", ChunksOf(p) - *written);
      std::printf("\n");
      // The request is done: drop its hashing session (and any leases).
      (void)cache.engine->EndSession(kScheduler, kModel, p.request_id);
    }
    if (!CloseCache(&cache)) return 1;
  }
  if (stored != 7) {
    Fail("expected 7 distinct chunks stored, got " + std::to_string(stored));
    return 1;
  }

  // ---- restart: new engine, new storage manager, same L2 directory, empty paged cache ----
  Cache cache;
  if (!OpenCache(dir, &cache) || !Register(cache, layout)) return 1;
  std::printf("restart: L1 empty, L2 index recovered %" PRIu64 " objects\n", cache.recovered);
  if (cache.recovered < stored) {
    Fail("the L2 directory lost objects across the restart");
    return 1;
  }
  PagedKvCache paged(layout, /*shuffle_seed=*/12345);

  // The same prompts, c grown by a follow-up turn (its first two chunks hit), and one new prompt.
  struct Step {
    Prompt prompt;
    bool two_phase;  // else SyncLookup
    uint64_t expected_hits;
  };
  std::vector<Step> second = {
      {{"req-a", first[0].tokens, {}}, true, 3},
      {{"req-b", first[1].tokens, {}}, false, 4},
      {{"req-c2", Concat(first[2].tokens, Tokens(100, 5)), {}}, false, 2},  // 230 tokens: 3 chunks
      {{"req-d", Tokens(150, 6), {}}, true, 0},                             // never stored
  };
  std::vector<const Prompt*> served;
  std::vector<uint64_t> served_tokens;
  bool ok = true;
  std::printf("run 2:\n");
  for (size_t i = 0; i < second.size(); ++i) {
    Prompt& p = second[i].prompt;
    if (!AllocateBlocks(paged, p)) return 1;
    const std::optional<LookupResult> hit =
        second[i].two_phase ? TwoPhaseLookup(cache, p) : SyncLookup(cache, p);
    if (!hit.has_value()) return 1;
    // The first lookup after the restart must be served from L2 alone.
    if (i == 0 && hit->l1_chunks != 0) ok = Fail("L1 was not empty after the restart");
    if (hit->hit_chunks != second[i].expected_hits) {
      ok = Fail(p.request_id + ": expected " + std::to_string(second[i].expected_hits) +
                " hits, got " + std::to_string(hit->hit_chunks));
    }
    if (hit->hit_chunks > 0 && !Retrieve(cache, paged, p, hit->hit_tokens)) return 1;
    served.push_back(&p);
    served_tokens.push_back(hit->hit_tokens);
    std::printf("  %-6s %-9s lookup: %" PRIu64 " of %" PRIu64 " chunks hit (L1 %" PRIu64
                ", L2 %" PRIu64 "), retrieved %" PRIu64 " of %zu tokens\n",
                p.request_id.c_str(), second[i].two_phase ? "two-phase" : "sync", hit->hit_chunks,
                ChunksOf(p), hit->l1_chunks, hit->l2_chunks, hit->hit_tokens, p.tokens.size());
    // A real server now prefills the remaining tokens, stores the new chunks and, when the
    // request finishes, ends its session. EndSession also returns leases a lookup took on chunks
    // the server did not retrieve.
    (void)cache.engine->EndSession(kScheduler, kModel, p.request_id);
  }

  uint64_t bytes = 0;
  const uint64_t mismatches = CountMismatches(paged, served, served_tokens, &bytes);
  if (mismatches != 0) ok = Fail(std::to_string(mismatches) + " bytes of the paged cache differ");
  const lmcache_cpp::EngineStats es = cache.engine->stats();
  const lmcache_cpp::StorageStats ss = cache.storage->stats();
  std::printf("checked %" PRIu64 " bytes of the paged cache: %" PRIu64 " mismatches\n", bytes,
              mismatches);
  std::printf("engine: %" PRIu64 " two-phase + %" PRIu64 " sync lookups, %" PRIu64
              " chunks hit (L2 %" PRIu64 "), %" PRIu64 " chunks retrieved\n",
              es.lookups, es.sync_lookups, es.hit_chunks, es.l2_hit_chunks, es.retrieve_chunks);
  std::printf("L2: %" PRIu64 " objects (%" PRIu64 " KiB), %" PRIu64 " keys loaded, %" PRIu64
              " KiB read; L1 read leases left: %" PRIu64 "\n",
              ss.l2[0].objects, ss.l2[0].bytes >> 10, ss.l2[0].loads, ss.l2[0].bytes_read >> 10,
              ss.l1.read_leases);
  // What a host hands its own metrics system: every engine counter by name, from the table that
  // also generates the server's STATUS and /metrics (stat_fields.h).
  std::printf("engine counters:");
  lmcache_cpp::ForEachStat(es, [](const auto& field, uint64_t value) {
    if (field.kind == lmcache_cpp::StatKind::kCounter && value != 0) {
      std::printf(" %s=%" PRIu64, field.name, value);
    }
  });
  std::printf("\n");
  if (ss.l1.read_leases != 0) ok = Fail("leases left after every session ended");
  if (!CloseCache(&cache)) return 1;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 2 || (argc == 2 && argv[1][0] == '-')) {
    std::fprintf(stderr, "usage: %s [DIR]\n  DIR holds the L2 files (default: a temporary one)\n",
                 argv[0]);
    return 2;
  }
  std::string dir;
  bool temporary = false;
  if (argc == 2) {
    dir = argv[1];
  } else {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/lmcache_cpp_embed.XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    dir = templ;
    temporary = true;
  }
  const int rc = Run(dir);
  if (temporary) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  return rc;
}
