// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// FlatMap: an open-addressing hash map (linear probing, tombstones, power-of-two capacity) for
// the object table's hot paths. Unlike std::unordered_map it does not allocate per element, and a
// pointer returned by Find/Insert stays valid until the next Insert (erasing leaves a tombstone,
// it never moves other elements), so a batch can look keys up once and erase through the pointers.
//
// Internal to the core (not installed). K and V must be default-constructible and copyable.
// Thread safety: none; callers synchronise.
#ifndef LMCACHE_CPP_SRC_FLAT_MAP_H_
#define LMCACHE_CPP_SRC_FLAT_MAP_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace lmcache_cpp {
namespace internal {

template <typename K, typename V, typename Hash>
class FlatMap {
 public:
  FlatMap() = default;

  size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

  V* Find(const K& key) {
    size_t i = FindIndex(key);
    return i == kNpos ? nullptr : &values_[i];
  }
  const V* Find(const K& key) const {
    size_t i = FindIndex(key);
    return i == kNpos ? nullptr : &values_[i];
  }

  // Returns the value for `key`, default-constructed if it was absent, and whether it was
  // inserted. Invalidates pointers previously returned.
  std::pair<V*, bool> Insert(const K& key) {
    if (ctrl_.empty() || (used_ + 1) * 8 > ctrl_.size() * 7) Rehash(size_ + 1);
    const size_t mask = ctrl_.size() - 1;
    size_t i = Hash()(key) & mask;
    size_t tomb = kNpos;
    while (true) {
      const uint8_t c = ctrl_[i];
      if (c == kEmpty) break;
      if (c == kFull && keys_[i] == key) return {&values_[i], false};
      if (c == kTomb && tomb == kNpos) tomb = i;
      i = (i + 1) & mask;
    }
    if (tomb != kNpos) {
      i = tomb;  // reuse a tombstone: `used_` is unchanged
    } else {
      ++used_;
    }
    ctrl_[i] = kFull;
    keys_[i] = key;
    values_[i] = V{};
    ++size_;
    return {&values_[i], true};
  }

  // Makes room for `n` elements in total without further rehashing.
  void Reserve(size_t n) {
    if (!ctrl_.empty() && (n + 1) * 2 <= ctrl_.size()) return;
    Rehash(n);
  }

  bool Erase(const K& key) {
    size_t i = FindIndex(key);
    if (i == kNpos) return false;
    EraseIndex(i);
    return true;
  }
  // REQUIRES: `value` came from Find/Insert on this map with no Insert since, and is not erased.
  void EraseValue(const V* value) { EraseIndex(static_cast<size_t>(value - values_.data())); }

  size_t capacity() const noexcept { return ctrl_.size(); }

  // Empties the map and keeps its storage.
  void Reset() {
    std::fill(ctrl_.begin(), ctrl_.end(), kEmpty);
    size_ = used_ = 0;
  }

  void Clear() {
    ctrl_.clear();
    keys_.clear();
    values_.clear();
    size_ = used_ = 0;
  }

  // Calls f(const K&, V&) for every element. `f` must not insert or erase.
  template <typename F>
  void ForEach(F&& f) {
    for (size_t i = 0; i < ctrl_.size(); ++i) {
      if (ctrl_[i] == kFull) f(keys_[i], values_[i]);
    }
  }
  template <typename F>
  void ForEach(F&& f) const {
    for (size_t i = 0; i < ctrl_.size(); ++i) {
      if (ctrl_[i] == kFull) f(keys_[i], values_[i]);
    }
  }

 private:
  static constexpr size_t kNpos = ~size_t{0};
  static constexpr uint8_t kEmpty = 0, kFull = 1, kTomb = 2;

  size_t FindIndex(const K& key) const {
    if (size_ == 0) return kNpos;
    const size_t mask = ctrl_.size() - 1;
    size_t i = Hash()(key) & mask;
    while (true) {
      const uint8_t c = ctrl_[i];
      if (c == kEmpty) return kNpos;
      if (c == kFull && keys_[i] == key) return i;
      i = (i + 1) & mask;
    }
  }

  // The value is left in place (a later Insert into the tombstone resets it), so a caller holding
  // the pointer may still read what it wrote there before erasing.
  void EraseIndex(size_t i) {
    ctrl_[i] = kTomb;
    --size_;
    if (size_ == 0) {
      // Cheap full reset keeps long-lived maps free of tombstone build-up.
      std::fill(ctrl_.begin(), ctrl_.end(), kEmpty);
      used_ = 0;
    }
  }

  // Rebuilds without tombstones, with room for `n` elements at a load of at most one half.
  void Rehash(size_t n) {
    size_t cap = ctrl_.empty() ? 16 : ctrl_.size();
    while ((std::max(n, size_) + 1) * 2 > cap) cap *= 2;
    std::vector<uint8_t> ctrl(cap, kEmpty);
    std::vector<K> keys(cap);
    std::vector<V> values(cap);
    const size_t mask = cap - 1;
    for (size_t j = 0; j < ctrl_.size(); ++j) {
      if (ctrl_[j] != kFull) continue;
      size_t i = Hash()(keys_[j]) & mask;
      while (ctrl[i] != kEmpty) i = (i + 1) & mask;
      ctrl[i] = kFull;
      keys[i] = std::move(keys_[j]);
      values[i] = std::move(values_[j]);
    }
    ctrl_.swap(ctrl);
    keys_.swap(keys);
    values_.swap(values);
    used_ = size_;
  }

  std::vector<uint8_t> ctrl_;
  std::vector<K> keys_;
  std::vector<V> values_;
  size_t size_ = 0;  // full slots
  size_t used_ = 0;  // full + tombstone slots
};

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_FLAT_MAP_H_
