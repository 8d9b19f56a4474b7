#!/usr/bin/env python3
"""bench_vllm: time to first token of a real vLLM with and without LMCacheCppConnector.

Run it with the Python of a vLLM environment (``.ci/vllm-e2e`` makes one: ``.venv-vllm``) that
has lmcache_cpp installed. It writes its own random-weight Llama with transformers'
``save_pretrained`` (nothing is downloaded), starts a real cache server
(``python -m lmcache_cpp serve``, ``ipc://``, file L2 in a temporary directory) and real vLLM
engines, each in its own child process (this file with ``--_engine``; vLLM's own multiprocess
layout inside it: API process, EngineCore, one CPU worker). Nothing is asserted: it prints
tables, ratios and the targets next to them.

1. TTFT of one prompt of 1K, 4K and 8K random tokens (``max_tokens=1``, greedy): the time from
   ``add_request`` to the output carrying the first token, seen by the engine's own process.
   Variants:

   * **cold**: vLLM alone (no connector), a prompt it has never seen;
   * **first run**: vLLM + lmcache_cpp, the same prompt, which the server has never seen (a
     miss: lookup, full prefill, the chunks stored in the background). Cold and first run live
     in two engines that are both up; their runs alternate, their order swaps every repetition,
     and each run waits for the previous one's stores (and the server's L2 writes) to finish,
     and for the other engine's worker to stop busy-polling (:class:`CoreTurns`). Store
     overhead = median over repetitions of first run / cold - 1 (target <= 3 %);
   * **L1**: a fresh vLLM process with the connector, the same prompts, served from the server's
     L1 (target at 8K: <= 0.01 x cold);
   * **L2**: another fresh process after the server's L1 was flushed (CLEAR): served from the
     file L2;
   * floor: vLLM's own prefix-cache hit on the same prompt, in the cold engine right after its
     cold run (vLLM recomputes the prompt's last block). After a connector load vLLM computes
     the tokens after the last whole chunk, or only the last token when the prompt is a whole
     number of chunks (as 1K, 4K and 8K are with 256-token chunks). Also vLLM's TTFT for a
     1-token prompt: the fixed cost of a request, which no cache can remove.

   Every engine first runs a 256-token warm-up prompt (its own cache salt), not timed. The
   model (``ModelShape``: 6 layers, hidden 1024, 84M parameters; ``--layers``) is sized so that
   an 8K prefill takes about 20 s on one core of the project's 2-core machine.

2. Multi-turn chat (the issue asks for 20 conversations x 5 turns; the default here is 10 x 5 so
   that it fits a 2-core machine): each conversation starts with a long context and a question;
   each next turn appends the generated answer and a new question. Turns are submitted round
   robin with a few conversations in flight at once (a conversation's next turn is queued when
   its answer is complete), and vLLM's KV cache holds only about as many conversations as are in
   flight, so by the time a conversation comes back its prefix has left vLLM's cache. Total time
   and TTFT p50/p99, without and with lmcache_cpp (fresh engines, same server).

Compute threads are pinned the same way in every engine: ``VLLM_CPU_OMP_THREADS_BIND`` names
the worker's cores (all but the last core by default; ``--compute-cores``). With its default
``auto``, vLLM 0.32's CPU backend (``OMPProcessManager``) reserves one core for its own
processes, plus one more when a KV connector is configured, and when the reservation would
leave no core it reserves none: on 2 cores the worker computes on 1 thread without the
connector and on 2 with it, which distorts every comparison. (``VLLM_CPU_NUM_OF_RESERVED_CPU``
sets the size of that reservation, but only the ``auto`` binding uses it; the explicit list
leaves nothing to chance.) vLLM binds the worker process to those cores, so the connector's
worker threads (stores, copies) share them. The cache server is pinned to the other cores.

Usage: bench_vllm.py [--quick] [--sections ttft,chat] [--reps N] (about 8.5 minutes on 2
cores; --quick about 3.5). Every child process (and vLLM's processes under it) is stopped on the
way out, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench_server import BenchError, Children
from harness import apply_defaults, child_role, run_benchmark
from lmcache_cpp.app import serve_argv
from lmcache_cpp.client import CacheClient

BLOCK: Final = 32  # vLLM block size (the CPU attention backend needs a multiple of 32)
WARMUP_TOKENS: Final = 256
VOCAB: Final = 8192
SECTIONS: Final = ("ttft", "chat")
ENGINE_START_S: Final = 600.0
REPLY_S: Final = 900.0
STORE_TARGET: Final = 0.03
WARM_TARGET: Final = 0.01
WORKER_SPIN_S: Final = 1.5  # vLLM's worker busy-polls for 1 s after a step


@dataclass(frozen=True)
class ModelShape:
    """The random Llama the benchmark writes (bf16)."""

    layers: int = 6
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def describe(self) -> str:
        return (
            f"random Llama, {self.layers} layers, hidden {self.hidden}, {self.heads} heads / "
            f"{self.kv_heads} KV heads of {self.head_dim}, MLP {self.intermediate}, vocab "
            f"{self.vocab}, bf16: {self.params / 1e6:.0f}M parameters, KV "
            f"{self.kv_bytes_per_token // 1024} KiB per token"
        )


# =============================================================================================
# Child process: the model writer


def make_model_main(path: str, shape_json: str) -> int:
    import torch
    from transformers import (  # type: ignore[import-not-found, unused-ignore]
        LlamaConfig,
        LlamaForCausalLM,
    )

    shape = ModelShape(**json.loads(shape_json))
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return 0


# =============================================================================================
# Child process: one vLLM engine, driven over stdin/stdout
#
# One JSON command per stdin line, one reply per command on a stdout line that starts with "@@"
# (anything else on stdout is not ours). The first reply says the engine is up.


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write("@@" + json.dumps(payload) + "\n")
    sys.stdout.flush()


class _Driver:
    """Requests through ``LLMEngine.add_request`` and ``step``, so that the time of each
    request's first token is seen as soon as vLLM hands it out."""

    def __init__(self, llm: Any) -> None:
        from vllm import SamplingParams

        self._engine = llm.llm_engine
        self._params = SamplingParams
        self._ids = 0

    def submit(
        self, tokens: Sequence[int], max_tokens: int, salt: str | None, logprobs: int | None = None
    ) -> str:
        self._ids += 1
        request_id = f"b{self._ids}"
        prompt: dict[str, Any] = {"prompt_token_ids": list(tokens)}
        if salt:
            prompt["cache_salt"] = salt
        params = self._params(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            logprobs=logprobs,
        )
        self._engine.add_request(request_id, prompt, params)
        return request_id

    def step(self) -> list[Any]:
        return list(self._engine.step())

    def busy(self) -> bool:
        return bool(self._engine.has_unfinished_requests())


def _top2_gap(output: Any) -> float:
    """How far the greedy first token's log probability is ahead of the runner-up's."""
    if not output.logprobs:
        return math.nan
    values = sorted((lp.logprob for lp in output.logprobs[0].values()), reverse=True)
    return float(values[0] - values[1]) if len(values) > 1 else math.inf


def _run_prompts(driver: _Driver, command: dict[str, Any]) -> dict[str, Any]:
    """All prompts at once; per prompt: TTFT, end-to-end time, cached tokens, output, and the
    lead of the first token's log probability over the runner-up's."""
    started: dict[str, float] = {}
    order: list[str] = []
    for tokens in command["prompts"]:
        t0 = time.perf_counter()
        request_id = driver.submit(tokens, command["max_tokens"], command.get("salt"), 2)
        started[request_id] = t0
        order.append(request_id)
    first: dict[str, float] = {}
    done: dict[str, dict[str, Any]] = {}
    while driver.busy():
        for out in driver.step():
            now = time.perf_counter()
            rid = out.request_id
            if rid not in first and out.outputs and out.outputs[0].token_ids:
                first[rid] = now - started[rid]
            if out.finished:
                done[rid] = {
                    "ttft_s": first.get(rid, now - started[rid]),
                    "e2e_s": now - started[rid],
                    "cached": int(out.num_cached_tokens or 0),
                    "output": list(out.outputs[0].token_ids),
                    "gap": _top2_gap(out.outputs[0]),
                }
    return {"results": [done[rid] for rid in order]}


def _chat(driver: _Driver, command: dict[str, Any]) -> dict[str, Any]:
    """The multi-turn workload (see the module docstring), closed loop: a conversation's next
    turn is queued when its answer is complete, and at most ``in_flight`` turns run at once."""
    rng = random.Random(command["seed"])
    conversations: int = command["conversations"]
    turns: int = command["turns"]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    history = [tokens(command["context"]) for _ in range(conversations)]
    questions = [[tokens(command["question"]) for _ in range(turns)] for _ in range(conversations)]
    ready: deque[tuple[int, int]] = deque((c, 0) for c in range(conversations))
    running: dict[str, tuple[int, int, float]] = {}
    records: list[dict[str, Any]] = []
    first: dict[str, float] = {}
    t_start = time.perf_counter()
    while ready or running:
        while ready and len(running) < command["in_flight"]:
            conv, turn = ready.popleft()
            history[conv] = history[conv] + questions[conv][turn]
            t0 = time.perf_counter()
            rid = driver.submit(history[conv], command["answer"], None)
            running[rid] = (conv, turn, t0)
        for out in driver.step():
            now = time.perf_counter()
            rid = out.request_id
            conv, turn, t0 = running[rid]
            if rid not in first and out.outputs and out.outputs[0].token_ids:
                first[rid] = now - t0
            if out.finished:
                del running[rid]
                records.append(
                    {
                        "conversation": conv,
                        "turn": turn,
                        "prompt": len(history[conv]),
                        "cached": int(out.num_cached_tokens or 0),
                        "ttft_s": first.pop(rid, now - t0),
                    }
                )
                history[conv] = history[conv] + list(out.outputs[0].token_ids)
                if turn + 1 < turns:
                    ready.append((conv, turn + 1))
    return {"records": records, "total_s": time.perf_counter() - t_start}


def engine_main(config_json: str) -> int:
    config = json.loads(config_json)
    # SIGTERM ends the process through the normal exit path, so vLLM stops its own processes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    t0 = time.monotonic()
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": config["model"],
        "skip_tokenizer_init": True,
        "block_size": BLOCK,
        "max_model_len": config["max_model_len"],
        "max_num_batched_tokens": config["max_model_len"],
        "max_num_seqs": config["max_num_seqs"],
        "dtype": "bfloat16",
        "enforce_eager": True,
        "seed": 0,
    }
    if config.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = config["num_blocks"]
    if config.get("connector") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCacheCppConnector",
            "kv_connector_module_path": "lmcache_cpp.integration.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": config["connector"],
        }
    driver = _Driver(LLM(**kwargs))
    _reply({"ready": True, "startup_s": time.monotonic() - t0})
    for line in sys.stdin:
        command = json.loads(line)
        op = command.get("op")
        if op == "quit":
            break
        if op == "run":
            _reply(_run_prompts(driver, command))
        elif op == "chat":
            _reply(_chat(driver, command))
        else:
            _reply({"error": f"unknown op {op!r}"})
    return 0


# =============================================================================================
# Parent: the server and the engines


@contextlib.contextmanager
def _pinned(cores: set[int]) -> Iterator[None]:
    """Runs the block with this process pinned to ``cores``: children started in it inherit."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


class Server:
    """The cache server child and a client for its STATUS and CLEAR."""

    def __init__(self, children: Children, workdir: Path, chunk: int, cores: set[int]) -> None:
        self.endpoint = f"ipc://{workdir}/cache.sock"
        self.chunk = chunk
        l2 = json.dumps({"type": "fs", "path": str(workdir / "l2")})
        self.argv = serve_argv(
            self.endpoint,
            "--chunk-size",
            str(chunk),
            "--l1-size-gb",
            "2",
            "--hugepages",
            "off",
            "--worker-threads",
            "2",
            "--l2-adapter",
            l2,
            "--log-level",
            "WARNING",
        )
        with _pinned(cores):
            self.proc = children.start("server", self.argv)
        line = children.readline(self.proc, 60.0, "server")
        if not line.startswith("READY "):
            raise BenchError(f"server: expected 'READY <endpoint>', got {line!r}")
        self.client = CacheClient(self.endpoint, timeout_s=30.0, name="bench_vllm")

    def counters(self) -> dict[str, int]:
        status = self.client.status()
        counters = {k: int(v) for k, v in status["engine"].items()}
        counters["l1_objects"] = int(status["l1"]["objects"])
        counters["store_busy"] = int(status["store"]["queued"]) + int(
            status["store"]["in_flight_batches"]
        )
        return counters

    def settle(self, before: dict[str, int], chunks: int, timeout_s: float = 120.0) -> None:
        """Waits until ``chunks`` more chunks were stored than in ``before`` and the L2 writes
        are done, so that nothing runs in the background of the next measurement."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.counters()
            if now["store_chunks"] - before["store_chunks"] >= chunks and now["store_busy"] == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not store {chunks} chunks in {timeout_s:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()


class CoreTurns:
    """Lets an engine's worker go idle before another engine computes on the same cores.

    vLLM's worker busy-polls its input queue (``sched_yield``) for 1 s after each step before it
    sleeps (``SpinCondition`` in vLLM's ``shm_broadcast``). Two engines pinned to the same cores
    would share them for that second: a run right after another engine's run was 0.3-0.7 s
    slower. So a run in another engine than the last one waits until that second is over.
    """

    def __init__(self) -> None:
        self._last: str | None = None
        self._until = 0.0

    def begin(self, name: str) -> None:
        if self._last not in (None, name):
            time.sleep(max(0.0, self._until - time.monotonic()))
        self._last = name

    def end(self) -> None:
        self._until = time.monotonic() + WORKER_SPIN_S


@dataclass
class Engine:
    name: str
    proc: subprocess.Popen[str]
    children: Children
    turns: CoreTurns
    connector: bool
    startup_s: float = 0.0

    def reply(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.children.readline(
                self.proc, max(1.0, deadline - time.monotonic()), self.name
            )
            if line.startswith("@@"):
                reply: dict[str, Any] = json.loads(line[2:])
                if "error" in reply:
                    raise BenchError(f"{self.name}: {reply['error']}")
                return reply

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def run(self, prompts: list[list[int]], salt: str | None = None) -> list[dict[str, Any]]:
        self.turns.begin(self.name)
        self.send({"op": "run", "prompts": prompts, "max_tokens": 1, "salt": salt})
        results: list[dict[str, Any]] = self.reply(REPLY_S)["results"]
        self.turns.end()
        return results

    def ttft(self, prompt: list[int], salt: str | None = None) -> dict[str, Any]:
        return self.run([prompt], salt)[0]

    def close(self, *, ask: bool = True) -> None:
        """Asks the engine to quit (``ask``: after the command it runs), then SIGTERM (the
        engine exits through vLLM's shutdown), then ends its process group (vLLM's processes)."""
        if ask and self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send({"op": "quit"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        self.children.stop(self.proc)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Fleet:
    """Starts engines; ends every one still running when the benchmark stops."""

    def __init__(self, children: Children, model: str, server: Server) -> None:
        self._children = children
        self._model = model
        self._server = server
        self._engines: list[Engine] = []
        self._turns = CoreTurns()

    def start(
        self,
        name: str,
        *,
        connector: bool,
        max_model_len: int,
        max_num_seqs: int = 4,
        num_blocks: int | None = None,
    ) -> Engine:
        config: dict[str, Any] = {
            "model": self._model,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "num_blocks": num_blocks,
            "connector": None,
        }
        if connector:
            config["connector"] = {"endpoint": self._server.endpoint, "timeout_s": 30.0}
        proc = self._children.start(
            name, [sys.executable, __file__, "--_engine", json.dumps(config)], stdin=True
        )
        engine = Engine(name, proc, self._children, self._turns, connector)
        self._engines.append(engine)
        return engine

    def ready(self, *engines: Engine) -> None:
        """Waits until the engines are up, then runs a warm-up prompt in each (its own cache
        salt, not timed) and waits for the stores it makes."""
        for engine in engines:
            engine.startup_s = float(engine.reply(ENGINE_START_S)["startup_s"])
        before = self._server.counters()
        for engine in engines:
            engine.ttft(random_prompt(WARMUP_TOKENS, len(self._engines)), f"warm-up-{engine.name}")
        stores = sum(e.connector for e in engines) * (WARMUP_TOKENS // self._server.chunk)
        self._server.settle(before, stores)

    def close_all(self, *, ask: bool = True) -> None:
        for engine in reversed(self._engines):
            engine.close(ask=ask)
        self._engines.clear()


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# =============================================================================================
# 1. TTFT


@dataclass
class SizeResult:
    size: int
    loaded: int  # tokens the connector can load (whole chunks, up to the last token)
    cold: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    l2: list[float] = field(default_factory=list)
    own_hit: list[float] = field(default_factory=list)
    cached: dict[str, set[int]] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)  # first token, per repetition
    gaps: dict[str, list[float]] = field(default_factory=dict)  # its lead over the runner-up

    def note(self, variant: str, result: dict[str, Any]) -> float:
        self.cached.setdefault(variant, set()).add(int(result["cached"]))
        self.outputs.setdefault(variant, []).append(int(result["output"][0]))
        self.gaps.setdefault(variant, []).append(float(result["gap"]))
        return float(result["ttft_s"])

    def overhead(self) -> float:
        """Median over the repetitions of first run / cold - 1 (the runs of a repetition are
        back to back)."""
        return statistics.median(f / c - 1.0 for f, c in zip(self.first, self.cold, strict=True))

    def ratio(self, variant: Sequence[float]) -> float:
        return _med(variant) / _med(self.cold)

    def output_check(self) -> str:
        """Whether every variant's greedy first token is the cold run's, and where not, how
        close the cold run's top two candidates were (a near tie flips on bf16 rounding: a
        full prefill and a one-token step add up in different orders)."""
        differ = [
            f"{variant} repetition {rep + 1} (cold's lead over the runner-up "
            f"{self.gaps['cold'][rep]:.3f} nats, {variant}'s own {self.gaps[variant][rep]:.3f})"
            for variant, tokens in self.outputs.items()
            for rep, token in enumerate(tokens)
            if token != self.outputs["cold"][rep]
        ]
        return "the same in every variant" if not differ else "differs in " + "; ".join(differ)


def bench_ttft(
    args: argparse.Namespace, fleet: Fleet, server: Server
) -> tuple[list[SizeResult], list[str]]:
    chunk = server.chunk
    max_len = max(args.sizes) + BLOCK
    results = [SizeResult(n, min(n // chunk * chunk, n - 1)) for n in args.sizes]
    prompts = {
        r.size: [random_prompt(r.size, 7000 + 100 * i + r.size) for i in range(args.reps)]
        for r in results
    }
    notes: list[str] = []

    t0 = time.perf_counter()
    cold = fleet.start("cold", connector=False, max_model_len=max_len)
    first = fleet.start("first", connector=True, max_model_len=max_len)
    fleet.ready(cold, first)
    print(f"  engines cold and first run up and warmed up in {time.perf_counter() - t0:.0f} s")
    tiny = [float(cold.ttft(random_prompt(1, 100 + i))["ttft_s"]) for i in range(5)]
    notes.append(
        f"vLLM's TTFT for a 1-token prompt (its fixed cost per request): median "
        f"{_med(tiny) * 1e3:.1f} ms [{min(tiny) * 1e3:.1f}-{max(tiny) * 1e3:.1f}]"
    )

    for result in results:
        for rep, prompt in enumerate(prompts[result.size]):
            order = ("cold", "first") if rep % 2 == 0 else ("first", "cold")
            for variant in order:
                if variant == "cold":
                    result.cold.append(result.note("cold", cold.ttft(prompt)))
                    result.own_hit.append(result.note("own hit", cold.ttft(prompt)))
                else:
                    before = server.counters()
                    result.first.append(result.note("first", first.ttft(prompt)))
                    server.settle(before, result.size // chunk)
            print(
                f"  {result.size:>5} tokens, repetition {rep + 1}: cold {result.cold[-1]:.2f} s,"
                f" first run {result.first[-1]:.2f} s"
            )
    cold.close()
    first.close()

    fresh_engine(fleet, server, "l1", results, prompts, max_len, notes)
    server.settle(server.counters(), 0)
    server.client.clear()
    print(f"  L1 flushed ({server.counters()['l1_objects']} objects left)")
    fresh_engine(fleet, server, "l2", results, prompts, max_len, notes)
    return results, notes


def fresh_engine(
    fleet: Fleet,
    server: Server,
    tier: str,
    results: list[SizeResult],
    prompts: dict[int, list[list[int]]],
    max_len: int,
    notes: list[str],
) -> None:
    """A fresh engine with the connector runs every prompt once (``tier``: "l1" or "l2", where
    the server holds them now), then stops."""
    t0 = time.perf_counter()
    engine = fleet.start(tier, connector=True, max_model_len=max_len)
    fleet.ready(engine)
    print(f"  fresh engine for {tier.upper()} up and warmed up in {time.perf_counter() - t0:.0f} s")
    before = server.counters()
    for result in results:
        for prompt in prompts[result.size]:
            getattr(result, tier).append(result.note(tier.upper(), engine.ttft(prompt)))
    after = server.counters()
    counts = [
        f"{after[name] - before[name]} {what}"
        for name, what in (
            ("l1_hit_chunks", "chunks hit in L1"),
            ("l2_hit_chunks", "in L2"),
            ("retrieve_failures", "failed retrieves"),
        )
    ]
    notes.append(f"{tier.upper()} engine: {', '.join(counts)}")
    engine.close()


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    return f" [{min(values):.3f}-{max(values):.3f}]"


def print_ttft(results: list[SizeResult], notes: list[str], chunk: int) -> list[str]:
    print()
    print("  TTFT in seconds, median of the repetitions [min-max]")
    header = ("prompt", "cold", "first run", "L1 fresh proc", "L2 fresh proc")
    print(f"  {header[0]:>7} {header[1]:>22} {header[2]:>22} {header[3]:>22} {header[4]:>22}")
    for r in results:
        cells = [f"{_med(v):.3f}{_spread(v)}" for v in (r.cold, r.first, r.l1, r.l2)]
        print(f"  {r.size:>7} " + " ".join(f"{c:>22}" for c in cells))
    print()
    print(
        f"  ratios (targets: store overhead <= {STORE_TARGET:.0%} of cold; L1 <= {WARM_TARGET}x "
        "cold at the largest prompt)"
    )
    print(
        f"  {'prompt':>7} {'store overhead':>15} {'L1/cold':>8} {'L2/cold':>8} {'loaded':>7} "
        f"{'computed':>9} {'floor s':>8} {'floor/cold':>11} {'L1/floor':>9}"
    )
    for r in results:
        print(
            f"  {r.size:>7} {r.overhead():>+15.1%} {r.ratio(r.l1):>8.4f} {r.ratio(r.l2):>8.4f} "
            f"{r.loaded:>7} {r.size - r.loaded:>9} {_med(r.own_hit):>8.3f} "
            f"{r.ratio(r.own_hit):>11.4f} {_med(r.l1) / _med(r.own_hit):>9.2f}"
        )
    print(f"  loaded: tokens the connector loads ({chunk}-token chunks, up to the last token);")
    print("  computed: what vLLM still computes after the load. floor: vLLM's own prefix-cache hit")
    print(f"  on the same prompt in the cold engine (it recomputes the last block of {BLOCK}).")
    print("  store overhead: a negative value means the difference is below the run-to-run noise.")
    for line in notes:
        print(f"  {line}")
    for r in results:
        cached = ", ".join(f"{k} {sorted(v)}" for k, v in r.cached.items())
        print(f"  {r.size}: cached tokens per variant: {cached}")
        print(f"  {r.size}: greedy first token {r.output_check()}")
    big = results[-1]
    sizes = ", ".join(str(r.size) for r in results)
    worst = max(r.overhead() for r in results)
    return [
        f"ttft store overhead (first run vs cold, worst of {sizes}): {worst:+.1%} "
        f"(target <= {STORE_TARGET:.0%})",
        f"ttft L1 {big.size}: {_med(big.l1):.3f} s, cold {_med(big.cold):.3f} s, ratio "
        f"{big.ratio(big.l1):.4f} (target <= {WARM_TARGET}); floor (vLLM's own prefix-cache hit) "
        f"{_med(big.own_hit):.3f} s, ratio {big.ratio(big.own_hit):.4f}",
        f"ttft L2 {big.size}: {_med(big.l2):.3f} s, cold {_med(big.cold):.3f} s, ratio "
        f"{big.ratio(big.l2):.4f} (target: printed)",
    ]


# =============================================================================================
# 2. Multi-turn chat


def bench_chat(args: argparse.Namespace, fleet: Fleet) -> list[str]:
    longest = args.chat_context + args.turns * args.chat_question + (args.turns - 1) * args.answer
    max_len = -(-(longest + args.answer + BLOCK) // BLOCK) * BLOCK
    # Room for the conversations in flight and a little more: far less than all of them.
    blocks = args.in_flight * (max_len // BLOCK) + 4
    total_tokens = args.conversations * longest
    print(
        f"  {args.conversations} conversations x {args.turns} turns, {args.in_flight} in flight; "
        f"context {args.chat_context} tokens, questions {args.chat_question}, answers "
        f"{args.answer}; longest prompt {longest} tokens"
    )
    print(
        f"  vLLM KV cache: {blocks} blocks of {BLOCK} = {blocks * BLOCK} tokens, for "
        f"{total_tokens} tokens of conversation history at the end"
    )
    command = {
        "op": "chat",
        "seed": 4242,
        "conversations": args.conversations,
        "turns": args.turns,
        "context": args.chat_context,
        "question": args.chat_question,
        "answer": args.answer,
        "in_flight": args.in_flight,
    }
    runs: dict[str, dict[str, Any]] = {}
    for name, connector in (("vLLM alone", False), ("vLLM + lmcache_cpp", True)):
        engine = fleet.start(
            "chat-lmcache" if connector else "chat-alone",
            connector=connector,
            max_model_len=max_len,
            max_num_seqs=args.in_flight,
            num_blocks=blocks,
        )
        fleet.ready(engine)
        engine.send(command)
        runs[name] = engine.reply(REPLY_S)
        engine.close()
        print(f"  {name}: done in {runs[name]['total_s']:.1f} s")
    print()
    print(
        f"  {'':<20} {'total s':>8} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'prompt tokens':>14} "
        f"{'cached':>8}"
    )
    stats: dict[str, tuple[float, float, float]] = {}
    for name, run in runs.items():
        ttfts = [float(r["ttft_s"]) for r in run["records"]]
        prompt = sum(int(r["prompt"]) for r in run["records"])
        cached = sum(int(r["cached"]) for r in run["records"])
        stats[name] = (float(run["total_s"]), percentile(ttfts, 0.5), percentile(ttfts, 0.99))
        total, p50, p99 = stats[name]
        print(f"  {name:<20} {total:>8.1f} {p50:>11.3f} {p99:>11.3f} {prompt:>14} {cached:>8}")
    alone, ours = stats["vLLM alone"], stats["vLLM + lmcache_cpp"]
    print(
        f"  with / without lmcache_cpp: total {ours[0] / alone[0]:.2f}x, TTFT p50 "
        f"{ours[1] / alone[1]:.2f}x, p99 {ours[2] / alone[2]:.2f}x"
    )
    print("  cached: prompt tokens vLLM did not compute (its own prefix cache + the connector)")
    return [
        f"chat {args.conversations}x{args.turns}: total {ours[0]:.1f} s with lmcache_cpp, "
        f"{alone[0]:.1f} s without, ratio {ours[0] / alone[0]:.2f}; TTFT p50 {ours[1]:.3f} vs "
        f"{alone[1]:.3f} s, p99 {ours[2]:.3f} vs {alone[2]:.3f} s (target: printed)"
    ]


# =============================================================================================
# Main


def _cores(spec: str | None) -> tuple[set[int], set[int]]:
    """(compute cores, reserved cores): all but the last allowed core compute by default."""
    allowed = sorted(os.sched_getaffinity(0))
    if spec:
        compute = {int(c) for c in spec.split(",")}
    else:
        compute = set(allowed[:-1]) if len(allowed) > 1 else set(allowed)
    reserved = set(allowed) - compute or set(allowed)
    return compute, reserved


def run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    t_start = time.perf_counter()
    compute, reserved = _cores(args.compute_cores)
    shape = ModelShape(layers=args.layers)
    os.environ.update(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(compute)),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO"),
            "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        }
    )
    print("bench_vllm: TTFT of vLLM (vllm-cpu) with and without LMCacheCppConnector")
    print(
        f"machine: {os.cpu_count()} cores; vLLM worker computes on cores {sorted(compute)} "
        f"(VLLM_CPU_OMP_THREADS_BIND), the cache server runs on {sorted(reserved)}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(f"model: {shape.describe()}")
    model = workdir / "model"
    proc = children.start(
        "model",
        [sys.executable, __file__, "--_make-model", str(model), json.dumps(shape.__dict__)],
    )
    if proc.wait() != 0:
        raise BenchError(f"writing the model failed:\n{children.log_tail('model')}")
    server = Server(children, workdir, args.chunk_size, reserved)
    print(f"server: chunk size {args.chunk_size} tokens, L1 2 GiB, file L2 (pid {server.proc.pid})")
    fleet = Fleet(children, str(model), server)
    summary: list[str] = []
    try:
        if "ttft" in args.sections:
            print()
            print(
                f"1. TTFT, prompts of {', '.join(str(n) for n in args.sizes)} tokens, "
                f"{args.reps} repetition(s) each"
            )
            t0 = time.perf_counter()
            results, notes = bench_ttft(args, fleet, server)
            summary += print_ttft(results, notes, args.chunk_size)
            print(f"  ({time.perf_counter() - t0:.0f} s)")
        if "chat" in args.sections:
            print()
            print("2. Multi-turn chat with a vLLM KV cache too small for every conversation")
            t0 = time.perf_counter()
            summary += bench_chat(args, fleet)
            print(f"  ({time.perf_counter() - t0:.0f} s)")
    except BaseException:
        fleet.close_all(ask=False)  # Ctrl-C or an error: do not wait for a running command
        raise
    finally:
        fleet.close_all()
        server.close()
    print()
    print(
        f"summary ({time.perf_counter() - t_start:.0f} s in all; load average now "
        f"{os.getloadavg()[0]:.2f}):"
    )
    for line in summary:
        print(line)
    return 0


def _words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def _int_list(text: str) -> list[int]:
    return [int(word) for word in _words(text)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time to first token of a real vLLM (vllm-cpu) with and without "
        "LMCacheCppConnector, and a multi-turn chat workload. Run it with the Python of a vLLM "
        "environment with lmcache_cpp installed. Asserts nothing."
    )
    parser.add_argument("--quick", action="store_true", help="smaller prompts, one repetition")
    parser.add_argument(
        "--sections",
        type=_words,
        default=list(SECTIONS),
        help="comma-separated subset of ttft,chat (default: both)",
    )
    parser.add_argument("--sizes", type=_int_list, help="prompt sizes (default 1024,4096,8192)")
    parser.add_argument("--reps", type=int, help="repetitions per prompt size (default 3)")
    parser.add_argument("--layers", type=int, default=6, help="layers of the model (default 6)")
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="the server's chunk size (default 256)"
    )
    parser.add_argument(
        "--compute-cores",
        help="cores of vLLM's worker, e.g. 0 or 0-2 as 0,1,2 (default: all but the last)",
    )
    parser.add_argument("--conversations", type=int, help="chat conversations (default 10)")
    parser.add_argument("--turns", type=int, help="turns per conversation (default 5)")
    parser.add_argument("--in-flight", type=int, default=2, help="conversations at once")
    parser.add_argument("--chat-context", type=int, help="first-turn context tokens (1024)")
    parser.add_argument("--chat-question", type=int, default=128, help="tokens per question")
    parser.add_argument("--answer", type=int, default=16, help="tokens per answer")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--_engine", dest="engine", help=argparse.SUPPRESS)
    parser.add_argument("--_make-model", dest="make_model", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    defaults: dict[str, Any] = {
        "sizes": [1024, 4096, 8192],
        "reps": 3,
        "conversations": 10,
        "turns": 5,
        "chat_context": 1024,
    }
    if args.quick:
        defaults = {
            "sizes": [512, 1024, 2048],
            "reps": 1,
            "conversations": 4,
            "turns": 3,
            "chat_context": 512,
        }
    return apply_defaults(args, defaults)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    role = child_role(
        args, {"engine": engine_main, "make_model": lambda spec: make_model_main(*spec)}
    )
    if role is not None:
        return role
    return run_benchmark(
        "bench_vllm",
        Children,
        lambda children: run(args, children, children.workdir),
        errors=(BenchError,),
        logs=("server", "cold", "first", "l1", "l2", "chat-alone", "chat-lmcache"),
        log_lines=15,
        keep=args.keep,
    )


if __name__ == "__main__":
    sys.exit(main())
