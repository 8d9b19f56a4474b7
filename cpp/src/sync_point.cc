// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "sync_point.h"

#ifdef LMCACHE_CPP_SYNC_POINTS

#include <condition_variable>
#include <mutex>
#include <string>
#include <unordered_map>

namespace lmcache_cpp {
namespace internal {
namespace {

struct Registry {
  std::mutex mu;
  std::condition_variable reached;                  // a count grew
  std::unordered_map<std::string, uint64_t> count;  // GUARDED_BY(mu)
};

Registry& Get() {
  static Registry* registry = new Registry();  // never destroyed: threads may outlive main
  return *registry;
}

}  // namespace

void SyncPoints::Process(const char* name) {
  Registry& r = Get();
  {
    std::lock_guard<std::mutex> lk(r.mu);
    ++r.count[name];
  }
  r.reached.notify_all();
}

bool SyncPoints::WaitFor(const char* name, uint64_t n, Duration timeout) {
  Registry& r = Get();
  const std::string key(name);
  std::unique_lock<std::mutex> lk(r.mu);
  return r.reached.wait_for(lk, timeout, [&] {
    auto it = r.count.find(key);
    return it != r.count.end() && it->second >= n;
  });
}

void SyncPoints::Reset() {
  Registry& r = Get();
  std::lock_guard<std::mutex> lk(r.mu);
  r.count.clear();
}

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SYNC_POINTS
