"""Real Redis servers for the Redis L2 tests: a standalone ``redis-server`` and a 3-master
cluster on free loopback ports (below 55536, so each cluster bus port, +10000, is valid), in a
temporary directory, without persistence. Every server is stopped when its fixture ends.

Without ``redis-server`` on PATH the fixtures skip with the reason, or fail when
``LMCACHE_CPP_REQUIRE_REDIS=1`` (CI sets it)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 15.0


def require_redis() -> str:
    """The path of redis-server; skips (or fails, under LMCACHE_CPP_REQUIRE_REDIS=1) without it."""
    path = shutil.which("redis-server")
    if path is None or shutil.which("redis-cli") is None:
        reason = "redis-server and redis-cli are not on PATH"
        if os.environ.get("LMCACHE_CPP_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason} (LMCACHE_CPP_REQUIRE_REDIS=1)")
        pytest.skip(reason)
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port below 55536 that is free, and whose cluster bus port is free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def cli(port: int, *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        timeout=10,
        check=True,
    )
    return out.stdout.decode(errors="replace").strip()


@dataclass
class RedisServer:
    """One redis-server process; restartable on the same port and directory."""

    binary: str
    directory: Path
    port: int
    cluster: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "allkeys-lru",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-require-full-coverage",
                "no",
            ]
        log = (self.directory / "server.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if cli(self.port, "PING") == "PONG":
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class RedisCluster:
    masters: list[RedisServer]

    @property
    def url(self) -> str:
        return self.masters[0].url

    def wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for m in self.masters:
            while "cluster_state:ok" not in cli(m.port, "CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {m.port} never reported cluster_state:ok")
                time.sleep(0.1)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(require_redis(), tmp_path / "redis", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    binary = require_redis()
    masters: list[RedisServer] = []
    try:
        for i in range(3):
            port = free_port()
            while any(m.port == port for m in masters):
                port = free_port()
            m = RedisServer(binary, tmp_path / f"node{i}", port, cluster=True)
            masters.append(m)
            m.start()
        nodes = [f"127.0.0.1:{m.port}" for m in masters]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        cluster = RedisCluster(masters)
        cluster.wait_ok()
        yield cluster
    finally:
        for m in masters:
            m.stop()
