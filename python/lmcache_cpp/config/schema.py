"""The configuration schema: :class:`ServerConfig`, every knob with its default and help, and
the checks run when one is constructed."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_cpp import endpoint as endpoint_policy
from lmcache_cpp.config.common import (
    _LOG_LEVELS,
    _Z85_KEY,
    ARENA_GRANULE,
    GIB,
    KIB,
    MIB,
    ConfigError,
    _check_range,
    _coerce,
    _did_you_mean,
)
from lmcache_cpp.config.l2 import (
    FsAdapterSpec,
    parse_l2_spec,
)
from lmcache_cpp.config.sizing import (
    auto_l1_size_bytes,
)

_log = logging.getLogger(__name__)

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
    device: str = _knob(
        "none",
        "str",
        "device layer of the server-driven transfer mode (STORE/RETRIEVE): none (those requests "
        "are NotSupported), cuda (CUDA IPC; needs a CUDA build), or fake (for tests only: shared "
        "memory stands in for GPU memory)",
        choices=("none", "fake", "cuda"),
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
            '"bandwidth_gbps": 0} (GB/s, 0 = unlimited) or {"type": "python", "class": '
            '"package.module:Class", ...} (a lmcache_cpp.PythonL2Adapter subclass, built with '
            "the other keys as keyword arguments) or "
            '{"type": "redis", "url": "redis://HOST:PORT", "cluster": false, "username": "", '
            '"password": "", '
            '"key_prefix": "lmc:", "tls_ca_file": "", "tls_cert_file": "", "tls_key_file": "", '
            '"connect_timeout_ms": 2000, "op_timeout_ms": 5000, "connections_per_node": 4, '
            '"max_in_flight_mb": 1024} (only url is required; rediss:// for TLS; see '
            "docs/l2-redis.md); on the command line it replaces the config "
            "file's list",
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
