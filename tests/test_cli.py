"""The lmcache-cpp command line: info, l1-demo, --help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmcache_cpp as lc
from lmcache_cpp import cli

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
    assert "no server yet" in out
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


def test_help_says_there_is_no_server_yet() -> None:
    top = run_module("--help")
    assert top.returncode == 0
    assert "info" in top.stdout and "l1-demo" in top.stdout
    assert "server is not implemented yet" in " ".join(top.stdout.split())
    assert run_module("serve").returncode == 2  # not a command (yet)
    demo = run_module("l1-demo", "--help")
    assert demo.returncode == 0
    assert "no server" in demo.stdout
    assert "--object-kib" in demo.stdout


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
    monkeypatch.setattr(cli, "_holds", lambda view, key: False)
    assert cli.main(SMALL_DEMO) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "read back wrong bytes" in captured.err
