"""Decode + execute, independent of sockets: the request table's handlers run against a
``_core.CacheEngine`` (:class:`Dispatcher`), and what the server needs of the engine
(:class:`EngineLike`)."""

from __future__ import annotations

import hmac
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from lmcache_cpp import _core
from lmcache_cpp.device import DeviceLayer
from lmcache_cpp.errors import LMCacheError, PermissionDeniedError
from lmcache_cpp.protocol import (
    PROTOCOL_VERSION,
    REQUESTS,
    HelloInfo,
    LookupResult,
    ProtocolError,
    ProtocolLimits,
    Request,
    RequestType,
    Runs,
    TransferTicket,
    WireKey,
    WireLayout,
    bodies,
    decode_request,
    encode_error_reply,
    encode_reply,
    not_provided,
    prefetch_status_to_wire,
    registration_from_wire,
)
from lmcache_cpp.server.device_transfers import DeviceTransfers

_log = logging.getLogger("lmcache_cpp.server")  # one logger name for the whole server

_OK: Final = int(_core.StatusCode.OK)
_INVALID: Final = int(_core.StatusCode.INVALID_ARGUMENT)
_EXHAUSTED: Final = int(_core.StatusCode.RESOURCE_EXHAUSTED)
_UNAVAILABLE: Final = int(_core.StatusCode.UNAVAILABLE)
_TIMEOUT: Final = int(_core.StatusCode.TIMEOUT)
_INTERNAL: Final = int(_core.StatusCode.INTERNAL)

BLOCKING_REQUESTS: Final = frozenset(
    rt for rt, spec in REQUESTS.items() if spec.runs in (Runs.POOL, Runs.POOL_WITH_L2)
)
"""Requests run on the worker pool; every other request runs on the socket thread. They may
block briefly: a SYNC_LOOKUP asking L2 (bounded by its own timeout), a CLEAR.

Without L2 adapters nothing can make a SYNC_LOOKUP wait, so a server with no L2 answers it on the
socket thread (:data:`BLOCKING_WITHOUT_L2` stays on the pool). Derived from the request table
(``protocol.REQUESTS``), as the other sets."""

BLOCKING_WITHOUT_L2: Final = frozenset(
    rt for rt, spec in REQUESTS.items() if spec.runs is Runs.POOL
)
"""The pool's requests when the storage has no L2 adapter."""

PARKED_REQUESTS: Final = frozenset(rt for rt, spec in REQUESTS.items() if spec.runs is Runs.PARKED)
"""Requests that may wait long (up to ``max_wait_s``) for an L2 job: never run on a thread that
blocks. The socket thread answers one at once when it need not wait; otherwise it parks it and
answers it when the engine's completion notice says a job finished, or at its deadline."""

_REQUEST_NAMES: Final = {int(rt): rt.name for rt in RequestType}
_MALFORMED: Final = "MALFORMED"  # metrics name of a request whose type could not be read
_CLIENT_ID_BITS: Final = 63  # fits both a signed and an unsigned 64-bit ClientId


# ---------------------------------------------------------------------------------------------
# What the server needs from its collaborators


class RequestMetrics(Protocol):
    """Receives one call per answered request, on the socket thread.

    ``request_name`` is the :class:`RequestType` name (``"MALFORMED"`` when the type could not be
    read), ``outcome`` is ``"ok"`` or the status code name (``"InvalidArgument"``...), ``seconds``
    the time from receipt to reply. Must not block; an exception is logged and ignored.
    """

    def record(self, request_name: str, outcome: str, seconds: float) -> None: ...


EngineLike = _core.CacheEngine
"""What the server serves: the native engine (its interface is the generated ``_core`` stub,
so it is not restated here)."""


def engine_key(key: WireKey) -> _core.EngineKey:
    """The ``_core.EngineKey`` of a validated wire key."""
    return _core.EngineKey(
        model_name=key.model_name,
        world_size=key.world_size,
        worker_id=key.worker_id,
        request_id=key.request_id,
        cache_salt=key.cache_salt,
        tokens=key.tokens,
        block_hashes=key.block_hashes,
        block_hash_size=key.block_hash_size,
        start=key.start,
        end=key.end,
    )


_KV_LAYOUTS: Final = {
    "nhd": _core.KvLayout.NHD,
    "hnd": _core.KvLayout.HND,
    "flashinfer": _core.KvLayout.FLASHINFER,
    "mla": _core.KvLayout.MLA,
}


def kv_cache_layout(layout: WireLayout) -> _core.KvCacheLayout:
    """The ``_core.KvCacheLayout`` of a validated wire layout."""
    return _core.KvCacheLayout(
        _KV_LAYOUTS[layout.layout],
        layout.num_layers,
        layout.block_size,
        layout.num_heads,
        layout.head_size,
        layout.element_size,
        layout.num_blocks,
        layout.block_stride,
        layout.plane_stride,
    )


def _handle_from_wire(data: bytes) -> _core.JobHandle:
    return _core.JobHandle.from_hex(data.hex())


def _handle_to_wire(handle: _core.JobHandle) -> bytes:
    return bytes.fromhex(handle.hex())


def _lookup_result(r: _core.LookupResult) -> LookupResult:
    return LookupResult(int(r.hit_chunks), int(r.hit_tokens), int(r.l1_chunks), int(r.l2_chunks))


def _ticket(t: _core.TransferTicket) -> TransferTicket:
    return TransferTicket(
        handle=_handle_to_wire(t.handle),
        first_chunk=int(t.first_chunk),
        offsets=[int(o) for o in t.offsets],
        object_bytes=int(t.object_bytes),
    )


def _outcome(status: int) -> str:
    return "ok" if status == _OK else _core.status_code_name(status)


def _request_id(body: bodies.RequestBody) -> str:
    if isinstance(
        body,
        bodies.KeyRequest
        | bodies.SyncLookupRequest
        | bodies.PrepareStoreRequest
        | bodies.PrepareRetrieveRequest,
    ):
        return body.key.request_id
    if isinstance(body, bodies.EndSessionRequest):
        return body.request_id
    return ""


# ---------------------------------------------------------------------------------------------
# Decode + execute, independent of sockets


Handler = Callable[[int, bodies.RequestBody], Mapping[str, Any]]

WaitKey = tuple[str, bytes | int]
"""What a parked request waits for: ("job", handle bytes) of a two-phase lookup, or ("request",
engine request id) of a sync lookup's pending load; the engine's completion notices name both."""


@dataclass(frozen=True)
class Waiting:
    """:meth:`Dispatcher.poll`'s answer for a request that still waits, and for what."""

    key: WaitKey


class Dispatcher:
    """Validates requests and runs them against the engine; no sockets, no threads.

    :meth:`decode` raises :class:`ProtocolError` for a request that must get an error reply;
    :meth:`execute` never raises: it returns the reply frames and status of any request (engine
    errors become error replies, unexpected exceptions Internal error replies, logged).
    Thread-safe as far as the engine and the callbacks are.
    """

    def __init__(
        self,
        engine: EngineLike,
        limits: ProtocolLimits,
        *,
        hello: Callable[[int, bodies.HelloRequest], Mapping[str, Any]] | None = None,
        goodbye: Callable[[int], Mapping[str, Any]] | None = None,
        server_status: Callable[[], Mapping[str, Any]] | None = None,
        client_usage: Callable[[], list[dict[str, Any]]] | None = None,
        has_l2: bool = True,
        admin_token: str | None = None,
        device: DeviceLayer | None = None,
    ) -> None:
        self._engine = engine
        # Server-driven mode (STORE/RETRIEVE) when the server has a device layer.
        self._device: DeviceTransfers | None = None
        if device is not None:
            self._device = DeviceTransfers(
                engine,
                device,
                ticket=_ticket,
                engine_key=engine_key,
                handle_from_wire=_handle_from_wire,
            )
        self._client_usage = client_usage
        self._limits = limits
        self._admin_token = admin_token
        self._blocking = BLOCKING_REQUESTS if has_l2 else BLOCKING_WITHOUT_L2
        self._hello = hello
        self._goodbye = goodbye
        self._server_status = server_status
        # From the request table: each row names its handler (reserved rows have none).
        self._handlers: dict[RequestType, Handler] = {
            rt: getattr(self, spec.handler) for rt, spec in REQUESTS.items() if spec.handler
        }

    @property
    def limits(self) -> ProtocolLimits:
        return self._limits

    @property
    def device(self) -> DeviceTransfers | None:
        """The server-driven mode's mappings (None: no device layer)."""
        return self._device

    def release_client(self, client: int) -> None:
        """Releases what the client holds outside the engine (its device mappings); the server
        calls it where it ends the client in the engine."""
        if self._device is not None:
            self._device.release_client(client)

    def decode(self, frames: list[bytes]) -> Request:
        return decode_request(frames, self._limits, server_driven=self._device is not None)

    def is_blocking(self, request_type: RequestType) -> bool:
        return request_type in self._blocking

    def is_parked(self, request_type: RequestType) -> bool:
        """Whether the request may wait for an L2 job (:data:`PARKED_REQUESTS`): the server
        answers it with :meth:`poll`, never by blocking a thread on it."""
        return request_type in PARKED_REQUESTS

    def wait_s(self, request: Request) -> float:
        """How long a :data:`PARKED_REQUESTS` request may wait: its own ``timeout_s``, else the
        engine's retrieve wait (capped by ``max_wait_s``)."""
        body = request.body
        if isinstance(body, bodies.PrefetchWaitRequest):
            return body.timeout_s
        if isinstance(body, bodies.PrepareRetrieveRequest) and body.timeout_s is not None:
            return body.timeout_s
        return min(float(self._engine.retrieve_wait_timeout_s), self._limits.max_wait_s)

    def poll(self, client: int, request: Request, final: bool) -> tuple[list[bytes], int] | Waiting:
        """Runs a :data:`PARKED_REQUESTS` request without waiting: its reply and status, or
        :class:`Waiting` for what it still waits for (never when ``final``: its wait is over,
        and it is answered as a wait that timed out is). Never raises, as :meth:`execute`."""
        body = request.body
        waiting: list[WaitKey] = []

        def run() -> Mapping[str, Any] | None:
            if isinstance(body, bodies.PrefetchWaitRequest):
                handle = _handle_from_wire(body.handle)
                result = self._engine.query_prefetch_status(client, handle)
                if result is None and not final:
                    waiting.append(("job", body.handle))
                    return None
                return prefetch_status_to_wire(None if result is None else _lookup_result(result))
            assert isinstance(body, bodies.PrepareRetrieveRequest | bodies.KeyRequest)
            wire = body.key
            if not final:
                pending = int(self._engine.pending_load(wire.model_name, wire.request_id))
                if pending:
                    waiting.append(("request", pending))
                    return None
            if isinstance(body, bodies.PrepareRetrieveRequest):
                ticket = self._engine.prepare_retrieve(client, engine_key(wire), 0.0)
                return _ticket(ticket).to_wire()
            released = self._engine.free_lookup_locks(client, engine_key(wire), body.tp_size, 0.0)
            return {"released": int(released)}

        answered = self._guarded(client, request, run)
        return Waiting(waiting[0]) if answered is None else answered

    def try_without_blocking(self, client: int, request: Request) -> tuple[list[bytes], int] | None:
        """Answers a pool request at once when it turns out not to block: a SYNC_LOOKUP whose
        key is all in L1 (the usual case on a warm server). None: run it on the pool."""
        if request.request_type is not RequestType.SYNC_LOOKUP:
            return None
        body = request.body
        assert isinstance(body, bodies.SyncLookupRequest)
        try:
            result = self._engine.sync_lookup_in_l1(client, engine_key(body.key), body.tp_size)
        except Exception:
            return None  # the pool runs it again and words the error reply
        if result is None:
            return None
        return encode_reply(
            int(request.request_type), request.seq, _lookup_result(result).to_wire()
        ), _OK

    def execute(self, client: int, request: Request) -> tuple[list[bytes], int]:
        rt = request.request_type

        def run() -> Mapping[str, Any]:
            handler = self._handlers.get(rt)
            if handler is None:
                raise ProtocolError(
                    int(_core.StatusCode.NOT_SUPPORTED), f"{rt.name} has no handler"
                )
            return handler(client, request.body)

        answered = self._guarded(client, request, run)
        assert answered is not None
        return answered

    def _guarded(
        self, client: int, request: Request, run: Callable[[], Mapping[str, Any] | None]
    ) -> tuple[list[bytes], int] | None:
        """The reply of ``run()`` (None when it returns None), errors turned into error replies."""
        rt = request.request_type
        try:
            result = run()
            if result is None:
                return None
            return encode_reply(int(rt), request.seq, result), _OK
        except LMCacheError as exc:
            return encode_error_reply(int(rt), request.seq, exc.code, exc.message), exc.code
        except ProtocolError as exc:
            return encode_error_reply(int(rt), request.seq, exc.code, exc.message), exc.code
        except Exception as exc:
            _log.exception("client %d seq %d %s: unexpected error", client, request.seq, rt.name)
            message = f"{type(exc).__name__}: {exc}"
            return encode_error_reply(int(rt), request.seq, _INTERNAL, message), _INTERNAL

    def handle(self, client: int, frames: list[bytes]) -> tuple[list[bytes], str, int]:
        """Decode + execute in the caller's thread: (reply frames, request name, status)."""
        try:
            request = self.decode(frames)
        except ProtocolError as exc:
            name = _request_name(exc.request_type)
            return (
                encode_error_reply(exc.request_type, exc.seq, exc.code, exc.message),
                name,
                exc.code,
            )
        reply, status = self.execute(client, request)
        return reply, request.request_type.name, status

    # ---- handlers (body types are guaranteed by protocol.parse_body) --------------------------

    def _on_hello(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.HelloRequest)
        if self._hello is not None:
            return self._hello(client, body)
        return HelloInfo(
            protocol_version=PROTOCOL_VERSION,
            server_version=_core.version(),
            client_id=client,
            chunk_size=int(self._engine.chunk_size),
            heartbeat_grace_s=0.0,
            max_frame_bytes=self._limits.max_frame_bytes,
            max_tokens=self._limits.max_tokens,
        ).to_wire()

    def _on_goodbye(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        if self._goodbye is not None:
            return self._goodbye(client)
        return {"released": int(self._engine.end_client(client))}

    def _on_ping(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.EmptyRequest)
        return {}

    def _on_get_chunk_size(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.EmptyRequest)
        return {"chunk_size": int(self._engine.chunk_size)}

    def _on_register(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.RegisterRequest)
        if body.device is not None and self._device is None:
            raise not_provided(RequestType.REGISTER_KV_CACHE)
        layout = kv_cache_layout(body.layout)
        reg = self._engine.register_kv_cache(
            client, body.model_name, body.world_size, body.worker_id, layout
        )
        reply = {
            "registration_id": int(reg.id),
            "chunk_size": int(reg.chunk_size),
            "object_bytes": int(reg.object_bytes),
            "fingerprint": str(reg.fingerprint),
            "arena_path": str(reg.arena_path),
            "arena_size": int(reg.arena_size),
        }
        if body.device is not None:
            assert self._device is not None
            try:
                self._device.register(client, body, layout, registration_from_wire(reply))
            except BaseException:
                self._engine.unregister_kv_cache(client, int(reg.id))
                raise
        return reply

    def _on_unregister(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.UnregisterRequest)
        self._engine.unregister_kv_cache(client, body.registration_id)
        if self._device is not None:
            self._device.unregister(client, body.registration_id)
        return {}

    def _on_store(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.DeviceStoreRequest) and self._device is not None
        return self._device.store(client, body)

    def _on_retrieve(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.DeviceStoreRequest) and self._device is not None
        return self._device.retrieve(client, body)

    def _on_lookup(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.KeyRequest)
        handle = self._engine.lookup(client, engine_key(body.key), body.tp_size)
        return {"handle": _handle_to_wire(handle)}

    def _on_query_prefetch(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.HandleRequest)
        result = self._engine.query_prefetch_status(client, _handle_from_wire(body.handle))
        return prefetch_status_to_wire(None if result is None else _lookup_result(result))

    def _on_wait_prefetch(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.PrefetchWaitRequest)
        handle = _handle_from_wire(body.handle)
        result = self._engine.wait_prefetch_status(client, handle, body.timeout_s)
        return prefetch_status_to_wire(None if result is None else _lookup_result(result))

    def _on_sync_lookup(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.SyncLookupRequest)
        result = self._engine.sync_lookup(
            client, engine_key(body.key), body.tp_size, body.timeout_s
        )
        return _lookup_result(result).to_wire()

    def _on_free_lookup_locks(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.KeyRequest)
        released = self._engine.free_lookup_locks(client, engine_key(body.key), body.tp_size)
        return {"released": int(released)}

    def _on_end_session(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.EndSessionRequest)
        return {"released": int(self._engine.end_session(client, body.model_name, body.request_id))}

    def _on_prepare_store(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.PrepareStoreRequest)
        return _ticket(self._engine.prepare_store(client, engine_key(body.key))).to_wire()

    def _on_commit_store(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.CommitStoreRequest)
        crcs = (
            None
            if body.crc32c is None
            else list(struct.unpack(f"<{len(body.crc32c) // 4}I", body.crc32c))
        )
        published = self._engine.commit_store(
            client, _handle_from_wire(body.handle), body.success, crcs
        )
        return {"published": int(published)}

    def _on_prepare_retrieve(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.PrepareRetrieveRequest)
        ticket = self._engine.prepare_retrieve(client, engine_key(body.key), body.timeout_s)
        return _ticket(ticket).to_wire()

    def _on_commit_retrieve(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.HandleRequest)
        self._engine.commit_retrieve(client, _handle_from_wire(body.handle))
        return {}

    def _on_clear(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.ClearRequest)
        if body.force:
            token = self._admin_token
            given = body.admin_token or ""
            if token is None or not hmac.compare_digest(given.encode(), token.encode()):
                raise PermissionDeniedError(
                    "CLEAR with force needs the server's admin token (the file the server wrote "
                    "at start; see docs/operations.md)"
                )
        return {"removed": int(self._engine.clear(body.force))}

    def _on_status(self, client: int, body: bodies.RequestBody) -> Mapping[str, Any]:
        assert isinstance(body, bodies.EmptyRequest)
        reply: dict[str, Any] = dict(self._engine.stats())
        if self._client_usage is not None:
            reply["clients"] = self._client_usage()
        else:
            reply["clients"] = list(self._engine.client_usage())
        if self._server_status is not None:
            reply["server"] = dict(self._server_status())
        return reply


def _request_name(request_type: int) -> str:
    try:
        return RequestType(request_type).name
    except ValueError:
        return _MALFORMED
