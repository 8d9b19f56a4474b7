#!/usr/bin/env python3
"""gpu_copy: the GPU copy kernels' bandwidth next to pinned contiguous copies, and the cost of
registering host memory with CUDA. Needs a GPU, torch with CUDA and lmcache_cpp built with CUDA.

1. Copies, GB/s (bytes moved over the median time of one call, timed with CUDA events on one
   stream): a batch of 16 chunks of 256 tokens, random block ids, between GPU KV tensors and
   objects in an L1 arena registered with CUDA (lmcache_cpp.Arena + CudaHostRegistration):
   D2H = gather (store), H2D = scatter (retrieve). Layouts:
     * 7B-class: NHD, 32 layers, 8 KV heads, head size 128, bf16, block size 16 (32 MiB per
       chunk); also with block size 64, to choose the engine per block size;
     * MLA (DeepSeek-V3-like): 61 layers, latent 576, bf16, block size 64 (17.6 MiB per chunk).
   Each through the kernel and the DMA engine. Floor, in the same run: torch ``copy_`` of a
   contiguous device tensor of the same bytes to a contiguous pinned host tensor (D2H) and back
   (H2D) on the same stream, i.e. pinned cudaMemcpyAsync. Ratio = engine / floor; target >= 0.85.
   Before timing, one gather and one scatter of each case are checked against torch indexing, so
   a broken kernel reports an error instead of a bandwidth.
2. Registration: an arena of 1, 8 and 32 GiB (prefaulted first, timed apart) registered in 1 GiB
   pieces, seconds and GB/s, and the unregistration; sizes over half the available memory are
   skipped, and said so.

Prints a table and, last, one line per case: ``name: measured, floor, ratio (target)``.
``--json PATH`` also writes every number. Nothing is asserted (a benchmark, not a test).

Usage: gpu_copy.py [--quick] [--json PATH] [--chunks N] [--reg-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import lmcache_cpp as lc
from lmcache_cpp import cuda as lcc

CHUNK = 256
TARGET = 0.85
GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    name: str
    layout: lc.KvLayout
    layers: int
    block_size: int
    heads: int
    head_size: int

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.layout is lc.KvLayout.MLA:
            return (num_blocks, self.block_size, self.head_size)
        return (2, num_blocks, self.block_size, self.heads, self.head_size)


CASES = [
    Case("7b-nhd-bs16", lc.KvLayout.NHD, 32, 16, 8, 128),
    Case("7b-nhd-bs64", lc.KvLayout.NHD, 32, 64, 8, 128),
    Case("mla-bs64", lc.KvLayout.MLA, 61, 64, 1, 576),
]


def time_ms(torch: Any, stream: Any, fn: Any, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() on `stream`, each call between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def expected_object(torch: Any, layers: list[Any], case: Case, ids: Any) -> Any:
    """The object bytes of blocks `ids` by the object format's definition (torch indexing)."""
    parts: list[Any] = []
    for t in layers:
        planes = [t] if case.layout is lc.KvLayout.MLA else [t[0], t[1]]
        parts.extend(p[ids].contiguous().view(torch.uint8).flatten() for p in planes)
    return torch.cat(parts)


def bench_case(torch: Any, case: Case, chunks: int, warmup: int, reps: int) -> dict[str, Any]:
    dev = torch.device("cuda")
    blocks_per_chunk = CHUNK // case.block_size
    num_blocks = 2 * chunks * blocks_per_chunk
    gen = torch.Generator(device=dev).manual_seed(int(time.time_ns()) & 0xFFFFFFFF)
    layers = []
    for _ in range(case.layers):
        raw = torch.randint(
            0,
            256,
            (int(np.prod(case.shape(num_blocks))) * 2,),
            dtype=torch.uint8,
            device=dev,
            generator=gen,
        )
        layers.append(raw.view(torch.bfloat16).reshape(case.shape(num_blocks)))
    view = lcc.CudaKvCacheView(layers, case.layout)
    object_bytes = view.object_bytes(CHUNK)
    total = object_bytes * chunks
    arena = lc.Arena(total, prefault=True)
    registration = lcc.CudaHostRegistration(arena.view(), piece_bytes=GIB)
    objects = [arena.view(i * object_bytes, object_bytes) for i in range(chunks)]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7))
    src_ids = [perm[i * blocks_per_chunk : (i + 1) * blocks_per_chunk] for i in range(chunks)]
    dst_ids = [
        perm[(chunks + i) * blocks_per_chunk : (chunks + i + 1) * blocks_per_chunk]
        for i in range(chunks)
    ]
    src_np = [ids.numpy().astype(np.int64) for ids in src_ids]
    dst_np = [ids.numpy().astype(np.int64) for ids in dst_ids]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    handle = stream.cuda_stream
    event = lcc.CudaEvent()

    def gather(engine: Any) -> None:
        view.gather_batch(CHUNK, src_np, objects, stream=handle, engine=engine)

    def scatter(engine: Any) -> None:
        view.scatter_batch(CHUNK, objects, dst_np, stream=handle, engine=engine)

    result: dict[str, Any] = {"case": case.name, "object_mib": object_bytes / 2**20}
    result["bytes"] = total
    # Correctness first: a gather and a scatter of every engine against torch indexing.
    for engine in (lcc.CopyEngine.KERNEL, lcc.CopyEngine.DMA):
        for o in objects:
            o.fill(0xA5)
        view.gather_batch(CHUNK, src_np, objects, stream=handle, engine=engine, event=event)
        event.synchronize()
        got = torch.from_numpy(objects[0]).to(dev)
        if not torch.equal(got, expected_object(torch, layers, case, src_ids[0].to(dev))):
            raise RuntimeError(f"{case.name}: {engine.name} gather differs from torch indexing")
        view.scatter_batch(CHUNK, objects, dst_np, stream=handle, engine=engine, event=event)
        event.synchronize()
        back = expected_object(torch, layers, case, dst_ids[-1].to(dev))
        if not torch.equal(back, torch.from_numpy(objects[-1]).to(dev)):
            raise RuntimeError(f"{case.name}: {engine.name} scatter differs from torch indexing")

    # Floor: pinned contiguous copies of the same bytes on the same stream.
    device_flat = torch.empty(total, dtype=torch.uint8, device=dev)
    host_flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)

    def d2h() -> None:
        with torch.cuda.stream(stream):
            host_flat.copy_(device_flat, non_blocking=True)

    def h2d() -> None:
        with torch.cuda.stream(stream):
            device_flat.copy_(host_flat, non_blocking=True)

    def gbps(ms: float) -> float:
        return total / (ms / 1e3) / 1e9

    result["floor_d2h"] = gbps(time_ms(torch, stream, d2h, warmup, reps))
    result["floor_h2d"] = gbps(time_ms(torch, stream, h2d, warmup, reps))
    for engine in (lcc.CopyEngine.KERNEL, lcc.CopyEngine.DMA):
        key = engine.name.lower()
        result[f"{key}_d2h"] = gbps(
            time_ms(torch, stream, lambda e=engine: gather(e), warmup, reps)
        )
        result[f"{key}_h2d"] = gbps(
            time_ms(torch, stream, lambda e=engine: scatter(e), warmup, reps)
        )
    stream.synchronize()
    registration.unregister()
    return result


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_registration(sizes_gib: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for gib in sizes_gib:
        size = gib * GIB
        avail = available_bytes()
        if size > avail // 2:
            out.append({"gib": gib, "skipped": f"needs {gib} GiB, {avail / GIB:.1f} available"})
            continue
        t0 = time.perf_counter()
        arena = lc.Arena(size, prefault=True)
        fault_s = time.perf_counter() - t0
        reg = lcc.CudaHostRegistration(arena.view(), piece_bytes=GIB)
        reg.unregister()
        out.append(
            {
                "gib": gib,
                "prefault_s": fault_s,
                "register_s": reg.register_seconds,
                "piece_s_max": max(reg.piece_seconds),
                "unregister_s": reg.unregister_seconds,
            }
        )
        del reg, arena
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and chunks")
    parser.add_argument("--chunks", type=int, default=16, help="chunks per call (default 16)")
    parser.add_argument("--reg-sizes", default="1,8,32", help="GiB to register (default 1,8,32)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_copy: torch is not installed", file=sys.stderr)
        return 2
    reason = lcc.cuda_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = f"torch {torch.__version__} has no usable CUDA"
    if reason is not None:
        print(f"gpu_copy: cannot run: {reason}", file=sys.stderr)
        return 2
    chunks = 4 if args.quick else args.chunks
    warmup, reps = (2, 5) if args.quick else (3, 20)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {lcc.cuda_info()}")
    results = [bench_case(torch, case, chunks, warmup, reps) for case in CASES]
    sizes = [int(s) for s in args.reg_sizes.split(",") if s]
    registration = bench_registration(sizes[:1] if args.quick else sizes)

    print(f"\nCopies: {chunks} chunks of {CHUNK} tokens per call, GB/s (ratio to pinned copy)")
    print(f"{'case':<14}{'dir':<5}{'pinned':>9}{'kernel':>16}{'dma':>16}")
    lines = []
    for r in results:
        for direction in ("d2h", "h2d"):
            floor = r[f"floor_{direction}"]
            cells = []
            for engine in ("kernel", "dma"):
                v = r[f"{engine}_{direction}"]
                cells.append(f"{v:8.1f} ({v / floor:4.2f})")
                lines.append(
                    f"gpu_copy {r['case']} {direction} {engine}: {v:.1f} GB/s, pinned {floor:.1f} "
                    f"GB/s, {v / floor:.2f}x (target >= {TARGET}x)"
                )
            print(f"{r['case']:<14}{direction:<5}{floor:9.1f}{cells[0]:>16}{cells[1]:>16}")
    print("\nRegistration (cudaHostRegister in 1 GiB pieces; prefault timed apart)")
    for reg in registration:
        if "skipped" in reg:
            print(f"{reg['gib']:>4} GiB  skipped: {reg['skipped']}")
            continue
        rate = reg["gib"] / reg["register_s"] if reg["register_s"] > 0 else float("inf")
        print(
            f"{reg['gib']:>4} GiB  register {reg['register_s']:.3f} s ({rate:.1f} GiB/s, slowest "
            f"piece {reg['piece_s_max']:.3f} s), unregister {reg['unregister_s']:.3f} s, prefault "
            f"{reg['prefault_s']:.2f} s"
        )
        lines.append(f"gpu_copy register {reg['gib']} GiB: {reg['register_s']:.3f} s")
    print()
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copies": results, "registration": registration}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
