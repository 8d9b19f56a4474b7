"""atheris target: the server's configuration parsing (lmcache_cpp.config).

What a user types reaches ``ServerConfig`` three ways, and each is fuzzed as the CLI runs it:
  * an ``--l2-adapter JSON`` flag (``_parse_adapter_json``, ``parse_l2_spec``);
  * a config file, ``.json`` or ``.toml`` (``load_config_file``, ``ServerConfig.from_mapping``);
  * any other ``serve`` flag (``add_serve_arguments``' parser, then ``config_from_args``).
Two more modes put one fuzzed value straight into one field or one adapter key, so that values
are explored without first having to rebuild the file around them.

Input: ``mode:u8`` then the text (UTF-8, undecodable bytes kept as surrogates, as ``sys.argv``
does). ``mode % 6``: 0 = ``--l2-adapter TEXT``; 1 = a ``.json`` file holding the bytes; 2 = a
``.toml`` file holding the bytes; 3 = the flag of the field numbered by the next byte, with the
rest as its value; 4 = that field set to the rest read as a JSON value (``from_mapping``); 5 = an
adapter spec (fs when the next byte's top bit is set, else memory) whose key numbered by that byte
is the rest read as a JSON value (``parse_l2_spec``, ``from_mapping``). fuzz/make_corpus.py writes
valid specs, config files and values as seeds; fuzz/config.dict holds the words of the formats.

Checks (any failure raises, and atheris saves the input): a bad value is reported as the module
promises -- ``ConfigError`` from everything that builds a ServerConfig or parses an adapter spec,
and a usage error from the flag parser (which turns a type function's ValueError, TypeError or
ArgumentTypeError into one) -- never as another exception; and a config that validates loads back
unchanged from ``to_dict()`` (its documented round trip) and yields its derived values (L1 bytes,
chunks per key) without an error.

Run: ``python fuzz/config_fuzzer.py [libFuzzer flags] [corpus dirs]`` (docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import atheris

with atheris.instrument_imports(include=["lmcache_cpp.config"]):
    from lmcache_cpp import config

FIELDS = config.ServerConfig.field_names()
FS_KEYS = [k for k in config.l2._FS_KEYS if k != "type"]
MEMORY_KEYS = [k for k in config.l2._MEMORY_KEYS if k != "type"]
# Config files go under $FUZZ_TMPDIR (.ci/fuzz removes it) or the system's temporary directory.
TMP = tempfile.mkdtemp(prefix="lmcache_config_fuzz.", dir=os.environ.get("FUZZ_TMPDIR") or None)
atexit.register(shutil.rmtree, TMP, True)  # when the run ends through exit(), not _Exit()


class UsageError(Exception):
    """What argparse would print as a usage message (and exit 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's exit, as an exception
        raise UsageError(message)


PARSER = Parser(prog="lmcache-cpp serve", add_help=False)
config.add_serve_arguments(PARSER)


def flag_of(field: str) -> str:
    return "--l2-adapter" if field == "l2_adapters" else "--" + field.replace("_", "-")


def from_flags(argv: list[str]) -> config.ServerConfig | None:
    try:
        ns = PARSER.parse_args(argv)
    except UsageError:
        return None
    try:
        return config.config_from_args(ns)
    except config.ConfigError:
        return None


def from_file(text: bytes, suffix: str) -> config.ServerConfig | None:
    path = os.path.join(TMP, "config" + suffix)
    with open(path, "wb") as fh:
        fh.write(text)
    try:
        return config.load_config(path)
    except config.ConfigError:
        return None


def adapter_spec(text: str) -> None:
    """The --l2-adapter value as its type function and then parse_l2_spec see it."""
    try:
        value = config.args._parse_adapter_json(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return  # argparse's usage error
    with contextlib.suppress(config.ConfigError):
        config.parse_l2_spec(value)


def json_value(text: bytes) -> tuple[bool, Any]:
    """(True, the JSON value of ``text``) or (False, None): the harness's own parse, not fuzzed."""
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def from_mapping(data: dict[str, Any]) -> config.ServerConfig | None:
    try:
        return config.ServerConfig.from_mapping(data)
    except config.ConfigError:
        return None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 6, data[1:]
    if mode == 0:
        text = body.decode("utf-8", "surrogateescape")
        adapter_spec(text)
        cfg = from_flags(["--l2-adapter", text])
    elif mode == 1:
        cfg = from_file(body, ".json")
    elif mode == 2:
        cfg = from_file(body, ".toml")
    elif not body:
        return
    elif mode == 3:
        field = FIELDS[body[0] % len(FIELDS)]
        value = body[1:].decode("utf-8", "surrogateescape")
        argv = [flag_of(field), value] if value else [flag_of(field)]
        cfg = from_flags(argv)
    elif mode == 4:
        ok, value = json_value(body[1:])
        if not ok:
            return
        cfg = from_mapping({FIELDS[body[0] % len(FIELDS)]: value})
    else:
        ok, value = json_value(body[1:])
        if not ok:
            return
        kind, keys = ("fs", FS_KEYS) if body[0] & 0x80 else ("memory", MEMORY_KEYS)
        spec = {"type": kind, "path": "/tmp/lmcache-l2"} if kind == "fs" else {"type": kind}
        spec[keys[body[0] % len(keys)]] = value
        with contextlib.suppress(config.ConfigError):
            config.parse_l2_spec(spec)
        cfg = from_mapping({"l2_adapters": [spec]})
    if cfg is not None:
        again = config.ServerConfig.from_mapping(cfg.to_dict())
        assert again == cfg, (cfg, again)
        cfg.max_chunks_per_key()
        if cfg.l1_size_gb is not None:  # None reads /proc/meminfo: nothing fuzzed there
            cfg.l1_size_bytes()


def main() -> None:
    print(f"fuzzing {config.__file__}", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
