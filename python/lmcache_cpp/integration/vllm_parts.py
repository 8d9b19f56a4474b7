"""The vLLM-independent parts of the vLLM connector (:mod:`lmcache_cpp.integration.vllm`).

* :class:`ConnectorConfig`: the ``kv_connector_extra_config`` keys, validated.
* :class:`ServerHealth`: "is the cache server usable", logged once per outage, with a rate limit
  on reconnection attempts.
* :func:`kv_view_of`: the core's :class:`~lmcache_cpp.KvCacheView` of vLLM's per-layer KV tensors
  (:class:`CudaKv`, the GPU copies' view and streams, for CUDA tensors).
* :class:`WorkerSession`: one worker's registration and arena mapping on one server incarnation,
  and the store/retrieve transfers through it, each checked against a server restart.
* The plain-data messages from the scheduler side to the workers (:class:`ConnectorMeta`) and
  back (:class:`LoadReport`).
* The two fences that keep KV computed over the blocks of a failed load out of the cache:
  :class:`LoadTracker` (scheduler side: no store is planned that depends on a load whose outcome
  is not known yet) and :class:`StoreFence` (worker side: no store is sent that depends on a load
  this worker saw fail, until the scheduler has seen the failure). See "Failed loads" in
  ``docs/vllm.md``.

Nothing here imports vLLM or torch at module level, so it can be used and tested without them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from lmcache_cpp import _core
from lmcache_cpp.client import CacheClient, HelloInfo, Key, TransferTicket
from lmcache_cpp.errors import DeadlineExceededError, InternalError, LMCacheError, UnavailableError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ConnectorConfig",
    "ConnectorMeta",
    "CudaKv",
    "KeySpec",
    "LoadOp",
    "LoadReport",
    "LoadTracker",
    "ServerHealth",
    "StoreFence",
    "StoreOp",
    "WorkerSession",
    "kv_data_path",
    "kv_layers_of",
    "kv_view_of",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# The client completes every future by its reply deadline; this only guards against a client
# whose I/O thread is gone.
_FUTURE_GUARD_S: Final = 600.0


def _result(future: concurrent.futures.Future[T]) -> T:
    try:
        return future.result(timeout=_FUTURE_GUARD_S)
    except concurrent.futures.TimeoutError:
        raise DeadlineExceededError("no reply (the client's I/O thread is gone)") from None


LOOKUP_MODES: Final = ("sync", "async")
KEY_MODES: Final = ("hash", "tokens")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` of the connector (see ``docs/vllm.md``).

    ``endpoint``: the cache server. ``lookup_mode``: ``sync`` (one SYNC_LOOKUP per request) or
    ``async`` (LOOKUP, then non-blocking QUERY_PREFETCH_STATUS on later scheduler steps).
    ``key_mode``: ``hash`` (vLLM's block hashes) or ``tokens`` (token ids). ``model_name``: the
    cache namespace (default: vLLM's served model name, dtype and KV cache dtype).
    ``timeout_s``: reply deadline of transfers and housekeeping requests. ``lookup_timeout_s``: how
    long a lookup may take (the L2 deadline of SYNC_LOOKUP; an async lookup not answered by then
    is a miss). ``retry_interval_s``: while the server is unusable, at most one reconnection
    attempt per interval. ``copy_threads``: threads of the KV copy kernels (0 = the shared pool).
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    lookup_mode: str = "sync"
    key_mode: str = "hash"
    model_name: str | None = None
    timeout_s: float = 5.0
    lookup_timeout_s: float = 2.0
    retry_interval_s: float = 1.0
    copy_threads: int = 0

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Parses ``kv_connector_extra_config``; ValueError for unknown keys or bad values (a
        misspelt key must not be ignored silently)."""
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"LMCacheCppConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known: {sorted(known)}"
            )
        config = cls(**extra)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.endpoint, str) or "://" not in self.endpoint:
            raise ValueError(f"endpoint must be a ZeroMQ URL, got {self.endpoint!r}")
        if self.lookup_mode not in LOOKUP_MODES:
            raise ValueError(f"lookup_mode must be one of {LOOKUP_MODES}, got {self.lookup_mode!r}")
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")
        if self.model_name is not None and (
            not isinstance(self.model_name, str) or not self.model_name
        ):
            raise ValueError("model_name must be a non-empty string")
        for name in ("timeout_s", "lookup_timeout_s", "retry_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive, got {value!r}")
        if isinstance(self.copy_threads, bool) or not isinstance(self.copy_threads, int):
            raise ValueError(f"copy_threads must be an int, got {self.copy_threads!r}")
        if self.copy_threads < 0:
            raise ValueError(f"copy_threads must be >= 0, got {self.copy_threads}")


# ---------------------------------------------------------------------------------------------
# Server health


class ServerHealth:
    """Whether the cache server is usable, as seen by one side of the connector.

    The first failure of an outage is logged at WARNING and later ones at DEBUG; the recovery is
    logged at INFO. While the server is down, :meth:`may_retry` allows one attempt per
    ``retry_interval_s``. Thread-safe.
    """

    def __init__(self, what: str, retry_interval_s: float, *, up: bool = True) -> None:
        self._what = what
        self._interval = retry_interval_s
        self._lock = threading.Lock()
        self._up = up  # GUARDED_BY(_lock)
        self._next_try = 0.0  # GUARDED_BY(_lock)
        self.outages = 0  # GUARDED_BY(_lock): failures that took the server down

    @property
    def up(self) -> bool:
        with self._lock:
            return self._up

    def failed(self, error: BaseException | str) -> None:
        with self._lock:
            was_up = self._up
            self._up = False
            self._next_try = time.monotonic() + self._interval
            if was_up:
                self.outages += 1
        if was_up:
            _log.warning(
                "lmcache_cpp %s: the cache server is unusable (%s); vLLM recomputes what it would "
                "have loaded, and reconnection is retried every %.1f s",
                self._what,
                error,
                self._interval,
            )
        else:
            _log.debug("lmcache_cpp %s: the cache server is still unusable: %s", self._what, error)

    def succeeded(self) -> None:
        with self._lock:
            was_up = self._up
            self._up = True
        if not was_up:
            _log.info("lmcache_cpp %s: the cache server is usable again", self._what)

    def may_retry(self) -> bool:
        """True (at most once per interval) when a reconnection attempt should be made now."""
        with self._lock:
            if self._up:
                return True
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + self._interval
            return True


# ---------------------------------------------------------------------------------------------
# KV tensors


def kv_layers_of(
    tensors: Sequence[torch.Tensor], block_size: int
) -> tuple[list[torch.Tensor], _core.KvLayout]:
    """The per-layer tensors in a core layout, and that layout, of vLLM's KV tensors (views, no
    copies; any device: only shapes and strides are read).

    Layouts (per layer, ``NB`` blocks of ``BS`` = ``block_size`` tokens, ``H`` KV heads of ``D``):

    * vLLM's CPU attention backend: ``[NB, H, BS, 2*D]``, each head's block holding its ``BS``
      K rows then its ``BS`` V rows. The core has no layout with K/V inside the head, so every
      (layer, head) becomes one FlashInfer-style layer ``[NB, 2, BS, 1, D]`` with the real
      strides: the bytes of a block plane are contiguous, token-granular skips stay exact.
    * ``[2, NB, BS, H, D]`` (NHD) or ``[2, NB, H, BS, D]`` (HND), also as a permuted view (the
      physical order decides), ``[NB, 2, BS, H, D]`` (FlashInfer), ``[NB, BS, D]`` (MLA).

    ValueError for anything else (the connector then stays disabled).
    """
    if not tensors:
        raise ValueError("no KV cache tensors")
    first = tensors[0]
    shape = tuple(first.shape)
    if first.dim() == 4 and shape[2] == block_size and shape[3] % 2 == 0:
        nb, heads, bs, two_d = shape
        d = two_d // 2
        layers: list[Any] = []
        for t in tensors:
            per_head = t.view(nb, heads, 2, bs, d)
            layers.extend(per_head[:, h].unsqueeze(3) for h in range(heads))
        return layers, _core.KvLayout.FLASHINFER
    if first.dim() == 5 and shape[0] == 2:
        token_dim = 2 if shape[2] == block_size else 3
        head_dim = 5 - token_dim
        if first.stride(token_dim) >= first.stride(head_dim):  # tokens outside heads: NHD
            perm = (0, 1, token_dim, head_dim, 4)
            layout = _core.KvLayout.NHD
        else:
            perm = (0, 1, head_dim, token_dim, 4)
            layout = _core.KvLayout.HND
        return [t.permute(*perm) for t in tensors], layout
    if first.dim() == 5 and shape[1] == 2 and shape[2] == block_size:
        return list(tensors), _core.KvLayout.FLASHINFER
    if first.dim() == 3 and shape[1] == block_size:
        return list(tensors), _core.KvLayout.MLA
    raise ValueError(
        f"unsupported KV cache tensor shape {shape} (strides {first.stride()}) for block size "
        f"{block_size}"
    )


def kv_data_path(device_type: str) -> str:
    """Which data path serves KV tensors on ``device_type``: ``"cpu"`` (the CPU kernels),
    ``"cuda"`` (the GPU kernels through the engine-driven :class:`CudaKv`); ValueError, with
    the reason, when this build or machine cannot serve them (the connector stays disabled)."""
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda":
        from lmcache_cpp.cuda import cuda_info

        info = cuda_info()
        if not info["built"] or not info["usable"]:
            raise ValueError(f"KV caches on the GPU need the GPU data path: {info['reason']}")
        return "cuda"
    raise ValueError(
        f"KV caches on {device_type} need the GPU data path, which serves CUDA tensors only"
    )


def kv_view_of(tensors: Sequence[torch.Tensor], block_size: int) -> _core.KvCacheView | CudaKv:
    """The core's view of vLLM's per-layer KV tensors (zero copy; the tensors must outlive it):
    a :class:`~lmcache_cpp.KvCacheView` for CPU tensors, a :class:`CudaKv` for CUDA tensors.
    Layouts as :func:`kv_layers_of`; ValueError when they or their device are not supported."""
    if not tensors:
        raise ValueError("no KV cache tensors")
    path = kv_data_path(tensors[0].device.type)
    layers, layout = kv_layers_of(tensors, block_size)
    if path == "cuda":
        return CudaKv(layers, layout, int(tensors[0].device.index or 0))
    return _core.KvCacheView(layers, layout)


class CudaKv:
    """vLLM's CUDA KV tensors on the engine-driven GPU path (docs/design/gpu.md).

    Loads run on the worker's own stream (the current stream on vLLM's thread, before the
    forward pass), so the forward pass is ordered after them. Stores run on a side stream of
    their own, after an event the worker recorded on its stream when the step's KV was written
    (:meth:`mark_written`, on vLLM's thread): they never block the forward pass, and each copy's
    event completes before the COMMIT (``cuda_transfer``'s stream-bound view waits for it).
    The arena is registered with CUDA once per session (:class:`WorkerSession`)."""

    def __init__(self, layers: list[Any], layout: _core.KvLayout, device: int) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.view: Any = _core.CudaKvCacheView(layers, layout)  # type: ignore[attr-defined]
        self.layout: _core.KvCacheLayout = self.view.layout
        self._store_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._load_event: Any = _core.CudaEvent(device)  # type: ignore[attr-defined]
        self._store_event: Any = _core.CudaEvent(device)  # type: ignore[attr-defined]

    def object_bytes(self, chunk_size: int) -> int:
        return int(self.view.object_bytes(chunk_size))

    def mark_written(self) -> Any:
        """An event after the work queued so far on the worker's stream (the step's KV writes)."""
        event = self._torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._torch.cuda.current_stream(self.device))
        return event

    def for_load(self) -> Any:
        """A view whose copies run on the worker's current stream and have finished when they
        return."""
        from lmcache_cpp.cuda_transfer import StreamBoundView

        stream = self._torch.cuda.current_stream(self.device).cuda_stream
        return StreamBoundView(self.view, stream, self._load_event)

    def for_store(self, written: Any) -> Any:
        """A view whose copies run on the side stream after ``written`` (:meth:`mark_written`)
        and have finished when they return. One store at a time (the store thread)."""
        from lmcache_cpp.cuda_transfer import StreamBoundView

        if written is not None:
            self._store_stream.wait_event(written)
        return StreamBoundView(self.view, self._store_stream.cuda_stream, self._store_event)


# ---------------------------------------------------------------------------------------------
# Scheduler -> worker messages (plain data: vLLM pickles them to the workers)


@dataclass(frozen=True)
class KeySpec:
    """What a worker needs to build a request's key: the request's lease id (the server's
    request id), and its token ids (uint32 LE bytes) or vLLM block hashes, covering at least the
    op's range."""

    lease_id: str
    data: bytes
    hashes: bool
    block_hash_size: int
    cache_salt: str

    def key(self, model: str, world_size: int, worker_id: int, start: int, end: int) -> Key:
        if self.hashes:
            return Key(
                model,
                world_size,
                worker_id,
                self.lease_id,
                block_hashes=self.data,
                block_hash_size=self.block_hash_size,
                cache_salt=self.cache_salt,
                start=start,
                end=end,
            )
        return Key(
            model,
            world_size,
            worker_id,
            self.lease_id,
            tokens=self.data,
            cache_salt=self.cache_salt,
            start=start,
            end=end,
        )


@dataclass(frozen=True)
class LoadOp:
    """Load tokens ``[start, end)`` (``start`` chunk aligned) of a request into its blocks,
    leaving its first ``skip`` tokens (vLLM's own prefix-cache hit) untouched."""

    req_id: str
    key: KeySpec
    block_ids: tuple[int, ...]
    start: int
    end: int
    skip: int


@dataclass(frozen=True)
class StoreOp:
    """Store the whole chunks of tokens ``[start, end)`` of a request from its blocks."""

    req_id: str
    key: KeySpec
    block_ids: tuple[int, ...]
    start: int
    end: int


@dataclass
class ConnectorMeta:
    """One scheduler step's work for the workers (a ``KVConnectorMetadata`` in vLLM).

    ``step`` numbers the scheduler's steps (0, 1, ...); ``reports_seen`` is the last step whose
    :class:`LoadReport` the scheduler had processed when it planned this one (-1: none yet);
    ``chunk_size`` is the server's, in tokens (0 while the scheduler does not know it).
    """

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    step: int = 0
    reports_seen: int = -1
    chunk_size: int = 0


@dataclass(frozen=True)
class LoadReport:
    """The outcome of one step's loads, sent by the workers to the scheduler (through vLLM's
    ``KVConnectorWorkerMetadata``) for every step that had loads: the requests whose load failed
    on some worker. Every other load of the step succeeded on every worker."""

    step: int
    failed: frozenset[str] = frozenset()

    def merge(self, other: LoadReport) -> LoadReport:
        """The report of the same step from two workers: a load failed if it failed on either."""
        if other.step != self.step:
            raise ValueError(f"cannot merge the reports of steps {self.step} and {other.step}")
        return LoadReport(self.step, self.failed | other.failed)


def merge_reports(reports: Iterable[LoadReport]) -> list[LoadReport]:
    """One report per step, in step order."""
    by_step: dict[int, LoadReport] = {}
    for report in reports:
        seen = by_step.get(report.step)
        by_step[report.step] = report if seen is None else seen.merge(report)
    return [by_step[step] for step in sorted(by_step)]


# ---------------------------------------------------------------------------------------------
# Failed loads: the two fences


@dataclass(frozen=True)
class _PendingLoad:
    step: int
    start: int  # first token of the load (chunk aligned)
    blocks: frozenset[int]  # the blocks the load fills


class LoadTracker:
    """Scheduler side: the loads whose outcome the workers have not reported yet.

    A load that fails leaves garbage in the blocks it should have filled, and vLLM discards the
    step and recomputes those tokens, but every chunk computed in that step (or in a step
    scheduled before vLLM knew of the failure) was computed over them. So a store is planned only
    once the outcome of every load it could depend on is known: the request's own load, and any
    load that fills one of the blocks its chunks were computed over (another request that shares
    a block vLLM cached in the same step). A store held back is not lost: the scheduler's
    ``stored`` mark does not advance, so a later step's store covers it. When a report says a
    load failed, :meth:`report` returns where that request's load started, and the scheduler
    moves its ``stored`` mark back there, so the chunks vLLM recomputes are stored again.

    vLLM's scheduler thread only.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _PendingLoad] = {}
        self.reports_seen = -1  # the last step whose report was processed
        self.failed_loads = 0  # loads reported failed
        self.held_back = 0  # store plans that waited for a load's outcome

    @property
    def pending(self) -> int:
        return len(self._pending)

    def planned(self, req_id: str, step: int, start: int, blocks: Iterable[int]) -> None:
        """A load of ``req_id`` filling ``blocks`` is sent to the workers in ``step``."""
        self._pending[req_id] = _PendingLoad(step, start, frozenset(blocks))

    def holds_back(self, req_id: str, block_ids: Sequence[int]) -> bool:
        """True when a store of ``req_id`` whose chunks were computed over ``block_ids`` must
        wait: its own load, or a load into one of those blocks, has not been reported yet."""
        if not self._pending:
            return False
        if req_id in self._pending or any(
            not load.blocks.isdisjoint(block_ids) for load in self._pending.values()
        ):
            self.held_back += 1
            return True
        return False

    def report(self, report: LoadReport) -> dict[str, int | None]:
        """Settles the loads of ``report.step``. Returns the requests whose load failed, each
        with the first token of its load (None: a load this tracker no longer knows, e.g. of a
        request that was preempted and loaded again since)."""
        self.reports_seen = max(self.reports_seen, report.step)
        failed: dict[str, int | None] = dict.fromkeys(sorted(report.failed))
        for req_id, load in list(self._pending.items()):
            if load.step == report.step:
                del self._pending[req_id]
                if req_id in failed:
                    failed[req_id] = load.start
        self.failed_loads += len(failed)
        return failed

    def forget(self, req_id: str) -> bool:
        """The request finished: its load is no longer waited for. True if one was pending."""
        return self._pending.pop(req_id, None) is not None


class StoreFence:
    """Worker side: the stores that a load this worker saw fail forbids.

    When a load of a request fails, its blocks hold garbage until vLLM recomputes them, and
    vLLM learns of the failure only from this step's output. Until the scheduler has processed
    that output (a metadata whose ``reports_seen`` reaches the failed step), this worker refuses
    every store of that request, and every store of any request whose chunks were computed over
    one of the failed blocks. The scheduler's :class:`LoadTracker` never plans such a store; this
    fence is the second line, on the side that saw the failure, and counts what it drops.

    vLLM's worker thread only (loads and store submissions run there).
    """

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._requests: dict[str, int] = {}  # request -> step of the failed load it depends on
        self._blocks: dict[int, int] = {}  # block -> step of the failed load that filled it
        self.stores_dropped = 0
        self.chunks_dropped = 0

    def load_failed(self, req_id: str, step: int, blocks: Iterable[int]) -> None:
        """A load of ``req_id`` into ``blocks``, sent in ``step``, failed."""
        self._requests[req_id] = max(step, self._requests.get(req_id, step))
        for block in blocks:
            self._blocks[block] = max(step, self._blocks.get(block, step))

    def lift(self, reports_seen: int) -> None:
        """The scheduler has processed the reports of every step up to ``reports_seen``."""
        if self._requests:
            self._requests = {r: s for r, s in self._requests.items() if s > reports_seen}
        if self._blocks:
            self._blocks = {b: s for b, s in self._blocks.items() if s > reports_seen}

    def admit(self, op: StoreOp, chunk_size: int) -> bool:
        """True if ``op`` may be stored; otherwise it is counted, logged and must be dropped.
        ``chunk_size``: the server's (``op``'s range is whole chunks of it)."""
        if not self._requests and not self._blocks:
            return True
        fenced = self._requests.get(op.req_id)
        if fenced is None and self._blocks:
            used = op.block_ids[: -(-op.end // self._block_size)]
            steps = [self._blocks[b] for b in used if b in self._blocks]
            if steps:
                fenced = self._requests[op.req_id] = max(steps)
        if fenced is None:
            return True
        chunk_size = max(chunk_size, 1)
        self.stores_dropped += 1
        self.chunks_dropped += (op.end - op.start) // chunk_size
        _log.warning(
            "LMCacheCppConnector: store of request %s, chunks [%d, %d), dropped: computed over "
            "the blocks of a load that failed in step %d (%d store(s) dropped so far)",
            op.req_id,
            op.start // chunk_size,
            op.end // chunk_size,
            fenced,
            self.stores_dropped,
        )
        return False

    def forget(self, req_ids: Iterable[str]) -> None:
        """These requests finished."""
        for req_id in req_ids:
            self._requests.pop(req_id, None)


# ---------------------------------------------------------------------------------------------
# Worker transfers


class StaleSessionError(UnavailableError):
    """The server that answered is not the one this worker registered with (it restarted)."""


class WorkerSession:
    """One worker's registration on one server incarnation: the client id the server gave this
    connection, the registration and the mapped arena.

    A restarted server forgets registrations and hands out a new arena, yet answers a reconnected
    client as if nothing happened. Each transfer therefore sends HELLO *after* its PREPARE and
    checks the client id before touching the arena: if the server restarted before the PREPARE,
    the id differs and nothing is copied; if it restarted after the HELLO, the COMMIT fails. No
    byte is ever read from or published into an arena of another incarnation.

    Thread-safe: transfers may run on several threads at once. A session never changes; a
    reconnection makes a new one (:meth:`open`).
    """

    def __init__(
        self,
        client: CacheClient,
        client_id: int,
        registration: Mapping[str, Any],
        kv: _core.KvCacheView | CudaKv,
        *,
        copy_threads: int = 0,
    ) -> None:
        self._client = client
        self.client_id = client_id
        self.registration_id = int(registration["registration_id"])
        self.chunk_size = int(registration["chunk_size"])
        self._object_bytes = int(registration["object_bytes"])
        self._kv = kv
        self._blocks_per_chunk = self.chunk_size // int(kv.layout.block_size)
        self._threads = copy_threads
        if self._object_bytes != kv.object_bytes(self.chunk_size):
            raise InternalError(
                f"the server's objects are {self._object_bytes} bytes, this KV cache's chunks "
                f"{kv.object_bytes(self.chunk_size)}"
            )
        descriptor = _core.ArenaDescriptor(registration["arena_path"], registration["arena_size"])
        self._arena = _core.AttachedArena(descriptor)
        # GPU copies read and write the arena directly: register it with CUDA once, for the
        # session's life (unregistered when the last transfer holding the session drops it).
        self._host: Any = None
        if isinstance(kv, CudaKv):
            self._host = _core.CudaHostRegistration(self._arena.view())  # type: ignore[attr-defined]

    @classmethod
    def open(
        cls,
        client: CacheClient,
        model: str,
        world_size: int,
        worker_id: int,
        kv: _core.KvCacheView | CudaKv,
        *,
        copy_threads: int = 0,
    ) -> WorkerSession:
        """HELLO (for the client id), REGISTER_KV_CACHE, map the arena. Raises on failure."""
        info = client.hello("vllm-worker")
        registration = client.register_kv_cache(model, world_size, worker_id, kv.layout)
        return cls(client, info.client_id, registration, kv, copy_threads=copy_threads)

    def _prepare(
        self, prepare: concurrent.futures.Future[TransferTicket]
    ) -> tuple[TransferTicket, concurrent.futures.Future[HelloInfo]]:
        """Sends HELLO right behind a PREPARE (one round trip for both) and waits for the
        ticket."""
        hello = self._client.async_hello("vllm-worker")
        return _result(prepare), hello

    def _check_same_server(self, hello: concurrent.futures.Future[HelloInfo]) -> None:
        info = _result(hello)
        if info.client_id != self.client_id:
            raise StaleSessionError(
                f"the cache server restarted (client id {info.client_id}, registered as "
                f"{self.client_id})"
            )

    def _chunk(self, block_ids: Sequence[int], chunk: int) -> npt.NDArray[np.int64]:
        lo, hi = chunk * self._blocks_per_chunk, (chunk + 1) * self._blocks_per_chunk
        if hi > len(block_ids):
            raise InternalError(f"chunk {chunk} needs blocks [{lo}, {hi}), have {len(block_ids)}")
        return np.asarray(block_ids[lo:hi], dtype=np.int64)

    def _object(self, offset: int) -> npt.NDArray[np.uint8]:
        if offset < 0 or offset + self._object_bytes > self._arena.size:
            raise InternalError(f"object offset {offset} is outside the arena")
        return self._arena.view(offset, self._object_bytes)

    def store(self, key: Key, block_ids: Sequence[int], written: Any = None) -> int:
        """PREPARE_STORE, same-server check, gather, COMMIT_STORE; returns objects published.
        ``written``: for a :class:`CudaKv`, the event after which the blocks hold the KV."""
        ticket, hello = self._prepare(self._client.async_prepare_store(key))
        # The CRC32C of every object, computed while it is copied (docs/design/integrity.md); a
        # GPU copy gives none, and the server computes them at COMMIT_STORE.
        crcs: list[int] | None = [0] * len(ticket.offsets)
        kv = self._kv.for_store(written) if isinstance(self._kv, CudaKv) else self._kv
        try:
            self._check_same_server(hello)
            chunk_ids, objects, filled = [], [], []
            for i, offset in enumerate(ticket.offsets):
                if offset >= 0:
                    chunk_ids.append(self._chunk(block_ids, ticket.first_chunk + i))
                    objects.append(self._object(offset))
                    filled.append(i)
            if objects:
                got = kv.gather_batch(
                    self.chunk_size, chunk_ids, objects, num_threads=self._threads, checksums=True
                )
                if got is None:
                    crcs = None
                else:
                    assert crcs is not None
                    for i, crc in zip(filled, got, strict=True):
                        crcs[i] = crc
        except BaseException:
            self._abandon(lambda: self._client.commit_store(ticket.handle, success=False))
            raise
        return self._client.commit_store(ticket.handle, success=True, crc32c=crcs)

    def retrieve(self, key: Key, block_ids: Sequence[int], skip: int) -> None:
        """PREPARE_RETRIEVE, same-server check, scatter (leaving the first ``skip`` tokens of the
        request untouched), COMMIT_RETRIEVE. Raises unless every chunk arrived intact: the key's
        range must be whole chunks, and the ticket must hold exactly one object per chunk of it
        (anything else would leave blocks unfilled that vLLM takes as loaded)."""
        cs = self.chunk_size
        if key.end < 0 or key.start % cs or key.end % cs or key.end <= key.start:
            raise InternalError(f"retrieve of tokens [{key.start}, {key.end}) is not whole chunks")
        first, count = key.start // cs, (key.end - key.start) // cs
        ticket, hello = self._prepare(self._client.async_prepare_retrieve(key))
        try:
            self._check_same_server(hello)
            if ticket.first_chunk != first or len(ticket.offsets) != count:
                raise InternalError(
                    f"the retrieve ticket covers chunks [{ticket.first_chunk}, "
                    f"{ticket.first_chunk + len(ticket.offsets)}), asked for [{first}, "
                    f"{first + count})"
                )
            chunk_ids, objects, skips = [], [], []
            for i, offset in enumerate(ticket.offsets):
                chunk = ticket.first_chunk + i
                if offset < 0:
                    raise InternalError(f"chunk {chunk} has no object")
                chunk_skip = min(max(skip - chunk * cs, 0), cs)
                if chunk_skip < cs:
                    chunk_ids.append(self._chunk(block_ids, chunk))
                    objects.append(self._object(offset))
                    skips.append(chunk_skip)
            if objects:
                kv = self._kv.for_load() if isinstance(self._kv, CudaKv) else self._kv
                kv.scatter_batch(
                    cs, objects, chunk_ids, skip_tokens=skips, num_threads=self._threads
                )
        except BaseException:
            self._abandon(lambda: self._client.commit_retrieve(ticket.handle))
            raise
        self._client.commit_retrieve(ticket.handle)

    def close(self) -> None:
        """Unregisters (best effort: the server may be gone). The arena stays mapped until the
        last transfer holding this session drops it."""
        self._abandon(lambda: self._client.unregister_kv_cache(self.registration_id))

    @staticmethod
    def _abandon(call: Callable[[], object]) -> None:
        try:
            call()
        except LMCacheError as exc:
            _log.debug("lmcache_cpp worker: cleanup request failed: %s", exc)
