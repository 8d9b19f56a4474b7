// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/eviction_policy.h"

#include <vector>

namespace lmcache_cpp {
namespace {

constexpr SlotId kNil = ~SlotId{0};

// Doubly-linked list threaded through arrays indexed by slot id. head_ = most recent.
class LruPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }

  void Insert(SlotId slot) override {
    Grow(slot);
    in_[slot] = 1;
    PushFront(slot);
    ++size_;
  }
  void Remove(SlotId slot) override {
    Unlink(slot);
    in_[slot] = 0;
    --size_;
  }
  void Touch(SlotId slot) override {
    if (head_ == slot) return;
    Unlink(slot);
    PushFront(slot);
  }
  std::optional<SlotId> Victim() const override {
    if (tail_ == kNil) return std::nullopt;
    return tail_;
  }
  bool Contains(SlotId slot) const override { return slot < in_.size() && in_[slot] != 0; }
  size_t size() const override { return size_; }

 private:
  void Grow(SlotId slot) {
    if (slot >= in_.size()) {
      size_t n = std::max<size_t>(static_cast<size_t>(slot) + 1, in_.size() * 2);
      in_.resize(n, 0);
      prev_.resize(n, kNil);
      next_.resize(n, kNil);
    }
  }
  void PushFront(SlotId s) {
    prev_[s] = kNil;
    next_[s] = head_;
    if (head_ != kNil) prev_[head_] = s;
    head_ = s;
    if (tail_ == kNil) tail_ = s;
  }
  void Unlink(SlotId s) {
    SlotId p = prev_[s], n = next_[s];
    if (p != kNil) next_[p] = n; else head_ = n;
    if (n != kNil) prev_[n] = p; else tail_ = p;
    prev_[s] = next_[s] = kNil;
  }

  std::vector<uint8_t> in_;
  std::vector<SlotId> prev_, next_;
  SlotId head_ = kNil, tail_ = kNil;
  size_t size_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> NewLruPolicy() { return std::make_unique<LruPolicy>(); }

Result<std::unique_ptr<EvictionPolicy>> NewEvictionPolicy(const std::string& name) {
  if (name == "lru") return NewLruPolicy();
  return Status::InvalidArgument("unknown eviction policy '" + name + "' (known: lru)");
}

}  // namespace lmcache_cpp
