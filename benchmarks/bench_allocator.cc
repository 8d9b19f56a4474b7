// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// bench_allocator: ExtentAllocator under churn.
//
// A 64 GiB *virtual* capacity (the allocator manages offsets only; no memory is touched) is
// filled to 80/90/95% with objects of one size (32 MiB, the uniform per-model case) or of mixed
// sizes ({1, 2, 4} x 32 MiB). Then N random pairs "free a random live object, allocate a new
// one" run; each case prints pairs per second and the allocation failure rate. The floor is the
// same number of std::map<uint64_t, uint64_t> erase+insert pairs on a map of the same population
// and the same precomputed random choices, measured in the same run; the ratio is
// allocator time / floor time.
//
// Usage: bench_allocator [pairs]   (default 1000000)

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "bench_util.h"
#include "lmcache_cpp/allocator.h"

namespace {

using lmcache_cpp::Extent;
using lmcache_cpp::ExtentAllocator;
using lmcache_cpp::bench::SecondsSince;

constexpr uint64_t kCapacity = uint64_t{64} << 30;  // 64 GiB
constexpr uint64_t kObject = uint64_t{32} << 20;    // 32 MiB

struct CaseResult {
  double seconds = 0;
  uint64_t failures = 0;
  uint64_t live_at_end = 0;
  double fill_at_end = 0;
  uint64_t free_extents = 0;
  double largest_free_objects = 0;  // in kObject units
};

// The random choices of one case, drawn before timing so both loops consume the same stream.
struct Plan {
  std::vector<uint64_t> victims;  // raw random numbers; index = value % live count
  std::vector<uint64_t> sizes;    // sizes of the replacement objects
};

Plan MakePlan(uint64_t pairs, bool mixed, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Plan plan;
  plan.victims.resize(pairs);
  plan.sizes.resize(pairs);
  for (uint64_t i = 0; i < pairs; ++i) {
    plan.victims[i] = rng();
    plan.sizes[i] = mixed ? kObject << (rng() % 3) : kObject;
  }
  return plan;
}

CaseResult RunAllocator(double fill, bool mixed, const Plan& plan, uint64_t seed) {
  ExtentAllocator alloc(kCapacity);
  std::mt19937_64 rng(seed);
  std::vector<Extent> live;
  const uint64_t target = static_cast<uint64_t>(fill * static_cast<double>(kCapacity));
  while (alloc.stats().used < target) {
    const uint64_t size = mixed ? kObject << (rng() % 3) : kObject;
    std::optional<Extent> e = alloc.Allocate(size);
    if (!e) break;
    live.push_back(*e);
  }

  CaseResult r;
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < plan.victims.size(); ++i) {
    if (!live.empty()) {
      const size_t v = plan.victims[i] % live.size();
      if (!alloc.Free(live[v]).ok()) std::abort();
      live[v] = live.back();
      live.pop_back();
    }
    std::optional<Extent> e = alloc.Allocate(plan.sizes[i]);
    if (e) {
      live.push_back(*e);
    } else {
      ++r.failures;
    }
  }
  r.seconds = SecondsSince(start);
  const lmcache_cpp::AllocatorStats s = alloc.stats();
  r.live_at_end = s.live_extents;
  r.fill_at_end = static_cast<double>(s.used) / static_cast<double>(s.capacity);
  r.free_extents = s.free_extents;
  r.largest_free_objects = static_cast<double>(s.largest_free) / static_cast<double>(kObject);
  if (!alloc.CheckInvariants().ok()) std::abort();
  return r;
}

// The floor: the same population in a std::map, the same victim choices, one erase and one
// insert per pair.
double RunFloor(uint64_t population, const Plan& plan) {
  std::map<uint64_t, uint64_t> map;
  std::vector<uint64_t> keys;
  keys.reserve(population + 1);
  uint64_t next_key = 0;
  for (uint64_t i = 0; i < population; ++i) {
    map.emplace(next_key, kObject);
    keys.push_back(next_key);
    next_key += kObject;
  }
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < plan.victims.size(); ++i) {
    if (!keys.empty()) {
      const size_t v = plan.victims[i] % keys.size();
      map.erase(keys[v]);
      keys[v] = keys.back();
      keys.pop_back();
    }
    map.emplace(next_key, plan.sizes[i]);
    keys.push_back(next_key);
    next_key += kObject;
  }
  const double seconds = SecondsSince(start);
  if (map.size() != keys.size()) std::abort();
  return seconds;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t pairs = 1000000;
  if (argc > 1) pairs = std::strtoull(argv[1], nullptr, 10);
  if (pairs == 0) {
    std::fprintf(stderr, "usage: %s [pairs > 0]\n", argv[0]);
    return 2;
  }
  std::printf("bench_allocator: capacity %llu GiB (virtual), object %llu MiB, %llu pairs/case\n",
              static_cast<unsigned long long>(kCapacity >> 30),
              static_cast<unsigned long long>(kObject >> 20),
              static_cast<unsigned long long>(pairs));
  uint64_t seed = 1;
  for (const bool mixed : {false, true}) {
    for (const double fill : {0.80, 0.90, 0.95}) {
      const Plan plan = MakePlan(pairs, mixed, seed);
      const CaseResult r = RunAllocator(fill, mixed, plan, seed + 100);
      const double floor_s = RunFloor(r.live_at_end, plan);
      const double rate = static_cast<double>(pairs) / r.seconds;
      const double floor_rate = static_cast<double>(pairs) / floor_s;
      std::printf(
          "%-7s fill %2.0f%%: %6.2f M pairs/s, failures %6.3f%%, end fill %5.1f%% "
          "(%llu holes, largest %.0f obj) | floor std::map %6.2f M pairs/s | ratio %.2fx\n",
          mixed ? "mixed" : "uniform", fill * 100, rate / 1e6,
          100.0 * static_cast<double>(r.failures) / static_cast<double>(pairs),
          100.0 * r.fill_at_end, static_cast<unsigned long long>(r.free_extents),
          r.largest_free_objects, floor_rate / 1e6, r.seconds / floor_s);
      ++seed;
    }
  }
  return 0;
}
