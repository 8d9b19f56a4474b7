#!/usr/bin/env python3
"""bench_server: the cache server end to end, next to floors measured in the same run.

The server runs as a real child process (``python -m lmcache_cpp serve`` on an ``ipc://``
endpoint; it prints ``READY <endpoint>`` once bound and stops on SIGTERM), next to a bare pyzmq
ROUTER echo server in another child process (this file with ``--_echo-server``). Three things are
measured, each printed next to its floor and the ratio; nothing is asserted.

1. Lookup round trips, p50 and p99 in us. Keys of 1, 16 and 64 chunks of 256 tokens, in token
   mode (1 KiB of token ids per chunk) and hash mode (16 block hashes of 32 bytes per chunk, block
   size 16), every chunk in L1 (stored before). SYNC_LOOKUP, and the two-phase LOOKUP +
   QUERY_PREFETCH_STATUS (queried again while not ready, counted). Bursts of 1 and of 32 requests
   sent at once; each request's latency runs from its send to its (last) reply. Every lookup has a
   fresh request id; the ids are ended with END_SESSION after each burst, untimed. Four ways:

   * raw DEALER -> echo: pre-encoded requests to the echo server (floor). A two-phase lookup is
     two echoed round trips, one LOOKUP-sized and one QUERY-sized. The echo returns the request's
     own frames (the header turned into a reply header), so it carries the key both ways while
     the server's reply is about 60 bytes;
   * CacheClient -> echo: the same payloads through ``CacheClient.request`` (its encoding and
     futures on top of the same echo);
   * raw DEALER -> server: requests pre-encoded with ``protocol.encode_request``, straight to the
     server (the server's share, without the client library);
   * CacheClient -> server: ``sync_lookup``, or ``lookup`` then ``query_prefetch_status`` (what
     an engine sees). Target: p50 <= 2x the raw DEALER echo.

   With 1 outstanding the client is used through its blocking calls, timed on the calling thread
   (an engine's scheduler makes one lookup at a time); with 32 outstanding through its
   ``async_`` calls, each request timed from its submit to its (last) future's done-callback.

   The lookup keys belong to a small registered layout (1 layer, 1 head of 8, bf16: 8 KiB
   objects): a lookup reads only the object table, so the object size does not matter to it.

2. Store and retrieve through the arena, GB/s: 16 chunks of 256 tokens of a 7B-class layout
   (32 layers, 8 KV heads, head size 128, bf16, block size 16, NHD: 32 MiB per chunk, 512 MiB per
   request) with ``KvTransferClient.store`` / ``.retrieve`` (a SYNC_LOOKUP before the retrieve,
   timed apart) on all cores, random distinct block ids. Floors: numpy ``copyto`` of the same
   bytes as one contiguous buffer on one thread, and cut into one range per thread on a thread
   pool of as many threads (numpy releases the GIL). Rounds are interleaved; one warm-up round
   first (arena page faults); best and median of the rounds. Target: >= 0.8x the multi-threaded
   copy.

3. Lookups per second from concurrent client processes (8 by default, each with its own
   CacheClient, one SYNC_LOOKUP outstanding, each followed by an END_SESSION that is not waited
   for), 16-chunk hash-mode keys, for 5 s; the floor is the same processes doing the same against
   the echo server. Also the server's CPU time per lookup (from /proc).

Usage: bench_server.py [--quick] [--sections lookup,transfer,throughput] [--clients N]
(about 1.5 minutes on 2 cores; --quick about 45 s). Every child process is stopped on the way
out, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import zmq

import lmcache_cpp as lc
from harness import ChildProcesses, apply_defaults, child_role, run_benchmark
from lmcache_cpp.app import serve_argv
from lmcache_cpp.client import CacheClient, Key, KvTransferClient, LookupResult
from lmcache_cpp.protocol import (
    EndSessionRequest,
    HandleRequest,
    KeyRequest,
    RequestType,
    SyncLookupRequest,
    encode_request,
)

CHUNK: Final = 256  # tokens per chunk (the server is started with --chunk-size 256)
BLOCK: Final = 16  # engine block size, tokens
HASH_SIZE: Final = 32  # bytes per block hash
HASHES_PER_CHUNK: Final = CHUNK // BLOCK
MAX_CHUNKS: Final = 64
LOOKUP_MODEL: Final = "bench-lookup"
TRANSFER_MODEL: Final = "bench-7b"
LAYERS, HEADS, HEAD_SIZE, ELEMENT = 32, 8, 128, 2
REQUEST_CHUNKS: Final = 16
DUMMY_HANDLE: Final = bytes(range(16))
REPLY_TIMEOUT_MS: Final = 30_000
DRIVERS: Final = ("echo raw", "echo client", "server raw", "server client")
SECTIONS: Final = ("lookup", "transfer", "throughput")


class BenchError(RuntimeError):
    """Something went wrong (not a slow measurement): the benchmark stops."""


# ---------------------------------------------------------------------------------------------
# Child processes


class Children(ChildProcesses):
    """Every child process of the benchmark, each with a thread reading its stdout lines
    (:class:`harness.ChildProcesses` starts and stops them)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._lines: dict[int, queue.Queue[str | None]] = {}

    def start(
        self, name: str, argv: Sequence[str], *, stdin: bool = False
    ) -> subprocess.Popen[str]:
        proc = self._spawn(name, argv, stdin)
        lines: queue.Queue[str | None] = queue.Queue()
        self._lines[proc.pid] = lines
        threading.Thread(
            target=_pump_lines, args=(proc, lines), name=f"stdout-{name}", daemon=True
        ).start()
        return proc

    def readline(self, proc: subprocess.Popen[str], timeout_s: float, what: str) -> str:
        """The child's next stdout line; BenchError if it exits or stays silent."""
        try:
            line = self._lines[proc.pid].get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"{what}: no output in {timeout_s:.0f} s") from None
        if line is None:
            raise BenchError(f"{what}: the process exited with status {proc.wait()}")
        return line.rstrip("\n")

    def stop(self, proc: subprocess.Popen[str], timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        self.send(proc, signal.SIGTERM)
        self.wait_or_kill(proc, timeout_s)
        return proc.returncode


def _pump_lines(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):
        for line in proc.stdout:
            lines.put(line)
    lines.put(None)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# The echo server (a child process)


def echo_server_main(endpoint: str) -> int:
    """A bare ROUTER that sends every message back to its sender.

    The request header ``[version, type, seq]`` (a msgpack fixarray of 3) becomes the reply header
    ``[version, type, seq, 0]`` by rewriting its first byte and appending a 0, so a CacheClient
    takes the echo as a success reply whose payload is the request's own payload. The socket calls
    mirror the server's: a poll, then non-blocking receives and sends with int flags.
    """
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print(f"READY {endpoint}", flush=True)
    parent = os.getppid()
    nonblock, sndmore, rcvmore = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)
    events, pollin = int(zmq.EVENTS), int(zmq.POLLIN)
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return 0  # the benchmark is gone
                continue
            # Plain int flags and a ZMQ_EVENTS check rather than pyzmq's multipart helpers and
            # a read that raises zmq.Again: the cheapest pyzmq calls, as the server makes them.
            for _ in range(1024):
                frames = [sock.recv(nonblock)]
                while sock.getsockopt(rcvmore):
                    frames.append(sock.recv(nonblock))
                if len(frames) == 3 and frames[1][:1] == b"\x93":
                    frames[1] = b"\x94" + frames[1][1:] + b"\x00"
                with contextlib.suppress(zmq.ZMQError):
                    for frame in frames[:-1]:
                        sock.send(frame, nonblock | sndmore)
                    sock.send(frames[-1], nonblock)
                if not int(sock.getsockopt(events)) & pollin:
                    break
    finally:
        sock.close(linger=0)
        context.term()


# ---------------------------------------------------------------------------------------------
# Keys


def block_hashes(count: int) -> bytes:
    """``count`` deterministic 32-byte block hashes (the same in every process)."""
    return b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(count))


@dataclass(frozen=True)
class KeyData:
    tokens: bytes  # MAX_CHUNKS chunks of token ids, packed uint32
    hashes: bytes  # MAX_CHUNKS chunks of block hashes

    @staticmethod
    def make() -> KeyData:
        rng = np.random.default_rng(1234)
        toks = rng.integers(0, 32000, MAX_CHUNKS * CHUNK, dtype=np.uint32)
        return KeyData(toks.astype("<u4").tobytes(), block_hashes(MAX_CHUNKS * HASHES_PER_CHUNK))

    def key(self, mode: str, chunks: int, request_id: str, model: str = LOOKUP_MODEL) -> Key:
        if mode == "tokens":
            return Key(model, request_id=request_id, tokens=self.tokens[: chunks * CHUNK * 4])
        hashes = self.hashes[: chunks * HASHES_PER_CHUNK * HASH_SIZE]
        return Key(model, request_id=request_id, block_hashes=hashes, block_hash_size=HASH_SIZE)


# ---------------------------------------------------------------------------------------------
# 1. Lookup round trips


@dataclass(frozen=True)
class LookupCase:
    mode: str  # "tokens" or "hashes"
    chunks: int
    kind: str  # "sync" or "two-phase"
    outstanding: int

    @property
    def label(self) -> str:
        return f"{self.mode} {self.chunks}-chunk {self.kind} x{self.outstanding}"


@dataclass
class Series:
    """Latencies (seconds) of one case and one way of sending it."""

    latencies: list[float] = field(default_factory=list)
    requeries: int = 0

    def pct(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies), q)) * 1e6


@dataclass
class Burst:
    latencies: list[float]
    requeries: int


class RawDealer:
    """A bare DEALER socket; replies are matched to requests by the seq in their header."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        self.sock.connect(endpoint)
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def recv(self) -> list[bytes]:
        try:
            return self.sock.recv_multipart()
        except zmq.Again:
            raise BenchError(f"no reply in {REPLY_TIMEOUT_MS / 1e3:.0f} s") from None

    def close(self) -> None:
        self.sock.close(linger=0)


def first_request(case: LookupCase, key: Key) -> tuple[RequestType, dict[str, Any]]:
    if case.kind == "sync":
        return RequestType.SYNC_LOOKUP, SyncLookupRequest(key.to_wire_key()).to_wire()
    return RequestType.LOOKUP, KeyRequest(key.to_wire_key()).to_wire()


def raw_burst(dealer: RawDealer, case: LookupCase, keys: Sequence[Key], to_server: bool) -> Burst:
    """Sends the burst's requests at once (pre-encoded) and reads every reply."""
    n = len(keys)
    encoded: list[tuple[int, list[bytes]]] = []
    for key in keys:
        request_type, payload = first_request(case, key)
        seq = dealer.next_seq()
        encoded.append((seq, encode_request(request_type, seq, payload)))
    two_phase = case.kind == "two-phase"
    pending: dict[int, tuple[int, int]] = {}  # seq -> (request index, phase)
    handles = [DUMMY_HANDLE] * n
    started = [0.0] * n
    latencies = [0.0] * n
    payloads = [b""] * n
    sock = dealer.sock

    def send_query(i: int) -> None:
        seq = dealer.next_seq()
        pending[seq] = (i, 1)
        frames = encode_request(RequestType.QUERY_PREFETCH_STATUS, seq, {"handle": handles[i]})
        sock.send_multipart(frames)

    for i, (seq, frames) in enumerate(encoded):
        pending[seq] = (i, 0)
        started[i] = time.perf_counter()
        sock.send_multipart(frames)
    requeries = 0
    left = n
    while left:
        reply = dealer.recv()
        now = time.perf_counter()
        header = msgpack.unpackb(reply[0])
        i, phase = pending.pop(header[2])
        if header[3] != 0:
            message = msgpack.unpackb(reply[1]).get("message", "")
            raise BenchError(f"{case.label}: status {header[3]}: {message}")
        if two_phase and phase == 0:
            if to_server:
                handles[i] = msgpack.unpackb(reply[1])["handle"]
            send_query(i)
            continue
        if two_phase and to_server and not msgpack.unpackb(reply[1])["ready"]:
            requeries += 1
            send_query(i)
            continue
        latencies[i] = now - started[i]
        payloads[i] = reply[1]
        left -= 1
    if to_server:
        for reply_payload in payloads:
            hits = msgpack.unpackb(reply_payload)["hit_chunks"]
            if hits != case.chunks:
                raise BenchError(f"{case.label}: {hits} chunks hit, expected {case.chunks}")
        for key in keys:
            body = EndSessionRequest(key.model_name, key.request_id).to_wire()
            sock.send_multipart(encode_request(RequestType.END_SESSION, dealer.next_seq(), body))
        for _ in keys:
            dealer.recv()
    return Burst(latencies, requeries)


def client_blocking(client: CacheClient, case: LookupCase, key: Key, to_server: bool) -> Burst:
    """One lookup through CacheClient's blocking calls, timed on the calling thread: what an
    engine's scheduler does."""
    requeries = 0
    t0 = time.perf_counter()
    if case.kind == "sync":
        if to_server:
            hit = client.sync_lookup(key).hit_chunks
        else:
            client.request(*first_request(case, key))
    else:
        if to_server:
            handle = client.lookup(key)
            result = client.query_prefetch_status(handle)
            while result is None:
                requeries += 1
                result = client.query_prefetch_status(handle)
            hit = result.hit_chunks
        else:
            client.request(*first_request(case, key))
            client.request(RequestType.QUERY_PREFETCH_STATUS, HandleRequest(DUMMY_HANDLE).to_wire())
    seconds = time.perf_counter() - t0
    if to_server:
        if hit != case.chunks:
            raise BenchError(f"{case.label}: {hit} chunks hit, expected {case.chunks}")
        client.end_session(key.model_name, key.request_id)
    return Burst([seconds], requeries)


def client_burst(
    client: CacheClient, case: LookupCase, keys: Sequence[Key], to_server: bool
) -> Burst:
    """Submits the burst's requests at once through CacheClient; times them in done-callbacks.
    A burst of one uses the blocking calls instead (:func:`client_blocking`)."""
    n = len(keys)
    if n == 1:
        return client_blocking(client, case, keys[0], to_server)
    latencies = [0.0] * n
    hits = [case.chunks] * n
    errors: list[BaseException] = []
    requeries = [0]
    lock = threading.Lock()
    left = [n]
    done = threading.Event()

    def finish(i: int, seconds: float, hit: int | None, error: BaseException | None) -> None:
        latencies[i] = seconds
        with lock:
            if error is not None:
                errors.append(error)
            elif hit is not None:
                hits[i] = hit
            left[0] -= 1
            if left[0] == 0:
                done.set()

    def on_sync(i: int, t0: float, future: concurrent.futures.Future[Any]) -> None:
        now = time.perf_counter()
        error = future.exception()
        result = None if error is not None else future.result()
        hit = result.hit_chunks if isinstance(result, LookupResult) else None
        finish(i, now - t0, hit, error)

    def query(i: int, t0: float, handle: bytes) -> None:
        future: concurrent.futures.Future[Any]
        if to_server:
            future = client.async_query_prefetch_status(handle)
        else:
            body = HandleRequest(handle).to_wire()
            future = client.async_request(RequestType.QUERY_PREFETCH_STATUS, body)
        future.add_done_callback(functools.partial(on_query, i, t0, handle))

    def on_lookup(i: int, t0: float, future: concurrent.futures.Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            finish(i, time.perf_counter() - t0, None, error)
            return
        query(i, t0, future.result() if to_server else DUMMY_HANDLE)

    def on_query(i: int, t0: float, handle: bytes, future: concurrent.futures.Future[Any]) -> None:
        now = time.perf_counter()
        error = future.exception()
        if error is not None:
            finish(i, now - t0, None, error)
            return
        result = future.result()
        if to_server and result is None:
            with lock:
                requeries[0] += 1
            query(i, t0, handle)
            return
        finish(i, now - t0, result.hit_chunks if isinstance(result, LookupResult) else None, None)

    for i, key in enumerate(keys):
        t0 = time.perf_counter()
        future: concurrent.futures.Future[Any]
        if case.kind == "sync":
            if to_server:
                future = client.async_sync_lookup(key)
            else:
                future = client.async_request(*first_request(case, key))
            future.add_done_callback(functools.partial(on_sync, i, t0))
        else:
            if to_server:
                future = client.async_lookup(key)
            else:
                future = client.async_request(*first_request(case, key))
            future.add_done_callback(functools.partial(on_lookup, i, t0))
    if not done.wait(REPLY_TIMEOUT_MS / 1e3):
        raise BenchError(f"{case.label}: replies missing after {REPLY_TIMEOUT_MS / 1e3:.0f} s")
    if errors:
        raise BenchError(f"{case.label}: {type(errors[0]).__name__}: {errors[0]}")
    if to_server:
        wrong = [h for h in hits if h != case.chunks]
        if wrong:
            raise BenchError(f"{case.label}: {wrong[0]} chunks hit, expected {case.chunks}")
        ends = [client.async_end_session(k.model_name, k.request_id) for k in keys]
        for end in ends:
            end.result(timeout=REPLY_TIMEOUT_MS / 1e3)
    return Burst(latencies, requeries[0])


class LookupKeys:
    """The small layout the lookup keys belong to, registered by ``client``; :meth:`store` puts
    MAX_CHUNKS chunks of both key modes into L1 (again after a CLEAR)."""

    def __init__(self, client: CacheClient, data: KeyData) -> None:
        self._data = data
        shape = (2, MAX_CHUNKS * HASHES_PER_CHUNK, BLOCK, 1, 8)
        self._layers = [make_tensor(shape)]
        self._view = lc.KvCacheView(self._layers, lc.KvLayout.NHD)
        self.transfer = KvTransferClient.register(client, LOOKUP_MODEL, 1, 0, self._view)
        self._stores = 0

    def store(self) -> None:
        ids = np.arange(MAX_CHUNKS * HASHES_PER_CHUNK)
        for mode in ("tokens", "hashes"):
            self._stores += 1
            key = self._data.key(mode, MAX_CHUNKS, f"store-{mode}-{self._stores}")
            published = self.transfer.store(self._view, ids, key)
            if published != MAX_CHUNKS:
                raise BenchError(f"storing the {mode} lookup key published {published} chunks")


def bench_lookups(
    client: CacheClient,
    echo_client: CacheClient,
    server_raw: RawDealer,
    echo_raw: RawDealer,
    data: KeyData,
    args: argparse.Namespace,
) -> dict[tuple[LookupCase, str], Series]:
    cases = [
        LookupCase(mode, chunks, kind, out)
        for out in (1, 32)
        for mode in ("tokens", "hashes")
        for kind in ("sync", "two-phase")
        for chunks in (1, 16, 64)
    ]
    results = {(case, d): Series() for case in cases for d in DRIVERS}
    counter = [0]

    def keys_for(case: LookupCase) -> list[Key]:
        out = []
        for _ in range(case.outstanding):
            counter[0] += 1
            out.append(data.key(case.mode, case.chunks, f"lk-{counter[0]}"))
        return out

    def run(case: LookupCase, driver: str) -> Burst:
        keys = keys_for(case)
        if driver == "echo raw":
            return raw_burst(echo_raw, case, keys, to_server=False)
        if driver == "echo client":
            return client_burst(echo_client, case, keys, to_server=False)
        if driver == "server raw":
            return raw_burst(server_raw, case, keys, to_server=True)
        return client_burst(client, case, keys, to_server=True)

    # Warm-up: a few bursts of every case and way, not recorded.
    for case in cases:
        for driver in DRIVERS:
            for _ in range(3):
                run(case, driver)
    rounds = args.rounds
    for _ in range(rounds):
        for case in cases:
            total = args.samples if case.outstanding == 1 else args.bursts
            bursts = max(1, math.ceil(total / rounds))
            for driver in DRIVERS:
                series = results[(case, driver)]
                for _ in range(bursts):
                    burst = run(case, driver)
                    series.latencies.extend(burst.latencies)
                    series.requeries += burst.requeries
    return results


def print_lookups(results: dict[tuple[LookupCase, str], Series]) -> list[str]:
    cases = sorted(
        {case for case, _ in results},
        key=lambda c: (c.outstanding, c.mode != "tokens", c.kind != "sync", c.chunks),
    )
    print("  p50 / p99 in us; 'out': requests sent at once (each timed from its send to its reply)")
    print(
        "  ratios of p50s: vs echo = CacheClient->server / raw DEALER->echo (the target); "
        "vs cl echo = / CacheClient->echo;"
    )
    print(
        "  srv share = raw DEALER->server / raw DEALER->echo; lib share = CacheClient->server /"
        " raw DEALER->server"
    )
    head = f"  {'mode':<6} {'chunks':>6} {'kind':<9} {'out':>3}"
    for d in DRIVERS:
        head += f"  {d:>15}"
    head += f"  {'vs echo':>7} {'vs cl echo':>10} {'srv share':>9} {'lib share':>9}"
    print(head)
    summary = []
    for case in cases:
        row = f"  {case.mode:<6} {case.chunks:>6} {case.kind:<9} {case.outstanding:>3}"
        p50 = {}
        for d in DRIVERS:
            series = results[(case, d)]
            p50[d] = series.pct(50)
            row += f"  {p50[d]:>7.0f} / {series.pct(99):>5.0f}"
        measured = p50["server client"]
        ratio = measured / p50["echo raw"]
        row += f"  {ratio:>7.2f} {measured / p50['echo client']:>10.2f}"
        row += f" {p50['server raw'] / p50['echo raw']:>9.2f} {measured / p50['server raw']:>9.2f}"
        requeries = sum(results[(case, d)].requeries for d in ("server raw", "server client"))
        if requeries:
            row += f"  ({requeries} re-queries)"
        print(row)
        summary.append(
            f"lookup {case.label} p50: {p50['server client']:.0f} us, floor "
            f"{p50['echo raw']:.0f} us (raw DEALER echo), ratio {ratio:.2f} (target <= 2)"
        )
    return summary


# ---------------------------------------------------------------------------------------------
# 2. Store and retrieve through the arena


@functools.cache
def torch_module() -> Any:
    """torch, imported on first use (the client processes do not need it); None without it."""
    try:
        import torch
    except ImportError:  # numpy uint16 stands in for bf16
        return None
    return torch


def make_tensor(shape: tuple[int, ...]) -> Any:
    """A bf16 torch tensor (numpy uint16 without torch), every page written."""
    torch = torch_module()
    if torch is not None:
        return torch.ones(shape, dtype=torch.bfloat16)
    return np.ones(shape, dtype=np.uint16)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def mem_available_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_transfer(client: CacheClient, args: argparse.Namespace, cores: int) -> list[str]:
    num_blocks = 2 * REQUEST_CHUNKS * HASHES_PER_CHUNK  # store from half, retrieve into the other
    shape = (2, num_blocks, BLOCK, HEADS, HEAD_SIZE)
    layers = [make_tensor(shape) for _ in range(LAYERS)]
    view = lc.KvCacheView(layers, lc.KvLayout.NHD)
    object_bytes = view.object_bytes(CHUNK)
    request_bytes = object_bytes * REQUEST_CHUNKS
    rng = np.random.default_rng(7)
    perm = rng.permutation(num_blocks)
    per_request = REQUEST_CHUNKS * HASHES_PER_CHUNK
    store_ids, retrieve_ids = perm[:per_request].copy(), perm[per_request:].copy()
    src: npt.NDArray[np.uint8] = np.full(request_bytes, 1, np.uint8)
    dst: npt.NDArray[np.uint8] = np.zeros(request_bytes, np.uint8)
    per_thread = math.ceil(request_bytes / cores)

    def copy_range(t: int) -> None:
        lo, hi = t * per_thread, min((t + 1) * per_thread, request_bytes)
        np.copyto(dst[lo:hi], src[lo:hi])

    print(
        f"  {LAYERS} layers x {HEADS} KV heads x {HEAD_SIZE}, "
        f"{'torch bf16' if torch_module() is not None else 'numpy uint16'} NHD "
        f"[2, {num_blocks}, {BLOCK}, {HEADS}, {HEAD_SIZE}] per layer; {REQUEST_CHUNKS} chunks x "
        f"{object_bytes / 2**20:.0f} MiB = {request_bytes / 2**20:.0f} MiB per request; "
        f"copies on {cores} threads; {args.reps} rounds after 1 warm-up round"
    )
    times: dict[str, list[float]] = {
        n: [] for n in ("memcpy 1", "memcpy n", "store", "lookup", "retrieve")
    }
    with (
        KvTransferClient.register(
            client, TRANSFER_MODEL, 1, 0, view, num_threads=cores
        ) as transfer,
        concurrent.futures.ThreadPoolExecutor(cores) as pool,
    ):
        for rep in range(args.reps + 1):
            toks = rng.integers(0, 32000, REQUEST_CHUNKS * CHUNK, dtype=np.uint32)
            write = Key(TRANSFER_MODEL, request_id=f"tw-{rep}", tokens=toks)
            read = Key(TRANSFER_MODEL, request_id=f"tr-{rep}", tokens=toks)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            t1 = time.perf_counter()
            list(pool.map(copy_range, range(cores)))
            t2 = time.perf_counter()
            published = transfer.store(view, store_ids, write)
            t3 = time.perf_counter()
            hits = client.sync_lookup(read).hit_chunks
            t4 = time.perf_counter()
            tokens = transfer.retrieve(view, retrieve_ids, read)
            t5 = time.perf_counter()
            if published != REQUEST_CHUNKS or hits != REQUEST_CHUNKS:
                raise BenchError(f"stored {published} and found {hits} of {REQUEST_CHUNKS} chunks")
            if tokens != REQUEST_CHUNKS * CHUNK:
                raise BenchError(f"retrieved {tokens} tokens")
            client.end_session(TRANSFER_MODEL, write.request_id)
            client.end_session(TRANSFER_MODEL, read.request_id)
            client.clear()
            if rep == 0:
                continue  # warm-up: page faults in the arena and the floors' buffers
            for name, seconds in zip(
                times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
            ):
                times[name].append(seconds)
    best = {n: min(v) for n, v in times.items()}
    median = {n: float(np.median(v)) for n, v in times.items()}
    floor = gbps(request_bytes, best["memcpy n"])
    labels = {
        "memcpy 1": "numpy copyto, 1 thread (one contiguous copy)",
        "memcpy n": f"numpy copyto, {cores} threads (one range each)",
        "store": "KvTransferClient.store",
        "retrieve": "KvTransferClient.retrieve",
    }
    print(f"  {'':<46} {'best':>10} {'median':>10}  best / multi-threaded copy")
    for name, label in labels.items():
        row = (
            f"  {label:<46} {gbps(request_bytes, best[name]):>5.2f} GB/s "
            f"{gbps(request_bytes, median[name]):>5.2f} GB/s"
        )
        if name in ("store", "retrieve"):
            row += f"  {gbps(request_bytes, best[name]) / floor:.2f}"
        print(row)
    print(
        f"  {'SYNC_LOOKUP before the retrieve (not in it)':<46} "
        f"{best['lookup'] * 1e6:>7.0f} us {median['lookup'] * 1e6:>7.0f} us"
    )
    size = f"{REQUEST_CHUNKS}x{object_bytes // 2**20} MiB"
    out = []
    for name in ("store", "retrieve"):
        value = gbps(request_bytes, best[name])
        out.append(
            f"transfer {name} {size}: {value:.2f} GB/s, floor {floor:.2f} GB/s ({cores}-thread "
            f"copy), ratio {value / floor:.2f} (target >= 0.8)"
        )
    return out


# ---------------------------------------------------------------------------------------------
# 3. Lookup throughput from concurrent client processes


def lookup_worker_main(config_json: str) -> int:
    """One client process of the throughput test: SYNC_LOOKUPs until the time is up."""
    cfg = json.loads(config_json)
    to_server = cfg["target"] == "server"
    chunks = int(cfg["chunks"])
    hashes = block_hashes(chunks * HASHES_PER_CHUNK)
    client = CacheClient(
        cfg["endpoint"],
        hello=to_server,
        heartbeat_interval_s=5.0 if to_server else None,
        name=f"bench worker {cfg['index']}",
    )
    try:
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            return 1
        count = 0
        misses = 0
        latencies: list[float] = []
        ends: list[concurrent.futures.Future[Any]] = []
        prefix = f"w{cfg['target'][0]}{cfg['index']}-"
        start = time.perf_counter()
        stop_at = start + float(cfg["seconds"])
        now = start
        while now < stop_at:
            key = Key(
                LOOKUP_MODEL,
                request_id=f"{prefix}{count}",
                block_hashes=hashes,
                block_hash_size=HASH_SIZE,
            )
            if to_server:
                if client.sync_lookup(key).hit_chunks != chunks:
                    misses += 1
                ends.append(client.async_end_session(LOOKUP_MODEL, key.request_id))
            else:
                body = SyncLookupRequest(key.to_wire_key()).to_wire()
                client.request(RequestType.SYNC_LOOKUP, body)
                end = EndSessionRequest(LOOKUP_MODEL, key.request_id).to_wire()
                ends.append(client.async_request(RequestType.END_SESSION, end))
            done = time.perf_counter()
            latencies.append(done - now)
            now = done
            count += 1
        elapsed = now - start
        for future in ends:
            future.result(timeout=REPLY_TIMEOUT_MS / 1e3)
        lat = np.asarray(latencies)
        result = {
            "count": count,
            "seconds": elapsed,
            "misses": misses,
            "p50_us": float(np.percentile(lat, 50)) * 1e6 if count else 0.0,
            "p99_us": float(np.percentile(lat, 99)) * 1e6 if count else 0.0,
        }
        print(json.dumps(result), flush=True)
        return 0
    finally:
        client.close()


@dataclass
class Throughput:
    rate: float
    p50_us: float
    p99_us: float
    cpu_us_per_lookup: float


def run_throughput(
    children: Children, endpoint: str, target: str, target_pid: int, args: argparse.Namespace
) -> Throughput:
    procs = []
    for i in range(args.clients):
        cfg = {
            "endpoint": endpoint,
            "target": target,
            "chunks": 16,
            "seconds": args.seconds,
            "index": i,
        }
        argv = [sys.executable, __file__, "--_lookup-worker", json.dumps(cfg)]
        procs.append(children.start(f"worker-{target}-{i}", argv, stdin=True))
    for i, proc in enumerate(procs):
        line = children.readline(proc, 60.0, f"{target} worker {i}")
        if line != "READY":
            raise BenchError(f"{target} worker {i}: unexpected output {line!r}")
    cpu0 = process_cpu_s(target_pid)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("GO\n")
        proc.stdin.flush()
    results = []
    for i, proc in enumerate(procs):
        results.append(json.loads(children.readline(proc, args.seconds + 60.0, f"worker {i}")))
    cpu1 = process_cpu_s(target_pid)
    for proc in procs:
        children.stop(proc)
    misses = sum(int(r["misses"]) for r in results)
    if misses:
        raise BenchError(f"{target}: {misses} lookups did not hit every chunk")
    count = sum(int(r["count"]) for r in results)
    rate = sum(r["count"] / r["seconds"] for r in results)
    return Throughput(
        rate=rate,
        p50_us=float(np.median([r["p50_us"] for r in results])),
        p99_us=float(np.max([r["p99_us"] for r in results])),
        cpu_us_per_lookup=(cpu1 - cpu0) / max(count, 1) * 1e6,
    )


# ---------------------------------------------------------------------------------------------
# Main


def machine_line(cores: int) -> str:
    torch = torch_module()
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    total = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    return (
        f"machine: {os.cpu_count()} cores ({cores} usable), {model}, "
        f"{total / 2**30:.1f} GiB RAM ({mem_available_bytes() / 2**30:.1f} available), "
        f"Python {platform.python_version()}, pyzmq {zmq.pyzmq_version()} / libzmq "
        f"{zmq.zmq_version()}, numpy {np.__version__}"
        + (f", torch {torch.__version__}" if torch is not None else "")
    )


def start_child(children: Children, name: str, argv: Sequence[str]) -> subprocess.Popen[str]:
    proc = children.start(name, argv)
    line = children.readline(proc, 60.0, name)
    if not line.startswith("READY "):
        raise BenchError(f"{name}: expected 'READY <endpoint>', got {line!r}")
    return proc


def run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    sections = set(args.sections)
    server_ep = f"ipc://{workdir}/s.sock"
    echo_ep = f"ipc://{workdir}/echo.sock"
    server_argv = serve_argv(
        server_ep,
        "--l1-size-gb",
        str(args.l1_size_gb),
        "--chunk-size",
        str(CHUNK),
        "--log-level",
        "WARNING",
    )
    print("bench_server: lmcache_cpp cache server (a child process) against floors measured in")
    print("the same run on the same machine, interleaved")
    print(machine_line(cores))
    t_start = time.perf_counter()
    server = start_child(children, "server", server_argv)
    echo = start_child(children, "echo", [sys.executable, __file__, "--_echo-server", echo_ep])
    print(f"server: {' '.join(server_argv[1:])} (pid {server.pid})")
    print(f"echo:   bare pyzmq ROUTER on {echo_ep} (pid {echo.pid})")
    summary: list[str] = []
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with contextlib.ExitStack() as stack:
        stack.callback(context.term)
        client = stack.enter_context(CacheClient(server_ep, name="bench_server"))
        data = KeyData.make()
        lookup_keys = LookupKeys(client, data)
        stack.callback(lookup_keys.transfer.close)
        lookup_keys.store()
        if "lookup" in sections:
            echo_client = stack.enter_context(
                CacheClient(echo_ep, hello=False, heartbeat_interval_s=None)
            )
            server_raw = RawDealer(context, server_ep)
            stack.callback(server_raw.close)
            echo_raw = RawDealer(context, echo_ep)
            stack.callback(echo_raw.close)
            print()
            print(
                f"1. Lookup round trip, every chunk in L1 ({args.samples} samples with 1 out, "
                f"{args.bursts} bursts with 32 out, {args.rounds} interleaved rounds)"
            )
            t0 = time.perf_counter()
            results = bench_lookups(client, echo_client, server_raw, echo_raw, data, args)
            summary += print_lookups(results)
            print(f"  ({time.perf_counter() - t0:.0f} s)")
        if "transfer" in sections:
            print()
            print("2. Store and retrieve through the L1 arena")
            needed = 3 * REQUEST_CHUNKS * (LAYERS * 2 * CHUNK * HEADS * HEAD_SIZE * ELEMENT)
            available = mem_available_bytes()
            if available and available < needed + (1 << 30):
                print(
                    f"  skipped: {available / 2**30:.1f} GiB available, needs ~{needed / 2**30:.1f}"
                )
            else:
                summary += bench_transfer(client, args, cores)
                lookup_keys.store()  # the transfers cleared L1
        if "throughput" in sections:
            print()
            print(
                f"3. Lookups per second: {args.clients} client processes (each its own "
                f"CacheClient, 1 SYNC_LOOKUP outstanding + an END_SESSION not waited for), "
                f"16-chunk hash-mode keys, {args.seconds:.0f} s each"
            )
            echo_tp = run_throughput(children, echo_ep, "echo", echo.pid, args)
            server_tp = run_throughput(children, server_ep, "server", server.pid, args)
            print(f"  {'':<10} {'lookups/s':>10} {'p50 us':>8} {'p99 us':>8} {'CPU us/lookup':>14}")
            for name, tp in (("echo", echo_tp), ("server", server_tp)):
                print(
                    f"  {name:<10} {tp.rate:>10.0f} {tp.p50_us:>8.0f} {tp.p99_us:>8.0f} "
                    f"{tp.cpu_us_per_lookup:>14.0f}"
                )
            print(
                "  CPU us/lookup: CPU time of the server (or echo) process over the run divided"
                " by the lookups (each with its END_SESSION)"
            )
            ratio = server_tp.rate / echo_tp.rate
            summary.append(
                f"throughput {args.clients} processes 16-chunk hashes: {server_tp.rate:.0f} "
                f"lookups/s, floor {echo_tp.rate:.0f}/s (same clients against the echo), ratio "
                f"{ratio:.2f} (target: printed)"
            )
    print()
    print(f"summary (floors measured in the same run; {time.perf_counter() - t_start:.0f} s):")
    for line in summary:
        print(line)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmarks the lmcache_cpp server (lookups, transfers, throughput) against "
        "floors measured in the same run. Asserts nothing."
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    parser.add_argument(
        "--sections",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SECTIONS),
        help="comma-separated subset of lookup,transfer,throughput (default: all)",
    )
    parser.add_argument("--samples", type=int, help="lookups per case with 1 outstanding")
    parser.add_argument("--bursts", type=int, help="bursts per case with 32 outstanding")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the lookup cases")
    parser.add_argument("--reps", type=int, help="timed rounds of store/retrieve")
    parser.add_argument("--clients", type=int, default=8, help="throughput client processes")
    parser.add_argument("--seconds", type=float, help="duration of each throughput run")
    parser.add_argument("--l1-size-gb", type=float, default=1.5, help="the server's L1 size")
    parser.add_argument("--_echo-server", dest="echo_server", help=argparse.SUPPRESS)
    parser.add_argument("--_lookup-worker", dest="lookup_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    defaults = {"samples": 1000, "bursts": 60, "rounds": 10, "reps": 10, "seconds": 5.0}
    if args.quick:
        defaults = {"samples": 100, "bursts": 8, "rounds": 2, "reps": 3, "seconds": 2.0}
    return apply_defaults(args, defaults)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    role = child_role(args, {"echo_server": echo_server_main, "lookup_worker": lookup_worker_main})
    if role is not None:
        return role
    return run_benchmark(
        "bench_server",
        Children,
        lambda children: run(args, children, children.workdir),
        errors=(BenchError,),
    )


if __name__ == "__main__":
    sys.exit(main())
