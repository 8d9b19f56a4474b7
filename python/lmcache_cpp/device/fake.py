"""The fake device layer, **for tests only**: server-driven transfers without a GPU.

"Device memory" is a file in :data:`FAKE_DIR` (``/dev/shm``) named ``lmcache-fake-...`` that the
engine process created and maps; a KV record's 64-byte handle is that name (NUL-padded), its
offset and size where the layer lies in it. An "event" is a FIFO in the same directory: the
engine holds it open read-write and signals it by writing one byte, which the server's wait
consumes; a wait is ``poll`` with the deadline. The server's reply event is a FIFO it creates per
registration and writes one byte to per completed transfer. Copies are the CPU kernels.

Names are checked (the prefix, no path separators) and resolved under :data:`FAKE_DIR` only, so a
forged handle cannot make the server open an arbitrary file. The engine side of the fake
(:class:`FakeEngineKv`, :class:`FakeEngineEvent`, :func:`wait_reply`) lives here too, for tests.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import secrets
import select
import stat
import threading
import time
from typing import Any, Final

import numpy as np

from lmcache_cpp import _core
from lmcache_cpp.client.kv_transfer import KvTransferClient, TransferRequests
from lmcache_cpp.device import (
    EVENT_HANDLE_BYTES,
    HANDLE_BYTES,
    DeviceEvent,
    DeviceKv,
    DeviceLayer,
    DeviceTransferClient,
    KvRecord,
    layer_extent,
    layer_geometry,
)
from lmcache_cpp.errors import InvalidArgumentError
from lmcache_cpp.protocol import RegistrationInfo

__all__ = [
    "FAKE_DIR",
    "FakeDeviceLayer",
    "FakeEngineEvent",
    "FakeEngineKv",
    "wait_reply",
]

FAKE_DIR: Final = "/dev/shm"
_PREFIX: Final = "lmcache-fake-"
_NAME: Final = re.compile(r"lmcache-fake-[A-Za-z0-9_.-]{1,48}")
_DTYPES: Final = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _name_of(handle: bytes, what: str) -> str:
    name = handle.rstrip(b"\0")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not _NAME.fullmatch(text):
        raise InvalidArgumentError(
            f"{what} handle is not a fake device name (lmcache-fake-*, at most 61 characters)"
        )
    return text


def _handle_of(name: str) -> bytes:
    raw = name.encode("ascii")
    assert len(raw) <= HANDLE_BYTES
    return raw.ljust(HANDLE_BYTES, b"\0")


def _new_name(kind: str) -> str:
    return f"{_PREFIX}{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def _make_fifo() -> tuple[str, int]:
    """A fresh FIFO held open read-write (so a byte written stays until read)."""
    name = _new_name("ev")
    path = os.path.join(FAKE_DIR, name)
    os.mkfifo(path, 0o600)
    return name, os.open(path, os.O_RDWR | os.O_NONBLOCK)


def _wait_fifo(fd: int, timeout_s: float) -> bool:
    """Consumes one byte of the FIFO ``fd`` when one arrives within ``timeout_s``. False at the
    deadline, or at once when every writer is gone (end of file: nobody can signal it now)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not poller.poll(max(math.ceil(left * 1000), 1)):
            continue  # the deadline is checked above
        try:
            return bool(os.read(fd, 1))  # b"": end of file, the writers are gone
        except BlockingIOError:
            pass  # another reader took the byte first; wait for the next


class _FakeEvent(DeviceEvent):
    def __init__(self, handle: bytes) -> None:
        name = _name_of(handle, "event")
        path = os.path.join(FAKE_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidArgumentError(f"event {name}: cannot open it ({exc.strerror})") from None
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgumentError(f"event {name} is not a fake event (not a FIFO)")
        self._fd = fd

    def wait(self, timeout_s: float) -> bool:
        return _wait_fifo(self._fd, timeout_s)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _FakeKv(DeviceKv):
    def __init__(self, layout: _core.KvCacheLayout, records: list[KvRecord]) -> None:
        self._maps: list[mmap.mmap] = []
        self._reply_fd = -1
        try:
            layers = self._map_layers(layout, records)
            self.view: Any = _core.KvCacheView(layers, layout.layout)
            self._reply_name, self._reply_fd = _make_fifo()
        except BaseException:
            self.close()
            raise
        self.reply_event = _handle_of(self._reply_name)

    def _map_layers(
        self, layout: _core.KvCacheLayout, records: list[KvRecord]
    ) -> list[np.ndarray[Any, Any]]:
        shape, strides = layer_geometry(layout)
        extent = layer_extent(layout)
        dtype = _DTYPES.get(int(layout.element_size))
        if dtype is None:
            raise InvalidArgumentError(
                f"the fake device has no element type of {layout.element_size} bytes"
            )
        by_name: dict[str, np.ndarray[Any, Any]] = {}
        layers = []
        for i, r in enumerate(records):
            name = _name_of(r.handle, f"layer {i}")
            if r.size < extent:
                raise InvalidArgumentError(
                    f"layer {i}: the handle covers {r.size} bytes, the layout needs {extent}"
                )
            base = by_name.get(name)
            if base is None:
                base = self._map_segment(name)
                by_name[name] = base
            if r.offset + r.size > base.shape[0] or r.offset % int(layout.element_size):
                raise InvalidArgumentError(
                    f"layer {i}: [{r.offset}, {r.offset + r.size}) is not inside segment {name} "
                    f"({base.shape[0]} bytes) or is misaligned"
                )
            raw = base[r.offset : r.offset + r.size].view(dtype)
            layers.append(np.lib.stride_tricks.as_strided(raw, shape=shape, strides=strides))
        return layers

    def _map_segment(self, name: str) -> np.ndarray[Any, Any]:
        try:
            fd = os.open(os.path.join(FAKE_DIR, name), os.O_RDWR)
        except OSError as exc:
            raise InvalidArgumentError(f"segment {name}: cannot open it ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                raise InvalidArgumentError(f"segment {name} is not a fake device segment")
            m = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        self._maps.append(m)
        return np.frombuffer(m, dtype=np.uint8)

    def transfer_client(
        self, requests: TransferRequests, registration: RegistrationInfo
    ) -> DeviceTransferClient:
        return KvTransferClient(requests, registration)

    def open_event(self, handle: bytes) -> DeviceEvent:
        return _FakeEvent(handle)

    def signal_reply(self) -> None:
        os.write(self._reply_fd, b"\1")

    def close(self) -> None:
        self.view = None
        if self._reply_fd >= 0:
            os.close(self._reply_fd)
            self._reply_fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(FAKE_DIR, self._reply_name))
        maps, self._maps = self._maps, []
        for m in maps:
            with contextlib.suppress(BufferError):  # a view still exports it: unmapped with it
                m.close()


class FakeDeviceLayer(DeviceLayer):
    """The fake device layer (for tests only; module docstring)."""

    kind = "fake"

    def open_kv(
        self, layout: _core.KvCacheLayout, device_id: int, records: list[KvRecord]
    ) -> DeviceKv:
        if device_id != 0:
            raise InvalidArgumentError(f"the fake device has one device (0), got {device_id}")
        return _FakeKv(layout, records)


# ---- the engine's side (tests) ----------------------------------------------------------------


class FakeEngineKv:
    """An engine's "device" KV cache: every layer of ``layout`` in one shared segment, dense,
    as numpy arrays (``layers``), and the records that register it. :meth:`close` unlinks."""

    def __init__(self, layout: _core.KvCacheLayout) -> None:
        self.layout = layout
        shape, strides = layer_geometry(layout)
        extent = layer_extent(layout)
        size = extent * int(layout.num_layers)
        self.name = _new_name("kv")
        self._path = os.path.join(FAKE_DIR, self.name)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        raw = np.frombuffer(self._map, dtype=np.uint8)
        dtype = _DTYPES[int(layout.element_size)]
        self.layers = [
            np.lib.stride_tricks.as_strided(
                raw[i * extent : (i + 1) * extent].view(dtype), shape=shape, strides=strides
            )
            for i in range(int(layout.num_layers))
        ]
        self.records = [
            KvRecord(_handle_of(self.name), i * extent, extent)
            for i in range(int(layout.num_layers))
        ]
        self.raw = raw

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class FakeEngineEvent:
    """An engine's event: :meth:`signal` marks the work before it done (one wait each)."""

    def __init__(self) -> None:
        name, self._fd = _make_fifo()
        self._path = os.path.join(FAKE_DIR, name)
        self.handle = _handle_of(name)
        assert len(self.handle) == EVENT_HANDLE_BYTES

    def signal(self) -> None:
        os.write(self._fd, b"\1")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            os.unlink(self._path)


_reply_lock = threading.Lock()


def wait_reply(handle: bytes, timeout_s: float) -> bool:
    """The engine's wait on a server's reply event (True when it was signalled in time)."""
    name = _name_of(handle, "reply event")
    fd = os.open(os.path.join(FAKE_DIR, name), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with _reply_lock:
            return _wait_fifo(fd, timeout_s)
    finally:
        os.close(fd)
