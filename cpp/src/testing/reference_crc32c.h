// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// A bitwise CRC32C (Castagnoli, reflected polynomial 0x82F63B78), independent of the library's
// implementation (cpp/src/crc32c.cc): what the tests and the fuzzers check the library's
// checksums against. Part of the lmcache_cpp_testing library (cpp/src/testing/), never
// installed. Pure function; any thread.
#ifndef LMCACHE_CPP_SRC_TESTING_REFERENCE_CRC32C_H_
#define LMCACHE_CPP_SRC_TESTING_REFERENCE_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace lmcache_cpp::testing {

// The CRC32C of p[0, n), one bit at a time.
inline uint32_t ReferenceCrc32c(const uint8_t* p, size_t n) {
  uint32_t c = ~0u;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}

}  // namespace lmcache_cpp::testing

#endif  // LMCACHE_CPP_SRC_TESTING_REFERENCE_CRC32C_H_
