"""The typed requests of :class:`CacheClient` (the socket work is its transport's)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from lmcache_cpp import _core
from lmcache_cpp.client.keys import Key, _check_handle, _key, wire_layout
from lmcache_cpp.client.transport import (
    _DEFAULT_RETRIEVE_WAIT_S,
    ClientTransport,
    _identity,
    _nothing,
)
from lmcache_cpp.errors import (
    InternalError,
    InvalidArgumentError,
    NotSupportedError,
)
from lmcache_cpp.protocol import (
    PROTOCOL_VERSION,
    HelloInfo,
    LookupResult,
    RegistrationInfo,
    RequestType,
    TransferTicket,
    WireKey,
    bodies,
    count_from_wire,
    pid_namespace,
    prefetch_status_from_wire,
    registration_from_wire,
)

_log = logging.getLogger(__name__)

_PID_NAMESPACE: Final = pid_namespace()
_LOOKUP: Final = int(RequestType.LOOKUP)
_SYNC_LOOKUP: Final = int(RequestType.SYNC_LOOKUP)
_QUERY_PREFETCH_STATUS: Final = int(RequestType.QUERY_PREFETCH_STATUS)


class CacheClient(ClientTransport):
    """A connection to a cache server (see the module docstring).

    ``timeout_s``: default reply deadline (requests that ask the server to wait get their wait
    added). ``heartbeat_interval_s``: PING after this much idleness (None: never; keep it well
    under the server's ``heartbeat_grace_s``). ``curve_server_key``: the server's z85 CURVE public
    key, which turns CURVE on; the client's own key pair is ``curve_public_key`` /
    ``curve_secret_key`` or a fresh one. ``hello``: send HELLO now and raise
    :class:`NotSupportedError` / :class:`DeadlineExceededError` / :class:`UnavailableError` if it
    fails (the client is then closed).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 30.0,
        heartbeat_interval_s: float | None = 5.0,
        curve_server_key: str | None = None,
        curve_public_key: str | None = None,
        curve_secret_key: str | None = None,
        name: str = "",
        hello: bool = True,
        max_reply_bytes: int = 1 << 31,
    ) -> None:
        super().__init__(
            endpoint,
            timeout_s=timeout_s,
            heartbeat_interval_s=heartbeat_interval_s,
            curve_server_key=curve_server_key,
            curve_public_key=curve_public_key,
            curve_secret_key=curve_secret_key,
            max_reply_bytes=max_reply_bytes,
        )
        self._hello_info: HelloInfo | None = None
        if hello:
            try:
                self._hello_info = self.hello(name)
            except BaseException:
                self.close()
                raise
            grace = self._hello_info.heartbeat_grace_s
            if heartbeat_interval_s is not None and 0 < grace <= 2 * heartbeat_interval_s:
                _log.warning(
                    "heartbeat_interval_s %.1f is too long for the server's grace of %.1f s: an "
                    "idle client may be dropped",
                    heartbeat_interval_s,
                    grace,
                )

    @property
    def hello_info(self) -> HelloInfo | None:
        """The server's HELLO reply (None if the client was created with ``hello=False``)."""
        return self._hello_info

    # ---- requests ----------------------------------------------------------------------------

    def async_hello(self, name: str = "") -> concurrent.futures.Future[HelloInfo]:
        body = bodies.HelloRequest(name, os.getpid(), _PID_NAMESPACE)
        return self._submit(RequestType.HELLO, body.to_wire(), _hello_from_wire, None)

    def hello(self, name: str = "") -> HelloInfo:
        """Version handshake; NotSupportedError when the server speaks another version."""
        return self._call(lambda: self.async_hello(name))

    def async_get_chunk_size(self) -> concurrent.futures.Future[int]:
        return self._submit(
            RequestType.GET_CHUNK_SIZE,
            bodies.EmptyRequest().to_wire(),
            lambda p: count_from_wire(p, "chunk_size"),
            None,
        )

    def get_chunk_size(self) -> int:
        return self._call(lambda: self.async_get_chunk_size())

    def async_register_kv_cache(
        self,
        model_name: str,
        world_size: int,
        worker_id: int,
        layout: _core.KvCacheLayout,
        device: bodies.WireDeviceKv | None = None,
    ) -> concurrent.futures.Future[RegistrationInfo]:
        body = bodies.RegisterRequest(
            model_name, world_size, worker_id, wire_layout(layout), device
        )
        return self._submit(
            RequestType.REGISTER_KV_CACHE, body.to_wire(), registration_from_wire, None
        )

    def register_kv_cache(
        self,
        model_name: str,
        world_size: int,
        worker_id: int,
        layout: _core.KvCacheLayout,
        device: bodies.WireDeviceKv | None = None,
    ) -> RegistrationInfo:
        """Registers one worker's KV layout; the reply names the L1 arena to map. ``device``
        (server-driven mode): the IPC handles of the KV tensors, which the server maps."""
        return self._call(
            lambda: self.async_register_kv_cache(model_name, world_size, worker_id, layout, device)
        )

    def device_transfer(
        self, request_type: RequestType, body: bodies.DeviceStoreRequest
    ) -> tuple[int, bytes]:
        """STORE or RETRIEVE (server-driven mode): the server waits for ``body.event`` (up to
        ``body.timeout_s``), copies, and replies. Returns (objects published / tokens now in
        the engine, the server's event handle to wait on before using the blocks)."""
        if request_type not in (RequestType.STORE, RequestType.RETRIEVE):
            raise InvalidArgumentError("device_transfer is STORE or RETRIEVE")
        count_name = "published" if request_type is RequestType.STORE else "tokens"

        def convert(p: Mapping[str, Any]) -> tuple[int, bytes]:
            event = p.get("event")
            if type(event) is not bytes:
                raise InternalError(f"{request_type.name} reply has no event")
            return count_from_wire(p, count_name), event

        reply: tuple[int, bytes] = self._call(
            lambda: self._submit(int(request_type), body.to_wire(), convert, None, body.timeout_s)
        )
        return reply

    def async_unregister_kv_cache(self, registration_id: int) -> concurrent.futures.Future[None]:
        body = bodies.UnregisterRequest(registration_id)
        return self._submit(RequestType.UNREGISTER_KV_CACHE, body.to_wire(), _nothing, None)

    def unregister_kv_cache(self, registration_id: int) -> None:
        self._call(lambda: self.async_unregister_kv_cache(registration_id))

    def async_lookup(
        self, key: Key | WireKey, tp_size: int = 1
    ) -> concurrent.futures.Future[bytes]:
        # bodies.KeyRequest(key, tp_size).to_wire(), built directly (the per-prompt path)
        body = {"key": key.to_wire(), "tp_size": tp_size}
        return self._submit(_LOOKUP, body, _handle_from_reply, None)

    def lookup(self, key: Key | WireKey, tp_size: int = 1) -> bytes:
        """Two-phase lookup: returns the 16-byte job handle for query/wait_prefetch_status."""
        return self._call(lambda: self.async_lookup(key, tp_size))

    def async_query_prefetch_status(
        self, handle: bytes
    ) -> concurrent.futures.Future[LookupResult | None]:
        body = {"handle": _check_handle(handle)}  # bodies.HandleRequest(handle).to_wire()
        return self._submit(_QUERY_PREFETCH_STATUS, body, prefetch_status_from_wire, None)

    def query_prefetch_status(self, handle: bytes) -> LookupResult | None:
        """The lookup's hits once it is done (exactly once), None while it runs."""
        return self._call(lambda: self.async_query_prefetch_status(handle))

    def async_wait_prefetch_status(
        self, handle: bytes, timeout_s: float, *, deadline_s: float | None = None
    ) -> concurrent.futures.Future[LookupResult | None]:
        body = bodies.PrefetchWaitRequest(_check_handle(handle), float(timeout_s))
        return self._submit(
            RequestType.WAIT_PREFETCH_STATUS,
            body.to_wire(),
            prefetch_status_from_wire,
            deadline_s,
            float(timeout_s),
        )

    def wait_prefetch_status(
        self, handle: bytes, timeout_s: float, *, deadline_s: float | None = None
    ) -> LookupResult | None:
        return self._call(
            lambda: self.async_wait_prefetch_status(handle, timeout_s, deadline_s=deadline_s)
        )

    def async_sync_lookup(
        self,
        key: Key | WireKey,
        tp_size: int = 1,
        timeout_s: float | None = None,
        *,
        deadline_s: float | None = None,
    ) -> concurrent.futures.Future[LookupResult]:
        # SyncLookupRequest(key, tp_size, timeout_s).to_wire(), built directly
        body: dict[str, Any] = {"key": key.to_wire(), "tp_size": tp_size}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        return self._submit(
            _SYNC_LOOKUP, body, LookupResult.from_wire, deadline_s, timeout_s or 0.0
        )

    def sync_lookup(
        self,
        key: Key | WireKey,
        tp_size: int = 1,
        timeout_s: float | None = None,
        *,
        deadline_s: float | None = None,
    ) -> LookupResult:
        """L1 prefix + L2 existence in one round trip (the L2 load is joined by the retrieve)."""
        return self._call(
            lambda: self.async_sync_lookup(key, tp_size, timeout_s, deadline_s=deadline_s)
        )

    def async_free_lookup_locks(
        self, key: Key | WireKey, tp_size: int = 1
    ) -> concurrent.futures.Future[int]:
        body = bodies.KeyRequest(_key(key), tp_size)
        return self._submit(
            RequestType.FREE_LOOKUP_LOCKS,
            body.to_wire(),
            lambda p: count_from_wire(p, "released"),
            None,
            _DEFAULT_RETRIEVE_WAIT_S,
        )

    def free_lookup_locks(self, key: Key | WireKey, tp_size: int = 1) -> int:
        """Releases the request's leases on the whole chunks of the key's range; returns how
        many were released."""
        return self._call(lambda: self.async_free_lookup_locks(key, tp_size))

    def async_end_session(self, model_name: str, request_id: str) -> concurrent.futures.Future[int]:
        body = bodies.EndSessionRequest(model_name, request_id)
        return self._submit(
            RequestType.END_SESSION, body.to_wire(), lambda p: count_from_wire(p, "released"), None
        )

    def end_session(self, model_name: str, request_id: str) -> int:
        return self._call(lambda: self.async_end_session(model_name, request_id))

    def async_prepare_store(self, key: Key | WireKey) -> concurrent.futures.Future[TransferTicket]:
        body = bodies.PrepareStoreRequest(_key(key))
        return self._submit(
            RequestType.PREPARE_STORE, body.to_wire(), TransferTicket.from_wire, None
        )

    def prepare_store(self, key: Key | WireKey) -> TransferTicket:
        return self._call(lambda: self.async_prepare_store(key))

    def async_commit_store(
        self, handle: bytes, success: bool = True, crc32c: Sequence[int] | None = None
    ) -> concurrent.futures.Future[int]:
        crcs = None
        if crc32c is not None:
            crcs = struct.pack(f"<{len(crc32c)}I", *crc32c)
        body = bodies.CommitStoreRequest(_check_handle(handle), bool(success), crcs)
        return self._submit(
            RequestType.COMMIT_STORE,
            body.to_wire(),
            lambda p: count_from_wire(p, "published"),
            None,
        )

    def commit_store(
        self, handle: bytes, success: bool = True, crc32c: Sequence[int] | None = None
    ) -> int:
        """Publishes (or, success=False, aborts) a store ticket; returns the objects published.

        ``crc32c``: one CRC32C per offset of the ticket (skipped offsets' entries are ignored), of
        the bytes written; without it the server computes them. A reservation that expired before
        the commit raises :class:`LeaseNotHeldError`: nothing was published."""
        return self._call(lambda: self.async_commit_store(handle, success, crc32c))

    def async_prepare_retrieve(
        self, key: Key | WireKey, timeout_s: float | None = None, *, deadline_s: float | None = None
    ) -> concurrent.futures.Future[TransferTicket]:
        timeout = None if timeout_s is None else float(timeout_s)
        body = bodies.PrepareRetrieveRequest(_key(key), timeout)
        wait = _DEFAULT_RETRIEVE_WAIT_S if timeout is None else timeout
        return self._submit(
            RequestType.PREPARE_RETRIEVE, body.to_wire(), TransferTicket.from_wire, deadline_s, wait
        )

    def prepare_retrieve(
        self, key: Key | WireKey, timeout_s: float | None = None, *, deadline_s: float | None = None
    ) -> TransferTicket:
        return self._call(
            lambda: self.async_prepare_retrieve(key, timeout_s, deadline_s=deadline_s)
        )

    def async_commit_retrieve(self, handle: bytes) -> concurrent.futures.Future[None]:
        body = bodies.HandleRequest(_check_handle(handle))
        return self._submit(RequestType.COMMIT_RETRIEVE, body.to_wire(), _nothing, None)

    def commit_retrieve(self, handle: bytes) -> None:
        """Returns the ticket's leases; LeaseNotHeldError means the copied bytes must not be
        used."""
        self._call(lambda: self.async_commit_retrieve(handle))

    def async_clear(
        self, force: bool = False, admin_token: str | None = None
    ) -> concurrent.futures.Future[int]:
        return self._submit(
            RequestType.CLEAR,
            bodies.ClearRequest(bool(force), admin_token).to_wire(),
            lambda p: count_from_wire(p, "removed"),
            None,
        )

    def clear(self, force: bool = False, admin_token: str | None = None) -> int:
        """Drops every unleased L1 object; with ``force`` also the leased ones (detached, freed
        when released), which needs the server's ``admin_token`` (PermissionDeniedError
        otherwise). Returns the objects removed."""
        return self._call(lambda: self.async_clear(force, admin_token))

    def async_status(self) -> concurrent.futures.Future[dict[str, Any]]:
        return self._submit(RequestType.STATUS, {}, _identity, None)

    def status(self) -> dict[str, Any]:
        return self._call(lambda: self.async_status())


def _hello_from_wire(payload: Mapping[str, Any]) -> HelloInfo:
    info = HelloInfo.from_wire(payload)
    if info.protocol_version != PROTOCOL_VERSION:
        raise NotSupportedError(
            f"the server speaks protocol version {info.protocol_version}, this client "
            f"{PROTOCOL_VERSION}"
        )
    return info


def _handle_from_reply(payload: Mapping[str, Any]) -> bytes:
    handle = payload.get("handle")
    if not isinstance(handle, bytes) or len(handle) != 16:
        raise InternalError("malformed reply: 'handle' must be 16 bytes")
    return handle
