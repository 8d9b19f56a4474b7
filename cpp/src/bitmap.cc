// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/bitmap.h"

#include <algorithm>

namespace lmcache_cpp {
namespace {

constexpr size_t kWordBits = 64;
constexpr uint64_t kAllOnes = ~uint64_t{0};

size_t WordsFor(size_t bits) { return (bits + kWordBits - 1) / kWordBits; }

// Index of the lowest set bit. REQUIRES: w != 0.
size_t LowestSetBit(uint64_t w) { return static_cast<size_t>(__builtin_ctzll(w)); }

}  // namespace

Bitmap::Bitmap(size_t size, bool value)
    : size_(size), words_(WordsFor(size), value ? kAllOnes : uint64_t{0}) {
  ClearTail();
}

void Bitmap::ClearTail() noexcept {
  const size_t used = size_ % kWordBits;
  if (used != 0) words_.back() &= (uint64_t{1} << used) - 1;
}

void Bitmap::SetAll() noexcept {
  std::fill(words_.begin(), words_.end(), kAllOnes);
  ClearTail();
}

void Bitmap::ResetAll() noexcept { std::fill(words_.begin(), words_.end(), uint64_t{0}); }

void Bitmap::Resize(size_t size, bool value) {
  const size_t old_size = size_;
  words_.resize(WordsFor(size), value ? kAllOnes : uint64_t{0});
  // New whole words got `value` above; new bits inside the old last word are still clear.
  if (value && size > old_size && old_size % kWordBits != 0) {
    words_[old_size / kWordBits] |= kAllOnes << (old_size % kWordBits);
  }
  size_ = size;
  ClearTail();
}

size_t Bitmap::Popcount() const noexcept {
  size_t n = 0;
  for (uint64_t w : words_) n += static_cast<size_t>(__builtin_popcountll(w));
  return n;
}

size_t Bitmap::LeadingOnes() const noexcept {
  for (size_t i = 0; i < words_.size(); ++i) {
    const uint64_t inverted = ~words_[i];
    if (inverted != 0) {
      // The tail of the last word is clear, so the first zero is never past size_.
      return std::min(i * kWordBits + LowestSetBit(inverted), size_);
    }
  }
  return size_;
}

size_t Bitmap::FindNextSet(size_t from) const noexcept {
  if (from >= size_) return size_;
  size_t i = from / kWordBits;
  uint64_t w = words_[i] & (kAllOnes << (from % kWordBits));
  while (true) {
    if (w != 0) return std::min(i * kWordBits + LowestSetBit(w), size_);
    if (++i == words_.size()) return size_;
    w = words_[i];
  }
}

bool Bitmap::Any() const noexcept {
  for (uint64_t w : words_) {
    if (w != 0) return true;
  }
  return false;
}

void Bitmap::TruncateTo(size_t n) noexcept {
  if (n >= size_) return;
  size_t first_clear_word = n / kWordBits;
  if (n % kWordBits != 0) {
    words_[first_clear_word] &= (uint64_t{1} << (n % kWordBits)) - 1;
    ++first_clear_word;
  }
  std::fill(words_.begin() + static_cast<std::ptrdiff_t>(first_clear_word), words_.end(),
            uint64_t{0});
}

Bitmap& Bitmap::operator&=(const Bitmap& o) noexcept {
  // Shrinking never allocates, so this stays noexcept.
  if (o.size_ < size_) Resize(o.size_);
  for (size_t i = 0; i < words_.size(); ++i) words_[i] &= o.words_[i];
  ClearTail();
  return *this;
}

Bitmap& Bitmap::operator|=(const Bitmap& o) noexcept {
  if (o.size_ < size_) Resize(o.size_);
  for (size_t i = 0; i < words_.size(); ++i) words_[i] |= o.words_[i];
  ClearTail();  // `o` may be longer: drop its bits past our size
  return *this;
}

Bitmap Bitmap::operator~() const {
  Bitmap r = *this;
  for (uint64_t& w : r.words_) w = ~w;
  r.ClearTail();
  return r;
}

bool Bitmap::operator==(const Bitmap& o) const noexcept {
  // Tails are kept clear, so whole-word comparison is exact.
  return size_ == o.size_ && words_ == o.words_;
}

std::string Bitmap::ToString() const {
  std::string s(size_, '0');
  for (size_t i = 0; i < size_; ++i) {
    if (Test(i)) s[i] = '1';
  }
  return s;
}

}  // namespace lmcache_cpp
