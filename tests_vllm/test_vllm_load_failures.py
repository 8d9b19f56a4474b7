"""End to end: KV computed over the blocks of a failed load is never stored, and what vLLM
recomputes after the failure is stored again (issue 14, item 1).

Prompt A (4 whole chunks and a tail) is stored. Then A + C (C: 2 more whole chunks and a tail)
is sent: the lookup finds A's 4 chunks and their load fails, either because the test hook of
``engine_driver.py`` poisons the blocks and raises, or because every L2 file was corrupted after
L1 was cleared (the server's checksum refuses them). The same step computes C's 2 chunks over
A's blocks, which hold garbage. vLLM discards that step and recomputes A + C.

Afterwards, a fresh vLLM process whose whole chunks all come from the cache must generate
exactly the tokens of vLLM alone (an engine without the connector): that fails if C's chunks
were stored from the failed step. The recomputed chunks must have been stored again: the
server's counters show one store of all 6 chunks, the present ones skipped.

Every (lookup mode, key mode) has its own engine (in the driver's process, for the test hook);
one cache server, one engine without the connector, and one fresh engine per key mode serve
all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import CHUNK, Engine, Server, Status, delta, prompt, wait_for

A_LEN = 4 * CHUNK + 10  # 4 whole chunks and a tail
C_LEN = 2 * CHUNK + 20  # A + C: 6 whole chunks and a tail of 30 tokens
A_CHUNKS, WHOLE = 4, 6
MAX_TOKENS = 16

_seeds = itertools.count(9000)

MODES = [
    pytest.param(("sync", "hash"), id="sync-hash"),
    pytest.param(("sync", "tokens"), id="sync-tokens"),
    pytest.param(("async", "hash"), id="async-hash"),
    pytest.param(("async", "tokens"), id="async-tokens"),
]


@pytest.fixture(scope="module")
def server(servers: Any) -> Server:
    return servers(l2=True)


@pytest.fixture(scope="module")
def plain(engines: Any) -> Iterator[Engine]:
    """vLLM alone (no connector): the reference outputs."""
    engine = engines(None).wait_ready()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fresh(server: Server, engines: Any) -> Iterator[Callable[[str], Engine]]:
    """One engine per key mode, started when first needed, that never runs a prompt before it
    checks it: every whole chunk it gets comes from the cache."""
    made: dict[str, Engine] = {}

    def get(key_mode: str) -> Engine:
        if key_mode not in made:
            made[key_mode] = engines(server.endpoint, key_mode=key_mode).wait_ready()
        return made[key_mode]

    yield get
    for engine in made.values():
        engine.close()


@dataclass
class Case:
    engine: Engine
    lookup_mode: str
    key_mode: str


@pytest.fixture(scope="module", params=MODES)
def case(request: pytest.FixtureRequest, server: Server, engines: Any) -> Iterator[Case]:
    lookup_mode, key_mode = request.param
    engine = engines(server.endpoint, lookup_mode=lookup_mode, key_mode=key_mode).wait_ready()
    yield Case(engine, lookup_mode, key_mode)
    engine.close()


def _stores_settled(server: Server, before: Status, chunks: int, skipped: int = 0) -> Status:
    def settled() -> Status | None:
        s = server.status()
        stored = delta(s, before, "store_chunks") >= chunks
        return s if stored and delta(s, before, "store_skipped") >= skipped else None

    return wait_for(settled, f"{chunks} chunks stored, {skipped} skipped as present")


def _l2_drained(server: Server) -> None:
    client = server.client()
    wait_for(
        lambda: (
            (s := client.status())["store"]["queued"] == 0 and s["store"]["in_flight_batches"] == 0
        ),
        "L2 stores to drain",
    )


def _corrupt_l2(server: Server) -> int:
    """Clears L1 and flips the last payload byte of every L2 object file; returns the count."""
    _l2_drained(server)
    server.client().clear(force=True, admin_token=server.admin_token())
    assert server.status()["l1"]["objects"] == 0
    assert server.l2_dir is not None
    files = [p for p in Path(server.l2_dir).rglob("*.kv") if p.is_file()]
    for path in files:
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x5A
        path.write_bytes(bytes(raw))
    return len(files)


@pytest.mark.parametrize("failure", ["injected", "corrupt-l2"])
def test_kv_of_a_failed_load_is_never_stored_and_the_recompute_is(
    failure: str, case: Case, server: Server, plain: Engine, fresh: Callable[[str], Engine]
) -> None:
    engine = case.engine
    a = prompt(A_LEN, next(_seeds))
    ac = a + prompt(C_LEN, next(_seeds))
    reference, cached = plain.generate([ac], MAX_TOKENS)
    assert cached == [0]

    # A is computed and stored: 4 chunks.
    before = server.status()
    engine.generate([a], MAX_TOKENS)
    engine.reset_prefix_cache()
    _stores_settled(server, before, A_CHUNKS)

    if failure == "injected":
        engine.fail_next_loads(1)
    else:
        assert _corrupt_l2(server) >= A_CHUNKS
    start = server.status()
    outputs, _ = engine.generate([ac], MAX_TOKENS)
    assert outputs == reference, "vLLM computed on the blocks of the failed load"
    after = server.status()
    log = engine.log()
    assert "due to KV load failure" not in log, "vLLM failed a request"
    # An async lookup answers once the server's L2 load is done, and the corrupt files are a
    # miss then: nothing is loaded, nothing fails. A sync lookup answers before the L2 load.
    loads = not (failure == "corrupt-l2" and case.lookup_mode == "async")
    assert delta(after, start, "hit_chunks") == (A_CHUNKS if loads else 0)
    if failure == "injected":
        assert delta(after, start, "retrieve_chunks") == A_CHUNKS  # the load ran, then failed
    elif loads:
        assert delta(after, start, "retrieve_failures") >= 1
    if loads:
        assert "Recovered from KV load failure" in log, "vLLM did not recompute the failed load"
        failed_loads = [line for line in log.splitlines() if "load of request" in line]
        assert failed_loads and "WARNING" in failed_loads[-1], failed_loads[-3:]
        assert f"chunks [0, {A_CHUNKS})" in failed_loads[-1]

    # One store of the 6 recomputed chunks. After the injected failure A's chunks are still in
    # L1 (intact: the hook poisoned vLLM's blocks, not the objects) and are skipped; after the
    # corrupt L2 files none is left, and all 6 are stored again.
    if failure == "injected":
        stored = _stores_settled(server, start, WHOLE - A_CHUNKS, skipped=A_CHUNKS)
        assert delta(stored, start, "store_skipped") == A_CHUNKS
        assert delta(stored, start, "store_chunks") == WHOLE - A_CHUNKS
    else:
        stored = _stores_settled(server, start, WHOLE)
        assert delta(stored, start, "store_chunks") == WHOLE

    # A fresh vLLM process gets all 6 chunks from the cache and generates vLLM's own tokens.
    checker = fresh(case.key_mode)
    served = server.status()
    outputs, cached = checker.generate([ac], MAX_TOKENS)
    assert cached == [WHOLE * CHUNK]
    assert outputs == reference, "the cache served KV computed over the blocks of a failed load"
    assert delta(server.status(), served, "hit_chunks") == WHOLE
    checker.reset_prefix_cache()

    if failure == "corrupt-l2":
        # The corrupt files were dropped and the recomputed chunks written again: L2 serves them.
        _l2_drained(server)
        server.client().clear(force=True, admin_token=server.admin_token())
        flushed = server.status()
        outputs, cached = checker.generate([ac], MAX_TOKENS)
        assert cached == [WHOLE * CHUNK]
        assert outputs == reference
        assert delta(server.status(), flushed, "l2_hit_chunks") == WHOLE
        checker.reset_prefix_cache()


def test_request_finished_in_its_load_step_still_stores_its_new_chunks(
    case: Case, server: Server
) -> None:
    """A store that waits for its step's load outcome is not lost when the request finishes in
    that very step (one output token): it goes out with the next step."""
    engine = case.engine
    a = prompt(A_LEN, next(_seeds))
    ac = a + prompt(C_LEN, next(_seeds))
    before = server.status()
    engine.generate([a], 1)
    engine.reset_prefix_cache()
    _stores_settled(server, before, A_CHUNKS)

    start = server.status()
    _, cached = engine.generate([ac], 1)
    assert cached == [A_CHUNKS * CHUNK]
    engine.reset_prefix_cache()  # runs the engine's next steps
    stored = _stores_settled(server, start, WHOLE - A_CHUNKS)
    assert delta(stored, start, "store_chunks") == WHOLE - A_CHUNKS
