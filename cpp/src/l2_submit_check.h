// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The argument check every L2 adapter applies to SubmitStore and SubmitLoad, written once.
// Internal (not installed).
#ifndef LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_
#define LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_

#include <cstddef>
#include <string>
#include <vector>

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

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_L2_SUBMIT_CHECK_H_
