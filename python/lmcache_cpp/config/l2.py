"""L2 adapter specs (``--l2-adapter``, ``[[l2_adapters]]``) and the adapters they build."""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from lmcache_cpp import _core
from lmcache_cpp.config.common import (
    FS_AUTO_CAPACITY_FRACTION,
    GIB,
    MEMORY_ADAPTER_DEFAULT_CAPACITY_GB,
    ConfigError,
    _check_range,
    _coerce,
)

if TYPE_CHECKING:
    from lmcache_cpp.config.schema import ServerConfig

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# L2 adapter specs


@dataclass(frozen=True)
class FsAdapterSpec:
    """A file-system L2 tier. ``capacity_bytes`` None = automatic (fs_auto_capacity_bytes)."""

    path: str
    capacity_bytes: int | None = None
    io_threads: int = 4
    fsync: bool = False
    o_direct: bool = False


@dataclass(frozen=True)
class MemoryAdapterSpec:
    """An in-process L2 tier (tests, benchmarks). 0 = unbounded capacity / unlimited bandwidth."""

    capacity_bytes: int = int(MEMORY_ADAPTER_DEFAULT_CAPACITY_GB * GIB)
    latency_s: float = 0.0
    bandwidth_bytes_per_sec: int = 0
    worker_threads: int = 2


@dataclass(frozen=True)
class PythonAdapterSpec:
    """An L2 tier written in Python, loaded by import path: ``class_path`` names a subclass of
    :class:`lmcache_cpp.PythonL2Adapter` as ``"package.module:Class"``, built with ``options``
    (the spec's other keys) as keyword arguments."""

    class_path: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RedisAdapterSpec:
    """A Redis/Valkey L2 tier (docs/l2-redis.md). ``url`` is the server, or a seed node of a
    cluster; ``username``/``password`` override the URL's."""

    url: str
    cluster: bool = False
    username: str = ""
    password: str = ""
    key_prefix: str = "lmc:"
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    connect_timeout_ms: int = 2000
    op_timeout_ms: int = 5000
    connections_per_node: int = 4
    max_inflight_bytes: int = 1024 * 1024**2


L2Spec: TypeAlias = FsAdapterSpec | MemoryAdapterSpec | PythonAdapterSpec | RedisAdapterSpec

_FS_KEYS: Final = ("type", "path", "capacity_gb", "io_threads", "fsync", "o_direct")
_MEMORY_KEYS: Final = (
    "type",
    "capacity_gb",
    "latency_ms",
    "bandwidth_gbps",
    "worker_threads",
)
_REDIS_KEYS: Final = (
    "type",
    "url",
    "cluster",
    "username",
    "password",
    "key_prefix",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "connect_timeout_ms",
    "op_timeout_ms",
    "connections_per_node",
    "max_in_flight_mb",
)
_KEY_PREFIX: Final = re.compile(r"[!-z|~]{0,64}")  # printable ASCII without space, { and }


def _spec_value(where: str, spec: Mapping[str, Any], key: str, kind: str, default: Any) -> Any:
    if key not in spec:
        return default
    return _coerce(f"{where}.{key}", spec[key], kind)


def _non_negative(where: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{where}: {value} is not a non-negative number")
    return value


def _scaled(where: str, value: float, unit: float) -> int:
    """``value`` (non-negative) times ``unit`` as an int, e.g. GiB in bytes; ConfigError when the
    product is too large to be one (a finite value can overflow to infinity once scaled)."""
    scaled = _non_negative(where, value) * unit
    if not math.isfinite(scaled):
        raise ConfigError(f"{where}: {value} is too large")
    return int(scaled)


_CLASS_PATH: Final = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _check_keys(where: str, spec: Mapping[str, Any], kind: str, known: Sequence[str]) -> None:
    for key in spec:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key {key!r} for type {kind!r} (known: {', '.join(known)})"
            )


def _parse_fs(where: str, spec: Mapping[str, Any]) -> FsAdapterSpec:
    _check_keys(where, spec, "fs", _FS_KEYS)
    if "path" not in spec:
        raise ConfigError(f"{where}.path: required for an fs adapter")
    path = _coerce(f"{where}.path", spec["path"], "str")
    if not path:
        raise ConfigError(f"{where}.path: empty")
    capacity_gb = _spec_value(where, spec, "capacity_gb", "opt_float", None)
    capacity = None if capacity_gb is None else _scaled(f"{where}.capacity_gb", capacity_gb, GIB)
    io_threads = _spec_value(where, spec, "io_threads", "int", 4)
    _check_range(f"{where}.io_threads", io_threads, 1, 256)
    return FsAdapterSpec(
        path=os.path.abspath(os.path.expanduser(path)),
        capacity_bytes=capacity,
        io_threads=io_threads,
        fsync=_spec_value(where, spec, "fsync", "bool", False),
        o_direct=_spec_value(where, spec, "o_direct", "bool", False),
    )


def _parse_memory(where: str, spec: Mapping[str, Any]) -> MemoryAdapterSpec:
    _check_keys(where, spec, "memory", _MEMORY_KEYS)
    capacity_gb = _spec_value(
        where, spec, "capacity_gb", "float", MEMORY_ADAPTER_DEFAULT_CAPACITY_GB
    )
    latency_ms = _spec_value(where, spec, "latency_ms", "float", 0.0)
    bandwidth = _spec_value(where, spec, "bandwidth_gbps", "float", 0.0)
    workers = _spec_value(where, spec, "worker_threads", "int", 2)
    _check_range(f"{where}.worker_threads", workers, 1, 256)
    return MemoryAdapterSpec(
        capacity_bytes=_scaled(f"{where}.capacity_gb", capacity_gb, GIB),
        latency_s=_non_negative(f"{where}.latency_ms", latency_ms) / 1000.0,
        bandwidth_bytes_per_sec=_scaled(f"{where}.bandwidth_gbps", bandwidth, 1e9),
        worker_threads=workers,
    )


def _parse_redis(where: str, spec: Mapping[str, Any]) -> RedisAdapterSpec:
    _check_keys(where, spec, "redis", _REDIS_KEYS)
    if "url" not in spec:
        raise ConfigError(f"{where}.url: required for a redis adapter (redis://host:port)")
    url = _coerce(f"{where}.url", spec["url"], "str")
    if not url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"{where}.url: {url!r} is not a redis:// or rediss:// URL")
    prefix = _spec_value(where, spec, "key_prefix", "str", "lmc:")
    if not _KEY_PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"{where}.key_prefix: {prefix!r} must be at most 64 printable ASCII characters "
            "without spaces, '{' or '}'"
        )
    files = {}
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = _spec_value(where, spec, key, "str", "")
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"{where}.{key}: {path!r} is not a file")
        files[key] = os.path.abspath(os.path.expanduser(path)) if path else ""
    if (files["tls_cert_file"] == "") != (files["tls_key_file"] == ""):
        raise ConfigError(f"{where}.tls_cert_file: a client certificate needs tls_key_file too")
    connect_ms = _spec_value(where, spec, "connect_timeout_ms", "int", 2000)
    _check_range(f"{where}.connect_timeout_ms", connect_ms, 1, 600_000)
    op_ms = _spec_value(where, spec, "op_timeout_ms", "int", 5000)
    _check_range(f"{where}.op_timeout_ms", op_ms, 1, 600_000)
    connections = _spec_value(where, spec, "connections_per_node", "int", 4)
    _check_range(f"{where}.connections_per_node", connections, 2, 64)
    in_flight_mb = _spec_value(where, spec, "max_in_flight_mb", "float", 1024.0)
    in_flight = _scaled(f"{where}.max_in_flight_mb", in_flight_mb, 1024**2)
    if in_flight == 0:
        raise ConfigError(f"{where}.max_in_flight_mb: must be positive")
    return RedisAdapterSpec(
        url=url,
        cluster=_spec_value(where, spec, "cluster", "bool", False),
        username=_spec_value(where, spec, "username", "str", ""),
        password=_spec_value(where, spec, "password", "str", ""),
        key_prefix=prefix,
        connect_timeout_ms=connect_ms,
        op_timeout_ms=op_ms,
        connections_per_node=connections,
        max_inflight_bytes=in_flight,
        **files,
    )


def _parse_python(where: str, spec: Mapping[str, Any]) -> PythonAdapterSpec:
    """Checks the shape only: the class is imported when the adapter is built, so that reading
    a configuration never runs code."""
    if "class" not in spec:
        raise ConfigError(f"{where}.class: required for a python adapter ('package.module:Class')")
    class_path = spec["class"]
    if not isinstance(class_path, str) or not _CLASS_PATH.fullmatch(class_path):
        raise ConfigError(
            f"{where}.class: {class_path!r} is not an import path 'package.module:Class'"
        )
    options = {key: value for key, value in spec.items() if key not in ("type", "class")}
    for key in options:
        if not key.isidentifier():
            raise ConfigError(f"{where}: key {key!r} cannot be a keyword argument of the class")
    return PythonAdapterSpec(class_path=class_path, options=options)


_PARSERS: Final[Mapping[str, Callable[[str, Mapping[str, Any]], L2Spec]]] = {
    "fs": _parse_fs,
    "memory": _parse_memory,
    "python": _parse_python,
    "redis": _parse_redis,
}


def parse_l2_spec(spec: Mapping[str, Any], index: int = 0) -> L2Spec:
    """Validates one ``l2_adapters`` entry; errors name ``l2_adapters[index].key``."""
    where = f"l2_adapters[{index}]"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a table/object, got {spec!r}")
    kind = spec.get("type")
    known = ", ".join(_PARSERS)
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of: {known})")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ConfigError(f"{where}: unknown adapter type {kind!r} (known: {known})")
    return parser(where, spec)


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _directory_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed meanwhile
    return total


def fs_auto_capacity_bytes(path: str) -> int:
    """Capacity of an fs adapter without ``capacity_gb``: half of (free space + bytes in ``path``).

    Counting what the directory already holds keeps the capacity stable across restarts (the
    cache's own files are not "free" but are its to reuse).
    """
    st = os.statvfs(_existing_ancestor(path))
    free = st.f_bavail * st.f_frsize
    used = _directory_bytes(path) if os.path.isdir(path) else 0
    capacity = int((free + used) * FS_AUTO_CAPACITY_FRACTION)
    return max(capacity, 1)  # 0 would mean unbounded


def _build_python_adapter(spec: PythonAdapterSpec, where: str) -> _core.L2Adapter:
    module_name, _, qualname = spec.class_path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception as exc:  # ImportError, AttributeError, or anything the import raised
        raise ConfigError(
            f"{where}.class: cannot load {spec.class_path!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(found, type) and issubclass(found, _core.PythonL2Adapter)):
        raise ConfigError(
            f"{where}.class: {spec.class_path!r} is not a subclass of lmcache_cpp.PythonL2Adapter"
        )
    try:
        adapter: _core.L2Adapter = found(**spec.options)
    except Exception as exc:
        raise ConfigError(
            f"{where}: {spec.class_path}({', '.join(spec.options)}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _log.info("python L2 adapter %s from %s", adapter.name, spec.class_path)
    return adapter


def build_l2_adapter(spec: L2Spec, where: str = "l2_adapters") -> _core.L2Adapter:
    """Constructs the adapter for a parsed spec (an fs adapter recovers its index; a python
    adapter's class is imported now). ``where`` names the spec in errors."""
    if isinstance(spec, PythonAdapterSpec):
        return _build_python_adapter(spec, where)
    if isinstance(spec, RedisAdapterSpec):
        try:
            return _core.RedisL2Adapter(
                spec.url,
                cluster=spec.cluster,
                username=spec.username,
                password=spec.password,
                key_prefix=spec.key_prefix,
                tls_ca_file=spec.tls_ca_file,
                tls_cert_file=spec.tls_cert_file,
                tls_key_file=spec.tls_key_file,
                connect_timeout_ms=spec.connect_timeout_ms,
                op_timeout_ms=spec.op_timeout_ms,
                connections_per_node=spec.connections_per_node,
                max_inflight_store_bytes=spec.max_inflight_bytes,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"{where}: redis adapter at {spec.url!r}: {exc}") from exc
    if isinstance(spec, MemoryAdapterSpec):
        return _core.MemoryL2Adapter(
            capacity_bytes=spec.capacity_bytes,
            bandwidth_bytes_per_sec=spec.bandwidth_bytes_per_sec,
            latency_s=spec.latency_s,
            worker_threads=spec.worker_threads,
        )
    capacity = spec.capacity_bytes
    if capacity is None:
        capacity = fs_auto_capacity_bytes(spec.path)
        _log.info(
            "fs L2 adapter at %s: capacity %.1f GiB (automatic; set capacity_gb to choose)",
            spec.path,
            capacity / GIB,
        )
    adapter = _core.FileSystemL2Adapter(
        spec.path,
        capacity_bytes=capacity,
        fsync=spec.fsync,
        o_direct=spec.o_direct,
        io_threads=spec.io_threads,
    )
    report = adapter.recovery
    _log.info(
        "fs L2 adapter at %s: recovered %d objects, dropped %d, removed %d temp files",
        spec.path,
        report.indexed,
        report.dropped,
        report.temp_files_removed,
    )
    return adapter


def build_l2_adapters(config: ServerConfig) -> list[_core.L2Adapter]:
    """One native adapter per ``config.l2_adapters`` entry, in order (closed again on failure)."""
    adapters: list[_core.L2Adapter] = []
    try:
        for i, raw in enumerate(config.l2_adapters):
            adapters.append(build_l2_adapter(parse_l2_spec(raw, i), f"l2_adapters[{i}]"))
    except BaseException:
        for adapter in adapters:
            adapter.close()
        raise
    return adapters
