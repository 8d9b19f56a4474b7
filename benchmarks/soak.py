#!/usr/bin/env python3
"""soak: one cache server under mixed, faulty traffic for minutes; checks that nothing leaks.

The server is a child process (this file with ``--_server``) running the same assembly as
``lmcache-cpp serve`` (``lmcache_cpp.app.run_forever`` on a ``ServerConfig``; it prints
``READY <endpoint>`` once bound and stops on SIGTERM) on an ``ipc://`` endpoint in a temporary
directory, with a 64 MiB L1 arena and three L2 tiers in this lookup order:

* a *stalled* tier: the native ``MemoryL2Adapter`` (48 MiB), whose workers a thread in the server
  process holds (``set_stalled``) for 1.5 s of every 6 s until the traffic ends;
* a *failing* tier: a ``PythonL2Adapter`` defined below (a dict of 48 MiB, FIFO), which fails a
  fifth of its store / lookup / load calls: half of those raise (the whole call fails), the other
  half report a random half of the keys as failed;
* a file-system tier (``{"type": "fs"}``, 512 MiB) in the temporary directory.

``serve`` cannot configure the first two (its ``--l2-adapter`` specs have no fault injection), so
the server process hands them to ``run_forever(config, extra_l2_adapters=...)``, which puts them
in front of the configured fs tier; everything else is the production code path. The server runs
with a heartbeat grace of 5 s, request and hashing-session TTLs of 10 s and a reaper period of
0.5 s, so that what killed clients leave behind is reclaimed quickly.

Traffic: 8 client processes at a time (``--clients``; this file with ``--_client``), each with
its own ``CacheClient`` (heartbeat every second) and ``KvTransferClient`` (a registered KV layout
of 2 layers x 2 heads x 64, block size 16, 64-token chunks, 64 KiB objects; numpy uint16 KV
tensors). Each loops over prompts drawn from a pool of 600 (1 to 8 chunks plus a partial tail; the
first chunk is shared by the prompts of one of 8 groups), with up to 10 ms between operations:

* 30 % store: fill the prompt's blocks with a pattern derived from each chunk's prefix, then
  ``KvTransferClient.store`` (PREPARE_STORE + COMMIT_STORE);
* 30 % SYNC_LOOKUP and 30 % two-phase lookup (LOOKUP, QUERY_PREFETCH_STATUS, then up to three
  WAIT_PREFETCH_STATUS of 2 s), each followed by a retrieve of the hits (60 %; the bytes are
  checked against the pattern), FREE_LOOKUP_LOCKS (20 %) or nothing (20 %);
* 10 % aborted store (PREPARE_STORE, COMMIT_STORE with success false);

and every operation ends its request id with END_SESSION. The odd-numbered clients (1, 3, 5, 7)
are killed with SIGKILL after a random 4 to 15 s of life and restarted. Clients report their
lookup latencies, operations and errors (by exception class) once a second on their stdout.

Every minute, and at the end of the traffic, the soak prints the server's RSS (``VmRSS`` of
``/proc/<pid>/status``, with its anonymous / shared-memory / file parts), the SYNC_LOOKUP and
two-phase lookup p50 / p99 of that interval, the requests per second the server answered (its
STATUS counts) and the clients' errors by type. Then it stops the clients (SIGTERM: each finishes
its operation, unregisters and closes), waits for the server to reap what the killed ones held (up
to the heartbeat grace + the TTLs + 10 s) and prints the outstanding counters of a STATUS request.

Targets (exit status 1 if one fails): every outstanding counter 0 (leases, leased objects,
writing objects, the object table's and the engine's request ids, prefetch jobs, pending two-phase
lookups, transfer tickets, fenced stores, quarantined extents, hashing sessions, registrations,
server pool jobs, L2 pins, clients other than the soak's own); every retrieved byte as stored; no
client exits by itself; the server exits 0 on SIGTERM; and, with ``--minutes`` >= 3, the RSS at
the end within 5 % of the RSS after the first minute (printed but not enforced for shorter runs,
which have no steady state).

Usage: soak.py [--minutes N] [--clients N] [--seed N] (the minutes of traffic, then 10-40 s to
stop and drain). Every child process is stopped on the way out, also on a failure, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

import lmcache_cpp as lc
from harness import ChildProcesses, child_role, run_benchmark
from lmcache_cpp import app as app_module
from lmcache_cpp import config as config_module
from lmcache_cpp.client import CacheClient, Key, KvTransferClient, LookupResult
from lmcache_cpp.errors import LMCacheError

MODEL: Final = "soak-model"
CHUNK: Final = 64  # tokens per chunk (the server's chunk_size)
BLOCK: Final = 16  # engine block size, tokens
BLOCKS_PER_CHUNK: Final = CHUNK // BLOCK
LAYERS, HEADS, HEAD_SIZE = 2, 2, 64
NUM_BLOCKS: Final = 128  # per client: the lower half is stored from, the upper half retrieved into
MAX_CHUNKS: Final = 8
PROMPTS: Final = 600
GROUPS: Final = 8  # prompts of one group share their first chunk

L1_GB: Final = 1 / 16  # 64 MiB
FS_GB: Final = 0.5
STALLED_BYTES: Final = 48 << 20
FAILING_BYTES: Final = 48 << 20
FAIL_FRACTION: Final = 0.2
STALL_PERIOD_S: Final = 6.0
STALL_HOLD_S: Final = 1.5
HEARTBEAT_GRACE_S: Final = 5.0
CLIENT_HEARTBEAT_S: Final = 1.0
REQUEST_TTL_S: Final = 10.0  # request ids and hashing sessions
REAP_INTERVAL_S: Final = 0.5

REPORT_INTERVAL_S: Final = 1.0  # clients report this often
THINK_MAX_S: Final = 0.010
KILL_LIFE_S: Final = (4.0, 15.0)
WAIT_PREFETCH_S: Final = 2.0
WAIT_PREFETCH_TRIES: Final = 3
CLIENT_STOP_S: Final = 30.0  # a SIGTERMed client finishes its operation within this
READY_TIMEOUT_S: Final = 60.0
RSS_GROWTH_LIMIT: Final = 0.05
RSS_ENFORCED_MINUTES: Final = 3.0
# What clients leave behind can take this long to go once they are gone: the heartbeat grace,
# then the request and session TTLs, then a reaper pass; plus slack for a loaded machine.
DRAIN_TIMEOUT_S: Final = HEARTBEAT_GRACE_S + REQUEST_TTL_S + 2 * REAP_INTERVAL_S + 10.0

L2_TIERS: Final = ("stalled memory", "failing python", "fs")  # the server's lookup order

# Client op mix: (name, weight).
OPS: Final = (("store", 0.30), ("sync", 0.30), ("two_phase", 0.30), ("store_abort", 0.10))


class SoakError(RuntimeError):
    """The soak cannot go on (a child failed to start, the server died): it stops."""


class DataMismatch(Exception):
    """A retrieved chunk's bytes are not the bytes stored for it."""


def exit_with_parent() -> None:
    """Asks the kernel for SIGTERM when the soak dies (PR_SET_PDEATHSIG), even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------------------------
# The server process: fault-injecting L2 tiers around the production assembly


class InjectedFault(RuntimeError):
    """Raised by FailingAdapter for a call it fails whole."""


class FailingAdapter(lc.PythonL2Adapter):
    """A dict-backed L2 tier that fails ``fail_fraction`` of its store, lookup and load calls.

    Half of the failed calls raise (the call fails, no key done), the other half report a random
    half of their keys as failed (not stored, a miss, not loaded). Objects are kept as ``bytes``
    (the buffers are only valid during the call), at most ``capacity_bytes`` of them, oldest
    unpinned ones dropped first. Unpin never fails. Called on the adapter's worker threads.
    """

    def __init__(self, capacity_bytes: int, fail_fraction: float, seed: int) -> None:
        super().__init__(worker_threads=2, name="failing")
        self._capacity = capacity_bytes
        self._fail_fraction = fail_fraction
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # GUARDED_BY(_lock)
        # GUARDED_BY(_lock): oldest first; each object with the checksum store() was given.
        self._objects: collections.OrderedDict[lc.ObjectKey, tuple[bytes, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0  # GUARDED_BY(_lock)
        self._pins: collections.Counter[lc.ObjectKey] = collections.Counter()  # GUARDED_BY(_lock)

    def _faults(self, op: str, n: int) -> list[bool]:
        """Which of ``n`` keys fail this call (raises InjectedFault when the whole call fails)."""
        with self._lock:
            if self._rng.random() >= self._fail_fraction:
                return [False] * n
            if self._rng.random() < 0.5:
                raise InjectedFault(f"injected {op} failure")
            return [self._rng.random() < 0.5 for _ in range(n)]

    def store(
        self, keys: list[lc.ObjectKey], buffers: list[Any], checksums: list[int]
    ) -> list[bool]:
        faults = self._faults("store", len(keys))
        stored = []
        with self._lock:
            for key, buf, crc, fault in zip(keys, buffers, checksums, faults, strict=True):
                if fault:
                    stored.append(False)
                    continue
                if key in self._objects:
                    stored.append(True)
                    continue
                data = buf.tobytes()
                if not self._make_room(len(data)):
                    stored.append(False)
                    continue
                self._objects[key] = (data, crc)
                self._bytes += len(data)
                stored.append(True)
        return stored

    def _make_room(self, size: int) -> bool:
        """Drops the oldest unpinned objects until ``size`` more bytes fit. REQUIRES: _lock."""
        if self._bytes + size <= self._capacity:
            return True
        for key in list(self._objects):
            if self._pins[key] == 0:
                self._bytes -= len(self._objects.pop(key)[0])
                del self._pins[key]
                if self._bytes + size <= self._capacity:
                    return True
        return False

    def lookup_and_pin(self, keys: list[lc.ObjectKey]) -> list[bool]:
        faults = self._faults("lookup", len(keys))
        with self._lock:
            found = [not f and key in self._objects for key, f in zip(keys, faults, strict=True)]
            for key, hit in zip(keys, found, strict=True):
                if hit:
                    self._pins[key] += 1
        return found

    def load(self, keys: list[lc.ObjectKey], buffers: list[Any]) -> list[int | None]:
        faults = self._faults("load", len(keys))
        loaded: list[int | None] = []
        with self._lock:
            for key, buf, fault in zip(keys, buffers, faults, strict=True):
                entry = None if fault else self._objects.get(key)
                if entry is None or len(entry[0]) != buf.size:
                    loaded.append(None)
                    continue
                buf[:] = np.frombuffer(entry[0], dtype=np.uint8)
                loaded.append(entry[1])  # the base checks the bytes against it
        return loaded

    def unpin(self, keys: list[lc.ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                if self._pins[key] > 0:
                    self._pins[key] -= 1
                if self._pins[key] == 0:
                    del self._pins[key]


class Staller:
    """Holds a MemoryL2Adapter's operations for ``hold_s`` of every ``period_s`` until ``until``
    (a time.time() value), on its own thread; :meth:`stop` releases them and joins."""

    def __init__(
        self, adapter: lc.MemoryL2Adapter, period_s: float, hold_s: float, until: float
    ) -> None:
        self._adapter = adapter
        self._period_s = period_s
        self._hold_s = hold_s
        self._until = until
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-staller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._period_s - self._hold_s):
                if time.time() >= self._until:
                    break
                self._adapter.set_stalled(True)
                self._stop.wait(self._hold_s)
                self._adapter.set_stalled(False)
        finally:
            self._adapter.set_stalled(False)


def server_main(spec_json: str) -> int:
    """The server process: ``run_forever`` on the spec's config, with the two faulty tiers in
    front of the configured ones."""
    exit_with_parent()
    spec = json.loads(spec_json)
    config = config_module.ServerConfig.from_mapping(spec["config"])
    level = getattr(logging, config.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lc.set_core_log_level(level)
    stalled = lc.MemoryL2Adapter(capacity_bytes=int(spec["stalled_bytes"]), worker_threads=2)
    failing = FailingAdapter(int(spec["failing_bytes"]), float(spec["fail_fraction"]), spec["seed"])
    staller = Staller(stalled, spec["stall_period_s"], spec["stall_hold_s"], spec["faults_until"])
    staller.start()
    try:
        return app_module.run_forever(config, extra_l2_adapters=[stalled, failing])
    finally:
        staller.stop()


# ---------------------------------------------------------------------------------------------
# The client processes


def prompt_tokens(index: int) -> tuple[npt.NDArray[np.uint32], int]:
    """Prompt ``index`` of the pool: its token ids and its number of whole chunks."""
    chunks = 1 + (index * 7919) % MAX_CHUNKS
    tail = (index * 31) % CHUNK
    head = np.random.default_rng([1, index % GROUPS]).integers(0, 32000, CHUNK, dtype=np.uint32)
    rest = np.random.default_rng([2, index]).integers(
        0, 32000, (chunks - 1) * CHUNK + tail, dtype=np.uint32
    )
    return np.concatenate([head, rest]), chunks


def chunk_seed(index: int, chunk: int) -> int:
    """The pattern seed of a chunk: a function of its prefix (chunk 0 is its group's)."""
    if chunk == 0:
        return 1 + index % GROUPS
    return 1000 + index * MAX_CHUNKS + chunk


@dataclass
class Tally:
    """What a client did since its last report (and, in the soak, in one interval)."""

    sync_us: list[int] = field(default_factory=list)
    two_phase_us: list[int] = field(default_factory=list)
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def to_json(self) -> str:
        return json.dumps(
            {
                "sync": self.sync_us,
                "two": self.two_phase_us,
                "ops": self.ops,
                "errors": self.errors,
            },
            separators=(",", ":"),
        )

    def add_json(self, line: str) -> bool:
        """Adds a client's report line; False if it is not one (a line cut by a SIGKILL)."""
        try:
            report = json.loads(line)
            sync = [int(v) for v in report["sync"]]
            two = [int(v) for v in report["two"]]
            ops = {str(k): int(v) for k, v in report["ops"].items()}
            errors = {str(k): int(v) for k, v in report["errors"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        self.sync_us += sync
        self.two_phase_us += two
        self.ops.update(ops)
        self.errors.update(errors)
        return True


class Workload:
    """One client process's traffic (see the module docstring)."""

    def __init__(self, client: CacheClient, name: str, seed: int) -> None:
        self._client = client
        self._name = name
        self._rng = random.Random(seed)
        shape = (2, NUM_BLOCKS, BLOCK, HEADS, HEAD_SIZE)
        self._layers = [np.zeros(shape, np.uint16) for _ in range(LAYERS)]
        self._view = lc.KvCacheView(self._layers, lc.KvLayout.NHD)
        self.transfer = KvTransferClient.register(client, MODEL, 1, 0, self._view)
        per_chunk = (2, BLOCKS_PER_CHUNK, BLOCK, HEADS, HEAD_SIZE)
        self._ramp = np.arange(math.prod(per_chunk), dtype=np.uint16).reshape(per_chunk)
        self._prompts: dict[int, tuple[bytes, int]] = {}  # index -> (token bytes, chunks)
        self._requests = 0
        self.tally = Tally()

    def _pattern(self, index: int, chunk: int, layer: int) -> npt.NDArray[np.uint16]:
        offset = (chunk_seed(index, chunk) * 257 + layer * 131) & 0xFFFF
        pattern: npt.NDArray[np.uint16] = self._ramp + np.uint16(offset)  # wraps in uint16
        return pattern

    def _prompt(self, index: int) -> tuple[bytes, int]:
        if index not in self._prompts:
            tokens, chunks = prompt_tokens(index)
            self._prompts[index] = (tokens.astype("<u4").tobytes(), chunks)
        return self._prompts[index]

    def _blocks(self, chunks: int, upper: bool) -> npt.NDArray[np.int64]:
        half = NUM_BLOCKS // 2
        ids = self._rng.sample(range(half), chunks * BLOCKS_PER_CHUNK)
        return np.asarray(ids, dtype=np.int64) + (half if upper else 0)

    def run_one(self) -> None:
        """One operation; its LMCacheError (or DataMismatch) is counted, not raised."""
        op = self._rng.choices([o for o, _ in OPS], weights=[w for _, w in OPS])[0]
        index = self._rng.randrange(PROMPTS)
        tokens, chunks = self._prompt(index)
        self._requests += 1
        request_id = f"{self._name}-{self._requests}"
        key = Key(MODEL, request_id=request_id, tokens=tokens)
        self.tally.ops[op] += 1
        try:
            if op == "store":
                self._store(index, chunks, key)
            elif op == "store_abort":
                ticket = self._client.prepare_store(key)
                self._client.commit_store(ticket.handle, success=False)
            else:
                self._lookup(index, key, two_phase=op == "two_phase")
        except (LMCacheError, DataMismatch) as exc:
            self.tally.errors[type(exc).__name__] += 1
        finally:
            try:
                self._client.end_session(MODEL, request_id)
            except LMCacheError as exc:
                self.tally.errors[f"END_SESSION {type(exc).__name__}"] += 1

    def _store(self, index: int, chunks: int, key: Key) -> None:
        ids = self._blocks(chunks, upper=False)
        for c in range(chunks):
            blocks = ids[c * BLOCKS_PER_CHUNK : (c + 1) * BLOCKS_PER_CHUNK]
            for layer, tensor in enumerate(self._layers):
                tensor[:, blocks] = self._pattern(index, c, layer)
        self.transfer.store(self._view, ids, key)

    def _lookup(self, index: int, key: Key, two_phase: bool) -> None:
        t0 = time.perf_counter()
        result: LookupResult | None
        if two_phase:
            handle = self._client.lookup(key)
            result = self._client.query_prefetch_status(handle)
            for _ in range(WAIT_PREFETCH_TRIES):
                if result is not None:
                    break
                result = self._client.wait_prefetch_status(handle, WAIT_PREFETCH_S)
            if result is None:
                self.tally.errors["PrefetchNotReady"] += 1
                return  # END_SESSION drops the job
            self.tally.two_phase_us.append(round((time.perf_counter() - t0) * 1e6))
        else:
            result = self._client.sync_lookup(key)
            self.tally.sync_us.append(round((time.perf_counter() - t0) * 1e6))
        hits = result.hit_chunks
        action = self._rng.random()
        if hits == 0 or action >= 0.8:
            return  # END_SESSION releases the leases
        hit_key = key.with_range(0, hits * CHUNK)
        if action >= 0.6:
            self.tally.ops["free_lookup_locks"] += 1
            self._client.free_lookup_locks(hit_key)
            return
        self.tally.ops["retrieve"] += 1
        ids = self._blocks(hits, upper=True)
        for tensor in self._layers:
            tensor[:, ids] = 0
        self.transfer.retrieve(self._view, ids, hit_key)
        for c in range(hits):
            blocks = ids[c * BLOCKS_PER_CHUNK : (c + 1) * BLOCKS_PER_CHUNK]
            for layer, tensor in enumerate(self._layers):
                if not np.array_equal(tensor[:, blocks], self._pattern(index, c, layer)):
                    raise DataMismatch(f"prompt {index} chunk {c} layer {layer}")

    def think_s(self) -> float:
        return self._rng.uniform(0.0, THINK_MAX_S)

    def report(self) -> None:
        print(self.tally.to_json(), flush=True)
        self.tally = Tally()


def client_main(spec_json: str) -> int:
    """One client process: operations until SIGTERM or its stop time, reporting every second."""
    exit_with_parent()
    spec = json.loads(spec_json)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops its children itself
    name = str(spec["name"])
    client = CacheClient(
        spec["endpoint"], heartbeat_interval_s=CLIENT_HEARTBEAT_S, name=f"soak {name}"
    )
    try:
        work = Workload(client, name, int(spec["seed"]))
        try:
            stop_at = float(spec["stop_at"])
            next_report = time.monotonic() + REPORT_INTERVAL_S
            while not stop.is_set() and time.time() < stop_at:
                work.run_one()
                if time.monotonic() >= next_report:
                    work.report()
                    next_report = time.monotonic() + REPORT_INTERVAL_S
                stop.wait(work.think_s())
            work.report()
        finally:
            work.transfer.close()
    finally:
        client.close()
    return 0


# ---------------------------------------------------------------------------------------------
# Child processes


class Fleet(ChildProcesses):
    """The soak's child processes (:class:`harness.ChildProcesses`), by name. Each one's stdout
    lines go to one queue as (name, line), and (name, None) at its end."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.events: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        proc = self._spawn(name, argv, stdin=False)
        self.procs[name] = proc
        threading.Thread(
            target=self._pump, args=(name, proc), name=f"stdout-{name}", daemon=True
        ).start()
        return proc

    def _pump(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in proc.stdout:
                self.events.put((name, line.rstrip("\n")))
        self.events.put((name, None))

    def signal(self, name: str, signum: int) -> None:
        self.send(self.procs[name], signum)

    def reap(self, name: str, timeout_s: float) -> int | None:
        """The exit status once the child exited within ``timeout_s`` (SIGKILL after); closes
        its log."""
        return self.wait_or_kill(self.procs[name], timeout_s)


# ---------------------------------------------------------------------------------------------
# Measurements


def rss_mib(pid: int) -> dict[str, float]:
    """VmRSS and its RssAnon / RssShmem / RssFile parts of a process, MiB (empty if gone)."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def pct_ms(values_us: Sequence[int], q: float) -> float:
    return float(np.percentile(np.asarray(values_us), q)) / 1e3 if values_us else math.nan


def answered_requests(status: dict[str, Any]) -> int:
    """Requests the server answered so far (every type and outcome), from a STATUS reply."""
    counts: dict[str, dict[str, int]] = status.get("server", {}).get("requests", {})
    return sum(sum(outcomes.values()) for outcomes in counts.values())


def outstanding(status: dict[str, Any]) -> dict[str, int]:
    """What must be 0 once every client is gone and reaped (``clients`` counts the soak's own
    STATUS connection out)."""
    engine, l1, prefetch = status["engine"], status["l1"], status["prefetch"]
    server = status["server"]
    return {
        "read leases (l1.read_leases)": int(l1["read_leases"]),
        "write leases (l1.write_leases)": int(l1["write_leases"]),
        "leased objects (l1.leased_objects)": int(l1["leased_objects"]),
        "objects being written (l1.writing)": int(l1["writing"]),
        "table request ids (l1.requests)": int(l1["requests"]),
        "quarantined extents (l1.quarantined)": int(l1["quarantined"]),
        "prefetch jobs (prefetch.jobs)": int(prefetch["jobs"]),
        "prefetches running (prefetch.in_flight)": int(prefetch["in_flight"]),
        "prefetches queued (prefetch.queued)": int(prefetch["queued"]),
        "pending two-phase lookups (engine.pending_lookups)": int(engine["pending_lookups"]),
        "transfer tickets (engine.transfers)": int(engine["transfers"]),
        "fenced stores (engine.fenced_stores)": int(engine["fenced_stores"]),
        "hashing sessions (engine.sessions)": int(engine["sessions"]),
        "request ids (engine.requests)": int(engine["requests"]),
        "registrations (engine.registrations)": int(engine["registrations"]),
        "server pool jobs (server.pool_jobs)": int(server["pool_jobs"]),
        "parked waits (server.parked_waits)": int(server["parked_waits"]),
        "other clients (server.clients - 1)": int(server["clients"]) - 1,
        "L2 pins (sum of l2[].pins)": sum(int(a.get("pins", 0)) for a in status.get("l2", [])),
        "held per client (requests, sessions, jobs, tickets in STATUS clients)": sum(
            int(u.get(k, 0))
            for u in status.get("clients", [])
            for k in ("requests", "sessions", "jobs", "tickets", "reserved_bytes")
        ),
    }


# ---------------------------------------------------------------------------------------------
# The soak


@dataclass
class Slot:
    """One of the client positions: the process now in it and when the soak kills it."""

    index: int
    killable: bool
    generation: int = 0
    name: str = ""
    kill_at: float = math.inf  # time.monotonic()
    killed: bool = False  # the soak sent SIGKILL to the current process
    stopping: bool = False  # the soak sent SIGTERM (the traffic is over)
    running: bool = False


@dataclass
class Totals:
    tally: Tally = field(default_factory=Tally)
    kills: int = 0
    starts: int = 0
    crashes: list[str] = field(default_factory=list)  # name: status, for clients that exited
    unstoppable: list[str] = field(default_factory=list)
    bad_lines: int = 0


class Soak:
    def __init__(self, args: argparse.Namespace, fleet: Fleet) -> None:
        self.args = args
        self.fleet = fleet
        self.rng = random.Random(args.seed)
        self.endpoint = f"ipc://{fleet.workdir}/s.sock"
        self.seconds = args.minutes * 60.0
        self.t0 = 0.0
        self.stop_at_wall = 0.0
        self.slots = [Slot(i, killable=i % 2 == 1) for i in range(args.clients)]
        self.by_name: dict[str, Slot] = {}
        self.totals = Totals()
        self.interval = Tally()
        self.interval_kills = 0
        self.server: subprocess.Popen[str] | None = None
        self.status_client: CacheClient | None = None
        self.last_requests = 0
        self.last_mark = 0.0
        self.rss_samples: list[tuple[float, float]] = []  # (seconds since start, VmRSS MiB)

    # -- children ------------------------------------------------------------------------------

    def start_server(self) -> None:
        config = {
            "endpoint": self.endpoint,
            "l1_size_gb": L1_GB,
            "chunk_size": CHUNK,
            "hugepages": "off",
            "worker_threads": 4,
            "heartbeat_grace_s": HEARTBEAT_GRACE_S,
            "request_ttl_s": REQUEST_TTL_S,
            "session_ttl_s": REQUEST_TTL_S,
            "reap_interval_s": REAP_INTERVAL_S,
            "log_level": "WARNING",
            "l2_adapters": [
                {
                    "type": "fs",
                    "path": str(self.fleet.workdir / "l2"),
                    "capacity_gb": FS_GB,
                    "io_threads": 2,
                }
            ],
        }
        spec = {
            "config": config,
            "stalled_bytes": STALLED_BYTES,
            "failing_bytes": FAILING_BYTES,
            "fail_fraction": FAIL_FRACTION,
            "stall_period_s": STALL_PERIOD_S,
            "stall_hold_s": STALL_HOLD_S,
            "faults_until": self.stop_at_wall,
            "seed": self.args.seed,
        }
        argv = [sys.executable, __file__, "--_server", json.dumps(spec)]
        self.server = self.fleet.start("server", argv)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                name, line = self.fleet.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SoakError(f"server: not ready in {READY_TIMEOUT_S:.0f} s") from None
            if line is None:
                raise SoakError(f"server: exited with status {self.fleet.reap(name, 5.0)}")
            if line.startswith("READY "):
                return
            raise SoakError(f"server: expected 'READY <endpoint>', got {line!r}")

    def start_client(self, slot: Slot) -> None:
        slot.generation += 1
        slot.name = f"client{slot.index}.{slot.generation}"
        slot.killed = slot.stopping = False
        spec = {
            "endpoint": self.endpoint,
            "name": slot.name,
            "seed": self.rng.randrange(1 << 30),
            "stop_at": self.stop_at_wall,
        }
        self.fleet.start(slot.name, [sys.executable, __file__, "--_client", json.dumps(spec)])
        slot.running = True
        self.by_name[slot.name] = slot
        self.totals.starts += 1
        now = time.monotonic()
        slot.kill_at = now + self.rng.uniform(*KILL_LIFE_S) if slot.killable else math.inf

    def on_exit(self, slot: Slot) -> None:
        """The slot's process closed its stdout: reap it; restart it unless the traffic is over."""
        status = self.fleet.reap(slot.name, 10.0)
        slot.running = False
        if not slot.killed and not slot.stopping and status != 0:
            self.totals.crashes.append(f"{slot.name}: exit status {status}")
            tail = self.fleet.log_tail(slot.name, 15)
            print(f"  !! {slot.name} exited with status {status}:\n{tail}", flush=True)
        if not slot.stopping and time.monotonic() < self.t0 + self.seconds:
            self.start_client(slot)

    # -- the traffic ---------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self.t0 = time.monotonic()
        self.stop_at_wall = time.time() + self.seconds
        print(
            f"soak: {args.minutes:g} min, {args.clients} client processes "
            f"({sum(s.killable for s in self.slots)} killed with SIGKILL every "
            f"{KILL_LIFE_S[0]:.0f}-{KILL_LIFE_S[1]:.0f} s and restarted), one server process"
        )
        print(machine_line())
        print(
            f"server: L1 {L1_GB * 1024:.0f} MiB, {CHUNK}-token chunks of "
            f"{LAYERS * 2 * CHUNK * HEADS * HEAD_SIZE * 2 // 1024} KiB; L2: stalled memory "
            f"{STALLED_BYTES >> 20} MiB (held {STALL_HOLD_S:g} s of every {STALL_PERIOD_S:g} s), "
            f"failing python {FAILING_BYTES >> 20} MiB ({FAIL_FRACTION:.0%} of calls fail), fs "
            f"{FS_GB * 1024:.0f} MiB; heartbeat grace {HEARTBEAT_GRACE_S:g} s, request/session "
            f"TTL {REQUEST_TTL_S:g} s"
        )
        self.start_server()
        assert self.server is not None
        print(f"server pid {self.server.pid}, {self.endpoint}, logs in {self.fleet.workdir}")
        self.status_client = CacheClient(
            self.endpoint, heartbeat_interval_s=CLIENT_HEARTBEAT_S, name="soak status"
        )
        self.last_requests = answered_requests(self.status_client.status())
        for slot in self.slots:
            self.start_client(slot)
        self.last_mark = self.t0
        self.traffic()
        final_rss = self.mark("end")
        self.stop_clients()
        drained, drain_s, status = self.drain()
        return self.verdict(final_rss, drained, drain_s, status)

    def traffic(self) -> None:
        end = self.t0 + self.seconds
        next_minute = self.t0 + 60.0
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if now >= next_minute:
                self.mark(f"{round((now - self.t0) / 60):d}:00")
                next_minute += 60.0
                continue
            for slot in self.slots:
                if slot.running and not slot.killed and now >= slot.kill_at:
                    self.fleet.signal(slot.name, signal.SIGKILL)
                    slot.killed = True
                    self.totals.kills += 1
                    self.interval_kills += 1
            wake = min([end, next_minute] + [s.kill_at for s in self.slots if not s.killed])
            try:
                name, line = self.fleet.events.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                continue
            self.handle(name, line)

    def handle(self, name: str, line: str | None) -> None:
        if name == "server":
            if line is None:
                status = self.fleet.reap("server", 5.0)
                raise SoakError(f"the server exited during the soak (status {status})")
            return
        slot = self.by_name[name]
        if line is None:
            if slot.name == name:
                self.on_exit(slot)
            return
        if not self.interval.add_json(line):
            self.totals.bad_lines += 1

    def mark(self, label: str) -> float:
        """Prints the interval since the last mark and starts a new one; returns VmRSS MiB."""
        now = time.monotonic()
        assert self.server is not None and self.status_client is not None
        rss = rss_mib(self.server.pid)
        vm = rss.get("VmRSS", math.nan)
        self.rss_samples.append((now - self.t0, vm))
        requests = answered_requests(self.status_client.status())
        rate = (requests - self.last_requests) / max(now - self.last_mark, 1e-9)
        tally = self.interval
        errors = ", ".join(f"{k} {v}" for k, v in tally.errors.most_common()) or "none"
        print(
            f"[{label:>5}] rss {vm:.1f} MiB (anon {rss.get('RssAnon', math.nan):.1f}, shmem "
            f"{rss.get('RssShmem', math.nan):.1f}, file {rss.get('RssFile', math.nan):.1f}) | "
            f"{rate:.0f} req/s | sync lookup p50 {pct_ms(tally.sync_us, 50):.2f} ms p99 "
            f"{pct_ms(tally.sync_us, 99):.2f} ms (n {len(tally.sync_us)}) | two-phase p50 "
            f"{pct_ms(tally.two_phase_us, 50):.2f} ms p99 {pct_ms(tally.two_phase_us, 99):.2f} "
            f"ms (n {len(tally.two_phase_us)}) | kills {self.interval_kills}\n"
            f"        ops: {', '.join(f'{k} {v}' for k, v in sorted(tally.ops.items()))}\n"
            f"        client errors: {errors}",
            flush=True,
        )
        self.totals.tally.sync_us += tally.sync_us
        self.totals.tally.two_phase_us += tally.two_phase_us
        self.totals.tally.ops.update(tally.ops)
        self.totals.tally.errors.update(tally.errors)
        self.interval = Tally()
        self.interval_kills = 0
        self.last_requests = requests
        self.last_mark = now
        return vm

    def stop_clients(self) -> None:
        """SIGTERM to every client; waits for their last reports and exits."""
        for slot in self.slots:
            slot.stopping = True
            if slot.running:
                self.fleet.signal(slot.name, signal.SIGTERM)
        deadline = time.monotonic() + CLIENT_STOP_S
        while any(s.running for s in self.slots):
            try:
                name, line = self.fleet.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.handle(name, line)
        for slot in self.slots:
            if slot.running:
                self.totals.unstoppable.append(slot.name)
                self.fleet.reap(slot.name, 0.0)
                slot.running = False
        late = self.interval  # the clients' last reports, after the last mark
        self.totals.tally.sync_us += late.sync_us
        self.totals.tally.two_phase_us += late.two_phase_us
        self.totals.tally.ops.update(late.ops)
        self.totals.tally.errors.update(late.errors)
        if late.errors:
            print(f"        client errors while stopping: {dict(late.errors)}")

    def drain(self) -> tuple[bool, float, dict[str, Any]]:
        """Polls STATUS until every outstanding counter is 0 or DRAIN_TIMEOUT_S passes."""
        assert self.status_client is not None
        start = time.monotonic()
        stop = threading.Event()
        while True:
            status = self.status_client.status()
            if not any(outstanding(status).values()):
                return True, time.monotonic() - start, status
            if time.monotonic() - start >= DRAIN_TIMEOUT_S:
                return False, time.monotonic() - start, status
            stop.wait(REAP_INTERVAL_S)

    # -- the verdict ---------------------------------------------------------------------------

    def verdict(
        self, final_rss: float, drained: bool, drain_s: float, status: dict[str, Any]
    ) -> int:
        totals = self.totals
        failures: list[str] = []
        print()
        print(
            f"clients: {totals.starts} processes started, {totals.kills} killed with SIGKILL, "
            f"{len(totals.crashes)} exited by themselves, {len(totals.unstoppable)} did not stop "
            f"on SIGTERM; {totals.bad_lines} report lines cut off by a kill"
        )
        tally = totals.tally
        print(f"operations: {', '.join(f'{k} {v}' for k, v in sorted(tally.ops.items()))}")
        errors = ", ".join(f"{k} {v}" for k, v in tally.errors.most_common()) or "none"
        print(f"client errors: {errors}")
        print(
            f"lookups over the run: sync p50 {pct_ms(tally.sync_us, 50):.2f} ms p99 "
            f"{pct_ms(tally.sync_us, 99):.2f} ms (n {len(tally.sync_us)}); two-phase p50 "
            f"{pct_ms(tally.two_phase_us, 50):.2f} ms p99 {pct_ms(tally.two_phase_us, 99):.2f} ms "
            f"(n {len(tally.two_phase_us)})"
        )
        server_errors = {
            f"{name}/{outcome}": n
            for name, outcomes in status["server"]["requests"].items()
            for outcome, n in outcomes.items()
            if outcome != "ok"
        }
        print(f"server error replies: {server_errors or 'none'}")
        engine, store, prefetch = status["engine"], status["store"], status["prefetch"]
        print(
            f"engine: {engine['ended_clients']} clients ended, {engine['reaped_requests']} "
            f"request ids and {engine['reaped_transfers']} tickets reaped, "
            f"{engine['retrieve_failures']} retrieve failures, {engine['store_expired']} expired "
            f"stores; store: {store['stored']} stored to L2, {store['failed']} failed; "
            f"prefetch: {prefetch['load_failures']} load failures, "
            f"{prefetch['l2_lookup_timeouts']} L2 lookup timeouts"
        )
        for name, adapter in zip(L2_TIERS, status.get("l2", []), strict=False):
            fields = ("objects", "stores", "store_failures", "lookups", "loads", "load_misses")
            print(f"  l2 {name}: " + ", ".join(f"{k} {adapter.get(k, '?')}" for k in fields))

        counts = outstanding(status)
        print()
        print(
            f"end state, {drain_s:.1f} s after the last client stopped "
            f"({'all 0' if drained else f'not all 0 after {DRAIN_TIMEOUT_S:.0f} s'}):"
        )
        for name, value in counts.items():
            print(f"  {name:<52} {value}")
        if not drained:
            failures.append(
                "outstanding: " + ", ".join(f"{k} = {v}" for k, v in counts.items() if v)
            )

        mismatches = tally.errors.get("DataMismatch", 0)
        if mismatches:
            failures.append(f"{mismatches} retrieves returned bytes other than the stored ones")
        if totals.crashes:
            failures.append(f"clients exited by themselves: {'; '.join(totals.crashes)}")
        if totals.unstoppable:
            failures.append(f"clients did not stop on SIGTERM: {', '.join(totals.unstoppable)}")

        base = next((rss for t, rss in self.rss_samples if t >= 59.0), None)
        enforced = self.args.minutes >= RSS_ENFORCED_MINUTES
        print()
        print(
            "server RSS (MiB): "
            + ", ".join(f"{t / 60:.1f} min {v:.1f}" for t, v in self.rss_samples)
        )
        if base is None:
            print("RSS growth after the first minute: not measured (the run is under 1 minute)")
        else:
            growth = (final_rss - base) / base
            line = (
                f"RSS growth after the first minute: {base:.1f} -> {final_rss:.1f} MiB, "
                f"{growth:+.1%} (target <= +{RSS_GROWTH_LIMIT:.0%}"
            )
            if not enforced:
                line += f", not enforced under {RSS_ENFORCED_MINUTES:g} minutes"
            print(line + ")")
            if enforced and growth > RSS_GROWTH_LIMIT:
                failures.append(f"server RSS grew {growth:+.1%} after the first minute")

        assert self.status_client is not None
        self.status_client.close()
        self.status_client = None
        self.fleet.signal("server", signal.SIGTERM)
        server_status = self.fleet.reap("server", 30.0)
        if server_status != 0:
            failures.append(f"the server exited with status {server_status} on SIGTERM")
        logged = server_log_summary(self.fleet.workdir / "server.log")
        print(f"server log: {logged}")

        print()
        if failures:
            for failure in failures:
                print(f"FAILED: {failure}")
            return 1
        print("soak: all targets met")
        return 0


_LOG_RECORD: Final = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")


def server_log_summary(path: Path) -> str:
    """The server log's records by level, those caused by an injected fault counted apart, and
    the first lines of the first few other records at WARNING or above."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "unreadable"
    records: list[tuple[str, list[str]]] = []  # (level, lines); a traceback joins its record
    for line in text.splitlines():
        match = _LOG_RECORD.match(line)
        if match is not None:
            records.append((match.group(1), [line]))
        elif records:
            records[-1][1].append(line)
        elif line.strip():
            records.append(("unformatted", [line]))
    levels: collections.Counter[str] = collections.Counter()
    injected: collections.Counter[str] = collections.Counter()
    notable: list[str] = []
    for level, lines in records:
        levels[level] += 1
        if any(InjectedFault.__name__ in line for line in lines):
            injected[level] += 1
        elif level not in ("DEBUG", "INFO") and len(notable) < 5:
            notable.append(lines[0])
    if not levels:
        return "empty"
    parts = []
    for level, n in levels.most_common():
        part = f"{level} {n}"
        if injected[level]:
            part += f" ({injected[level]} of them from injected faults)"
        parts.append(part)
    return ", ".join(parts) + "".join(f"\n  {line}" for line in notable)


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {os.cpu_count()} cores ({cores} usable), Python {platform.python_version()}, "
        f"numpy {np.__version__}, lmcache_cpp {getattr(lc, '__version__', '?')}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak test of the lmcache_cpp server (see the module docstring). One server "
        "process (64 MiB L1 arena; L2: a stalled memory tier, a failing Python tier, a file-system "
        "tier in a temporary directory) under mixed traffic from client processes over ipc://: "
        "SYNC_LOOKUP, LOOKUP + QUERY/WAIT_PREFETCH_STATUS, stores and retrieves through "
        "KvTransferClient (retrieved bytes checked), FREE_LOOKUP_LOCKS, END_SESSION; every second "
        "client is killed with SIGKILL at random times and restarted. Prints the server's RSS, "
        "lookup p50/p99, requests/s and client errors by type every minute and at the end. Then "
        f"stops the clients, waits up to {DRAIN_TIMEOUT_S:.0f} s for the server to reap what "
        "they held and prints its outstanding counters (leases, jobs, tickets, fenced stores, "
        "sessions, request ids, ...). "
        "Exit status 1 if a counter stays above 0, a retrieved byte was wrong, a client exited by "
        "itself, the server did not exit 0 on SIGTERM, or (only with --minutes >= 3) the RSS at "
        "the end is more than 5% above the RSS after the first minute. Takes the given minutes "
        "plus about 10-40 s. Child processes are stopped on exit, failure, Ctrl-C and SIGTERM.",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=3.0,
        help="how long the traffic runs; fractions allowed, e.g. 0.5 for 30 s (default: 3)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=8,
        help="client processes running at a time; the odd-numbered ones are killed and "
        "restarted (default: 8)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the operations, the kill times and the injected failures; thread timing "
        "still varies between runs (default: 1)",
    )
    parser.add_argument("--_server", dest="server_spec", help=argparse.SUPPRESS)
    parser.add_argument("--_client", dest="client_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error("--minutes must be a positive number")
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    role = child_role(args, {"server_spec": server_main, "client_spec": client_main})
    if role is not None:
        return role
    started = time.monotonic()

    def soak(fleet: Fleet) -> int:
        run = Soak(args, fleet)
        try:
            return run.run()
        finally:
            if run.status_client is not None:
                run.status_client.close()

    try:
        return run_benchmark("soak", Fleet, soak, errors=(SoakError, LMCacheError))
    finally:
        print(f"soak: {time.monotonic() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    sys.exit(main())
