// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// lmcache_cpp_arena_peer: the second process of the cross-process arena tests (arena_test.cc).
//
//   lmcache_cpp_arena_peer <path> <size> <offset> <seed>
//
// Attaches to the arena at <path> (<size> bytes), checks that [offset, offset + kSpan) holds
// PatternByte(seed, i) -- written by the parent -- and then writes PatternByte(seed + 1, i) to
// [offset + kSpan, offset + 2 * kSpan) for the parent to check. Exits 0 on success; on failure
// prints one line to stderr and exits non-zero (2 usage, 3 attach, 4 range, 5 mismatch).
//
// kSpan and PatternByte come from arena_pattern.h, shared with arena_test.cc.

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "arena_pattern.h"
#include "lmcache_cpp/arena.h"

namespace {

using lmcache_cpp::testutil::kSpan;
using lmcache_cpp::testutil::PatternByte;

bool ParseU64(const char* text, uint64_t* out) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0') return false;
  *out = static_cast<uint64_t>(v);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t size = 0;
  uint64_t offset = 0;
  uint64_t seed = 0;
  if (argc != 5 || !ParseU64(argv[2], &size) || !ParseU64(argv[3], &offset) ||
      !ParseU64(argv[4], &seed)) {
    std::fprintf(stderr, "usage: %s <path> <size> <offset> <seed>\n", argv[0]);
    return 2;
  }
  lmcache_cpp::ArenaDescriptor descriptor;
  descriptor.path = argv[1];
  descriptor.size = size;
  auto attached = lmcache_cpp::AttachedArena::Attach(descriptor);
  if (!attached.ok()) {
    std::fprintf(stderr, "peer: attach failed: %s\n", attached.status().ToString().c_str());
    return 3;
  }
  uint8_t* base = (*attached)->base();
  if (offset > size || size - offset < 2 * kSpan) {
    std::fprintf(stderr, "peer: offset %" PRIu64 " + 2 * %zu exceeds size %" PRIu64 "\n", offset,
                 kSpan, size);
    return 4;
  }
  for (size_t i = 0; i < kSpan; ++i) {
    const uint8_t want = PatternByte(seed, i);
    if (base[offset + i] != want) {
      std::fprintf(stderr, "peer: byte %" PRIu64 " is %u, expected %u\n", offset + i,
                   static_cast<unsigned>(base[offset + i]), static_cast<unsigned>(want));
      return 5;
    }
  }
  for (size_t i = 0; i < kSpan; ++i) base[offset + kSpan + i] = PatternByte(seed + 1, i);
  return 0;
}
