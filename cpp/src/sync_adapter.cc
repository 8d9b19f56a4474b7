// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/sync_adapter.h"

#include <algorithm>
#include <string>
#include <utility>

#include "l2_submit_check.h"
#include "lmcache_cpp/logging.h"
#include "worker_pool.h"

namespace lmcache_cpp {

SyncL2Adapter::SyncL2Adapter(SyncAdapterOptions options)
    : num_workers_(std::max<size_t>(options.worker_threads, 1)),
      pool_(std::make_unique<internal::WorkerPool>(&mu_)) {
  pool_->Start(num_workers_, [this] { WorkerLoop(); });
}

SyncL2Adapter::~SyncL2Adapter() {
  if (pool_->running()) {
    // name() is the subclass's and gone by now.
    Log(LogLevel::kError,
        "SyncL2Adapter destroyed without Close() from its subclass; queued work is cancelled "
        "without calling it");
    {
      std::lock_guard<std::mutex> lk(mu_);
      subclass_gone_ = true;
    }
    Close();
  }
}

void SyncL2Adapter::SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                                StoreCallback done) {
  Status checked = internal::CheckSubmitBuffers("SubmitStore", keys.size(), buffers);
  Enqueue(Op{OpType::kStore,
             std::move(keys),
             std::move(buffers),
             {},
             std::move(done),
             std::move(checked)});
}

void SyncL2Adapter::SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) {
  Enqueue(Op{OpType::kLookup, std::move(keys), {}, {}, std::move(done), Status()});
}

void SyncL2Adapter::SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                               LoadCallback done) {
  Status checked = internal::CheckSubmitBuffers("SubmitLoad", keys.size(), buffers);
  Enqueue(Op{
      OpType::kLoad, std::move(keys), {}, std::move(buffers), std::move(done), std::move(checked)});
}

void SyncL2Adapter::Unpin(const std::vector<ObjectKey>& keys) {
  if (keys.empty()) return;
  Op op;
  op.type = OpType::kUnpin;
  op.keys = keys;
  Enqueue(std::move(op));
}

void SyncL2Adapter::Enqueue(Op op) {
  std::unique_lock<std::mutex> lk(mu_);
  if (op.type != OpType::kUnpin) {
    if (pool_->closing() && op.pre_status.ok()) {
      op.pre_status = Status::Unavailable("L2 adapter is closed");
    }
    ++counters_.in_flight;
  }
  if (!pool_->has_workers()) {
    // Close() has joined every worker: nobody else can complete it.
    lk.unlock();
    RunInline(op);
    return;
  }
  queue_.push_back(std::move(op));
  lk.unlock();
  pool_->NotifyOne();
}

void SyncL2Adapter::RunInline(Op& op) {
  if (op.type == OpType::kUnpin) {
    bool gone;
    {
      std::lock_guard<std::mutex> lk(mu_);
      gone = subclass_gone_;
      ++(gone ? sync_.dropped_unpins : sync_.unpins);
    }
    if (!gone) UnpinKeys(op.keys);
    return;
  }
  // Enqueue marked it Unavailable (or it was malformed): it never reaches the subclass.
  Execute(op, /*cancel=*/false);
}

void SyncL2Adapter::WorkerLoop() {
  for (;;) {
    Op op;
    bool cancel = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (!pool_->WaitAndPop(lk, queue_, &op)) return;
      if (op.type == OpType::kUnpin) {
        cancel = subclass_gone_;
      } else {
        cancel = pool_->closing() && op.pre_status.ok();
      }
      ++sync_.executing;
    }
    Execute(op, cancel);
    std::lock_guard<std::mutex> lk(mu_);
    --sync_.executing;
  }
}

void SyncL2Adapter::Execute(Op& op, bool cancel) {
  const size_t n = op.keys.size();
  if (op.type == OpType::kUnpin) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      ++(cancel ? sync_.dropped_unpins : sync_.unpins);
    }
    if (!cancel) UnpinKeys(op.keys);
    return;
  }

  Status st = op.pre_status;
  Bitmap bits(n);
  bool ran = false;
  if (st.ok() && cancel) {
    st = Status::Cancelled("L2 adapter closed before the operation ran");
  } else if (st.ok()) {
    ran = true;
    Result<Bitmap> r = Status::Internal("unreachable");
    switch (op.type) {
      case OpType::kStore: r = Store(op.keys, op.in); break;
      case OpType::kLookup: r = LookupAndPin(op.keys); break;
      case OpType::kLoad: r = Load(op.keys, op.out); break;
      case OpType::kUnpin: break;
    }
    if (!r.ok()) {
      st = r.status();
    } else if (r->size() != n) {
      st = Status::Internal("L2 adapter '" + name() + "' answered " + std::to_string(r->size()) +
                            " results for " + std::to_string(n) + " keys");
      if (op.type == OpType::kLookup && r->Any()) {
        // Whatever it pinned is unusable (we cannot tell which key a bit belongs to); give the
        // pins back for the keys the bits can name.
        std::vector<ObjectKey> pinned;
        for (size_t i = 0; i < std::min(n, r->size()); ++i) {
          if (r->Test(i)) pinned.push_back(op.keys[i]);
        }
        if (!pinned.empty()) UnpinKeys(pinned);
      }
    } else {
      bits = std::move(r).value();
    }
  }

  uint64_t bytes = 0;
  if (op.type == OpType::kStore || op.type == OpType::kLoad) {
    for (size_t i = 0; i < n; ++i) {
      if (!bits.Test(i)) continue;
      bytes += op.type == OpType::kStore ? op.in[i].size : op.out[i].size;
    }
  }
  const uint64_t hit = bits.Popcount();
  {
    std::lock_guard<std::mutex> lk(mu_);
    internal::CountFinishedCall(op.type, n, hit, &counters_);
    if (op.type == OpType::kStore) counters_.bytes_written += bytes;
    if (op.type == OpType::kLoad) counters_.bytes_read += bytes;
    if (ran) {
      ++(st.ok() ? sync_.completed : sync_.failed);
    } else if (st.code() == StatusCode::kCancelled) {
      ++sync_.cancelled;
    } else {
      ++sync_.rejected;
    }
    --counters_.in_flight;
  }
  if (ran && !st.ok()) {
    Log(LogLevel::kWarning, "L2 adapter '" + name() + "': " +
                                (op.type == OpType::kStore    ? "store"
                                 : op.type == OpType::kLookup ? "lookup"
                                                              : "load") +
                                " of " + std::to_string(n) + " keys failed: " + st.ToString());
  }
  if (op.done) op.done(st, bits);
}

void SyncL2Adapter::Close() { pool_->Close(); }

L2AdapterStats SyncL2Adapter::stats() const {
  L2AdapterStats s;
  {
    std::lock_guard<std::mutex> lk(mu_);
    s = counters_;
  }
  AddStats(&s);
  return s;
}

SyncAdapterStats SyncL2Adapter::sync_stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  SyncAdapterStats s = sync_;
  s.queued = queue_.size();
  return s;
}

}  // namespace lmcache_cpp
