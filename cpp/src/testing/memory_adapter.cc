// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "testing/memory_adapter.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <iterator>
#include <utility>

#include "l2_submit_check.h"
#include "worker_pool.h"

namespace lmcache_cpp {

using DoneFn = std::function<void(const Status&, const Bitmap&)>;

struct MemoryL2Adapter::Op {
  Op(L2Op op_type, std::vector<ObjectKey> op_keys, DoneFn op_done, Status checked = Status())
      : type(op_type),
        keys(std::move(op_keys)),
        done(std::move(op_done)),
        pre_status(std::move(checked)) {}

  // A store (ConstBuffer) or a load (MutableBuffer) of `buffers`, one per key, checked as
  // `call` ("SubmitStore" or "SubmitLoad"); its simulated transfer size is their total.
  template <typename Buffer>
  static std::unique_ptr<Op> Transfer(L2Op type, const char* call, std::vector<ObjectKey> keys,
                                      std::vector<Buffer> buffers, DoneFn done) {
    Status checked = internal::CheckSubmitBuffers(call, keys.size(), buffers);
    auto op = std::make_unique<Op>(type, std::move(keys), std::move(done), std::move(checked));
    for (const Buffer& b : buffers) op->bytes += b.size;
    op->Take(std::move(buffers));
    return op;
  }
  void Take(std::vector<ConstBuffer> buffers) { in = std::move(buffers); }
  void Take(std::vector<MutableBuffer> buffers) { out = std::move(buffers); }

  L2Op type = L2Op::kStore;
  std::vector<ObjectKey> keys;
  std::vector<ConstBuffer> in;     // stores
  std::vector<MutableBuffer> out;  // loads
  DoneFn done;
  Status pre_status;   // non-OK: completes with it and is never executed
  uint64_t bytes = 0;  // simulated transfer size
  // Armed faults (combined).
  bool fail = false;
  bool stall = false;
  bool corrupt = false;
  Duration delay{};
};

namespace {

size_t Index(L2Op op) { return static_cast<size_t>(op); }

}  // namespace

Result<std::unique_ptr<MemoryL2Adapter>> MemoryL2Adapter::Create(MemoryAdapterOptions options) {
  if (options.worker_threads == 0) {
    return Status::InvalidArgument("MemoryL2Adapter: worker_threads must be >= 1");
  }
  std::unique_ptr<MemoryL2Adapter> adapter(new MemoryL2Adapter(options));
  adapter->pool_->Start(options.worker_threads, [a = adapter.get()] { a->WorkerLoop(); });
  return adapter;
}

MemoryL2Adapter::MemoryL2Adapter(MemoryAdapterOptions options)
    : options_(options), pool_(std::make_unique<internal::WorkerPool>(&mu_)) {
  stats_.capacity_bytes = options_.capacity_bytes;
}

MemoryL2Adapter::~MemoryL2Adapter() { Close(); }

void MemoryL2Adapter::SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                                  StoreCallback done) {
  Enqueue(Op::Transfer(L2Op::kStore, "SubmitStore", std::move(keys), std::move(buffers),
                       std::move(done)));
}

void MemoryL2Adapter::SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) {
  Enqueue(std::make_unique<Op>(L2Op::kLookup, std::move(keys), std::move(done)));
}

void MemoryL2Adapter::SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                                 LoadCallback done) {
  Enqueue(Op::Transfer(L2Op::kLoad, "SubmitLoad", std::move(keys), std::move(buffers),
                       std::move(done)));
}

void MemoryL2Adapter::Enqueue(std::unique_ptr<Op> op) {
  const L2Op type = op->type;
  std::unique_lock<std::mutex> lk(mu_);
  const uint64_t seq = ++submitted_[Index(type)];
  auto& armed = faults_[Index(type)];
  for (auto it = armed.begin(); it != armed.end();) {
    if (it->seq != seq) {
      ++it;
      continue;
    }
    switch (it->fault.kind) {
      case Fault::Kind::kFail: op->fail = true; break;
      case Fault::Kind::kDelay: op->delay += it->fault.delay; break;
      case Fault::Kind::kCorrupt: op->corrupt = (type == L2Op::kLoad); break;
      case Fault::Kind::kStall: op->stall = true; break;
    }
    it = armed.erase(it);
  }
  if (pool_->closing() && op->pre_status.ok()) {
    op->pre_status = Status::Unavailable("memory L2 adapter is closed");
  }
  if (!pool_->has_workers()) {
    // Close() has joined every worker: nobody else can run the callback.
    Status st = op->pre_status;
    lk.unlock();
    if (op->done) op->done(st, Bitmap(op->keys.size()));
    return;
  }
  queue_.push_back(std::move(op));
  ++stats_.in_flight;
  lk.unlock();
  pool_->NotifyOne();
}

void MemoryL2Adapter::WorkerLoop() {
  for (;;) {
    std::unique_ptr<Op> op;
    Status st;
    bool execute = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (!pool_->WaitAndPop(lk, queue_, &op)) return;
      if (!op->pre_status.ok()) {
        st = op->pre_status;
      } else if (pool_->closing() || !WaitBeforeExecuting(lk, *op)) {
        st = Status::Cancelled("memory L2 adapter closed before the operation ran");
      } else if (op->fail) {
        st = Status::IoError("injected fault");
      } else {
        execute = true;
      }
    }
    Bitmap bits(op->keys.size());
    if (execute) {
      switch (op->type) {
        case L2Op::kStore: bits = ExecuteStore(*op); break;
        case L2Op::kLookup: bits = ExecuteLookup(*op); break;
        case L2Op::kLoad: bits = ExecuteLoad(*op); break;
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      internal::CountFinishedCall(op->type, op->keys.size(), bits.Popcount(), &stats_);
      --stats_.in_flight;
    }
    if (op->done) op->done(st, bits);
  }
}

bool MemoryL2Adapter::WaitBeforeExecuting(std::unique_lock<std::mutex>& lk, const Op& op) {
  bool counted = false;
  auto mark_blocked = [&] {
    if (counted) return;
    counted = true;
    ++blocked_;
    blocked_cv_.notify_all();
  };
  if (stalled_ && !pool_->closing()) {
    mark_blocked();
    state_cv_.wait(lk, [this] { return !stalled_ || pool_->closing(); });
  }
  if (op.stall && !pool_->closing()) {
    mark_blocked();
    const uint64_t epoch = release_epoch_;
    state_cv_.wait(lk, [&] { return release_epoch_ != epoch || pool_->closing(); });
  }
  if (!pool_->closing()) {
    const TimePoint now = std::chrono::steady_clock::now();
    TimePoint deadline = now;
    if (options_.bandwidth_bytes_per_sec > 0 && op.bytes > 0) {
      const double seconds =
          static_cast<double>(op.bytes) / static_cast<double>(options_.bandwidth_bytes_per_sec);
      const auto transfer =
          std::chrono::duration_cast<Duration>(std::chrono::duration<double>(seconds));
      link_free_at_ = std::max(now, link_free_at_) + transfer;
      deadline = link_free_at_;
    }
    deadline += options_.latency + op.delay;
    if (deadline > now) {
      mark_blocked();
      state_cv_.wait_until(lk, deadline, [this] { return pool_->closing(); });
    }
  }
  if (counted) --blocked_;
  return !pool_->closing();
}

Bitmap MemoryL2Adapter::ExecuteStore(const Op& op) {
  const size_t n = op.keys.size();
  Bitmap bits(n);
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t i = 0; i < n; ++i) {
      if (objects_.count(op.keys[i]) != 0) bits.Set(i);
    }
  }
  // Copy outside the lock; only keys that were absent.
  std::vector<std::shared_ptr<const std::vector<uint8_t>>> copies(n);
  std::vector<uint32_t> crcs(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (bits.Test(i)) continue;
    const ConstBuffer& b = op.in[i];
    copies[i] = std::make_shared<const std::vector<uint8_t>>(b.data, b.data + b.size);
    crcs[i] = b.has_crc32c ? b.crc32c : PayloadCrc32c(b.data, b.size);
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < n; ++i) {
    if (bits.Test(i)) continue;
    const ObjectKey& key = op.keys[i];
    if (objects_.count(key) != 0) {  // stored meanwhile (or earlier in this batch)
      bits.Set(i);
      continue;
    }
    const uint64_t size = copies[i]->size();
    if (!MakeRoomLocked(size)) continue;
    fifo_.push_back(key);
    Entry& e = objects_[key];
    e.bytes = std::move(copies[i]);
    e.crc32c = crcs[i];
    e.fifo_pos = std::prev(fifo_.end());
    bytes_ += size;
    stats_.bytes_written += size;
    bits.Set(i);
  }
  return bits;
}

bool MemoryL2Adapter::MakeRoomLocked(uint64_t size) {
  const uint64_t cap = options_.capacity_bytes;
  if (cap == 0) return true;
  if (size > cap - pinned_bytes_) return false;  // bytes_ <= cap and pinned_bytes_ <= bytes_
  auto pos = fifo_.begin();
  while (bytes_ + size > cap) {
    // Unpinned objects hold at least bytes_ - pinned_bytes_ >= bytes_ + size - cap bytes, so
    // the scan finds a victim before reaching the end.
    auto it = objects_.find(*pos);
    if (it->second.pins > 0) {
      ++pos;
      continue;
    }
    ++pos;
    EraseLocked(it);
    ++stats_.evictions;
  }
  return true;
}

void MemoryL2Adapter::EraseLocked(
    std::unordered_map<ObjectKey, Entry, ObjectKeyHash>::iterator it) {
  bytes_ -= it->second.bytes->size();
  fifo_.erase(it->second.fifo_pos);
  objects_.erase(it);
}

Bitmap MemoryL2Adapter::ExecuteLookup(const Op& op) {
  Bitmap bits(op.keys.size());
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < op.keys.size(); ++i) {
    auto it = objects_.find(op.keys[i]);
    if (it == objects_.end()) continue;
    if (it->second.pins++ == 0) {
      pinned_bytes_ += it->second.bytes->size();
      ++stats_.pinned_objects;
    }
    ++stats_.pins;
    bits.Set(i);
  }
  return bits;
}

Bitmap MemoryL2Adapter::ExecuteLoad(const Op& op) {
  const size_t n = op.keys.size();
  Bitmap bits(n);
  std::vector<std::shared_ptr<const std::vector<uint8_t>>> sources(n);
  std::vector<uint32_t> crcs(n, 0);
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t i = 0; i < n; ++i) {
      auto it = objects_.find(op.keys[i]);
      if (it == objects_.end() || it->second.bytes->size() != op.out[i].size) continue;
      sources[i] = it->second.bytes;
      crcs[i] = it->second.crc32c;
    }
  }
  uint64_t loaded_bytes = 0;
  uint64_t corrupt = 0;
  bool damage_pending = op.corrupt;
  for (size_t i = 0; i < n; ++i) {
    if (!sources[i]) continue;
    const MutableBuffer& out = op.out[i];
    if (!sources[i]->empty()) std::memcpy(out.data, sources[i]->data(), sources[i]->size());
    if (damage_pending && out.size > 0) {
      out.data[out.size / 2] ^= 0xFF;  // the kCorrupt fault: damage the first object read
      damage_pending = false;
    }
    // Checked after the copy, on the caller's buffer: bytes that differ from what was committed
    // are a miss, never data.
    if (PayloadCrc32c(out.data, out.size) != crcs[i]) {
      ++corrupt;
      continue;
    }
    loaded_bytes += sources[i]->size();
    bits.Set(i);
  }
  std::lock_guard<std::mutex> lk(mu_);
  stats_.bytes_read += loaded_bytes;
  stats_.corrupt_reads += corrupt;
  return bits;
}

void MemoryL2Adapter::Unpin(const std::vector<ObjectKey>& keys) {
  std::lock_guard<std::mutex> lk(mu_);
  for (const ObjectKey& key : keys) {
    auto it = objects_.find(key);
    if (it == objects_.end() || it->second.pins == 0) {
      ++stats_.bad_unpins;
      continue;
    }
    if (--it->second.pins == 0) {
      pinned_bytes_ -= it->second.bytes->size();
      --stats_.pinned_objects;
    }
    --stats_.pins;
  }
}

void MemoryL2Adapter::Close() {
  pool_->Close([this] {
    state_cv_.notify_all();
    blocked_cv_.notify_all();
  });
}

L2AdapterStats MemoryL2Adapter::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return internal::WithGauges(stats_, objects_.size(), bytes_, options_.capacity_bytes);
}

void MemoryL2Adapter::InjectFault(L2Op op, uint64_t nth, Fault fault) {
  std::lock_guard<std::mutex> lk(mu_);
  const uint64_t seq = submitted_[Index(op)] + std::max<uint64_t>(nth, 1);
  faults_[Index(op)].push_back(ArmedFault{seq, fault});
}

void MemoryL2Adapter::SetStalled(bool stalled) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stalled_ = stalled;
    if (!stalled) ++release_epoch_;
  }
  state_cv_.notify_all();
}

uint32_t MemoryL2Adapter::PinCount(const ObjectKey& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = objects_.find(key);
  return it == objects_.end() ? 0 : it->second.pins;
}

bool MemoryL2Adapter::Contains(const ObjectKey& key) const {
  std::lock_guard<std::mutex> lk(mu_);
  return objects_.count(key) != 0;
}

uint64_t MemoryL2Adapter::TotalPins() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_.pins;
}

bool MemoryL2Adapter::WaitForBlockedOperations(size_t n, Duration timeout) const {
  std::unique_lock<std::mutex> lk(mu_);
  return blocked_cv_.wait_for(lk, timeout, [&] { return blocked_ >= n; });
}

}  // namespace lmcache_cpp
