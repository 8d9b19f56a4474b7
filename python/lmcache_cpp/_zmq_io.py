"""Multipart sends and receives for the per-message paths of the server and the client.

pyzmq's ``send_multipart`` / ``recv_multipart`` combine its flag enums on every frame, which costs
about a microsecond per operator; these do the same socket calls with plain int flags. Both are
non-blocking: ``recv_frames`` raises ``zmq.Again`` when nothing is queued and ``send_frames``
raises ``zmq.ZMQError`` (``EAGAIN`` on a full queue, ``EHOSTUNREACH`` from a ROUTER socket whose
peer is gone) before any frame is queued when the first frame cannot be sent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Final

import zmq

from lmcache_cpp import _core

_log = logging.getLogger(__name__)

_NOBLOCK: Final = int(zmq.NOBLOCK)
_NOBLOCK_MORE: Final = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
ZERO_COPY_BYTES: Final = 1 << 16
EVENTS: Final = int(zmq.EVENTS)
POLLIN: Final = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """Sends ``frames`` as one message. Small frames are copied (cheaper than tracking a
    zero-copy send), large ones are not."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(
            frame, _NOBLOCK if i == last else _NOBLOCK_MORE, copy=len(frame) < ZERO_COPY_BYTES
        )


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receives one whole message, or raises ``zmq.Again``. Each part is read as a ``zmq.Frame``
    whose ``more`` flag ends the message: cheaper than asking the socket for ``RCVMORE`` (pyzmq
    maps every socket option through an enum)."""
    parts = []
    while True:
        frame = sock.recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes)
        if not frame.more:
            return parts


def readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is queued (cheaper than a receive that raises ``zmq.Again``)."""
    return bool(int(sock.getsockopt(EVENTS)) & POLLIN)


@functools.cache
def pyzmq_backend_file() -> str | None:
    """The file of pyzmq's compiled backend, whose libzmq owns every pyzmq socket; None for
    another backend (CFFI on PyPy), where the native helpers are not used."""
    try:
        from zmq.backend.cython import _zmq
    except ImportError:
        return None
    path = getattr(_zmq, "__file__", None)
    return path if isinstance(path, str) and not path.endswith(".py") else None


def native_io(sock: zmq.Socket[bytes]) -> _core.SocketIo | None:
    """A :class:`_core.SocketIo` on ``sock`` (whole-message calls that keep the GIL), or None
    where pyzmq's libzmq cannot be reached from C++ (the pyzmq calls above serve then)."""
    backend = pyzmq_backend_file()
    if backend is None:
        return None
    try:
        return _core.SocketIo(sock.underlying, libzmq_from=backend)
    except RuntimeError as exc:
        _log.info("pyzmq's socket calls are used: %s", exc)
        return None
