"""Chunk hashing, checked byte for byte against an independent pure-Python implementation of the
scheme documented in cpp/include/lmcache_cpp/chunk_hash.h; keys, bitmaps and the session cache."""

from __future__ import annotations

import array
import hashlib
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcache_cpp as lc

# ---- reference implementation (chunk_hash.h, SHA-256) -----------------------------------------


def _le64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _field(data: bytes) -> bytes:
    return _le64(len(data)) + data


def ref_seed(model: str, layout: str, salt: str) -> bytes:
    h = hashlib.sha256()
    h.update(b"lmcache_cpp/namespace/v1")
    for part in (model, layout, salt):
        h.update(_field(part.encode()))
    return h.digest()


def ref_token_hashes(seed: bytes, tokens: list[int], chunk_size: int) -> list[bytes]:
    out = []
    prev = seed
    for start in range(0, len(tokens) - chunk_size + 1, chunk_size):
        chunk = struct.pack(f"<{chunk_size}I", *tokens[start : start + chunk_size])
        prev = hashlib.sha256(prev + chunk).digest()
        out.append(prev)
    return out


def ref_block_hashes(
    seed: bytes, blocks: list[bytes], chunk_size: int, block_size: int
) -> list[bytes]:
    per_chunk = chunk_size // block_size
    block_seed = hashlib.sha256(seed + b"lmcache_cpp/block-mode/v1").digest()
    out = []
    for i in range(len(blocks) // per_chunk):
        last = blocks[(i + 1) * per_chunk - 1]
        out.append(hashlib.sha256(block_seed + _field(last)).digest())
    return out


def _bytes(hashes: list[lc.ChunkHash]) -> list[bytes]:
    return [h.bytes for h in hashes]


# ---- token mode -------------------------------------------------------------------------------

NAMESPACES = [
    ("", "", ""),
    ("meta-llama/Llama-3.1-8B", "nhd:bf16:L32:H8:D128:BS16", ""),
    ("m", "layout", "tenant-42"),
    ("ünïcödé", "x" * 300, "salt"),
]


@pytest.mark.parametrize(("model", "layout", "salt"), NAMESPACES)
def test_seed_matches_reference(model: str, layout: str, salt: str) -> None:
    hasher = lc.ChunkHasher(lc.NamespaceConfig(model, layout, salt), 256)
    assert hasher.seed.bytes == ref_seed(model, layout, salt)


@pytest.mark.parametrize(("model", "layout", "salt"), NAMESPACES)
@pytest.mark.parametrize("chunk_size", [1, 16, 256])
def test_token_hashes_match_reference(model: str, layout: str, salt: str, chunk_size: int) -> None:
    rng = np.random.default_rng(chunk_size)
    tokens = rng.integers(0, 2**32, size=chunk_size * 5 + chunk_size // 2, dtype=np.uint32)
    hasher = lc.ChunkHasher(lc.NamespaceConfig(model, layout, salt), chunk_size)
    got = _bytes(hasher.hash_tokens(tokens))
    want = ref_token_hashes(ref_seed(model, layout, salt), tokens.tolist(), chunk_size)
    assert len(got) == 5
    assert got == want


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=70),
    chunk_size=st.integers(1, 9),
    salt=st.text(max_size=8),
)
def test_token_hashes_match_reference_property(
    tokens: list[int], chunk_size: int, salt: str
) -> None:
    hasher = lc.ChunkHasher(lc.NamespaceConfig("p", "q", salt), chunk_size)
    want = ref_token_hashes(ref_seed("p", "q", salt), tokens, chunk_size)
    assert _bytes(hasher.hash_tokens(tokens)) == want
    assert _bytes(hasher.hash_tokens(np.asarray(tokens, dtype=np.uint32))) == want


def test_token_input_forms_agree(hasher: lc.ChunkHasher) -> None:
    base = np.arange(1000, 1000 + 16 * 6, dtype=np.uint32)
    want = _bytes(hasher.hash_tokens(base))
    forms: list[object] = [
        base.tolist(),
        tuple(base.tolist()),
        base.astype(np.int64),
        base.astype(np.int32),
        base.astype(np.uint64),
        np.repeat(base, 2)[::2],  # strided, not contiguous
        array.array("I", base.tolist()),  # buffer protocol
    ]
    for form in forms:
        assert _bytes(hasher.hash_tokens(form)) == want, type(form)


def test_tokens_out_of_range_are_invalid_arguments(hasher: lc.ChunkHasher) -> None:
    for bad in ([-1], [2**32], np.array([5, -3], dtype=np.int64), np.array([2**40], np.uint64)):
        with pytest.raises(lc.InvalidArgumentError):
            hasher.hash_tokens(bad)
        with pytest.raises(ValueError):
            hasher.hash_tokens(bad)


def test_non_integer_tokens_are_type_errors(hasher: lc.ChunkHasher) -> None:
    for bad in ([1.5], "abc", np.array([1.0, 2.0]), np.zeros((2, 2), np.uint32), None):
        with pytest.raises(TypeError):
            hasher.hash_tokens(bad)  # type: ignore[arg-type]


def test_only_full_chunks_are_hashed(hasher: lc.ChunkHasher) -> None:
    assert hasher.hash_tokens([]) == []
    assert hasher.hash_tokens(list(range(15))) == []
    assert len(hasher.hash_tokens(list(range(47)))) == 2


def test_hashes_are_prefix_chained(hasher: lc.ChunkHasher) -> None:
    tokens = np.arange(16 * 8, dtype=np.uint32)
    full = hasher.hash_tokens(tokens)
    assert hasher.hash_tokens(tokens[: 16 * 3]) == full[:3]
    changed = tokens.copy()
    changed[16 * 2] += 1  # chunk 2 differs: chunks 0-1 equal, every later hash differs
    other = hasher.hash_tokens(changed)
    assert other[:2] == full[:2]
    assert all(a != b for a, b in zip(other[2:], full[2:], strict=True))


def test_namespaces_are_isolated() -> None:
    tokens = list(range(32))
    hashes = {
        tuple(_bytes(lc.ChunkHasher(lc.NamespaceConfig(*ns), 16).hash_tokens(tokens)))
        for ns in [("a", "l", ""), ("b", "l", ""), ("a", "m", ""), ("a", "l", "s")]
    }
    assert len(hashes) == 4


def test_large_token_array_is_hashed_without_copy_and_correctly() -> None:
    hasher = lc.ChunkHasher(lc.NamespaceConfig("big"), 256)
    tokens = np.random.default_rng(1).integers(0, 50000, size=256 * 512, dtype=np.uint32)
    got = _bytes(hasher.hash_tokens(tokens))
    assert got == ref_token_hashes(ref_seed("big", "", ""), tokens.tolist(), 256)


def test_raw_digest_is_plain_sha256() -> None:
    data = b"lmcache_cpp raw digest"
    assert lc.ChunkHasher.raw_digest(lc.HashAlgorithm.SHA256, data).bytes == (
        hashlib.sha256(data).digest()
    )


def test_xxh3_differs_from_sha256_when_available() -> None:
    ns = lc.NamespaceConfig("m")
    if not lc.build_info()["xxhash"]:
        with pytest.raises(lc.NotSupportedError):
            lc.ChunkHasher(ns, 16, lc.HashAlgorithm.XXH3)
        return
    fast = lc.ChunkHasher(ns, 16, lc.HashAlgorithm.XXH3)
    tokens = list(range(64))
    assert fast.hash_tokens(tokens) == fast.hash_tokens(np.arange(64, dtype=np.uint32))
    assert fast.hash_tokens(tokens) != lc.ChunkHasher(ns, 16).hash_tokens(tokens)


# ---- hash mode --------------------------------------------------------------------------------


@pytest.mark.parametrize(("block_size", "block_hash_size"), [(16, 32), (4, 8), (256, 64), (1, 1)])
def test_block_hashes_match_reference(block_size: int, block_hash_size: int) -> None:
    hasher = lc.ChunkHasher(lc.NamespaceConfig("m", "l", "s"), 256)
    per_chunk = 256 // block_size
    rng = np.random.default_rng(block_size)
    num_blocks = per_chunk * 3 + per_chunk // 2  # three full chunks and a partial one
    blocks = [rng.bytes(block_hash_size) for _ in range(num_blocks)]
    got = _bytes(hasher.hash_blocks(b"".join(blocks), block_hash_size, block_size))
    want = ref_block_hashes(ref_seed("m", "l", "s"), blocks, 256, block_size)
    assert len(got) == 3
    assert got == want


def test_block_hash_arguments_are_checked() -> None:
    hasher = lc.ChunkHasher(lc.NamespaceConfig("m"), 256)
    with pytest.raises(lc.InvalidArgumentError):
        hasher.hash_blocks(b"\0" * 64, 32, 100)  # 100 does not divide 256
    with pytest.raises(lc.InvalidArgumentError):
        hasher.hash_blocks(b"\0" * 64, 0, 16)
    with pytest.raises(lc.InvalidArgumentError):
        hasher.hash_blocks(b"\0" * 65 * 2, 65, 16)  # over MAX_BLOCK_HASH_SIZE
    with pytest.raises(lc.InvalidArgumentError):
        hasher.hash_blocks(b"\0" * 33, 32, 16)  # not a whole number of hashes
    assert hasher.hash_blocks(b"", 32, 16) == []


# ---- keys -------------------------------------------------------------------------------------


def test_chunk_hash_value_semantics() -> None:
    raw = hashlib.sha256(b"x").digest()
    h = lc.ChunkHash(raw)
    assert h.bytes == raw == bytes(h)
    assert h.hex() == raw.hex()
    assert lc.ChunkHash.from_hex(raw.hex()) == h
    assert hash(h) == hash(lc.ChunkHash(raw))
    assert {h: 1}[lc.ChunkHash(raw)] == 1
    assert h != lc.ChunkHash(bytes(32))
    assert (h == "not a hash") is False
    assert repr(h) == f"ChunkHash({raw.hex()[:16]}...)"
    assert pickle.loads(pickle.dumps(h)) == h
    assert sorted([h, lc.ChunkHash(bytes(32))])[0] == lc.ChunkHash(bytes(32))
    with pytest.raises(lc.InvalidArgumentError):
        lc.ChunkHash(b"short")
    with pytest.raises(lc.InvalidArgumentError):
        lc.ChunkHash.from_hex("zz" * 32)


def test_object_key_value_semantics() -> None:
    h = lc.ChunkHash(hashlib.sha256(b"k").digest())
    k = lc.ObjectKey(h, 3)
    assert (k.chunk, k.kv_rank) == (h, 3)
    assert lc.ObjectKey(h).kv_rank == 0
    assert k.hex() == f"{h.hex()}@3"
    assert lc.ObjectKey.from_hex(k.hex()) == k
    assert lc.ObjectKey.from_hex(f"{h.hex()}@-1").kv_rank == -1
    assert k.short() == f"{h.hex()[:16]}@3"
    assert repr(k) == f"ObjectKey({h.hex()[:16]}@3)"
    assert k != lc.ObjectKey(h, 4)
    assert len({k, lc.ObjectKey(h, 3), lc.ObjectKey(h, 4)}) == 2
    assert pickle.loads(pickle.dumps(k)) == k
    for bad in [h.hex(), f"{h.hex()}@", f"{h.hex()}@x", f"{h.hex()}@99999999999", "00@1"]:
        with pytest.raises(lc.InvalidArgumentError):
            lc.ObjectKey.from_hex(bad)


def test_expand_to_all_ranks_is_chunk_major(hasher: lc.ChunkHasher) -> None:
    chunks = hasher.hash_tokens(list(range(48)))
    keys = lc.expand_to_all_ranks(chunks, 2)
    assert [(k.chunk, k.kv_rank) for k in keys] == [(c, r) for c in chunks for r in range(2)]
    assert lc.keys_for_rank(chunks, 5) == [lc.ObjectKey(c, 5) for c in chunks]
    with pytest.raises(lc.InvalidArgumentError):
        lc.expand_to_all_ranks(chunks, 0)


def test_bitmap_operations() -> None:
    b = lc.Bitmap.from_list([True, True, False, True])
    assert len(b) == 4
    assert b.to_list() == [True, True, False, True]
    assert (b[0], b[2], b[-1]) == (True, False, True)
    assert b.popcount() == 3
    assert b.leading_ones() == 2
    assert b.find_next_set(2) == 3
    assert b.find_next_set(4) == 4
    assert (b & lc.Bitmap(4, True)) == b
    assert (b | lc.Bitmap(4)).to_list() == b.to_list()
    assert (~b).to_list() == [False, False, True, False]
    assert repr(b) == "Bitmap('1101')"
    assert str(b) == "1101"
    assert list(b) == [True, True, False, True]
    assert lc.Bitmap(3, True).all() and lc.Bitmap(3).none() and b.any()
    b[2] = True
    assert b.all()
    with pytest.raises(IndexError):
        b[4]
    with pytest.raises(IndexError):
        b[-5] = True
    with pytest.raises(TypeError):
        hash(b)


# ---- session cache ----------------------------------------------------------------------------


def test_session_cache_reuses_and_extends(hasher: lc.ChunkHasher) -> None:
    cache = lc.HashSessionCache(hasher)
    tokens = np.arange(16 * 10, dtype=np.uint32)
    first = cache.hash_tokens(7, tokens[: 16 * 4])
    assert first == hasher.hash_tokens(tokens[: 16 * 4])
    assert cache.stats().chunks_hashed == 4
    longer = cache.hash_tokens(7, tokens)
    assert longer == hasher.hash_tokens(tokens)
    s = cache.stats()
    assert (s.chunks_hashed, s.chunks_reused, s.sessions) == (10, 4, 1)
    assert cache.hash_tokens(7, tokens.tolist()) == longer
    assert cache.stats().chunks_reused == 14
    assert len(cache) == 1


def test_session_cache_rebuilds_on_mismatch(hasher: lc.ChunkHasher) -> None:
    cache = lc.HashSessionCache(hasher)
    a = np.arange(64, dtype=np.uint32)
    b = a[::-1].copy()
    cache.hash_tokens(1, a)
    assert cache.hash_tokens(1, b) == hasher.hash_tokens(b)
    assert cache.stats().sessions_rebuilt == 1


def test_session_cache_end_session_and_ttl(hasher: lc.ChunkHasher, clock: lc.ManualClock) -> None:
    cache = lc.HashSessionCache(hasher, ttl_s=60.0, max_sessions=2, clock=clock)
    for request in (1, 2):
        cache.hash_tokens(request, list(range(32)))
    assert cache.end_session(1) is True
    assert cache.end_session(1) is False
    clock.advance(59.0)
    assert cache.reap() == 0
    clock.advance(2.0)
    assert cache.reap() == 1
    assert len(cache) == 0
    assert cache.stats().sessions_expired == 1
    for request in (3, 4, 5):
        cache.hash_tokens(request, list(range(16)))
    assert len(cache) == 2
    assert cache.stats().sessions_evicted == 1
    assert cache.stats().to_dict()["sessions"] == 2


def test_session_cache_keeps_its_hasher_alive() -> None:
    cache = lc.HashSessionCache(lc.ChunkHasher(lc.NamespaceConfig("tmp"), 4))
    import gc

    gc.collect()
    assert len(cache.hash_tokens(1, list(range(8)))) == 2


def test_manual_clock_refuses_to_go_back(clock: lc.ManualClock) -> None:
    start = clock.now_ns()
    clock.advance(1.5)
    assert clock.now_ns() - start == 1_500_000_000
    with pytest.raises(lc.InvalidArgumentError):
        clock.advance(-1.0)
    with pytest.raises(lc.InvalidArgumentError):
        clock.advance(float("nan"))
