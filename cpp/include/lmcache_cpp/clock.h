// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Clock: the time source for TTLs. Production code uses SteadyClock; tests inject ManualClock so
// TTL expiry is tested without sleeping.
//
// Thread safety: Now() may be called from any thread. ManualClock::Advance may race with Now().
//
// Stability: stable.
#ifndef LMCACHE_CPP_CLOCK_H_
#define LMCACHE_CPP_CLOCK_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

namespace lmcache_cpp {

using TimePoint = std::chrono::steady_clock::time_point;
using Duration = std::chrono::steady_clock::duration;

class Clock {
 public:
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
};

class SteadyClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
  // A process-wide instance.
  static std::shared_ptr<Clock> Default();
};

// A clock that moves only when told to. Starts at steady_clock's epoch + 1 hour.
class ManualClock final : public Clock {
 public:
  ManualClock() : ns_(std::chrono::nanoseconds(std::chrono::hours(1)).count()) {}
  TimePoint Now() const override { return TimePoint(std::chrono::nanoseconds(ns_.load())); }
  void Advance(Duration d) {
    ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
  }

 private:
  std::atomic<int64_t> ns_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CLOCK_H_
