// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Prefetch pipeline overhead and the CPU cost of waiting.
//
// 1. A 64-chunk L2 hit on MemoryL2Adapter with infinite bandwidth and no latency, through a
//    StorageManager, in microseconds end to end (median and p90 over many runs): two-phase
//    (Submit -> Wait) and synchronous (LookupAndPin -> WaitLoad). L1 is empty before each run
//    (the previous run's temporary objects are freed with its leases, outside the timed region).
//    Floors measured in the same run: the adapter's own lookup-and-pin + load + unpin of the same
//    64 objects through its asynchronous API, each waited with a promise (the L2 traffic the
//    pipeline cannot avoid), and a plain memcpy of the same bytes. Target: within 2x of the
//    adapter floor.
// 2. CPU time of the whole process (getrusage) while a started manager has nothing to do for 2 s,
//    and while a prefetch waits 2 s on a stalled adapter: in ms and as a fraction of wall time
//    (target ~0: every thread sleeps on a condition variable).
//
// Usage: bench_prefetch [object_bytes (default 16384)] [runs (default 2000)]. Prints; asserts
// nothing.

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "bench_util.h"
#include "lmcache_cpp/prefetch_controller.h"
#include "lmcache_cpp/storage_manager.h"
#include "testing/memory_adapter.h"

using namespace lmcache_cpp;  // NOLINT: benchmark program
using lmcache_cpp::bench::ArgOr;
using lmcache_cpp::bench::Fail;

namespace {

constexpr size_t kChunks = 64;
constexpr ClientId kClient = 1;

ObjectKey MakeKey(uint64_t i) {
  ObjectKey k;
  std::mt19937_64 rng(i * 7919 + 17);
  for (size_t b = 0; b < kChunkHashSize; b += 8) {
    const uint64_t x = rng();
    std::memcpy(k.chunk.bytes.data() + b, &x, 8);
  }
  return k;
}

struct Summary {
  double median_us = 0;
  double p90_us = 0;
};

Summary Summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 9 / 10]};
}

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

double CpuMs() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 +
         (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

// Waits for one adapter completion (the floor's "waited with a promise").
Bitmap Await(const std::function<void(StoreCallback)>& submit) {
  std::promise<Bitmap> done;
  submit([&done](const Status& st, const Bitmap& bits) {
    if (!st.ok()) std::fprintf(stderr, "adapter call failed: %s\n", st.ToString().c_str());
    done.set_value(bits);
  });
  return done.get_future().get();
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t object_size = ArgOr<uint64_t>(argc, argv, 1, 16384);
  const int runs = ArgOr(argc, argv, 2, 2000);
  const int warmup = std::max(runs / 10, 10);
  const uint64_t total_bytes = kChunks * object_size;

  std::vector<ObjectKey> keys;
  for (size_t i = 0; i < kChunks; ++i) keys.push_back(MakeKey(i));
  std::vector<std::vector<uint8_t>> data(kChunks, std::vector<uint8_t>(object_size));
  for (size_t i = 0; i < kChunks; ++i) std::fill(data[i].begin(), data[i].end(), uint8_t(i));

  auto adapter = std::shared_ptr<MemoryL2Adapter>(
      MemoryL2Adapter::Create(MemoryAdapterOptions{}).value().release());
  {
    std::vector<ConstBuffer> bufs;
    for (const auto& d : data) bufs.push_back({d.data(), d.size()});
    const Bitmap stored =
        Await([&](StoreCallback cb) { adapter->SubmitStore(keys, bufs, std::move(cb)); });
    if (!stored.All()) Fail("store", Status::Internal("not every object stored"));
  }

  StorageManagerConfig config;
  config.arena.size_bytes = 2 * total_bytes + (1 << 20);
  config.table.high_watermark = 1.0;
  config.table.low_watermark = 1.0;
  config.adapters = {adapter};
  auto made = StorageManager::Create(config);
  if (!made.ok()) Fail("StorageManager::Create", made.status());
  std::unique_ptr<StorageManager> manager = std::move(made).value();
  if (Status st = manager->Start(); !st.ok()) Fail("Start", st);
  PrefetchController* prefetch = manager->prefetch();

  PrefetchRequest request;
  request.keys = keys;
  request.object_size = object_size;

  // ---- two-phase: Submit -> Wait ------------------------------------------------------------
  std::vector<double> two_phase;
  for (int i = 0; i < warmup + runs; ++i) {
    request.owner = {kClient, static_cast<RequestId>(i + 1)};
    const auto t0 = std::chrono::steady_clock::now();
    auto handle = prefetch->Submit(request);
    if (!handle.ok()) Fail("Submit", handle.status());
    auto result = prefetch->Wait(kClient, *handle, std::chrono::seconds(30));
    const double us = Since(t0);
    if (!result.ok() || !result->has_value() || (*result)->hits != kChunks) {
      Fail("Wait", result.ok() ? Status::Internal("not a full hit") : result.status());
    }
    if (i >= warmup) two_phase.push_back(us);
    manager->EndRequest(request.owner.request);  // frees the temporaries: L1 empty again
  }

  // ---- synchronous: LookupAndPin -> WaitLoad -------------------------------------------------
  std::vector<double> sync;
  for (int i = 0; i < warmup + runs; ++i) {
    request.owner = {kClient, static_cast<RequestId>(1000000 + i)};
    const auto t0 = std::chrono::steady_clock::now();
    auto lookup = prefetch->LookupAndPin(request, std::chrono::seconds(30));
    if (!lookup.ok() || lookup->hits != kChunks) {
      Fail("LookupAndPin", lookup.ok() ? Status::Internal("not a full hit") : lookup.status());
    }
    auto loaded = prefetch->WaitLoad(request.owner.request, std::chrono::seconds(30));
    const double us = Since(t0);
    if (!loaded.ok() || loaded->hits != kChunks) {
      Fail("WaitLoad", loaded.ok() ? Status::Internal("not a full hit") : loaded.status());
    }
    if (i >= warmup) sync.push_back(us);
    manager->EndRequest(request.owner.request);
  }

  // ---- floors ----------------------------------------------------------------------------
  std::vector<std::vector<uint8_t>> out(kChunks, std::vector<uint8_t>(object_size));
  std::vector<MutableBuffer> out_bufs;
  for (auto& o : out) out_bufs.push_back({o.data(), o.size()});
  std::vector<double> adapter_floor;
  for (int i = 0; i < warmup + runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const Bitmap pinned =
        Await([&](StoreCallback cb) { adapter->SubmitLookupAndPin(keys, std::move(cb)); });
    const Bitmap loaded =
        Await([&](StoreCallback cb) { adapter->SubmitLoad(keys, out_bufs, std::move(cb)); });
    adapter->Unpin(keys);
    const double us = Since(t0);
    if (!pinned.All() || !loaded.All()) Fail("adapter floor", Status::Internal("miss"));
    if (i >= warmup) adapter_floor.push_back(us);
  }
  std::vector<double> memcpy_floor;
  uint64_t sink = 0;
  for (int i = 0; i < warmup + runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t c = 0; c < kChunks; ++c) std::memcpy(out[c].data(), data[c].data(), object_size);
    const double us = Since(t0);
    sink += out[i % kChunks][i % object_size];
    if (i >= warmup) memcpy_floor.push_back(us);
  }

  const Summary tp = Summarize(two_phase);
  const Summary sy = Summarize(sync);
  const Summary af = Summarize(adapter_floor);
  const Summary mf = Summarize(memcpy_floor);
  std::printf("request: %zu chunks x %llu bytes (%.1f MiB), %d runs (+%d warm-up)\n", kChunks,
              static_cast<unsigned long long>(object_size), total_bytes / 1048576.0, runs, warmup);
  std::printf("floor memcpy of the bytes          : median %8.1f us  p90 %8.1f us\n", mf.median_us,
              mf.p90_us);
  std::printf("floor adapter lookup+load+unpin    : median %8.1f us  p90 %8.1f us\n", af.median_us,
              af.p90_us);
  std::printf(
      "two-phase Submit -> Wait           : median %8.1f us  p90 %8.1f us  (%.2fx adapter floor, "
      "%.2fx memcpy)\n",
      tp.median_us, tp.p90_us, tp.median_us / af.median_us, tp.median_us / mf.median_us);
  std::printf(
      "sync LookupAndPin -> WaitLoad      : median %8.1f us  p90 %8.1f us  (%.2fx adapter floor, "
      "%.2fx memcpy)\n",
      sy.median_us, sy.p90_us, sy.median_us / af.median_us, sy.median_us / mf.median_us);

  // ---- CPU while idle ----------------------------------------------------------------------
  constexpr auto kWindow = std::chrono::seconds(2);
  double cpu0 = CpuMs();
  auto w0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(kWindow);
  const double idle_cpu = CpuMs() - cpu0;
  const double idle_wall = Since(w0) / 1e3;
  std::printf("CPU while idle (manager started)   : %8.2f ms in %.0f ms wall (%.4f of wall)\n",
              idle_cpu, idle_wall, idle_cpu / idle_wall);

  // ---- CPU while a prefetch waits on a stalled adapter ------------------------------------
  adapter->SetStalled(true);
  request.owner = {kClient, 2000000};
  auto handle = prefetch->Submit(request);
  if (!handle.ok()) Fail("Submit", handle.status());
  cpu0 = CpuMs();
  w0 = std::chrono::steady_clock::now();
  auto waited = prefetch->Wait(kClient, *handle, kWindow);
  const double stall_cpu = CpuMs() - cpu0;
  const double stall_wall = Since(w0) / 1e3;
  if (!waited.ok() || waited->has_value()) {
    std::fprintf(stderr, "expected the wait to time out on the stalled adapter\n");
  }
  std::printf("CPU while a prefetch waits (stall) : %8.2f ms in %.0f ms wall (%.4f of wall)\n",
              stall_cpu, stall_wall, stall_cpu / stall_wall);
  adapter->SetStalled(false);
  auto finished = prefetch->Wait(kClient, *handle, std::chrono::seconds(30));
  if (!finished.ok() || !finished->has_value()) Fail("Wait after stall", finished.status());
  manager->EndRequest(request.owner.request);
  manager->Stop();

  std::printf(
      "bench_prefetch: 64-chunk L2 hit %.1f us (sync %.1f us), adapter floor %.1f us, ratio "
      "%.2fx (target <= 2x); idle CPU %.4f, stalled-wait CPU %.4f of wall (target ~0)\n",
      tp.median_us, sy.median_us, af.median_us, tp.median_us / af.median_us, idle_cpu / idle_wall,
      stall_cpu / stall_wall);
  if (sink == 42) std::printf(" \n");
  return 0;
}
