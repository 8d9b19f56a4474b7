"""Framing: encoding and decoding the frames of requests and replies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgpack  # type: ignore[import-untyped]

from lmcache_cpp.protocol.bodies import (
    RequestBody,
)
from lmcache_cpp.protocol.fields import (
    _EXHAUSTED,
    _INTERNAL,
    _INVALID,
    _MAX_ERROR_MESSAGE_CHARS,
    _NOT_SUPPORTED,
    _OK,
    _RESERVED_TYPES,
    _U64_MAX,
    PROTOCOL_VERSION,
    ProtocolError,
    ProtocolLimits,
    RequestType,
    _wire_type,
)
from lmcache_cpp.protocol.requests import (
    not_provided,
    parse_body,
)

__all__ = [
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error_reply",
    "encode_payload",
    "encode_reply",
    "encode_request",
    "encode_request_header",
]

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


def decode_request(
    frames: Sequence[bytes], limits: ProtocolLimits, *, server_driven: bool = False
) -> Request:
    """Decodes and validates the frames of one request (without the ROUTER identity frame).

    Raises :class:`ProtocolError` with the reply's status and echo values; the checks, in order:
    protocol version (NotSupported), frame count, header size and shape (InvalidArgument), request
    type (unknown, or server-driven without ``server_driven``: NotSupported), payload frame size
    (ResourceExhausted), payload
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
    if request_type in _RESERVED_TYPES and not server_driven:
        refusal = not_provided(request_type)
        raise fail(refusal.code, refusal.message)
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
        body = parse_body(request_type, payload, limits, server_driven=server_driven)
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
