// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// bench_kv_copy: the CPU copy kernels (kv_copy.h) on a 7B-class KV cache.
//
// Layout: 32 layers, 8 KV heads, head size 128, bf16 (2 bytes), block size 16, NHD and HND, with
// `num_blocks` blocks per layer (default 1024: 2 GiB of engine memory). One request = 16 chunks of
// 256 tokens (16 blocks each, random distinct block ids), gathered into (store) and scattered
// from (retrieve) 16 objects of 32 MiB in one buffer: 512 MiB per request, copied as 16 384
// block-plane pieces of 32 KiB. GatherBatch / ScatterBatch run on the calling thread only, and
// on `threads` threads (a CopyThreadPool of threads - 1 workers plus the caller) with the default
// options (non-temporal stores: the request is far larger than the cache) and, for comparison,
// with regular stores (streaming_threshold_bytes = UINT64_MAX).
//
// Floors, measured in the same run over the same total bytes: glibc memcpy of one contiguous
// 512 MiB source into the object buffer, (a) one memcpy call on one thread, (b) the same copy cut
// into one contiguous range per thread, run on the same threads through the same pool. Every case
// runs once per round, rounds interleaved so that a shared machine's noise hits all cases alike;
// each figure is the best of `repeats` rounds. Ratios: kernel GB/s / memcpy GB/s with the same
// thread count; the target is >= 0.8 of the multi-threaded memcpy.
//
// Checksums: the store with a CRC32C per object (ChunkCopy::crc32c) against the same store
// without, NHD, 16-chunk requests of two object sizes: 32 MiB (the layout above, 32 KiB block
// planes) and 6 MiB (24 layers, 2 KV heads of 128, bf16: 8 KiB block planes, 96 MiB per request),
// on 1 thread and on `threads` threads, rounds interleaved as above. Ratio: GB/s with / without,
// of the best rounds and the median over rounds of the two adjacent runs; the target is >= 0.9
// (a checksum costs at most ~10% of the copy). For reference, Crc32c alone over a buffer in L1
// and over the whole 512 MiB request (from memory), on one thread.
//
// Usage: bench_kv_copy [num_blocks] [repeats] [threads]   (defaults 1024, 5, all cores)

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../cpp/src/crc32c.h"  // internal (not installed): for the checksum-alone reference
#include "bench_util.h"
#include "lmcache_cpp/kv_copy.h"

namespace {

using lmcache_cpp::BlockIdSpan;
using lmcache_cpp::ChunkCopy;
using lmcache_cpp::CopyOptions;
using lmcache_cpp::CopyThreadPool;
using lmcache_cpp::KvCacheLayout;
using lmcache_cpp::KvCacheView;
using lmcache_cpp::KvLayout;
using lmcache_cpp::bench::ArgOr;
using lmcache_cpp::bench::BestSeconds;
using lmcache_cpp::bench::GBps;

constexpr uint32_t kLayers = 32;
constexpr uint32_t kHeads = 8;
constexpr uint32_t kHeadSize = 128;
constexpr uint32_t kElement = 2;
constexpr uint32_t kBlockSize = 16;
constexpr uint64_t kChunkSize = 256;
constexpr size_t kChunks = 16;

void Check(const lmcache_cpp::Status& st, const char* what) {
  if (!st.ok()) lmcache_cpp::bench::Fail(std::string("bench_kv_copy: ") + what, st);
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t num_blocks = ArgOr<uint64_t>(argc, argv, 1, 1024);
  const int repeats = ArgOr(argc, argv, 2, 5);
  const size_t hw = std::max<size_t>(std::thread::hardware_concurrency(), 1);
  const size_t threads = ArgOr(argc, argv, 3, hw);
  const uint64_t blocks_per_request = kChunks * kChunkSize / kBlockSize;
  if (num_blocks < blocks_per_request || repeats < 1 || threads < 1) {
    std::fprintf(stderr, "usage: bench_kv_copy [num_blocks >= %llu] [repeats >= 1] [threads]\n",
                 static_cast<unsigned long long>(blocks_per_request));
    return 2;
  }
  // The pool the kernels and the memcpy floor share: threads - 1 workers plus the caller.
  CopyThreadPool pool(threads - 1);

  KvCacheLayout base;
  base.num_layers = kLayers;
  base.block_size = kBlockSize;
  base.num_heads = kHeads;
  base.head_size = kHeadSize;
  base.element_size = kElement;
  base.num_blocks = num_blocks;
  const uint64_t layer_bytes = 2 * num_blocks * base.BlockPlaneBytes();
  std::vector<std::vector<uint8_t>> layers(kLayers);
  std::mt19937_64 rng(42);
  for (auto& l : layers) {
    l.resize(layer_bytes);
    for (size_t i = 0; i < l.size(); i += 4096) l[i] = static_cast<uint8_t>(rng());
  }
  Check(base.Validate(), "layout");
  const uint64_t object_bytes = *base.ObjectBytes(kChunkSize);
  const uint64_t request_bytes = object_bytes * kChunks;
  std::vector<uint8_t> buffer(request_bytes, 1);
  std::vector<uint8_t> source(request_bytes, 2);  // the memcpy floor's contiguous source

  std::vector<int64_t> all(num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::vector<int64_t>> ids(kChunks);
  for (size_t c = 0; c < kChunks; ++c) {
    const size_t n = kChunkSize / kBlockSize;
    ids[c].assign(all.begin() + c * n, all.begin() + (c + 1) * n);
  }
  std::vector<ChunkCopy> chunks(kChunks);
  for (size_t c = 0; c < kChunks; ++c) {
    chunks[c].block_ids = BlockIdSpan(ids[c]);
    chunks[c].num_tokens = kChunkSize;
    chunks[c].object = buffer.data() + c * object_bytes;
    chunks[c].object_size = object_bytes;
  }

  std::printf(
      "bench_kv_copy: L%u H%u D%u E%u BS%u, %zu chunks x %llu tokens = %.0f MiB per request "
      "(%llu pieces of %llu KiB), %llu blocks per layer, %zu threads, best of %d\n",
      kLayers, kHeads, kHeadSize, kElement, kBlockSize, kChunks,
      static_cast<unsigned long long>(kChunkSize), static_cast<double>(request_bytes) / (1 << 20),
      static_cast<unsigned long long>(request_bytes / base.BlockPlaneBytes()),
      static_cast<unsigned long long>(base.BlockPlaneBytes() >> 10),
      static_cast<unsigned long long>(num_blocks), threads, repeats);

  CopyOptions single;
  single.num_threads = 1;
  CopyOptions multi;
  multi.pool = &pool;
  multi.num_threads = threads;
  CopyOptions multi_cached = multi;  // regular stores, for comparison
  multi_cached.streaming_threshold_bytes = UINT64_MAX;

  std::vector<KvCacheView> views;
  for (KvLayout kind : {KvLayout::kNHD, KvLayout::kHND}) {
    KvCacheView view;
    view.layout = base;
    view.layout.layout = kind;
    for (auto& l : layers) view.layers.push_back(l.data());
    views.push_back(view);
  }

  // Every case runs once per round, rounds interleaved, so that the noise of a shared machine
  // falls on floors and kernels alike; each case keeps its best round.
  struct Case {
    std::string name;
    std::function<void()> run;
    double best = 1e30;
  };
  std::vector<Case> cases;
  cases.push_back({"memcpy 1 thread (one big copy)",
                   [&] { std::memcpy(buffer.data(), source.data(), request_bytes); }});
  cases.push_back(
      {"memcpy " + std::to_string(threads) + " threads (one big copy, 1 range each)", [&] {
         const uint64_t per = (request_bytes + threads - 1) / threads;
         pool.ParallelFor(threads, threads, [&](size_t t) {
           const uint64_t begin = std::min(t * per, request_bytes);
           const uint64_t end = std::min(begin + per, request_bytes);
           std::memcpy(buffer.data() + begin, source.data() + begin, end - begin);
         });
       }});
  for (const KvCacheView& view : views) {
    const std::string name = lmcache_cpp::KvLayoutName(view.layout.layout);
    const KvCacheView* v = &view;
    const std::string mt = std::to_string(threads) + " threads";
    const std::pair<std::string, const CopyOptions*> variants[] = {
        {" 1 thread", &single}, {" " + mt, &multi}, {" " + mt + ", regular stores", &multi_cached}};
    for (const bool store : {true, false}) {
      for (const auto& [suffix, options] : variants) {
        cases.push_back({name + (store ? " store" : " retrieve") + suffix, [&, v, store, options] {
                           Check(store ? GatherBatch(*v, kChunkSize, chunks, *options)
                                       : ScatterBatch(*v, kChunkSize, chunks, *options),
                                 store ? "gather" : "scatter");
                         }});
      }
    }
  }
  for (int r = 0; r < repeats; ++r) {
    for (Case& c : cases) c.best = std::min(c.best, BestSeconds(1, c.run));
  }
  const double memcpy_1t = GBps(request_bytes, cases[0].best);
  const double memcpy_mt = GBps(request_bytes, cases[1].best);
  for (size_t i = 0; i < cases.size(); ++i) {
    const double gbps = GBps(request_bytes, cases[i].best);
    const bool one_thread = cases[i].name.find(" 1 thread") != std::string::npos;
    std::printf("  %-52s %6.2f GB/s", cases[i].name.c_str(), gbps);
    if (i >= 2) {
      std::printf("  %.2fx memcpy %s", gbps / (one_thread ? memcpy_1t : memcpy_mt),
                  one_thread ? "1 thread" : "multi-threaded");
    }
    std::printf("\n");
  }
  // Summary lines: the multi-threaded kernels against the multi-threaded memcpy.
  for (size_t v = 0; v < views.size(); ++v) {
    const char* name = lmcache_cpp::KvLayoutName(views[v].layout.layout);
    const double store = GBps(request_bytes, cases[2 + 6 * v + 1].best);
    const double retrieve = GBps(request_bytes, cases[2 + 6 * v + 4].best);
    std::printf("kv_copy store %s: %.2f GB/s, floor %.2f GB/s, ratio %.2f (target >= 0.8)\n", name,
                store, memcpy_mt, store / memcpy_mt);
    std::printf("kv_copy retrieve %s: %.2f GB/s, floor %.2f GB/s, ratio %.2f (target >= 0.8)\n",
                name, retrieve, memcpy_mt, retrieve / memcpy_mt);
  }

  // ---- Checksums: the store with and without a CRC32C per object -------------------------------
  struct Model {
    const char* name;
    uint32_t layers;
    uint32_t heads;
    std::vector<std::vector<uint8_t>>* tensors;  // empty: allocated and filled here
  };
  std::vector<std::vector<uint8_t>> small_layers;
  const Model models[] = {{"6 MiB objects", 24, 2, &small_layers},
                          {"32 MiB objects", 32, 8, &layers}};
  struct CrcCase {
    std::string name;
    uint64_t bytes = 0;
    std::function<void()> without, with;
    double best_without = 1e30, best_with = 1e30;
    std::vector<double> round_ratios;  // with / without GB/s of each round (adjacent runs)
  };
  std::vector<CrcCase> crc_cases;
  std::vector<KvCacheView> crc_views;
  std::vector<std::vector<ChunkCopy>> crc_chunks;    // per model: without checksums
  std::vector<std::vector<ChunkCopy>> crc_chunks_c;  // per model: with
  std::vector<uint32_t> crcs(kChunks);
  crc_views.reserve(2);
  crc_chunks.reserve(2);
  crc_chunks_c.reserve(2);
  for (const Model& m : models) {
    KvCacheLayout lay = base;
    lay.num_layers = m.layers;
    lay.num_heads = m.heads;
    if (m.tensors->empty()) {
      const uint64_t bytes = 2 * num_blocks * lay.BlockPlaneBytes();
      m.tensors->resize(m.layers);
      for (auto& l : *m.tensors) {
        l.resize(bytes);
        for (size_t i = 0; i < l.size(); i += 4096) l[i] = static_cast<uint8_t>(rng());
      }
    }
    KvCacheView view;
    view.layout = lay;
    for (auto& l : *m.tensors) view.layers.push_back(l.data());
    Check(view.Validate(), "checksum layout");
    crc_views.push_back(view);
    const uint64_t obj = *lay.ObjectBytes(kChunkSize);
    std::vector<ChunkCopy> plain = chunks;
    for (size_t c = 0; c < kChunks; ++c) {
      plain[c].object = buffer.data() + c * obj;
      plain[c].object_size = obj;
    }
    std::vector<ChunkCopy> summed = plain;
    for (size_t c = 0; c < kChunks; ++c) summed[c].crc32c = &crcs[c];
    crc_chunks.push_back(plain);
    crc_chunks_c.push_back(summed);
    const KvCacheView* v = &crc_views.back();
    const std::vector<ChunkCopy>* without = &crc_chunks.back();
    const std::vector<ChunkCopy>* with = &crc_chunks_c.back();
    char piece[32];
    std::snprintf(piece, sizeof(piece), "%llu KiB pieces",
                  static_cast<unsigned long long>(lay.BlockPlaneBytes() >> 10));
    for (const CopyOptions* o : {&single, &multi}) {
      const std::string t = o == &single ? "1 thread" : std::to_string(threads) + " threads";
      CrcCase c;
      c.name = std::string("store nhd ") + m.name + " (" + piece + "), " + t;
      c.bytes = obj * kChunks;
      c.without = [&, v, without, o] {
        Check(GatherBatch(*v, kChunkSize, *without, *o), "gather");
      };
      c.with = [&, v, with, o] { Check(GatherBatch(*v, kChunkSize, *with, *o), "gather+crc"); };
      crc_cases.push_back(std::move(c));
    }
  }
  std::vector<uint8_t> hot(16 << 10, 3);
  double crc_hot = 1e30;
  double crc_cold = 1e30;
  uint32_t sink = 0;
  for (int r = 0; r < repeats; ++r) {
    for (CrcCase& c : crc_cases) {
      const double without = BestSeconds(1, c.without);
      const double with = BestSeconds(1, c.with);
      c.best_without = std::min(c.best_without, without);
      c.best_with = std::min(c.best_with, with);
      c.round_ratios.push_back(without / with);
    }
    crc_hot = std::min(crc_hot, BestSeconds(1, [&] {
                         for (int i = 0; i < 4096; ++i) {
                           sink += lmcache_cpp::internal::Crc32c(hot.data(), hot.size());
                         }
                       }));
    crc_cold = std::min(crc_cold, BestSeconds(1, [&] {
                          sink += lmcache_cpp::internal::Crc32c(buffer.data(), request_bytes);
                        }));
  }
  std::printf("checksums (CRC32C while gathering; fold path %s):\n",
              lmcache_cpp::internal::Crc32cFoldAvailable() ? "on" : "off");
  // Two ratios: of the best rounds, and the median of each round's pair of adjacent runs (less
  // sensitive to a neighbour that takes a core or the memory bus for part of the run).
  for (CrcCase& c : crc_cases) {
    const double without = GBps(c.bytes, c.best_without);
    const double with = GBps(c.bytes, c.best_with);
    std::sort(c.round_ratios.begin(), c.round_ratios.end());
    std::printf(
        "  %-50s %6.2f GB/s, with crc %6.2f GB/s, ratio %.3f, median of rounds %.3f "
        "(target >= 0.9)\n",
        c.name.c_str(), without, with, with / without, c.round_ratios[c.round_ratios.size() / 2]);
  }
  std::printf(
      "  crc32c alone, 1 thread: 16 KiB in L1 %.2f GB/s, %.0f MiB from memory %.2f GB/s"
      " (%08x)\n",
      GBps(4096 * hot.size(), crc_hot), static_cast<double>(request_bytes) / (1 << 20),
      GBps(request_bytes, crc_cold), sink);
  return 0;
}
