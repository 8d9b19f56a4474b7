// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Helpers shared by the L2 adapter tests: a completion recorder, byte patterns, and synchronous
// wrappers around the asynchronous Submit* calls.
#ifndef LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_
#define LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"
#include "test_util.h"

namespace lmcache_cpp {
namespace testutil {

// Records one adapter completion: how often it was called, with what, on which thread.
class Completion {
 public:
  std::function<void(const Status&, const Bitmap&)> Callback() {
    return [this](const Status& s, const Bitmap& b) {
      // Notifies under the lock: the waiter may destroy this object as soon as it sees calls_.
      std::lock_guard<std::mutex> lk(mu_);
      ++calls_;
      status_ = s;
      bits_ = b;
      thread_ = std::this_thread::get_id();
      cv_.notify_all();
    };
  }
  // Waits up to `timeout` for the first call. Returns whether it came.
  bool Wait(std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, timeout, [this] { return calls_ > 0; });
  }
  int calls() const {
    std::lock_guard<std::mutex> lk(mu_);
    return calls_;
  }
  Status status() const {
    std::lock_guard<std::mutex> lk(mu_);
    return status_;
  }
  Bitmap bits() const {
    std::lock_guard<std::mutex> lk(mu_);
    return bits_;
  }
  std::thread::id thread() const {
    std::lock_guard<std::mutex> lk(mu_);
    return thread_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int calls_ = 0;
  Status status_;
  Bitmap bits_;
  std::thread::id thread_;
};

// A deterministic byte pattern per (seed, size).
inline std::vector<uint8_t> Pattern(uint64_t seed, size_t size) {
  std::vector<uint8_t> v(size);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v[i] = static_cast<uint8_t>(x);
  }
  return v;
}

// Buffer views: In for stores (read by the adapter), Out for loads (written by it).
inline ConstBuffer In(const std::vector<uint8_t>& v) { return ConstBuffer{v.data(), v.size()}; }
inline MutableBuffer Out(std::vector<uint8_t>& v) { return MutableBuffer{v.data(), v.size()}; }

inline std::vector<std::vector<uint8_t>> Patterns(uint64_t first, size_t n, size_t size) {
  std::vector<std::vector<uint8_t>> v;
  for (size_t i = 0; i < n; ++i) v.push_back(Pattern(first + i, size));
  return v;
}

inline std::vector<std::vector<uint8_t>> Zeros(size_t n, size_t size) {
  return std::vector<std::vector<uint8_t>>(n, std::vector<uint8_t>(size, 0));
}

// Waits for `c`, checks its callback ran once and not on this thread, and returns its bitmap
// (and its status through `status`, when given).
inline Bitmap WaitForOneCallback(Completion& c, Status* status) {
  EXPECT_TRUE(c.Wait());
  EXPECT_EQ(c.calls(), 1);
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  if (status != nullptr) *status = c.status();
  return c.bits();
}

// Synchronous wrappers: submit, wait for the callback, check it ran once and not on this thread.
inline Bitmap SyncStore(L2Adapter& a, const std::vector<ObjectKey>& keys,
                        const std::vector<std::vector<uint8_t>>& data, Status* status = nullptr) {
  std::vector<ConstBuffer> bufs;
  for (const auto& d : data) bufs.push_back(In(d));
  Completion c;
  a.SubmitStore(keys, bufs, c.Callback());
  return WaitForOneCallback(c, status);
}

inline Bitmap SyncLookup(L2Adapter& a, const std::vector<ObjectKey>& keys,
                         Status* status = nullptr) {
  Completion c;
  a.SubmitLookupAndPin(keys, c.Callback());
  return WaitForOneCallback(c, status);
}

inline Bitmap SyncLoad(L2Adapter& a, const std::vector<ObjectKey>& keys,
                       std::vector<std::vector<uint8_t>>* out, Status* status = nullptr) {
  std::vector<MutableBuffer> bufs;
  for (auto& d : *out) bufs.push_back(Out(d));
  Completion c;
  a.SubmitLoad(keys, bufs, c.Callback());
  return WaitForOneCallback(c, status);
}

// Loads Key(id) alone and expects it found, holding Pattern(id, size).
inline void ExpectLoadsPattern(L2Adapter& a, uint64_t id, size_t size) {
  std::vector<std::vector<uint8_t>> out = Zeros(1, size);
  EXPECT_TRUE(SyncLoad(a, {Key(id)}, &out).All()) << "key " << id;
  EXPECT_EQ(out[0], Pattern(id, size)) << "key " << id;
}

// Short names for the synchronous wrappers, for the adapter tests that call them on most lines
// (`using namespace testutil::sync_calls;`).
namespace sync_calls {
inline Bitmap Store(L2Adapter& a, const std::vector<ObjectKey>& keys,
                    const std::vector<std::vector<uint8_t>>& data, Status* status = nullptr) {
  return SyncStore(a, keys, data, status);
}
inline Bitmap Lookup(L2Adapter& a, const std::vector<ObjectKey>& keys, Status* status = nullptr) {
  return SyncLookup(a, keys, status);
}
inline Bitmap Load(L2Adapter& a, const std::vector<ObjectKey>& keys,
                   std::vector<std::vector<uint8_t>>* out, Status* status = nullptr) {
  return SyncLoad(a, keys, out, status);
}
}  // namespace sync_calls

// Stresses an adapter from `threads` submitters at once. In each of `rounds` rounds a submitter
// stores key Key(r % keys) (Pattern(id, size)) and looks it up and pins it, both in flight at
// once, then loads it back and drops the pin it got. Every call waits for its callback. Expects
// every callback exactly once, off the submitting thread, with an OK status, and every load
// reported done to hold the stored bytes.
inline void StoreLookupLoadRounds(L2Adapter& a, int threads, int rounds, uint64_t keys,
                                  size_t size) {
  std::atomic<int> calls{0}, on_submitter{0}, wrong_bytes{0}, errors{0};
  std::vector<std::thread> submitters;
  for (int t = 0; t < threads; ++t) {
    submitters.emplace_back([&] {
      const std::thread::id me = std::this_thread::get_id();
      for (int r = 0; r < rounds; ++r) {
        const uint64_t id = static_cast<uint64_t>(r) % keys;  // keys shared across threads
        const std::vector<uint8_t> data = Pattern(id, size);
        std::vector<uint8_t> out(size);
        std::promise<void> stored, looked_up, loaded;
        Bitmap pinned;
        auto count = [&](const Status& s) {
          calls++;
          if (std::this_thread::get_id() == me) on_submitter++;
          if (!s.ok()) errors++;
        };
        a.SubmitStore({Key(id)}, {In(data)}, [&](const Status& s, const Bitmap&) {
          count(s);
          stored.set_value();
        });
        a.SubmitLookupAndPin({Key(id)}, [&](const Status& s, const Bitmap& b) {
          count(s);
          pinned = b;
          looked_up.set_value();
        });
        stored.get_future().wait();
        looked_up.get_future().wait();
        a.SubmitLoad({Key(id)}, {Out(out)}, [&](const Status& s, const Bitmap& b) {
          count(s);
          if (b.All() && out != data) wrong_bytes++;
          loaded.set_value();
        });
        loaded.get_future().wait();
        if (pinned.All()) a.Unpin({Key(id)});
      }
    });
  }
  for (auto& th : submitters) th.join();
  EXPECT_EQ(calls.load(), threads * rounds * 3);
  EXPECT_EQ(on_submitter.load(), 0);
  EXPECT_EQ(wrong_bytes.load(), 0);
  EXPECT_EQ(errors.load(), 0);
}

}  // namespace testutil
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_
