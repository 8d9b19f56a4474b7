// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// What every L2 adapter does alike, written once: the argument check of SubmitStore and
// SubmitLoad, the counting of a finished call, and the gauges of stats(). Internal (not
// installed).
#ifndef LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_
#define LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lmcache_cpp/l2_adapter.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace internal {

// `call` ("SubmitStore" or "SubmitLoad") was given `num_keys` keys and `buffers`. Returns
// InvalidArgument when a buffer is null with a non-zero size, else when there is not exactly one
// buffer per key; otherwise Ok. The adapter then completes the call with that status.
template <typename Buffer>
Status CheckSubmitBuffers(const char* call, size_t num_keys, const std::vector<Buffer>& buffers) {
  for (const Buffer& b : buffers) {
    if (b.data == nullptr && b.size > 0) {
      return Status::InvalidArgument(std::string(call) + ": null buffer with a non-zero size");
    }
  }
  if (num_keys != buffers.size()) {
    return Status::InvalidArgument(std::string(call) + ": keys and buffers differ in length");
  }
  return Status::Ok();
}

// Counts a finished store, lookup or load of `n` keys, `hit` of them done, in `stats`: stores
// and store_failures, lookups, loads and load_misses (bytes are the caller's). `Op` is the
// adapter's own operation enum, with kStore, kLookup and kLoad; other operations count nothing.
// REQUIRES: the caller holds the lock that guards `stats`.
template <typename Op>
void CountFinishedCall(Op op, uint64_t n, uint64_t hit, L2AdapterStats* stats) {
  if (op == Op::kStore) {
    stats->stores += n;
    stats->store_failures += n - hit;
  } else if (op == Op::kLookup) {
    stats->lookups += n;
  } else if (op == Op::kLoad) {
    stats->loads += n;
    stats->load_misses += n - hit;
  }
}

// An adapter's stats(): its `counters` with the gauges filled in (the objects it holds, their
// bytes, its capacity).
inline L2AdapterStats WithGauges(L2AdapterStats counters, uint64_t objects, uint64_t bytes,
                                 uint64_t capacity_bytes) {
  counters.objects = objects;
  counters.bytes = bytes;
  counters.capacity_bytes = capacity_bytes;
  return counters;
}

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_
