"""Engine-driven transfers through a real server: KvTransferClient stores an engine's KV blocks
into the shared L1 arena and retrieves them into other blocks, byte for byte; lookups count what
was stored; a retrieve of anything not stored fails explicitly, never partially."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import lmcache_cpp as lc
from lmcache_cpp.client import CacheClient, Key, KvTransferClient
from lmcache_cpp.errors import InvalidArgumentError, KeyAbsentError
from server_helpers import CHUNK, MODEL, NUM_BLOCKS, Harness, blocks_of, key, kv_cache, tokens

BPC = CHUNK // 4  # engine blocks per chunk


@pytest.fixture
def setup(
    tmp_path: Path,
) -> Iterator[tuple[Harness, lc.CacheEngine, CacheClient, KvTransferClient]]:
    harness = Harness(tmp_path)
    try:
        storage, engine = harness.engine()
        server = harness.server(engine, storage)
        client = harness.client(server)
        _, view = kv_cache(None)
        transfer = KvTransferClient.register(client, MODEL, 1, 0, view)
        yield harness, engine, client, transfer
        transfer.close()
    finally:
        harness.close()


def test_store_then_lookup_finds_every_chunk_and_nothing_else(setup: tuple) -> None:
    _, engine, client, transfer = setup
    _, src_view = kv_cache(seed=1)
    toks = tokens(10 * CHUNK, seed=1)
    published = transfer.store(src_view, np.arange(10 * BPC), key(toks, "store"))
    assert published == 10
    assert client.sync_lookup(key(toks, "lookup")).hit_chunks == 10
    handle = client.lookup(key(toks, "lookup-2"))
    result = client.wait_prefetch_status(handle, 10.0)
    assert result is not None and (result.hit_chunks, result.hit_tokens) == (10, 10 * CHUNK)
    assert result.l1_chunks == 10
    never = tokens(5 * CHUNK, seed=99)
    assert client.sync_lookup(key(never, "miss")).hit_chunks == 0
    # Storing the same chunks again skips them all.
    assert transfer.store(src_view, np.arange(10 * BPC), key(toks, "again")) == 0
    assert engine.stats()["engine"]["store_skipped"] >= 10


def test_retrieve_into_other_blocks_reproduces_every_layer(setup: tuple) -> None:
    _, _, client, transfer = setup
    src, src_view = kv_cache(seed=2)
    dst, dst_view = kv_cache(None)
    toks = tokens(20 * CHUNK, seed=2)
    src_ids = np.arange(20 * BPC)
    dst_ids = np.arange(NUM_BLOCKS - 20 * BPC, NUM_BLOCKS)[::-1].copy()  # other blocks, reversed
    assert transfer.store(src_view, src_ids, key(toks, "w")) == 20
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 20
    assert transfer.retrieve(dst_view, dst_ids, key(toks, "r")) == 20 * CHUNK
    for a, b in zip(blocks_of(src, src_ids), blocks_of(dst, dst_ids), strict=True):
        np.testing.assert_array_equal(a, b)
    # Blocks outside the retrieve were not touched.
    untouched = np.setdiff1d(np.arange(NUM_BLOCKS), dst_ids)
    assert not any(layer[:, untouched].any() for layer in dst)


def test_retrieve_past_what_was_stored_fails_explicitly_then_recovers(setup: tuple) -> None:
    _, engine, client, transfer = setup
    _, src_view = kv_cache(seed=3)
    toks = tokens(60 * CHUNK, seed=3)
    transfer.store(src_view, np.arange(30 * BPC), key(toks, "w", end=30 * CHUNK))
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 30
    _, dst_view = kv_cache(None, num_blocks=60 * BPC)
    ids = np.arange(60 * BPC)
    outcomes = []
    for c in range(60):
        try:
            transfer.retrieve(dst_view, ids, key(toks, "r", start=c * CHUNK, end=(c + 1) * CHUNK))
            outcomes.append(True)
        except KeyAbsentError:
            outcomes.append(False)
    assert outcomes == [True] * 30 + [False] * 30
    assert engine.stats()["engine"]["retrieve_failures"] >= 30
    # The first retrieves returned the leases: a new lookup leases again, and all 30 succeed.
    assert client.sync_lookup(key(toks, "r2")).hit_chunks == 30
    for c in range(30):
        transfer.retrieve(dst_view, ids, key(toks, "r2", start=c * CHUNK, end=(c + 1) * CHUNK))


def test_batches_with_distinct_contents_come_back_into_an_offset_region(setup: tuple) -> None:
    _, _, client, transfer = setup
    toks = tokens(12 * CHUNK, seed=4)
    sources = []
    for batch in range(3):  # chunks [4b, 4b + 4), each batch from a different engine cache
        layers, view = kv_cache(seed=10 + batch)
        ids = np.arange(12 * BPC)  # block j holds tokens [4j, 4j + 4) of the request
        k = key(toks, "w", start=4 * batch * CHUNK, end=4 * (batch + 1) * CHUNK)
        assert transfer.store(view, ids, k) == 4
        sources.append((layers, ids[4 * batch * BPC : 4 * (batch + 1) * BPC]))
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 12
    dst, dst_view = kv_cache(None)
    offset = 50
    dst_ids = np.arange(offset, offset + 12 * BPC)
    transfer.retrieve(dst_view, dst_ids, key(toks, "r"))
    for batch, (layers, ids) in enumerate(sources):
        got = dst_ids[4 * batch * BPC : 4 * (batch + 1) * BPC]
        for a, b in zip(blocks_of(layers, ids), blocks_of(dst, got), strict=True):
            np.testing.assert_array_equal(a, b)


def test_skipped_leading_tokens_are_left_alone(setup: tuple) -> None:
    _, _, client, transfer = setup
    src, src_view = kv_cache(seed=5)
    toks = tokens(4 * CHUNK, seed=5)
    ids = np.arange(4 * BPC)
    transfer.store(src_view, ids, key(toks, "w"))
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 4
    dst, dst_view = kv_cache(None)
    skip = CHUNK + 6  # one whole chunk and 6 tokens (one block and a half) of the next
    assert transfer.retrieve(dst_view, ids, key(toks, "r"), skip_tokens=skip) == 4 * CHUNK
    for s, d in zip(src, dst, strict=True):
        tok_src = s[:, ids].reshape(2, -1, *s.shape[3:])  # [2, tokens, H, D]
        tok_dst = d[:, ids].reshape(2, -1, *d.shape[3:])
        assert not tok_dst[:, :skip].any()
        np.testing.assert_array_equal(tok_src[:, skip:], tok_dst[:, skip:])


def test_a_failed_copy_aborts_the_store(setup: tuple) -> None:
    _, engine, client, transfer = setup
    _, src_view = kv_cache(seed=6)
    toks = tokens(4 * CHUNK, seed=6)
    with pytest.raises(InvalidArgumentError, match="block_ids has"):
        transfer.store(src_view, np.arange(3 * BPC), key(toks, "w"))  # too few blocks
    assert engine.stats()["engine"]["store_aborts"] == 1
    assert engine.stats()["engine"]["transfers"] == 0
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 0
    # The same store with enough blocks works: nothing was left reserved.
    assert transfer.store(src_view, np.arange(4 * BPC), key(toks, "w")) == 4


def test_free_lookup_locks_and_end_session_release_leases(setup: tuple) -> None:
    _, _, client, transfer = setup
    _, src_view = kv_cache(seed=7)
    toks = tokens(8 * CHUNK, seed=7)
    transfer.store(src_view, np.arange(8 * BPC), key(toks, "w"))
    assert client.sync_lookup(key(toks, "r")).hit_chunks == 8
    # Whole chunks of [CHUNK, 3.5 * CHUNK): chunks 1 and 2; chunk 3 is partly covered and stays.
    assert client.free_lookup_locks(key(toks, "r", start=CHUNK, end=7 * CHUNK // 2)) == 2
    assert client.free_lookup_locks(key(toks, "r", start=CHUNK, end=CHUNK)) == 0
    assert client.end_session(MODEL, "r") == 6
    assert client.end_session(MODEL, "r") == 0


def test_a_key_for_every_rank_of_a_larger_world_is_refused(setup: tuple) -> None:
    _, _, _, transfer = setup
    _, view = kv_cache(seed=8)
    with pytest.raises(InvalidArgumentError, match="one rank"):
        transfer.store(view, np.arange(BPC), Key(MODEL, world_size=2, tokens=tokens(CHUNK, 8)))
