"""Server configuration: defaults, files, flags, precedence, validation, L2 specs, building."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp import config as cfg
from lmcache_cpp.config import ConfigError, ServerConfig

SMALL_L1_GB = 8 / 1024  # 8 MiB arenas keep the storage tests light
Z85_SECRET = "abcdefghij" * 4
Z85_PUBLIC = "0123456789" * 4


def parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    cfg.add_serve_arguments(parser)
    return cfg.config_from_args(parser.parse_args(list(argv)))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- defaults and flags ---------------------------------------------------------------------


def test_defaults_are_safe() -> None:
    c = ServerConfig()
    assert c.endpoint == "tcp://127.0.0.1:5555"
    assert c.chunk_size == 256
    assert c.l1_size_gb is None
    assert c.l2_adapters == []  # no L2, in particular nothing written to disk
    assert c.allow_remote is False
    assert c.metrics_port is None
    assert c.metrics_host == "127.0.0.1"
    assert c.hash_algorithm == "sha256"
    assert c.worker_threads == 4
    assert c.heartbeat_grace_s == 30.0
    assert c.max_frame_bytes == 64 * 1024 * 1024
    assert ServerConfig().l2_adapters is not c.l2_adapters  # no shared mutable default


def test_exact_flag_spellings() -> None:
    c = parse(
        "--endpoint",
        "tcp://127.0.0.1:5555",
        "--l1-size-gb",
        "2",
        "--chunk-size",
        "256",
        "--l2-adapter",
        '{"type": "fs", "path": "/dir"}',
        "--l2-adapter",
        '{"type": "memory", "capacity_gb": 0.5}',
    )
    assert c.endpoint == "tcp://127.0.0.1:5555"
    assert c.l1_size_gb == 2.0
    assert c.l1_size_bytes() == 2 * 1024**3
    assert c.chunk_size == 256
    assert c.l2_adapters == [
        {"type": "fs", "path": "/dir"},
        {"type": "memory", "capacity_gb": 0.5},
    ]


def test_ipc_endpoint_and_other_flags(tmp_path: Path) -> None:
    c = parse(
        "--endpoint",
        f"ipc://{tmp_path}/lmc.sock",
        "--hash-algorithm",
        "xxh3",
        "--hugepages",
        "off",
        "--metrics-port",
        "9100",
        "--allow-remote",
        "--log-level",
        "debug",
        "--free-l1-after-store",
        "--read-lease-ttl-s",
        "12.5",
    )
    assert c.endpoint == f"ipc://{tmp_path}/lmc.sock"
    assert (c.hash_algorithm, c.hugepages, c.metrics_port) == ("xxh3", "off", 9100)
    assert c.allow_remote and c.free_l1_after_store
    assert c.log_level == "DEBUG"
    assert c.read_lease_ttl_s == 12.5


def test_every_field_has_a_flag_with_its_default_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    cfg.add_serve_arguments(parser)
    by_flag = {opt: a for a in parser._actions for opt in a.option_strings}
    for name in ServerConfig.field_names():
        flag = "--l2-adapter" if name == "l2_adapters" else "--" + name.replace("_", "-")
        assert flag in by_flag, flag
    for action in parser._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        assert action.help and "(default: " in action.help, action.option_strings
    help_text = parser.format_help()
    assert "(default: 256)" in by_flag["--chunk-size"].help  # type: ignore[operator]
    assert "(default: auto)" in by_flag["--l1-size-gb"].help  # type: ignore[operator]
    assert "(default: off)" in by_flag["--metrics-port"].help  # type: ignore[operator]
    assert "25%" in help_text


def test_auto_and_off_words_reset_file_values(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps({"l1_size_gb": 3, "metrics_port": 9000}))
    c = parse("--config", str(path), "--l1-size-gb", "auto", "--metrics-port", "off")
    assert c.l1_size_gb is None and c.metrics_port is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--chunk-size", "abc"],
        ["--l2-adapter", "not json"],
        ["--l2-adapter", '["fs"]'],
        ["--hugepages", "maybe"],
        ["--hash-algorithm", "md5"],
    ],
)
def test_malformed_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


# ---- config files and precedence ------------------------------------------------------------


def test_precedence_defaults_file_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "server.toml",
        """
chunk_size = 512
l1_size_gb = 1
worker_threads = 8
log_level = "warning"

[[l2_adapters]]
type = "memory"
capacity_gb = 0.5
""",
    )
    c = parse("--config", str(path), "--chunk-size", "128")
    assert c.chunk_size == 128  # flag beats file
    assert c.l1_size_gb == 1.0 and c.worker_threads == 8  # file beats default
    assert c.log_level == "WARNING"
    assert c.job_ttl_s == 120.0  # default
    assert c.l2_adapters == [{"type": "memory", "capacity_gb": 0.5}]

    replaced = parse("--config", str(path), "--l2-adapter", '{"type": "memory"}')
    assert replaced.l2_adapters == [{"type": "memory"}]  # flags replace the file's list


def test_json_config_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "server.json",
        json.dumps({"endpoint": f"ipc://{tmp_path}/s", "l2_adapters": [{"type": "memory"}]}),
    )
    c = cfg.load_config(path)
    assert c.endpoint == f"ipc://{tmp_path}/s"
    assert c.l2_adapters == [{"type": "memory"}]


def test_parent_parser_options_do_not_pose_as_flags(tmp_path: Path) -> None:
    # The top-level CLI has its own --log-level with a default; it must not override the file.
    parent = argparse.ArgumentParser()
    parent.add_argument("--log-level", default="WARNING")
    serve = parent.add_subparsers(dest="command").add_parser("serve")
    cfg.add_serve_arguments(serve)
    path = write(tmp_path / "c.toml", 'log_level = "ERROR"\n')
    ns = parent.parse_args(["serve", "--config", str(path)])
    assert cfg.config_from_args(ns).log_level == "ERROR"
    assert ns.log_level == "WARNING"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_unknown_file_key_is_named(tmp_path: Path, suffix: str) -> None:
    text = "chunk_sise = 4\n" if suffix == ".toml" else '{"chunk_sise": 4}'
    path = write(tmp_path / f"c{suffix}", text)
    with pytest.raises(ConfigError, match=r"unknown key 'chunk_sise' \(did you mean 'chunk_size'"):
        cfg.load_config(path)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unsupported extension"):
        cfg.load_config(write(tmp_path / "c.yaml", "chunk_size: 4\n"))
    with pytest.raises(ConfigError, match="parse error"):
        cfg.load_config(write(tmp_path / "bad.toml", "chunk_size = = 4\n"))
    with pytest.raises(ConfigError, match="parse error"):
        cfg.load_config(write(tmp_path / "bad.json", "{"))
    with pytest.raises(ConfigError, match="top level"):
        cfg.load_config(write(tmp_path / "list.json", "[1, 2]"))
    with pytest.raises(ConfigError, match="chunk_size: expected an integer"):
        cfg.load_config(write(tmp_path / "type.toml", 'chunk_size = "256"\n'))


def test_round_trip_through_a_mapping() -> None:
    c = ServerConfig(chunk_size=64, l2_adapters=[{"type": "memory", "capacity_gb": 0.25}])
    assert ServerConfig.from_mapping(c.to_dict()) == c


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "256"}, "chunk_size: expected an integer"),
        ({"chunk_size": True}, "chunk_size: expected an integer"),
        ({"l1_size_gb": 0}, "l1_size_gb"),
        ({"l1_size_gb": float("nan")}, "l1_size_gb"),
        ({"high_watermark": 1.5}, "high_watermark"),
        ({"high_watermark": 0.5, "low_watermark": 0.9}, "low_watermark"),
        ({"read_lease_ttl_s": 0}, "read_lease_ttl_s"),
        ({"job_ttl_s": -1.0}, "job_ttl_s"),
        ({"sync_lookup_timeout_s": float("inf")}, "sync_lookup_timeout_s"),
        ({"hash_algorithm": "md5"}, "hash_algorithm"),
        ({"hugepages": "yes"}, "hugepages"),
        ({"eviction_policy": "fifo"}, "eviction_policy"),
        ({"log_level": "loud"}, "log_level"),
        ({"worker_threads": 0}, "worker_threads"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"allow_remote": "yes"}, "allow_remote: expected true or false"),
        ({"max_tokens_per_key": 32 * 1024 * 1024}, "max_tokens_per_key"),
        ({"max_jobs_per_client": 0}, "max_jobs_per_client"),
        ({"l2_adapters": {"type": "memory"}}, "l2_adapters: expected a list"),
    ],
)
def test_invalid_values_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**kwargs)


def test_ints_are_accepted_for_float_knobs() -> None:
    c = ServerConfig(high_watermark=1, low_watermark=1, job_ttl_s=5)
    assert isinstance(c.high_watermark, float) and c.job_ttl_s == 5.0


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:5555",
        "tcp://127.0.0.2:*",
        "ipc:///tmp/lmcache.sock",
        "ipc://@abstract-name",
    ],
)
def test_local_endpoints_are_accepted(endpoint: str) -> None:
    assert ServerConfig(endpoint=endpoint).endpoint == endpoint


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("udp://127.0.0.1:5555", "neither tcp"),
        ("tcp://127.0.0.1", "HOST:PORT"),
        ("tcp://127.0.0.1:0", "port"),
        ("tcp://127.0.0.1:99999", "port"),
        ("tcp://127.0.0.1:\u00b2", "port"),  # a digit to str.isdigit(), not to int()
        ("tcp://:5555", "HOST:PORT"),
        ("ipc://", "needs a path"),
        ("ipc:///" + "x" * 200, "at most 107"),
        ("tcp://0.0.0.0:5555", "not a loopback address"),
        ("tcp://*:5555", "not a loopback address"),
        ("tcp://10.1.2.3:5555", "opt-in"),
    ],
)
def test_bad_or_remote_endpoints_are_rejected(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(endpoint=endpoint)


def test_remote_endpoint_needs_allow_remote_and_curve_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CURVE"):
        ServerConfig(endpoint="tcp://0.0.0.0:5555", allow_remote=True)
    with pytest.raises(ConfigError, match="both or neither"):
        ServerConfig(curve_secret_key_file=str(tmp_path / "s"))
    c = ServerConfig(
        endpoint="tcp://0.0.0.0:5555",
        allow_remote=True,
        curve_secret_key_file=str(tmp_path / "s"),
        curve_public_key_file=str(tmp_path / "p"),
    )
    assert c.allow_remote


# ---- sizing ---------------------------------------------------------------------------------


def meminfo(available_kib: int | None, huge_free: int = 0, huge_kib: int = 2048) -> str:
    lines = ["MemTotal:       99999999 kB", "MemFree:          1000 kB"]
    if available_kib is not None:
        lines.append(f"MemAvailable:   {available_kib} kB")
    lines += [f"HugePages_Free:    {huge_free}", f"Hugepagesize:       {huge_kib} kB"]
    return "\n".join(lines) + "\n"


def test_auto_l1_size_is_a_quarter_of_available_memory_within_bounds() -> None:
    gib_kib = 1024 * 1024
    assert cfg.auto_l1_size_bytes(meminfo(8 * gib_kib)) == 2 * 1024**3
    assert cfg.auto_l1_size_bytes(meminfo(1024 * gib_kib)) == cfg.AUTO_L1_MAX_BYTES
    assert cfg.auto_l1_size_bytes(meminfo(100 * 1024)) == cfg.AUTO_L1_MIN_BYTES
    odd_kib = 3 * gib_kib + 12345
    granule = 2 * 1024 * 1024
    assert cfg.auto_l1_size_bytes(meminfo(odd_kib)) == odd_kib * 1024 // 4 // granule * granule


def test_auto_l1_size_on_this_machine_is_sane() -> None:
    size = ServerConfig().l1_size_bytes()
    assert cfg.AUTO_L1_MIN_BYTES <= size <= cfg.AUTO_L1_MAX_BYTES
    assert size % (2 * 1024 * 1024) == 0
    text = Path("/proc/meminfo").read_text()
    available = int(next(x for x in text.splitlines() if x.startswith("MemAvailable")).split()[1])
    assert size <= max(available * 1024 // 4 + 4 * 1024 * 1024, cfg.AUTO_L1_MIN_BYTES)


def test_auto_l1_size_without_meminfo_falls_back() -> None:
    size = cfg.auto_l1_size_bytes("nothing useful\n")
    assert cfg.AUTO_L1_MIN_BYTES <= size <= cfg.AUTO_L1_MAX_BYTES


def test_explicit_l1_size_rounds_to_2_mib() -> None:
    assert ServerConfig(l1_size_gb=SMALL_L1_GB).l1_size_bytes() == 8 * 1024 * 1024
    assert ServerConfig(l1_size_gb=0.0015).l1_size_bytes() == 2 * 1024 * 1024


def test_huge_pages_available_reads_meminfo() -> None:
    assert not cfg.huge_pages_available(1 << 30, meminfo(10**6, huge_free=0))
    assert cfg.huge_pages_available(1 << 30, meminfo(10**6, huge_free=512))
    assert not cfg.huge_pages_available(1 << 30, meminfo(10**6, huge_free=511))


# ---- L2 adapter specs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "redis"}, r"l2_adapters\[0\]\.url: required"),
        ({"type": "rediz"}, "unknown adapter type 'rediz'"),
        ({"type": "redis", "url": "http://x"}, r"\.url: 'http://x' is not a redis://"),
        ({"type": "redis", "url": "redis://h", "cluster": 1}, "cluster: expected true or false"),
        ({"type": "redis", "url": "redis://h", "key_prefix": "a{b}"}, "key_prefix"),
        ({"type": "redis", "url": "redis://h", "key_prefix": "a b"}, "key_prefix"),
        ({"type": "redis", "url": "redis://h", "op_timeout_ms": 0}, "op_timeout_ms"),
        ({"type": "redis", "url": "redis://h", "connect_timeout_ms": "1"}, "connect_timeout_ms"),
        ({"type": "redis", "url": "redis://h", "connections_per_node": 1}, "connections_per_node"),
        ({"type": "redis", "url": "redis://h", "max_in_flight_mb": 0}, "max_in_flight_mb"),
        ({"type": "redis", "url": "redis://h", "tls_ca_file": "/no/such"}, "tls_ca_file"),
        ({"type": "redis", "url": "redis://h", "pasword": "x"}, "unknown key 'pasword'"),
        ({"path": "/x"}, "missing 'type'"),
        ({"type": "fs"}, r"l2_adapters\[0\]\.path: required"),
        ({"type": "fs", "path": "/x", "paht": "/y"}, "unknown key 'paht' for type 'fs'"),
        ({"type": "memory", "latency": 1}, "unknown key 'latency' for type 'memory'"),
        ({"type": "fs", "path": "/x", "capacity_gb": "1"}, "capacity_gb: expected a number"),
        ({"type": "fs", "path": "/x", "capacity_gb": -1}, "capacity_gb"),
        ({"type": "fs", "path": "/x", "io_threads": 0}, "io_threads"),
        ({"type": "fs", "path": "/x", "fsync": "yes"}, "fsync: expected true or false"),
        ({"type": "memory", "bandwidth_gbps": -2}, "bandwidth_gbps"),
        ({"type": "memory", "latency_ms": float("nan")}, "latency_ms"),
        ({"type": "python"}, r"l2_adapters\[0\]\.class: required"),
        ({"type": "python", "class": "no_colon"}, "not an import path"),
        ({"type": "python", "class": "a.b:C; import os"}, "not an import path"),
        ({"type": "python", "class": 3}, "not an import path"),
        ({"type": "python", "class": "m:C", "not-a-name": 1}, "cannot be a keyword argument"),
    ],
)
def test_bad_adapter_specs_are_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(l2_adapters=[spec])


def test_duplicate_fs_directories_are_rejected(tmp_path: Path) -> None:
    spec = {"type": "fs", "path": str(tmp_path / "l2")}
    with pytest.raises(ConfigError, match="share the directory"):
        ServerConfig(l2_adapters=[spec, {**spec, "path": str(tmp_path / "x" / ".." / "l2")}])


def test_spec_parsing_maps_units() -> None:
    mem = cfg.parse_l2_spec(
        {"type": "memory", "capacity_gb": 0.5, "latency_ms": 2, "bandwidth_gbps": 1.5}
    )
    assert mem == cfg.MemoryAdapterSpec(
        capacity_bytes=512 * 1024**2, latency_s=0.002, bandwidth_bytes_per_sec=1_500_000_000
    )
    fs = cfg.parse_l2_spec({"type": "fs", "path": "/a/b", "o_direct": True, "io_threads": 2})
    assert fs == cfg.FsAdapterSpec(path="/a/b", capacity_bytes=None, io_threads=2, o_direct=True)


def test_fs_path_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = cfg.parse_l2_spec({"type": "fs", "path": "~/kv-cache", "capacity_gb": 0.01})
    assert isinstance(spec, cfg.FsAdapterSpec)
    assert spec.path == str(tmp_path / "kv-cache")
    adapter = cfg.build_l2_adapter(spec)
    try:
        assert (tmp_path / "kv-cache").is_dir()
    finally:
        adapter.close()


def roundtrip(adapter: lc.L2Adapter, make_keys: Any) -> None:
    keys = make_keys(2)
    blobs = [np.full(4096, i + 1, dtype=np.uint8) for i in range(2)]
    assert adapter.submit_store(keys, blobs, timeout_s=30).all()
    out = [np.zeros(4096, dtype=np.uint8) for _ in range(2)]
    assert adapter.submit_lookup_and_pin(keys, timeout_s=30).all()
    assert adapter.submit_load(keys, out, timeout_s=30).all()
    adapter.submit_unpin(keys)
    assert all((o == b).all() for o, b in zip(out, blobs, strict=True))


def test_fs_spec_builds_a_working_adapter(tmp_path: Path, make_keys: Any) -> None:
    c = ServerConfig(
        l2_adapters=[
            {
                "type": "fs",
                "path": str(tmp_path / "l2"),
                "capacity_gb": 0.01,
                "io_threads": 2,
                "fsync": True,
            }
        ]
    )
    (adapter,) = cfg.build_l2_adapters(c)
    try:
        assert isinstance(adapter, lc.FileSystemL2Adapter)
        assert adapter.stats().capacity_bytes == int(0.01 * 1024**3)
        roundtrip(adapter, make_keys)
        assert adapter.stats().objects == 2
        assert any((tmp_path / "l2").rglob("*"))
    finally:
        adapter.close()


def test_memory_spec_builds_a_working_adapter(make_keys: Any) -> None:
    c = ServerConfig(l2_adapters=[{"type": "memory", "capacity_gb": 0.001, "latency_ms": 1}])
    (adapter,) = cfg.build_l2_adapters(c)
    try:
        assert isinstance(adapter, lc.MemoryL2Adapter)
        assert adapter.stats().capacity_bytes == int(0.001 * 1024**3)
        roundtrip(adapter, make_keys)
    finally:
        adapter.close()


def test_python_spec_keeps_its_own_keys_and_imports_nothing() -> None:
    spec = cfg.parse_l2_spec({"type": "python", "class": "no.such.module:Tier", "size": 3})
    assert spec == cfg.PythonAdapterSpec(class_path="no.such.module:Tier", options={"size": 3})
    ServerConfig(l2_adapters=[{"type": "python", "class": "no.such.module:Tier"}])  # valid


def test_python_spec_builds_the_named_class_with_its_keys(make_keys: Any) -> None:
    c = ServerConfig(
        l2_adapters=[
            {"type": "python", "class": "dict_adapter:DictL2Adapter", "name": "mine"},
        ]
    )
    (adapter,) = cfg.build_l2_adapters(c)
    try:
        assert type(adapter).__name__ == "DictL2Adapter" and adapter.name == "mine"
        roundtrip(adapter, make_keys)
    finally:
        adapter.close()


@pytest.mark.parametrize(
    ("class_path", "options", "message"),
    [
        ("no_such_module_here:Tier", {}, "cannot load 'no_such_module_here:Tier': ModuleNotFound"),
        ("dict_adapter:NoSuchClass", {}, "cannot load .*AttributeError"),
        ("dict_adapter:Counter", {}, "is not a subclass of lmcache_cpp.PythonL2Adapter"),
        ("dict_adapter:DictL2Adapter", {"colour": "red"}, r"DictL2Adapter\(colour\) failed"),
    ],
)
def test_python_spec_that_cannot_be_built_is_named(
    class_path: str, options: dict[str, Any], message: str
) -> None:
    spec = {"type": "python", "class": class_path, **options}
    with pytest.raises(ConfigError, match=rf"l2_adapters\[1\].*{message}"):
        cfg.build_l2_adapters(ServerConfig(l2_adapters=[{"type": "memory"}, spec]))


def test_fs_auto_capacity_is_half_of_free_plus_own_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    free = 10 * 1024**3
    fake = SimpleNamespace(f_bavail=free // 4096, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda _path: fake)
    target = tmp_path / "not" / "yet"
    assert cfg.fs_auto_capacity_bytes(str(target)) == free // 2
    target.mkdir(parents=True)
    (target / "obj").write_bytes(b"x" * 1024 * 1024)
    assert cfg.fs_auto_capacity_bytes(str(target)) == (free + 1024 * 1024) // 2


def test_fs_adapter_without_capacity_is_bounded(tmp_path: Path) -> None:
    (adapter,) = cfg.build_l2_adapters(
        ServerConfig(l2_adapters=[{"type": "fs", "path": str(tmp_path / "l2")}])
    )
    try:
        capacity = adapter.stats().capacity_bytes
        st = os.statvfs(tmp_path)
        assert 0 < capacity <= st.f_blocks * st.f_frsize // 2 + 1
    finally:
        adapter.close()


# ---- storage, engine, server options --------------------------------------------------------


@pytest.fixture
def storage_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        l1_size_gb=SMALL_L1_GB,
        hugepages="off",
        high_watermark=0.8,
        low_watermark=0.7,
        l2_adapters=[
            {"type": "memory", "capacity_gb": 0.01},
            {"type": "fs", "path": str(tmp_path / "l2"), "capacity_gb": 0.01},
        ],
    )


@pytest.fixture
def storage(storage_config: ServerConfig) -> Iterator[lc.StorageManager]:
    manager = cfg.build_storage_manager(storage_config)
    yield manager
    manager.stop()
    for adapter in manager.adapters():
        adapter.close()


def test_build_storage_manager_honours_the_config(storage: lc.StorageManager) -> None:
    stats = storage.stats()
    assert storage.arena().size == 8 * 1024 * 1024
    assert stats.l1.capacity_bytes == 8 * 1024 * 1024
    assert storage.adapters()[0].name == "memory"
    assert storage.adapters()[1].name.startswith("fs:")
    assert [s.capacity_bytes for s in stats.l2] == [int(0.01 * 1024**3)] * 2
    assert storage.prefetch_controller().num_adapters == 2


def test_hugepages_on_fails_clearly_without_huge_pages(storage_config: ServerConfig) -> None:
    if cfg.huge_pages_available(storage_config.l1_size_bytes()):
        pytest.skip("this machine has free huge pages")
    on = ServerConfig.from_mapping({**storage_config.to_dict(), "hugepages": "on"})
    with pytest.raises(ConfigError, match="hugepages"):
        cfg.build_storage_manager(on)


def test_build_storage_reports_a_missing_engine_binding(
    monkeypatch: pytest.MonkeyPatch, storage_config: ServerConfig
) -> None:
    monkeypatch.setattr(cfg.storage, "engine_available", lambda: False)
    with pytest.raises(RuntimeError, match="CacheEngine"):
        cfg.build_storage(storage_config)


def test_build_storage_returns_a_working_engine(storage_config: ServerConfig) -> None:
    c = ServerConfig.from_mapping({**storage_config.to_dict(), "chunk_size": 64})
    storage, engine = cfg.build_storage(c)
    try:
        assert engine.chunk_size == 64
        stats = engine.stats()
        assert stats["l1"]["capacity_bytes"] == 8 * 1024 * 1024
        assert len(stats["l2"]) == 2
        assert engine.reap_expired() == 0
    finally:
        engine.stop()
        storage.stop()
        for adapter in storage.adapters():
            adapter.close()


def test_extra_l2_adapters_go_in_front_of_the_configured_tiers(
    storage_config: ServerConfig,
) -> None:
    extra = lc.MemoryL2Adapter(capacity_bytes=1 << 20, worker_threads=1)
    storage, engine = cfg.build_storage(storage_config, extra_l2_adapters=[extra])
    try:
        names = [adapter.name for adapter in storage.adapters()]
        assert len(names) == 3 and names[0] == extra.name
        assert len(engine.stats()["l2"]) == 3
    finally:
        engine.stop()
        storage.stop()
        for adapter in storage.adapters():
            adapter.close()


def test_a_server_app_serves_with_extra_l2_adapters(tmp_path: Path) -> None:
    from lmcache_cpp.app import ServerApp

    extra = lc.MemoryL2Adapter(capacity_bytes=1 << 20, worker_threads=1)
    config = ServerConfig(endpoint=f"ipc://{tmp_path}/s.sock", l1_size_gb=0.0078125)
    with ServerApp(config, extra_l2_adapters=[extra]) as app:
        assert len(app.engine.stats()["l2"]) == 1  # the configuration has no L2 of its own


def test_server_options_without_curve() -> None:
    opts = cfg.server_options(ServerConfig(endpoint="ipc:///tmp/x.sock", worker_threads=2))
    assert opts == {
        "endpoint": "ipc:///tmp/x.sock",
        "worker_threads": 2,
        "max_queue_wait_s": 10.0,
        "heartbeat_grace_s": 30.0,
        "max_frame_bytes": 64 * 1024 * 1024,
        "max_tokens_per_key": 2 * 1024 * 1024,
        "allow_remote": False,
        "curve_secret_key": None,
        "curve_public_key": None,
        "reap_interval_s": 1.0,
    }


def test_server_options_read_curve_keys(tmp_path: Path) -> None:
    secret = write(tmp_path / "server.key_secret", Z85_SECRET + "\n")
    secret.chmod(0o600)
    public = write(
        tmp_path / "server.key",
        f'#   ZeroMQ certificate\nmetadata\ncurve\n    public-key = "{Z85_PUBLIC}"\n',
    )
    c = ServerConfig(
        endpoint="tcp://0.0.0.0:5555",
        allow_remote=True,
        curve_secret_key_file=str(secret),
        curve_public_key_file=str(public),
    )
    opts = cfg.server_options(c)
    assert opts["curve_secret_key"] == Z85_SECRET
    assert opts["curve_public_key"] == Z85_PUBLIC
    assert opts["allow_remote"] is True


def test_bad_curve_key_files(tmp_path: Path) -> None:
    short = write(tmp_path / "short", "tooshort\n")
    public = write(tmp_path / "pub", Z85_PUBLIC)
    c = ServerConfig(curve_secret_key_file=str(short), curve_public_key_file=str(public))
    with pytest.raises(ConfigError, match="curve_secret_key_file"):
        cfg.server_options(c)
    missing = ServerConfig(
        curve_secret_key_file=str(tmp_path / "nope"), curve_public_key_file=str(public)
    )
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.server_options(missing)
    # A certificate holding only the public key is not a secret key file.
    with pytest.raises(ConfigError, match="no secret key"):
        cfg.read_curve_key(write(tmp_path / "cert", f'public-key = "{Z85_PUBLIC}"\n'), "secret")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_config_file_with_an_integer_too_long_to_convert_is_a_config_error(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"settings{suffix}"
    digits = "9" * 5000  # past Python's limit on converting a decimal string
    text = f'{{"chunk_size": {digits}}}' if suffix == ".json" else f"chunk_size = {digits}\n"
    path.write_text(text)
    with pytest.raises(ConfigError, match="parse error"):
        cfg.load_config_file(path)
