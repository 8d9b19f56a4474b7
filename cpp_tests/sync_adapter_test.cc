// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// SyncL2Adapter: the asynchronous contract built on blocking methods. Callbacks run exactly once,
// on a worker; Close cancels what is queued and joins; unpins are queued and never block the
// caller; failures and malformed answers of the subclass become failed operations. Races are
// forced with a gate the subclass blocks on and with WaitUntilClosing, never with sleeps.

#include "lmcache_cpp/sync_adapter.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "l2_test_util.h"
#include "sync_point.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace {

using std::chrono::seconds;
using testutil::Completion;
using testutil::Keys;

// A map-backed tier with pin counts. Every call records its thread and kind; Store can be held
// at a gate so tests control when the worker is busy.
class MapAdapter final : public SyncL2Adapter {
 public:
  explicit MapAdapter(size_t workers = 1) : SyncL2Adapter(SyncAdapterOptions{workers}) {}
  ~MapAdapter() override { Close(); }

  std::string name() const override { return "map"; }

  // While closed, Store waits at the gate (after announcing that it entered).
  void CloseGate() {
    std::lock_guard<std::mutex> lk(mu_);
    gate_open_ = false;
  }
  void OpenGate() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      gate_open_ = true;
    }
    cv_.notify_all();
  }
  // Waits until `n` Store calls have entered.
  bool WaitEntered(int n) {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, seconds(30), [&] { return entered_ >= n; });
  }
  void FailNext(Status st) {
    std::lock_guard<std::mutex> lk(mu_);
    fail_next_ = std::move(st);
  }
  void AnswerWrongSizeNext() {
    std::lock_guard<std::mutex> lk(mu_);
    wrong_size_next_ = true;
  }
  uint32_t Pins(const ObjectKey& k) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = pins_.find(k);
    return it == pins_.end() ? 0 : it->second;
  }
  std::vector<std::string> calls() const {
    std::lock_guard<std::mutex> lk(mu_);
    return calls_;
  }
  std::set<std::thread::id> threads() const {
    std::lock_guard<std::mutex> lk(mu_);
    return threads_;
  }

 protected:
  Result<Bitmap> Store(const std::vector<ObjectKey>& keys,
                       const std::vector<ConstBuffer>& buffers) override {
    std::unique_lock<std::mutex> lk(mu_);
    Record("store");
    ++entered_;
    cv_.notify_all();
    cv_.wait(lk, [this] { return gate_open_; });
    if (auto st = TakeFailure(); !st.ok()) return st;
    Bitmap bits(keys.size(), true);
    for (size_t i = 0; i < keys.size(); ++i) {
      data_[keys[i]].assign(buffers[i].data, buffers[i].data + buffers[i].size);
    }
    return MaybeWrongSize(std::move(bits));
  }
  Result<Bitmap> LookupAndPin(const std::vector<ObjectKey>& keys) override {
    std::lock_guard<std::mutex> lk(mu_);
    Record("lookup");
    if (auto st = TakeFailure(); !st.ok()) return st;
    Bitmap bits(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      if (data_.count(keys[i]) == 0) continue;
      ++pins_[keys[i]];
      bits.Set(i);
    }
    return MaybeWrongSize(std::move(bits));
  }
  Result<Bitmap> Load(const std::vector<ObjectKey>& keys,
                      const std::vector<MutableBuffer>& buffers) override {
    std::lock_guard<std::mutex> lk(mu_);
    Record("load");
    if (auto st = TakeFailure(); !st.ok()) return st;
    Bitmap bits(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      auto it = data_.find(keys[i]);
      if (it == data_.end() || it->second.size() != buffers[i].size) continue;
      std::memcpy(buffers[i].data, it->second.data(), it->second.size());
      bits.Set(i);
    }
    return MaybeWrongSize(std::move(bits));
  }
  void UnpinKeys(const std::vector<ObjectKey>& keys) override {
    std::lock_guard<std::mutex> lk(mu_);
    Record("unpin");
    for (const ObjectKey& k : keys) {
      auto it = pins_.find(k);
      if (it != pins_.end() && it->second > 0 && --it->second == 0) pins_.erase(it);
    }
  }
  void AddStats(L2AdapterStats* s) const override {
    std::lock_guard<std::mutex> lk(mu_);
    s->objects = data_.size();
    for (const auto& [k, n] : pins_) s->pins += n;
  }

 private:
  void Record(const char* what) {
    calls_.push_back(what);
    threads_.insert(std::this_thread::get_id());
  }
  Status TakeFailure() {
    Status st = fail_next_;
    fail_next_ = Status::Ok();
    return st;
  }
  Bitmap MaybeWrongSize(Bitmap bits) {
    if (!wrong_size_next_) return bits;
    wrong_size_next_ = false;
    bits.Resize(bits.size() + 1, true);
    return bits;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool gate_open_ = true;
  int entered_ = 0;
  Status fail_next_;
  bool wrong_size_next_ = false;
  std::map<ObjectKey, std::vector<uint8_t>> data_;
  std::map<ObjectKey, uint32_t> pins_;
  std::vector<std::string> calls_;
  std::set<std::thread::id> threads_;
};

constexpr size_t kSize = 1024;

TEST(SyncAdapterTest, RoundTripThroughTheAsyncInterface) {
  MapAdapter a;
  const auto keys = Keys(0, 4);
  const auto data = testutil::Patterns(1, keys.size(), kSize);
  EXPECT_TRUE(testutil::SyncStore(a, keys, data).All());
  EXPECT_TRUE(testutil::SyncLookup(a, keys).All());
  auto out = testutil::Zeros(keys.size(), kSize);
  EXPECT_TRUE(testutil::SyncLoad(a, keys, &out).All());
  EXPECT_EQ(out, data);
  EXPECT_EQ(a.Pins(keys[0]), 1u);
  a.Unpin(keys);
  // The unpin is queued; a later operation completing means it ran (one worker, FIFO).
  EXPECT_TRUE(testutil::SyncLookup(a, {testutil::Key(99)}).None());
  EXPECT_EQ(a.Pins(keys[0]), 0u);

  const L2AdapterStats s = a.stats();
  EXPECT_EQ(s.stores, 4u);
  EXPECT_EQ(s.store_failures, 0u);
  EXPECT_EQ(s.lookups, 5u);
  EXPECT_EQ(s.loads, 4u);
  EXPECT_EQ(s.load_misses, 0u);
  EXPECT_EQ(s.bytes_written, 4 * kSize);
  EXPECT_EQ(s.bytes_read, 4 * kSize);
  EXPECT_EQ(s.in_flight, 0u);
  EXPECT_EQ(s.objects, 4u) << "filled in by AddStats";
  EXPECT_EQ(s.pins, 0u);
  const SyncAdapterStats q = a.sync_stats();
  EXPECT_EQ(q.completed, 4u);  // store, lookup, load, lookup
  EXPECT_EQ(q.unpins, 1u);
  EXPECT_EQ(q.queued, 0u);
}

TEST(SyncAdapterTest, CallbacksRunExactlyOnceOnTheWorkerThatCalledTheSubclass) {
  MapAdapter a;
  const auto keys = Keys(0, 2);
  const auto data = testutil::Patterns(1, keys.size(), kSize);
  std::vector<ConstBuffer> bufs = {testutil::In(data[0]), testutil::In(data[1])};
  constexpr int kOps = 16;
  std::vector<Completion> done(kOps);
  for (int i = 0; i < kOps; ++i) {
    if (i % 2 == 0) {
      a.SubmitStore(keys, bufs, done[i].Callback());
    } else {
      a.SubmitLookupAndPin(keys, done[i].Callback());
    }
  }
  for (int i = 0; i < kOps; ++i) {
    ASSERT_TRUE(done[i].Wait());
    EXPECT_TRUE(done[i].status().ok());
  }
  a.Close();  // after Close no callback can run: the counts below are final
  const std::set<std::thread::id> workers = a.threads();
  ASSERT_EQ(workers.size(), 1u);
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(done[i].calls(), 1);
    EXPECT_NE(done[i].thread(), std::this_thread::get_id());
    EXPECT_EQ(done[i].thread(), *workers.begin());
  }
  // FIFO with one worker: the calls reached the subclass in submission order.
  const auto calls = a.calls();
  ASSERT_EQ(calls.size(), static_cast<size_t>(kOps));
  for (int i = 0; i < kOps; ++i) EXPECT_EQ(calls[i], i % 2 == 0 ? "store" : "lookup");
}

TEST(SyncAdapterTest, CloseCancelsQueuedOperationsAndFinishesTheRunningOne) {
  LMCACHE_REQUIRE_SYNC_POINTS();
  MapAdapter a;
  const auto keys = Keys(0, 2);
  const auto data = testutil::Patterns(1, keys.size(), kSize);
  ASSERT_TRUE(testutil::SyncStore(a, keys, data).All());
  ASSERT_TRUE(testutil::SyncLookup(a, keys).All());  // one pin each, dropped below

  a.CloseGate();
  std::vector<ConstBuffer> bufs = {testutil::In(data[0]), testutil::In(data[1])};
  Completion running, store, lookup, load;
  a.SubmitStore(keys, bufs, running.Callback());
  ASSERT_TRUE(a.WaitEntered(2)) << "the worker is now inside Store";
  a.SubmitStore(keys, bufs, store.Callback());
  a.SubmitLookupAndPin(keys, lookup.Callback());
  auto out = testutil::Zeros(keys.size(), kSize);
  a.SubmitLoad(keys, {testutil::Out(out[0]), testutil::Out(out[1])}, load.Callback());
  a.Unpin(keys);  // queued behind the blocked Store; returns at once
  EXPECT_EQ(a.sync_stats().queued, 4u);

  internal::SyncPoints::Reset();
  std::thread closer([&] { a.Close(); });
  ASSERT_TRUE(internal::SyncPoints::WaitFor("WorkerPool::Close:Closing", 1, seconds(30)));
  a.OpenGate();
  closer.join();

  EXPECT_EQ(running.calls(), 1);
  EXPECT_TRUE(running.status().ok()) << "an operation already running completes normally";
  for (Completion* c : {&store, &lookup, &load}) {
    EXPECT_EQ(c->calls(), 1);
    EXPECT_EQ(c->status().code(), StatusCode::kCancelled);
    EXPECT_TRUE(c->bits().None());
    EXPECT_NE(c->thread(), std::this_thread::get_id());
  }
  EXPECT_EQ(a.Pins(keys[0]), 0u) << "queued unpins still run at Close";
  const auto calls = a.calls();
  EXPECT_EQ(std::count(calls.begin(), calls.end(), "store"), 2) << "cancelled ops never ran";
  EXPECT_EQ(std::count(calls.begin(), calls.end(), "load"), 0);
  EXPECT_EQ(a.sync_stats().cancelled, 3u);
  EXPECT_EQ(a.stats().in_flight, 0u);

  // After Close: submits complete inline with Unavailable; unpins run inline.
  Completion late;
  a.SubmitLookupAndPin(keys, late.Callback());
  EXPECT_EQ(late.calls(), 1);
  EXPECT_EQ(late.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(late.thread(), std::this_thread::get_id());
  a.Close();  // idempotent
}

TEST(SyncAdapterTest, UnpinNeverWaitsForABusyWorker) {
  MapAdapter a;
  const auto keys = Keys(0, 1);
  const auto data = testutil::Patterns(1, 1, kSize);
  ASSERT_TRUE(testutil::SyncStore(a, keys, data).All());
  ASSERT_TRUE(testutil::SyncLookup(a, keys).All());
  a.CloseGate();
  Completion blocked;
  a.SubmitStore(keys, {testutil::In(data[0])}, blocked.Callback());
  ASSERT_TRUE(a.WaitEntered(2));
  a.Unpin(keys);  // the only worker is held inside Store: this must return without it
  EXPECT_EQ(a.Pins(keys[0]), 1u) << "not yet run";
  a.OpenGate();
  ASSERT_TRUE(blocked.Wait());
  EXPECT_TRUE(testutil::SyncLookup(a, {testutil::Key(50)}).None());  // FIFO: unpin ran first
  EXPECT_EQ(a.Pins(keys[0]), 0u);
}

TEST(SyncAdapterTest, SubclassFailuresBecomeFailedOperations) {
  MapAdapter a;
  const auto keys = Keys(0, 3);
  const auto data = testutil::Patterns(1, keys.size(), kSize);
  a.FailNext(Status::IoError("disk on fire"));
  Status st;
  EXPECT_TRUE(testutil::SyncStore(a, keys, data, &st).None());
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_EQ(a.stats().store_failures, 3u);

  ASSERT_TRUE(testutil::SyncStore(a, keys, data).All());
  a.AnswerWrongSizeNext();
  EXPECT_TRUE(testutil::SyncLookup(a, keys, &st).None());
  EXPECT_EQ(st.code(), StatusCode::kInternal) << st.ToString();
  EXPECT_EQ(a.Pins(keys[0]), 0u) << "pins of a malformed answer are given back";
  EXPECT_EQ(a.sync_stats().failed, 2u);
}

TEST(SyncAdapterTest, MalformedSubmitsNeverReachTheSubclass) {
  MapAdapter a;
  const auto keys = Keys(0, 2);
  const auto data = testutil::Patterns(1, 1, kSize);
  Completion c;
  a.SubmitStore(keys, {testutil::In(data[0])}, c.Callback());
  ASSERT_TRUE(c.Wait());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  Completion d;
  a.SubmitLoad(keys, {MutableBuffer{nullptr, 8}, MutableBuffer{nullptr, 0}}, d.Callback());
  ASSERT_TRUE(d.Wait());
  EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(a.calls().empty());
  EXPECT_EQ(a.sync_stats().rejected, 2u);
}

TEST(SyncAdapterTest, SeveralWorkersRunOperationsConcurrently) {
  MapAdapter a(/*workers=*/3);
  EXPECT_EQ(a.worker_threads(), 3u);
  const auto keys = Keys(0, 1);
  const auto data = testutil::Patterns(1, 1, kSize);
  a.CloseGate();
  std::vector<Completion> done(3);
  for (auto& c : done) a.SubmitStore(keys, {testutil::In(data[0])}, c.Callback());
  // All three are inside Store at once: only possible with three workers.
  ASSERT_TRUE(a.WaitEntered(3));
  a.OpenGate();
  for (auto& c : done) {
    ASSERT_TRUE(c.Wait());
    EXPECT_TRUE(c.status().ok());
  }
  EXPECT_EQ(a.threads().size(), 3u);
}

}  // namespace
}  // namespace lmcache_cpp
