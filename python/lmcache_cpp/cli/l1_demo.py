"""``lmcache-cpp l1-demo``: an in-process walk through the L1 core alone (hashing, the
shared-memory arena, the object table, leases, eviction), without a server or an engine. See
``lmcache-cpp demo`` (``lmcache_cpp.cli.demo``) for the server."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

import lmcache_cpp
from lmcache_cpp.cli.console import Progress, Report

__all__ = ["add_l1_demo_arguments", "run_l1_demo"]

_KIB = 1024
_MIB = 1024 * 1024
_VOCAB = 32000
_DEMO_CLIENT = 1
_LOOKUP_REQUEST_BASE = 1_000_000
_FILL_REQUEST_BASE = 2_000_000


@dataclass
class _Prompt:
    request: int
    tokens: npt.NDArray[np.uint32]
    keys: list[lmcache_cpp.ObjectKey] = field(default_factory=list)


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
        self.report = Report()
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

    def run(self) -> Report:
        say = print
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
        bar = Progress("store ", len(prompts), self.progress)
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
        bar = Progress("fill  ", fill_chains, self.progress)
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


def run_l1_demo(args: argparse.Namespace) -> int:
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


def add_l1_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objects", type=int, default=256, help="chunk objects (default: 256)")
    parser.add_argument(
        "--object-kib", type=int, default=64, help="bytes per object in KiB (default: 64)"
    )
    parser.add_argument("--arena-mib", type=int, default=32, help="arena size in MiB (default: 32)")
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="tokens per chunk (default: 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic tokens")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )
