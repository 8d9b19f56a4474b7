// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Chunk hashing: the rolling prefix hash that names KV chunks.
//
//   seed    = H("lmcache_cpp/namespace/v1" || len||model_name || len||layout_fingerprint ||
//   len||salt) h_0     = H(seed || tokens of chunk 0) h_i     = H(h_{i-1} || tokens of chunk i)
//   (token mode)
//
// Tokens are hashed as little-endian uint32 (1 KiB per 256-token chunk). Only full chunks are
// hashed; trailing tokens that do not fill a chunk are ignored. Because each hash folds in the
// previous one, equal chunk hashes imply equal token prefixes (up to the hash's collision
// resistance), so a lookup may stop at the first miss.
//
// Hash mode: an engine that already has chained per-block hashes (vLLM's block hashes are
// prefix-chained) sends those instead of token ids. The hash of chunk i is derived from the engine
// hash of the last block of chunk i:  c_i = H(block_seed || len||block_hash), where
// block_seed = H(seed || "lmcache_cpp/block-mode/v1"). The seed keeps namespaces apart; the
// engine's chaining carries the prefix; block_seed keeps the two modes apart (a hash-mode input
// cannot equal a token-mode input without a SHA-256 preimage, whatever a client sends).
//
// H is SHA-256 (OpenSSL) by default. HashAlgorithm::kXxh3 (non-cryptographic, 128-bit widened to
// 32 bytes) exists for trusted single-tenant deployments and benchmarks; it is never the default,
// because a collision would serve one tenant another's KV. Its 32 bytes are XXH3_128bits(input,
// seed 0) followed by XXH3_128bits(input, seed 0x6c6d63616368655f), each in xxhash's canonical
// (big-endian) byte order; it is available only when the build found libxxhash
// (LMCACHE_CPP_HAVE_XXHASH).
//
// Lengths ("len||") are 8-byte little-endian byte counts.
//
// Thread safety: ChunkHasher is immutable after construction; all methods are const and may be
// called concurrently. Each call uses its own digest context.
//
// Stability: unstable API (not installed); HashAlgorithm (EngineConfig::hash_algorithm) is in
// hash_options.h. The hash values themselves name L2 objects, so they only change with a new
// format (old objects then miss).
#ifndef LMCACHE_CPP_CHUNK_HASH_H_
#define LMCACHE_CPP_CHUNK_HASH_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lmcache_cpp/hash_options.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

struct NamespaceConfig {
  std::string model_name;
  // Identifies the byte layout of objects (e.g. "nhd:bf16:L32:H8:D128:BS16"); engines with
  // different layouts never share objects.
  std::string layout_fingerprint;
  // Optional per-tenant / per-request isolation salt. Empty = none.
  std::string cache_salt;
};

// Maximum length accepted for one engine block hash in hash mode.
inline constexpr size_t kMaxBlockHashSize = 64;

class ChunkHasher {
 public:
  // REQUIRES: chunk_size > 0 (InvalidArgument). Returns NotSupported for kXxh3 when the build
  // lacks libxxhash.
  static Result<ChunkHasher> Create(const NamespaceConfig& ns, size_t chunk_size,
                                    HashAlgorithm algorithm = HashAlgorithm::kSha256);

  size_t chunk_size() const noexcept { return chunk_size_; }
  HashAlgorithm algorithm() const noexcept { return algorithm_; }
  // The namespace seed (the "previous hash" of chunk 0).
  const ChunkHash& seed() const noexcept { return seed_; }
  // The starting digest of hash-mode chunk hashes: H(seed || "lmcache_cpp/block-mode/v1").
  const ChunkHash& block_seed() const noexcept { return block_seed_; }

  // Token mode: hashes of the full chunks of tokens[0, n). Returns n / chunk_size hashes.
  std::vector<ChunkHash> HashTokens(const uint32_t* tokens, size_t n) const;
  // Extends a chain: appends the hashes of the full chunks of `tokens`, continuing from `prev`
  // (the last hash of the chain, or seed()). Used by HashSession to hash only new chunks.
  void AppendTokenChunks(const ChunkHash& prev, const uint32_t* tokens, size_t n,
                         std::vector<ChunkHash>* out) const;
  // Hash of one chunk given the previous hash. REQUIRES: tokens points at chunk_size() tokens.
  ChunkHash HashOneChunk(const ChunkHash& prev, const uint32_t* tokens) const;

  // Hash mode. `block_hashes` holds num_blocks hashes of `block_hash_size` bytes each, back to
  // back; `block_size` is the engine's tokens per block and must divide chunk_size()
  // (InvalidArgument otherwise, also for a block_hash_size of 0 or > kMaxBlockHashSize).
  // Returns one hash per full chunk covered by the blocks.
  Result<std::vector<ChunkHash>> HashFromBlockHashes(const uint8_t* block_hashes, size_t num_blocks,
                                                     size_t block_hash_size,
                                                     size_t block_size) const;

  // One raw digest of arbitrary bytes with `algorithm` (benchmark floor, tests). For kXxh3 in a
  // build without libxxhash (where Create returns NotSupported) it returns an all-zero hash.
  static ChunkHash RawDigest(HashAlgorithm algorithm, const void* data, size_t size);

 private:
  ChunkHasher(ChunkHash seed, ChunkHash block_seed, size_t chunk_size, HashAlgorithm algorithm)
      : seed_(seed), block_seed_(block_seed), chunk_size_(chunk_size), algorithm_(algorithm) {}

  ChunkHash seed_;
  ChunkHash block_seed_;
  size_t chunk_size_;
  HashAlgorithm algorithm_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_CHUNK_HASH_H_
