"""The client's transport: one DEALER socket, who works it, deadlines, heartbeats and the
link watch (see :mod:`lmcache_cpp.client` for the behaviour). It knows requests only as
ids, payload maps and reply converters; the typed API is
:class:`~lmcache_cpp.client.CacheClient`."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import heapq
import logging
import math
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import zmq

from lmcache_cpp._zmq_io import (
    ZERO_COPY_BYTES,
    native_io,
    readable,
    recv_frames,
    send_frames,
)
from lmcache_cpp.errors import (
    DeadlineExceededError,
    InternalError,
    LMCacheError,
    UnavailableError,
    from_code,
)
from lmcache_cpp.protocol import (
    ProtocolError,
    RequestType,
    count_from_wire,
    decode_reply,
    encode_payload,
    encode_request,
    encode_request_header,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")
_ClientT = TypeVar("_ClientT", bound="ClientTransport")

_DEFAULT_RETRIEVE_WAIT_S: Final = 30.0
_EMPTY_PAYLOAD: Final = encode_request(RequestType.PING, 0, {})[1]
_SENT, _LATER, _FAILED = 0, 1, 2  # outcomes of ClientTransport._send
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_MAX_REPLIES_PER_POLL: Final = 64  # then the leader sends what was queued meanwhile
# What the connection's monitor reports (see ClientTransport._watch_link).
_HANDSHAKE_FAILED: Final = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "no detail",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol error",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "authentication refused",
}
_LINK_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_MONITOR_STOPPED
)


Converter = Callable[[Mapping[str, Any]], Any]


class _Outgoing:
    """A request from its submission to its reply (queued, unsent, then pending)."""

    __slots__ = ("convert", "deadline", "future", "payload", "request_type")

    def __init__(
        self,
        request_type: int,
        payload: bytes,
        future: concurrent.futures.Future[Any] | None,  # None: an internal heartbeat
        convert: Converter,
        deadline: float,  # time.monotonic() by which the reply must be in
    ) -> None:
        self.request_type = request_type
        self.payload = payload
        self.future = future
        self.convert = convert
        self.deadline = deadline


def _identity(payload: Mapping[str, Any]) -> dict[str, Any]:
    return dict(payload)


def _nothing(payload: Mapping[str, Any]) -> None:
    return None


class ClientTransport:
    """A DEALER socket to a cache server and the threads that work it; the base of
    :class:`~lmcache_cpp.client.CacheClient`, which documents the arguments."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 30.0,
        heartbeat_interval_s: float | None = 5.0,
        curve_server_key: str | None = None,
        curve_public_key: str | None = None,
        curve_secret_key: str | None = None,
        max_reply_bytes: int = 1 << 31,
    ) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if heartbeat_interval_s is not None and not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        if (curve_public_key is None) != (curve_secret_key is None):
            raise ValueError("give both curve_public_key and curve_secret_key or neither")
        self._endpoint = endpoint
        self._timeout_s = float(timeout_s)
        self._heartbeat_s = heartbeat_interval_s
        self._max_reply_bytes = max_reply_bytes
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if curve_server_key is not None:
            if curve_public_key is None or curve_secret_key is None:
                public, secret = zmq.curve_keypair()
            else:
                public, secret = curve_public_key.encode(), curve_secret_key.encode()
            self._curve = (curve_server_key.encode(), public, secret)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._outbox: collections.deque[_Outgoing] = collections.deque()  # GUARDED_BY(_lock)
        self._closed = False  # GUARDED_BY(_lock)
        # GUARDED_BY(_lock): the thread that owns the socket now (see "Who owns the socket").
        self._leader: int | None = None
        self._release_on_io_thread = False  # GUARDED_BY(_lock): close() came from a leader
        self._wake_pending = False  # GUARDED_BY(_lock): the pipe was written since the last batch
        self._local = threading.local()  # .defer: _call() sends the request itself
        # Why the server cannot be reached now (None: connected, or not connected yet), set by
        # the link thread; a request submitted meanwhile fails at once with it.
        self._link_down: str | None = None  # GUARDED_BY(_lock) for writes
        # Connections lost so far (and refused handshakes); the leader fails what is in flight
        # whenever it sees this move (_link_seen is the leader's copy).
        self._link_losses = 0  # GUARDED_BY(_lock) for writes
        self._link_seen = 0
        self._monitor: zmq.Socket[bytes] | None = None
        try:
            self._sock = self._open_socket()
            # Whole-message socket calls that keep the GIL (None: pyzmq's calls serve).
            self._io = native_io(self._sock)
        except BaseException:
            self._context.term()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # What the leader polls: the socket (also for POLLOUT while _unsent is not empty) and the
        # wake-up pipe.
        self._poll_items: list[tuple[Any, int]] = [(self._sock, _POLLIN), (self._wake_r, _POLLIN)]
        # Owned by the leader: read or written only by the thread in self._leader, or under
        # self._lock while there is no leader.
        self._pending: dict[int, _Outgoing] = {}
        self._deadlines: list[tuple[float, int]] = []
        # Requests the socket could not take yet (no connected peer, or its queue is full): sent
        # in order once it is writable, or failed at their deadline.
        self._unsent: collections.deque[_Outgoing] = collections.deque()
        self._poll_out = False  # the socket is polled for POLLOUT (while _unsent is not empty)
        self._seq = 0
        self._last_send = time.monotonic()
        self._heartbeat_pending = False
        self._thread = threading.Thread(target=self._io_main, name="lmcache-client-io", daemon=True)
        self._thread.start()
        self._link_thread = threading.Thread(
            target=self._watch_link, name="lmcache-client-link", daemon=True
        )
        self._link_thread.start()

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def close(self, goodbye_timeout_s: float = 0.5) -> None:
        """Says GOODBYE (so the server releases this client's leases, handles and registrations
        now instead of after its heartbeat grace; waiting at most ``goodbye_timeout_s``, 0 to
        skip it), then fails pending requests with UnavailableError, stops the I/O thread and
        closes the socket. Idempotent and callable from any thread; from a future's done-callback
        it skips GOODBYE, returns at once and the I/O thread finishes the job."""
        me = threading.get_ident()
        from_leader = threading.current_thread() is self._thread
        with self._lock:
            if self._closed:
                return
            from_leader |= self._leader == me
        if goodbye_timeout_s > 0 and not from_leader:
            with contextlib.suppress(LMCacheError, RuntimeError):
                self.goodbye(deadline_s=goodbye_timeout_s)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            from_leader |= self._leader == me
            self._release_on_io_thread = from_leader
            self._cv.notify_all()
            if self._leader is not None and self._leader != me:
                self._wake(force=True)
        if not from_leader:
            self._thread.join()
            self._release()

    def __enter__(self: _ClientT) -> _ClientT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _release(self) -> None:
        # The socket is closed (its monitor stopped with it): the link thread is on its way out
        # and closes the monitor's socket, which term() waits for.
        if self._link_thread is not threading.current_thread():
            self._link_thread.join(timeout=5.0)  # (term() below also ends its wait)
        self._context.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self, force: bool = False) -> None:
        """Interrupts the leader's poll (call with the lock held: the pipe outlives the lock).
        Once per batch the leader takes, unless ``force``d: a burst of requests costs one
        write and one wake-up."""
        if self._wake_pending and not force:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\x01")

    # ---- generic requests --------------------------------------------------------------------

    def async_request(
        self,
        request_type: int,
        payload: Mapping[str, Any],
        *,
        deadline_s: float | None = None,
    ) -> concurrent.futures.Future[dict[str, Any]]:
        """Sends any request (also unknown or reserved ids) and returns its reply payload map."""
        return self._submit(request_type, payload, _identity, deadline_s)

    def request(
        self,
        request_type: int,
        payload: Mapping[str, Any],
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        return self._call(lambda: self.async_request(request_type, payload, deadline_s=deadline_s))

    def _submit(
        self,
        request_type: int,
        payload: Mapping[str, Any],
        convert: Converter,
        deadline_s: float | None,
        extra_wait_s: float = 0.0,
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        timeout = self._timeout_s + extra_wait_s if deadline_s is None else float(deadline_s)
        frame = encode_payload(payload)
        item = _Outgoing(int(request_type), frame, future, convert, time.monotonic() + timeout)
        me = threading.get_ident()
        send_now = False
        with self._lock:
            closed = self._closed
            down = self._link_down
            if not closed and down is None:
                self._outbox.append(item)
                if self._leader is not None:
                    if self._leader != me:
                        self._wake()
                elif not getattr(self._local, "defer", False):  # else _call() sends it
                    if self._pending or self._unsent:
                        # Requests are outstanding: the I/O thread (on its way to lead) sends
                        # this one too. Sending here would make this thread and the I/O thread
                        # trade the GIL at every socket call while a burst is submitted.
                        self._cv.notify_all()
                    else:
                        # Send it from this thread, then hand the socket to the I/O thread.
                        self._leader = me
                        send_now = True
        if closed:
            future.set_exception(UnavailableError("the client is closed"))
        elif down is not None:
            future.set_exception(UnavailableError(down))
        elif send_now:
            self._lead(None, send_only=True)
        return future

    def _call(self, submit: Callable[[], concurrent.futures.Future[T]]) -> T:
        """Runs ``submit`` (an ``async_*`` call) and waits for its future. When no other thread
        owns the socket, this thread sends the request and reads the reply itself: no hand-off
        to the I/O thread on the way out or back."""
        me = threading.get_ident()
        with self._lock:
            if self._leader == me:
                raise RuntimeError(
                    "a blocking CacheClient call from a future's done-callback would deadlock; "
                    "use the async_ form there"
                )
        self._local.defer = True
        try:
            future = submit()
        finally:
            self._local.defer = False
        lead = False
        with self._lock:
            if self._leader is None:
                if not self._closed and not future.done():
                    self._leader = me
                    lead = True
                else:
                    self._cv.notify_all()  # the I/O thread fails or sends what is queued
            else:
                self._wake()
        if lead:
            self._lead(future)
        # Every future is completed by its deadline by whichever thread leads; this wait only
        # guards against the I/O thread having died.
        try:
            return future.result(timeout=self._timeout_s + _DEFAULT_RETRIEVE_WAIT_S + 3600.0)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceededError("no reply (the client's I/O thread is gone)") from None

    # ---- session requests the transport itself sends (heartbeat, close) ------------------

    def async_ping(self, *, deadline_s: float | None = None) -> concurrent.futures.Future[None]:
        return self._submit(RequestType.PING, {}, _nothing, deadline_s)

    def ping(self, *, deadline_s: float | None = None) -> None:
        self._call(lambda: self.async_ping(deadline_s=deadline_s))

    def async_goodbye(self, *, deadline_s: float | None = None) -> concurrent.futures.Future[int]:
        return self._submit(
            RequestType.GOODBYE,
            {},
            lambda p: count_from_wire(p, "released"),
            deadline_s,
        )

    def goodbye(self, *, deadline_s: float | None = None) -> int:
        """Ends this client on the server (leases, lookup jobs, tickets, registrations) without
        closing the connection: the next request starts a new client. Returns the leases
        released (0 when blocking requests of this client were still running: they go when
        those finish). :meth:`close` sends it."""
        return self._call(lambda: self.async_goodbye(deadline_s=deadline_s))

    # ---- the I/O thread ----------------------------------------------------------------------

    def _open_socket(self) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Random, never starting with a zero byte (reserved by ZeroMQ).
            sock.setsockopt(zmq.ROUTING_ID, bytes([1 + secrets.randbelow(255)]) + os.urandom(15))
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_reply_bytes)
            if self._curve is not None:
                server_key, public, secret = self._curve
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            # Watched from before the connect, so that no event of the first connection is missed.
            self._monitor = sock.get_monitor_socket(_LINK_EVENTS)
            sock.connect(self._endpoint)
        except BaseException:
            if self._monitor is not None:
                self._monitor.close(linger=0)
            sock.close(linger=0)
            raise
        return sock

    def _watch_link(self) -> None:
        """The link thread: follows the connection's monitor. A lost connection or a refused
        handshake marks the server unreachable (new requests fail at once) and makes the leader
        fail what is in flight; a completed handshake marks it reachable again."""
        monitor = self._monitor
        assert monitor is not None
        connected = False
        try:
            while True:
                frames = monitor.recv_multipart()
                event, value = struct.unpack("=Hi", frames[0][:6])
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    connected = True
                    with self._lock:
                        if self._link_down is not None:
                            _log.info("connected to the cache server at %s again", self._endpoint)
                            self._link_down = None
                            self._cv.notify_all()  # heartbeats resume
                    continue
                if event == zmq.EVENT_DISCONNECTED:
                    if not connected:
                        continue  # the end of a refused handshake (reported already)
                    connected = False
                    why = f"lost the connection to the cache server at {self._endpoint}"
                else:
                    detail = _HANDSHAKE_FAILED.get(event, f"event {event}")
                    why = (
                        f"the handshake with the cache server at {self._endpoint} failed "
                        f"({detail}, {value}): "
                        + (
                            "is this client's CURVE key authorized there?"
                            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                            else "do both sides use CURVE, with the server's public key?"
                        )
                    )
                with self._lock:
                    if self._link_down is None:
                        _log.warning("%s; requests fail at once until a connection is made", why)
                    self._link_down = why
                    self._link_losses += 1
                    if self._leader is not None:
                        self._wake(force=True)
                    else:
                        self._cv.notify_all()
        except zmq.ZMQError:
            return  # the context is being terminated
        finally:
            monitor.close(linger=0)

    # ---- who owns the socket -----------------------------------------------------------------
    #
    # The socket has one owner at a time, the leader (self._leader, changed under self._lock):
    # * a thread in a blocking call (_call) leads when no other thread does: it sends its request,
    #   polls, completes every reply that arrives (its own and other threads') and lets go once
    #   its own future is done, so a lone caller pays no thread hand-off;
    # * a thread in an async_ call with no leader sends its request and lets go at once, if
    #   nothing is outstanding; otherwise the I/O thread (woken, on its way to lead) sends it:
    #   a burst submitted from one thread then goes out in one batch instead of making the two
    #   threads trade the GIL at every socket call;
    # * the I/O thread leads whenever requests are outstanding or queued and no one else leads,
    #   and when a heartbeat is due; it lets go when nothing is outstanding.
    # A leader that lets go while requests are outstanding wakes the I/O thread (self._cv); a
    # thread that queues a request while another thread leads wakes the leader's poll (the pipe).

    def _io_main(self) -> None:
        me = threading.get_ident()
        try:
            while True:
                with self._cv:
                    while True:
                        if self._leader is None:
                            if self._closed:
                                return  # the finally below shuts down
                            if (
                                self._outbox
                                or self._pending
                                or self._unsent
                                or self._heartbeat_due(time.monotonic())
                            ):
                                self._leader = me
                                break
                        self._cv.wait(self._idle_timeout())
                self._lead(None)
        except Exception:  # pragma: no cover - a bug; fail what is pending below
            _log.exception("cache client I/O thread failed")
        finally:
            self._shutdown()

    def _idle_timeout(self) -> float | None:
        """How long the idle I/O thread sleeps (lock held). While another thread leads, it looks
        again once per heartbeat interval: that leader sends heartbeats itself while it leads."""
        if self._heartbeat_s is None:
            return None
        if self._leader is not None or self._link_down is not None:
            return self._heartbeat_s  # (no heartbeats while the server is unreachable)
        return max(0.0, self._last_send + self._heartbeat_s - time.monotonic())

    def _heartbeat_due(self, now: float) -> bool:
        return (
            self._heartbeat_s is not None
            and not self._heartbeat_pending
            and now - self._last_send >= self._heartbeat_s
            and self._link_down is None
        )

    def _shutdown(self) -> None:
        """The I/O thread's last act: takes the socket, fails what is left, closes it."""
        me = threading.get_ident()
        with self._cv:
            self._closed = True
            while self._leader is not None and self._leader != me:
                self._wake(force=True)
                self._cv.wait(1.0)
            self._leader = me
            leftovers = list(self._outbox)
            self._outbox.clear()
            release = self._release_on_io_thread
        self._fail_all(leftovers)
        self._io = None
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()  # the link thread sees MONITOR_STOPPED and ends
        self._sock.close(linger=0)
        if release:
            self._release()

    def _lead(self, until: concurrent.futures.Future[Any] | None, send_only: bool = False) -> None:
        """Works the socket as the leader (the caller is self._leader) and then lets go: once
        ``until`` is done (a blocking call), once the queue is sent (``send_only``), or once
        nothing is outstanding (the I/O thread, ``until`` None)."""
        me = threading.get_ident()
        on_io_thread = threading.current_thread() is self._thread
        released = False
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    batch = list(self._outbox)
                    self._outbox.clear()
                    self._wake_pending = False
                    closing = self._closed
                    if not batch and not closing:
                        if send_only:
                            finished = True
                        elif until is not None:
                            finished = until.done()
                        else:
                            finished = (
                                not self._pending
                                and not self._unsent
                                and not self._heartbeat_due(now)
                            )
                        if finished:
                            self._leader = None
                            released = True
                            if (self._pending or self._unsent) and not on_io_thread:
                                self._cv.notify_all()
                            return
                if closing:
                    self._fail_all(batch)
                    return
                while self._unsent and self._send(self._unsent[0], now) != _LATER:
                    self._unsent.popleft()
                for item in batch:
                    if item.future is not None and not item.future.set_running_or_notify_cancel():
                        continue  # cancelled by the caller before it was sent
                    if self._unsent or self._send(item, now) == _LATER:
                        self._unsent.append(item)
                if self._heartbeat_due(now) and not self._unsent:
                    ping = _Outgoing(
                        RequestType.PING, _EMPTY_PAYLOAD, None, _nothing, now + self._timeout_s
                    )
                    self._heartbeat_pending = self._send(ping, now) == _SENT
                    self._last_send = now
                if send_only:
                    continue
                if self._poll_out != bool(self._unsent):
                    self._poll_out = bool(self._unsent)
                    flags = _POLLIN | _POLLOUT if self._poll_out else _POLLIN
                    self._poll_items[0] = (self._sock, flags)
                timeout_ms = self._poll_timeout_ms(now)
                polled: list[tuple[Any, int]] = zmq.zmq_poll(
                    self._poll_items, -1 if timeout_ms is None else timeout_ms
                )
                for fd, _ in polled:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                # The socket's fd is edge-triggered: read every reply queued now (up to a bound,
                # so requests queued meanwhile are not held back), whatever poll reported.
                self._receive_queued()
                if self._link_losses != self._link_seen:
                    self._fail_lost()
                later = time.monotonic()
                if self._unsent or (self._deadlines and self._deadlines[0][0] <= later):
                    self._expire(later)
        finally:
            if not released:
                with self._lock:
                    if self._leader == me:
                        self._leader = None
                    self._cv.notify_all()

    def _poll_timeout_ms(self, now: float) -> int | None:
        """Until the next deadline (a reply's or an unsent request's) or heartbeat."""
        wake_at = self._deadlines[0][0] if self._deadlines else math.inf
        for item in self._unsent:
            wake_at = min(wake_at, item.deadline)
        if self._heartbeat_s is not None and not self._heartbeat_pending and not self._link_down:
            wake_at = min(wake_at, self._last_send + self._heartbeat_s)
        return None if wake_at == math.inf else max(0, math.ceil((wake_at - now) * 1e3))

    def _fail_all(self, queued: list[_Outgoing]) -> None:
        """Fails queued, unsent and outstanding requests: the client is closed (leader only)."""
        error = UnavailableError("the client is closed")
        queued = [*self._unsent, *queued]
        self._unsent.clear()
        for item in queued:
            if item.future is not None:
                _fail(item.future, error)
        pending = list(self._pending.values())
        self._pending.clear()
        self._deadlines.clear()
        for p in pending:
            if p.future is not None:
                _fail(p.future, error)

    def _fail_lost(self) -> None:
        """The connection was lost or refused (leader only): the requests in flight will not be
        answered and those unsent would go to whatever server is there next, so all fail now.
        Replies read just before count."""
        self._link_seen = self._link_losses
        error = UnavailableError(self._link_down or f"the connection to {self._endpoint} dropped")
        items = [*self._unsent, *self._pending.values()]
        self._unsent.clear()
        self._pending.clear()
        self._deadlines.clear()
        self._heartbeat_pending = False
        for item in items:
            if item.future is not None:
                _fail(item.future, error)

    def _expire(self, now: float) -> None:
        if self._unsent and any(item.deadline <= now for item in self._unsent):
            waiting = collections.deque(item for item in self._unsent if item.deadline > now)
            for item in self._unsent:
                if item.deadline <= now and item.future is not None:
                    _fail(
                        item.future,
                        DeadlineExceededError(
                            f"could not send {_type_name(item.request_type)} to {self._endpoint} "
                            "in time (no connection to the server)"
                        ),
                    )
            self._unsent = waiting
        while self._deadlines and self._deadlines[0][0] <= now:
            _, expired_seq = heapq.heappop(self._deadlines)
            p = self._pending.pop(expired_seq, None)
            if p is None:
                continue
            if p.future is None:
                self._heartbeat_pending = False
                _log.warning("the cache server did not answer a heartbeat in time")
            else:
                _fail(
                    p.future,
                    DeadlineExceededError(
                        f"no reply to {_type_name(p.request_type)} from {self._endpoint} in time"
                    ),
                )

    def _send(self, item: _Outgoing, now: float) -> int:
        """Sends one request: _SENT; _LATER when the socket cannot take it now (zmq.Again: no
        connected peer yet, or a full queue), to be kept in _unsent; _FAILED when sending failed
        for good (its future has failed)."""
        seq = self._seq + 1 if self._seq < (1 << 64) - 1 else 1
        header = encode_request_header(item.request_type, seq)
        error = 0
        if self._io is not None and len(item.payload) < ZERO_COPY_BYTES:
            error = self._io.send((header, item.payload))
        else:  # large payloads go out zero-copy through pyzmq
            try:
                send_frames(self._sock, (header, item.payload))
            except zmq.ZMQError as exc:
                error = exc.errno or errno.EIO
        if error == errno.EAGAIN:
            return _LATER
        if error:
            if item.future is not None:
                _fail(
                    item.future,
                    UnavailableError(
                        f"cannot send to {self._endpoint}: {zmq.strerror(error)} (server down?)"
                    ),
                )
            return _FAILED
        self._seq = seq
        self._pending[seq] = item
        heapq.heappush(self._deadlines, (item.deadline, seq))
        self._last_send = now
        return _SENT

    def _receive_queued(self) -> None:
        """Reads and completes the replies queued now, up to _MAX_REPLIES_PER_POLL."""
        if self._io is not None:
            messages, error = self._io.recv(_MAX_REPLIES_PER_POLL)
            for frames in messages:
                if self._complete(frames):
                    self._heartbeat_pending = False
            if error:
                _log.warning("receive from %s failed: %s", self._endpoint, zmq.strerror(error))
            return
        for _ in range(_MAX_REPLIES_PER_POLL):
            # Checked first: a failed non-blocking read would cost an exception.
            if not readable(self._sock):
                return
            try:
                frames = recv_frames(self._sock)
            except zmq.Again:
                return
            if self._complete(frames):
                self._heartbeat_pending = False

    def _complete(self, frames: list[bytes]) -> bool:
        """Completes the request a reply answers; returns whether it answered a heartbeat."""
        try:
            reply = decode_reply(frames, self._max_reply_bytes)
        except ProtocolError as exc:
            _log.warning("dropped a malformed reply from %s: %s", self._endpoint, exc.message)
            return False
        p = self._pending.pop(reply.seq, None)
        if p is None:
            _log.debug("reply to seq %d arrived after its deadline", reply.seq)
            return False
        if p.future is None:
            if not reply.ok:
                _log.warning("heartbeat answered %s", from_code(reply.status, reply.message))
            return True
        if not reply.ok:
            _fail(p.future, from_code(reply.status, reply.message))
            return False
        try:
            result = p.convert(reply.payload)
        except ProtocolError as exc:
            _fail(p.future, InternalError(exc.message))
            return False
        except LMCacheError as exc:
            _fail(p.future, exc)
            return False
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            p.future.set_result(result)
        return False


def _fail(future: concurrent.futures.Future[Any], error: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(error)


def _type_name(request_type: int) -> str:
    try:
        return RequestType(request_type).name
    except ValueError:
        return f"request type {request_type}"
