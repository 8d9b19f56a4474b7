// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The embedding API in one include (docs/embedding.md): everything a C++ inference server needs
// to run the cache engine in-process.
//
//   version.h          LMCACHE_CPP_VERSION, lmcache_cpp::kVersionString
//   status.h           Status, Result<T>, StatusCode
//   storage_manager.h  StorageManager (L1 arena and table, L2 adapters, controllers) + config
//   cache_engine.h     CacheEngine: register, lookup (two-phase and sync), store/retrieve
//                      tickets, sessions, stats
//   kv_copy.h          KvCacheLayout / KvCacheView and the CPU gather/scatter kernels
//   l2_adapter.h       the L2 adapter interface (implement it to plug in another store)
//   sync_adapter.h     SyncL2Adapter: a base for a blocking L2 tier of the host's own
//   fs_adapter.h       the file-system L2 adapter
//   logging.h          SetLogSink: route the core's few log lines into the host's logger
//
// These include ids.h, storage_options.h, hash_options.h and store_controller.h, the other
// installed headers. The rest of lmcache_cpp/ (object table, prefetch controller, hashing,
// allocator) is the engine's unstable building blocks: not installed, forward-declared where the
// stable headers name them. Nothing for tests is installed (the in-memory L2 tier and the
// adapters' test views are in the lmcache_cpp_testing library, cpp/src/testing/).
//
// Stability: stable (the list may grow).
#ifndef LMCACHE_CPP_LMCACHE_CPP_H_
#define LMCACHE_CPP_LMCACHE_CPP_H_

#include "lmcache_cpp/cache_engine.h"
#include "lmcache_cpp/fs_adapter.h"
#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/logging.h"
#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_manager.h"
#include "lmcache_cpp/sync_adapter.h"
#include "lmcache_cpp/version.h"

#endif  // LMCACHE_CPP_LMCACHE_CPP_H_
