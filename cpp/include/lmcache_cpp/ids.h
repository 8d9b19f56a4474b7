// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The identifiers of the engine's API: the client (connection) and request ids that own leases,
// and the handle of a lookup job or a transfer ticket. Split out of object_table.h and
// prefetch_controller.h so that the stable headers need neither.
//
// Stability: stable.
#ifndef LMCACHE_CPP_IDS_H_
#define LMCACHE_CPP_IDS_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

using ClientId = uint64_t;
using RequestId = uint64_t;

inline constexpr RequestId kInternalRequestBit = RequestId{1} << 63;

// An unguessable 128-bit job handle.
struct JobHandle {
  std::array<uint8_t, 16> bytes{};
  bool operator==(const JobHandle& o) const noexcept { return bytes == o.bytes; }
  bool operator!=(const JobHandle& o) const noexcept { return !(*this == o); }
  std::string ToHex() const;
  // InvalidArgument unless 32 hex characters.
  static Result<JobHandle> FromHex(const std::string& hex);
  // From the operating system's random source (getrandom).
  static JobHandle Random();
};

struct JobHandleHash {
  size_t operator()(const JobHandle& h) const noexcept;
};

// Called when a lookup job completes: its handle, and the request it leased for
// (PrefetchController::SetCompletionNotice, CacheEngine::SetCompletionNotice).
using JobCompletionNotice = std::function<void(const JobHandle& handle, RequestId request)>;

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_IDS_H_
