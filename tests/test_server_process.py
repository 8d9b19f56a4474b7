"""The "Server / protocol" reference behaviours through a real server process.

Every test starts ``python -m lmcache_cpp serve ...`` as a child process (an ``ipc://`` socket in
a pytest temporary directory, the L1 arena in real shared memory), waits for its ``READY`` line,
talks to it with :class:`CacheClient` / :class:`KvTransferClient` (or a raw DEALER for malformed
frames) and stops it with SIGTERM, expecting exit status 0. The engine's KV cache is CPU torch
tensors in vLLM's layouts; every round trip is compared bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import zmq

import lmcache_cpp as lc
from lmcache_cpp import _core
from lmcache_cpp.client import CacheClient, Key, KvTransferClient, LookupResult
from lmcache_cpp.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KeyAbsentError,
    LMCacheError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from lmcache_cpp.protocol import PROTOCOL_VERSION, RequestType, encode_request
from server_helpers import recv_reply

CHUNK = 16  # tokens per chunk
BS = 8  # tokens per engine block
BPC = CHUNK // BS  # engine blocks per chunk
LAYERS, HEADS, HEAD_SIZE = 2, 2, 16
MLA_DIM = 64  # MLA latent width (kv_lora_rank + rope dim, scaled down)
NUM_BLOCKS = 128
MODEL = "proc-model"

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
FAST_REPLY_S = 0.5  # a request that never waits for L2 is answered well within this

BASE_FLAGS: dict[str, Any] = {
    "l1_size_gb": 0.0625,  # 64 MiB, a multiple of the 2 MiB arena granule
    "chunk_size": CHUNK,
    "worker_threads": 2,
    "hugepages": "off",
    "reap_interval_s": 0.25,
    "log_level": "INFO",
}

Status = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The server process


def _flag_args(flags: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        if name == "l2_adapters":
            for spec in value:
                args += ["--l2-adapter", json.dumps(spec)]
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _read_line(stream: Any, deadline: float, what: str) -> str | None:
    """One line from a child's binary stdout pipe, or None if the child closed it first; raises
    TimeoutError when no whole line arrives by ``deadline`` (time.monotonic())."""
    fd = stream.fileno()
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {what} line in time (got {data!r})")
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        piece = os.read(fd, 4096)
        if not piece:
            return None
        data += piece
    return data.split(b"\n", 1)[0].decode()


@dataclass
class ServerProcess:
    """A ``lmcache_cpp serve`` child process and the clients a test opened on it."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    stderr_path: Path
    heartbeat_s: float
    clients: list[CacheClient] = field(default_factory=list)
    transfers: list[KvTransferClient] = field(default_factory=list)
    returncode: int | None = None
    killed: bool = False  # by the test (SIGKILL): no clean exit is expected

    def client(self, **kw: Any) -> CacheClient:
        kw.setdefault("timeout_s", 15.0)
        kw.setdefault("heartbeat_interval_s", self.heartbeat_s)
        client = CacheClient(self.endpoint, **kw)
        self.clients.append(client)
        return client

    def worker(
        self,
        kv: EngineKv,
        *,
        model: str = MODEL,
        world_size: int = 1,
        worker_id: int = 0,
    ) -> tuple[CacheClient, KvTransferClient]:
        """A worker: its own connection, ``kv``'s layout registered, the arena mapped."""
        client = self.client()
        transfer = KvTransferClient.register(client, model, world_size, worker_id, kv.view)
        self.transfers.append(transfer)
        return client, transfer

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the server dies without any cleanup, its clients still open."""
        self.killed = True
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S); returns the exit status. Idempotent."""
        for transfer in self.transfers:
            # The server may already be gone; the arena is unmapped regardless.
            with contextlib.suppress(LMCacheError):
                transfer.close()
        self.transfers.clear()
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.returncode = self.proc.returncode
        return self.returncode


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """start_server(**flags) -> a running server process (flags are ServerConfig field names).

    Teardown stops every server and asserts that each one exited 0 on SIGTERM without a Python
    traceback; each server's stderr is printed, which pytest shows for a failing test.
    """
    servers: list[ServerProcess] = []
    # A short directory: a Unix socket path has at most 107 bytes, and test ids can be long.
    ipc_dir = tmp_path_factory.mktemp("ipc")

    def start(*, address_space_limit: int | None = None, **overrides: Any) -> ServerProcess:
        n = len(servers)
        flags = {**BASE_FLAGS, "endpoint": f"ipc://{ipc_dir}/s{n}.sock", **overrides}
        stderr_path = tmp_path / f"server{n}.stderr"

        def limit() -> None:  # in the child, before exec
            if address_space_limit is not None:
                resource.setrlimit(resource.RLIMIT_AS, (address_space_limit, address_space_limit))

        env = {**os.environ, "MALLOC_ARENA_MAX": "2"} if address_space_limit else None
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache_cpp", "serve", *_flag_args(flags)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=limit if address_space_limit is not None else None,
                env=env,
            )
        grace = float(flags.get("heartbeat_grace_s", 30.0))
        server = ServerProcess(proc, flags["endpoint"], stderr_path, min(5.0, grace / 5))
        servers.append(server)
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout, time.monotonic() + READY_TIMEOUT_S, "READY")
        except TimeoutError as exc:
            pytest.fail(f"server did not get ready: {exc}\n--- stderr ---\n{server.stderr_text()}")
        if line != f"READY {flags['endpoint']}":
            pytest.fail(
                f"server did not get ready (stdout {line!r}, exit status {proc.poll()})\n"
                f"--- stderr ---\n{server.stderr_text()}"
            )
        return server

    try:
        yield start
    finally:
        failures = []
        for i, server in enumerate(servers):
            rc = server.stop()
            text = server.stderr_text()
            print(f"--- server {i} stderr (exit status {rc}) ---\n{text}")
            if rc != 0 and not server.killed:
                failures.append(f"server {i} exited with status {rc}, not 0")
            if "Traceback" in text:
                failures.append(f"server {i} logged a traceback")
        assert not failures, "; ".join(failures)


# ---------------------------------------------------------------------------------------------
# Engine KV caches (vLLM layouts, CPU torch tensors)

_BLOCK_DIM = {
    _core.KvLayout.NHD: 1,  # [2, NB, BS, H, D]
    _core.KvLayout.HND: 1,  # [2, NB, H, BS, D]
    _core.KvLayout.FLASHINFER: 0,  # [NB, 2, BS, H, D]
    _core.KvLayout.MLA: 0,  # [NB, BS, D]
}


def _layer_shape(layout: _core.KvLayout, num_blocks: int) -> tuple[int, ...]:
    if layout == _core.KvLayout.NHD:
        return (2, num_blocks, BS, HEADS, HEAD_SIZE)
    if layout == _core.KvLayout.HND:
        return (2, num_blocks, HEADS, BS, HEAD_SIZE)
    if layout == _core.KvLayout.FLASHINFER:
        return (num_blocks, 2, BS, HEADS, HEAD_SIZE)
    return (num_blocks, BS, MLA_DIM)


@dataclass
class EngineKv:
    """One worker's paged KV cache: a tensor per layer and the core's view of them (zero copy)."""

    layout: _core.KvLayout
    tensors: list[torch.Tensor]
    view: _core.KvCacheView

    @classmethod
    def make(
        cls,
        layout: _core.KvLayout = _core.KvLayout.NHD,
        dtype: torch.dtype = torch.bfloat16,
        *,
        seed: int | None = None,
        num_blocks: int = NUM_BLOCKS,
    ) -> EngineKv:
        """Random bit patterns (every 16-bit value, NaNs included) for a seed, zeros for None."""
        shape = _layer_shape(layout, num_blocks)
        tensors = []
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        for _ in range(LAYERS):
            if seed is None:
                tensors.append(torch.zeros(shape, dtype=dtype))
            else:
                bits = torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=gen)
                tensors.append(bits.view(dtype))
        return cls(layout, tensors, _core.KvCacheView(tensors, layout))

    def blocks(self, ids: Sequence[int] | npt.NDArray[Any]) -> list[torch.Tensor]:
        """Each layer's K and V planes of the given blocks, as raw 16-bit patterns."""
        index = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        dim = _BLOCK_DIM[self.layout]
        return [t.view(torch.int16).index_select(dim, index) for t in self.tensors]

    def is_zero_outside(self, ids: Sequence[int] | npt.NDArray[Any]) -> bool:
        num_blocks = self.tensors[0].shape[_BLOCK_DIM[self.layout]]
        rest = np.setdiff1d(np.arange(num_blocks), np.asarray(ids))
        return all(not bool(layer.any()) for layer in self.blocks(rest))


def assert_same_blocks(
    src: EngineKv,
    src_ids: Sequence[int] | npt.NDArray[Any],
    dst: EngineKv,
    dst_ids: Sequence[int] | npt.NDArray[Any],
) -> None:
    """Every layer's K and V in ``dst_ids`` of ``dst`` equal those in ``src_ids`` of ``src``,
    bit for bit."""
    for layer, (a, b) in enumerate(zip(src.blocks(src_ids), dst.blocks(dst_ids), strict=True)):
        assert torch.equal(a, b), f"layer {layer}: retrieved blocks differ from the stored ones"


def tokens(n: int, seed: int) -> npt.NDArray[np.uint32]:
    return np.random.default_rng(seed).integers(0, 32000, n, dtype=np.uint32)


def key(toks: npt.NDArray[np.uint32], request_id: str, **kw: Any) -> Key:
    kw.setdefault("model_name", MODEL)
    return Key(request_id=request_id, tokens=toks, **kw)


def chunk_key(toks: npt.NDArray[np.uint32], request_id: str, chunk: int, **kw: Any) -> Key:
    return key(toks, request_id, start=chunk * CHUNK, end=(chunk + 1) * CHUNK, **kw)


def wait_for_status(
    client: CacheClient, ready: Callable[[Status], bool], what: str, timeout_s: float = 15.0
) -> Status:
    """Polls STATUS until ``ready`` holds (bounded); returns that status."""
    deadline = time.monotonic() + timeout_s
    status = client.status()
    while not ready(status):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last STATUS: {status}")
        time.sleep(0.02)
        status = client.status()
    return status


def wait_for_l2_stores(client: CacheClient, objects: int) -> Status:
    """Waits until the L2 store queue is drained and adapter 0 holds ``objects`` objects."""
    return wait_for_status(
        client,
        lambda s: (
            s["store"]["queued"] == 0
            and s["store"]["in_flight_batches"] == 0
            and s["l2"][0]["objects"] >= objects
        ),
        f"{objects} objects stored to L2",
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = call()
    return result, time.monotonic() - t0


LAYOUT_CASES = [
    pytest.param(_core.KvLayout.NHD, torch.bfloat16, id="nhd-bf16"),
    pytest.param(_core.KvLayout.HND, torch.float16, id="hnd-fp16"),
    pytest.param(_core.KvLayout.FLASHINFER, torch.bfloat16, id="flashinfer-bf16"),
]


# ---------------------------------------------------------------------------------------------
# Registration, chunk size, lifecycle


def test_register_unregister_and_double_unregister_is_not_found(start_server: StartServer) -> None:
    server = start_server()
    client = server.client()
    kv = EngineKv.make()
    assert client.get_chunk_size() == CHUNK
    reg = client.register_kv_cache(MODEL, 1, 0, kv.view.layout)
    assert reg["chunk_size"] == CHUNK
    assert reg["object_bytes"] == kv.view.object_bytes(CHUNK)
    assert client.status()["engine"]["registrations"] == 1
    client.unregister_kv_cache(reg["registration_id"])
    assert client.status()["engine"]["registrations"] == 0
    with pytest.raises(NotFoundError):
        client.unregister_kv_cache(reg["registration_id"])
    # The server still serves: this client, and a new one that registers again.
    client.ping(deadline_s=2.0)
    other = server.client()
    again = other.register_kv_cache(MODEL, 1, 0, kv.view.layout)
    assert again["registration_id"] != reg["registration_id"]
    assert other.status()["engine"]["registrations"] == 1


def test_sigterm_stops_a_busy_server_with_exit_status_0(start_server: StartServer) -> None:
    server = start_server()
    kv = EngineKv.make(seed=1)
    client, transfer = server.worker(kv)
    toks = tokens(4 * CHUNK, seed=1)
    assert transfer.store(kv.view, np.arange(4 * BPC), key(toks, "w")) == 4
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 4  # leases held at shutdown
    handle = client.lookup(key(toks, "r2"))  # an uncollected lookup job too
    assert len(handle) == 16
    rc, elapsed = timed(server.stop)
    assert rc == 0
    assert elapsed < 10.0
    assert "shutting down" in server.stderr_text()


# ---------------------------------------------------------------------------------------------
# Store, lookup, retrieve


@pytest.mark.parametrize(("layout", "dtype"), LAYOUT_CASES)
def test_store_10_chunks_lookup_finds_10_and_unknown_keys_0(
    start_server: StartServer, layout: _core.KvLayout, dtype: torch.dtype
) -> None:
    server = start_server()
    kv = EngineKv.make(layout, dtype, seed=10)
    client, transfer = server.worker(kv)
    toks = tokens(10 * CHUNK, seed=10)
    assert transfer.store(kv.view, np.arange(10 * BPC), key(toks, "w")) == 10

    found = client.sync_lookup(key(toks, "r"))
    assert (found.hit_chunks, found.hit_tokens, found.l1_chunks) == (10, 10 * CHUNK, 10)
    result = client.wait_prefetch_status(client.lookup(key(toks, "r-two-phase")), 10.0)
    assert result is not None and (result.hit_chunks, result.l1_chunks) == (10, 10)

    never = tokens(5 * CHUNK, seed=11)
    assert client.sync_lookup(key(never, "miss")).hit_chunks == 0
    result = client.wait_prefetch_status(client.lookup(key(never, "miss-two-phase")), 10.0)
    assert result is not None and result.hit_chunks == 0
    # The stored prefix followed by 5 unknown chunks: the hit is the stored prefix.
    longer = np.concatenate([toks, never])
    assert client.sync_lookup(key(longer, "prefix")).hit_chunks == 10
    assert client.status()["engine"]["lookups"] == 2


@pytest.mark.parametrize(("layout", "dtype"), LAYOUT_CASES)
def test_retrieve_into_other_blocks_reproduces_every_layer_bit_for_bit(
    start_server: StartServer, layout: _core.KvLayout, dtype: torch.dtype
) -> None:
    server = start_server()
    src = EngineKv.make(layout, dtype, seed=20)
    client, transfer = server.worker(src)
    toks = tokens(20 * CHUNK, seed=20)
    # Scattered source blocks; the destination blocks are others, in reverse order.
    src_ids = np.random.default_rng(20).permutation(NUM_BLOCKS - 20 * BPC)[: 20 * BPC]
    assert transfer.store(src.view, src_ids, key(toks, "w")) == 20
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 20

    dst = EngineKv.make(layout, dtype)  # a second engine cache of the same layout, all zeros
    dst_ids = np.arange(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - 20 * BPC, -1)
    assert transfer.retrieve(dst.view, dst_ids, key(toks, "r")) == 20 * CHUNK
    assert_same_blocks(src, src_ids, dst, dst_ids)
    assert dst.is_zero_outside(dst_ids)
    assert client.status()["l1"]["read_leases"] == 0


def test_retrieving_past_what_was_stored_fails_explicitly_then_recovers(
    start_server: StartServer,
) -> None:
    server = start_server()
    src = EngineKv.make(seed=30)
    client, transfer = server.worker(src)
    toks = tokens(60 * CHUNK, seed=30)
    ids = np.arange(60 * BPC)
    assert transfer.store(src.view, ids, key(toks, "w", end=30 * CHUNK)) == 30
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 30

    dst = EngineKv.make()
    outcomes = []
    for c in range(60):
        try:
            transfer.retrieve(dst.view, ids, chunk_key(toks, "r", c))
            outcomes.append(True)
        except KeyAbsentError:
            outcomes.append(False)
    assert outcomes == [True] * 30 + [False] * 30
    assert_same_blocks(src, ids[: 30 * BPC], dst, ids[: 30 * BPC])
    assert dst.is_zero_outside(ids[: 30 * BPC])  # a failed retrieve wrote nothing
    status = client.status()
    assert status["engine"]["retrieve_failures"] == 30
    assert status["l1"]["read_leases"] == 0

    # Each retrieve returned its lease: a new lookup leases again and all 30 succeed.
    assert client.sync_lookup(key(toks, "r2")).hit_chunks == 30
    again = EngineKv.make()
    for c in range(30):
        transfer.retrieve(again.view, ids, chunk_key(toks, "r2", c))
    assert_same_blocks(src, ids[: 30 * BPC], again, ids[: 30 * BPC])


def test_store_batches_with_distinct_contents_come_back_into_an_offset_region(
    start_server: StartServer,
) -> None:
    server = start_server()
    batches, per_batch = 3, 4
    n = batches * per_batch
    toks = tokens(n * CHUNK, seed=40)
    ids = np.arange(n * BPC)  # block j holds tokens [j * BS, (j + 1) * BS) of the request
    sources = [
        EngineKv.make(_core.KvLayout.HND, torch.float16, seed=41 + b) for b in range(batches)
    ]
    client, transfer = server.worker(sources[0])
    for b, src in enumerate(sources):  # batch b: chunks [4b, 4b + 4), from its own engine cache
        k = key(toks, "w", start=b * per_batch * CHUNK, end=(b + 1) * per_batch * CHUNK)
        assert transfer.store(src.view, ids, k) == per_batch
    assert client.sync_lookup(key(toks, "r")).hit_chunks == n

    dst = EngineKv.make(_core.KvLayout.HND, torch.float16)
    offset = 37
    dst_ids = ids + offset
    assert transfer.retrieve(dst.view, dst_ids, key(toks, "r")) == n * CHUNK
    for b, src in enumerate(sources):
        part = slice(b * per_batch * BPC, (b + 1) * per_batch * BPC)
        assert_same_blocks(src, ids[part], dst, dst_ids[part])
    assert dst.is_zero_outside(dst_ids)


def test_free_lookup_locks_releases_exactly_the_whole_chunks_of_its_range(
    start_server: StartServer,
) -> None:
    server = start_server()
    src = EngineKv.make(seed=45)
    client, transfer = server.worker(src)
    n = 8
    toks = tokens(n * CHUNK, seed=45)
    assert transfer.store(src.view, np.arange(n * BPC), key(toks, "w")) == n
    assert client.sync_lookup(key(toks, "r"), tp_size=1).hit_chunks == n
    # Another request's leases on the same objects are not touched.
    assert client.sync_lookup(key(toks, "other")).hit_chunks == n
    assert client.status()["l1"]["read_leases"] == 2 * n

    # [CHUNK + 3, 4.5 * CHUNK): chunk 1 is partly covered and stays, chunk 4 too; 2 and 3 go.
    assert client.free_lookup_locks(key(toks, "r", start=CHUNK + 3, end=9 * CHUNK // 2)) == 2
    assert client.status()["l1"]["read_leases"] == 2 * n - 2
    assert client.free_lookup_locks(key(toks, "r", start=3 * CHUNK, end=3 * CHUNK)) == 0
    assert client.free_lookup_locks(key(toks, "r", start=2 * CHUNK, end=4 * CHUNK)) == 0
    # Another salt names other objects, another request id holds nothing: nothing released.
    assert client.free_lookup_locks(key(toks, "r", cache_salt="s")) == 0
    assert client.free_lookup_locks(key(toks, "nobody")) == 0
    assert client.status()["l1"]["read_leases"] == 2 * n - 2
    # The rest of the request's leases, by the lookup's own key.
    assert client.free_lookup_locks(key(toks, "r")) == n - 2
    status = client.status()
    assert (status["l1"]["read_leases"], status["engine"]["freed_leases"]) == (n, n)
    dst = EngineKv.make()
    with pytest.raises(KeyAbsentError):  # nothing of "r" is leased any more
        transfer.retrieve(dst.view, np.arange(n * BPC), chunk_key(toks, "r", 0))


def test_mla_lookup_leases_each_object_once_per_tp_worker(start_server: StartServer) -> None:
    tp, n = 4, 6
    server = start_server()
    srcs = [EngineKv.make(_core.KvLayout.MLA, torch.bfloat16, seed=50) for _ in range(tp)]
    workers = [server.worker(kv, world_size=1, worker_id=0) for kv in srcs]
    toks = tokens(n * CHUNK, seed=50)
    ids = np.arange(n * BPC)
    # Every TP rank stores the same MLA object: the first publishes, the others are skipped.
    published = [
        t.store(kv.view, ids, key(toks, f"w{i}"))
        for (_, t), kv, i in zip(workers, srcs, range(tp), strict=True)
    ]
    assert published == [n, 0, 0, 0]

    scheduler = server.client()
    assert scheduler.sync_lookup(key(toks, "req"), tp_size=tp).hit_chunks == n
    status = scheduler.status()
    assert status["l1"]["read_leases"] == tp * n
    assert status["l1"]["evictable"] == 0

    for i, (_, transfer) in enumerate(workers):
        dst = EngineKv.make(_core.KvLayout.MLA, torch.bfloat16)
        assert transfer.retrieve(dst.view, ids, key(toks, "req")) == n * CHUNK
        assert_same_blocks(srcs[0], ids, dst, ids)
        assert scheduler.status()["l1"]["read_leases"] == (tp - 1 - i) * n
    status = scheduler.status()
    assert (status["l1"]["read_leases"], status["l1"]["evictable"]) == (0, n)
    # A fifth retrieve finds no lease left for the request.
    with pytest.raises(KeyAbsentError):
        workers[0][1].retrieve(EngineKv.make(_core.KvLayout.MLA).view, ids, key(toks, "req"))


# ---------------------------------------------------------------------------------------------
# Slow L2: the socket thread and the pool keep serving


def test_two_phase_lookup_keeps_serving_while_a_slow_l2_prefetch_runs(
    start_server: StartServer,
) -> None:
    latency_s = 1.5
    adapter = {"type": "memory", "latency_ms": latency_s * 1000, "worker_threads": 4}
    # One pool thread: if the prefetch held it, the SYNC_LOOKUPs below would queue behind it.
    server = start_server(l2_adapters=[adapter], worker_threads=1)
    src = EngineKv.make(seed=60)
    worker, transfer = server.worker(src)
    n = 6
    toks = tokens(n * CHUNK, seed=60)
    ids = np.arange(n * BPC)
    assert transfer.store(src.view, ids, key(toks, "w")) == n
    wait_for_l2_stores(worker, n)
    assert worker.clear() == n
    assert worker.status()["l1"]["objects"] == 0

    scheduler = server.client()
    lookup_at = time.monotonic()
    handle = scheduler.lookup(key(toks, "req"))
    assert time.monotonic() - lookup_at < FAST_REPLY_S
    assert scheduler.query_prefetch_status(handle) is None

    # Another client's stream of socket-thread and pool requests, each answered at once.
    for i in range(3):
        _, elapsed = timed(lambda: worker.ping(deadline_s=2.0))
        assert elapsed < FAST_REPLY_S, f"PING took {elapsed:.3f} s"
        other = tokens(2 * CHUNK, seed=600 + i)
        stored, elapsed = timed(
            lambda other=other: transfer.store(src.view, np.arange(2 * BPC), key(other, "s"))
        )
        assert stored == 2
        assert elapsed < FAST_REPLY_S, f"PREPARE_STORE/COMMIT_STORE took {elapsed:.3f} s"
        lookup_key = key(other, f"q{i}")
        found, elapsed = timed(lambda k=lookup_key: worker.sync_lookup(k))
        assert found.hit_chunks == 2
        assert elapsed < FAST_REPLY_S, f"SYNC_LOOKUP took {elapsed:.3f} s"
    # All of that happened within one L2 latency of the LOOKUP, so the prefetch is still running.
    assert time.monotonic() - lookup_at < latency_s
    assert scheduler.query_prefetch_status(handle) is None

    result = scheduler.wait_prefetch_status(handle, 20.0)
    assert result is not None
    assert (result.hit_chunks, result.l1_chunks, result.l2_chunks) == (n, 0, n)
    assert time.monotonic() - lookup_at >= latency_s  # it really went to the slow tier
    dst = EngineKv.make()
    transfer.retrieve(dst.view, ids, key(toks, "req"))
    assert_same_blocks(src, ids, dst, ids)


def test_sync_lookup_with_a_slow_l2_answers_within_its_deadline(
    start_server: StartServer,
) -> None:
    latency_s, deadline_s = 1.5, 0.2
    server = start_server(
        l2_adapters=[{"type": "memory", "latency_ms": latency_s * 1000, "worker_threads": 4}],
        sync_lookup_timeout_s=deadline_s,
    )
    src = EngineKv.make(seed=70)
    client, transfer = server.worker(src)
    n = 8
    toks = tokens(n * CHUNK, seed=70)
    ids = np.arange(n * BPC)
    assert transfer.store(src.view, ids, key(toks, "w")) == n
    wait_for_l2_stores(client, n)
    assert client.clear() == n

    # Everything is in the slow L2 only.
    result, elapsed = timed(lambda: client.sync_lookup(key(toks, "r1")))
    assert elapsed < 1.0, f"SYNC_LOOKUP took {elapsed:.3f} s (deadline {deadline_s} s)"
    assert result.l1_chunks == 0 and result.hit_chunks == result.l2_chunks <= n

    # The first half is back in L1: those hit at once, the slow L2 rest is cut at the deadline.
    assert transfer.store(src.view, ids, key(toks, "w2", end=n // 2 * CHUNK)) == n // 2
    result, elapsed = timed(lambda: client.sync_lookup(key(toks, "r2")))
    assert elapsed < 1.0, f"SYNC_LOOKUP took {elapsed:.3f} s (deadline {deadline_s} s)"
    assert result.l1_chunks == n // 2 and n // 2 <= result.hit_chunks <= n
    assert client.status()["prefetch"]["l2_lookup_timeouts"] == 2
    dst = EngineKv.make()
    half = ids[: n // 2 * BPC]
    transfer.retrieve(dst.view, ids, key(toks, "r2", end=n // 2 * CHUNK))
    assert_same_blocks(src, half, dst, half)


def test_sync_lookup_load_is_joined_by_every_worker_and_runs_once(
    start_server: StartServer,
) -> None:
    world, n = 3, 8
    server = start_server(
        l2_adapters=[{"type": "memory", "latency_ms": 300, "worker_threads": 4}],
        sync_lookup_timeout_s=2.0,
    )
    srcs = [EngineKv.make(seed=80 + rank) for rank in range(world)]  # each rank its own bytes
    workers = [server.worker(kv, world_size=world, worker_id=r) for r, kv in enumerate(srcs)]
    toks = tokens(n * CHUNK, seed=80)
    ids = np.arange(n * BPC)
    for rank, ((_, transfer), kv) in enumerate(zip(workers, srcs, strict=True)):
        stored = transfer.store(kv.view, ids, key(toks, "w", world_size=world, worker_id=rank))
        assert stored == n
    scheduler = server.client()
    wait_for_l2_stores(scheduler, world * n)
    assert scheduler.clear() == world * n
    before = scheduler.status()

    result = scheduler.sync_lookup(key(toks, "req", world_size=world), tp_size=world)
    assert (result.hit_chunks, result.l1_chunks, result.l2_chunks) == (n, 0, n)

    barrier = threading.Barrier(world)
    dsts = [EngineKv.make() for _ in range(world)]
    errors: list[BaseException | None] = [None] * world

    def retrieve(rank: int) -> None:
        try:
            barrier.wait(timeout=10.0)
            k = key(toks, "req", world_size=world, worker_id=rank)
            workers[rank][1].retrieve(dsts[rank].view, ids, k)
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=retrieve, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60.0)
    assert not any(t.is_alive() for t in threads)
    assert errors == [None] * world
    for src, dst in zip(srcs, dsts, strict=True):
        assert_same_blocks(src, ids, dst, ids)

    after = scheduler.status()
    assert after["l2"][0]["loads"] - before["l2"][0]["loads"] == world * n  # one load per object
    assert after["l2"][0]["stores"] == before["l2"][0]["stores"]  # loaded objects not re-stored
    assert after["l1"]["read_leases"] == 0


# ---------------------------------------------------------------------------------------------
# Ownership, dead clients, sessions


def test_a_handle_is_refused_to_another_client_and_still_works_for_its_owner(
    start_server: StartServer,
) -> None:
    server = start_server()
    src = EngineKv.make(seed=90)
    owner, transfer = server.worker(src)
    stranger = server.client()
    toks = tokens(4 * CHUNK, seed=90)
    assert transfer.store(src.view, np.arange(4 * BPC), key(toks, "w")) == 4

    handle = owner.lookup(key(toks, "r"))
    with pytest.raises(PermissionDeniedError):
        stranger.query_prefetch_status(handle)
    with pytest.raises(PermissionDeniedError):
        stranger.wait_prefetch_status(handle, 1.0)
    result = owner.wait_prefetch_status(handle, 10.0)
    assert result is not None and result.hit_chunks == 4

    # A transfer ticket is bound to its client the same way.
    other = tokens(2 * CHUNK, seed=91)
    ticket = owner.prepare_store(key(other, "w2"))
    with pytest.raises(PermissionDeniedError):
        stranger.commit_store(ticket.handle)
    assert owner.commit_store(ticket.handle, success=False) == 0
    assert owner.status()["engine"]["transfers"] == 0
    # So is a registration.
    with pytest.raises(PermissionDeniedError):
        stranger.unregister_kv_cache(transfer.registration["registration_id"])
    assert owner.status()["engine"]["registrations"] == 1


CHILD_SCRIPT = """
import sys
from lmcache_cpp.client import CacheClient, Key
endpoint, model, token_hex, request_id = sys.argv[1:5]
client = CacheClient(endpoint, timeout_s=10.0, heartbeat_interval_s=0.2)
result = client.sync_lookup(Key(model, request_id=request_id, tokens=bytes.fromhex(token_hex)))
print(f"LEASED {result.hit_chunks}", flush=True)
sys.stdin.read()  # hold the leases until killed
"""


def test_leases_of_a_killed_client_are_released_after_the_grace_period(
    start_server: StartServer,
) -> None:
    server = start_server(heartbeat_grace_s=1.0)
    src = EngineKv.make(seed=100)
    client, transfer = server.worker(src)
    n = 5
    toks = tokens(n * CHUNK, seed=100)
    ids = np.arange(n * BPC)
    assert transfer.store(src.view, ids, key(toks, "w")) == n
    assert client.sync_lookup(key(toks, "mine")).hit_chunks == n  # a live client's leases

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, server.endpoint, MODEL, toks.tobytes().hex(), "dead"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = _read_line(child.stdout, time.monotonic() + 30.0, "LEASED")
        assert line == f"LEASED {n}"
        assert client.status()["l1"]["read_leases"] == 2 * n
        ended_before = client.status()["engine"]["ended_clients"]
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()

    status = wait_for_status(
        client, lambda s: s["l1"]["read_leases"] == n, "the dead client's leases to be released"
    )
    assert status["engine"]["ended_clients"] == ended_before + 1
    # This client's own leases and registration survived: its retrieve still works.
    dst = EngineKv.make()
    transfer.retrieve(dst.view, ids, key(toks, "mine"))
    assert_same_blocks(src, ids, dst, ids)
    assert client.status()["l1"]["read_leases"] == 0


def test_end_session_leaves_nothing_behind(start_server: StartServer) -> None:
    server = start_server()
    src = EngineKv.make(seed=110)
    client, transfer = server.worker(src)
    n = 8
    toks = tokens(n * CHUNK, seed=110)
    ids = np.arange(n * BPC)
    assert transfer.store(src.view, ids, key(toks, "w")) == n
    baseline = client.status()

    # Request "r": a sync lookup and a two-phase lookup (two leases per chunk), retrieves of
    # chunks 0 and 1 (one lease each back), FREE_LOOKUP_LOCKS of chunks 2 and 3 (both leases),
    # a bare PREPARE/COMMIT_RETRIEVE of chunk 5, and a second two-phase lookup never collected.
    assert client.sync_lookup(key(toks, "r")).hit_chunks == n
    result = client.wait_prefetch_status(client.lookup(key(toks, "r")), 10.0)
    assert isinstance(result, LookupResult) and result.hit_chunks == n
    dst = EngineKv.make()
    for c in (0, 1):
        transfer.retrieve(dst.view, ids, chunk_key(toks, "r", c))
    assert client.free_lookup_locks(key(toks, "r", start=2 * CHUNK, end=4 * CHUNK)) == 4
    ticket = client.prepare_retrieve(chunk_key(toks, "r", 5))
    client.commit_retrieve(ticket.handle)
    uncollected = client.lookup(key(toks, "r"))
    held = wait_for_status(
        client, lambda s: s["l1"]["read_leases"] == 2 * n - 7 + n, "the last lookup's leases"
    )
    assert held["engine"]["requests"] == baseline["engine"]["requests"] + 1
    assert held["l1"]["requests"] == baseline["l1"]["requests"] + 1
    assert held["prefetch"]["jobs"] == 2  # the sync lookup's (kept for joiners) and the last

    assert client.end_session(MODEL, "r") > 0
    status = client.status()
    assert status["engine"]["requests"] == baseline["engine"]["requests"]
    assert status["engine"]["transfers"] == 0
    assert status["l1"]["read_leases"] == 0
    assert status["l1"]["requests"] == baseline["l1"]["requests"]
    assert status["prefetch"]["jobs"] == 0
    assert status["l1"]["evictable"] == n
    with pytest.raises(NotFoundError):
        client.query_prefetch_status(uncollected)
    assert client.status()["engine"]["pending_lookups"] == 0
    assert client.end_session(MODEL, "r") == 0
    # The objects stay cached: a new request finds them all.
    assert client.sync_lookup(key(toks, "r-next")).hit_chunks == n


def test_end_session_reports_the_leases_it_released(start_server: StartServer) -> None:
    tp, n = 4, 4
    server = start_server()
    src = EngineKv.make(_core.KvLayout.MLA, seed=120)
    client, transfer = server.worker(src)
    toks = tokens(n * CHUNK, seed=120)
    assert transfer.store(src.view, np.arange(n * BPC), key(toks, "w")) == n
    assert client.sync_lookup(key(toks, "r"), tp_size=tp).hit_chunks == n
    assert client.status()["l1"]["read_leases"] == tp * n
    assert client.end_session(MODEL, "r") == tp * n


# ---------------------------------------------------------------------------------------------
# Bad input


def test_malformed_frames_get_error_replies_and_the_server_keeps_serving(
    start_server: StartServer,
) -> None:
    server = start_server()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        ping = encode_request(RequestType.PING, 7, {})

        sock.send_multipart([b"\xc1 not msgpack"])  # one frame
        reply = recv_reply(sock)
        assert (reply.status, reply.seq) == (lc.StatusCode.INVALID_ARGUMENT, 0)

        sock.send_multipart([ping[0], b"\xc1"])  # a valid header, a payload that is not msgpack
        reply = recv_reply(sock)
        assert (reply.status, reply.seq) == (lc.StatusCode.INVALID_ARGUMENT, 7)

        sock.send_multipart(encode_request(99, 8, {}))  # an unknown request type
        reply = recv_reply(sock)
        assert (reply.status, reply.seq) == (lc.StatusCode.NOT_SUPPORTED, 8)
        assert "unknown request type 99" in reply.message

        bad_key = {"key": {"model_name": MODEL, "tokens": b"\x00" * 4, "cache_slat": "x"}}
        sock.send_multipart(encode_request(RequestType.LOOKUP, 9, bad_key))
        reply = recv_reply(sock)
        assert (reply.status, reply.seq) == (lc.StatusCode.INVALID_ARGUMENT, 9)
        assert "cache_slat" in reply.message

        sock.send_multipart(ping)
        reply = recv_reply(sock)
        assert (reply.ok, reply.seq, reply.version) == (True, 7, PROTOCOL_VERSION)
    finally:
        sock.close(linger=0)
        context.term()
    client = server.client()
    client.ping(deadline_s=2.0)
    assert client.get_chunk_size() == CHUNK


def test_a_stopped_server_is_reported_unavailable_not_hung(start_server: StartServer) -> None:
    server = start_server()
    client = CacheClient(server.endpoint, timeout_s=5.0)
    try:
        client.ping(deadline_s=2.0)
        assert server.stop() == 0
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            client.ping(deadline_s=1.0)
    finally:
        client.close()


def _cpu_ticks(native_thread_id: int) -> int:
    """User + system CPU time a thread of this process has used, in clock ticks."""
    fields = Path(f"/proc/self/task/{native_thread_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def test_a_killed_server_fails_requests_at_once_and_is_reconnected(
    start_server: StartServer,
) -> None:
    """The client watches its connection: when the server dies, the request in flight and the
    ones made while it is down fail with UnavailableError at once (their deadlines are long on
    purpose), without any thread spinning; once a server listens on the endpoint again, the
    client's requests are served without the caller doing anything."""
    server = start_server()
    client = server.client(timeout_s=60.0, heartbeat_interval_s=0.05)
    assert client.hello_info is not None
    client.ping()

    os.kill(server.proc.pid, signal.SIGSTOP)  # hung: the request below stays unanswered
    in_flight = client.async_ping()
    time.sleep(0.2)
    assert not in_flight.done()
    server.kill()
    with pytest.raises(UnavailableError, match="lost the connection"):
        in_flight.result(timeout=20)
    with pytest.raises(UnavailableError, match="lost the connection"):
        client.status()
    with pytest.raises(UnavailableError, match="lost the connection"):
        client.async_get_chunk_size().result(timeout=20)

    # While it is down, no thread of the client spins (heartbeats are off, every 50 ms otherwise).
    io_thread = client._thread.native_id
    assert io_thread is not None
    before = _cpu_ticks(io_thread)
    time.sleep(1.0)
    ticks = _cpu_ticks(io_thread) - before
    assert ticks < os.sysconf("SC_CLK_TCK") // 5, f"the I/O thread used {ticks} ticks in 1 s"

    back = start_server(endpoint=server.endpoint)
    deadline = time.monotonic() + 20.0
    while True:
        try:
            client.ping()
            break
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert client.get_chunk_size() == CHUNK
    assert client.hello().server_version == client.hello_info.server_version
    assert back.client().status()["server"]["clients"] == 2


# ---------------------------------------------------------------------------------------------
# One client cannot stop the server (bounded work per request; nothing escapes the socket thread)


def _every_rank_lookup(client: CacheClient, world_size: int, n_tokens: int) -> Any:
    toks = np.arange(n_tokens, dtype=np.uint32)
    return client.async_lookup(
        Key(MODEL, request_id="huge", tokens=toks, world_size=world_size, worker_id=-1), 1
    )


def test_a_request_naming_too_many_objects_is_refused_before_any_work(
    start_server: StartServer,
) -> None:
    """A lookup for every rank of a 4096-rank namespace with 1M tokens names 268M objects; it
    gets ResourceExhausted at once and everyone else is served."""
    server = start_server(max_tokens_per_key=1 << 20)
    kv = EngineKv.make(_core.KvLayout.NHD)
    server.worker(kv, world_size=4096, worker_id=0)
    bad = server.client()
    with pytest.raises(ResourceExhaustedError, match="max_keys_per_request"):
        _every_rank_lookup(bad, 4096, 1 << 20).result(timeout=15.0)
    other = server.client()
    other.ping(deadline_s=2.0)
    assert other.hello().client_id != 0
    # A namespace whose one chunk for every rank could not fit in L1 is refused at registration.
    with pytest.raises(InvalidArgumentError, match="world_size"):
        server.worker(kv, model="too-wide", world_size=1 << 16, worker_id=0)


def test_a_request_that_runs_out_of_memory_gets_an_error_and_the_server_keeps_serving(
    start_server: StartServer,
) -> None:
    """With the per-request cap lifted, the same lookup runs out of memory in a server under a
    3 GB address-space limit: the request gets an error reply, the socket thread survives, and
    a second client is served."""
    server = start_server(
        max_tokens_per_key=1 << 20,
        max_keys_per_request=1 << 31,
        address_space_limit=3 << 30,
    )
    kv = EngineKv.make(_core.KvLayout.NHD)
    server.worker(kv, world_size=4096, worker_id=0)
    bad = server.client()
    with pytest.raises((ResourceExhaustedError, InternalError)):
        _every_rank_lookup(bad, 4096, 1 << 20).result(timeout=60.0)
    other = server.client(timeout_s=5.0)
    assert other.hello().client_id != 0
    other.ping(deadline_s=2.0)
    assert server.proc.poll() is None


def test_a_python_tier_named_on_the_command_line_serves_the_bytes_after_clear(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server imports the class itself: tests/ goes on its PYTHONPATH.
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.getenv("PYTHONPATH")])))
    tier = {"type": "python", "class": "dict_adapter:DictL2Adapter", "worker_threads": 2}
    server = start_server(l2_adapters=[{**tier, "name": "dict-tier"}])
    src = EngineKv.make(seed=40)
    client, transfer = server.worker(src)
    toks = tokens(6 * CHUNK, seed=40)
    ids = np.arange(6 * BPC)
    assert transfer.store(src.view, ids, key(toks, "w")) == 6
    # A Python tier does not count its objects: wait for the store controller's count.
    wait_for_status(client, lambda s: s["store"]["stored"] == 6, "6 objects stored to L2")
    assert client.clear() == 6  # L1 is empty: what follows comes from the Python tier

    found = client.sync_lookup(key(toks, "r"))
    assert (found.hit_chunks, found.l1_chunks, found.l2_chunks) == (6, 0, 6)
    dst = EngineKv.make()
    assert transfer.retrieve(dst.view, ids, key(toks, "r")) == 6 * CHUNK
    assert_same_blocks(src, ids, dst, ids)
    assert client.status()["l2"][0]["loads"] == 6
