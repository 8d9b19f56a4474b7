"""L2 adapters through the bindings: the in-memory adapter (faults, stalls, pins), the file-system
adapter (real files under tmp_path: round trip, restart, corruption), and Python adapters (the
trampoline: zero-copy views, worker threads, exceptions becoming failed operations, close)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import lmcache_cpp as lc
from conftest import KeyFactory
from dict_adapter import DictL2Adapter

SIZE = 4096

Arrays = list[npt.NDArray[np.uint8]]


def patterns(n: int, size: int = SIZE, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def zeros(n: int, size: int = SIZE) -> Arrays:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def memory() -> Iterator[lc.MemoryL2Adapter]:
    a = lc.MemoryL2Adapter()
    yield a
    a.set_stalled(False)
    a.close()


@pytest.fixture
def dict_adapter() -> Iterator[DictL2Adapter]:
    a = DictL2Adapter()
    yield a
    a.close()


# ---- memory adapter ---------------------------------------------------------------------------


def test_memory_round_trip_pins_and_stats(
    memory: lc.MemoryL2Adapter, make_keys: KeyFactory
) -> None:
    keys = make_keys(3)
    data = patterns(3)
    assert memory.submit_store(keys, data).all()
    assert all(memory.contains(k) for k in keys)
    assert memory.submit_lookup_and_pin(keys).all()
    assert memory.pin_count(keys[0]) == 1 and memory.total_pins() == 3
    out = zeros(3)
    assert memory.submit_load(keys, out).all()
    for got, want in zip(out, data, strict=True):
        np.testing.assert_array_equal(got, want)
    memory.submit_unpin(keys)  # the memory adapter unpins immediately
    assert memory.total_pins() == 0
    s = memory.stats()
    assert (s.objects, s.stores, s.lookups, s.loads, s.load_misses) == (3, 3, 3, 3, 0)
    assert s.bytes_written == s.bytes_read == 3 * SIZE
    assert s.to_dict()["in_flight"] == 0
    assert memory.name == "memory"


def test_memory_faults_and_stall(make_keys: KeyFactory) -> None:
    memory = lc.MemoryL2Adapter(worker_threads=1)  # one worker: the queue is FIFO
    keys = make_keys(2)
    memory.inject_fault(lc.L2Op.STORE, 1, lc.FaultKind.FAIL)
    with pytest.raises(lc.LMCacheIOError):
        memory.submit_store(keys, patterns(2))
    data = patterns(2)
    assert memory.submit_store(keys, data).all()
    memory.inject_fault(lc.L2Op.LOAD, 1, lc.FaultKind.CORRUPT)
    out = zeros(2)
    # The damaged object fails the checksum kept since its store: a miss, never bytes.
    assert memory.submit_load(keys, out).to_list() == [False, True]
    np.testing.assert_array_equal(out[1], data[1])
    assert memory.stats().corrupt_reads == 1

    memory.set_stalled(True)
    with pytest.raises(lc.DeadlineExceededError):
        memory.submit_lookup_and_pin(keys, timeout_s=0.2)
    assert memory.wait_for_blocked_operations(1, 10.0)
    memory.set_stalled(False)
    # The lookup that timed out still ran once released: it pinned both keys.
    assert memory.submit_lookup_and_pin([]).none()
    assert memory.total_pins() == 2
    memory.submit_unpin(keys)
    memory.close()


def test_memory_close_cancels_and_then_rejects(make_keys: KeyFactory) -> None:
    a = lc.MemoryL2Adapter(worker_threads=1)
    keys = make_keys(1)
    a.set_stalled(True)
    errors: list[BaseException] = []

    def blocked_lookup() -> None:
        try:
            a.submit_lookup_and_pin(keys)
        except lc.LMCacheError as e:
            errors.append(e)

    t = threading.Thread(target=blocked_lookup)
    t.start()
    assert a.wait_for_blocked_operations(1, 10.0)
    a.close()  # releases the stalled worker: the held lookup is cancelled
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], lc.CancelledError)
    with pytest.raises(lc.UnavailableError):
        a.submit_store(keys, patterns(1))
    a.close()  # idempotent


def test_memory_options_are_validated() -> None:
    with pytest.raises(lc.InvalidArgumentError):
        lc.MemoryL2Adapter(worker_threads=0)
    with pytest.raises(lc.InvalidArgumentError):
        lc.MemoryL2Adapter(latency_s=-1.0)
    a = lc.MemoryL2Adapter(capacity_bytes=2 * SIZE, latency_s=0.001)
    assert a.stats().capacity_bytes == 2 * SIZE
    a.close()


def test_load_needs_writable_arrays(memory: lc.MemoryL2Adapter, make_keys: KeyFactory) -> None:
    keys = make_keys(1)
    assert memory.submit_store(keys, [b"x" * 16]).all()
    with pytest.raises(TypeError):
        memory.submit_load(keys, [b"\0" * 16])  # type: ignore[list-item]
    ro = np.zeros(16, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(TypeError):
        memory.submit_load(keys, [ro])


# ---- file-system adapter ----------------------------------------------------------------------


def test_fs_round_trip_restart_and_corruption(tmp_path: Path, make_keys: KeyFactory) -> None:
    keys = make_keys(3)
    data = patterns(3, seed=1)
    a = lc.FileSystemL2Adapter(str(tmp_path), io_threads=2)
    assert a.name == f"fs:{tmp_path}"
    assert a.submit_store(keys, data).all()
    assert all(os.path.exists(a.path_for(k)) for k in keys)
    a.close()

    b = lc.FileSystemL2Adapter(str(tmp_path))
    assert b.recovery.indexed == 3 and b.recovery.dropped == 0
    # Flip one payload byte of the second object: it must read as a miss, never as data.
    path = Path(b.path_for(keys[1]))
    raw = bytearray(path.read_bytes())
    raw[4096 + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert b.submit_lookup_and_pin(keys).all()
    out = zeros(3)
    loaded = b.submit_load(keys, out)
    assert loaded.to_list() == [True, False, True]
    np.testing.assert_array_equal(out[0], data[0])
    np.testing.assert_array_equal(out[2], data[2])
    b.submit_unpin(keys)
    s = b.stats()
    assert s.corrupt_reads == 1 and s.objects == 2
    assert b.total_pins() == 0
    assert not b.contains(keys[1])
    b.close()


def test_fs_bad_directory_is_an_io_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(lc.LMCacheIOError):
        lc.FileSystemL2Adapter(str(blocker / "sub"))


# ---- Python adapters --------------------------------------------------------------------------


def test_python_adapter_round_trip_on_its_own_worker(
    dict_adapter: DictL2Adapter, make_keys: KeyFactory
) -> None:
    keys = make_keys(4)
    data = patterns(4, seed=2)
    assert dict_adapter.submit_store(keys, data).all()
    assert dict_adapter.objects[keys[0]] == data[0].tobytes()
    assert dict_adapter.submit_lookup_and_pin(keys).all()
    assert dict_adapter.total_pins() == 4
    out = zeros(4)
    assert dict_adapter.submit_load(keys, out).all()
    for got, want in zip(out, data, strict=True):
        np.testing.assert_array_equal(got, want)
    dict_adapter.submit_unpin(keys)
    dict_adapter.drain()
    assert dict_adapter.total_pins() == 0
    # Views: read-only for store, writable for load.
    assert dict_adapter.writable == {"store": [False] * 4, "load": [True] * 4}
    # The methods ran on the adapter's worker, never on the calling thread.
    assert dict_adapter.threads and threading.get_ident() not in dict_adapter.threads
    assert len(dict_adapter.threads) == 1
    q = dict_adapter.sync_stats()
    assert (q.completed, q.failed, q.unpins, q.queued) == (4, 0, 1, 0)
    s = dict_adapter.stats()
    assert (s.stores, s.lookups, s.loads, s.bytes_read) == (4, 4, 4, 4 * SIZE)
    assert dict_adapter.name == "dict"


def test_python_exceptions_become_failed_operations(
    dict_adapter: DictL2Adapter, make_keys: KeyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    keys = make_keys(2)

    def boom() -> None:
        raise RuntimeError("tier unreachable")

    dict_adapter.hooks["store"] = boom
    with pytest.raises(lc.LMCacheIOError, match="tier unreachable"):
        dict_adapter.submit_store(keys, patterns(2))
    assert dict_adapter.sync_stats().failed == 1
    assert any("tier unreachable" in r.getMessage() for r in caplog.records)
    del dict_adapter.hooks["store"]
    assert dict_adapter.submit_store(keys, patterns(2)).all()  # the worker survived


def test_python_answers_of_the_wrong_shape_fail(make_keys: KeyFactory) -> None:
    keys = make_keys(3)

    class Sloppy(lc.PythonL2Adapter):
        def store(
            self, keys: list[lc.ObjectKey], buffers: Arrays, checksums: list[int]
        ) -> list[bool]:
            return [True]  # one answer for three keys

        def lookup_and_pin(self, keys: list[lc.ObjectKey]) -> lc.Bitmap:
            return lc.Bitmap(len(keys), True)  # a Bitmap is accepted

        def load(self, keys: list[lc.ObjectKey], buffers: Arrays) -> None:  # type: ignore[override]
            return None

        def unpin(self, keys: list[lc.ObjectKey]) -> None:
            pass

    a = Sloppy()
    try:
        with pytest.raises(lc.LMCacheIOError, match="1 results for 3 keys"):
            a.submit_store(keys, patterns(3))
        assert a.submit_lookup_and_pin(keys).all()
        with pytest.raises(lc.LMCacheIOError, match="returned None"):
            a.submit_load(keys, zeros(3))
    finally:
        a.close()


def test_python_adapter_gets_checksums_and_every_load_is_verified(
    dict_adapter: DictL2Adapter, make_keys: KeyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    keys = make_keys(3)
    data = patterns(3, seed=5)
    assert dict_adapter.submit_store(keys, data).all()
    assert [dict_adapter.checksums[k] for k in keys] == [lc.crc32c(d) for d in data]
    assert lc.crc32c(b"123456789") == 0xE3069283  # the standard CRC32C check value
    # The tier damages key 1's bytes (a bad disk, a buggy store): the base catches it.
    damaged = bytearray(dict_adapter.objects[keys[1]])
    damaged[7] ^= 0x10
    dict_adapter.objects[keys[1]] = bytes(damaged)
    out = zeros(3)
    assert dict_adapter.submit_load(keys, out).to_list() == [True, False, True]
    np.testing.assert_array_equal(out[0], data[0])
    np.testing.assert_array_equal(out[2], data[2])
    assert dict_adapter.stats().corrupt_reads == 1
    assert dict_adapter.stats().load_misses == 1
    assert any("failed their checksum" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (lambda n: [True] * n, "returned bool for key 0"),
        (lambda n: lc.Bitmap(n, True), "returned a Bitmap"),
        (lambda n: ["x"] * n, "returned str for key 0"),
        (lambda n: [2**40] * n, "out of range for key 0"),
    ],
)
def test_python_load_without_its_checksum_fails_the_call(
    make_keys: KeyFactory, answer: Callable[[int], Any], match: str
) -> None:
    # An adapter that reports bytes loaded without the checksum they were stored with: nothing
    # can vouch for those bytes, so none of them load.
    class Unverified(DictL2Adapter):
        def load(self, keys: list[lc.ObjectKey], buffers: Arrays) -> Any:  # type: ignore[override]
            super().load(keys, buffers)
            return answer(len(keys))

    keys = make_keys(2)
    a = Unverified()
    try:
        assert a.submit_store(keys, patterns(2)).all()
        with pytest.raises(lc.LMCacheIOError, match=match):
            a.submit_load(keys, zeros(2))
        assert a.sync_stats().failed == 1
    finally:
        a.close()


def test_unimplemented_methods_fail_instead_of_crashing(make_keys: KeyFactory) -> None:
    a = lc.PythonL2Adapter(name="empty")
    try:
        with pytest.raises(lc.LMCacheIOError):
            a.submit_lookup_and_pin(make_keys(1))
        with pytest.raises(NotImplementedError):
            a.lookup_and_pin(make_keys(1))
    finally:
        a.close()


def test_python_adapter_close_finishes_the_running_call_and_refuses_the_rest(
    make_keys: KeyFactory,
) -> None:
    # The exact cancel-what-is-queued order is tested in C++ (sync_adapter_test.cc, where the
    # queue can be observed); here: nothing hangs, nothing crashes, every call gets one answer.
    a = DictL2Adapter()
    keys = make_keys(1)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    a.hooks["lookup_and_pin"] = hold
    outcomes: dict[int, str] = {}

    def call(i: int) -> None:
        try:
            a.submit_lookup_and_pin(keys)
            outcomes[i] = "ok"
        except lc.CancelledError:
            outcomes[i] = "cancelled"
        except lc.UnavailableError:
            outcomes[i] = "unavailable"

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert entered.wait(10)  # the only worker is inside the first call
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 4)]
    for t in others:
        t.start()
    closer = threading.Thread(target=a.close)
    closer.start()
    release.set()
    for t in [first, *others, closer]:
        t.join(30)
        assert not t.is_alive()
    assert outcomes[0] == "ok"
    assert len(outcomes) == 4
    assert a.calls["lookup_and_pin"] == list(outcomes.values()).count("ok")
    with pytest.raises(lc.UnavailableError):
        a.submit_lookup_and_pin(keys)


def test_several_workers_call_python_concurrently(make_keys: KeyFactory) -> None:
    a = DictL2Adapter(worker_threads=3)
    barrier = threading.Barrier(3, timeout=30)

    def meet() -> None:
        barrier.wait()  # passes only with three calls in flight at once

    a.hooks["lookup_and_pin"] = meet
    keys = make_keys(1)
    try:
        threads = [threading.Thread(target=a.submit_lookup_and_pin, args=(keys,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert len(a.threads) == 3
        assert not barrier.broken
    finally:
        a.close()


def test_dropped_python_adapter_is_closed_and_collected(make_keys: KeyFactory) -> None:
    a = DictL2Adapter(worker_threads=2)
    assert a.submit_store(make_keys(1), patterns(1)).all()
    del a
    gc.collect()  # dealloc closes the adapter (joining its workers) without deadlocking
