"""End to end: a load that fails after its lookup hit is recomputed, deterministically, with
vLLM's default ``kv_load_failure_policy`` (the connector sets ``"recompute"`` itself); and a
prompt of a whole number of chunks is loaded up to its last token.

One engine (sync lookups, hash keys) in the driver's own process, so that the driver can make
the connector's next load fail (``Engine.fail_next_loads``): the load copies its chunks, then
overwrites them with a constant and raises. vLLM must then recompute those tokens; greedy
outputs equal to a run that computed everything show that it did not use the poisoned blocks.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import CHUNK, Engine, Server, Status, delta, prompt, wait_for

PROMPT_LEN = 600
LOADABLE = PROMPT_LEN // CHUNK * CHUNK  # 576: the 9 whole chunks

_seeds = itertools.count(5000)


@pytest.fixture(scope="module")
def setup(servers: Any, engines: Any) -> Iterator[tuple[Server, Engine]]:
    server = servers(l2=False)
    engine = engines(server.endpoint, failure_policy=None).wait_ready()
    yield server, engine
    engine.close()


def _stored(server: Server, engine: Engine, p: list[int]) -> tuple[list[list[int]], Status]:
    """Runs ``p`` once (computed, stored), resets vLLM's prefix cache and waits for the stores;
    returns the outputs and the server's STATUS after the stores."""
    before = server.status()
    outputs, cached = engine.generate([p])
    assert cached == [0]
    engine.reset_prefix_cache()
    chunks = len(p) // CHUNK
    stored = wait_for(
        lambda: (s := server.status()) and delta(s, before, "store_chunks") >= chunks and s,
        f"{chunks} chunks stored",
    )
    return outputs, stored


def test_failed_load_is_recomputed_with_vllms_default_policy(
    setup: tuple[Server, Engine],
) -> None:
    server, engine = setup
    assert "kv_load_failure_policy 'fail' -> 'recompute'" in engine.log()
    p = prompt(PROMPT_LEN, next(_seeds))
    first, stored = _stored(server, engine, p)
    # Computed from scratch: a fresh cache salt shares no KV in vLLM or lmcache_cpp.
    reference, cached = engine.generate([p], cache_salt=secrets.token_hex(8))
    assert cached == [0]
    assert first == reference

    engine.fail_next_loads(1)
    outputs, _ = engine.generate([p])
    after = server.status()
    assert delta(after, stored, "hit_chunks") == LOADABLE // CHUNK
    assert delta(after, stored, "retrieve_chunks") == LOADABLE // CHUNK  # the load ran
    assert outputs == reference, "vLLM used the blocks of the failed load, or failed the request"
    log = engine.log()
    assert "Recovered from KV load failure" in log, "vLLM did not recompute the failed load"
    assert "due to KV load failure" not in log, "vLLM failed a request"

    # The failure was the request's alone: the next run is served by the connector again.
    engine.reset_prefix_cache()
    outputs, cached = engine.generate([p])
    assert cached == [LOADABLE]
    assert outputs == reference
    wait_for(lambda: server.status()["l1"]["read_leases"] == 0, "leases released")


def test_prompt_of_whole_chunks_is_loaded_up_to_its_last_token(
    setup: tuple[Server, Engine],
) -> None:
    server, engine = setup
    p = prompt(10 * CHUNK, next(_seeds))
    first, stored = _stored(server, engine, p)
    outputs, cached = engine.generate([p])
    after = server.status()
    # vLLM computes only the last token: the last chunk is loaded whole, and vLLM overwrites that
    # token's KV when it computes it.
    assert cached == [len(p) - 1]
    assert outputs == first
    assert delta(after, stored, "hit_chunks") == 10
    assert delta(after, stored, "retrieve_chunks") == 10


def test_a_lookup_the_server_refuses_is_a_miss_for_that_request_only(
    servers: Any, engines: Any
) -> None:
    """A lookup answered with an error (here ResourceExhausted: the prompt names more objects
    than --max-keys-per-request) is a miss for that request; the server is not marked down, so
    the next request in the same step is still served from the cache."""
    server = servers(l2=False, extra_args=["--max-keys-per-request", "8"])
    engine = engines(server.endpoint).wait_ready()
    try:
        short = prompt(5 * CHUNK + 20, next(_seeds))
        reference, _ = _stored(server, engine, short)
        long = prompt(12 * CHUNK + 20, next(_seeds))
        outputs, cached = engine.generate([long, short])
        assert cached == [0, 5 * CHUNK], "the refused lookup took the next request's hit with it"
        assert outputs[1] == reference[0]
        assert "a lookup failed" in engine.log()
        assert "the cache server is unusable" not in engine.log()
    finally:
        engine.close()
