// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// WorkerPool (cpp/src/worker_pool.h): workers take the owner's queue, Close wakes, joins and is
// idempotent, work taken after Close began sees closing(). Races are forced with promises and
// the sync point "WorkerPool::Close:Closing", never with sleeps.

#include "worker_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "sync_point.h"

namespace lmcache_cpp {
namespace internal {
namespace {

using std::chrono::seconds;

// A minimal owner: a queue of items under its mutex, as the adapters keep theirs. An item taken
// after Close began is recorded as cancelled instead of run.
class Owner {
 public:
  explicit Owner(size_t workers) : pool_(&mu_) {
    pool_.Start(workers, [this] { Loop(); });
  }

  // Returns false when no worker remains (the caller completes the item itself).
  bool Submit(std::function<void()> item) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!pool_.has_workers()) return false;
    queue_.push_back(std::move(item));
    lk.unlock();
    pool_.NotifyOne();
    return true;
  }

  WorkerPool& pool() { return pool_; }
  std::mutex& mu() { return mu_; }
  int ran() const { return ran_.load(); }
  int cancelled() const { return cancelled_.load(); }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> item;
      bool cancel = false;
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (!pool_.WaitForWork(lk, [this] { return !queue_.empty(); })) return;
        item = std::move(queue_.front());
        queue_.pop_front();
        cancel = pool_.closing();
      }
      if (cancel) {
        ++cancelled_;
      } else {
        item();
        ++ran_;
      }
    }
  }

  std::mutex mu_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  std::atomic<int> ran_{0};
  std::atomic<int> cancelled_{0};
  WorkerPool pool_;  // after mu_, which it uses
};

TEST(WorkerPoolTest, WorkersRunEveryQueuedItem) {
  Owner owner(3);
  std::atomic<int> sum{0};
  std::promise<void> all_ran;
  constexpr int kItems = 100;
  for (int i = 1; i <= kItems; ++i) {
    ASSERT_TRUE(owner.Submit([&, i] {
      if (sum.fetch_add(i) + i == kItems * (kItems + 1) / 2) all_ran.set_value();
    }));
  }
  ASSERT_EQ(all_ran.get_future().wait_for(seconds(30)), std::future_status::ready);
  owner.pool().Close();
  EXPECT_EQ(owner.ran(), kItems);
  EXPECT_EQ(owner.cancelled(), 0);
}

TEST(WorkerPoolTest, CloseJoinsIdleWorkersAndIsIdempotent) {
  Owner owner(4);
  EXPECT_TRUE(owner.pool().running());
  owner.pool().Close();
  EXPECT_FALSE(owner.pool().running());
  owner.pool().Close();
  std::lock_guard<std::mutex> lk(owner.mu());
  EXPECT_TRUE(owner.pool().closing());
  EXPECT_FALSE(owner.pool().has_workers());
}

TEST(WorkerPoolTest, SubmitAfterCloseFindsNoWorker) {
  Owner owner(2);
  owner.pool().Close();
  EXPECT_FALSE(owner.Submit([] {}));
  EXPECT_EQ(owner.ran(), 0);
}

TEST(WorkerPoolTest, WorkQueuedBeforeCloseIsTakenWithClosingSet) {
  LMCACHE_REQUIRE_SYNC_POINTS();
  Owner owner(1);
  std::promise<void> started;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  ASSERT_TRUE(owner.Submit([&] {
    started.set_value();
    released.wait();
  }));
  ASSERT_EQ(started.get_future().wait_for(seconds(30)), std::future_status::ready);
  ASSERT_TRUE(owner.Submit([] {}));  // queued behind the blocked item
  SyncPoints::Reset();
  std::thread closer([&] { owner.pool().Close(); });
  ASSERT_TRUE(SyncPoints::WaitFor("WorkerPool::Close:Closing", 1, seconds(30)));
  release.set_value();
  closer.join();
  EXPECT_EQ(owner.ran(), 1);
  EXPECT_EQ(owner.cancelled(), 1);  // the worker drained the queue before it returned
}

TEST(WorkerPoolTest, CloseCallsWakeWithoutTheOwnersLock) {
  Owner owner(1);
  bool woke = false;
  owner.pool().Close([&] {
    std::lock_guard<std::mutex> lk(owner.mu());  // would deadlock if Close held it
    woke = owner.pool().closing();
  });
  EXPECT_TRUE(woke);
}

}  // namespace
}  // namespace internal
}  // namespace lmcache_cpp
