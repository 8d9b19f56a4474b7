"""The L1 object table through the bindings: state machine and its error classes, prefix leases,
extra_count, TTL expiry on a manual clock, temporary objects, eviction, zero-copy views and the
GIL being released around core calls."""

from __future__ import annotations

import gc
import os
import sys
import threading
import uuid
from collections.abc import Callable

import numpy as np
import pytest

import lmcache_cpp as lc
from conftest import ARENA_BYTES, OBJECT_SIZE, KeyFactory

CAPACITY_OBJECTS = ARENA_BYTES // OBJECT_SIZE


def owner(request: int, client: int = 1) -> lc.LeaseOwner:
    return lc.LeaseOwner(client, request)


def store(
    table: lc.ObjectTable, keys: list[lc.ObjectKey], request: int = 1, read_leases: int = 0
) -> list[lc.Reservation]:
    res = table.reserve_write(owner(request), keys, OBJECT_SIZE)
    table.finish_write(request, [r.key for r in res if not r.skipped], read_leases)
    return res


# ---- state machine ----------------------------------------------------------------------------


def test_state_machine_and_its_errors(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    (key,) = make_keys(1)
    with pytest.raises(lc.KeyAbsentError):
        table.acquire_read(owner(1), [key])
    (res,) = table.reserve_write(owner(1), [key], OBJECT_SIZE)
    assert (res.key, res.skipped, res.size) == (key, False, OBJECT_SIZE)
    info = table.info(key)
    assert info is not None and info.state is lc.ObjectState.WRITING
    with pytest.raises(lc.NotReadableError):
        table.acquire_read(owner(2), [key])
    with pytest.raises(lc.LeaseNotHeldError):
        table.finish_write(2, [key])  # another request does not hold the write lease
    with pytest.raises(lc.LockedError):
        table.delete([key])
    table.finish_write(1, [key])
    info = table.info(key)
    assert info is not None and info.state is lc.ObjectState.READY and info.readers == 0
    with pytest.raises(lc.WrongStateError):
        table.finish_write(1, [key])
    table.acquire_read(owner(2), [key])
    assert table.leases_held(2, key) == 1
    with pytest.raises(lc.LockedError):
        table.delete([key])
    table.release_read(2, [key])
    table.delete([key])
    assert table.info(key) is None
    with pytest.raises(lc.KeyAbsentError):
        table.delete([key])
    table.check_invariants()


def test_abort_write_frees_the_reservation(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    keys = make_keys(3)
    table.reserve_write(owner(1), keys, OBJECT_SIZE)
    assert table.stats().writing == 3
    table.abort_write(1, keys)
    assert table.stats().used_bytes == 0
    assert table.contains(keys).none()


def test_new_only_skips_and_strict_refuses(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    keys = make_keys(3)
    store(table, keys[:1])
    res = table.reserve_write(owner(2), [keys[0], keys[1], keys[1], keys[2]], OBJECT_SIZE)
    assert [r.skipped for r in res] == [True, False, True, False]
    table.finish_write(2, [keys[1], keys[2]])
    with pytest.raises(lc.NotWritableError):
        table.reserve_write(
            owner(3), [*make_keys(1), keys[0]], OBJECT_SIZE, mode=lc.ReserveMode.STRICT
        )
    assert table.stats().objects == 3
    with pytest.raises(lc.InvalidArgumentError):
        table.reserve_write(owner(3), make_keys(1), 0)


def test_out_of_memory_leaves_nothing_allocated(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    leased = make_keys(CAPACITY_OBJECTS - 2)
    store(table, leased, read_leases=1)  # leased: not evictable
    used = table.stats().used_bytes
    with pytest.raises(lc.OutOfMemoryError):
        table.reserve_write(owner(2), make_keys(3), OBJECT_SIZE)
    s = table.stats()
    assert (s.used_bytes, s.reserve_failures, s.evictions) == (used, 1, 0)
    with pytest.raises(lc.OutOfMemoryError):
        table.reserve_write(owner(2), make_keys(1), ARENA_BYTES + 1)
    table.reserve_write(owner(2), make_keys(2), OBJECT_SIZE)  # what fits still fits
    table.check_invariants()


# ---- leases -----------------------------------------------------------------------------------


def test_prefix_lease_stops_at_the_first_miss(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    keys = make_keys(5)
    store(table, [keys[0], keys[1], keys[3], keys[4]])
    assert table.contains(keys).to_list() == [True, True, False, True, True]
    assert table.acquire_read_prefix(owner(7), keys) == 2
    assert [table.leases_held(7, k) for k in keys] == [1, 1, 0, 0, 0]
    assert table.touch_prefix(keys) == 2
    table.release_read(7, keys[:2])
    assert table.stats().read_leases == 0
    assert table.acquire_read_prefix(owner(7), make_keys(2) + keys) == 0
    assert table.stats().requests == 0


def test_extra_count_needs_one_release_per_lease(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    keys = make_keys(2)
    store(table, keys, request=3, read_leases=1 + 2)  # loaded for an MLA request, extra_count 2
    assert [table.leases_held(3, k) for k in keys] == [3, 3]
    for remaining in (2, 1, 0):
        table.release_read(3, keys)  # one tensor-parallel worker
        assert table.leases_held(3, keys[0]) == remaining
    with pytest.raises(lc.LeaseNotHeldError):
        table.release_read(3, keys)
    assert table.stats().evictable == 2
    table.acquire_read(owner(4), keys, count=3)
    with pytest.raises(lc.LeaseNotHeldError):
        table.release_read(4, keys, count=4)
    assert table.leases_held(4, keys[1]) == 3  # the failed release changed nothing
    with pytest.raises(lc.InvalidArgumentError):
        table.acquire_read(owner(4), keys, count=0)


def test_a_request_cannot_release_another_requests_lease(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    keys = make_keys(2)
    store(table, keys)
    table.acquire_read(owner(10), keys)
    with pytest.raises(lc.LeaseNotHeldError):
        table.release_read(11, keys)
    table.acquire_read(owner(11), keys[:1])
    with pytest.raises(lc.LeaseNotHeldError):
        table.release_read(11, keys)  # holds only the first: atomic, nothing released
    assert table.leases_held(11, keys[0]) == 1
    assert table.leases_held(10, keys[0]) == table.leases_held(10, keys[1]) == 1


def test_release_request_and_client(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    keys = make_keys(3)
    store(table, keys)
    table.acquire_read(owner(20, client=9), keys)
    table.acquire_read(owner(21, client=9), keys[:1])
    table.acquire_read(owner(22, client=8), keys[:2])
    assert table.release_request(20) == 3
    assert table.release_request(20) == 0
    assert table.release_client(9) == 1
    s = table.stats()
    assert (s.read_leases, s.requests) == (2, 1)
    writing = make_keys(1)
    table.reserve_write(owner(22, client=8), writing, OBJECT_SIZE)
    assert table.release_request(22) == 3  # a write lease released with its request aborts it
    assert table.info(writing[0]) is None
    table.check_invariants()


# ---- TTLs on a manual clock -------------------------------------------------------------------


def test_expired_read_leases_are_reaped(
    table: lc.ObjectTable, clock: lc.ManualClock, make_keys: KeyFactory
) -> None:
    keys = make_keys(2)
    store(table, keys)
    table.acquire_read(owner(5), keys)
    clock.advance(29.0)
    assert table.reap_expired() == 0
    clock.advance(2.0)  # past read_lease_ttl_s = 30
    assert table.reap_expired() == 2
    assert table.leases_held(5, keys[0]) == 0
    assert table.stats().expired_leases == 2
    table.delete(keys)


def test_an_expired_write_lease_never_becomes_readable(
    table: lc.ObjectTable, clock: lc.ManualClock, make_keys: KeyFactory
) -> None:
    (key,) = make_keys(1)
    (r,) = table.reserve_write(owner(6), [key], OBJECT_SIZE)
    table.view(r.offset, 4)[:] = 1  # half-written
    clock.advance(11.0)  # past write_lease_ttl_s = 10
    assert table.reap_expired() == 1
    assert table.info(key) is None
    assert not table.contains([key]).any()
    with pytest.raises(lc.KeyAbsentError):
        table.finish_write(6, [key])
    # The writer may still be writing: the extent is quarantined until it is known to be done.
    assert table.stats().quarantined == 1
    assert table.stats().used_bytes > 0
    assert table.release_quarantine(6) == 1
    assert table.stats().used_bytes == 0


# ---- temporary objects, delete, clear, eviction -----------------------------------------------


def test_temporary_objects_are_freed_by_their_last_release(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    (key,) = make_keys(1)
    table.reserve_write(owner(8), [key], OBJECT_SIZE, temporary=True)
    table.finish_write(8, [key], read_leases=2)
    info = table.info(key)
    assert info is not None and info.temporary and info.readers == 2
    assert table.stats().temporary == 1
    assert table.evict_bytes(ARENA_BYTES) == 0  # never evictable
    table.release_read(8, [key])
    assert table.info(key) is not None
    table.release_read(8, [key])
    assert table.info(key) is None
    assert table.stats().used_bytes == 0
    (other,) = make_keys(1)
    table.reserve_write(owner(9), [other], OBJECT_SIZE, temporary=True)
    table.finish_write(9, [other])  # no reader at all: freed at once
    assert table.info(other) is None


def test_clear_keeps_leased_objects_unless_forced(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    keys = make_keys(3)
    store(table, keys)
    table.acquire_read(owner(30), keys[:1])
    assert table.clear() == 2
    assert table.contains(keys).to_list() == [True, False, False]
    assert table.clear(force=True) == 1
    assert table.stats().detached == 1
    table.release_read(30, keys[:1])
    s = table.stats()
    assert (s.detached, s.used_bytes, s.objects) == (0, 0, 0)


def test_eviction_takes_chain_tails_first_and_spares_leases(
    table: lc.ObjectTable, make_keys: KeyFactory
) -> None:
    chains = [make_keys(8) for _ in range(CAPACITY_OBJECTS // 8)]
    for i, chain in enumerate(chains):
        store(table, chain, request=100 + i)
    assert table.stats().used_bytes == ARENA_BYTES
    table.acquire_read(owner(1), chains[1])  # leased: must survive
    store(table, make_keys(3), request=200)
    s = table.stats()
    assert s.evictions == 3
    # The oldest chain lost its last three chunks, not its head.
    assert table.contains(chains[0]).to_list() == [True] * 5 + [False] * 3
    assert table.contains(chains[1]).all()
    table.touch_prefix(chains[0])  # now the most recent: chain 2's tail goes next
    store(table, make_keys(1), request=201)
    assert table.contains(chains[0]).popcount() == 5
    assert table.contains(chains[2]).to_list() == [True] * 7 + [False]
    assert table.evict_bytes(1) == OBJECT_SIZE
    table.check_invariants()


# ---- zero-copy views --------------------------------------------------------------------------


def test_views_alias_the_same_memory(
    table: lc.ObjectTable, arena: lc.Arena, make_keys: KeyFactory
) -> None:
    (key,) = make_keys(1)
    (r,) = table.reserve_write(owner(1), [key], OBJECT_SIZE)
    v1 = table.view(r.offset, r.size)
    v2 = table.view(r.offset, r.size)
    v1[:] = np.arange(OBJECT_SIZE, dtype=np.uint64).astype(np.uint8)
    assert np.array_equal(v1, v2)
    assert np.array_equal(arena.view(r.offset, r.size), v1)
    attached = lc.AttachedArena(arena.descriptor)
    attached.view(r.offset, 1)[0] = 0xAB
    assert v2[0] == 0xAB
    assert v1.ctypes.data == v2.ctypes.data  # zero copy: same address
    table.finish_write(1, [key])
    with pytest.raises(lc.InvalidArgumentError):
        table.view(table.capacity, 1)
    assert table.capacity == ARENA_BYTES


def test_a_view_keeps_the_arena_alive(clock: lc.ManualClock, make_keys: KeyFactory) -> None:
    name = f"lmcache_cpp-test-{uuid.uuid4().hex}"
    arena = lc.Arena(1 << 20, backend=lc.ArenaBackend.POSIX_SHM, name=name)
    table = lc.ObjectTable(arena, clock=clock)
    (key,) = make_keys(1)
    (r,) = table.reserve_write(owner(1), [key], 4096)
    view = table.view(r.offset, r.size)
    view[:] = 42
    table.finish_write(1, [key])
    del table, arena
    gc.collect()
    path = f"/dev/shm/{name}"
    assert os.path.exists(path)  # still mapped through the view
    view[:10] = 7
    assert view[:11].tolist() == [7] * 10 + [42]
    del view
    gc.collect()
    assert not os.path.exists(path)  # the view was the last owner


# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"high_watermark": 0.5, "low_watermark": 0.9},
        {"low_watermark": 0.0},
        {"high_watermark": 1.5},
        {"read_lease_ttl_s": 0.0},
        {"write_lease_ttl_s": -1.0},
        {"reap_interval_s": float("nan")},
        {"read_lease_ttl_s": float("inf")},
        {"eviction_policy": "mru-please"},
        {"alignment": 3000},
    ],
)
def test_bad_options_are_invalid_arguments(arena: lc.Arena, kwargs: dict[str, object]) -> None:
    with pytest.raises(lc.InvalidArgumentError):
        lc.ObjectTable(arena, lc.ObjectTableOptions(**kwargs))  # type: ignore[arg-type]


def test_options_are_plain_attributes(arena: lc.Arena) -> None:
    opts = lc.ObjectTableOptions()
    opts.read_lease_ttl_s = 5.0
    opts.alignment = 8192
    assert "read_lease_ttl_s=5.0" in repr(opts)
    t = lc.ObjectTable(arena, opts)
    res = t.reserve_write(owner(1), [lc.ObjectKey(lc.ChunkHash(bytes(32)))], 1)
    assert res[0].offset % 8192 == 0
    t.start()
    t.start()
    t.stop()
    t.stop()
    running = lc.ObjectTable(arena)
    running.start()
    del running  # dropping a started table stops and joins its thread
    gc.collect()


# ---- GIL --------------------------------------------------------------------------------------


def python_runs_during(native_call: Callable[[], object], max_calls: int = 500) -> bool:
    """Whether this thread gets to run Python while another thread is inside `native_call`.

    The switch interval is raised so Python never preempts a thread: the worker gives up the GIL
    only inside a native call that releases it. Main is scheduled after start() only once the
    worker releases the GIL; if the calls held it, main would run after the loop, see
    in_loop == False and the check would fail, whatever the timing.
    """
    state = {"in_loop": False}
    stop = threading.Event()

    def worker() -> None:
        state["in_loop"] = True
        for _ in range(max_calls):
            if stop.is_set():
                break
            native_call()
        state["in_loop"] = False

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        observed = state["in_loop"]
        stop.set()
        thread.join()
    finally:
        sys.setswitchinterval(old)
    return observed


def test_hashing_releases_the_gil(hasher: lc.ChunkHasher) -> None:
    tokens = np.arange(1 << 20, dtype=np.uint32)
    assert python_runs_during(lambda: hasher.hash_tokens(tokens))


def test_object_table_calls_release_the_gil(table: lc.ObjectTable, make_keys: KeyFactory) -> None:
    keys = make_keys(CAPACITY_OBJECTS)
    store(table, keys)
    lookup = keys * 1000  # one call scans 64k keys in C++
    assert python_runs_during(lambda: table.contains(lookup))


def test_two_threads_drive_one_table_concurrently(make_keys: KeyFactory) -> None:
    arena = lc.Arena(1 << 20)
    table = lc.ObjectTable(arena, lc.ObjectTableOptions(high_watermark=1.0, low_watermark=1.0))
    rounds = 300
    barrier = threading.Barrier(2)
    results: dict[int, tuple[int, int]] = {}
    per_thread_keys = {t: [make_keys(4) for _ in range(rounds)] for t in (0, 1)}

    def worker(t: int) -> None:
        barrier.wait()
        hits = good = 0
        for i, keys in enumerate(per_thread_keys[t]):
            request = 1 + t * 10_000 + i
            res = table.reserve_write(owner(request, client=t), keys, 4096)
            for r in res:
                table.view(r.offset, r.size)[:] = (t * 7 + i) % 251
            table.finish_write(request, keys)
            n = table.acquire_read_prefix(owner(request, client=t), keys)
            hits += n
            good += sum(
                bool((table.view(r.offset, r.size) == (t * 7 + i) % 251).all()) for r in res
            )
            table.release_read(request, keys[:n])
            table.delete(keys)
        results[t] = (hits, good)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {0: (rounds * 4, rounds * 4), 1: (rounds * 4, rounds * 4)}
    s = table.stats()
    assert (s.objects, s.read_leases, s.write_leases, s.used_bytes) == (0, 0, 0, 0)
    table.check_invariants()
