// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/eviction_policy.h"

#include <algorithm>
#include <vector>

namespace lmcache_cpp {
namespace {

constexpr SlotId kNil = ~SlotId{0};

// Doubly-linked list threaded through one array of nodes indexed by slot id (prev, next and the
// membership flag share a cache line). head_ = most recent.
class LruPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }

  void Insert(SlotId slot) override {
    Grow(slot);
    nodes_[slot].in = 1;
    PushFront(slot);
    ++size_;
  }
  void Remove(SlotId slot) override {
    Unlink(slot);
    nodes_[slot].in = 0;
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
  bool Contains(SlotId slot) const override { return slot < nodes_.size() && nodes_[slot].in != 0; }
  size_t size() const override { return size_; }

 private:
  struct Node {
    SlotId prev = kNil;
    SlotId next = kNil;
    uint32_t in = 0;
  };
  void Grow(SlotId slot) {
    if (slot >= nodes_.size()) {
      nodes_.resize(std::max<size_t>(static_cast<size_t>(slot) + 1, nodes_.size() * 2));
    }
  }
  void PushFront(SlotId s) {
    nodes_[s].prev = kNil;
    nodes_[s].next = head_;
    if (head_ != kNil) nodes_[head_].prev = s;
    head_ = s;
    if (tail_ == kNil) tail_ = s;
  }
  void Unlink(SlotId s) {
    const SlotId p = nodes_[s].prev, n = nodes_[s].next;
    if (p != kNil) {
      nodes_[p].next = n;
    } else {
      head_ = n;
    }
    if (n != kNil) {
      nodes_[n].prev = p;
    } else {
      tail_ = p;
    }
    nodes_[s].prev = nodes_[s].next = kNil;
  }

  std::vector<Node> nodes_;
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
