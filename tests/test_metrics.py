"""Prometheus metrics: exact values in the exposition text, engine stats, the HTTP endpoint."""

from __future__ import annotations

import http.client
import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

import lmcache_cpp as lc
from lmcache_cpp import config
from lmcache_cpp.metrics import CONTENT_TYPE, DEFAULT_BUCKETS, Metrics, MetricsHTTPServer

# ---- a small parser of the text format 0.0.4 ------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$")
_HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Labels = frozenset[tuple[str, str]]


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def value(self, metric: str, /, **labels: str) -> float:
        return self.samples[(metric, frozenset(labels.items()))]

    def series(self, name: str) -> dict[Labels, float]:
        return {lab: v for (n, lab), v in self.samples.items() if n == name}


def _parse_labels(text: str) -> Labels:
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label set at {text[pos:]!r}"
        value = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pairs.append((m.group(1), value))
        pos = m.end()
    assert len({k for k, _ in pairs}) == len(pairs), "repeated label name"
    return frozenset(pairs)


def _family_of(name: str, types: Mapping[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return name


def parse_exposition(text: str) -> Exposition:
    """Parses and checks: TYPE once per family before its samples, families contiguous."""
    assert text.endswith("\n")
    out = Exposition()
    finished: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        assert line, "blank line"
        if m := _HELP.match(line):
            assert m.group(1) not in out.helps, f"second HELP for {m.group(1)}"
            out.helps[m.group(1)] = m.group(2)
            continue
        if m := _TYPE.match(line):
            name = m.group(1)
            assert name not in out.types, f"second TYPE for {name}"
            out.types[name] = m.group(2)
            if current is not None:
                finished.add(current)
            current = name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, raw = m.group(1), _parse_labels(m.group(2) or ""), m.group(3)
        family = _family_of(name, out.types)
        assert family in out.types, f"sample before its TYPE: {line!r}"
        assert family == current and family not in finished, f"family {family} not contiguous"
        key = (name, labels)
        assert key not in out.samples, f"duplicate sample {line!r}"
        out.samples[key] = float(raw)  # float() reads +Inf, -Inf, NaN
    return out


# ---- Metrics --------------------------------------------------------------------------------


def test_requests_and_latency_histogram_exact_values() -> None:
    m = Metrics()
    m.record("LOOKUP", "ok", 0.00002)  # le=2.5e-05
    m.record("LOOKUP", "ok", 0.003)  # le=0.005
    m.record("LOOKUP", "error", 20.0)  # only +Inf
    m.record("PING", "ok", 1e-05)  # exactly a bound: le is inclusive
    e = parse_exposition(m.render({}))

    assert e.types["lmcache_cpp_requests_total"] == "counter"
    assert e.series("lmcache_cpp_requests_total") == {
        frozenset({("request", "LOOKUP"), ("outcome", "ok")}): 2,
        frozenset({("request", "LOOKUP"), ("outcome", "error")}): 1,
        frozenset({("request", "PING"), ("outcome", "ok")}): 1,
    }
    h = "lmcache_cpp_request_duration_seconds"
    assert e.types[h] == "histogram"
    buckets = {
        float(dict(lab)["le"]): v
        for lab, v in e.series(h + "_bucket").items()
        if dict(lab)["request"] == "LOOKUP"
    }
    assert sorted(b for b in buckets if math.isfinite(b)) == list(DEFAULT_BUCKETS)
    assert buckets[1e-05] == 0
    assert buckets[2.5e-05] == 1
    assert buckets[0.0025] == 1
    assert buckets[0.005] == 2
    assert buckets[10.0] == 2
    assert buckets[math.inf] == 3
    assert e.value(h + "_count", request="LOOKUP") == 3
    assert e.value(h + "_sum", request="LOOKUP") == pytest.approx(20.00302)
    assert e.value(h + "_bucket", request="PING", le="1e-05") == 1
    assert e.value(h + "_count", request="PING") == 1
    assert e.value("lmcache_cpp_build_info", version=lc.__version__) == 1


def test_buckets_are_cumulative_and_monotonic() -> None:
    m = Metrics()
    for i in range(60):
        m.record("STORE", "ok", 10 ** (-5 + i / 10))  # 10 us .. ~8 s
    e = parse_exposition(m.render())
    pairs = sorted(
        (float(dict(lab)["le"]), v)
        for lab, v in e.series("lmcache_cpp_request_duration_seconds_bucket").items()
    )
    counts = [v for _, v in pairs]
    assert counts == sorted(counts) and counts[-1] == 60


def test_empty_metrics_still_declare_the_request_families() -> None:
    e = parse_exposition(Metrics().render())
    assert e.types["lmcache_cpp_requests_total"] == "counter"
    assert e.types["lmcache_cpp_request_duration_seconds"] == "histogram"
    assert e.series("lmcache_cpp_requests_total") == {}


def test_label_values_are_escaped() -> None:
    m = Metrics()
    weird = 'a"b\\c\nd'
    m.record(weird, "ok", 0.001)
    text = m.render()
    assert "\nd" not in text.replace("\\n", "")  # no raw newline inside a label
    e = parse_exposition(text)
    assert e.value("lmcache_cpp_requests_total", request=weird, outcome="ok") == 1


def test_bad_durations_count_as_zero() -> None:
    m = Metrics()
    m.record("X", "ok", -1.0)
    m.record("X", "ok", float("nan"))
    e = parse_exposition(m.render())
    assert e.value("lmcache_cpp_request_duration_seconds_bucket", request="X", le="1e-05") == 2
    assert e.value("lmcache_cpp_request_duration_seconds_sum", request="X") == 0


def test_label_cardinality_is_bounded() -> None:
    m = Metrics(max_label_values=2)
    for name in ("A", "B", "C", "D"):
        m.record(name, name.lower(), 0.001)
    e = parse_exposition(m.render())
    requests = e.series("lmcache_cpp_requests_total")
    assert requests == {
        frozenset({("request", "A"), ("outcome", "a")}): 1,
        frozenset({("request", "B"), ("outcome", "b")}): 1,
        frozenset({("request", "_other"), ("outcome", "_other")}): 2,
    }


def test_invalid_buckets_are_rejected() -> None:
    with pytest.raises(ValueError):
        Metrics(buckets=[])
    with pytest.raises(ValueError):
        Metrics(buckets=[0.1, 0.1])
    with pytest.raises(ValueError):
        Metrics(buckets=[0.1, math.inf])


def test_concurrent_records_are_all_counted() -> None:
    m = Metrics()
    threads, per_thread = 4, 2000
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            m.record("LOOKUP", "ok" if i % 2 else "error", 0.5)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    e = parse_exposition(m.render())
    assert e.value("lmcache_cpp_requests_total", request="LOOKUP", outcome="ok") == 4000
    assert e.value("lmcache_cpp_requests_total", request="LOOKUP", outcome="error") == 4000
    assert e.value("lmcache_cpp_request_duration_seconds_count", request="LOOKUP") == 8000
    assert e.value("lmcache_cpp_request_duration_seconds_sum", request="LOOKUP") == 4000.0


# ---- engine statistics ----------------------------------------------------------------------

STATS: dict[str, Any] = {
    "engine": {"registrations": 2, "lookups": 17, "hit_chunks": 40, "brand_new_counter": 5},
    "l1": {"capacity_bytes": 1 << 30, "used_bytes": 12345, "objects": 7, "evictions": 3},
    "prefetch": {"jobs": 4, "l1_hit_keys": 11, "l2_hit_keys": 9},
    "store": {"queued": 1, "stored": 6},
    "l2": [
        {"name": "memory", "objects": 5, "bytes": 500, "stores": 8, "loads": 2},
        {"name": "fs:/var/cache/lmc", "objects": 1, "bytes": 100, "stores": 1, "extra": 3},
    ],
    "version": "0.1.0",
    "uptime_s": 12.5,
    "flags": {"ready": True, "nested": {"depth": 2}},
}


def test_engine_stats_become_gauges_and_counters() -> None:
    e = parse_exposition(Metrics().render(STATS))
    expected = {
        "lmcache_cpp_l1_capacity_bytes": ("gauge", 1 << 30),
        "lmcache_cpp_l1_used_bytes": ("gauge", 12345),
        "lmcache_cpp_l1_objects": ("gauge", 7),
        "lmcache_cpp_l1_evictions_total": ("counter", 3),
        "lmcache_cpp_prefetch_jobs": ("gauge", 4),
        "lmcache_cpp_prefetch_l1_hit_keys_total": ("counter", 11),
        "lmcache_cpp_prefetch_l2_hit_keys_total": ("counter", 9),
        "lmcache_cpp_store_queued_keys": ("gauge", 1),
        "lmcache_cpp_store_stored_total": ("counter", 6),
        "lmcache_cpp_engine_registrations": ("gauge", 2),
        "lmcache_cpp_engine_lookups_total": ("counter", 17),
        "lmcache_cpp_engine_hit_chunks_total": ("counter", 40),
        "lmcache_cpp_engine_brand_new_counter": ("untyped", 5),
        "lmcache_cpp_uptime_s": ("untyped", 12.5),
        "lmcache_cpp_flags_ready": ("untyped", 1),
        "lmcache_cpp_flags_nested_depth": ("untyped", 2),
    }
    for name, (kind, value) in expected.items():
        assert e.types[name] == kind, name
        assert e.value(name) == value, name
        assert e.helps[name], name
    # Strings are not samples; keys that were not reported are not invented.
    assert not any("version" in n and n != "lmcache_cpp_build_info" for n in e.types)
    assert "lmcache_cpp_l1_read_leases" not in e.types


def test_l2_adapters_are_labelled() -> None:
    e = parse_exposition(Metrics().render(STATS))
    assert e.types["lmcache_cpp_l2_objects"] == "gauge"
    assert e.types["lmcache_cpp_l2_stores_total"] == "counter"
    assert e.value("lmcache_cpp_l2_objects", adapter="0", name="memory") == 5
    assert e.value("lmcache_cpp_l2_bytes", adapter="1", name="fs:/var/cache/lmc") == 100
    assert e.value("lmcache_cpp_l2_stores_total", adapter="1", name="fs:/var/cache/lmc") == 1
    assert e.series("lmcache_cpp_l2_loads_total") == {
        frozenset({("adapter", "0"), ("name", "memory")}): 2
    }
    assert e.value("lmcache_cpp_l2_extra", adapter="1", name="fs:/var/cache/lmc") == 3


@pytest.mark.parametrize(
    "stats",
    [
        {},
        {"l1": {}},
        {"l1": None, "l2": "nonsense", "engine": [1, 2]},
        {"l2": [{}, {"objects": "many"}, 7]},
        {"prefetch": {"jobs": float("nan"), "submitted": float("inf")}},
    ],
)
def test_partial_or_odd_stats_still_render(stats: dict[str, Any]) -> None:
    e = parse_exposition(Metrics().render(stats))
    assert "lmcache_cpp_requests_total" in e.types


def test_real_engine_stats_render() -> None:
    if not config.engine_available():
        pytest.skip("the installed lmcache_cpp._core predates the CacheEngine binding")
    c = config.ServerConfig(
        l1_size_gb=4 / 1024, hugepages="off", l2_adapters=[{"type": "memory", "capacity_gb": 0.001}]
    )
    storage, engine = config.build_storage(c)
    try:
        stats = engine.stats()
    finally:
        engine.stop()
        storage.stop()
        for adapter in storage.adapters():
            adapter.close()
    e = parse_exposition(Metrics().render(stats))
    assert e.value("lmcache_cpp_l1_capacity_bytes") == 4 * 1024 * 1024
    (labels,) = e.series("lmcache_cpp_l2_capacity_bytes")
    assert dict(labels)["adapter"] == "0"
    assert e.series("lmcache_cpp_l2_capacity_bytes")[labels] == int(0.001 * 1024**3)
    assert e.value("lmcache_cpp_engine_lookups_total") == 0
    # Every statistic the engine reports has a described metric; none falls back to untyped.
    untyped = [n for n, kind in e.types.items() if kind == "untyped"]
    assert not untyped, f"give these fields a metric in lmcache_cpp/stat_fields.h: {untyped}"


# ---- HTTP endpoint --------------------------------------------------------------------------


@dataclass
class Probe:
    healthy: bool = True
    stats: dict[str, Any] = field(default_factory=lambda: {"l1": {"objects": 3}})
    fail_stats: bool = False
    fail_health: bool = False

    def stats_fn(self) -> dict[str, Any]:
        if self.fail_stats:
            raise RuntimeError("engine stopped")
        return self.stats

    def health_fn(self) -> bool:
        if self.fail_health:
            raise RuntimeError("broken")
        return self.healthy


ServerFactory = Callable[[Probe], MetricsHTTPServer]


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    servers: list[MetricsHTTPServer] = []

    def factory(probe: Probe) -> MetricsHTTPServer:
        metrics = Metrics()
        metrics.record("PING", "ok", 0.0001)
        server = MetricsHTTPServer("127.0.0.1", 0, metrics, probe.stats_fn, probe.health_fn)
        servers.append(server)
        server.start()
        return server

    yield factory
    for server in servers:
        server.stop()


def get(server: MetricsHTTPServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def test_http_metrics(start_server: ServerFactory) -> None:
    server = start_server(Probe())
    assert server.port != 0
    status, ctype, body = get(server, "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE
    e = parse_exposition(body)
    assert e.value("lmcache_cpp_l1_objects") == 3
    assert e.value("lmcache_cpp_requests_total", request="PING", outcome="ok") == 1
    assert get(server, "/metrics?name=x")[0] == 200


def test_http_healthz(start_server: ServerFactory) -> None:
    probe = Probe()
    server = start_server(probe)
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    probe.healthy = False
    assert get(server, "/healthz")[0] == 503
    probe.healthy, probe.fail_health = True, True
    assert get(server, "/healthz")[0] == 503


def test_http_errors(start_server: ServerFactory) -> None:
    probe = Probe(fail_stats=True)
    server = start_server(probe)
    assert get(server, "/metrics")[0] == 500
    assert get(server, "/healthz")[0] == 200  # a stats failure is not a health failure
    assert get(server, "/")[0] == 404
    assert get(server, "/metricsx")[0] == 404


def test_http_head(start_server: ServerFactory) -> None:
    server = start_server(Probe())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        assert resp.read() == b""
    finally:
        conn.close()


def test_start_stop_lifecycle(start_server: ServerFactory) -> None:
    server = start_server(Probe())
    port = server.port
    server.start()  # idempotent while running
    assert server.port == port
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    with pytest.raises(RuntimeError, match="stopped"):
        server.start()


def test_port_in_use_raises_on_start(start_server: ServerFactory) -> None:
    first = start_server(Probe())
    probe = Probe()
    second = MetricsHTTPServer("127.0.0.1", first.port, Metrics(), probe.stats_fn, probe.health_fn)
    with pytest.raises(OSError):
        second.start()
    second.stop()


def test_stop_without_start_is_harmless() -> None:
    probe = Probe()
    server = MetricsHTTPServer("127.0.0.1", 0, Metrics(), probe.stats_fn, probe.health_fn)
    server.stop()
    with pytest.raises(ValueError):
        MetricsHTTPServer("127.0.0.1", 70000, Metrics(), probe.stats_fn, probe.health_fn)
