// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// ChunkHash and ObjectKey: the fixed-size identity of one stored object.
//
// A ChunkHash is the 32-byte rolling prefix hash of a full chunk of tokens (see chunk_hash.h).
// An ObjectKey is (chunk hash, kv_rank): kv_rank distinguishes tensor/pipeline-parallel shards of
// the same chunk. Keys are plain values (36 bytes + padding, trivially copyable), hashed for tables
// by ObjectKeyHash without touching strings: the chunk hash is already uniformly distributed, so
// the table hash is its first 8 bytes mixed with the rank.
//
// Thread safety: values; no shared state.
//
// Stability: stable (L2 adapters receive ObjectKeys).
#ifndef LMCACHE_CPP_OBJECT_KEY_H_
#define LMCACHE_CPP_OBJECT_KEY_H_

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

inline constexpr size_t kChunkHashSize = 32;

struct ChunkHash {
  std::array<uint8_t, kChunkHashSize> bytes{};

  bool operator==(const ChunkHash& o) const noexcept {
    return std::memcmp(bytes.data(), o.bytes.data(), kChunkHashSize) == 0;
  }
  bool operator!=(const ChunkHash& o) const noexcept { return !(*this == o); }
  bool operator<(const ChunkHash& o) const noexcept {
    return std::memcmp(bytes.data(), o.bytes.data(), kChunkHashSize) < 0;
  }
  // Lower-case hex, 64 characters.
  std::string ToHex() const;
  // Parses 64 hex characters. Returns InvalidArgument otherwise.
  static Result<ChunkHash> FromHex(const std::string& hex);
  // REQUIRES: size == kChunkHashSize, else InvalidArgument.
  static Result<ChunkHash> FromBytes(const void* data, size_t size);
};

struct ObjectKey {
  ChunkHash chunk;
  int32_t kv_rank = 0;

  bool operator==(const ObjectKey& o) const noexcept {
    return kv_rank == o.kv_rank && chunk == o.chunk;
  }
  bool operator!=(const ObjectKey& o) const noexcept { return !(*this == o); }
  bool operator<(const ObjectKey& o) const noexcept {
    if (chunk != o.chunk) return chunk < o.chunk;
    return kv_rank < o.kv_rank;
  }
  // "<first 16 hex chars of the hash>@<rank>", for logs.
  std::string ToShortString() const;
};

// Table hash for ObjectKey: cheap, no string hashing. Deterministic across runs.
struct ObjectKeyHash {
  size_t operator()(const ObjectKey& k) const noexcept {
    uint64_t h;
    std::memcpy(&h, k.chunk.bytes.data(), sizeof(h));
    // Mix the rank in with an odd multiplicative constant so keys of one chunk spread over
    // buckets: rank * odd is a bijection modulo 2^k, so ranks 0..2^k-1 of one chunk differ in
    // their low k bits (distinct buckets of a power-of-two table). No further shift-mixing: it
    // would fold the rank's high bits onto the low ones (ranks 0 and 7 used to collide mod 1024).
    h ^= static_cast<uint64_t>(static_cast<uint32_t>(k.kv_rank)) * 0x9E3779B97F4A7C15ull;
    return static_cast<size_t>(h);
  }
};

struct ChunkHashHash {
  size_t operator()(const ChunkHash& c) const noexcept {
    uint64_t h;
    std::memcpy(&h, c.bytes.data(), sizeof(h));
    return static_cast<size_t>(h);
  }
};

// Expands chunk hashes to the object keys of every rank in [0, world_size), chunk-major:
// {c0@0, c0@1, ..., c0@(w-1), c1@0, ...}. REQUIRES: world_size >= 1 (else InvalidArgument).
Result<std::vector<ObjectKey>> ExpandToAllRanks(const std::vector<ChunkHash>& chunks,
                                                int32_t world_size);

// Object keys of one rank: {c0@rank, c1@rank, ...}.
std::vector<ObjectKey> KeysForRank(const std::vector<ChunkHash>& chunks, int32_t kv_rank);

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_OBJECT_KEY_H_
