"""The server's device layer: what the server-driven transfer mode (STORE/RETRIEVE) needs of the
engine's device memory.

A :class:`DeviceLayer` opens an engine's KV tensors from their IPC handles (:meth:`open_kv`),
imports the engine's events (:meth:`DeviceLayer.open_event`) and waits on them with a deadline,
and copies between the engine's blocks and the L1 arena with the KV copy kernels. Two exist:

* ``cuda`` (:mod:`lmcache_cpp.device.cuda`): CUDA IPC memory and event handles, over the C++
  primitives in ``cpp/cuda/ipc.h`` bound into ``_core`` when the module is built with CUDA;
* ``fake`` (:mod:`lmcache_cpp.device.fake`): **for tests only**. Device memory is a shared-memory
  segment the engine process maps, an event is a FIFO the engine writes one byte to, and the
  copies are the CPU kernels. It exercises the protocol, the deadlines and the releases on a
  machine without a GPU.

Why the layer is Python over C++ primitives rather than one C++ class: what it orchestrates
(registrations, tickets, leases, the worker pool's deadlines) lives in the Python server, and the
copies are already bound kernels; the pieces that need the CUDA runtime (opening IPC handles, the
deadline wait on an imported event, the interprocess reply event) are C++ (docs/design/gpu.md).

Handles on the wire (docs/protocol.md, "Server-driven transfers"): every KV layer is one record of
:data:`KV_RECORD_BYTES` bytes, ``handle[64] | offset u64 | size u64`` (little-endian), and an
event is :data:`EVENT_HANDLE_BYTES` bytes. What the 64 bytes mean is the layer's own.
"""

from __future__ import annotations

import abc
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from lmcache_cpp import _core
from lmcache_cpp.errors import InvalidArgumentError, NotSupportedError

if TYPE_CHECKING:
    from lmcache_cpp.client.keys import Key
    from lmcache_cpp.client.kv_transfer import TransferRequests
    from lmcache_cpp.protocol import RegistrationInfo, WireKey

__all__ = [
    "DEVICE_KINDS",
    "EVENT_HANDLE_BYTES",
    "KV_RECORD_BYTES",
    "DeviceEvent",
    "DeviceKv",
    "DeviceLayer",
    "DeviceTransferClient",
    "KvRecord",
    "make_device_layer",
    "pack_kv_records",
    "unpack_kv_records",
]

HANDLE_BYTES: Final = 64
KV_RECORD_BYTES: Final = HANDLE_BYTES + 16
EVENT_HANDLE_BYTES: Final = 64
DEVICE_KINDS: Final = ("none", "fake", "cuda")
_RECORD: Final = struct.Struct(f"<{HANDLE_BYTES}sQQ")


@dataclass(frozen=True)
class KvRecord:
    """One KV layer's handle: the allocation (``handle``), and where the layer lies in it."""

    handle: bytes
    offset: int
    size: int


def pack_kv_records(records: list[KvRecord]) -> bytes:
    return b"".join(_RECORD.pack(r.handle, r.offset, r.size) for r in records)


def unpack_kv_records(data: bytes, num_layers: int) -> list[KvRecord]:
    """The layer records of a registration; InvalidArgumentError unless there is exactly one
    record of :data:`KV_RECORD_BYTES` per layer."""
    if len(data) != num_layers * KV_RECORD_BYTES:
        raise InvalidArgumentError(
            f"kv_handles must be {KV_RECORD_BYTES} bytes per layer ({num_layers} layers: "
            f"{num_layers * KV_RECORD_BYTES}), got {len(data)}"
        )
    return [KvRecord(*_RECORD.unpack_from(data, i * KV_RECORD_BYTES)) for i in range(num_layers)]


def layer_geometry(
    layout: _core.KvCacheLayout,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape (in elements) and strides (in bytes) of one layer's tensor in ``layout``."""
    e = int(layout.element_size)
    nb, bs = int(layout.num_blocks), int(layout.block_size)
    h, d = int(layout.num_heads), int(layout.head_size)
    kind = layout.layout
    if kind == _core.KvLayout.MLA:
        block = int(layout.block_stride) or bs * d * e
        return (nb, bs, d), (block, d * e, e)
    plane_bytes = bs * h * d * e
    if kind == _core.KvLayout.FLASHINFER:
        block = int(layout.block_stride) or 2 * plane_bytes
        plane = int(layout.plane_stride) or plane_bytes
        return (nb, 2, bs, h, d), (block, plane, h * d * e, d * e, e)
    block = int(layout.block_stride) or plane_bytes
    plane = int(layout.plane_stride) or nb * block
    if kind == _core.KvLayout.HND:
        return (2, nb, h, bs, d), (plane, block, bs * d * e, d * e, e)
    return (2, nb, bs, h, d), (plane, block, h * d * e, d * e, e)


def layer_extent(layout: _core.KvCacheLayout) -> int:
    """Bytes one layer's tensor spans (from its first to one past its last byte)."""
    shape, strides = layer_geometry(layout)
    return sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + int(layout.element_size)


class DeviceTransferClient(Protocol):
    """What :meth:`DeviceKv.transfer_client` returns: a ``KvTransferClient`` (CPU copies) or a
    ``CudaKvTransferClient`` (GPU copies on the server's stream)."""

    def store(self, kv: Any, block_ids: Any, key: Key | WireKey) -> int: ...

    def retrieve(
        self,
        kv: Any,
        block_ids: Any,
        key: Key | WireKey,
        skip_tokens: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> int: ...

    def close(self) -> None: ...


class DeviceEvent(abc.ABC):
    """An engine's event imported into the server; waited on with a deadline, never without."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> bool:
        """True once the engine signalled the event; False when ``timeout_s`` passed first.
        Blocks the calling (pool) thread for at most ``timeout_s``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the import (idempotent)."""


class DeviceKv(abc.ABC):
    """One registration's mapped KV tensors, for the copy kernels.

    ``view`` has the ``gather_batch``/``scatter_batch`` of ``_core.KvCacheView``; ``reply_event``
    is the handle of the event the server signals after each transfer it completed. Owned by the
    server's :class:`~lmcache_cpp.server.device_transfers.DeviceTransfers`; :meth:`close` unmaps.
    """

    view: Any
    reply_event: bytes

    @abc.abstractmethod
    def transfer_client(
        self, requests: TransferRequests, registration: RegistrationInfo
    ) -> DeviceTransferClient:
        """The engine-driven path's transfer client that copies through this mapping: its
        ``store(view, block_ids, key)`` and ``retrieve(view, block_ids, key, skip_tokens,
        timeout_s=...)`` run ``requests`` (the server's own, against its engine) around the
        copies, which have finished when they return."""

    @abc.abstractmethod
    def open_event(self, handle: bytes) -> DeviceEvent:
        """Imports an engine's event (on this mapping's device). InvalidArgumentError for a
        handle naming no event."""

    @abc.abstractmethod
    def signal_reply(self) -> None:
        """Signals :attr:`reply_event` after the copies of one transfer completed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unmaps the tensors and releases the reply event (idempotent)."""


class DeviceLayer(abc.ABC):
    """Opens engines' device memory for the server (thread-safe)."""

    kind: str

    @abc.abstractmethod
    def open_kv(
        self, layout: _core.KvCacheLayout, device_id: int, records: list[KvRecord]
    ) -> DeviceKv:
        """Maps the layers named by ``records`` (one per layer) as tensors of ``layout``.
        InvalidArgumentError for a handle that names nothing this layer can open, or a record too
        small for the layout."""


def make_device_layer(kind: str) -> DeviceLayer | None:
    """The device layer named by ``--device``: None for ``none``; NotSupportedError when this
    build cannot provide it (``cuda`` without the CUDA module)."""
    if kind == "none":
        return None
    if kind == "fake":
        from lmcache_cpp.device.fake import FakeDeviceLayer

        return FakeDeviceLayer()
    if kind == "cuda":
        from lmcache_cpp.device.cuda import CudaDeviceLayer

        return CudaDeviceLayer()
    raise NotSupportedError(f"unknown device layer {kind!r}; one of {', '.join(DEVICE_KINDS)}")
