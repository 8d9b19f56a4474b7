"""Both transfer modes on a GPU with a real server process and an engine process holding torch
CUDA tensors in vLLM's layouts (tests/device_engine_cuda.py): engine-driven (CudaKvTransferClient)
and server-driven (a ``--device cuda`` server, the KV registered by CUDA IPC handles).
Needs a CUDA build, torch with CUDA and a device: skips with the reason elsewhere (fails with
LMCACHE_CPP_REQUIRE_GPU=1, as scripts/gpu_check.sh sets it). The same protocol runs on the CPU in
tests/test_device_transfers.py through the fake device layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_helpers import require_gpu
from test_server_process import StartServer
from test_server_process import start_server as _start_server

start_server = _start_server  # the real server process fixture, shared with that module

ENGINE = str(Path(__file__).with_name("device_engine_cuda.py"))


def run_engine(endpoint: str, scenario: str, layout: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, ENGINE, endpoint, scenario, layout],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr
    return proc.returncode, json.loads(lines[-1])


@pytest.mark.parametrize("layout", ["nhd", "hnd", "flashinfer", "mla"])
def test_cuda_store_then_retrieve_is_byte_exact(start_server: StartServer, layout: str) -> None:
    require_gpu(needs=("zmq", "msgpack"))
    server = start_server(device="cuda")
    rc, result = run_engine(server.endpoint, "roundtrip", layout)
    assert rc == 0, result
    assert result["exact"] is True


@pytest.mark.parametrize("layout", ["nhd", "hnd", "flashinfer", "mla"])
def test_engine_driven_round_trip_from_another_process(
    start_server: StartServer, layout: str
) -> None:
    require_gpu(needs=("zmq", "msgpack"))
    server = start_server()
    rc, result = run_engine(server.endpoint, "engine-driven", layout)
    assert rc == 0, result
    assert result["exact"] is True


def test_cuda_event_not_done_in_time_is_a_timeout(start_server: StartServer) -> None:
    require_gpu(needs=("zmq", "msgpack"))
    server = start_server(device="cuda")
    rc, result = run_engine(server.endpoint, "hang", "nhd")
    assert rc == 0, result
    assert result["error"] == "DeadlineExceededError"
    status = server.client().status()
    assert all(c["tickets"] == 0 for c in status["clients"])
