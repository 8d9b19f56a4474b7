"""The C++ socket helpers on real ZeroMQ sockets: the server's receive loop (``_core.RouterLoop``:
what it answers, what it hands back to Python, its client table and its counters) and the
client's whole-message calls (``_core.SocketIo``); and the server and the client using them."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

import lmcache_cpp.client.transport as client_transport
from lmcache_cpp import _core
from lmcache_cpp._zmq_io import ZERO_COPY_BYTES, native_io, pyzmq_backend_file
from lmcache_cpp.client import Key
from lmcache_cpp.errors import PermissionDeniedError
from lmcache_cpp.metrics import Metrics
from lmcache_cpp.protocol import RequestType, decode_reply, encode_request
from server_helpers import CHUNK, MODEL, Harness, layout, tokens
from test_wire_fast_path import fast_path

BUCKETS = (0.001, 0.1, 10.0)
PING, GET_CHUNK_SIZE = int(RequestType.PING), int(RequestType.GET_CHUNK_SIZE)


class Rig:
    """A ROUTER with a RouterLoop over a real engine, and a DEALER talking to it."""

    def __init__(self, harness: Harness, tmp_path: Path) -> None:
        _, self.engine = harness.engine()
        self.fast = fast_path(self.engine, has_l2=False)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        endpoint = f"ipc://{tmp_path}/loop.sock"
        self.router.bind(endpoint)
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.IDENTITY, b"dealer-1")
        self.dealer.connect(endpoint)
        backend = pyzmq_backend_file()
        if backend is None:  # pragma: no cover - CPython wheels have the compiled backend
            pytest.skip("pyzmq has no compiled backend here")
        self.loop = _core.RouterLoop(
            self.fast, self.router.underlying, libzmq_from=backend, buckets=BUCKETS
        )

    def send(self, request_type: int, seq: int, payload: object = None) -> None:
        self.dealer.send_multipart(encode_request(request_type, seq, payload or {}))

    def wait_queued(self, n: int = 1) -> None:
        """Until the ROUTER has a message queued (ipc delivery is asynchronous)."""
        deadline = time.monotonic() + 10
        while not self.router.poll(10, zmq.POLLIN):
            assert time.monotonic() < deadline, "the message never arrived"
        time.sleep(0.05 if n > 1 else 0)  # let the rest of a burst arrive

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.router.close(linger=0)
        self.context.term()


@pytest.fixture
def rig(harness: Harness, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(harness, tmp_path)
    yield r
    r.close()


def test_an_unknown_identity_goes_to_python_untried(rig: Rig) -> None:
    rig.send(PING, 1)
    rig.wait_queued()
    answered, message, tried, failures, error = rig.loop.drain(10)[:5]
    assert (answered, tried, failures, error) == (0, False, [], 0)
    assert message is not None and message[0] == b"dealer-1" and len(message) == 3
    assert msgpack.unpackb(message[1]) == [1, PING, 1]
    assert rig.loop.last_seen(b"dealer-1") is None
    assert rig.loop.drain(10)[:2] == (0, None)  # nothing else queued


def test_an_admitted_client_is_answered_in_cpp_and_counted(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    before = time.monotonic()
    for seq in range(3):
        rig.send(PING, seq)
    rig.wait_queued(3)
    answered, message, _, failures, error = rig.loop.drain(10)[:5]
    assert (answered, message, failures, error) == (3, None, [], 0)
    for seq in range(3):
        reply = decode_reply(rig.dealer.recv_multipart())
        assert (reply.request_type, reply.seq, reply.status, reply.payload) == (PING, seq, 0, {})
    seen = rig.loop.last_seen(b"dealer-1")
    assert seen is not None and before <= seen <= time.monotonic()
    counts, histograms, dropped = rig.loop.stats()
    assert counts == {(PING, 0): 3} and dropped == 0
    bucket_counts, total = histograms[PING]
    assert len(bucket_counts) == len(BUCKETS) + 1 and sum(bucket_counts) == 3 and total >= 0


def test_a_request_the_fast_path_declines_goes_to_python_tried(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    rig.send(GET_CHUNK_SIZE, 7)
    rig.send(PING, 8)
    rig.wait_queued(2)
    answered, message, tried, _, _ = rig.loop.drain(10)[:5]
    assert answered == 0 and tried and message is not None
    assert msgpack.unpackb(message[1]) == [1, GET_CHUNK_SIZE, 7]
    # The next call goes on with the PING queued behind it.
    assert rig.loop.drain(10)[:2] == (1, None)
    assert decode_reply(rig.dealer.recv_multipart()).seq == 8
    assert rig.loop.stats()[0] == {(PING, 0): 1}


def test_a_message_of_another_shape_goes_to_python(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    rig.dealer.send_multipart([b"a", b"b", b"c"])
    rig.wait_queued()
    answered, message, tried, _, _ = rig.loop.drain(10)[:5]
    assert answered == 0 and not tried and message == [b"dealer-1", b"a", b"b", b"c"]


def test_drain_stops_at_its_budget_and_a_removed_client_is_unknown_again(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    for seq in range(5):
        rig.send(PING, seq)
    rig.wait_queued(5)
    assert rig.loop.drain(2)[:2] == (2, None)
    assert rig.loop.drain(10)[:2] == (3, None)
    rig.loop.remove_client(b"dealer-1")
    assert rig.loop.last_seen(b"dealer-1") is None
    rig.send(PING, 9)
    rig.wait_queued()
    answered, message, tried, _, _ = rig.loop.drain(10)[:5]
    assert answered == 0 and message is not None and not tried


def test_the_engine_sees_the_admitted_client_id(rig: Rig) -> None:
    rig.engine.register_kv_cache(5, MODEL, 1, 0, layout())
    rig.loop.add_client(b"dealer-1", 5)
    key = Key(MODEL, request_id="r", tokens=tokens(2 * CHUNK, 1))
    rig.send(int(RequestType.LOOKUP), 1, {"key": key.to_wire(), "tp_size": 1})
    rig.wait_queued()
    assert rig.loop.drain(10)[:2] == (1, None)
    handle = _core.JobHandle.from_hex(
        decode_reply(rig.dealer.recv_multipart()).payload["handle"].hex()
    )
    # The job belongs to client 5: another client may not read it.
    with pytest.raises(PermissionDeniedError):
        rig.engine.query_prefetch_status(6, handle)
    result = rig.engine.wait_prefetch_status(5, handle, 5.0)
    assert result is not None and result.hit_chunks == 0


def test_a_reply_to_a_vanished_peer_is_counted_as_dropped(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    monitor = rig.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        rig.send(PING, 1)
        rig.wait_queued()
        rig.dealer.close(linger=0)
        assert monitor.poll(10_000, zmq.POLLIN), "the ROUTER never saw the disconnect"
        answered, message, _, _, error = rig.loop.drain(10)[:5]
    finally:
        rig.router.disable_monitor()
        monitor.close(linger=0)
    rig.dealer = rig.context.socket(zmq.DEALER)  # for close()
    # The request queued before the disconnect is still read and answered; its reply has nowhere
    # to go (ROUTER_MANDATORY: EHOSTUNREACH) and is counted, not an error of the loop.
    assert (answered, message, error) == (1, None, 0)
    assert rig.loop.stats()[0] == {(PING, 0): 1} and rig.loop.stats()[2] == 1


def test_a_library_that_is_not_loaded_is_refused(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        _core.RouterLoop(
            rig.fast, rig.router.underlying, libzmq_from=str(tmp_path / "x.so"), buckets=BUCKETS
        )
    with pytest.raises(ValueError, match="increasing"):
        _core.RouterLoop(
            rig.fast,
            rig.router.underlying,
            libzmq_from=pyzmq_backend_file() or "",
            buckets=(1.0, 1.0),
        )
    with pytest.raises(ValueError, match="null"):
        _core.RouterLoop(rig.fast, 0, libzmq_from=pyzmq_backend_file() or "", buckets=BUCKETS)


# ---------------------------------------------------------------------------------------------
# The server with the loop


def test_the_server_answers_per_prompt_requests_in_the_loop_and_counts_them(
    harness: Harness,
) -> None:
    metrics = Metrics(buckets=BUCKETS)
    server = harness.server(metrics=metrics)
    assert server._loop is not None
    client = harness.client(server)
    client.register_kv_cache(MODEL, 1, 0, layout())
    key = Key(MODEL, request_id="s", tokens=tokens(2 * CHUNK, 3))
    for _ in range(3):
        assert client.sync_lookup(key).hit_chunks == 0
    assert client.end_session(MODEL, "s") == 0
    loop_counts = server._loop.stats()[0]
    assert loop_counts[(int(RequestType.SYNC_LOOKUP), 0)] == 3
    counts = server.request_counts()
    assert counts["SYNC_LOOKUP"] == {"ok": 3} and counts["END_SESSION"] == {"ok": 1}
    assert counts["HELLO"] == {"ok": 1} and counts["REGISTER_KV_CACHE"] == {"ok": 1}
    text = metrics.render()
    assert 'lmcache_cpp_requests_total{request="SYNC_LOOKUP",outcome="ok"} 3' in text
    assert 'lmcache_cpp_request_duration_seconds_count{request="SYNC_LOOKUP"} 3' in text
    assert 'lmcache_cpp_requests_total{request="HELLO",outcome="ok"} 1' in text
    assert client.status()["server"]["requests"]["SYNC_LOOKUP"] == {"ok": 3}


def test_debug_logging_keeps_the_native_path_and_logs_each_request(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Turning on DEBUG to look at a problem must not swap the path that serves requests."""
    # Set before the server starts: logging caches isEnabledFor per logger, and a level changed
    # while another thread asks may be missed until the next change.
    caplog.set_level(logging.DEBUG, logger="lmcache_cpp.server")
    server = harness.server()
    assert server._loop is not None
    client = harness.client(server)
    for _ in range(4):
        client.ping()
    assert server._loop.stats()[0][(PING, 0)] == 4  # answered by the loop, at DEBUG

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "PING -> ok" in r.getMessage()]

    # The loop logs what one drain answered after the drain, which may be after the replies.
    deadline = time.monotonic() + 10
    while len(lines()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(lines()) == 4 and all("native loop" in line for line in lines())


def test_a_traced_drain_records_each_answered_request(rig: Rig) -> None:
    rig.loop.add_client(b"dealer-1", 5)
    for seq in (7, 8):
        rig.send(PING, seq)
    rig.wait_queued(2)
    answered, _, _, _, _, traces = rig.loop.drain(10, True)
    assert answered == 2
    assert [t[:4] for t in traces] == [(5, PING, 7, 0), (5, PING, 8, 0)]
    assert all(t[4] >= 0 for t in traces)
    rig.send(PING, 9)
    rig.wait_queued()
    assert rig.loop.drain(10)[5] == []  # untraced: nothing recorded


def test_a_client_heard_only_by_the_loop_is_not_dropped_as_silent(harness: Harness) -> None:
    server = harness.server(heartbeat_grace_s=0.5, reap_interval_s=0.05)
    assert server._loop is not None
    client = harness.client(server, heartbeat_interval_s=None)
    hello = client.hello_info
    assert hello is not None
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        client.ping()  # answered by the loop; the Python side never sees it
        time.sleep(0.05)
    assert server.clients_connected == 1
    assert client.hello().client_id == hello.client_id  # still the same client


def test_foreign_metrics_keep_the_python_loop(harness: Harness) -> None:
    class Recorder:
        def record(self, request_name: str, outcome: str, seconds: float) -> None:
            pass

    server = harness.server(metrics=Recorder())
    assert server._loop is None
    assert harness.client(server).get_chunk_size() == CHUNK


# ---------------------------------------------------------------------------------------------
# SocketIo


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    for sock in (a, b):
        sock.setsockopt(zmq.LINGER, 0)
    a.bind(f"ipc://{tmp_path}/pair.sock")
    b.connect(f"ipc://{tmp_path}/pair.sock")
    b.send(b"hi")  # once a has read it, the connection is up both ways
    assert a.poll(10_000, zmq.POLLIN) and a.recv() == b"hi"
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


def test_socket_io_sends_and_receives_whole_messages(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    a, b = pair
    io = native_io(a)
    assert io is not None
    assert io.recv(10) == ([], 0)  # nothing queued: no error
    big = bytes(range(256)) * 1024
    assert io.send((b"h", b"", big)) == 0
    assert b.recv_multipart() == [b"h", b"", big]
    for i in range(5):
        b.send_multipart([b"m", str(i).encode()])
    deadline = time.monotonic() + 10
    got: list[list[bytes]] = []
    while len(got) < 5:
        assert time.monotonic() < deadline, got
        assert a.poll(1000, zmq.POLLIN)
        messages, error = io.recv(2)  # at most 2 per call
        assert error == 0 and len(messages) <= 2
        got.extend(messages)
    assert got == [[b"m", str(i).encode()] for i in range(5)]


def test_socket_io_reports_eagain_and_refuses_bad_frames(tmp_path: Path) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    lonely = context.socket(zmq.DEALER)  # no peer: a DEALER cannot queue anything
    try:
        lonely.setsockopt(zmq.LINGER, 0)
        io = native_io(lonely)
        assert io is not None
        assert io.send((b"x",)) == errno.EAGAIN
        with pytest.raises(TypeError):
            io.send(("not bytes",))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            io.send(())
        with pytest.raises(RuntimeError, match="not loaded"):
            _core.SocketIo(lonely.underlying, libzmq_from=str(tmp_path / "x.so"))
    finally:
        lonely.close(linger=0)
        context.term()


@pytest.mark.parametrize("native", [True, False], ids=["native-io", "pyzmq-io"])
def test_the_client_works_on_both_socket_paths(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    if not native:
        monkeypatch.setattr(client_transport, "native_io", lambda sock: None)
    server = harness.server(max_tokens_per_key=1 << 16)
    client = harness.client(server)
    assert (client._io is not None) == native
    client.register_kv_cache(MODEL, 1, 0, layout())
    # A burst of async requests (sent by the I/O thread), each completed once.
    keys = [Key(MODEL, request_id=f"b{i}", tokens=tokens(2 * CHUNK, i)) for i in range(40)]
    futures = [client.async_sync_lookup(k) for k in keys]
    done, _ = concurrent.futures.wait(futures, timeout=10)
    assert len(done) == 40 and all(f.result().hit_chunks == 0 for f in futures)
    # A key whose payload is past the zero-copy size goes out through pyzmq on either path.
    big = Key(MODEL, request_id="big", tokens=tokens(ZERO_COPY_BYTES // 4 + CHUNK, 9))
    assert client.sync_lookup(big).hit_chunks == 0
    assert client.end_session(MODEL, "big") == 0
    assert client.get_chunk_size() == CHUNK
