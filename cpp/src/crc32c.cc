// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "crc32c.h"

#include "lmcache_cpp/l2_adapter.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LMCACHE_CPP_CRC32C_X86 1
#include <immintrin.h>
#include <nmmintrin.h>
#else
#define LMCACHE_CPP_CRC32C_X86 0
#endif

namespace lmcache_cpp {
namespace internal {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, bit-reflected

// Slicing-by-8 tables: kTables[0] is the classic byte table; kTables[k][b] is the register after
// byte b followed by k zero bytes.
struct SoftwareTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  SoftwareTables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t r = b;
      for (int bit = 0; bit < 8; ++bit) r = (r >> 1) ^ ((r & 1u) ? kPoly : 0u);
      t[0][b] = r;
    }
    for (size_t k = 1; k < 8; ++k) {
      for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
    }
  }
};

const SoftwareTables& Tables() {
  static const SoftwareTables tables;
  return tables;
}

// Updates the raw register (no pre/post complement).
uint32_t SoftwareUpdate(uint32_t reg, const uint8_t* p, size_t n) {
  const auto& t = Tables().t;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    reg = (reg >> 8) ^ t[0][(reg ^ *p) & 0xFFu];
    ++p;
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= reg;  // little-endian: the register lines up with the first four bytes
    reg = t[7][w & 0xFFu] ^ t[6][(w >> 8) & 0xFFu] ^ t[5][(w >> 16) & 0xFFu] ^
          t[4][(w >> 24) & 0xFFu] ^ t[3][(w >> 32) & 0xFFu] ^ t[2][(w >> 40) & 0xFFu] ^
          t[1][(w >> 48) & 0xFFu] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    reg = (reg >> 8) ^ t[0][(reg ^ *p) & 0xFFu];
    ++p;
    --n;
  }
  return reg;
}

// ---- Combining checksums ---------------------------------------------------------------------
//
// A reflected CRC register r holds a polynomial of degree < 32 with bit 31 the coefficient of x^0
// and bit 0 that of x^31. Running the register over n zero bytes multiplies it by x^(8n) mod P, and
// the register is linear in the bytes, so for the standard CRC (register preset to ~0, result
// complemented):
//   Crc32c(a || b) = Crc32c(a) * x^(8 |b|)  xor  Crc32c(b)      (mod P)
// (the complement that ends Crc32c(a), shifted over b, cancels the ~0 preset of b's register,
// shifted the same; the complement that ends Crc32c(b) is the one that ends Crc32c(a || b)).

constexpr uint32_t kOne = 0x80000000u;  // the polynomial 1

// a(x) * b(x) mod P.
uint32_t MulModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t coefficient = kOne; coefficient != 0 && a != 0; coefficient >>= 1) {
    if ((a & coefficient) != 0) {
      product ^= b;
      a ^= coefficient;
    }
    b = (b >> 1) ^ ((b & 1u) ? kPoly : 0u);  // b *= x
  }
  return product;
}

// x^(2^k) mod P for k in [0, 67): enough for x^(8n) with any 64-bit n.
struct SquarePowers {
  std::array<uint32_t, 67> x2k{};
  SquarePowers() {
    x2k[0] = kOne >> 1;  // x
    for (size_t k = 1; k < x2k.size(); ++k) x2k[k] = MulModP(x2k[k - 1], x2k[k - 1]);
  }
};

const SquarePowers& Powers() {
  static const SquarePowers powers;
  return powers;
}

// x^(8n) mod P, as the product of x^(2^(k+3)) over the set bits k of n.
uint32_t XPow8N(uint64_t n) {
  const auto& x2k = Powers().x2k;
  uint32_t r = kOne;
  for (size_t k = 3; n != 0; ++k, n >>= 1) {
    if ((n & 1u) != 0) r = MulModP(r, x2k[k]);
  }
  return r;
}

#if LMCACHE_CPP_CRC32C_X86

// Stream lengths of the interleaved loop: three streams of kLongBlock bytes while that much is
// left, then three of kShortBlock, then one stream.
constexpr size_t kLongBlock = 8192;
constexpr size_t kShortBlock = 256;

__attribute__((target("sse4.2"))) uint32_t HardwareSingle(uint32_t reg, const uint8_t* p,
                                                          size_t n) {
  uint64_t r = reg;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    r = _mm_crc32_u8(static_cast<uint32_t>(r), *p);
    ++p;
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    r = _mm_crc32_u64(r, w);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    r = _mm_crc32_u8(static_cast<uint32_t>(r), *p);
    ++p;
    --n;
  }
  return static_cast<uint32_t>(r);
}

// Advancing a register over `len` zero bytes is linear over GF(2), so it is four table lookups:
// shift(r) = t[0][byte 0 of r] ^ t[1][byte 1] ^ t[2][byte 2] ^ t[3][byte 3].
struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t{};

  __attribute__((target("sse4.2"))) explicit ShiftTable(size_t len) {
    std::array<uint32_t, 32> basis{};
    for (int j = 0; j < 32; ++j) {
      uint64_t r = uint64_t{1} << j;
      for (size_t i = 0; i < len / 8; ++i) r = _mm_crc32_u64(r, 0);
      basis[j] = static_cast<uint32_t>(r);
    }
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int i = 0; i < 8; ++i) {
          if ((b >> i) & 1u) v ^= basis[8 * k + i];
        }
        t[k][b] = v;
      }
    }
  }

  uint32_t Shift(uint32_t r) const {
    return t[0][r & 0xFFu] ^ t[1][(r >> 8) & 0xFFu] ^ t[2][(r >> 16) & 0xFFu] ^ t[3][r >> 24];
  }
};

const ShiftTable& LongShift() {
  static const ShiftTable table(kLongBlock);
  return table;
}

const ShiftTable& ShortShift() {
  static const ShiftTable table(kShortBlock);
  return table;
}

// Three independent crc32 chains hide the instruction's 3-cycle latency.
template <size_t kBlock>
__attribute__((target("sse4.2"))) uint32_t HardwareInterleaved(uint32_t reg, const uint8_t*& p,
                                                               size_t& n, const ShiftTable& shift) {
  static_assert(kBlock % 8 == 0, "blocks are whole words");
  while (n >= 3 * kBlock) {
    uint64_t a = reg, b = 0, c = 0;
    const uint8_t* pa = p;
    const uint8_t* pb = p + kBlock;
    const uint8_t* pc = p + 2 * kBlock;
    for (size_t i = 0; i < kBlock; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, pa + i, 8);
      std::memcpy(&wb, pb + i, 8);
      std::memcpy(&wc, pc + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    // reg(A||B) = shift(regA, |B|) ^ reg0(B); same again for C.
    uint32_t ab = shift.Shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b);
    reg = shift.Shift(ab) ^ static_cast<uint32_t>(c);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return reg;
}

// ---- Carry-less multiplication folding (AVX-512 VPCLMULQDQ) ----------------------------------
//
// Bit conventions (all bit-reflected, as CRC32C itself): in a 128-bit block loaded from memory,
// bit k (bit k % 8 of byte k / 8) is the coefficient of x^(127 - k); a 64-bit constant c holds a
// polynomial of degree < 64 with bit i <-> x^(63 - i). clmul(a, c) of two such 64-bit values has
// bit k <-> x^(126 - k) of a(x) c(x): read back as a 128-bit block it is a(x) c(x) x.
//
// A block A = A_hi x^64 + A_lo (A_hi in bytes 0..7) that lies D bits before a block T contributes
// A x^D to T's position, and only its residue mod P matters, so
//   fold(A, D) = clmul(A_hi, x^(D+63) mod P) ^ clmul(A_lo, x^(D-1) mod P)
// (the -1 cancels the extra factor x) is a block of degree < 96 that can be XORed into T.
// After folding everything into one block X, the CRC register is X(x) x^32 mod P, which the crc32
// instruction computes by running X's 16 bytes through it from register 0. The incoming register
// is XORed into the first four bytes, as the register of a reflected CRC always may be.
//
// The constants are derived at start-up from P (no tables of magic numbers).

// x^e mod P as a 64-bit folding constant.
uint64_t XPowModP(unsigned e) {
  uint32_t r = 0x80000000u;  // reflected register holding the polynomial 1
  for (unsigned i = 0; i < e; ++i) r = (r >> 1) ^ ((r & 1u) ? kPoly : 0u);  // times x
  return static_cast<uint64_t>(r) << 32;
}

// The two constants that fold a 128-bit block D bits forward: {x^(D+63), x^(D-1)} mod P.
struct Fold {
  explicit Fold(unsigned d) : hi(XPowModP(d + 63)), lo(XPowModP(d - 1)) {}
  uint64_t hi, lo;
};

struct FoldConstants {
  // The distances used below.
  Fold d2048{2048}, d1536{1536}, d1024{1024}, d512{512}, d384{384}, d256{256}, d128{128};
};

const FoldConstants& Folds() {
  static const FoldConstants constants;
  return constants;
}

constexpr size_t kFoldStride = 256;                      // four 512-bit accumulators
constexpr size_t kFoldMinLength = kCrc32cFoldMinLength;  // below it crc32 is as fast

#define LMCACHE_CPP_FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

LMCACHE_CPP_FOLD_TARGET inline __m512i Fold512(__m512i a, __m512i k, __m512i next) {
  const __m512i lo = _mm512_clmulepi64_epi128(a, k, 0x00);  // A_hi * x^(D+63)
  const __m512i hi = _mm512_clmulepi64_epi128(a, k, 0x11);  // A_lo * x^(D-1)
  return _mm512_ternarylogic_epi64(lo, hi, next, 0x96);     // lo ^ hi ^ next
}

LMCACHE_CPP_FOLD_TARGET inline __m512i Constant512(uint64_t hi_const, uint64_t lo_const) {
  // Every 128-bit lane: low qword (multiplies A_hi) = hi_const, high qword = lo_const.
  return _mm512_set_epi64(static_cast<long long>(lo_const), static_cast<long long>(hi_const),
                          static_cast<long long>(lo_const), static_cast<long long>(hi_const),
                          static_cast<long long>(lo_const), static_cast<long long>(hi_const),
                          static_cast<long long>(lo_const), static_cast<long long>(hi_const));
}

LMCACHE_CPP_FOLD_TARGET inline __m128i Fold128(__m128i a, uint64_t hi_const, uint64_t lo_const,
                                               __m128i next) {
  const __m128i k =
      _mm_set_epi64x(static_cast<long long>(lo_const), static_cast<long long>(hi_const));
  const __m128i lo = _mm_clmulepi64_si128(a, k, 0x00);
  const __m128i hi = _mm_clmulepi64_si128(a, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

// The register after the 256-byte accumulators z0..z3 (in memory order) of a fold.
LMCACHE_CPP_FOLD_TARGET uint32_t FoldReduce(__m512i z0, __m512i z1, __m512i z2, __m512i z3) {
  const FoldConstants& c = Folds();
  // Four accumulators into one (z0 lies 192 bytes before z3, z1 128, z2 64).
  __m512i x = Fold512(z2, Constant512(c.d512.hi, c.d512.lo), z3);
  x = Fold512(z1, Constant512(c.d1024.hi, c.d1024.lo), x);
  x = Fold512(z0, Constant512(c.d1536.hi, c.d1536.lo), x);
  // Four 128-bit lanes into one (lane 0 lies 48 bytes before lane 3).
  alignas(64) __m128i lanes[4];
  _mm512_store_si512(lanes, x);
  __m128i y = lanes[3];
  y = Fold128(lanes[2], c.d128.hi, c.d128.lo, y);
  y = Fold128(lanes[1], c.d256.hi, c.d256.lo, y);
  y = Fold128(lanes[0], c.d384.hi, c.d384.lo, y);
  uint64_t r = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(y)));
  r = _mm_crc32_u64(r, static_cast<uint64_t>(_mm_extract_epi64(y, 1)));
  return static_cast<uint32_t>(r);
}

LMCACHE_CPP_FOLD_TARGET inline __m512i WithRegister(__m512i z, uint32_t reg) {
  return _mm512_xor_si512(z, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(reg))));
}

// Consumes whole 256-byte strides of [p, p + n); returns the register after them.
// REQUIRES: n >= kFoldStride.
LMCACHE_CPP_FOLD_TARGET uint32_t FoldAvx512(uint32_t reg, const uint8_t*& p, size_t& n) {
  __m512i z0 = WithRegister(_mm512_loadu_si512(p), reg);
  __m512i z1 = _mm512_loadu_si512(p + 64);
  __m512i z2 = _mm512_loadu_si512(p + 128);
  __m512i z3 = _mm512_loadu_si512(p + 192);
  p += kFoldStride;
  n -= kFoldStride;
  const __m512i k2048 = Constant512(Folds().d2048.hi, Folds().d2048.lo);
  while (n >= kFoldStride) {
    z0 = Fold512(z0, k2048, _mm512_loadu_si512(p));
    z1 = Fold512(z1, k2048, _mm512_loadu_si512(p + 64));
    z2 = Fold512(z2, k2048, _mm512_loadu_si512(p + 128));
    z3 = Fold512(z3, k2048, _mm512_loadu_si512(p + 192));
    p += kFoldStride;
    n -= kFoldStride;
  }
  return FoldReduce(z0, z1, z2, z3);
}

template <bool kStream>
LMCACHE_CPP_FOLD_TARGET inline void Store512(uint8_t* d, __m512i v) {
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), v);
  } else {
    _mm512_storeu_si512(d, v);
  }
}

// FoldCopyAvx512 prefetches the source this far ahead (within the input): the loop's fold
// instructions hold back how far out-of-order execution runs ahead of the copy's loads, and
// without the prefetches the one-pass copy ran ~10% slower than a plain one on 32 KiB pieces
// (from memory); with them, within ~1-3%.
constexpr size_t kPrefetchAhead = 2048;

// FoldAvx512 that also stores every 64 bytes it loads at d (advanced like p): the copy and the
// checksum read the source once. REQUIRES: n >= kFoldStride; with kStream, d 64-byte aligned.
template <bool kStream>
LMCACHE_CPP_FOLD_TARGET uint32_t FoldCopyAvx512(uint32_t reg, uint8_t*& d, const uint8_t*& p,
                                                size_t& n) {
  __m512i x0 = _mm512_loadu_si512(p);
  __m512i x1 = _mm512_loadu_si512(p + 64);
  __m512i x2 = _mm512_loadu_si512(p + 128);
  __m512i x3 = _mm512_loadu_si512(p + 192);
  Store512<kStream>(d, x0);
  Store512<kStream>(d + 64, x1);
  Store512<kStream>(d + 128, x2);
  Store512<kStream>(d + 192, x3);
  __m512i z0 = WithRegister(x0, reg);
  __m512i z1 = x1;
  __m512i z2 = x2;
  __m512i z3 = x3;
  p += kFoldStride;
  d += kFoldStride;
  n -= kFoldStride;
  const __m512i k2048 = Constant512(Folds().d2048.hi, Folds().d2048.lo);
  while (n >= kFoldStride) {
    if (n >= kPrefetchAhead + kFoldStride) {
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + 192), _MM_HINT_T0);
    }
    x0 = _mm512_loadu_si512(p);
    x1 = _mm512_loadu_si512(p + 64);
    x2 = _mm512_loadu_si512(p + 128);
    x3 = _mm512_loadu_si512(p + 192);
    Store512<kStream>(d, x0);
    Store512<kStream>(d + 64, x1);
    Store512<kStream>(d + 128, x2);
    Store512<kStream>(d + 192, x3);
    z0 = Fold512(z0, k2048, x0);
    z1 = Fold512(z1, k2048, x1);
    z2 = Fold512(z2, k2048, x2);
    z3 = Fold512(z3, k2048, x3);
    p += kFoldStride;
    d += kFoldStride;
    n -= kFoldStride;
  }
  return FoldReduce(z0, z1, z2, z3);
}

bool DetectHardware() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}

bool DetectFold() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
}

#else

bool DetectHardware() { return false; }
bool DetectFold() { return false; }

#endif  // LMCACHE_CPP_CRC32C_X86

}  // namespace

bool Crc32cHardwareAvailable() {
  static const bool available = DetectHardware();
  return available;
}

bool Crc32cFoldAvailable() {
  static const bool available = DetectFold();
  return available;
}

uint32_t Crc32cExtendSoftware(uint32_t crc, const void* data, size_t n) {
  return ~SoftwareUpdate(~crc, static_cast<const uint8_t*>(data), n);
}

uint32_t Crc32cExtendHardware(uint32_t crc, const void* data, size_t n) {
  return Crc32cExtendHardwareImpl(crc, data, n, /*allow_fold=*/true);
}

uint32_t Crc32cExtendSse42(uint32_t crc, const void* data, size_t n) {
  return Crc32cExtendHardwareImpl(crc, data, n, /*allow_fold=*/false);
}

uint32_t Crc32cExtendHardwareImpl(uint32_t crc, const void* data, size_t n, bool allow_fold) {
#if LMCACHE_CPP_CRC32C_X86
  if (!Crc32cHardwareAvailable()) return Crc32cExtendSoftware(crc, data, n);
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t reg = ~crc;
  if (allow_fold && n >= kFoldMinLength && Crc32cFoldAvailable()) reg = FoldAvx512(reg, p, n);
  if (n >= 3 * kLongBlock) reg = HardwareInterleaved<kLongBlock>(reg, p, n, LongShift());
  if (n >= 3 * kShortBlock) reg = HardwareInterleaved<kShortBlock>(reg, p, n, ShortShift());
  return ~HardwareSingle(reg, p, n);
#else
  (void)allow_fold;
  return Crc32cExtendSoftware(crc, data, n);
#endif
}

uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (crc_a == 0 || len_b == 0) return crc_a ^ crc_b;
  return MulModP(crc_a, XPow8N(len_b)) ^ crc_b;
}

uint32_t Crc32cCopy(uint32_t crc, void* dst, const void* src, size_t n, bool streaming) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* p = static_cast<const uint8_t*>(src);
#if LMCACHE_CPP_CRC32C_X86
  if (n >= kFoldMinLength && Crc32cFoldAvailable()) {
    // Up to 63 bytes to align the destination, whole strides in one pass, under 256 bytes left.
    const size_t head = (64 - (reinterpret_cast<uintptr_t>(d) & 63u)) & 63u;
    std::memcpy(d, p, head);
    uint32_t reg = HardwareSingle(~crc, p, head);
    d += head;
    p += head;
    n -= head;
    reg = streaming ? FoldCopyAvx512<true>(reg, d, p, n) : FoldCopyAvx512<false>(reg, d, p, n);
    std::memcpy(d, p, n);
    return ~HardwareSingle(reg, p, n);
  }
#else
  (void)streaming;
#endif
  std::memcpy(d, p, n);
  return Crc32cExtend(crc, p, n);
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
  return Crc32cHardwareAvailable() ? Crc32cExtendHardware(crc, data, n)
                                   : Crc32cExtendSoftware(crc, data, n);
}

}  // namespace internal
uint32_t PayloadCrc32c(const void* data, size_t size) { return internal::Crc32c(data, size); }

}  // namespace lmcache_cpp
