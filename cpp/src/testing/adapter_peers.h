// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Test-only views into the installed L2 adapters: what a test asserts about an adapter's private
// state (pins per key, whether a key is indexed). Races are forced with sync points
// (cpp/src/sync_point.h) instead. Part of the lmcache_cpp_testing library (cpp/src/testing/), which
// is never installed: the adapters' installed headers name these classes only as friends.
//
// Thread safety: every function may be called from any thread, as the adapter's own methods; each
// takes the adapter's lock for the snapshot it returns.
#ifndef LMCACHE_CPP_SRC_TESTING_ADAPTER_PEERS_H_
#define LMCACHE_CPP_SRC_TESTING_ADAPTER_PEERS_H_

#include <cstdint>

#include "lmcache_cpp/fs_adapter.h"
#include "lmcache_cpp/object_key.h"

namespace lmcache_cpp {
namespace testing {

class FileSystemAdapterPeer {
 public:
  // Pins held on `key`, including pins kept for an object dropped as corrupt.
  static uint32_t PinCount(const FileSystemL2Adapter& a, const ObjectKey& key);
  // Whether `key` is indexed and fully written.
  static bool Contains(const FileSystemL2Adapter& a, const ObjectKey& key);
  static uint64_t TotalPins(const FileSystemL2Adapter& a);
};

}  // namespace testing
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_TESTING_ADAPTER_PEERS_H_
