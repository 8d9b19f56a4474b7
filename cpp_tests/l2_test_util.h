// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Helpers shared by the L2 adapter tests: a completion recorder, byte patterns, and synchronous
// wrappers around the asynchronous Submit* calls.
#ifndef LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_
#define LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

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

// Synchronous wrappers: submit, wait for the callback, check it ran once and not on this thread.
inline Bitmap SyncStore(L2Adapter& a, const std::vector<ObjectKey>& keys,
                        const std::vector<std::vector<uint8_t>>& data, Status* status = nullptr) {
  std::vector<ConstBuffer> bufs;
  for (const auto& d : data) bufs.push_back(In(d));
  Completion c;
  a.SubmitStore(keys, bufs, c.Callback());
  EXPECT_TRUE(c.Wait());
  EXPECT_EQ(c.calls(), 1);
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  if (status != nullptr) *status = c.status();
  return c.bits();
}

inline Bitmap SyncLookup(L2Adapter& a, const std::vector<ObjectKey>& keys,
                         Status* status = nullptr) {
  Completion c;
  a.SubmitLookupAndPin(keys, c.Callback());
  EXPECT_TRUE(c.Wait());
  EXPECT_EQ(c.calls(), 1);
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  if (status != nullptr) *status = c.status();
  return c.bits();
}

inline Bitmap SyncLoad(L2Adapter& a, const std::vector<ObjectKey>& keys,
                       std::vector<std::vector<uint8_t>>* out, Status* status = nullptr) {
  std::vector<MutableBuffer> bufs;
  for (auto& d : *out) bufs.push_back(Out(d));
  Completion c;
  a.SubmitLoad(keys, bufs, c.Callback());
  EXPECT_TRUE(c.Wait());
  EXPECT_EQ(c.calls(), 1);
  EXPECT_NE(c.thread(), std::this_thread::get_id());
  if (status != nullptr) *status = c.status();
  return c.bits();
}

}  // namespace testutil
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_TESTS_L2_TEST_UTIL_H_
