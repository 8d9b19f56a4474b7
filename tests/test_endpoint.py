"""The one endpoint policy (lmcache_cpp.endpoint): a table of endpoints, each checked through the
policy itself, the server's options and the configuration, which must agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lmcache_cpp.config import ConfigError, ServerConfig
from lmcache_cpp.endpoint import EndpointError, check_endpoint, is_loopback_host
from lmcache_cpp.server import ServerOptions

LOCAL, REMOTE, BAD = "local", "remote", "bad"

TABLE = [
    ("tcp://127.0.0.1:5555", LOCAL),
    ("tcp://127.9.8.7:5555", LOCAL),
    ("tcp://[::1]:5555", LOCAL),
    ("tcp://localhost:5555", LOCAL),
    ("tcp://LocalHost:5555", LOCAL),
    ("tcp://ip6-localhost:5555", LOCAL),
    ("tcp://ip6-loopback:5555", LOCAL),
    ("tcp://127.0.0.1:*", LOCAL),
    ("ipc:///tmp/lmcache.sock", LOCAL),
    ("ipc://@abstract-name", LOCAL),
    ("tcp://0.0.0.0:5555", REMOTE),
    ("tcp://*:5555", REMOTE),
    ("tcp://[::]:5555", REMOTE),
    ("tcp://10.1.2.3:5555", REMOTE),
    ("tcp://eth0:5555", REMOTE),
    ("tcp://cache.example.com:5555", REMOTE),
    ("tcp://localhost.example.com:5555", REMOTE),
    ("tcp://[::1:5555", REMOTE),  # unbalanced bracket: not an address, so not loopback
    ("tcp://::1:5555", LOCAL),  # without brackets the host is what precedes the last colon
    ("udp://127.0.0.1:5555", BAD),
    ("tcp://127.0.0.1", BAD),
    ("tcp://:5555", BAD),
    ("tcp://127.0.0.1:99999", BAD),
    ("tcp://127.0.0.1:\u00b2", BAD),
    ("ipc://", BAD),
    ("ipc:///" + "x" * 200, BAD),
    ("127.0.0.1:5555", BAD),
]


Check = Callable[..., None]


def _outcome(check: Check, endpoint: str, *, allow_remote: bool, curve: bool) -> str:
    """ "ok", or the refusal's message."""
    try:
        check(endpoint, allow_remote=allow_remote, curve=curve)
    except (EndpointError, ConfigError) as exc:
        return str(exc)
    return "ok"


def _policy(endpoint: str, *, allow_remote: bool, curve: bool) -> None:
    check_endpoint(endpoint, allow_remote=allow_remote, curve_enabled=curve)


def _options(endpoint: str, *, allow_remote: bool, curve: bool) -> None:
    keys = {}
    if curve:
        keys = {"curve_public_key": "a" * 40, "curve_secret_key": "b" * 40}
    ServerOptions(endpoint=endpoint, allow_remote=allow_remote, **keys)  # type: ignore[arg-type]


def _config(endpoint: str, *, allow_remote: bool, curve: bool) -> None:
    keys = {}
    if curve:
        keys = {"curve_secret_key_file": "/s", "curve_public_key_file": "/p"}
    ServerConfig(endpoint=endpoint, allow_remote=allow_remote, **keys)  # type: ignore[arg-type]


@pytest.mark.parametrize(("endpoint", "kind"), TABLE)
@pytest.mark.parametrize("check", [_policy, _options, _config], ids=["policy", "options", "config"])
def test_every_layer_applies_the_same_policy(endpoint: str, kind: str, check: Check) -> None:
    closed = _outcome(check, endpoint, allow_remote=False, curve=False)
    no_keys = _outcome(check, endpoint, allow_remote=True, curve=False)
    opened = _outcome(check, endpoint, allow_remote=True, curve=True)
    if kind == LOCAL:  # binds as it is
        assert closed == no_keys == opened == "ok"
    elif kind == REMOTE:  # needs allow_remote, then CURVE keys
        assert "not a loopback address" in closed and "opt-in" in closed
        assert "CURVE" in no_keys
        assert opened == "ok"
    else:  # refused whatever is allowed, for what it is
        assert opened != "ok" and "loopback" not in opened and "CURVE" not in opened
        assert closed == opened


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("[::1]", True),
        ("::1", True),
        ("ip6-localhost", True),
        ("LOCALHOST", True),
        ("[[::1]]", False),
        ("[::1", False),
        ("0.0.0.0", False),
        ("*", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_the_configuration_refuses_what_no_other_process_could_reach() -> None:
    # The server itself may bind these (tests, embedding); a served process may not.
    ServerOptions(endpoint="inproc://x")
    ServerOptions(endpoint="tcp://127.0.0.1:0")
    with pytest.raises(ConfigError, match="only tcp://, ipc://"):
        ServerConfig(endpoint="inproc://x")
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(endpoint="tcp://127.0.0.1:0")
