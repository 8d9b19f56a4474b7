// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Internal: the argument checking shared by every implementation of the KV copy kernels (the CPU
// ones in kv_copy.cc, the CUDA ones in cpp/cuda/), so that every engine rejects exactly the same
// calls with exactly the same messages before it copies (or launches) anything.
#ifndef LMCACHE_CPP_SRC_KV_COPY_PLAN_H_
#define LMCACHE_CPP_SRC_KV_COPY_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "lmcache_cpp/kv_copy.h"
#include "lmcache_cpp/status.h"

namespace lmcache_cpp {
namespace internal {

// One validated chunk: the blocks [first_block, first_block + blocks) of block_ids are copied
// for every (layer, plane), into (Gather) or out of (Scatter) object slots of the same index.
// A Scatter leaves the first head_skip tokens of block first_block alone.
struct PlannedChunk {
  BlockIdSpan block_ids;
  uint8_t* object = nullptr;
  uint64_t first_block = 0;    // blocks before it are skipped entirely (Scatter)
  uint64_t blocks = 0;         // blocks copied per (layer, plane), starting at first_block
  uint64_t head_skip = 0;      // tokens of block first_block left alone (Scatter), < block_size
  uint32_t* crc32c = nullptr;  // ChunkCopy::crc32c (Gather with checksums only)
};

// The arithmetic of a copy's pieces: a piece is one block of one plane of one layer ("a block
// plane"), [outer, block_size, token_bytes] bytes laid out contiguously.
struct CopyGeometry {
  // REQUIRES: lay.Validate().ok() and chunk_size a positive multiple of lay.block_size.
  CopyGeometry(const KvCacheLayout& lay, uint64_t chunk_size);

  // Bytes from the start of an object to slot `slot` of (layer, plane).
  uint64_t ObjectOffset(uint64_t layer, uint64_t plane, uint64_t slot) const {
    return ((layer * planes + plane) * chunk_blocks + slot) * piece_bytes;
  }

  uint64_t planes = 0;        // 2, or 1 for MLA
  uint64_t chunk_blocks = 0;  // object slots per (layer, plane): chunk_size / block_size
  uint64_t piece_bytes = 0;   // BlockPlaneBytes()
  uint64_t block_stride = 0;  // BlockStride()
  uint64_t plane_stride = 0;  // PlaneStride()
  uint64_t block_size = 0;
  uint64_t outer = 0;        // runs of tokens per block plane: H for HND, 1 otherwise
  uint64_t token_bytes = 0;  // bytes of one token within a run
};

// Checks `chunks` against the view exactly as Gather/Scatter (and their batch forms) document,
// and appends one PlannedChunk per chunk with something to copy to `out` (a chunk whose tokens
// are all skipped is left out). `batch` only changes the messages ("chunk <i>: " prefixes).
// `checksums`: the caller computes ChunkCopy::crc32c (the CPU gather); without it a set crc32c is
// InvalidArgument, as it always is for a scatter. InvalidArgument on the first problem; `out` may
// then hold a prefix of the plan. Thread-safe.
Status PlanCopies(const KvCacheView& view, uint64_t chunk_size, const ChunkCopy* chunks,
                  size_t num_chunks, bool scatter, bool batch, std::vector<PlannedChunk>* out,
                  bool checksums = false);

}  // namespace internal
}  // namespace lmcache_cpp

#endif  // LMCACHE_CPP_SRC_KV_COPY_PLAN_H_
