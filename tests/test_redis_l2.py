"""The Redis L2 tier against real Redis servers (docs/l2-redis.md): byte-exact round trips
through real cache server processes, standalone and cluster, in both lookup modes and both key
modes; a second server with an empty L1 serves what the first stored; corrupt values and keys
gone after their lookup are misses, counted, never served; a dead Redis never blocks the server;
fs then redis cascade. Servers come from redis_helpers (skipped without redis-server unless
LMCACHE_CPP_REQUIRE_REDIS=1)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.errors import KeyAbsentError
from lmcache_cpp.metrics import Metrics
from redis_helpers import RedisCluster, RedisServer, cli, redis_cluster, redis_server
from test_server_process import (
    BPC,
    CHUNK,
    FAST_REPLY_S,
    MODEL,
    EngineKv,
    StartServer,
    assert_same_blocks,
    key,
    start_server,
    tokens,
    wait_for_status,
)

__all__ = ["redis_cluster", "redis_server", "start_server"]  # fixtures used here

N = 6  # chunks per test


def redis_spec(url: str, **kw: Any) -> dict[str, Any]:
    return {"type": "redis", "url": url, "op_timeout_ms": 2000, "connect_timeout_ms": 500, **kw}


def wait_stored(client: CacheClient, adapter: int, n: int) -> dict[str, Any]:
    return wait_for_status(
        client,
        lambda s: (
            s["store"]["queued"] == 0
            and s["store"]["in_flight_batches"] == 0
            and s["l2"][adapter]["stores"] >= n
        ),
        f"{n} objects stored to redis",
    )


def make_key(toks: Any, request_id: str, by_hashes: bool, **kw: Any) -> Key:
    if not by_hashes:
        return key(toks, request_id, **kw)
    # One 32-byte hash per engine block, derived from the tokens (the same tokens, the same hashes).
    blocks = np.asarray(toks, dtype=np.uint32).reshape(-1, CHUNK // BPC)
    hashes = b"".join(
        np.random.default_rng(int(b.sum()) + i).bytes(32) for i, b in enumerate(blocks)
    )
    return Key(MODEL, request_id=request_id, block_hashes=hashes, **kw)


@dataclass
class Stored:
    """What one cache server stored through its L2 tiers: the source KV, tokens and block ids."""

    src: EngineKv
    toks: Any
    ids: Any
    client: CacheClient
    transfer: Any


def store_through(
    start_server: StartServer,
    adapters: list[dict[str, Any]],
    seed: int,
    n: int = N,
    by_hashes: bool = False,
) -> Stored:
    """Starts a server with ``adapters``, stores n chunks and waits until the last adapter (the
    redis one) has written them all."""
    server = start_server(l2_adapters=adapters)
    src = EngineKv.make(seed=seed)
    client, transfer = server.worker(src)
    toks = tokens(n * CHUNK, seed=seed)
    ids = np.arange(n * BPC)
    assert transfer.store(src.view, ids, make_key(toks, "w", by_hashes)) == n
    wait_stored(client, len(adapters) - 1, n)
    return Stored(src, toks, ids, client, transfer)


def lookup(client: CacheClient, k: Key, two_phase: bool) -> Any:
    if two_phase:
        return client.wait_prefetch_status(client.lookup(k), 10.0)
    return client.sync_lookup(k)


@pytest.mark.parametrize("two_phase", [False, True], ids=["sync_lookup", "lookup_query"])
@pytest.mark.parametrize("by_hashes", [False, True], ids=["tokens", "block_hashes"])
def test_a_second_server_with_an_empty_l1_serves_what_the_first_stored(
    start_server: StartServer, redis_server: RedisServer, two_phase: bool, by_hashes: bool
) -> None:
    spec = redis_spec(redis_server.url)
    first = store_through(start_server, [spec], seed=70, by_hashes=by_hashes)
    src, toks, ids = first.src, first.toks, first.ids
    assert int(cli(redis_server.port, "DBSIZE")) == N

    second = start_server(l2_adapters=[spec])
    client2, transfer2 = second.worker(EngineKv.make())
    assert client2.status()["l1"]["objects"] == 0
    found = lookup(client2, make_key(toks, "r", by_hashes), two_phase)
    assert (found.hit_chunks, found.l1_chunks, found.l2_chunks) == (N, 0, N)
    dst = EngineKv.make()
    assert transfer2.retrieve(dst.view, ids, make_key(toks, "r", by_hashes)) == N * CHUNK
    assert_same_blocks(src, ids, dst, ids)
    l2 = client2.status()["l2"][0]
    assert (l2["loads"], l2["load_misses"], l2["capacity_bytes"]) == (N, 0, 0)


def test_a_cluster_serves_across_servers(
    start_server: StartServer, redis_cluster: RedisCluster
) -> None:
    spec = redis_spec(redis_cluster.url, cluster=True)
    n = 24
    first = store_through(start_server, [spec], seed=71, n=n)
    src, toks, ids = first.src, first.toks, first.ids
    sizes = [int(cli(m.port, "DBSIZE")) for m in redis_cluster.masters]
    assert sum(sizes) == n and all(s > 0 for s in sizes)  # spread over the masters

    second = start_server(l2_adapters=[spec])
    client2, transfer2 = second.worker(EngineKv.make())
    for two_phase in (False, True):
        request = f"r-{two_phase}"
        found = lookup(client2, key(toks, request), two_phase)
        assert found.hit_chunks == n
        dst = EngineKv.make()
        assert transfer2.retrieve(dst.view, ids, key(toks, request)) == n * CHUNK
        assert_same_blocks(src, ids, dst, ids)


def _keys(port: int) -> list[str]:
    return sorted(cli(port, "--scan", "--pattern", "lmc:*").split())


def test_a_corrupt_value_is_a_counted_miss_never_served(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    spec = redis_spec(redis_server.url)
    toks = store_through(start_server, [spec], seed=72).toks
    ids = np.arange(N * BPC)
    for k in _keys(redis_server.port):  # one payload byte flipped in every value
        cli(redis_server.port, "SETRANGE", k, "40", "\x7f")

    second = start_server(l2_adapters=[spec])
    client2, transfer2 = second.worker(EngineKv.make())
    # The lookup finds the keys (EXISTS); the load behind it rejects every value.
    client2.sync_lookup(key(toks, "r"))
    dst = EngineKv.make()
    with pytest.raises(KeyAbsentError):
        transfer2.retrieve(dst.view, ids, key(toks, "r"))
    assert dst.is_zero_outside([])  # nothing was written
    l2 = client2.status()["l2"][0]
    assert (l2["loads"], l2["corrupt_reads"], l2["misses_corrupt"]) == (0, N, N)
    text = Metrics().render(client2.status())
    assert 'lmcache_cpp_l2_redis_misses_corrupt_total{adapter="0"' in text
    assert "# TYPE lmcache_cpp_l2_redis_misses_corrupt_total counter" in text


def test_a_key_gone_between_lookup_and_load_is_a_counted_miss(
    redis_server: RedisServer,
) -> None:
    adapter = lc.RedisL2Adapter(redis_server.url)
    try:
        k = lc.ObjectKey(lc.ChunkHash(bytes(range(32))), 0)
        payload = np.arange(4096, dtype=np.uint8)
        assert adapter.submit_store([k], [payload]).popcount() == 1
        assert adapter.submit_lookup_and_pin([k]).popcount() == 1
        cli(redis_server.port, "DEL", adapter.key_for(k))  # what maxmemory eviction would do
        out = np.zeros(4096, dtype=np.uint8)
        assert adapter.submit_load([k], [out]).popcount() == 0
        assert not out.any()
        rs = adapter.redis_stats()
        assert (rs.gone_after_lookup, rs.misses_absent) == (1, 1)
        assert adapter.stats().load_misses == 1
        # A wrong-size read and a foreign value are misses by reason too.
        assert adapter.submit_store([k], [payload]).popcount() == 1
        assert adapter.submit_load([k], [np.zeros(100, dtype=np.uint8)]).popcount() == 0
        cli(redis_server.port, "SET", adapter.key_for(k), "not ours at all, 32 bytes or more..")
        assert adapter.submit_load([k], [out]).popcount() == 0
        rs = adapter.redis_stats()
        assert (rs.misses_wrong_size, rs.misses_foreign) == (1, 1)
    finally:
        adapter.close()


def test_a_dead_redis_never_blocks_and_is_used_again_after_restart(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stored = store_through(start_server, [redis_spec(redis_server.url)], seed=73)
    src, toks, ids = stored.src, stored.toks, stored.ids
    client, transfer = stored.client, stored.transfer

    redis_server.stop()
    for i in range(3):
        t0 = time.monotonic()
        assert client.sync_lookup(key(toks, f"l1-{i}")).hit_chunks == N  # from L1
        other = tokens(2 * CHUNK, seed=730 + i)
        assert transfer.store(src.view, np.arange(2 * BPC), key(other, f"s{i}")) == 2
        assert time.monotonic() - t0 < FAST_REPLY_S * 2
    wait_for_status(
        client, lambda s: s["store"]["queued"] == 0 and s["store"]["in_flight_batches"] == 0, "idle"
    )

    redis_server.start()  # empty: no persistence
    # Stores within the reconnect backoff (1 s) of a failed connect fail fast; later ones land.
    deadline = time.monotonic() + 15.0
    attempt = 0
    while True:
        attempt += 1
        later = tokens(N * CHUNK, seed=740 + attempt)
        assert transfer.store(src.view, ids, key(later, f"w{attempt}")) == N
        wait_for_status(
            client,
            lambda s: s["store"]["queued"] == 0 and s["store"]["in_flight_batches"] == 0,
            "idle",
        )
        if int(cli(redis_server.port, "DBSIZE")) >= N:
            break
        assert time.monotonic() < deadline, "redis was not used again after its restart"
        time.sleep(0.3)
    # Each worker's connection retries only after its own backoff: a load within it would miss
    # (safely). Let every backoff end before the lookup that must be served from Redis.
    time.sleep(1.2)
    assert client.clear() >= N
    found = client.sync_lookup(key(later, "r"))
    assert (found.hit_chunks, found.l2_chunks) == (N, N)
    dst = EngineKv.make()
    assert transfer.retrieve(dst.view, ids, key(later, "r")) == N * CHUNK
    assert_same_blocks(src, ids, dst, ids)
    assert client.status()["l2"][0]["store_failures"] > 0


def test_fs_then_redis_cascade(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Any
) -> None:
    fs = {"type": "fs", "path": str(tmp_path / "fs-l2"), "capacity_gb": 0.1}
    stored = store_through(start_server, [fs, redis_spec(redis_server.url)], seed=75)
    src, toks, ids = stored.src, stored.toks, stored.ids
    client, transfer = stored.client, stored.transfer
    assert client.clear() == N
    assert client.sync_lookup(key(toks, "r")).hit_chunks == N
    dst = EngineKv.make()
    assert transfer.retrieve(dst.view, ids, key(toks, "r")) == N * CHUNK
    assert_same_blocks(src, ids, dst, ids)

    # A server with only the redis tier serves them too.
    other = start_server(l2_adapters=[redis_spec(redis_server.url)])
    client2, transfer2 = other.worker(EngineKv.make())
    assert client2.sync_lookup(key(toks, "r2")).hit_chunks == N
    dst2 = EngineKv.make()
    assert transfer2.retrieve(dst2.view, ids, key(toks, "r2")) == N * CHUNK
    assert_same_blocks(src, ids, dst2, ids)


def test_redis_l2_refuses_a_wrong_password(redis_server: RedisServer) -> None:
    cli(redis_server.port, "CONFIG", "SET", "requirepass", "sekrit")
    with pytest.raises(lc.LMCacheError, match=r"WRONGPASS|denied|AUTH"):
        lc.RedisL2Adapter(redis_server.url, password="wrong")
    adapter = lc.RedisL2Adapter(redis_server.url, password="sekrit")
    adapter.close()
