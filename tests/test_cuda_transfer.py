"""Engine-driven transfers from GPU KV tensors through a real server (CudaKvTransferClient): store
CUDA blocks into the shared arena (registered with CUDA) and retrieve them into other blocks,
byte for byte, through the kernel and the DMA engines; a retrieve with skipped tokens leaves
them alone; a retrieve of what was never stored fails explicitly. Needs a GPU (skips, or fails
with LMCACHE_CPP_REQUIRE_GPU=1, elsewhere); uses no conftest fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lmcache_cpp as lc
from cuda_helpers import require_gpu

torch = pytest.importorskip("torch")

ENGINES = ["KERNEL", "DMA"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """(server_helpers module, Harness, CacheClient) when the GPU tests can run here."""
    require_gpu(needs=("zmq", "msgpack"))
    import server_helpers as sh

    harness = sh.Harness(tmp_path)
    try:
        storage, engine = harness.engine()
        server = harness.server(engine, storage)
        yield sh, harness, harness.client(server)
    finally:
        harness.close()


def cuda_kv(sh: Any, seed: int | None, num_blocks: int) -> tuple[list[Any], Any]:
    """The helpers' NHD layout (2 layers, block 4, 2 heads of 8, 2-byte elements) on the GPU."""
    shape = (2, num_blocks, sh.BS, sh.HEADS, sh.HEAD_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(seed or 0)
    layers = []
    for _ in range(sh.LAYERS):
        raw = torch.randint(
            0, 256, (int(np.prod(shape)) * 2,), dtype=torch.uint8, device="cuda", generator=gen
        )
        if seed is None:
            raw.zero_()
        layers.append(raw.view(torch.float16).reshape(shape))
    torch.cuda.synchronize()
    return layers, lc.cuda.CudaKvCacheView(layers, lc.KvLayout.NHD)


def blocks(layers: list[Any], ids: Any) -> list[Any]:
    index = torch.as_tensor(np.asarray(ids), device="cuda")
    return [layer[:, index].view(torch.uint8).cpu() for layer in layers]


@pytest.mark.parametrize("engine", ENGINES)
def test_store_then_retrieve_into_other_blocks(stack: tuple[Any, Any, Any], engine: str) -> None:
    from lmcache_cpp.cuda_transfer import CudaKvTransferClient

    sh, _, client = stack
    bpc = sh.CHUNK // sh.BS
    src_layers, src_view = cuda_kv(sh, seed=1, num_blocks=sh.NUM_BLOCKS)
    dst_layers, dst_view = cuda_kv(sh, seed=None, num_blocks=sh.NUM_BLOCKS)
    stream = torch.cuda.Stream()
    with CudaKvTransferClient.register(
        client,
        sh.MODEL,
        1,
        0,
        src_view,
        stream=stream.cuda_stream,
        engine=getattr(lc.cuda.CopyEngine, engine),
        piece_bytes=1 << 20,
    ) as transfer:
        assert transfer.register_seconds > 0
        toks = sh.tokens(8 * sh.CHUNK, seed=5)
        src_ids = np.arange(8 * bpc)
        assert transfer.store(src_view, src_ids, sh.key(toks, "w")) == 8
        assert client.sync_lookup(sh.key(toks, "r")).hit_chunks == 8
        dst_ids = np.arange(sh.NUM_BLOCKS - 8 * bpc, sh.NUM_BLOCKS)[::-1].copy()
        assert transfer.retrieve(dst_view, dst_ids, sh.key(toks, "r")) == 8 * sh.CHUNK
        for a, b in zip(blocks(src_layers, src_ids), blocks(dst_layers, dst_ids), strict=True):
            assert torch.equal(a, b)
        # Nothing else in the destination was written.
        others = np.setdiff1d(np.arange(sh.NUM_BLOCKS), dst_ids)
        assert not any(b.any() for b in blocks(dst_layers, others))
        # A key that was never stored fails explicitly.
        never = sh.tokens(2 * sh.CHUNK, seed=77)
        client.sync_lookup(sh.key(never, "miss"))
        with pytest.raises(lc.LMCacheError):
            transfer.retrieve(dst_view, np.arange(2 * bpc), sh.key(never, "miss"), timeout_s=1.0)


def test_retrieve_leaves_skipped_tokens_alone(stack: tuple[Any, Any, Any]) -> None:
    from lmcache_cpp.cuda_transfer import CudaKvTransferClient

    sh, _, client = stack
    bpc = sh.CHUNK // sh.BS
    src_layers, src_view = cuda_kv(sh, seed=2, num_blocks=sh.NUM_BLOCKS)
    old_layers, dst_view = cuda_kv(sh, seed=3, num_blocks=sh.NUM_BLOCKS)
    before = [t.clone() for t in old_layers]
    stream = torch.cuda.Stream()
    with CudaKvTransferClient.register(
        client, sh.MODEL, 1, 0, src_view, stream=stream.cuda_stream
    ) as transfer:
        toks = sh.tokens(2 * sh.CHUNK, seed=6)
        ids = np.arange(2 * bpc)
        assert transfer.store(src_view, ids, sh.key(toks, "w")) == 2
        client.sync_lookup(sh.key(toks, "r"))
        skip = sh.CHUNK + 3  # the first chunk and 3 tokens of the second
        transfer.retrieve(dst_view, ids, sh.key(toks, "r"), skip_tokens=skip)
        torch.cuda.synchronize()
        for src, old, dst in zip(src_layers, before, old_layers, strict=True):
            # [2, NB, BS, H, D]: token t of the request is block t // BS, row t % BS.
            for t in range(2 * sh.CHUNK):
                b, r = divmod(t, sh.BS)
                want = (src if t >= skip else old)[:, b, r]
                assert torch.equal(dst[:, b, r], want), t
