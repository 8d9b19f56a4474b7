"""The server-driven transfer mode (STORE/RETRIEVE) on the fake device layer: a real server
process (``--device fake``) and real engine processes (``tests/device_engine.py``) whose "device"
KV cache is shared memory and whose events are FIFOs (``lmcache_cpp.device.fake``). The CUDA
layer is the same protocol over CUDA IPC handles; ``scripts/gpu_check.sh`` runs it on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, Key
from lmcache_cpp.device import KvRecord, make_device_layer, pack_kv_records, unpack_kv_records
from lmcache_cpp.device.fake import FakeEngineEvent, FakeEngineKv, wait_reply
from lmcache_cpp.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    UnavailableError,
)
from lmcache_cpp.protocol import RequestType, bodies
from lmcache_cpp.server import ServerOptions
from test_server_process import StartServer
from test_server_process import start_server as _start_server

start_server = _start_server  # the real server process fixture, shared with that module

ENGINE = str(Path(__file__).with_name("device_engine.py"))
sys.path.insert(0, str(Path(__file__).parent))
import device_engine  # noqa: E402

FAKE = {"device": "fake"}


def run_engine(endpoint: str, scenario: str, layout: str = "nhd") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, ENGINE, endpoint, scenario, layout],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )


def lines_of(proc: subprocess.Popen[str], timeout: float = 60.0) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def held(client: CacheClient) -> dict[str, Any]:
    """What the server holds for every client, and its device mappings."""
    status = client.status()
    mine = status["clients"]
    return {
        "tickets": sum(c["tickets"] for c in mine),
        "reserved_bytes": sum(c["reserved_bytes"] for c in mine),
        "registrations": sum(c["registrations"] for c in mine),
        "mappings": status["server"]["device"]["mappings"],
        "write_leases": status["l1"]["write_leases"],
    }


def wait_until_released(client: CacheClient, deadline_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while True:
        now = held(client)
        if not any(now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


@pytest.mark.parametrize("layout", ["nhd", "hnd", "flashinfer", "mla"])
def test_store_then_retrieve_is_byte_exact(start_server: StartServer, layout: str) -> None:
    server = start_server(**FAKE)
    engine = run_engine(server.endpoint, "roundtrip", layout)
    (result,) = lines_of(engine)
    assert engine.returncode == 0, result
    assert result == {
        "published": device_engine.CHUNKS,
        "tokens": device_engine.CHUNKS * device_engine.CHUNK,
        "stored": True,
        "loaded": True,
        "exact": True,
    }
    assert wait_until_released(server.client(), 10.0) == dict.fromkeys(
        ("tickets", "reserved_bytes", "registrations", "mappings", "write_leases"), 0
    )


def test_an_event_never_signalled_times_out_and_holds_nothing(start_server: StartServer) -> None:
    server = start_server(**FAKE)
    other = server.client()
    engine = run_engine(server.endpoint, "hang")
    # Meanwhile the server serves others at once (the wait is on a pool thread).
    started = time.monotonic()
    while engine.poll() is None and time.monotonic() - started < 1.0:
        t = time.monotonic()
        other.ping()
        assert other.get_chunk_size() == device_engine.CHUNK
        assert time.monotonic() - t < 0.5
        time.sleep(0.05)
    registered, failed = lines_of(engine)
    assert engine.returncode == 0
    assert failed["error"] == "DeadlineExceededError"
    assert "not signalled within 1.5 s" in failed["message"]
    assert 1.4 < failed["seconds"] < 5.0  # the deadline, not the client's own timeout
    assert registered["registered"] > 0
    assert wait_until_released(other, 10.0)["tickets"] == 0
    assert held(other)["write_leases"] == 0


def test_an_engine_killed_mid_transfer_has_its_mappings_released(
    start_server: StartServer,
) -> None:
    server = start_server(**FAKE, heartbeat_grace_s=1.0)
    observer = server.client()
    engine = run_engine(server.endpoint, "hang-long")
    assert engine.stdout is not None
    assert "registered" in json.loads(engine.stdout.readline())
    deadline = time.monotonic() + 5
    while held(observer)["mappings"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held(observer)["mappings"] == 1
    time.sleep(0.3)  # the STORE is now waiting on the engine's event
    engine.kill()
    engine.wait()
    # The wait ends at its deadline (5 s) with nothing reserved; the heartbeat grace then ends
    # the client, with its registration, mapping and any leases.
    assert wait_until_released(observer, 20.0) == dict.fromkeys(
        ("tickets", "reserved_bytes", "registrations", "mappings", "write_leases"), 0
    )


def test_forged_and_wrong_handles_get_clear_errors(start_server: StartServer) -> None:
    server = start_server(**FAKE)
    client = server.client()
    layout = device_engine.layout_of("nhd")
    kv = FakeEngineKv(layout)
    try:

        def register(records: list[KvRecord], kind: str = "fake", device_id: int = 0) -> int:
            device = bodies.WireDeviceKv(kind, pack_kv_records(records), device_id)
            return int(client.register_kv_cache("m", 1, 0, layout, device)["registration_id"])

        def forged(handle: bytes, **kw: int) -> list[KvRecord]:
            r = kv.records[0]
            fields = {"offset": r.offset, "size": r.size, **kw}
            return [KvRecord(handle.ljust(64, b"\0"), **fields), *kv.records[1:]]

        with pytest.raises(InvalidArgumentError, match="not a fake device name"):
            register(forged(b"../../etc/passwd"))
        with pytest.raises(InvalidArgumentError, match="cannot open"):
            register(forged(b"lmcache-fake-kv-nobody"))
        with pytest.raises(InvalidArgumentError, match="the layout needs"):
            register(forged(kv.records[0].handle, size=16))
        with pytest.raises(InvalidArgumentError, match="not inside segment"):
            register(forged(kv.records[0].handle, offset=1 << 30))
        with pytest.raises(InvalidArgumentError, match="80 bytes per layer"):
            register(kv.records[:1])
        with pytest.raises(InvalidArgumentError, match="this server runs --device fake"):
            register(kv.records, kind="cuda")
        assert held(client)["registrations"] == 0  # refused registrations left nothing
        rid = register(kv.records)
        toks = np.arange(2 * device_engine.CHUNK, dtype=np.uint32)
        ids = np.arange(4, dtype="<i8").tobytes()

        def store(event: bytes, registration_id: int = rid) -> None:
            body = bodies.DeviceStoreRequest(
                Key("m", tokens=toks).to_wire_key(), registration_id, ids, event, 1.0
            )
            client.device_transfer(RequestType.STORE, body)

        with pytest.raises(InvalidArgumentError, match="not a fake device name"):
            store(b"\x01" * 64)
        with pytest.raises(InvalidArgumentError, match="cannot open"):
            store(b"lmcache-fake-ev-nobody".ljust(64, b"\0"))
        with pytest.raises(InvalidArgumentError, match="not a fake event"):
            store(kv.records[0].handle)
        with pytest.raises(NotFoundError, match="no device mapping"):
            store(b"lmcache-fake-ev-x".ljust(64, b"\0"), registration_id=rid + 1000)
        event = FakeEngineEvent()
        try:
            intruder = server.client()
            body = bodies.DeviceStoreRequest(
                Key("m", tokens=toks).to_wire_key(), rid, ids, event.handle, 1.0
            )
            with pytest.raises(PermissionDeniedError, match="another client"):
                intruder.device_transfer(RequestType.STORE, body)
        finally:
            event.close()
        assert held(client)["tickets"] == 0
        client.unregister_kv_cache(rid)
        assert held(client)["mappings"] == 0
    finally:
        kv.close()


def test_a_server_without_a_device_layer_refuses_server_driven_requests(
    start_server: StartServer,
) -> None:
    server = start_server()
    client = server.client()
    layout = device_engine.layout_of("nhd")
    kv = FakeEngineKv(layout)
    try:
        device = bodies.WireDeviceKv("fake", pack_kv_records(kv.records))
        with pytest.raises(NotSupportedError, match="without --device"):
            client.register_kv_cache("m", 1, 0, layout, device)
        body = bodies.DeviceStoreRequest(
            Key("m", tokens=np.arange(16, dtype=np.uint32)).to_wire_key(), 1, b"", b"\0" * 64
        )
        for rt in (RequestType.STORE, RequestType.RETRIEVE):
            with pytest.raises(NotSupportedError, match="CUDA IPC"):
                client.device_transfer(rt, body)
        assert held(client)["registrations"] == 0
    finally:
        kv.close()


def test_kv_records_round_trip_and_are_checked() -> None:
    records = [KvRecord(b"a".ljust(64, b"\0"), 0, 10), KvRecord(b"b".ljust(64, b"\0"), 10, 5)]
    assert unpack_kv_records(pack_kv_records(records), 2) == records
    with pytest.raises(InvalidArgumentError, match="80 bytes per layer"):
        unpack_kv_records(pack_kv_records(records), 3)


def test_the_engine_driven_registration_is_unchanged_on_the_wire() -> None:
    layout = bodies.WireLayout("nhd", 2, 8, 2, 16, 2, 64)
    wire = bodies.RegisterRequest("m", 1, 0, layout).to_wire()
    assert list(wire) == ["model_name", "world_size", "worker_id", "layout"]
    assert lc.KvLayout.NHD is not None


def test_the_cuda_layer_says_why_it_cannot_run_here() -> None:
    info = lc.cuda_info()
    if info["usable"]:
        pytest.skip("a usable CUDA device is present (tests/test_device_cuda.py runs there)")
    expected = UnavailableError if info["built"] else NotSupportedError
    with pytest.raises(expected, match="--device cuda"):
        make_device_layer("cuda")
    assert make_device_layer("none") is None
    with pytest.raises(ValueError, match=r"ServerOptions\.device"):
        ServerOptions(device="gpu")


def test_a_fake_event_wait_honours_its_deadline() -> None:
    from lmcache_cpp.device.fake import FakeDeviceLayer

    layout = device_engine.layout_of("mla")
    engine_kv = FakeEngineKv(layout)
    kv = FakeDeviceLayer().open_kv(layout, 0, engine_kv.records)
    event = FakeEngineEvent()
    try:
        imported = kv.open_event(event.handle)
        started = time.monotonic()
        assert not imported.wait(0.2)  # never signalled: False at the deadline
        assert 0.19 < time.monotonic() - started < 2.0
        event.signal()
        assert imported.wait(5.0)  # signalled before the wait
        assert not imported.wait(0.0)  # one wait per signal
        timer = threading.Timer(0.1, event.signal)
        timer.start()
        assert imported.wait(30.0)  # signalled during the wait
        timer.join()
        imported.close()
        kv.signal_reply()
        assert wait_reply(kv.reply_event, 5.0)
    finally:
        event.close()
        kv.close()
        engine_kv.close()
