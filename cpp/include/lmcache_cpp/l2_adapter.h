// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// L2Adapter: the asynchronous interface of a second storage tier (local disk, a remote store, a
// Python-implemented store). The store and prefetch controllers talk to every tier through it.
//
// Every Submit* call returns at once; its completion callback runs exactly once, later, on one
// of the adapter's own threads (never on the submitting thread, never while the adapter holds a
// lock that the callback could need). A callback must be short and must not block: it may
// record the result, notify a condition variable, release L1 leases, or submit more work to any
// adapter, but it must not wait for another completion. After Close() returns, no callback is
// running and none will run; every operation still queued completed with Cancelled.
//
// Buffers: the caller owns them and keeps them valid (and, for stores, unchanged; in practice it
// holds L1 read leases) until the operation's callback has run.
//
// Pins: SubmitLookupAndPin pins every key it reports present; a pinned object is not evicted from
// the tier and stays loadable until Unpin. Pins are counted per key (two lookups pin twice and
// need two unpins). Unpin is fire-and-forget and must eventually succeed; unpinning a key that is
// not pinned is ignored (counted in stats().bad_unpins).
//
// Thread safety: all methods may be called from any thread concurrently.
//
// Stability: stable for callers and for implementers (a host may plug in its own store). New
// virtual methods, if any, will come with default implementations; L2AdapterStats may gain
// fields.
#ifndef LMCACHE_CPP_L2_ADAPTER_H_
#define LMCACHE_CPP_L2_ADAPTER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lmcache_cpp/bitmap.h"
#include "lmcache_cpp/object_key.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

struct ConstBuffer {
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  // The CRC32C of the `size` bytes as they were committed to L1, when known (the store
  // controller checks the bytes against it just before it submits them). An adapter keeps it with
  // the object and checks the bytes against it on every load; one that computes its own checksum
  // may use this one instead, saving a pass over the bytes.
  bool has_crc32c = false;
  uint32_t crc32c = 0;
};

// The checksum ConstBuffer::crc32c holds: the CRC32C (Castagnoli) of [data, data + size),
// hardware-accelerated where the CPU allows. An adapter that keeps the checksum it was given
// checks loaded bytes with it; one given none (has_crc32c false) computes it at store.
uint32_t PayloadCrc32c(const void* data, size_t size);

struct MutableBuffer {
  uint8_t* data = nullptr;
  uint64_t size = 0;
};

// Completion of a store: `stored` bit i is set when keys[i] is now durable in the tier (as
// durable as the adapter promises). A non-OK status means the whole call failed (no bit set).
using StoreCallback = std::function<void(const Status& status, const Bitmap& stored)>;
// Completion of a lookup: bit i is set when keys[i] is present and now pinned.
using LookupCallback = std::function<void(const Status& status, const Bitmap& pinned)>;
// Completion of a load: bit i is set when buffer i now holds keys[i]'s exact bytes. A key whose
// bytes failed validation (corrupt, torn, foreign file) reads as a miss, never as data.
using LoadCallback = std::function<void(const Status& status, const Bitmap& loaded)>;

// Each field is described once (kind, metric, help) in stat_fields.h: add a row there too.
struct L2AdapterStats {
  uint64_t objects = 0;         // objects held
  uint64_t bytes = 0;           // bytes held
  uint64_t capacity_bytes = 0;  // 0 = unbounded
  uint64_t pinned_objects = 0;  // objects with a pin count > 0
  uint64_t pins = 0;            // sum of pin counts
  uint64_t in_flight = 0;       // operations submitted and not yet completed
  uint64_t stores = 0, store_failures = 0;
  uint64_t lookups = 0, loads = 0, load_misses = 0;
  uint64_t evictions = 0;
  uint64_t corrupt_reads = 0;  // objects that failed validation on load or on index rebuild
  uint64_t bad_unpins = 0;
  uint64_t bytes_written = 0, bytes_read = 0;
};

class L2Adapter {
 public:
  virtual ~L2Adapter() = default;

  // A short name for logs and metrics, e.g. "fs:/var/cache/lmcache_cpp" or "memory".
  virtual std::string name() const = 0;

  // Stores objects; keys.size() == buffers.size() (else the callback gets InvalidArgument).
  // Keys already present are reported stored without rewriting.
  virtual void SubmitStore(std::vector<ObjectKey> keys, std::vector<ConstBuffer> buffers,
                           StoreCallback done) = 0;

  // Checks which keys are present and pins those.
  virtual void SubmitLookupAndPin(std::vector<ObjectKey> keys, LookupCallback done) = 0;

  // Reads objects into the caller's buffers; each buffer must be exactly the object's size (a size
  // mismatch reads as a miss). Keys should be pinned by the caller.
  virtual void SubmitLoad(std::vector<ObjectKey> keys, std::vector<MutableBuffer> buffers,
                          LoadCallback done) = 0;

  // Drops one pin per listed key. Never blocks on I/O.
  virtual void Unpin(const std::vector<ObjectKey>& keys) = 0;

  // Stops accepting work, cancels what is queued (callbacks get Cancelled), waits for what is
  // running, joins the adapter's threads. Idempotent. Later Submit* calls complete with
  // Unavailable (on an adapter thread if one remains, else inline).
  virtual void Close() = 0;

  virtual L2AdapterStats stats() const = 0;
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_L2_ADAPTER_H_
