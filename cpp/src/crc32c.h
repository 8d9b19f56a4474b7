// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of L2 file headers and
// payloads. Internal to the core (not installed).
//
// Crc32c(data, n) is the standard CRC32C (initial value ~0, final complement), so
// Crc32c("123456789", 9) == 0xE3069283. Crc32cExtend continues a finished checksum:
// Crc32cExtend(Crc32c(a), b) == Crc32c(a || b), so a payload read in pieces is checked piece by
// piece. Crc32cCombine joins checksums computed separately: from Crc32c(a), Crc32c(b) and the
// length of b it returns Crc32c(a || b) without the bytes, so pieces checksummed on different
// threads (or at different times) give the checksum of the whole.
//
// Crc32cExtend picks, once at run time, the fastest implementation the CPU has:
//   * AVX-512 VPCLMULQDQ carry-less-multiplication folding for inputs of 4 KiB and more, with the
//     SSE4.2 path for the tail;
//   * the SSE4.2 crc32 instruction (three interleaved streams, recombined with precomputed shift
//     tables);
//   * a portable slicing-by-8 table.
// All give identical results; the explicit variants exist for tests and benchmarks.
//
// Thread safety: all functions are pure and may be called from any thread. Tables are built on
// first use (function-local statics).
#ifndef LMCACHE_CPP_SRC_CRC32C_H_
#define LMCACHE_CPP_SRC_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace lmcache_cpp {
namespace internal {

// Returns the CRC32C of `prefix || data[0, n)` given crc == Crc32c(prefix) (0 for no prefix).
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

// Returns Crc32c(a || b) given crc_a == Crc32c(a), crc_b == Crc32c(b) and len_b == the length of
// b in bytes (any value; Crc32cCombine(crc_a, 0, 0) == crc_a, Crc32cCombine(0, crc_b, n) ==
// crc_b). Costs O(log len_b) 32-step multiplications in GF(2)[x] / P (well under a microsecond):
// meant for joining the checksums of pieces, not for every few bytes.
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// The shortest input the folding path takes (shorter ones go to the crc32 instruction).
constexpr size_t kCrc32cFoldMinLength = 4096;

// Copies [src, src + n) to dst and returns Crc32cExtend(crc, src, n). With the folding path
// (Crc32cFoldAvailable()) and n >= kCrc32cFoldMinLength it does both in one pass over the bytes:
// each 64 bytes loaded are stored and folded into the checksum, so the checksum adds next to
// nothing to a copy that waits for memory; `streaming` then writes dst with non-temporal stores
// (after at most 63 bytes that align it), which the caller orders with a store fence (_mm_sfence)
// before another thread may read dst. Otherwise it is memcpy, then Crc32cExtend over the source (in
// cache by then), and `streaming` is ignored. REQUIRES: the ranges do not overlap.
uint32_t Crc32cCopy(uint32_t crc, void* dst, const void* src, size_t n, bool streaming);

// The portable table implementation.
uint32_t Crc32cExtendSoftware(uint32_t crc, const void* data, size_t n);

// True when this CPU and build have the SSE4.2 path.
bool Crc32cHardwareAvailable();

// True when the folding path (AVX-512F + VPCLMULQDQ + PCLMUL + SSE4.2) is available.
bool Crc32cFoldAvailable();

// The best hardware implementation (folding where available, else SSE4.2). Without SSE4.2 it
// returns the software result.
uint32_t Crc32cExtendHardware(uint32_t crc, const void* data, size_t n);

// The SSE4.2 crc32-instruction implementation only (no folding). Without SSE4.2 it returns the
// software result.
uint32_t Crc32cExtendSse42(uint32_t crc, const void* data, size_t n);

// Implementation of the two above.
uint32_t Crc32cExtendHardwareImpl(uint32_t crc, const void* data, size_t n, bool allow_fold);

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_CRC32C_H_
