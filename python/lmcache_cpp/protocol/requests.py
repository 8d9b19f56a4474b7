"""The request table: one row per request (id, body, reply, where it runs, handler)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from lmcache_cpp.protocol.bodies import (
    ClearRequest,
    CommitStoreRequest,
    DeviceStoreRequest,
    EmptyRequest,
    EndSessionRequest,
    HandleRequest,
    HelloRequest,
    KeyRequest,
    PrefetchWaitRequest,
    PrepareRetrieveRequest,
    PrepareStoreRequest,
    RegisterRequest,
    RequestBody,
    SyncLookupRequest,
    UnregisterRequest,
)
from lmcache_cpp.protocol.fields import (
    _NOT_SUPPORTED,
    ProtocolError,
    ProtocolLimits,
    RequestType,
    _Fields,
)

__all__ = [
    "REQUESTS",
    "RequestSpec",
    "Runs",
    "not_provided",
    "parse_body",
]


class Runs(enum.Enum):
    """Where a server runs a request (the "Thread" column of docs/protocol.md)."""

    SOCKET = "socket"  # on the socket thread: never waits
    POOL = "pool"  # on a worker thread: may block briefly, up to its own deadline
    POOL_WITH_L2 = "pool*"  # on the pool when the server has an L2 adapter, else the socket
    PARKED = "parked"  # may wait long for an L2 job: parked, answered from its completion


@dataclass(frozen=True)
class RequestSpec:
    """One row of the request table: what a request is and how a server serves it."""

    request_type: RequestType
    body: type[RequestBody]
    reply: str  # the reply payload, in words (docs/protocol.md has the fields)
    runs: Runs
    handler: str  # the server Dispatcher's method that runs it
    # Server-driven mode: a server without a device layer answers NotSupported before parsing.
    server_driven: bool = False


def _spec(
    rt: RequestType,
    body: type[RequestBody],
    reply: str,
    runs: Runs,
    handler: str,
    server_driven: bool = False,
) -> tuple[RequestType, RequestSpec]:
    return rt, RequestSpec(rt, body, reply, runs, handler, server_driven)


RT = RequestType
REQUESTS: Final[Mapping[RequestType, RequestSpec]] = dict(
    [
        _spec(RT.HELLO, HelloRequest, "HelloInfo", Runs.SOCKET, "_on_hello"),
        _spec(RT.PING, EmptyRequest, "{}", Runs.SOCKET, "_on_ping"),
        _spec(RT.GET_CHUNK_SIZE, EmptyRequest, "chunk_size", Runs.SOCKET, "_on_get_chunk_size"),
        _spec(
            RT.REGISTER_KV_CACHE, RegisterRequest, "RegistrationInfo", Runs.SOCKET, "_on_register"
        ),
        _spec(RT.UNREGISTER_KV_CACHE, UnregisterRequest, "{}", Runs.SOCKET, "_on_unregister"),
        _spec(RT.LOOKUP, KeyRequest, "handle", Runs.SOCKET, "_on_lookup"),
        _spec(
            RT.QUERY_PREFETCH_STATUS,
            HandleRequest,
            "prefetch status",
            Runs.SOCKET,
            "_on_query_prefetch",
        ),
        _spec(
            RT.WAIT_PREFETCH_STATUS,
            PrefetchWaitRequest,
            "prefetch status",
            Runs.PARKED,
            "_on_wait_prefetch",
        ),
        _spec(
            RT.SYNC_LOOKUP, SyncLookupRequest, "LookupResult", Runs.POOL_WITH_L2, "_on_sync_lookup"
        ),
        _spec(RT.FREE_LOOKUP_LOCKS, KeyRequest, "released", Runs.PARKED, "_on_free_lookup_locks"),
        _spec(RT.END_SESSION, EndSessionRequest, "released", Runs.SOCKET, "_on_end_session"),
        _spec(
            RT.PREPARE_STORE,
            PrepareStoreRequest,
            "TransferTicket",
            Runs.SOCKET,
            "_on_prepare_store",
        ),
        _spec(RT.COMMIT_STORE, CommitStoreRequest, "published", Runs.SOCKET, "_on_commit_store"),
        _spec(
            RT.PREPARE_RETRIEVE,
            PrepareRetrieveRequest,
            "TransferTicket",
            Runs.PARKED,
            "_on_prepare_retrieve",
        ),
        _spec(RT.COMMIT_RETRIEVE, HandleRequest, "{}", Runs.SOCKET, "_on_commit_retrieve"),
        _spec(RT.STORE, DeviceStoreRequest, "published, event", Runs.POOL, "_on_store", True),
        _spec(RT.RETRIEVE, DeviceStoreRequest, "tokens, event", Runs.POOL, "_on_retrieve", True),
        _spec(RT.CLEAR, ClearRequest, "removed", Runs.POOL, "_on_clear"),
        _spec(RT.STATUS, EmptyRequest, "stats maps", Runs.SOCKET, "_on_status"),
        _spec(RT.GOODBYE, EmptyRequest, "released", Runs.SOCKET, "_on_goodbye"),
    ]
)
"""The request table: one row per request type. A new request is a row here, its body class
(with ``parse`` and ``to_wire``), its Dispatcher handler and its client method; the server's
thread sets, the decoder and the dispatcher are derived from the rows."""
del RT


def not_provided(request_type: RequestType) -> ProtocolError:
    """The NotSupported answer of a server-driven request to a server without a device layer."""
    return ProtocolError(
        _NOT_SUPPORTED,
        f"{request_type.name} belongs to the server-driven (CUDA IPC) transfer mode, which this "
        "server does not provide (started without --device); use PREPARE_STORE/COMMIT_STORE and "
        "PREPARE_RETRIEVE/COMMIT_RETRIEVE",
    )


def parse_body(
    request_type: RequestType,
    payload: Mapping[str, Any],
    limits: ProtocolLimits,
    *,
    server_driven: bool = False,
) -> RequestBody:
    """Validates a decoded request payload map; raises :class:`ProtocolError` (no echo values).

    Server-driven request types (STORE, RETRIEVE) raise NotSupported unless ``server_driven``
    (the server has a device layer).
    """
    rt = request_type
    f = _Fields(payload, rt.name)
    spec = REQUESTS[rt]
    if spec.server_driven and not server_driven:
        raise not_provided(rt)
    body = spec.body.parse(f, limits)
    f.done()
    return body
