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
// Checksums: gather_batch(..., checksums=True) also returns one CRC32C per chunk (a list of ints,
// in chunk order): the checksum of the object's first object_bytes(chunk_size) bytes as the copy
// left them, computed while copying (ChunkCopy::crc32c). The CRCs live in a C++ vector owned by
// the call until the copy has finished; the list is built afterwards, with the GIL held.
//
// GIL: every argument is converted to C++ values first; the copy itself runs with the GIL
// released. Errors of the core raise InvalidArgumentError (lmcache_cpp.errors).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "bind_kv_view.h"
#include "lmcache_cpp/kv_copy.h"

namespace lmcache_cpp::bindings {

void BindKvCopy(nb::module_& m);

namespace {

using namespace nb::literals;

using AnyCpuArray = nb::ndarray<nb::device::cpu>;
using OutObject = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using InObject = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// ------------------------------------------------------------------------------------------
// Engine tensors -> KvCacheView.

// Python "KvCacheView": the core view plus the arrays that keep the engine memory alive.
struct PyKvCacheView {
  KvCacheView view;
  std::vector<AnyCpuArray> arrays;
};

void MakeView(PyKvCacheView* self, nb::handle tensors, KvLayout layout) {
  std::vector<AnyCpuArray> arrays = CastLayers<AnyCpuArray>(
      tensors, "a writable CPU array (a numpy array or a torch CPU tensor)");
  KvCacheView view = ViewOfLayers(arrays, layout);
  new (self) PyKvCacheView{std::move(view), std::move(arrays)};
}

CopyOptions MakeOptions(size_t num_threads) {
  CopyOptions options;
  options.num_threads = num_threads;
  return options;
}

// ------------------------------------------------------------------------------------------
// Copies.

void GatherOne(const PyKvCacheView& self, uint64_t chunk_size, nb::handle block_ids, OutObject out,
               std::optional<uint64_t> num_tokens, size_t num_threads) {
  BlockIdBuffer ids(block_ids);
  const uint64_t tokens = TokensOrAll(self.view.layout, num_tokens, ids.span());
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
  const uint64_t tokens = TokensOrAll(self.view.layout, num_tokens, ids.span());
  Status st;
  {
    nb::gil_scoped_release release;
    st = Scatter(self.view, chunk_size, object.data(), object.shape(0), ids.span(), tokens,
                 skip_tokens, MakeOptions(num_threads));
  }
  ThrowIfError(st);
}

// None, or with `checksums` the CRC32C of every chunk's object (returned as list[int]).
std::optional<std::vector<uint32_t>> GatherMany(const PyKvCacheView& self, uint64_t chunk_size,
                                                nb::handle block_ids, nb::handle objects,
                                                std::optional<std::vector<uint64_t>> num_tokens,
                                                size_t num_threads, bool checksums) {
  ChunkArgs<OutObject> args;
  ConvertChunks(self.view.layout, block_ids, objects, num_tokens, std::nullopt,
                "a writable 1-D C-contiguous uint8 CPU array", &args);
  std::vector<uint32_t> crcs;
  if (checksums) {
    crcs.assign(args.chunks.size(), 0);
    for (size_t c = 0; c < args.chunks.size(); ++c) args.chunks[c].crc32c = &crcs[c];
  }
  Status st;
  {
    nb::gil_scoped_release release;
    st = GatherBatch(self.view, chunk_size, args.chunks, MakeOptions(num_threads));
  }
  ThrowIfError(st);
  if (!checksums) return std::nullopt;
  return crcs;
}

void ScatterMany(const PyKvCacheView& self, uint64_t chunk_size, nb::handle objects,
                 nb::handle block_ids, std::optional<std::vector<uint64_t>> num_tokens,
                 std::optional<std::vector<uint64_t>> skip_tokens, size_t num_threads) {
  ChunkArgs<InObject> args;
  ConvertChunks(self.view.layout, block_ids, objects, num_tokens, skip_tokens,
                "a 1-D C-contiguous uint8 CPU array", &args);
  Status st;
  {
    nb::gil_scoped_release release;
    st = ScatterBatch(self.view, chunk_size, args.chunks, MakeOptions(num_threads));
  }
  ThrowIfError(st);
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
      .def(LayoutQueries())
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
           "checksums"_a = false,
           "gather for several chunks in one call; all are validated before any is copied. "
           "Returns None, or with checksums=True a list of one CRC32C (Castagnoli) per chunk: "
           "the checksum of the object's first object_bytes(chunk_size) bytes after the copy, "
           "computed while copying; every chunk must then be whole (num_tokens == chunk_size). "
           "GIL released.")
      .def("scatter_batch", &ScatterMany, "chunk_size"_a, "objects"_a, "block_ids"_a,
           "num_tokens"_a.none() = nb::none(), "skip_tokens"_a.none() = nb::none(), nb::kw_only(),
           "num_threads"_a = 0,
           "scatter for several chunks in one call; all are validated before any is copied.")
      .def("__repr__",
           [](const PyKvCacheView& v) { return "KvCacheView(" + LayoutRepr(v.view.layout) + ")"; });
}

}  // namespace lmcache_cpp::bindings
