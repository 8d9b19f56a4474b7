"""The cache server itself: sockets, threads, clients, the pool and parked waits
(:class:`CacheServer`)."""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import zmq

from lmcache_cpp import _core
from lmcache_cpp._zmq_io import pyzmq_backend_file, readable, recv_frames, send_frames
from lmcache_cpp.device import make_device_layer
from lmcache_cpp.errors import LMCacheError
from lmcache_cpp.metrics import Metrics
from lmcache_cpp.protocol import (
    PROTOCOL_VERSION,
    HelloInfo,
    HelloRequest,
    ProtocolError,
    ProtocolLimits,
    Request,
    decode_reply,
    encode_error_reply,
    pid_namespace,
)
from lmcache_cpp.server.dispatcher import (
    _CLIENT_ID_BITS,
    _EXHAUSTED,
    _INTERNAL,
    _REQUEST_NAMES,
    _TIMEOUT,
    _UNAVAILABLE,
    Dispatcher,
    EngineLike,
    RequestMetrics,
    Waiting,
    WaitKey,
    _outcome,
    _request_id,
    _request_name,
)
from lmcache_cpp.server.options import ServerOptions

_log = logging.getLogger("lmcache_cpp.server")  # one logger name for the whole server

# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class _Client:
    id: int
    identity: bytes
    last_seen: float
    in_flight: int = 0
    name: str = ""
    leaving: bool = False  # said GOODBYE while pool requests ran: dropped when they finish


@dataclass
class _Job:
    token: int
    client: int
    request: Request
    queued_at: float  # time.monotonic()


class _FairQueue:
    """The pool's queue: one FIFO per client, served round-robin, so one client's backlog never
    delays another client's request by more than one job per client ahead of it. ``get`` returns
    None once per :meth:`put_stop`, after the jobs queued before it."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._by_client: dict[int, collections.deque[_Job]] = {}  # GUARDED_BY(_cv)
        self._turns: collections.deque[int] = collections.deque()  # GUARDED_BY(_cv)
        self._stops = 0  # GUARDED_BY(_cv)

    def put(self, job: _Job) -> None:
        with self._cv:
            queue_ = self._by_client.get(job.client)
            if queue_ is None:
                queue_ = self._by_client[job.client] = collections.deque()
                self._turns.append(job.client)
            queue_.append(job)
            self._cv.notify()

    def put_stop(self) -> None:
        with self._cv:
            self._stops += 1
            self._cv.notify()

    def get(self) -> _Job | None:
        with self._cv:
            while not self._turns and self._stops == 0:
                self._cv.wait()
            if not self._turns:
                self._stops -= 1
                return None
            client = self._turns.popleft()
            queue_ = self._by_client[client]
            job = queue_.popleft()
            if queue_:
                self._turns.append(client)  # its next job waits for every other client's turn
            else:
                del self._by_client[client]
            return job


@dataclass
class _Parked:
    """A :data:`PARKED_REQUESTS` request waiting on the socket thread (no thread blocks)."""

    identity: bytes
    client: _Client
    request: Request
    received: float  # time.perf_counter(), for the latency metric
    deadline: float  # time.monotonic(): answered as a timed-out wait then
    key: WaitKey  # what it waits for (indexed in CacheServer._parked_by_key)


@dataclass
class _PendingJob:
    identity: bytes
    client: _Client
    request: Request
    received: float


# The fields of CacheEngine.client_usage() entries (a connected client holding nothing has them
# all 0).
_USAGE_FIELDS: Final = tuple(f.name for f in _core.ClientUsage.fields())

_STOP_TOKEN: Final = 0  # never a job token (tokens start at 1)


def _has_l2(storage: object) -> bool:
    """Whether ``storage`` (a StorageManager, or None) may have L2 adapters; True when unknown."""
    adapters = getattr(storage, "adapters", None)
    if not callable(adapters):
        return True
    return len(adapters()) > 0


def wire_fast_path(
    engine: _core.CacheEngine, limits: ProtocolLimits, *, has_l2: bool
) -> _core.WireFastPath:
    """The C++ codec of the per-prompt requests over ``engine``, enforcing ``limits``."""
    return _core.WireFastPath(
        engine,
        max_frame_bytes=limits.max_frame_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_tokens=limits.max_tokens,
        max_string_bytes=limits.max_string_bytes,
        max_wait_s=limits.max_wait_s,
        has_l2=has_l2,
    )


class CacheServer:
    """Serves a ``_core.CacheEngine`` over ZeroMQ (see the module docstring and docs/protocol.md).

    ``storage`` is the ``_core.StorageManager`` behind ``engine``; the server holds a reference
    so that it outlives the server, and never starts or stops it (nor the engine). Stop the
    server before the storage manager.

    Lifecycle: :meth:`start` binds (raising on a bad or busy endpoint) and starts the threads;
    :meth:`stop` (idempotent, any thread) answers what is queued with Unavailable, waits up to
    ``stop_timeout_s`` for running pool jobs to be answered, ends every known client in the
    engine, joins the threads and closes the sockets. Also a context manager.
    """

    def __init__(
        self,
        engine: EngineLike,
        storage: object = None,
        options: ServerOptions | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._storage = storage
        self._options = options if options is not None else ServerOptions()
        self._metrics = metrics
        self._fast: _core.WireFastPath | None = None
        if isinstance(engine, _core.CacheEngine):
            self._fast = wire_fast_path(engine, self._options.limits, has_l2=_has_l2(storage))
        # The C++ receive loop, made on the socket thread once the socket is bound. A
        # RequestMetrics other than Metrics gets its record() call per request from the Python
        # loop, which then reads everything.
        self._loop: _core.RouterLoop | None = None
        self._loop_wanted = self._fast is not None and (
            metrics is None or isinstance(metrics, Metrics)
        )
        self._loop_buckets = metrics.buckets if isinstance(metrics, Metrics) else (1.0,)
        if self._loop_wanted and isinstance(metrics, Metrics):
            metrics.add_source(self._loop_metrics)
        self._dispatcher = Dispatcher(
            engine,
            self._options.limits,
            hello=self._hello_reply,
            goodbye=self._goodbye_reply,
            server_status=self._server_status,
            client_usage=self.client_usage,
            has_l2=_has_l2(storage),
            admin_token=self._options.admin_token,
            device=make_device_layer(self._options.device),
        )
        self._lifecycle = threading.Lock()
        self._state = "new"  # new -> running -> stopped, guarded by _lifecycle
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        # Called (on the dying socket thread) if the socket thread fails: the server no longer
        # serves, and a process must not stay alive pretending it does.
        self._fatal_listeners: list[Callable[[BaseException], None]] = []
        self.fatal_error: BaseException | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._authenticator: Any = None
        self._socket_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._jobs = _FairQueue()
        self._results_endpoint = f"inproc://lmcache-server-results-{id(self):x}"
        self._wake_r, self._wake_w = -1, -1
        self._bound_endpoint = ""
        self._started_at = 0.0
        # Socket-thread state.
        self._clients: dict[bytes, _Client] = {}
        self._clients_by_id: dict[int, _Client] = {}
        self._pending: dict[int, _PendingJob] = {}
        # Parked waits by token (insertion order = arrival order), and their deadlines (a heap;
        # tokens no longer parked are skipped when they surface).
        self._parked: dict[int, _Parked] = {}
        self._parked_deadlines: list[tuple[float, int]] = []
        self._parked_by_key: dict[WaitKey, set[int]] = {}  # tokens by what they wait for
        # Pool results the PUSH socket did not take (collections.deque: thread-safe appends and
        # pops); the socket thread sends them after a wake-up, so no reply is ever lost and no
        # client stays "in flight" forever.
        self._spilled: collections.deque[list[bytes]] = collections.deque()
        self._tokens = itertools.count(1)
        # Shared with other threads (STATUS is built on the socket thread, accessors elsewhere).
        self._stats_lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()  # GUARDED_BY(_stats_lock)
        self._num_clients = 0  # GUARDED_BY(_stats_lock)
        self._dropped_replies = 0  # GUARDED_BY(_stats_lock)

    # ---- public API --------------------------------------------------------------------------

    @property
    def options(self) -> ServerOptions:
        return self._options

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def bound_endpoint(self) -> str:
        """The endpoint actually bound (tcp port 0 / ``*`` resolved). Empty before start()."""
        return self._bound_endpoint

    @property
    def running(self) -> bool:
        return self._state == "running" and not self._stopping.is_set()

    @property
    def clients_connected(self) -> int:
        with self._stats_lock:
            return self._num_clients

    def client_usage(self) -> list[dict[str, Any]]:
        """What each client holds (``CacheEngine.client_usage()``), with the server's own view of
        connected ones: ``name`` and ``blocking`` (its pool requests and parked waits). Any
        thread; the per-client quotas are in docs/operations.md."""
        clients = list(dict(self._clients_by_id).values())  # one atomic copy (GIL)
        usage: dict[int, dict[str, Any]] = {
            int(u["client"]): dict(u) for u in self._engine.client_usage()
        }
        for c in clients:
            entry = usage.setdefault(c.id, dict.fromkeys(_USAGE_FIELDS, 0) | {"client": c.id})
            entry["name"] = c.name
            entry["blocking"] = c.in_flight
        return [usage[k] for k in sorted(usage)]

    def request_counts(self) -> dict[str, dict[str, int]]:
        """Requests answered so far: {request name: {outcome: count}}."""
        out: dict[str, dict[str, int]] = {}
        with self._stats_lock:
            counts = Counter(self._counts)
        counts.update(self._loop_metrics()[0])
        for (name, outcome), n in counts.items():
            out.setdefault(name, {})[outcome] = n
        return out

    def _loop_metrics(
        self,
    ) -> tuple[dict[tuple[str, str], int], dict[str, tuple[list[int], float]]]:
        """What the C++ loop answered, for ``Metrics.render`` (names and outcomes as
        :meth:`_record` gives them)."""
        loop = self._loop
        if loop is None:
            return {}, {}
        counts, histograms, _ = loop.stats()
        requests = {
            (_REQUEST_NAMES[type_id], _outcome(status)): n
            for (type_id, status), n in counts.items()
        }
        return requests, {_REQUEST_NAMES[t]: (h[0], h[1]) for t, h in histograms.items()}

    def start(self) -> None:
        """Binds and starts the socket thread and the workers. Raises zmq.ZMQError / OSError
        when the endpoint cannot be bound (EADDRINUSE also for an ipc path another process
        listens on; nothing is left running), RuntimeError when called twice."""
        with self._lifecycle:
            if self._state != "new":
                raise RuntimeError(f"CacheServer.start(): the server is {self._state}")
            self._context = zmq.Context()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            os.set_blocking(self._wake_r, False)
            try:
                self._start_authenticator()
                self._socket_thread = threading.Thread(
                    target=self._socket_main, name="lmcache-server-socket", daemon=True
                )
                self._started_at = time.monotonic()
                self._socket_thread.start()
                self._ready.wait()
                if self._start_error is not None:
                    raise self._start_error
            except BaseException:
                if self._socket_thread is not None:
                    self._socket_thread.join()
                self._release_resources()
                self._state = "stopped"
                self._stopped.set()
                raise
            for i in range(self._options.worker_threads):
                worker = threading.Thread(
                    target=self._worker_main, name=f"lmcache-server-worker-{i}", daemon=True
                )
                worker.start()
                self._workers.append(worker)
            self._state = "running"
        _log.info(
            "cache server listening on %s (%d worker threads, chunk size %d%s)",
            self._bound_endpoint,
            self._options.worker_threads,
            int(self._engine.chunk_size),
            ", CURVE" if self._options.curve_enabled else "",
        )

    def stop(self) -> None:
        """Stops serving; idempotent and callable from any thread (not from a metrics callback)."""
        with self._lifecycle:
            if self._state != "running":
                return
            self._stopping.set()
            self._wake()
            if self._socket_thread is not None:
                self._socket_thread.join()
            for _ in self._workers:
                self._jobs.put_stop()
            deadline = time.monotonic() + self._options.stop_timeout_s
            stuck = []
            for worker in self._workers:
                worker.join(max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    stuck.append(worker)
            if stuck:
                _log.warning(
                    "%d worker thread(s) still inside an engine call at stop; their sockets are "
                    "closed when the calls return",
                    len(stuck),
                )
                context = self._context
                self._context = None
                threading.Thread(
                    target=_term_after,
                    args=(stuck, context),
                    name="lmcache-server-term",
                    daemon=True,
                ).start()
            self._release_resources()
            self._state = "stopped"
            self._stopped.set()
        _log.info("cache server on %s stopped", self._bound_endpoint)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server has stopped (or ``timeout``); returns whether it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> CacheServer:
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- lifecycle helpers -------------------------------------------------------------------

    def _start_authenticator(self) -> None:
        directory = self._options.curve_authorized_clients_dir
        if directory is None:
            if self._options.curve_enabled and self._options.allow_remote:
                _log.warning(
                    "CURVE is on without curve_authorized_clients_dir: any client that knows the "
                    "server's public key can connect"
                )
            return
        from zmq.auth.thread import ThreadAuthenticator

        assert self._context is not None
        auth = ThreadAuthenticator(self._context)
        auth.start()
        auth.configure_curve(domain="*", location=directory)
        self._authenticator = auth

    def _release_resources(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.term()
            self._context = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\x01")

    # ---- worker threads ----------------------------------------------------------------------

    def _worker_main(self) -> None:
        assert self._context is not None
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 0)  # bounded by max_queued_jobs, never by the queue
        push.connect(self._results_endpoint)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                waited = time.monotonic() - job.queued_at
                if self._stopping.is_set():
                    frames = encode_error_reply(
                        int(job.request.request_type),
                        job.request.seq,
                        _UNAVAILABLE,
                        "the server is stopping",
                    )
                    status = _UNAVAILABLE
                elif waited > self._options.max_queue_wait_s:
                    frames = encode_error_reply(
                        int(job.request.request_type),
                        job.request.seq,
                        _TIMEOUT,
                        f"waited {waited:.1f} s for a worker thread (limit "
                        f"{self._options.max_queue_wait_s:g} s, --max-queue-wait-s); not run",
                    )
                    status = _TIMEOUT
                else:
                    frames, status = self._dispatcher.execute(job.client, job.request)
                message = [job.token.to_bytes(8, "little"), status.to_bytes(4, "little"), *frames]
                self._push_result(push, message)
        finally:
            push.close(linger=0)

    def _push_result(self, push: zmq.Socket[bytes], message: list[bytes]) -> None:
        """Hands a pool result to the socket thread; what the socket does not take is spilled
        to a queue the socket thread drains after a wake-up."""
        try:
            push.send_multipart(message, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            _log.debug("pool result spilled past the result socket: %s", exc)
            self._spilled.append(message)
            self._wake()

    # ---- socket thread -----------------------------------------------------------------------

    def _bind(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        assert self._context is not None
        opts = self._options
        router = self._context.socket(zmq.ROUTER)
        results = self._context.socket(zmq.PULL)
        try:
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            router.setsockopt(zmq.MAXMSGSIZE, opts.effective_transport_max_frame_bytes)
            if opts.curve_enabled:
                assert opts.curve_secret_key is not None and opts.curve_public_key is not None
                router.setsockopt(zmq.CURVE_SERVER, 1)
                router.setsockopt(zmq.CURVE_SECRETKEY, opts.curve_secret_key.encode("ascii"))
                router.setsockopt(zmq.CURVE_PUBLICKEY, opts.curve_public_key.encode("ascii"))
            _refuse_live_ipc_path(opts.endpoint)
            router.bind(opts.endpoint)
            endpoint = router.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(endpoint, bytes)
            self._bound_endpoint = endpoint.decode()
            if opts.ipc_mode is not None and self._bound_endpoint.startswith("ipc://"):
                path = self._bound_endpoint[len("ipc://") :]
                if path and not path.startswith("@"):
                    os.chmod(path, opts.ipc_mode)
            results.setsockopt(zmq.LINGER, 0)
            results.setsockopt(zmq.RCVHWM, 0)
            results.bind(self._results_endpoint)
        except BaseException:
            router.close(linger=0)
            results.close(linger=0)
            raise
        return router, results

    def _socket_main(self) -> None:
        try:
            router, results = self._bind()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._start_loop(router)
        self._ready.set()
        try:
            self._serve(router, results)
        except BaseException as exc:  # _serve guards every request; this is a bug or no memory
            _log.critical("cache server socket thread failed; the server no longer serves: %r", exc)
            self.fatal_error = exc
            for listener in list(self._fatal_listeners):
                try:
                    listener(exc)
                except Exception:  # pragma: no cover - a listener's bug
                    _log.exception("fatal-error listener failed")
        finally:
            self._end_all_clients()
            router.close(linger=0)
            results.close(linger=0)

    def on_fatal(self, listener: Callable[[BaseException], None]) -> None:
        """Calls ``listener(exc)`` if the socket thread ever dies (it never should: every request
        gets a reply, errors included). ``lmcache-cpp serve`` exits non-zero then, so that a
        supervisor restarts it (docs/operations.md). A server that already failed calls it now."""
        self._fatal_listeners.append(listener)
        if self.fatal_error is not None:
            listener(self.fatal_error)

    def _start_loop(self, router: zmq.Socket[bytes]) -> None:
        if not self._loop_wanted:
            return
        assert self._fast is not None
        backend = pyzmq_backend_file()
        if backend is None:
            _log.info("pyzmq has no compiled backend; requests are read by the Python loop")
            return
        try:
            self._loop = _core.RouterLoop(
                self._fast, router.underlying, libzmq_from=backend, buckets=self._loop_buckets
            )
        except RuntimeError as exc:
            _log.info("requests are read by the Python loop: %s", exc)

    def _serve(self, router: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        notice_fd = int(self._engine.completion_fd())
        poller.register(notice_fd, zmq.POLLIN)
        interval = self._options.reap_interval_s
        next_tick = time.monotonic() + interval
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping.is_set():
                if stop_deadline is None:
                    stop_deadline = now + self._options.stop_timeout_s
                    self._poll_parked(router, now, list(self._parked), final=True)
                if not self._pending or now >= stop_deadline:
                    if self._pending:
                        _log.warning(
                            "stopping with %d pool request(s) unanswered", len(self._pending)
                        )
                    return
                wake_at = stop_deadline
            else:
                wake_at = next_tick
                if self._parked_deadlines:
                    wake_at = min(wake_at, self._parked_deadlines[0][0])
            timeout_ms = max(0, math.ceil((wake_at - now) * 1000))
            try:
                events = dict(poller.poll(timeout_ms))
            except zmq.ZMQError as exc:  # pragma: no cover - EINTR is retried by pyzmq
                _log.warning("poll failed: %s", exc)
                continue
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                if self._spilled:
                    self._send_spilled(router)
            if results in events:
                self._drain_results(router, results)
            if router in events:
                self._drain_requests(router)
            now = time.monotonic()
            if notice_fd in events:
                self._on_completions(router, now)
            if self._parked_deadlines and self._parked_deadlines[0][0] <= now:
                self._poll_parked(router, now, self._expired_tokens(now))
            if now >= next_tick and not self._stopping.is_set():
                # A safety net for completions another server on the same engine took.
                self._poll_parked(router, now, list(self._parked))
                self._reap(now)
                next_tick = now + interval

    def _drain_requests(self, router: zmq.Socket[bytes]) -> None:
        # Bounded so that pool results and the reaper are never starved by a flood. ZMQ_EVENTS
        # says whether another message is queued (cheaper than a read that raises zmq.Again).
        loop = self._loop
        if loop is not None and not self._stopping.is_set():
            self._drain_natively(router, loop)
            return
        for _ in range(1024):
            try:
                frames = recv_frames(router)
            except zmq.Again:
                return
            try:
                self._on_message(router, frames)
            except Exception:  # pragma: no cover - a bug; keep serving
                _log.exception("failed to handle a message")
            if not readable(router):
                return

    def _drain_natively(self, router: zmq.Socket[bytes], loop: _core.RouterLoop) -> None:
        budget = 1024
        while budget > 0:
            trace = _log.isEnabledFor(logging.DEBUG)
            answered, message, tried, failures, error, traces = loop.drain(budget, trace)
            budget -= answered
            for client_id, type_id, text in failures:
                _log.warning("client %d: %s failed: %s", client_id, _request_name(type_id), text)
            for client_id, type_id, seq, status, seconds in traces:
                _log.debug(
                    "client %d seq %d %s -> %s (%.3f ms, native loop)",
                    client_id,
                    seq,
                    _request_name(type_id),
                    _outcome(status),
                    seconds * 1000,
                )
            if error:
                _log.warning("receive failed: %s", zmq.ZMQError(error))
                return
            if message is None:
                return
            budget -= 1
            try:
                self._on_message(router, message, fast_tried=tried)
            except Exception:  # pragma: no cover - a bug; keep serving
                _log.exception("failed to handle a message")

    def _on_message(
        self, router: zmq.Socket[bytes], frames: list[bytes], fast_tried: bool = False
    ) -> None:
        received = time.perf_counter()
        identity, body = frames[0], frames[1:]
        client = self._client_for(identity)
        if client is None:
            self._reply_error_to_unknown(router, identity, body, received)
            return
        if self._stopping.is_set():
            self._reply_error_now(
                router, identity, body, _UNAVAILABLE, "the server is stopping", received
            )
            return
        # The per-prompt requests in their usual shape are decoded, run and encoded in C++, at
        # every log level (each is logged at DEBUG as any other).
        if self._fast is not None and not fast_tried and len(body) == 2:
            fast = self._fast.handle(client.id, body[0], body[1])
            if fast is not None:
                self._finish_fast(router, client, identity, fast, received)
                return
        try:
            request = self._dispatcher.decode(body)
        except ProtocolError as exc:
            reply = encode_error_reply(exc.request_type, exc.seq, exc.code, exc.message)
            _log.debug(
                "client %d: malformed request (type %d seq %d): %s",
                client.id,
                exc.request_type,
                exc.seq,
                exc.message,
            )
            self._record(_request_name(exc.request_type), exc.code, received)
            self._send(router, identity, reply)
            return
        rt = request.request_type
        if self._dispatcher.is_parked(rt):
            self._park_or_answer(router, identity, client, request, received)
            return
        if not self._dispatcher.is_blocking(rt):
            reply, status = self._dispatcher.execute(client.id, request)
            self._finish(client, request, status, received)
            self._send(router, identity, reply)
            return
        answered = self._dispatcher.try_without_blocking(client.id, request)
        if answered is not None:
            self._finish(client, request, answered[1], received)
            self._send(router, identity, answered[0])
            return
        message = self._refusal(client, len(self._pending), "request queue")
        if message is None:
            token = next(self._tokens)
            self._pending[token] = _PendingJob(identity, client, request, received)
            client.in_flight += 1
            self._jobs.put(_Job(token, client.id, request, time.monotonic()))
            return
        reply = encode_error_reply(int(rt), request.seq, _EXHAUSTED, message)
        self._finish(client, request, _EXHAUSTED, received)
        self._send(router, identity, reply)

    def _refusal(self, client: _Client, queued: int, queue_name: str) -> str | None:
        """Why a blocking request of ``client`` cannot be taken (None: it can)."""
        if client.in_flight >= self._options.max_jobs_per_client:
            return (
                f"{client.in_flight} blocking requests of this client are in progress "
                f"(limit {self._options.max_jobs_per_client})"
            )
        if queued >= self._options.max_queued_jobs:
            return f"the server's {queue_name} is full ({queued} requests)"
        return None

    def _park_or_answer(
        self,
        router: zmq.Socket[bytes],
        identity: bytes,
        client: _Client,
        request: Request,
        received: float,
    ) -> None:
        """A :data:`PARKED_REQUESTS` request: answered now when it need not wait, else parked
        until a completion notice or its deadline. No thread blocks on it."""
        message = self._refusal(client, len(self._parked), "wait queue")
        if message is None:
            wait_s = self._dispatcher.wait_s(request)
            # A job that completes after this look queues its completion, which the socket
            # thread reads after parking this request: no wake-up is lost.
            answered = self._dispatcher.poll(client.id, request, final=wait_s <= 0)
            if not isinstance(answered, Waiting):
                self._finish(client, request, answered[1], received)
                self._send(router, identity, answered[0])
                return
            token = next(self._tokens)
            deadline = time.monotonic() + wait_s
            key = answered.key
            self._parked[token] = _Parked(identity, client, request, received, deadline, key)
            self._parked_by_key.setdefault(key, set()).add(token)
            heapq.heappush(self._parked_deadlines, (deadline, token))
            client.in_flight += 1
            return
        reply = encode_error_reply(int(request.request_type), request.seq, _EXHAUSTED, message)
        self._finish(client, request, _EXHAUSTED, received)
        self._send(router, identity, reply)

    def _on_completions(self, router: zmq.Socket[bytes], now: float) -> None:
        """The engine says which jobs completed: polls the parked requests waiting for them (all
        of them after an overflow, or when the engine stopped)."""
        completed, overflowed = self._engine.take_completions()
        if not self._parked:
            return
        everything = overflowed or any(r == 0 and not any(h) for h, r in completed)
        if everything:
            self._poll_parked(router, now, list(self._parked))
            return
        tokens: set[int] = set()
        for handle, request in completed:
            tokens.update(self._parked_by_key.get(("job", handle), ()))
            tokens.update(self._parked_by_key.get(("request", request), ()))
        if tokens:
            self._poll_parked(router, now, sorted(tokens))  # tokens grow: arrival order

    def _expired_tokens(self, now: float) -> list[int]:
        deadlines = self._parked_deadlines
        expired = []
        while deadlines and deadlines[0][0] <= now:
            _, token = heapq.heappop(deadlines)
            if token in self._parked:
                expired.append(token)
        return expired

    def _unpark(self, token: int) -> _Parked:
        parked = self._parked.pop(token)
        waiting = self._parked_by_key.get(parked.key)
        if waiting is not None:
            waiting.discard(token)
            if not waiting:
                del self._parked_by_key[parked.key]
        return parked

    def _poll_parked(
        self, router: zmq.Socket[bytes], now: float, tokens: list[int], final: bool = False
    ) -> None:
        """Polls the given parked requests, in that order: answers each that no longer waits or
        whose deadline passed (each of them when ``final``); the others stay parked, under what
        they wait for now."""
        for token in tokens:
            parked = self._parked.get(token)
            if parked is None:  # answered already, or its client was dropped meanwhile
                continue
            answered = self._dispatcher.poll(
                parked.client.id, parked.request, final or now >= parked.deadline
            )
            if isinstance(answered, Waiting):
                if answered.key != parked.key:  # e.g. the request's load was replaced
                    self._unpark(token)
                    parked.key = answered.key
                    self._parked[token] = parked
                    self._parked_by_key.setdefault(parked.key, set()).add(token)
                continue
            self._unpark(token)
            client = parked.client
            client.in_flight -= 1
            client.last_seen = now
            self._finish(client, parked.request, answered[1], parked.received)
            self._send(router, parked.identity, answered[0])
            if client.leaving and client.in_flight == 0 and client.identity in self._clients:
                self._drop_client(client, "said goodbye")
        if not self._parked:
            self._parked_deadlines.clear()

    def _finish_fast(
        self,
        router: zmq.Socket[bytes],
        client: _Client,
        identity: bytes,
        answered: tuple[bytes, bytes, int, int],
        received: float,
    ) -> None:
        header, payload, type_id, status = answered
        name = _REQUEST_NAMES[type_id]
        seconds = self._record(name, status, received)
        if status == _INTERNAL:
            message = decode_reply([header, payload]).message
            _log.warning("client %d: %s failed: %s", client.id, name, message)
        elif _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "client %d seq %d %s -> %s (%.3f ms, fast path)",
                client.id,
                decode_reply([header, payload]).seq,
                name,
                _outcome(status),
                seconds * 1000,
            )
        self._send(router, identity, [header, payload])

    def _drain_results(self, router: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        for i in range(1024):
            if i and not readable(results):
                return
            try:
                frames = recv_frames(results)
            except zmq.Again:
                return
            self._on_result(router, frames)

    def _send_spilled(self, router: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = self._spilled.popleft()
            except IndexError:
                return
            self._on_result(router, frames)

    def _on_result(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """One pool result: [token, status, *reply frames]."""
        token = int.from_bytes(frames[0], "little")
        status = int.from_bytes(frames[1], "little")
        job = self._pending.pop(token, None)
        if job is None:  # pragma: no cover - tokens are unique
            _log.error("pool result for unknown job %d", token)
            return
        job.client.in_flight -= 1
        job.client.last_seen = time.monotonic()
        self._finish(job.client, job.request, status, job.received)
        self._send(router, job.identity, frames[2:])
        if job.client.leaving and job.client.in_flight == 0:
            self._drop_client(job.client, "said goodbye")

    def _client_for(self, identity: bytes) -> _Client | None:
        client = self._clients.get(identity)
        now = time.monotonic()
        if client is not None:
            client.last_seen = now
            return client
        if len(self._clients) >= self._options.max_clients:
            return None
        client_id = 0
        while client_id == 0 or client_id in self._clients_by_id:
            client_id = secrets.randbits(_CLIENT_ID_BITS)
        client = _Client(client_id, identity, now)
        self._clients[identity] = client
        self._clients_by_id[client_id] = client
        if self._loop is not None:
            self._loop.add_client(identity, client_id)
        with self._stats_lock:
            self._num_clients = len(self._clients)
        _log.info("client %d connected", client_id)
        return client

    def _reply_error_to_unknown(
        self, router: zmq.Socket[bytes], identity: bytes, body: list[bytes], received: float
    ) -> None:
        message = f"the server has reached its limit of {self._options.max_clients} clients"
        _log.warning("refused a request from a new connection: %s", message)
        self._reply_error_now(router, identity, body, _EXHAUSTED, message, received)

    def _reply_error_now(
        self,
        router: zmq.Socket[bytes],
        identity: bytes,
        body: list[bytes],
        code: int,
        message: str,
        received: float,
    ) -> None:
        try:
            request = self._dispatcher.decode(body)
            echo_type, echo_seq = int(request.request_type), request.seq
        except ProtocolError as exc:
            echo_type, echo_seq = exc.request_type, exc.seq
        self._record(_request_name(echo_type), code, received)
        self._send(router, identity, encode_error_reply(echo_type, echo_seq, code, message))

    def _send(self, router: zmq.Socket[bytes], identity: bytes, frames: list[bytes]) -> None:
        try:
            send_frames(router, [identity, *frames])
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer disconnected; EAGAIN: its queue is full. Either way the
            # client cannot be answered; it times out on its side.
            with self._stats_lock:
                self._dropped_replies += 1
            _log.debug("reply to a peer dropped: %s", exc)

    def _finish(self, client: _Client, request: Request, status: int, received: float) -> None:
        # Called just before the reply is sent, so that a client that has its reply also sees
        # the request in the counters and metrics.
        seconds = self._record(request.request_type.name, status, received)
        if status == _INTERNAL:
            level = logging.WARNING
        elif _log.isEnabledFor(logging.DEBUG):
            level = logging.DEBUG
        else:
            return
        _log.log(
            level,
            "client %d seq %d %s request_id=%r -> %s (%.3f ms)",
            client.id,
            request.seq,
            request.request_type.name,
            _request_id(request.body),
            _outcome(status),
            seconds * 1e3,
        )

    def _record(self, name: str, status: int, received: float) -> float:
        seconds = time.perf_counter() - received
        outcome = _outcome(status)
        with self._stats_lock:
            self._counts[(name, outcome)] += 1
        if self._metrics is not None:
            try:
                self._metrics.record(name, outcome, seconds)
            except Exception:
                _log.exception("metrics.record failed")
        return seconds

    def _reap(self, now: float) -> None:
        grace = self._options.heartbeat_grace_s
        silent = [
            c for c in self._clients.values() if c.in_flight == 0 and now - c.last_seen > grace
        ]
        if self._loop is not None:  # it also hears from clients
            for client in silent:
                client.last_seen = max(client.last_seen, self._loop.last_seen(client.identity) or 0)
            silent = [c for c in silent if now - c.last_seen > grace]
        for client in silent:
            self._drop_client(client, f"silent for {now - client.last_seen:.1f} s")
        try:
            reaped = self._engine.reap_expired()
            if reaped:
                _log.debug("engine reaped %d expired entries", reaped)
        except Exception:
            _log.exception("engine.reap_expired failed")

    def _drop_client(self, client: _Client, why: str) -> int:
        """Forgets the client (and its parked waits: nobody is left to answer) and ends it in the
        engine; returns the leases released."""
        for token in [t for t, p in self._parked.items() if p.client is client]:
            self._unpark(token)
            client.in_flight -= 1
        del self._clients[client.identity]
        del self._clients_by_id[client.id]
        if self._loop is not None:
            self._loop.remove_client(client.identity)
        with self._stats_lock:
            self._num_clients = len(self._clients)
        try:
            released = int(self._engine.end_client(client.id))
        except Exception:
            _log.exception("engine.end_client(%d) failed", client.id)
            return 0
        finally:
            self._dispatcher.release_client(client.id)
        _log.info(
            "client %d%s %s: dropped, %d lease(s) released",
            client.id,
            f" ({client.name})" if client.name else "",
            why,
            released,
        )
        return released

    def _end_all_clients(self) -> None:
        for client in list(self._clients.values()):
            self._drop_client(client, "server stopping")

    # ---- callbacks of the dispatcher (socket thread) -----------------------------------------

    def _hello_reply(self, client_id: int, body: HelloRequest) -> Mapping[str, Any]:
        client = self._clients_by_id.get(client_id)
        if client is not None:
            client.name = body.client_name
        if body.pid is not None and body.pid_ns is not None and body.pid_ns == pid_namespace():
            # Same host and pid namespace: the engine watches the process, so that stores it
            # left unfinished stay fenced exactly as long as it could still write.
            try:
                self._engine.set_client_process(client_id, body.pid)
            except LMCacheError as exc:
                _log.debug("client %d: cannot watch process %d: %s", client_id, body.pid, exc)
        _log.debug(
            "client %d hello%s", client_id, f" ({body.client_name})" if body.client_name else ""
        )
        return HelloInfo(
            protocol_version=PROTOCOL_VERSION,
            server_version=_core.version(),
            client_id=client_id,
            chunk_size=int(self._engine.chunk_size),
            heartbeat_grace_s=self._options.heartbeat_grace_s,
            max_frame_bytes=self._options.limits.max_frame_bytes,
            max_tokens=self._options.limits.max_tokens,
        ).to_wire()

    def _goodbye_reply(self, client_id: int) -> Mapping[str, Any]:
        """GOODBYE: the client is closing; its state goes now rather than after the heartbeat
        grace (or once its running pool requests finish)."""
        client = self._clients_by_id.get(client_id)
        if client is None:  # pragma: no cover - the socket thread just saw it
            return {"released": 0}
        if client.in_flight > 0:
            client.leaving = True
            return {"released": 0}
        return {"released": self._drop_client(client, "said goodbye")}

    def _server_status(self) -> Mapping[str, Any]:
        device = self._dispatcher.device
        with self._stats_lock:
            dropped = self._dropped_replies
        if self._loop is not None:
            dropped += self._loop.stats()[2]
        return {
            "name": self._options.name,
            "version": _core.version(),
            "protocol_version": PROTOCOL_VERSION,
            "endpoint": self._bound_endpoint,
            "uptime_s": time.monotonic() - self._started_at,
            "clients": len(self._clients),
            "pool_jobs": len(self._pending),
            "parked_waits": len(self._parked),
            "worker_threads": self._options.worker_threads,
            "dropped_replies": dropped,
            "requests": self.request_counts(),
            "device": {"kind": "none", "mappings": 0} if device is None else device.status(),
        }


def _refuse_live_ipc_path(endpoint: str) -> None:
    """ZeroMQ's ipc bind replaces an existing socket file, silently taking the path over from a
    server that is still running; refuse instead (a stale file is fine)."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or "*" in path or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # nobody listens: a stale file from a server that died
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is listening on {endpoint}")


def _term_after(workers: list[threading.Thread], context: zmq.Context[Any] | None) -> None:
    for worker in workers:
        worker.join()
    if context is not None:
        context.term()
