// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Several threads reserve, write, lease, release, evict, reap and clear at random on a shared key
// space and a small arena (so eviction and out-of-memory happen often). Threads start together
// from a latch; loops are bounded; no sleeps. At the end: no leaked bytes, no object both free
// and leased, every lease accounted for (CheckInvariants cross-checks ledgers, slots, policy and
// allocator). Runs under ThreadSanitizer in CI.

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <random>
#include <thread>
#include <vector>

#include "lmcache_cpp/object_table.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace {

using testutil::Key;

TEST(ObjectTableConcurrencyTest, RandomOperationsKeepEveryInvariant) {
  constexpr uint64_t kUnit = 4096;
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 20000;
  constexpr uint64_t kKeySpace = 48;

  ArenaOptions ao;
  ao.size_bytes = 24 * kUnit;  // half the key space fits
  std::shared_ptr<Arena> arena(Arena::Create(ao).value().release());
  auto clock = std::make_shared<ManualClock>();
  ObjectTableOptions opts;
  opts.clock = clock;
  opts.high_watermark = 0.9;
  opts.low_watermark = 0.7;
  opts.reap_interval = std::chrono::milliseconds(1);
  auto table = ObjectTable::Create(arena, opts).value();
  table->Start();

  struct Counter : ObjectTableListener {
    void OnObjectsReady(const std::vector<ObjectKey>& k) override { ready += k.size(); }
    void OnObjectsRemoved(const std::vector<ObjectKey>& k, RemovalReason) override {
      removed += k.size();
    }
    std::atomic<uint64_t> ready{0}, removed{0};
  };
  auto counter = std::make_shared<Counter>();
  table->AddListener(counter);

  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::atomic<int> invariant_failures{0};
  std::atomic<uint64_t> served{0};

  auto worker = [&](int tid) {
    std::mt19937_64 rng(1234 + tid);
    start.wait();
    for (int op = 0; op < kOpsPerThread; ++op) {
      // Each "request" is unique to this thread and op, so ledgers never collide across threads
      // except where they are meant to (release of a prefix taken by the same request).
      const RequestId req = (static_cast<uint64_t>(tid) << 32) | static_cast<uint64_t>(op);
      const LeaseOwner owner{static_cast<ClientId>(tid), req};
      const uint64_t first = rng() % kKeySpace;
      const size_t n = 1 + rng() % 6;
      std::vector<ObjectKey> keys;
      for (size_t i = 0; i < n; ++i) keys.push_back(Key((first + i) % kKeySpace));
      switch (rng() % 9) {
        case 0:
        case 1: {  // store
          auto r = table->ReserveWrite(owner, keys, kUnit, {ReserveMode::kNewOnly, rng() % 4 == 0});
          if (!r.ok()) break;
          std::vector<ObjectKey> mine;
          for (const auto& res : *r) {
            if (!res.skipped) {
              std::memset(table->data(res.offset), tid, 64);
              mine.push_back(res.key);
            }
          }
          if (rng() % 5 == 0) {
            (void)table->AbortWrite(req, mine);
          } else {
            const uint32_t leases = static_cast<uint32_t>(rng() % 3);
            if (table->FinishWrite(req, mine, leases).ok() && leases > 0) {
              for (uint32_t l = 0; l < leases; ++l) (void)table->ReleaseRead(req, mine);
            }
          }
          break;
        }
        case 2:
        case 3: {  // lookup, read, release one by one (the MLA pattern with extra count)
          const uint32_t count = 1 + static_cast<uint32_t>(rng() % 3);
          const size_t hit = table->AcquireReadPrefix(owner, keys, count);
          served += hit;
          std::vector<ObjectKey> got(keys.begin(), keys.begin() + static_cast<long>(hit));
          for (uint32_t c = 0; c < count; ++c) {
            // LeaseNotHeld is legitimate only if another thread advanced the clock past the TTL.
            Status st = table->ReleaseRead(req, got);
            if (!st.ok() && st.code() != StatusCode::kLeaseNotHeld) invariant_failures++;
          }
          break;
        }
        case 4: {  // lookup then abandon: the request is dropped in bulk
          table->AcquireReadPrefix(owner, keys, 2);
          table->ReleaseRequest(req);
          break;
        }
        case 5: table->EvictBytes(kUnit * (1 + rng() % 3)); break;
        case 6: (void)table->Delete(keys); break;
        case 7: {  // a lease left to expire
          table->AcquireReadPrefix(owner, keys, 1);
          if (rng() % 2 == 0) clock->Advance(std::chrono::seconds(400));
          table->ReapExpired();
          break;
        }
        case 8:
          if (rng() % 50 == 0) {
            table->Clear(rng() % 2 == 0);
          } else if (!table->CheckInvariants().ok()) {
            invariant_failures++;
          }
          break;
      }
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  go.set_value();
  for (auto& th : threads) th.join();
  table->Stop();

  EXPECT_EQ(invariant_failures.load(), 0);
  Status st = table->CheckInvariants();
  ASSERT_TRUE(st.ok()) << st.ToString();
  // Leases left behind are only the ones abandoned on purpose (case 7); they all expire.
  clock->Advance(std::chrono::seconds(1000));
  table->ReapExpired();
  // Writes whose leases expired were quarantined for their writers, which are all done now.
  for (int t = 0; t < kThreads; ++t) {
    for (int op = 0; op < kOpsPerThread; ++op) {
      (void)table->ReleaseQuarantine((static_cast<uint64_t>(t) << 32) | static_cast<uint64_t>(op));
    }
  }
  EXPECT_EQ(table->stats().quarantined, 0u);
  ObjectTableStats s = table->stats();
  EXPECT_EQ(s.read_leases, 0u);
  EXPECT_EQ(s.write_leases, 0u);
  EXPECT_EQ(s.requests, 0u);
  EXPECT_EQ(s.detached, 0u);
  EXPECT_EQ(s.temporary, 0u) << "unleased temporary objects are freed";
  table->Clear(false);
  s = table->stats();
  EXPECT_EQ(s.objects, 0u);
  EXPECT_EQ(s.used_bytes, 0u) << "no leaked bytes";
  EXPECT_TRUE(table->CheckInvariants().ok());
  EXPECT_GT(served.load(), 0u) << "the workload must actually hit";
  EXPECT_GT(counter->ready.load(), 0u);
}

}  // namespace
}  // namespace lmcache_cpp
