"""lmcache_cpp: a KV-cache offloading server for LLM inference engines, with a C++17 core.

This package currently exposes the native core (``lmcache_cpp._core``): chunk hashing, object
keys, the shared-memory arena, the extent allocator, the object table, the L2 adapters (with
:class:`PythonL2Adapter`, the base class of tiers written in Python), the storage manager and
the CPU KV copy kernels (:class:`KvCacheView`). The GPU data path lives in
:mod:`lmcache_cpp.cuda` (present in CUDA builds; :func:`cuda_available` and
:func:`cuda_unavailable_reason` say whether it can be used here, and why not).
Failures of core calls raise the classes in :mod:`lmcache_cpp.errors`, re-exported here.

Core log lines are forwarded to the ``logging`` logger ``"lmcache_cpp.core"`` from import time
until interpreter exit; :func:`set_core_log_level` changes which levels the core emits.
"""

from __future__ import annotations

import atexit
import logging

from lmcache_cpp import _core
from lmcache_cpp._core import (
    CHUNK_HASH_SIZE,
    MAX_BLOCK_HASH_SIZE,
    AllocatorStats,
    Arena,
    ArenaBackend,
    ArenaDescriptor,
    AttachedArena,
    Bitmap,
    ChunkHash,
    ChunkHasher,
    Extent,
    ExtentAllocator,
    FaultKind,
    FileSystemL2Adapter,
    FsRecoveryReport,
    HashAlgorithm,
    HashSessionCache,
    HashSessionStats,
    JobHandle,
    KvCacheLayout,
    KvCacheView,
    KvLayout,
    L2Adapter,
    L2AdapterStats,
    L2Op,
    LeaseOwner,
    ManualClock,
    MemoryL2Adapter,
    NamespaceConfig,
    ObjectInfo,
    ObjectKey,
    ObjectState,
    ObjectTable,
    ObjectTableOptions,
    ObjectTableStats,
    PrefetchController,
    PrefetchOptions,
    PrefetchResult,
    PrefetchStats,
    PythonL2Adapter,
    RedisAdapterStats,
    RedisL2Adapter,
    Reservation,
    ReserveMode,
    StatusCode,
    StorageManager,
    StorageManagerConfig,
    StorageStats,
    StoreController,
    StoreControllerOptions,
    StoreControllerStats,
    SyncAdapterStats,
    SyncLookupResult,
    build_info,
    crc32c,
    expand_to_all_ranks,
    keys_for_rank,
    status_code_name,
    version,
)
from lmcache_cpp.cuda import cuda_available, cuda_info, cuda_unavailable_reason
from lmcache_cpp.errors import (
    AlreadyExistsError,
    CancelledError,
    CorruptionError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KeyAbsentError,
    LeaseNotHeldError,
    LMCacheError,
    LMCacheIOError,
    LockedError,
    NotFoundError,
    NotReadableError,
    NotSupportedError,
    NotWritableError,
    OutOfMemoryError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    WrongStateError,
)

__version__: str = version()

__all__ = [
    "CHUNK_HASH_SIZE",
    "MAX_BLOCK_HASH_SIZE",
    "AllocatorStats",
    "AlreadyExistsError",
    "Arena",
    "ArenaBackend",
    "ArenaDescriptor",
    "AttachedArena",
    "Bitmap",
    "CancelledError",
    "ChunkHash",
    "ChunkHasher",
    "CorruptionError",
    "DeadlineExceededError",
    "Extent",
    "ExtentAllocator",
    "FaultKind",
    "FileSystemL2Adapter",
    "FsRecoveryReport",
    "HashAlgorithm",
    "HashSessionCache",
    "HashSessionStats",
    "InternalError",
    "InvalidArgumentError",
    "JobHandle",
    "KeyAbsentError",
    "KvCacheLayout",
    "KvCacheView",
    "KvLayout",
    "L2Adapter",
    "L2AdapterStats",
    "L2Op",
    "LMCacheError",
    "LMCacheIOError",
    "LeaseNotHeldError",
    "LeaseOwner",
    "LockedError",
    "ManualClock",
    "MemoryL2Adapter",
    "NamespaceConfig",
    "NotFoundError",
    "NotReadableError",
    "NotSupportedError",
    "NotWritableError",
    "ObjectInfo",
    "ObjectKey",
    "ObjectState",
    "ObjectTable",
    "ObjectTableOptions",
    "ObjectTableStats",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "PrefetchController",
    "PrefetchOptions",
    "PrefetchResult",
    "PrefetchStats",
    "PythonL2Adapter",
    "RedisAdapterStats",
    "RedisL2Adapter",
    "Reservation",
    "ReserveMode",
    "ResourceExhaustedError",
    "StatusCode",
    "StorageManager",
    "StorageManagerConfig",
    "StorageStats",
    "StoreController",
    "StoreControllerOptions",
    "StoreControllerStats",
    "SyncAdapterStats",
    "SyncLookupResult",
    "UnavailableError",
    "WrongStateError",
    "__version__",
    "build_info",
    "crc32c",
    "cuda_available",
    "cuda_info",
    "cuda_unavailable_reason",
    "expand_to_all_ranks",
    "keys_for_rank",
    "set_core_log_level",
    "status_code_name",
    "version",
]

CORE_LOGGER_NAME = "lmcache_cpp.core"
_core_logger = logging.getLogger(CORE_LOGGER_NAME)


def _forward_core_log(level: int, message: str) -> None:
    # Called by the native log sink with the GIL held, from whichever thread logged.
    _core_logger.log(level, "%s", message)


def set_core_log_level(level: int) -> None:
    """Forward core log lines at or above ``level`` (a ``logging`` level) to "lmcache_cpp.core".

    The core drops lines below ``level`` before formatting them, so lowering it below
    ``logging.WARNING`` costs a little on the paths that log at debug or info level.
    """
    _core.set_log_handler(_forward_core_log, level)


def _reset_core_log_handler() -> None:
    # Runs at interpreter exit, before the interpreter tears down: afterwards core log lines go
    # to stderr and no C++ thread tries to call into Python.
    _core.set_log_handler(None)


set_core_log_level(logging.WARNING)
atexit.register(_reset_core_log_handler)
