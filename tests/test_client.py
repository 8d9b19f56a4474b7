"""CacheClient's threading: which thread works the socket, and that every request is still sent
and answered exactly once when blocking calls, async calls, callbacks, heartbeats and close()
meet (a real server over ipc://)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, KvTransferClient
from lmcache_cpp.errors import UnavailableError
from lmcache_cpp.server import CacheServer
from server_helpers import CHUNK, MODEL, Harness, blocks_of, key, kv_cache, layout, tokens


def stalled_lookup(mem: lc.MemoryL2Adapter, client: CacheClient, seed: int) -> bytes:
    """A two-phase lookup whose L2 part is stuck on the stalled adapter."""
    handle = client.lookup(key(tokens(4 * CHUNK, seed)))
    assert mem.wait_for_blocked_operations(1, 10.0)
    return handle


def test_a_lone_blocking_call_is_completed_on_the_calling_thread(harness: Harness) -> None:
    client = harness.client(harness.server())
    completed_on: list[threading.Thread] = []

    def submit() -> concurrent.futures.Future[None]:
        future = client.async_ping()
        future.add_done_callback(lambda _: completed_on.append(threading.current_thread()))
        return future

    client._call(submit)
    assert completed_on == [threading.current_thread()]
    # An async call with no blocking caller around completes on the client's I/O thread.
    done = threading.Event()
    client.async_ping().add_done_callback(
        lambda _: (completed_on.append(threading.current_thread()), done.set())
    )
    assert done.wait(10)
    assert completed_on[-1].name == "lmcache-client-io"


def test_a_blocking_call_from_a_done_callback_raises_instead_of_deadlocking(
    harness: Harness,
) -> None:
    client = harness.client(harness.server())
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def callback(_: object) -> None:
        try:
            client.ping()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    client.async_ping().add_done_callback(callback)
    assert done.wait(10)
    assert isinstance(outcome[0], RuntimeError) and "async_" in str(outcome[0])
    client.ping()  # the client is unharmed


def test_requests_of_other_threads_go_out_while_a_blocking_call_waits(
    harness: Harness, stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient]
) -> None:
    _, mem, client = stalled
    handle = stalled_lookup(mem, client, 1)
    waiter: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def wait_long() -> None:  # a blocking call that owns the socket for up to 30 s
        try:
            waiter.set_result(client.wait_prefetch_status(handle, 30.0))
        except BaseException as exc:
            waiter.set_exception(exc)

    thread = threading.Thread(target=wait_long)
    thread.start()
    deadline = time.monotonic() + 10
    while client.status()["server"]["parked_waits"] == 0:  # the wait has reached the server
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    for _ in range(20):
        assert client.get_chunk_size() == CHUNK  # blocking, from this thread
    pings = [client.async_ping() for _ in range(20)]  # async, from this thread
    for p in pings:
        p.result(timeout=10)
    assert time.monotonic() - started < 10
    assert not waiter.done()
    mem.set_stalled(False)
    thread.join(30)
    assert waiter.result(timeout=0) is not None


def test_async_calls_made_while_requests_are_outstanding_are_sent_by_the_io_thread(
    harness: Harness,
    stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst from one thread: only a request submitted with nothing outstanding goes out from
    the submitting thread; the rest are queued for the I/O thread (so the two threads do not
    trade the GIL at every socket call). Every one is still answered once."""
    _, mem, client = stalled
    handle = stalled_lookup(mem, client, 3)
    senders: list[str] = []
    real_send = client._send

    def spy(item: Any, now: float) -> int:
        senders.append(threading.current_thread().name)
        return real_send(item, now)

    monkeypatch.setattr(client, "_send", spy)
    # Outstanding on the server until the adapter is released.
    waiting = client.async_wait_prefetch_status(handle, 30.0)
    assert senders == [threading.current_thread().name]  # nothing was outstanding: inline
    pings = [client.async_ping() for _ in range(32)]
    for p in pings:
        assert p.result(timeout=10) is None
    assert senders[1:] == ["lmcache-client-io"] * 32
    assert not waiting.done()
    mem.set_stalled(False)
    assert waiting.result(timeout=30) is not None


def test_close_from_another_thread_ends_a_blocking_call_at_once(
    harness: Harness, stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient]
) -> None:
    _, mem, client = stalled
    handle = stalled_lookup(mem, client, 2)
    errors: list[BaseException] = []
    entered = threading.Event()

    def wait_long() -> None:
        entered.set()
        try:
            client.wait_prefetch_status(handle, 60.0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_long)
    thread.start()
    assert entered.wait(10)
    time.sleep(0.2)  # let it send and block
    started = time.monotonic()
    client.close()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert len(errors) == 1 and isinstance(errors[0], UnavailableError)
    with pytest.raises(UnavailableError):
        client.ping()


def test_heartbeats_continue_after_blocking_calls(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server, heartbeat_interval_s=0.1)
    for _ in range(5):
        client.get_chunk_size()
    before = server.request_counts().get("PING", {}).get("ok", 0)
    deadline = time.monotonic() + 10
    while server.request_counts().get("PING", {}).get("ok", 0) < before + 3:
        assert time.monotonic() < deadline, "no heartbeats while idle after blocking calls"
        time.sleep(0.05)


def test_mixed_blocking_and_async_calls_from_many_threads_each_get_their_reply(
    harness: Harness,
) -> None:
    server = harness.server(worker_threads=2)
    client = harness.client(server, heartbeat_interval_s=0.05)
    client.register_kv_cache(MODEL, 1, 0, layout())
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)
    per_thread = 60

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                k = key(tokens(2 * CHUNK, 100 * n + i), request_id=f"t{n}-{i}")
                if (i + n) % 3 == 0:
                    assert client.sync_lookup(k).hit_chunks == 0
                elif (i + n) % 3 == 1:
                    result = client.async_sync_lookup(k).result(timeout=10)
                    assert result.hit_chunks == 0
                else:
                    handle = client.lookup(k)
                    assert client.wait_prefetch_status(handle, 5.0) is not None
                assert client.end_session(MODEL, f"t{n}-{i}") >= 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    counts = server.request_counts()
    assert sum(counts["SYNC_LOOKUP"].values()) + sum(counts["LOOKUP"].values()) == 4 * per_thread
    assert counts["END_SESSION"] == {"ok": 4 * per_thread}


def test_sync_lookups_of_keys_in_l1_are_answered_while_the_pool_is_busy(
    stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient],
) -> None:
    """With L2 configured SYNC_LOOKUP belongs to the pool, but a key that L1 holds wholly cannot
    block, so the socket thread answers it: here while the only pool thread is stuck."""
    server, mem, client = stalled
    layers, view = kv_cache(3)
    transfer = KvTransferClient.register(client, MODEL, 1, 0, view)
    toks = tokens(4 * CHUNK, 9)
    assert transfer.store(view, list(range(16)), key(toks, "store")) == 4
    # A SYNC_LOOKUP that asks the stalled L2 for up to 60 s takes the only pool thread.
    waiting = client.async_sync_lookup(key(tokens(4 * CHUNK, 5), "blocker"), timeout_s=60.0)
    deadline = time.monotonic() + 10
    while client.status()["server"]["pool_jobs"] == 0:  # the only pool thread is taken
        assert time.monotonic() < deadline
        time.sleep(0.01)

    hit = client.sync_lookup(key(toks, "hit"), tp_size=1)
    assert (hit.hit_chunks, hit.l1_chunks, hit.l2_chunks) == (4, 4, 0)
    queued = client.async_sync_lookup(key(tokens(4 * CHUNK, 6), "needs-l2"))
    time.sleep(0.3)
    assert not queued.done(), "a key that needs L2 still waits for the pool"
    assert not waiting.done()

    mem.set_stalled(False)
    assert waiting.result(timeout=30).hit_chunks == 0
    assert queued.result(timeout=30).hit_chunks == 0
    # The in-L1 lookup leased its chunks for its request like any SYNC_LOOKUP.
    assert transfer.retrieve(view, list(range(16, 32)), key(toks, "hit")) == 4 * CHUNK
    for stored, retrieved in zip(
        blocks_of(layers, range(16)), blocks_of(layers, range(16, 32)), strict=True
    ):
        assert np.array_equal(stored, retrieved)
    counts = server.request_counts()["SYNC_LOOKUP"]
    assert counts == {"ok": 3}  # the blocker, the in-L1 hit, the one that needed L2


def test_a_request_made_before_the_server_is_up_is_sent_once_it_is(harness: Harness) -> None:
    endpoint = harness.endpoint()
    client = harness.client(endpoint, hello=False, timeout_s=20.0)
    early = [client.async_ping() for _ in range(3)]
    time.sleep(0.3)
    assert not any(f.done() for f in early), "requests wait for the server, up to their deadline"
    harness.server(endpoint=endpoint)
    for f in early:
        f.result(timeout=20)
    assert client.get_chunk_size() == CHUNK


def test_a_keys_wire_map_is_its_wire_keys() -> None:
    """Key.to_wire builds the map directly; it must equal the WireKey's, in both key modes."""
    from lmcache_cpp.client import Key

    by_tokens = Key("m", 2, 1, "r", tokens=np.arange(5, dtype=np.int64), cache_salt="s", end=3)
    by_hashes = Key("m", request_id="r", block_hashes=b"h" * 64, block_hash_size=32, start=1)
    for k in (by_tokens, by_hashes):
        assert k.to_wire() == k.to_wire_key().to_wire()
    assert by_tokens.to_wire()["tokens"] == np.arange(5, dtype="<u4").tobytes()
    assert "tokens" not in by_hashes.to_wire() and by_hashes.to_wire()["block_hash_size"] == 32
