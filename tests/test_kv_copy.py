"""CPU KV copy kernels through the bindings: numpy round trips for every layout and element size,
token-granular skips, padded and interleaved strides, batches, torch CPU tensors in vLLM's shapes
(bf16 and fp16 through DLPack) round-tripping through an arena object, the CRC32C checksums of
gather_batch(checksums=True) against a reference CRC32C, and argument checking."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

import lmcache_cpp as lc

LAYOUTS = [lc.KvLayout.NHD, lc.KvLayout.HND, lc.KvLayout.FLASHINFER, lc.KvLayout.MLA]
DTYPES = [np.uint8, np.float16, np.float32]  # element sizes 1, 2, 4
L, NB, BS, H, D = 3, 12, 4, 2, 8
POISON = 0xA5

Array = npt.NDArray[Any]


def shape_of(
    layout: lc.KvLayout, nb: int = NB, bs: int = BS, h: int = H, d: int = D
) -> tuple[int, ...]:
    return {
        lc.KvLayout.NHD: (2, nb, bs, h, d),
        lc.KvLayout.HND: (2, nb, h, bs, d),
        lc.KvLayout.FLASHINFER: (nb, 2, bs, h, d),
        lc.KvLayout.MLA: (nb, bs, d),
    }[layout]


def planes(layout: lc.KvLayout) -> int:
    return 1 if layout is lc.KvLayout.MLA else 2


def block_plane(t: Any, layout: lc.KvLayout, p: int, b: int) -> Any:
    """One block of one plane, in the tensor's own order ([BS,H,D], [H,BS,D] or [BS,D])."""
    if layout is lc.KvLayout.FLASHINFER:
        return t[b, p]
    if layout is lc.KvLayout.MLA:
        return t[b]
    return t[p, b]


def random_tensors(rng: np.random.Generator, layout: lc.KvLayout, dtype: Any) -> list[Array]:
    shape = shape_of(layout)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return [
        rng.integers(0, 256, nbytes, dtype=np.uint8).view(dtype).reshape(shape) for _ in range(L)
    ]


def poisoned_like(tensors: list[Array]) -> list[Array]:
    return [np.full(t.nbytes, POISON, np.uint8).view(t.dtype).reshape(t.shape) for t in tensors]


def reference_object(
    tensors: list[Array], layout: lc.KvLayout, ids: list[int], chunk_size: int
) -> Array:
    """The object format built from its definition: layer, plane, chunk block; unused slots
    keep the poison."""
    chunk_blocks = chunk_size // BS
    pieces: list[bytes] = []
    for t in tensors:
        for p in range(planes(layout)):
            for i in range(chunk_blocks):
                piece = block_plane(t, layout, p, ids[i]) if i < len(ids) else None
                nbytes = block_plane(t, layout, 0, 0).nbytes
                pieces.append(piece.tobytes() if piece is not None else bytes([POISON]) * nbytes)
    return np.frombuffer(b"".join(pieces), np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh data every run


# ---- numpy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_numpy_round_trip(layout: lc.KvLayout, dtype: Any, rng: np.random.Generator) -> None:
    src = random_tensors(rng, layout, dtype)
    view = lc.KvCacheView(src, layout)
    item = np.dtype(dtype).itemsize
    heads = 1 if layout is lc.KvLayout.MLA else H
    assert view.fingerprint() == f"{layout.name.lower()}:L{L}:BS{BS}:H{heads}:D{D}:E{item}"
    chunk = 5 * BS
    assert view.object_bytes(chunk) == L * planes(layout) * 5 * BS * heads * D * item
    ids = [int(x) for x in rng.permutation(NB)[:5]]

    obj = np.full(view.object_bytes(chunk), POISON, np.uint8)
    view.gather(chunk, np.array(ids, np.int64), obj)
    assert np.array_equal(obj, reference_object(src, layout, ids, chunk))

    dst = poisoned_like(src)
    dst_ids = [int(x) for x in rng.permutation(NB)[:5]]
    lc.KvCacheView(dst, layout).scatter(chunk, obj, dst_ids)
    for t_src, t_dst in zip(src, dst, strict=True):
        for p in range(planes(layout)):
            for b in range(NB):
                got = block_plane(t_dst, layout, p, b).tobytes()
                if b in dst_ids:
                    want = block_plane(t_src, layout, p, ids[dst_ids.index(b)]).tobytes()
                else:
                    want = bytes([POISON]) * len(got)
                assert got == want, (p, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("skip", [0, 1, BS, BS + 3, 2 * BS, 4 * BS - 1, 4 * BS])
def test_scatter_skips_leading_tokens(
    layout: lc.KvLayout, skip: int, rng: np.random.Generator
) -> None:
    old = random_tensors(rng, layout, np.float16)
    dst = [t.copy() for t in old]
    view = lc.KvCacheView(dst, layout)
    chunk = 4 * BS
    obj = rng.integers(0, 256, view.object_bytes(chunk), dtype=np.uint8)
    ids = [int(x) for x in rng.permutation(NB)[:4]]
    view.scatter(chunk, obj, np.array(ids, np.int32), skip_tokens=skip)

    # Expected: the old tensors with tokens >= skip of the chunk's blocks taken from the object.
    want = [t.copy() for t in old]
    piece_elems = block_plane(old[0], layout, 0, 0).size
    flat = obj.view(np.float16)
    for l_, t in enumerate(want):
        for p in range(planes(layout)):
            for i, b in enumerate(ids):
                start = ((l_ * planes(layout) + p) * 4 + i) * piece_elems
                src = flat[start : start + piece_elems].reshape(block_plane(t, layout, p, b).shape)
                first = max(0, skip - i * BS)  # first token of this block to write
                dest = block_plane(t, layout, p, b)
                if layout is lc.KvLayout.HND:
                    dest[:, first:] = src[:, first:]
                else:
                    dest[first:] = src[first:]
    for got, expected in zip(dst, want, strict=True):
        assert got.tobytes() == expected.tobytes()


def test_padded_and_interleaved_strides(rng: np.random.Generator) -> None:
    chunk = 3 * BS
    ids = [7, 2, 9]
    # NHD with a padded block dimension: [2, NB, BS + 1, H, D] cut to BS tokens per block.
    padded = [
        rng.standard_normal((2, NB, BS + 1, H, D)).astype(np.float32)[:, :, :BS] for _ in range(L)
    ]
    # NHD-shaped views of [NB, 2, BS, H, D] allocations (K and V of a block adjacent).
    interleaved = [
        rng.standard_normal((NB, 2, BS, H, D)).astype(np.float32).transpose(1, 0, 2, 3, 4)
        for _ in range(L)
    ]
    for tensors in (padded, interleaved):
        view = lc.KvCacheView(tensors, lc.KvLayout.NHD)
        assert view.layout.block_stride != 0
        obj = np.full(view.object_bytes(chunk), POISON, np.uint8)
        view.gather(chunk, ids, obj)
        assert np.array_equal(obj, reference_object(tensors, lc.KvLayout.NHD, ids, chunk))
        dst = [np.zeros_like(t) for t in tensors]
        lc.KvCacheView(dst, lc.KvLayout.NHD).scatter(chunk, obj, [0, 1, 2])
        for t, u in zip(tensors, dst, strict=True):
            assert np.array_equal(u[:, [0, 1, 2]], t[:, ids])
            assert not u[:, 3:].any()


def test_batch_equals_single_copies_and_threads_do_not_change_bytes(
    rng: np.random.Generator,
) -> None:
    layout = lc.KvLayout.HND
    src = random_tensors(rng, layout, np.float16)
    view = lc.KvCacheView(src, layout)
    chunk = 2 * BS
    perm = [int(x) for x in rng.permutation(NB)]
    ids = [perm[0:2], perm[2:4], perm[4:5]]
    size = view.object_bytes(chunk)
    single = [np.full(size, POISON, np.uint8) for _ in ids]
    batch = [np.full(size, POISON, np.uint8) for _ in ids]
    for block_ids, obj in zip(ids, single, strict=True):
        view.gather(chunk, block_ids, obj, num_threads=1)
    view.gather_batch(chunk, ids, batch, num_threads=4)
    for a, b in zip(single, batch, strict=True):
        assert np.array_equal(a, b)

    skips = [0, 3, BS]
    d_single = poisoned_like(src)
    d_batch = poisoned_like(src)
    for block_ids, obj, skip in zip(ids, single, skips, strict=True):
        lc.KvCacheView(d_single, layout).scatter(chunk, obj, block_ids, skip_tokens=skip)
    lc.KvCacheView(d_batch, layout).scatter_batch(chunk, batch, ids, skip_tokens=skips)
    for a, b in zip(d_single, d_batch, strict=True):
        assert a.tobytes() == b.tobytes()


# ---- checksums ----------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        r = byte
        for _ in range(8):
            r = (r >> 1) ^ (0x82F63B78 if r & 1 else 0)
        table.append(r)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Reference CRC32C (Castagnoli, reflected, register preset to ~0, result complemented)."""
    table = _CRC32C_TABLE
    r = 0xFFFFFFFF
    for byte in data:
        r = (r >> 8) ^ table[(r ^ byte) & 0xFF]
    return r ^ 0xFFFFFFFF


def test_reference_crc32c_known_answer() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_batch_checksums_are_crc32c_of_the_objects(
    layout: lc.KvLayout, dtype: Any, rng: np.random.Generator
) -> None:
    src = random_tensors(rng, layout, dtype)
    view = lc.KvCacheView(src, layout)
    chunk = 3 * BS
    size = view.object_bytes(chunk)
    perm = [int(x) for x in rng.permutation(NB)]
    ids = [perm[0:3], perm[3:6], perm[6:9]]
    # Objects larger than object_bytes: the checksum covers object_bytes, the rest is untouched.
    objects = [np.full(size + 5, POISON, np.uint8) for _ in ids]
    crcs = view.gather_batch(chunk, ids, objects, checksums=True)
    assert isinstance(crcs, list) and len(crcs) == len(ids)
    for block_ids, obj, crc in zip(ids, objects, crcs, strict=True):
        assert np.array_equal(obj[:size], reference_object(src, layout, block_ids, chunk))
        assert (obj[size:] == POISON).all()
        assert crc == crc32c(obj[:size].tobytes())
    # Without checksums: the same bytes and None, as before.
    plain = [np.full(size + 5, POISON, np.uint8) for _ in ids]
    assert view.gather_batch(chunk, ids, plain, num_threads=1) is None
    for a, b in zip(objects, plain, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checksums_of_large_pieces_do_not_depend_on_threads(layout: lc.KvLayout) -> None:
    # vLLM shapes (32 KiB block planes for K/V layouts, 18 KiB for MLA): pieces this large are
    # copied and checksummed in one pass; 2 MiB per batch is split between threads.
    src = vllm_kv_caches(layout, torch.bfloat16, 1, 40)
    view = lc.KvCacheView(src, layout)
    chunk = 128
    size = view.object_bytes(chunk)
    num_chunks = max(2, (2 << 20) // size)
    perm = torch.randperm(40)
    ids = [perm[(i * 8) % 32 : (i * 8) % 32 + 8] for i in range(num_chunks)]
    results = []
    for threads in (1, 0):
        objects = [np.zeros(size, np.uint8) for _ in ids]
        crcs = view.gather_batch(chunk, ids, objects, num_threads=threads, checksums=True)
        assert crcs is not None
        results.append((crcs, objects))
    (crcs1, objects1), (crcs_n, objects_n) = results
    assert crcs1 == crcs_n
    for obj_1, obj_n, crc in zip(objects1, objects_n, crcs1, strict=True):
        assert np.array_equal(obj_1, obj_n)
        assert crc == crc32c(obj_1.tobytes())


def test_checksums_need_whole_chunks(rng: np.random.Generator) -> None:
    src = random_tensors(rng, lc.KvLayout.NHD, np.float16)
    view = lc.KvCacheView(src, lc.KvLayout.NHD)
    chunk = 2 * BS
    objects = [np.full(view.object_bytes(chunk), POISON, np.uint8) for _ in range(2)]
    with pytest.raises(lc.InvalidArgumentError, match="CRC32C covers a whole object"):
        view.gather_batch(chunk, [[0, 1], [2]], objects, checksums=True)
    for obj in objects:
        assert (obj == POISON).all()  # nothing copied, not even the whole first chunk
    # The same partial batch without checksums is fine.
    assert view.gather_batch(chunk, [[0, 1], [2]], objects) is None


# ---- torch CPU tensors in vLLM's shapes ---------------------------------------------------------

TORCH_DTYPES = [torch.bfloat16, torch.float16]


def vllm_kv_caches(
    layout: lc.KvLayout, dtype: torch.dtype, num_layers: int, nb: int
) -> list[torch.Tensor]:
    """Per-layer tensors as vLLM allocates them (16-token blocks, 8 KV heads of 128; MLA 576)."""
    if layout is lc.KvLayout.MLA:
        shape = (nb, 16, 576)
    else:
        shape = shape_of(layout, nb=nb, bs=16, h=8, d=128)
    return [torch.randn(shape, dtype=dtype) for _ in range(num_layers)]


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in logical order (no numpy dtype needed: bf16 is viewed as int16)."""
    return t.contiguous().view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_round_trip_through_an_arena_object(layout: lc.KvLayout, dtype: torch.dtype) -> None:
    num_layers, nb, chunk = 4, 48, 256
    src = vllm_kv_caches(layout, dtype, num_layers, nb)
    view = lc.KvCacheView(src, layout)
    assert view.layout.element_size == 2
    size = view.object_bytes(chunk)
    arena = lc.Arena(2 * size)
    obj = arena.view(size, size)  # the second object slot of the arena
    obj[:] = POISON

    perm = torch.randperm(nb)
    src_ids = perm[:16].to(torch.int32)  # a torch int32 block table row, read in place
    view.gather(chunk, src_ids, obj)
    # The object is block planes in order: layer, plane, block.
    expected = b"".join(
        raw_bytes(block_plane(t, layout, p, int(b)))
        for t in src
        for p in range(planes(layout))
        for b in src_ids
    )
    assert obj.tobytes() == expected

    dst = [torch.zeros_like(t) for t in src]
    dst_ids = perm[16:32]  # int64
    lc.KvCacheView(dst, layout).scatter(chunk, obj, dst_ids)
    for t_src, t_dst in zip(src, dst, strict=True):
        for p in range(planes(layout)):
            for a, b in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
                assert raw_bytes(block_plane(t_dst, layout, p, b)) == raw_bytes(
                    block_plane(t_src, layout, p, a)
                )
        untouched = torch.ones(nb, dtype=torch.bool)
        untouched[dst_ids] = False
        rest = (
            t_dst[:, untouched]
            if layout in (lc.KvLayout.NHD, lc.KvLayout.HND)
            else t_dst[untouched]
        )
        assert not rest.view(torch.int16).any()


def test_torch_views_with_offsets_and_skip() -> None:
    # One allocation for all layers, sliced per layer (as vLLM does for hybrid allocators).
    nb, chunk = 20, 64
    big = torch.randn((3, 2, nb, 16, 8, 128), dtype=torch.bfloat16)
    layers = [big[i] for i in range(3)]
    view = lc.KvCacheView(layers, lc.KvLayout.NHD)
    obj = np.zeros(view.object_bytes(chunk), np.uint8)
    view.gather(chunk, [4, 5, 6, 7], obj)
    dst = torch.zeros_like(big)
    lc.KvCacheView([dst[i] for i in range(3)], lc.KvLayout.NHD).scatter(
        chunk, obj, [0, 1, 2, 3], skip_tokens=20
    )
    want = torch.zeros_like(big)
    flat = want.view(3, 2, nb * 16, 8, 128)
    flat[:, :, 20:64] = big.view(3, 2, nb * 16, 8, 128)[:, :, 4 * 16 + 20 : 8 * 16]
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))


# ---- argument checking -------------------------------------------------------------------------


def test_invalid_arguments_are_rejected(rng: np.random.Generator) -> None:
    layout = lc.KvLayout.NHD
    src = random_tensors(rng, layout, np.float16)
    view = lc.KvCacheView(src, layout)
    chunk = 2 * BS
    obj = np.full(view.object_bytes(chunk), POISON, np.uint8)

    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk, [0, NB], obj)  # block id out of range
    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk, [-1, 0], obj)
    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk, [0, 1, 2], obj)  # more tokens than the chunk
    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk, [0, 1], obj, num_tokens=BS)  # ids do not match num_tokens
    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk + 1, [0, 1], obj)  # chunk not a multiple of the block size
    with pytest.raises(lc.InvalidArgumentError):
        view.gather(chunk, [0, 1], obj[:-1])  # object too small
    with pytest.raises(lc.InvalidArgumentError):
        view.scatter(chunk, obj, [0, 1], skip_tokens=chunk + 1)
    with pytest.raises(lc.InvalidArgumentError):
        view.scatter(chunk, obj, [3, 3])  # one block written twice
    with pytest.raises(lc.InvalidArgumentError):
        view.gather_batch(chunk, [[0, 1], [2, 3]], [obj])  # lengths differ
    assert (obj == POISON).all()  # nothing was copied

    with pytest.raises(TypeError):
        view.gather(chunk, [0, 1], obj.view(np.int8))  # not uint8: never silently converted
    with pytest.raises(TypeError):
        view.gather(chunk, [0, 1], obj.reshape(2, -1))  # not 1-D
    readonly = obj.copy()
    readonly.flags.writeable = False
    with pytest.raises(TypeError):
        view.gather(chunk, [0, 1], readonly)
    view.scatter(chunk, readonly, [0, 1])  # a read-only object is fine to scatter from
    with pytest.raises(TypeError):
        view.gather(chunk, np.array([0.0, 1.0]), obj)  # float block ids
    with pytest.raises(TypeError):
        view.gather(chunk, "01", obj)

    with pytest.raises(TypeError):
        lc.KvCacheView([object()], layout)
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheView([], layout)
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheView([src[0][0]], layout)  # 4-D
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheView([np.zeros((3, NB, BS, H, D), np.float16)], layout)  # not K/V
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheView([src[0], src[1].astype(np.float32)], layout)  # dtypes differ
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheView([src[0].transpose(0, 1, 2, 4, 3)], layout)  # block plane not contiguous
    with pytest.raises(lc.InvalidArgumentError):
        # Every block aliases block 0: a stride of 0 must not be taken for "dense".
        lc.KvCacheView([torch.zeros((2, 1, BS, H, D)).expand(2, NB, BS, H, D)], layout)
    with pytest.raises(lc.InvalidArgumentError):
        lc.KvCacheLayout(lc.KvLayout.MLA, 1, 16, 2, 64, 2, 10).validate()


def test_layout_description_without_tensors() -> None:
    lay = lc.KvCacheLayout(lc.KvLayout.NHD, 32, 16, 8, 128, 2, 1000)
    assert lay.fingerprint() == "nhd:L32:BS16:H8:D128:E2"
    assert lay.object_bytes(256) == 32 * 2 * 16 * 16 * 8 * 128 * 2
    assert lay.block_plane_bytes() == 16 * 8 * 128 * 2
    assert lay.num_planes == 2
    lay.layout = lc.KvLayout.MLA
    lay.num_heads = 1
    assert lay.num_planes == 1
    assert lay.fingerprint().startswith("mla:")
    with pytest.raises(lc.InvalidArgumentError):
        lay.object_bytes(100)


def test_view_keeps_its_tensors_alive(rng: np.random.Generator) -> None:
    tensors = random_tensors(rng, lc.KvLayout.NHD, np.float32)
    expected = reference_object(tensors, lc.KvLayout.NHD, [1, 2], 2 * BS)
    view = lc.KvCacheView([t.copy() for t in tensors], lc.KvLayout.NHD)  # only the view holds them
    del tensors
    obj = np.full(view.object_bytes(2 * BS), POISON, np.uint8)
    view.gather(2 * BS, [1, 2], obj)
    assert np.array_equal(obj, expected)
