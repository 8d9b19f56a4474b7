// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// EvictionPolicy: chooses which evictable L1 object goes first when memory is needed.
//
// The object table keeps every evictable object (ready, unleased, permanent) in the policy.
// Leasing an object costs no policy operation: a leased object may stay in the policy, and when
// Victim() returns one, the table removes it and asks again (it is re-inserted, as most recent,
// when its last lease is released). Each leased object is dropped at most once per lease, so the
// scan is amortised O(1). Objects are identified by the table's dense slot ids.
//
// Prefix chains die from the tail: the table inserts and touches the keys of one request in
// reverse chunk order (last chunk first), so chunk 0 of a chain ends up the most recently used and
// an LRU policy evicts the chain's tail before its head. See docs/design/l1.md.
//
// Thread safety: none; the object table calls a policy only under its own mutex.
//
// Stability: unstable (a building block of the object table; not installed).
#ifndef LMCACHE_CPP_EVICTION_POLICY_H_
#define LMCACHE_CPP_EVICTION_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

using SlotId = uint32_t;

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // `slot` became evictable; it is now the most recently used. REQUIRES: !Contains(slot).
  virtual void Insert(SlotId slot) = 0;
  // `slot` stops being evictable. REQUIRES: Contains(slot).
  virtual void Remove(SlotId slot) = 0;
  // An evictable object was used without being leased. REQUIRES: Contains(slot).
  virtual void Touch(SlotId slot) = 0;
  // The slot to evict next (not removed), or nullopt when nothing is evictable.
  virtual std::optional<SlotId> Victim() const = 0;
  virtual bool Contains(SlotId slot) const = 0;
  virtual size_t size() const = 0;
};

// Least recently used first. O(1) per operation (intrusive list indexed by slot).
std::unique_ptr<EvictionPolicy> NewLruPolicy();

// By name: "lru". InvalidArgument for an unknown name.
Result<std::unique_ptr<EvictionPolicy>> NewEvictionPolicy(const std::string& name);

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_EVICTION_POLICY_H_
