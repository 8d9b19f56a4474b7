// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// bench_chunk_hash: cost of naming 256-token chunks.
//
// Measures ChunkHasher::HashTokens over a 64-chunk prompt (ns per chunk) against a floor measured
// in the same run: one raw SHA-256 (OpenSSL EVP, fetched digest, reused context) of each chunk's
// 1 KiB of token bytes. The chained hash digests 32 more bytes per chunk (the previous hash),
// which fits in the same number of SHA-256 blocks, so the target ratio is <= 1.2. Also prints hash
// mode (engine block hashes) and xxh3 when the build has it. Runs alternate between the
// measurements and each reports the median of its runs.
#include <openssl/evp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <vector>

#include "lmcache_cpp/chunk_hash.h"

namespace {

using lmcache_cpp::ChunkHash;
using lmcache_cpp::ChunkHasher;
using lmcache_cpp::HashAlgorithm;
using lmcache_cpp::NamespaceConfig;
using lmcache_cpp::Result;

constexpr size_t kChunkTokens = 256;
constexpr size_t kChunks = 64;
constexpr int kRepsPerRun = 100;  // 6400 chunks per run
constexpr int kRuns = 11;

volatile uint8_t g_sink;  // keeps results observable

double NowNs() {
  return static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch())
                                 .count());
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// ns per chunk of one run of `body`, which processes kRepsPerRun * kChunks chunks.
double TimeRun(const std::function<void()>& body) {
  const double t0 = NowNs();
  body();
  return (NowNs() - t0) / (static_cast<double>(kRepsPerRun) * kChunks);
}

}  // namespace

int main() {
  const NamespaceConfig ns{"bench-model", "nhd:bf16:L32:H8:D128:BS16", ""};
  Result<ChunkHasher> sha = ChunkHasher::Create(ns, kChunkTokens, HashAlgorithm::kSha256);
  if (!sha.ok()) {
    std::printf("chunk_hash: cannot create hasher: %s\n", sha.status().ToString().c_str());
    return 1;
  }
  Result<ChunkHasher> xxh = ChunkHasher::Create(ns, kChunkTokens, HashAlgorithm::kXxh3);

  std::vector<uint32_t> tokens(kChunks * kChunkTokens);
  uint32_t x = 12345;
  for (uint32_t& t : tokens) {
    x = x * 1664525u + 1013904223u;
    t = x % 128256u;  // a Llama-3-sized vocabulary
  }
  const size_t kBlockSize = 16;
  const size_t kBlockHashSize = 32;
  const size_t num_blocks = tokens.size() / kBlockSize;
  std::vector<uint8_t> block_hashes(num_blocks * kBlockHashSize);
  for (size_t i = 0; i < block_hashes.size(); ++i) block_hashes[i] = static_cast<uint8_t>(i * 131);

  // Floor: raw SHA-256 of each chunk's token bytes, with the same EVP setup as the library.
  EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (md == nullptr || ctx == nullptr) {
    std::printf("chunk_hash: OpenSSL SHA-256 unavailable\n");
    return 1;
  }
  auto raw = [&] {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    for (int rep = 0; rep < kRepsPerRun; ++rep) {
      for (size_t c = 0; c < kChunks; ++c) {
        EVP_DigestInit_ex2(ctx, md, nullptr);
        EVP_DigestUpdate(ctx, tokens.data() + c * kChunkTokens, kChunkTokens * sizeof(uint32_t));
        EVP_DigestFinal_ex(ctx, out, &len);
        g_sink = out[0];
      }
    }
  };
  auto chained = [&tokens](const ChunkHasher* h) {
    return [&tokens, h] {
      for (int rep = 0; rep < kRepsPerRun; ++rep) {
        std::vector<ChunkHash> r = h->HashTokens(tokens.data(), tokens.size());
        g_sink = r.back().bytes[0];
      }
    };
  };
  auto hash_mode = [&] {
    for (int rep = 0; rep < kRepsPerRun; ++rep) {
      Result<std::vector<ChunkHash>> r =
          sha->HashFromBlockHashes(block_hashes.data(), num_blocks, kBlockHashSize, kBlockSize);
      g_sink = r->back().bytes[0];
    }
  };
  const std::function<void()> sha_chained = chained(&*sha);
  std::function<void()> xxh_chained;
  if (xxh.ok()) xxh_chained = chained(&*xxh);

  // Warm up (page faults, first fetch, frequency ramp).
  raw();
  sha_chained();
  hash_mode();
  if (xxh_chained) xxh_chained();

  std::vector<double> raw_ns, sha_ns, mode_ns, xxh_ns;
  for (int run = 0; run < kRuns; ++run) {
    raw_ns.push_back(TimeRun(raw));
    sha_ns.push_back(TimeRun(sha_chained));
    mode_ns.push_back(TimeRun(hash_mode));
    if (xxh_chained) xxh_ns.push_back(TimeRun(xxh_chained));
  }
  EVP_MD_CTX_free(ctx);
  EVP_MD_free(md);

  const double raw_med = Median(raw_ns);
  const double sha_med = Median(sha_ns);
  const double mode_med = Median(mode_ns);
  const double ratio = sha_med / raw_med;
  std::printf("chunk_hash: %zu-token chunks, %zu chunks per prompt, %d reps x %d runs (median)\n",
              kChunkTokens, kChunks, kRepsPerRun, kRuns);
  std::printf("  raw sha256 of 1 KiB token bytes : %8.1f ns\n", raw_med);
  std::printf("  HashTokens sha256 per chunk     : %8.1f ns  (%.0f MB/s of tokens)\n", sha_med,
              1e3 * kChunkTokens * sizeof(uint32_t) / sha_med);
  std::printf("  hash mode sha256 per chunk      : %8.1f ns  (block %zu, %zu-byte block hashes)\n",
              mode_med, kBlockSize, kBlockHashSize);
  if (!xxh_ns.empty()) {
    const double xxh_med = Median(xxh_ns);
    std::printf("  HashTokens xxh3 per chunk       : %8.1f ns  (%.2fx faster than sha256)\n",
                xxh_med, sha_med / xxh_med);
  } else {
    std::printf("  HashTokens xxh3                 : unavailable (%s)\n",
                xxh.status().ToString().c_str());
  }
  std::printf("chunk_hash: sha256 chunk %.0f ns, raw sha256 %.0f ns, ratio %.2f (target <= 1.2)\n",
              sha_med, raw_med, ratio);
  return 0;
}
