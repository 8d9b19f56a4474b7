"""``lmcache-cpp demo``: a cache server and a synthetic engine playing a workload against it.

The demo starts ``lmcache-cpp serve`` as a child process, with an ipc:// endpoint and a
file-system L2, both in a temporary directory. It then acts as one engine with two roles:

* a scheduler: it uses SYNC_LOOKUP, or LOOKUP plus WAIT_PREFETCH_STATUS, and END_SESSION;
* a worker: it registers its KV layout, maps the server's arena, and stores and retrieves
  its blocks with the C++ copy kernels.

Everything goes through the real protocol and the shared arena. The steps are:

1. Stores every chunk of N prompts. The prompts share a common prefix, so some stores are
   skipped because the objects are already present.
2. Looks every prompt up and retrieves it into other blocks, served from L1, and checks the
   bytes.
3. Waits until the server has written everything to L2, then flushes L1 (CLEAR).
4. Looks the prompts up again and retrieves them, served from L2, and checks the bytes.
5. Looks up a prompt that diverges after k chunks: exactly k chunks hit.

It ends with a summary and the server's own STATUS. The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from lmcache_cpp import _core
from lmcache_cpp.cli.console import Progress, Report
from lmcache_cpp.cli.status import format_status
from lmcache_cpp.client import CacheClient, Key, KvTransferClient

__all__ = ["DemoOptions", "add_demo_arguments", "run_demo"]

_MODEL = "lmcache-demo"
_VOCAB = 32000
_BLOCK = 16


@dataclass
class DemoOptions:
    prompts: int = 6
    chunks: int = 8  # chunks per prompt
    shared_chunks: int = 2  # leading chunks every prompt shares
    chunk_size: int = 256
    layers: int = 8
    heads: int = 8
    head_size: int = 64
    seed: int = 0
    progress: bool = False
    keep: bool = False
    workdir: str | None = None


def _label(text: str) -> str:
    return f"{text:<28}"  # the demo's bars line up


class _ServerProcess:
    """``lmcache-cpp serve`` in a child process; terminated by :meth:`stop`."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_cpp", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.endpoint = ""
        self._log_path = log_path

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc.stdout is not None
        line: list[str] = []

        def _read(out: IO[str]) -> None:
            line.append(out.readline())

        reader = threading.Thread(target=_read, args=(self.proc.stdout,), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].startswith("READY "):
            self.stop()
            raise RuntimeError(
                f"the server did not start within {timeout_s:.0f} s; its log:\n"
                + self._log_path.read_text()[-4000:]
            )
        self.endpoint = line[0].split(" ", 1)[1].strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def _workdir(options: DemoOptions) -> Iterator[Path]:
    if options.workdir is not None:
        path = Path(options.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = tempfile.TemporaryDirectory(prefix="lmcache-demo-")
    try:
        yield Path(tmp.name)
    finally:
        if options.keep:
            print(f"demo: kept {tmp.name}", file=sys.stderr)
        else:
            tmp.cleanup()


def _prompts(options: DemoOptions) -> list[npt.NDArray[np.uint32]]:
    rng = np.random.default_rng(options.seed)
    n = options.chunks * options.chunk_size
    shared = rng.integers(0, _VOCAB, options.shared_chunks * options.chunk_size, dtype=np.uint32)
    out = []
    for _ in range(options.prompts):
        rest = rng.integers(0, _VOCAB, n - shared.size, dtype=np.uint32)
        out.append(np.concatenate([shared, rest]))
    return out


def _wait_for_l2(client: CacheClient, objects: int, timeout_s: float) -> dict[str, Any]:
    """Waits (bounded, STATUS every 50 ms) until the server's L2 holds `objects` objects and its
    store queue is empty."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        l2 = status.get("l2", [])
        store = status.get("store", {})
        if (
            l2
            and int(l2[0].get("objects", 0)) >= objects
            and int(store.get("queued", 0)) == 0
            and int(store.get("in_flight_batches", 0)) == 0
        ):
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"L2 did not reach {objects} objects within {timeout_s:.0f} s")
        time.sleep(0.05)


def _leases(status: dict[str, Any]) -> int:
    return int(status["l1"]["read_leases"]) + int(status["l1"]["write_leases"])


def _settled(client: CacheClient, timeout_s: float) -> dict[str, Any]:
    """STATUS once no lease is held, or the last one after ``timeout_s`` (STATUS every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    status = client.status()
    while _leases(status) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        status = client.status()
    return status


def run_demo(options: DemoOptions, out: IO[str] = sys.stdout) -> int:
    if options.chunk_size % _BLOCK != 0:
        print(f"demo: --chunk-size must be a multiple of {_BLOCK}", file=sys.stderr)
        return 2
    if not 0 <= options.shared_chunks < options.chunks or options.prompts < 1:
        print("demo: need --prompts >= 1 and 0 <= --shared-chunks < --chunks", file=sys.stderr)
        return 2
    blocks_per_chunk = options.chunk_size // _BLOCK
    blocks_per_prompt = options.chunks * blocks_per_chunk
    # Region A holds what the engine computed; region B receives retrieves.
    num_blocks = 2 * options.prompts * blocks_per_prompt
    bytes_per_chunk = (
        2 * options.layers * options.chunk_size * options.heads * options.head_size * 2
    )
    total_chunks = options.prompts * options.chunks
    l1_bytes = max(total_chunks * bytes_per_chunk * 2, 64 << 20)
    report = Report()

    with _workdir(options) as work:
        l2_dir = work / "l2"
        server = _ServerProcess(
            [
                "--endpoint",
                f"ipc://{work / 'server.sock'}",
                "--l1-size-gb",
                f"{l1_bytes / 2**30:.4f}",
                "--chunk-size",
                str(options.chunk_size),
                "--l2-adapter",
                json.dumps({"type": "fs", "path": str(l2_dir)}),
                "--log-level",
                "WARNING",
            ],
            work / "server.log",
        )
        try:
            server.wait_ready(120.0)
            print(
                f"server      {server.endpoint} (pid {server.proc.pid}), L2 in {l2_dir}", file=out
            )
            rc = _play(options, server.endpoint, num_blocks, report, out)
        finally:
            code = server.stop()
            report.check(code == 0, f"the server exited with status {code} on SIGTERM")
        if rc != 0:
            return rc

    print("", file=out)
    print("summary", file=out)
    for name, value in report.rows:
        print(f"  {name:<34} {value}", file=out)
    for failure in report.failures:
        print(f"demo: check failed: {failure}", file=sys.stderr)
    print(f"  {'result':<34} {'FAILED' if report.failures else 'OK'}", file=out)
    return 1 if report.failures else 0


def _play(
    options: DemoOptions, endpoint: str, num_blocks: int, report: Report, out: IO[str]
) -> int:
    rng = np.random.default_rng(options.seed + 1)
    shape = (2, num_blocks, _BLOCK, options.heads, options.head_size)
    layers = [rng.integers(0, 1 << 16, shape, dtype=np.uint16) for _ in range(options.layers)]
    kv = _core.KvCacheView(layers, _core.KvLayout.NHD)
    blocks_per_prompt = options.chunks * options.chunk_size // _BLOCK
    half = num_blocks // 2
    prompts = _prompts(options)
    src = [
        np.arange(i * blocks_per_prompt, (i + 1) * blocks_per_prompt) for i in range(len(prompts))
    ]
    dst = [half + ids for ids in src]
    chunk_bytes = kv.object_bytes(options.chunk_size)
    # Equal tokens give equal KV: the shared leading chunks hold the same bytes in every prompt.
    shared_blocks = options.shared_chunks * options.chunk_size // _BLOCK
    for ids in src[1:]:
        for layer in layers:
            layer[:, ids[:shared_blocks]] = layer[:, src[0][:shared_blocks]]

    def key(i: int, request: str, tokens: npt.NDArray[np.uint32] | None = None) -> Key:
        return Key(_MODEL, request_id=request, tokens=prompts[i] if tokens is None else tokens)

    def same(a_ids: npt.NDArray[Any], b_ids: npt.NDArray[Any]) -> bool:
        return all(np.array_equal(layer[:, a_ids], layer[:, b_ids]) for layer in layers)

    with (
        CacheClient(endpoint, name="demo-scheduler") as scheduler,
        CacheClient(endpoint, name="demo-worker") as worker_client,
        KvTransferClient.register(worker_client, _MODEL, 1, 0, kv) as worker,
    ):
        # 1. Store.
        bar = Progress(_label("storing prompts"), len(prompts), options.progress)
        t0 = time.perf_counter()
        published = 0
        for i, ids in enumerate(src):
            published += worker.store(kv, ids, Key(_MODEL, worker_id=0, tokens=prompts[i]))
            bar.advance()
        store_s = time.perf_counter() - t0
        bar.close()
        distinct = options.shared_chunks + len(prompts) * (options.chunks - options.shared_chunks)
        report.check(published == distinct, f"stored {published} chunks, expected {distinct}")
        report.add(
            "stored (distinct chunks)",
            f"{published} x {chunk_bytes / 2**20:.1f} MiB in {store_s * 1e3:.0f} ms "
            f"({published * chunk_bytes / store_s / 1e9:.2f} GB/s)",
        )

        # 2. Sync lookups served from L1, retrieve into region B, compare.
        def serve_all(tag: str, two_phase: bool) -> tuple[int, int, int, float]:
            for ids in dst:
                for layer in layers:
                    layer[:, ids] = 0
            bar = Progress(_label(f"lookup + retrieve ({tag})"), len(prompts), options.progress)
            hits = l1 = l2 = 0
            seconds = 0.0
            for i in range(len(prompts)):
                t0 = time.perf_counter()
                request = f"{tag}-{i}"
                if two_phase:
                    handle = scheduler.lookup(key(i, request))
                    result = scheduler.wait_prefetch_status(handle, timeout_s=30.0)
                    assert result is not None, "prefetch did not finish in 30 s"
                else:
                    result = scheduler.sync_lookup(key(i, request))
                hits += result.hit_chunks
                l1 += result.l1_chunks
                l2 += result.l2_chunks
                worker.retrieve(
                    kv, dst[i], Key(_MODEL, worker_id=0, request_id=request, tokens=prompts[i])
                )
                scheduler.end_session(_MODEL, request)
                seconds += time.perf_counter() - t0
                report.check(same(src[i], dst[i]), f"{tag}: prompt {i} came back different")
                bar.advance()
            bar.close()
            return hits, l1, l2, seconds

        total = len(prompts) * options.chunks
        hits, l1, l2, secs = serve_all("l1", two_phase=False)
        report.check(hits == total and l1 == total, f"L1 pass: {hits} hits ({l1} from L1)")
        report.add(
            "pass 1: SYNC_LOOKUP, served from L1",
            f"{hits}/{total} chunks hit ({l1} L1, {l2} L2), bytes verified, "
            f"{total * chunk_bytes / secs / 1e9:.2f} GB/s (lookup + retrieve)",
        )

        # 3. Let the server finish writing L2, then flush L1.
        bar = Progress(_label("waiting for L2 writes"), 1, options.progress)
        _wait_for_l2(scheduler, published, 120.0)
        bar.advance()
        bar.close()
        removed = scheduler.clear()
        status = scheduler.status()
        report.check(int(status["l1"]["objects"]) == 0, "L1 was not empty after CLEAR")
        report.add(
            "L1 flushed (CLEAR)",
            f"{removed} objects removed; L2 holds {status['l2'][0]['objects']} objects",
        )

        # 4. Two-phase lookups served from L2.
        hits, l1, l2, secs = serve_all("l2", two_phase=True)
        report.check(hits == total and l2 == total, f"L2 pass: {hits} hits ({l2} from L2)")
        report.add(
            "pass 2: LOOKUP + WAIT, served from L2",
            f"{hits}/{total} chunks hit ({l1} L1, {l2} L2), bytes verified, "
            f"{total * chunk_bytes / secs / 1e9:.2f} GB/s incl. L2 reads",
        )

        # 5. A prompt that diverges after k chunks hits exactly k.
        k = max(1, options.chunks // 2)
        diverged = prompts[0].copy()
        diverged[k * options.chunk_size] ^= 1
        result = scheduler.sync_lookup(key(0, "diverged", diverged))
        scheduler.end_session(_MODEL, "diverged")
        report.check(result.hit_chunks == k, f"diverged prompt hit {result.hit_chunks} != {k}")
        report.add("prompt diverging after chunk k", f"k = {k}: {result.hit_chunks} chunks hit")

        # The sync lookup started the diverged prompt's L2 load, and END_SESSION does not wait
        # for it: the load's leases go when it completes. One still held after that is a leak.
        status = _settled(scheduler, 10.0)
        leases = _leases(status)
        report.check(leases == 0, f"{leases} leases outstanding after every session ended")
        print("", file=out)
        print("server STATUS", file=out)
        print(format_status(status), file=out)
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoOptions()
    parser.add_argument(
        "--prompts", type=int, default=d.prompts, help=f"prompts to play (default: {d.prompts})"
    )
    parser.add_argument(
        "--chunks", type=int, default=d.chunks, help=f"chunks per prompt (default: {d.chunks})"
    )
    parser.add_argument(
        "--shared-chunks",
        type=int,
        default=d.shared_chunks,
        help=f"leading chunks all prompts share (default: {d.shared_chunks})",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=d.chunk_size,
        help=f"tokens per chunk (default: {d.chunk_size})",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=d.layers,
        help=f"layers of the synthetic KV cache (default: {d.layers})",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    parser.add_argument(
        "--workdir",
        default=None,
        help="directory for the socket, the L2 files and the server log "
        "(default: a temporary directory, removed afterwards)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (default: removed)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    return DemoOptions(
        prompts=args.prompts,
        chunks=args.chunks,
        shared_chunks=args.shared_chunks,
        chunk_size=args.chunk_size,
        layers=args.layers,
        seed=args.seed,
        progress=args.progress if args.progress is not None else sys.stderr.isatty(),
        keep=args.keep,
        workdir=args.workdir,
    )
