"""atheris target: the server's Python request decoder (lmcache_cpp.protocol).

``decode_request`` (and through it ``parse_body`` and the request table's body parsers) gets
fuzzer-made frames; the C++ decoder of the same frames (``_core.WireFastPath``, on an engine with
no namespace registered, so it keeps no state) is the reference it is checked against.

Input: ``options:u8`` then frames, each ``length:u16le data[length]`` (a length past the end takes
what is left); a request is two frames, [header, payload]. ``options`` bit 0: tight limits
(``ProtocolLimits`` at its minimums) instead of the server's defaults. fuzz/make_corpus.py writes
one seed per request type with the real encoder.

Checks (any failure raises, and atheris saves the input):
  * decode_request raises nothing but ProtocolError, whose code is a StatusCode other than OK and
    whose echo values are wire uint64s; the error reply the server would send for it encodes and
    decodes back to that code;
  * a decoded request re-encoded from ``body.to_wire()`` decodes again, and its ``to_wire()`` is
    then unchanged (encoding is the inverse of decoding up to fields the wire form leaves out);
  * every request the C++ WireFastPath answers (for the default limits, which it shares), Python
    decodes too, as the same request type: the C++ path accepts a subset of what Python does.

Run: ``python fuzz/protocol_fuzzer.py [libFuzzer flags] [corpus dirs]`` (docs/fuzzing.md).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence

import atheris

with atheris.instrument_imports(include=["lmcache_cpp.protocol"]):
    from lmcache_cpp import protocol

import lmcache_cpp as lc
from lmcache_cpp import _core
from lmcache_cpp.server.cache_server import wire_fast_path

DEFAULT_LIMITS = protocol.ProtocolLimits()
TIGHT_LIMITS = protocol.ProtocolLimits(
    max_frame_bytes=16,
    max_header_bytes=16,
    max_tokens=16,
    max_string_bytes=16,
    max_map_entries=16,
    max_wait_s=1.0,
)
CLIENT = 1
U64_MAX = (1 << 64) - 1
STATUS_CODES = frozenset(int(c) for c in _core.StatusCode)


def _reference() -> _core.WireFastPath:
    """The C++ decoder over an engine of its own (nothing registered: every request it decodes
    ends in NotFound or a miss, and leaves no state behind)."""
    storage = lc.StorageManager(lc.StorageManagerConfig(1 << 20))
    storage.start()
    engine = _core.CacheEngine(storage, _core.EngineConfig(chunk_size=16))
    fast = wire_fast_path(engine, DEFAULT_LIMITS, has_l2=False)
    _KEEP.extend([storage, engine])
    return fast


_KEEP: list[object] = []  # the reference's storage and engine live as long as the process
REFERENCE = _reference()


def frames_of(data: bytes) -> tuple[int, list[bytes]]:
    if not data:
        return 0, []
    options, pos, frames = data[0], 1, []
    while pos < len(data):
        (length,) = struct.unpack_from("<H", data.ljust(pos + 2, b"\0"), pos)
        pos += 2
        frames.append(data[pos : pos + length])
        pos += length
    return options, frames


def check_error(exc: protocol.ProtocolError) -> None:
    assert exc.code != 0 and exc.code in STATUS_CODES, exc
    assert type(exc.request_type) is int and 0 <= exc.request_type <= U64_MAX, exc
    assert type(exc.seq) is int and 0 <= exc.seq <= U64_MAX, exc
    reply = protocol.decode_reply(
        protocol.encode_error_reply(exc.request_type, exc.seq, exc.code, exc.message)
    )
    assert reply.status == exc.code and reply.request_type == exc.request_type, (reply, exc)
    assert reply.seq == exc.seq and isinstance(reply.payload.get("message"), str), (reply, exc)


def decode(frames: Sequence[bytes], limits: protocol.ProtocolLimits) -> protocol.Request | None:
    try:
        return protocol.decode_request(frames, limits)
    except protocol.ProtocolError as exc:
        check_error(exc)
        return None


def test_one_input(data: bytes) -> None:
    options, frames = frames_of(data)
    limits = TIGHT_LIMITS if options & 1 else DEFAULT_LIMITS
    request = decode(frames, limits)
    if request is not None:
        wire = request.body.to_wire()
        again = decode(protocol.encode_request(request.request_type, request.seq, wire), limits)
        assert again is not None, request
        assert again.request_type == request.request_type and again.seq == request.seq
        assert again.body.to_wire() == wire, (request, again)
    if limits is DEFAULT_LIMITS and len(frames) == 2:
        reply = REFERENCE.handle(CLIENT, frames[0], frames[1])
        if reply is not None:
            assert request is not None, f"C++ fast path answered what Python refuses: {reply}"
            assert int(request.request_type) == reply[2], (request, reply)


def main() -> None:
    print(f"fuzzing {protocol.__file__}", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
