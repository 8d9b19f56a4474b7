"""Pins the names the statistics cross to users with: the STATUS reply's keys and the
Prometheus families (HELP and TYPE lines, sample names and label names) of a running server in
a fixed scenario. Values are not pinned; names, help texts and kinds are, byte for byte.

Regenerate the golden file only for an intended change:
``LMCACHE_CPP_UPDATE_GOLDEN=1 python -m pytest tests/test_stats_names.py``."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmcache_cpp as lc
from lmcache_cpp import _core
from lmcache_cpp.metrics import Metrics
from server_helpers import Harness

GOLDEN = Path(__file__).parent / "golden" / "stats_names.txt"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ")
_LABEL_NAME = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def _keys(section: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"status {section}: {' '.join(sorted(map(str, value)))}"]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [f"status {section}[]: {' '.join(sorted(map(str, value[0])))}"]
    return [f"status {section}"]


def _exposition_names(text: str) -> list[str]:
    """HELP/TYPE lines as they are; each sample as its name and sorted label names."""
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line)
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = ",".join(sorted(_LABEL_NAME.findall(m.group(3) or "")))
        sample = f"{m.group(1)}{{{labels}}}"
        if sample not in seen:  # one line per series shape
            seen.add(sample)
            out.append(sample)
    return out


def test_status_keys_and_metric_families_are_unchanged(harness: Harness) -> None:
    storage, engine = harness.engine(adapters=[lc.MemoryL2Adapter()])
    metrics = Metrics()
    server = harness.server(engine, storage, metrics=metrics)
    client = harness.client(server)
    client.ping()
    status = client.status()
    stats = dict(engine.stats())
    stats["clients"] = server.client_usage()  # what `lmcache-cpp serve` exports at /metrics

    lines: list[str] = []
    for section in sorted(status):
        if section != "server":
            lines += _keys(section, status[section])
    lines += _exposition_names(metrics.render(stats))
    text = "\n".join(lines) + "\n"
    if os.environ.get("LMCACHE_CPP_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


@pytest.mark.parametrize(
    "cls",
    [
        lc.L2AdapterStats,
        lc.SyncAdapterStats,
        lc.ObjectTableStats,
        lc.PrefetchStats,
        lc.StoreControllerStats,
        lc.HashSessionStats,
        lc.AllocatorStats,
        lc.FsRecoveryReport,
        _core.EngineStats,
        _core.ClientUsage,
    ],
)
def test_stats_classes_are_generated_from_their_fields(cls: Any) -> None:
    fields = cls.fields()
    stats = cls()
    assert [f.name for f in fields] == list(stats.to_dict())
    for f in fields:
        assert getattr(stats, f.name) == 0
        assert getattr(cls, f.name).__doc__ == f.help
        assert f.kind in ("gauge", "counter") and f.help
    assert repr(stats).startswith(f"{cls.__name__}({fields[0].name}=0, ")


def test_engine_stats_sections_follow_the_fields(harness: Harness) -> None:
    storage, engine = harness.engine(adapters=[lc.MemoryL2Adapter()])
    stats = engine.stats()
    assert list(stats["engine"]) == [f.name for f in _core.EngineStats.fields()]
    assert list(stats["l1"]) == [f.name for f in lc.ObjectTableStats.fields()]
    assert list(stats["l2"][0]) == [f.name for f in lc.L2AdapterStats.fields()]
    assert stats["l1"] == storage.stats().l1.to_dict()
