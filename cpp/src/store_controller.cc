// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/store_controller.h"

#include <algorithm>
#include <utility>

#include "crc32c.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/object_table.h"

namespace lmcache_cpp {

std::vector<size_t> AllAdaptersStorePolicy::Targets(const ObjectKey& /*key*/,
                                                    size_t num_adapters) const {
  std::vector<size_t> all(num_adapters);
  for (size_t i = 0; i < num_adapters; ++i) all[i] = i;
  return all;
}

// Forwards the table's "ready" announcements to the queue.
class StoreController::Listener final : public ObjectTableListener {
 public:
  explicit Listener(StoreController* owner) : owner_(owner) {}
  void OnObjectsReady(const std::vector<ObjectKey>& keys) override { owner_->Enqueue(keys); }

 private:
  StoreController* const owner_;
};

// One leased batch on its way to the adapters.
struct StoreController::Batch {
  RequestId request = 0;
  std::vector<ObjectKey> keys;            // leased, one read lease each
  std::vector<std::vector<size_t>> sent;  // per adapter: indices into keys
  std::vector<uint32_t> targets_left;     // per key: adapters that have not stored it
  std::vector<uint8_t> failed;            // per key: some adapter failed
  size_t pending = 0;                     // adapter calls outstanding; GUARDED_BY(owner's mu_)
};

StoreController::StoreController(ObjectTable* table,
                                 std::vector<std::shared_ptr<L2Adapter>> adapters,
                                 StoreControllerOptions options,
                                 std::shared_ptr<StorePolicy> policy)
    : table_(table),
      adapters_(std::move(adapters)),
      options_(std::move(options)),
      policy_(policy ? std::move(policy) : std::make_shared<AllAdaptersStorePolicy>()) {}

StoreController::~StoreController() { Stop(); }

void StoreController::Start() {
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (adapters_.empty() || worker_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = false;
    running_ = true;
  }
  listener_ = std::make_shared<Listener>(this);
  table_->AddListener(listener_);
  worker_ = std::thread([this] { WorkerLoop(); });
}

void StoreController::Stop() {
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (listener_) {
    table_->RemoveListener(listener_.get());
    listener_.reset();
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    running_ = false;
    counters_.dropped += queue_.size();
    queue_.clear();
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

bool StoreController::WaitIdle(Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout,
                      [this] { return queue_.empty() && in_flight_ == 0 && !busy_; });
}

void StoreController::Enqueue(const std::vector<ObjectKey>& keys) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!running_) return;
    counters_.announced += keys.size();
    for (const ObjectKey& k : keys) queue_.push_back(k);
    while (queue_.size() > options_.max_queued_keys) {
      queue_.pop_front();
      counters_.dropped++;
    }
  }
  cv_.notify_all();
}

StoreControllerStats StoreController::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  StoreControllerStats s = counters_;
  s.queued = queue_.size();
  s.in_flight_batches = in_flight_;
  return s;
}

void StoreController::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] {
      return stop_ || (!queue_.empty() && in_flight_ < options_.max_in_flight_batches);
    });
    if (stop_) return;
    std::vector<ObjectKey> keys;
    const size_t n = std::min(queue_.size(), options_.max_batch);
    keys.assign(queue_.begin(), queue_.begin() + static_cast<long>(n));
    queue_.erase(queue_.begin(), queue_.begin() + static_cast<long>(n));
    ++in_flight_;
    busy_ = true;
    lock.unlock();
    RunBatch(std::move(keys));
    lock.lock();
    busy_ = false;
    cv_.notify_all();
  }
}

void StoreController::RunBatch(std::vector<ObjectKey> keys) {
  auto batch = std::make_shared<Batch>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch->request = next_request_++;
  }
  // Lease what is still in L1; a key evicted (or deleted) since it was announced is skipped.
  const Bitmap leased = table_->AcquireReadAvailable({0, batch->request}, keys, 1);
  std::vector<ConstBuffer> buffers;
  size_t corrupt = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!leased.Test(i)) continue;
    std::optional<ObjectInfo> info = table_->LeasedInfo(batch->request, keys[i]);
    if (!info) {  // cannot happen while leased; be defensive
      (void)table_->ReleaseReadUpTo(batch->request, {keys[i]}, 1);
      continue;
    }
    ConstBuffer buf{table_->data(info->offset), info->size};
    if (info->has_crc32c) {
      // The bytes must still be the ones committed: a stray write into a published object (a
      // worker writing past its lease) is caught here, before it reaches any tier.
      if (internal::Crc32c(buf.data, buf.size) != info->crc32c) {
        ++corrupt;
        (void)table_->ReleaseRead(batch->request, {keys[i]});
        (void)table_->Discard(keys[i], info->generation);
        Log(LogLevel::kWarning, "store: L1 object " + keys[i].ToShortString() +
                                    " no longer matches its checksum; dropped, not written to L2");
        continue;
      }
      buf.has_crc32c = true;
      buf.crc32c = info->crc32c;
    }
    batch->keys.push_back(keys[i]);
    buffers.push_back(buf);
  }
  const size_t skipped = keys.size() - batch->keys.size() - corrupt;
  batch->sent.assign(adapters_.size(), {});
  batch->targets_left.assign(batch->keys.size(), 0);
  batch->failed.assign(batch->keys.size(), 0);
  for (size_t i = 0; i < batch->keys.size(); ++i) {
    for (size_t a : policy_->Targets(batch->keys[i], adapters_.size())) {
      if (a >= adapters_.size()) continue;
      batch->sent[a].push_back(i);
      batch->targets_left[i]++;
    }
  }
  size_t calls = 0, submitted = 0;
  for (const auto& s : batch->sent) {
    calls += s.empty() ? 0 : 1;
    submitted += s.size();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.skipped_evicted += skipped;
    counters_.corrupt_in_l1 += corrupt;
    counters_.submitted += submitted;
    batch->pending = calls;
    if (calls == 0) --in_flight_;
  }
  if (calls == 0) {
    if (!batch->keys.empty()) (void)table_->ReleaseRead(batch->request, batch->keys);
    cv_.notify_all();
    return;
  }
  for (size_t a = 0; a < adapters_.size(); ++a) {
    if (batch->sent[a].empty()) continue;
    std::vector<ObjectKey> k;
    std::vector<ConstBuffer> b;
    for (size_t i : batch->sent[a]) {
      k.push_back(batch->keys[i]);
      b.push_back(buffers[i]);
    }
    adapters_[a]->SubmitStore(std::move(k), std::move(b),
                              [this, batch, a](const Status& st, const Bitmap& stored) {
                                OnAdapterDone(batch, a, st, stored);
                              });
  }
}

void StoreController::OnAdapterDone(const std::shared_ptr<Batch>& batch, size_t adapter,
                                    const Status& status, const Bitmap& stored) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto& sent = batch->sent[adapter];
    size_t ok = 0;
    for (size_t j = 0; j < sent.size(); ++j) {
      const bool good = status.ok() && j < stored.size() && stored.Test(j);
      if (good) {
        ++ok;
        batch->targets_left[sent[j]]--;
      } else {
        batch->failed[sent[j]] = 1;
      }
    }
    counters_.stored += ok;
    counters_.failed += sent.size() - ok;
    if (!status.ok() && status.code() != StatusCode::kCancelled) {
      Log(LogLevel::kWarning,
          "L2 store failed on adapter " + adapters_[adapter]->name() + ": " + status.ToString());
    }
    if (--batch->pending > 0) return;
  }
  // Last adapter: return the leases (per key if one expired meanwhile), then (write-buffer
  // mode) drop the L1 copies every target adapter has.
  if (!table_->ReleaseRead(batch->request, batch->keys).ok()) {
    for (const ObjectKey& k : batch->keys) (void)table_->ReleaseRead(batch->request, {k});
  }
  size_t freed = 0;
  if (options_.free_l1_after_store) {
    for (size_t i = 0; i < batch->keys.size(); ++i) {
      if (batch->failed[i] == 0 && batch->targets_left[i] == 0) {
        if (table_->Delete({batch->keys[i]}).ok()) ++freed;  // refused if someone leased it
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.freed_from_l1 += freed;
    --in_flight_;
  }
  cv_.notify_all();
}

}  // namespace lmcache_cpp
