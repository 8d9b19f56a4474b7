// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// The bytes the cross-process arena tests exchange: arena_test.cc writes PatternByte(seed, i) to
// a span of kSpan bytes, and the peer process (arena_peer.cc) checks it and answers with
// PatternByte(seed + 1, i) in the next span. Both include this header, so they agree by
// construction.
#ifndef LMCACHE_CPP_TESTS_ARENA_PATTERN_H_
#define LMCACHE_CPP_TESTS_ARENA_PATTERN_H_

#include <cstddef>
#include <cstdint>

namespace lmcache_cpp {
namespace testutil {

inline constexpr size_t kSpan = 64 * 1024;

inline uint8_t PatternByte(uint64_t seed, size_t i) {
  uint64_t x = (seed + 1) * 0x9E3779B97F4A7C15ULL + i * 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 29;
  return static_cast<uint8_t>(x ^ (x >> 8));
}

}  // namespace testutil
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_TESTS_ARENA_PATTERN_H_
