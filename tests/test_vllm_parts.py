"""The vLLM connector's parts that do not import vLLM (``lmcache_cpp.integration.vllm_parts``):
``kv_connector_extra_config`` validation, the mapping of vLLM's KV cache tensors to the core's
layouts (every shape, checked by copying chunks through the view with torch tensors), server
health logging and retry pacing, keys, and the picklable scheduler-to-worker messages.

No vLLM here: the core test run does not have it (the end-to-end tests are in tests_vllm/)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import lmcache_cpp as lc
import server_helpers as sh
from lmcache_cpp.client import CacheClient, Key, TransferTicket
from lmcache_cpp.errors import InternalError
from lmcache_cpp.integration import vllm_parts

# ---------------------------------------------------------------------------------------------
# ConnectorConfig


def test_config_defaults() -> None:
    empty: list[dict[str, Any] | None] = [None, {}]
    for extra in empty:
        config = vllm_parts.ConnectorConfig.from_extra(extra)
        assert config == vllm_parts.ConnectorConfig()
    assert config.endpoint == "tcp://127.0.0.1:5555"
    assert (config.lookup_mode, config.key_mode) == ("sync", "hash")


def test_config_takes_every_documented_key() -> None:
    extra = {
        "endpoint": "ipc:///run/lmcache.sock",
        "lookup_mode": "async",
        "key_mode": "tokens",
        "model_name": "llama|bf16",
        "timeout_s": 3,  # ints are numbers too
        "lookup_timeout_s": 0.5,
        "retry_interval_s": 2.0,
        "copy_threads": 4,
    }
    config = vllm_parts.ConnectorConfig.from_extra(extra)
    assert {k: getattr(config, k) for k in extra} == extra


def test_config_refuses_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown .*\['lookup_mod'\].*known"):
        vllm_parts.ConnectorConfig.from_extra({"lookup_mod": "sync"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("endpoint", "127.0.0.1:5555", "ZeroMQ URL"),
        ("endpoint", 5555, "ZeroMQ URL"),
        ("lookup_mode", "later", "lookup_mode"),
        ("key_mode", "blocks", "key_mode"),
        ("model_name", "", "non-empty"),
        ("model_name", 7, "non-empty"),
        ("timeout_s", 0, "positive"),
        ("lookup_timeout_s", -1.0, "positive"),
        ("retry_interval_s", math.inf, "positive"),
        ("timeout_s", math.nan, "positive"),
        ("timeout_s", "5", "number"),
        ("timeout_s", True, "number"),
        ("copy_threads", -1, ">= 0"),
        ("copy_threads", 1.5, "int"),
        ("copy_threads", True, "int"),
    ],
)
def test_config_refuses_bad_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vllm_parts.ConnectorConfig.from_extra({key: value})


# ---------------------------------------------------------------------------------------------
# kv_view_of: vLLM's tensors -> the core's layouts
#
# Each case: how vLLM's tensors look, the layout the view must use, and where token `i` of block
# `b` lives in a tensor (its K and V, or its latent vector for MLA). A chunk is gathered from
# some blocks of one set of tensors and scattered into other blocks of zeroed tensors, leaving
# the chunk's first SKIP tokens untouched: a view that mapped the wrong bytes, or only part of
# them, cannot pass.

L, NB, BS, H, D = 2, 6, 16, 3, 8  # H != BS and NB != 2 keep the shapes unambiguous
CHUNK = 2 * BS
SRC, DST = [4, 1], [2, 5]  # a chunk's blocks in the source and in the destination
SKIP = 5

Token = Callable[[torch.Tensor, int, int], torch.Tensor]


def _cpu_token(t: torch.Tensor, b: int, i: int) -> torch.Tensor:
    # vLLM's CPU attention: [NB, H, BS, 2*D]; each head's block is its BS K rows, then BS V rows
    return t.view(NB, H, 2, BS, D)[b, :, :, i]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.bfloat16)


CASES: dict[str, tuple[Callable[[], torch.Tensor], lc.KvLayout, int, Token]] = {
    "cpu-attention": (
        lambda: _randn(NB, H, BS, 2 * D),
        lc.KvLayout.FLASHINFER,
        L * H,  # one core layer per (layer, head)
        _cpu_token,
    ),
    "nhd": (
        lambda: _randn(2, NB, BS, H, D),
        lc.KvLayout.NHD,
        L,
        lambda t, b, i: t[:, b, i],
    ),
    "hnd": (
        lambda: _randn(2, NB, H, BS, D),
        lc.KvLayout.HND,
        L,
        lambda t, b, i: t[:, b, :, i],
    ),
    # the physical order decides, not the order the shape is presented in
    "hnd-seen-as-nhd": (
        lambda: _randn(2, NB, H, BS, D).permute(0, 1, 3, 2, 4),
        lc.KvLayout.HND,
        L,
        lambda t, b, i: t[:, b, i],
    ),
    "nhd-seen-as-hnd": (
        lambda: _randn(2, NB, BS, H, D).permute(0, 1, 3, 2, 4),
        lc.KvLayout.NHD,
        L,
        lambda t, b, i: t[:, b, :, i],
    ),
    "flashinfer": (
        lambda: _randn(NB, 2, BS, H, D),
        lc.KvLayout.FLASHINFER,
        L,
        lambda t, b, i: t[b, :, i],
    ),
    "mla": (
        lambda: _randn(NB, BS, D),
        lc.KvLayout.MLA,
        L,
        lambda t, b, i: t[b, i],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kv_view_maps_every_vllm_shape(case: str) -> None:
    make, layout, core_layers, token = CASES[case]
    src = [make() for _ in range(L)]
    dst = [torch.zeros_like(t) for t in src]
    src_view, dst_view = vllm_parts.kv_view_of(src, BS), vllm_parts.kv_view_of(dst, BS)
    assert src_view.layout.layout is layout
    assert src_view.layout.num_layers == core_layers
    assert src_view.layout.block_size == BS
    # An object holds exactly the chunk's blocks of every layer (bf16: 2 bytes an element).
    assert src_view.object_bytes(CHUNK) == sum(t.numel() * 2 // NB for t in src) * len(SRC)

    obj = np.zeros(src_view.object_bytes(CHUNK), np.uint8)
    src_view.gather(CHUNK, np.array(SRC), obj)
    dst_view.scatter(CHUNK, obj, np.array(DST), skip_tokens=SKIP)
    for layer_src, layer_dst in zip(src, dst, strict=True):
        for i in range(CHUNK):
            b, pos = divmod(i, BS)
            got = token(layer_dst, DST[b], pos)
            if i < SKIP:
                assert not got.any(), f"token {i} was skipped but written"
            else:
                assert torch.equal(got, token(layer_src, SRC[b], pos)), f"token {i} differs"
        untouched = [b for b in range(NB) if b not in DST]
        for b in untouched:
            assert not any(token(layer_dst, b, pos).any() for pos in range(BS)), f"block {b}"


def test_kv_view_refuses_what_it_cannot_map() -> None:
    with pytest.raises(ValueError, match="no KV cache tensors"):
        vllm_parts.kv_view_of([], BS)
    with pytest.raises(ValueError, match="unsupported KV cache tensor shape"):
        vllm_parts.kv_view_of([torch.zeros(NB, BS * D, dtype=torch.bfloat16)], BS)
    with pytest.raises(ValueError, match="unsupported KV cache tensor shape"):
        vllm_parts.kv_view_of(
            [torch.zeros(NB, BS + 1, D, dtype=torch.bfloat16)], BS
        )  # not the block size
    with pytest.raises(ValueError, match="GPU data path"):
        vllm_parts.kv_view_of([torch.empty(NB, BS, D, dtype=torch.bfloat16, device="meta")], BS)


# ---------------------------------------------------------------------------------------------
# ServerHealth


def test_server_health_logs_each_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=vllm_parts.__name__)
    health = vllm_parts.ServerHealth("worker 0", retry_interval_s=60.0)
    assert health.up
    health.failed("connection refused")
    health.failed("still refused")
    health.failed(TimeoutError("no reply"))
    assert not health.up
    health.succeeded()
    health.succeeded()
    health.failed("gone again")
    assert health.outages == 2
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in levels if level == logging.WARNING]
    assert len(warnings) == 2
    assert "worker 0" in warnings[0] and "connection refused" in warnings[0]
    assert [m for level, m in levels if level == logging.INFO] == [
        "lmcache_cpp worker 0: the cache server is usable again"
    ]
    assert sum(level == logging.DEBUG for level, _ in levels) == 2


def test_server_health_paces_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(vllm_parts, "time", SimpleNamespace(monotonic=lambda: now[0]))
    health = vllm_parts.ServerHealth("scheduler", retry_interval_s=1.0)
    assert health.may_retry() and health.may_retry()  # up: always
    health.failed("down")
    assert not health.may_retry()
    now[0] += 0.99
    assert not health.may_retry()
    now[0] += 0.02
    assert health.may_retry()  # one attempt per interval
    assert not health.may_retry()
    now[0] += 1.0
    assert health.may_retry()
    health.succeeded()
    assert health.may_retry()
    assert not vllm_parts.ServerHealth("x", 1.0, up=False).up


# ---------------------------------------------------------------------------------------------
# Keys and messages


def test_key_spec_builds_hash_and_token_keys() -> None:
    hashes = vllm_parts.KeySpec("tag:req-1", bytes(range(64)), True, 32, "salt")
    key = hashes.key("model", 2, 1, 0, 64)
    assert (key.model_name, key.world_size, key.worker_id) == ("model", 2, 1)
    assert (key.request_id, key.start, key.end, key.cache_salt) == ("tag:req-1", 0, 64, "salt")
    assert key.block_hashes == bytes(range(64)) and key.block_hash_size == 32
    assert key.tokens is None
    tokens = np.arange(128, dtype="<u4").tobytes()
    key = vllm_parts.KeySpec("tag:req-2", tokens, False, 32, "").key("model", 1, -1, 64, 128)
    assert key.token_bytes == tokens and key.block_hashes is None
    assert (key.worker_id, key.start, key.end) == (-1, 64, 128)


def test_connector_meta_survives_pickling() -> None:
    # vLLM pickles the scheduler's metadata to its worker processes.
    spec = vllm_parts.KeySpec("t:r", b"\x01" * 64, True, 32, "")
    meta = vllm_parts.ConnectorMeta(
        loads=[vllm_parts.LoadOp("r", spec, (3, 4, 5, 6), 0, 128, 40)],
        stores=[vllm_parts.StoreOp("r", spec, (3, 4, 5, 6), 64, 128)],
        preempted={"q"},
    )
    assert pickle.loads(pickle.dumps(meta)) == meta


# ---------------------------------------------------------------------------------------------
# Failed loads: LoadReport, LoadTracker (scheduler side), StoreFence (worker side)
#
# Block size 4, chunk size 8 (2 blocks a chunk). Request "a" loads tokens [0, 16) into blocks
# 10..13 after vLLM's own hit of 0 tokens; request "b" shares block 10 (a prefix-cache hit on a
# block filled by that load in the same step); request "c" shares nothing.

FBS, FCS = 4, 8
SPEC = vllm_parts.KeySpec("t:a", b"\x00" * 64, True, 32, "")


def _store(req_id: str, blocks: tuple[int, ...], start: int, end: int) -> vllm_parts.StoreOp:
    return vllm_parts.StoreOp(req_id, SPEC, blocks, start, end)


def test_load_reports_merge_per_step() -> None:
    a = vllm_parts.LoadReport(3, frozenset({"a"}))
    b = vllm_parts.LoadReport(3, frozenset({"b"}))
    assert a.merge(b) == vllm_parts.LoadReport(3, frozenset({"a", "b"}))
    assert a.merge(vllm_parts.LoadReport(3)) == a
    with pytest.raises(ValueError, match="steps 3 and 4"):
        a.merge(vllm_parts.LoadReport(4))
    merged = vllm_parts.merge_reports(
        [vllm_parts.LoadReport(5), b, a, vllm_parts.LoadReport(5, frozenset({"c"}))]
    )
    assert merged == [
        vllm_parts.LoadReport(3, frozenset({"a", "b"})),
        vllm_parts.LoadReport(5, frozenset({"c"})),
    ]
    assert pickle.loads(pickle.dumps(merged)) == merged


def test_tracker_holds_back_stores_that_depend_on_an_unreported_load() -> None:
    tracker = vllm_parts.LoadTracker()
    assert not tracker.holds_back("a", (10, 11, 12, 13))  # nothing pending: no cost
    tracker.planned("a", step=7, start=0, blocks=(10, 11, 12, 13))
    assert tracker.pending == 1
    assert tracker.holds_back("a", (10, 11, 12, 13, 14, 15))  # its own load
    assert tracker.holds_back("b", (10, 20, 21))  # computed over a block the load fills
    assert not tracker.holds_back("c", (30, 31, 32))
    assert tracker.held_back == 2
    # A report of another step settles nothing.
    assert tracker.report(vllm_parts.LoadReport(6)) == {}
    assert tracker.holds_back("a", (10,))
    # The load's report: it succeeded, nothing waits any more.
    assert tracker.report(vllm_parts.LoadReport(7)) == {}
    assert tracker.pending == 0 and tracker.reports_seen == 7
    assert not tracker.holds_back("a", (10, 11)) and not tracker.holds_back("b", (10,))
    assert tracker.failed_loads == 0


def test_tracker_reports_where_a_failed_load_started() -> None:
    tracker = vllm_parts.LoadTracker()
    tracker.planned("a", step=7, start=8, blocks=(12, 13))
    tracker.planned("c", step=7, start=0, blocks=(30, 31))
    tracker.planned("d", step=8, start=0, blocks=(40,))
    failed = tracker.report(vllm_parts.LoadReport(7, frozenset({"a", "gone"})))
    # "gone": a load the tracker no longer knows (its request finished or was loaded again).
    assert failed == {"a": 8, "gone": None}
    assert tracker.failed_loads == 2 and tracker.reports_seen == 7
    assert tracker.pending == 1  # d's load is a later step's
    assert tracker.holds_back("d", (40,))
    assert not tracker.holds_back("a", (12, 13)) and not tracker.holds_back("c", (30,))


def test_tracker_forgets_a_finished_request() -> None:
    tracker = vllm_parts.LoadTracker()
    tracker.planned("a", step=1, start=0, blocks=(10,))
    assert tracker.forget("a")
    assert not tracker.forget("a")
    assert tracker.pending == 0 and not tracker.holds_back("b", (10,))
    assert tracker.report(vllm_parts.LoadReport(1, frozenset({"a"}))) == {"a": None}


def test_fence_drops_what_a_failed_load_poisoned_until_the_scheduler_knows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=vllm_parts.__name__)
    fence = vllm_parts.StoreFence(FBS)
    a = (10, 11, 12, 13, 14, 15)
    assert fence.admit(_store("a", a, 0, 24), FCS)  # nothing failed: everything passes
    fence.load_failed("a", step=7, blocks=(10, 11, 12, 13))
    # The step of the failure (and any planned before the scheduler saw it): a's stores, and the
    # stores of b, whose chunks were computed over block 10, are dropped; c's pass.
    assert not fence.admit(_store("a", a, 16, 24), FCS)
    assert not fence.admit(_store("b", (10, 20, 21, 22), 8, 16), FCS)
    assert fence.admit(_store("c", (30, 31, 32, 33), 0, 16), FCS)
    # Only the blocks the stored chunks were computed over count: [0, 8) is blocks 30 and 31.
    assert fence.admit(_store("c", (30, 31, 10), 0, 8), FCS)
    assert fence.stores_dropped == 2 and fence.chunks_dropped == 2
    fence.lift(reports_seen=6)  # a metadata planned before the scheduler saw step 7
    assert not fence.admit(_store("a", a, 0, 24), FCS)
    assert not fence.admit(_store("b", (40, 41), 0, 8), FCS)  # b stays fenced, whatever blocks
    fence.lift(reports_seen=7)  # planned after it: vLLM rewound, what follows is recomputed
    assert fence.admit(_store("a", a, 0, 24), FCS)
    assert fence.admit(_store("b", (10, 20), 0, 8), FCS)
    assert fence.stores_dropped == 4 and fence.chunks_dropped == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "store of request a, chunks [2, 3), dropped" in warnings[0]
    assert "load that failed in step 7" in warnings[0]


def test_fence_forgets_finished_requests() -> None:
    fence = vllm_parts.StoreFence(FBS)
    fence.load_failed("a", step=3, blocks=(10, 11))
    fence.forget(["a"])
    assert fence.admit(_store("a", (50, 51), 0, 8), FCS)  # its blocks are gone, so is its fence
    assert not fence.admit(_store("b", (10,), 0, 4), FCS)  # the blocks stay poisoned: step 3


def test_async_scheduling_stores_nothing_computed_over_a_failed_load() -> None:
    """Scheduler and worker together, as vLLM's async scheduling runs them: step 8 is planned
    before the outcome of step 7 is known. Request a's load in step 7 fails; its chunks are
    stored only after the scheduler saw the report, from the start of the load on."""
    tracker, fence = vllm_parts.LoadTracker(), vllm_parts.StoreFence(FBS)
    blocks = (10, 11, 12, 13, 14, 15)
    stored = 16  # the lookup's hit: the scheduler takes chunks [0, 2) as on the server

    def plan(step: int, end: int) -> vllm_parts.ConnectorMeta:
        nonlocal stored
        meta = vllm_parts.ConnectorMeta(
            step=step, reports_seen=tracker.reports_seen, chunk_size=FCS
        )
        if step == 7:
            meta.loads.append(vllm_parts.LoadOp("a", SPEC, blocks, 0, 16, 0))
            tracker.planned("a", step, 0, blocks[: 16 // FBS])
        if end > stored and not tracker.holds_back("a", blocks[: end // FBS]):
            meta.stores.append(_store("a", blocks, stored, end))
            stored = end
        return meta

    def worker(
        meta: vllm_parts.ConnectorMeta, load_fails: bool
    ) -> tuple[list[vllm_parts.StoreOp], vllm_parts.LoadReport | None]:
        failed = set()
        for op in meta.loads:
            if load_fails:
                fence.load_failed(op.req_id, meta.step, op.block_ids[: op.end // FBS])
                failed.add(op.req_id)
        fence.lift(meta.reports_seen)
        sent = [op for op in meta.stores if fence.admit(op, FCS)]
        return sent, (vllm_parts.LoadReport(meta.step, frozenset(failed)) if meta.loads else None)

    step7 = plan(7, end=24)  # loads [0, 16) and computes chunk 2 over it: held back
    step8 = plan(8, end=24)  # planned before step 7's outcome: still held back
    assert step7.stores == [] and step8.stores == []
    sent, report = worker(step7, load_fails=True)
    assert sent == [] and report == vllm_parts.LoadReport(7, frozenset({"a"}))
    # The scheduler sees step 7's report (vLLM has rewound a to its first failed block).
    for req_id, start in tracker.report(report).items():
        assert (req_id, start) == ("a", 0)
        stored = min(stored, start)
    assert worker(step8, load_fails=False) == ([], None)
    step9 = plan(9, end=24)  # a recomputed [0, 24): stored again, all of it
    assert step9.reports_seen == 7
    assert step9.stores == [_store("a", blocks, 0, 24)]
    assert worker(step9, load_fails=False)[0] == step9.stores


# ---------------------------------------------------------------------------------------------
# WorkerSession.retrieve: one object per chunk asked for, or a failed load


class _EditedTickets:
    """A CacheClient whose PREPARE_RETRIEVE tickets pass through ``edit`` (None: untouched)."""

    def __init__(self, client: CacheClient) -> None:
        self._client = client
        self.edit: Callable[[TransferTicket], TransferTicket] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def async_prepare_retrieve(self, key: Key) -> concurrent.futures.Future[TransferTicket]:
        future = self._client.async_prepare_retrieve(key)
        if self.edit is None:
            return future
        edited: concurrent.futures.Future[TransferTicket] = concurrent.futures.Future()
        edited.set_result(self.edit(future.result(timeout=10.0)))
        return edited


TICKET_EDITS: dict[str, Callable[[TransferTicket], TransferTicket]] = {
    "one-chunk-short": lambda t: dataclasses.replace(t, offsets=t.offsets[:-1]),
    "one-chunk-late": lambda t: dataclasses.replace(t, first_chunk=t.first_chunk + 1),
    "one-chunk-more": lambda t: dataclasses.replace(t, offsets=[*t.offsets, t.offsets[0]]),
    "empty": lambda t: dataclasses.replace(t, offsets=[]),
}


@pytest.mark.parametrize("edit", list(TICKET_EDITS))
def test_retrieve_refuses_a_ticket_without_one_object_per_chunk(tmp_path: Path, edit: str) -> None:
    harness = sh.Harness(tmp_path)
    try:
        server = harness.server()
        writer_client, reader_client = harness.client(server), harness.client(server)
        _, src_view = sh.kv_cache(seed=1)
        dst, dst_view = sh.kv_cache(None)
        cs = sh.CHUNK
        toks = sh.tokens(4 * cs, seed=1)
        ids = list(range(4 * cs // sh.BS))
        writer = vllm_parts.WorkerSession.open(writer_client, sh.MODEL, 1, 0, src_view)
        assert writer.store(sh.key(toks, "w", start=0, end=4 * cs), ids) == 4
        tickets = _EditedTickets(reader_client)
        reader = vllm_parts.WorkerSession.open(tickets, sh.MODEL, 1, 0, dst_view)  # type: ignore[arg-type]

        tickets.edit = TICKET_EDITS[edit]
        assert reader_client.sync_lookup(sh.key(toks, "r")).hit_chunks == 4
        with pytest.raises(InternalError, match=r"ticket covers chunks .* asked for \[0, 4\)"):
            reader.retrieve(sh.key(toks, "r", start=0, end=4 * cs), ids, skip=0)
        assert not any(layer.any() for layer in dst), "a refused ticket's objects were copied"
        with pytest.raises(InternalError, match="not whole chunks"):
            reader.retrieve(sh.key(toks, "r", start=0, end=cs + 1), ids, skip=0)

        # The same session retrieves again once the tickets are whole.
        tickets.edit = None
        assert reader_client.sync_lookup(sh.key(toks, "r2")).hit_chunks == 4
        reader.retrieve(sh.key(toks, "r2", start=0, end=4 * cs), ids, skip=0)
        assert all(layer.any() for layer in dst)
        reader.close()
        writer.close()
    finally:
        harness.close()


# The GPU data path's decisions, on the CPU: layouts read off meta tensors, which device goes
# where, and why a CUDA KV cache is refused on a machine or build without CUDA.


@pytest.mark.parametrize(
    ("shape", "perm", "layout"),
    [
        ((2, NB, BS, 2, D), None, lc.KvLayout.NHD),
        ((2, NB, 2, BS, D), None, lc.KvLayout.HND),
        ((2, NB, 2, BS, D), (0, 1, 3, 2, 4), lc.KvLayout.HND),  # HND memory seen as NHD
        ((NB, 2, BS, 2, D), None, lc.KvLayout.FLASHINFER),
        ((NB, BS, D), None, lc.KvLayout.MLA),
    ],
)
def test_kv_layers_are_read_off_shapes_on_any_device(
    shape: tuple[int, ...], perm: tuple[int, ...] | None, layout: Any
) -> None:
    t = torch.empty(*shape, dtype=torch.bfloat16, device="meta")
    if perm is not None:
        t = t.permute(*perm)
    layers, got = vllm_parts.kv_layers_of([t, t], BS)
    assert got == layout
    assert len(layers) == 2 and all(x.device.type == "meta" for x in layers)


def test_the_data_path_follows_the_device() -> None:
    assert vllm_parts.kv_data_path("cpu") == "cpu"
    with pytest.raises(ValueError, match="GPU data path"):
        vllm_parts.kv_data_path("meta")
    info = lc.cuda_info()
    if info["built"] and info["usable"]:
        assert vllm_parts.kv_data_path("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match=re.escape(info["reason"])):
            vllm_parts.kv_data_path("cuda")


def test_a_worker_session_on_cuda_kv_round_trips(tmp_path: Path) -> None:
    """WorkerSession with a CudaKv: stores on the side stream after the written event, loads on
    the current stream, byte for byte (GPU only)."""
    from cuda_helpers import require_gpu

    require_gpu(needs=("zmq", "msgpack"))
    harness = sh.Harness(tmp_path)
    try:
        storage, engine = harness.engine()
        client = harness.client(harness.server(engine, storage))
        shape = (2, sh.NUM_BLOCKS, sh.BS, sh.HEADS, sh.HEAD_SIZE)
        layers = [torch.randn(*shape, dtype=torch.float16, device="cuda") for _ in range(2)]
        kv = vllm_parts.kv_view_of(layers, sh.BS)
        assert isinstance(kv, vllm_parts.CudaKv)
        session = vllm_parts.WorkerSession.open(client, sh.MODEL, 1, 0, kv)
        toks = sh.tokens(2 * sh.CHUNK, seed=9)
        bpc = sh.CHUNK // sh.BS
        src, dst = list(range(2 * bpc)), list(range(sh.NUM_BLOCKS - 2 * bpc, sh.NUM_BLOCKS))
        want = [t[:, src].clone() for t in layers]
        assert session.store(sh.key(toks, "w"), src, kv.mark_written()) == 2
        client.sync_lookup(sh.key(toks, "r"))
        session.retrieve(sh.key(toks, "r", end=2 * sh.CHUNK), dst, 0)
        torch.cuda.synchronize()
        assert all(torch.equal(w, t[:, dst]) for w, t in zip(want, layers, strict=True))
        session.close()
    finally:
        harness.close()
