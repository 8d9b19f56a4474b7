"""The lmcache-cpp command line: serve, demo, status, info, l1-demo, --help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmcache_cpp as lc
from lmcache_cpp import cli
from lmcache_cpp.app import serve_argv
from lmcache_cpp.cli import l1_demo

SMALL_DEMO = ["l1-demo", "--objects", "48", "--object-kib", "16", "--arena-mib", "2"]


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache_cpp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_info_prints_version_and_build() -> None:
    proc = run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert f"lmcache_cpp {lc.__version__}" in proc.stdout
    assert "xxhash" in proc.stdout and "compiler" in proc.stdout


def test_info_json() -> None:
    proc = run_module("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["version"] == lc.__version__
    assert info["xxhash"] == lc.build_info()["xxhash"]


def test_l1_demo_small_run_succeeds() -> None:
    proc = run_module(*SMALL_DEMO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "no server runs" in out
    assert "result                OK" in out
    assert "0 mismatches" in out
    assert "evictions" in out
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def test_l1_demo_in_process_reports_hits_and_evictions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*SMALL_DEMO, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    hits = next(line for line in out.splitlines() if line.strip().startswith("lookup hits"))
    got, wanted = hits.split()[-1].split("/")
    assert got == wanted and int(wanted) > 48  # every prompt re-reads the shared prefix
    evictions = next(line for line in out.splitlines() if line.strip().startswith("evictions"))
    assert int(evictions.split()[1]) > 0


def test_l1_demo_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*SMALL_DEMO, "--progress"]) == 0
    err = capsys.readouterr().err
    assert "store  [" in err and "100%" in err and "fill   [" in err


def test_l1_demo_rejects_impossible_sizes() -> None:
    proc = run_module("l1-demo", "--objects", "100", "--object-kib", "64", "--arena-mib", "4")
    assert proc.returncode == 2
    assert "raise --arena-mib" in proc.stderr
    assert run_module("l1-demo", "--objects", "0").returncode == 2


def test_help_lists_every_command_and_the_required_serve_flags() -> None:
    top = run_module("--help")
    assert top.returncode == 0
    for command in ("serve", "demo", "status", "info", "l1-demo"):
        assert command in top.stdout
    serve = run_module("serve", "--help")
    assert serve.returncode == 0
    assert "%%" not in serve.stdout  # argparse formats help strings, not descriptions
    for flag in ("--endpoint", "--l1-size-gb", "--chunk-size", "--l2-adapter", "--config"):
        assert flag in serve.stdout
    # The per-client quotas (docs/operations.md) are all settable.
    for flag in (
        "--max-jobs-per-client",
        "--max-transfers-per-client",
        "--max-registrations-per-client",
        "--max-requests-per-client",
        "--max-reserved-bytes-per-client",
        "--max-sessions-per-client",
        "--max-session-bytes-per-client",
        "--max-queue-wait-s",
    ):
        assert flag in serve.stdout
    demo = run_module("l1-demo", "--help")
    assert demo.returncode == 0
    assert "--object-kib" in demo.stdout


def test_serve_rejects_a_bad_flag_value_with_a_clear_message() -> None:
    proc = run_module("serve", "--l2-adapter", '{"type": "tape"}')
    assert proc.returncode == 2
    assert "tape" in proc.stderr


def test_demo_plays_a_workload_against_a_server_process(tmp_path: Path) -> None:
    proc = run_module(
        "demo",
        "--prompts",
        "3",
        "--chunks",
        "4",
        "--chunk-size",
        "64",
        "--layers",
        "2",
        "--workdir",
        str(tmp_path),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "pass 1: SYNC_LOOKUP, served from L1 12/12 chunks hit (12 L1, 0 L2)" in out
    assert "pass 2: LOOKUP + WAIT, served from L2 12/12 chunks hit (0 L1, 12 L2)" in out
    assert "k = 2: 2 chunks hit" in out
    assert "result OK" in out
    assert any((tmp_path / "l2").rglob("*.kv"))  # the L2 files are real


def test_status_of_a_running_server(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path / 's.sock'}"
    server = subprocess.Popen(
        serve_argv(endpoint, "--l1-size-gb", "0.0625"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == f"READY {endpoint}"
        proc = run_module("status", "--endpoint", endpoint)
        assert proc.returncode == 0, proc.stderr
        assert "L1          0 B of 64.0 MiB" in proc.stdout
        as_json = run_module("status", "--endpoint", endpoint, "--json")
        assert json.loads(as_json.stdout)["engine"]["registrations"] == 0
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_status_without_a_server_fails_cleanly(tmp_path: Path) -> None:
    proc = run_module("status", "--endpoint", f"ipc://{tmp_path / 'none.sock'}", "--timeout", "1")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


def test_no_command_is_a_usage_error() -> None:
    proc = run_module()
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_console_script_is_installed() -> None:
    script = shutil.which("lmcache-cpp", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("lmcache-cpp is not installed next to this interpreter")
    proc = subprocess.run([script, "info"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert lc.__version__ in proc.stdout


def test_l1_demo_fails_when_a_verification_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fault injection into the demo's own byte check (the core is real): the exit code must say so.
    monkeypatch.setattr(l1_demo, "_holds", lambda view, key: False)
    assert cli.main(SMALL_DEMO) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "read back wrong bytes" in captured.err


def test_serve_exits_non_zero_when_its_socket_thread_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that can no longer serve must not stay alive: run_forever returns
    EXIT_SERVER_FAILED (the socket thread's loop is made to fail: a fault injection)."""
    from lmcache_cpp import app, server
    from lmcache_cpp.config import ServerConfig

    def broken_serve(self: server.CacheServer, router: object, results: object) -> None:
        raise MemoryError("injected")

    monkeypatch.setattr(server.CacheServer, "_serve", broken_serve)
    config = ServerConfig(
        endpoint=f"ipc://{tmp_path}/s.sock", l1_size_gb=0.0625, hugepages="off", chunk_size=16
    )
    assert app.run_forever(config, ready_line=False) == app.EXIT_SERVER_FAILED


def test_serve_writes_an_admin_token_only_its_user_can_read(tmp_path: Path) -> None:
    """A forced CLEAR needs the token the server writes beside its ipc:// socket (0600); the file
    goes when the server stops."""
    from lmcache_cpp.app import ServerApp, read_admin_token
    from lmcache_cpp.client import CacheClient
    from lmcache_cpp.config import ServerConfig
    from lmcache_cpp.errors import PermissionDeniedError

    socket_path = tmp_path / "s.sock"
    config = ServerConfig(
        endpoint=f"ipc://{socket_path}", l1_size_gb=0.0625, hugepages="off", chunk_size=16
    )
    token_file = tmp_path / "s.sock.admin"
    with ServerApp(config), CacheClient(f"ipc://{socket_path}", timeout_s=5.0) as client:
        assert token_file.stat().st_mode & 0o777 == 0o600
        with pytest.raises(PermissionDeniedError):
            client.clear(force=True)
        assert client.clear(force=True, admin_token=read_admin_token(str(token_file))) == 0
    assert not token_file.exists()
