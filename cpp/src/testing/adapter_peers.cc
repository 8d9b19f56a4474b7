// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "testing/adapter_peers.h"

#include <mutex>

namespace lmcache_cpp {
namespace testing {

uint32_t FileSystemAdapterPeer::PinCount(const FileSystemL2Adapter& a, const ObjectKey& key) {
  std::lock_guard<std::mutex> lk(a.mu_);
  uint32_t pins = 0;
  auto it = a.index_.find(key);
  if (it != a.index_.end()) pins += it->second.pins;
  auto orphan = a.orphan_pins_.find(key);
  if (orphan != a.orphan_pins_.end()) pins += orphan->second;
  return pins;
}

bool FileSystemAdapterPeer::Contains(const FileSystemL2Adapter& a, const ObjectKey& key) {
  std::lock_guard<std::mutex> lk(a.mu_);
  auto it = a.index_.find(key);
  return it != a.index_.end() && it->second.ready;
}

uint64_t FileSystemAdapterPeer::TotalPins(const FileSystemL2Adapter& a) {
  std::lock_guard<std::mutex> lk(a.mu_);
  return a.stats_.pins;
}

}  // namespace testing
}  // namespace lmcache_cpp
