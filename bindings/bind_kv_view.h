// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Shared glue of the KV copy bindings (bind_kv_copy.cc for the CPU kernels, bind_cuda.cc for the
// GPU ones): block ids from Python, a KvCacheView read off per-layer arrays (shape, strides and
// element size, whichever device they live on), and the per-chunk arguments of a batch.
//
// Every function here runs with the GIL held and reports bad input as TypeError (wrong kind of
// object) or StatusError(InvalidArgument) (right kind, wrong values).
#ifndef LMCACHE_CPP_BINDINGS_BIND_KV_VIEW_H_
#define LMCACHE_CPP_BINDINGS_BIND_KV_VIEW_H_

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "lmcache_cpp/kv_copy.h"

namespace lmcache_cpp::bindings {

[[noreturn]] inline void ThrowInvalid(const std::string& message) {
  throw StatusError(Status::InvalidArgument(message));
}

// ------------------------------------------------------------------------------------------
// Block ids.

// The range check of block ids copied into int64 (CopyStrided): only uint64 ones can fall out.
struct CheckBlockId {
  template <typename T>
  void operator()(T v, size_t i) const {
    if constexpr (std::is_unsigned_v<T> && sizeof(T) == sizeof(int64_t)) {
      if (v > static_cast<T>(std::numeric_limits<int64_t>::max())) {
        ThrowInvalid("block id " + std::to_string(v) + " at position " + std::to_string(i) +
                     " is out of range");
      }
    }
  }
};

// Block ids from Python as a BlockIdSpan. C-contiguous int32/int64 CPU arrays are used in place.
// REQUIRES: the GIL is held while constructing and destroying; span() may be read without it.
class BlockIdBuffer {
 public:
  explicit BlockIdBuffer(nb::handle ids) {
    if (nb::try_cast(ids, i32_, /*convert=*/false)) {
      kind_ = Kind::kInt32;
      return;
    }
    if (nb::try_cast(ids, i64_, /*convert=*/false)) {
      kind_ = Kind::kInt64;
      return;
    }
    nb::ndarray<nb::ro, nb::ndim<1>, nb::device::cpu> any;
    if (nb::try_cast(ids, any, /*convert=*/false)) {
      const nb::dlpack::dtype dt = any.dtype();
      const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
      const bool is_int = code == nb::dlpack::dtype_code::Int;
      const bool is_uint = code == nb::dlpack::dtype_code::UInt;
      if (dt.lanes != 1 || !(is_int || is_uint)) {
        throw nb::type_error("block ids must be a 1-D array of integers");
      }
      const size_t n = any.shape(0);
      const int64_t stride = any.stride(0);
      if (!CopyStridedIntegers(dt.bits, is_int, any.data(), stride, n, &converted_,
                               CheckBlockId{})) {
        throw nb::type_error("block ids: unsupported integer width");
      }
      return;
    }
    if (!nb::try_cast(ids, converted_, /*convert=*/false)) {
      throw nb::type_error(
          "block ids must be a 1-D integer array (numpy or torch CPU; int32/int64 are used without "
          "a copy) or a sequence of ints");
    }
  }

  // Computed on each call, so copies and moves of the buffer stay valid.
  BlockIdSpan span() const noexcept {
    switch (kind_) {
      case Kind::kInt32: return BlockIdSpan(i32_.data(), i32_.shape(0));
      case Kind::kInt64: return BlockIdSpan(i64_.data(), i64_.shape(0));
      case Kind::kConverted: break;
    }
    return BlockIdSpan(converted_);
  }

 private:
  enum class Kind { kInt32, kInt64, kConverted };
  Kind kind_ = Kind::kConverted;
  nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> i32_;
  nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> i64_;
  std::vector<int64_t> converted_;
};

// num_tokens, or every token of the given blocks.
inline uint64_t TokensOrAll(const KvCacheLayout& layout, std::optional<uint64_t> num_tokens,
                            const BlockIdSpan& ids) {
  return num_tokens.value_or(uint64_t{ids.size()} * layout.block_size);
}

// ------------------------------------------------------------------------------------------
// Engine tensors -> KvCacheView.

inline uint32_t CheckedU32(size_t v, const char* what) {
  if (v == 0 || v > std::numeric_limits<uint32_t>::max()) {
    ThrowInvalid(std::string(what) + " must be in [1, 2**32), got " + std::to_string(v));
  }
  return static_cast<uint32_t>(v);
}

template <typename Array>
std::string ShapeString(const Array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Which dimension of the tensor is what, per layout.
struct Dims {
  size_t ndim;
  int plane;  // -1: none (MLA)
  int block;
  int tokens;
  int heads;  // -1: none (MLA)
  int head_size;
};

inline Dims DimsOf(KvLayout layout) {
  switch (layout) {
    case KvLayout::kNHD: return {5, 0, 1, 2, 3, 4};
    case KvLayout::kHND: return {5, 0, 1, 3, 2, 4};
    case KvLayout::kFlashInfer: return {5, 1, 0, 2, 3, 4};
    case KvLayout::kMLA: return {3, -1, 0, 1, -1, 2};
  }
  ThrowInvalid("unknown KV layout " + std::to_string(static_cast<int>(layout)));
}

// The items of `tensors` as `Array`s (no conversion); TypeError names the first that is not one,
// saying it should be `expected` (e.g. "a writable CPU array").
template <typename Array>
std::vector<Array> CastLayers(nb::handle tensors, const char* expected) {
  if (!nb::isinstance<nb::sequence>(tensors) || nb::isinstance<nb::str>(tensors)) {
    throw nb::type_error("tensors must be a sequence of per-layer arrays");
  }
  std::vector<Array> arrays;
  for (nb::handle item : nb::iter(tensors)) {
    Array a;
    if (!nb::try_cast(item, a, /*convert=*/false)) {
      throw nb::type_error(("layer " + std::to_string(arrays.size()) + ": expected " + expected +
                            ", got " + std::string(nb::type_name(item.type()).c_str()))
                               .c_str());
    }
    arrays.push_back(std::move(a));
  }
  return arrays;
}

// The KvCacheView of per-layer arrays of `layout`: every layer of the same shape, strides and
// dtype, block planes C-contiguous, strides positive. The view points into the arrays; the caller
// keeps them alive. InvalidArgument (as StatusError) for anything else.
template <typename Array>
KvCacheView ViewOfLayers(const std::vector<Array>& arrays, KvLayout layout) {
  const Dims dims = DimsOf(layout);
  const char* name = KvLayoutName(layout);
  if (arrays.empty()) ThrowInvalid("tensors: at least one layer is needed");
  const Array& first = arrays[0];
  if (first.ndim() != dims.ndim) {
    ThrowInvalid(std::string("a ") + name + " layer tensor has " + std::to_string(dims.ndim) +
                 " dimensions; got shape " + ShapeString(first));
  }
  if (dims.plane >= 0 && first.shape(dims.plane) != 2) {
    ThrowInvalid(std::string("dimension ") + std::to_string(dims.plane) + " of a " + name +
                 " layer tensor is K/V and must be 2; got shape " + ShapeString(first));
  }
  const nb::dlpack::dtype dt = first.dtype();
  const size_t bits = size_t{dt.bits} * dt.lanes;
  if (bits == 0 || bits % 8 != 0) {
    ThrowInvalid("layer tensors must have whole-byte elements; got " + std::to_string(bits) +
                 " bits");
  }
  const size_t element_size = bits / 8;
  for (size_t l = 1; l < arrays.size(); ++l) {
    const Array& a = arrays[l];
    bool same = a.ndim() == first.ndim() && a.dtype() == dt &&
                a.device_type() == first.device_type() && a.device_id() == first.device_id();
    for (size_t d = 0; same && d < a.ndim(); ++d) {
      same = a.shape(d) == first.shape(d) && (a.shape(d) == 1 || a.stride(d) == first.stride(d));
    }
    if (!same) {
      ThrowInvalid("layer " + std::to_string(l) +
                   " differs from layer 0 in shape, strides, dtype or device (" + ShapeString(a) +
                   " vs " + ShapeString(first) + ")");
    }
  }
  // A block plane ([BS, H, D], [H, BS, D] or [BS, D]: the dimensions after the block one, less
  // the K/V one) must be C-contiguous. Strides are in elements; size-1 dimensions are free.
  int64_t expected = 1;
  for (int d = static_cast<int>(dims.ndim) - 1; d >= 0; --d) {
    if (d == dims.plane || d == dims.block) continue;
    if (first.shape(d) != 1 && first.stride(d) != expected) {
      ThrowInvalid(std::string("the bytes of one block of a ") + name +
                   " layer tensor must be contiguous (dimension " + std::to_string(d) +
                   " has stride " + std::to_string(first.stride(d)) + " elements, expected " +
                   std::to_string(expected) + ")");
    }
    expected *= static_cast<int64_t>(first.shape(d));
  }
  KvCacheLayout lay;
  lay.layout = layout;
  lay.num_layers = CheckedU32(arrays.size(), "the number of layers");
  lay.block_size = CheckedU32(first.shape(dims.tokens), "the block size");
  lay.num_heads = dims.heads >= 0 ? CheckedU32(first.shape(dims.heads), "the number of heads") : 1;
  lay.head_size = CheckedU32(first.shape(dims.head_size), "the head size");
  lay.element_size = static_cast<uint32_t>(element_size);
  lay.num_blocks = first.shape(dims.block);
  if (lay.num_blocks == 0) ThrowInvalid("layer tensors have no blocks");
  // Byte strides. In the core 0 means "dense", so a real stride of 0 (aliasing blocks or
  // planes, e.g. an expanded tensor) must be refused rather than passed on.
  const int64_t block_stride = first.stride(dims.block);
  if (lay.num_blocks > 1) {
    if (block_stride <= 0) {
      ThrowInvalid("the block dimension must have a positive stride; got " +
                   std::to_string(block_stride));
    }
    lay.block_stride = static_cast<uint64_t>(block_stride) * element_size;
  }
  if (dims.plane >= 0) {
    const int64_t plane_stride = first.stride(dims.plane);
    if (plane_stride <= 0) {
      ThrowInvalid("the K/V dimension must have a positive stride; got " +
                   std::to_string(plane_stride));
    }
    lay.plane_stride = static_cast<uint64_t>(plane_stride) * element_size;
  }
  KvCacheView view;
  view.layout = lay;
  for (const Array& a : arrays) view.layers.push_back(static_cast<uint8_t*>(a.data()));
  ThrowIfError(view.Validate());
  return view;
}

// "KvCacheLayout(nhd, num_layers=..., ...)" for the bindings' __repr__.
inline std::string LayoutRepr(const KvCacheLayout& l) {
  return std::string("KvCacheLayout(") + KvLayoutName(l.layout) +
         ", num_layers=" + std::to_string(l.num_layers) +
         ", block_size=" + std::to_string(l.block_size) +
         ", num_heads=" + std::to_string(l.num_heads) +
         ", head_size=" + std::to_string(l.head_size) +
         ", element_size=" + std::to_string(l.element_size) +
         ", num_blocks=" + std::to_string(l.num_blocks) +
         ", block_stride=" + std::to_string(l.block_stride) +
         ", plane_stride=" + std::to_string(l.plane_stride) + ")";
}

// `fingerprint` and `object_bytes` of a view class (a `view` member holding a KvCacheView), as
// `cls.def(LayoutQueries())`: what the CPU and CUDA views answer alike from their layout.
struct LayoutQueries : nb::def_visitor<LayoutQueries> {
  template <typename Class, typename... Extra>
  static void execute(Class& cls, const Extra&...) {
    using V = typename Class::Type;
    cls.def(
        "fingerprint", [](const V& v) { return v.view.layout.Fingerprint(); },
        "The object format of this engine, for the hash namespace.");
    cls.def(
        "object_bytes",
        [](const V& v, uint64_t chunk_size) {
          return ValueOrThrow(v.view.layout.ObjectBytes(chunk_size));
        },
        nb::arg("chunk_size"), "Bytes of one object of chunk_size tokens.");
  }
};

// ------------------------------------------------------------------------------------------
// The per-chunk arguments of a batch.

// Converted batch arguments: `chunks` points into `ids` and `objects`, which keep the Python
// buffers alive. Object is a 1-D uint8 nb::ndarray type (const for objects only read).
template <typename Object>
struct ChunkArgs {
  std::vector<BlockIdBuffer> ids;
  std::vector<Object> objects;
  std::vector<ChunkCopy> chunks;
};

// Converts one batch: a sequence of block-id lists, a sequence of objects (each an `Object`;
// TypeError naming `expected` otherwise), optional per-chunk token counts (default: all tokens of
// the chunk's blocks) and skip counts (default 0).
template <typename Object>
void ConvertChunks(const KvCacheLayout& layout, nb::handle block_ids, nb::handle objects,
                   const std::optional<std::vector<uint64_t>>& num_tokens,
                   const std::optional<std::vector<uint64_t>>& skip_tokens, const char* expected,
                   ChunkArgs<Object>* args) {
  if (!nb::isinstance<nb::sequence>(block_ids) || !nb::isinstance<nb::sequence>(objects)) {
    throw nb::type_error("block_ids and objects must be sequences (one entry per chunk)");
  }
  for (nb::handle ids : nb::iter(block_ids)) args->ids.emplace_back(ids);
  for (nb::handle obj : nb::iter(objects)) {
    Object o;
    if (!nb::try_cast(obj, o, /*convert=*/false)) {
      throw nb::type_error(
          ("objects[" + std::to_string(args->objects.size()) + "] must be " + expected).c_str());
    }
    args->objects.push_back(std::move(o));
  }
  const size_t n = args->ids.size();
  if (args->objects.size() != n) {
    ThrowInvalid(std::to_string(n) + " block id lists for " + std::to_string(args->objects.size()) +
                 " objects");
  }
  if (num_tokens && num_tokens->size() != n) {
    ThrowInvalid("num_tokens has " + std::to_string(num_tokens->size()) + " entries for " +
                 std::to_string(n) + " chunks");
  }
  if (skip_tokens && skip_tokens->size() != n) {
    ThrowInvalid("skip_tokens has " + std::to_string(skip_tokens->size()) + " entries for " +
                 std::to_string(n) + " chunks");
  }
  args->chunks.resize(n);
  for (size_t c = 0; c < n; ++c) {
    ChunkCopy& cc = args->chunks[c];
    cc.block_ids = args->ids[c].span();
    cc.num_tokens =
        num_tokens ? (*num_tokens)[c] : uint64_t{cc.block_ids.size()} * layout.block_size;
    cc.skip_tokens = skip_tokens ? (*skip_tokens)[c] : 0;
    // The kernels only read the objects of a scatter; ChunkCopy has one pointer type for both.
    cc.object = const_cast<uint8_t*>(static_cast<const uint8_t*>(args->objects[c].data()));
    cc.object_size = args->objects[c].shape(0);
  }
}

}  // namespace lmcache_cpp::bindings

#endif  // LMCACHE_CPP_BINDINGS_BIND_KV_VIEW_H_
