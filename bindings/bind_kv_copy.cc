// Copyright (c) lmcache_cpp authors. Licensed under the Apache License 2.0.
//
// Bindings of kv_copy.h: KvLayout, KvCacheLayout and KvCacheView with gather / scatter and their
// batch forms.
//
// Engine tensors. KvCacheView takes the engine's per-layer tensors as nb::ndarray of any dtype on
// the CPU: numpy arrays, and torch CPU tensors (any dtype, bfloat16 included) through DLPack,
// without linking libtorch. The layout is read from the arrays themselves: shape, strides (which
// may pad the block dimension or place K and V anywhere) and element size (dtype bits * lanes /
// 8); every layer must have the same shape, strides and dtype, and the bytes of one block plane
// must be C-contiguous. The view keeps every layer's ndarray, hence the memory, alive.
//
// Objects are 1-D C-contiguous uint8 CPU arrays (an arena view from Arena.view or ObjectTable.view,
// a numpy array, a torch uint8 tensor); gather needs them writable. They are never converted:
// a wrong dtype or layout is a TypeError rather than a copy that would silently drop the bytes.
// Block ids: a 1-D int32 or int64 array (C-contiguous ones are read in place), any other 1-D
// integer array, or a sequence of ints.
//
// GIL: every argument is converted to C++ values first; the copy itself runs with the GIL
// released. Errors of the core raise InvalidArgumentError (lmcache_cpp.errors).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

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

void BindKvCopy(nb::module_& m);

namespace {

using namespace nb::literals;

using AnyCpuArray = nb::ndarray<nb::device::cpu>;
using OutObject = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using InObject = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

[[noreturn]] void Invalid(const std::string& message) {
  throw StatusError(Status::InvalidArgument(message));
}

// ------------------------------------------------------------------------------------------
// Block ids.

template <typename T>
void CopyIds(const void* data, int64_t stride, size_t n, std::vector<int64_t>* out) {
  const T* p = static_cast<const T*>(data);
  out->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const T v = p[static_cast<int64_t>(i) * stride];
    if constexpr (std::is_unsigned_v<T> && sizeof(T) == sizeof(int64_t)) {
      if (v > static_cast<T>(std::numeric_limits<int64_t>::max())) {
        Invalid("block id " + std::to_string(v) + " at position " + std::to_string(i) +
                " is out of range");
      }
    }
    (*out)[i] = static_cast<int64_t>(v);
  }
}

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
      switch (dt.bits) {
        case 8:
          is_int ? CopyIds<int8_t>(any.data(), stride, n, &converted_)
                 : CopyIds<uint8_t>(any.data(), stride, n, &converted_);
          break;
        case 16:
          is_int ? CopyIds<int16_t>(any.data(), stride, n, &converted_)
                 : CopyIds<uint16_t>(any.data(), stride, n, &converted_);
          break;
        case 32:
          is_int ? CopyIds<int32_t>(any.data(), stride, n, &converted_)
                 : CopyIds<uint32_t>(any.data(), stride, n, &converted_);
          break;
        case 64:
          is_int ? CopyIds<int64_t>(any.data(), stride, n, &converted_)
                 : CopyIds<uint64_t>(any.data(), stride, n, &converted_);
          break;
        default: throw nb::type_error("block ids: unsupported integer width");
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

// ------------------------------------------------------------------------------------------
// Engine tensors -> KvCacheView.

// Python "KvCacheView": the core view plus the arrays that keep the engine memory alive.
struct PyKvCacheView {
  KvCacheView view;
  std::vector<AnyCpuArray> arrays;
};

uint32_t CheckedU32(size_t v, const char* what) {
  if (v == 0 || v > std::numeric_limits<uint32_t>::max()) {
    Invalid(std::string(what) + " must be in [1, 2**32), got " + std::to_string(v));
  }
  return static_cast<uint32_t>(v);
}

std::string ShapeString(const AnyCpuArray& a) {
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

Dims DimsOf(KvLayout layout) {
  switch (layout) {
    case KvLayout::kNHD: return {5, 0, 1, 2, 3, 4};
    case KvLayout::kHND: return {5, 0, 1, 3, 2, 4};
    case KvLayout::kFlashInfer: return {5, 1, 0, 2, 3, 4};
    case KvLayout::kMLA: return {3, -1, 0, 1, -1, 2};
  }
  Invalid("unknown KV layout " + std::to_string(static_cast<int>(layout)));
}

void MakeView(PyKvCacheView* self, nb::handle tensors, KvLayout layout) {
  const Dims dims = DimsOf(layout);
  const char* name = KvLayoutName(layout);
  if (!nb::isinstance<nb::sequence>(tensors) || nb::isinstance<nb::str>(tensors)) {
    throw nb::type_error("tensors must be a sequence of per-layer arrays");
  }
  std::vector<AnyCpuArray> arrays;
  for (nb::handle item : nb::iter(tensors)) {
    AnyCpuArray a;
    if (!nb::try_cast(item, a, /*convert=*/false)) {
      throw nb::type_error(("layer " + std::to_string(arrays.size()) +
                            ": expected a writable CPU array (a numpy array or a torch CPU "
                            "tensor), got " +
                            std::string(nb::type_name(item.type()).c_str()))
                               .c_str());
    }
    arrays.push_back(std::move(a));
  }
  if (arrays.empty()) Invalid("tensors: at least one layer is needed");
  const AnyCpuArray& first = arrays[0];
  if (first.ndim() != dims.ndim) {
    Invalid(std::string("a ") + name + " layer tensor has " + std::to_string(dims.ndim) +
            " dimensions; got shape " + ShapeString(first));
  }
  if (dims.plane >= 0 && first.shape(dims.plane) != 2) {
    Invalid(std::string("dimension ") + std::to_string(dims.plane) + " of a " + name +
            " layer tensor is K/V and must be 2; got shape " + ShapeString(first));
  }
  const nb::dlpack::dtype dt = first.dtype();
  const size_t bits = size_t{dt.bits} * dt.lanes;
  if (bits == 0 || bits % 8 != 0) {
    Invalid("layer tensors must have whole-byte elements; got " + std::to_string(bits) + " bits");
  }
  const size_t element_size = bits / 8;
  for (size_t l = 1; l < arrays.size(); ++l) {
    const AnyCpuArray& a = arrays[l];
    bool same = a.ndim() == first.ndim() && a.dtype() == dt;
    for (size_t d = 0; same && d < a.ndim(); ++d) {
      same = a.shape(d) == first.shape(d) && (a.shape(d) == 1 || a.stride(d) == first.stride(d));
    }
    if (!same) {
      Invalid("layer " + std::to_string(l) + " differs from layer 0 in shape, strides or dtype (" +
              ShapeString(a) + " vs " + ShapeString(first) + ")");
    }
  }
  // A block plane ([BS, H, D], [H, BS, D] or [BS, D]: the dimensions after the block one, less
  // the K/V one) must be C-contiguous. Strides are in elements; size-1 dimensions are free.
  int64_t expected = 1;
  for (int d = static_cast<int>(dims.ndim) - 1; d >= 0; --d) {
    if (d == dims.plane || d == dims.block) continue;
    if (first.shape(d) != 1 && first.stride(d) != expected) {
      Invalid(std::string("the bytes of one block of a ") + name +
              " layer tensor must be contiguous (dimension " + std::to_string(d) + " has stride " +
              std::to_string(first.stride(d)) + " elements, expected " + std::to_string(expected) +
              ")");
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
  if (lay.num_blocks == 0) Invalid("layer tensors have no blocks");
  // Byte strides. In the core 0 means "dense", so a real stride of 0 (aliasing blocks or
  // planes, e.g. an expanded tensor) must be refused rather than passed on.
  const int64_t block_stride = first.stride(dims.block);
  if (lay.num_blocks > 1) {
    if (block_stride <= 0) {
      Invalid("the block dimension must have a positive stride; got " +
              std::to_string(block_stride));
    }
    lay.block_stride = static_cast<uint64_t>(block_stride) * element_size;
  }
  if (dims.plane >= 0) {
    const int64_t plane_stride = first.stride(dims.plane);
    if (plane_stride <= 0) {
      Invalid("the K/V dimension must have a positive stride; got " + std::to_string(plane_stride));
    }
    lay.plane_stride = static_cast<uint64_t>(plane_stride) * element_size;
  }
  KvCacheView view;
  view.layout = lay;
  for (const AnyCpuArray& a : arrays) {
    view.layers.push_back(static_cast<uint8_t*>(a.data()));
  }
  ThrowIfError(view.Validate());
  new (self) PyKvCacheView{std::move(view), std::move(arrays)};
}

CopyOptions MakeOptions(size_t num_threads) {
  CopyOptions options;
  options.num_threads = num_threads;
  return options;
}

uint64_t TokensOrAll(const KvCacheView& view, std::optional<uint64_t> num_tokens,
                     const BlockIdSpan& ids) {
  return num_tokens.value_or(uint64_t{ids.size()} * view.layout.block_size);
}

// ------------------------------------------------------------------------------------------
// Copies.

void GatherOne(const PyKvCacheView& self, uint64_t chunk_size, nb::handle block_ids, OutObject out,
               std::optional<uint64_t> num_tokens, size_t num_threads) {
  BlockIdBuffer ids(block_ids);
  const uint64_t tokens = TokensOrAll(self.view, num_tokens, ids.span());
  Status st;
  {
    nb::gil_scoped_release release;
    st = Gather(self.view, chunk_size, ids.span(), tokens, out.data(), out.shape(0),
                MakeOptions(num_threads));
  }
  ThrowIfError(st);
}

void ScatterOne(const PyKvCacheView& self, uint64_t chunk_size, InObject object,
                nb::handle block_ids, std::optional<uint64_t> num_tokens, uint64_t skip_tokens,
                size_t num_threads) {
  BlockIdBuffer ids(block_ids);
  const uint64_t tokens = TokensOrAll(self.view, num_tokens, ids.span());
  Status st;
  {
    nb::gil_scoped_release release;
    st = Scatter(self.view, chunk_size, object.data(), object.shape(0), ids.span(), tokens,
                 skip_tokens, MakeOptions(num_threads));
  }
  ThrowIfError(st);
}

// Converts the per-chunk arguments of a batch. `skip_tokens` only for scatter.
struct BatchArgs {
  std::vector<BlockIdBuffer> ids;
  std::vector<OutObject> outs;  // gather: the objects, writable
  std::vector<InObject> ins;    // scatter: the objects
  std::vector<ChunkCopy> chunks;
};

void ConvertBatch(const PyKvCacheView& self, nb::handle block_ids, nb::handle objects,
                  std::optional<std::vector<uint64_t>> num_tokens,
                  std::optional<std::vector<uint64_t>> skip_tokens, bool writable,
                  BatchArgs* args) {
  if (!nb::isinstance<nb::sequence>(block_ids) || !nb::isinstance<nb::sequence>(objects)) {
    throw nb::type_error("block_ids and objects must be sequences (one entry per chunk)");
  }
  for (nb::handle ids : nb::iter(block_ids)) args->ids.emplace_back(ids);
  std::vector<std::pair<uint8_t*, uint64_t>> spans;  // each object's data and size
  for (nb::handle obj : nb::iter(objects)) {
    const std::string what = "objects[" + std::to_string(spans.size()) + "]";
    if (writable) {
      OutObject out;
      if (!nb::try_cast(obj, out, /*convert=*/false)) {
        throw nb::type_error(
            (what + " must be a writable 1-D C-contiguous uint8 CPU array").c_str());
      }
      spans.emplace_back(out.data(), out.shape(0));
      args->outs.push_back(std::move(out));
    } else {
      InObject in;
      if (!nb::try_cast(obj, in, /*convert=*/false)) {
        throw nb::type_error((what + " must be a 1-D C-contiguous uint8 CPU array").c_str());
      }
      // The core only reads the objects of a scatter.
      spans.emplace_back(const_cast<uint8_t*>(in.data()), in.shape(0));
      args->ins.push_back(std::move(in));
    }
  }
  const size_t n = args->ids.size();
  if (spans.size() != n) {
    Invalid(std::to_string(n) + " block id lists for " + std::to_string(spans.size()) + " objects");
  }
  if (num_tokens && num_tokens->size() != n) {
    Invalid("num_tokens has " + std::to_string(num_tokens->size()) + " entries for " +
            std::to_string(n) + " chunks");
  }
  if (skip_tokens && skip_tokens->size() != n) {
    Invalid("skip_tokens has " + std::to_string(skip_tokens->size()) + " entries for " +
            std::to_string(n) + " chunks");
  }
  args->chunks.resize(n);
  for (size_t c = 0; c < n; ++c) {
    ChunkCopy& cc = args->chunks[c];
    cc.block_ids = args->ids[c].span();
    cc.num_tokens =
        num_tokens ? (*num_tokens)[c] : uint64_t{cc.block_ids.size()} * self.view.layout.block_size;
    cc.skip_tokens = skip_tokens ? (*skip_tokens)[c] : 0;
    cc.object = spans[c].first;
    cc.object_size = spans[c].second;
  }
}

void GatherMany(const PyKvCacheView& self, uint64_t chunk_size, nb::handle block_ids,
                nb::handle objects, std::optional<std::vector<uint64_t>> num_tokens,
                size_t num_threads) {
  BatchArgs args;
  ConvertBatch(self, block_ids, objects, std::move(num_tokens), std::nullopt, true, &args);
  Status st;
  {
    nb::gil_scoped_release release;
    st = GatherBatch(self.view, chunk_size, args.chunks, MakeOptions(num_threads));
  }
  ThrowIfError(st);
}

void ScatterMany(const PyKvCacheView& self, uint64_t chunk_size, nb::handle objects,
                 nb::handle block_ids, std::optional<std::vector<uint64_t>> num_tokens,
                 std::optional<std::vector<uint64_t>> skip_tokens, size_t num_threads) {
  BatchArgs args;
  ConvertBatch(self, block_ids, objects, std::move(num_tokens), std::move(skip_tokens), false,
               &args);
  Status st;
  {
    nb::gil_scoped_release release;
    st = ScatterBatch(self.view, chunk_size, args.chunks, MakeOptions(num_threads));
  }
  ThrowIfError(st);
}

std::string LayoutRepr(const KvCacheLayout& l) {
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

}  // namespace

void BindKvCopy(nb::module_& m) {
  nb::enum_<KvLayout>(m, "KvLayout", nb::is_arithmetic(),
                      "Per-layer engine KV tensor layouts: NHD [2, NB, BS, H, D], HND "
                      "[2, NB, H, BS, D], FLASHINFER [NB, 2, BS, H, D], MLA [NB, BS, D].")
      .value("NHD", KvLayout::kNHD)
      .value("HND", KvLayout::kHND)
      .value("FLASHINFER", KvLayout::kFlashInfer)
      .value("MLA", KvLayout::kMLA);

  nb::class_<KvCacheLayout>(m, "KvCacheLayout",
                            "The shape of an engine's per-layer KV tensors; strides in bytes, 0 = "
                            "dense. Defines the object format through its fingerprint.")
      .def(
          "__init__",
          [](KvCacheLayout* self, KvLayout layout, uint32_t num_layers, uint32_t block_size,
             uint32_t num_heads, uint32_t head_size, uint32_t element_size, uint64_t num_blocks,
             uint64_t block_stride, uint64_t plane_stride) {
            new (self) KvCacheLayout{layout,       num_layers, block_size,   num_heads,   head_size,
                                     element_size, num_blocks, block_stride, plane_stride};
          },
          "layout"_a, "num_layers"_a, "block_size"_a, "num_heads"_a, "head_size"_a,
          "element_size"_a, "num_blocks"_a, "block_stride"_a = 0, "plane_stride"_a = 0)
      .def_rw("layout", &KvCacheLayout::layout)
      .def_rw("num_layers", &KvCacheLayout::num_layers)
      .def_rw("block_size", &KvCacheLayout::block_size)
      .def_rw("num_heads", &KvCacheLayout::num_heads)
      .def_rw("head_size", &KvCacheLayout::head_size)
      .def_rw("element_size", &KvCacheLayout::element_size)
      .def_rw("num_blocks", &KvCacheLayout::num_blocks)
      .def_rw("block_stride", &KvCacheLayout::block_stride, "bytes; 0 = dense")
      .def_rw("plane_stride", &KvCacheLayout::plane_stride, "bytes; 0 = dense (must be 0 for MLA)")
      .def_prop_ro("num_planes", &KvCacheLayout::num_planes, "2, or 1 for MLA")
      .def(
          "validate", [](const KvCacheLayout& l) { ThrowIfError(l.Validate()); },
          "Raises InvalidArgumentError when the description is inconsistent.")
      .def(
          "block_plane_bytes",
          [](const KvCacheLayout& l) {
            ThrowIfError(l.Validate());
            return l.BlockPlaneBytes();
          },
          "Bytes of one block of one plane (BS * H * D * element_size).")
      .def(
          "object_bytes",
          [](const KvCacheLayout& l, uint64_t chunk_size) {
            return ValueOrThrow(l.ObjectBytes(chunk_size));
          },
          "chunk_size"_a, "Bytes of one object of chunk_size tokens.")
      .def("fingerprint", &KvCacheLayout::Fingerprint,
           "The object format, e.g. 'nhd:L32:BS16:H8:D128:E2' (for the hash namespace).")
      .def("__repr__", &LayoutRepr);

  nb::class_<PyKvCacheView>(
      m, "KvCacheView",
      "An engine's per-layer KV tensors (numpy arrays or torch CPU tensors of any dtype), for "
      "gathering blocks into chunk objects and scattering them back. Keeps the tensors alive.")
      .def(
          "__init__",
          [](PyKvCacheView* self, nb::handle tensors, KvLayout layout) {
            MakeView(self, tensors, layout);
          },
          "tensors"_a, "layout"_a)
      .def_prop_ro(
          "layout", [](const PyKvCacheView& v) { return v.view.layout; },
          "The KvCacheLayout read from the tensors (a copy).")
      .def(
          "fingerprint", [](const PyKvCacheView& v) { return v.view.layout.Fingerprint(); },
          "The object format of this engine, for the hash namespace.")
      .def(
          "object_bytes",
          [](const PyKvCacheView& v, uint64_t chunk_size) {
            return ValueOrThrow(v.view.layout.ObjectBytes(chunk_size));
          },
          "chunk_size"_a, "Bytes of one object of chunk_size tokens.")
      .def("gather", &GatherOne, "chunk_size"_a, "block_ids"_a, "out"_a.noconvert(),
           "num_tokens"_a.none() = nb::none(), nb::kw_only(), "num_threads"_a = 0,
           "Copies the blocks holding the chunk's first num_tokens tokens (default: "
           "len(block_ids) * block_size) into the object `out`. GIL released.")
      .def("scatter", &ScatterOne, "chunk_size"_a, "object"_a.noconvert(), "block_ids"_a,
           "num_tokens"_a.none() = nb::none(), "skip_tokens"_a = 0, nb::kw_only(),
           "num_threads"_a = 0,
           "Copies an object into the engine blocks, leaving the chunk's first skip_tokens "
           "tokens untouched. GIL released.")
      .def("gather_batch", &GatherMany, "chunk_size"_a, "block_ids"_a, "objects"_a,
           "num_tokens"_a.none() = nb::none(), nb::kw_only(), "num_threads"_a = 0,
           "gather for several chunks in one call; all are validated before any is copied.")
      .def("scatter_batch", &ScatterMany, "chunk_size"_a, "objects"_a, "block_ids"_a,
           "num_tokens"_a.none() = nb::none(), "skip_tokens"_a.none() = nb::none(), nb::kw_only(),
           "num_threads"_a = 0,
           "scatter for several chunks in one call; all are validated before any is copied.")
      .def("__repr__",
           [](const PyKvCacheView& v) { return "KvCacheView(" + LayoutRepr(v.view.layout) + ")"; });
}

}  // namespace lmcache_cpp::bindings
