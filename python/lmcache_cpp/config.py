"""Configuration of the lmcache_cpp server: every knob, its default, loading and validation.

A :class:`ServerConfig` is assembled from three layers, later ones winning:

1. the defaults of the dataclass fields below;
2. a config file (``--config PATH``): TOML (``.toml``) or JSON (``.json``), one flat table whose
   keys are the field names (``chunk_size = 512``; L2 adapters as ``[[l2_adapters]]`` tables or a
   JSON list). A key that is not a field is an error naming it;
3. command-line flags (:func:`add_serve_arguments`): ``--chunk-size 512`` and so on. Repeated
   ``--l2-adapter`` flags *replace* the file's adapter list instead of appending to it.

Every value is checked when a :class:`ServerConfig` is constructed; problems raise
:class:`ConfigError` (a ``ValueError``) with a message naming the offending key.

Sizes: ``*_gb`` values are GiB (2**30 bytes); ``bandwidth_gbps`` of the in-memory adapter is in
GB/s (10**9 bytes per second).

L1 size: ``l1_size_gb = None`` (the default) sizes the shared-memory arena automatically at a
quarter of ``MemAvailable`` in ``/proc/meminfo``, at least 256 MiB and at most 64 GiB (see
:func:`auto_l1_size_bytes`). The arena is a memfd/POSIX shm region, so pages are only committed as
objects are written.

L2: none by default. A file-system adapter writes to disk, so it exists only when asked for
(``--l2-adapter '{"type": "fs", "path": "/dir"}'``); without ``capacity_gb`` it is capped at half of
what the file system holds free plus what the directory already uses (see
:func:`fs_auto_capacity_bytes`), so it never fills a disk on its own.

Huge pages (``hugepages``): ``"off"`` never asks for them; ``"auto"`` (default) asks for explicit
huge pages only when ``/proc/meminfo`` shows enough free ones for the whole arena; ``"on"`` asks for
them and fails at startup if the arena did not get them (``StorageManagerConfig.arena_huge_pages``;
the arena falls back to normal pages with a warning when the kernel refuses).

Remote access: the server binds to loopback or an ``ipc://`` path by default. A TCP endpoint on any
other address needs ``allow_remote = true`` *and* a CURVE key pair (``curve_secret_key_file`` and
``curve_public_key_file``, z85 text or ZeroMQ certificate files).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

from lmcache_cpp import _core
from lmcache_cpp import endpoint as endpoint_policy

__all__ = [
    "AUTO_L1_FRACTION",
    "AUTO_L1_MAX_BYTES",
    "AUTO_L1_MIN_BYTES",
    "ConfigError",
    "FsAdapterSpec",
    "MemoryAdapterSpec",
    "ServerConfig",
    "add_serve_arguments",
    "auto_l1_size_bytes",
    "build_l2_adapter",
    "build_l2_adapters",
    "build_storage",
    "build_storage_manager",
    "config_from_args",
    "engine_available",
    "fs_auto_capacity_bytes",
    "huge_pages_available",
    "load_config",
    "load_config_file",
    "parse_l2_spec",
    "read_curve_key",
    "server_options",
]

_log = logging.getLogger(__name__)

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB

AUTO_L1_FRACTION: Final = 0.25
AUTO_L1_MIN_BYTES: Final = 256 * MIB
AUTO_L1_MAX_BYTES: Final = 64 * GIB
# Arena sizes are multiples of 2 MiB, the x86-64 huge page, so one size works with either page kind.
ARENA_GRANULE: Final = 2 * MIB
FS_AUTO_CAPACITY_FRACTION: Final = 0.5
MEMORY_ADAPTER_DEFAULT_CAPACITY_GB: Final = 1.0

# The binding's CacheEngine, once the native module has it (lmcache_cpp._core.CacheEngine).
CacheEngine: TypeAlias = Any

_Z85_KEY: Final = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value, file, flag or L2 adapter spec is invalid; the message names it."""


# ---------------------------------------------------------------------------------------------
# Fields


def _meta(kind: str, help: str, **extra: Any) -> dict[str, Any]:
    """What the loader and the flags need of a field: its value kind, help text and extras."""
    return {"kind": kind, "help": help, **extra}


def _knob(default: Any, kind: str, help: str, **extra: Any) -> Any:
    """A dataclass field with an immutable default and its metadata (see _meta)."""
    return field(default=default, metadata=_meta(kind, help, **extra))


@dataclass
class ServerConfig:
    """Every knob of the server. Constructing one validates it (:class:`ConfigError`)."""

    # -- transport --------------------------------------------------------------------------
    endpoint: str = _knob(
        "tcp://127.0.0.1:5555",
        "str",
        "ZeroMQ endpoint the server binds: tcp://HOST:PORT or ipc://PATH; a non-loopback TCP "
        "address needs --allow-remote and CURVE keys",
        metavar="URL",
    )
    allow_remote: bool = _knob(
        False,
        "bool",
        "allow a TCP endpoint on a non-loopback address (requires both CURVE key files)",
    )
    admin_token_file: str | None = _knob(
        None,
        "opt_str",
        "where the server writes its admin token (mode 0600) at start; CLEAR with force needs it "
        "(default: the ipc:// socket's path + '.admin'; none for tcp:// unless given)",
        metavar="PATH",
    )
    curve_secret_key_file: str | None = _knob(
        None,
        "opt_str",
        "file with the server's CURVE secret key (40 z85 characters, or a ZeroMQ certificate "
        "file); enables CURVE encryption and authentication",
        metavar="PATH",
    )
    curve_public_key_file: str | None = _knob(
        None,
        "opt_str",
        "file with the server's CURVE public key (40 z85 characters, or a ZeroMQ certificate file)",
        metavar="PATH",
    )
    worker_threads: int = _knob(
        4,
        "int",
        "threads running the requests that may block briefly (SYNC_LOOKUP asking L2, CLEAR); "
        "waits for L2 never hold one",
        metavar="N",
    )
    max_queue_wait_s: float = _knob(
        10.0,
        "float",
        "a request that waited longer than this for a worker thread is answered DeadlineExceeded "
        "without running",
        metavar="SECONDS",
    )
    heartbeat_grace_s: float = _knob(
        30.0,
        "float",
        "seconds without any message after which a client is considered gone and everything it "
        "holds is released",
        metavar="SECONDS",
    )
    max_frame_bytes: int = _knob(
        64 * MIB, "int", "largest request frame accepted, in bytes", metavar="BYTES"
    )
    max_tokens_per_key: int = _knob(
        2 * 1024 * 1024,
        "int",
        "most tokens one request key may carry (token ids are 4 bytes each on the wire)",
        metavar="N",
    )
    # -- chunking and hashing -----------------------------------------------------------------
    chunk_size: int = _knob(
        256, "int", "tokens per chunk, a multiple of the engine's block size", metavar="TOKENS"
    )
    hash_algorithm: str = _knob(
        "sha256",
        "str",
        "chunk hash: sha256 or xxh3 (faster but not collision resistant: one tenant could be "
        "served another's KV)",
        choices=("sha256", "xxh3"),
    )
    # -- L1 -----------------------------------------------------------------------------------
    l1_size_gb: float | None = _knob(
        None,
        "opt_float",
        "L1 shared-memory arena size in GiB; 'auto' = 25%% of MemAvailable, at least 256 MiB and "
        "at most 64 GiB",
        metavar="GIB",
        none_text="auto",
    )
    hugepages: str = _knob(
        "auto",
        "str",
        "explicit huge pages for the L1 arena: auto (when enough are free), on (fail without), off",
        choices=("auto", "on", "off"),
    )
    arena_backend: str = _knob(
        "memfd",
        "str",
        "L1 arena backend: memfd (anonymous, engines map /proc/PID/fd/N) or posix_shm "
        "(/dev/shm/NAME, for engines that cannot open another process's fds)",
        choices=("memfd", "posix_shm"),
    )
    eviction_policy: str = _knob("lru", "str", "L1 eviction policy", choices=("lru",))
    high_watermark: float = _knob(
        0.95,
        "float",
        "L1 fill fraction at which background eviction starts",
        metavar="FRACTION",
    )
    low_watermark: float = _knob(
        0.90,
        "float",
        "L1 fill fraction background eviction brings the arena down to",
        metavar="FRACTION",
    )
    read_lease_ttl_s: float = _knob(
        300.0,
        "float",
        "seconds a read lease (a looked-up chunk held for a retrieve) lives",
        metavar="SECONDS",
    )
    write_lease_ttl_s: float = _knob(
        120.0,
        "float",
        "seconds a write lease (a reserved, uncommitted chunk) lives",
        metavar="SECONDS",
    )
    free_l1_after_store: bool = _knob(
        False,
        "bool",
        "drop an object from L1 once every L2 adapter has stored it",
    )
    # -- jobs, transfers, requests ------------------------------------------------------------
    job_ttl_s: float = _knob(
        120.0,
        "float",
        "seconds an unclaimed prefetch job (LOOKUP without QUERY) is kept",
        metavar="SECONDS",
    )
    transfer_ttl_s: float = _knob(
        120.0,
        "float",
        "seconds an uncommitted PREPARE_STORE/PREPARE_RETRIEVE ticket is kept",
        metavar="SECONDS",
    )
    request_ttl_s: float = _knob(
        600.0,
        "float",
        "seconds an idle request id (and the leases it holds) is kept",
        metavar="SECONDS",
    )
    lookup_ttl_s: float = _knob(
        240.0,
        "float",
        "seconds a two-phase LOOKUP result waits to be collected by QUERY_PREFETCH_STATUS",
        metavar="SECONDS",
    )
    session_ttl_s: float = _knob(
        600.0,
        "float",
        "seconds an idle hashing session (incremental prefix hashes) is kept",
        metavar="SECONDS",
    )
    sync_lookup_timeout_s: float = _knob(
        0.2,
        "float",
        "L2 deadline of a SYNC_LOOKUP; chunks not confirmed by then count as misses",
        metavar="SECONDS",
    )
    retrieve_wait_timeout_s: float = _knob(
        30.0,
        "float",
        "longest a RETRIEVE/PREPARE_RETRIEVE waits for the request's pending L2 load",
        metavar="SECONDS",
    )
    reap_interval_s: float = _knob(
        1.0,
        "float",
        "period of the TTL reapers (leases, jobs, tickets, clients)",
        metavar="SECONDS",
    )
    max_in_flight_prefetches: int = _knob(
        16, "int", "prefetch jobs running at once; later ones queue FIFO", metavar="N"
    )
    max_jobs_per_client: int = _knob(4096, "int", "prefetch jobs one client may hold", metavar="N")
    max_sessions: int = _knob(65536, "int", "hashing sessions kept", metavar="N")
    max_requests: int = _knob(
        1 << 20, "int", "request ids tracked at once (leases, pending loads)", metavar="N"
    )
    max_keys_per_request: int = _knob(
        1 << 20,
        "int",
        "objects one request may name: chunks x ranks (larger requests are refused before any "
        "work)",
        metavar="N",
    )
    max_registrations_per_client: int = _knob(
        256, "int", "KV-cache registrations one client may hold", metavar="N"
    )
    max_transfers_per_client: int = _knob(
        4096, "int", "uncommitted transfer tickets one client may hold", metavar="N"
    )
    max_requests_per_client: int = _knob(
        65536,
        "int",
        "request ids one client may have open at once (its lookups open them, END_SESSION ends "
        "them): one client cannot take all of --max-requests",
        metavar="N",
    )
    max_reserved_bytes_per_client: int = _knob(
        0,
        "int",
        "arena bytes one client may hold reserved by uncommitted stores; 0 = half the L1 arena",
        metavar="BYTES",
    )
    max_session_bytes: int = _knob(
        1 << 30,
        "int",
        "memory of all hashing sessions (the per-request memo of chunk hashes); the least "
        "recently used go first",
        metavar="BYTES",
    )
    max_sessions_per_client: int = _knob(
        8192,
        "int",
        "hashing sessions charged to one client; over it, that client's own oldest go",
        metavar="N",
    )
    max_session_bytes_per_client: int = _knob(
        256 << 20,
        "int",
        "hashing-session memory charged to one client; over it, that client's own oldest go",
        metavar="BYTES",
    )
    # -- L2 -----------------------------------------------------------------------------------
    l2_adapters: list[dict[str, Any]] = field(
        default_factory=list,
        metadata=_meta(
            "adapters",
            "an L2 tier as a JSON object, repeatable, in lookup priority order: "
            '{"type": "fs", "path": DIR, "capacity_gb": GIB, "io_threads": 4, "fsync": false, '
            '"o_direct": false} (only path is required; capacity defaults to half the free '
            'space) or {"type": "memory", "capacity_gb": 1, "latency_ms": 0, '
            '"bandwidth_gbps": 0} (GB/s, 0 = unlimited); on the command line it replaces the '
            "config file's list",
            metavar="JSON",
        ),
    )
    store_max_batch: int = _knob(64, "int", "objects per L2 store batch", metavar="N")
    store_max_in_flight_batches: int = _knob(
        8, "int", "L2 store batches in flight at once", metavar="N"
    )
    store_max_queued_keys: int = _knob(
        65536,
        "int",
        "objects waiting to be stored to L2 before new ones are dropped (not stored to L2)",
        metavar="N",
    )
    # -- observability ------------------------------------------------------------------------
    metrics_port: int | None = _knob(
        None,
        "opt_int",
        "port of the Prometheus /metrics and /healthz HTTP endpoint; 'off' disables it, 0 picks "
        "a free port",
        metavar="PORT",
        none_text="off",
    )
    metrics_host: str = _knob(
        "127.0.0.1",
        "str",
        "address the metrics endpoint binds (it has no authentication)",
        metavar="HOST",
    )
    log_level: str = _knob(
        "INFO", "str", "log level of the server and the core", choices=_LOG_LEVELS
    )

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Checks (and normalises) every field; raises :class:`ConfigError` naming the key."""
        for f in dataclasses.fields(self):
            kind: str = f.metadata["kind"]
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), kind))
        self.log_level = self.log_level.upper()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}"
                )
        self._validate_ranges()
        _check_endpoint(self)
        specs = [parse_l2_spec(spec, i) for i, spec in enumerate(self.l2_adapters)]
        fs_paths = [s.path for s in specs if isinstance(s, FsAdapterSpec)]
        for p in fs_paths:
            if fs_paths.count(p) > 1:
                raise ConfigError(f"l2_adapters: two fs adapters share the directory {p!r}")

    def _validate_ranges(self) -> None:
        _check_range("chunk_size", self.chunk_size, 1, 1 << 20)
        # The size in bytes must be finite too: 1e300 GiB is a finite number of GiB.
        if self.l1_size_gb is not None and not (
            math.isfinite(self.l1_size_gb * GIB) and self.l1_size_gb * GIB >= MIB
        ):
            raise ConfigError(
                f"l1_size_gb: {self.l1_size_gb} is not a finite size of at least 1 MiB (or 'auto')"
            )
        for name in ("high_watermark", "low_watermark"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name}: {value} is not in (0, 1]")
        if self.low_watermark > self.high_watermark:
            raise ConfigError(
                f"low_watermark ({self.low_watermark}) is above high_watermark "
                f"({self.high_watermark})"
            )
        for name in (
            "read_lease_ttl_s",
            "write_lease_ttl_s",
            "job_ttl_s",
            "transfer_ttl_s",
            "request_ttl_s",
            "lookup_ttl_s",
            "session_ttl_s",
            "sync_lookup_timeout_s",
            "retrieve_wait_timeout_s",
            "reap_interval_s",
            "heartbeat_grace_s",
            "max_queue_wait_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: {value} is not a positive number of seconds")
        _check_range("worker_threads", self.worker_threads, 1, 1024)
        _check_range("max_frame_bytes", self.max_frame_bytes, 64 * KIB, 1 << 32)
        _check_range("max_tokens_per_key", self.max_tokens_per_key, self.chunk_size, 1 << 30)
        if self.max_tokens_per_key * 4 >= self.max_frame_bytes:
            raise ConfigError(
                f"max_tokens_per_key: {self.max_tokens_per_key} tokens take "
                f"{self.max_tokens_per_key * 4} bytes, more than max_frame_bytes "
                f"({self.max_frame_bytes}); a key at the limit could never arrive"
            )
        for name in (
            "max_in_flight_prefetches",
            "max_jobs_per_client",
            "max_sessions",
            "max_requests",
            "max_keys_per_request",
            "max_registrations_per_client",
            "max_requests_per_client",
            "max_sessions_per_client",
            "max_transfers_per_client",
            "store_max_batch",
            "store_max_in_flight_batches",
            "store_max_queued_keys",
        ):
            _check_range(name, getattr(self, name), 1, 1 << 31)
        reserved = self.max_reserved_bytes_per_client
        _check_range("max_reserved_bytes_per_client", reserved, 0, 1 << 60)
        for name in ("max_session_bytes", "max_session_bytes_per_client"):
            _check_range(name, getattr(self, name), 4096, 1 << 60)
        if self.metrics_port is not None:
            _check_range("metrics_port", self.metrics_port, 0, 65535)
        if not self.metrics_host:
            raise ConfigError("metrics_host: empty")

    # -- derived values -----------------------------------------------------------------------

    def l1_size_bytes(self) -> int:
        """The L1 arena size in bytes: ``l1_size_gb`` or the automatic size, in 2 MiB units."""
        if self.l1_size_gb is None:
            return auto_l1_size_bytes()
        wanted = int(self.l1_size_gb * GIB)
        return max(ARENA_GRANULE, wanted // ARENA_GRANULE * ARENA_GRANULE)

    def admin_token_path(self) -> str | None:
        """The admin token file: ``admin_token_file``, or beside an ipc:// socket."""
        if self.admin_token_file is not None:
            return self.admin_token_file
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://") :]
            if path and not path.startswith("@"):  # not an abstract socket
                return path + ".admin"
        return None

    def max_chunks_per_key(self) -> int:
        """``max_tokens_per_key`` in chunks (the engine's bound on one key)."""
        return max(1, self.max_tokens_per_key // self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        """A plain copy of every field (config-file shaped: it loads back through from_mapping)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "configuration") -> ServerConfig:
        """A config from ``data`` over the defaults; unknown keys raise :class:`ConfigError`."""
        known = cls.field_names()
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r}{_did_you_mean(key, known)}")
        return cls(**dict(data))


def _did_you_mean(key: object, known: Sequence[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is not in [{lo}, {hi}]")


def _coerce(name: str, value: Any, kind: str) -> Any:
    """Type-checks one field value (ints are accepted for floats); raises ConfigError."""
    if kind.startswith("opt_"):
        if value is None:
            return None
        kind = kind[4:]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an int beyond the range of a float
            raise ConfigError(f"{name}: the integer is too large for a number") from None
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind == "adapters":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of adapter tables, got {value!r}")
        out: list[dict[str, Any]] = []
        for i, spec in enumerate(value):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{name}[{i}]: expected a table/object, got {spec!r}")
            out.append(dict(spec))
        return out
    raise AssertionError(f"unknown field kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Endpoint and remote access


def _check_endpoint(config: ServerConfig) -> None:
    if (config.curve_secret_key_file is None) != (config.curve_public_key_file is None):
        raise ConfigError("curve_secret_key_file and curve_public_key_file: give both or neither")
    try:
        endpoint_policy.check_endpoint(
            config.endpoint,
            allow_remote=config.allow_remote,
            curve_enabled=config.curve_secret_key_file is not None,
            transports=("tcp", "ipc"),  # inproc:// reaches no other process
            allow_port_zero=False,  # no client could find the port
            remote_hint="allow_remote / --allow-remote, with CURVE keys",
            curve_hint="curve_secret_key_file and curve_public_key_file",
        )
    except endpoint_policy.EndpointError as exc:
        raise ConfigError(f"endpoint: {exc}") from None


def read_curve_key(path: str | os.PathLike[str], kind: str) -> str:
    """The z85 CURVE key (40 characters) in ``path``; ``kind`` is "secret" or "public".

    The file holds either the bare key or a ZeroMQ certificate (``secret-key = "..."`` /
    ``public-key = "..."`` lines, as written by ``zmq.auth.create_certificates``). A secret key
    file readable by group or others is logged as a warning.
    """
    if kind not in ("secret", "public"):
        raise ValueError(f"kind must be 'secret' or 'public', not {kind!r}")
    where = f"curve_{kind}_key_file {os.fspath(path)!r}"
    try:
        text = Path(path).expanduser().read_text(encoding="ascii")
        mode = Path(path).expanduser().stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read: {exc}") from exc
    if kind == "secret" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning("%s is accessible by group or others (mode %o)", where, mode & 0o777)
    bare = text.strip()
    if _Z85_KEY.fullmatch(bare):
        return bare
    match = re.search(rf'^\s*{kind}-key\s*=\s*"([^"]*)"\s*$', text, re.MULTILINE)
    if match and _Z85_KEY.fullmatch(match.group(1)):
        return match.group(1)
    raise ConfigError(
        f"{where}: no {kind} key found (expected 40 z85 characters or a ZeroMQ certificate)"
    )


# ---------------------------------------------------------------------------------------------
# Memory sizing


def _meminfo_bytes(text: str, key: str) -> int | None:
    """A ``/proc/meminfo`` value in bytes (``kB`` lines are scaled; bare counts returned as is)."""
    match = re.search(rf"^{re.escape(key)}:\s+(\d+)(\s+kB)?\s*$", text, re.MULTILINE)
    if match is None:
        return None
    value = int(match.group(1))
    return value * KIB if match.group(2) else value


def _read_meminfo() -> str:
    try:
        return Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return ""


def auto_l1_size_bytes(meminfo: str | None = None) -> int:
    """The automatic L1 size: 25% of MemAvailable, within [256 MiB, 64 GiB], in 2 MiB units.

    ``meminfo`` is the text of ``/proc/meminfo`` (read when None). Without MemAvailable the
    available physical pages from ``sysconf`` are used; without either, the 256 MiB minimum.
    """
    text = _read_meminfo() if meminfo is None else meminfo
    available = _meminfo_bytes(text, "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            available = 0
    size = int(available * AUTO_L1_FRACTION)
    size = min(max(size, AUTO_L1_MIN_BYTES), AUTO_L1_MAX_BYTES)
    size = size // ARENA_GRANULE * ARENA_GRANULE
    if size > available:
        _log.warning(
            "automatic L1 size %d MiB exceeds available memory (%d MiB); set l1_size_gb",
            size // MIB,
            available // MIB,
        )
    return size


def huge_pages_available(nbytes: int, meminfo: str | None = None) -> bool:
    """Whether ``/proc/meminfo`` shows enough free explicit huge pages for ``nbytes``."""
    text = _read_meminfo() if meminfo is None else meminfo
    free = _meminfo_bytes(text, "HugePages_Free")
    page = _meminfo_bytes(text, "Hugepagesize")
    if not free or not page:
        return False
    return free * page >= nbytes


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


L2Spec: TypeAlias = FsAdapterSpec | MemoryAdapterSpec

_FS_KEYS: Final = ("type", "path", "capacity_gb", "io_threads", "fsync", "o_direct")
_MEMORY_KEYS: Final = (
    "type",
    "capacity_gb",
    "latency_ms",
    "bandwidth_gbps",
    "worker_threads",
)


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


def parse_l2_spec(spec: Mapping[str, Any], index: int = 0) -> L2Spec:
    """Validates one ``l2_adapters`` entry; errors name ``l2_adapters[index].key``."""
    where = f"l2_adapters[{index}]"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a table/object, got {spec!r}")
    kind = spec.get("type")
    if kind == "fs":
        known: Sequence[str] = _FS_KEYS
    elif kind == "memory":
        known = _MEMORY_KEYS
    elif kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of: fs, memory)")
    else:
        raise ConfigError(f"{where}: unknown adapter type {kind!r} (known: fs, memory)")
    for key in spec:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key {key!r} for type {kind!r} (known: {', '.join(known)})"
            )
    if kind == "fs":
        if "path" not in spec:
            raise ConfigError(f"{where}.path: required for an fs adapter")
        path = _coerce(f"{where}.path", spec["path"], "str")
        if not path:
            raise ConfigError(f"{where}.path: empty")
        capacity_gb = _spec_value(where, spec, "capacity_gb", "opt_float", None)
        capacity = (
            None if capacity_gb is None else _scaled(f"{where}.capacity_gb", capacity_gb, GIB)
        )
        io_threads = _spec_value(where, spec, "io_threads", "int", 4)
        _check_range(f"{where}.io_threads", io_threads, 1, 256)
        return FsAdapterSpec(
            path=os.path.abspath(os.path.expanduser(path)),
            capacity_bytes=capacity,
            io_threads=io_threads,
            fsync=_spec_value(where, spec, "fsync", "bool", False),
            o_direct=_spec_value(where, spec, "o_direct", "bool", False),
        )
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


def build_l2_adapter(spec: L2Spec) -> _core.L2Adapter:
    """Constructs the native adapter for a parsed spec (an fs adapter recovers its index)."""
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
            adapters.append(build_l2_adapter(parse_l2_spec(raw, i)))
    except BaseException:
        for adapter in adapters:
            adapter.close()
        raise
    return adapters


# ---------------------------------------------------------------------------------------------
# Loading


def _toml_module() -> Any:
    # tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ConfigError("TOML config files need Python 3.11+ or the 'tomli' package; or use JSON")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The table in a ``.toml`` or ``.json`` config file (keys are not checked here)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"config file {str(p)!r}: unsupported extension (use .toml or .json)")
    toml = _toml_module() if suffix == ".toml" else None
    try:
        if toml is not None:
            with p.open("rb") as fh:
                data: Any = toml.load(fh)
        else:
            with p.open("r", encoding="utf-8") as fh:
                data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: cannot read: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
    except Exception as exc:
        if toml is not None and isinstance(exc, toml.TOMLDecodeError):
            raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a table/object")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerConfig:
    """Defaults < the config file at ``path`` (if any) < ``overrides`` (field name -> value)."""
    merged: dict[str, Any] = {}
    if path is not None:
        file_values = load_config_file(path)
        known = ServerConfig.field_names()
        for key in file_values:
            if key not in known:
                raise ConfigError(
                    f"config file {os.fspath(path)!r}: unknown key {key!r}"
                    f"{_did_you_mean(key, known)}"
                )
        merged.update(file_values)
    if overrides:
        merged.update(overrides)
    return ServerConfig.from_mapping(merged)


# ---------------------------------------------------------------------------------------------
# Command line


def _flag_default(value: Any, none_text: str) -> str:
    if value is None:
        return none_text
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "none"
    return str(value)


def _parse_positive_float_or_auto(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    return float(text)


def _parse_port_or_off(text: str) -> int | None:
    if text.strip().lower() in ("off", "none"):
        return None
    return int(text)


def _parse_adapter_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f'expected a JSON object such as {{"type": "fs", "path": "/dir"}}, got {text!r}'
        )
    return value


def _parse_optional_path(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


_FLAG_TYPES: Final[dict[str, Callable[[str], Any]]] = {
    "int": int,
    "float": float,
    "str": str,
    "opt_str": _parse_optional_path,
}


_DEST_PREFIX: Final = "serve_"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one flag per :class:`ServerConfig` field to ``parser``.

    Flags that are not given leave no attribute in the namespace (their default is
    ``argparse.SUPPRESS``), which is how :func:`config_from_args` tells them from given ones;
    the help texts show the built-in defaults. Destinations are ``serve_<field>`` so that a
    parent parser's own options (``--log-level`` of the top-level CLI) never pose as given flags.
    """
    parser.add_argument(
        "--config",
        dest=_DEST_PREFIX + "config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML (.toml) or JSON (.json) file of settings, keys as the field names "
        "(chunk_size, l2_adapters, ...); flags override it (default: none)",
    )
    for f in dataclasses.fields(ServerConfig):
        kind: str = f.metadata["kind"]
        default = [] if kind == "adapters" else f.default
        shown = _flag_default(default, f.metadata.get("none_text", "none"))
        help_text = f"{f.metadata['help']} (default: {shown})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar", None)
        elif kind == "adapters":
            flag = "--l2-adapter"
            kwargs["action"] = "append"
            kwargs["type"] = _parse_adapter_json
        elif f.name == "l1_size_gb":
            kwargs["type"] = _parse_positive_float_or_auto
        elif f.name == "metrics_port":
            kwargs["type"] = _parse_port_or_off
        elif f.name == "log_level":
            kwargs["type"] = str.upper
        else:
            kwargs["type"] = _FLAG_TYPES[kind]
        parser.add_argument(flag, dest=_DEST_PREFIX + f.name, **kwargs)


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed flags: defaults < ``--config`` file < given flags."""
    overrides = {
        name: getattr(ns, _DEST_PREFIX + name)
        for name in ServerConfig.field_names()
        if hasattr(ns, _DEST_PREFIX + name)
    }
    return load_config(getattr(ns, _DEST_PREFIX + "config", None), overrides)


# ---------------------------------------------------------------------------------------------
# Building the storage and the engine


def _core_attr(name: str) -> Any:
    return getattr(_core, name)


def engine_available() -> bool:
    """Whether the installed native module has the CacheEngine binding."""
    return hasattr(_core, "CacheEngine") and hasattr(_core, "EngineConfig")


_ARENA_BACKENDS: Final = {
    "memfd": _core.ArenaBackend.MEMFD,
    "posix_shm": _core.ArenaBackend.POSIX_SHM,
}
_HASH_ALGORITHMS: Final = {
    "sha256": _core.HashAlgorithm.SHA256,
    "xxh3": _core.HashAlgorithm.XXH3,
}


def _storage_manager_config(
    config: ServerConfig, adapters: Sequence[_core.L2Adapter]
) -> _core.StorageManagerConfig:
    arena_size = config.l1_size_bytes()
    smc = _core.StorageManagerConfig(
        arena_size,
        arena_backend=_ARENA_BACKENDS[config.arena_backend],
        table=_core.ObjectTableOptions(
            read_lease_ttl_s=config.read_lease_ttl_s,
            write_lease_ttl_s=config.write_lease_ttl_s,
            high_watermark=config.high_watermark,
            low_watermark=config.low_watermark,
            reap_interval_s=config.reap_interval_s,
            eviction_policy=config.eviction_policy,
        ),
        prefetch=_core.PrefetchOptions(
            max_in_flight=config.max_in_flight_prefetches,
            max_jobs_per_client=config.max_jobs_per_client,
            job_ttl_s=config.job_ttl_s,
            reap_interval_s=config.reap_interval_s,
        ),
        store=_core.StoreControllerOptions(
            max_batch=config.store_max_batch,
            max_in_flight_batches=config.store_max_in_flight_batches,
            max_queued_keys=config.store_max_queued_keys,
            free_l1_after_store=config.free_l1_after_store,
        ),
        adapters=adapters,
    )
    smc.arena_huge_pages = config.hugepages == "on" or (
        config.hugepages == "auto" and huge_pages_available(arena_size)
    )
    return smc


def build_storage_manager(config: ServerConfig) -> _core.StorageManager:
    """Builds the L2 adapters and a started :class:`StorageManager` for ``config``.

    The caller owns the manager and calls ``stop()`` on it. Raises :class:`ConfigError` for
    settings this build cannot honour and the core's errors (LMCacheError) for the rest.
    """
    if config.hash_algorithm == "xxh3" and not _core.build_info().get("xxhash", False):
        raise ConfigError("hash_algorithm: 'xxh3' but this build has no xxHash; use 'sha256'")
    adapters = build_l2_adapters(config)
    storage: _core.StorageManager | None = None
    try:
        smc = _storage_manager_config(config, adapters)
        storage = _core.StorageManager(smc)
        storage.start()
        arena = storage.arena()
        if config.hugepages == "on" and not arena.huge_pages:
            raise ConfigError(
                "hugepages: 'on', but the arena got normal pages; reserve huge pages "
                "(/proc/sys/vm/nr_hugepages) or use 'auto'"
            )
    except BaseException:
        if storage is not None:
            storage.stop()
        for adapter in adapters:
            adapter.close()
        raise
    _log.info(
        "L1 arena: %.1f MiB (%s%s), %d L2 adapter(s)%s",
        arena.size / MIB,
        config.arena_backend,
        ", huge pages" if arena.huge_pages else "",
        len(adapters),
        "".join(f" [{a.name}]" for a in adapters),
    )
    return storage


def build_storage(config: ServerConfig) -> tuple[_core.StorageManager, CacheEngine]:
    """The started storage manager and the started ``_core.CacheEngine`` on top of it.

    The engine's reaper thread runs (``engine.start()``). The caller owns both and shuts down in
    this order: ``engine.stop()``, then ``storage.stop()`` (the storage must outlive the engine).
    Raises RuntimeError when the installed native module predates the engine binding, and
    :class:`ConfigError` / core errors as :func:`build_storage_manager`.
    """
    if not engine_available():
        raise RuntimeError(
            "lmcache_cpp._core has no CacheEngine/EngineConfig: the installed native module "
            "predates the engine binding; rebuild and reinstall the package"
        )
    if config.hash_algorithm == "xxh3":
        _log.warning(
            "hash_algorithm xxh3 is not collision resistant: do not share this server between "
            "tenants that must not read each other's KV"
        )
    # Looked up by name until the typed stub (_core.pyi) declares the engine classes.
    engine_config_cls = _core_attr("EngineConfig")
    engine_cls = _core_attr("CacheEngine")
    engine_config = engine_config_cls(
        chunk_size=config.chunk_size,
        hash_algorithm=_HASH_ALGORITHMS[config.hash_algorithm],
        sync_lookup_timeout_s=config.sync_lookup_timeout_s,
        retrieve_wait_timeout_s=config.retrieve_wait_timeout_s,
        transfer_ttl_s=config.transfer_ttl_s,
        request_ttl_s=config.request_ttl_s,
        lookup_ttl_s=config.lookup_ttl_s,
        session_ttl_s=config.session_ttl_s,
        max_sessions=config.max_sessions,
        max_requests=config.max_requests,
        max_keys_per_request=config.max_keys_per_request,
        max_registrations_per_client=config.max_registrations_per_client,
        max_transfers_per_client=config.max_transfers_per_client,
        max_chunks_per_key=config.max_chunks_per_key(),
        max_requests_per_client=config.max_requests_per_client,
        max_reserved_bytes_per_client=config.max_reserved_bytes_per_client,
        max_session_bytes=config.max_session_bytes,
        max_sessions_per_client=config.max_sessions_per_client,
        max_session_bytes_per_client=config.max_session_bytes_per_client,
    )
    storage = build_storage_manager(config)
    engine: CacheEngine = None
    try:
        engine = engine_cls(storage, engine_config)
        engine.start()
    except BaseException:
        if engine is not None:
            engine.stop()
        storage.stop()
        for adapter in storage.adapters():
            adapter.close()
        raise
    return storage, engine


def server_options(config: ServerConfig) -> dict[str, Any]:
    """Keyword arguments of the server's ``ServerOptions`` (CURVE keys read from their files)."""
    secret: str | None = None
    public: str | None = None
    if config.curve_secret_key_file is not None and config.curve_public_key_file is not None:
        secret = read_curve_key(config.curve_secret_key_file, "secret")
        public = read_curve_key(config.curve_public_key_file, "public")
    return {
        "endpoint": config.endpoint,
        "worker_threads": config.worker_threads,
        "max_queue_wait_s": config.max_queue_wait_s,
        "heartbeat_grace_s": config.heartbeat_grace_s,
        "max_frame_bytes": config.max_frame_bytes,
        "max_tokens_per_key": config.max_tokens_per_key,
        "allow_remote": config.allow_remote,
        "curve_secret_key": secret,
        "curve_public_key": public,
        "reap_interval_s": config.reap_interval_s,
    }
