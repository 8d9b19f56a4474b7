// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/object_table.h"

#include <algorithm>
#include <string>
#include <unordered_set>
#include <utility>

#include "flat_map.h"
#include "lmcache_cpp/logging.h"

namespace lmcache_cpp {
namespace {

std::string KeyMsg(const char* what, const ObjectKey& key) {
  return std::string(what) + " (" + key.ToShortString() + ")";
}

// Marks a lease entry already erased within one batch (a key repeated in the batch).
constexpr SlotId kErasedSlot = ~SlotId{0};

// Per-thread scratch space for batch operations, so the hot paths do not allocate.
std::vector<SlotId>& ScratchSlots() {
  thread_local std::vector<SlotId> v;
  v.clear();
  return v;
}

}  // namespace

ObjectTable::Ledger::Ledger() = default;
ObjectTable::Ledger::~Ledger() = default;
ObjectTable::Ledger::Ledger(Ledger&&) noexcept = default;

Result<std::unique_ptr<ObjectTable>> ObjectTable::Create(std::shared_ptr<Arena> arena,
                                                         ObjectTableOptions options) {
  if (!arena) return Status::InvalidArgument("ObjectTable needs an arena");
  if (!(options.low_watermark > 0.0 && options.low_watermark <= options.high_watermark &&
        options.high_watermark <= 1.0)) {
    return Status::InvalidArgument("watermarks must satisfy 0 < low <= high <= 1");
  }
  if (options.read_lease_ttl <= Duration::zero() || options.write_lease_ttl <= Duration::zero() ||
      options.reap_interval <= Duration::zero()) {
    return Status::InvalidArgument("lease TTLs and the reap interval must be positive");
  }
  if (options.alignment < 8 || (options.alignment & (options.alignment - 1)) != 0) {
    return Status::InvalidArgument("alignment must be a power of two >= 8");
  }
  if (arena->size() < options.alignment) {
    return Status::InvalidArgument("arena is smaller than one allocation unit");
  }
  if (options.max_leases_per_object == 0 || options.max_leases_per_object > (uint32_t{1} << 31)) {
    return Status::InvalidArgument("max_leases_per_object must be in [1, 2^31]");
  }
  LMCACHE_ASSIGN_OR_RETURN(auto policy, NewEvictionPolicy(options.eviction_policy));
  if (!options.clock) options.clock = SteadyClock::Default();
  return std::unique_ptr<ObjectTable>(
      new ObjectTable(std::move(arena), std::move(options), std::move(policy)));
}

ObjectTable::ObjectTable(std::shared_ptr<Arena> arena, ObjectTableOptions options,
                         std::unique_ptr<EvictionPolicy> policy)
    : arena_(std::move(arena)),
      options_(std::move(options)),
      clock_(options_.clock),
      allocator_(arena_->size(), options_.alignment),
      policy_(std::move(policy)),
      index_(std::make_unique<IndexMap>()) {}

ObjectTable::~ObjectTable() { Stop(); }

// ------------------------------------------------------------------------------------------
// Slot and lease helpers (REQUIRE mu_).

SlotId ObjectTable::NewSlotLocked() {
  if (!free_slots_.empty()) {
    SlotId s = free_slots_.back();
    free_slots_.pop_back();
    return s;
  }
  slots_.emplace_back();
  return static_cast<SlotId>(slots_.size() - 1);
}

bool ObjectTable::IsEvictable(const Slot& slot) {
  return slot.in_use && slot.state == ObjectState::kReady && slot.readers == 0 && !slot.temporary &&
         !slot.detached;
}

void ObjectTable::BecameEvictableLocked(SlotId s) {
  evictable_bytes_ += slots_[s].extent.length;
  ++evictable_count_;
  // Made recent: moved to the front, or (re-)inserted if eviction dropped it while leased.
  if (policy_->Contains(s)) {
    policy_->Touch(s);
  } else {
    policy_->Insert(s);
  }
}

void ObjectTable::FreeSlotLocked(SlotId s, RemovalReason reason, Events* ev) {
  Slot& slot = slots_[s];
  if (IsEvictable(slot)) {
    evictable_bytes_ -= slot.extent.length;
    --evictable_count_;
  }
  if (policy_->Contains(s)) policy_->Remove(s);
  if (!slot.detached && !slot.quarantined) {
    const SlotId* cur = index_->Find(slot.key);
    if (cur != nullptr && *cur == s) index_->EraseValue(cur);
    // A detached or quarantined slot was announced as removed when it left the index.
    ev->removed.emplace_back(slot.key, reason);
  }
  Status st = allocator_.Free(slot.extent);
  if (!st.ok()) Log(LogLevel::kError, "ObjectTable: freeing an extent failed: " + st.ToString());
  slot = Slot{};
  free_slots_.push_back(s);
}

uint64_t ObjectTable::EvictOneLocked(Events* ev) {
  while (true) {
    std::optional<SlotId> victim = policy_->Victim();
    if (!victim) return 0;
    if (slots_[*victim].readers > 0) {
      // Leased objects stay in the policy while leased (so leasing costs no list operation);
      // eviction drops them when it meets them, and their last release puts them back.
      policy_->Remove(*victim);
      continue;
    }
    const uint64_t bytes = slots_[*victim].extent.length;
    counters_.evictions++;
    counters_.evicted_bytes += bytes;
    FreeSlotLocked(*victim, RemovalReason::kEvicted, ev);
    return bytes;
  }
}

void ObjectTable::QuarantineLocked(SlotId s, Events* ev) {
  Slot& slot = slots_[s];
  if (policy_->Contains(s)) policy_->Remove(s);
  if (!slot.detached) {
    const SlotId* cur = index_->Find(slot.key);
    if (cur != nullptr && *cur == s) index_->EraseValue(cur);
    ev->removed.emplace_back(slot.key, RemovalReason::kAborted);
  }
  slot.quarantined = true;
  quarantine_[slot.writer].push_back(s);
  counters_.quarantined++;
  counters_.quarantined_bytes += slot.extent.length;
}

bool ObjectTable::UnderLeaseCapLocked(SlotId s, uint32_t count) {
  if (count <= options_.max_leases_per_object &&
      slots_[s].readers <= options_.max_leases_per_object - count) {
    return true;
  }
  counters_.lease_cap_refusals++;
  return false;
}

ObjectInfo ObjectTable::InfoLocked(SlotId s) const {
  const Slot& slot = slots_[s];
  ObjectInfo info;
  info.key = slot.key;
  info.state = slot.state;
  info.offset = slot.extent.offset;
  info.size = slot.size;
  info.readers = slot.readers;
  info.temporary = slot.temporary;
  info.detached = slot.detached;
  info.generation = slot.generation;
  info.has_crc32c = slot.has_crc;
  info.crc32c = slot.crc;
  return info;
}

void ObjectTable::ReturnReadsLocked(SlotId s, uint32_t n, Events* ev) {
  Slot& slot = slots_[s];
  slot.readers -= n;
  if (slot.readers != 0) return;
  if (slot.temporary || slot.detached) {
    FreeSlotLocked(s, slot.temporary ? RemovalReason::kTemporaryFreed : RemovalReason::kCleared,
                   ev);
  } else {
    BecameEvictableLocked(s);
  }
}

ObjectTable::Ledger* ObjectTable::LedgerLocked(const LeaseOwner& owner) {
  auto [it, inserted] = ledgers_.try_emplace(owner.request);
  if (inserted) {
    it->second.client = owner.client;
    if (!spare_lease_maps_.empty()) {
      it->second.entries = std::move(spare_lease_maps_.back());
      spare_lease_maps_.pop_back();
    } else {
      it->second.entries = std::make_unique<LeaseMap>();
    }
  }
  return &it->second;
}

ObjectTable::LedgerMap::iterator ObjectTable::EraseLedgerLocked(LedgerMap::iterator it) {
  // Keep a few emptied lease maps: a new request then reuses one instead of allocating and
  // zero-filling a table. Maps that grew large are not kept.
  constexpr size_t kMaxSpareMaps = 64;
  constexpr size_t kMaxSpareMapCapacity = 4096;
  std::unique_ptr<LeaseMap>& m = it->second.entries;
  if (spare_lease_maps_.size() < kMaxSpareMaps && m->capacity() <= kMaxSpareMapCapacity) {
    m->Reset();
    spare_lease_maps_.push_back(std::move(m));
  }
  return ledgers_.erase(it);
}

bool ObjectTable::GrantReadLocked(Ledger* ledger, const ObjectKey& key, SlotId s, uint32_t count,
                                  TimePoint now) {
  auto [entry, inserted] = ledger->entries->Insert(key);
  LeaseEntry& e = *entry;
  // The request still holds a lease on a detached (force-cleared) generation of this key.
  if (!inserted && e.slot != s) return false;
  if (!UnderLeaseCapLocked(s, count)) {
    if (inserted) ledger->entries->EraseValue(&e);
    return false;
  }
  Slot& slot = slots_[s];
  if (IsEvictable(slot)) {
    evictable_bytes_ -= slot.extent.length;
    --evictable_count_;
  }
  slot.readers += count;
  if (inserted) {
    e.slot = s;
    e.seq = ledger->next_seq++;
    e.generation = slot.generation;
    e.reads = 0;
    e.write = false;
  }
  e.reads += count;
  e.expiry = std::max(e.expiry, now + options_.read_lease_ttl);
  return true;
}

void ObjectTable::DropLedgerEntryLocked(const LeaseEntry& e, Events* ev) {
  if (e.write) {
    // The write lease expired or was dropped with its request, not by the writer: the object
    // never becomes readable, and its extent stays out of the allocator while the writer may
    // still be writing into it.
    QuarantineLocked(e.slot, ev);
  } else if (e.reads > 0) {
    ReturnReadsLocked(e.slot, e.reads, ev);
  }
}

size_t ObjectTable::DropEntriesLocked(Ledger* ledger, bool only_expired, TimePoint now, Events* ev,
                                      uint64_t* leases) {
  // Drop in reverse acquisition order so the head of a prefix chain ends up most recently used.
  std::vector<std::pair<uint64_t, ObjectKey>> order;
  order.reserve(ledger->entries->size());
  ledger->entries->ForEach([&](const ObjectKey& key, const LeaseEntry& e) {
    if (!only_expired || e.expiry <= now) order.emplace_back(e.seq, key);
  });
  std::sort(order.begin(), order.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [seq, key] : order) {
    LeaseEntry* found = ledger->entries->Find(key);
    LeaseEntry e = *found;
    ledger->entries->EraseValue(found);
    if (leases != nullptr) *leases += e.reads + (e.write ? 1 : 0);
    DropLedgerEntryLocked(e, ev);
  }
  return order.size();
}

// ------------------------------------------------------------------------------------------
// Writing.

Result<std::vector<Reservation>> ObjectTable::ReserveWrite(const LeaseOwner& owner,
                                                           const std::vector<ObjectKey>& keys,
                                                           uint64_t object_size,
                                                           const ReserveOptions& options) {
  if (object_size == 0) return Status::InvalidArgument("object_size must be > 0");
  std::vector<Reservation> out(keys.size());
  if (keys.empty()) return out;
  const uint64_t unit = allocator_.RoundUp(object_size);
  if (unit > allocator_.capacity()) {
    return Status::OutOfMemory("object of " + std::to_string(object_size) +
                               " bytes is larger than the arena");
  }

  Events ev;
  Status result;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto ledger_it = ledgers_.find(owner.request);
    // Pass 1: classify. Existing keys are skipped (or fail in strict mode); repeated keys in the
    // batch are reserved once. Skipped evictable objects are pinned against eviction for the
    // rest of this call so a skip never reports an object that this very call evicted.
    std::vector<size_t> fresh;
    std::vector<SlotId> pinned;
    uint64_t pinned_bytes = 0;
    std::unordered_set<ObjectKey, ObjectKeyHash> seen;
    seen.reserve(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      const ObjectKey& key = keys[i];
      out[i].key = key;
      out[i].size = object_size;
      const SlotId* existing = index_->Find(key);
      if (existing != nullptr) {
        if (options.mode == ReserveMode::kStrict) {
          result = Status::NotWritable(KeyMsg("object exists", key));
          break;
        }
        out[i].skipped = true;
        if (IsEvictable(slots_[*existing]) && policy_->Contains(*existing)) {
          policy_->Remove(*existing);
          pinned.push_back(*existing);
          pinned_bytes += slots_[*existing].extent.length;
        }
        continue;
      }
      if (!seen.insert(key).second) {
        out[i].skipped = true;
        continue;
      }
      if (ledger_it != ledgers_.end() && ledger_it->second.entries->Find(key) != nullptr) {
        result = Status::NotReadable(
            KeyMsg("request still holds a lease on a cleared generation of", key));
        break;
      }
      fresh.push_back(i);
    }

    // Pass 2: allocate everything or nothing, evicting synchronously when needed.
    std::vector<Extent> extents;
    if (result.ok() && !fresh.empty()) {
      const uint64_t need = unit * fresh.size();
      AllocatorStats a = allocator_.stats();
      if (a.free + evictable_bytes_ - pinned_bytes < need) {
        result =
            Status::OutOfMemory("L1 cannot hold " + std::to_string(fresh.size()) + " objects of " +
                                std::to_string(object_size) + " bytes: " + std::to_string(a.free) +
                                " bytes free, " + std::to_string(evictable_bytes_ - pinned_bytes) +
                                " evictable of " + std::to_string(a.capacity));
      } else {
        extents.reserve(fresh.size());
        while (extents.size() < fresh.size()) {
          std::optional<Extent> e = allocator_.Allocate(object_size);
          if (e) {
            extents.push_back(*e);
          } else if (EvictOneLocked(&ev) == 0) {
            break;
          }
        }
        if (extents.size() < fresh.size()) {
          for (const Extent& e : extents) (void)allocator_.Free(e);
          extents.clear();
          result = Status::OutOfMemory("L1 is too fragmented to hold the batch after eviction");
        }
      }
    }
    if (!result.ok() && result.code() == StatusCode::kOutOfMemory) counters_.reserve_failures++;

    // Pass 3: publish the reservations with write leases.
    if (result.ok() && !fresh.empty()) {
      const TimePoint now = clock_->Now();
      Ledger* ledger = LedgerLocked(owner);
      for (size_t j = 0; j < fresh.size(); ++j) {
        const size_t i = fresh[j];
        SlotId s = NewSlotLocked();
        Slot& slot = slots_[s];
        slot.key = keys[i];
        slot.extent = extents[j];
        slot.size = object_size;
        slot.state = ObjectState::kWriting;
        slot.in_use = true;
        slot.temporary = options.temporary;
        slot.writer = owner.request;
        slot.generation = next_generation_++;
        *index_->Insert(keys[i]).first = s;
        LeaseEntry& e = *ledger->entries->Insert(keys[i]).first;
        e.slot = s;
        e.write = true;
        e.reads = 0;
        e.seq = ledger->next_seq++;
        e.generation = slot.generation;
        e.expiry = now + options_.write_lease_ttl;
        out[i].offset = extents[j].offset;
      }
      if (options_.high_watermark < 1.0 &&
          static_cast<double>(allocator_.stats().used) >
              options_.high_watermark * static_cast<double>(allocator_.capacity())) {
        ev.wake_maintenance = true;
      }
    }
    // Un-pin skipped objects; a store of an existing object counts as a use (reverse order keeps
    // chunk 0 most recent).
    for (auto it = pinned.rbegin(); it != pinned.rend(); ++it) policy_->Insert(*it);
  }
  Dispatch(&ev);
  if (!result.ok()) return result;
  return out;
}

Status ObjectTable::ValidateWriteLocked(RequestId request, const std::vector<ObjectKey>& keys,
                                        std::vector<SlotId>* slots) const {
  auto lit = ledgers_.find(request);
  for (const ObjectKey& key : keys) {
    const LeaseEntry* e = nullptr;
    if (lit != ledgers_.end()) {
      e = lit->second.entries->Find(key);
    }
    if (e == nullptr || !e->write) {
      const SlotId* cur = index_->Find(key);
      if (cur == nullptr) return Status::KeyAbsent(KeyMsg("no such object", key));
      if (slots_[*cur].state != ObjectState::kWriting) {
        return Status::WrongState(KeyMsg("object is not being written", key));
      }
      return Status::LeaseNotHeld(KeyMsg("request does not hold the write lease", key));
    }
    slots->push_back(e->slot);
  }
  return Status::Ok();
}

Status ObjectTable::FinishWrite(RequestId request, const std::vector<ObjectKey>& keys,
                                uint32_t read_leases, const uint32_t* crc32c) {
  return FinishWriteImpl(request, keys, read_leases, nullptr, crc32c);
}

Status ObjectTable::FinishWriteFor(RequestId writer, const std::vector<ObjectKey>& keys,
                                   const LeaseOwner& reader, uint32_t read_leases) {
  return FinishWriteImpl(writer, keys, read_leases, reader.request == writer ? nullptr : &reader,
                         nullptr);
}

Status ObjectTable::FinishWriteImpl(RequestId request, const std::vector<ObjectKey>& keys,
                                    uint32_t read_leases, const LeaseOwner* reader,
                                    const uint32_t* crc32c) {
  if (keys.empty()) return Status::Ok();
  if (read_leases > options_.max_leases_per_object) {
    return Status::InvalidArgument("read_leases " + std::to_string(read_leases) +
                                   " is above the lease cap");
  }
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<SlotId>& slots = ScratchSlots();
    LMCACHE_RETURN_IF_ERROR(ValidateWriteLocked(request, keys, &slots));
    Ledger* reader_ledger = nullptr;
    if (reader != nullptr && read_leases > 0) {
      auto rit = ledgers_.find(reader->request);
      if (rit != ledgers_.end()) {
        for (size_t k = 0; k < keys.size(); ++k) {
          const LeaseEntry* e = rit->second.entries->Find(keys[k]);
          if (e != nullptr && e->slot != slots[k]) {
            return Status::NotReadable(
                KeyMsg("reader still holds a lease on a cleared generation of", keys[k]));
          }
        }
      }
      reader_ledger = LedgerLocked(*reader);
      reader_ledger->entries->Reserve(reader_ledger->entries->size() + keys.size());
    }
    const TimePoint now = clock_->Now();
    Ledger& ledger = ledgers_.find(request)->second;
    // Reverse order: chunk 0 is inserted into the eviction policy last (most recently used).
    for (size_t k = keys.size(); k-- > 0;) {
      const SlotId s = slots[k];
      Slot& slot = slots_[s];
      // A repeated key in the batch: already published (or already freed, if temporary).
      if (!slot.in_use || slot.state == ObjectState::kReady || slot.writer != request) continue;
      slot.state = ObjectState::kReady;
      slot.writer = 0;
      if (crc32c != nullptr) {
        slot.has_crc = true;
        slot.crc = crc32c[k];
      }
      LeaseEntry* e = ledger.entries->Find(keys[k]);
      if (read_leases > 0 && reader_ledger == nullptr) {
        e->write = false;
        e->reads = read_leases;
        e->expiry = now + options_.read_lease_ttl;
        slot.readers = read_leases;
      } else {
        ledger.entries->EraseValue(e);
        if (reader_ledger != nullptr) {
          auto [re, inserted] = reader_ledger->entries->Insert(keys[k]);
          if (inserted) {
            re->slot = s;
            re->seq = reader_ledger->next_seq++;
            re->generation = slot.generation;
          }
          re->reads += read_leases;
          re->expiry = std::max(re->expiry, now + options_.read_lease_ttl);
          slot.readers = read_leases;
        }
      }
      if (!slot.temporary && !slot.detached) ev.ready.push_back(slot.key);
      if (slot.readers == 0 && (slot.temporary || slot.detached)) {
        FreeSlotLocked(s, slot.temporary ? RemovalReason::kTemporaryFreed : RemovalReason::kCleared,
                       &ev);
      } else if (IsEvictable(slot)) {
        BecameEvictableLocked(s);
      }
    }
    std::reverse(ev.ready.begin(), ev.ready.end());
    if (ledger.entries->empty()) EraseLedgerLocked(ledgers_.find(request));
  }
  Dispatch(&ev);
  return Status::Ok();
}

Status ObjectTable::AbortWrite(RequestId request, const std::vector<ObjectKey>& keys) {
  if (keys.empty()) return Status::Ok();
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<SlotId>& slots = ScratchSlots();
    LMCACHE_RETURN_IF_ERROR(ValidateWriteLocked(request, keys, &slots));
    Ledger& ledger = ledgers_.find(request)->second;
    for (size_t k = 0; k < keys.size(); ++k) {
      if (!ledger.entries->Erase(keys[k])) continue;  // repeated key in the batch
      FreeSlotLocked(slots[k], RemovalReason::kAborted, &ev);
    }
    if (ledger.entries->empty()) EraseLedgerLocked(ledgers_.find(request));
  }
  Dispatch(&ev);
  return Status::Ok();
}

size_t ObjectTable::ReleaseQuarantine(RequestId request) {
  Events ev;
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = quarantine_.find(request);
    if (it == quarantine_.end()) return 0;
    for (SlotId s : it->second) {
      counters_.quarantined--;
      counters_.quarantined_bytes -= slots_[s].extent.length;
      FreeSlotLocked(s, RemovalReason::kAborted, &ev);
      ++n;
    }
    quarantine_.erase(it);
  }
  Dispatch(&ev);
  return n;
}

// ------------------------------------------------------------------------------------------
// Reading.

Status ObjectTable::AcquireRead(const LeaseOwner& owner, const std::vector<ObjectKey>& keys,
                                uint32_t count) {
  if (count == 0) return Status::InvalidArgument("lease count must be >= 1");
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<SlotId>& slots = ScratchSlots();
  auto lit = ledgers_.find(owner.request);
  for (const ObjectKey& key : keys) {
    const SlotId* cur = index_->Find(key);
    if (cur == nullptr) return Status::KeyAbsent(KeyMsg("no such object", key));
    if (slots_[*cur].state != ObjectState::kReady) {
      return Status::NotReadable(KeyMsg("object is still being written", key));
    }
    if (lit != ledgers_.end()) {
      const LeaseEntry* e = lit->second.entries->Find(key);
      if (e != nullptr && e->slot != *cur) {
        return Status::NotReadable(
            KeyMsg("request still holds a lease on a cleared generation of", key));
      }
    }
    // Counted against the cap together with the batch's earlier grants on the same object.
    uint64_t batch = count;
    for (SlotId earlier : slots) batch += earlier == *cur ? count : 0;
    if (batch > options_.max_leases_per_object ||
        slots_[*cur].readers > options_.max_leases_per_object - batch) {
      counters_.lease_cap_refusals++;
      return Status::ResourceExhausted(
          KeyMsg(("object holds " + std::to_string(slots_[*cur].readers) +
                  " read leases; the cap is " + std::to_string(options_.max_leases_per_object))
                     .c_str(),
                 key));
    }
    slots.push_back(*cur);
  }
  if (keys.empty()) return Status::Ok();
  const TimePoint now = clock_->Now();
  Ledger* ledger = LedgerLocked(owner);
  ledger->entries->Reserve(ledger->entries->size() + keys.size());
  // Validated above: every grant succeeds.
  for (size_t k = 0; k < keys.size(); ++k)
    (void)GrantReadLocked(ledger, keys[k], slots[k], count, now);
  return Status::Ok();
}

Bitmap ObjectTable::AcquireReadAvailable(const LeaseOwner& owner,
                                         const std::vector<ObjectKey>& keys, uint32_t count) {
  Bitmap leased(keys.size());
  if (count == 0 || keys.empty()) return leased;
  std::lock_guard<std::mutex> lock(mu_);
  const TimePoint now = clock_->Now();
  Ledger* ledger = nullptr;
  for (size_t k = 0; k < keys.size(); ++k) {
    const SlotId* cur = index_->Find(keys[k]);
    if (cur == nullptr || slots_[*cur].state != ObjectState::kReady) continue;
    if (ledger == nullptr) {
      ledger = LedgerLocked(owner);
      ledger->entries->Reserve(ledger->entries->size() + keys.size());
    }
    if (GrantReadLocked(ledger, keys[k], *cur, count, now)) leased.Set(k);
  }
  if (ledger != nullptr && ledger->entries->empty()) {
    EraseLedgerLocked(ledgers_.find(owner.request));
  }
  return leased;
}

size_t ObjectTable::AcquireReadPrefix(const LeaseOwner& owner, const std::vector<ObjectKey>& keys,
                                      uint32_t count) {
  if (count == 0 || keys.empty()) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  const TimePoint now = clock_->Now();
  Ledger* ledger = nullptr;
  size_t n = 0;
  for (; n < keys.size(); ++n) {
    const SlotId* cur = index_->Find(keys[n]);
    if (cur == nullptr || slots_[*cur].state != ObjectState::kReady) break;
    if (ledger == nullptr) {
      ledger = LedgerLocked(owner);
      ledger->entries->Reserve(ledger->entries->size() + keys.size());
    }
    if (!GrantReadLocked(ledger, keys[n], *cur, count, now)) break;
  }
  if (ledger != nullptr && ledger->entries->empty())
    EraseLedgerLocked(ledgers_.find(owner.request));
  return n;
}

Status ObjectTable::ReleaseRead(RequestId request, const std::vector<ObjectKey>& keys,
                                uint32_t count, const uint64_t* generations) {
  if (count == 0) return Status::InvalidArgument("lease count must be >= 1");
  if (keys.empty()) return Status::Ok();
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto lit = ledgers_.find(request);
    if (lit == ledgers_.end()) {
      return Status::LeaseNotHeld(KeyMsg("request holds no leases", keys[0]));
    }
    Ledger& ledger = lit->second;
    // Pass 1: take the counts out of the ledger tentatively; undo everything on a shortfall.
    // Entry pointers stay valid: nothing is inserted until the call ends.
    thread_local std::vector<LeaseEntry*> entries;
    entries.clear();
    for (size_t k = 0; k < keys.size(); ++k) {
      LeaseEntry* e = ledger.entries->Find(keys[k]);
      if (e == nullptr || e->reads < count) {
        for (LeaseEntry* taken : entries) taken->reads += count;
        return Status::LeaseNotHeld(KeyMsg("request does not hold the read lease", keys[k]));
      }
      if (generations != nullptr && e->generation != generations[k]) {
        for (LeaseEntry* taken : entries) taken->reads += count;
        return Status::LeaseNotHeld(
            KeyMsg("the request's lease is on another generation of the object (it was released "
                   "and leased again)",
                   keys[k]));
      }
      e->reads -= count;
      entries.push_back(e);
    }
    // Pass 2: return the leases to the objects, last chunk first. A key repeated in the batch
    // shares one entry, so entries are erased only after every object got its leases back.
    for (size_t k = keys.size(); k-- > 0;) ReturnReadsLocked(entries[k]->slot, count, &ev);
    for (LeaseEntry* e : entries) {
      if (e->reads == 0 && !e->write && e->slot != kErasedSlot) {
        e->slot = kErasedSlot;
        ledger.entries->EraseValue(e);
      }
    }
    if (ledger.entries->empty()) EraseLedgerLocked(lit);
  }
  Dispatch(&ev);
  return Status::Ok();
}

uint64_t ObjectTable::ReleaseReadUpTo(RequestId request, const std::vector<ObjectKey>& keys,
                                      uint32_t count) {
  if (count == 0 || keys.empty()) return 0;
  Events ev;
  uint64_t released = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto lit = ledgers_.find(request);
    if (lit == ledgers_.end()) return 0;
    Ledger& ledger = lit->second;
    // Last chunk first, so the head of a prefix chain ends up most recently used.
    for (size_t k = keys.size(); k-- > 0;) {
      LeaseEntry* e = ledger.entries->Find(keys[k]);
      if (e == nullptr || e->reads == 0) continue;
      const uint32_t n = std::min(count, e->reads);
      e->reads -= n;
      released += n;
      const SlotId s = e->slot;
      if (e->reads == 0 && !e->write) ledger.entries->EraseValue(e);
      ReturnReadsLocked(s, n, &ev);
    }
    if (ledger.entries->empty()) EraseLedgerLocked(lit);
  }
  Dispatch(&ev);
  return released;
}

Bitmap ObjectTable::Contains(const std::vector<ObjectKey>& keys) const {
  Bitmap bm(keys.size());
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t k = 0; k < keys.size(); ++k) {
    const SlotId* cur = index_->Find(keys[k]);
    if (cur != nullptr && slots_[*cur].state == ObjectState::kReady) bm.Set(k);
  }
  return bm;
}

size_t ObjectTable::TouchPrefix(const std::vector<ObjectKey>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<SlotId>& slots = ScratchSlots();
  for (const ObjectKey& key : keys) {
    const SlotId* cur = index_->Find(key);
    if (cur == nullptr || slots_[*cur].state != ObjectState::kReady) break;
    slots.push_back(*cur);
  }
  for (size_t k = slots.size(); k-- > 0;) {
    if (policy_->Contains(slots[k])) policy_->Touch(slots[k]);
  }
  return slots.size();
}

// ------------------------------------------------------------------------------------------
// Bulk release.

size_t ObjectTable::ReleaseRequest(RequestId request, uint64_t* leases_released) {
  Events ev;
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = ledgers_.find(request);
    if (it == ledgers_.end()) return 0;
    n = DropEntriesLocked(&it->second, /*only_expired=*/false, TimePoint{}, &ev, leases_released);
    EraseLedgerLocked(it);
  }
  Dispatch(&ev);
  return n;
}

size_t ObjectTable::ReleaseClient(ClientId client, uint64_t* leases_released) {
  Events ev;
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = ledgers_.begin(); it != ledgers_.end();) {
      if (it->second.client == client) {
        n += DropEntriesLocked(&it->second, /*only_expired=*/false, TimePoint{}, &ev,
                               leases_released);
        it = EraseLedgerLocked(it);
      } else {
        ++it;
      }
    }
  }
  Dispatch(&ev);
  return n;
}

size_t ObjectTable::ReapExpired() {
  Events ev;
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const TimePoint now = clock_->Now();
    for (auto it = ledgers_.begin(); it != ledgers_.end();) {
      n += DropEntriesLocked(&it->second, /*only_expired=*/true, now, &ev);
      if (it->second.entries->empty()) {
        it = EraseLedgerLocked(it);
      } else {
        ++it;
      }
    }
    counters_.expired_leases += n;
  }
  Dispatch(&ev);
  return n;
}

// ------------------------------------------------------------------------------------------
// Removal.

Status ObjectTable::Delete(const std::vector<ObjectKey>& keys) {
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const ObjectKey& key : keys) {
      const SlotId* cur = index_->Find(key);
      if (cur == nullptr) return Status::KeyAbsent(KeyMsg("no such object", key));
      const Slot& slot = slots_[*cur];
      if (slot.state != ObjectState::kReady || slot.readers != 0) {
        return Status::Locked(KeyMsg("object is leased or being written", key));
      }
    }
    for (const ObjectKey& key : keys) {
      const SlotId* cur = index_->Find(key);
      if (cur != nullptr) FreeSlotLocked(*cur, RemovalReason::kDeleted, &ev);
    }
  }
  Dispatch(&ev);
  return Status::Ok();
}

void ObjectTable::RemoveSlotLocked(SlotId s, RemovalReason reason, Events* ev) {
  Slot& slot = slots_[s];
  if (slot.state == ObjectState::kReady && slot.readers == 0) {
    FreeSlotLocked(s, reason, ev);
    return;
  }
  if (policy_->Contains(s)) policy_->Remove(s);
  index_->Erase(slot.key);
  slot.detached = true;
  ev->removed.emplace_back(slot.key, reason);
}

bool ObjectTable::Discard(const ObjectKey& key, uint64_t generation) {
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const SlotId* cur = index_->Find(key);
    if (cur == nullptr) return false;
    const SlotId s = *cur;
    Slot& slot = slots_[s];
    if (slot.generation != generation || slot.state != ObjectState::kReady) return false;
    counters_.discarded++;
    RemoveSlotLocked(s, RemovalReason::kDeleted, &ev);
  }
  Dispatch(&ev);
  return true;
}

size_t ObjectTable::Clear(bool force) {
  Events ev;
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<SlotId> victims;
    victims.reserve(index_->size());
    index_->ForEach([&](const ObjectKey&, SlotId s) { victims.push_back(s); });
    for (SlotId s : victims) {
      const Slot& slot = slots_[s];
      if (force || (slot.state == ObjectState::kReady && slot.readers == 0)) {
        RemoveSlotLocked(s, RemovalReason::kCleared, &ev);
        ++n;
      }
    }
  }
  Dispatch(&ev);
  return n;
}

uint64_t ObjectTable::EvictBytes(uint64_t bytes) {
  Events ev;
  uint64_t freed = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (freed < bytes) {
      const uint64_t n = EvictOneLocked(&ev);
      if (n == 0) break;
      freed += n;
    }
  }
  Dispatch(&ev);
  return freed;
}

void ObjectTable::EvictToLowWatermark(bool only_above_high) {
  if (options_.high_watermark >= 1.0) return;
  Events ev;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const double cap = static_cast<double>(allocator_.capacity());
    if (only_above_high &&
        static_cast<double>(allocator_.stats().used) <= options_.high_watermark * cap) {
      return;
    }
    const double low = options_.low_watermark * static_cast<double>(allocator_.capacity());
    while (static_cast<double>(allocator_.stats().used) > low) {
      if (EvictOneLocked(&ev) == 0) break;
    }
  }
  Dispatch(&ev);
}

// ------------------------------------------------------------------------------------------
// Introspection.

std::optional<ObjectInfo> ObjectTable::Info(const ObjectKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  const SlotId* cur = index_->Find(key);
  if (cur == nullptr) return std::nullopt;
  return InfoLocked(*cur);
}

std::optional<ObjectInfo> ObjectTable::LeasedInfo(RequestId request, const ObjectKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto lit = ledgers_.find(request);
  if (lit == ledgers_.end()) return std::nullopt;
  const LeaseEntry* e = lit->second.entries->Find(key);
  if (e == nullptr || e->reads == 0) return std::nullopt;
  const Slot& s = slots_[e->slot];
  // The fence on every offset handed to a reader: the slot must still be the object the lease
  // was granted on (ledger entries and slots are kept consistent; this checks that they are).
  if (!s.in_use || s.key != key || s.generation != e->generation) {
    Log(LogLevel::kError, "ObjectTable: a lease does not match its object: " + key.ToShortString());
    return std::nullopt;
  }
  return InfoLocked(e->slot);
}

uint32_t ObjectTable::LeasesHeld(RequestId request, const ObjectKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto lit = ledgers_.find(request);
  if (lit == ledgers_.end()) return 0;
  const LeaseEntry* e = lit->second.entries->Find(key);
  return e == nullptr ? 0 : e->reads;
}

ObjectTableStats ObjectTable::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ObjectTableStats st = counters_;
  AllocatorStats a = allocator_.stats();
  st.capacity_bytes = a.capacity;
  st.used_bytes = a.used;
  st.evictable = evictable_count_;
  st.evictable_bytes = evictable_bytes_;
  st.requests = ledgers_.size();
  for (const Slot& s : slots_) {
    if (!s.in_use || s.quarantined) continue;
    if (s.detached) {
      st.detached++;
    } else {
      st.objects++;
    }
    if (s.state == ObjectState::kWriting) {
      st.writing++;
      st.write_leases++;
    } else {
      st.ready++;
    }
    if (s.temporary) st.temporary++;
    if (s.readers > 0) st.leased_objects++;
    st.read_leases += s.readers;
  }
  return st;
}

Status ObjectTable::CheckInvariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  LMCACHE_RETURN_IF_ERROR(allocator_.CheckInvariants());
  // Read leases and write leases per slot, as the ledgers see them.
  std::vector<uint64_t> reads(slots_.size(), 0);
  std::vector<uint32_t> writes(slots_.size(), 0);
  for (const auto& [req, ledger] : ledgers_) {
    if (ledger.entries->empty()) return Status::Internal("empty ledger kept");
    Status bad;
    const RequestId request = req;
    ledger.entries->ForEach([&](const ObjectKey& key, const LeaseEntry& e) {
      if (!bad.ok()) return;
      if (e.slot >= slots_.size() || !slots_[e.slot].in_use) {
        bad = Status::Internal("ledger entry points at a free slot: " + key.ToShortString());
      } else if (slots_[e.slot].key != key) {
        bad = Status::Internal("ledger key differs from slot key");
      } else if (e.reads == 0 && !e.write) {
        bad = Status::Internal("empty ledger entry kept");
      } else if (e.generation != slots_[e.slot].generation) {
        bad = Status::Internal("ledger entry generation differs from the slot's");
      } else if (slots_[e.slot].quarantined) {
        bad = Status::Internal("ledger entry on a quarantined slot");
      } else if (e.write && slots_[e.slot].writer != request) {
        bad = Status::Internal("write lease held by a request that is not the writer");
      } else {
        reads[e.slot] += e.reads;
        writes[e.slot] += e.write ? 1 : 0;
      }
    });
    LMCACHE_RETURN_IF_ERROR(bad);
  }
  uint64_t used = 0, evictable_bytes = 0;
  size_t in_use = 0, evictable = 0, quarantined = 0;
  for (SlotId s = 0; s < slots_.size(); ++s) {
    const Slot& slot = slots_[s];
    if (!slot.in_use) {
      if (policy_->Contains(s)) return Status::Internal("free slot in the eviction policy");
      continue;
    }
    ++in_use;
    used += slot.extent.length;
    if (slot.readers != reads[s]) {
      return Status::Internal("slot " + slot.key.ToShortString() + " has " +
                              std::to_string(slot.readers) + " readers but ledgers hold " +
                              std::to_string(reads[s]));
    }
    const bool writing = slot.state == ObjectState::kWriting;
    if (slot.quarantined) {
      if (!writing || slot.readers != 0 || policy_->Contains(s)) {
        return Status::Internal("quarantined slot is not a lone writing object");
      }
      const SlotId* cur = index_->Find(slot.key);
      if (cur != nullptr && *cur == s) return Status::Internal("quarantined slot indexed");
      ++quarantined;
      continue;
    }
    if (writes[s] != (writing ? 1u : 0u)) {
      return Status::Internal("writing object without exactly one write lease");
    }
    if (writing && slot.readers != 0) return Status::Internal("writing object has readers");
    const bool should_evict = IsEvictable(slot);
    // The policy holds every evictable object, and may also hold leased ones (dropped lazily).
    if (should_evict && !policy_->Contains(s)) {
      return Status::Internal("evictable object missing from the policy: " +
                              slot.key.ToShortString());
    }
    if (policy_->Contains(s) && (writing || slot.temporary || slot.detached)) {
      return Status::Internal("unevictable object in the policy: " + slot.key.ToShortString());
    }
    if ((slot.temporary || slot.detached) && !writing && slot.readers == 0) {
      return Status::Internal("unleased temporary/detached object not freed");
    }
    if (should_evict) {
      ++evictable;
      evictable_bytes += slot.extent.length;
    }
    const SlotId* cur = index_->Find(slot.key);
    if (slot.detached) {
      if (cur != nullptr && *cur == s) return Status::Internal("detached slot indexed");
    } else if (cur == nullptr || *cur != s) {
      return Status::Internal("live slot missing from the index");
    }
  }
  bool index_ok = true;
  index_->ForEach([&](const ObjectKey& key, SlotId s) {
    if (s >= slots_.size() || !slots_[s].in_use || slots_[s].key != key) index_ok = false;
  });
  if (!index_ok) return Status::Internal("index entry points at a wrong slot");
  size_t listed = 0;
  for (const auto& [writer, list] : quarantine_) {
    for (SlotId s : list) {
      if (s >= slots_.size() || !slots_[s].in_use || !slots_[s].quarantined ||
          slots_[s].writer != writer) {
        return Status::Internal("quarantine list names a wrong slot");
      }
    }
    listed += list.size();
  }
  if (listed != quarantined || listed != counters_.quarantined) {
    return Status::Internal("quarantine accounting mismatch");
  }
  if (in_use + free_slots_.size() != slots_.size()) return Status::Internal("slot leak");
  if (allocator_.stats().used != used) return Status::Internal("allocator bytes != slot bytes");
  if (evictable != evictable_count_ || evictable_bytes != evictable_bytes_) {
    return Status::Internal("evictable accounting mismatch");
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------
// Listeners and the maintenance thread.

void ObjectTable::AddListener(std::shared_ptr<ObjectTableListener> listener) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  listeners_.push_back(std::move(listener));
}

void ObjectTable::RemoveListener(const ObjectTableListener* listener) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  listeners_.erase(std::remove_if(listeners_.begin(), listeners_.end(),
                                  [&](const auto& l) { return l.get() == listener; }),
                   listeners_.end());
}

void ObjectTable::Dispatch(Events* ev) {
  if (ev->wake_maintenance) {
    {
      std::lock_guard<std::mutex> lock(maint_mu_);
      maint_evict_requested_ = true;
    }
    maint_cv_.notify_one();
  }
  if (ev->ready.empty() && ev->removed.empty()) return;
  std::vector<std::shared_ptr<ObjectTableListener>> listeners;
  {
    std::lock_guard<std::mutex> lock(listeners_mu_);
    listeners = listeners_;
  }
  if (listeners.empty()) return;
  for (const auto& l : listeners) {
    if (!ev->ready.empty()) l->OnObjectsReady(ev->ready);
    // Group consecutive removals with the same reason into one call.
    size_t i = 0;
    std::vector<ObjectKey> group;
    while (i < ev->removed.size()) {
      const RemovalReason reason = ev->removed[i].second;
      group.clear();
      while (i < ev->removed.size() && ev->removed[i].second == reason) {
        group.push_back(ev->removed[i].first);
        ++i;
      }
      l->OnObjectsRemoved(group, reason);
    }
  }
}

void ObjectTable::Start() {
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (maint_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> mlock(maint_mu_);
    maint_stop_ = false;
  }
  maint_thread_ = std::thread([this] { MaintenanceLoop(); });
}

void ObjectTable::Stop() {
  std::lock_guard<std::mutex> lock(start_stop_mu_);
  if (!maint_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> mlock(maint_mu_);
    maint_stop_ = true;
  }
  maint_cv_.notify_all();
  maint_thread_.join();
}

void ObjectTable::MaintenanceLoop() {
  auto next_reap = std::chrono::steady_clock::now() + options_.reap_interval;
  std::unique_lock<std::mutex> lock(maint_mu_);
  while (!maint_stop_) {
    maint_cv_.wait_until(lock, next_reap, [this] { return maint_stop_ || maint_evict_requested_; });
    if (maint_stop_) break;
    const bool requested = maint_evict_requested_;
    maint_evict_requested_ = false;
    lock.unlock();
    EvictToLowWatermark(/*only_above_high=*/!requested);
    if (std::chrono::steady_clock::now() >= next_reap) {
      ReapExpired();
      next_reap = std::chrono::steady_clock::now() + options_.reap_interval;
    }
    lock.lock();
  }
}

}  // namespace lmcache_cpp
