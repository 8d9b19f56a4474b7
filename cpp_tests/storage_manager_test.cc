// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The store controller and the storage manager end to end: objects written to L1 reach L2 in the
// background, come back after L1 is flushed, temporary objects are never written back, the
// write-buffer policy frees L1, and Stop leaves no lease, pin or thread behind.

#include "lmcache_cpp/storage_manager.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/prefetch_controller.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "test_util.h"
#include "testing/memory_adapter.h"

namespace lmcache_cpp {
namespace {

using std::chrono::seconds;
using testutil::Key;
using testutil::Keys;

constexpr uint64_t kObj = 4096;

class StorageManagerTest : public ::testing::Test {
 protected:
  void Build(size_t num_adapters, StoreControllerOptions so = {}, size_t units = 32) {
    mgr_.reset();
    adapters_.clear();
    StorageManagerConfig c;
    c.arena.size_bytes = units * kObj;
    c.store = so;
    for (size_t i = 0; i < num_adapters; ++i) {
      adapters_.push_back(std::shared_ptr<MemoryL2Adapter>(
          MemoryL2Adapter::Create(MemoryAdapterOptions{}).value().release()));
      c.adapters.push_back(adapters_.back());
    }
    auto m = StorageManager::Create(std::move(c));
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    mgr_ = std::move(m).value();
    ASSERT_TRUE(mgr_->Start().ok());
  }
  void SetUp() override { Build(1); }

  // Writes keys into L1 with a byte pattern derived from each key.
  void Write(const std::vector<ObjectKey>& keys, RequestId req = 500) {
    ObjectTable* t = mgr_->table();
    auto r = t->ReserveWrite({1, req}, keys, kObj);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::vector<ObjectKey> mine;
    for (const auto& res : *r) {
      if (res.skipped) continue;
      for (size_t i = 0; i < kObj; ++i) {
        t->data(res.offset)[i] = static_cast<uint8_t>(res.key.chunk.bytes[i % 32] ^ i);
      }
      mine.push_back(res.key);
    }
    ASSERT_TRUE(t->FinishWrite(req, mine).ok());
  }
  bool BytesMatch(const ObjectKey& k) {
    auto info = mgr_->table()->Info(k);
    if (!info) return false;
    const uint8_t* p = mgr_->table()->data(info->offset);
    for (size_t i = 0; i < kObj; ++i) {
      if (p[i] != static_cast<uint8_t>(k.chunk.bytes[i % 32] ^ i)) return false;
    }
    return true;
  }

  std::vector<std::shared_ptr<MemoryL2Adapter>> adapters_;
  std::unique_ptr<StorageManager> mgr_;
};

TEST_F(StorageManagerTest, StoredObjectsReachL2AndComeBackAfterAnL1Flush) {
  auto keys = Keys(0, 8);
  Write(keys);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  for (const auto& k : keys) EXPECT_TRUE(adapters_[0]->Contains(k));
  EXPECT_EQ(mgr_->store()->stats().stored, 8u);
  EXPECT_EQ(mgr_->table()->stats().read_leases, 0u) << "store leases were returned";

  EXPECT_EQ(mgr_->table()->Clear(false), 8u);
  const PrefetchRequest r = PrefetchRequest::Of({3, 42}, keys, kObj);
  auto h = mgr_->prefetch()->Submit(r);
  ASSERT_TRUE(h.ok());
  auto res = mgr_->prefetch()->Wait(3, *h, seconds(20));
  ASSERT_TRUE(res.ok() && res->has_value());
  EXPECT_EQ((*res)->hits, 8u);
  EXPECT_EQ((*res)->l2_hits, 8u);
  for (const auto& k : keys) EXPECT_TRUE(BytesMatch(k)) << k.ToShortString();
  EXPECT_GT(mgr_->EndRequest(42), 0u);
  EXPECT_EQ(mgr_->table()->stats().objects, 0u) << "loaded objects were temporary";
  EXPECT_EQ(adapters_[0]->TotalPins(), 0u);
}

TEST_F(StorageManagerTest, ObjectsLoadedFromL2AreNeverWrittenBack) {
  auto keys = Keys(0, 4);
  Write(keys);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  const uint64_t stores_before = adapters_[0]->stats().stores;
  mgr_->table()->Clear(false);
  const PrefetchRequest r = PrefetchRequest::Of({3, 43}, keys, kObj);
  auto sync = mgr_->prefetch()->LookupAndPin(r, seconds(10));
  ASSERT_TRUE(sync.ok());
  ASSERT_TRUE(mgr_->prefetch()->WaitLoad(43, seconds(20)).ok());
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  EXPECT_EQ(adapters_[0]->stats().stores, stores_before);
  EXPECT_EQ(mgr_->store()->stats().announced, 4u);
  mgr_->EndRequest(43);
}

TEST_F(StorageManagerTest, EveryAdapterReceivesEveryObjectByDefault) {
  Build(2);
  auto keys = Keys(10, 3);
  Write(keys);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  for (const auto& k : keys) {
    EXPECT_TRUE(adapters_[0]->Contains(k));
    EXPECT_TRUE(adapters_[1]->Contains(k));
  }
}

TEST_F(StorageManagerTest, WriteBufferPolicyFreesL1OnceL2HasTheObject) {
  StoreControllerOptions so;
  so.free_l1_after_store = true;
  Build(1, so);
  auto keys = Keys(0, 5);
  Write(keys);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  EXPECT_EQ(mgr_->store()->stats().freed_from_l1, 5u);
  EXPECT_EQ(mgr_->table()->stats().objects, 0u);
  for (const auto& k : keys) EXPECT_TRUE(adapters_[0]->Contains(k));
}

TEST_F(StorageManagerTest, FailedStoreReleasesItsLeasesAndKeepsL1) {
  StoreControllerOptions so;
  so.free_l1_after_store = true;
  Build(1, so);
  adapters_[0]->InjectFault(L2Op::kStore, 1, {Fault::Kind::kFail, {}});
  Write(Keys(0, 3));
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  EXPECT_EQ(mgr_->store()->stats().failed, 3u);
  EXPECT_EQ(mgr_->store()->stats().freed_from_l1, 0u) << "never free what L2 does not hold";
  EXPECT_EQ(mgr_->table()->stats().objects, 3u);
  EXPECT_EQ(mgr_->table()->stats().read_leases, 0u);
}

TEST_F(StorageManagerTest, ObjectEvictedBeforeItsStoreIsSkipped) {
  StoreControllerOptions so;
  so.max_in_flight_batches = 1;
  Build(1, so);
  adapters_[0]->SetStalled(true);
  Write(Keys(0, 1));  // batch 1 occupies the only in-flight slot, stalled in the adapter
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  Write(Keys(1, 1), 501);  // queued behind it, not leased yet
  ASSERT_TRUE(mgr_->table()->Delete({Key(1)}).ok());
  adapters_[0]->SetStalled(false);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  auto s = mgr_->store()->stats();
  EXPECT_EQ(s.announced, 2u);
  EXPECT_EQ(s.stored, 1u);
  EXPECT_EQ(s.skipped_evicted, 1u);
  EXPECT_FALSE(adapters_[0]->Contains(Key(1)));
  EXPECT_EQ(mgr_->table()->stats().read_leases, 0u);
}

TEST_F(StorageManagerTest, StopReleasesInFlightLeasesAndPinsAndIsIdempotent) {
  auto keys = Keys(0, 4);
  Write(keys);
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  mgr_->table()->Clear(false);
  adapters_[0]->SetStalled(true);
  const PrefetchRequest r = PrefetchRequest::Of({3, 44}, keys, kObj);
  ASSERT_TRUE(mgr_->prefetch()->Submit(r).ok());
  Write(Keys(100, 2), 502);  // a store batch also waits on the stalled adapter
  ASSERT_TRUE(adapters_[0]->WaitForBlockedOperations(1, seconds(10)));
  mgr_->Stop();
  mgr_->Stop();
  EXPECT_EQ(adapters_[0]->TotalPins(), 0u);
  auto s = mgr_->table()->stats();
  EXPECT_EQ(s.read_leases, 0u);
  EXPECT_EQ(s.write_leases, 0u);
  EXPECT_EQ(s.temporary, 0u);
  EXPECT_EQ(mgr_->Start().code(), StatusCode::kUnavailable);
}

TEST_F(StorageManagerTest, EndClientDropsEverythingTheClientCreated) {
  auto keys = Keys(0, 3);
  Write(keys);
  // The background store holds read leases while it copies to L2; let it finish first.
  ASSERT_TRUE(mgr_->store()->WaitIdle(seconds(20)));
  const PrefetchRequest r = PrefetchRequest::Of({/*client=*/77, 45}, keys, kObj);
  ASSERT_TRUE(mgr_->prefetch()->Submit(r).ok());
  EXPECT_EQ(mgr_->table()->stats().read_leases, 3u);
  EXPECT_EQ(mgr_->EndClient(77), 3u);
  EXPECT_EQ(mgr_->table()->stats().read_leases, 0u);
  EXPECT_EQ(mgr_->prefetch()->stats().jobs, 0u);
}

TEST(StorageManagerCreateTest, InvalidConfigIsAnErrorNotACrash) {
  StorageManagerConfig zero;  // arena size 0
  EXPECT_EQ(StorageManager::Create(zero).status().code(), StatusCode::kInvalidArgument);
  StorageManagerConfig bad_table;
  bad_table.arena.size_bytes = 1 << 20;
  bad_table.table.low_watermark = 0.9;
  bad_table.table.high_watermark = 0.5;
  EXPECT_EQ(StorageManager::Create(bad_table).status().code(), StatusCode::kInvalidArgument);
  StorageManagerConfig null_adapter;
  null_adapter.arena.size_bytes = 1 << 20;
  null_adapter.adapters.push_back(nullptr);
  EXPECT_EQ(StorageManager::Create(null_adapter).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lmcache_cpp
