"""The GPU engine process of tests/test_device_cuda.py: its KV cache is torch CUDA tensors in
vLLM's layouts; it registers them with a ``--device cuda`` server by their CUDA IPC handles and
drives STORE/RETRIEVE with interprocess CUDA events.

    python device_engine_cuda.py ENDPOINT SCENARIO LAYOUT

Scenarios: ``roundtrip`` (as tests/device_engine.py's, on the GPU), ``hang`` (the STORE's event
is recorded behind a kernel that runs for seconds; timeout_s 1: expects Timeout) and
``engine-driven`` (the same round trip through CudaKvTransferClient: the engine copies into the
arena it maps and registers with CUDA; the server needs no device layer). Prints one JSON line;
exits 0 when its checks passed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from device_engine import BS, CHUNK, CHUNKS, MODEL, NUM_BLOCKS, emit, layout_of
from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.device import KvRecord, layer_extent, layer_geometry, pack_kv_records
from lmcache_cpp.errors import LMCacheError
from lmcache_cpp.protocol import RequestType, bodies

_DTYPES = {1: torch.uint8, 2: torch.float16, 4: torch.float32}


def cuda_layers(layout: object) -> list[torch.Tensor]:
    shape, _ = layer_geometry(layout)  # type: ignore[arg-type]
    gen = torch.Generator(device="cuda").manual_seed(11)
    dtype = _DTYPES[int(layout.element_size)]  # type: ignore[attr-defined]
    n = int(np.prod(shape))
    return [
        torch.randint(
            0, 256, (n * dtype.itemsize,), dtype=torch.uint8, device="cuda", generator=gen
        )
        .view(dtype)
        .reshape(shape)
        for _ in range(int(layout.num_layers))  # type: ignore[attr-defined]
    ]


def ipc_record(t: torch.Tensor, extent: int) -> KvRecord:
    """The layer's record: its allocation's CUDA IPC handle, where it starts in it, its bytes."""
    _device, handle, _size, storage_offset, *_ = t.untyped_storage()._share_cuda_()
    return KvRecord(
        bytes(handle), int(storage_offset) + t.storage_offset() * t.element_size(), extent
    )


def block_bytes(
    layers: list[torch.Tensor], ids: np.ndarray, plane_first: bool
) -> list[torch.Tensor]:
    index = torch.as_tensor(ids, device="cuda")
    return [
        (t[:, index] if plane_first else t[index]).contiguous().view(torch.uint8).cpu()
        for t in layers
    ]


def main(endpoint: str, scenario: str, layout_name: str) -> int:
    layout = layout_of(layout_name)
    layers = cuda_layers(layout)
    plane_first = layout_name in ("nhd", "hnd")
    if scenario == "engine-driven":
        return engine_driven(endpoint, layout, layers, plane_first)
    extent = layer_extent(layout)
    device = bodies.WireDeviceKv(
        "cuda",
        pack_kv_records([ipc_record(t, extent) for t in layers]),
        torch.cuda.current_device(),
    )
    client = CacheClient(endpoint, timeout_s=30.0, heartbeat_interval_s=0.5)
    stream = torch.cuda.Stream()
    try:
        rid = int(client.register_kv_cache(MODEL, 1, 0, layout, device)["registration_id"])
        toks = np.random.default_rng(3).integers(0, 32000, CHUNKS * CHUNK, dtype=np.uint32)
        src = np.arange(CHUNKS * CHUNK // BS)

        def send(rt: RequestType, request_id: str, ids: np.ndarray, timeout_s: float) -> int:
            event = torch.cuda.Event(interprocess=True)
            event.record(stream)
            body = bodies.DeviceStoreRequest(
                Key(MODEL, request_id=request_id, tokens=toks).to_wire_key(),
                rid,
                ids.astype("<i8").tobytes(),
                bytes(event.ipc_handle()),
                timeout_s,
            )
            count, reply = client.device_transfer(rt, body)
            done = torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), reply)
            done.wait(stream)  # later work on the stream sees the server's copies
            stream.synchronize()
            return count

        if scenario == "roundtrip":
            torch.cuda.synchronize()
            want = block_bytes(layers, src, plane_first)
            published = send(RequestType.STORE, "w", src, 10.0)
            assert client.sync_lookup(Key(MODEL, request_id="r", tokens=toks)).hit_chunks == CHUNKS
            dst = src + NUM_BLOCKS // 2
            with torch.cuda.stream(stream):
                for t in layers:
                    (t[:, dst] if plane_first else t[dst]).zero_()
            tokens = send(RequestType.RETRIEVE, "r", dst, 10.0)
            got = block_bytes(layers, dst, plane_first)
            exact = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
            emit(published=published, tokens=tokens, exact=exact)
            return 0 if exact and published == CHUNKS else 1
        if scenario == "hang":
            with torch.cuda.stream(stream):
                torch.cuda._sleep(int(20e9))  # seconds of GPU time before the event
            started = time.monotonic()
            try:
                send(RequestType.STORE, "w", src, 1.0)
                emit(error=None)
                return 1
            except LMCacheError as exc:
                emit(error=type(exc).__name__, seconds=time.monotonic() - started)
                return 0
        raise SystemExit(f"unknown scenario {scenario}")
    finally:
        client.close()


def engine_driven(endpoint: str, layout: Any, layers: list[torch.Tensor], plane_first: bool) -> int:
    from lmcache_cpp import _core
    from lmcache_cpp.cuda_transfer import CudaKvTransferClient

    view = _core.CudaKvCacheView(layers, layout.layout)
    toks = np.random.default_rng(4).integers(0, 32000, CHUNKS * CHUNK, dtype=np.uint32)
    src = np.arange(CHUNKS * CHUNK // BS)
    dst = src + NUM_BLOCKS // 2
    stream = torch.cuda.Stream()
    client = CacheClient(endpoint, timeout_s=30.0, heartbeat_interval_s=0.5)
    try:
        with CudaKvTransferClient.register(
            client, MODEL, 1, 0, view, stream=stream.cuda_stream
        ) as transfer:
            torch.cuda.synchronize()
            want = block_bytes(layers, src, plane_first)
            published = transfer.store(view, src, Key(MODEL, request_id="w", tokens=toks))
            client.sync_lookup(Key(MODEL, request_id="r", tokens=toks))
            tokens = transfer.retrieve(view, dst, Key(MODEL, request_id="r", tokens=toks))
            got = block_bytes(layers, dst, plane_first)
            exact = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
            emit(
                published=published,
                tokens=tokens,
                exact=exact,
                register_s=transfer.register_seconds,
            )
            return 0 if exact and published == CHUNKS else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
