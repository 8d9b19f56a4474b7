"""The CUDA device layer of the server-driven mode (``--device cuda``): an engine's KV tensors
opened from their CUDA IPC handles, its events imported and waited on with a deadline, copies
with the CUDA kernels on a stream the server owns, and an interprocess reply event per
registration (docs/design/gpu.md, "Server-driven mode").

Needs a CUDA build of ``_core`` (``LMCACHE_CPP_ENABLE_CUDA=ON``) and a usable device; the layer
refuses to start otherwise (NotSupportedError / UnavailableError), so a server never advertises a
mode it cannot serve. Not yet run on a GPU: ``scripts/gpu_check.sh`` runs it.

Per registration: one ``CudaIpcMemory`` per distinct allocation handle (layers of one allocation
share it), a ``CudaKvCacheView`` over the layers' addresses, a stream, and a
``CudaKvTransferClient`` that maps the arena and registers it with CUDA (the cost
``register_seconds`` reports, once per registration). Copies finish before a transfer is
committed (the client waits on its copy event), so the reply event is recorded after work that
has completed; it orders the engine's later work after the server's copies all the same.
"""

from __future__ import annotations

from typing import Any

from lmcache_cpp import _core
from lmcache_cpp.client.kv_transfer import TransferRequests
from lmcache_cpp.device import (
    DeviceEvent,
    DeviceKv,
    DeviceLayer,
    DeviceTransferClient,
    KvRecord,
    layer_extent,
)
from lmcache_cpp.errors import InvalidArgumentError, NotSupportedError, UnavailableError
from lmcache_cpp.protocol import RegistrationInfo

__all__ = ["CudaDeviceLayer"]


class _CudaEvent(DeviceEvent):
    def __init__(self, handle: bytes, device: int) -> None:
        self._event: Any = _core.CudaImportedEvent(handle, device)

    def wait(self, timeout_s: float) -> bool:
        return bool(self._event.wait(timeout_s))

    def close(self) -> None:
        self._event.close()


class _CudaKv(DeviceKv):
    def __init__(self, layout: _core.KvCacheLayout, device: int, records: list[KvRecord]) -> None:
        self._device = device
        self._memories: dict[bytes, Any] = {}
        self._stream: Any = None
        self._reply: Any = None
        extent = layer_extent(layout)
        try:
            addresses = []
            for i, r in enumerate(records):
                if r.size < extent:
                    raise InvalidArgumentError(
                        f"layer {i}: the handle covers {r.size} bytes, the layout needs {extent}"
                    )
                memory = self._memories.get(r.handle)
                if memory is None:
                    memory = _core.CudaIpcMemory(r.handle, device)
                    self._memories[r.handle] = memory
                addresses.append(int(memory.address) + r.offset)
            self.view: Any = _core.CudaKvCacheView.from_pointers(
                addresses, layout, device, list(self._memories.values())
            )
            self._stream = _core.CudaStream(device)
            self._reply = _core.CudaExportedEvent(device)
        except BaseException:
            self.close()
            raise
        self.reply_event = bytes(self._reply.handle)

    def transfer_client(
        self, requests: TransferRequests, registration: RegistrationInfo
    ) -> DeviceTransferClient:
        from lmcache_cpp.cuda_transfer import CudaKvTransferClient

        return CudaKvTransferClient(
            requests, registration, device=self._device, stream=int(self._stream.handle)
        )

    def open_event(self, handle: bytes) -> DeviceEvent:
        return _CudaEvent(handle, self._device)

    def signal_reply(self) -> None:
        self._reply.record(int(self._stream.handle))

    def close(self) -> None:
        self.view = None
        for obj in (self._reply, self._stream):
            if obj is not None:
                obj.close()
        memories, self._memories = self._memories, {}
        for memory in memories.values():
            memory.close()


class CudaDeviceLayer(DeviceLayer):
    """The CUDA device layer (module docstring)."""

    kind = "cuda"

    def __init__(self) -> None:
        if not hasattr(_core, "CudaIpcMemory"):
            raise NotSupportedError(
                "--device cuda needs lmcache_cpp built with CUDA "
                "(pip install -C cmake.define.LMCACHE_CPP_ENABLE_CUDA=ON .)"
            )
        info = _core.cuda_info()
        if not info["usable"]:
            raise UnavailableError(f"--device cuda: CUDA is not usable here: {info['reason']}")

    def open_kv(
        self, layout: _core.KvCacheLayout, device_id: int, records: list[KvRecord]
    ) -> DeviceKv:
        return _CudaKv(layout, device_id, records)
