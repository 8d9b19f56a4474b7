// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.

#include "lmcache_cpp/kv_copy.h"

#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "crc32c.h"
#include "kv_copy_plan.h"

namespace lmcache_cpp {
namespace {

constexpr uint64_t kMaxBytes = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

// a * b, or false when the product exceeds kMaxBytes.
bool MulBytes(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out) && *out <= kMaxBytes;
}

bool AddBytes(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out) && *out <= kMaxBytes;
}

std::string U64(uint64_t v) { return std::to_string(v); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// StreamCopy with whole cache lines per instruction (64-byte loads and streaming stores, four
// lines per iteration): fewer, fuller stores than the SSE2 loop keep more lines in flight.
__attribute__((target("avx512f"))) void StreamCopy512(uint8_t* dst, const uint8_t* src,
                                                      uint64_t n) {
  const uint64_t head = (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  for (uint64_t blocks = n / 256; blocks > 0; --blocks) {
    const __m512i a = _mm512_loadu_si512(src);
    const __m512i b = _mm512_loadu_si512(src + 64);
    const __m512i c = _mm512_loadu_si512(src + 128);
    const __m512i d = _mm512_loadu_si512(src + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 192), d);
    src += 256;
    dst += 256;
  }
  std::memcpy(dst, src, n % 256);
}

bool HaveAvx512() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return have;
}
#endif

// memcpy with non-temporal (streaming) stores where the ISA has them: the destination lines are
// written without first being read into the cache, which saves a third of the memory traffic of
// a large copy that does not fit in the cache anyway. Callers issue StreamFence() before
// publishing the bytes to another thread.
void StreamCopy(uint8_t* dst, const uint8_t* src, uint64_t n) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (n >= 512 && HaveAvx512()) {
    StreamCopy512(dst, src, n);
    return;
  }
#endif
#if defined(__SSE2__)
  const uint64_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  if (n < head + 256) {
    std::memcpy(dst, src, n);
    return;
  }
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  for (uint64_t lines = n / 64; lines > 0; --lines) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
    src += 64;
    dst += 64;
  }
  std::memcpy(dst, src, n % 64);
#else
  std::memcpy(dst, src, n);
#endif
}

// Orders earlier streaming stores before later stores (no-op without streaming stores).
void StreamFence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

bool KnownLayout(KvLayout layout) {
  switch (layout) {
    case KvLayout::kNHD:
    case KvLayout::kHND:
    case KvLayout::kFlashInfer:
    case KvLayout::kMLA: return true;
  }
  return false;
}

}  // namespace

const char* KvLayoutName(KvLayout layout) {
  switch (layout) {
    case KvLayout::kNHD: return "nhd";
    case KvLayout::kHND: return "hnd";
    case KvLayout::kFlashInfer: return "flashinfer";
    case KvLayout::kMLA: return "mla";
  }
  return "unknown";
}

// ------------------------------------------------------------------------------------------
// KvCacheLayout

uint64_t KvCacheLayout::BlockPlaneBytes() const noexcept {
  return uint64_t{block_size} * num_heads * head_size * element_size;
}

uint64_t KvCacheLayout::BlockStride() const noexcept {
  if (block_stride != 0) return block_stride;
  return layout == KvLayout::kFlashInfer ? 2 * BlockPlaneBytes() : BlockPlaneBytes();
}

uint64_t KvCacheLayout::PlaneStride() const noexcept {
  if (layout == KvLayout::kMLA) return 0;
  if (plane_stride != 0) return plane_stride;
  return layout == KvLayout::kFlashInfer ? BlockPlaneBytes() : num_blocks * BlockStride();
}

Status KvCacheLayout::Validate() const {
  if (!KnownLayout(layout)) {
    return Status::InvalidArgument("unknown KV layout " + std::to_string(static_cast<int>(layout)));
  }
  const char* name = KvLayoutName(layout);
  if (num_layers == 0 || block_size == 0 || num_heads == 0 || head_size == 0 || element_size == 0 ||
      num_blocks == 0) {
    return Status::InvalidArgument(
        std::string("KV layout ") + name + ": num_layers, block_size, num_heads, head_size, " +
        "element_size and num_blocks must all be >= 1 (got L=" + U64(num_layers) +
        " BS=" + U64(block_size) + " H=" + U64(num_heads) + " D=" + U64(head_size) +
        " E=" + U64(element_size) + " NB=" + U64(num_blocks) + ")");
  }
  if (layout == KvLayout::kMLA && num_heads != 1) {
    return Status::InvalidArgument(
        "KV layout mla has no head dimension: num_heads must be 1, got " + U64(num_heads));
  }
  if (layout == KvLayout::kMLA && plane_stride != 0) {
    return Status::InvalidArgument("KV layout mla has one plane: plane_stride must be 0, got " +
                                   U64(plane_stride));
  }
  uint64_t pbb = 0;
  if (!MulBytes(block_size, num_heads, &pbb) || !MulBytes(pbb, head_size, &pbb) ||
      !MulBytes(pbb, element_size, &pbb)) {
    return Status::InvalidArgument(std::string("KV layout ") + name +
                                   ": a block plane does not fit in 63 bits");
  }
  uint64_t bs = block_stride;
  if (bs == 0 && !MulBytes(pbb, layout == KvLayout::kFlashInfer ? 2 : 1, &bs)) {
    return Status::InvalidArgument(std::string("KV layout ") + name +
                                   ": the block stride does not fit in 63 bits");
  }
  if (num_blocks > 1 && bs < pbb) {
    return Status::InvalidArgument(std::string("KV layout ") + name + ": block stride " + U64(bs) +
                                   " is smaller than a block plane (" + U64(pbb) +
                                   " bytes), so blocks would overlap");
  }
  uint64_t ps = 0;
  if (num_planes() == 2) {
    ps = plane_stride;
    if (ps == 0) {
      if (layout == KvLayout::kFlashInfer) {
        ps = pbb;
      } else if (!MulBytes(num_blocks, bs, &ps)) {
        return Status::InvalidArgument(std::string("KV layout ") + name +
                                       ": the plane stride does not fit in 63 bits");
      }
    }
    // Plane-1 block b starts at ps + b*bs, plane-0 block b' at b'*bs; they overlap iff
    // |ps - d*bs| < pbb for d = b' - b. Only d >= 0 can come that close (bs >= pbb), and of
    // those only the two multiples of bs around ps.
    bool overlap = false;
    if (num_blocks == 1) {
      overlap = ps < pbb;
    } else {
      const uint64_t k = ps / bs;
      if (k <= num_blocks - 1 && ps - k * bs < pbb) overlap = true;
      if (k + 1 <= num_blocks - 1 && (k + 1) * bs - ps < pbb) overlap = true;
    }
    if (overlap) {
      return Status::InvalidArgument(
          std::string("KV layout ") + name + ": plane stride " + U64(ps) + " with block stride " +
          U64(bs) + " makes K and V block planes of " + U64(pbb) + " bytes overlap");
    }
  }
  // The extent of one layer's tensor: (P-1)*ps + (NB-1)*bs + pbb.
  uint64_t extent = 0;
  if (!MulBytes(num_blocks - 1, bs, &extent) || !AddBytes(extent, ps, &extent) ||
      !AddBytes(extent, pbb, &extent)) {
    return Status::InvalidArgument(std::string("KV layout ") + name +
                                   ": the tensor extent does not fit in 63 bits");
  }
  return Status::Ok();
}

Result<uint64_t> KvCacheLayout::ObjectBytes(uint64_t chunk_size) const {
  LMCACHE_RETURN_IF_ERROR(Validate());
  if (chunk_size == 0 || chunk_size % block_size != 0) {
    return Status::InvalidArgument("chunk_size " + U64(chunk_size) +
                                   " must be a positive multiple of the block size " +
                                   U64(block_size));
  }
  uint64_t bytes = 0;
  if (!MulBytes(num_layers, num_planes(), &bytes) ||
      !MulBytes(bytes, chunk_size / block_size, &bytes) ||
      !MulBytes(bytes, BlockPlaneBytes(), &bytes)) {
    return Status::InvalidArgument("an object of " + U64(chunk_size) +
                                   " tokens does not fit in 63 bits");
  }
  return bytes;
}

std::string KvCacheLayout::Fingerprint() const {
  std::string s = KvLayoutName(layout);
  s += ":L" + U64(num_layers);
  s += ":BS" + U64(block_size);
  s += ":H" + U64(num_heads);
  s += ":D" + U64(head_size);
  s += ":E" + U64(element_size);
  return s;
}

Status KvCacheView::Validate() const {
  LMCACHE_RETURN_IF_ERROR(layout.Validate());
  if (layers.size() != layout.num_layers) {
    return Status::InvalidArgument("KV cache view has " + U64(layers.size()) +
                                   " layer pointers for a layout of " + U64(layout.num_layers) +
                                   " layers");
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    if (layers[l] == nullptr) {
      return Status::InvalidArgument("KV cache view: layer " + U64(l) + " pointer is null");
    }
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------
// Validation, shared with the CUDA kernels (kv_copy_plan.h).

namespace {

std::string ChunkPrefix(bool batch, size_t c) {
  return batch ? "chunk " + std::to_string(c) + ": " : std::string();
}

}  // namespace

Status internal::PlanCopies(const KvCacheView& view, uint64_t chunk_size, const ChunkCopy* chunks,
                            size_t num_chunks, bool scatter, bool batch,
                            std::vector<PlannedChunk>* out, bool checksums) {
  LMCACHE_RETURN_IF_ERROR(view.Validate());
  uint64_t object_bytes = 0;
  LMCACHE_ASSIGN_OR_RETURN(object_bytes, view.layout.ObjectBytes(chunk_size));
  const uint64_t bs = view.layout.block_size;
  const uint64_t nb = view.layout.num_blocks;
  // Blocks written so far (Scatter): one bit per engine block, allocated on first need.
  std::vector<uint64_t> written;
  for (size_t c = 0; c < num_chunks; ++c) {
    const ChunkCopy& ch = chunks[c];
    const std::string where = ChunkPrefix(batch, c);
    if (ch.object == nullptr) return Status::InvalidArgument(where + "object pointer is null");
    if (ch.object_size < object_bytes) {
      return Status::InvalidArgument(where + "object of " + U64(ch.object_size) +
                                     " bytes is smaller than the " + U64(object_bytes) +
                                     " bytes of a " + U64(chunk_size) + "-token object");
    }
    if (ch.num_tokens % bs != 0 || ch.num_tokens > chunk_size) {
      return Status::InvalidArgument(where + "num_tokens " + U64(ch.num_tokens) +
                                     " must be a multiple of the block size " + U64(bs) +
                                     " and at most chunk_size " + U64(chunk_size));
    }
    const uint64_t blocks = ch.num_tokens / bs;
    if (ch.block_ids.size() != blocks) {
      return Status::InvalidArgument(where + U64(ch.block_ids.size()) + " block ids for " +
                                     U64(ch.num_tokens) + " tokens; expected " + U64(blocks));
    }
    if (!scatter && ch.skip_tokens != 0) {
      return Status::InvalidArgument(where + "skip_tokens applies to Scatter only");
    }
    if (ch.crc32c != nullptr) {
      if (scatter) {
        return Status::InvalidArgument(where + "a CRC32C is computed by Gather only (crc32c must " +
                                       "be null for Scatter)");
      }
      if (!checksums) {
        return Status::InvalidArgument(where + "this copy engine does not compute CRC32C " +
                                       "checksums (crc32c must be null)");
      }
      if (ch.num_tokens != chunk_size) {
        return Status::InvalidArgument(where + "a CRC32C covers a whole object: num_tokens " +
                                       U64(ch.num_tokens) + " must equal chunk_size " +
                                       U64(chunk_size) + " when crc32c is set");
      }
    }
    if (ch.skip_tokens > ch.num_tokens) {
      return Status::InvalidArgument(where + "skip_tokens " + U64(ch.skip_tokens) +
                                     " exceeds num_tokens " + U64(ch.num_tokens));
    }
    for (uint64_t i = 0; i < blocks; ++i) {
      const int64_t id = ch.block_ids[i];
      if (id < 0 || static_cast<uint64_t>(id) >= nb) {
        return Status::InvalidArgument(where + "block id " + std::to_string(id) + " at position " +
                                       U64(i) + " is outside [0, " + U64(nb) + ")");
      }
    }
    PlannedChunk planned;
    planned.block_ids = ch.block_ids;
    planned.object = ch.object;
    planned.first_block = ch.skip_tokens / bs;
    planned.blocks = blocks - planned.first_block;
    planned.head_skip = ch.skip_tokens % bs;
    planned.crc32c = ch.crc32c;
    if (scatter && planned.blocks > 0) {
      if (written.empty()) written.assign((nb + 63) / 64, 0);
      for (uint64_t i = planned.first_block; i < blocks; ++i) {
        const auto id = static_cast<uint64_t>(ch.block_ids[i]);
        uint64_t& word = written[id / 64];
        const uint64_t bit = uint64_t{1} << (id % 64);
        if ((word & bit) != 0) {
          return Status::InvalidArgument(where + "block id " + U64(id) + " at position " + U64(i) +
                                         " is written more than once");
        }
        word |= bit;
      }
    }
    if (planned.blocks > 0) out->push_back(planned);
  }
  return Status::Ok();
}

internal::CopyGeometry::CopyGeometry(const KvCacheLayout& lay, uint64_t chunk_size)
    : planes(lay.num_planes()),
      chunk_blocks(chunk_size / lay.block_size),
      piece_bytes(lay.BlockPlaneBytes()),
      block_stride(lay.BlockStride()),
      plane_stride(lay.PlaneStride()),
      block_size(lay.block_size) {
  // A block plane is [outer, BS, inner bytes]: HND has one run of tokens per head.
  if (lay.layout == KvLayout::kHND) {
    outer = lay.num_heads;
    token_bytes = uint64_t{lay.head_size} * lay.element_size;
  } else {
    outer = 1;
    token_bytes = uint64_t{lay.num_heads} * lay.head_size * lay.element_size;
  }
}

// ------------------------------------------------------------------------------------------
// The copy plan: validated chunks cut into (chunk, layer, plane, block) pieces.

namespace {

using internal::PlannedChunk;

// Checksummed gathers. Where the CPU has the checksum's folding path (AVX-512 VPCLMULQDQ), a piece
// of at least kCrc32cFoldMinLength bytes is copied and checksummed in one pass (Crc32cCopy): the
// folding hides in the time the copy waits for memory. Otherwise the piece is copied and then
// checksummed this many bytes at a time, from the source, which is then still in L1 whatever the
// size of a block plane (a streaming copy's destination is not in any cache).
constexpr uint64_t kChecksumStep = 16 * 1024;

class CopyPlan {
 public:
  CopyPlan(const KvCacheView& view, uint64_t chunk_size, bool scatter)
      : view_(view),
        scatter_(scatter),
        geo_(view.layout, chunk_size),
        one_pass_checksums_(internal::Crc32cFoldAvailable() &&
                            geo_.piece_bytes >= internal::kCrc32cFoldMinLength) {}

  void Add(const PlannedChunk& chunk) {
    const uint64_t pieces = uint64_t{view_.layout.num_layers} * geo_.planes * chunk.blocks;
    if (pieces == 0) return;
    chunks_.push_back(chunk);
    starts_.push_back(total_pieces_);
    total_pieces_ += pieces;
    if (chunk.crc32c != nullptr) checksums_ = true;
  }

  void set_streaming(bool streaming) { streaming_ = streaming; }
  uint64_t total_pieces() const { return total_pieces_; }
  uint64_t total_bytes() const { return total_pieces_ * geo_.piece_bytes; }

  // Cuts the flat piece order into `tasks` contiguous ranges of (almost) equal length. With
  // checksums, also into segments: the ranges cut again at chunk starts, so that every segment
  // lies in one task and one chunk. REQUIRES: 1 <= tasks <= total_pieces().
  void Split(uint64_t tasks) {
    num_tasks_ = tasks;
    if (!checksums_) return;
    cuts_.clear();
    cuts_.reserve(tasks + starts_.size() + 1);
    size_t c = 0;
    for (uint64_t t = 0; t < tasks; ++t) {
      const uint64_t begin = TaskBegin(t);
      for (; c < starts_.size() && starts_[c] <= begin; ++c) {
        if (starts_[c] < begin) cuts_.push_back(starts_[c]);
      }
      cuts_.push_back(begin);
    }
    for (; c < starts_.size(); ++c) cuts_.push_back(starts_[c]);
    cuts_.push_back(total_pieces_);
    segment_crcs_.assign(cuts_.size() - 1, 0);
  }

  uint64_t num_tasks() const { return num_tasks_; }

  // Runs task t of Split(). Tasks may run concurrently (they write disjoint bytes).
  void RunTask(uint64_t t) { Run(TaskBegin(t), TaskBegin(t + 1)); }

  // Joins the segments' checksums of every chunk that asked for one, in object order, and writes
  // them. REQUIRES: every task has finished (and its writes are visible to this thread).
  void WriteChecksums() const {
    if (!checksums_) return;
    size_t c = 0;
    uint32_t crc = 0;
    for (size_t k = 0; k + 1 < cuts_.size(); ++k) {
      while (c + 1 < starts_.size() && starts_[c + 1] <= cuts_[k]) ++c;
      if (chunks_[c].crc32c == nullptr) continue;
      if (cuts_[k] == starts_[c]) crc = 0;
      crc = internal::Crc32cCombine(crc, segment_crcs_[k],
                                    (cuts_[k + 1] - cuts_[k]) * geo_.piece_bytes);
      if (cuts_[k + 1] == ChunkEnd(c)) *chunks_[c].crc32c = crc;
    }
  }

 private:
  uint64_t TaskBegin(uint64_t t) const {
    const uint64_t per = total_pieces_ / num_tasks_;
    const uint64_t extra = total_pieces_ % num_tasks_;
    return t * per + std::min(t, extra);
  }

  uint64_t ChunkEnd(size_t c) const {
    return c + 1 < starts_.size() ? starts_[c + 1] : total_pieces_;
  }

  // Copies pieces [begin, end) of the flat order: chunk, then layer, plane, block (so each
  // range writes (Gather) or reads (Scatter) its objects sequentially). A chunk that wants a
  // checksum gets one per segment, over the pieces in order.
  void Run(uint64_t begin, uint64_t end) {
    if (begin >= end) return;
    size_t c = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) -
                                   starts_.begin()) -
               1;
    while (begin < end) {
      const PlannedChunk& ch = chunks_[c];
      const uint64_t stop = std::min(end, ChunkEnd(c));
      const uint64_t u = begin - starts_[c];
      uint64_t j = u % ch.blocks;
      const uint64_t lp = u / ch.blocks;
      uint64_t p = lp % geo_.planes;
      uint64_t l = lp / geo_.planes;
      const bool checksum = ch.crc32c != nullptr;
      uint32_t crc = 0;
      for (uint64_t n = stop - begin; n > 0; --n) {
        if (checksum) {
          crc = CopyAndChecksumPiece(ch, l, p, j, crc);
        } else {
          CopyPiece(ch, l, p, j);
        }
        if (++j == ch.blocks) {
          j = 0;
          if (++p == geo_.planes) {
            p = 0;
            ++l;
          }
        }
      }
      if (checksum) {
        const auto k = static_cast<size_t>(std::lower_bound(cuts_.begin(), cuts_.end(), begin) -
                                           cuts_.begin());
        segment_crcs_[k] = crc;
      }
      begin = stop;
      ++c;
    }
    if (streaming_) StreamFence();
  }

  uint8_t* EnginePiece(const PlannedChunk& ch, uint64_t l, uint64_t p, uint64_t i) const {
    return view_.layers[l] + p * geo_.plane_stride +
           static_cast<uint64_t>(ch.block_ids[i]) * geo_.block_stride;
  }

  void CopyPiece(const PlannedChunk& ch, uint64_t l, uint64_t p, uint64_t j) const {
    const uint64_t i = ch.first_block + j;
    uint8_t* engine = EnginePiece(ch, l, p, i);
    uint8_t* object = ch.object + geo_.ObjectOffset(l, p, i);
    if (!scatter_) {
      Copy(object, engine, geo_.piece_bytes);
    } else if (j == 0 && ch.head_skip != 0) {
      const uint64_t run = (geo_.block_size - ch.head_skip) * geo_.token_bytes;
      for (uint64_t o = 0; o < geo_.outer; ++o) {
        const uint64_t off = (o * geo_.block_size + ch.head_skip) * geo_.token_bytes;
        std::memcpy(engine + off, object + off, run);
      }
    } else {
      Copy(engine, object, geo_.piece_bytes);
    }
  }

  // A gather piece, checksummed (see kChecksumStep): returns `crc` extended over its bytes.
  uint32_t CopyAndChecksumPiece(const PlannedChunk& ch, uint64_t l, uint64_t p, uint64_t j,
                                uint32_t crc) const {
    const uint64_t i = ch.first_block + j;
    const uint8_t* engine = EnginePiece(ch, l, p, i);
    uint8_t* object = ch.object + geo_.ObjectOffset(l, p, i);
    if (one_pass_checksums_) {
      return internal::Crc32cCopy(crc, object, engine, geo_.piece_bytes, streaming_);
    }
    for (uint64_t done = 0; done < geo_.piece_bytes;) {
      const uint64_t n = std::min(geo_.piece_bytes - done, kChecksumStep);
      Copy(object + done, engine + done, n);
      crc = internal::Crc32cExtend(crc, engine + done, n);
      done += n;
    }
    return crc;
  }

  void Copy(uint8_t* dst, const uint8_t* src, uint64_t n) const {
    if (streaming_) {
      StreamCopy(dst, src, n);
    } else {
      std::memcpy(dst, src, n);
    }
  }

  const KvCacheView& view_;
  const bool scatter_;
  bool streaming_ = false;
  bool checksums_ = false;  // some chunk wants a checksum
  const internal::CopyGeometry geo_;
  const bool one_pass_checksums_;  // checksummed pieces go through Crc32cCopy
  std::vector<PlannedChunk> chunks_;
  std::vector<uint64_t> starts_;  // first flat piece of each chunk
  uint64_t total_pieces_ = 0;
  uint64_t num_tasks_ = 1;
  // With checksums: segment k is pieces [cuts_[k], cuts_[k + 1]), within one task and one chunk;
  // segment_crcs_[k] is its checksum, written by the task that copies it.
  std::vector<uint64_t> cuts_;
  std::vector<uint32_t> segment_crcs_;
};

void Execute(CopyPlan& plan, const CopyOptions& options) {
  const uint64_t pieces = plan.total_pieces();
  if (pieces == 0) return;
  CopyThreadPool* pool = options.pool;
  const uint64_t threshold = std::max<uint64_t>(options.parallel_threshold_bytes, 1);
  const uint64_t bytes = plan.total_bytes();
  plan.set_streaming(bytes >= options.streaming_threshold_bytes);
  uint64_t threads = 1;
  if (options.num_threads != 1 && bytes >= threshold && pieces > 1) {
    if (pool == nullptr) pool = CopyThreadPool::Default();
    const uint64_t cap = options.num_threads == 0 ? pool->num_workers() + 1 : options.num_threads;
    threads = std::min<uint64_t>({cap, bytes / threshold, pieces});
  }
  if (threads <= 1) {
    plan.Split(1);
    plan.RunTask(0);
  } else {
    // A few tasks per thread evens out threads that start late or run slower.
    plan.Split(std::min<uint64_t>(pieces, threads * 4));
    pool->ParallelFor(static_cast<size_t>(plan.num_tasks()), static_cast<size_t>(threads),
                      [&](size_t t) { plan.RunTask(t); });
  }
  plan.WriteChecksums();
}

Status RunCopies(const KvCacheView& view, uint64_t chunk_size, const ChunkCopy* chunks,
                 size_t num_chunks, bool scatter, bool batch, const CopyOptions& options) {
  std::vector<PlannedChunk> planned;
  LMCACHE_RETURN_IF_ERROR(internal::PlanCopies(view, chunk_size, chunks, num_chunks, scatter, batch,
                                               &planned, /*checksums=*/true));
  CopyPlan plan(view, chunk_size, scatter);
  for (const PlannedChunk& chunk : planned) plan.Add(chunk);
  Execute(plan, options);
  return Status::Ok();
}

}  // namespace

Status Gather(const KvCacheView& view, uint64_t chunk_size, BlockIdSpan block_ids,
              uint64_t num_tokens, uint8_t* object, uint64_t object_size,
              const CopyOptions& options, uint32_t* crc32c) {
  ChunkCopy chunk;
  chunk.block_ids = block_ids;
  chunk.num_tokens = num_tokens;
  chunk.object = object;
  chunk.object_size = object_size;
  chunk.crc32c = crc32c;
  return RunCopies(view, chunk_size, &chunk, 1, /*scatter=*/false, /*batch=*/false, options);
}

Status Scatter(const KvCacheView& view, uint64_t chunk_size, const uint8_t* object,
               uint64_t object_size, BlockIdSpan block_ids, uint64_t num_tokens,
               uint64_t skip_tokens, const CopyOptions& options) {
  ChunkCopy chunk;
  chunk.block_ids = block_ids;
  chunk.num_tokens = num_tokens;
  chunk.skip_tokens = skip_tokens;
  // Scatter only reads the object; ChunkCopy is shared with GatherBatch, hence the cast.
  chunk.object = const_cast<uint8_t*>(object);
  chunk.object_size = object_size;
  return RunCopies(view, chunk_size, &chunk, 1, /*scatter=*/true, /*batch=*/false, options);
}

Status GatherBatch(const KvCacheView& view, uint64_t chunk_size,
                   const std::vector<ChunkCopy>& chunks, const CopyOptions& options) {
  return RunCopies(view, chunk_size, chunks.data(), chunks.size(), /*scatter=*/false,
                   /*batch=*/true, options);
}

Status ScatterBatch(const KvCacheView& view, uint64_t chunk_size,
                    const std::vector<ChunkCopy>& chunks, const CopyOptions& options) {
  return RunCopies(view, chunk_size, chunks.data(), chunks.size(), /*scatter=*/true,
                   /*batch=*/true, options);
}

// ------------------------------------------------------------------------------------------
// CopyThreadPool

struct CopyThreadPool::Job {
  Job(const std::function<void(size_t)>* t, size_t n, size_t helpers)
      : task(t), num_tasks(n), helpers_wanted(helpers) {}

  // Valid while some task index < num_tasks has not finished (the caller waits for that).
  const std::function<void(size_t)>* const task;
  const size_t num_tasks;
  std::atomic<size_t> next{0};  // next task index to hand out
  std::atomic<size_t> done{0};  // tasks finished
  size_t helpers_wanted;        // guarded by the pool's mu_: workers still to join
  std::mutex mu;
  std::condition_variable cv;  // finished became true
  bool finished = false;       // guarded by mu
};

CopyThreadPool::CopyThreadPool(size_t num_workers)
    : num_workers_(num_workers), creator_pid_(static_cast<int>(getpid())) {
  threads_.reserve(num_workers);
  for (size_t i = 0; i < num_workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

CopyThreadPool::~CopyThreadPool() { Stop(); }

CopyThreadPool* CopyThreadPool::Default() {
  // Leaked on purpose: joining workers from a static destructor at exit is not worth the risk.
  static CopyThreadPool* const pool = [] {
    const size_t hw = std::thread::hardware_concurrency();
    return new CopyThreadPool(std::min<size_t>(hw > 1 ? hw - 1 : 0, 63));
  }();
  return pool;
}

void CopyThreadPool::RunTasks(Job& job) {
  size_t completed = 0;
  for (;;) {
    const size_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.num_tasks) break;
    (*job.task)(i);
    ++completed;
  }
  if (completed == 0) return;
  // acq_rel: the last finisher sees every other finisher's writes, and publishes all of them.
  if (job.done.fetch_add(completed, std::memory_order_acq_rel) + completed == job.num_tasks) {
    std::lock_guard<std::mutex> lock(job.mu);
    job.finished = true;
    job.cv.notify_all();
  }
}

void CopyThreadPool::ParallelFor(size_t num_tasks, size_t max_threads,
                                 const std::function<void(size_t)>& task) {
  if (num_tasks == 0) return;
  const size_t threads = max_threads == 0 ? num_workers_ + 1 : max_threads;
  const size_t helpers = std::min({threads - 1, num_workers_, num_tasks - 1});
  bool inline_only = helpers == 0 || static_cast<int>(getpid()) != creator_pid_;
  std::shared_ptr<Job> job;
  if (!inline_only) {
    job = std::make_shared<Job>(&task, num_tasks, helpers);
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      inline_only = true;
    } else {
      queue_.push_back(job);
    }
  }
  if (inline_only) {
    for (size_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  if (helpers >= num_workers_) {
    work_cv_.notify_all();
  } else {
    for (size_t h = 0; h < helpers; ++h) work_cv_.notify_one();
  }
  RunTasks(*job);
  {
    // Every index is handed out: no worker needs to find this job any more.
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(queue_.begin(), queue_.end(), job);
    if (it != queue_.end()) queue_.erase(it);
  }
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->finished; });
}

void CopyThreadPool::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;  // queued jobs are finished by their callers
      job = queue_.front();
      if (--job->helpers_wanted == 0) queue_.pop_front();
    }
    RunTasks(*job);
  }
}

void CopyThreadPool::Stop() {
  std::lock_guard<std::mutex> stop_lock(stop_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

}  // namespace lmcache_cpp
