"""An engine process for the server-driven tests (tests/test_device_transfers.py): it holds its
"device" KV cache in shared memory (the fake device layer), registers it with a real server by
its handles and drives STORE/RETRIEVE with its own events.

    python device_engine.py ENDPOINT SCENARIO LAYOUT

Scenarios: ``roundtrip`` (store every chunk, retrieve into other blocks, compare byte for byte),
``hang`` (a STORE whose event is never signalled, timeout_s 1.5: prints the error it gets),
``hang-long`` (the same with timeout_s 5, after printing REGISTERED: the test kills it).
Prints one JSON line per result; exits 0 when the scenario's own checks passed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.device import pack_kv_records
from lmcache_cpp.device.fake import FakeEngineEvent, FakeEngineKv, wait_reply
from lmcache_cpp.errors import LMCacheError
from lmcache_cpp.protocol import RequestType, bodies

CHUNK = 16
BS = 8
LAYERS, HEADS, HEAD_SIZE, MLA_DIM = 2, 2, 16, 64
NUM_BLOCKS = 64
MODEL = "device-model"
CHUNKS = 4

LAYOUTS = {
    "nhd": (lc.KvLayout.NHD, HEADS, HEAD_SIZE),
    "hnd": (lc.KvLayout.HND, HEADS, HEAD_SIZE),
    "flashinfer": (lc.KvLayout.FLASHINFER, HEADS, HEAD_SIZE),
    "mla": (lc.KvLayout.MLA, 1, MLA_DIM),
}


def layout_of(name: str) -> lc.KvCacheLayout:
    kind, heads, head_size = LAYOUTS[name]
    return lc.KvCacheLayout(kind, LAYERS, BS, heads, head_size, 2, NUM_BLOCKS)


def blocks(kv: FakeEngineKv, ids: np.ndarray) -> list[np.ndarray]:
    """The bytes of the given blocks, per layer (block axis first for FlashInfer and MLA)."""
    if kv.layout.layout in (lc.KvLayout.NHD, lc.KvLayout.HND):
        return [layer[:, ids].copy() for layer in kv.layers]
    return [layer[ids].copy() for layer in kv.layers]


def transfer(
    client: CacheClient,
    rt: RequestType,
    key: Key,
    registration_id: int,
    ids: np.ndarray,
    event: FakeEngineEvent,
    timeout_s: float,
) -> tuple[int, bytes]:
    body = bodies.DeviceStoreRequest(
        key.to_wire_key(),
        registration_id,
        ids.astype("<i8").tobytes(),
        event.handle,
        timeout_s,
    )
    return client.device_transfer(rt, body)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main(endpoint: str, scenario: str, layout_name: str) -> int:
    kv = FakeEngineKv(layout_of(layout_name))
    client = CacheClient(endpoint, timeout_s=15.0, heartbeat_interval_s=0.2)
    event = FakeEngineEvent()
    try:
        device = bodies.WireDeviceKv("fake", pack_kv_records(kv.records))
        reg = client.register_kv_cache(MODEL, 1, 0, kv.layout, device)
        rid = int(reg["registration_id"])
        rng = np.random.default_rng(7)
        kv.raw[:] = rng.integers(0, 256, kv.raw.shape[0], dtype=np.uint8)
        toks = rng.integers(0, 32000, CHUNKS * CHUNK, dtype=np.uint32)
        src = np.arange(CHUNKS * CHUNK // BS)
        if scenario == "roundtrip":

            def signalled(rt: RequestType, request_id: str, ids: np.ndarray) -> tuple[int, bool]:
                # The work before the transfer (the forward pass that wrote the blocks, or the
                # last reader of the destination blocks) is done: signal, then ask the server.
                event.signal()
                key = Key(MODEL, request_id=request_id, tokens=toks)
                count, reply = transfer(client, rt, key, rid, ids, event, 5.0)
                return count, wait_reply(reply, 5.0)

            want = blocks(kv, src)
            published, stored = signalled(RequestType.STORE, "w", src)
            assert client.sync_lookup(Key(MODEL, request_id="r", tokens=toks)).hit_chunks == CHUNKS
            dst = src + NUM_BLOCKS // 2
            for layer in kv.layers:  # poison the destination blocks
                if kv.layout.layout in (lc.KvLayout.NHD, lc.KvLayout.HND):
                    layer[:, dst] = 0xAB
                else:
                    layer[dst] = 0xAB
            tokens, loaded = signalled(RequestType.RETRIEVE, "r", dst)
            got = blocks(kv, dst)
            exact = all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
            emit(published=published, tokens=tokens, stored=stored, loaded=loaded, exact=exact)
            client.end_session(MODEL, "r")
            return 0 if exact and published == CHUNKS and stored and loaded else 1
        if scenario in ("hang", "hang-long"):
            timeout = 1.5 if scenario == "hang" else 5.0
            emit(registered=rid)
            started = time.monotonic()
            try:
                transfer(
                    client,
                    RequestType.STORE,
                    Key(MODEL, request_id="w", tokens=toks),
                    rid,
                    src,
                    event,
                    timeout,
                )
                emit(error=None)
                return 1
            except LMCacheError as exc:
                emit(error=type(exc).__name__, message=str(exc), seconds=time.monotonic() - started)
                return 0
        raise SystemExit(f"unknown scenario {scenario}")
    finally:
        event.close()
        client.close()
        kv.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
