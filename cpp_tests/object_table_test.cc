// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Behaviour of the L1 object table: state machine, error codes, lease ledger, TTLs, temporary and
// detached objects, eviction and the maintenance thread.

#include "lmcache_cpp/object_table.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "test_util.h"

namespace lmcache_cpp {
namespace {

using std::chrono::seconds;
using testutil::Key;
using testutil::Keys;

constexpr uint64_t kUnit = 4096;

// Records listener calls. Thread-safe; lets a test wait (with a deadline) for a condition.
class RecordingListener : public ObjectTableListener {
 public:
  void OnObjectsReady(const std::vector<ObjectKey>& keys) override {
    std::lock_guard<std::mutex> lock(mu_);
    ready.insert(ready.end(), keys.begin(), keys.end());
    cv_.notify_all();
  }
  void OnObjectsRemoved(const std::vector<ObjectKey>& keys, RemovalReason reason) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& k : keys) removed.emplace_back(k, reason);
    cv_.notify_all();
  }
  std::vector<ObjectKey> Removed(RemovalReason reason) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<ObjectKey> out;
    for (const auto& [k, r] : removed) {
      if (r == reason) out.push_back(k);
    }
    return out;
  }
  // Waits until at least n removals were seen, or the deadline passes.
  bool WaitForRemovals(size_t n, std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return removed.size() >= n; });
  }

  std::vector<ObjectKey> ready;
  std::vector<std::pair<ObjectKey, RemovalReason>> removed;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

class ObjectTableTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(/*units=*/16); }

  void Make(size_t units, ObjectTableOptions opts = {}) {
    table_.reset();
    ArenaOptions ao;
    ao.size_bytes = units * kUnit;
    auto arena = Arena::Create(ao);
    ASSERT_TRUE(arena.ok()) << arena.status().ToString();
    clock_ = std::make_shared<ManualClock>();
    opts.clock = clock_;
    opts.read_lease_ttl = seconds(30);
    opts.write_lease_ttl = seconds(10);
    auto t = ObjectTable::Create(std::shared_ptr<Arena>(std::move(arena).value()), opts);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    table_ = std::move(t).value();
    listener_ = std::make_shared<RecordingListener>();
    table_->AddListener(listener_);
  }

  // Stores keys as ready permanent objects for request `req`.
  void Store(const std::vector<ObjectKey>& keys, RequestId req = 999) {
    auto r = table_->ReserveWrite({1, req}, keys, kUnit);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::vector<ObjectKey> written;
    for (const auto& res : *r) {
      if (!res.skipped) written.push_back(res.key);
    }
    ASSERT_TRUE(table_->FinishWrite(req, written).ok());
  }

  void ExpectInvariants() {
    Status st = table_->CheckInvariants();
    EXPECT_TRUE(st.ok()) << st.ToString();
  }

  std::shared_ptr<ManualClock> clock_;
  std::unique_ptr<ObjectTable> table_;
  std::shared_ptr<RecordingListener> listener_;
};

TEST_F(ObjectTableTest, WalksTheStateMachineAbsentWritingReadyReadingReady) {
  const ObjectKey k = Key(1);
  EXPECT_FALSE(table_->Info(k).has_value());

  auto r = table_->ReserveWrite({1, 7}, {k}, 100);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->size(), 1u);
  EXPECT_FALSE((*r)[0].skipped);
  EXPECT_EQ((*r)[0].offset % kUnit, 0u);
  EXPECT_EQ(table_->Info(k)->state, ObjectState::kWriting);
  EXPECT_FALSE(table_->Contains({k}).Test(0));

  ASSERT_TRUE(table_->FinishWrite(7, {k}).ok());
  EXPECT_EQ(table_->Info(k)->state, ObjectState::kReady);
  EXPECT_EQ(table_->Info(k)->size, 100u);
  EXPECT_TRUE(table_->Contains({k}).Test(0));
  EXPECT_EQ(listener_->ready, std::vector<ObjectKey>{k});

  ASSERT_TRUE(table_->AcquireRead({2, 8}, {k}, 2).ok());
  EXPECT_EQ(table_->Info(k)->readers, 2u);
  EXPECT_EQ(table_->LeasesHeld(8, k), 2u);
  ExpectInvariants();

  ASSERT_TRUE(table_->ReleaseRead(8, {k}).ok());
  ASSERT_TRUE(table_->ReleaseRead(8, {k}).ok());
  EXPECT_EQ(table_->Info(k)->readers, 0u);
  EXPECT_EQ(table_->stats().requests, 0u);
  EXPECT_EQ(table_->stats().evictable, 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, EachIllegalTransitionHasItsOwnErrorCode) {
  const ObjectKey a = Key(1), b = Key(2), absent = Key(3);
  ASSERT_TRUE(table_->ReserveWrite({1, 1}, {a}, kUnit).ok());  // a: writing
  Store({b});                                                  // b: ready

  EXPECT_EQ(table_->FinishWrite(1, {absent}).code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(table_->AcquireRead({2, 2}, {absent}).code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(table_->AcquireRead({2, 2}, {a}).code(), StatusCode::kNotReadable);
  EXPECT_EQ(table_->FinishWrite(999, {b}).code(), StatusCode::kWrongState);
  EXPECT_EQ(table_->FinishWrite(5, {a}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->AbortWrite(5, {a}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->ReserveWrite({1, 3}, {b}, kUnit, {ReserveMode::kStrict, false}).status().code(),
            StatusCode::kNotWritable);
  EXPECT_EQ(table_->ReleaseRead(2, {b}).code(), StatusCode::kLeaseNotHeld);
  ASSERT_TRUE(table_->AcquireRead({2, 2}, {b}).ok());
  EXPECT_EQ(table_->Delete({b}).code(), StatusCode::kLocked);
  EXPECT_EQ(table_->Delete({a}).code(), StatusCode::kLocked);
  EXPECT_EQ(table_->Delete({absent}).code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(table_->ReserveWrite({1, 4}, {Key(10)}, 17 * kUnit).status().code(),
            StatusCode::kOutOfMemory);
  EXPECT_EQ(table_->ReserveWrite({1, 4}, {Key(10)}, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(table_->AcquireRead({2, 2}, {b}, 0).code(), StatusCode::kInvalidArgument);
  // Errors changed nothing.
  EXPECT_EQ(table_->Info(a)->state, ObjectState::kWriting);
  EXPECT_EQ(table_->Info(b)->readers, 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, NewOnlyReservationSkipsExistingKeysInsteadOfFailing) {
  Store({Key(1), Key(2)});
  auto r = table_->ReserveWrite({1, 5}, {Key(1), Key(2), Key(3), Key(3)}, kUnit);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE((*r)[0].skipped);
  EXPECT_TRUE((*r)[1].skipped);
  EXPECT_FALSE((*r)[2].skipped);
  EXPECT_TRUE((*r)[3].skipped) << "a repeated key in one batch is reserved once";
  EXPECT_EQ(table_->stats().writing, 1u);
  ASSERT_TRUE(table_->FinishWrite(5, {Key(3)}).ok());
  ExpectInvariants();
}

TEST_F(ObjectTableTest, TensorParallelRanksStoringTheSameMlaObjectIsHarmless) {
  // Four workers of one request store the same rank-0 object: one reserves, three skip.
  const ObjectKey k = Key(1);
  int reserved = 0;
  for (ClientId worker = 0; worker < 4; ++worker) {
    auto r = table_->ReserveWrite({worker, 42}, {k}, kUnit);
    ASSERT_TRUE(r.ok());
    if (!(*r)[0].skipped) {
      ++reserved;
      ASSERT_TRUE(table_->FinishWrite(42, {k}).ok());
    }
  }
  EXPECT_EQ(reserved, 1);
  EXPECT_EQ(table_->stats().objects, 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, FailedBatchReservationLeavesNothingAllocated) {
  // 16 units: 14 leased objects leave 2 free and nothing evictable.
  std::vector<ObjectKey> held = Keys(0, 14);
  Store(held);
  ASSERT_TRUE(table_->AcquireRead({1, 50}, held).ok());
  const auto before = table_->stats();
  auto r = table_->ReserveWrite({1, 51}, Keys(100, 3), kUnit);
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfMemory);
  const auto after = table_->stats();
  EXPECT_EQ(after.used_bytes, before.used_bytes);
  EXPECT_EQ(after.objects, before.objects);
  EXPECT_EQ(after.evictions, 0u) << "leased objects are never evicted";
  EXPECT_EQ(after.reserve_failures, 1u);
  // Exactly two still fit.
  EXPECT_TRUE(table_->ReserveWrite({1, 51}, Keys(100, 2), kUnit).ok());
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReservationEvictsLeastRecentlyUsedObjectsSynchronously) {
  Store(Keys(0, 16));
  auto r = table_->ReserveWrite({1, 60}, Keys(100, 2), kUnit);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(table_->stats().evictions, 2u);
  EXPECT_EQ(listener_->Removed(RemovalReason::kEvicted).size(), 2u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, SkippedObjectIsNotEvictedByTheSameReservation) {
  Store(Keys(0, 16));
  // Key 15 is the least recently used (chunk 0 was inserted last). Reserve it again together with
  // a new key: the new key needs an eviction, which must not take key 15, reported as skipped.
  auto r = table_->ReserveWrite({1, 61}, {Key(15), Key(200)}, kUnit);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)[0].skipped);
  EXPECT_TRUE(table_->Contains({Key(15)}).Test(0));
  ExpectInvariants();
}

TEST_F(ObjectTableTest, TemporaryObjectIsFreedWithItsLastLeaseAndNeverAnnouncedReady) {
  const ObjectKey k = Key(1);
  auto r = table_->ReserveWrite({1, 70}, {k}, kUnit, {ReserveMode::kNewOnly, true});
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(table_->FinishWrite(70, {k}, /*read_leases=*/2).ok());
  EXPECT_TRUE(listener_->ready.empty()) << "temporary objects are never written back to L2";
  EXPECT_TRUE(table_->Info(k)->temporary);
  EXPECT_EQ(table_->EvictBytes(1 << 30), 0u) << "temporary objects are not evictable";
  ASSERT_TRUE(table_->ReleaseRead(70, {k}).ok());
  EXPECT_TRUE(table_->Contains({k}).Test(0));
  ASSERT_TRUE(table_->ReleaseRead(70, {k}).ok());
  EXPECT_FALSE(table_->Info(k).has_value());
  EXPECT_EQ(table_->stats().used_bytes, 0u);
  EXPECT_EQ(listener_->Removed(RemovalReason::kTemporaryFreed).size(), 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, TemporaryObjectPublishedWithoutLeasesIsFreedAtOnce) {
  auto r = table_->ReserveWrite({1, 71}, {Key(1)}, kUnit, {ReserveMode::kNewOnly, true});
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(table_->FinishWrite(71, {Key(1)}, 0).ok());
  EXPECT_FALSE(table_->Info(Key(1)).has_value());
  ExpectInvariants();
}

TEST_F(ObjectTableTest, FinishWriteForHandsReadLeasesToAnotherRequest) {
  // The prefetch pattern: an internal request reserves and loads a temporary object, then the
  // user's request receives the 1 + extra_count read leases.
  const ObjectKey k = Key(1);
  ASSERT_TRUE(table_->ReserveWrite({0, 5000}, {k}, kUnit, {ReserveMode::kNewOnly, true}).ok());
  // Ending the user's request while the load runs cannot free the object being written.
  EXPECT_EQ(table_->ReleaseRequest(75), 0u);
  ASSERT_TRUE(table_->FinishWriteFor(5000, {k}, {3, 75}, 2).ok());
  EXPECT_EQ(table_->LeasesHeld(75, k), 2u);
  EXPECT_EQ(table_->LeasesHeld(5000, k), 0u);
  EXPECT_EQ(table_->stats().requests, 1u) << "the writer's ledger is gone";
  ASSERT_TRUE(table_->ReleaseRead(75, {k}, 2).ok());
  EXPECT_FALSE(table_->Info(k).has_value()) << "temporary: freed with its last lease";
  ExpectInvariants();
}

TEST_F(ObjectTableTest, AcquireReadAvailableLeasesOnlyReadyKeys) {
  Store({Key(1), Key(3)});
  ASSERT_TRUE(table_->ReserveWrite({1, 76}, {Key(2)}, kUnit).ok());
  Bitmap got = table_->AcquireReadAvailable({2, 77}, {Key(1), Key(2), Key(3), Key(4)});
  EXPECT_EQ(got.ToString(), "1010");
  EXPECT_EQ(table_->LeasesHeld(77, Key(3)), 1u);
  EXPECT_EQ(table_->AcquireReadAvailable({2, 78}, {Key(9)}).Popcount(), 0u);
  EXPECT_EQ(table_->stats().requests, 2u) << "no ledger for a request that leased nothing";
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReadLeasesExpireAfterTheirTtl) {
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({3, 80}, {Key(1)}).ok());
  clock_->Advance(seconds(29));
  EXPECT_EQ(table_->ReapExpired(), 0u);
  EXPECT_EQ(table_->Info(Key(1))->readers, 1u);
  clock_->Advance(seconds(2));
  EXPECT_EQ(table_->ReapExpired(), 1u);
  EXPECT_EQ(table_->Info(Key(1))->readers, 0u);
  EXPECT_EQ(table_->stats().requests, 0u);
  EXPECT_EQ(table_->stats().expired_leases, 1u);
  EXPECT_EQ(table_->ReleaseRead(80, {Key(1)}).code(), StatusCode::kLeaseNotHeld);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, RetakingALeaseRefreshesItsTtl) {
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({3, 81}, {Key(1)}).ok());
  clock_->Advance(seconds(20));
  ASSERT_TRUE(table_->AcquireRead({3, 81}, {Key(1)}).ok());
  clock_->Advance(seconds(20));
  EXPECT_EQ(table_->ReapExpired(), 0u);
  EXPECT_EQ(table_->LeasesHeld(81, Key(1)), 2u);
  clock_->Advance(seconds(11));
  EXPECT_EQ(table_->ReapExpired(), 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ExpiredWriteLeaseNeverMakesHalfWrittenBytesReadable) {
  auto r = table_->ReserveWrite({1, 90}, {Key(1)}, kUnit);
  ASSERT_TRUE(r.ok());
  std::memset(table_->data((*r)[0].offset), 0xAB, kUnit / 2);  // half written
  clock_->Advance(seconds(11));
  EXPECT_EQ(table_->ReapExpired(), 1u);
  EXPECT_FALSE(table_->Info(Key(1)).has_value());
  EXPECT_FALSE(table_->Contains({Key(1)}).Test(0));
  EXPECT_EQ(table_->AcquireRead({1, 91}, {Key(1)}).code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(table_->FinishWrite(90, {Key(1)}).code(), StatusCode::kKeyAbsent);
  EXPECT_EQ(listener_->Removed(RemovalReason::kAborted).size(), 1u);
  // The writer may still be writing: its extent is quarantined, not reused.
  EXPECT_EQ(table_->stats().used_bytes, kUnit);
  EXPECT_EQ(table_->stats().quarantined, 1u);
  ExpectInvariants();
  EXPECT_EQ(table_->ReleaseQuarantine(90), 1u);
  EXPECT_EQ(table_->ReleaseQuarantine(90), 0u);
  EXPECT_EQ(table_->stats().used_bytes, 0u);
  EXPECT_EQ(table_->stats().quarantined, 0u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, DeleteOfLeasedObjectIsRefusedAndUnleasedOneSucceeds) {
  Store({Key(1), Key(2)});
  ASSERT_TRUE(table_->AcquireRead({1, 100}, {Key(1)}).ok());
  EXPECT_EQ(table_->Delete({Key(2), Key(1)}).code(), StatusCode::kLocked);
  EXPECT_TRUE(table_->Contains({Key(2)}).Test(0)) << "a refused batch deletes nothing";
  EXPECT_TRUE(table_->Delete({Key(2)}).ok());
  EXPECT_FALSE(table_->Contains({Key(2)}).Test(0));
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ClearWithoutForceKeepsLeasedAndWritingObjects) {
  Store({Key(1), Key(2), Key(3)});
  ASSERT_TRUE(table_->AcquireRead({1, 110}, {Key(1)}).ok());
  ASSERT_TRUE(table_->ReserveWrite({1, 111}, {Key(4)}, kUnit).ok());
  EXPECT_EQ(table_->Clear(false), 2u);
  EXPECT_TRUE(table_->Contains({Key(1)}).Test(0));
  EXPECT_TRUE(table_->Info(Key(4)).has_value());
  EXPECT_FALSE(table_->Info(Key(2)).has_value());
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ForcedClearDetachesLeasedObjectsUntilTheirLeasesDrain) {
  Store({Key(1), Key(2)});
  ASSERT_TRUE(table_->AcquireRead({1, 120}, {Key(1)}).ok());
  ASSERT_TRUE(table_->ReserveWrite({1, 121}, {Key(3)}, kUnit).ok());
  EXPECT_EQ(table_->Clear(true), 3u);
  EXPECT_FALSE(table_->Contains({Key(1)}).Test(0));
  EXPECT_EQ(table_->stats().detached, 2u);
  EXPECT_GT(table_->stats().used_bytes, 0u) << "leased bytes stay valid for their holders";
  // The holder can still release; the writer can still finish (and the object is dropped).
  ASSERT_TRUE(table_->ReleaseRead(120, {Key(1)}).ok());
  ASSERT_TRUE(table_->FinishWrite(121, {Key(3)}).ok());
  EXPECT_FALSE(table_->Contains({Key(3)}).Test(0));
  EXPECT_EQ(table_->stats().used_bytes, 0u);
  EXPECT_EQ(table_->stats().detached, 0u);
  // The key can be stored again.
  Store({Key(1)});
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReleaseOfForeignLeaseIsRejected) {
  Store({Key(1), Key(2)});
  ASSERT_TRUE(table_->AcquireRead({1, 130}, {Key(1), Key(2)}).ok());
  // Request 131 holds nothing; request 130 does not hold two leases on key 1.
  EXPECT_EQ(table_->ReleaseRead(131, {Key(1)}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->ReleaseRead(130, {Key(1)}, 2).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->Info(Key(1))->readers, 1u);
  // A release is atomic: one key not held fails the batch and returns nothing.
  ASSERT_TRUE(table_->ReleaseRead(130, {Key(2)}).ok());
  EXPECT_EQ(table_->ReleaseRead(130, {Key(1), Key(2)}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->LeasesHeld(130, Key(1)), 1u);
  // The same key twice in one batch needs two leases.
  EXPECT_EQ(table_->ReleaseRead(130, {Key(1), Key(1)}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->LeasesHeld(130, Key(1)), 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ExtraCountLeaseNeedsOnePlusExtraReleasesFromAnyWorker) {
  // MLA with tp = 4: the scheduler takes 1 + 3 leases; four workers each release one.
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({/*client=*/10, 140}, {Key(1)}, 4).ok());
  for (ClientId worker = 20; worker < 23; ++worker) {
    ASSERT_TRUE(table_->ReleaseRead(140, {Key(1)}).ok());
    EXPECT_EQ(table_->EvictBytes(1 << 30), 0u) << "still leased after worker " << worker;
  }
  ASSERT_TRUE(table_->ReleaseRead(140, {Key(1)}).ok());
  EXPECT_EQ(table_->ReleaseRead(140, {Key(1)}).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->EvictBytes(1), kUnit);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, PrefixAcquireLeasesOnlyTheContiguousPresentPrefix) {
  Store({Key(0), Key(1), Key(3), Key(4)});
  std::vector<ObjectKey> q = Keys(0, 5);
  EXPECT_EQ(table_->AcquireReadPrefix({1, 150}, q), 2u);
  EXPECT_EQ(table_->LeasesHeld(150, Key(0)), 1u);
  EXPECT_EQ(table_->LeasesHeld(150, Key(1)), 1u);
  EXPECT_EQ(table_->LeasesHeld(150, Key(3)), 0u);
  EXPECT_EQ(table_->LeasesHeld(150, Key(4)), 0u);
  EXPECT_EQ(table_->AcquireReadPrefix({1, 151}, Keys(2, 3)), 0u);
  EXPECT_EQ(table_->stats().requests, 1u) << "a miss creates no ledger";
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReleaseRequestDropsReadsAndAbortsWrites) {
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({1, 160}, {Key(1)}, 3).ok());
  ASSERT_TRUE(table_->ReserveWrite({1, 160}, {Key(2)}, kUnit).ok());
  EXPECT_EQ(table_->ReleaseRequest(160), 2u);
  EXPECT_EQ(table_->Info(Key(1))->readers, 0u);
  EXPECT_FALSE(table_->Info(Key(2)).has_value());
  EXPECT_EQ(table_->ReleaseRequest(160), 0u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReleaseClientDropsOnlyLedgersThatClientCreated) {
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({/*client=*/1, 170}, {Key(1)}).ok());
  ASSERT_TRUE(table_->AcquireRead({/*client=*/2, 171}, {Key(1)}).ok());
  EXPECT_EQ(table_->ReleaseClient(1), 1u);
  EXPECT_EQ(table_->LeasesHeld(170, Key(1)), 0u);
  EXPECT_EQ(table_->LeasesHeld(171, Key(1)), 1u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, PrefixChainsAreEvictedFromTheTail) {
  // Chain A is stored, then chain B. A lookup of A makes it the most recent, chunk 0 last.
  std::vector<ObjectKey> a = Keys(0, 4), b = Keys(100, 4);
  Store(a);
  Store(b);
  ASSERT_EQ(table_->AcquireReadPrefix({1, 180}, a), 4u);
  ASSERT_TRUE(table_->ReleaseRead(180, a).ok());
  Store(Keys(200, 8));  // fills the arena: 16 units
  // Evict one object at a time and record the order.
  std::vector<ObjectKey> order;
  while (table_->EvictBytes(1) > 0) {
    auto r = listener_->Removed(RemovalReason::kEvicted);
    order.push_back(r.back());
  }
  ASSERT_EQ(order.size(), 16u);
  // B (least recent) goes first, from its tail; A last, chunk 3 before chunk 0.
  EXPECT_EQ(order[0], b[3]);
  EXPECT_EQ(order[3], b[0]);
  EXPECT_EQ(order[4], a[3]);
  EXPECT_EQ(order[7], a[0]);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, TouchPrefixMakesChunkZeroMostRecentWithoutLeasing) {
  std::vector<ObjectKey> a = Keys(0, 3), b = Keys(10, 3);
  Store(a);
  Store(b);
  EXPECT_EQ(table_->TouchPrefix(a), 3u);
  EXPECT_EQ(table_->stats().read_leases, 0u);
  table_->EvictBytes(3 * kUnit);
  EXPECT_EQ(table_->Contains(a).Popcount(), 3u);
  EXPECT_EQ(table_->Contains(b).Popcount(), 0u);
}

TEST_F(ObjectTableTest, ObjectBytesAreDistinctNonOverlappingArenaRanges) {
  auto r = table_->ReserveWrite({1, 190}, Keys(0, 16), kUnit);
  ASSERT_TRUE(r.ok());
  for (size_t i = 0; i < r->size(); ++i) {
    std::memset(table_->data((*r)[i].offset), static_cast<int>(i), kUnit);
  }
  for (size_t i = 0; i < r->size(); ++i) {
    const uint8_t* p = table_->data((*r)[i].offset);
    for (size_t j = 0; j < kUnit; j += 512) ASSERT_EQ(p[j], static_cast<uint8_t>(i));
  }
}

TEST_F(ObjectTableTest, ListenerMayCallBackIntoTheTable) {
  class Reentrant : public ObjectTableListener {
   public:
    explicit Reentrant(ObjectTable* t) : t_(t) {}
    void OnObjectsReady(const std::vector<ObjectKey>& keys) override {
      seen = t_->Contains(keys).Popcount();
    }
    ObjectTable* t_;
    size_t seen = 0;
  };
  auto l = std::make_shared<Reentrant>(table_.get());
  table_->AddListener(l);
  Store(Keys(0, 3));
  EXPECT_EQ(l->seen, 3u);
  table_->RemoveListener(l.get());
}

TEST_F(ObjectTableTest, InvalidOptionsAreRejected) {
  ArenaOptions ao;
  ao.size_bytes = 16 * kUnit;
  std::shared_ptr<Arena> arena(Arena::Create(ao).value().release());
  ObjectTableOptions bad;
  bad.low_watermark = 0.9;
  bad.high_watermark = 0.5;
  EXPECT_EQ(ObjectTable::Create(arena, bad).status().code(), StatusCode::kInvalidArgument);
  ObjectTableOptions bad_policy;
  bad_policy.eviction_policy = "random";
  EXPECT_EQ(ObjectTable::Create(arena, bad_policy).status().code(), StatusCode::kInvalidArgument);
  ObjectTableOptions bad_ttl;
  bad_ttl.read_lease_ttl = Duration::zero();
  EXPECT_EQ(ObjectTable::Create(arena, bad_ttl).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ObjectTable::Create(nullptr).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ObjectTableTest, MaintenanceThreadEvictsDownToTheLowWatermark) {
  ObjectTableOptions o;
  o.high_watermark = 0.5;
  o.low_watermark = 0.25;
  Make(16, o);
  table_->Start();
  table_->Start();    // idempotent
  Store(Keys(0, 6));  // 37.5%: below high, nothing happens
  EXPECT_EQ(table_->stats().evictions, 0u);
  Store(Keys(10, 4));  // 62.5%: crosses high, the thread evicts down to <= 25% (4 objects)
  ASSERT_TRUE(listener_->WaitForRemovals(6, seconds(20)));
  EXPECT_LE(table_->stats().used_bytes, 4 * kUnit);
  EXPECT_EQ(table_->stats().evictions, 6u);
  table_->Stop();
  table_->Stop();  // idempotent
  ExpectInvariants();
}

TEST_F(ObjectTableTest, MaintenanceThreadReapsExpiredLeases) {
  ObjectTableOptions o;
  o.reap_interval = std::chrono::milliseconds(5);
  Make(16, o);
  // A temporary object whose only lease expires is freed by the reaper: the listener sees it.
  ASSERT_TRUE(table_->ReserveWrite({1, 200}, {Key(1)}, kUnit, {ReserveMode::kNewOnly, true}).ok());
  ASSERT_TRUE(table_->FinishWrite(200, {Key(1)}, 1).ok());
  clock_->Advance(seconds(31));
  table_->Start();
  ASSERT_TRUE(listener_->WaitForRemovals(1, seconds(20)));
  table_->Stop();
  EXPECT_EQ(listener_->Removed(RemovalReason::kTemporaryFreed).size(), 1u);
  EXPECT_EQ(table_->stats().expired_leases, 1u);
  EXPECT_EQ(table_->stats().used_bytes, 0u);
  ExpectInvariants();
}

// ---- fences: lease caps, generations, quarantine, discard -----------------------------------

TEST_F(ObjectTableTest, ReadLeasesAtTheCapAreRefusedNeverWrapped) {
  Store({Key(1), Key(2)});
  const uint32_t cap = ObjectTableOptions().max_leases_per_object;
  // One object driven to the default cap in two grants.
  ASSERT_TRUE(table_->AcquireRead({1, 200}, {Key(1)}, cap - 1).ok());
  ASSERT_TRUE(table_->AcquireRead({1, 201}, {Key(1)}, 1).ok());
  EXPECT_EQ(table_->Info(Key(1))->readers, cap);
  EXPECT_EQ(table_->AcquireRead({1, 202}, {Key(1)}, 1).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(table_->AcquireRead({1, 202}, {Key(2), Key(1)}, 1).code(),
            StatusCode::kResourceExhausted)
      << "all or nothing: key 2 is not leased either";
  EXPECT_EQ(table_->LeasesHeld(202, Key(2)), 0u);
  EXPECT_EQ(table_->AcquireRead({1, 203}, {Key(2)}, UINT32_MAX).code(),
            StatusCode::kResourceExhausted)
      << "a count that would wrap the counter";
  // A prefix stops at the capped object; "available" skips it.
  EXPECT_EQ(table_->AcquireReadPrefix({1, 204}, {Key(2), Key(1)}), 1u);
  EXPECT_EQ(table_->AcquireReadAvailable({1, 205}, {Key(1), Key(2)}).ToString(), "01");
  EXPECT_EQ(table_->Info(Key(1))->readers, cap);
  EXPECT_GE(table_->stats().lease_cap_refusals, 5u);
  ASSERT_TRUE(table_->ReleaseRead(200, {Key(1)}, cap - 1).ok());
  EXPECT_TRUE(table_->AcquireRead({1, 206}, {Key(1)}, 1).ok());
  ExpectInvariants();
  // A batch naming one object twice counts both grants against the cap.
  ObjectTableOptions small;
  small.max_leases_per_object = 4;
  Make(16, small);
  Store({Key(3)});
  EXPECT_EQ(table_->AcquireRead({1, 300}, {Key(3), Key(3), Key(3)}, 2).code(),
            StatusCode::kResourceExhausted);
  EXPECT_TRUE(table_->AcquireRead({1, 300}, {Key(3), Key(3)}, 2).ok());
  EXPECT_EQ(table_->Info(Key(3))->readers, 4u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, ReleaseReadUpToReturnsOnlyWhatTheRequestHolds) {
  Store({Key(1), Key(2), Key(3)});
  ASSERT_TRUE(table_->AcquireRead({1, 400}, {Key(1), Key(2)}, 2).ok());
  ASSERT_TRUE(table_->ReleaseRead(400, {Key(1)}, 1).ok());
  EXPECT_EQ(table_->ReleaseReadUpTo(400, {Key(1), Key(2), Key(3)}, 2), 3u);
  EXPECT_EQ(table_->stats().read_leases, 0u);
  EXPECT_EQ(table_->stats().requests, 0u);
  EXPECT_EQ(table_->ReleaseReadUpTo(400, {Key(1)}, 1), 0u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, AReleaseNamingAnotherGenerationIsRefused) {
  Store({Key(1)});
  ASSERT_TRUE(table_->AcquireRead({1, 500}, {Key(1)}).ok());
  const uint64_t g1 = table_->LeasedInfo(500, Key(1))->generation;
  EXPECT_NE(g1, 0u);
  const uint64_t other = g1 + 1;
  EXPECT_EQ(table_->ReleaseRead(500, {Key(1)}, 1, &other).code(), StatusCode::kLeaseNotHeld);
  EXPECT_EQ(table_->LeasesHeld(500, Key(1)), 1u) << "a refused release changes nothing";
  EXPECT_TRUE(table_->ReleaseRead(500, {Key(1)}, 1, &g1).ok());
  // The key stored again is a new generation.
  ASSERT_TRUE(table_->Delete({Key(1)}).ok());
  Store({Key(1)});
  EXPECT_NE(table_->Info(Key(1))->generation, g1);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, AnExtentIsNeverReusedWhileItsDroppedWriterMayStillWrite) {
  Make(2);
  auto r = table_->ReserveWrite({1, 600}, {Key(1), Key(2)}, kUnit);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(table_->ReleaseRequest(600), 2u);  // dropped by someone other than the writer
  EXPECT_EQ(table_->stats().quarantined, 2u);
  EXPECT_EQ(table_->ReserveWrite({1, 601}, {Key(3)}, kUnit).status().code(),
            StatusCode::kOutOfMemory);
  EXPECT_EQ(table_->FinishWrite(600, {Key(1)}).code(), StatusCode::kKeyAbsent);
  ExpectInvariants();
  EXPECT_EQ(table_->ReleaseQuarantine(600), 2u);
  EXPECT_TRUE(table_->ReserveWrite({1, 601}, {Key(3)}, kUnit).ok());
  ExpectInvariants();
}

TEST_F(ObjectTableTest, DiscardRemovesOnlyTheNamedGenerationAndWaitsForItsReaders) {
  Store({Key(1), Key(2)});
  const uint64_t g1 = table_->Info(Key(1))->generation;
  EXPECT_FALSE(table_->Discard(Key(1), g1 + 100));
  ASSERT_TRUE(table_->AcquireRead({1, 700}, {Key(1)}).ok());
  EXPECT_TRUE(table_->Discard(Key(1), g1));
  EXPECT_FALSE(table_->Info(Key(1)).has_value());
  EXPECT_EQ(table_->AcquireReadPrefix({1, 701}, {Key(1)}), 0u);
  EXPECT_EQ(table_->stats().detached, 1u);
  ASSERT_TRUE(table_->ReleaseRead(700, {Key(1)}).ok());
  EXPECT_EQ(table_->stats().detached, 0u);
  EXPECT_TRUE(table_->Discard(Key(2), table_->Info(Key(2))->generation));
  EXPECT_EQ(table_->stats().discarded, 2u);
  ExpectInvariants();
}

TEST_F(ObjectTableTest, FinishWriteKeepsTheCommittedChecksum) {
  auto r = table_->ReserveWrite({1, 800}, {Key(1), Key(2)}, kUnit);
  ASSERT_TRUE(r.ok());
  const uint32_t crcs[2] = {0xAAAA5555u, 7u};
  ASSERT_TRUE(table_->FinishWrite(800, {Key(1), Key(2)}, 0, crcs).ok());
  EXPECT_TRUE(table_->Info(Key(1))->has_crc32c);
  EXPECT_EQ(table_->Info(Key(1))->crc32c, 0xAAAA5555u);
  EXPECT_EQ(table_->Info(Key(2))->crc32c, 7u);
  Store({Key(3)});
  EXPECT_FALSE(table_->Info(Key(3))->has_crc32c);
}

}  // namespace
}  // namespace lmcache_cpp
