// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/chunk_hash.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace lmcache_cpp {
namespace {

NamespaceConfig DefaultNs() { return {"llama-3-8b", "nhd:bf16:L32:H8:D128:BS16", ""}; }

ChunkHasher MakeHasher(size_t chunk_size, const NamespaceConfig& ns = DefaultNs(),
                       HashAlgorithm algorithm = HashAlgorithm::kSha256) {
  Result<ChunkHasher> h = ChunkHasher::Create(ns, chunk_size, algorithm);
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  return std::move(h).value();
}

// Deterministic pseudo-random token ids (they use all 32 bits, so byte order matters).
std::vector<uint32_t> MakeTokens(size_t n, uint32_t stream) {
  std::vector<uint32_t> t(n);
  uint64_t x = 0x243F6A8885A308D3ull ^ (uint64_t{stream} * 0x9E3779B97F4A7C15ull);
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t[i] = static_cast<uint32_t>(x >> 16);
  }
  return t;
}

void AppendLe(std::vector<uint8_t>* out, uint64_t v, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) out->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

void AppendBytes(std::vector<uint8_t>* out, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  out->insert(out->end(), p, p + size);
}

void AppendField(std::vector<uint8_t>* out, const std::string& s) {
  AppendLe(out, s.size(), 8);
  AppendBytes(out, s.data(), s.size());
}

ChunkHash Sha256(const std::vector<uint8_t>& bytes) {
  return ChunkHasher::RawDigest(HashAlgorithm::kSha256, bytes.data(), bytes.size());
}

std::vector<ChunkHash> HashAll(const ChunkHasher& h, const std::vector<uint32_t>& tokens) {
  return h.HashTokens(tokens.data(), tokens.size());
}

// --- Raw digest ----------------------------------------------------------------------------

TEST(ChunkHasherTest, RawSha256MatchesKnownAnswers) {
  EXPECT_EQ(ChunkHasher::RawDigest(HashAlgorithm::kSha256, "abc", 3).ToHex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(ChunkHasher::RawDigest(HashAlgorithm::kSha256, "", 0).ToHex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const char* two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(
      ChunkHasher::RawDigest(HashAlgorithm::kSha256, two_blocks, std::strlen(two_blocks)).ToHex(),
      "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

// --- Token mode ----------------------------------------------------------------------------

TEST(ChunkHasherTest, CreateRejectsZeroChunkSize) {
  Result<ChunkHasher> h = ChunkHasher::Create(DefaultNs(), 0);
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
}

TEST(ChunkHasherTest, CreateRejectsUnknownAlgorithm) {
  Result<ChunkHasher> h = ChunkHasher::Create(DefaultNs(), 16, static_cast<HashAlgorithm>(7));
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
}

TEST(ChunkHasherTest, SeedIsDigestOfDomainAndLengthPrefixedFields) {
  const NamespaceConfig ns{"model-x", "layout-y", "salt-z"};
  ChunkHasher h = MakeHasher(16, ns);
  std::vector<uint8_t> input;
  const std::string domain = "lmcache_cpp/namespace/v1";
  AppendBytes(&input, domain.data(), domain.size());
  AppendField(&input, ns.model_name);
  AppendField(&input, ns.layout_fingerprint);
  AppendField(&input, ns.cache_salt);
  EXPECT_EQ(h.seed(), Sha256(input));
}

TEST(ChunkHasherTest, ChunksChainFromSeedOverLittleEndianTokens) {
  ChunkHasher h = MakeHasher(8);
  const std::vector<uint32_t> tokens = MakeTokens(16, 1);
  std::vector<uint8_t> first;
  AppendBytes(&first, h.seed().bytes.data(), kChunkHashSize);
  for (size_t i = 0; i < 8; ++i) AppendLe(&first, tokens[i], 4);
  const ChunkHash h0 = Sha256(first);
  std::vector<uint8_t> second;
  AppendBytes(&second, h0.bytes.data(), kChunkHashSize);
  for (size_t i = 8; i < 16; ++i) AppendLe(&second, tokens[i], 4);
  const std::vector<ChunkHash> got = HashAll(h, tokens);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], h0);
  EXPECT_EQ(got[1], Sha256(second));
}

TEST(ChunkHasherTest, EqualPrefixesGiveEqualHashesAndDivergeAfter) {
  ChunkHasher h = MakeHasher(16);
  std::vector<uint32_t> a = MakeTokens(5 * 16, 2);
  std::vector<uint32_t> b = a;
  b[2 * 16 + 7] ^= 1;  // inside chunk 2
  const std::vector<ChunkHash> ha = HashAll(h, a);
  const std::vector<ChunkHash> hb = HashAll(h, b);
  ASSERT_EQ(ha.size(), 5u);
  ASSERT_EQ(hb.size(), 5u);
  EXPECT_EQ(ha[0], hb[0]);
  EXPECT_EQ(ha[1], hb[1]);
  for (size_t i = 2; i < 5; ++i) EXPECT_NE(ha[i], hb[i]) << i;
}

TEST(ChunkHasherTest, ChangingATokenInChunkOneChangesEveryLaterHashButNotChunkZero) {
  ChunkHasher h = MakeHasher(256);
  const std::vector<uint32_t> base = MakeTokens(4 * 256, 3);
  const std::vector<ChunkHash> hb = HashAll(h, base);
  for (size_t pos : {256u, 300u, 511u}) {
    std::vector<uint32_t> t = base;
    t[pos] += 1;
    const std::vector<ChunkHash> ht = HashAll(h, t);
    ASSERT_EQ(ht.size(), 4u);
    EXPECT_EQ(ht[0], hb[0]) << pos;
    for (size_t i = 1; i < 4; ++i) EXPECT_NE(ht[i], hb[i]) << pos << " chunk " << i;
  }
}

TEST(ChunkHasherTest, LaterChunkContentsDoNotChangeEarlierHashes) {
  ChunkHasher h = MakeHasher(16);
  std::vector<uint32_t> a = MakeTokens(3 * 16, 4);
  std::vector<uint32_t> b = a;
  b.back() ^= 0x80000000u;
  const std::vector<ChunkHash> ha = HashAll(h, a);
  const std::vector<ChunkHash> hb = HashAll(h, b);
  EXPECT_EQ(ha[0], hb[0]);
  EXPECT_EQ(ha[1], hb[1]);
  EXPECT_NE(ha[2], hb[2]);
}

TEST(ChunkHasherTest, PartialTrailingChunkIsIgnored) {
  ChunkHasher h = MakeHasher(16);
  const std::vector<uint32_t> tokens = MakeTokens(3 * 16 + 5, 5);
  const std::vector<ChunkHash> with_tail = h.HashTokens(tokens.data(), tokens.size());
  const std::vector<ChunkHash> exact = h.HashTokens(tokens.data(), 3 * 16);
  EXPECT_EQ(with_tail.size(), 3u);
  EXPECT_EQ(with_tail, exact);
  EXPECT_TRUE(h.HashTokens(tokens.data(), 15).empty());
  EXPECT_TRUE(h.HashTokens(nullptr, 0).empty());
}

TEST(ChunkHasherTest, HashesAreDeterministicAcrossHasherInstances) {
  const std::vector<uint32_t> tokens = MakeTokens(4 * 32, 6);
  EXPECT_EQ(HashAll(MakeHasher(32), tokens), HashAll(MakeHasher(32), tokens));
}

TEST(ChunkHasherTest, ChunkSizeChangesTheHashes) {
  const std::vector<uint32_t> tokens = MakeTokens(64, 7);
  const std::vector<ChunkHash> h32 = HashAll(MakeHasher(32), tokens);
  const std::vector<ChunkHash> h16 = HashAll(MakeHasher(16), tokens);
  ASSERT_EQ(h32.size(), 2u);
  ASSERT_EQ(h16.size(), 4u);
  for (const ChunkHash& a : h32) {
    for (const ChunkHash& b : h16) EXPECT_NE(a, b);
  }
}

TEST(ChunkHasherTest, EachNamespaceFieldChangesEveryHash) {
  const std::vector<uint32_t> tokens = MakeTokens(4 * 16, 8);
  const NamespaceConfig base = DefaultNs();
  const std::vector<ChunkHash> hb = HashAll(MakeHasher(16, base), tokens);
  NamespaceConfig model = base;
  model.model_name += "-instruct";
  NamespaceConfig layout = base;
  layout.layout_fingerprint = "nhd:fp16:L32:H8:D128:BS16";
  NamespaceConfig salt = base;
  salt.cache_salt = "tenant-42";
  for (const NamespaceConfig& ns : {model, layout, salt}) {
    ChunkHasher h = MakeHasher(16, ns);
    EXPECT_NE(h.seed(), MakeHasher(16, base).seed());
    const std::vector<ChunkHash> hn = HashAll(h, tokens);
    ASSERT_EQ(hn.size(), hb.size());
    for (size_t i = 0; i < hn.size(); ++i) {
      EXPECT_NE(hn[i], hb[i]) << ns.model_name << "|" << ns.layout_fingerprint << "|"
                              << ns.cache_salt << " chunk " << i;
    }
  }
}

TEST(ChunkHasherTest, LengthPrefixesSeparateShiftedFieldBoundaries) {
  const std::vector<NamespaceConfig> configs = {
      {"ab", "c", ""}, {"a", "bc", ""}, {"abc", "", ""}, {"", "abc", ""},
      {"", "", "abc"}, {"a", "", "bc"}, {"a", "b", "c"}, {"", "ab", "c"},
  };
  std::vector<ChunkHash> seeds;
  for (const NamespaceConfig& ns : configs) seeds.push_back(MakeHasher(16, ns).seed());
  for (size_t i = 0; i < seeds.size(); ++i) {
    for (size_t j = i + 1; j < seeds.size(); ++j) EXPECT_NE(seeds[i], seeds[j]) << i << " vs " << j;
  }
}

TEST(ChunkHasherTest, AppendTokenChunksEqualsHashTokens) {
  ChunkHasher h = MakeHasher(16);
  const std::vector<uint32_t> tokens = MakeTokens(7 * 16 + 3, 9);
  const std::vector<ChunkHash> all = HashAll(h, tokens);
  for (size_t split : {0u, 1u, 3u, 7u}) {
    std::vector<ChunkHash> chained = h.HashTokens(tokens.data(), split * 16);
    const ChunkHash prev = split == 0 ? h.seed() : chained.back();
    h.AppendTokenChunks(prev, tokens.data() + split * 16, tokens.size() - split * 16, &chained);
    EXPECT_EQ(chained, all) << "split " << split;
  }
  // `prev` may alias an element of the output vector.
  std::vector<ChunkHash> aliased = h.HashTokens(tokens.data(), 16);
  aliased.shrink_to_fit();
  h.AppendTokenChunks(aliased.back(), tokens.data() + 16, tokens.size() - 16, &aliased);
  EXPECT_EQ(aliased, all);
}

TEST(ChunkHasherTest, HashOneChunkExtendsTheChainByOne) {
  ChunkHasher h = MakeHasher(16);
  const std::vector<uint32_t> tokens = MakeTokens(3 * 16, 10);
  const std::vector<ChunkHash> all = HashAll(h, tokens);
  ChunkHash prev = h.seed();
  for (size_t i = 0; i < 3; ++i) {
    prev = h.HashOneChunk(prev, tokens.data() + i * 16);
    EXPECT_EQ(prev, all[i]);
  }
}

TEST(ChunkHasherTest, ConcurrentCallsAgreeWithSingleThreadedHashing) {
  ChunkHasher h = MakeHasher(64);
  constexpr int kThreads = 4;
  std::vector<std::vector<uint32_t>> inputs;
  std::vector<std::vector<ChunkHash>> expected;
  for (int t = 0; t < kThreads; ++t) {
    inputs.push_back(MakeTokens(16 * 64, 100 + static_cast<uint32_t>(t)));
    expected.push_back(HashAll(h, inputs.back()));
  }
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        const int which = (t + rep) % kThreads;
        if (HashAll(h, inputs[which]) != expected[which]) ++mismatches[t];
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

// --- Hash mode -----------------------------------------------------------------------------

// `n` engine block hashes of `size` bytes each, back to back.
std::vector<uint8_t> MakeBlockHashes(size_t n, size_t size, uint32_t stream) {
  std::vector<uint8_t> out;
  for (uint32_t v : MakeTokens(n * size, stream)) out.push_back(static_cast<uint8_t>(v));
  return out;
}

TEST(ChunkHasherHashModeTest, BlockSizeMustDivideChunkSize) {
  ChunkHasher h = MakeHasher(256);
  const std::vector<uint8_t> blocks = MakeBlockHashes(32, 32, 1);
  for (size_t bad : {0u, 3u, 48u, 100u, 512u}) {
    EXPECT_EQ(h.HashFromBlockHashes(blocks.data(), 32, 32, bad).status().code(),
              StatusCode::kInvalidArgument)
        << bad;
  }
  for (size_t good : {1u, 16u, 64u, 256u}) {
    Result<std::vector<ChunkHash>> r = h.HashFromBlockHashes(blocks.data(), 32, 32, good);
    ASSERT_TRUE(r.ok()) << good;
    EXPECT_EQ(r->size(), 32 / (256 / good)) << good;
  }
}

TEST(ChunkHasherHashModeTest, BlockHashSizeMustBeBetweenOneAndMax) {
  ChunkHasher h = MakeHasher(64);
  const std::vector<uint8_t> blocks = MakeBlockHashes(8, kMaxBlockHashSize + 1, 2);
  EXPECT_EQ(h.HashFromBlockHashes(blocks.data(), 8, 0, 16).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(h.HashFromBlockHashes(blocks.data(), 8, kMaxBlockHashSize + 1, 16).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(h.HashFromBlockHashes(blocks.data(), 8, kMaxBlockHashSize, 16).ok());
  EXPECT_TRUE(h.HashFromBlockHashes(blocks.data(), 8, 1, 16).ok());
  EXPECT_EQ(h.HashFromBlockHashes(nullptr, 8, 32, 16).status().code(),
            StatusCode::kInvalidArgument);
  Result<std::vector<ChunkHash>> empty = h.HashFromBlockHashes(nullptr, 0, 32, 16);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(ChunkHasherHashModeTest, ChunkHashIsDigestOfBlockSeedAndLastBlockHash) {
  ChunkHasher h = MakeHasher(64);
  std::vector<uint8_t> seed_input;
  AppendBytes(&seed_input, h.seed().bytes.data(), kChunkHashSize);
  AppendBytes(&seed_input, "lmcache_cpp/block-mode/v1", 25);
  EXPECT_EQ(h.block_seed(), Sha256(seed_input));
  const size_t kBlockHashSize = 32;
  const std::vector<uint8_t> blocks = MakeBlockHashes(8, kBlockHashSize, 3);  // 2 chunks
  Result<std::vector<ChunkHash>> r = h.HashFromBlockHashes(blocks.data(), 8, kBlockHashSize, 16);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->size(), 2u);
  for (size_t c = 0; c < 2; ++c) {
    std::vector<uint8_t> input;
    AppendBytes(&input, h.block_seed().bytes.data(), kChunkHashSize);
    AppendLe(&input, kBlockHashSize, 8);
    AppendBytes(&input, blocks.data() + (c * 4 + 3) * kBlockHashSize, kBlockHashSize);
    EXPECT_EQ((*r)[c], Sha256(input)) << c;
  }
}

TEST(ChunkHasherHashModeTest, NoHashModeInputCanImitateATokenChunk) {
  // With a 4-token chunk, a token-mode chunk is H(seed || 16 token bytes). A client choosing an
  // 8-byte block hash could once build the same 16 bytes after the seed; with the block-mode
  // seed the inputs start differently, so the two hashes differ.
  ChunkHasher h = MakeHasher(4);
  uint8_t block_hash[8];
  for (int i = 0; i < 8; ++i) block_hash[i] = static_cast<uint8_t>(i);
  std::vector<uint8_t> imitation;  // what the block input after the seed would have been
  AppendBytes(&imitation, "block", 5);
  AppendLe(&imitation, 8, 8);
  AppendBytes(&imitation, block_hash, 3);  // 5 + 8 + 3 = 16 bytes = 4 tokens
  uint32_t tokens[4];
  std::memcpy(tokens, imitation.data(), 16);
  const std::vector<ChunkHash> token_mode = h.HashTokens(tokens, 4);
  const Result<std::vector<ChunkHash>> hash_mode = h.HashFromBlockHashes(block_hash, 1, 8, 4);
  ASSERT_TRUE(hash_mode.ok());
  ASSERT_EQ(token_mode.size(), 1u);
  ASSERT_EQ(hash_mode->size(), 1u);
  EXPECT_NE(token_mode[0], (*hash_mode)[0]);
  EXPECT_NE(h.block_seed(), h.seed());
}

TEST(ChunkHasherHashModeTest, HashDependsOnlyOnTheLastBlockOfEachChunk) {
  ChunkHasher h = MakeHasher(64);
  const size_t kSize = 32;
  const std::vector<uint8_t> base = MakeBlockHashes(12, kSize, 4);  // 3 chunks of 4 blocks
  const std::vector<ChunkHash> hb = *h.HashFromBlockHashes(base.data(), 12, kSize, 16);
  ASSERT_EQ(hb.size(), 3u);

  std::vector<uint8_t> inner = base;
  for (size_t b : {0u, 1u, 2u, 5u, 10u}) inner[b * kSize] ^= 0xFF;  // not last blocks
  EXPECT_EQ(*h.HashFromBlockHashes(inner.data(), 12, kSize, 16), hb);

  std::vector<uint8_t> last = base;
  last[7 * kSize + kSize - 1] ^= 0x01;  // last block of chunk 1
  const std::vector<ChunkHash> hl = *h.HashFromBlockHashes(last.data(), 12, kSize, 16);
  EXPECT_EQ(hl[0], hb[0]);
  EXPECT_NE(hl[1], hb[1]);
  EXPECT_EQ(hl[2], hb[2]);  // the engine's block hashes carry the prefix, not our chain
}

TEST(ChunkHasherHashModeTest, NamespacesSeparateEqualBlockHashes) {
  const std::vector<uint8_t> blocks = MakeBlockHashes(4, 32, 5);
  NamespaceConfig other = DefaultNs();
  other.cache_salt = "tenant-b";
  const std::vector<ChunkHash> a = *MakeHasher(64).HashFromBlockHashes(blocks.data(), 4, 32, 16);
  const std::vector<ChunkHash> b =
      *MakeHasher(64, other).HashFromBlockHashes(blocks.data(), 4, 32, 16);
  ASSERT_EQ(a.size(), 1u);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_NE(a[0], b[0]);
}

TEST(ChunkHasherHashModeTest, PartialTrailingChunkIsIgnored) {
  ChunkHasher h = MakeHasher(64);
  const std::vector<uint8_t> blocks = MakeBlockHashes(11, 32, 6);
  const std::vector<ChunkHash> with_tail = *h.HashFromBlockHashes(blocks.data(), 11, 32, 16);
  const std::vector<ChunkHash> exact = *h.HashFromBlockHashes(blocks.data(), 8, 32, 16);
  EXPECT_EQ(with_tail.size(), 2u);
  EXPECT_EQ(with_tail, exact);
  EXPECT_TRUE(h.HashFromBlockHashes(blocks.data(), 3, 32, 16)->empty());
}

TEST(ChunkHasherHashModeTest, BlockHashLengthIsPartOfTheInput) {
  // A 32-byte block hash and its 31-byte prefix must not give the same chunk hash.
  ChunkHasher h = MakeHasher(16);
  const std::vector<uint8_t> blocks = MakeBlockHashes(1, 32, 7);
  const ChunkHash full = (*h.HashFromBlockHashes(blocks.data(), 1, 32, 16))[0];
  const ChunkHash shorter = (*h.HashFromBlockHashes(blocks.data(), 1, 31, 16))[0];
  EXPECT_NE(full, shorter);
}

// --- xxh3 ----------------------------------------------------------------------------------

TEST(ChunkHasherXxh3Test, DiffersFromSha256AndIsDeterministic) {
  Result<ChunkHasher> x = ChunkHasher::Create(DefaultNs(), 32, HashAlgorithm::kXxh3);
  if (x.status().code() == StatusCode::kNotSupported) {
    GTEST_SKIP() << "built without libxxhash: kXxh3 is NotSupported";
  }
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  EXPECT_EQ(x->algorithm(), HashAlgorithm::kXxh3);
  const std::vector<uint32_t> tokens = MakeTokens(4 * 32, 11);
  const std::vector<ChunkHash> hx = HashAll(*x, tokens);
  const std::vector<ChunkHash> hs = HashAll(MakeHasher(32), tokens);
  ASSERT_EQ(hx.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_NE(hx[i], hs[i]);
  EXPECT_NE(x->seed(), MakeHasher(32).seed());
  EXPECT_EQ(HashAll(MakeHasher(32, DefaultNs(), HashAlgorithm::kXxh3), tokens), hx);

  const ChunkHash raw = ChunkHasher::RawDigest(HashAlgorithm::kXxh3, "abc", 3);
  EXPECT_EQ(raw, ChunkHasher::RawDigest(HashAlgorithm::kXxh3, "abc", 3));
  EXPECT_NE(raw, ChunkHasher::RawDigest(HashAlgorithm::kSha256, "abc", 3));
  // The two 128-bit halves come from different seeds.
  EXPECT_NE(std::memcmp(raw.bytes.data(), raw.bytes.data() + 16, 16), 0);
}

TEST(ChunkHasherXxh3Test, KeepsChainingAndNamespaceProperties) {
  NamespaceConfig salted = DefaultNs();
  salted.cache_salt = "s";
  Result<ChunkHasher> x = ChunkHasher::Create(DefaultNs(), 16, HashAlgorithm::kXxh3);
  if (x.status().code() == StatusCode::kNotSupported) {
    GTEST_SKIP() << "built without libxxhash: kXxh3 is NotSupported";
  }
  ASSERT_TRUE(x.ok());
  std::vector<uint32_t> a = MakeTokens(3 * 16, 12);
  std::vector<uint32_t> b = a;
  b[20] ^= 4;
  const std::vector<ChunkHash> ha = HashAll(*x, a);
  const std::vector<ChunkHash> hb = HashAll(*x, b);
  EXPECT_EQ(ha[0], hb[0]);
  EXPECT_NE(ha[1], hb[1]);
  EXPECT_NE(ha[2], hb[2]);
  const std::vector<ChunkHash> hs = HashAll(MakeHasher(16, salted, HashAlgorithm::kXxh3), a);
  for (size_t i = 0; i < 3; ++i) EXPECT_NE(hs[i], ha[i]);
}

}  // namespace
}  // namespace lmcache_cpp
