// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Server-side handling of a lookup: CacheEngine::Lookup + QueryPrefetch (two-phase) and
// CacheEngine::SyncLookup of a key of 1, 16 and 64 chunks whose objects are all in L1, in µs per
// request (the EndSession that returns the leases runs after each, untimed); token mode (fresh
// request each time, so every chunk is hashed) and hash mode (32-byte block hashes, 16 blocks per
// chunk). Floors measured in the same run: the chunk hashing alone (ChunkHasher::HashTokens /
// HashFromBlockHashes of the same key), and the L1 lease + release of the same keys on the object
// table. Target (issue 4): a 64-chunk lookup handled in <= 20 µs. Prints; asserts nothing.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/chunk_hash.h"
#include "lmcache_cpp/object_table.h"

using namespace lmcache_cpp;  // NOLINT: benchmark program

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double P99(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, v.size() * 99 / 100)];
}

// Times body(i) only; cleanup(i) runs after each timed call, untimed.
template <typename F, typename G>
std::vector<double> TimeWithCleanup(int iters, F&& body, G&& cleanup) {
  std::vector<double> us;
  us.reserve(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    body(i);
    auto t1 = Clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    cleanup(i);
  }
  return us;
}

template <typename F>
std::vector<double> Time(int iters, F&& body) {
  return TimeWithCleanup(iters, std::forward<F>(body), [](int) {});
}

}  // namespace

int main() {
  constexpr uint32_t kChunk = 256;
  constexpr int kIters = 2000;
  constexpr ClientId kClient = 1;

  KvCacheLayout layout;
  layout.layout = KvLayout::kNHD;
  layout.num_layers = 1;
  layout.block_size = 16;
  layout.num_heads = 1;
  layout.head_size = 8;
  layout.element_size = 2;
  layout.num_blocks = 4096;
  const uint64_t object_bytes = layout.ObjectBytes(kChunk).value();

  StorageManagerConfig sc;
  sc.arena.size_bytes = 256 * object_bytes + (1 << 20);
  auto storage = StorageManager::Create(std::move(sc)).value();
  if (!storage->Start().ok()) return 1;
  EngineConfig ec;
  ec.chunk_size = kChunk;
  auto engine = CacheEngine::Create(storage.get(), ec).value();
  if (!engine->RegisterKvCache(kClient, "bench", 1, 0, layout).ok()) return 1;

  std::mt19937 rng(7);
  std::vector<uint32_t> tokens(64 * kChunk);
  for (auto& t : tokens) t = rng() % 32000;
  std::vector<uint8_t> block_hashes(64 * (kChunk / 16) * 32);
  for (auto& b : block_hashes) b = static_cast<uint8_t>(rng());

  auto key_for = [&](KeyMode mode, size_t chunks, const std::string& req, int worker) {
    EngineKey k;
    k.model_name = "bench";
    k.world_size = 1;
    k.worker_id = worker;
    k.request_id = req;
    k.mode = mode;
    if (mode == KeyMode::kTokens) {
      k.data = reinterpret_cast<const uint8_t*>(tokens.data());
      k.size = chunks * kChunk * 4;
    } else {
      k.data = block_hashes.data();
      k.size = chunks * (kChunk / 16) * 32;
    }
    return k;
  };
  // Populate L1 with the 64 chunks in both modes.
  for (KeyMode mode : {KeyMode::kTokens, KeyMode::kBlockHashes}) {
    auto t = engine->PrepareStore(kClient, key_for(mode, 64, "", 0)).value();
    if (!engine->CommitStore(kClient, t.handle).ok()) return 1;
  }

  const NamespaceConfig nsc{"bench", layout.Fingerprint() + "|ws=1", ""};
  const ChunkHasher hasher = ChunkHasher::Create(nsc, kChunk).value();

  std::printf("%-6s %-7s %6s %12s %12s %12s %12s %12s\n", "mode", "style", "chunks", "p50 us",
              "p99 us", "hash us", "lease us", "ratio");
  double target_p50 = 0;
  for (KeyMode mode : {KeyMode::kTokens, KeyMode::kBlockHashes}) {
    for (size_t chunks : {size_t{1}, size_t{16}, size_t{64}}) {
      // Floor 1: hashing the key alone.
      auto hash_us = Time(kIters, [&](int) {
        if (mode == KeyMode::kTokens) {
          auto h = hasher.HashTokens(tokens.data(), chunks * kChunk);
          if (h.size() != chunks) std::abort();
        } else {
          auto h = hasher.HashFromBlockHashes(block_hashes.data(), chunks * (kChunk / 16), 32, 16);
          if (!h.ok() || h->size() != chunks) std::abort();
        }
      });
      // Floor 2: leasing and releasing the same keys on the table.
      std::vector<ChunkHash> hashes =
          mode == KeyMode::kTokens
              ? hasher.HashTokens(tokens.data(), chunks * kChunk)
              : hasher.HashFromBlockHashes(block_hashes.data(), chunks * (kChunk / 16), 32, 16)
                    .value();
      const std::vector<ObjectKey> keys = KeysForRank(hashes, 0);
      auto lease_us = Time(kIters, [&](int i) {
        const RequestId r = 1000000 + static_cast<RequestId>(i);
        if (storage->table()->AcquireReadPrefix({kClient, r}, keys) != keys.size()) std::abort();
        if (!storage->table()->ReleaseRead(r, keys).ok()) std::abort();
      });
      for (int style = 0; style < 2; ++style) {
        std::vector<std::string> reqs(kIters);
        // Request ids are never reused: an id ended by END_SESSION stays ended for a while.
        for (int i = 0; i < kIters; ++i) {
          reqs[i] = "r" + std::to_string(static_cast<int>(mode)) + "." + std::to_string(chunks) +
                    "." + std::to_string(style) + "." + std::to_string(i);
        }
        auto us = TimeWithCleanup(
            kIters,
            [&](int i) {
              EngineKey k = key_for(mode, chunks, reqs[i], -1);
              if (style == 0) {
                JobHandle h = engine->Lookup(kClient, k, 1).value();
                auto r = engine->QueryPrefetch(kClient, h).value();
                if (!r.has_value() || r->hit_chunks != chunks) std::abort();
              } else {
                auto r = engine->SyncLookup(kClient, k, 1).value();
                if (r.hit_chunks != chunks) std::abort();
              }
            },
            [&](int i) {
              if (engine->EndSession(kClient, "bench", reqs[i]).value() != chunks) std::abort();
            });
        const double p50 = Median(us);
        const double floor = Median(hash_us) + Median(lease_us);
        std::printf("%-6s %-7s %6zu %12.2f %12.2f %12.2f %12.2f %11.2fx\n",
                    mode == KeyMode::kTokens ? "token" : "hash", style == 0 ? "2-phase" : "sync",
                    chunks, p50, P99(us), Median(hash_us), Median(lease_us), p50 / floor);
        if (mode == KeyMode::kBlockHashes && chunks == 64 && style == 0) target_p50 = p50;
      }
    }
  }
  std::printf("note: 'ratio' = p50 / (hash + lease floors)\n");
  std::printf("bench_engine: 64-chunk hash-mode lookup handled in %.2f us p50 (target <= 20 us)\n",
              target_p50);
  engine.reset();
  storage->Stop();
  return 0;
}
