// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/storage_manager.h"

#include <chrono>
#include <utility>

#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/object_table.h"
#include "lmcache_cpp/prefetch_controller.h"

namespace lmcache_cpp {

Result<std::unique_ptr<StorageManager>> StorageManager::Create(StorageManagerConfig config) {
  for (const auto& a : config.adapters) {
    if (!a) return Status::InvalidArgument("null L2 adapter");
  }
  std::unique_ptr<StorageManager> m(new StorageManager());
  LMCACHE_ASSIGN_OR_RETURN(std::unique_ptr<Arena> arena, Arena::Create(config.arena));
  m->arena_ = std::shared_ptr<Arena>(std::move(arena));
  LMCACHE_ASSIGN_OR_RETURN(m->table_, ObjectTable::Create(m->arena_, config.table));
  m->adapters_ = std::move(config.adapters);
  m->store_ = std::make_unique<StoreController>(m->table_.get(), m->adapters_, config.store,
                                                config.store_policy);
  m->prefetch_ =
      std::make_unique<PrefetchController>(m->table_.get(), m->adapters_, config.prefetch);
  return m;
}

StorageManager::~StorageManager() { Stop(); }

Status StorageManager::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) return Status::Unavailable("storage manager was stopped");
  if (started_) return Status::Ok();
  table_->Start();
  store_->Start();
  prefetch_->Start();
  started_ = true;
  return Status::Ok();
}

void StorageManager::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) return;
  stopped_ = true;
  // A manager whose Create failed half-way is destroyed without its controllers.
  if (!prefetch_ || !store_ || !table_) return;
  prefetch_->Stop();
  store_->Stop();
  for (const auto& a : adapters_) a->Close();
  // Every adapter callback has run; the pipelines have released what they held.
  if (!prefetch_->WaitIdle(std::chrono::seconds(30))) {
    Log(LogLevel::kError, "StorageManager::Stop: prefetch jobs still active after adapter close");
  }
  if (!store_->WaitIdle(std::chrono::seconds(30))) {
    Log(LogLevel::kError, "StorageManager::Stop: store batches still active after adapter close");
  }
  table_->Stop();
}

size_t StorageManager::EndRequest(RequestId request) {
  prefetch_->EndRequest(request);
  uint64_t leases = 0;
  table_->ReleaseRequest(request, &leases);
  return leases;
}

size_t StorageManager::EndClient(ClientId client) {
  prefetch_->EndClient(client);
  uint64_t leases = 0;
  table_->ReleaseClient(client, &leases);
  return leases;
}

StorageStats StorageManager::stats() const {
  StorageStats s;
  s.l1 = table_->stats();
  s.prefetch = prefetch_->stats();
  s.store = store_->stats();
  for (const auto& a : adapters_) s.l2.push_back(a->stats());
  return s;
}

}  // namespace lmcache_cpp
