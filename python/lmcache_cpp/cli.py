"""The ``lmcache-cpp`` command line.

Subcommands:

* ``serve``: the cache server (``lmcache_cpp.app``), configured by flags and a config file
  (``lmcache_cpp.config``).
* ``demo``: starts a server in a child process and plays an engine workload against it
  (``lmcache_cpp.demo``).
* ``status``: asks a running server what it holds and does.
* ``info``: version and how the native core was built.
* ``l1-demo``: an in-process walk through the L1 core alone (hashing, shared-memory arena,
  object table, leases, eviction), without a server.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

import lmcache_cpp
from lmcache_cpp import _core

_log = logging.getLogger(__name__)

_KIB = 1024
_MIB = 1024 * 1024
_VOCAB = 32000
_DEMO_CLIENT = 1
_LOOKUP_REQUEST_BASE = 1_000_000
_FILL_REQUEST_BASE = 2_000_000


# ---------------------------------------------------------------------------------------------
# Progress bar


class _Progress:
    """A one-line progress bar on a stream (stderr); silent when disabled."""

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self._label = label
        self._total = max(total, 1)
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._last_drawn = -1

    def advance(self, n: int = 1) -> None:
        self._done = min(self._done + n, self._total)
        if not self._enabled:
            return
        percent = self._done * 100 // self._total
        if percent != self._last_drawn:
            self._last_drawn = percent
            self._draw(percent)

    def _draw(self, percent: int) -> None:
        width = 30
        filled = width * self._done // self._total
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:3d}% {self._done}/{self._total}")
        self._stream.flush()

    def close(self) -> None:
        if self._enabled:
            self._draw(self._done * 100 // self._total)
            self._stream.write("\n")
            self._stream.flush()


# ---------------------------------------------------------------------------------------------
# info


def _cmd_info(args: argparse.Namespace) -> int:
    info = dict(lmcache_cpp.build_info())
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    info["native_module"] = str(_core.__file__)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"lmcache_cpp {lmcache_cpp.__version__}")
    width = max(len(k) for k in info)
    for key in sorted(info):
        value = info[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"  {key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# l1-demo


@dataclass
class _Prompt:
    request: int
    tokens: npt.NDArray[np.uint32]
    keys: list[lmcache_cpp.ObjectKey] = field(default_factory=list)


@dataclass
class _DemoReport:
    failures: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line)


def _pattern(key: lmcache_cpp.ObjectKey) -> npt.NDArray[np.uint8]:
    """The demo's object bytes are the key's chunk hash, repeated (so every object differs)."""
    return np.frombuffer(key.chunk.bytes, dtype=np.uint8)


def _fill(view: npt.NDArray[np.uint8], key: lmcache_cpp.ObjectKey) -> None:
    # Object sizes are whole KiB, so the 32-byte pattern tiles them exactly; the broadcast
    # assignment writes straight into the arena.
    view.reshape(-1, lmcache_cpp.CHUNK_HASH_SIZE)[:] = _pattern(key)


def _holds(view: npt.NDArray[np.uint8], key: lmcache_cpp.ObjectKey) -> bool:
    return bool((view.reshape(-1, lmcache_cpp.CHUNK_HASH_SIZE) == _pattern(key)).all())


def _rate(nbytes: int, seconds: float) -> str:
    if seconds <= 0:
        return "n/a"
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def _us(seconds: float, n: int) -> str:
    return f"{seconds / max(n, 1) * 1e6:.1f} us"


class _L1Demo:
    def __init__(self, args: argparse.Namespace, progress: bool) -> None:
        self.objects: int = args.objects
        self.object_size: int = args.object_kib * _KIB
        self.chunk_size: int = args.chunk_size
        self.progress = progress
        self.rng = np.random.default_rng(args.seed)
        self.report = _DemoReport()
        self.arena = lmcache_cpp.Arena(args.arena_mib * _MIB)
        self.table = lmcache_cpp.ObjectTable(
            self.arena, lmcache_cpp.ObjectTableOptions(high_watermark=1.0, low_watermark=1.0)
        )
        self.hasher = lmcache_cpp.ChunkHasher(
            lmcache_cpp.NamespaceConfig(
                model_name="l1-demo/synthetic",
                layout_fingerprint=f"demo:bytes:{self.object_size}",
            ),
            self.chunk_size,
        )
        self.hash_seconds = 0.0
        self.hashed_chunks = 0
        self.lease_seconds = 0.0
        self.lease_calls = 0

    # -- helpers ------------------------------------------------------------------------------

    def _tokens(self, chunks: int, extra: int = 0) -> npt.NDArray[np.uint32]:
        return self.rng.integers(0, _VOCAB, size=chunks * self.chunk_size + extra, dtype=np.uint32)

    def _keys(self, tokens: npt.NDArray[np.uint32]) -> list[lmcache_cpp.ObjectKey]:
        t0 = time.perf_counter()
        hashes = self.hasher.hash_tokens(tokens)
        self.hash_seconds += time.perf_counter() - t0
        self.hashed_chunks += len(hashes)
        return lmcache_cpp.keys_for_rank(hashes, 0)

    def _store(self, request: int, keys: list[lmcache_cpp.ObjectKey]) -> tuple[int, int]:
        """Reserves, writes through views and publishes; returns (written, skipped)."""
        owner = lmcache_cpp.LeaseOwner(_DEMO_CLIENT, request)
        reservations = self.table.reserve_write(owner, keys, self.object_size)
        written: list[lmcache_cpp.ObjectKey] = []
        for r in reservations:
            if r.skipped:
                continue
            _fill(self.table.view(r.offset, r.size), r.key)
            written.append(r.key)
        self.table.finish_write(request, written)
        return len(written), len(reservations) - len(written)

    def _lookup_and_verify(
        self, request: int, keys: list[lmcache_cpp.ObjectKey]
    ) -> tuple[int, int]:
        """Leases the present prefix, checks its bytes, releases; returns (hits, bad objects)."""
        owner = lmcache_cpp.LeaseOwner(_DEMO_CLIENT, request)
        t0 = time.perf_counter()
        hits = self.table.acquire_read_prefix(owner, keys)
        self.lease_seconds += time.perf_counter() - t0
        self.lease_calls += 1
        bad = 0
        for key in keys[:hits]:
            info = self.table.info(key)
            if info is None or info.readers == 0:
                bad += 1
                continue
            if not _holds(self.table.view(info.offset, info.size), key):
                bad += 1
        if hits:
            t0 = time.perf_counter()
            self.table.release_read(request, keys[:hits])
            self.lease_seconds += time.perf_counter() - t0
            self.lease_calls += 1
        return hits, bad

    # -- phases -------------------------------------------------------------------------------

    def build_prompts(self) -> tuple[list[_Prompt], int]:
        """Prompts sharing a "system prompt" prefix, each with its own chunks after it."""
        shared_chunks = max(1, self.objects // 8)
        own_per_prompt = 4
        own_total = max(self.objects - shared_chunks, 1)
        shared = self._tokens(shared_chunks)
        prompts: list[_Prompt] = []
        remaining = own_total
        while remaining > 0:
            own = min(own_per_prompt, remaining)
            remaining -= own
            # A trailing partial chunk: never hashed or stored (only full chunks are).
            tail = self._tokens(own, extra=self.chunk_size // 2)
            tokens = np.concatenate([shared, tail])
            prompts.append(_Prompt(request=len(prompts) + 1, tokens=tokens))
        return prompts, shared_chunks

    def run(self) -> _DemoReport:
        say = self.report.say
        t_all = time.perf_counter()
        desc = self.arena.descriptor
        say(
            "lmcache-cpp l1-demo: in-process demo of the L1 core alone: no server runs and "
            "nothing listens on a socket ('lmcache-cpp demo' plays a workload against a server)."
        )
        say(
            f"arena     {self.arena.backend.name.lower()} {self.arena.size / _MIB:.1f} MiB, "
            f"mappable by other processes at {desc.path}"
        )
        say(
            f"objects   {self.object_size // _KIB} KiB per {self.chunk_size}-token chunk, "
            f"hash {self.hasher.algorithm.name}"
        )

        # Phase 1: store.
        prompts, shared_chunks = self.build_prompts()
        stored = skipped = 0
        bar = _Progress("store ", len(prompts), self.progress)
        t0 = time.perf_counter()
        for p in prompts:
            p.keys = self._keys(p.tokens)
            w, s = self._store(p.request, p.keys)
            stored += w
            skipped += s
            bar.advance()
        bar.close()
        store_s = time.perf_counter() - t0
        say(
            f"store     {len(prompts)} prompts -> {stored} objects written through views, "
            f"{skipped} already present (the shared {shared_chunks}-chunk prefix), "
            f"{_rate(stored * self.object_size, store_s)} incl. hashing and table calls"
        )
        if stored != self.objects:
            self.report.fail(f"stored {stored} objects, expected {self.objects}")
        if skipped != shared_chunks * (len(prompts) - 1):
            self.report.fail(f"{skipped} reservations skipped, expected {shared_chunks} per prompt")

        # Phase 2: look up every prompt, verify the bytes, release.
        hits = bad = wanted = 0
        for i, p in enumerate(prompts):
            h, b = self._lookup_and_verify(_LOOKUP_REQUEST_BASE + i, p.keys)
            hits += h
            bad += b
            wanted += len(p.keys)
        # A prompt that shares only the prefix hits exactly the prefix.
        shared_tokens = prompts[0].tokens[: shared_chunks * self.chunk_size]
        diverging = np.concatenate([shared_tokens, self._tokens(3)])
        div_hits, div_bad = self._lookup_and_verify(
            _LOOKUP_REQUEST_BASE + len(prompts), self._keys(diverging)
        )
        bad += div_bad
        say(
            f"lookup    {hits}/{wanted} chunks hit, {hits * self.object_size / _MIB:.1f} MiB "
            f"verified byte for byte, {bad} mismatches; a prompt diverging after the shared "
            f"prefix hits {div_hits}/{shared_chunks + 3}"
        )
        if hits != wanted:
            self.report.fail(f"lookup hit {hits} of {wanted} stored chunks")
        if div_hits != shared_chunks:
            self.report.fail(f"diverging prompt hit {div_hits}, expected {shared_chunks}")
        if bad:
            self.report.fail(f"{bad} objects read back wrong bytes")
        if self.table.stats().read_leases != 0:
            self.report.fail("read leases left after release")

        # Phase 3: store new chains until about half of phase 1's bytes had to be evicted.
        before = self.table.stats()
        free = self.table.capacity - before.used_bytes
        fill_target = free + before.used_bytes // 2
        chain = 8
        fill_chains = max(1, math.ceil(fill_target / (chain * self.object_size)))
        bar = _Progress("fill  ", fill_chains, self.progress)
        filled = 0
        t0 = time.perf_counter()
        for c in range(fill_chains):
            w, _ = self._store(_FILL_REQUEST_BASE + c, self._keys(self._tokens(chain)))
            filled += w
            bar.advance()
        bar.close()
        fill_s = time.perf_counter() - t0
        after = self.table.stats()
        evictions = after.evictions - before.evictions
        say(
            f"fill      {filled} more objects ({filled * self.object_size / _MIB:.1f} MiB into a "
            f"{self.table.capacity / _MIB:.1f} MiB arena): {evictions} evictions, "
            f"{(after.evicted_bytes - before.evicted_bytes) / _MIB:.1f} MiB evicted, "
            f"{_rate(filled * self.object_size, fill_s)} incl. hashing and eviction"
        )
        if evictions == 0:
            self.report.fail("filling past capacity evicted nothing")

        # Phase 4: which parts of the first prompts survived? Chains die from the tail, so what
        # is left of each prompt must be a prefix; and what is left must still read back right.
        full = partial = gone = not_prefix = 0
        survivors = survivor_bad = 0
        for i, p in enumerate(prompts):
            present = self.table.contains(p.keys)
            n = present.popcount()
            if n != present.leading_ones():
                not_prefix += 1
            if n == len(p.keys):
                full += 1
            elif n == 0:
                gone += 1
            else:
                partial += 1
            h, b = self._lookup_and_verify(_LOOKUP_REQUEST_BASE + len(prompts) + 1 + i, p.keys)
            survivors += h
            survivor_bad += b
        say(
            f"survey    first-phase prompts: {full} complete, {partial} cut back to a prefix, "
            f"{gone} gone; {not_prefix} lost a chunk before a later one (tail-first eviction "
            f"means 0); {survivors} surviving chunks re-verified, {survivor_bad} mismatches"
        )
        if not_prefix:
            self.report.fail(f"{not_prefix} prompts kept a chunk after an evicted one")
        if survivor_bad:
            self.report.fail(f"{survivor_bad} surviving objects read back wrong bytes")
        try:
            self.table.check_invariants()
        except lmcache_cpp.LMCacheError as exc:
            self.report.fail(f"object table invariants: {exc}")

        total_s = time.perf_counter() - t_all
        final = self.table.stats()
        say("summary")
        say(f"  objects written       {stored + filled}")
        say(f"  bytes written         {(stored + filled) * self.object_size / _MIB:.1f} MiB")
        say(f"  lookup hits           {hits}/{wanted}")
        say(f"  evictions             {final.evictions} ({final.evicted_bytes / _MIB:.1f} MiB)")
        say(f"  objects resident      {final.objects} ({final.used_bytes / _MIB:.1f} MiB)")
        say(f"  hashing               {_us(self.hash_seconds, self.hashed_chunks)} per chunk")
        say(
            f"  lease / release call  {_us(self.lease_seconds, self.lease_calls)} "
            f"(a prompt's whole key list, through the bindings)"
        )
        say(f"  wall time             {total_s:.2f} s")
        if self.report.failures:
            say(f"  result                FAILED ({len(self.report.failures)} checks)")
        else:
            say("  result                OK")
        return self.report


def _cmd_l1_demo(args: argparse.Namespace) -> int:
    for name in ("objects", "object_kib", "arena_mib", "chunk_size"):
        if getattr(args, name) < 1:
            print(f"l1-demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    first_phase = args.objects * args.object_kib * _KIB
    if first_phase > args.arena_mib * _MIB * 3 // 4:
        print(
            f"l1-demo: {args.objects} objects of {args.object_kib} KiB need more than 3/4 of the "
            f"arena before the fill phase; raise --arena-mib or lower --objects",
            file=sys.stderr,
        )
        return 2
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        report = _L1Demo(args, progress).run()
    except lmcache_cpp.LMCacheError as exc:
        print(f"l1-demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for failure in report.failures:
        print(f"l1-demo: check failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


# ---------------------------------------------------------------------------------------------
# Entry point


def _cmd_serve(args: argparse.Namespace) -> int:
    from lmcache_cpp.app import run_forever
    from lmcache_cpp.config import ConfigError, config_from_args

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    if args.log_level == "WARNING":  # the top-level default: the server's own setting wins
        level = getattr(logging, config.log_level)
        logging.getLogger().setLevel(level)
        lmcache_cpp.set_core_log_level(level)
    try:
        return run_forever(config, ready_line=args.ready_line)
    except (ConfigError, ValueError, OSError, lmcache_cpp.LMCacheError) as exc:
        print(f"serve: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_status(status: dict[str, Any]) -> str:
    """A human-readable summary of a STATUS reply."""
    lines: list[str] = []
    server = status.get("server", {})
    engine = status.get("engine", {})
    l1 = status.get("l1", {})
    prefetch = status.get("prefetch", {})
    store = status.get("store", {})
    if server:
        lines.append(
            f"server      {server.get('endpoint', '?')}  version {server.get('version', '?')}  "
            f"up {float(server.get('uptime_s', 0.0)):.0f} s  "
            f"clients {server.get('clients', server.get('clients_connected', '?'))}"
        )
    if l1:
        cap = int(l1.get("capacity_bytes", 0))
        used = int(l1.get("used_bytes", 0))
        pct = 100.0 * used / cap if cap else 0.0
        lines.append(
            f"L1          {_fmt_bytes(used)} of {_fmt_bytes(cap)} ({pct:.1f}%)  "
            f"objects {l1.get('objects', 0)}  leased {l1.get('leased_objects', 0)}  "
            f"read leases {l1.get('read_leases', 0)}  write leases {l1.get('write_leases', 0)}  "
            f"evictions {l1.get('evictions', 0)}"
        )
    for i, a in enumerate(status.get("l2", [])):
        lines.append(
            f"L2[{i}]       objects {a.get('objects', 0)}  {_fmt_bytes(int(a.get('bytes', 0)))}  "
            f"stores {a.get('stores', 0)}  loads {a.get('loads', 0)}  "
            f"pins {a.get('pins', 0)}  corrupt reads {a.get('corrupt_reads', 0)}"
        )
    if engine:
        lookups = int(engine.get("lookups", 0)) + int(engine.get("sync_lookups", 0))
        chunks = int(engine.get("lookup_chunks", 0))
        hits = int(engine.get("hit_chunks", 0))
        rate = 100.0 * hits / chunks if chunks else 0.0
        lines.append(
            f"lookups     {lookups}  chunks {chunks}  hits {hits} ({rate:.1f}%)  "
            f"from L1 {engine.get('l1_hit_chunks', 0)}  from L2 {engine.get('l2_hit_chunks', 0)}"
        )
        lines.append(
            f"transfers   stored {engine.get('store_chunks', 0)} chunks "
            f"(skipped {engine.get('store_skipped', 0)})  retrieved "
            f"{engine.get('retrieve_chunks', 0)} chunks  failed retrieves "
            f"{engine.get('retrieve_failures', 0)}"
        )
        lines.append(
            f"outstanding registrations {engine.get('registrations', 0)}  requests "
            f"{engine.get('requests', 0)}  tickets {engine.get('transfers', 0)}  lookup jobs "
            f"{prefetch.get('jobs', 0)}  L2 store queue {store.get('queued', 0)}"
        )
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from lmcache_cpp.client import CacheClient

    try:
        with CacheClient(args.endpoint, timeout_s=args.timeout) as client:
            status = client.status()
    except (lmcache_cpp.LMCacheError, OSError) as exc:
        print(f"status: {args.endpoint}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(status))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lmcache_cpp.demo import options_from_args, run_demo

    try:
        return run_demo(options_from_args(args))
    except (RuntimeError, OSError, lmcache_cpp.LMCacheError) as exc:
        print(f"demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from lmcache_cpp.config import add_serve_arguments
    from lmcache_cpp.demo import add_demo_arguments

    parser = argparse.ArgumentParser(
        prog="lmcache-cpp",
        description="lmcache_cpp: a KV-cache offloading server for LLM engines, with a C++ "
        "storage engine. 'serve' runs the server, 'demo' runs it with a built-in engine "
        "workload, 'status' asks a running server what it holds.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level, also for the core's own log lines (default: WARNING)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the cache server",
        description="Runs the cache server until SIGINT or SIGTERM. Settings come from the "
        "built-in defaults, then --config FILE (TOML or JSON), then the flags below. With no "
        "flags: tcp://127.0.0.1:5555, an L1 of 25% of available memory (at most 64 GiB), no L2.",
    )
    add_serve_arguments(serve)
    serve.add_argument(
        "--ready-line",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print 'READY <endpoint>' on stdout once the socket is bound (default: on)",
    )
    serve.set_defaults(handler=_cmd_serve)

    demo_server = sub.add_parser(
        "demo",
        help="start a server and play an engine workload against it",
        description="Starts 'lmcache-cpp serve' as a child process (ipc:// socket and a file L2 "
        "in a temporary directory) and plays one engine against it through the real protocol "
        "and the shared arena: stores the chunks of several prompts, looks them up and "
        "retrieves them from L1, flushes L1 and serves them again from L2, checks every byte, "
        "and shows a summary and the server's STATUS. Exits 1 if any check fails.",
    )
    add_demo_arguments(demo_server)
    demo_server.set_defaults(handler=_cmd_demo)

    status = sub.add_parser("status", help="what a running server holds and does")
    status.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5555",
        help="the server's endpoint (default: tcp://127.0.0.1:5555)",
    )
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the reply (default: 5)"
    )
    status.add_argument("--json", action="store_true", help="print the raw STATUS reply as JSON")
    status.set_defaults(handler=_cmd_status)

    info = sub.add_parser("info", help="version and build information")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_cmd_info)

    demo = sub.add_parser(
        "l1-demo",
        help="in-process walk through the L1 core alone (no server)",
        description="An in-process walk through the L1 core alone: nothing listens on a "
        "socket and no engine is involved (see 'demo' for the server). Creates a shared-memory "
        "arena and an object table, hashes synthetic prompts that share a prefix, stores one "
        "object per chunk by writing through zero-copy views, looks every prompt up with "
        "prefix leases and verifies the bytes, then keeps storing until the arena has to evict "
        "and checks that chains lost their tails first. Exits 1 if any check fails.",
    )
    demo.add_argument("--objects", type=int, default=256, help="chunk objects (default: 256)")
    demo.add_argument(
        "--object-kib", type=int, default=64, help="bytes per object in KiB (default: 64)"
    )
    demo.add_argument("--arena-mib", type=int, default=32, help="arena size in MiB (default: 32)")
    demo.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default: 256)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic tokens")
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )
    demo.set_defaults(handler=_cmd_l1_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lmcache_cpp.set_core_log_level(level)
    _log.debug("running %s", args.command)
    handler = args.handler
    rc: int = handler(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
