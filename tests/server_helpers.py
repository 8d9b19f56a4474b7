"""Shared pieces of the server tests: a real storage manager + cache engine, servers on ipc://
under tmp_path, clients, small engine KV caches, raw DEALER sockets. A :class:`Harness` stops
everything it started, in order (clients, servers, storage)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

import lmcache_cpp as lc
from lmcache_cpp import _core
from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.protocol import Reply, decode_reply
from lmcache_cpp.server import CacheServer, ServerOptions

CHUNK = 16  # tokens per chunk
BS = 4  # tokens per engine block
LAYERS, HEADS, HEAD_SIZE = 2, 2, 8
NUM_BLOCKS = 128
ARENA = 8 << 20
MODEL = "test-model"

_names = itertools.count()


def layout(num_blocks: int = NUM_BLOCKS) -> lc.KvCacheLayout:
    return lc.KvCacheLayout(lc.KvLayout.NHD, LAYERS, BS, HEADS, HEAD_SIZE, 2, num_blocks)


def kv_cache(seed: int | None, num_blocks: int = NUM_BLOCKS) -> tuple[list[np.ndarray], Any]:
    """Per-layer NHD tensors [2, NB, BS, H, D] of uint16 (random, or zeros for seed None) and
    their KvCacheView."""
    shape = (2, num_blocks, BS, HEADS, HEAD_SIZE)
    if seed is None:
        layers = [np.zeros(shape, np.uint16) for _ in range(LAYERS)]
    else:
        rng = np.random.default_rng(seed)
        layers = [rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(LAYERS)]
    return layers, lc.KvCacheView(layers, lc.KvLayout.NHD)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32000, n, dtype=np.uint32)


def key(toks: np.ndarray | bytes, request_id: str = "r", **kw: Any) -> Key:
    return Key(MODEL, request_id=request_id, tokens=toks, **kw)


def blocks_of(layers: Sequence[np.ndarray], ids: Sequence[int]) -> list[np.ndarray]:
    """The K and V planes of the given blocks, per layer (for comparisons)."""
    return [layer[:, list(ids)] for layer in layers]


class Harness:
    """Builds real stacks, servers and clients for a test and stops them all in close()."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._storages: list[lc.StorageManager] = []
        self._servers: list[CacheServer] = []
        self._clients: list[CacheClient] = []
        self._sockets: list[zmq.Socket[bytes]] = []
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None

    def engine(
        self,
        *,
        chunk_size: int = CHUNK,
        adapters: Sequence[lc.L2Adapter] = (),
        arena_bytes: int = ARENA,
        **engine_kw: Any,
    ) -> tuple[lc.StorageManager, _core.CacheEngine]:
        table = lc.ObjectTableOptions(high_watermark=1.0, low_watermark=1.0)
        storage = lc.StorageManager(
            lc.StorageManagerConfig(arena_bytes, table=table, adapters=list(adapters))
        )
        storage.start()
        self._storages.append(storage)
        engine = _core.CacheEngine(storage, _core.EngineConfig(chunk_size=chunk_size, **engine_kw))
        return storage, engine

    def endpoint(self) -> str:
        return f"ipc://{self.tmp_path}/s{next(_names)}.sock"

    def server(
        self,
        engine: Any = None,
        storage: Any = None,
        metrics: Any = None,
        **options: Any,
    ) -> CacheServer:
        if engine is None:
            storage, engine = self.engine()
        options.setdefault("endpoint", self.endpoint())
        options.setdefault("worker_threads", 2)
        server = CacheServer(engine, storage, ServerOptions(**options), metrics)
        server.start()
        self._servers.append(server)
        return server

    def client(self, server: CacheServer | str, **kw: Any) -> CacheClient:
        endpoint = server if isinstance(server, str) else server.bound_endpoint
        kw.setdefault("timeout_s", 10.0)
        client = CacheClient(endpoint, **kw)
        self._clients.append(client)
        return client

    def dealer(self, server: CacheServer) -> zmq.Socket[bytes]:
        """A raw DEALER connected to the server (for malformed frames)."""
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.bound_endpoint)
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for sock in self._sockets:
            sock.close(linger=0)
        if self._context is not None:
            self._context.term()
        for server in self._servers:
            server.stop()
        for storage in self._storages:
            storage.stop()


def recv_reply(sock: zmq.Socket[bytes], timeout_s: float = 10.0) -> Reply:
    """The next reply on a raw DEALER; AssertionError if none arrives in time."""
    assert sock.poll(int(timeout_s * 1000), zmq.POLLIN), "no reply"
    return decode_reply(sock.recv_multipart())


def no_more_replies(sock: zmq.Socket[bytes]) -> bool:
    with contextlib.suppress(zmq.Again):
        sock.recv_multipart(flags=zmq.NOBLOCK)
        return False
    return True
