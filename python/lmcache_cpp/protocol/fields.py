"""Protocol constants, limits, the error type and the strict payload field reader."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from lmcache_cpp._core import StatusCode

__all__ = [
    "HANDLE_SIZE",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "ProtocolLimits",
    "RequestType",
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
    STORE = 16  # server-driven mode: NotSupported by a server without a device layer
    RETRIEVE = 17  # server-driven mode: NotSupported by a server without a device layer
    CLEAR = 18
    STATUS = 19
    GOODBYE = 20


# The server-driven requests: NotSupported, before their payload is read, by a server without a
# device layer (protocol.requests marks the same rows server_driven).
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

    def has(self, name: str) -> bool:
        """Whether an optional field is present (not absent, not nil); marks it used."""
        if self._data.get(name) is None:
            self._used.add(name)
            return False
        return True

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
