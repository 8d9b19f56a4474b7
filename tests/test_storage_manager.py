"""The storage manager through the bindings, on real parts: a shared-memory arena, the object
table, file-system adapters under tmp_path, in-memory adapters with faults and stalls, and a
dict-backed Python adapter. Covers the L1 -> L2 store path, the prefetch pipeline (two-phase and
synchronous), pins returning to zero, ownership, and that Python adapters only take the GIL
inside their calls."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import lmcache_cpp as lc
from conftest import KeyFactory
from dict_adapter import DictL2Adapter
from lmcache_cpp.config import huge_pages_available

OBJ = 16 * 1024
ARENA = 64 * OBJ
CLIENT = 7

ManagerFactory = Callable[..., lc.StorageManager]


def payload(key: lc.ObjectKey) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.chunk.bytes).digest()[:8], "little")
    return np.random.default_rng(seed + key.kv_rank).integers(0, 256, OBJ, dtype=np.uint8)


def owner(request: int, client: int = CLIENT) -> lc.LeaseOwner:
    return lc.LeaseOwner(client, request)


@pytest.fixture
def make_manager() -> Iterator[ManagerFactory]:
    """make_manager(*adapters) -> a started manager; every one is stopped afterwards."""
    made: list[lc.StorageManager] = []

    def factory(*adapters: lc.L2Adapter) -> lc.StorageManager:
        table = lc.ObjectTableOptions(high_watermark=1.0, low_watermark=1.0)
        config = lc.StorageManagerConfig(ARENA, table=table, adapters=list(adapters))
        m = lc.StorageManager(config)
        m.start()
        made.append(m)
        return m

    yield factory
    for m in made:
        m.stop()


def write_l1(m: lc.StorageManager, keys: list[lc.ObjectKey], request: int = 900) -> None:
    """Stores objects into L1 through zero-copy views of the arena, as an engine worker would."""
    table = m.table()
    for r in table.reserve_write(owner(request, client=1), keys, OBJ):
        assert not r.skipped
        table.view(r.offset, r.size)[:] = payload(r.key)
    table.finish_write(request, keys)


def assert_l1_bytes(m: lc.StorageManager, keys: list[lc.ObjectKey]) -> None:
    table = m.table()
    for k in keys:
        info = table.info(k)
        assert info is not None and info.state is lc.ObjectState.READY
        np.testing.assert_array_equal(table.view(info.offset, OBJ), payload(k))


def put_l2(adapter: lc.L2Adapter, keys: list[lc.ObjectKey]) -> None:
    assert adapter.submit_store(keys, [payload(k) for k in keys]).all()


def prefetch(m: lc.StorageManager, keys: list[lc.ObjectKey], request: int = 1) -> lc.PrefetchResult:
    ctl = m.prefetch_controller()
    handle = ctl.submit(owner(request), keys, OBJ)
    result = ctl.wait(CLIENT, handle, 30.0)
    assert result is not None
    return result


def assert_clean(m: lc.StorageManager, *requests: int) -> None:
    """After the requests' leases are returned nothing is left: no leases, no temporaries."""
    assert m.prefetch_controller().wait_idle(10.0)
    for r in requests:
        m.end_request(r)
    s = m.table().stats()
    assert (s.read_leases, s.write_leases, s.temporary) == (0, 0, 0)
    m.table().check_invariants()


def assert_released(adapter: lc.L2Adapter, m: lc.StorageManager, *requests: int) -> None:
    """Every pin the L2 tier gave is returned, and nothing is left held in L1 (assert_clean)."""
    if isinstance(adapter, DictL2Adapter):
        adapter.drain()  # the pipeline's unpins are queued on the adapter's worker
    assert adapter.total_pins() == 0
    assert_clean(m, *requests)


def manager_over(
    make_manager: ManagerFactory, make_keys: KeyFactory, adapter: lc.L2Adapter, n: int
) -> tuple[lc.StorageManager, list[lc.ObjectKey]]:
    """A manager with ``adapter`` as its L2 tier and ``n`` keys, all of them stored in the tier."""
    m = make_manager(adapter)
    keys = make_keys(n)
    put_l2(adapter, keys)
    return m, keys


# ---- store path and file-system tier ------------------------------------------------------------


def test_file_tier_round_trip_through_the_manager(
    tmp_path: Path, make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    fs = lc.FileSystemL2Adapter(str(tmp_path / "l2"))
    m = make_manager(fs)
    keys = make_keys(8)
    write_l1(m, keys)
    assert m.store_controller().wait_idle(30.0)
    assert m.store_controller().stats().stored == 8
    assert fs.stats().objects == 8

    assert m.table().clear() == 8  # L1 empty: everything must come back from the files
    assert m.table().contains(keys).none()
    ctl = m.prefetch_controller()
    handle = ctl.submit(owner(1), keys, OBJ)
    result = ctl.wait(CLIENT, handle, 30.0)
    assert result is not None
    assert (result.hits, result.l1_hits, result.l2_hits) == (8, 0, 8)
    assert_l1_bytes(m, keys)
    assert fs.total_pins() == 0
    # Objects loaded from L2 are never written back.
    assert m.store_controller().wait_idle(10.0)
    assert m.store_controller().stats().announced == 8
    stats = m.stats()
    assert stats.prefetch.l2_hit_keys == 8 and len(stats.l2) == 1
    assert_clean(m, 1)


def test_file_tier_survives_a_restart(
    tmp_path: Path, make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    keys = make_keys(6)
    first = make_manager(lc.FileSystemL2Adapter(str(tmp_path)))
    write_l1(first, keys)
    assert first.store_controller().wait_idle(30.0)
    first.stop()

    fs = lc.FileSystemL2Adapter(str(tmp_path))  # a new process would do the same
    assert fs.recovery.indexed == 6
    second = make_manager(fs)
    assert prefetch(second, keys).l2_hits == 6
    assert_l1_bytes(second, keys)
    assert_clean(second, 1)


def test_corrupt_file_reads_as_a_miss(
    tmp_path: Path, make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    keys = make_keys(4)
    fs = lc.FileSystemL2Adapter(str(tmp_path))
    m = make_manager(fs)
    write_l1(m, keys)
    assert m.store_controller().wait_idle(30.0)
    m.table().clear()
    path = Path(fs.path_for(keys[2]))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x5A  # the last payload byte
    path.write_bytes(bytes(raw))

    result = prefetch(m, keys)
    assert result.hits == 2  # the prefix up to the corrupt object; nothing after it
    assert_l1_bytes(m, keys[:2])
    assert m.table().contains(keys[2:]).none()
    assert fs.stats().corrupt_reads == 1
    assert fs.total_pins() == 0
    assert_clean(m, 1)


# ---- prefetch pipeline -------------------------------------------------------------------------


def test_gap_in_l2_trims_the_hit_and_returns_every_pin(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    mem = lc.MemoryL2Adapter()
    m = make_manager(mem)
    keys = make_keys(5)
    put_l2(mem, [keys[0], keys[1], keys[3], keys[4]])  # keys[2] missing
    result = prefetch(m, keys)
    assert (result.hits, result.l2_hits) == (2, 2)
    assert m.table().contains(keys).to_list() == [True, True, False, False, False]
    assert_released(mem, m, 1)


def test_two_adapters_with_disjoint_halves_give_a_full_hit(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    a, b = lc.MemoryL2Adapter(), lc.MemoryL2Adapter()
    m = make_manager(a, b)
    keys = make_keys(8)
    put_l2(a, keys[:4])
    put_l2(b, keys[4:])
    assert m.prefetch_controller().num_adapters == 2
    result = prefetch(m, keys)
    assert (result.hits, result.l2_hits) == (8, 8)
    assert_l1_bytes(m, keys)
    assert a.stats().loads == 4 and b.stats().loads == 4
    assert a.total_pins() == b.total_pins() == 0
    assert_clean(m, 1)


def test_results_are_delivered_once_and_only_to_their_client(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    mem = lc.MemoryL2Adapter()
    m, keys = manager_over(make_manager, make_keys, mem, 3)
    ctl = m.prefetch_controller()
    handle = ctl.submit(owner(1), keys, OBJ)
    assert lc.JobHandle.from_hex(handle.hex()) == handle
    with pytest.raises(lc.PermissionDeniedError):
        ctl.query(CLIENT + 1, handle)
    with pytest.raises(lc.PermissionDeniedError):
        ctl.wait(CLIENT + 1, handle, 1.0)
    result = ctl.wait(CLIENT, handle, 30.0)
    assert result is not None and result.hits == 3
    with pytest.raises(lc.NotFoundError):
        ctl.query(CLIENT, handle)  # collected: exactly once
    with pytest.raises(lc.NotFoundError):
        ctl.cancel(CLIENT, handle)
    assert_released(mem, m, 1)


def test_sync_lookup_with_a_stalled_adapter_answers_by_its_deadline(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    mem = lc.MemoryL2Adapter()
    m = make_manager(mem)
    keys = make_keys(3)
    write_l1(m, keys[:1])
    put_l2(mem, keys[1:])
    mem.set_stalled(True)
    ctl = m.prefetch_controller()
    t0 = time.monotonic()
    r = ctl.lookup_and_pin(owner(1), keys, OBJ, 0.2)
    took = time.monotonic() - t0
    assert r.l2_timed_out and r.hits == 1 and r.l1_hits == 1
    assert took < 5.0
    joined = ctl.wait_load(1, 1.0)
    assert joined.hits == 1
    mem.set_stalled(False)  # late lookup answers: their pins are dropped on arrival
    assert ctl.wait_idle(10.0)
    assert mem.total_pins() == 0
    assert ctl.stats().l2_lookup_timeouts == 1
    assert_clean(m, 1)


def test_several_threads_join_one_sync_load(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    mem = lc.MemoryL2Adapter()
    m, keys = manager_over(make_manager, make_keys, mem, 4)
    mem.inject_fault(lc.L2Op.LOAD, 1, lc.FaultKind.DELAY, delay_s=0.1)
    ctl = m.prefetch_controller()
    r = ctl.lookup_and_pin(owner(9), keys, OBJ, 10.0, extra_count=3)
    assert (r.hits, r.l2_planned) == (4, 4)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        res = ctl.wait_load(9, 30.0)
        with lock:
            results.append(res.hits)
        m.table().release_read(9, keys)  # each worker returns its one lease

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert results == [4, 4, 4, 4]
    assert mem.stats().loads == 4  # the load ran once for all joiners
    assert m.table().stats().objects == 0  # temporaries freed with their last lease
    assert_released(mem, m, 9)


# ---- Python adapter as the L2 tier -------------------------------------------------------------


def test_python_adapter_is_a_full_l2_tier(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    py = DictL2Adapter()
    m = make_manager(py)
    keys = make_keys(6)
    write_l1(m, keys)
    assert m.store_controller().wait_idle(30.0)
    assert set(py.objects) == set(keys)
    assert all(py.objects[k] == payload(k).tobytes() for k in keys)

    m.table().clear()
    result = prefetch(m, keys)
    assert (result.hits, result.l2_hits) == (6, 6)
    assert_l1_bytes(m, keys)
    py.drain()  # the pipeline's unpins are queued on the adapter's worker
    assert py.total_pins() == 0
    assert py.calls["unpin"] >= 1
    assert threading.get_ident() not in py.threads
    assert m.adapters()[0] is py
    assert_clean(m, 1)


def test_python_adapter_that_raises_is_a_miss_not_a_crash(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    py = DictL2Adapter()
    m, keys = manager_over(make_manager, make_keys, py, 4)

    def broken() -> None:
        raise ConnectionError("remote store went away")

    py.hooks["load"] = broken
    result = prefetch(m, keys)
    assert result.hits == 0
    assert m.table().stats().objects == 0  # the reservations were discarded
    py.drain()
    assert py.total_pins() == 0  # the lookup's pins were returned
    assert m.stats().prefetch.load_failures == 4
    assert py.sync_stats().failed == 1

    py.hooks["lookup_and_pin"] = broken
    assert prefetch(m, keys, request=2).hits == 0

    py.hooks.clear()  # the tier recovers; the process never noticed
    assert prefetch(m, keys, request=3).hits == 4
    assert_released(py, m, 1, 2, 3)


def test_python_adapter_runs_while_the_main_thread_runs_python(
    make_manager: ManagerFactory, make_keys: KeyFactory
) -> None:
    # The adapter's load cannot finish until the main thread, running Python code after submit()
    # returned, releases it: submit does not wait for the adapter, and the adapter's worker and
    # the main thread take turns on the GIL instead of one holding it across the other's work.
    py = DictL2Adapter()
    m, keys = manager_over(make_manager, make_keys, py, 4)
    entered, release = threading.Event(), threading.Event()
    seen_by_adapter: list[int] = []

    def hold() -> None:
        entered.set()
        if not release.wait(30):
            raise TimeoutError("the main thread never ran")
        seen_by_adapter.append(len(main_work))

    py.hooks["load"] = hold
    ctl = m.prefetch_controller()
    handle = ctl.submit(owner(1), keys, OBJ)  # returns while the pipeline runs on C++ threads
    assert entered.wait(30)
    main_work = [i * i for i in range(10_000)]  # Python work while the adapter is mid-call
    assert ctl.query(CLIENT, handle) is None  # the job is still waiting on the adapter
    release.set()
    result = ctl.wait(CLIENT, handle, 30.0)
    assert result is not None and result.hits == 4
    assert seen_by_adapter == [10_000]
    assert_released(py, m, 1)


# ---- ownership and lifecycle --------------------------------------------------------------------


def test_components_keep_the_manager_and_adapters_alive(make_keys: KeyFactory) -> None:
    keys = make_keys(2)
    config = lc.StorageManagerConfig(ARENA, adapters=[DictL2Adapter()])  # no other reference
    m = lc.StorageManager(config)
    del config
    m.start()
    put_l2(m.adapters()[0], keys)
    table, ctl = m.table(), m.prefetch_controller()
    del m
    gc.collect()
    handle = ctl.submit(owner(1), keys, OBJ)  # the manager and its Python adapter still live
    result = ctl.wait(CLIENT, handle, 30.0)
    assert result is not None and result.hits == 2
    assert table.stats().read_leases == 2
    del ctl, table
    gc.collect()  # the last holder goes: the manager stops and closes its adapter


def test_start_stop_are_idempotent_and_final(make_keys: KeyFactory) -> None:
    mem = lc.MemoryL2Adapter()
    with lc.StorageManager(lc.StorageManagerConfig(ARENA, adapters=[mem])) as m:
        m.start()
        assert m.arena().size >= ARENA
    m.stop()
    with pytest.raises(lc.UnavailableError):
        m.start()
    with pytest.raises(lc.UnavailableError):
        m.prefetch_controller().submit(owner(1), make_keys(1), OBJ)
    with pytest.raises(lc.UnavailableError):
        mem.submit_lookup_and_pin(make_keys(1))  # stop closed the adapters


def test_config_fields_round_trip() -> None:
    config = lc.StorageManagerConfig(ARENA)
    assert config.adapters == [] and config.arena_backend is lc.ArenaBackend.MEMFD
    config.table.high_watermark = 0.5  # nested options are edited in place
    assert config.table.high_watermark == 0.5
    config.prefetch = lc.PrefetchOptions(max_in_flight=2, job_ttl_s=5.0)
    config.store = lc.StoreControllerOptions(free_l1_after_store=True)
    assert (config.prefetch.max_in_flight, config.store.free_l1_after_store) == (2, True)
    defaults = lc.PrefetchOptions()
    assert (defaults.max_in_flight, defaults.job_ttl_s, defaults.reap_interval_s) == (16, 120, 1)
    assert lc.StoreControllerOptions().max_batch == 64
    with pytest.raises(lc.InvalidArgumentError):
        lc.StorageManager(lc.StorageManagerConfig(0))


def test_manager_table_is_an_object_table_started_by_its_manager() -> None:
    with lc.StorageManager(lc.StorageManagerConfig(ARENA)) as m:
        m.start()
        table = m.table()
        assert isinstance(table, lc.ObjectTable)
        with pytest.raises(lc.InvalidArgumentError, match="manager starts and stops"):
            table.stop()
        with pytest.raises(lc.InvalidArgumentError):
            table.start()
        assert table.stats().objects == 0


def test_arena_huge_pages_are_asked_for_and_fall_back_to_normal_pages() -> None:
    size = 8 << 20
    smc = lc.StorageManagerConfig(size, arena_huge_pages=True)
    assert smc.arena_huge_pages
    storage = lc.StorageManager(smc)
    storage.start()
    try:
        # Explicit huge pages when the system has enough free, else normal pages (a warning).
        assert storage.arena().huge_pages == huge_pages_available(size)
        assert storage.arena().size >= size
    finally:
        storage.stop()
    assert not lc.StorageManagerConfig(size).arena_huge_pages
