// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/object_key.h"

namespace lmcache_cpp {
namespace {

constexpr char kHexDigits[] = "0123456789abcdef";

// Value of one hex digit (either case), or -1.
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string ChunkHash::ToHex() const {
  std::string s(2 * kChunkHashSize, '0');
  for (size_t i = 0; i < kChunkHashSize; ++i) {
    s[2 * i] = kHexDigits[bytes[i] >> 4];
    s[2 * i + 1] = kHexDigits[bytes[i] & 0xF];
  }
  return s;
}

Result<ChunkHash> ChunkHash::FromHex(const std::string& hex) {
  if (hex.size() != 2 * kChunkHashSize) {
    return Status::InvalidArgument("chunk hash hex must have " +
                                   std::to_string(2 * kChunkHashSize) + " characters, got " +
                                   std::to_string(hex.size()));
  }
  ChunkHash h;
  for (size_t i = 0; i < kChunkHashSize; ++i) {
    const int hi = HexValue(hex[2 * i]);
    const int lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return Status::InvalidArgument("chunk hash hex has a non-hex character near offset " +
                                     std::to_string(2 * i));
    }
    h.bytes[i] = static_cast<uint8_t>((hi << 4) | lo);
  }
  return h;
}

Result<ChunkHash> ChunkHash::FromBytes(const void* data, size_t size) {
  if (size != kChunkHashSize) {
    return Status::InvalidArgument("chunk hash must be " + std::to_string(kChunkHashSize) +
                                   " bytes, got " + std::to_string(size));
  }
  if (data == nullptr) return Status::InvalidArgument("chunk hash bytes are null");
  ChunkHash h;
  std::memcpy(h.bytes.data(), data, kChunkHashSize);
  return h;
}

std::string ObjectKey::ToShortString() const {
  std::string s = chunk.ToHex();
  s.resize(16);
  s += '@';
  s += std::to_string(kv_rank);
  return s;
}

Result<std::vector<ObjectKey>> ExpandToAllRanks(const std::vector<ChunkHash>& chunks,
                                                int32_t world_size) {
  if (world_size < 1) {
    return Status::InvalidArgument("world_size must be >= 1, got " + std::to_string(world_size));
  }
  std::vector<ObjectKey> keys;
  keys.reserve(chunks.size() * static_cast<size_t>(world_size));
  for (const ChunkHash& c : chunks) {
    for (int32_t rank = 0; rank < world_size; ++rank) keys.push_back(ObjectKey{c, rank});
  }
  return keys;
}

std::vector<ObjectKey> KeysForRank(const std::vector<ChunkHash>& chunks, int32_t kv_rank) {
  std::vector<ObjectKey> keys;
  keys.reserve(chunks.size());
  for (const ChunkHash& c : chunks) keys.push_back(ObjectKey{c, kv_rank});
  return keys;
}

}  // namespace lmcache_cpp
