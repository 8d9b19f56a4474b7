"""The cache server as one object: storage, engine, ZeroMQ server and the optional metrics port.

:class:`ServerApp` is what ``lmcache-cpp serve`` runs, and what the demo, the tests and the
benchmarks start in-process or in a child process. It builds everything from a
:class:`~lmcache_cpp.config.ServerConfig` and shuts it down in the one safe order. The order is:
the socket server first, so no request reaches a stopping engine; then the metrics port; then the
engine's reaper; then the storage manager, which closes the L2 adapters and joins every core
thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lmcache_cpp import _core
from lmcache_cpp.config import ServerConfig, build_storage, server_options
from lmcache_cpp.metrics import Metrics, MetricsHTTPServer
from lmcache_cpp.server import CacheServer, ServerOptions

__all__ = [
    "EXIT_SERVER_FAILED",
    "ServerApp",
    "read_admin_token",
    "run_forever",
    "serve_argv",
    "write_admin_token",
]

_log = logging.getLogger(__name__)

# The exit status of `lmcache-cpp serve` when the server stopped serving by itself (its socket
# thread failed): non-zero, so that a supervisor restarts it (EX_SOFTWARE).
EXIT_SERVER_FAILED = 70


def write_admin_token(path: str) -> str:
    """A fresh admin token, written to ``path`` readable by this user only (0600, replacing any
    previous file atomically). Whoever can read it may force a CLEAR."""
    token = secrets.token_hex(32)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".admin-token-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return token


def serve_argv(endpoint: str, *flags: str) -> list[str]:
    """The command line that runs ``lmcache-cpp serve`` on ``endpoint`` with this interpreter,
    for a parent process that starts the server as a child."""
    return [sys.executable, "-m", "lmcache_cpp", "serve", "--endpoint", endpoint, *flags]


def read_admin_token(path: str) -> str:
    """The admin token a server wrote to ``path``."""
    with open(path, encoding="ascii") as f:
        return f.read().strip()


class ServerApp:
    """A running cache server built from a :class:`ServerConfig`.

    ``start()`` raises on any setup error and leaves nothing running. ``stop()`` is idempotent.
    The object is also a context manager. ``extra_l2_adapters`` go in front of the configured L2
    tiers and are closed with them (:func:`~lmcache_cpp.config.build_storage`).
    """

    def __init__(
        self, config: ServerConfig, extra_l2_adapters: Sequence[_core.L2Adapter] = ()
    ) -> None:
        self._config = config
        self._extra_l2_adapters = tuple(extra_l2_adapters)
        self._lock = threading.Lock()
        self._storage: _core.StorageManager | None = None
        self._engine: _core.CacheEngine | None = None
        self._server: CacheServer | None = None
        self._admin_token_path: str | None = None
        self._http: MetricsHTTPServer | None = None
        self._metrics = Metrics()
        self._started_at = 0.0

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def endpoint(self) -> str:
        """The bound endpoint (a tcp port of 0 resolved). REQUIRES: started."""
        if self._server is None:
            raise RuntimeError("ServerApp is not started")
        return self._server.bound_endpoint

    @property
    def metrics_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    @property
    def engine(self) -> _core.CacheEngine:
        if self._engine is None:
            raise RuntimeError("ServerApp is not started")
        return self._engine

    @property
    def server(self) -> CacheServer:
        if self._server is None:
            raise RuntimeError("ServerApp is not started")
        return self._server

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            try:
                storage, engine = build_storage(self._config, self._extra_l2_adapters)
                self._storage, self._engine = storage, engine
                token_path = self._config.admin_token_path()
                admin_token = None if token_path is None else write_admin_token(token_path)
                self._admin_token_path = token_path
                options = ServerOptions(**server_options(self._config), admin_token=admin_token)
                server = CacheServer(engine, storage, options, self._metrics)
                server.start()
                self._server = server
                if self._config.metrics_port is not None:
                    http = MetricsHTTPServer(
                        self._config.metrics_host,
                        self._config.metrics_port,
                        self._metrics,
                        self._stats,
                        self._healthy,
                    )
                    http.start()
                    self._http = http
            except BaseException:
                self._stop_locked()
                raise
            self._started_at = time.monotonic()
            _log.info(
                "lmcache_cpp server on %s (L1 %.2f GiB, chunk %d tokens, %d L2 adapter(s)%s)",
                server.bound_endpoint,
                storage.arena().size / 2**30,
                engine.chunk_size,
                len(storage.adapters()),
                f", metrics on {self._http.url}" if self._http is not None else "",
            )

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._admin_token_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._admin_token_path)
            self._admin_token_path = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._engine is not None:
            self._engine.stop()
        if self._storage is not None:
            self._storage.stop()
        self._engine = None
        self._storage = None

    def _stats(self) -> dict[str, Any]:
        engine = self._engine
        if engine is None:
            return {}
        stats = dict(engine.stats())
        server = self._server
        stats["clients"] = (
            server.client_usage() if server is not None else list(engine.client_usage())
        )
        return stats

    def _healthy(self) -> bool:
        server = self._server
        return server is not None and server.running

    def __enter__(self) -> ServerApp:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_forever(
    config: ServerConfig,
    ready_line: bool = True,
    extra_l2_adapters: Sequence[_core.L2Adapter] = (),
) -> int:
    """Serves until SIGINT or SIGTERM; returns the exit status. ``extra_l2_adapters``: as
    :class:`ServerApp`.

    When ``ready_line`` is set, prints ``READY <endpoint>`` on stdout once the socket is bound, so a
    parent process can wait for it.
    """
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        _log.info("signal %d: shutting down", signum)
        stop.set()

    failed: list[BaseException] = []

    def _on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ServerApp(config, extra_l2_adapters) as app:
            app.server.on_fatal(_on_fatal)
            if ready_line:
                print(f"READY {app.endpoint}", flush=True)
            while not stop.wait(timeout=3600.0):
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        _log.critical("exiting: the server stopped serving (%r)", failed[0])
        return EXIT_SERVER_FAILED
    return 0
