// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Sync points: named places in the core that a test can wait for a thread to reach, to force an
// interleaving without sleeps (RocksDB's TEST_SYNC_POINT). Internal, not installed.
//
//   LMCACHE_TEST_SYNC_POINT("WorkerPool::Close:Closing");   // in the core
//   ASSERT_TRUE(SyncPoints::WaitFor("WorkerPool::Close:Closing", 1, timeout));  // in a test
//
// They exist only in builds configured with LMCACHE_CPP_SYNC_POINTS (on by default with
// LMCACHE_CPP_BUILD_TESTS; refused in wheel builds, off in an embedder's package build): the macro
// then counts each arrival. Otherwise the macro expands to nothing and none of this is compiled,
// so a test that needs a sync point skips (LMCACHE_REQUIRE_SYNC_POINTS).
//
// Names are "Class::Method:Where". Counts are per process and kept until Reset.
//
// Thread safety: Process, WaitFor and Reset may be called from any thread; Process takes the
// registry's own lock (a leaf: it calls nothing), so a point may sit under any lock of the core.
#ifndef LMCACHE_CPP_SRC_SYNC_POINT_H_
#define LMCACHE_CPP_SRC_SYNC_POINT_H_

#include <cstdint>

#include "lmcache_cpp/clock.h"

#ifdef LMCACHE_CPP_SYNC_POINTS
#define LMCACHE_TEST_SYNC_POINT(name) ::lmcache_cpp::internal::SyncPoints::Process(name)
// In a googletest: skips the test unless sync points are compiled in.
#define LMCACHE_REQUIRE_SYNC_POINTS() static_cast<void>(0)
#else
#define LMCACHE_TEST_SYNC_POINT(name) static_cast<void>(0)
#define LMCACHE_REQUIRE_SYNC_POINTS() \
  GTEST_SKIP() << "built without LMCACHE_CPP_SYNC_POINTS (configure with it ON)"
#endif

namespace lmcache_cpp {
namespace internal {

#ifdef LMCACHE_CPP_SYNC_POINTS
class SyncPoints {
 public:
  // A thread reached `name`: counts it and wakes WaitFor.
  static void Process(const char* name);
  // Blocks until `name` has been reached at least `n` times since the last Reset, or `timeout`
  // passes. Returns whether it was.
  static bool WaitFor(const char* name, uint64_t n, Duration timeout);
  // Forgets every count.
  static void Reset();
};
#else
// Compiled out: the calls a skipped test still names.
class SyncPoints {
 public:
  static void Process(const char*) {}
  static bool WaitFor(const char*, uint64_t, Duration) { return false; }
  static void Reset() {}
};
#endif

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_SYNC_POINT_H_
