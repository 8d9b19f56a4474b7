"""The one endpoint policy: which ZeroMQ endpoints a cache server may bind.

Both the server (``ServerOptions``) and the configuration (``ServerConfig``, the CLI) call
:func:`check_endpoint`; they differ only in what they pass (the configuration accepts neither
``inproc://``, which no other process can reach, nor port 0, which no client could find).

The rule. ``ipc://PATH`` (a Unix socket: a file path of at most 107 UTF-8 bytes, or an abstract
``@name``) and ``inproc://NAME`` never leave the host. ``tcp://HOST:PORT`` is local when HOST is
a loopback address: an IP literal in 127.0.0.0/8 or ``::1`` (IPv6 literals in one pair of
brackets, ``[::1]``), or one of the names ``localhost``, ``ip6-localhost``, ``ip6-loopback`` (any
case). Anything else is remote: wildcards (``*``, ``0.0.0.0``, ``[::]``), other addresses,
interface names and other host names, which may resolve anywhere. A remote endpoint needs
``allow_remote`` and CURVE keys.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

__all__ = ["EndpointError", "check_endpoint", "is_loopback_host"]

LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
MAX_IPC_PATH_BYTES: Final = 107  # sun_path holds 108 bytes including the terminating NUL
TRANSPORTS: Final = ("tcp", "ipc", "inproc")


class EndpointError(ValueError):
    """An endpoint the policy refuses, with the reason."""


def is_loopback_host(host: str) -> bool:
    """Whether the HOST of ``tcp://HOST:PORT`` is a loopback address (see the module doc)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard, an interface name or a host name: remote


def check_endpoint(
    endpoint: str,
    *,
    allow_remote: bool,
    curve_enabled: bool,
    transports: Sequence[str] = TRANSPORTS,
    allow_port_zero: bool = True,
    remote_hint: str = "allow_remote, with CURVE keys",
    curve_hint: str = "CURVE keys",
) -> None:
    """Raises :class:`EndpointError` unless a server may bind ``endpoint``.

    ``transports``: the schemes accepted (of ``tcp``, ``ipc``, ``inproc``). ``allow_port_zero``:
    whether ``tcp://HOST:0`` (any free port, as ``*``) is accepted. The hints name, in the
    caller's terms, how to opt in to remote access and where the CURVE keys go.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in transports:
        names = ", ".join(f"{t}://" for t in transports)
        raise EndpointError(
            f"{endpoint!r} is neither tcp://HOST:PORT nor ipc://PATH (only {names} are supported)"
        )
    if scheme == "ipc":
        _check_ipc_path(rest)
        return
    if scheme == "inproc":
        if not rest:
            raise EndpointError("inproc:// needs a name")
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise EndpointError(f"{endpoint!r} lacks HOST:PORT")
    _check_port(endpoint, port, allow_port_zero)
    if is_loopback_host(host):
        return
    if not allow_remote:
        raise EndpointError(
            f"{endpoint!r} is not a loopback address; remote access is opt-in ({remote_hint})"
        )
    if not curve_enabled:
        raise EndpointError(f"remote endpoint {endpoint!r} needs CURVE keys ({curve_hint})")


def _check_ipc_path(path: str) -> None:
    if not path:
        raise EndpointError("ipc:// needs a path, e.g. ipc:///tmp/lmcache.sock")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:  # a non-UTF-8 argv byte, or a lone surrogate in a file
        raise EndpointError(f"the ipc path {path!r} is not valid UTF-8") from None
    if size > MAX_IPC_PATH_BYTES:
        raise EndpointError(
            f"the ipc path is {size} bytes; Unix sockets allow at most {MAX_IPC_PATH_BYTES}"
        )


def _check_port(endpoint: str, port: str, allow_zero: bool) -> None:
    if port == "*":
        return
    low = 0 if allow_zero else 1
    # isascii: str.isdigit() accepts digits int() refuses, such as "²".
    if not (port.isascii() and port.isdigit() and low <= int(port) <= 65535):
        raise EndpointError(f"port {port!r} of {endpoint!r} is not in {low}..65535 (or '*')")
