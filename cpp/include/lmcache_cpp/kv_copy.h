// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// CPU copy kernels between an engine's paged KV cache and L1 chunk objects.
//
// The engine keeps one tensor per layer (as vLLM allocates them), in one of four layouts
// (NB = blocks, BS = tokens per block, H = KV heads, D = head size, any element size):
//
//   kNHD        [2, NB, BS, H, D]   plane 0 = K, plane 1 = V
//   kHND        [2, NB, H, BS, D]
//   kFlashInfer [NB, 2, BS, H, D]
//   kMLA        [NB, BS, D]         one plane
//
// The block and plane dimensions may have any (non-negative) byte stride, e.g. a padded block
// dimension; the bytes of one block of one plane ("a block plane": [BS, H, D], [H, BS, D] or
// [BS, D]) are contiguous.
//
// Object format: the bytes of one chunk (chunk_size tokens, chunk_size / BS blocks) for one rank:
//
//   for layer l in [0, L), for plane p in [0, P), for block i in [0, chunk_size / BS):
//     block i's plane-p bytes, exactly as in the engine tensor
//
// so ObjectBytes(chunk_size) = L * P * (chunk_size / BS) * BS * H * D * element_size. The format
// depends only on Fingerprint() (layout name, L, BS, H, D, element size), never on strides or the
// number of blocks; the engine layer puts the fingerprint into the hash namespace, so engines
// whose objects differ in format never read each other's bytes.
//
// Gather copies engine blocks into an object, Scatter copies an object into engine blocks. Both
// are block-granular memcpy; Scatter can leave the leading `skip_tokens` tokens of the chunk
// untouched (they are already in the engine): whole skipped blocks are not written, and in a
// partially skipped block only the tokens >= skip_tokens are (a contiguous tail for NHD,
// FlashInfer and MLA; one strided piece per head for HND). A copy of num_tokens < chunk_size
// tokens touches the first num_tokens / BS block slots of every (layer, plane) segment of the
// object and leaves the rest of the object alone.
//
// Large copies (CopyOptions::streaming_threshold_bytes) use non-temporal stores (64 bytes at a
// time where the CPU has AVX-512), fenced before the call returns. Parallelism: a copy larger than
// CopyOptions::parallel_threshold_bytes is split into contiguous ranges of (chunk, layer, plane,
// block) pieces run on a CopyThreadPool (threads created once, condition variables, no spinning)
// with the calling thread taking part. Every piece writes bytes no other piece writes, so results
// do not depend on the number of threads.
//
// Checksums: a gather can also return each object's CRC32C (Castagnoli, the standard variant:
// register preset to ~0, result complemented; the checksum of L2 files, and what the store
// protocol carries), computed while it copies, never in a second pass over the object: where the
// CPU has AVX-512 VPCLMULQDQ, a block plane of 4 KiB or more is copied and checksummed in one pass
// (every 64 bytes loaded are stored and folded into the checksum); otherwise each 16 KiB of a
// piece is checksummed from the engine side right after it was copied, while it is in L1 (the
// object side may have been written with non-temporal stores and is in no cache). Each thread
// checksums the pieces it copies; the pieces' checksums are then joined in object order (the
// object is the concatenation of its pieces, with no gaps). So the result is the checksum of the
// object's first ObjectBytes(chunk_size) bytes as they are when the call returns -- bytes past
// that in a larger object are not covered -- and it does not depend on how the copy was split
// between threads. Only whole objects (num_tokens == chunk_size) can be checksummed. The cost is
// within the noise of the copy on AVX-512 machines (benchmarks/bench_kv_copy.cc measures it).
// The checksum guards the object's bytes from here on (L1, L2, the retrieving engine); it cannot
// tell whether the engine's blocks held the right tokens.
//
// Validation: every call checks its arguments (layout arithmetic, null pointers, block ids in
// range, token counts, object sizes, a block written twice by one Scatter) before copying anything
// and returns InvalidArgument on the first problem; nothing is copied then. What cannot be checked
// -- that the pointers really address memory of the described extent, and that objects and
// engine tensors do not overlap each other -- is the caller's REQUIRES.
//
// Ownership: KvCacheView, BlockIdSpan and ChunkCopy do not own the memory they point at; it must
// stay valid for the duration of a call. Thread safety: Gather/Scatter and their batch forms are
// reentrant and may be called from any number of threads at once; concurrent calls that write the
// same bytes (or read bytes another call writes) race, as memcpy would.
//
// Stability: stable: the layouts, KvCacheLayout, KvCacheView, BlockIdSpan, ChunkCopy,
// CopyOptions, Gather, Scatter, GatherBatch, ScatterBatch and CopyThreadPool. The object format is
// part of what L2 stores; if it ever changes, Fingerprint() changes with it, so objects of the old
// format become misses, never wrong bytes.
#ifndef LMCACHE_CPP_KV_COPY_H_
#define LMCACHE_CPP_KV_COPY_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lmcache_cpp/status.h"

namespace lmcache_cpp {

// The engine tensor layouts. Values are stable (they may travel on the wire).
enum class KvLayout : uint8_t {
  kNHD = 0,
  kHND = 1,
  kFlashInfer = 2,
  kMLA = 3,
};

// "nhd", "hnd", "flashinfer", "mla"; "unknown" for anything else.
const char* KvLayoutName(KvLayout layout);

// The shape of one engine's per-layer KV tensors. A plain value; see Validate() for the rules.
struct KvCacheLayout {
  KvLayout layout = KvLayout::kNHD;
  uint32_t num_layers = 0;
  uint32_t block_size = 0;    // tokens per block (BS)
  uint32_t num_heads = 0;     // KV heads (H); must be 1 for kMLA
  uint32_t head_size = 0;     // elements per head (D); the latent size for kMLA
  uint32_t element_size = 0;  // bytes per element
  uint64_t num_blocks = 0;    // NB
  // Bytes from block b to block b + 1 of the same plane; 0 = the dense stride
  // (BS*H*D*E for kNHD/kHND/kMLA, 2*BS*H*D*E for kFlashInfer).
  uint64_t block_stride = 0;
  // Bytes from plane 0 (K) to plane 1 (V) of the same block; 0 = the dense stride
  // (NB * BlockStride() for kNHD/kHND, BS*H*D*E for kFlashInfer). Must be 0 for kMLA.
  uint64_t plane_stride = 0;

  // 2, or 1 for kMLA.
  uint32_t num_planes() const noexcept { return layout == KvLayout::kMLA ? 1 : 2; }
  // Bytes of one block of one plane: BS * H * D * E. REQUIRES: Validate().ok() (else may wrap).
  uint64_t BlockPlaneBytes() const noexcept;
  // The strides in effect (the dense ones where the fields are 0). REQUIRES: Validate().ok().
  uint64_t BlockStride() const noexcept;
  uint64_t PlaneStride() const noexcept;

  // InvalidArgument unless: the layout is known; every count is >= 1 (num_heads == 1 for kMLA);
  // the sizes and the tensor extent fit in 63 bits; for NB > 1 the block stride is at least
  // BlockPlaneBytes(); for two planes the plane stride is set so that no block plane of K overlaps
  // one of V; plane_stride == 0 for kMLA.
  Status Validate() const;

  // Bytes of one object of `chunk_size` tokens. InvalidArgument for an invalid layout, a
  // chunk_size of 0 or not a multiple of block_size, or a size that does not fit in 63 bits.
  Result<uint64_t> ObjectBytes(uint64_t chunk_size) const;

  // Identifies the object format, e.g. "nhd:L32:BS16:H8:D128:E2". Equal fingerprints <=> equal
  // object formats for equal chunk sizes (strides and num_blocks are not part of it).
  std::string Fingerprint() const;
};

// One engine's KV cache: the layout and the address of element 0 of each layer's tensor (the
// first byte of plane 0, block 0). Non-owning.
struct KvCacheView {
  KvCacheLayout layout;
  std::vector<uint8_t*> layers;  // size() == layout.num_layers, none null

  // layout.Validate(), then InvalidArgument for a wrong layer count or a null layer pointer.
  Status Validate() const;
};

// A read-only, non-owning view of block ids stored as int32 or int64 (the engine's block table
// dtype). Negative ids are representable so that they can be rejected.
class BlockIdSpan {
 public:
  BlockIdSpan() noexcept = default;
  BlockIdSpan(const int32_t* data, size_t size) noexcept : data_(data), size_(size) {}
  BlockIdSpan(const int64_t* data, size_t size) noexcept : data_(data), size_(size), wide_(true) {}
  BlockIdSpan(const std::vector<int32_t>& ids) noexcept  // NOLINT(google-explicit-constructor)
      : BlockIdSpan(ids.data(), ids.size()) {}
  BlockIdSpan(const std::vector<int64_t>& ids) noexcept  // NOLINT(google-explicit-constructor)
      : BlockIdSpan(ids.data(), ids.size()) {}

  size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  // REQUIRES: i < size().
  int64_t operator[](size_t i) const noexcept {
    return wide_ ? static_cast<const int64_t*>(data_)[i] : static_cast<const int32_t*>(data_)[i];
  }

 private:
  const void* data_ = nullptr;
  size_t size_ = 0;
  bool wide_ = false;
};

class CopyThreadPool;

struct CopyOptions {
  CopyOptions() {}  // NOLINT
  // Most threads one call uses, the caller included: 0 = the pool's size + 1; 1 = the calling
  // thread only.
  size_t num_threads = 0;
  // Copies of fewer bytes run on the calling thread; larger ones use about one thread per this
  // many bytes, up to num_threads.
  uint64_t parallel_threshold_bytes = uint64_t{1} << 20;
  // Copies of at least this many bytes write with non-temporal (streaming) stores on x86-64:
  // faster when the bytes are not read again soon (a request's worth of chunks is far larger
  // than the cache), slower for small copies whose destination is about to be read.
  // UINT64_MAX = never.
  uint64_t streaming_threshold_bytes = uint64_t{16} << 20;
  // nullptr = CopyThreadPool::Default().
  CopyThreadPool* pool = nullptr;
};

// One chunk of a batch: the engine blocks holding the chunk's first num_tokens tokens, in token
// order (block_ids.size() == num_tokens / BS), and the object (object_size >= ObjectBytes(chunk)).
struct ChunkCopy {
  BlockIdSpan block_ids;
  uint64_t num_tokens = 0;
  uint64_t skip_tokens = 0;  // ScatterBatch only; must be 0 for GatherBatch
  uint8_t* object = nullptr;
  uint64_t object_size = 0;
  // GatherBatch only (nullptr elsewhere): where to write the CRC32C of the object's first
  // ObjectBytes(chunk_size) bytes as the gather leaves them (see "Checksums" above); nullptr = no
  // checksum. Written by the calling thread after every copy of the call has finished, and only
  // when the call returns Ok. REQUIRES: num_tokens == chunk_size (else InvalidArgument); the
  // caller owns the uint32_t, which must not lie in an object or an engine tensor.
  uint32_t* crc32c = nullptr;
};

// Engine blocks -> one object. `block_ids` are the engine blocks of the chunk's first
// `num_tokens` tokens, in order. With a non-null `crc32c`, also writes the object's CRC32C there
// on success, as ChunkCopy::crc32c describes. REQUIRES (unchecked): `object` addresses
// `object_size` writable bytes not overlapping the engine tensors; the view's pointers address
// tensors of its layout.
// InvalidArgument: view.Validate() fails; chunk_size is 0 or not a multiple of BS; num_tokens is
// not a multiple of BS or exceeds chunk_size; block_ids.size() != num_tokens / BS; a block id
// outside [0, NB); a null object; object_size < ObjectBytes(chunk_size); a checksum asked for
// with num_tokens != chunk_size.
Status Gather(const KvCacheView& view, uint64_t chunk_size, BlockIdSpan block_ids,
              uint64_t num_tokens, uint8_t* object, uint64_t object_size,
              const CopyOptions& options = CopyOptions(), uint32_t* crc32c = nullptr);

// One object -> engine blocks, leaving the chunk's first `skip_tokens` tokens untouched in the
// engine. Same REQUIRES and errors as Gather, plus InvalidArgument for skip_tokens > num_tokens
// and for a block id that appears twice among the blocks that would be written. Scatter does not
// checksum (ScatterBatch rejects a non-null ChunkCopy::crc32c): a retriever checks the object
// before scattering it.
Status Scatter(const KvCacheView& view, uint64_t chunk_size, const uint8_t* object,
               uint64_t object_size, BlockIdSpan block_ids, uint64_t num_tokens,
               uint64_t skip_tokens, const CopyOptions& options = CopyOptions());

// Several chunks in one call (one parallel region). Every chunk is validated first; on an error
// nothing is copied, no checksum is written and the message names the chunk. GatherBatch writes
// the checksum of every chunk whose crc32c is set; ScatterBatch rejects a set crc32c and a block
// written by two chunks. Same REQUIRES as above, for every chunk; objects must not overlap each
// other (GatherBatch).
Status GatherBatch(const KvCacheView& view, uint64_t chunk_size,
                   const std::vector<ChunkCopy>& chunks,
                   const CopyOptions& options = CopyOptions());
Status ScatterBatch(const KvCacheView& view, uint64_t chunk_size,
                    const std::vector<ChunkCopy>& chunks,
                    const CopyOptions& options = CopyOptions());

// A fixed set of worker threads running index-parallel loops for the copy kernels.
//
// ParallelFor hands out task indices through an atomic counter to the calling thread and to up
// to `max_threads - 1` idle workers; it returns when every task has run. Several callers may run
// loops at once (their jobs queue; each caller always works on its own job, so it never waits
// for a worker to become free). Workers sleep on a condition variable when there is no job.
//
// Thread safety: every method may be called from any thread. Stop() is idempotent, wakes and
// joins the workers; afterwards (and in a process forked from the creator) ParallelFor runs
// every task on the calling thread. Lock order: mu_ is a leaf lock; tasks never run under it.
class CopyThreadPool {
 public:
  // Starts `num_workers` threads (0 is allowed: every loop then runs on its caller).
  explicit CopyThreadPool(size_t num_workers);
  ~CopyThreadPool();  // Stop()
  CopyThreadPool(const CopyThreadPool&) = delete;
  CopyThreadPool& operator=(const CopyThreadPool&) = delete;

  // The process-wide pool: hardware_concurrency() - 1 workers (at most 63), started on first use
  // and never destroyed.
  static CopyThreadPool* Default();

  size_t num_workers() const noexcept { return num_workers_; }

  // Runs task(i) for every i in [0, num_tasks) on at most max_threads threads (the caller
  // included; 0 = num_workers() + 1) and returns when all have finished. `task` must not throw
  // and must not call ParallelFor on this pool.
  void ParallelFor(size_t num_tasks, size_t max_threads, const std::function<void(size_t)>& task);

  void Stop();

 private:
  struct Job;
  void WorkerLoop();
  static void RunTasks(Job& job);

  const size_t num_workers_;
  const int creator_pid_;
  std::mutex mu_;
  std::condition_variable work_cv_;         // a job was queued, or stop
  std::deque<std::shared_ptr<Job>> queue_;  // guarded by mu_; jobs still wanting helpers
  bool stopping_ = false;                   // guarded by mu_
  std::vector<std::thread> threads_;        // started in the constructor, joined by Stop()
  std::mutex stop_mu_;                      // serializes Stop()
};

}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_KV_COPY_H_
