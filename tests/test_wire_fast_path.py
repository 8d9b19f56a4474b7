"""The C++ codec of the server's per-prompt requests (``_core.WireFastPath``) against the Python
dispatcher: for every request it accepts it must answer exactly what the Python path answers.

Each comparison runs the same frames through the fast path on one engine and through
``Dispatcher.handle`` on a twin engine (same configuration, same registrations, same stores), so
both see the same state; only job handles, which are random, may differ."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lmcache_cpp as lc
from lmcache_cpp import _core
from lmcache_cpp.client import Key
from lmcache_cpp.protocol import (
    HandleRequest,
    KeyRequest,
    RequestType,
    SyncLookupRequest,
    decode_reply,
    encode_request,
)
from lmcache_cpp.server import Dispatcher, engine_key
from lmcache_cpp.server.cache_server import wire_fast_path
from server_helpers import CHUNK, MODEL, Harness, layout, tokens
from test_protocol import ANY_FRAMES, LIMITS, boundary_requests

CLIENT = 77


def fast_path(engine: _core.CacheEngine, *, has_l2: bool) -> _core.WireFastPath:
    """A WireFastPath over ``engine`` with the test protocol limits."""
    return wire_fast_path(engine, LIMITS, has_l2=has_l2)


class Twins:
    """Two engines in the same state: ``fast`` behind a WireFastPath, ``slow`` behind the Python
    Dispatcher."""

    def __init__(self, harness: Harness, with_l2: bool) -> None:
        adapters = [lc.MemoryL2Adapter()] if with_l2 else []
        self.engines = []
        for _ in range(2):
            _, engine = harness.engine(
                adapters=list(adapters), sync_lookup_timeout_s=0.05, retrieve_wait_timeout_s=0.05
            )
            engine.register_kv_cache(CLIENT, MODEL, 1, 0, layout())
            self.engines.append(engine)
        self.fast = fast_path(self.engines[0], has_l2=with_l2)
        self.slow = Dispatcher(self.engines[1], LIMITS, has_l2=with_l2)

    def store(self, key: Key) -> None:
        for engine in self.engines:
            ticket = engine.prepare_store(CLIENT, engine_key(key.to_wire_key()))
            assert engine.commit_store(CLIENT, ticket.handle) == len(ticket.offsets)

    def both(self, frames: list[bytes]) -> tuple[Any, list[bytes]] | None:
        """(fast reply, slow reply frames), or None when the fast path declines."""
        if len(frames) != 2:
            return None
        fast = self.fast.handle(CLIENT, frames[0], frames[1])
        if fast is None:
            return None
        slow, _, status = self.slow.handle(CLIENT, frames)
        assert fast[3] == status
        return fast, slow


def same_reply(fast: tuple[bytes, bytes, int, int], slow: list[bytes]) -> None:
    assert fast[0] == slow[0], "headers differ"
    if fast[1] == slow[1]:
        return
    # Only a LOOKUP's job handle (random) may differ, and only in its bytes.
    a, b = msgpack.unpackb(fast[1]), msgpack.unpackb(slow[1])
    assert set(a) == set(b) == {"handle"}, (a, b)
    assert len(a["handle"]) == len(b["handle"]) == 16


@pytest.fixture(params=[False, True], ids=["no-l2", "with-l2"])
def twins(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Twins]:
    harness = Harness(tmp_path_factory.mktemp("twins"))
    try:
        t = Twins(harness, request.param)
        t.store(Key(MODEL, request_id="", tokens=tokens(4 * CHUNK, 1)))
        yield t
    finally:
        harness.close()


_TOKENS = tokens(6 * CHUNK, 1).tobytes()  # the stored prompt's first 4 chunks, and 2 more


@st.composite
def valid_requests(draw: st.DrawFn) -> list[bytes]:
    """Well-formed per-prompt requests with random values: prefixes of the stored prompt, other
    models, tp sizes, ranges, optional fields given, nil or absent."""
    rt = draw(
        st.sampled_from(
            [
                RequestType.SYNC_LOOKUP,
                RequestType.LOOKUP,
                RequestType.QUERY_PREFETCH_STATUS,
                RequestType.END_SESSION,
                RequestType.PING,
            ]
        )
    )
    request_id = draw(st.sampled_from(["", "r1", "r2", "\u00e9-\u00fc", "x" * 40]))
    model = draw(st.sampled_from([MODEL, MODEL, "other"]))

    def maybe(name: str, value: st.SearchStrategy[Any], into: dict[str, Any]) -> None:
        choice = draw(st.integers(0, 2))
        if choice == 1:
            into[name] = draw(value)
        elif choice == 2:
            into[name] = None

    payload: dict[str, Any] = {}
    if rt is RequestType.QUERY_PREFETCH_STATUS:
        payload = {"handle": draw(st.binary(min_size=16, max_size=16))}
    elif rt is RequestType.END_SESSION:
        payload = {"model_name": model, "request_id": request_id}
    elif rt is not RequestType.PING:
        key: dict[str, Any] = {"model_name": model}
        if draw(st.booleans()):
            key["tokens"] = _TOKENS[: 4 * draw(st.integers(0, 6 * CHUNK))]
        else:
            size = draw(st.sampled_from([16, 32]))
            key["block_hashes"] = bytes(size * draw(st.integers(0, 12)))
            maybe("block_hash_size", st.just(size), key)
        key["request_id"] = request_id
        maybe("world_size", st.integers(1, 2), key)
        maybe("worker_id", st.integers(-1, 0), key)
        maybe("cache_salt", st.sampled_from(["", "tenant"]), key)
        maybe("start", st.integers(0, 3 * CHUNK), key)
        maybe("end", st.integers(-1, 7 * CHUNK), key)
        payload = {"key": key}
        maybe("tp_size", st.integers(1, 4), payload)
        if rt is RequestType.SYNC_LOOKUP:
            maybe("timeout_s", st.floats(0, 0.05) | st.integers(0, 0), payload)
    return encode_request(rt, draw(st.integers(0, (1 << 64) - 1)), payload)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frames=ANY_FRAMES | boundary_requests() | valid_requests())
def test_the_fast_path_answers_exactly_what_the_python_path_answers(
    twins: Twins, frames: list[bytes]
) -> None:
    both = twins.both(frames)
    if both is None:
        event("declined")
        return
    same_reply(*both)
    event(f"answered {RequestType(both[0][2]).name}")


def lookup_frames(rt: RequestType, key: Key, seq: int, tp_size: int = 1) -> list[bytes]:
    body = (
        SyncLookupRequest(key.to_wire_key(), tp_size)
        if rt is RequestType.SYNC_LOOKUP
        else (KeyRequest(key.to_wire_key(), tp_size))
    )
    return encode_request(rt, seq, body.to_wire())


def payload_of(fast: tuple[bytes, bytes, int, int]) -> dict[str, Any]:
    return dict(decode_reply([fast[0], fast[1]]).payload)


def test_hits_misses_and_sessions_match(twins: Twins) -> None:
    toks = tokens(6 * CHUNK, 1)  # chunks 0-3 stored, 4-5 not
    hit = Key(MODEL, request_id="a", tokens=toks[: 4 * CHUNK])
    miss = Key(MODEL, request_id="c", tokens=tokens(4 * CHUNK, 9))
    with_l2 = twins.slow.is_blocking(RequestType.SYNC_LOOKUP)
    for seq, key, expected in ((1, hit, 4), (2, miss, 0)):
        frames = lookup_frames(RequestType.SYNC_LOOKUP, key, seq, tp_size=2)
        if with_l2 and expected == 0:  # not in L1: left to the pool, which asks L2
            assert twins.fast.handle(CLIENT, *frames) is None
            twins.slow.handle(CLIENT, frames)
            twins.engines[0].sync_lookup(CLIENT, engine_key(key.to_wire_key()), 2)
            continue
        both = twins.both(frames)
        assert both is not None
        same_reply(*both)
        assert payload_of(both[0])["hit_chunks"] == expected
    # A key reaching past L1: with an L2 the fast path leaves it to the pool; without one it
    # answers it (4 hits).
    partial = lookup_frames(RequestType.SYNC_LOOKUP, Key(MODEL, request_id="b", tokens=toks), 3)
    if with_l2:
        assert twins.fast.handle(CLIENT, *partial) is None
        twins.slow.handle(CLIENT, partial)  # the pool's answer, to keep the twins alike
        twins.engines[0].sync_lookup(
            CLIENT, engine_key(Key(MODEL, request_id="b", tokens=toks).to_wire_key())
        )
    else:
        both = twins.both(partial)
        assert both is not None
        same_reply(*both)
        assert payload_of(both[0])["hit_chunks"] == 4
    for seq, rid in enumerate(("a", "b", "c")):
        frames = encode_request(
            RequestType.END_SESSION, 20 + seq, {"model_name": MODEL, "request_id": rid}
        )
        both = twins.both(frames)
        assert both is not None
        same_reply(*both)
    for engine in twins.engines:
        assert engine.stats()["l1"]["read_leases"] == 0


def test_a_ready_query_and_error_replies_match(twins: Twins) -> None:
    key = Key(MODEL, request_id="q", tokens=tokens(4 * CHUNK, 1))
    fast_lookup = twins.fast.handle(CLIENT, *lookup_frames(RequestType.LOOKUP, key, 1))
    slow_lookup, _, _ = twins.slow.handle(CLIENT, lookup_frames(RequestType.LOOKUP, key, 1))
    assert fast_lookup is not None
    handles = [msgpack.unpackb(p)["handle"] for p in (fast_lookup[1], slow_lookup[1])]
    replies = []
    for side, handle in zip(("fast", "slow"), handles, strict=True):
        frames = encode_request(
            RequestType.QUERY_PREFETCH_STATUS, 2, HandleRequest(handle).to_wire()
        )
        for _ in range(200):  # the L1-only lookup is done almost at once
            if side == "fast":
                r = twins.fast.handle(CLIENT, *frames)
                assert r is not None
                reply = [r[0], r[1]]
            else:
                reply, _, _ = twins.slow.handle(CLIENT, frames)
            if decode_reply(reply).payload.get("ready", True):
                break
        replies.append(reply)
    assert replies[0] == replies[1]
    assert decode_reply(replies[0]).payload == {
        "ready": True,
        "hit_chunks": 4,
        "hit_tokens": 4 * CHUNK,
        "l1_chunks": 4,
        "l2_chunks": 0,
    }
    # Engine errors: an unknown model or world size (NotFound), a missing
    # request id: the same codes and messages.
    for frames in (
        lookup_frames(
            RequestType.SYNC_LOOKUP, Key("other-model", request_id="r", tokens=b"\0" * 64), 3
        ),
        lookup_frames(
            RequestType.LOOKUP, Key(MODEL, world_size=2, request_id="r", tokens=b"\0" * 64), 4
        ),
        lookup_frames(RequestType.LOOKUP, Key(MODEL, tokens=b"\0" * 64), 5),
    ):
        fast = twins.fast.handle(CLIENT, *frames)
        if fast is None:  # with L2, a failing SYNC_LOOKUP is left to the pool
            assert twins.slow.is_blocking(RequestType.SYNC_LOOKUP)
            continue
        slow, _, status = twins.slow.handle(CLIENT, frames)
        assert status != 0 and fast[3] == status
        assert [fast[0], fast[1]] == slow


def test_the_server_uses_the_fast_path_and_counts_its_requests(harness: Harness) -> None:
    server = harness.server()
    assert server._fast is not None
    client = harness.client(server)
    client.register_kv_cache(MODEL, 1, 0, layout())
    key = Key(MODEL, request_id="s", tokens=tokens(2 * CHUNK, 3))
    assert client.sync_lookup(key).hit_chunks == 0
    handle = client.lookup(key)
    assert client.wait_prefetch_status(handle, 5.0) is not None
    assert client.end_session(MODEL, "s") == 0
    client.ping()
    counts = server.request_counts()
    for name in ("SYNC_LOOKUP", "LOOKUP", "END_SESSION", "PING"):
        assert counts[name] == {"ok": 1}, name
