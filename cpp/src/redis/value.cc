// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "redis/value.h"

#include <openssl/evp.h>

#include <charconv>
#include <cstring>

#include "crc32c.h"

namespace lmcache_cpp {
namespace redis {
namespace {

uint64_t GetLe(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
void PutLe(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

constexpr size_t kHeaderCrcOffset = 28;
constexpr char kHex[] = "0123456789abcdef";

}  // namespace

uint64_t NamespaceDigest::fingerprint() const { return GetLe(bytes.data(), 8); }

NamespaceDigest MakeNamespaceDigest(std::string_view model, std::string_view layout,
                                    std::string_view salt) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  for (std::string_view part : {std::string_view("lmcache_cpp/redis/v1"), model, layout, salt}) {
    uint8_t len[8];
    PutLe(len, part.size(), 8);
    EVP_DigestUpdate(ctx, len, sizeof(len));
    EVP_DigestUpdate(ctx, part.data(), part.size());
  }
  uint8_t md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  EVP_DigestFinal_ex(ctx, md, &md_len);
  EVP_MD_CTX_free(ctx);
  NamespaceDigest d;
  std::memcpy(d.bytes.data(), md, d.bytes.size());
  return d;
}

Status ValidateKeyPrefix(std::string_view prefix) {
  if (prefix.size() > kMaxKeyPrefix) {
    return Status::InvalidArgument("redis key_prefix: longer than " +
                                   std::to_string(kMaxKeyPrefix) + " characters");
  }
  for (char c : prefix) {
    if (c <= ' ' || c > '~') {
      return Status::InvalidArgument("redis key_prefix: only printable ASCII, no spaces");
    }
    if (c == '{' || c == '}') {
      return Status::InvalidArgument(
          "redis key_prefix: '{' and '}' would make a hash tag and put every key in one slot");
    }
  }
  return Status::Ok();
}

StoreKey MakeStoreKey(std::string_view prefix, const NamespaceDigest& ns, const ObjectKey& key) {
  StoreKey k;
  char* p = k.bytes.data();
  const size_t np = prefix.size() < kMaxKeyPrefix ? prefix.size() : kMaxKeyPrefix;
  std::memcpy(p, prefix.data(), np);
  p += np;
  for (uint8_t b : ns.bytes) {
    *p++ = kHex[b >> 4];
    *p++ = kHex[b & 15];
  }
  *p++ = ':';
  for (uint8_t b : key.chunk.bytes) {
    *p++ = kHex[b >> 4];
    *p++ = kHex[b & 15];
  }
  *p++ = ':';
  p = std::to_chars(p, k.bytes.data() + k.bytes.size(), key.kv_rank).ptr;
  k.size = static_cast<uint8_t>(p - k.bytes.data());
  return k;
}

void EncodeValueHeader(uint8_t* out, uint64_t ns_fingerprint, uint64_t object_size,
                       uint32_t payload_crc) {
  std::memcpy(out, kValueMagic, 4);
  PutLe(out + 4, kValueFormatVersion, 2);
  PutLe(out + 6, kValueHeaderSize, 2);
  PutLe(out + 8, ns_fingerprint, 8);
  PutLe(out + 16, object_size, 8);
  PutLe(out + 24, payload_crc, 4);
  PutLe(out + kHeaderCrcOffset, internal::Crc32c(out, kHeaderCrcOffset), 4);
}

const char* ValueCheckName(ValueCheck check) {
  switch (check) {
    case ValueCheck::kOk: return "ok";
    case ValueCheck::kTruncated: return "truncated";
    case ValueCheck::kTorn: return "torn";
    case ValueCheck::kForeign: return "foreign";
    case ValueCheck::kWrongSize: return "wrong_size";
    case ValueCheck::kCorrupt: return "corrupt";
  }
  return "unknown";
}

ValueCheck CheckValue(const uint8_t* head, uint64_t value_length, uint64_t ns_fingerprint,
                      uint64_t expected_size, const uint8_t* payload) {
  if (value_length < kValueHeaderSize) {
    // Too short for a header; still call a stranger's short value foreign when its magic shows.
    if (value_length >= 4 && std::memcmp(head, kValueMagic, 4) != 0) return ValueCheck::kForeign;
    return ValueCheck::kTruncated;
  }
  if (std::memcmp(head, kValueMagic, 4) != 0) return ValueCheck::kForeign;
  if (GetLe(head + 4, 2) != kValueFormatVersion || GetLe(head + 6, 2) != kValueHeaderSize) {
    return ValueCheck::kForeign;
  }
  if (GetLe(head + kHeaderCrcOffset, 4) != internal::Crc32c(head, kHeaderCrcOffset)) {
    return ValueCheck::kTorn;
  }
  if (GetLe(head + 8, 8) != ns_fingerprint) return ValueCheck::kForeign;
  const uint64_t declared = GetLe(head + 16, 8);
  const uint64_t body = value_length - kValueHeaderSize;
  if (body < declared) return ValueCheck::kTruncated;
  if (body > declared) return ValueCheck::kTorn;
  if (declared != expected_size) return ValueCheck::kWrongSize;
  if (payload == nullptr) return ValueCheck::kTruncated;  // REQUIRES broken; never ok
  const uint32_t crc = static_cast<uint32_t>(GetLe(head + 24, 4));
  if (internal::Crc32c(payload, expected_size) != crc) return ValueCheck::kCorrupt;
  return ValueCheck::kOk;
}

}  // namespace redis
}  // namespace lmcache_cpp
