"""The cache server's wire protocol: request ids, framing, payload schemas, limits.

Everything here is pure (no sockets, no threads) and shared by the server
(:mod:`lmcache_cpp.server`) and the client (:mod:`lmcache_cpp.client`). The normative description,
request by request, is ``docs/protocol.md``; this module is its executable form.

Framing (ZeroMQ DEALER -> ROUTER, msgpack with bin/str distinguished)::

    request  = [header, payload]           header = [version, request_type, seq]
    reply    = [header, payload]           header = [version, request_type, seq, status]

``seq`` is chosen by the client and echoed; ``status`` is 0 for success, else a
:class:`lmcache_cpp.StatusCode` value, and the payload of an error reply is ``{"message": str}``.
Every request gets exactly one reply. :func:`decode_request` turns every malformed request into a
:class:`ProtocolError` carrying the status code and message of that reply, so a server can answer
anything it receives.

Requests are strict: unknown payload fields are refused (a misspelt optional field such as
``cache_salt`` must never be silently dropped). Replies are lenient: a client ignores reply fields
it does not know, so a server may add reply fields without a version change.
"""

from __future__ import annotations

from lmcache_cpp.protocol.bodies import (
    LAYOUT_NAMES,
    ClearRequest,
    CommitStoreRequest,
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
    WireKey,
    WireLayout,
    key_map,
    pid_namespace,
)
from lmcache_cpp.protocol.fields import (
    HANDLE_SIZE,
    PROTOCOL_VERSION,
    ProtocolError,
    ProtocolLimits,
    RequestType,
)
from lmcache_cpp.protocol.framing import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_payload,
    encode_reply,
    encode_request,
    encode_request_header,
)
from lmcache_cpp.protocol.replies import (
    HelloInfo,
    LookupResult,
    RegistrationInfo,
    TransferTicket,
    count_from_wire,
    pack_offsets,
    prefetch_status_from_wire,
    prefetch_status_to_wire,
    registration_from_wire,
    unpack_offsets,
)
from lmcache_cpp.protocol.requests import (
    REQUESTS,
    RequestSpec,
    Runs,
    parse_body,
)

__all__ = [
    "HANDLE_SIZE",
    "LAYOUT_NAMES",
    "PROTOCOL_VERSION",
    "REQUESTS",
    "ClearRequest",
    "CommitStoreRequest",
    "EmptyRequest",
    "EndSessionRequest",
    "HandleRequest",
    "HelloInfo",
    "HelloRequest",
    "KeyRequest",
    "LookupResult",
    "PrefetchWaitRequest",
    "PrepareRetrieveRequest",
    "PrepareStoreRequest",
    "ProtocolError",
    "ProtocolLimits",
    "RegisterRequest",
    "RegistrationInfo",
    "Reply",
    "Request",
    "RequestBody",
    "RequestSpec",
    "RequestType",
    "Runs",
    "SyncLookupRequest",
    "TransferTicket",
    "UnregisterRequest",
    "WireKey",
    "WireLayout",
    "count_from_wire",
    "decode_reply",
    "decode_request",
    "encode_error_reply",
    "encode_payload",
    "encode_reply",
    "encode_request",
    "encode_request_header",
    "key_map",
    "pack_offsets",
    "parse_body",
    "pid_namespace",
    "prefetch_status_from_wire",
    "prefetch_status_to_wire",
    "registration_from_wire",
    "unpack_offsets",
]
