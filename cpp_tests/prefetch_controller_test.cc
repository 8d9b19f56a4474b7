// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The prefetch pipeline against real L1 (shared-memory arena + object table) and in-memory L2
// adapters: hit counts, pins returning to zero on every path, leases, queueing, exactly-once
// results, cancel, TTL, faults, deadlines, and that waiting costs no CPU.

#include "lmcache_cpp/prefetch_controller.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "test_util.h"
#include "testing/memory_adapter.h"

namespace lmcache_cpp {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testutil::Key;
using testutil::Keys;

constexpr uint64_t kObj = 4096;

std::vector<uint8_t> Pattern(const ObjectKey& k) {
  std::vector<uint8_t> v(kObj);
  for (size_t i = 0; i < kObj; ++i) v[i] = static_cast<uint8_t>(k.chunk.bytes[i % 32] + i);
  return v;
}

// Stores keys into an adapter directly and waits for completion.
void PutL2(L2Adapter* a, const std::vector<ObjectKey>& keys) {
  std::vector<std::vector<uint8_t>> data;
  std::vector<ConstBuffer> bufs;
  for (const auto& k : keys) data.push_back(Pattern(k));
  for (const auto& d : data) bufs.push_back({d.data(), d.size()});
  std::promise<Bitmap> done;
  a->SubmitStore(keys, bufs, [&](const Status& st, const Bitmap& b) {
    EXPECT_TRUE(st.ok()) << st.ToString();
    done.set_value(b);
  });
  ASSERT_EQ(done.get_future().get().Popcount(), keys.size());
}

class PrefetchTest : public ::testing::Test {
 protected:
  void Build(size_t num_adapters, PrefetchOptions popts = {}, size_t units = 64) {
    ctl_.reset();
    for (auto& a : adapters_) a->Close();
    adapters_.clear();
    ArenaOptions ao;
    ao.size_bytes = units * kObj;
    arena_ = std::shared_ptr<Arena>(Arena::Create(ao).value().release());
    clock_ = std::make_shared<ManualClock>();
    ObjectTableOptions to;
    to.clock = clock_;
    table_ = ObjectTable::Create(arena_, to).value();
    std::vector<std::shared_ptr<L2Adapter>> as;
    for (size_t i = 0; i < num_adapters; ++i) {
      adapters_.push_back(std::shared_ptr<MemoryL2Adapter>(
          MemoryL2Adapter::Create(MemoryAdapterOptions{}).value().release()));
      as.push_back(adapters_.back());
    }
    popts.clock = clock_;
    ctl_ = std::make_unique<PrefetchController>(table_.get(), as, popts);
  }
  void SetUp() override { Build(1); }
  void TearDown() override {
    if (ctl_) ctl_->Stop();
    for (auto& a : adapters_) {
      a->SetStalled(false);
      a->Close();
    }
    if (ctl_) {
      EXPECT_TRUE(ctl_->WaitIdle(seconds(10)));
    }
    ctl_.reset();
  }

  PrefetchRequest Req(std::vector<ObjectKey> keys, RequestId req = 1, ClientId client = 7,
                      uint32_t extra = 0) {
    return PrefetchRequest::Of({client, req}, std::move(keys), kObj, extra);
  }
  PrefetchResult RunToCompletion(PrefetchRequest r) {
    const ClientId c = r.owner.client;
    auto h = ctl_->Submit(std::move(r));
    EXPECT_TRUE(h.ok()) << h.status().ToString();
    auto res = ctl_->Wait(c, *h, seconds(20));
    EXPECT_TRUE(res.ok()) << res.status().ToString();
    EXPECT_TRUE(res->has_value());
    return res->value_or(PrefetchResult{});
  }
  void StoreL1(const std::vector<ObjectKey>& keys) {
    auto r = table_->ReserveWrite({0, 900}, keys, kObj);
    ASSERT_TRUE(r.ok());
    for (const auto& res : *r) {
      if (!res.skipped) std::memcpy(table_->data(res.offset), Pattern(res.key).data(), kObj);
    }
    ASSERT_TRUE(table_->FinishWrite(900, keys).ok());
  }
  uint64_t Pins() const {
    uint64_t p = 0;
    for (const auto& a : adapters_) p += a->TotalPins();
    return p;
  }
  void ExpectBytes(const ObjectKey& k) {
    auto info = table_->Info(k);
    ASSERT_TRUE(info.has_value());
    EXPECT_EQ(std::memcmp(table_->data(info->offset), Pattern(k).data(), kObj), 0);
  }
  // Releases the given requests' leases (a retrieve would have), then checks that nothing else
  // is left: no pins, leases or temporary objects anywhere.
  void ExpectClean(std::initializer_list<RequestId> reqs) {
    EXPECT_TRUE(ctl_->WaitIdle(seconds(10)));
    EXPECT_EQ(Pins(), 0u);
    for (RequestId r : reqs) table_->ReleaseRequest(r);
    auto s = table_->stats();
    EXPECT_EQ(s.read_leases, 0u);
    EXPECT_EQ(s.write_leases, 0u);
    EXPECT_EQ(s.temporary, 0u) << "temporary objects are freed with their leases";
    Status inv = table_->CheckInvariants();
    EXPECT_TRUE(inv.ok()) << inv.ToString();
  }

  std::shared_ptr<Arena> arena_;
  std::shared_ptr<ManualClock> clock_;
  std::unique_ptr<ObjectTable> table_;
  std::vector<std::shared_ptr<MemoryL2Adapter>> adapters_;
  std::unique_ptr<PrefetchController> ctl_;
};

TEST_F(PrefetchTest, AllKeysInL2GiveAFullHitWithExactBytes) {
  auto keys = Keys(0, 5);
  PutL2(adapters_[0].get(), keys);
  PrefetchResult r = RunToCompletion(Req(keys));
  EXPECT_EQ(r.hits, 5u);
  EXPECT_EQ(r.l1_hits, 0u);
  EXPECT_EQ(r.l2_hits, 5u);
  for (const auto& k : keys) {
    EXPECT_EQ(table_->LeasesHeld(1, k), 1u);
    ExpectBytes(k);
  }
  EXPECT_EQ(Pins(), 0u);
  ASSERT_TRUE(table_->ReleaseRead(1, keys).ok());
  ExpectClean({1});
}

TEST_F(PrefetchTest, GapInL2TrimsTheHitAndLeavesNothingBeyondIt) {
  auto keys = Keys(0, 5);
  PutL2(adapters_[0].get(), {keys[0], keys[1], keys[3], keys[4]});
  PrefetchResult r = RunToCompletion(Req(keys));
  EXPECT_EQ(r.hits, 2u);
  EXPECT_FALSE(table_->Info(keys[2]).has_value());
  EXPECT_FALSE(table_->Info(keys[3]).has_value()) << "keys after the gap are not left in L1";
  EXPECT_FALSE(table_->Info(keys[4]).has_value());
  EXPECT_EQ(Pins(), 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, MissingFirstKeyIsAZeroHit) {
  auto keys = Keys(0, 3);
  PutL2(adapters_[0].get(), {keys[1], keys[2]});
  EXPECT_EQ(RunToCompletion(Req(keys)).hits, 0u);
  EXPECT_EQ(Pins(), 0u);
  EXPECT_EQ(table_->stats().objects, 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, WithoutAdaptersOnlyL1Counts) {
  Build(0);
  auto keys = Keys(0, 4);
  StoreL1({keys[0], keys[1]});
  PrefetchResult r = RunToCompletion(Req(keys));
  EXPECT_EQ(r.hits, 2u);
  EXPECT_EQ(r.l1_hits, 2u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, L1PrefixThenL2Continuation) {
  auto keys = Keys(0, 6);
  StoreL1({keys[0], keys[1]});
  PutL2(adapters_[0].get(), {keys[2], keys[3], keys[4]});
  PrefetchResult r = RunToCompletion(Req(keys));
  EXPECT_EQ(r.hits, 5u);
  EXPECT_EQ(r.l1_hits, 2u);
  EXPECT_EQ(r.l2_hits, 3u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, TwoAdaptersWithDisjointHalvesGiveAFullHit) {
  Build(2);
  auto keys = Keys(0, 6);
  PutL2(adapters_[0].get(), {keys[0], keys[1], keys[2]});
  PutL2(adapters_[1].get(), {keys[3], keys[4], keys[5]});
  EXPECT_EQ(RunToCompletion(Req(keys)).hits, 6u);
  for (const auto& k : keys) ExpectBytes(k);
  EXPECT_EQ(Pins(), 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, OverlappingAdaptersLoadEachKeyFromTheFirstThatHasIt) {
  Build(2);
  auto keys = Keys(0, 4);
  PutL2(adapters_[0].get(), {keys[0], keys[1]});
  PutL2(adapters_[1].get(), keys);
  EXPECT_EQ(RunToCompletion(Req(keys)).hits, 4u);
  EXPECT_EQ(adapters_[0]->stats().loads, 2u);
  EXPECT_EQ(adapters_[1]->stats().loads, 2u) << "keys 0 and 1 come from adapter 0 only";
  EXPECT_EQ(Pins(), 0u) << "pins on adapter 1 for keys 0, 1 were dropped";
  ExpectClean({1});
}

TEST_F(PrefetchTest, ExtraCountLoadNeedsOnePlusExtraReleases) {
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  EXPECT_EQ(RunToCompletion(Req(keys, 1, 7, /*extra=*/3)).hits, 2u);
  for (int worker = 0; worker < 3; ++worker) {
    ASSERT_TRUE(table_->ReleaseRead(1, keys).ok());
    EXPECT_TRUE(table_->Info(keys[0]).has_value()) << "still leased after worker " << worker;
  }
  ASSERT_TRUE(table_->ReleaseRead(1, keys).ok());
  EXPECT_FALSE(table_->Info(keys[0]).has_value()) << "temporary: freed by the last release";
  ExpectClean({1});
}

TEST_F(PrefetchTest, KeysBeyondAFailedLoadAreFullyReleased) {
  // Keys 0, 1, 3 come from adapter 0, key 2 from adapter 1, whose load fails: the hit stops at
  // the gap and key 3, although loaded, is discarded rather than left leased or in L1.
  Build(2);
  auto keys = Keys(0, 4);
  PutL2(adapters_[0].get(), {keys[0], keys[1], keys[3]});
  PutL2(adapters_[1].get(), {keys[2]});
  adapters_[1]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kFail, {}});
  PrefetchResult r = RunToCompletion(Req(keys, 1, 7, /*extra=*/1));
  EXPECT_EQ(r.hits, 2u);
  EXPECT_EQ(table_->LeasesHeld(1, keys[1]), 2u) << "1 + extra_count leases";
  EXPECT_FALSE(table_->Info(keys[2]).has_value());
  EXPECT_FALSE(table_->Info(keys[3]).has_value()) << "loaded but beyond the gap: discarded";
  EXPECT_EQ(ctl_->stats().load_failures, 2u);
  EXPECT_EQ(Pins(), 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, FailedLoadDiscardsEveryReservation) {
  auto keys = Keys(0, 4);
  PutL2(adapters_[0].get(), keys);
  adapters_[0]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kFail, {}});
  PrefetchResult r = RunToCompletion(Req(keys, 1, 7, /*extra=*/1));
  EXPECT_EQ(r.hits, 0u);
  EXPECT_EQ(table_->stats().objects, 0u) << "reserved temporaries were discarded";
  EXPECT_EQ(ctl_->stats().load_failures, 4u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, FailingLookupNeverLeaksPinsOrLeases) {
  Build(2);
  auto keys = Keys(0, 3);
  PutL2(adapters_[0].get(), keys);
  PutL2(adapters_[1].get(), keys);
  adapters_[1]->InjectFault(L2Op::kLookup, 1, {Fault::Kind::kFail, {}});
  EXPECT_EQ(RunToCompletion(Req(keys)).hits, 3u) << "adapter 0 still serves";
  EXPECT_EQ(Pins(), 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, ResultIsDeliveredExactlyOnceAndOnlyToItsClient) {
  auto keys = Keys(0, 2);
  StoreL1(keys);
  auto h = ctl_->Submit(Req(keys, 1, /*client=*/7));
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(ctl_->Query(8, *h).status().code(), StatusCode::kPermissionDenied);
  auto first = ctl_->Query(7, *h);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(first->has_value());
  EXPECT_EQ((*first)->hits, 2u);
  EXPECT_EQ(ctl_->Query(7, *h).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ctl_->Query(7, JobHandle::Random()).status().code(), StatusCode::kNotFound);
  ExpectClean({1});
}

TEST_F(PrefetchTest, HandlesAreRandomNotSequential) {
  StoreL1(Keys(0, 1));
  auto a = ctl_->Submit(Req(Keys(0, 1), 1));
  auto b = ctl_->Submit(Req(Keys(0, 1), 2));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->ToHex(), b->ToHex());
  auto parsed = JobHandle::FromHex(a->ToHex());
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(*parsed, *a);
  EXPECT_EQ(JobHandle::FromHex("xyz").status().code(), StatusCode::kInvalidArgument);
  // Differing bytes at many positions (sequential ids differ in one or two).
  int differing = 0;
  for (size_t i = 0; i < 16; ++i) differing += a->bytes[i] != b->bytes[i];
  EXPECT_GT(differing, 4);
  ASSERT_TRUE(ctl_->Cancel(7, *a).ok());
  ASSERT_TRUE(ctl_->Cancel(7, *b).ok());
  ExpectClean({1, 2});
}

TEST_F(PrefetchTest, MoreRequestsThanTheInFlightLimitQueueAndAllComplete) {
  PrefetchOptions o;
  o.max_in_flight = 2;
  Build(1, o);
  for (RequestId r = 1; r <= 6; ++r) {
    PutL2(adapters_[0].get(), Keys(r * 10, static_cast<size_t>(r % 3) + 1));
  }
  adapters_[0]->SetStalled(true);
  std::vector<JobHandle> handles;
  for (RequestId r = 1; r <= 6; ++r) {
    auto keys = Keys(r * 10, static_cast<size_t>(r % 3) + 1);
    auto h = ctl_->Submit(Req(keys, r));
    ASSERT_TRUE(h.ok());
    handles.push_back(*h);
  }
  EXPECT_EQ(ctl_->stats().in_flight, 2u);
  EXPECT_EQ(ctl_->stats().queued, 4u);
  adapters_[0]->SetStalled(false);
  for (RequestId r = 1; r <= 6; ++r) {
    auto res = ctl_->Wait(7, handles[r - 1], seconds(20));
    ASSERT_TRUE(res.ok());
    ASSERT_TRUE(res->has_value());
    EXPECT_EQ((*res)->hits, static_cast<size_t>(r % 3) + 1) << "request " << r;
  }
  ExpectClean({1, 2, 3, 4, 5, 6});
}

TEST_F(PrefetchTest, CancelReleasesEveryPinAndLease) {
  auto keys = Keys(0, 4);
  StoreL1({keys[0]});
  PutL2(adapters_[0].get(), {keys[1], keys[2], keys[3]});
  adapters_[0]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kStall, {}});
  auto h = ctl_->Submit(Req(keys));
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  EXPECT_GT(Pins(), 0u);
  ASSERT_TRUE(ctl_->Cancel(7, *h).ok());
  EXPECT_EQ(ctl_->Query(7, *h).status().code(), StatusCode::kNotFound);
  adapters_[0]->SetStalled(false);  // the stalled load completes; the job cleans up
  EXPECT_TRUE(ctl_->WaitIdle(seconds(10)));
  EXPECT_EQ(Pins(), 0u);
  EXPECT_EQ(table_->LeasesHeld(1, keys[0]), 0u) << "the L1 prefix lease was released";
  EXPECT_EQ(table_->stats().temporary, 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, UncollectedResultsAreReapedAfterTheirTtl) {
  PrefetchOptions o;
  o.job_ttl = seconds(30);
  Build(1, o);
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  auto h = ctl_->Submit(Req(keys));
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(ctl_->WaitIdle(seconds(10)));
  EXPECT_EQ(table_->LeasesHeld(1, keys[0]), 1u);
  clock_->Advance(seconds(31));
  EXPECT_EQ(ctl_->ReapExpired(), 1u);
  EXPECT_EQ(table_->LeasesHeld(1, keys[0]), 0u);
  EXPECT_EQ(ctl_->Query(7, *h).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ctl_->stats().jobs, 0u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, EndRequestDuringALoadLeavesNothingBehind) {
  auto keys = Keys(0, 3);
  PutL2(adapters_[0].get(), keys);
  adapters_[0]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kStall, {}});
  auto h = ctl_->Submit(Req(keys, 5));
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  EXPECT_EQ(ctl_->EndRequest(5), 1u);
  table_->ReleaseRequest(5);
  adapters_[0]->SetStalled(false);
  ExpectClean({5});
  EXPECT_EQ(table_->stats().objects, 0u);
  EXPECT_EQ(table_->stats().requests, 0u);
}

TEST_F(PrefetchTest, StalledAdapterDoesNotBlockOtherRequests) {
  auto slow = Keys(0, 2), fast = Keys(100, 2);
  PutL2(adapters_[0].get(), slow);
  StoreL1(fast);
  adapters_[0]->SetStalled(true);
  auto hs = ctl_->Submit(Req(slow, 1));
  ASSERT_TRUE(hs.ok());
  // An L1 hit is answered at once while the L2 lookup of another request is stalled.
  auto hf = ctl_->Submit(Req(fast, 2));
  ASSERT_TRUE(hf.ok());
  auto rf = ctl_->Query(7, *hf);
  ASSERT_TRUE(rf.ok() && rf->has_value());
  EXPECT_EQ((*rf)->hits, 2u);
  auto rs = ctl_->Query(7, *hs);
  ASSERT_TRUE(rs.ok());
  EXPECT_FALSE(rs->has_value()) << "still waiting for L2";
  adapters_[0]->SetStalled(false);
  auto done = ctl_->Wait(7, *hs, seconds(20));
  ASSERT_TRUE(done.ok() && done->has_value());
  EXPECT_EQ((*done)->hits, 2u);
  ExpectClean({1, 2});
}

TEST_F(PrefetchTest, WaitingOnAStalledAdapterCostsNoCpu) {
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  adapters_[0]->SetStalled(true);
  auto h = ctl_->Submit(Req(keys));
  ASSERT_TRUE(h.ok());
  rusage before{}, after{};
  getrusage(RUSAGE_SELF, &before);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = ctl_->Wait(7, *h, milliseconds(600));
  const auto wall = std::chrono::steady_clock::now() - t0;
  getrusage(RUSAGE_SELF, &after);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  auto cpu_us = [](const rusage& u) {
    return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1000000L + u.ru_utime.tv_usec +
           u.ru_stime.tv_usec;
  };
  const long used = cpu_us(after) - cpu_us(before);
  EXPECT_GE(wall, milliseconds(550));
  // Every thread of the process (controller, adapter workers, waiter) is blocked: a polling loop
  // would burn a whole core (600 ms) here.
  EXPECT_LT(used, 60000) << "process used " << used << " us of CPU during a 600 ms wait";
  adapters_[0]->SetStalled(false);
  ASSERT_TRUE(ctl_->Wait(7, *h, seconds(20)).ok());
  ExpectClean({1});
}

TEST_F(PrefetchTest, SyncLookupAnswersByItsDeadlineWhenAnAdapterStalls) {
  auto keys = Keys(0, 3);
  StoreL1({keys[0]});
  PutL2(adapters_[0].get(), {keys[1], keys[2]});
  adapters_[0]->SetStalled(true);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = ctl_->LookupAndPin(Req(keys), milliseconds(200));
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->l2_timed_out);
  EXPECT_EQ(r->hits, 1u) << "L1 only";
  EXPECT_LT(took, seconds(5));
  // The retrieve joins and sees exactly the L1 prefix.
  auto joined = ctl_->WaitLoad(1, seconds(1));
  ASSERT_TRUE(joined.ok());
  EXPECT_EQ(joined->hits, 1u);
  adapters_[0]->SetStalled(false);  // late lookup answers: their pins are dropped
  EXPECT_TRUE(ctl_->WaitIdle(seconds(10)));
  EXPECT_EQ(Pins(), 0u);
  EXPECT_EQ(ctl_->stats().l2_lookup_timeouts, 1u);
  ExpectClean({1});
}

TEST_F(PrefetchTest, SyncLoadRunsOnceHoweverManyWorkersJoin) {
  auto keys = Keys(0, 4);
  PutL2(adapters_[0].get(), keys);
  adapters_[0]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kDelay, milliseconds(100)});
  auto r = ctl_->LookupAndPin(Req(keys, 9, 7, /*extra=*/3), seconds(10));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->hits, 4u);
  EXPECT_EQ(r->l2_planned, 4u);
  std::vector<std::future<Result<PrefetchResult>>> workers;
  for (int w = 0; w < 4; ++w) {
    workers.push_back(
        std::async(std::launch::async, [&] { return ctl_->WaitLoad(9, seconds(20)); }));
  }
  for (auto& f : workers) {
    auto res = f.get();
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    EXPECT_EQ(res->hits, 4u);
  }
  EXPECT_EQ(adapters_[0]->stats().loads, 4u) << "each key loaded once";
  // Each of the four workers releases one lease (1 + extra_count = 4).
  for (int w = 0; w < 4; ++w) ASSERT_TRUE(table_->ReleaseRead(9, keys).ok());
  EXPECT_EQ(table_->stats().objects, 0u);
  EXPECT_EQ(ctl_->WaitLoad(10, seconds(1)).status().code(), StatusCode::kNotFound);
  ExpectClean({9});
}

TEST_F(PrefetchTest, SyncLookupWithoutStartLoadIsStartedByTheFirstJoiner) {
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  auto r = ctl_->LookupAndPin(Req(keys, 3), seconds(10), /*start_load=*/false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->l2_planned, 2u);
  EXPECT_EQ(adapters_[0]->stats().loads, 0u);
  auto joined = ctl_->WaitLoad(3, seconds(20));
  ASSERT_TRUE(joined.ok());
  EXPECT_EQ(joined->hits, 2u);
  ExpectClean({3});
}

TEST_F(PrefetchTest, LoadPendingAndCompletionNoticesLetAServerParkWaits) {
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  std::mutex mu;
  std::vector<std::pair<JobHandle, RequestId>> notices;  // GUARDED_BY(mu)
  ctl_->SetCompletionNotice([&](const JobHandle& h, RequestId r) {
    std::lock_guard<std::mutex> lock(mu);
    notices.emplace_back(h, r);
  });
  auto count = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return notices.size();
  };
  auto wait_for = [&](size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(10);
    while (count() < n && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    return count();
  };
  // A sync lookup without its load started: the first LoadPending starts it, as a joiner would.
  auto r = ctl_->LookupAndPin(Req(keys, 3), seconds(10), /*start_load=*/false);
  ASSERT_TRUE(r.ok());
  adapters_[0]->SetStalled(true);
  EXPECT_TRUE(ctl_->LoadPending(3));
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  EXPECT_TRUE(ctl_->LoadPending(3)) << "still running";
  EXPECT_FALSE(ctl_->LoadPending(4)) << "no sync lookup of that request";
  EXPECT_EQ(count(), 0u);
  adapters_[0]->SetStalled(false);
  // The load finishing completes the sync job: one notice naming its request.
  ASSERT_EQ(wait_for(1), 1u);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(notices[0].second, 3u);
  }
  EXPECT_FALSE(ctl_->LoadPending(3)) << "the result is visible when the notice comes";
  auto joined = ctl_->WaitLoad(3, Duration::zero());
  ASSERT_TRUE(joined.ok()) << joined.status().ToString();
  EXPECT_EQ(joined->hits, 2u);
  // A two-phase job's completion names its handle.
  auto handle = ctl_->Submit(Req({Key(9)}, 5));
  ASSERT_TRUE(handle.ok());
  ASSERT_EQ(wait_for(2), 2u);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(notices[1].first, *handle);
    EXPECT_EQ(notices[1].second, 5u);
  }
  auto done = ctl_->Query(7, *handle);
  ASSERT_TRUE(done.ok() && done->has_value());
  // Stopping says "everything": a zero handle and request.
  ctl_->Stop();
  ASSERT_GE(wait_for(3), 3u);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(notices.back().first, JobHandle{});
    EXPECT_EQ(notices.back().second, 0u);
  }
  ctl_->SetCompletionNotice(nullptr);  // TearDown stops again; the locals above are gone then
  ExpectClean({3, 5});
}

TEST_F(PrefetchTest, IdleSyncLookupIsCleanedUpByEndRequest) {
  auto keys = Keys(0, 2);
  PutL2(adapters_[0].get(), keys);
  auto r = ctl_->LookupAndPin(Req(keys, 4), seconds(10), /*start_load=*/false);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(Pins(), 2u);
  EXPECT_EQ(ctl_->EndRequest(4), 1u);
  EXPECT_EQ(Pins(), 0u) << "pins of a sync lookup whose load never started";
  ExpectClean({4});
}

TEST_F(PrefetchTest, NewSyncLookupOfARequestSupersedesThePrevious) {
  auto keys = Keys(0, 2);
  StoreL1(keys);
  ASSERT_TRUE(ctl_->LookupAndPin(Req(keys, 6), seconds(1)).ok());
  ASSERT_TRUE(ctl_->LookupAndPin(Req(keys, 6), seconds(1)).ok());
  EXPECT_EQ(table_->LeasesHeld(6, keys[0]), 1u) << "the first lookup's leases were released";
  ExpectClean({6});
}

TEST_F(PrefetchTest, InternalRequestIdsAreRejected) {
  EXPECT_EQ(ctl_->Submit(Req(Keys(0, 1), kInternalRequestBit | 5)).status().code(),
            StatusCode::kInvalidArgument);
  auto bad = Req(Keys(0, 1));
  bad.object_size = 0;
  EXPECT_EQ(ctl_->Submit(bad).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(PrefetchTest, PerClientJobLimitIsEnforced) {
  PrefetchOptions o;
  o.max_jobs_per_client = 2;
  Build(1, o);
  StoreL1(Keys(0, 1));
  ASSERT_TRUE(ctl_->Submit(Req(Keys(0, 1), 1)).ok());
  ASSERT_TRUE(ctl_->Submit(Req(Keys(0, 1), 2)).ok());
  EXPECT_EQ(ctl_->Submit(Req(Keys(0, 1), 3)).status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(ctl_->Submit(Req(Keys(0, 1), 3, /*client=*/8)).ok()) << "other clients unaffected";
}

TEST_F(PrefetchTest, StopReleasesInFlightPinsAndLeases) {
  auto keys = Keys(0, 3);
  StoreL1({keys[0]});
  PutL2(adapters_[0].get(), {keys[1], keys[2]});
  adapters_[0]->InjectFault(L2Op::kLoad, 1, {Fault::Kind::kStall, {}});
  ASSERT_TRUE(ctl_->Submit(Req(keys)).ok());
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  ctl_->Stop();
  EXPECT_EQ(ctl_->Submit(Req(keys, 2)).status().code(), StatusCode::kUnavailable);
  adapters_[0]->Close();  // cancels the stalled load; its callback cleans up
  EXPECT_TRUE(ctl_->WaitIdle(seconds(10)));
  EXPECT_EQ(Pins(), 0u);
  auto s = table_->stats();
  EXPECT_EQ(s.read_leases, 0u);
  EXPECT_EQ(s.write_leases, 0u);
  EXPECT_EQ(s.temporary, 0u);
}

}  // namespace
}  // namespace lmcache_cpp
