"""The request bodies: what each request carries, parsed and checked from its payload."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

from lmcache_cpp._core import MAX_BLOCK_HASH_SIZE
from lmcache_cpp.protocol.fields import (
    _EXHAUSTED,
    _I32_MAX,
    _I64_MAX,
    _INVALID,
    _U32_MAX,
    _U64_MAX,
    ProtocolError,
    ProtocolLimits,
    _Fields,
)

__all__ = [
    "LAYOUT_NAMES",
    "ClearRequest",
    "CommitStoreRequest",
    "DeviceStoreRequest",
    "EmptyRequest",
    "EndSessionRequest",
    "HandleRequest",
    "HelloRequest",
    "KeyRequest",
    "PrefetchWaitRequest",
    "PrepareRetrieveRequest",
    "PrepareStoreRequest",
    "RegisterRequest",
    "RequestBody",
    "SyncLookupRequest",
    "UnregisterRequest",
    "WireDeviceKv",
    "WireKey",
    "WireLayout",
    "key_map",
    "pid_namespace",
]

# ---------------------------------------------------------------------------------------------
# Request bodies


def key_map(
    model_name: str,
    world_size: int,
    worker_id: int,
    request_id: str,
    cache_salt: str,
    tokens: bytes | None,
    block_hashes: bytes | None,
    block_hash_size: int,
    start: int,
    end: int,
) -> dict[str, Any]:
    """The key map of the wire format (what :meth:`WireKey.to_wire` sends)."""
    out: dict[str, Any] = {
        "model_name": model_name,
        "world_size": world_size,
        "worker_id": worker_id,
        "request_id": request_id,
        "cache_salt": cache_salt,
        "start": start,
        "end": end,
    }
    if tokens is not None:
        out["tokens"] = tokens
    if block_hashes is not None:
        out["block_hashes"] = block_hashes
        out["block_hash_size"] = block_hash_size
    return out


@dataclass(frozen=True)
class WireKey:
    """The key map: mirrors ``_core.EngineKey`` field by field.

    Exactly one of ``tokens`` (packed little-endian uint32 token ids) and ``block_hashes``
    (``block_hash_size`` bytes per engine block) is set. ``worker_id`` -1 = every rank;
    ``end`` -1 = to the end of the key.
    """

    model_name: str
    world_size: int = 1
    worker_id: int = -1
    request_id: str = ""
    cache_salt: str = ""
    tokens: bytes | None = None
    block_hashes: bytes | None = None
    block_hash_size: int = 32
    start: int = 0
    end: int = -1

    def to_wire(self) -> dict[str, Any]:
        return key_map(**self.__dict__)  # the fields are key_map's parameters

    @staticmethod
    def parse(f: _Fields, limits: ProtocolLimits) -> WireKey:
        s = limits.max_string_bytes
        model_name = f.string("model_name", s, nonempty=True)
        world_size = f.integer("world_size", 1, _U32_MAX, 1)
        worker_id = f.integer("worker_id", -1, _I32_MAX, -1)
        if worker_id >= world_size:
            raise ProtocolError(
                _INVALID, f"key: worker_id {worker_id} must be -1 or below world_size {world_size}"
            )
        request_id = f.string("request_id", s, "")
        cache_salt = f.string("cache_salt", s, "")
        tokens = f.optional_binary("tokens")
        block_hashes = f.optional_binary("block_hashes")
        block_hash_size = f.integer("block_hash_size", 1, MAX_BLOCK_HASH_SIZE, 32)
        start = f.integer("start", 0, _I64_MAX, 0)
        end = f.integer("end", -1, _I64_MAX, -1)
        f.done()
        if (tokens is None) == (block_hashes is None):
            raise ProtocolError(
                _INVALID, "key: exactly one of 'tokens' and 'block_hashes' is required"
            )
        if tokens is not None:
            if len(tokens) % 4:
                raise ProtocolError(
                    _INVALID,
                    f"key: 'tokens' must be packed little-endian uint32 (a multiple of 4 bytes), "
                    f"got {len(tokens)} bytes",
                )
            count = len(tokens) // 4
            what = "tokens"
        else:
            assert block_hashes is not None
            if len(block_hashes) % block_hash_size:
                raise ProtocolError(
                    _INVALID,
                    f"key: 'block_hashes' is {len(block_hashes)} bytes, not a multiple of "
                    f"block_hash_size {block_hash_size}",
                )
            count = len(block_hashes) // block_hash_size
            what = "block hashes"
        if count > limits.max_tokens:
            raise ProtocolError(
                _EXHAUSTED, f"key: {count} {what} exceed the limit of {limits.max_tokens} per key"
            )
        if end != -1 and end < start:
            raise ProtocolError(_INVALID, f"key: end {end} is below start {start}")
        return WireKey(
            model_name=model_name,
            world_size=world_size,
            worker_id=worker_id,
            request_id=request_id,
            cache_salt=cache_salt,
            tokens=tokens,
            block_hashes=block_hashes,
            block_hash_size=block_hash_size,
            start=start,
            end=end,
        )


LAYOUT_NAMES: Final = ("nhd", "hnd", "flashinfer", "mla")
"""Wire names of ``_core.KvLayout`` members, in enum order (NHD=0, HND=1, FLASHINFER=2, MLA=3)."""


@dataclass(frozen=True)
class WireLayout:
    """The layout map of REGISTER_KV_CACHE: ``_core.KvCacheLayout`` field by field."""

    layout: str
    num_layers: int
    block_size: int
    num_heads: int
    head_size: int
    element_size: int
    num_blocks: int
    block_stride: int = 0
    plane_stride: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "num_layers": self.num_layers,
            "block_size": self.block_size,
            "num_heads": self.num_heads,
            "head_size": self.head_size,
            "element_size": self.element_size,
            "num_blocks": self.num_blocks,
            "block_stride": self.block_stride,
            "plane_stride": self.plane_stride,
        }

    @staticmethod
    def parse(f: _Fields) -> WireLayout:
        layout = f.string("layout", 32)
        if layout not in LAYOUT_NAMES:
            raise ProtocolError(
                _INVALID,
                f"layout: 'layout' must be one of {', '.join(LAYOUT_NAMES)}, got {layout!r}",
            )
        out = WireLayout(
            layout=layout,
            num_layers=f.integer("num_layers", 1, _U32_MAX),
            block_size=f.integer("block_size", 1, _U32_MAX),
            num_heads=f.integer("num_heads", 1, _U32_MAX),
            head_size=f.integer("head_size", 1, _U32_MAX),
            element_size=f.integer("element_size", 1, _U32_MAX),
            num_blocks=f.integer("num_blocks", 1, _I64_MAX),
            block_stride=f.integer("block_stride", 0, _I64_MAX, 0),
            plane_stride=f.integer("plane_stride", 0, _I64_MAX, 0),
        )
        f.done()
        return out


@dataclass(frozen=True)
class EmptyRequest:
    """PING, GET_CHUNK_SIZE, STATUS, GOODBYE: an empty map."""

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> EmptyRequest:
        return cls()

    def to_wire(self) -> dict[str, Any]:
        return {}


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace (None where /proc does not say): two processes
    with the same value see the same pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class HelloRequest:
    """HELLO: ``client_name`` is free text for the server's log (e.g. ``"vllm worker 3"``).

    ``pid`` and ``pid_ns`` (the inode of ``/proc/self/ns/pid``) name the client's process: a
    server in the same pid namespace watches it, so that arena extents fenced for the client's
    writers are freed once the process has exited (docs/design/integrity.md).
    """

    client_name: str = ""
    pid: int | None = None
    pid_ns: int | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> HelloRequest:
        return cls(
            f.string("client_name", limits.max_string_bytes, ""),
            f.optional_integer("pid", 1, _I32_MAX),
            f.optional_integer("pid_ns", 0, _U64_MAX),
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client_name": self.client_name}
        if self.pid is not None:
            out["pid"] = self.pid
            out["pid_ns"] = self.pid_ns
        return out


@dataclass(frozen=True)
class WireDeviceKv:
    """REGISTER_KV_CACHE's optional ``device`` map (server-driven mode): which device layer the
    handles are for (``kind``: ``"cuda"`` or ``"fake"``), the engine's device index, and
    ``kv_handles``, one 80-byte record per layer (``lmcache_cpp.device.KV_RECORD_BYTES``)."""

    kind: str
    kv_handles: bytes
    device_id: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "device_id": self.device_id, "kv_handles": self.kv_handles}

    @staticmethod
    def parse(f: _Fields) -> WireDeviceKv:
        kind = f.string("kind", 16)
        if kind not in ("cuda", "fake"):
            raise ProtocolError(_INVALID, f"REGISTER_KV_CACHE.device: unknown kind {kind!r}")
        out = WireDeviceKv(kind, f.binary("kv_handles"), f.integer("device_id", 0, _I32_MAX, 0))
        f.done()
        return out


@dataclass(frozen=True)
class RegisterRequest:
    """REGISTER_KV_CACHE; ``device`` only in server-driven mode (absent: the engine-driven
    registration, the same bytes as before the field existed)."""

    model_name: str
    world_size: int
    worker_id: int
    layout: WireLayout
    device: WireDeviceKv | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> RegisterRequest:
        model_name = f.string("model_name", limits.max_string_bytes, nonempty=True)
        world_size = f.integer("world_size", 1, _U32_MAX)
        worker_id = f.integer("worker_id", 0, world_size - 1)
        layout = WireLayout.parse(f.mapping("layout"))
        device = None
        if f.has("device"):
            device = WireDeviceKv.parse(f.mapping("device"))
        return cls(model_name, world_size, worker_id, layout, device)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_name": self.model_name,
            "world_size": self.world_size,
            "worker_id": self.worker_id,
            "layout": self.layout.to_wire(),
        }
        if self.device is not None:
            out["device"] = self.device.to_wire()
        return out


DEFAULT_EVENT_WAIT_S: Final = 10.0
"""STORE/RETRIEVE's default ``timeout_s``: the longest the server waits for the engine's event."""


@dataclass(frozen=True)
class DeviceStoreRequest:
    """STORE and RETRIEVE (server-driven mode): the key, the registration whose device KV the
    server copies, the request's block table (``block_ids``: packed little-endian int64), the
    engine's event (``event``: the server copies only after it completed) and how long the server
    waits for it (``timeout_s``). ``skip_tokens`` is RETRIEVE's (leading tokens left alone)."""

    key: WireKey
    registration_id: int
    block_ids: bytes
    event: bytes
    timeout_s: float = DEFAULT_EVENT_WAIT_S
    skip_tokens: int = 0

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> DeviceStoreRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        registration_id = f.integer("registration_id", 0, _U64_MAX)
        block_ids = f.binary("block_ids")
        if len(block_ids) % 8:
            raise ProtocolError(
                _INVALID,
                f"block_ids must be packed int64 (a multiple of 8 bytes), got {len(block_ids)}",
            )
        if len(block_ids) // 8 > limits.max_tokens:
            raise ProtocolError(_EXHAUSTED, f"more than {limits.max_tokens} block ids")
        event = f.binary("event")
        if len(event) != 64:
            raise ProtocolError(_INVALID, f"event must be 64 bytes, got {len(event)}")
        timeout_s = f.number("timeout_s", 0.0, limits.max_wait_s, DEFAULT_EVENT_WAIT_S)
        skip = f.integer("skip_tokens", 0, _I64_MAX, 0)
        return cls(key, registration_id, block_ids, event, timeout_s, skip)

    def to_wire(self) -> dict[str, Any]:
        return {
            "key": self.key.to_wire(),
            "registration_id": self.registration_id,
            "block_ids": self.block_ids,
            "event": self.event,
            "timeout_s": self.timeout_s,
            "skip_tokens": self.skip_tokens,
        }


@dataclass(frozen=True)
class UnregisterRequest:
    registration_id: int

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> UnregisterRequest:
        return cls(f.integer("registration_id", 0, _U64_MAX))

    def to_wire(self) -> dict[str, Any]:
        return {"registration_id": self.registration_id}


@dataclass(frozen=True)
class KeyRequest:
    """LOOKUP and FREE_LOOKUP_LOCKS."""

    key: WireKey
    tp_size: int = 1

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> KeyRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        return cls(key, f.integer("tp_size", 1, _U32_MAX, 1))

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire(), "tp_size": self.tp_size}


@dataclass(frozen=True)
class SyncLookupRequest:
    """SYNC_LOOKUP: ``timeout_s`` is the L2 deadline (None = the engine's default)."""

    key: WireKey
    tp_size: int = 1
    timeout_s: float | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> SyncLookupRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        tp_size = f.integer("tp_size", 1, _U32_MAX, 1)
        return cls(key, tp_size, f.optional_number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_wire(), "tp_size": self.tp_size}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


@dataclass(frozen=True)
class PrepareStoreRequest:
    key: WireKey

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrepareStoreRequest:
        return cls(WireKey.parse(f.mapping("key"), limits))

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire()}


@dataclass(frozen=True)
class PrepareRetrieveRequest:
    """PREPARE_RETRIEVE: ``timeout_s`` bounds the wait for the request's pending L2 load
    (None = the engine's default)."""

    key: WireKey
    timeout_s: float | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrepareRetrieveRequest:
        key = WireKey.parse(f.mapping("key"), limits)
        return cls(key, f.optional_number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_wire()}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


@dataclass(frozen=True)
class HandleRequest:
    """QUERY_PREFETCH_STATUS, COMMIT_RETRIEVE."""

    handle: bytes

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> HandleRequest:
        return cls(f.handle("handle"))

    def to_wire(self) -> dict[str, Any]:
        return {"handle": self.handle}


@dataclass(frozen=True)
class PrefetchWaitRequest:
    handle: bytes
    timeout_s: float

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> PrefetchWaitRequest:
        return cls(f.handle("handle"), f.number("timeout_s", 0.0, limits.max_wait_s))

    def to_wire(self) -> dict[str, Any]:
        return {"handle": self.handle, "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class CommitStoreRequest:
    """COMMIT_STORE. ``crc32c``: the CRC32C of every object the worker wrote, one little-endian
    uint32 per offset of the PREPARE_STORE reply (entries of skipped offsets are ignored); absent,
    the server computes them."""

    handle: bytes
    success: bool = True
    crc32c: bytes | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> CommitStoreRequest:
        crc32c = f.optional_binary("crc32c")
        if crc32c is not None and len(crc32c) % 4 != 0:
            raise ProtocolError(
                _INVALID, "COMMIT_STORE: field 'crc32c' must hold whole uint32 values"
            )
        return cls(f.handle("handle"), f.boolean("success", True), crc32c)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"handle": self.handle, "success": self.success}
        if self.crc32c is not None:
            out["crc32c"] = self.crc32c
        return out


@dataclass(frozen=True)
class EndSessionRequest:
    model_name: str
    request_id: str

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> EndSessionRequest:
        s = limits.max_string_bytes
        return cls(f.string("model_name", s, nonempty=True), f.string("request_id", s))

    def to_wire(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "request_id": self.request_id}


@dataclass(frozen=True)
class ClearRequest:
    """CLEAR. ``force`` also drops leased objects and needs ``admin_token``."""

    force: bool = False
    admin_token: str | None = None

    @classmethod
    def parse(cls, f: _Fields, limits: ProtocolLimits) -> ClearRequest:
        return cls(
            f.boolean("force", False), f.optional_string("admin_token", limits.max_string_bytes)
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"force": self.force}
        if self.admin_token is not None:
            out["admin_token"] = self.admin_token
        return out


RequestBody = (
    EmptyRequest
    | HelloRequest
    | RegisterRequest
    | UnregisterRequest
    | KeyRequest
    | SyncLookupRequest
    | PrepareStoreRequest
    | PrepareRetrieveRequest
    | HandleRequest
    | PrefetchWaitRequest
    | CommitStoreRequest
    | EndSessionRequest
    | ClearRequest
    | DeviceStoreRequest
)
