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

import enum
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypedDict

import msgpack  # type: ignore[import-untyped]

from lmcache_cpp._core import MAX_BLOCK_HASH_SIZE, StatusCode

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
    "encode_reply",
    "encode_request",
    "pack_offsets",
    "parse_body",
    "pid_namespace",
    "prefetch_status_from_wire",
    "prefetch_status_to_wire",
    "registration_from_wire",
    "unpack_offsets",
]

PROTOCOL_VERSION: Final = 1
"""Version of this protocol. Both header layouts carry it; a mismatch is answered NotSupported."""

HANDLE_SIZE: Final = 16
"""Bytes of a job handle or transfer ticket handle on the wire (128-bit random)."""

_U32_MAX: Final = (1 << 32) - 1
_I32_MAX: Final = (1 << 31) - 1
_I64_MAX: Final = (1 << 63) - 1
_U64_MAX: Final = (1 << 64) - 1
_MAX_ERROR_MESSAGE_CHARS: Final = 4096

_OK: Final = int(StatusCode.OK)
_INVALID: Final = int(StatusCode.INVALID_ARGUMENT)
_NOT_SUPPORTED: Final = int(StatusCode.NOT_SUPPORTED)
_EXHAUSTED: Final = int(StatusCode.RESOURCE_EXHAUSTED)
_INTERNAL: Final = int(StatusCode.INTERNAL)


class RequestType(enum.IntEnum):
    """Request ids on the wire. Append-only: a value is never reused or renumbered."""

    HELLO = 1
    PING = 2
    GET_CHUNK_SIZE = 3
    REGISTER_KV_CACHE = 4
    UNREGISTER_KV_CACHE = 5
    LOOKUP = 6
    QUERY_PREFETCH_STATUS = 7
    WAIT_PREFETCH_STATUS = 8
    SYNC_LOOKUP = 9
    FREE_LOOKUP_LOCKS = 10
    END_SESSION = 11
    PREPARE_STORE = 12
    COMMIT_STORE = 13
    PREPARE_RETRIEVE = 14
    COMMIT_RETRIEVE = 15
    STORE = 16  # reserved: server-driven (CUDA IPC) mode; answered NotSupported
    RETRIEVE = 17  # reserved: server-driven (CUDA IPC) mode; answered NotSupported
    CLEAR = 18
    STATUS = 19
    GOODBYE = 20


_RESERVED_TYPES: Final = frozenset({RequestType.STORE, RequestType.RETRIEVE})


@dataclass(frozen=True)
class ProtocolLimits:
    """Bounds a server enforces on what it decodes (a client uses them to pre-check, optionally).

    ``max_frame_bytes``: largest payload frame decoded; a larger one is answered
    ResourceExhausted. ``max_header_bytes``: largest header frame (InvalidArgument beyond).
    ``max_tokens``: tokens (or block hashes) per key; ResourceExhausted beyond.
    ``max_string_bytes``: longest string field (model names, request ids, salts); longer strings
    are InvalidArgument. ``max_map_entries``: entries of any map or array in a request payload.
    ``max_wait_s``: the largest ``timeout_s`` a request may ask the server to block for.
    """

    max_frame_bytes: int = 64 << 20
    max_header_bytes: int = 64
    max_tokens: int = 1 << 20
    max_string_bytes: int = 1024
    max_map_entries: int = 32
    max_wait_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_header_bytes", "max_tokens", "max_string_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16:
                raise ValueError(f"ProtocolLimits.{name} must be an int >= 16, got {value!r}")
        if not isinstance(self.max_map_entries, int) or self.max_map_entries < 16:
            raise ValueError(
                f"ProtocolLimits.max_map_entries must be >= 16: {self.max_map_entries}"
            )
        if not (self.max_wait_s > 0 and math.isfinite(self.max_wait_s)):
            raise ValueError(f"ProtocolLimits.max_wait_s must be positive: {self.max_wait_s}")


class ProtocolError(Exception):
    """A request that must be answered with an error reply.

    ``code`` is the status code of the reply, ``message`` its text; ``request_type`` and ``seq``
    are the values to echo in the reply header (0 when the header could not be read).
    """

    def __init__(self, code: int, message: str, request_type: int = 0, seq: int = 0) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.request_type = request_type
        self.seq = seq

    def __str__(self) -> str:
        return f"{StatusCode(self.code).name}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Payload field reading


_MISSING: Final[Any] = object()


def _wire_type(value: object) -> str:
    """The msgpack type name of a decoded value, for error messages."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "map"
    return "ext"


class _Fields:
    """Typed reads of one payload map with error messages naming the field.

    ``strict``: unknown fields are an error (requests); otherwise ignored (replies). An absent
    field and a nil field both mean "use the default".
    """

    def __init__(self, data: Mapping[str, Any], where: str, strict: bool = True) -> None:
        self._data = data
        self._where = where
        self._strict = strict
        self._used: set[str] = set()

    def _bad(self, name: str, message: str) -> ProtocolError:
        return ProtocolError(_INVALID, f"{self._where}: field '{name}' {message}")

    def _get(self, name: str, default: Any, expected: str) -> Any:
        self._used.add(name)
        value = self._data.get(name)
        if value is None:
            if default is _MISSING:
                raise self._bad(name, f"is required ({expected})")
            return default
        return value

    def _type_error(self, name: str, expected: str, value: object) -> ProtocolError:
        return self._bad(name, f"must be {expected}, got {_wire_type(value)}")

    def integer(self, name: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        value = self._get(name, default, "int")
        if type(value) is not int:
            raise self._type_error(name, "int", value)
        if not lo <= value <= hi:
            raise self._bad(name, f"must be in [{lo}, {hi}], got {value}")
        return value

    def optional_integer(self, name: str, lo: int, hi: int) -> int | None:
        if self._data.get(name) is None:
            self._used.add(name)
            return None
        return self.integer(name, lo, hi)

    def number(self, name: str, lo: float, hi: float, default: Any = _MISSING) -> float:
        value = self._get(name, default, "float")
        if type(value) not in (int, float):
            raise self._type_error(name, "float (or int)", value)
        value = float(value)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self._bad(name, f"must be a finite number in [{lo}, {hi}], got {value}")
        return value

    def optional_number(self, name: str, lo: float, hi: float) -> float | None:
        if self._data.get(name) is None:
            self._used.add(name)
            return None
        return self.number(name, lo, hi)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default, "bool")
        if type(value) is not bool:
            raise self._type_error(name, "bool", value)
        return value

    def string(
        self, name: str, max_bytes: int, default: Any = _MISSING, nonempty: bool = False
    ) -> str:
        value = self._get(name, default, "str")
        if type(value) is not str:
            raise self._type_error(name, "str", value)
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise self._bad(name, f"is {size} bytes, more than the limit of {max_bytes}")
        if nonempty and not value:
            raise self._bad(name, "must not be empty")
        return value

    def optional_string(self, name: str, max_bytes: int) -> str | None:
        if self._data.get(name) is None:
            self._used.add(name)
            return None
        return self.string(name, max_bytes)

    def binary(self, name: str, default: Any = _MISSING) -> bytes:
        value = self._get(name, default, "bin")
        if type(value) is not bytes:
            raise self._type_error(name, "bin", value)
        return value

    def optional_binary(self, name: str) -> bytes | None:
        if self._data.get(name) is None:
            self._used.add(name)
            return None
        return self.binary(name)

    def handle(self, name: str) -> bytes:
        value = self.binary(name)
        if len(value) != HANDLE_SIZE:
            raise self._bad(name, f"must be {HANDLE_SIZE} bytes, got {len(value)}")
        return value

    def mapping(self, name: str) -> _Fields:
        value = self._get(name, _MISSING, "map")
        if type(value) is not dict:
            raise self._type_error(name, "map", value)
        return _Fields(value, f"{self._where}.{name}", self._strict)

    def done(self) -> None:
        if not self._strict:
            return
        unknown = sorted(str(k) for k in self._data if k not in self._used)
        if unknown:
            raise ProtocolError(_INVALID, f"{self._where}: unknown field(s) {', '.join(unknown)}")


# ---------------------------------------------------------------------------------------------
# Request bodies


def key_map(
    model_name: str,
    world_size: int,
    worker_id: int,
    request_id: str,
    cache_salt: str,
    tokens: bytes | None,
    block_hashes: bytes | None,
    block_hash_size: int,
    start: int,
    end: int,
) -> dict[str, Any]:
    """The key map of the wire format (what :meth:`WireKey.to_wire` sends)."""
    out: dict[str, Any] = {
        "model_name": model_name,
        "world_size": world_size,
        "worker_id": worker_id,
        "request_id": request_id,
        "cache_salt": cache_salt,
        "start": start,
        "end": end,
    }
    if tokens is not None:
        out["tokens"] = tokens
    if block_hashes is not None:
        out["block_hashes"] = block_hashes
        out["block_hash_size"] = block_hash_size
    return out


@dataclass(frozen=True)
class WireKey:
    """The key map: mirrors ``_core.EngineKey`` field by field.

    Exactly one of ``tokens`` (packed little-endian uint32 token ids) and ``block_hashes``
    (``block_hash_size`` bytes per engine block) is set. ``worker_id`` -1 = every rank;
    ``end`` -1 = to the end of the key.
    """

    model_name: str
    world_size: int = 1
    worker_id: int = -1
    request_id: str = ""
    cache_salt: str = ""
    tokens: bytes | None = None
    block_hashes: bytes | None = None
    block_hash_size: int = 32
    start: int = 0
    end: int = -1

    def to_wire(self) -> dict[str, Any]:
        return key_map(**self.__dict__)  # the fields are key_map's parameters

    @staticmethod
    def parse(f: _Fields, limits: ProtocolLimits) -> WireKey:
        s = limits.max_string_bytes
        model_name = f.string("model_name", s, nonempty=True)
        world_size = f.integer("world_size", 1, _U32_MAX, 1)
        worker_id = f.integer("worker_id", -1, _I32_MAX, -1)
        if worker_id >= world_size:
            raise ProtocolError(
                _INVALID, f"key: worker_id {worker_id} must be -1 or below world_size {world_size}"
            )
        request_id = f.string("request_id", s, "")
        cache_salt = f.string("cache_salt", s, "")
        tokens = f.optional_binary("tokens")
        block_hashes = f.optional_binary("block_hashes")
        block_hash_size = f.integer("block_hash_size", 1, MAX_BLOCK_HASH_SIZE, 32)
        start = f.integer("start", 0, _I64_MAX, 0)
        end = f.integer("end", -1, _I64_MAX, -1)
        f.done()
        if (tokens is None) == (block_hashes is None):
            raise ProtocolError(
                _INVALID, "key: exactly one of 'tokens' and 'block_hashes' is required"
            )
        if tokens is not None:
            if len(tokens) % 4:
                raise ProtocolError(
                    _INVALID,
                    f"key: 'tokens' must be packed little-endian uint32 (a multiple of 4 bytes), "
                    f"got {len(tokens)} bytes",
                )
            count = len(tokens) // 4
            what = "tokens"
        else:
            assert block_hashes is not None
            if len(block_hashes) % block_hash_size:
                raise ProtocolError(
                    _INVALID,
                    f"key: 'block_hashes' is {len(block_hashes)} bytes, not a multiple of "
                    f"block_hash_size {block_hash_size}",
                )
            count = len(block_hashes) // block_hash_size
            what = "block hashes"
        if count > limits.max_tokens:
            raise ProtocolError(
                _EXHAUSTED, f"key: {count} {what} exceed the limit of {limits.max_tokens} per key"
            )
        if end != -1 and end < start:
            raise ProtocolError(_INVALID, f"key: end {end} is below start {start}")
        return WireKey(
            model_name=model_name,
            world_size=world_size,
            worker_id=worker_id,
            request_id=request_id,
            cache_salt=cache_salt,
            tokens=tokens,
            block_hashes=block_hashes,
            block_hash_size=block_hash_size,
            start=start,
            end=end,
        )


LAYOUT_NAMES: Final = ("nhd", "hnd", "flashinfer", "mla")
"""Wire names of ``_core.KvLayout`` members, in enum order (NHD=0, HND=1, FLASHINFER=2, MLA=3)."""


@dataclass(frozen=True)
class WireLayout:
    """The layout map of REGISTER_KV_CACHE: ``_core.KvCacheLayout`` field by field."""

    layout: str
    num_layers: int
    block_size: int
    num_heads: int
    head_size: int
    element_size: int
    num_blocks: int
    block_stride: int = 0
    plane_stride: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "num_layers": self.num_layers,
            "block_size": self.block_size,
            "num_heads": self.num_heads,
            "head_size": self.head_size,
            "element_size": self.element_size,
            "num_blocks": self.num_blocks,
            "block_stride": self.block_stride,
            "plane_stride": self.plane_stride,
        }

    @staticmethod
    def parse(f: _Fields) -> WireLayout:
        layout = f.string("layout", 32)
        if layout not in LAYOUT_NAMES:
            raise ProtocolError(
                _INVALID,
                f"layout: 'layout' must be one of {', '.join(LAYOUT_NAMES)}, got {layout!r}",
            )
        out = WireLayout(
            layout=layout,
            num_layers=f.integer("num_layers", 1, _U32_MAX),
            block_size=f.integer("block_size", 1, _U32_MAX),
            num_heads=f.integer("num_heads", 1, _U32_MAX),
            head_size=f.integer("head_size", 1, _U32_MAX),
            element_size=f.integer("element_size", 1, _U32_MAX),
            num_blocks=f.integer("num_blocks", 1, _I64_MAX),
            block_stride=f.integer("block_stride", 0, _I64_MAX, 0),
            plane_stride=f.integer("plane_stride", 0, _I64_MAX, 0),
        )
        f.done()
        return out


@dataclass(frozen=True)
class EmptyRequest:
    """PING, GET_CHUNK_SIZE, STATUS, GOODBYE: an empty map."""

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> EmptyRequest:
        return cls()

    def to_wire(self) -> dict[str, Any]:
        return {}


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace (None where /proc does not say): two processes
    with the same value see the same pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class HelloRequest:
    """HELLO: ``client_name`` is free text for the server's log (e.g. ``"vllm worker 3"``).

    ``pid`` and ``pid_ns`` (the inode of ``/proc/self/ns/pid``) name the client's process: a
    server in the same pid namespace watches it, so that arena extents fenced for the client's
    writers are freed once the process has exited (docs/design/integrity.md).
    """

    client_name: str = ""
    pid: int | None = None
    pid_ns: int | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> HelloRequest:
        return cls(
            f.string("client_name", limits.max_string_bytes, ""),
            f.optional_integer("pid", 1, _I32_MAX),
            f.optional_integer("pid_ns", 0, _U64_MAX),
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client_name": self.client_name}
        if self.pid is not None:
            out["pid"] = self.pid
            out["pid_ns"] = self.pid_ns
        return out


@dataclass(frozen=True)
class RegisterRequest:
    model_name: str
    world_size: int
    worker_id: int
    layout: WireLayout

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> RegisterRequest:
        model_name = f.string("model_name", limits.max_string_bytes, nonempty=True)
        world_size = f.integer("world_size", 1, _U32_MAX)
        worker_id = f.integer("worker_id", 0, world_size - 1)
        return cls(model_name, world_size, worker_id, WireLayout.parse(f.mapping("layout")))

    def to_wire(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "world_size": self.world_size,
            "worker_id": self.worker_id,
            "layout": self.layout.to_wire(),
        }


@dataclass(frozen=True)
class UnregisterRequest:
    registration_id: int

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> UnregisterRequest:
        return cls(f.integer("registration_id", 0, _U64_MAX))

    def to_wire(self) -> dict[str, Any]:
        return {"registration_id": self.registration_id}


@dataclass(frozen=True)
class KeyRequest:
    """LOOKUP and FREE_LOOKUP_LOCKS."""

    key: WireKey
    tp_size: int = 1

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> KeyRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        return cls(key, f.integer("tp_size", 1, _U32_MAX, 1))

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire(), "tp_size": self.tp_size}


@dataclass(frozen=True)
class SyncLookupRequest:
    """SYNC_LOOKUP: ``timeout_s`` is the L2 deadline (None = the engine's default)."""

    key: WireKey
    tp_size: int = 1
    timeout_s: float | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> SyncLookupRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        tp_size = f.integer("tp_size", 1, _U32_MAX, 1)
        return cls(key, tp_size, f.optional_number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_wire(), "tp_size": self.tp_size}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


@dataclass(frozen=True)
class PrepareStoreRequest:
    key: WireKey

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrepareStoreRequest:
        return cls(WireKey.parse(f.mapping("key"), limits))

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire()}


@dataclass(frozen=True)
class PrepareRetrieveRequest:
    """PREPARE_RETRIEVE: ``timeout_s`` bounds the wait for the request's pending L2 load
    (None = the engine's default)."""

    key: WireKey
    timeout_s: float | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrepareRetrieveRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        return cls(key, f.optional_number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_wire()}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


@dataclass(frozen=True)
class HandleRequest:
    """QUERY_PREFETCH_STATUS, COMMIT_RETRIEVE."""

    handle: bytes

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> HandleRequest:
        return cls(f.handle("handle"))

    def to_wire(self) -> dict[str, Any]:
        return {"handle": self.handle}


@dataclass(frozen=True)
class PrefetchWaitRequest:
    handle: bytes
    timeout_s: float

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrefetchWaitRequest:
        return cls(f.handle("handle"), f.number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        return {"handle": self.handle, "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class CommitStoreRequest:
    """COMMIT_STORE. ``crc32c``: the CRC32C of every object the worker wrote, one little-endian
    uint32 per offset of the PREPARE_STORE reply (entries of skipped offsets are ignored); absent,
    the server computes them."""

    handle: bytes
    success: bool = True
    crc32c: bytes | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> CommitStoreRequest:
        crc32c = f.optional_binary("crc32c")
        if crc32c is not None and len(crc32c) % 4 != 0:
            raise ProtocolError(
                _INVALID, "COMMIT_STORE: field 'crc32c' must hold whole uint32 values"
            )
        return cls(f.handle("handle"), f.boolean("success", True), crc32c)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"handle": self.handle, "success": self.success}
        if self.crc32c is not None:
            out["crc32c"] = self.crc32c
        return out


@dataclass(frozen=True)
class EndSessionRequest:
    model_name: str
    request_id: str

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> EndSessionRequest:
        s = limits.max_string_bytes
        return cls(f.string("model_name", s, nonempty=True), f.string("request_id", s))

    def to_wire(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "request_id": self.request_id}


@dataclass(frozen=True)
class ClearRequest:
    """CLEAR. ``force`` also drops leased objects and needs ``admin_token``."""

    force: bool = False
    admin_token: str | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> ClearRequest:
        return cls(
            f.boolean("force", False), f.optional_string("admin_token", limits.max_string_bytes)
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"force": self.force}
        if self.admin_token is not None:
            out["admin_token"] = self.admin_token
        return out


RequestBody = (
    EmptyRequest
    | HelloRequest
    | RegisterRequest
    | UnregisterRequest
    | KeyRequest
    | SyncLookupRequest
    | PrepareStoreRequest
    | PrepareRetrieveRequest
    | HandleRequest
    | PrefetchWaitRequest
    | CommitStoreRequest
    | EndSessionRequest
    | ClearRequest
)


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
    body: type[RequestBody] | None  # None: reserved, answered NotSupported
    reply: str  # the reply payload, in words (docs/protocol.md has the fields)
    runs: Runs
    handler: str  # the server Dispatcher's method that runs it


def _spec(
    rt: RequestType, body: type[RequestBody] | None, reply: str, runs: Runs, handler: str
) -> tuple[RequestType, RequestSpec]:
    return rt, RequestSpec(rt, body, reply, runs, handler)


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
        _spec(RT.STORE, None, "NotSupported", Runs.SOCKET, ""),
        _spec(RT.RETRIEVE, None, "NotSupported", Runs.SOCKET, ""),
        _spec(RT.CLEAR, ClearRequest, "removed", Runs.POOL, "_on_clear"),
        _spec(RT.STATUS, EmptyRequest, "stats maps", Runs.SOCKET, "_on_status"),
        _spec(RT.GOODBYE, EmptyRequest, "released", Runs.SOCKET, "_on_goodbye"),
    ]
)
"""The request table: one row per request type. A new request is a row here, its body class
(with ``parse`` and ``to_wire``), its Dispatcher handler and its client method; the server's
thread sets, the decoder and the dispatcher are derived from the rows."""
del RT


def parse_body(
    request_type: RequestType, payload: Mapping[str, Any], limits: ProtocolLimits
) -> RequestBody:
    """Validates a decoded request payload map; raises :class:`ProtocolError` (no echo values).

    Reserved request types (STORE, RETRIEVE) raise NotSupported.
    """
    rt = request_type
    f = _Fields(payload, rt.name)
    spec = REQUESTS[rt]
    if spec.body is None:
        raise ProtocolError(
            _NOT_SUPPORTED,
            f"{rt.name} belongs to the server-driven (CUDA IPC) transfer mode, which this server "
            "does not provide; use PREPARE_STORE/COMMIT_STORE and PREPARE_RETRIEVE/COMMIT_RETRIEVE",
        )
    body = spec.body.parse(f, limits)
    f.done()
    return body


# ---------------------------------------------------------------------------------------------
# Framing


@dataclass(frozen=True)
class Request:
    """A decoded, validated request."""

    request_type: RequestType
    seq: int
    body: RequestBody


class Reply(NamedTuple):
    """A decoded reply. ``status`` 0 = ok (``payload`` is the result map), else ``payload`` is
    ``{"message": str}``; ``version`` is the server's protocol version. (A named tuple: the
    client builds one per reply.)"""

    version: int
    request_type: int
    seq: int
    status: int
    payload: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == _OK

    @property
    def message(self) -> str:
        text = self.payload.get("message", "")
        return text if isinstance(text, str) else repr(text)


def _is_wire_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


# One packer for the whole process: a pack runs wholly under the GIL (no Python code is called
# for the plain maps, lists, strs, ints and bytes of this protocol), and a failed pack empties its
# buffer. Reusing it saves building a packer per frame.
_PACKER: Final = msgpack.Packer(use_bin_type=True)


def _pack(obj: object) -> bytes:
    data = _PACKER.pack(obj)
    assert isinstance(data, bytes)
    return data


def encode_request_header(request_type: int, seq: int) -> bytes:
    """The header frame of a request: ``encode_request(request_type, seq, {})[0]``, cheaper (the
    client's per-request path)."""
    data = _PACKER.pack([PROTOCOL_VERSION, request_type, seq])
    assert isinstance(data, bytes)
    return data


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The payload frame of a request: ``encode_request(any_type, any_seq, payload)[1]``."""
    return _pack(payload if type(payload) is dict else dict(payload))


def encode_request(request_type: int, seq: int, payload: Mapping[str, Any]) -> list[bytes]:
    """The two frames of a request. ``request_type`` may be any int (tests send unknown ids)."""
    return [_pack([PROTOCOL_VERSION, int(request_type), int(seq)]), _pack(dict(payload))]


def encode_reply(request_type: int, seq: int, payload: Mapping[str, Any]) -> list[bytes]:
    """The two frames of a success reply."""
    return [_pack([PROTOCOL_VERSION, request_type, seq, _OK]), _pack(dict(payload))]


def encode_error_reply(request_type: int, seq: int, code: int, message: str) -> list[bytes]:
    """The two frames of an error reply (``code`` != 0; the message is truncated to 4096 chars)."""
    if code == _OK:
        code = _INTERNAL
    if len(message) > _MAX_ERROR_MESSAGE_CHARS:
        message = message[: _MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    header = [
        PROTOCOL_VERSION,
        request_type if _is_wire_uint(request_type) else 0,
        seq if _is_wire_uint(seq) else 0,
        int(code),
    ]
    return [_pack(header), _pack({"message": message})]


def _unpack_header(frame: bytes) -> object:
    return msgpack.unpackb(
        frame,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=64,
        max_bin_len=64,
        max_array_len=8,
        max_map_len=8,
        max_ext_len=0,
    )


def _unpack_payload(frame: bytes, limits: ProtocolLimits) -> object:
    return msgpack.unpackb(
        frame,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_bin_len=limits.max_frame_bytes,
        max_str_len=limits.max_string_bytes,
        max_array_len=limits.max_map_entries,
        max_map_len=limits.max_map_entries,
        max_ext_len=0,
    )


# ---------------------------------------------------------------------------------------------
# The fast path of decode_request
#
# The requests an engine sends on every prompt (lookups, their status queries, transfers, END)
# are decoded by the functions below with a handful of type and range checks instead of the
# general field reader, which costs several times more. They accept a strict subset of what the
# general path accepts and return the same value for it; anything else (an unusual but valid
# request, or an invalid one) returns None and goes through the general path, which also words
# the error. tests/test_protocol.py checks the two paths against each other.


def decode_request(frames: Sequence[bytes], limits: ProtocolLimits) -> Request:
    """Decodes and validates the frames of one request (without the ROUTER identity frame).

    Raises :class:`ProtocolError` with the reply's status and echo values; the checks, in order:
    protocol version (NotSupported), frame count, header size and shape (InvalidArgument), request
    type (unknown or reserved: NotSupported), payload frame size (ResourceExhausted), payload
    msgpack and schema (InvalidArgument; oversized token lists ResourceExhausted).
    """
    header: object = None
    header_error = ""
    if frames and len(frames[0]) <= limits.max_header_bytes:
        try:
            header = _unpack_header(frames[0])
        except Exception as exc:
            header_error = f"{type(exc).__name__}: {exc}"
    echo_type = 0
    echo_seq = 0
    if isinstance(header, list):
        if len(header) >= 2 and _is_wire_uint(header[1]):
            echo_type = header[1]
        if len(header) >= 3 and _is_wire_uint(header[2]):
            echo_seq = header[2]

    def fail(code: int, message: str) -> ProtocolError:
        return ProtocolError(code, message, echo_type, echo_seq)

    if (
        isinstance(header, list)
        and header
        and type(header[0]) is int
        and header[0] != PROTOCOL_VERSION
    ):
        raise fail(
            _NOT_SUPPORTED,
            f"protocol version {header[0]} is not supported: this server speaks protocol "
            f"version {PROTOCOL_VERSION}",
        )
    if len(frames) != 2:
        raise fail(_INVALID, f"a request is 2 frames [header, payload], got {len(frames)} frame(s)")
    if len(frames[0]) > limits.max_header_bytes:
        raise fail(
            _INVALID, f"header frame is {len(frames[0])} bytes, more than {limits.max_header_bytes}"
        )
    if header_error:
        raise fail(_INVALID, f"header is not valid msgpack ({header_error})")
    if not (
        isinstance(header, list)
        and len(header) == 3
        and all(type(v) is int for v in header)
        and header[2] >= 0
    ):
        raise fail(
            _INVALID,
            "header must be a msgpack array [version:int, request_type:int, seq:uint64], got "
            + _describe_header(header),
        )
    try:
        request_type = RequestType(header[1])
    except ValueError:
        raise fail(
            _NOT_SUPPORTED,
            f"unknown request type {header[1]} (this server knows 1..{max(RequestType)})",
        ) from None
    if len(frames[1]) > limits.max_frame_bytes:
        raise fail(
            _EXHAUSTED,
            f"payload frame is {len(frames[1])} bytes, more than the limit of "
            f"{limits.max_frame_bytes}",
        )
    if request_type in _RESERVED_TYPES:
        try:
            parse_body(request_type, {}, limits)
        except ProtocolError as exc:
            raise fail(exc.code, exc.message) from None
    try:
        payload = _unpack_payload(frames[1], limits)
    except Exception as exc:
        raise fail(
            _INVALID,
            f"{request_type.name}: payload is not valid msgpack ({type(exc).__name__}: {exc})",
        ) from None
    if type(payload) is not dict:
        raise fail(
            _INVALID, f"{request_type.name}: payload must be a map, got {_wire_type(payload)}"
        )
    try:
        body = parse_body(request_type, payload, limits)
    except ProtocolError as exc:
        raise fail(exc.code, exc.message) from None
    return Request(request_type, header[2], body)


def _describe_header(header: object) -> str:
    if isinstance(header, list):
        return "[" + ", ".join(_wire_type(v) for v in header) + "]"
    return _wire_type(header)


def decode_reply(frames: Sequence[bytes], max_frame_bytes: int = 1 << 31) -> Reply:
    """Decodes a reply (as a DEALER receives it). Raises :class:`ProtocolError` (Internal) when the
    frames are not a reply of this protocol. Does not check the version: the caller decides."""
    if len(frames) != 2:
        raise ProtocolError(_INTERNAL, f"a reply is 2 frames, got {len(frames)}")
    try:
        header = _unpack_header(frames[0])
    except Exception as exc:
        raise ProtocolError(_INTERNAL, f"reply header is not valid msgpack: {exc}") from None
    if not (
        type(header) is list
        and len(header) == 4
        and type(header[0]) is int
        and type(header[1]) is int
        and type(header[2]) is int
        and type(header[3]) is int
    ):
        raise ProtocolError(_INTERNAL, f"malformed reply header {_describe_header(header)}")
    try:
        if len(frames[1]) <= max_frame_bytes:
            # Strings and bins are bounded by the frame anyway; ext types are refused.
            payload = msgpack.unpackb(frames[1], strict_map_key=False, max_ext_len=0)
        else:
            payload = msgpack.unpackb(
                frames[1],
                raw=False,
                strict_map_key=False,
                use_list=True,
                max_bin_len=max_frame_bytes,
                max_str_len=max_frame_bytes,
                max_ext_len=0,
            )
    except Exception as exc:
        raise ProtocolError(_INTERNAL, f"reply payload is not valid msgpack: {exc}") from None
    if type(payload) is not dict:
        raise ProtocolError(_INTERNAL, f"reply payload must be a map, got {_wire_type(payload)}")
    return Reply(header[0], header[1], header[2], header[3], payload)


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
