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
from lmcache_cpp.errors import InvalidArgumentError, KeyAbsentError, PermissionDeniedError
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


# ---- integrity (docs/design/integrity.md) ------------------------------------------------------


def test_a_repeated_sync_lookup_leaves_the_next_retrieve_its_leases(setup: tuple) -> None:
    """SYNC_LOOKUP, a retrieve, SYNC_LOOKUP again for the same request (as after a preemption):
    the next retrieve succeeds, and nothing is left leased."""
    _, engine, client, transfer = setup
    _, src_view = kv_cache(seed=11)
    toks = tokens(4 * CHUNK, seed=11)
    assert transfer.store(src_view, np.arange(4 * BPC), key(toks, "w")) == 4
    _, dst_view = kv_cache(None)
    ids = np.arange(4 * BPC)
    for _ in range(3):
        assert client.sync_lookup(key(toks, "r")).hit_chunks == 4
        assert transfer.retrieve(dst_view, ids, key(toks, "r", end=4 * CHUNK)) == 4 * CHUNK
    assert engine.stats()["l1"]["read_leases"] == 0


def _crc32c(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli), independent of the library's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_commit_store_carries_the_workers_checksums_and_bad_bytes_never_reach_l2(
    tmp_path: Path,
) -> None:
    harness = Harness(tmp_path)
    try:
        l2 = lc.MemoryL2Adapter()
        storage, engine = harness.engine(adapters=[l2])
        client = harness.client(harness.server(engine, storage))
        _, view = kv_cache(None)
        transfer = KvTransferClient.register(client, MODEL, 1, 0, view)
        toks = tokens(3 * CHUNK, seed=12)
        ticket = client.prepare_store(key(toks, "", end=3 * CHUNK))
        assert len(ticket.offsets) == 3
        with pytest.raises(InvalidArgumentError, match="checksums"):
            client.commit_store(ticket.handle, crc32c=[1, 2])
        # The arena bytes of the reserved objects are zeros here (a fresh arena).
        good = _crc32c(bytes(ticket.object_bytes))
        ticket = client.prepare_store(key(toks, "", end=3 * CHUNK))
        assert client.commit_store(ticket.handle, crc32c=[good, good ^ 1, good]) == 3
        assert storage.store_controller().wait_idle(10.0)
        found = client.sync_lookup(key(toks, "r"))
        assert found.hit_chunks == 1, "chunk 1's bytes do not match its checksum: not served on"
        assert engine.stats()["store"]["corrupt_in_l1"] == 1
        assert l2.stats().objects == 2
        transfer.close()
    finally:
        harness.close()


@pytest.mark.parametrize("key_mode", ["tokens", "hash"])
@pytest.mark.parametrize("lookup_mode", ["sync", "two-phase"])
def test_a_512_chunk_key_round_trips_byte_exactly(
    tmp_path: Path, key_mode: str, lookup_mode: str
) -> None:
    """128K tokens in 256-token chunks: every chunk found, and every byte retrieved, in both key
    modes and both lookup modes (upstream served wrong KV past 114 chunks)."""
    chunk, chunks = 256, 512
    bpc = chunk // 4
    harness = Harness(tmp_path)
    try:
        storage, engine = harness.engine(chunk_size=chunk, arena_bytes=40 << 20)
        client = harness.client(harness.server(engine, storage))
        num_blocks = chunks * bpc
        src, src_view = kv_cache(seed=13, num_blocks=num_blocks)
        dst, dst_view = kv_cache(None, num_blocks=num_blocks)
        transfer = KvTransferClient.register(
            client, MODEL, 1, 0, lc.KvCacheView(dst, lc.KvLayout.NHD)
        )
        toks = tokens(chunks * chunk, seed=13)
        hashes = np.random.default_rng(13).integers(0, 256, num_blocks * 32, dtype=np.uint8)

        def k(request_id: str) -> Key:
            if key_mode == "tokens":
                return key(toks, request_id)
            return Key(MODEL, request_id=request_id, block_hashes=hashes.tobytes())

        assert transfer.store(src_view, np.arange(num_blocks), k("w")) == chunks
        if lookup_mode == "sync":
            hit = client.sync_lookup(k("r")).hit_chunks
        else:
            result = client.wait_prefetch_status(client.lookup(k("r")), 30.0)
            assert result is not None
            hit = result.hit_chunks
        assert hit == chunks
        dst_ids = np.arange(num_blocks)[::-1].copy()  # every block elsewhere
        assert transfer.retrieve(dst_view, dst_ids, k("r")) == chunks * chunk
        for a, b in zip(
            blocks_of(src, np.arange(num_blocks)), blocks_of(dst, dst_ids), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        transfer.close()
    finally:
        harness.close()


def test_a_stranger_cannot_end_free_or_store_for_another_engine(setup: tuple) -> None:
    """END_SESSION and FREE_LOOKUP_LOCKS act only for the request's owner or a client with a
    registration of its model; PREPARE_STORE needs a registration of the namespace."""
    harness, engine, client, transfer = setup
    _, src_view = kv_cache(seed=14)
    toks = tokens(2 * CHUNK, seed=14)
    assert transfer.store(src_view, np.arange(2 * BPC), key(toks, "w")) == 2
    assert client.sync_lookup(key(toks, "theirs")).hit_chunks == 2
    stranger = harness.client(client.endpoint)
    with pytest.raises(PermissionDeniedError):
        stranger.end_session(MODEL, "theirs")
    with pytest.raises(PermissionDeniedError):
        stranger.free_lookup_locks(key(toks, "theirs", end=2 * CHUNK))
    with pytest.raises(PermissionDeniedError, match="registration"):
        stranger.prepare_store(key(tokens(CHUNK, seed=15), ""))
    assert engine.stats()["l1"]["read_leases"] == 2, "the refusals changed nothing"
    assert client.end_session(MODEL, "theirs") == 2
