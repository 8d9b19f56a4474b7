// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bitmap: a fixed-length bit set with the prefix operations lookups need (how many leading keys
// are present, which keys every tier has, how many are set).
//
// Thread safety: a value type; not synchronised.
//
// Stability: stable (L2 adapter callbacks and SyncL2Adapter results use it).
#ifndef LMCACHE_CPP_BITMAP_H_
#define LMCACHE_CPP_BITMAP_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lmcache_cpp {

class Bitmap {
 public:
  Bitmap() = default;
  // `size` bits, all set to `value`.
  explicit Bitmap(size_t size, bool value = false);

  size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  // REQUIRES: i < size(). Unchecked in release builds.
  bool Test(size_t i) const noexcept { return (words_[i >> 6] >> (i & 63)) & 1u; }
  void Set(size_t i) noexcept { words_[i >> 6] |= (uint64_t{1} << (i & 63)); }
  void Reset(size_t i) noexcept { words_[i >> 6] &= ~(uint64_t{1} << (i & 63)); }
  void Assign(size_t i, bool v) noexcept { v ? Set(i) : Reset(i); }

  void SetAll() noexcept;
  void ResetAll() noexcept;
  // Grows or shrinks; new bits are `value`.
  void Resize(size_t size, bool value = false);

  // Number of set bits.
  size_t Popcount() const noexcept;
  // Length of the run of set bits starting at bit 0 (the present prefix).
  size_t LeadingOnes() const noexcept;
  // Index of the first clear bit, or size() if all are set. Same as LeadingOnes().
  size_t FindFirstZero() const noexcept { return LeadingOnes(); }
  // Index of the first set bit at or after `from`, or size() if none.
  size_t FindNextSet(size_t from) const noexcept;
  bool All() const noexcept { return LeadingOnes() == size_; }
  bool Any() const noexcept;
  bool None() const noexcept { return !Any(); }

  // Clears every bit at index >= n (keeps the first n). REQUIRES: n <= size().
  void TruncateTo(size_t n) noexcept;

  // Element-wise; sizes must match, else the result has the smaller size.
  Bitmap& operator&=(const Bitmap& o) noexcept;
  Bitmap& operator|=(const Bitmap& o) noexcept;
  friend Bitmap operator&(Bitmap a, const Bitmap& b) { return a &= b; }
  friend Bitmap operator|(Bitmap a, const Bitmap& b) { return a |= b; }
  // Flips every bit.
  Bitmap operator~() const;

  bool operator==(const Bitmap& o) const noexcept;
  bool operator!=(const Bitmap& o) const noexcept { return !(*this == o); }

  // "1101..." with bit 0 first.
  std::string ToString() const;

 private:
  void ClearTail() noexcept;  // keeps bits >= size_ zero in the last word

  size_t size_ = 0;
  std::vector<uint64_t> words_;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_BITMAP_H_
