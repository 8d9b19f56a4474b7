"""A dict-backed L2 tier written in Python: the smallest complete ``PythonL2Adapter``.

It keeps each object as ``bytes`` (a copy: the buffers it is given are valid only during the
call) with the checksum ``store`` was given, answers that checksum from ``load``, counts pins per
key, and records what the tests want to see: which methods ran, on which
threads, and whether the buffers were writable. ``hooks[method]`` (if set) runs at the start of
that method, so a test can make it block on an event or raise.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

import lmcache_cpp as lc

Buffers = list[npt.NDArray[np.uint8]]


class DictL2Adapter(lc.PythonL2Adapter):
    def __init__(self, *, worker_threads: int = 1, name: str = "dict") -> None:
        super().__init__(worker_threads=worker_threads, name=name)
        self._lock = threading.Lock()  # several workers may call at once
        self.objects: dict[lc.ObjectKey, bytes] = {}
        self.checksums: dict[lc.ObjectKey, int] = {}
        self.pins: Counter[lc.ObjectKey] = Counter()
        self.calls: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.writable: dict[str, list[bool]] = {"store": [], "load": []}
        self.hooks: dict[str, Callable[[], None]] = {}

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
            self.threads.add(threading.get_ident())
        hook = self.hooks.get(method)
        if hook is not None:
            hook()

    def store(self, keys: list[lc.ObjectKey], buffers: Buffers, checksums: list[int]) -> list[bool]:
        self._enter("store")
        with self._lock:
            self.writable["store"].extend(bool(b.flags.writeable) for b in buffers)
            for key, buf, crc in zip(keys, buffers, checksums, strict=True):
                if key not in self.objects:
                    self.objects[key] = buf.tobytes()
                    self.checksums[key] = crc
        return [True] * len(keys)

    def lookup_and_pin(self, keys: list[lc.ObjectKey]) -> list[bool]:
        self._enter("lookup_and_pin")
        with self._lock:
            present = [key in self.objects for key in keys]
            for key, hit in zip(keys, present, strict=True):
                if hit:
                    self.pins[key] += 1
        return present

    def load(self, keys: list[lc.ObjectKey], buffers: Buffers) -> list[int | None]:
        self._enter("load")
        loaded: list[int | None] = []
        with self._lock:
            self.writable["load"].extend(bool(b.flags.writeable) for b in buffers)
            for key, buf in zip(keys, buffers, strict=True):
                data = self.objects.get(key)
                if data is None or len(data) != buf.size:
                    loaded.append(None)
                    continue
                buf[:] = np.frombuffer(data, dtype=np.uint8)
                loaded.append(self.checksums[key])
        return loaded

    def unpin(self, keys: list[lc.ObjectKey]) -> None:
        self._enter("unpin")
        with self._lock:
            for key in keys:
                if key not in self.pins:
                    continue  # not pinned: ignored, as the interface says
                self.pins[key] -= 1
                if self.pins[key] == 0:
                    del self.pins[key]

    def total_pins(self) -> int:
        with self._lock:
            return sum(self.pins.values())

    def drain(self) -> None:
        """Returns once every operation queued before the call has run (one worker: FIFO)."""
        assert self.worker_threads == 1
        self.submit_lookup_and_pin([])
