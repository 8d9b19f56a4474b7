"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (docs/fuzzing.md).

Every seed is made by the real code: requests by ``lmcache_cpp.protocol.encode_request``, object
files by ``FileSystemL2Adapter`` itself, configs by ``ServerConfig.to_dict``; then packed into the
input format of its target (the docstrings of fuzz/*_fuzzer.{cc,py} define them). Run it again
after changing a format or the protocol, and commit the result. It encodes with the lmcache_cpp it
imports: the installed one, or this tree's with the stage .ci/fuzz makes:

    PYTHONPATH=build/fuzz/pystage .venv/bin/python fuzz/make_corpus.py

It replaces the files of each corpus directory except the ``regress-*`` files: inputs that once
found a bug, kept so that every run replays them (docs/fuzzing.md).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmcache_cpp as lc
from lmcache_cpp import config
from lmcache_cpp.protocol import (
    RequestType,
    WireKey,
    WireLayout,
    bodies,
    encode_request,
)

CORPUS = Path(__file__).resolve().parent / "corpus"

# What fuzz/wire_fast_path_fuzzer.cc stores at start-up: kStoredChunks chunks of kChunk tokens
# (ids 0, 1, 2, ...) of kModel, and as many block hashes of 32 bytes (byte j is j * 7 + 1).
MODEL = "fuzz-model"
CHUNK = 16
STORED_CHUNKS = 4
TOKENS = struct.pack(f"<{CHUNK * STORED_CHUNKS}I", *range(CHUNK * STORED_CHUNKS))
BLOCK_HASHES = bytes((j * 7 + 1) & 0xFF for j in range(32 * STORED_CHUNKS))
ZERO_HANDLE = bytes(16)  # the wire fuzzer puts its latest LOOKUP handle here


def write_corpus(target: str, seeds: dict[str, bytes]) -> None:
    """Replaces the generated seeds of ``target``; keeps the ``regress-*`` reproducers."""
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if not old.name.startswith("regress-"):
            old.unlink()
    for name, data in sorted(seeds.items()):
        (directory / name).write_bytes(data)
    print(f"{directory}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


# ---- requests ---------------------------------------------------------------------------------


def requests() -> dict[str, tuple[RequestType, bodies.RequestBody]]:
    """One valid request of every type, keys naming what the wire fuzzer stored."""
    tokens = WireKey(MODEL, 1, 0, "req-1", tokens=TOKENS)
    all_ranks = WireKey(MODEL, 2, -1, "req-2", tokens=TOKENS, start=CHUNK, end=3 * CHUNK)
    hashes = WireKey(MODEL, 1, 0, "req-3", "salt", block_hashes=BLOCK_HASHES)
    layout = WireLayout("nhd", 2, CHUNK, 1, 8, 2, 64)
    rt = RequestType
    return {
        "hello": (rt.HELLO, bodies.HelloRequest("fuzz", 1234, 4026531836)),
        "ping": (rt.PING, bodies.EmptyRequest()),
        "get_chunk_size": (rt.GET_CHUNK_SIZE, bodies.EmptyRequest()),
        "register_kv_cache": (rt.REGISTER_KV_CACHE, bodies.RegisterRequest(MODEL, 1, 0, layout)),
        "unregister_kv_cache": (rt.UNREGISTER_KV_CACHE, bodies.UnregisterRequest(12345)),
        "lookup_tokens": (rt.LOOKUP, bodies.KeyRequest(tokens)),
        "lookup_all_ranks": (rt.LOOKUP, bodies.KeyRequest(all_ranks, tp_size=2)),
        "lookup_block_hashes": (rt.LOOKUP, bodies.KeyRequest(hashes)),
        "query_prefetch_status": (rt.QUERY_PREFETCH_STATUS, bodies.HandleRequest(ZERO_HANDLE)),
        "wait_prefetch_status": (
            rt.WAIT_PREFETCH_STATUS,
            bodies.PrefetchWaitRequest(ZERO_HANDLE, 1.0),
        ),
        "sync_lookup": (rt.SYNC_LOOKUP, bodies.SyncLookupRequest(tokens, 1, 0.5)),
        "sync_lookup_block_hashes": (rt.SYNC_LOOKUP, bodies.SyncLookupRequest(hashes)),
        "free_lookup_locks": (rt.FREE_LOOKUP_LOCKS, bodies.KeyRequest(tokens)),
        "end_session": (rt.END_SESSION, bodies.EndSessionRequest(MODEL, "req-1")),
        "prepare_store": (rt.PREPARE_STORE, bodies.PrepareStoreRequest(tokens)),
        "commit_store": (rt.COMMIT_STORE, bodies.CommitStoreRequest(ZERO_HANDLE, True, bytes(16))),
        "prepare_retrieve": (rt.PREPARE_RETRIEVE, bodies.PrepareRetrieveRequest(tokens, 2.0)),
        "commit_retrieve": (rt.COMMIT_RETRIEVE, bodies.HandleRequest(ZERO_HANDLE)),
        "store_reserved": (rt.STORE, bodies.EmptyRequest()),
        "retrieve_reserved": (rt.RETRIEVE, bodies.EmptyRequest()),
        "clear": (rt.CLEAR, bodies.ClearRequest(force=True)),
        "status": (rt.STATUS, bodies.EmptyRequest()),
        "goodbye": (rt.GOODBYE, bodies.EmptyRequest()),
    }


def frames(name: str, seq: int) -> list[bytes]:
    request_type, body = requests()[name]
    return encode_request(request_type, seq, body.to_wire())


def wire_input(options: int, messages: Iterable[list[bytes]]) -> bytes:
    """fuzz/wire_fast_path_fuzzer.cc: options:u8, then (u8 header length, header, u16le payload
    length, payload) per request."""
    out = bytearray([options])
    for header, payload in messages:
        out += bytes([len(header)]) + header + struct.pack("<H", len(payload)) + payload
    return bytes(out)


def wire_fast_path_seeds() -> dict[str, bytes]:
    seeds = {name: wire_input(0, [frames(name, 7)]) for name in requests()}
    seeds["lookup_then_query"] = wire_input(
        0, [frames("lookup_tokens", 1), frames("query_prefetch_status", 2)]
    )
    seeds["all_ranks_lookup_then_query_then_end"] = wire_input(
        0,
        [
            frames("lookup_all_ranks", 1),
            frames("query_prefetch_status", 2),
            encode_request(
                RequestType.END_SESSION, 3, bodies.EndSessionRequest(MODEL, "req-2").to_wire()
            ),
        ],
    )
    seeds["sync_lookup_with_l2"] = wire_input(1, [frames("sync_lookup", 9)])
    seeds["sync_lookup_then_end_session"] = wire_input(
        0, [frames("sync_lookup", 1), frames("end_session", 2)]
    )
    return seeds


def protocol_input(options: int, parts: list[bytes]) -> bytes:
    """fuzz/protocol_fuzzer.py: options:u8, then (u16le length, frame) per frame."""
    return bytes([options]) + b"".join(struct.pack("<H", len(p)) + p for p in parts)


def protocol_seeds() -> dict[str, bytes]:
    seeds = {name: protocol_input(0, frames(name, 7)) for name in requests()}
    seeds["ping_tight_limits"] = protocol_input(1, frames("ping", 1))
    seeds["lookup_tight_limits"] = protocol_input(1, frames("lookup_tokens", 1))
    seeds["three_frames"] = protocol_input(0, [*frames("ping", 1), b"\x80"])
    return seeds


# ---- object files -----------------------------------------------------------------------------


def fs_file(flags: int, name: str, header: bytes, payload: bytes) -> bytes:
    """One file of fuzz/fs_adapter_fuzzer.cc's input."""
    raw = name.encode()
    return (
        bytes([flags, len(raw)])
        + raw
        + bytes([len(header)])
        + header
        + struct.pack("<H", len(payload))
        + payload
    )


PAD = 8  # fs_adapter_fuzzer flag: zero-pad the header to 4096 bytes
FIX_HEADER_CRC, FIX_PAYLOAD_CRC, FIX_SIZE, CANONICAL = 2, 4, 16, 1


def adapter_files(payloads: list[bytes], ranks: list[int]) -> list[tuple[str, bytes]]:
    """(file name, file bytes) of objects stored by the real FileSystemL2Adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = lc.FileSystemL2Adapter(tmp, io_threads=1)
        keys = [
            lc.ObjectKey(lc.ChunkHash(bytes([i * 17 + 3]) * 32), rank)
            for i, rank in enumerate(ranks)
        ]
        assert adapter.submit_store(keys, payloads).all()
        out = []
        for key in keys:
            path = adapter.path_for(key)
            out.append((os.path.basename(path), Path(path).read_bytes()))
        adapter.close()
    return out


def packed(name: str, data: bytes, flags: int = PAD) -> bytes:
    """An object file as a fuzzer file: its header's 72 meaningful bytes (the rest is zero)."""
    assert data[72:4096] == bytes(4096 - 72)
    return fs_file(flags, name, data[:72], data[4096:])


def fs_adapter_seeds() -> dict[str, bytes]:
    objects = adapter_files([b"payload-one" * 3, b"", bytes(range(200))], [0, -1, 65536])
    valid = b"".join(packed(n, d) for n, d in objects)
    name0, data0 = objects[0]
    corrupt = bytearray(data0)
    corrupt[-1] ^= 1
    ((direct_name, direct_data),) = adapter_files([bytes(4096)], [3])
    foreign_version = bytearray(data0)
    foreign_version[8] = 2
    header_only = data0[:52]  # magic, version, sizes, key: the fix-ups add the rest
    return {
        "valid_three": bytes([0]) + valid,
        "valid_three_capacity_one": bytes([1]) + valid,
        "valid_three_two_threads": bytes([8 | 2]) + valid,
        "valid_page_payload_o_direct": bytes([4]) + packed(direct_name, direct_data),
        "corrupt_payload": bytes([0]) + packed(name0, bytes(corrupt)),
        "foreign_version": bytes([0]) + packed(name0, bytes(foreign_version)),
        "wrong_directory": bytes([0]) + packed(name0, data0, PAD | 0x20),
        "truncated_header": bytes([0]) + fs_file(0, name0, data0[:72], b""),
        "canonical_name_and_fixups": bytes([0])
        + fs_file(
            PAD | CANONICAL | FIX_SIZE | FIX_PAYLOAD_CRC | FIX_HEADER_CRC,
            "x",
            header_only,
            b"made by the fix-ups",
        ),
        "temp_and_foreign_files": bytes([0])
        + fs_file(0, name0 + ".tmp-0123456789abcdef", data0[:72], b"")
        + fs_file(0, "README", b"not an object", b"")
        + fs_file(0x40, "ab", b"", b"")
        + fs_file(0x60, name0, data0[:72], b""),
    }


# ---- configuration ----------------------------------------------------------------------------

FS_SPEC = {
    "type": "fs",
    "path": "/tmp/lmcache-l2",
    "capacity_gb": 1.5,
    "io_threads": 2,
    "fsync": True,
    "o_direct": False,
}
MEMORY_SPEC = {
    "type": "memory",
    "capacity_gb": 0.5,
    "latency_ms": 1,
    "bandwidth_gbps": 10,
    "worker_threads": 2,
}

TOML = """\
endpoint = "ipc:///tmp/lmcache.sock"
chunk_size = 512
l1_size_gb = 2.5
hugepages = "off"
high_watermark = 0.9
low_watermark = 0.8
metrics_port = 9100
log_level = "debug"

[[l2_adapters]]
type = "fs"
path = "/tmp/lmcache-l2"
capacity_gb = 4

[[l2_adapters]]
type = "memory"
latency_ms = 0.5
"""


def config_seeds() -> dict[str, bytes]:
    full: dict[str, Any] = config.ServerConfig(l2_adapters=[FS_SPEC, MEMORY_SPEC]).to_dict()
    fields = config.ServerConfig.field_names()

    def flag(field: str, value: str) -> bytes:
        return bytes([3, fields.index(field)]) + value.encode()

    return {
        "l2_adapter_fs": bytes([0]) + json.dumps(FS_SPEC).encode(),
        "l2_adapter_memory": bytes([0]) + json.dumps(MEMORY_SPEC).encode(),
        "l2_adapter_fs_minimal": bytes([0]) + b'{"type": "fs", "path": "~/l2"}',
        "config_json_defaults": bytes([1]) + json.dumps(config.ServerConfig().to_dict()).encode(),
        "config_json_full": bytes([1]) + json.dumps(full, indent=1).encode(),
        "config_toml": bytes([2]) + TOML.encode(),
        "flag_chunk_size": flag("chunk_size", "512"),
        "flag_endpoint_tcp": flag("endpoint", "tcp://[::1]:5555"),
        "flag_endpoint_ipc": flag("endpoint", "ipc:///tmp/x.sock"),
        "flag_l1_size_auto": flag("l1_size_gb", "auto"),
        "flag_metrics_port_off": flag("metrics_port", "off"),
        "flag_log_level": flag("log_level", "warning"),
        "flag_curve_key": flag("curve_secret_key_file", "/etc/key"),
        "flag_allow_remote": flag("allow_remote", ""),
        "value_chunk_size": bytes([4, fields.index("chunk_size")]) + b"512",
        "value_l1_size_gb": bytes([4, fields.index("l1_size_gb")]) + b"2.5",
        "value_endpoint": bytes([4, fields.index("endpoint")]) + b'"ipc:///tmp/a.sock"',
        "value_l2_adapters": bytes([4, fields.index("l2_adapters")])
        + json.dumps([FS_SPEC]).encode(),
        "adapter_fs_capacity_gb": adapter_value("fs", "capacity_gb", "1.5"),
        "adapter_fs_io_threads": adapter_value("fs", "io_threads", "8"),
        "adapter_memory_latency_ms": adapter_value("memory", "latency_ms", "0.25"),
        "adapter_memory_bandwidth_gbps": adapter_value("memory", "bandwidth_gbps", "12"),
    }


def adapter_value(kind: str, key: str, value: str) -> bytes:
    """fuzz/config_fuzzer.py mode 5: ``key`` of a ``kind`` adapter spec set to a JSON value."""
    known = config.l2._FS_KEYS if kind == "fs" else config.l2._MEMORY_KEYS
    keys = [k for k in known if k != "type"]
    selector = keys.index(key) | (0x80 if kind == "fs" else 0)
    while (selector % len(keys)) != keys.index(key):  # the fuzzer reads selector % len(keys)
        selector += 1
    return bytes([5, selector]) + value.encode()


def config_dictionary() -> str:
    """fuzz/config.dict: the words of config files and flags, for libFuzzer's -dict."""
    fields = config.ServerConfig.field_names()
    adapter_keys = sorted(
        {*config.l2._FS_KEYS, *config.l2._MEMORY_KEYS, "fs", "memory", "python", "class"}
    )
    syntax = ["{", "}", "[", "]", ":", ",", "=", '"', "[[l2_adapters]]", "true", "false", "null"]
    values = ["auto", "off", "none", "tcp://", "ipc://", "127.0.0.1", "[::1]", "localhost", "*"]
    numbers = ["1e308", "-1", "0.0", "4294967296", "18446744073709551616", "NaN", "Infinity"]
    escapes = ["\\u0000", "\\ud800", "~"]
    words = fields + adapter_keys + ["--" + f.replace("_", "-") for f in fields]
    words += syntax + values + numbers + escapes
    quoted = ('"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' for w in words)
    header = "# libFuzzer dictionary of fuzz/config_fuzzer.py, written by fuzz/make_corpus.py."
    return "\n".join([header, *quoted]) + "\n"


# ---- the Redis client's reply parser ------------------------------------------------------------


def redis_resp_input(
    options: int, sinks: list[tuple[int, int]], split: int, stream: bytes
) -> bytes:
    """The input of fuzz/redis_resp_fuzzer.cc: options, sinks (head, body), split, stream."""
    head = bytes([options, len(sinks)])
    for h, b in sinks:
        head += bytes([h, b])
    return head + bytes([split]) + stream


def redis_resp_seeds() -> dict[str, bytes]:
    def bulk(payload: bytes) -> bytes:
        return b"$%d\r\n%s\r\n" % (len(payload), payload)

    value = bytes(range(40)) + b"payload" * 20  # a 40-byte head and a 140-byte body
    mixed = (
        b"+OK\r\n-ERR bad thing\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*-1\r\n"
        b"*3\r\n:1\r\n*2\r\n+a\r\n$1\r\nb\r\n_\r\n"
        b"%2\r\n+k1\r\n:1\r\n+k2\r\n#t\r\n~1\r\n,3.5\r\n(12345678901234567890\r\n"
        b"!4\r\nOOPS\r\n=8\r\ntxt:abcd\r\n>2\r\n+pubsub\r\n+x\r\n|1\r\n+ttl\r\n:3\r\n:7\r\n"
    )
    moved = b"-MOVED 3999 127.0.0.1:6381\r\n-ASK 3999 [::1]:6381\r\n"
    shards = (
        b"*1\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n*4\r\n"
        b"$4\r\nport\r\n:7000\r\n$4\r\nrole\r\n$6\r\nmaster\r\n"
    )
    return {
        "mixed_whole": redis_resp_input(0, [], 7, mixed),
        "mixed_bytewise_tight": redis_resp_input(1, [], 0, mixed),
        "gets_filled_missed_mismatched": redis_resp_input(
            0,
            [(40, 140), (40, 140), (40, 140), (8, 16)],
            13,
            bulk(value) + b"$-1\r\n" + bulk(value[:100]) + bulk(b"x" * 24),
        ),
        "gets_with_push_between": redis_resp_input(
            0, [(4, 10)], 3, b">2\r\n+message\r\n+x\r\n" + bulk(b"0123456789ABCD")
        ),
        "redirections_and_shards": redis_resp_input(0, [(0, 4)], 29, moved + shards),
        "limits_exceeded": redis_resp_input(1, [], 5, b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n$99\r\n"),
    }


def main() -> None:
    write_corpus("wire_fast_path", wire_fast_path_seeds())
    write_corpus("protocol", protocol_seeds())
    write_corpus("fs_adapter", fs_adapter_seeds())
    write_corpus("config", config_seeds())
    write_corpus("redis_resp", redis_resp_seeds())
    (CORPUS.parent / "config.dict").write_text(config_dictionary())


if __name__ == "__main__":
    main()
