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

from lmcache_cpp.config.args import (
    add_serve_arguments,
    config_from_args,
)
from lmcache_cpp.config.common import (
    AUTO_L1_FRACTION,
    AUTO_L1_MAX_BYTES,
    AUTO_L1_MIN_BYTES,
    ConfigError,
)
from lmcache_cpp.config.l2 import (
    FsAdapterSpec,
    MemoryAdapterSpec,
    PythonAdapterSpec,
    RedisAdapterSpec,
    build_l2_adapter,
    build_l2_adapters,
    fs_auto_capacity_bytes,
    parse_l2_spec,
)
from lmcache_cpp.config.loading import (
    load_config,
    load_config_file,
)
from lmcache_cpp.config.schema import (
    ServerConfig,
    read_curve_key,
)
from lmcache_cpp.config.sizing import (
    auto_l1_size_bytes,
    huge_pages_available,
)
from lmcache_cpp.config.storage import (
    build_storage,
    build_storage_manager,
    engine_available,
    server_options,
)

__all__ = [
    "AUTO_L1_FRACTION",
    "AUTO_L1_MAX_BYTES",
    "AUTO_L1_MIN_BYTES",
    "ConfigError",
    "FsAdapterSpec",
    "MemoryAdapterSpec",
    "PythonAdapterSpec",
    "RedisAdapterSpec",
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
