"""A real CacheServer (real storage manager and cache engine) on ipc:// under tmp_path, with real
clients: handshake, housekeeping requests, error replies, heartbeats and client expiry, the pool
not blocking the socket thread, stop/close semantics, endpoint security rules and metrics."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, KvTransferClient
from lmcache_cpp.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from lmcache_cpp.protocol import PROTOCOL_VERSION, RequestType, encode_request
from lmcache_cpp.server import CacheServer, ServerOptions
from server_helpers import CHUNK, MODEL, Harness, key, kv_cache, layout, recv_reply, tokens


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, float]] = []

    def record(self, request_name: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.calls.append((request_name, outcome, seconds))


class _LogEvent(logging.Handler):
    """Sets an event when the server logs a message containing ``text`` with ``arg`` as its
    first argument."""

    def __init__(self, text: str, arg: object) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.arg = text, arg
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in str(record.msg) and record.args and record.args[0] == self.arg:
            self.event.set()


# ---------------------------------------------------------------------------------------------
# Handshake and housekeeping


def test_hello_reports_version_client_id_chunk_size_and_limits(harness: Harness) -> None:
    server = harness.server(heartbeat_grace_s=12.5, max_tokens_per_key=1 << 12)
    a = harness.client(server, name="worker 0")
    b = harness.client(server)
    info = a.hello_info
    assert info is not None and b.hello_info is not None
    assert info.protocol_version == PROTOCOL_VERSION
    assert info.server_version == lc.__version__
    assert info.chunk_size == CHUNK
    assert info.heartbeat_grace_s == 12.5
    assert info.max_tokens == 1 << 12
    assert info.max_frame_bytes == server.options.limits.max_frame_bytes
    assert info.client_id != 0 and b.hello_info.client_id not in (0, info.client_id)
    # A second HELLO on the same connection keeps the client id.
    assert a.hello().client_id == info.client_id
    assert server.clients_connected == 2


def test_a_request_with_another_protocol_version_is_not_supported(harness: Harness) -> None:
    server = harness.server()
    sock = harness.dealer(server)
    header = encode_request(RequestType.HELLO, 3, {})[0].replace(b"\x01", b"\x02", 1)
    sock.send_multipart([header, encode_request(RequestType.HELLO, 3, {})[1]])
    reply = recv_reply(sock)
    assert reply.status == int(lc.StatusCode.NOT_SUPPORTED)
    assert (reply.request_type, reply.seq) == (int(RequestType.HELLO), 3)
    assert "protocol version 2" in reply.message and "version 1" in reply.message
    assert reply.version == PROTOCOL_VERSION  # the server's version, for the client to read


def test_ping_and_get_chunk_size(harness: Harness) -> None:
    storage, engine = harness.engine(chunk_size=32)
    server = harness.server(engine, storage)
    client = harness.client(server)
    client.ping()
    assert client.get_chunk_size() == 32
    assert client.async_get_chunk_size().result(timeout=10) == 32


def test_unknown_and_reserved_requests_are_not_supported(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server)
    with pytest.raises(NotSupportedError, match="unknown request type 4242"):
        client.request(4242, {})
    for rt in (RequestType.STORE, RequestType.RETRIEVE):
        with pytest.raises(NotSupportedError, match="CUDA IPC"):
            client.request(rt, {"event": b"x"})
    client.ping()  # still serving


def test_oversized_payloads_and_token_lists_are_refused(harness: Harness) -> None:
    server = harness.server(max_frame_bytes=64 << 10, max_tokens_per_key=1024)
    client = harness.client(server)
    client.register_kv_cache(MODEL, 1, 0, layout())
    with pytest.raises(ResourceExhaustedError, match="more than the limit of 65536"):
        client.lookup(key(tokens(25_000, 1)))  # a 100 KB frame
    with pytest.raises(ResourceExhaustedError, match="2000 tokens exceed the limit of 1024"):
        client.lookup(key(tokens(2000, 1)))
    client.lookup(key(tokens(1024, 1)))  # at the limit: accepted
    # A frame beyond the transport limit (2 x 64 KiB) makes ZeroMQ drop that connection; other
    # clients are unaffected.
    sock = harness.dealer(server)
    sock.send_multipart([encode_request(RequestType.PING, 1, {})[0], bytes(300 << 10)])
    other = harness.client(server)
    other.ping()
    client.ping()


def test_bad_fields_get_invalid_argument_naming_the_field(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server)
    with pytest.raises(InvalidArgumentError, match="field 'tp_size' must be int, got str"):
        client.request(RequestType.LOOKUP, {"key": key(tokens(16, 1)).to_wire(), "tp_size": "4"})
    with pytest.raises(InvalidArgumentError, match="unknown field"):
        client.request(RequestType.CLEAR, {"forced": True})


def test_register_unregister_and_double_unregister(harness: Harness) -> None:
    storage, engine = harness.engine()
    server = harness.server(engine, storage)
    client = harness.client(server)
    reg = client.register_kv_cache(MODEL, 1, 0, layout())
    assert reg["chunk_size"] == CHUNK
    assert reg["object_bytes"] == layout().object_bytes(CHUNK)
    assert reg["arena_size"] == storage.arena().size
    assert reg["fingerprint"]
    assert engine.stats()["engine"]["registrations"] == 1
    client.unregister_kv_cache(reg["registration_id"])
    assert engine.stats()["engine"]["registrations"] == 0
    with pytest.raises(NotFoundError):
        client.unregister_kv_cache(reg["registration_id"])
    client.ping()


def test_handles_work_only_for_the_client_that_created_them(harness: Harness) -> None:
    server = harness.server()
    a = harness.client(server)
    b = harness.client(server)
    a.register_kv_cache(MODEL, 1, 0, layout())
    handle = a.lookup(key(tokens(64, 2)))
    assert len(handle) == 16
    with pytest.raises(PermissionDeniedError):
        b.query_prefetch_status(handle)
    result = a.wait_prefetch_status(handle, 10.0)
    assert result is not None and result.hit_chunks == 0
    with pytest.raises(NotFoundError):  # delivered exactly once
        a.query_prefetch_status(handle)


def test_status_reports_engine_and_server(harness: Harness) -> None:
    server = harness.server(name="unit")
    client = harness.client(server)
    client.ping()
    status = client.status()
    assert {"engine", "l1", "prefetch", "store", "l2", "server"} <= set(status)
    s = status["server"]
    assert s["name"] == "unit" and s["endpoint"] == server.bound_endpoint
    assert s["protocol_version"] == PROTOCOL_VERSION and s["clients"] == 1
    assert s["uptime_s"] >= 0 and s["requests"]["PING"] == {"ok": 1}
    assert status["l1"]["capacity_bytes"] > 0


def test_metrics_record_every_request(harness: Harness) -> None:
    recorder = Recorder()
    server = harness.server(metrics=recorder)
    client = harness.client(server)
    client.ping()
    with pytest.raises(NotSupportedError):
        client.request(77, {})
    with pytest.raises(NotFoundError):
        client.sync_lookup(key(tokens(16, 1)))  # pool request; model not registered
    client.ping()  # replies come in order: every record above is in
    with recorder.lock:
        calls = list(recorder.calls)
    assert [(n, o) for n, o, _ in calls] == [
        ("HELLO", "ok"),
        ("PING", "ok"),
        ("MALFORMED", "NotSupported"),
        ("SYNC_LOOKUP", "NotFound"),
        ("PING", "ok"),
    ]
    assert all(0 <= s < 10 for _, _, s in calls)
    assert server.request_counts()["PING"] == {"ok": 2}


def test_clear_runs_on_the_pool_and_returns_a_count(harness: Harness) -> None:
    server = harness.server(admin_token="s3cret")
    client = harness.client(server)
    assert client.clear() == 0
    assert client.clear(force=True, admin_token="s3cret") == 0


def test_a_forced_clear_needs_the_admin_token(harness: Harness) -> None:
    """CLEAR with force drops objects other clients hold leases on: only the admin may."""
    client = harness.client(harness.server(admin_token="s3cret"))
    with pytest.raises(PermissionDeniedError, match="admin token"):
        client.clear(force=True)
    with pytest.raises(PermissionDeniedError):
        client.clear(force=True, admin_token="guess")
    without = harness.client(harness.server())  # no token configured: nobody may
    with pytest.raises(PermissionDeniedError):
        without.clear(force=True, admin_token="")
    assert without.clear() == 0


# ---------------------------------------------------------------------------------------------
# Heartbeats and client expiry


def test_a_silent_client_is_dropped_and_its_state_released(harness: Harness) -> None:
    storage, engine = harness.engine()
    server = harness.server(engine, storage, heartbeat_grace_s=1.0, reap_interval_s=0.05)
    silent = harness.client(server, heartbeat_interval_s=None)
    alive = harness.client(server, heartbeat_interval_s=0.1)
    assert silent.hello_info is not None and alive.hello_info is not None
    silent_id = silent.hello_info.client_id
    reg = silent.register_kv_cache(MODEL, 1, 0, layout())
    assert engine.stats()["engine"]["registrations"] == 1
    logger = logging.getLogger("lmcache_cpp.server")
    watcher = _LogEvent("dropped", silent_id)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watcher)
    try:
        assert watcher.event.wait(20.0), "the silent client was not dropped"
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)
    assert engine.stats()["engine"]["registrations"] == 0
    assert engine.stats()["engine"]["ended_clients"] >= 1
    # The heartbeating client kept its id; the silent one comes back as a new client.
    assert alive.hello().client_id == alive.hello_info.client_id
    assert silent.hello().client_id != silent_id
    with pytest.raises(NotFoundError):
        silent.unregister_kv_cache(reg["registration_id"])


# ---------------------------------------------------------------------------------------------
# Threads: the pool, stop, close


def test_a_parked_wait_does_not_block_other_requests(
    harness: Harness, stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient]
) -> None:
    server, mem, a = stalled
    b = harness.client(server)
    handle = a.lookup(key(tokens(64, 3)))
    waiting = a.async_wait_prefetch_status(handle, 60.0)
    assert mem.wait_for_blocked_operations(1, 10.0)
    for _ in range(20):
        b.ping()
    assert b.get_chunk_size() == CHUNK
    status = a.status()["server"]
    assert (status["parked_waits"], status["pool_jobs"]) == (1, 0)  # no thread holds the wait
    assert not waiting.done()
    mem.set_stalled(False)
    result = waiting.result(timeout=30)
    assert result is not None and result.hit_chunks == 0


def test_stop_answers_running_and_queued_requests_and_is_idempotent(
    stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient],
) -> None:
    server, mem, client = stalled
    handle = client.lookup(key(tokens(64, 4)))
    running = client.async_wait_prefetch_status(handle, 0.5)
    # The only pool thread asks the stalled L2; the CLEAR queues behind it.
    blocker = client.async_sync_lookup(key(tokens(64, 44), "blocker"), timeout_s=1.0)
    assert mem.wait_for_blocked_operations(2, 10.0)  # both lookups' L2 parts: the blocker runs
    queued = client.async_clear()
    # Replies on one connection come in order: once STATUS is answered all are in the server.
    status = client.status()["server"]
    assert (status["parked_waits"], status["pool_jobs"]) == (1, 2)
    server.stop()
    assert running.result(timeout=30) is None  # not ready when its wait ended
    assert blocker.result(timeout=30).hit_chunks == 0  # stop let it finish (its L2 deadline)
    with pytest.raises(UnavailableError, match="stopping"):
        queued.result(timeout=30)
    server.stop()
    assert server.wait(0) and not server.running
    # The client saw its connection close: it fails at once instead of waiting for a deadline.
    with pytest.raises(UnavailableError, match="lost the connection"):
        client.ping(deadline_s=30.0)


def test_close_fails_pending_requests_and_later_calls(
    stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient],
) -> None:
    _, mem, client = stalled
    handle = client.lookup(key(tokens(64, 5)))
    pending = client.async_wait_prefetch_status(handle, 60.0)
    assert mem.wait_for_blocked_operations(1, 10.0)
    client.close()
    with pytest.raises(UnavailableError):
        pending.result(timeout=10)
    with pytest.raises(UnavailableError):
        client.ping()
    client.close()
    assert client.closed


def test_a_client_without_a_server_times_out(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    with pytest.raises(DeadlineExceededError, match="HELLO"):
        CacheClient(endpoint, timeout_s=0.2)
    with CacheClient(endpoint, timeout_s=0.2, hello=False) as client:
        with pytest.raises(DeadlineExceededError):
            client.ping()
        with pytest.raises(DeadlineExceededError):
            client.wait_prefetch_status(bytes(16), 0.1, deadline_s=0.1)


def test_many_threads_share_one_client(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(50):
                assert client.get_chunk_size() == CHUNK
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert server.request_counts()["GET_CHUNK_SIZE"] == {"ok": 200}


# ---------------------------------------------------------------------------------------------
# Endpoints and security


def test_remote_endpoints_are_opt_in_and_need_curve_keys() -> None:
    public, secret = (k.decode() for k in zmq.curve_keypair())
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:1"):
        with pytest.raises(ValueError, match="loopback"):
            ServerOptions(endpoint=endpoint)
        with pytest.raises(ValueError, match="CURVE"):
            ServerOptions(endpoint=endpoint, allow_remote=True)
        ServerOptions(
            endpoint=endpoint, allow_remote=True, curve_public_key=public, curve_secret_key=secret
        )
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://localhost:1", "ipc:///x"):
        ServerOptions(endpoint=endpoint)
    with pytest.raises(ValueError, match="only tcp"):
        ServerOptions(endpoint="udp://127.0.0.1:1")
    with pytest.raises(ValueError, match="both"):
        ServerOptions(curve_public_key=public)
    with pytest.raises(ValueError, match="z85"):
        ServerOptions(curve_public_key=public, curve_secret_key="x" * 39)
    with pytest.raises(ValueError, match="worker_threads"):
        ServerOptions(worker_threads=0)


def test_tcp_port_zero_is_resolved_and_ipc_sockets_are_private(harness: Harness) -> None:
    server = harness.server(endpoint="tcp://127.0.0.1:0")
    host, _, port = server.bound_endpoint.rpartition(":")
    assert host == "tcp://127.0.0.1" and int(port) > 0
    harness.client(server).ping()
    ipc = harness.server()
    path = ipc.bound_endpoint[len("ipc://") :]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_busy_endpoint_fails_start(harness: Harness) -> None:
    for endpoint in ("tcp://127.0.0.1:0", harness.endpoint()):
        first = harness.server(endpoint=endpoint)
        storage, engine = harness.engine()
        second = CacheServer(engine, storage, ServerOptions(endpoint=first.bound_endpoint))
        with pytest.raises((zmq.ZMQError, OSError)) as info:
            second.start()
        assert info.value.errno == errno.EADDRINUSE
        second.stop()  # nothing to stop
        assert not second.running
        harness.client(first).ping()


def test_a_stale_ipc_socket_file_is_replaced(harness: Harness) -> None:
    endpoint = harness.endpoint()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(endpoint[len("ipc://") :])
    stale.close()  # the file stays, nobody listens
    server = harness.server(endpoint=endpoint)
    harness.client(server).ping()


def test_curve_encrypts_and_authorizes_clients(harness: Harness, tmp_path: Path) -> None:
    server_public, server_secret = (k.decode() for k in zmq.curve_keypair())
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "worker")
    allowed_public, allowed_secret = zmq.auth.load_certificate(secret_file)
    assert allowed_secret is not None
    os.rename(public_file, allowed_dir / "worker.key")
    server = harness.server(
        endpoint="tcp://127.0.0.1:0",
        curve_public_key=server_public,
        curve_secret_key=server_secret,
        curve_authorized_clients_dir=str(allowed_dir),
    )
    ok = harness.client(
        server,
        curve_server_key=server_public,
        curve_public_key=allowed_public.decode(),
        curve_secret_key=allowed_secret.decode(),
    )
    assert ok.get_chunk_size() == CHUNK
    # Refused handshakes fail at once, saying why (the deadline is long on purpose).
    with pytest.raises(UnavailableError, match="CURVE key authorized"):  # a key pair unknown there
        harness.client(server, curve_server_key=server_public, timeout_s=30.0)
    with pytest.raises(UnavailableError, match=r"handshake .* failed"):  # no CURVE at all
        harness.client(server, timeout_s=30.0)
    ok.ping()


def test_the_client_table_is_bounded(harness: Harness) -> None:
    server = harness.server(max_clients=1)
    first = harness.client(server)
    with pytest.raises(ResourceExhaustedError, match="limit of 1 clients"):
        harness.client(server)
    first.ping()


def test_blocking_requests_per_client_are_bounded(harness: Harness) -> None:
    mem = lc.MemoryL2Adapter()
    storage, engine = harness.engine(adapters=[mem])
    server = harness.server(engine, storage, worker_threads=1, max_jobs_per_client=4)
    a = harness.client(server)
    b = harness.client(server)
    a.register_kv_cache(MODEL, 1, 0, layout())
    mem.set_stalled(True)
    try:
        handle = a.lookup(key(tokens(64, 6)))
        waits = [a.async_wait_prefetch_status(handle, 30.0) for _ in range(4)]
        with pytest.raises(ResourceExhaustedError, match="4 blocking requests"):
            a.wait_prefetch_status(handle, 0.0)
        other = b.async_clear()  # another client is still accepted
    finally:
        mem.set_stalled(False)
    assert other.result(timeout=60) >= 0
    results = []
    for w in waits:
        try:
            results.append(w.result(timeout=60))
        except NotFoundError:  # delivered once: the later waits find the job gone
            results.append("gone")
    assert results[0] is not None and results[0] != "gone"
    assert results[1:] == ["gone"] * 3
    a.ping()


def test_close_from_a_done_callback_finishes_on_the_io_thread(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server)
    closed = threading.Event()

    def on_done(_: object) -> None:
        client.close()  # runs on the client's I/O thread
        closed.set()

    client.async_ping().add_done_callback(on_done)
    assert closed.wait(10)
    assert client.closed
    with pytest.raises(UnavailableError):
        client.ping()
    harness.client(server).ping()


def test_close_says_goodbye_and_the_server_releases_the_client_at_once(harness: Harness) -> None:
    storage, engine = harness.engine()
    server = harness.server(engine, storage, heartbeat_grace_s=600.0)
    worker = harness.client(server)
    _layers, view = kv_cache(11)
    transfer = KvTransferClient.register(worker, MODEL, 1, 0, view)
    toks = tokens(4 * CHUNK, 11)
    assert transfer.store(view, list(range(16)), key(toks, "store")) == 4
    scheduler = harness.client(server)
    assert scheduler.sync_lookup(key(toks, "r"), tp_size=2).hit_chunks == 4
    assert engine.stats()["l1"]["read_leases"] == 8
    assert server.clients_connected == 2
    scheduler.close()  # long before the 600 s grace
    assert engine.stats()["l1"]["read_leases"] == 0
    assert server.clients_connected == 1
    assert server.request_counts()["GOODBYE"] == {"ok": 1}
    # goodbye() without closing: the registration goes, the connection stays usable.
    assert engine.stats()["engine"]["registrations"] == 1
    assert worker.goodbye() == 0
    assert engine.stats()["engine"]["registrations"] == 0
    assert worker.get_chunk_size() == CHUNK


def test_goodbye_while_a_pool_request_runs_releases_when_it_finishes(
    harness: Harness, stalled: tuple[CacheServer, lc.MemoryL2Adapter, CacheClient]
) -> None:
    server, mem, client = stalled
    handle = client.lookup(key(tokens(64, 21), "r"))
    waiting = client.async_wait_prefetch_status(handle, 60.0)
    deadline = time.monotonic() + 10
    while client.status()["server"]["parked_waits"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.goodbye() == 0  # deferred: its WAIT is still parked
    assert server.clients_connected == 1
    mem.set_stalled(False)
    assert waiting.result(timeout=30) is not None
    deadline = time.monotonic() + 10
    while server.clients_connected:
        assert time.monotonic() < deadline, "the leaving client was not dropped"
        time.sleep(0.01)


def test_a_pool_reply_the_result_socket_refuses_is_still_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker thread's reply that its PUSH socket does not take (full, or any error) is spilled
    and sent by the socket thread: the client gets it and is not left "in flight" forever."""
    real = zmq.Socket.send_multipart
    refused: list[int] = []

    def flaky(self: zmq.Socket[bytes], parts: list[bytes], *args: object, **kw: object) -> object:
        if self.type == zmq.PUSH and not refused:
            refused.append(1)
            raise zmq.Again()
        return real(self, parts, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zmq.Socket, "send_multipart", flaky)
    harness = Harness(tmp_path)
    try:
        server = harness.server()
        client = harness.client(server, timeout_s=5.0)
        assert client.clear() == 0  # CLEAR runs on the pool
        assert refused == [1], "the fault was not injected"
        assert all(c.in_flight == 0 for c in server._clients.values())
        assert client.clear() == 0
    finally:
        harness.close()
