"""Shared-memory arenas through the bindings: both backends, zero-copy views, a second process
attaching by descriptor, plain mmap of the descriptor's path, and the extent allocator."""

from __future__ import annotations

import gc
import logging
import mmap
import multiprocessing
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

import lmcache_cpp as lc

PAGE = mmap.PAGESIZE
BACKENDS = [lc.ArenaBackend.MEMFD, lc.ArenaBackend.POSIX_SHM]


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_and_describe(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(PAGE * 3 + 1, backend=backend)
    assert arena.size == PAGE * 4  # rounded up to the page size
    assert arena.backend is backend
    assert arena.fd >= 0
    desc = arena.descriptor
    assert desc.size == arena.size
    assert os.path.exists(desc.path)
    if backend is lc.ArenaBackend.POSIX_SHM:
        assert desc.path.startswith("/dev/shm/")
    else:
        assert desc.path == f"/proc/{os.getpid()}/fd/{arena.fd}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_write_and_read(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(1 << 20, backend=backend)
    whole = arena.view()
    assert whole.dtype == np.uint8
    assert whole.shape == (arena.size,)
    assert whole.flags.writeable and whole.flags.c_contiguous
    part = arena.view(4096, 16)
    part[:] = np.arange(16, dtype=np.uint8)
    assert bytes(whole[4096 : 4096 + 16]) == bytes(range(16))
    assert arena.view(arena.size).shape == (0,)  # empty view at the end is fine


def test_view_bounds_are_checked() -> None:
    arena = lc.Arena(1 << 16)
    for offset, size in [(arena.size + 1, None), (0, arena.size + 1), (arena.size - 8, 9)]:
        with pytest.raises(lc.InvalidArgumentError):
            arena.view(offset, size)
    with pytest.raises(TypeError):
        arena.view(-1)


def test_named_posix_shm_is_unlinked_after_the_last_view() -> None:
    name = f"lmcache_cpp-test-{uuid.uuid4().hex}"
    arena = lc.Arena(1 << 16, backend=lc.ArenaBackend.POSIX_SHM, name=name)
    path = f"/dev/shm/{name}"
    assert arena.descriptor.path == path
    assert os.path.exists(path)
    with pytest.raises(lc.LMCacheIOError):
        lc.Arena(1 << 16, backend=lc.ArenaBackend.POSIX_SHM, name=name)  # O_EXCL
    view = arena.view(0, 8)
    del arena
    gc.collect()
    view[:] = 7  # the view keeps the mapping (and the name) alive
    assert os.path.exists(path)
    assert bytes(view) == b"\x07" * 8
    del view
    gc.collect()
    assert not os.path.exists(path)


def test_bad_names_are_invalid_arguments() -> None:
    with pytest.raises(lc.InvalidArgumentError):
        lc.Arena(4096, backend=lc.ArenaBackend.POSIX_SHM, name="a/b")


def test_huge_pages_fall_back_with_a_logged_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache_cpp.core")
    arena = lc.Arena(4 << 20, huge_pages=True)
    arena.view(0, 4)[:] = 1
    warned = [r for r in caplog.records if r.name == "lmcache_cpp.core"]
    if arena.huge_pages:
        assert arena.size % (2 << 20) == 0
    else:
        assert any("huge pages" in r.getMessage() for r in warned)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attached_arena_in_process_shares_bytes(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(1 << 16, backend=backend)
    attached = lc.AttachedArena(arena.descriptor)
    assert attached.size == arena.size
    attached.view(100, 4)[:] = [9, 8, 7, 6]
    assert bytes(arena.view(100, 4)) == bytes([9, 8, 7, 6])


def test_attach_errors() -> None:
    arena = lc.Arena(1 << 16)
    with pytest.raises(lc.InvalidArgumentError):
        lc.AttachedArena(lc.ArenaDescriptor("", 4096))
    with pytest.raises(lc.InvalidArgumentError):
        lc.AttachedArena(lc.ArenaDescriptor(arena.descriptor.path, 0))
    with pytest.raises(lc.InvalidArgumentError):
        lc.AttachedArena(lc.ArenaDescriptor(arena.descriptor.path, arena.size * 2))
    with pytest.raises(lc.LMCacheIOError):
        lc.AttachedArena(lc.ArenaDescriptor("/nonexistent/arena", 4096))


def test_descriptor_pickles() -> None:
    import pickle

    d = lc.ArenaDescriptor("/dev/shm/x", 8192, True)
    back = pickle.loads(pickle.dumps(d))
    assert (back.path, back.size, back.huge_pages) == ("/dev/shm/x", 8192, True)
    assert "size=8192" in repr(back)


# ---- a second process -------------------------------------------------------------------------

_CHILD_SCRIPT = """
import sys
import lmcache_cpp as lc
path, size, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
attached = lc.AttachedArena(lc.ArenaDescriptor(path, size))
view = attached.view(offset, 5)
assert bytes(view) == b"ping!", bytes(view)
view[:] = list(b"pong!")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_subprocess_attaches_by_descriptor(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(1 << 20, backend=backend)
    offset = 12345
    arena.view(offset, 5)[:] = list(b"ping!")
    desc = arena.descriptor
    subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, desc.path, str(desc.size), str(offset)],
        check=True,
        timeout=60,
    )
    assert bytes(arena.view(offset, 5)) == b"pong!"


def _spawned_writer(descriptor: lc.ArenaDescriptor, offset: int, payload: bytes) -> None:
    attached = lc.AttachedArena(descriptor)
    attached.view(offset, len(payload))[:] = list(payload)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spawned_process_writes_what_the_parent_sees(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(1 << 20, backend=backend)
    payload = os.urandom(4096)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_spawned_writer, args=(arena.descriptor, 65536, payload))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert bytes(arena.view(65536, 4096)) == payload


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_mmap_of_the_descriptor_path(backend: lc.ArenaBackend) -> None:
    arena = lc.Arena(1 << 16, backend=backend)
    desc = arena.descriptor
    fd = os.open(desc.path, os.O_RDWR)
    try:
        with mmap.mmap(fd, desc.size, mmap.MAP_SHARED) as mm:
            mm[10:14] = b"abcd"
            assert bytes(arena.view(10, 4)) == b"abcd"
            arena.view(20, 3)[:] = list(b"xyz")
            assert mm[20:23] == b"xyz"
    finally:
        os.close(fd)


# ---- extent allocator -------------------------------------------------------------------------


def test_allocator_allocates_and_frees() -> None:
    alloc = lc.ExtentAllocator(1 << 20)
    assert (alloc.capacity, alloc.alignment) == (1 << 20, 4096)
    assert alloc.round_up(1) == 4096
    e = alloc.allocate(5000)
    assert e == lc.Extent(0, 8192)
    assert alloc.stats().used == 8192
    alloc.free(e)
    assert alloc.stats().used == 0
    assert alloc.allocate(0) is None
    assert alloc.allocate(2 << 20) is None
    alloc.check_invariants()
    assert alloc.stats().to_dict()["failed_allocations"] == 2


def test_allocator_batch_is_all_or_nothing() -> None:
    alloc = lc.ExtentAllocator(64 * 1024, alignment=4096)
    keep = alloc.allocate_batch([4096] * 4)
    assert [e.offset for e in keep] == [0, 4096, 8192, 12288]
    before = alloc.stats().used
    with pytest.raises(lc.OutOfMemoryError):
        alloc.allocate_batch([4096] * 13)
    assert alloc.stats().used == before
    with pytest.raises(lc.InvalidArgumentError):
        alloc.allocate_batch([4096, 0])
    alloc.check_invariants()


def test_allocator_rejects_bad_frees_and_alignments() -> None:
    alloc = lc.ExtentAllocator(1 << 16)
    with pytest.raises(lc.InternalError):
        alloc.free(lc.Extent(4096, 4096))
    for bad in (0, 4, 12, 4097):
        with pytest.raises(lc.InvalidArgumentError):
            lc.ExtentAllocator(1 << 16, alignment=bad)
    ext = lc.Extent(1, 2)
    ext.offset = 3
    assert repr(ext) == "Extent(offset=3, length=2)"
    with pytest.raises(TypeError):
        hash(ext)
