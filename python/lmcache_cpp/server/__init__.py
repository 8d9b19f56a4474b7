"""The cache server: a ZeroMQ ROUTER in front of a ``_core.CacheEngine``.

Threads (see ``docs/protocol.md`` for the wire format and the request table):

* **The socket thread** owns the ROUTER socket and is the only thread that touches it. It decodes
  every request (:mod:`lmcache_cpp.protocol`), runs the fast handlers itself, hands the pool's
  requests to the worker pool, parks the waits, sends every reply, tracks clients (identity ->
  client id, last seen), drops silent clients and calls ``engine.reap_expired()`` once per
  ``reap_interval_s``. It sleeps in ``zmq.Poller.poll`` on the ROUTER, the pool's result socket,
  a wake-up pipe and the engine's completion notice; the poll timeout is the reaper tick or the
  next parked deadline. The per-prompt requests of admitted clients are read, answered and
  counted by ``_core.RouterLoop`` (C++, on this thread, without the GIL); it hands every other
  message to the Python code here.
* **Worker threads** (``worker_threads``) run the requests that may block briefly (SYNC_LOOKUP
  asking L2, CLEAR), one client's queue after another's, calling the engine with the GIL
  released. Each has its own inproc PUSH socket; the encoded reply goes back to the socket
  thread's PULL socket, which sends it. Waits for L2 (WAIT_PREFETCH_STATUS, PREPARE_RETRIEVE and
  FREE_LOOKUP_LOCKS joining a load) never hold a thread: they are parked and answered from the
  engine's completion notice or at their deadline.

Client identity: each new ZeroMQ routing identity gets a fresh random nonzero 63-bit client id;
a client that sends nothing for ``heartbeat_grace_s`` (and has no request in the pool) is dropped
and everything it holds in the engine is released (``engine.end_client``). HELLO is not required
before other requests; it is the version handshake and tells the client its id and the limits.

Security: the server refuses a TCP endpoint on a non-loopback address unless ``allow_remote`` is
set, and then requires a CURVE key pair (ZeroMQ CURVE: the traffic is encrypted and the server is
authenticated). ``curve_authorized_clients_dir`` (a directory of client public-key certificates)
restricts which clients may connect; without it any client that knows the server's public key may.
An ``ipc://`` socket file is chmod-ed to ``ipc_mode`` (0o600: only this user) after the bind.

The package: :mod:`.options` (ServerOptions and the endpoint check), :mod:`.dispatcher` (decode
and execute, no sockets), :mod:`.cache_server` (the sockets and threads).
"""

from __future__ import annotations

from lmcache_cpp.server.cache_server import CacheServer
from lmcache_cpp.server.dispatcher import (
    BLOCKING_REQUESTS,
    BLOCKING_WITHOUT_L2,
    PARKED_REQUESTS,
    Dispatcher,
    EngineLike,
    RequestMetrics,
    engine_key,
    kv_cache_layout,
)
from lmcache_cpp.server.options import ServerOptions, check_endpoint

__all__ = [
    "BLOCKING_REQUESTS",
    "BLOCKING_WITHOUT_L2",
    "PARKED_REQUESTS",
    "CacheServer",
    "Dispatcher",
    "EngineLike",
    "RequestMetrics",
    "ServerOptions",
    "check_endpoint",
    "engine_key",
    "kv_cache_layout",
]
