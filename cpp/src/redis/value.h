// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// What the Redis L2 tier stores: the key of an object and the framing of its value
// (docs/design/redis.md, "Keys" and "Values"). Internal to the core (not installed).
//
// Key: "<prefix><namespace digest, 32 hex>:<chunk hash, 64 hex>:<kv rank>". The namespace digest
// is SHA-256 over the model, the KV layout and the salt (the first 16 bytes), so cache servers
// on different hosts with the same model and layout name the same objects, and nothing a client
// sends chooses another namespace's keys. No hash tag: the whole key feeds the slot, and the
// chunk hash spreads keys evenly over the 16384 slots. The prefix may not hold '{' or '}' (a
// hash tag would pin every key to one slot) and is checked by ValidateKeyPrefix.
//
// Value: a 32-byte header, then the object's bytes.
//   [0, 4)   magic "LMCV"
//   [4, 6)   format version (1), little-endian
//   [6, 8)   header size (32)
//   [8, 16)  namespace fingerprint (the digest's first 8 bytes, little-endian)
//   [16, 24) object size in bytes
//   [24, 28) CRC32C of the object's bytes
//   [28, 32) CRC32C of bytes [0, 28)
// A value is handed to the engine only when CheckValue says kOk: the header is intact, ours,
// of this namespace, of the expected size, followed by exactly that many bytes whose CRC32C
// matches. Every other outcome is a miss with its own reason code, for the stats.
//
// Thread safety: pure functions and values.
#ifndef LMCACHE_CPP_SRC_REDIS_VALUE_H_
#define LMCACHE_CPP_SRC_REDIS_VALUE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace redis {

inline constexpr size_t kValueHeaderSize = 32;
inline constexpr uint16_t kValueFormatVersion = 1;
inline constexpr char kValueMagic[4] = {'L', 'M', 'C', 'V'};

struct NamespaceDigest {
  std::array<uint8_t, 16> bytes{};
  // The digest's first 8 bytes, little-endian: what value headers carry.
  uint64_t fingerprint() const;
};

// SHA-256 of the length-prefixed parts, cut to 16 bytes. Parts are opaque strings (the adapter
// passes the model name, a canonical spelling of the KV layout, and the salt).
NamespaceDigest MakeNamespaceDigest(std::string_view model, std::string_view layout,
                                    std::string_view salt);

inline constexpr size_t kMaxKeyPrefix = 64;
// prefix + 32 + ':' + 64 + ':' + an int32 (11 characters).
inline constexpr size_t kMaxStoreKey = kMaxKeyPrefix + 32 + 1 + 64 + 1 + 11;

// Returns InvalidArgument unless `prefix` is at most kMaxKeyPrefix printable ASCII characters
// without spaces, '{' or '}'.
Status ValidateKeyPrefix(std::string_view prefix);

// A Redis key, built without heap allocation.
struct StoreKey {
  std::array<char, kMaxStoreKey> bytes{};
  uint8_t size = 0;
  std::string_view view() const { return {bytes.data(), size}; }
};

// REQUIRES: ValidateKeyPrefix(prefix).ok() (a longer prefix is cut to kMaxKeyPrefix).
StoreKey MakeStoreKey(std::string_view prefix, const NamespaceDigest& ns, const ObjectKey& key);

// Fills out[0, kValueHeaderSize) for an object of `object_size` bytes with CRC32C `payload_crc`.
void EncodeValueHeader(uint8_t* out, uint64_t ns_fingerprint, uint64_t object_size,
                       uint32_t payload_crc);

enum class ValueCheck : uint8_t {
  kOk = 0,
  kTruncated,  // fewer bytes than a header, or than the header says
  kTorn,       // the header fails its own checksum, or bytes follow the declared object
  kForeign,    // not our magic or format version, or another namespace's fingerprint
  kWrongSize,  // an intact value of ours whose object size is not the one asked for
  kCorrupt,    // the object's bytes fail the header's CRC32C
};
inline constexpr size_t kValueCheckCount = 6;
const char* ValueCheckName(ValueCheck check);

// Checks a loaded value. `head` holds its first min(value_length, kValueHeaderSize) bytes;
// `payload` its object bytes when value_length == kValueHeaderSize + expected_size (else null:
// the reply did not fit the caller's buffer and only the head was kept).
ValueCheck CheckValue(const uint8_t* head, uint64_t value_length, uint64_t ns_fingerprint,
                      uint64_t expected_size, const uint8_t* payload);

}  // namespace redis
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_REDIS_VALUE_H_
