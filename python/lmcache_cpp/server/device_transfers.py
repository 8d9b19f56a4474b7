"""Server-driven transfers (STORE/RETRIEVE): the server copies between an engine's device KV and
L1 itself, through a :class:`~lmcache_cpp.device.DeviceLayer`.

Flow of one transfer, on a pool thread: find the registration's mapped KV (the client's own);
import the engine's event and wait for it **with the request's deadline** (``timeout_s``; a
missed deadline is DeadlineExceeded (Timeout) and nothing was reserved); then the engine-driven
path's own code (:class:`~lmcache_cpp.client.KvTransferClient`) runs against the engine directly:
PREPARE, the copy kernels between the engine's blocks and the arena, COMMIT, under the same
leases, checksums and generations. A failed copy commits a store with success=False and releases
a retrieve's ticket; either way the error is the reply. On success the registration's reply
event is signalled and named in the reply.

Lifetime: a mapping is made by REGISTER_KV_CACHE with a ``device`` map and released by
UNREGISTER_KV_CACHE, by the client's end (GOODBYE, heartbeat loss, server stop: the server calls
:meth:`DeviceTransfers.release_client` where it ends the client in the engine), whichever comes
first. A transfer holds a reference; the last holder unmaps.

Thread safety: ``_lock`` guards ``_mappings``; no device call and no engine call is made while
holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmcache_cpp import _core
from lmcache_cpp.client.keys import Key, _key
from lmcache_cpp.device import DeviceKv, DeviceLayer, DeviceTransferClient, unpack_kv_records
from lmcache_cpp.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from lmcache_cpp.protocol import (
    RegistrationInfo,
    TransferTicket,
    WireKey,
    bodies,
)

_log = logging.getLogger("lmcache_cpp.server")


class _Mapping:
    """One registration's device KV and the transfer client that copies through it."""

    def __init__(self, client: int, kv: DeviceKv, transfer: DeviceTransferClient) -> None:
        self.client = client
        self.kv = kv
        self.transfer = transfer
        self.users = 0  # GUARDED_BY(DeviceTransfers._lock)
        self.closed = False  # GUARDED_BY(DeviceTransfers._lock)

    def unmap(self) -> None:
        self.transfer.close()
        self.kv.close()


class _EngineRequests:
    """The four transfer requests of one client, run against the engine in this thread (what
    :class:`KvTransferClient` sends over the socket in the engine-driven mode)."""

    def __init__(self, owner: DeviceTransfers, client: int) -> None:
        self._engine = owner._engine
        self._client = client
        self._ticket = owner._ticket
        self._engine_key = owner._engine_key
        self._handle = owner._handle
        self.retrieve_wait_s = 0.0

    def prepare_store(self, key: Key | WireKey) -> TransferTicket:
        ticket: TransferTicket = self._ticket(
            self._engine.prepare_store(self._client, self._engine_key(_key(key)))
        )
        return ticket

    def commit_store(
        self, handle: bytes, success: bool = True, crc32c: Sequence[int] | None = None
    ) -> int:
        crcs = None if crc32c is None else list(crc32c)
        return int(self._engine.commit_store(self._client, self._handle(handle), success, crcs))

    def prepare_retrieve(
        self, key: Key | WireKey, timeout_s: float | None = None
    ) -> TransferTicket:
        wait = self.retrieve_wait_s if timeout_s is None else timeout_s
        ticket: TransferTicket = self._ticket(
            self._engine.prepare_retrieve(self._client, self._engine_key(_key(key)), wait)
        )
        return ticket

    def commit_retrieve(self, handle: bytes) -> None:
        self._engine.commit_retrieve(self._client, self._handle(handle))

    def unregister_kv_cache(self, registration_id: int) -> None:  # pragma: no cover - unowned
        self._engine.unregister_kv_cache(self._client, registration_id)


class DeviceTransfers:
    """The server's device mappings and its STORE/RETRIEVE handlers (thread-safe)."""

    def __init__(
        self,
        engine: _core.CacheEngine,
        layer: DeviceLayer,
        *,
        ticket: Any,
        engine_key: Any,
        handle_from_wire: Any,
    ) -> None:
        self._engine = engine
        self._layer = layer
        self._ticket = ticket
        self._engine_key = engine_key
        self._handle = handle_from_wire
        self._lock = threading.Lock()
        self._mappings: dict[int, _Mapping] = {}  # by registration id; GUARDED_BY(_lock)

    @property
    def kind(self) -> str:
        return self._layer.kind

    def register(
        self,
        client: int,
        body: bodies.RegisterRequest,
        layout: _core.KvCacheLayout,
        reply: RegistrationInfo,
    ) -> None:
        """Maps the KV that a REGISTER_KV_CACHE with a ``device`` map names (the engine already
        made ``reply``'s registration; the caller unregisters it when this raises)."""
        device = body.device
        assert device is not None
        if device.kind != self._layer.kind:
            raise InvalidArgumentError(
                f"the handles are for the {device.kind} device layer; this server runs "
                f"--device {self._layer.kind}"
            )
        records = unpack_kv_records(device.kv_handles, int(layout.num_layers))
        kv = self._layer.open_kv(layout, device.device_id, records)
        try:
            if kv.view.layout.fingerprint() != layout.fingerprint():
                raise InvalidArgumentError("the mapped tensors do not have the registered layout")
            requests = _EngineRequests(self, client)
            transfer = kv.transfer_client(requests, reply)
        except BaseException:
            kv.close()
            raise
        with self._lock:
            self._mappings[int(reply["registration_id"])] = _Mapping(client, kv, transfer)

    def unregister(self, client: int, registration_id: int) -> None:
        with self._lock:
            m = self._mappings.get(registration_id)
            if m is None or m.client != client:
                return
            del self._mappings[registration_id]
            m.closed = True
            unmap = m.users == 0
        if unmap:
            m.unmap()

    def release_client(self, client: int) -> int:
        """Releases every mapping of ``client`` (its end); returns how many."""
        with self._lock:
            ids = [r for r, m in self._mappings.items() if m.client == client]
        for r in ids:
            self.unregister(client, r)
        if ids:
            _log.info("client %d: %d device mapping(s) released", client, len(ids))
        return len(ids)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"kind": self._layer.kind, "mappings": len(self._mappings)}

    # ---- STORE / RETRIEVE (pool threads) -----------------------------------------------------

    def store(self, client: int, body: bodies.DeviceStoreRequest) -> Mapping[str, Any]:
        def run(m: _Mapping, ids: np.ndarray[Any, Any]) -> Mapping[str, Any]:
            published = m.transfer.store(m.kv.view, ids, body.key)
            return {"published": published}

        return self._transfer(client, body, run)

    def retrieve(self, client: int, body: bodies.DeviceStoreRequest) -> Mapping[str, Any]:
        def run(m: _Mapping, ids: np.ndarray[Any, Any]) -> Mapping[str, Any]:
            tokens = m.transfer.retrieve(m.kv.view, ids, body.key, body.skip_tokens, timeout_s=0.0)
            return {"tokens": tokens}

        return self._transfer(client, body, run)

    def _transfer(
        self, client: int, body: bodies.DeviceStoreRequest, run: Any
    ) -> Mapping[str, Any]:
        m = self._acquire(client, body.registration_id)
        try:
            ids = np.frombuffer(body.block_ids, dtype="<i8")
            event = m.kv.open_event(body.event)
            try:
                started = time.monotonic()
                if not event.wait(body.timeout_s):
                    raise DeadlineExceededError(
                        f"the engine's event was not signalled within {body.timeout_s:g} s: "
                        "nothing was transferred (recompute)"
                    )
            finally:
                event.close()
            _log.debug("client %d: event after %.3f s", client, time.monotonic() - started)
            reply = dict(run(m, ids))
            m.kv.signal_reply()
            reply["event"] = m.kv.reply_event
            return reply
        finally:
            self._release(m)

    def _acquire(self, client: int, registration_id: int) -> _Mapping:
        with self._lock:
            m = self._mappings.get(registration_id)
            if m is None:
                raise NotFoundError(
                    f"registration {registration_id} has no device mapping (register with a "
                    "device map first)"
                )
            if m.client != client:
                raise PermissionDeniedError(
                    f"registration {registration_id} belongs to another client"
                )
            m.users += 1
            return m

    def _release(self, m: _Mapping) -> None:
        with self._lock:
            m.users -= 1
            unmap = m.closed and m.users == 0
        if unmap:
            m.unmap()
