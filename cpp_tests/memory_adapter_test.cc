// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "testing/memory_adapter.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "l2_test_util.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace {

using std::chrono::milliseconds;
using namespace testutil;              // NOLINT(build/namespaces): the L2 test helpers
using namespace testutil::sync_calls;  // NOLINT(build/namespaces)

constexpr auto kLong = std::chrono::seconds(30);

std::unique_ptr<MemoryL2Adapter> Make(MemoryAdapterOptions options = {}) {
  auto r = MemoryL2Adapter::Create(options);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

// An adapter with `workers` worker threads that holds every operation until SetStalled(false).
std::unique_ptr<MemoryL2Adapter> MakeStalled(size_t workers) {
  MemoryAdapterOptions o;
  o.worker_threads = workers;
  auto a = Make(o);
  a->SetStalled(true);
  return a;
}

TEST(MemoryAdapterTest, CreateRejectsZeroWorkers) {
  MemoryAdapterOptions o;
  o.worker_threads = 0;
  EXPECT_TRUE(testutil::FailsWith(MemoryL2Adapter::Create(o), StatusCode::kInvalidArgument));
}

TEST(MemoryAdapterTest, StoreLookupLoadRoundTripPreservesBytes) {
  auto a = Make();
  auto keys = Keys(0, 4);
  auto data = Patterns(100, 4, 4096 + 7);
  Status st;
  EXPECT_TRUE(Store(*a, keys, data, &st).All());
  EXPECT_TRUE(st.ok());
  EXPECT_TRUE(Lookup(*a, keys, &st).All());
  EXPECT_TRUE(st.ok());
  auto out = Zeros(4, 4096 + 7);
  EXPECT_TRUE(Load(*a, keys, &out, &st).All());
  EXPECT_TRUE(st.ok());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(out[i], data[i]) << "key " << i;
  a->Unpin(keys);
  EXPECT_EQ(a->TotalPins(), 0u);
  L2AdapterStats s = a->stats();
  EXPECT_EQ(s.objects, 4u);
  EXPECT_EQ(s.bytes, 4u * (4096 + 7));
  EXPECT_EQ(s.stores, 4u);
  EXPECT_EQ(s.loads, 4u);
  EXPECT_EQ(s.load_misses, 0u);
  EXPECT_EQ(s.in_flight, 0u);
}

TEST(MemoryAdapterTest, LookupPinsOnlyPresentKeysAndUnpinReturnsPinsToZero) {
  auto a = Make();
  auto stored = Keys(0, 3);
  Store(*a, stored, Patterns(0, 3, 64));
  std::vector<ObjectKey> asked = {Key(0), Key(50), Key(1), Key(51), Key(2)};
  Bitmap pinned = Lookup(*a, asked);
  EXPECT_EQ(pinned.ToString(), "10101");
  EXPECT_EQ(a->PinCount(Key(0)), 1u);
  EXPECT_EQ(a->PinCount(Key(50)), 0u);
  EXPECT_EQ(a->TotalPins(), 3u);
  EXPECT_EQ(a->stats().pinned_objects, 3u);
  a->Unpin(stored);
  EXPECT_EQ(a->TotalPins(), 0u);
  for (const auto& k : stored) EXPECT_EQ(a->PinCount(k), 0u);
  EXPECT_EQ(a->stats().bad_unpins, 0u);
}

TEST(MemoryAdapterTest, PinsAreCountedPerKey) {
  auto a = Make();
  Store(*a, {Key(1)}, {Pattern(1, 32)});
  Lookup(*a, {Key(1)});
  Lookup(*a, {Key(1)});
  EXPECT_EQ(a->PinCount(Key(1)), 2u);
  a->Unpin({Key(1)});
  EXPECT_EQ(a->PinCount(Key(1)), 1u);
  a->Unpin({Key(1)});
  EXPECT_EQ(a->PinCount(Key(1)), 0u);
  EXPECT_EQ(a->stats().pinned_objects, 0u);
}

TEST(MemoryAdapterTest, UnpinOfUnpinnedKeyIsIgnoredAndCounted) {
  auto a = Make();
  Store(*a, {Key(1)}, {Pattern(1, 32)});
  a->Unpin({Key(1), Key(99)});
  EXPECT_EQ(a->stats().bad_unpins, 2u);
  EXPECT_EQ(a->TotalPins(), 0u);
}

TEST(MemoryAdapterTest, StoreOfPresentKeyIsReportedStoredWithoutRewriting) {
  auto a = Make();
  auto first = Pattern(1, 128);
  Store(*a, {Key(1)}, {first});
  EXPECT_TRUE(Store(*a, {Key(1)}, {Pattern(2, 128)}).All());
  auto out = Zeros(1, 128);
  EXPECT_TRUE(Load(*a, {Key(1)}, &out).All());
  EXPECT_EQ(out[0], first);
  EXPECT_EQ(a->stats().objects, 1u);
}

TEST(MemoryAdapterTest, LoadOfAbsentKeyOrIntoWrongSizeBufferIsAMiss) {
  auto a = Make();
  Store(*a, {Key(1)}, {Pattern(1, 128)});
  std::vector<std::vector<uint8_t>> out = {std::vector<uint8_t>(127), std::vector<uint8_t>(128),
                                           std::vector<uint8_t>(128)};
  Status st;
  Bitmap bits = Load(*a, {Key(1), Key(2), Key(1)}, &out, &st);
  EXPECT_TRUE(st.ok());
  EXPECT_EQ(bits.ToString(), "001");
  EXPECT_EQ(out[2], Pattern(1, 128));
  EXPECT_EQ(a->stats().load_misses, 2u);
}

TEST(MemoryAdapterTest, MismatchedKeysAndBuffersIsInvalidArgument) {
  auto a = Make();
  std::vector<uint8_t> d(8);
  Completion c;
  a->SubmitStore(Keys(0, 2), {In(d)}, c.Callback());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(c.bits().None());
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  Completion l;
  a->SubmitLoad(Keys(0, 1), {}, l.Callback());
  ASSERT_TRUE(l.Wait());
  EXPECT_EQ(l.status().code(), StatusCode::kInvalidArgument);
}

TEST(MemoryAdapterTest, EmptyRequestsCompleteOk) {
  auto a = Make();
  Status st;
  EXPECT_EQ(Store(*a, {}, {}, &st).size(), 0u);
  EXPECT_TRUE(st.ok());
  EXPECT_EQ(Lookup(*a, {}, &st).size(), 0u);
  EXPECT_TRUE(st.ok());
}

TEST(MemoryAdapterTest, CapacityEvictsOldestObjectsFirst) {
  MemoryAdapterOptions o;
  o.capacity_bytes = 300;
  auto a = Make(o);
  for (uint64_t i = 0; i < 3; ++i) Store(*a, {Key(i)}, {Pattern(i, 100)});
  EXPECT_TRUE(Store(*a, {Key(3)}, {Pattern(3, 100)}).All());
  EXPECT_FALSE(a->Contains(Key(0)));
  EXPECT_TRUE(a->Contains(Key(1)));
  EXPECT_TRUE(a->Contains(Key(3)));
  EXPECT_TRUE(Store(*a, {Key(4)}, {Pattern(4, 200)}).All());
  EXPECT_FALSE(a->Contains(Key(1)));
  EXPECT_FALSE(a->Contains(Key(2)));
  EXPECT_TRUE(a->Contains(Key(3)));
  EXPECT_EQ(a->stats().evictions, 3u);
  EXPECT_LE(a->stats().bytes, 300u);
}

TEST(MemoryAdapterTest, FifoEvictionSkipsPinnedObjects) {
  MemoryAdapterOptions o;
  o.capacity_bytes = 300;
  auto a = Make(o);
  for (uint64_t i = 0; i < 3; ++i) Store(*a, {Key(i)}, {Pattern(i, 100)});
  Lookup(*a, {Key(0)});  // the oldest is pinned
  EXPECT_TRUE(Store(*a, {Key(3)}, {Pattern(3, 100)}).All());
  EXPECT_TRUE(a->Contains(Key(0)));
  EXPECT_FALSE(a->Contains(Key(1)));
  EXPECT_TRUE(a->Contains(Key(2)));
  ExpectLoadsPattern(*a, 0, 100);
  a->Unpin({Key(0)});
}

TEST(MemoryAdapterTest, PinnedObjectsAreNeverEvictedAndAStoreThatCannotFitFails) {
  MemoryAdapterOptions o;
  o.capacity_bytes = 300;
  auto a = Make(o);
  for (uint64_t i = 0; i < 3; ++i) Store(*a, {Key(i)}, {Pattern(i, 100)});
  Lookup(*a, Keys(0, 2));  // 200 bytes pinned, 100 evictable
  // Needs 150 > 300 - 200: fails, and nothing is evicted for it.
  Status st;
  Bitmap bits = Store(*a, {Key(10)}, {Pattern(10, 150)}, &st);
  EXPECT_TRUE(st.ok());
  EXPECT_TRUE(bits.None());
  EXPECT_TRUE(a->Contains(Key(2)));
  EXPECT_EQ(a->stats().evictions, 0u);
  EXPECT_EQ(a->stats().store_failures, 1u);
  // Many stores: the pinned objects survive all of them.
  for (uint64_t i = 20; i < 40; ++i) EXPECT_TRUE(Store(*a, {Key(i)}, {Pattern(i, 100)}).All());
  EXPECT_TRUE(a->Contains(Key(0)));
  EXPECT_TRUE(a->Contains(Key(1)));
  a->Unpin(Keys(0, 2));
  EXPECT_TRUE(Store(*a, {Key(10)}, {Pattern(10, 150)}).All());
}

TEST(MemoryAdapterTest, ObjectLargerThanCapacityIsNotStored) {
  MemoryAdapterOptions o;
  o.capacity_bytes = 100;
  auto a = Make(o);
  Store(*a, {Key(0)}, {Pattern(0, 50)});
  EXPECT_EQ(Store(*a, {Key(1), Key(2)}, {Pattern(1, 101), Pattern(2, 50)}).ToString(), "01");
  EXPECT_TRUE(a->Contains(Key(0)));
}

TEST(MemoryAdapterTest, FailFaultCompletesTheNthOperationWithIoError) {
  auto a = Make();
  Store(*a, Keys(0, 2), Patterns(0, 2, 16));
  a->InjectFault(L2Op::kLookup, 2, Fault{Fault::Kind::kFail});
  Status st;
  EXPECT_TRUE(Lookup(*a, Keys(0, 2), &st).All());
  EXPECT_TRUE(st.ok());
  Bitmap bits = Lookup(*a, Keys(0, 2), &st);
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_TRUE(bits.None());
  EXPECT_TRUE(Lookup(*a, Keys(0, 2), &st).All());
  EXPECT_TRUE(st.ok());
  EXPECT_EQ(a->TotalPins(), 4u);  // the failed lookup pinned nothing
  a->Unpin(Keys(0, 2));
  a->Unpin(Keys(0, 2));

  a->InjectFault(L2Op::kStore, 1, Fault{Fault::Kind::kFail});
  bits = Store(*a, {Key(7)}, {Pattern(7, 16)}, &st);
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_TRUE(bits.None());
  EXPECT_FALSE(a->Contains(Key(7)));

  a->InjectFault(L2Op::kLoad, 1, Fault{Fault::Kind::kFail});
  auto out = Zeros(1, 16);
  bits = Load(*a, {Key(0)}, &out, &st);
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_TRUE(bits.None());
  EXPECT_EQ(out[0], std::vector<uint8_t>(16, 0));
}

TEST(MemoryAdapterTest, DelayFaultDelaysOnlyTheNthOperation) {
  auto a = Make();
  Store(*a, {Key(0)}, {Pattern(0, 16)});
  const auto delay = milliseconds(150);
  a->InjectFault(L2Op::kLookup, 1, Fault{Fault::Kind::kDelay, delay});
  auto t0 = std::chrono::steady_clock::now();
  Status st;
  EXPECT_TRUE(Lookup(*a, {Key(0)}, &st).All());
  EXPECT_TRUE(st.ok());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, delay);
  a->Unpin({Key(0)});
}

TEST(MemoryAdapterTest, StallFaultHoldsTheOperationUntilReleased) {
  auto a = Make();
  Store(*a, {Key(0)}, {Pattern(0, 16)});
  a->InjectFault(L2Op::kLookup, 1, Fault{Fault::Kind::kStall});
  Completion stalled;
  a->SubmitLookupAndPin({Key(0)}, stalled.Callback());
  ASSERT_TRUE(a->WaitForBlockedOperations(1, kLong));
  // The other worker still serves operations.
  Status st;
  EXPECT_TRUE(Lookup(*a, {Key(0)}, &st).All());
  EXPECT_EQ(stalled.calls(), 0);
  a->SetStalled(false);
  ASSERT_TRUE(stalled.Wait());
  EXPECT_TRUE(stalled.status().ok());
  EXPECT_TRUE(stalled.bits().All());
  EXPECT_EQ(a->PinCount(Key(0)), 2u);
  a->Unpin({Key(0), Key(0)});
}

TEST(MemoryAdapterTest, CorruptFaultDamagesTheFirstLoadedKeyWhichThenReadsAsAMiss) {
  auto a = Make();
  auto data = Patterns(0, 3, 256);
  Store(*a, Keys(0, 3), data);
  a->InjectFault(L2Op::kLoad, 1, Fault{Fault::Kind::kCorrupt});
  // Key 5 is absent, so key 0 is the first loaded one.
  std::vector<ObjectKey> keys = {Key(5), Key(0), Key(1)};
  auto out = Zeros(3, 256);
  Status st;
  Bitmap bits = Load(*a, keys, &out, &st);
  EXPECT_TRUE(st.ok());
  // The damaged copy fails the checksum kept since the store: a miss, never bytes.
  EXPECT_EQ(bits.ToString(), "001");
  EXPECT_EQ(out[2], data[1]);
  EXPECT_EQ(a->stats().corrupt_reads, 1u);
  EXPECT_EQ(a->stats().load_misses, 2u);
  // Only that one load was affected.
  out = Zeros(3, 256);
  EXPECT_EQ(Load(*a, keys, &out).ToString(), "011");
  EXPECT_EQ(out[1], data[0]);
}

TEST(MemoryAdapterTest, BytesThatDifferFromTheGivenChecksumNeverLoad) {
  auto a = Make();
  auto data = Patterns(0, 2, 256);
  // Key 0 carries its bytes' checksum; key 1 the checksum of bytes a stray writer changed since.
  const uint32_t good = PayloadCrc32c(data[0].data(), data[0].size());
  const uint32_t stale = PayloadCrc32c(data[1].data(), data[1].size()) ^ 1u;
  Completion c;
  a->SubmitStore(Keys(0, 2),
                 {ConstBuffer{data[0].data(), data[0].size(), true, good},
                  ConstBuffer{data[1].data(), data[1].size(), true, stale}},
                 c.Callback());
  ASSERT_TRUE(c.Wait());
  ASSERT_TRUE(c.bits().All());
  auto out = Zeros(2, 256);
  EXPECT_EQ(Load(*a, Keys(0, 2), &out).ToString(), "10");
  EXPECT_EQ(out[0], data[0]);
  EXPECT_EQ(a->stats().corrupt_reads, 1u);
}

TEST(MemoryAdapterTest, SetStalledHoldsEveryOperationUntilCleared) {
  auto a = MakeStalled(/*workers=*/2);
  Completion c1, c2;
  a->SubmitStore({Key(0)}, {ConstBuffer{nullptr, 0}}, c1.Callback());
  a->SubmitLookupAndPin({Key(0)}, c2.Callback());
  ASSERT_TRUE(a->WaitForBlockedOperations(2, kLong));
  EXPECT_EQ(c1.calls() + c2.calls(), 0);
  EXPECT_EQ(a->stats().in_flight, 2u);
  a->SetStalled(false);
  ASSERT_TRUE(c1.Wait());
  ASSERT_TRUE(c2.Wait());
  EXPECT_TRUE(c1.status().ok());
  EXPECT_TRUE(c2.status().ok());
  a->Close();
  EXPECT_EQ(a->stats().in_flight, 0u);
}

TEST(MemoryAdapterTest, CloseCancelsQueuedAndStalledOperationsExactlyOnce) {
  auto a = MakeStalled(/*workers=*/1);
  constexpr int kOps = 6;
  std::vector<std::unique_ptr<Completion>> done;
  std::vector<uint8_t> d(32);
  std::vector<uint8_t> out(32);
  for (int i = 0; i < kOps; ++i) {
    done.push_back(std::make_unique<Completion>());
    switch (i % 3) {
      case 0: a->SubmitStore({Key(i)}, {In(d)}, done.back()->Callback()); break;
      case 1: a->SubmitLookupAndPin({Key(i)}, done.back()->Callback()); break;
      default: a->SubmitLoad({Key(i)}, {Out(out)}, done.back()->Callback()); break;
    }
  }
  ASSERT_TRUE(a->WaitForBlockedOperations(1, kLong));  // one held by the worker, five queued
  a->Close();
  for (auto& c : done) {
    EXPECT_EQ(c->calls(), 1);
    EXPECT_EQ(c->status().code(), StatusCode::kCancelled);
    EXPECT_TRUE(c->bits().None());
    EXPECT_NE(c->thread(), std::this_thread::get_id());
  }
  EXPECT_FALSE(a->Contains(Key(0)));
  EXPECT_EQ(a->TotalPins(), 0u);
  // After Close: Unavailable, inline.
  Completion late;
  a->SubmitLookupAndPin({Key(0)}, late.Callback());
  EXPECT_EQ(late.calls(), 1);
  EXPECT_EQ(late.status().code(), StatusCode::kUnavailable);
  a->Close();  // idempotent
  EXPECT_EQ(late.calls(), 1);
}

TEST(MemoryAdapterTest, CloseInterruptsSimulatedLatency) {
  MemoryAdapterOptions o;
  o.latency = std::chrono::hours(1);
  auto a = Make(o);
  Completion c;
  a->SubmitLookupAndPin({Key(0)}, c.Callback());
  ASSERT_TRUE(a->WaitForBlockedOperations(1, kLong));
  a->Close();  // returns at once, not in an hour
  EXPECT_EQ(c.calls(), 1);
  EXPECT_EQ(c.status().code(), StatusCode::kCancelled);
}

TEST(MemoryAdapterTest, CloseInterruptsADelayFault) {
  auto a = Make();
  a->InjectFault(L2Op::kStore, 1, Fault{Fault::Kind::kDelay, std::chrono::hours(1)});
  std::vector<uint8_t> d(8);
  Completion c;
  a->SubmitStore({Key(0)}, {In(d)}, c.Callback());
  ASSERT_TRUE(a->WaitForBlockedOperations(1, kLong));
  a->Close();
  EXPECT_EQ(c.calls(), 1);
  EXPECT_EQ(c.status().code(), StatusCode::kCancelled);
  EXPECT_FALSE(a->Contains(Key(0)));
}

TEST(MemoryAdapterTest, SimulatedBandwidthBoundsTransferTime) {
  MemoryAdapterOptions o;
  o.bandwidth_bytes_per_sec = 20u << 20;  // 20 MiB/s
  auto a = Make(o);
  auto t0 = std::chrono::steady_clock::now();
  // Two stores of 2 MiB on two workers share the link: >= 200 ms in all.
  Completion c1, c2;
  auto d1 = Pattern(1, 2u << 20);
  auto d2 = Pattern(2, 2u << 20);
  a->SubmitStore({Key(1)}, {In(d1)}, c1.Callback());
  a->SubmitStore({Key(2)}, {In(d2)}, c2.Callback());
  ASSERT_TRUE(c1.Wait());
  ASSERT_TRUE(c2.Wait());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, milliseconds(200));
  EXPECT_TRUE(c1.bits().All());
  EXPECT_TRUE(c2.bits().All());
}

TEST(MemoryAdapterTest, CallbackMaySubmitMoreWork) {
  auto a = Make();
  auto data = Pattern(3, 64);
  std::vector<uint8_t> out(64);
  std::promise<Bitmap> loaded;
  a->SubmitStore({Key(3)}, {In(data)}, [&](const Status&, const Bitmap&) {
    a->SubmitLoad({Key(3)}, {Out(out)},
                  [&](const Status&, const Bitmap& bits) { loaded.set_value(bits); });
  });
  auto f = loaded.get_future();
  ASSERT_EQ(f.wait_for(kLong), std::future_status::ready);
  EXPECT_TRUE(f.get().All());
  EXPECT_EQ(out, data);
}

TEST(MemoryAdapterTest, ConcurrentSubmittersGetEveryCallbackExactlyOnceOffTheirThread) {
  MemoryAdapterOptions o;
  o.worker_threads = 3;
  o.capacity_bytes = 64 * 100;  // evictions happen while others pin and load
  auto a = Make(o);
  testutil::StoreLookupLoadRounds(*a, /*threads=*/4, /*rounds=*/150, /*keys=*/40, /*size=*/64);
  EXPECT_EQ(a->TotalPins(), 0u);
  L2AdapterStats s = a->stats();
  EXPECT_EQ(s.in_flight, 0u);
  EXPECT_EQ(s.bad_unpins, 0u);
  EXPECT_LE(s.bytes, 64u * 100);
}

TEST(MemoryAdapterTest, CloseWhileSubmittersRaceCompletesEveryCallbackOnce) {
  MemoryAdapterOptions o;
  o.worker_threads = 2;
  auto a = Make(o);
  constexpr int kThreads = 3;
  constexpr int kPerThread = 200;
  std::atomic<int> calls{0};
  std::atomic<int> bad_status{0};
  std::promise<void> go;
  std::shared_future<void> start = go.get_future().share();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.wait();
      for (int i = 0; i < kPerThread; ++i) {
        a->SubmitLookupAndPin({Key(t * 1000 + i)}, [&](const Status& s, const Bitmap&) {
          calls++;
          if (!s.ok() && s.code() != StatusCode::kCancelled &&
              s.code() != StatusCode::kUnavailable) {
            bad_status++;
          }
        });
      }
    });
  }
  go.set_value();
  a->Close();
  for (auto& th : threads) th.join();
  // Close has returned and every submitter is done: late submits completed inline.
  EXPECT_EQ(calls.load(), kThreads * kPerThread);
  EXPECT_EQ(bad_status.load(), 0);
  EXPECT_EQ(a->stats().in_flight, 0u);
}

}  // namespace
}  // namespace lmcache_cpp
