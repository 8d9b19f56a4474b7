// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// ExtentAllocator: hands out aligned byte ranges of a fixed-size region (the arena).
//
// Best-fit over free extents kept in two ordered indexes (by offset, for coalescing on free; by
// (length, offset), for best fit). Allocate and Free are O(log n) in the number of free extents.
// With uniform object sizes -- the common case, one size per model -- every freed hole is exactly
// reused, so fragmentation stays bounded by one object per distinct size. Sizes are rounded up to
// `alignment` (default 4096, which also suits O_DIRECT and CUDA host registration).
//
// AllocateBatch is all-or-nothing: it returns every range or none (nothing stays allocated).
//
// Thread safety: all methods are thread-safe (one internal mutex). Lock order: a caller's lock
// (e.g. ObjectTable::mu_) may be held while calling in; the allocator calls nothing back.
//
// Stability: unstable (a building block of the object table; not installed).
#ifndef LMCACHE_CPP_ALLOCATOR_H_
#define LMCACHE_CPP_ALLOCATOR_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "lmcache_cpp/status.h"
#include "lmcache_cpp/storage_options.h"  // AllocatorStats

namespace lmcache_cpp {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;  // the rounded (allocated) length
  bool operator==(const Extent& o) const noexcept {
    return offset == o.offset && length == o.length;
  }
};

class ExtentAllocator {
 public:
  // REQUIRES: alignment is a power of two >= 8; capacity is rounded down to it.
  explicit ExtentAllocator(uint64_t capacity, uint64_t alignment = 4096);
  ExtentAllocator(const ExtentAllocator&) = delete;
  ExtentAllocator& operator=(const ExtentAllocator&) = delete;

  uint64_t alignment() const noexcept { return alignment_; }
  uint64_t capacity() const noexcept { return capacity_; }
  uint64_t RoundUp(uint64_t size) const noexcept {
    return (size + alignment_ - 1) & ~(alignment_ - 1);
  }

  // One range of at least `size` bytes (size > 0), or nullopt when no hole is large enough.
  std::optional<Extent> Allocate(uint64_t size);
  // `sizes.size()` ranges or none. Returns OutOfMemory (nothing allocated) or InvalidArgument
  // (a zero size).
  Result<std::vector<Extent>> AllocateBatch(const std::vector<uint64_t>& sizes);
  // Returns a range obtained from Allocate*. Freeing an unknown or overlapping range is a bug:
  // Internal is returned and the allocator is left unchanged.
  Status Free(const Extent& extent);

  AllocatorStats stats() const;
  // Verifies internal invariants (indexes agree, no overlap, accounting). For tests.
  Status CheckInvariants() const;

 private:
  std::optional<Extent> AllocateLocked(uint64_t size);
  Status FreeLocked(const Extent& extent);

  const uint64_t alignment_;
  const uint64_t capacity_;

  mutable std::mutex mu_;
  std::map<uint64_t, uint64_t> free_by_offset_;           // GUARDED_BY(mu_): offset -> length
  std::set<std::pair<uint64_t, uint64_t>> free_by_size_;  // GUARDED_BY(mu_): (length, offset)
  std::map<uint64_t, uint64_t> live_;                     // GUARDED_BY(mu_): offset -> length
  AllocatorStats stats_;                                  // GUARDED_BY(mu_)
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_ALLOCATOR_H_
