// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/allocator.h"

#include <cstdlib>
#include <iterator>
#include <string>

#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace {

std::string ExtentString(uint64_t offset, uint64_t length) {
  return "[" + std::to_string(offset) + ", +" + std::to_string(length) + ")";
}

}  // namespace

ExtentAllocator::ExtentAllocator(uint64_t capacity, uint64_t alignment)
    : alignment_(alignment), capacity_(capacity & ~(alignment - 1)) {
  if (alignment < 8 || (alignment & (alignment - 1)) != 0) {
    // A violated REQUIRES: there is no way to report it from a constructor.
    Log(LogLevel::kError,
        "ExtentAllocator: alignment " + std::to_string(alignment) + " is not a power of two >= 8");
    std::abort();
  }
  if (capacity_ > 0) {
    free_by_offset_.emplace(0, capacity_);
    free_by_size_.emplace(capacity_, 0);
  }
  stats_.capacity = capacity_;
  stats_.free = capacity_;
}

std::optional<Extent> ExtentAllocator::AllocateLocked(uint64_t size) {
  // size <= capacity_ (a multiple of alignment_) also keeps RoundUp from overflowing.
  if (size == 0 || size > capacity_) return std::nullopt;
  const uint64_t length = RoundUp(size);
  // Best fit: the smallest hole that holds `length`; among equals, the lowest offset.
  auto best = free_by_size_.lower_bound({length, 0});
  if (best == free_by_size_.end()) return std::nullopt;
  const uint64_t hole_length = best->first;
  const uint64_t hole_offset = best->second;
  free_by_size_.erase(best);
  if (hole_length == length) {
    free_by_offset_.erase(hole_offset);
  } else {
    // Carve from the low end; the remainder keeps the hole's end.
    auto node = free_by_offset_.extract(hole_offset);
    node.key() = hole_offset + length;
    node.mapped() = hole_length - length;
    free_by_offset_.insert(std::move(node));
    free_by_size_.emplace(hole_length - length, hole_offset + length);
  }
  live_.emplace(hole_offset, length);
  stats_.used += length;
  stats_.free -= length;
  return Extent{hole_offset, length};
}

Status ExtentAllocator::FreeLocked(const Extent& extent) {
  auto live = live_.find(extent.offset);
  if (live == live_.end()) {
    return Status::Internal("Free of an extent that is not allocated: " +
                            ExtentString(extent.offset, extent.length));
  }
  if (live->second != extent.length) {
    return Status::Internal("Free of " + ExtentString(extent.offset, extent.length) +
                            " but the allocated extent is " +
                            ExtentString(live->first, live->second));
  }
  uint64_t offset = extent.offset;
  uint64_t length = extent.length;
  live_.erase(live);

  // Coalesce with the free neighbours; a live extent never overlaps a free one, so the next free
  // extent starts at or after our end and the previous one ends at or before our start.
  auto next = free_by_offset_.lower_bound(offset);
  if (next != free_by_offset_.end() && next->first == offset + length) {
    free_by_size_.erase({next->second, next->first});
    length += next->second;
    next = free_by_offset_.erase(next);
  }
  if (next != free_by_offset_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      free_by_size_.erase({prev->second, prev->first});
      offset = prev->first;
      length += prev->second;
      free_by_offset_.erase(prev);
    }
  }
  free_by_offset_.emplace_hint(next, offset, length);
  free_by_size_.emplace(length, offset);
  stats_.used -= extent.length;
  stats_.free += extent.length;
  return Status::Ok();
}

std::optional<Extent> ExtentAllocator::Allocate(uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<Extent> extent = AllocateLocked(size);
  if (extent) {
    ++stats_.allocations;
  } else {
    ++stats_.failed_allocations;
  }
  return extent;
}

Result<std::vector<Extent>> ExtentAllocator::AllocateBatch(const std::vector<uint64_t>& sizes) {
  std::vector<Extent> extents;
  extents.reserve(sizes.size());  // before the lock: no allocation while holding it
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = 0;
  bool fits = true;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) {
      ++stats_.failed_allocations;
      return Status::InvalidArgument("AllocateBatch: size " + std::to_string(i) + " is zero");
    }
    if (sizes[i] > stats_.free || RoundUp(sizes[i]) > stats_.free - total) {
      fits = false;  // keep scanning: a zero size later is still InvalidArgument
    } else {
      total += RoundUp(sizes[i]);
    }
  }
  if (fits) {
    for (const uint64_t size : sizes) {
      std::optional<Extent> extent = AllocateLocked(size);
      if (!extent) {
        fits = false;
        break;
      }
      extents.push_back(*extent);
    }
  }
  if (!fits) {
    // Roll back in reverse order; coalescing restores exactly the previous free extents.
    for (auto it = extents.rbegin(); it != extents.rend(); ++it) {
      Status st = FreeLocked(*it);
      (void)st;  // cannot fail: each extent was allocated above
    }
    ++stats_.failed_allocations;
    return Status::OutOfMemory(
        "AllocateBatch: " + std::to_string(sizes.size()) + " extents do not fit in " +
        std::to_string(stats_.free) + " free bytes (largest hole " +
        std::to_string(free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first) + ")");
  }
  stats_.allocations += extents.size();
  return extents;
}

Status ExtentAllocator::Free(const Extent& extent) {
  std::lock_guard<std::mutex> lock(mu_);
  Status st = FreeLocked(extent);
  if (st.ok()) ++stats_.frees;
  return st;
}

AllocatorStats ExtentAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  AllocatorStats s = stats_;
  s.capacity = capacity_;
  s.free = capacity_ - s.used;
  s.largest_free = free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
  s.live_extents = live_.size();
  s.free_extents = free_by_offset_.size();
  return s;
}

Status ExtentAllocator::CheckInvariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t mask = alignment_ - 1;

  if (free_by_offset_.size() != free_by_size_.size()) {
    return Status::Internal(
        "free indexes differ in size: " + std::to_string(free_by_offset_.size()) + " by offset, " +
        std::to_string(free_by_size_.size()) + " by size");
  }
  uint64_t free_sum = 0;
  uint64_t prev_free_end = 0;
  bool first = true;
  for (const auto& [offset, length] : free_by_offset_) {
    if (free_by_size_.count({length, offset}) == 0) {
      return Status::Internal("free extent " + ExtentString(offset, length) +
                              " missing from the size index");
    }
    if (!first && offset <= prev_free_end) {
      return Status::Internal("free extent " + ExtentString(offset, length) +
                              " overlaps or touches the previous free extent (not coalesced)");
    }
    first = false;
    prev_free_end = offset + length;
    free_sum += length;
  }

  // Walk free and live extents together in offset order: aligned, non-empty, inside the
  // capacity and non-overlapping.
  uint64_t live_sum = 0;
  uint64_t cursor = 0;
  auto f = free_by_offset_.begin();
  auto l = live_.begin();
  while (f != free_by_offset_.end() || l != live_.end()) {
    const bool take_free = l == live_.end() || (f != free_by_offset_.end() && f->first < l->first);
    const uint64_t offset = take_free ? f->first : l->first;
    const uint64_t length = take_free ? f->second : l->second;
    const char* kind = take_free ? "free" : "live";
    if (length == 0 || (offset & mask) != 0 || (length & mask) != 0) {
      return Status::Internal(std::string(kind) + " extent " + ExtentString(offset, length) +
                              " is empty or unaligned");
    }
    if (offset < cursor) {
      return Status::Internal(std::string(kind) + " extent " + ExtentString(offset, length) +
                              " overlaps the extent ending at " + std::to_string(cursor));
    }
    if (length > capacity_ || offset > capacity_ - length) {
      return Status::Internal(std::string(kind) + " extent " + ExtentString(offset, length) +
                              " exceeds the capacity " + std::to_string(capacity_));
    }
    cursor = offset + length;
    if (take_free) {
      ++f;
    } else {
      live_sum += length;
      ++l;
    }
  }

  if (free_sum + live_sum != capacity_) {
    return Status::Internal("free " + std::to_string(free_sum) + " + live " +
                            std::to_string(live_sum) + " != capacity " + std::to_string(capacity_));
  }
  if (stats_.capacity != capacity_ || stats_.used != live_sum || stats_.free != free_sum) {
    return Status::Internal("stats disagree with the extents: used " + std::to_string(stats_.used) +
                            " vs " + std::to_string(live_sum) + ", free " +
                            std::to_string(stats_.free) + " vs " + std::to_string(free_sum));
  }
  if (stats_.allocations < stats_.frees ||
      stats_.allocations - stats_.frees != static_cast<uint64_t>(live_.size())) {
    return Status::Internal("allocations " + std::to_string(stats_.allocations) + " - frees " +
                            std::to_string(stats_.frees) + " != live extents " +
                            std::to_string(live_.size()));
  }
  return Status::Ok();
}

}  // namespace lmcache_cpp
