"""Per-client quotas (issue 15, item 5): what each client holds is counted per client in STATUS
and /metrics, and one client at its quota is refused while others are served. Real server, real
sockets, real storage stack."""

from __future__ import annotations

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, KvTransferClient
from lmcache_cpp.metrics import Metrics
from server_helpers import CHUNK, MODEL, Harness, key, kv_cache, layout, tokens
from test_metrics import parse_exposition


def _usage(client: CacheClient, of: CacheClient) -> dict[str, int]:
    assert of.hello_info is not None
    for entry in client.status()["clients"]:
        if entry["client"] == of.hello_info.client_id:
            return dict(entry)
    raise AssertionError(f"client {of.hello_info.client_id} is not in STATUS")


def test_status_and_metrics_count_what_each_client_holds(harness: Harness) -> None:
    storage, engine = harness.engine()
    server = harness.server(engine, storage)
    scheduler = harness.client(server, name="scheduler")
    worker = harness.client(server, name="worker")
    _layers, view = kv_cache(3)
    transfer = KvTransferClient.register(worker, MODEL, 1, 0, view)
    stored = tokens(4 * CHUNK, 3)
    assert transfer.store(view, list(range(16)), key(stored, "s")) == 4
    scheduler.lookup(key(stored, "a"))  # a two-phase lookup, not collected
    assert scheduler.sync_lookup(key(stored, "b")).hit_chunks == 4
    ticket = worker.prepare_store(key(tokens(2 * CHUNK, 4), "s2"))

    mine = _usage(scheduler, scheduler)
    assert mine["name"] == "scheduler"
    assert (mine["requests"], mine["jobs"], mine["sessions"]) == (2, 2, 2)
    assert mine["session_bytes"] > 4 * CHUNK * 4
    assert mine["registrations"] == mine["tickets"] == mine["reserved_bytes"] == 0
    theirs = _usage(scheduler, worker)
    assert theirs["name"] == "worker"
    assert (theirs["registrations"], theirs["tickets"]) == (1, 1)
    assert theirs["reserved_bytes"] == 2 * ticket.object_bytes
    assert theirs["blocking"] == 0

    metrics = Metrics()
    stats = dict(engine.stats())
    stats["clients"] = server.client_usage()
    e = parse_exposition(metrics.render(stats))
    assert worker.hello_info is not None and scheduler.hello_info is not None
    w = str(worker.hello_info.client_id)
    s = str(scheduler.hello_info.client_id)
    assert e.value("lmcache_cpp_client_reserved_bytes", client=w) == 2 * ticket.object_bytes
    assert e.value("lmcache_cpp_client_requests", client=s) == 2
    assert e.value("lmcache_cpp_client_hash_sessions", client=s) == 2

    # Everything goes back: the store commits, the sessions end, the worker leaves.
    worker.commit_store(ticket.handle, success=False)
    scheduler.end_session(MODEL, "a")
    scheduler.end_session(MODEL, "b")
    mine = _usage(scheduler, scheduler)
    assert (mine["requests"], mine["jobs"], mine["sessions"], mine["session_bytes"]) == (0, 0, 0, 0)
    worker.close()
    assert all(u["reserved_bytes"] == 0 for u in scheduler.status()["clients"])


def test_one_client_at_its_request_quota_is_refused_and_others_are_not(harness: Harness) -> None:
    storage, engine = harness.engine(max_requests_per_client=3)
    server = harness.server(engine, storage)
    greedy = harness.client(server)
    other = harness.client(server)
    greedy.register_kv_cache(MODEL, 1, 0, layout())
    toks = tokens(2 * CHUNK, 5)
    for i in range(3):
        greedy.lookup(key(toks, f"g{i}"))
    with pytest.raises(lc.ResourceExhaustedError, match="--max-requests-per-client"):
        greedy.lookup(key(toks, "g3"))
    assert other.sync_lookup(key(toks, "o0")).hit_chunks == 0  # its own quota
    greedy.end_session(MODEL, "g0")
    greedy.lookup(key(toks, "g3"))  # room again


def test_one_worker_cannot_reserve_more_of_the_arena_than_its_quota(harness: Harness) -> None:
    storage, engine = harness.engine(max_reserved_bytes_per_client=64 << 10)
    server = harness.server(engine, storage)
    a = harness.client(server)
    b = harness.client(server)
    for c in (a, b):
        c.register_kv_cache(MODEL, 1, 0, layout())
    quota = engine.reserved_bytes_quota
    first = a.prepare_store(key(tokens(4 * CHUNK, 6), "x"))
    per_chunk = first.object_bytes
    chunks = quota // per_chunk  # a store of this many more chunks passes the quota
    assert 4 < chunks < 100
    with pytest.raises(lc.ResourceExhaustedError, match="--max-reserved-bytes-per-client"):
        a.prepare_store(key(tokens(chunks * CHUNK, 7), "y"))
    assert engine.stats()["l1"]["write_leases"] == 4  # the refused store reserved nothing
    ticket = b.prepare_store(key(tokens(4 * CHUNK, 8), "z"))  # another worker is not affected
    assert np.count_nonzero(np.asarray(ticket.offsets) >= 0) == 4
