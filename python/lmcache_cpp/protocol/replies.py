"""Reply bodies, built by the server and read by the client (unknown reply fields are ignored)."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from lmcache_cpp.protocol.fields import (
    _INTERNAL,
    _U64_MAX,
    ProtocolError,
    _Fields,
)

__all__ = [
    "HelloInfo",
    "LookupResult",
    "RegistrationInfo",
    "TransferTicket",
    "count_from_wire",
    "pack_offsets",
    "prefetch_status_from_wire",
    "prefetch_status_to_wire",
    "registration_from_wire",
    "unpack_offsets",
]

# ---------------------------------------------------------------------------------------------
# Reply bodies (built by the server, read by the client; unknown reply fields are ignored)


def pack_offsets(offsets: Sequence[int]) -> bytes:
    """Ticket offsets on the wire: packed little-endian int64, -1 = skipped."""
    return struct.pack(f"<{len(offsets)}q", *offsets)


def unpack_offsets(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ProtocolError(_INTERNAL, f"offsets field is {len(data)} bytes, not a multiple of 8")
    return list(struct.unpack(f"<{len(data) // 8}q", data))


def _reply_fields(payload: Mapping[str, Any], where: str) -> _Fields:
    return _Fields(payload, where, strict=False)


def _reply_error(exc: ProtocolError) -> ProtocolError:
    return ProtocolError(_INTERNAL, f"malformed reply: {exc.message}")


@dataclass(frozen=True)
class HelloInfo:
    """The HELLO reply: the server's protocol version, build version, the client id it assigned
    to this connection, its chunk size, heartbeat grace and request limits."""

    protocol_version: int
    server_version: str
    client_id: int
    chunk_size: int
    heartbeat_grace_s: float
    max_frame_bytes: int
    max_tokens: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "server_version": self.server_version,
            "client_id": self.client_id,
            "chunk_size": self.chunk_size,
            "heartbeat_grace_s": self.heartbeat_grace_s,
            "max_frame_bytes": self.max_frame_bytes,
            "max_tokens": self.max_tokens,
        }

    @staticmethod
    def from_wire(payload: Mapping[str, Any]) -> HelloInfo:
        f = _reply_fields(payload, "HELLO reply")
        try:
            return HelloInfo(
                protocol_version=f.integer("protocol_version", 0, _U64_MAX),
                server_version=f.string("server_version", 1 << 16),
                client_id=f.integer("client_id", 0, _U64_MAX),
                chunk_size=f.integer("chunk_size", 0, _U64_MAX),
                heartbeat_grace_s=f.number("heartbeat_grace_s", 0.0, math.inf),
                max_frame_bytes=f.integer("max_frame_bytes", 0, _U64_MAX),
                max_tokens=f.integer("max_tokens", 0, _U64_MAX),
            )
        except ProtocolError as exc:
            raise _reply_error(exc) from None


class RegistrationInfo(TypedDict):
    """The REGISTER_KV_CACHE reply: the registration id (for UNREGISTER_KV_CACHE), the chunk
    size, the bytes of one object, the layout fingerprint and the L1 arena to map."""

    registration_id: int
    chunk_size: int
    object_bytes: int
    fingerprint: str
    arena_path: str
    arena_size: int


def registration_from_wire(payload: Mapping[str, Any]) -> RegistrationInfo:
    f = _reply_fields(payload, "REGISTER_KV_CACHE reply")
    try:
        return RegistrationInfo(
            registration_id=f.integer("registration_id", 0, _U64_MAX),
            chunk_size=f.integer("chunk_size", 1, _U64_MAX),
            object_bytes=f.integer("object_bytes", 0, _U64_MAX),
            fingerprint=f.string("fingerprint", 1 << 16),
            arena_path=f.string("arena_path", 1 << 16),
            arena_size=f.integer("arena_size", 0, _U64_MAX),
        )
    except ProtocolError as exc:
        raise _reply_error(exc) from None


@dataclass(frozen=True)
class LookupResult:
    """Hits of a lookup: the leading chunks present for every rank (leased for the request)."""

    hit_chunks: int
    hit_tokens: int
    l1_chunks: int
    l2_chunks: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "hit_chunks": self.hit_chunks,
            "hit_tokens": self.hit_tokens,
            "l1_chunks": self.l1_chunks,
            "l2_chunks": self.l2_chunks,
        }

    @staticmethod
    def from_wire(payload: Mapping[str, Any]) -> LookupResult:
        # The common case without a per-field walk; anything else gets the walk's messages.
        hit_chunks = payload.get("hit_chunks")
        hit_tokens = payload.get("hit_tokens")
        l1_chunks = payload.get("l1_chunks")
        l2_chunks = payload.get("l2_chunks")
        if (
            type(hit_chunks) is int
            and type(hit_tokens) is int
            and type(l1_chunks) is int
            and type(l2_chunks) is int
            and 0 <= hit_chunks <= _U64_MAX
            and 0 <= hit_tokens <= _U64_MAX
            and 0 <= l1_chunks <= _U64_MAX
            and 0 <= l2_chunks <= _U64_MAX
        ):
            return LookupResult(hit_chunks, hit_tokens, l1_chunks, l2_chunks)
        f = _reply_fields(payload, "lookup reply")
        try:
            return LookupResult(
                hit_chunks=f.integer("hit_chunks", 0, _U64_MAX),
                hit_tokens=f.integer("hit_tokens", 0, _U64_MAX),
                l1_chunks=f.integer("l1_chunks", 0, _U64_MAX),
                l2_chunks=f.integer("l2_chunks", 0, _U64_MAX),
            )
        except ProtocolError as exc:
            raise _reply_error(exc) from None


def prefetch_status_to_wire(result: LookupResult | None) -> dict[str, Any]:
    """QUERY/WAIT_PREFETCH_STATUS reply: ``{"ready": False}`` or ``{"ready": True, **hits}``."""
    if result is None:
        return {"ready": False}
    return {"ready": True, **result.to_wire()}


def prefetch_status_from_wire(payload: Mapping[str, Any]) -> LookupResult | None:
    ready = payload.get("ready")
    if ready is True:
        return LookupResult.from_wire(payload)
    if ready is False:
        return None
    f = _reply_fields(payload, "prefetch status reply")
    try:
        ready = f.boolean("ready")
    except ProtocolError as exc:
        raise _reply_error(exc) from None
    return LookupResult.from_wire(payload) if ready else None


@dataclass(frozen=True)
class TransferTicket:
    """PREPARE_STORE / PREPARE_RETRIEVE reply.

    ``handle`` names the ticket for the commit; ``first_chunk`` is the index of the first chunk
    of the range; ``offsets`` has one arena offset per key of the range (chunk-major over ranks
    for worker_id -1), -1 for a store key that is skipped (already present).
    """

    handle: bytes
    first_chunk: int
    offsets: list[int]
    object_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "first_chunk": self.first_chunk,
            "offsets": pack_offsets(self.offsets),
            "object_bytes": self.object_bytes,
        }

    @staticmethod
    def from_wire(payload: Mapping[str, Any]) -> TransferTicket:
        f = _reply_fields(payload, "ticket reply")
        try:
            return TransferTicket(
                handle=f.handle("handle"),
                first_chunk=f.integer("first_chunk", 0, _U64_MAX),
                offsets=unpack_offsets(f.binary("offsets")),
                object_bytes=f.integer("object_bytes", 0, _U64_MAX),
            )
        except ProtocolError as exc:
            raise _reply_error(exc) from None


def count_from_wire(payload: Mapping[str, Any], name: str) -> int:
    """Reads an integer count field of a reply (``released``, ``published``, ``removed``...)."""
    value = payload.get(name)
    if type(value) is int and 0 <= value <= _U64_MAX:
        return value
    f = _reply_fields(payload, "reply")
    try:
        return f.integer(name, 0, _U64_MAX)
    except ProtocolError as exc:
        raise _reply_error(exc) from None
