"""The wire protocol: codec round trips, one error reply per class of malformed request (decoder,
dispatcher and a live server), and property tests: random frames and mutations of valid frames,
fed to the server's decode+dispatch path and to a real server over a socket, always get exactly
one well-formed reply, and the server keeps serving."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lmcache_cpp as lc
from lmcache_cpp.client import Key, wire_layout
from lmcache_cpp.protocol import (
    HANDLE_SIZE,
    PROTOCOL_VERSION,
    REQUESTS,
    HelloInfo,
    LookupResult,
    ProtocolError,
    ProtocolLimits,
    Reply,
    RequestType,
    TransferTicket,
    WireKey,
    WireLayout,
    bodies,
    decode_reply,
    decode_request,
    encode_error_reply,
    encode_reply,
    encode_request,
    prefetch_status_from_wire,
    prefetch_status_to_wire,
    registration_from_wire,
)
from lmcache_cpp.protocol import fields as protocol_fields
from lmcache_cpp.server import Dispatcher, kv_cache_layout
from server_helpers import Harness, recv_reply

INVALID = int(lc.StatusCode.INVALID_ARGUMENT)
NOT_SUPPORTED = int(lc.StatusCode.NOT_SUPPORTED)
EXHAUSTED = int(lc.StatusCode.RESOURCE_EXHAUSTED)
STATUS_CODES = {int(c) for c in lc.StatusCode}

LIMITS = ProtocolLimits(max_frame_bytes=1 << 20, max_tokens=4096)
TOKENS = np.arange(64, dtype="<u4").tobytes()
KEY = WireKey(
    model_name="m",
    world_size=2,
    worker_id=1,
    request_id="req-1",
    cache_salt="tenant",
    tokens=TOKENS,
    start=16,
    end=48,
)
HASH_KEY = WireKey(model_name="m", block_hashes=bytes(range(64)), block_hash_size=32)
LAYOUT = WireLayout("hnd", 2, 4, 2, 8, 2, 128, 4096, 1 << 20)
HANDLE = bytes(range(16))

SAMPLES: list[tuple[RequestType, bodies.RequestBody]] = [
    (RequestType.HELLO, bodies.HelloRequest("vllm worker 0")),
    (RequestType.PING, bodies.EmptyRequest()),
    (RequestType.GET_CHUNK_SIZE, bodies.EmptyRequest()),
    (RequestType.REGISTER_KV_CACHE, bodies.RegisterRequest("m", 2, 1, LAYOUT)),
    (RequestType.UNREGISTER_KV_CACHE, bodies.UnregisterRequest((1 << 64) - 1)),
    (RequestType.LOOKUP, bodies.KeyRequest(KEY, 4)),
    (RequestType.QUERY_PREFETCH_STATUS, bodies.HandleRequest(HANDLE)),
    (RequestType.WAIT_PREFETCH_STATUS, bodies.PrefetchWaitRequest(HANDLE, 0.0)),
    (RequestType.SYNC_LOOKUP, bodies.SyncLookupRequest(HASH_KEY, 2, 0.05)),
    (RequestType.SYNC_LOOKUP, bodies.SyncLookupRequest(KEY)),
    (RequestType.FREE_LOOKUP_LOCKS, bodies.KeyRequest(KEY, 2)),
    (RequestType.END_SESSION, bodies.EndSessionRequest("m", "req-1")),
    (RequestType.PREPARE_STORE, bodies.PrepareStoreRequest(KEY)),
    (RequestType.COMMIT_STORE, bodies.CommitStoreRequest(HANDLE, False)),
    (RequestType.PREPARE_RETRIEVE, bodies.PrepareRetrieveRequest(HASH_KEY, 0.0)),
    (RequestType.COMMIT_RETRIEVE, bodies.HandleRequest(HANDLE)),
    (RequestType.CLEAR, bodies.ClearRequest(False)),
    (RequestType.STATUS, bodies.EmptyRequest()),
    (RequestType.GOODBYE, bodies.EmptyRequest()),
]
VALID_FRAMES = [encode_request(rt, 7, body.to_wire()) for rt, body in SAMPLES]


def pack(obj: object) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def request_frames(rt: int, payload: Any, seq: int = 5, version: int = PROTOCOL_VERSION) -> list:
    return [pack([version, rt, seq]), pack(payload)]


def lookup_payload(**key_changes: Any) -> dict[str, Any]:
    key = KEY.to_wire()
    for name, value in key_changes.items():
        if value is _DELETE:
            del key[name]
        else:
            key[name] = value
    return {"key": key, "tp_size": 1}


_DELETE = object()


# ---------------------------------------------------------------------------------------------
# Codec


def test_request_ids_are_the_documented_append_only_values() -> None:
    assert {m.name: int(m) for m in RequestType} == {
        "HELLO": 1,
        "PING": 2,
        "GET_CHUNK_SIZE": 3,
        "REGISTER_KV_CACHE": 4,
        "UNREGISTER_KV_CACHE": 5,
        "LOOKUP": 6,
        "QUERY_PREFETCH_STATUS": 7,
        "WAIT_PREFETCH_STATUS": 8,
        "SYNC_LOOKUP": 9,
        "FREE_LOOKUP_LOCKS": 10,
        "END_SESSION": 11,
        "PREPARE_STORE": 12,
        "COMMIT_STORE": 13,
        "PREPARE_RETRIEVE": 14,
        "COMMIT_RETRIEVE": 15,
        "STORE": 16,
        "RETRIEVE": 17,
        "CLEAR": 18,
        "STATUS": 19,
        "GOODBYE": 20,
    }
    assert PROTOCOL_VERSION == 1


def test_the_request_table_has_a_row_per_request_and_agrees_with_the_docs_and_cpp() -> None:
    assert set(REQUESTS) == set(RequestType)
    for rt, spec in REQUESTS.items():
        assert spec.request_type is rt
        assert spec.server_driven == (rt in (RequestType.STORE, RequestType.RETRIEVE))
    # The docs' request table: its "Thread" column is the table's.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    documented = {}
    for line in docs.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].isdigit() and cells[1].startswith("`"):
            documented[RequestType(int(cells[0]))] = (cells[1].strip("`"), cells[4])
    assert set(documented) == set(RequestType)
    for rt, (name, thread) in documented.items():
        assert name == rt.name
        expected = "—" if REQUESTS[rt].body is None else REQUESTS[rt].runs.value
        assert thread.replace("\\", "") == expected, rt.name
    # The C++ codec's constants (cpp/src/wire/fast_path.h) are the table's.
    constants = lc._core.WireFastPath.CONSTANTS
    assert constants["request_types"], "the C++ codec serves some requests"
    for name, type_id in constants["request_types"].items():
        assert RequestType[name] == type_id
    assert constants["protocol_version"] == PROTOCOL_VERSION
    assert constants["handle_size"] == HANDLE_SIZE
    assert constants["max_error_message_chars"] == protocol_fields._MAX_ERROR_MESSAGE_CHARS
    # Every row that is served has its handler (the Dispatcher resolves them when built).
    Dispatcher(_NoEngine(), LIMITS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rt", "body"), SAMPLES, ids=[f"{rt.name}-{i}" for i, (rt, _) in enumerate(SAMPLES)]
)
def test_every_request_round_trips(rt: RequestType, body: bodies.RequestBody) -> None:
    frames = encode_request(rt, (1 << 64) - 1, body.to_wire())
    assert len(frames) == 2
    assert msgpack.unpackb(frames[0]) == [PROTOCOL_VERSION, int(rt), (1 << 64) - 1]
    request = decode_request(frames, LIMITS)
    assert request.request_type is rt
    assert request.seq == (1 << 64) - 1
    assert request.body == body


def test_optional_fields_take_their_defaults_when_absent_or_nil() -> None:
    minimal = {"key": {"model_name": "m", "tokens": TOKENS, "cache_salt": None}}
    body = decode_request(request_frames(RequestType.LOOKUP, minimal), LIMITS).body
    assert body == bodies.KeyRequest(WireKey(model_name="m", tokens=TOKENS), 1)
    body = decode_request(request_frames(RequestType.COMMIT_STORE, {"handle": HANDLE}), LIMITS).body
    assert body == bodies.CommitStoreRequest(HANDLE, True)
    body = decode_request(request_frames(RequestType.SYNC_LOOKUP, minimal), LIMITS).body
    assert isinstance(body, bodies.SyncLookupRequest) and body.timeout_s is None
    body = decode_request(
        request_frames(RequestType.WAIT_PREFETCH_STATUS, {"handle": HANDLE, "timeout_s": 2}), LIMITS
    ).body
    assert body == bodies.PrefetchWaitRequest(HANDLE, 2.0)


def test_replies_round_trip() -> None:
    ticket = TransferTicket(HANDLE, 3, [0, -1, 1 << 40, 4096], 2048)
    reply = decode_reply(encode_reply(int(RequestType.PREPARE_STORE), 9, ticket.to_wire()))
    assert (reply.version, reply.request_type, reply.seq, reply.status) == (1, 12, 9, 0)
    assert reply.ok
    assert TransferTicket.from_wire(reply.payload) == ticket

    hits = LookupResult(4, 64, 3, 1)
    assert LookupResult.from_wire(decode_reply(encode_reply(9, 1, hits.to_wire())).payload) == hits
    assert prefetch_status_from_wire(prefetch_status_to_wire(None)) is None
    assert prefetch_status_from_wire(prefetch_status_to_wire(hits)) == hits

    info = HelloInfo(1, "0.1.0", 12345, 256, 30.0, 1 << 26, 1 << 20)
    assert HelloInfo.from_wire(info.to_wire()) == info
    registration = {
        "registration_id": 7,
        "chunk_size": 256,
        "object_bytes": 4096,
        "fingerprint": "nhd:L2",
        "arena_path": "/dev/shm/x",
        "arena_size": 1 << 20,
        "a_field_from_a_newer_server": [1, 2],
    }
    got = registration_from_wire(registration)
    assert got["registration_id"] == 7 and got["arena_size"] == 1 << 20
    assert "a_field_from_a_newer_server" not in got


def test_error_replies_carry_code_and_message_and_are_truncated() -> None:
    reply = decode_reply(encode_error_reply(6, 42, INVALID, "bad key"))
    assert (reply.request_type, reply.seq, reply.status, reply.message) == (
        6,
        42,
        INVALID,
        "bad key",
    )
    assert not reply.ok
    long = decode_reply(encode_error_reply(6, 42, INVALID, "x" * 100_000))
    assert len(long.message) == 4096 and long.message.endswith("...")
    # A status of 0 is never sent as an error; unrepresentable echo values become 0.
    odd = decode_reply(encode_error_reply(-3, 1 << 70, 0, "?"))
    assert (odd.request_type, odd.seq, odd.status) == (0, 0, int(lc.StatusCode.INTERNAL))


def test_malformed_reply_payloads_raise_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="offsets"):
        TransferTicket.from_wire(
            {"handle": HANDLE, "first_chunk": 0, "offsets": b"123", "object_bytes": 1}
        )
    with pytest.raises(ProtocolError, match="hit_chunks"):
        LookupResult.from_wire({"hit_chunks": "many"})
    with pytest.raises(ProtocolError):
        decode_reply([b"\x93\x01\x02\x03", pack({})])  # a request-shaped header
    with pytest.raises(ProtocolError):
        decode_reply([pack([1, 2, 3, 0])])


# ---------------------------------------------------------------------------------------------
# One error reply per class of malformed request


# A 1.5 MiB bin: above the 1 MiB decode limit, below the transport limit (twice as much).
OVERSIZED = b"\xc6" + (3 << 19).to_bytes(4, "big") + bytes(3 << 19)
# (name, frames, status, echoed request type, echoed seq, text in the message)
MALFORMED: list[tuple[str, list[bytes], int, int, int, str]] = [
    ("no frames", [], INVALID, 0, 0, "2 frames"),
    ("one frame", [pack([1, 2, 3])], INVALID, 2, 3, "got 1 frame"),
    ("three frames", [pack([1, 2, 3]), pack({}), pack({})], INVALID, 2, 3, "got 3 frame"),
    ("header not msgpack", [b"\xc1", pack({})], INVALID, 0, 0, "header is not valid msgpack"),
    ("header truncated", [b"\x93\x01", pack({})], INVALID, 0, 0, "header is not valid msgpack"),
    ("header not an array", [pack({"v": 1}), pack({})], INVALID, 0, 0, "header must be"),
    ("header too short", [pack([1, 2]), pack({})], INVALID, 2, 0, "header must be"),
    ("header too long", [pack([1, 2, 3, 4]), pack({})], INVALID, 2, 3, "header must be"),
    ("header str type", [pack([1, "PING", 3]), pack({})], INVALID, 0, 3, "header must be"),
    ("header negative seq", [pack([1, 2, -1]), pack({})], INVALID, 2, 0, "header must be"),
    ("header oversized", [pack([1, 2, 3, "x" * 80]), pack({})], INVALID, 0, 0, "header frame"),
    ("wrong version", request_frames(2, {}, seq=11, version=2), NOT_SUPPORTED, 2, 11, "version 2"),
    ("unknown request", request_frames(99, {}), NOT_SUPPORTED, 99, 5, "unknown request type 99"),
    ("request 0", request_frames(0, {}), NOT_SUPPORTED, 0, 5, "unknown request type 0"),
    ("STORE reserved", request_frames(16, {"anything": 1}), NOT_SUPPORTED, 16, 5, "CUDA IPC"),
    ("RETRIEVE reserved", request_frames(17, {}), NOT_SUPPORTED, 17, 5, "CUDA IPC"),
    ("payload not msgpack", [pack([1, 2, 5]), b"\xc1"], INVALID, 2, 5, "not valid msgpack"),
    ("payload trailing bytes", [pack([1, 2, 5]), pack({}) + b"\x01"], INVALID, 2, 5, "not valid"),
    ("payload empty frame", [pack([1, 2, 5]), b""], INVALID, 2, 5, "not valid msgpack"),
    ("payload not a map", request_frames(2, [1, 2]), INVALID, 2, 5, "payload must be a map"),
    ("payload int keys", request_frames(2, {1: 2}), INVALID, 2, 5, "not valid msgpack"),
    ("payload ext type", [pack([1, 2, 5]), b"\x81\xa1a\xd4\x05\x00"], INVALID, 2, 5, "not valid"),
    (
        "payload too deep",
        [pack([1, 2, 5]), b"\x81\xa1a" + b"\x91" * 5000 + b"\x00"],
        INVALID,
        2,
        5,
        "",
    ),
    ("payload too large", [pack([1, 6, 5]), OVERSIZED], EXHAUSTED, 6, 5, "more than the limit"),
    ("PING extra field", request_frames(2, {"x": 1}), INVALID, 2, 5, "unknown field(s) x"),
    ("missing key", request_frames(6, {"tp_size": 1}), INVALID, 6, 5, "field 'key' is required"),
    ("key not a map", request_frames(6, {"key": "m"}), INVALID, 6, 5, "'key' must be map, got str"),
    (
        "tokens wrong type",
        request_frames(6, lookup_payload(tokens=[1, 2, 3])),
        INVALID,
        6,
        5,
        "LOOKUP.key: field 'tokens' must be bin, got array",
    ),
    (
        "tokens not uint32",
        request_frames(6, lookup_payload(tokens=b"\x01\x02\x03")),
        INVALID,
        6,
        5,
        "multiple of 4",
    ),
    (
        "tokens and hashes",
        request_frames(6, lookup_payload(block_hashes=bytes(32))),
        INVALID,
        6,
        5,
        "exactly one of",
    ),
    (
        "neither tokens nor hashes",
        request_frames(6, lookup_payload(tokens=_DELETE)),
        INVALID,
        6,
        5,
        "exactly one of",
    ),
    (
        "too many tokens",
        request_frames(6, lookup_payload(tokens=bytes(4 * 4097))),
        EXHAUSTED,
        6,
        5,
        "4097 tokens exceed the limit of 4096",
    ),
    (
        "model name missing",
        request_frames(6, lookup_payload(model_name=_DELETE)),
        INVALID,
        6,
        5,
        "'model_name' is required (str)",
    ),
    (
        "model name empty",
        request_frames(6, lookup_payload(model_name="")),
        INVALID,
        6,
        5,
        "must not be empty",
    ),
    (
        "model name bin",
        request_frames(6, lookup_payload(model_name=b"m")),
        INVALID,
        6,
        5,
        "'model_name' must be str, got bin",
    ),
    (
        "world size bool",
        request_frames(6, lookup_payload(world_size=True)),
        INVALID,
        6,
        5,
        "'world_size' must be int, got bool",
    ),
    (
        "worker beyond world",
        request_frames(6, lookup_payload(worker_id=2)),
        INVALID,
        6,
        5,
        "worker_id 2",
    ),
    (
        "misspelt salt",
        request_frames(6, lookup_payload(cache_slat="t")),
        INVALID,
        6,
        5,
        "unknown field(s) cache_slat",
    ),
    (
        "end before start",
        request_frames(6, lookup_payload(start=32, end=16)),
        INVALID,
        6,
        5,
        "end 16 is below start 32",
    ),
    (
        "start negative",
        request_frames(6, lookup_payload(start=-1)),
        INVALID,
        6,
        5,
        "'start' must be in",
    ),
    (
        "handle short",
        request_frames(7, {"handle": b"abc"}),
        INVALID,
        7,
        5,
        "'handle' must be 16 bytes, got 3",
    ),
    (
        "handle str",
        request_frames(15, {"handle": HANDLE.hex()}),
        INVALID,
        15,
        5,
        "'handle' must be bin, got str",
    ),
    (
        "wait too long",
        request_frames(8, {"handle": HANDLE, "timeout_s": 1e9}),
        INVALID,
        8,
        5,
        "'timeout_s' must be a finite number",
    ),
    (
        "wait nan",
        request_frames(8, {"handle": HANDLE, "timeout_s": math.nan}),
        INVALID,
        8,
        5,
        "'timeout_s' must be a finite number",
    ),
    (
        "success not bool",
        request_frames(13, {"handle": HANDLE, "success": 1}),
        INVALID,
        13,
        5,
        "'success' must be bool, got int",
    ),
    (
        "layout unknown",
        request_frames(
            4,
            {
                **bodies.RegisterRequest("m", 1, 0, LAYOUT).to_wire(),
                "layout": {**LAYOUT.to_wire(), "layout": "xyz"},
            },
        ),
        INVALID,
        4,
        5,
        "must be one of nhd, hnd, flashinfer, mla",
    ),
    (
        "layout zero layers",
        request_frames(
            4,
            {
                **bodies.RegisterRequest("m", 1, 0, LAYOUT).to_wire(),
                "layout": {**LAYOUT.to_wire(), "num_layers": 0},
            },
        ),
        INVALID,
        4,
        5,
        "'num_layers' must be in [1,",
    ),
    (
        "register worker out of range",
        request_frames(4, bodies.RegisterRequest("m", 2, 0, LAYOUT).to_wire() | {"worker_id": 2}),
        INVALID,
        4,
        5,
        "'worker_id' must be in [0, 1]",
    ),
    (
        "request id too long",
        request_frames(11, {"model_name": "m", "request_id": "r" * 2000}),
        INVALID,
        11,
        5,
        "max_str_len",
    ),
    (
        "uint64 registration id overflow",
        request_frames(5, {"registration_id": -1}),
        INVALID,
        5,
        5,
        "'registration_id' must be in [0,",
    ),
]


@pytest.mark.parametrize(
    ("name", "frames", "status", "echo_type", "echo_seq", "text"),
    MALFORMED,
    ids=[m[0] for m in MALFORMED],
)
def test_each_malformed_request_class_gets_its_error(
    name: str, frames: list[bytes], status: int, echo_type: int, echo_seq: int, text: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(frames, LIMITS)
    err = info.value
    assert (err.code, err.request_type, err.seq) == (status, echo_type, echo_seq), err.message
    assert text in err.message


class _NoEngine:
    """An engine nobody may call: the malformed requests never reach it."""

    chunk_size = 16

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"engine.{name} called for a malformed request")


def test_the_dispatcher_answers_each_malformed_request_with_one_reply() -> None:
    dispatcher = Dispatcher(_NoEngine(), LIMITS)  # type: ignore[arg-type]
    for name, frames, status, echo_type, echo_seq, text in MALFORMED:
        reply_frames, _, got = dispatcher.handle(1, frames)
        reply = decode_reply(reply_frames)
        assert (reply.status, reply.request_type, reply.seq) == (status, echo_type, echo_seq), name
        assert got == status
        assert text in reply.message and set(reply.payload) == {"message"}, name


def test_a_live_server_answers_each_malformed_request_and_keeps_serving(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        server = harness.server(max_frame_bytes=LIMITS.max_frame_bytes, max_tokens_per_key=4096)
        sock = harness.dealer(server)
        for name, frames, status, echo_type, echo_seq, text in MALFORMED:
            if not frames:
                continue  # a DEALER cannot send a message of zero frames
            sock.send_multipart(frames)
            reply = recv_reply(sock)
            assert (reply.status, reply.request_type, reply.seq) == (status, echo_type, echo_seq), (
                name
            )
            assert text in reply.message, name
        sock.send_multipart(encode_request(RequestType.GET_CHUNK_SIZE, 77, {}))
        reply = recv_reply(sock)
        assert reply.ok and reply.seq == 77 and reply.payload == {"chunk_size": 16}
        counts = server.request_counts()
        assert counts["GET_CHUNK_SIZE"] == {"ok": 1}
        assert counts["LOOKUP"]["InvalidArgument"] >= 10
    finally:
        harness.close()


# ---------------------------------------------------------------------------------------------
# Properties: any input gets exactly one well-formed reply


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dispatcher]:
    harness = Harness(tmp_path_factory.mktemp("dispatch"))
    try:
        _, engine = harness.engine(sync_lookup_timeout_s=0.01, retrieve_wait_timeout_s=0.01)
        yield Dispatcher(engine, LIMITS)
    finally:
        harness.close()


def check_reply(frames: list[bytes]) -> Reply:
    return check_decoded(decode_reply(frames))


def check_decoded(reply: Reply) -> Reply:
    assert reply.version == PROTOCOL_VERSION
    assert reply.status in STATUS_CODES
    if reply.status != 0:
        assert set(reply.payload) == {"message"} and isinstance(reply.payload["message"], str)
        assert reply.status != int(lc.StatusCode.INTERNAL), reply.message
    return reply


@st.composite
def mutated_frames(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(f) for f in draw(st.sampled_from(VALID_FRAMES))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "append", "insert", "drop", "dup", "replace"]))
        i = draw(st.integers(0, max(0, len(frames) - 1)))
        if op == "drop" and frames:
            del frames[i]
        elif op == "dup" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "replace" and frames:
            frames[i] = bytearray(draw(st.binary(max_size=64)))
        elif frames:
            f = frames[i]
            pos = draw(st.integers(0, len(f)))
            if op == "flip" and f:
                pos = min(pos, len(f) - 1)
                f[pos] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del f[pos:]
            elif op == "append":
                f.extend(draw(st.binary(min_size=1, max_size=16)))
            else:
                f[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return [bytes(f) for f in frames]


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=40)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELD_NAMES = sorted(
    set(KEY.to_wire())
    | set(LAYOUT.to_wire())
    | {
        "key",
        "tp_size",
        "timeout_s",
        "handle",
        "success",
        "force",
        "layout",
        "client_name",
        "model_name",
        "request_id",
        "registration_id",
        "world_size",
        "worker_id",
        "block_hashes",
    }
)


@st.composite
def structured_requests(draw: st.DrawFn) -> list[bytes]:
    """Valid framing; payloads with field names the schemas know and random values."""
    rt, body = draw(st.sampled_from(SAMPLES))
    payload = body.to_wire()
    for _ in range(draw(st.integers(1, 3))):
        target = payload
        if "key" in payload and isinstance(payload["key"], dict) and draw(st.booleans()):
            target = payload["key"]
        name = draw(st.sampled_from(_FIELD_NAMES))
        if draw(st.integers(0, 4)) == 0:
            target.pop(name, None)
        else:
            target[name] = draw(_VALUES)
    return [pack([PROTOCOL_VERSION, int(rt), draw(st.integers(0, (1 << 64) - 1))]), pack(payload)]


ANY_FRAMES = st.lists(st.binary(max_size=80), max_size=4) | mutated_frames() | structured_requests()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=ANY_FRAMES)
def test_decode_and_dispatch_always_produce_one_reply(
    dispatcher: Dispatcher, frames: list[bytes]
) -> None:
    reply_frames, name, status = dispatcher.handle(1, frames)
    reply = check_reply(reply_frames)
    assert reply.status == status
    assert isinstance(name, str) and name
    event(f"{name}: {lc.status_code_name(status) if status else 'ok'}")


_BOUNDARY_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    -2,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    -(1 << 63),
    (1 << 64) - 1,
    0.0,
    -0.0,
    0.5,
    LIMITS.max_wait_s,
    LIMITS.max_wait_s + 1e-9,
    math.inf,
    math.nan,
    "",
    "m",
    "x" * (LIMITS.max_string_bytes // 4),
    "x" * (LIMITS.max_string_bytes // 4 + 1),
    "x" * LIMITS.max_string_bytes,
    "x" * (LIMITS.max_string_bytes + 1),
    "\u00e9" * (LIMITS.max_string_bytes // 2 + 1),
    "\U0001f600" * (LIMITS.max_string_bytes // 4),
    b"",
    bytes(3),
    bytes(4),
    bytes(16),
    bytes(17),
    bytes(32),
    bytes(96),
    bytes(4 * LIMITS.max_tokens),
    bytes(4 * LIMITS.max_tokens + 4),
    [],
    {},
]


@st.composite
def boundary_requests(draw: st.DrawFn) -> list[bytes]:
    """Requests with one to three fields (of the payload or its key) set to values at or just
    past a bound: the decoder must accept or refuse each, cleanly, on every side."""
    rt, body = draw(st.sampled_from(SAMPLES))
    payload = body.to_wire()
    for _ in range(draw(st.integers(1, 3))):
        target = payload
        if isinstance(payload.get("key"), dict) and draw(st.integers(0, 3)) > 0:
            target = payload["key"]
        name = draw(st.sampled_from(sorted(set(target) | set(_FIELD_NAMES))))
        if draw(st.integers(0, 5)) == 0:
            target.pop(name, None)
        else:
            target[name] = copy.deepcopy(
                draw(st.sampled_from(_BOUNDARY_VALUES))
            )  # [] and {} are shared
    seq = draw(st.sampled_from([0, 1, (1 << 64) - 1]))
    return [pack([PROTOCOL_VERSION, int(rt), seq]), pack(payload)]


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=ANY_FRAMES | boundary_requests())
def test_the_decoder_accepts_or_refuses_every_input_and_round_trips_what_it_accepts(
    frames: list[bytes],
) -> None:
    # One Python decoder (the request table's): any input is a Request or a ProtocolError, and
    # what it accepts encodes back to the same request.
    try:
        request = decode_request(frames, LIMITS)
    except ProtocolError:
        event("refused")
        return
    event("accepted")
    again = decode_request(
        encode_request(request.request_type, request.seq, request.body.to_wire()), LIMITS
    )
    assert again == request


@pytest.mark.parametrize(("rt", "body"), SAMPLES, ids=lambda v: getattr(v, "name", ""))
def test_every_sample_decodes_to_its_body(rt: RequestType, body: bodies.RequestBody) -> None:
    frames = encode_request(rt, 9, body.to_wire())
    request = decode_request(frames, LIMITS)
    assert (request.request_type, request.seq, request.body) == (rt, 9, body)


def test_valid_samples_reach_the_engine_and_get_engine_replies(tmp_path: Path) -> None:
    # On a fresh engine the samples name an unregistered model and unknown handles: the
    # engine's own errors come back (NotFound), proving the requests passed the codec.
    harness = Harness(tmp_path)
    try:
        _, engine = harness.engine(sync_lookup_timeout_s=0.01, retrieve_wait_timeout_s=0.01)
        fresh = Dispatcher(engine, LIMITS)
        outcomes = {}
        samples = [(rt, f) for (rt, _), f in zip(SAMPLES, VALID_FRAMES, strict=True)]
        for rt, frames in samples:
            if rt is RequestType.REGISTER_KV_CACHE:
                continue  # would register the model the other samples name
            reply = check_reply(fresh.handle(1, frames)[0])
            outcomes[rt] = reply.status
            assert reply.seq == 7 and reply.request_type == int(rt)
    finally:
        harness.close()
    assert outcomes[RequestType.PING] == 0
    assert outcomes[RequestType.STATUS] == 0
    assert outcomes[RequestType.CLEAR] == 0
    assert outcomes[RequestType.LOOKUP] == int(lc.StatusCode.NOT_FOUND)
    assert outcomes[RequestType.QUERY_PREFETCH_STATUS] == int(lc.StatusCode.NOT_FOUND)
    assert outcomes[RequestType.COMMIT_STORE] == int(lc.StatusCode.NOT_FOUND)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    harness = Harness(tmp_path_factory.mktemp("live"))
    try:
        _, engine = harness.engine(sync_lookup_timeout_s=0.01, retrieve_wait_timeout_s=0.01)
        server = harness.server(
            engine, max_frame_bytes=LIMITS.max_frame_bytes, max_tokens_per_key=4096
        )
        yield server, harness.dealer(server)
    finally:
        harness.close()


_barrier_seq = iter(range(1 << 40, 1 << 41))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=ANY_FRAMES.filter(lambda f: len(f) > 0))
def test_a_live_server_answers_any_frames_exactly_once(
    live: tuple[Any, Any], frames: list[bytes]
) -> None:
    server, sock = live
    sock.send_multipart(frames)
    barrier = next(_barrier_seq)
    sock.send_multipart(encode_request(RequestType.PING, barrier, {}))
    # Replies to requests handled on the socket thread come in order; a request that went to
    # the pool may be answered after the barrier. Either way: exactly one reply per message.
    others: list[Reply] = []
    got_barrier = False
    while not got_barrier or not others:
        reply = recv_reply(sock)
        if reply.seq == barrier and reply.request_type == int(RequestType.PING) and reply.ok:
            assert not got_barrier
            got_barrier = True
        else:
            others.append(check_decoded(reply))
    assert len(others) == 1, others
    assert server.running


def test_the_live_server_sent_no_stray_replies(live: tuple[Any, Any]) -> None:
    # Runs after the property test on the same connection: every pool reply has been received,
    # so the next reply must be this PING's.
    server, sock = live
    sock.send_multipart(encode_request(RequestType.PING, 5, {}))
    reply = recv_reply(sock)
    assert (reply.request_type, reply.seq, reply.status) == (int(RequestType.PING), 5, 0)
    assert server.clients_connected == 1


# ---------------------------------------------------------------------------------------------
# Client-side encoding helpers


def test_client_keys_pack_tokens_as_little_endian_uint32() -> None:
    ids = [0, 1, 2**32 - 1, 31999]
    expected = np.array(ids, dtype="<u4").tobytes()
    for tokens in (ids, np.array(ids, dtype=np.int64), np.array(ids, dtype=np.uint32), expected):
        key = Key("m", tokens=tokens, request_id="r")
        assert key.tokens == expected
        assert key.to_wire()["tokens"] == expected
    assert Key("m", tokens=[]).tokens == b""
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        Key("m", tokens=[-1])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        Key("m", tokens=[2**32])
    with pytest.raises(ValueError, match="integers"):
        Key("m", tokens=np.array([1.5]))
    with pytest.raises(ValueError, match="exactly one"):
        Key("m", tokens=[1], block_hashes=bytes(32))
    with pytest.raises(ValueError, match="exactly one"):
        Key("m")
    key = Key("m", world_size=2, worker_id=1, tokens=[1, 2], cache_salt="s", start=0, end=2)
    wire = decode_request(encode_request(RequestType.LOOKUP, 1, {"key": key.to_wire()}), LIMITS)
    assert isinstance(wire.body, bodies.KeyRequest) and wire.body.key == key.to_wire_key()
    assert key.with_range(16, 32).to_wire_key().start == 16


def test_client_layouts_mirror_the_core_layout() -> None:
    for kind, name in zip(lc.KvLayout, ("nhd", "hnd", "flashinfer", "mla"), strict=True):
        heads = 1 if kind is lc.KvLayout.MLA else 4
        core = lc.KvCacheLayout(kind, 3, 16, heads, 64, 2, 100, 0, 0)
        wire = wire_layout(core)
        assert wire.layout == name
        assert (wire.num_layers, wire.block_size, wire.num_heads, wire.num_blocks) == (
            3,
            16,
            heads,
            100,
        )
        body = decode_request(
            encode_request(4, 1, bodies.RegisterRequest("m", 1, 0, wire).to_wire()), LIMITS
        ).body
        assert isinstance(body, bodies.RegisterRequest) and body.layout == wire
        assert kv_cache_layout(wire).fingerprint() == core.fingerprint()
