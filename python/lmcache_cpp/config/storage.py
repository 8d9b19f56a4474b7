"""Building the storage manager, the engine and the server options from a configuration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from lmcache_cpp import _core
from lmcache_cpp.config.common import (
    MIB,
    CacheEngine,
    ConfigError,
)
from lmcache_cpp.config.l2 import (
    build_l2_adapters,
)
from lmcache_cpp.config.schema import (
    ServerConfig,
    read_curve_key,
)
from lmcache_cpp.config.sizing import (
    huge_pages_available,
)

_log = logging.getLogger(__name__)

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


def build_storage_manager(
    config: ServerConfig, extra_l2_adapters: Sequence[_core.L2Adapter] = ()
) -> _core.StorageManager:
    """Builds the L2 adapters and a started :class:`StorageManager` for ``config``.

    ``extra_l2_adapters``, adapters the caller built (its own tier, or a fault-injecting one in a
    soak), go in front of the configured ones, and the manager owns them like the rest.

    The caller owns the manager and calls ``stop()`` on it. Raises :class:`ConfigError` for
    settings this build cannot honour and the core's errors (LMCacheError) for the rest.
    """
    if config.hash_algorithm == "xxh3" and not _core.build_info().get("xxhash", False):
        raise ConfigError("hash_algorithm: 'xxh3' but this build has no xxHash; use 'sha256'")
    adapters = [*extra_l2_adapters, *build_l2_adapters(config)]
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


def build_storage(
    config: ServerConfig, extra_l2_adapters: Sequence[_core.L2Adapter] = ()
) -> tuple[_core.StorageManager, CacheEngine]:
    """The started storage manager (with ``extra_l2_adapters`` in front of the configured tiers,
    as :func:`build_storage_manager`) and the started ``_core.CacheEngine`` on top of it.

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
    storage = build_storage_manager(config, extra_l2_adapters)
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
        # Only when asked for: the server-driven mode is off by default (ServerOptions.device).
        **({"device": config.device} if config.device != "none" else {}),
    }
