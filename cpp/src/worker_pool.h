// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// WorkerPool: the fixed set of worker threads behind the asynchronous L2 adapters, and the close
// protocol they share. Internal (not installed): an adapter holds it by pointer, so its installed
// header names the class only.
//
// The pool serves one owner's queue. The owner keeps the queue, and everything a worker reads
// with it, under the owner's own mutex `mu`; the pool keeps two more fields under that same
// mutex: whether Close has begun (`closing()`) and how many workers may still take work
// (`has_workers()`). A submit decides in one critical section of `mu` whether to queue an
// operation (a worker will run it) or to complete it itself (Close has joined every worker).
//
// A worker runs the owner's `body`, which loops: lock `mu`, WaitForWork (false: return), take
// one item (WaitAndPop does both for a deque), unlock, run it, and call back outside every lock. A
// worker that finds Close begun and the queue empty stops counting as live in the same critical
// section, so an item queued after that check always sees has_workers() false, or is taken by a
// worker still looping.
//
// Close(wake): serialised by the pool's close mutex (taken before `mu`); sets closing under `mu`,
// then, without `mu`, calls `wake` (the owner's extra condition variables), passes the sync point
// "WorkerPool::Close:Closing" (a test waits on it for "Close has begun"), wakes every worker and
// joins them. Idempotent. REQUIRES: not called from a worker (it would join itself).
//
// Thread safety: closing(), has_workers() and WaitForWork require `mu` held; NotifyOne/NotifyAll
// are best called after unlocking it; Start, Close and running() take the locks they need. Lock
// order: the close mutex, then `mu`.
#ifndef LMCACHE_CPP_SRC_WORKER_POOL_H_
#define LMCACHE_CPP_SRC_WORKER_POOL_H_

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace lmcache_cpp {
namespace internal {

class WorkerPool {
 public:
  // `mu` is the owner's mutex; REQUIRES: it outlives the pool.
  explicit WorkerPool(std::mutex* mu) : mu_(mu) {}
  // Closes (a no-op when the owner already has, as it must before its own members go).
  ~WorkerPool();

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Starts `n` threads, each running `body` once. Call once, before any work is queued.
  void Start(size_t n, const std::function<void()>& body);

  // `mu` held. Whether Close has begun.
  bool closing() const { return closing_; }
  // `mu` held. Whether a worker will still take queued work (false once Close joined them all).
  bool has_workers() const { return live_ > 0; }

  // Worker side, `mu` held through `lk`. Waits until has_work() or Close has begun. Returns
  // whether there is work; false means closing with nothing queued: the worker must return.
  template <typename HasWork>
  bool WaitForWork(std::unique_lock<std::mutex>& lk, HasWork has_work) {
    work_cv_.wait(lk, [&] { return closing_ || has_work(); });
    if (has_work()) return true;
    --live_;  // in the same critical section as the emptiness check (see the header comment)
    return false;
  }

  // WaitForWork on `queue` (a deque the owner keeps under `mu`), then moves its front item into
  // `*item`. Returns false, taking nothing, when the worker must return.
  template <typename Queue>
  bool WaitAndPop(std::unique_lock<std::mutex>& lk, Queue& queue,
                  typename Queue::value_type* item) {
    if (!WaitForWork(lk, [&queue] { return !queue.empty(); })) return false;
    *item = std::move(queue.front());
    queue.pop_front();
    return true;
  }

  void NotifyOne() { work_cv_.notify_one(); }
  void NotifyAll() { work_cv_.notify_all(); }

  // See the header comment. `wake` runs without `mu` after closing is set.
  void Close(const std::function<void()>& wake = nullptr);
  // Whether the workers are started and not yet joined.
  bool running() const;

 private:
  std::mutex* const mu_;
  mutable std::mutex close_mu_;      // serialises Close(); taken before *mu_
  std::condition_variable work_cv_;  // the owner's queue grew, or closing_
  // Guarded by *mu_:
  bool closing_ = false;
  size_t live_ = 0;  // workers that will still look at the owner's queue

  std::vector<std::thread> threads_;  // started by Start, joined by Close (close_mu_)
};

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_WORKER_POOL_H_
