"""Prometheus metrics of the server: request counters and latencies, engine statistics.

:class:`Metrics` collects per-request outcomes and latencies (thread safe) and renders them,
together with a snapshot of the engine's statistics dict, in the Prometheus text exposition
format 0.0.4. :class:`MetricsHTTPServer` serves that text at ``GET /metrics`` and a liveness probe
at ``GET /healthz`` from a daemon thread (standard library only).

Every metric name starts with ``lmcache_cpp_``. Engine statistics (``CacheEngine.stats()``) map
to gauges and counters by the native stats classes' ``fields()``: each field's metric name, kind
and help are written once, in its C++ struct's table (``lmcache_cpp/stat_fields.h``). A key
without a metric is still exported, as an ``untyped`` metric named after its section and key,
and missing keys are simply left out, so the exporter never breaks when the engine grows a
counter.
"""

from __future__ import annotations

import bisect
import http.server
import ipaddress
import itertools
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lmcache_cpp import _core

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "PREFIX",
    "Metrics",
    "MetricsHTTPServer",
]

_log = logging.getLogger(__name__)

PREFIX: Final = "lmcache_cpp_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Request latency buckets in seconds: 10 us to 10 s, 1-2.5-5 steps per decade.
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    1e-05,
    2.5e-05,
    5e-05,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Label values beyond these many distinct request names / outcomes are folded into OTHER, so a
# misbehaving caller cannot grow the exposition without bound.
DEFAULT_MAX_LABEL_VALUES: Final = 128
OTHER: Final = "_other"
# How often the serving thread checks for stop(): the bound on how long stop() waits.
_POLL_INTERVAL_S: Final = 0.1


# ---------------------------------------------------------------------------------------------
# Text format helpers


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


_NAME_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_]")


def _sanitize(name: str) -> str:
    cleaned = _NAME_UNSAFE.sub("_", name)
    return "_" + cleaned if cleaned[:1].isdigit() else cleaned


class _Writer:
    """Accumulates metric families; a family name is written once (later duplicates dropped)."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._families: set[str] = set()

    def family(
        self,
        name: str,
        kind: str,
        help: str,
        samples: Sequence[tuple[str, Sequence[tuple[str, str]], float]],
        *,
        always: bool = False,
    ) -> None:
        """Writes HELP/TYPE and ``samples`` (suffix, labels, value); skips an empty family."""
        if name in self._families or (not samples and not always):
            return
        self._families.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self._lines.append(f"{name}{suffix}{_labels(labels)} {_format_value(value)}")

    def has(self, name: str) -> bool:
        return name in self._families

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Engine statistics tables


@dataclass(frozen=True)
class _Stat:
    key: str  # key in the section's dict
    name: str  # metric name without PREFIX
    kind: str  # "gauge" or "counter"
    help: str


def _table(fields: Iterable[_core.StatField]) -> tuple[_Stat, ...]:
    """The exported ones of a native stats class's ``fields()`` (each described once, in C++)."""
    return tuple(_Stat(f.name, f.metric, f.kind, f.help) for f in fields if f.metric)


# A Redis tier's entry also carries RedisAdapterStats (families without samples are left out).
_L2_STATS: Final = (
    *_table(_core.L2AdapterStats.fields()),
    *_table(_core.RedisAdapterStats.fields()),
)

# What each client holds (CacheEngine.client_usage(): the "clients" list), labelled by client id;
# the server adds "blocking" to the engine's fields.
_CLIENT_STATS: Final = (
    *_table(_core.ClientUsage.fields()),
    _Stat(
        "blocking",
        "client_blocking_requests",
        "gauge",
        "The client's pool requests and parked waits.",
    ),
)

_SECTIONS: Final[dict[str, tuple[_Stat, ...]]] = {
    "engine": _table(_core.EngineStats.fields()),
    "l1": _table(_core.ObjectTableStats.fields()),
    "prefetch": _table(_core.PrefetchStats.fields()),
    "store": _table(_core.StoreControllerStats.fields()),
}


def _number(value: object) -> float | None:
    """``value`` as a sample value (bools as 0/1), or None for non-numbers."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def _flatten(prefix: str, value: object, out: list[tuple[str, float]]) -> None:
    """Numeric leaves of nested dicts as (``prefix_key_subkey``, value); other values skipped."""
    number = _number(value)
    if number is not None:
        out.append((prefix, number))
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}_{_sanitize(str(key))}", sub, out)


# ---------------------------------------------------------------------------------------------
# Metrics


RequestSource = Callable[
    [], tuple[Mapping[tuple[str, str], int], Mapping[str, tuple[Sequence[int], float]]]
]
"""See :meth:`Metrics.add_source`."""


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0


class Metrics:
    """Request counters and latency histograms, plus rendering with engine statistics.

    Thread safety: every method may be called from any thread; ``record`` takes one short lock.
    """

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError("buckets must be a non-empty, strictly increasing sequence")
        if any(not math.isfinite(b) for b in bounds):
            raise ValueError("buckets must be finite (+Inf is implicit)")
        if max_label_values < 1:
            raise ValueError("max_label_values must be >= 1")
        self._bounds: tuple[float, ...] = tuple(bounds)
        self._max_label_values = max_label_values
        self._lock = threading.Lock()
        # Guarded by _lock.
        self._requests: dict[tuple[str, str], int] = {}
        self._histograms: dict[str, _Histogram] = {}
        self._outcomes: set[str] = set()
        self._sources: list[RequestSource] = []

    @property
    def buckets(self) -> tuple[float, ...]:
        return self._bounds

    def record(self, request_name: str, outcome: str, seconds: float) -> None:
        """Counts one handled request of ``request_name`` with ``outcome`` that took ``seconds``.

        Negative or NaN durations count as 0. Past ``max_label_values`` distinct names (or
        outcomes), new ones are counted under ``"_other"``.
        """
        value = seconds if seconds > 0 else 0.0  # also maps NaN to 0
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            if (
                request_name not in self._histograms
                and len(self._histograms) >= self._max_label_values
            ):
                request_name = OTHER
            if outcome not in self._outcomes:
                if len(self._outcomes) >= self._max_label_values:
                    outcome = OTHER
                self._outcomes.add(outcome)
            key = (request_name, outcome)
            self._requests[key] = self._requests.get(key, 0) + 1
            hist = self._histograms.get(request_name)
            if hist is None:
                hist = self._histograms[request_name] = _Histogram(len(self._bounds))
            hist.counts[index] += 1
            hist.sum += value

    def add_source(self, source: RequestSource) -> None:
        """Adds requests counted elsewhere on these buckets (the server's C++ loop) to what
        :meth:`render` shows. ``source()`` returns its totals so far: ({(request name, outcome):
        count}, {request name: (per-bucket counts, len(buckets) + 1 of them, sum of seconds)})."""
        with self._lock:
            self._sources.append(source)

    def render(self, stats: Mapping[str, Any] | None = None) -> str:
        """The exposition text: request metrics, then the engine ``stats`` dict (may be partial)."""
        with self._lock:
            requests = dict(self._requests)
            histograms = {name: (list(h.counts), h.sum) for name, h in self._histograms.items()}
            sources = list(self._sources)
        for source in sources:
            try:
                more_requests, more_histograms = source()
            except Exception:
                _log.exception("a request metrics source failed")
                continue
            for key, count in more_requests.items():
                requests[key] = requests.get(key, 0) + count
            for name, (counts, total) in more_histograms.items():
                if len(counts) != len(self._bounds) + 1:
                    _log.error("request metrics source: %d buckets for %s", len(counts), name)
                    continue
                mine = histograms.get(name)
                if mine is None:
                    histograms[name] = (list(counts), total)
                else:
                    histograms[name] = (
                        [a + b for a, b in zip(mine[0], counts, strict=True)],
                        mine[1] + total,
                    )
        out = _Writer()
        out.family(
            f"{PREFIX}build_info",
            "gauge",
            "Version of lmcache_cpp serving these metrics (always 1).",
            [("", [("version", _core.version())], 1)],
        )
        out.family(
            f"{PREFIX}requests_total",
            "counter",
            "Requests handled, by request type and outcome.",
            [
                ("", [("request", name), ("outcome", outcome)], count)
                for (name, outcome), count in sorted(requests.items())
            ],
            always=True,
        )
        samples: list[tuple[str, Sequence[tuple[str, str]], float]] = []
        for name, (counts, total) in sorted(histograms.items()):
            cumulative = 0
            for bound, count in zip(self._bounds, counts[:-1], strict=True):
                cumulative += count
                samples.append(
                    ("_bucket", [("request", name), ("le", _format_value(bound))], cumulative)
                )
            cumulative += counts[-1]
            samples.append(("_bucket", [("request", name), ("le", "+Inf")], cumulative))
            samples.append(("_sum", [("request", name)], total))
            samples.append(("_count", [("request", name)], cumulative))
        out.family(
            f"{PREFIX}request_duration_seconds",
            "histogram",
            "Server-side handling time of requests, by request type.",
            samples,
            always=True,
        )
        if stats:
            _render_stats(out, stats)
        return out.text()


def _render_stats(out: _Writer, stats: Mapping[str, Any]) -> None:
    for section, table in _SECTIONS.items():
        values = stats.get(section)
        if isinstance(values, Mapping):
            _render_section(out, section, values, table)
    adapters = stats.get("l2")
    if isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes)):
        _render_l2(out, [a for a in adapters if isinstance(a, Mapping)])
    clients = stats.get("clients")
    if isinstance(clients, Sequence) and not isinstance(clients, (str, bytes)):
        _render_clients(out, [c for c in clients if isinstance(c, Mapping)])
    # Everything else: the engine's own counters and any section this module does not know.
    for section, values in stats.items():
        if section in _SECTIONS or section in ("l2", "clients"):
            continue
        _render_untyped(out, _sanitize(str(section)), values, set())


def _render_section(
    out: _Writer, section: str, values: Mapping[str, Any], table: Sequence[_Stat]
) -> None:
    known: set[str] = set()
    for stat in table:
        known.add(stat.key)
        number = _number(values.get(stat.key))
        if number is not None:
            out.family(PREFIX + stat.name, stat.kind, stat.help, [("", (), number)])
    _render_untyped(out, section, values, known)


def _render_untyped(out: _Writer, section: str, values: object, skip: set[str]) -> None:
    leaves: list[tuple[str, float]] = []
    if isinstance(values, Mapping):
        for key, value in values.items():
            if str(key) not in skip:
                _flatten(f"{section}_{_sanitize(str(key))}", value, leaves)
    else:
        _flatten(section, values, leaves)
    for name, number in leaves:
        out.family(
            PREFIX + name,
            "untyped",
            f"Engine statistic {name} (exported as reported).",
            [("", (), number)],
        )


def _render_clients(out: _Writer, clients: Sequence[Mapping[str, Any]]) -> None:
    for stat in _CLIENT_STATS:
        samples: list[tuple[str, Sequence[tuple[str, str]], float]] = []
        for client in clients:
            number = _number(client.get(stat.key))
            if number is not None:
                samples.append(("", [("client", str(client.get("client", "")))], number))
        out.family(PREFIX + stat.name, stat.kind, stat.help, samples)


def _render_l2(out: _Writer, adapters: Sequence[Mapping[str, Any]]) -> None:
    def labels(index: int, adapter: Mapping[str, Any]) -> list[tuple[str, str]]:
        pairs = [("adapter", str(index))]
        name = adapter.get("name")
        if isinstance(name, str):
            pairs.append(("name", name))
        return pairs

    known = {stat.key for stat in _L2_STATS} | {"name"}
    for stat in _L2_STATS:
        samples: list[tuple[str, Sequence[tuple[str, str]], float]] = []
        for i, adapter in enumerate(adapters):
            number = _number(adapter.get(stat.key))
            if number is not None:
                samples.append(("", labels(i, adapter), number))
        out.family(PREFIX + stat.name, stat.kind, stat.help, samples)
    extra: dict[str, list[tuple[str, Sequence[tuple[str, str]], float]]] = {}
    for i, adapter in enumerate(adapters):
        for key, value in adapter.items():
            if str(key) in known:
                continue
            leaves: list[tuple[str, float]] = []
            _flatten(f"l2_{_sanitize(str(key))}", value, leaves)
            for name, number in leaves:
                extra.setdefault(name, []).append(("", labels(i, adapter), number))
    for name, samples in extra.items():
        out.family(
            PREFIX + name,
            "untyped",
            f"L2 adapter statistic {name} (exported as reported).",
            samples,
        )


# ---------------------------------------------------------------------------------------------
# HTTP endpoint


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: MetricsHTTPServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10.0  # seconds a connection may idle before the handler thread gives up

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        if path == "/metrics":
            status, content_type, body = owner._metrics_response()
        elif path == "/healthz":
            status, content_type, body = owner._health_response()
        else:
            status, content_type, body = 404, "text/plain; charset=utf-8", b"not found\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("metrics http %s: " + format, self.address_string(), *args)


class MetricsHTTPServer:
    """Serves ``GET /metrics`` and ``GET /healthz`` on ``host:port`` from a daemon thread.

    ``/metrics`` renders ``metrics`` with ``stats_fn()`` (500 if it raises); ``/healthz`` answers
    200 "ok" when ``health_fn()`` is true and 503 otherwise (also when it raises); anything else is
    404. ``start`` binds in the calling thread (bind errors raise ``OSError`` there) and is a no-op
    when running; ``stop`` is idempotent and joins the thread. ``port`` is the bound port once
    started (port 0 picks a free one). A stopped server cannot be started again.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        stats_fn: Callable[[], Mapping[str, Any]],
        health_fn: Callable[[], bool],
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not in 0..65535")
        self._host = host
        self._port = port
        self._metrics = metrics
        self._stats_fn = stats_fn
        self._health_fn = health_fn
        self._lock = threading.Lock()
        # Guarded by _lock.
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port after ``start`` (the requested one before)."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if _is_ipv6(self._host) else self._host
        return f"http://{host}:{self._port}"

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("MetricsHTTPServer was stopped; create a new one")
            if self._server is not None:
                return
            cls = _HTTPServer6 if _is_ipv6(self._host) else _HTTPServer
            server = cls((self._host.strip("[]"), self._port), _Handler)
            server.owner = self
            self._port = int(server.server_address[1])
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL_S},
                name="lmcache-metrics-http",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        _log.info("metrics endpoint at %s/metrics", self.url)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()  # returns once serve_forever has exited
        server.server_close()
        thread.join()

    def __enter__(self) -> MetricsHTTPServer:
        self.start()
        return self

    def __exit__(self, *args: object) -> None:
        self.stop()

    # -- responses (handler threads) ----------------------------------------------------------

    def _metrics_response(self) -> tuple[int, str, bytes]:
        try:
            stats = self._stats_fn()
        except Exception:
            _log.warning("metrics: reading engine statistics failed", exc_info=True)
            return 500, "text/plain; charset=utf-8", b"engine statistics unavailable\n"
        return 200, CONTENT_TYPE, self._metrics.render(stats).encode("utf-8")

    def _health_response(self) -> tuple[int, str, bytes]:
        try:
            healthy = bool(self._health_fn())
        except Exception:
            _log.warning("metrics: health check raised", exc_info=True)
            healthy = False
        if healthy:
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 503, "text/plain; charset=utf-8", b"unhealthy\n"


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False
