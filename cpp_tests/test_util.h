// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Helpers shared by the C++ tests.
#ifndef LMCACHE_CPP_TESTS_TEST_UTIL_H_
#define LMCACHE_CPP_TESTS_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace testutil {

// A key whose chunk hash spreads `i` over its bytes (distinct i give distinct, well-hashed keys).
inline ObjectKey Key(uint64_t i, int32_t rank = 0) {
  ObjectKey k;
  uint64_t x = i * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (size_t b = 0; b < kChunkHashSize; b += 8) {
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    std::memcpy(k.chunk.bytes.data() + b, &x, 8);
  }
  std::memcpy(k.chunk.bytes.data() + 24, &i, 8);  // keeps keys injective in i
  k.kv_rank = rank;
  return k;
}

// Keys first .. first + n - 1.
inline std::vector<ObjectKey> Keys(uint64_t first, size_t n, int32_t rank = 0) {
  std::vector<ObjectKey> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(Key(first + i, rank));
  return v;
}

// Whether `r` failed with `code` (else says what it got).
template <typename T>
::testing::AssertionResult FailsWith(const Result<T>& r, StatusCode code) {
  if (r.ok()) return ::testing::AssertionFailure() << "succeeded";
  if (r.status().code() != code) return ::testing::AssertionFailure() << r.status().ToString();
  return ::testing::AssertionSuccess();
}

}  // namespace testutil
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_TESTS_TEST_UTIL_H_
