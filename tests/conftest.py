"""Shared fixtures: real arenas and tables (no mocks), a manual clock, key factories."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient
from lmcache_cpp.server import CacheServer
from server_helpers import MODEL, Harness, layout

KeyFactory = Callable[..., list[lc.ObjectKey]]

ARENA_BYTES = 4 * 1024 * 1024
OBJECT_SIZE = 64 * 1024


@pytest.fixture
def clock() -> lc.ManualClock:
    return lc.ManualClock()


@pytest.fixture
def arena() -> lc.Arena:
    return lc.Arena(ARENA_BYTES)


@pytest.fixture
def table_options() -> lc.ObjectTableOptions:
    # Watermarks at 1.0: no background eviction, so tests see only synchronous eviction.
    return lc.ObjectTableOptions(
        read_lease_ttl_s=30.0,
        write_lease_ttl_s=10.0,
        high_watermark=1.0,
        low_watermark=1.0,
    )


@pytest.fixture
def table(
    arena: lc.Arena, table_options: lc.ObjectTableOptions, clock: lc.ManualClock
) -> Iterator[lc.ObjectTable]:
    t = lc.ObjectTable(arena, table_options, clock=clock)
    yield t
    t.stop()


@pytest.fixture
def hasher() -> lc.ChunkHasher:
    return lc.ChunkHasher(lc.NamespaceConfig("test-model", "test-layout"), 16)


_key_counter = itertools.count()


@pytest.fixture
def make_keys() -> KeyFactory:
    """make_keys(n, kv_rank=0) -> n fresh, distinct object keys (unique across the session)."""

    def factory(n: int, kv_rank: int = 0) -> list[lc.ObjectKey]:
        out = []
        for _ in range(n):
            digest = hashlib.sha256(f"key-{next(_key_counter)}".encode()).digest()
            out.append(lc.ObjectKey(lc.ChunkHash(digest), kv_rank))
        return out

    return factory


# ---- server tests ---------------------------------------------------------------------------


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Real storage, engines, servers and clients, all stopped at the end of the test."""
    h = Harness(tmp_path)
    yield h
    h.close()


@pytest.fixture
def stalled(harness: Harness) -> Iterator[tuple[CacheServer, lc.MemoryL2Adapter, CacheClient]]:
    """A server with one pool thread over a stalled L2 adapter, and a registered client."""
    mem = lc.MemoryL2Adapter()
    storage, engine = harness.engine(adapters=[mem])
    server = harness.server(engine, storage, worker_threads=1, stop_timeout_s=10.0)
    client = harness.client(server)
    client.register_kv_cache(MODEL, 1, 0, layout())
    mem.set_stalled(True)
    yield server, mem, client
    mem.set_stalled(False)
