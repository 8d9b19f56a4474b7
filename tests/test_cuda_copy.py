"""GPU copy kernels through the bindings (lmcache_cpp.cuda), byte for byte against the CPU ones.

On a machine with a GPU and a module built with CUDA: for every layout and dtype, on fresh random
data, gather (CUDA KV tensors -> objects in a registered arena or in a CUDA staging tensor) and
scatter (objects -> KV, with skipped leading tokens) through the kernel and the DMA engines must
write exactly the bytes the CPU kernels write from a CPU copy of the same tensors; outputs are
poisoned first. Elsewhere those tests skip with the reason (built without CUDA, torch without
CUDA, no driver or device), or fail instead when LMCACHE_CPP_REQUIRE_GPU=1 (scripts/gpu_check.sh
sets it, so a GPU run cannot pass by skipping). The probe and the no-GPU errors run everywhere.

Self-contained (no conftest fixtures), so it also runs with ``pytest --noconftest`` on machines
that lack the server's dependencies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import lmcache_cpp as lc
from cuda_helpers import require_gpu
from lmcache_cpp import cuda as lcc

torch = pytest.importorskip("torch")

LAYOUTS = [lc.KvLayout.NHD, lc.KvLayout.HND, lc.KvLayout.FLASHINFER, lc.KvLayout.MLA]
DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]
ENGINES = ["KERNEL", "DMA"]
PLACES = ["arena", "device"]
POISON = 0xA5
L, NB, BS, H, D = 3, 40, 16, 4, 64
CHUNK = 4 * BS


@pytest.fixture
def gpu() -> None:
    require_gpu()


@pytest.fixture
def seed() -> int:
    s = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    print(f"seed {s}")  # shown with any failure
    return s


# ---- everywhere --------------------------------------------------------------------------------


def test_cuda_info_explains_itself() -> None:
    info = lcc.cuda_info()
    assert info["built"] == bool(lc.build_info().get("cuda", False))
    assert info["usable"] == (info["reason"] == "")
    assert lc.cuda_available() == info["usable"]
    assert lc.cuda_unavailable_reason() == (None if info["usable"] else info["reason"])
    if not info["built"]:
        assert "without CUDA" in info["reason"]
        with pytest.raises(lc.NotSupportedError):
            lcc.require_cuda()
        with pytest.raises(lc.NotSupportedError):
            _ = lcc.CudaKvCacheView
    elif not info["usable"]:
        assert info["runtime_version"] >= 12000
        with pytest.raises(lc.UnavailableError):
            lcc.require_cuda()


def test_without_a_device_the_gpu_classes_say_unavailable() -> None:
    info = lcc.cuda_info()
    if not info["built"] or info["usable"]:
        pytest.skip("needs a CUDA build on a machine without a usable device")
    with pytest.raises(lc.UnavailableError, match="not usable"):
        lcc.CudaEvent()
    arena = lc.Arena(1 << 20)
    with pytest.raises(lc.UnavailableError):
        lcc.CudaHostRegistration(arena.view(), piece_bytes=1 << 16)


# ---- on a GPU ----------------------------------------------------------------------------------


def shape_of(layout: lc.KvLayout, nb: int = NB) -> tuple[int, ...]:
    return {
        lc.KvLayout.NHD: (2, nb, BS, H, D),
        lc.KvLayout.HND: (2, nb, H, BS, D),
        lc.KvLayout.FLASHINFER: (nb, 2, BS, H, D),
        lc.KvLayout.MLA: (nb, BS, D),
    }[layout]


def random_kv(shape: tuple[int, ...], dtype: Any, gen: Any) -> Any:
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=gen)
    return raw.view(dtype).reshape(shape)


def kv_layers(layout: lc.KvLayout, dtype: Any, gen: Any, *, padded: bool = False) -> list[Any]:
    """Per-layer CUDA tensors of `layout`; `padded` makes NHD/HND views of a [NB, 2, ...]
    allocation (interleaved K/V) and pads the block dimension of the others."""
    if not padded:
        return [random_kv(shape_of(layout), dtype, gen) for _ in range(L)]
    if layout in (lc.KvLayout.NHD, lc.KvLayout.HND):
        inner = shape_of(layout)[2:]
        return [random_kv((NB, 2, *inner), dtype, gen).permute(1, 0, 2, 3, 4) for _ in range(L)]
    shape = shape_of(layout)
    padded_shape = (shape[0], shape[1] + 1, *shape[2:])
    return [random_kv(padded_shape, dtype, gen)[:, : shape[1]] for _ in range(L)]


class Objects:
    """`count` objects of `nbytes` in a registered arena or a CUDA staging tensor."""

    def __init__(self, place: str, nbytes: int, count: int, *, piece_bytes: int = 1 << 30) -> None:
        self.nbytes = nbytes
        self.count = count
        self._arena: lc.Arena | None = None
        self._registration: Any = None
        if place == "arena":
            # Objects at an odd 4 KiB multiple, as an allocator might place them.
            self._arena = lc.Arena(nbytes * count + (1 << 20))
            self._registration = lcc.CudaHostRegistration(
                self._arena.view(), piece_bytes=piece_bytes
            )
            self.items: list[Any] = [
                self._arena.view(4096 * 3 + i * nbytes, nbytes) for i in range(count)
            ]
        else:
            self.items = [
                torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(count)
            ]

    def fill(self, values: list[npt.NDArray[np.uint8]] | None) -> None:
        for i, item in enumerate(self.items):
            if isinstance(item, np.ndarray):
                item[:] = POISON if values is None else values[i]
            elif values is None:
                item.fill_(POISON)
            else:
                item.copy_(torch.from_numpy(values[i]))

    def host(self, i: int) -> npt.NDArray[np.uint8]:
        item = self.items[i]
        out: npt.NDArray[np.uint8]
        if isinstance(item, np.ndarray):
            out = item.copy()
            return out
        out = item.cpu().numpy()
        return out

    def close(self) -> None:
        self.items = []
        if self._registration is not None:
            self._registration.unregister()


@pytest.fixture
def stream(gpu: None) -> Iterator[Any]:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    yield s
    torch.cuda.synchronize()


def as_bytes(t: Any) -> npt.NDArray[np.uint8]:
    """Every byte of a (possibly non-contiguous) tensor, in index order."""
    out: npt.NDArray[np.uint8] = t.detach().cpu().contiguous().view(torch.uint8).numpy()
    return out


def ids_for(rng: np.random.Generator, tokens: list[int], distinct: bool) -> list[Any]:
    blocks = [t // BS for t in tokens]
    if distinct:
        perm = rng.permutation(NB)
        starts = np.cumsum([0, *blocks])
        return [perm[starts[i] : starts[i + 1]].astype(np.int64) for i in range(len(tokens))]
    return [rng.integers(0, NB, b).astype(np.int32) for b in blocks]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_matches_the_cpu_kernels(
    layout: lc.KvLayout, dtype: Any, engine: str, place: str, stream: Any, seed: int
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = np.random.default_rng(seed)
    for padded in (False, True):
        layers = kv_layers(layout, dtype, gen, padded=padded)
        view = lcc.CudaKvCacheView(layers, layout)
        ref_view = lc.KvCacheView([t.cpu() for t in layers], layout)
        assert view.fingerprint() == ref_view.fingerprint()
        nbytes = view.object_bytes(CHUNK)
        tokens = [CHUNK, 2 * BS, CHUNK]  # the middle chunk is partial
        ids = ids_for(rng, tokens, distinct=False)
        objects = Objects(place, nbytes, len(tokens))
        objects.fill(None)
        stream.wait_stream(torch.cuda.current_stream())  # the tensors' and objects' writes
        event = lcc.CudaEvent()
        stats = view.gather_batch(
            CHUNK,
            ids,
            objects.items,
            tokens,
            stream=stream.cuda_stream,
            event=event,
            engine=getattr(lcc.CopyEngine, engine),
        )
        event.synchronize()
        assert stats.bytes == sum(tokens) // BS * ref_view.layout.num_planes * L * (
            ref_view.layout.block_plane_bytes()
        )
        expected = [np.full(nbytes, POISON, np.uint8) for _ in tokens]
        ref_view.gather_batch(CHUNK, ids, expected, tokens)
        for i in range(len(tokens)):
            assert np.array_equal(objects.host(i), expected[i]), (padded, i)
        objects.close()


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_matches_the_cpu_kernels_with_skipped_tokens(
    layout: lc.KvLayout, dtype: Any, engine: str, place: str, stream: Any, seed: int
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = np.random.default_rng(seed)
    for padded in (False, True):
        layers = kv_layers(layout, dtype, gen, padded=padded)  # the "old" contents
        ref_layers = [t.cpu() for t in layers]
        view = lcc.CudaKvCacheView(layers, layout)
        ref_view = lc.KvCacheView(ref_layers, layout)
        nbytes = view.object_bytes(CHUNK)
        tokens = [CHUNK, CHUNK, CHUNK, CHUNK, CHUNK, 2 * BS]
        skips = [0, 1, BS, BS + 5, CHUNK - 1, 7]
        ids = ids_for(rng, tokens, distinct=True)
        values = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in tokens]
        objects = Objects(place, nbytes, len(tokens))
        objects.fill(values)
        stream.wait_stream(torch.cuda.current_stream())  # the objects' fill
        event = lcc.CudaEvent()
        view.scatter_batch(
            CHUNK,
            objects.items,
            ids,
            tokens,
            skips,
            stream=stream.cuda_stream,
            event=event,
            engine=getattr(lcc.CopyEngine, engine),
        )
        event.synchronize()
        ref_view.scatter_batch(CHUNK, values, ids, tokens, skips)
        for layer, ref in zip(layers, ref_layers, strict=True):
            assert np.array_equal(as_bytes(layer), as_bytes(ref)), padded
        objects.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_single_chunk_calls_and_a_7b_class_layout(engine: str, stream: Any, seed: int) -> None:
    # vLLM's shapes for a 7B-class model slice: NHD, block 16, 8 KV heads of 128, bf16.
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layers = [random_kv((2, 64, 16, 8, 128), torch.bfloat16, gen) for _ in range(4)]
    view = lcc.CudaKvCacheView(layers, lc.KvLayout.NHD)
    assert view.fingerprint() == "nhd:L4:BS16:H8:D128:E2"
    assert view.device == torch.cuda.current_device()
    ids = np.arange(16, 32, dtype=np.int64)[::-1].copy()
    objects = Objects("arena", view.object_bytes(256), 1)
    objects.fill(None)
    stream.wait_stream(torch.cuda.current_stream())
    event = lcc.CudaEvent()
    eng = getattr(lcc.CopyEngine, engine)
    view.gather(256, ids, objects.items[0], stream=stream.cuda_stream, event=event, engine=eng)
    event.synchronize()
    ref_view = lc.KvCacheView([t.cpu() for t in layers], lc.KvLayout.NHD)
    expected = np.full(view.object_bytes(256), POISON, np.uint8)
    ref_view.gather(256, ids, expected)
    assert np.array_equal(objects.host(0), expected)
    # Scatter it back elsewhere, skipping 100 tokens of the chunk.
    target = [torch.full_like(t, 0) for t in layers]
    target_view = lcc.CudaKvCacheView(target, lc.KvLayout.NHD)
    stream.wait_stream(torch.cuda.current_stream())
    dst = np.arange(40, 56, dtype=np.int32)
    target_view.scatter(
        256,
        objects.items[0],
        dst,
        skip_tokens=100,
        stream=stream.cuda_stream,
        event=event,
        engine=eng,
    )
    event.synchronize()
    ref_target = [torch.full_like(t, 0).cpu() for t in layers]
    lc.KvCacheView(ref_target, lc.KvLayout.NHD).scatter(256, expected, dst, skip_tokens=100)
    for got, want in zip(target, ref_target, strict=True):
        assert np.array_equal(as_bytes(got), as_bytes(want))
    objects.close()


def test_objects_across_registration_pieces(stream: Any, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layers = kv_layers(lc.KvLayout.HND, torch.float16, gen)
    view = lcc.CudaKvCacheView(layers, lc.KvLayout.HND)
    ref_view = lc.KvCacheView([t.cpu() for t in layers], lc.KvLayout.HND)
    nbytes = view.object_bytes(CHUNK)
    rng = np.random.default_rng(seed)
    ids = ids_for(rng, [CHUNK] * 6, distinct=False)
    for engine in ENGINES:
        # Pieces of 64 KiB: objects of 96 KiB straddle piece boundaries.
        objects = Objects("arena", nbytes, 6, piece_bytes=1 << 16)
        objects.fill(None)
        stream.wait_stream(torch.cuda.current_stream())
        event = lcc.CudaEvent()
        view.gather_batch(
            CHUNK,
            ids,
            objects.items,
            stream=stream.cuda_stream,
            event=event,
            engine=getattr(lcc.CopyEngine, engine),
        )
        event.synchronize()
        for i in range(6):
            expected = np.full(nbytes, POISON, np.uint8)
            ref_view.gather(CHUNK, ids[i], expected)
            assert np.array_equal(objects.host(i), expected), (engine, i)
        objects.close()


def test_registration_reports_its_pieces_and_time(gpu: None) -> None:
    arena = lc.Arena(10 << 20)
    reg = lcc.CudaHostRegistration(arena.view(), piece_bytes=4 << 20)
    assert reg.registered
    assert reg.size == 10 << 20
    assert reg.piece_offsets == [0, 4 << 20, 8 << 20]
    assert len(reg.piece_seconds) == 3
    assert reg.register_seconds == pytest.approx(sum(reg.piece_seconds))
    reg.unregister()
    assert not reg.registered
    reg.unregister()  # idempotent
    with lcc.CudaHostRegistration(arena.view(), piece_bytes=4 << 20) as again:
        assert again.registered
    assert not again.registered


def test_bad_arguments_raise_like_the_cpu_kernels(stream: Any, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layers = kv_layers(lc.KvLayout.NHD, torch.float16, gen)
    view = lcc.CudaKvCacheView(layers, lc.KvLayout.NHD)
    ref_view = lc.KvCacheView([t.cpu() for t in layers], lc.KvLayout.NHD)
    nbytes = view.object_bytes(CHUNK)
    objects = Objects("device", nbytes, 1)
    stream.wait_stream(torch.cuda.current_stream())
    cpu_object = np.zeros(nbytes, np.uint8)
    s = stream.cuda_stream
    bad: list[tuple[list[int], int | None]] = [
        ([0, 1, 2, 3, 4], None),  # more tokens than the chunk
        ([0, NB], None),  # block id out of range
        ([0, 1], 3 * BS),  # ids do not match num_tokens
        ([0, 1], BS + 1),  # num_tokens not a multiple of the block size
    ]
    for ids, tokens in bad:
        with pytest.raises(lc.InvalidArgumentError) as cpu_err:
            ref_view.gather(CHUNK, ids, cpu_object, tokens)
        with pytest.raises(lc.InvalidArgumentError) as gpu_err:
            view.gather(CHUNK, ids, objects.items[0], tokens, stream=s)
        assert str(gpu_err.value) == str(cpu_err.value).replace(": ", ": chunk 0: ", 1)
    with pytest.raises(lc.InvalidArgumentError, match="written more than once"):
        view.scatter(CHUNK, objects.items[0], [3, 3, 4, 5], stream=s)
    with pytest.raises(lc.InvalidArgumentError, match="register it with CUDA"):
        view.gather(CHUNK, [0, 1, 2, 3], np.zeros(nbytes, np.uint8), stream=s)
    with pytest.raises(TypeError):
        lcc.CudaKvCacheView([t.cpu() for t in layers], lc.KvLayout.NHD)
    with pytest.raises(TypeError):
        view.gather(CHUNK, torch.arange(4, device="cuda"), objects.items[0], stream=s)
    with pytest.raises(lc.NotSupportedError):
        many = [random_kv((4, BS, D), torch.uint8, gen) for _ in range(480)]
        lcc.CudaKvCacheView(many, lc.KvLayout.MLA).gather(
            BS, [0], torch.empty(480 * BS * D, dtype=torch.uint8, device="cuda"), stream=s
        )
    objects.close()
