// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// L1 control path: prefix lookup + lease (AcquireReadPrefix) and release (ReleaseRead) of a
// 64-key request against a populated object table, in ns per key, next to the floor measured in
// the same run: finding the same 64 keys in a plain std::unordered_map with the same key hash.
// Target: within 5x of the floor. Prints; asserts nothing.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <unordered_map>
#include <vector>

#include "lmcache_cpp/object_table.h"

using namespace lmcache_cpp;  // NOLINT: benchmark program

namespace {

ObjectKey MakeKey(uint64_t i) {
  ObjectKey k;
  std::mt19937_64 rng(i * 7919 + 17);
  for (size_t b = 0; b < kChunkHashSize; b += 8) {
    uint64_t x = rng();
    std::memcpy(k.chunk.bytes.data() + b, &x, 8);
  }
  return k;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double NsPerKey(F&& body, size_t keys_per_iter, int iters) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) body(i);
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() /
         (static_cast<double>(iters) * static_cast<double>(keys_per_iter));
}

}  // namespace

int main() {
  constexpr size_t kObjects = 20000;
  constexpr size_t kRequestKeys = 64;
  constexpr int kIters = 20000;
  constexpr int kRounds = 7;

  ArenaOptions ao;
  ao.size_bytes = kObjects * 64 + (1 << 20);
  std::shared_ptr<Arena> arena(Arena::Create(ao).value().release());
  ObjectTableOptions opts;
  opts.alignment = 64;
  auto table = ObjectTable::Create(arena, opts).value();

  std::vector<ObjectKey> all;
  for (size_t i = 0; i < kObjects; ++i) all.push_back(MakeKey(i));
  for (size_t i = 0; i < kObjects; i += 256) {
    std::vector<ObjectKey> batch(all.begin() + static_cast<long>(i),
                                 all.begin() + static_cast<long>(std::min(kObjects, i + 256)));
    if (!table->ReserveWrite({1, 1}, batch, 64).ok() || !table->FinishWrite(1, batch).ok()) {
      std::fprintf(stderr, "populate failed\n");
      return 1;
    }
  }
  std::unordered_map<ObjectKey, uint32_t, ObjectKeyHash> floor_map;
  floor_map.reserve(kObjects);
  for (size_t i = 0; i < kObjects; ++i) floor_map.emplace(all[i], static_cast<uint32_t>(i));

  // 64 request key lists spread over the table.
  std::vector<std::vector<ObjectKey>> requests;
  for (size_t r = 0; r < 64; ++r) {
    size_t first = (r * 311) % (kObjects - kRequestKeys);
    requests.emplace_back(all.begin() + static_cast<long>(first),
                          all.begin() + static_cast<long>(first + kRequestKeys));
  }

  std::vector<double> floor_ns, lease_ns, lookup_only_ns;
  uint64_t sink = 0;
  for (int round = 0; round < kRounds; ++round) {
    floor_ns.push_back(NsPerKey(
        [&](int i) {
          for (const ObjectKey& k : requests[static_cast<size_t>(i) % requests.size()]) {
            auto it = floor_map.find(k);
            sink += it == floor_map.end() ? 0 : it->second;
          }
        },
        kRequestKeys, kIters));
    lease_ns.push_back(NsPerKey(
        [&](int i) {
          const auto& keys = requests[static_cast<size_t>(i) % requests.size()];
          const RequestId req = static_cast<RequestId>(i) + 100;
          size_t hit = table->AcquireReadPrefix({7, req}, keys);
          sink += hit;
          if (!table->ReleaseRead(req, keys).ok()) std::abort();
        },
        kRequestKeys, kIters));
    lookup_only_ns.push_back(NsPerKey(
        [&](int i) {
          sink += table->TouchPrefix(requests[static_cast<size_t>(i) % requests.size()]);
        },
        kRequestKeys, kIters));
  }
  const double f = Median(floor_ns), l = Median(lease_ns), t = Median(lookup_only_ns);
  std::printf("objects in table             : %zu, request: %zu keys, %d iterations x %d rounds\n",
              kObjects, kRequestKeys, kIters, kRounds);
  std::printf("floor unordered_map find     : %8.1f ns/key\n", f);
  std::printf("prefix lookup (touch, no lease): %6.1f ns/key  (%.2fx floor)\n", t, t / f);
  std::printf("prefix lease + release       : %8.1f ns/key  (%.2fx floor)\n", l, l / f);
  std::printf(
      "l1_control: lease+release %.1f ns/key, unordered_map find %.1f ns/key, ratio %.2f "
      "(target <= 5)\n",
      l, f, l / f);
  if (sink == 42) std::printf(" \n");
  return 0;
}
