// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of L2 file headers and
// payloads. Internal to the core (not installed).
//
// Crc32c(data, n) is the standard CRC32C (initial value ~0, final complement), so
// Crc32c("123456789", 9) == 0xE3069283. Crc32cExtend continues a finished checksum:
// Crc32cExtend(Crc32c(a), b) == Crc32c(a || b), so a payload read in pieces is checked piece by
// piece.
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
