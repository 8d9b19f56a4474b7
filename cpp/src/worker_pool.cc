// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "worker_pool.h"

#include "sync_point.h"

namespace lmcache_cpp {
namespace internal {

WorkerPool::~WorkerPool() { Close(); }

void WorkerPool::Start(size_t n, const std::function<void()>& body) {
  std::lock_guard<std::mutex> close_lk(close_mu_);
  {
    std::lock_guard<std::mutex> lk(*mu_);
    live_ += n;
  }
  threads_.reserve(threads_.size() + n);
  for (size_t i = 0; i < n; ++i) threads_.emplace_back(body);
}

void WorkerPool::Close(const std::function<void()>& wake) {
  std::lock_guard<std::mutex> close_lk(close_mu_);
  {
    std::lock_guard<std::mutex> lk(*mu_);
    closing_ = true;
  }
  if (wake) wake();
  LMCACHE_TEST_SYNC_POINT("WorkerPool::Close:Closing");
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

bool WorkerPool::running() const {
  std::lock_guard<std::mutex> close_lk(close_mu_);
  return !threads_.empty();
}

}  // namespace internal
}  // namespace lmcache_cpp
