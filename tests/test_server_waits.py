"""Waits never hold a pool thread, the pool serves clients fairly, and a request that waited past
its deadline in the queue is not run (issue 15, item 3). Real server, real ZeroMQ sockets, a real
storage stack over an in-memory L2 tier whose operations the tests stall."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import KvTransferClient
from lmcache_cpp.errors import DeadlineExceededError
from server_helpers import CHUNK, MODEL, Harness, key, kv_cache, layout, tokens


def _until(what: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    out = call()
    return out, time.monotonic() - started


def test_256_waits_on_a_stalled_l2_leave_the_pool_to_other_clients(harness: Harness) -> None:
    # Enough adapter workers that each stalled load holds its own and lookups still run.
    mem = lc.MemoryL2Adapter(worker_threads=40)
    storage, engine = harness.engine(adapters=[mem], arena_bytes=32 << 20)
    server = harness.server(engine, storage, worker_threads=4)  # the default pool
    a = harness.client(server, timeout_s=60.0)
    _layers, view = kv_cache(7)
    transfer = KvTransferClient.register(a, MODEL, 1, 0, view)
    joiners = 14
    prompts = [tokens(4 * CHUNK, 500 + i) for i in range(2 * joiners)]
    for i, toks in enumerate(prompts):
        assert transfer.store(view, list(range(16)), key(toks, f"store-{i}")) == 4
    _until(lambda: mem.stats().objects == 4 * len(prompts))  # the store controller copied them
    engine.clear(True)  # L1 forgets them: lookups find them in L2 only

    # 28 sync lookups whose L2 -> L1 loads stall; their retrieves and frees must wait for them.
    for nth in range(1, len(prompts) + 1):
        mem.inject_fault(lc.L2Op.LOAD, nth, lc.FaultKind.STALL)
    for i, toks in enumerate(prompts):
        hit = a.sync_lookup(key(toks, f"join-{i}"))
        assert (hit.hit_chunks, hit.l2_chunks) == (4, 4)
    assert mem.wait_for_blocked_operations(len(prompts), 10.0)

    # 228 two-phase lookups whose L2 part stalls, each with a WAIT_PREFETCH_STATUS.
    mem.set_stalled(True)
    handles = [a.lookup(key(tokens(4 * CHUNK, 1000 + i), f"wait-{i}")) for i in range(228)]
    waits = [a.async_wait_prefetch_status(h, 60.0) for h in handles]
    prepares = [a.async_prepare_retrieve(key(prompts[i], f"join-{i}")) for i in range(joiners)]
    frees = [
        a.async_free_lookup_locks(key(prompts[i], f"join-{i}")) for i in range(joiners, 2 * joiners)
    ]
    b = harness.client(server)
    _until(lambda: b.status()["server"]["parked_waits"] == 256)

    # Client a is at its limit of blocking requests: a 257th is refused, not queued.
    with pytest.raises(lc.ResourceExhaustedError, match="256 blocking requests"):
        a.wait_prefetch_status(handles[0], 1.0)

    # Another client is served within its deadlines meanwhile: a SYNC_LOOKUP that asks the
    # stalled L2 (answered from L1 at its own 0.2 s timeout), a PREPARE_STORE, a CLEAR.
    b.register_kv_cache(MODEL, 1, 0, layout())
    hit, took = _timed(lambda: b.sync_lookup(key(tokens(4 * CHUNK, 99), "b"), deadline_s=5.0))
    assert hit.hit_chunks == 0 and took < 5.0
    ticket, took = _timed(lambda: b.prepare_store(key(tokens(4 * CHUNK, 98), "b-store")))
    assert len(ticket.offsets) == 4 and took < 5.0
    b.commit_store(ticket.handle, success=False)
    removed, took = _timed(lambda: b.clear())
    assert removed >= 0 and took < 5.0
    status = b.status()["server"]
    assert status["parked_waits"] == 256 and not any(w.done() for w in waits)

    # The L2 comes back: every wait is answered from the completions.
    mem.set_stalled(False)
    for w in waits:
        result = w.result(timeout=60)
        assert result is not None and result.hit_chunks == 0
    for p in prepares:
        ticket = p.result(timeout=60)
        assert len(ticket.offsets) == 4
        a.commit_retrieve(ticket.handle)
    assert [f.result(timeout=60) for f in frees] == [4] * joiners
    assert b.status()["server"]["parked_waits"] == 0


def test_a_parked_wait_ends_at_its_deadline(harness: Harness) -> None:
    mem = lc.MemoryL2Adapter()
    storage, engine = harness.engine(adapters=[mem])
    server = harness.server(engine, storage)
    client = harness.client(server)
    client.register_kv_cache(MODEL, 1, 0, layout())
    mem.set_stalled(True)
    try:
        handle = client.lookup(key(tokens(4 * CHUNK, 3), "r"))
        result, took = _timed(lambda: client.wait_prefetch_status(handle, 0.3))
        assert result is None  # still running when its wait ended
        assert 0.25 <= took < 5.0
        assert client.status()["server"]["parked_waits"] == 0
    finally:
        mem.set_stalled(False)
    assert client.wait_prefetch_status(handle, 30.0) is not None


def test_a_request_that_waited_past_its_deadline_in_the_queue_is_not_run(
    harness: Harness,
) -> None:
    mem = lc.MemoryL2Adapter()
    storage, engine = harness.engine(adapters=[mem])
    server = harness.server(engine, storage, worker_threads=1, max_queue_wait_s=0.3)
    a = harness.client(server)
    b = harness.client(server)
    _layers, view = kv_cache(5)
    transfer = KvTransferClient.register(a, MODEL, 1, 0, view)
    assert transfer.store(view, list(range(16)), key(tokens(4 * CHUNK, 5), "s")) == 4
    objects = engine.stats()["l1"]["objects"]
    mem.set_stalled(True)
    try:
        # The only worker asks the stalled L2 for 1.5 s; the CLEAR waits behind it.
        blocker = a.async_sync_lookup(key(tokens(4 * CHUNK, 6), "blocker"), timeout_s=1.5)
        _until(lambda: a.status()["server"]["pool_jobs"] == 1)
        with pytest.raises(DeadlineExceededError, match="not run"):
            b.clear()
        assert blocker.result(timeout=30).hit_chunks == 0
    finally:
        mem.set_stalled(False)
    assert engine.stats()["l1"]["objects"] == objects  # the CLEAR never ran
    assert server.request_counts()["CLEAR"] == {"Timeout": 1}


def test_the_pool_serves_clients_in_turn(harness: Harness) -> None:
    mem = lc.MemoryL2Adapter()
    storage, engine = harness.engine(adapters=[mem])
    server = harness.server(engine, storage, worker_threads=1)
    greedy = harness.client(server)
    polite = harness.client(server)
    for c in (greedy, polite):
        c.register_kv_cache(MODEL, 1, 0, layout())
    mem.set_stalled(True)
    try:
        # Eight SYNC_LOOKUPs that each hold the only worker for 0.5 s (their L2 timeout).
        backlog = [
            greedy.async_sync_lookup(key(tokens(4 * CHUNK, 200 + i), f"g{i}"), timeout_s=0.5)
            for i in range(8)
        ]
        _until(lambda: polite.status()["server"]["pool_jobs"] == 8)
        # First in first out would answer this after the whole backlog (4 s); in turn, after
        # the running job and its own 0.5 s.
        hit, took = _timed(
            lambda: polite.sync_lookup(key(tokens(4 * CHUNK, 300), "p"), timeout_s=0.5)
        )
        assert hit.hit_chunks == 0
        assert took < 2.5, f"served after {took:.2f} s: the greedy client's backlog went first"
        assert sum(f.done() for f in backlog) <= 4
        for f in backlog:
            assert f.result(timeout=30).hit_chunks == 0
    finally:
        mem.set_stalled(False)
