"""The vLLM connector's parts that do not import vLLM (``lmcache_cpp.integration.vllm_parts``):
``kv_connector_extra_config`` validation, the mapping of vLLM's KV cache tensors to the core's
layouts (every shape, checked by copying chunks through the view with torch tensors), server
health logging and retry pacing, keys, and the picklable scheduler-to-worker messages.

No vLLM here: the core test run does not have it (the end-to-end tests are in tests_vllm/)."""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import lmcache_cpp as lc
from lmcache_cpp.integration import vllm_parts
from lmcache_cpp.integration.vllm_parts import (
    ConnectorConfig,
    ConnectorMeta,
    KeySpec,
    LoadOp,
    ServerHealth,
    StoreOp,
    kv_view_of,
)

# ---------------------------------------------------------------------------------------------
# ConnectorConfig


def test_config_defaults() -> None:
    empty: list[dict[str, Any] | None] = [None, {}]
    for extra in empty:
        config = ConnectorConfig.from_extra(extra)
        assert config == ConnectorConfig()
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
    config = ConnectorConfig.from_extra(extra)
    assert {k: getattr(config, k) for k in extra} == extra


def test_config_refuses_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown .*\['lookup_mod'\].*known"):
        ConnectorConfig.from_extra({"lookup_mod": "sync"})


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
        ConnectorConfig.from_extra({key: value})


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
    src_view, dst_view = kv_view_of(src, BS), kv_view_of(dst, BS)
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
        kv_view_of([], BS)
    with pytest.raises(ValueError, match="unsupported KV cache tensor shape"):
        kv_view_of([torch.zeros(NB, BS * D, dtype=torch.bfloat16)], BS)
    with pytest.raises(ValueError, match="unsupported KV cache tensor shape"):
        kv_view_of([torch.zeros(NB, BS + 1, D, dtype=torch.bfloat16)], BS)  # not the block size
    with pytest.raises(ValueError, match="GPU data path"):
        kv_view_of([torch.empty(NB, BS, D, dtype=torch.bfloat16, device="meta")], BS)


# ---------------------------------------------------------------------------------------------
# ServerHealth


def test_server_health_logs_each_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=vllm_parts.__name__)
    health = ServerHealth("worker 0", retry_interval_s=60.0)
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
    health = ServerHealth("scheduler", retry_interval_s=1.0)
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
    assert not ServerHealth("x", 1.0, up=False).up


# ---------------------------------------------------------------------------------------------
# Keys and messages


def test_key_spec_builds_hash_and_token_keys() -> None:
    hashes = KeySpec("tag:req-1", bytes(range(64)), True, 32, "salt")
    key = hashes.key("model", 2, 1, 0, 64)
    assert (key.model_name, key.world_size, key.worker_id) == ("model", 2, 1)
    assert (key.request_id, key.start, key.end, key.cache_salt) == ("tag:req-1", 0, 64, "salt")
    assert key.block_hashes == bytes(range(64)) and key.block_hash_size == 32
    assert key.tokens is None
    tokens = np.arange(128, dtype="<u4").tobytes()
    key = KeySpec("tag:req-2", tokens, False, 32, "").key("model", 1, -1, 64, 128)
    assert key.token_bytes == tokens and key.block_hashes is None
    assert (key.worker_id, key.start, key.end) == (-1, 64, 128)


def test_connector_meta_survives_pickling() -> None:
    # vLLM pickles the scheduler's metadata to its worker processes.
    spec = KeySpec("t:r", b"\x01" * 64, True, 32, "")
    meta = ConnectorMeta(
        loads=[LoadOp("r", spec, (3, 4, 5, 6), 0, 128, 40)],
        stores=[StoreOp("r", spec, (3, 4, 5, 6), 64, 128)],
        preempted={"q"},
    )
    assert pickle.loads(pickle.dumps(meta)) == meta
