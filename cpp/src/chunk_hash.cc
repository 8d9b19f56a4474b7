// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/chunk_hash.h"

#include <openssl/evp.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#if defined(LMCACHE_CPP_HAVE_XXHASH) && LMCACHE_CPP_HAVE_XXHASH
#include <xxhash.h>
#define LMCACHE_CPP_XXH3_ENABLED 1
#else
#define LMCACHE_CPP_XXH3_ENABLED 0
#endif

#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kHostIsLittleEndian = true;
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
constexpr bool kHostIsLittleEndian = false;
#else
#error "lmcache_cpp: cannot determine the host byte order"
#endif

constexpr char kNamespaceDomain[] = "lmcache_cpp/namespace/v1";
// Hash mode digests start from block_seed = H(seed || kBlockModeDomain) instead of the seed, so
// no hash-mode input can equal a token-mode input (which starts with the seed or a chunk hash)
// without a preimage of block_seed, whatever tokens and block hashes a client chooses.
constexpr char kBlockModeDomain[] = "lmcache_cpp/block-mode/v1";

[[noreturn]] void DigestFailure(const char* what) {
  // Only reachable when OpenSSL cannot allocate or is misconfigured; there is no sane result to
  // return from a hash function, and returning a wrong hash would serve the wrong KV.
  Log(LogLevel::kError, std::string("chunk hash: ") + what);
  std::abort();
}

// The SHA-256 implementation, fetched once per process and never freed (it must outlive every
// thread's context).
const EVP_MD* Sha256Md() {
  static const EVP_MD* const md = []() -> const EVP_MD* {
    EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (fetched != nullptr) return fetched;
    const EVP_MD* legacy = EVP_sha256();  // slower (implicit fetch per init), still correct
    if (legacy == nullptr) DigestFailure("no SHA-256 implementation available");
    return legacy;
  }();
  return md;
}

struct EvpMdCtxFree {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};

// One SHA-256 context per thread, reused by every digest the thread computes.
EVP_MD_CTX* ThreadSha256Ctx() {
  thread_local const std::unique_ptr<EVP_MD_CTX, EvpMdCtxFree> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr) DigestFailure("EVP_MD_CTX_new failed");
  return ctx.get();
}

#if LMCACHE_CPP_XXH3_ENABLED
// kXxh3 output: XXH3-128 with kXxh3SeedLow (canonical, big-endian) followed by XXH3-128 with
// kXxh3SeedHigh over the same input.
constexpr XXH64_hash_t kXxh3SeedLow = 0;
constexpr XXH64_hash_t kXxh3SeedHigh = 0x6c6d63616368655fULL;  // "lmcache_"

struct Xxh3StateFree {
  void operator()(XXH3_state_t* s) const noexcept { XXH3_freeState(s); }
};
using Xxh3StatePtr = std::unique_ptr<XXH3_state_t, Xxh3StateFree>;

struct Xxh3States {
  Xxh3StatePtr low{XXH3_createState()};
  Xxh3StatePtr high{XXH3_createState()};
};

Xxh3States& ThreadXxh3States() {
  thread_local Xxh3States states;
  if (states.low == nullptr || states.high == nullptr) DigestFailure("XXH3_createState failed");
  return states;
}
#endif

// One digest computation on the calling thread's reusable context. At most one Digest may be
// live per thread at a time (none of the functions below nest them).
class Digest {
 public:
  explicit Digest(HashAlgorithm algorithm) {
    switch (algorithm) {
      case HashAlgorithm::kSha256:
        kind_ = Kind::kSha256;
        sha_ = ThreadSha256Ctx();
        if (EVP_DigestInit_ex2(sha_, Sha256Md(), nullptr) != 1) {
          DigestFailure("EVP_DigestInit_ex2 failed");
        }
        return;
      case HashAlgorithm::kXxh3:
#if LMCACHE_CPP_XXH3_ENABLED
        kind_ = Kind::kXxh3;
        xxh_ = &ThreadXxh3States();
        if (XXH3_128bits_reset_withSeed(xxh_->low.get(), kXxh3SeedLow) != XXH_OK ||
            XXH3_128bits_reset_withSeed(xxh_->high.get(), kXxh3SeedHigh) != XXH_OK) {
          DigestFailure("XXH3_128bits_reset_withSeed failed");
        }
#endif
        return;
    }
  }

  void Update(const void* data, size_t size) {
    switch (kind_) {
      case Kind::kSha256:
        if (EVP_DigestUpdate(sha_, data, size) != 1) DigestFailure("EVP_DigestUpdate failed");
        return;
      case Kind::kXxh3:
#if LMCACHE_CPP_XXH3_ENABLED
        if (XXH3_128bits_update(xxh_->low.get(), data, size) != XXH_OK ||
            XXH3_128bits_update(xxh_->high.get(), data, size) != XXH_OK) {
          DigestFailure("XXH3_128bits_update failed");
        }
#endif
        return;
      case Kind::kUnsupported: return;
    }
  }

  // 8-byte little-endian length prefix.
  void UpdateLength(uint64_t v) {
    uint8_t le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<uint8_t>(v >> (8 * i));
    Update(le, sizeof(le));
  }

  // A length-prefixed field.
  void UpdateField(const void* data, size_t size) {
    UpdateLength(static_cast<uint64_t>(size));
    Update(data, size);
  }

  // Tokens as little-endian uint32.
  void UpdateTokens(const uint32_t* tokens, size_t n) {
    if constexpr (kHostIsLittleEndian) {
      Update(tokens, n * sizeof(uint32_t));
    } else {
      uint32_t swapped[256];
      while (n > 0) {
        const size_t m = n < 256 ? n : 256;
        for (size_t i = 0; i < m; ++i) swapped[i] = __builtin_bswap32(tokens[i]);
        Update(swapped, m * sizeof(uint32_t));
        tokens += m;
        n -= m;
      }
    }
  }

  ChunkHash Final() {
    ChunkHash out;
    switch (kind_) {
      case Kind::kSha256: {
        unsigned int len = 0;
        if (EVP_DigestFinal_ex(sha_, out.bytes.data(), &len) != 1 || len != kChunkHashSize) {
          DigestFailure("EVP_DigestFinal_ex failed");
        }
        break;
      }
      case Kind::kXxh3: {
#if LMCACHE_CPP_XXH3_ENABLED
        XXH128_canonical_t low;
        XXH128_canonical_t high;
        XXH128_canonicalFromHash(&low, XXH3_128bits_digest(xxh_->low.get()));
        XXH128_canonicalFromHash(&high, XXH3_128bits_digest(xxh_->high.get()));
        static_assert(sizeof(low.digest) + sizeof(high.digest) == kChunkHashSize, "widening");
        std::memcpy(out.bytes.data(), low.digest, sizeof(low.digest));
        std::memcpy(out.bytes.data() + sizeof(low.digest), high.digest, sizeof(high.digest));
#endif
        break;
      }
      case Kind::kUnsupported: break;  // all zero; only RawDigest can get here
    }
    return out;
  }

 private:
  enum class Kind { kUnsupported, kSha256, kXxh3 };
  Kind kind_ = Kind::kUnsupported;
  EVP_MD_CTX* sha_ = nullptr;
#if LMCACHE_CPP_XXH3_ENABLED
  Xxh3States* xxh_ = nullptr;
#endif
};

}  // namespace

Result<ChunkHasher> ChunkHasher::Create(const NamespaceConfig& ns, size_t chunk_size,
                                        HashAlgorithm algorithm) {
  if (chunk_size == 0) return Status::InvalidArgument("chunk_size must be > 0");
  switch (algorithm) {
    case HashAlgorithm::kSha256: break;
    case HashAlgorithm::kXxh3:
      if (!LMCACHE_CPP_XXH3_ENABLED) {
        return Status::NotSupported("HashAlgorithm::kXxh3 needs libxxhash, absent from this build");
      }
      break;
    default:
      return Status::InvalidArgument("unknown hash algorithm " +
                                     std::to_string(static_cast<int32_t>(algorithm)));
  }
  Digest d(algorithm);
  d.Update(kNamespaceDomain, sizeof(kNamespaceDomain) - 1);
  d.UpdateField(ns.model_name.data(), ns.model_name.size());
  d.UpdateField(ns.layout_fingerprint.data(), ns.layout_fingerprint.size());
  d.UpdateField(ns.cache_salt.data(), ns.cache_salt.size());
  const ChunkHash seed = d.Final();
  Digest b(algorithm);
  b.Update(seed.bytes.data(), kChunkHashSize);
  b.Update(kBlockModeDomain, sizeof(kBlockModeDomain) - 1);
  return ChunkHasher(seed, b.Final(), chunk_size, algorithm);
}

std::vector<ChunkHash> ChunkHasher::HashTokens(const uint32_t* tokens, size_t n) const {
  std::vector<ChunkHash> out;
  out.reserve(n / chunk_size_);
  AppendTokenChunks(seed_, tokens, n, &out);
  return out;
}

void ChunkHasher::AppendTokenChunks(const ChunkHash& prev, const uint32_t* tokens, size_t n,
                                    std::vector<ChunkHash>* out) const {
  const size_t full_chunks = n / chunk_size_;
  if (full_chunks == 0) return;
  ChunkHash h = prev;  // copied first: `prev` may alias an element of *out
  out->reserve(out->size() + full_chunks);
  for (size_t i = 0; i < full_chunks; ++i) {
    h = HashOneChunk(h, tokens + i * chunk_size_);
    out->push_back(h);
  }
}

ChunkHash ChunkHasher::HashOneChunk(const ChunkHash& prev, const uint32_t* tokens) const {
  Digest d(algorithm_);
  d.Update(prev.bytes.data(), kChunkHashSize);
  d.UpdateTokens(tokens, chunk_size_);
  return d.Final();
}

Result<std::vector<ChunkHash>> ChunkHasher::HashFromBlockHashes(const uint8_t* block_hashes,
                                                                size_t num_blocks,
                                                                size_t block_hash_size,
                                                                size_t block_size) const {
  if (block_size == 0 || chunk_size_ % block_size != 0) {
    return Status::InvalidArgument("block_size " + std::to_string(block_size) +
                                   " must be > 0 and divide chunk_size " +
                                   std::to_string(chunk_size_));
  }
  if (block_hash_size == 0 || block_hash_size > kMaxBlockHashSize) {
    return Status::InvalidArgument("block_hash_size " + std::to_string(block_hash_size) +
                                   " must be in [1, " + std::to_string(kMaxBlockHashSize) + "]");
  }
  if (block_hashes == nullptr && num_blocks > 0) {
    return Status::InvalidArgument("block_hashes is null");
  }
  const size_t blocks_per_chunk = chunk_size_ / block_size;
  const size_t full_chunks = num_blocks / blocks_per_chunk;
  std::vector<ChunkHash> out;
  out.reserve(full_chunks);
  for (size_t i = 0; i < full_chunks; ++i) {
    const uint8_t* last_block = block_hashes + ((i + 1) * blocks_per_chunk - 1) * block_hash_size;
    Digest d(algorithm_);
    d.Update(block_seed_.bytes.data(), kChunkHashSize);
    d.UpdateField(last_block, block_hash_size);
    out.push_back(d.Final());
  }
  return out;
}

ChunkHash ChunkHasher::RawDigest(HashAlgorithm algorithm, const void* data, size_t size) {
  Digest d(algorithm);
  d.Update(data, size);
  return d.Final();
}

}  // namespace lmcache_cpp
