"""Client of the cache server: :class:`CacheClient` (requests) and :class:`KvTransferClient`
(engine-driven transfers through the shared L1 arena).

:class:`CacheClient` owns one ZeroMQ DEALER socket. Public methods are thread-safe:
``async_<request>()`` returns a :class:`concurrent.futures.Future` at once, and ``<request>()``
waits for it. Every request has a reply deadline; a request not answered in time fails with
:class:`~lmcache_cpp.errors.DeadlineExceededError`. Error replies raise the
:mod:`lmcache_cpp.errors` class of their status code.

One thread at a time works the socket. A blocking call made while no other thread does sends its
request and reads its reply on the calling thread (no hand-off between threads, which costs more
than the round trip itself); otherwise the client's I/O thread does. An ``async_`` call sends
from the calling thread only when nothing is outstanding; a burst of them goes out from the I/O
thread in one batch, so that the two threads do not trade the GIL. Futures therefore complete
on the I/O thread or on a thread inside a blocking call of this client: done-callbacks must not
block, and a blocking call from a done-callback raises :class:`RuntimeError` (use the async form).
The socket is worked through ``_core.SocketIo`` (whole messages, in C++, keeping the GIL: pyzmq
releases and re-takes it at every frame, which makes a thread working the socket wait for the
GIL while another submits), or through pyzmq where that is not available.

The client sends HELLO when it is created (version handshake; :class:`NotSupportedError` on a
mismatch) and a PING whenever it has sent nothing for ``heartbeat_interval_s``, so the server
keeps its leases while the engine is idle. Its routing identity is random and fixed for its
lifetime, so a reconnect after a transient network error keeps the same server-side client id.

The connection is watched (a ZeroMQ socket monitor, on the ``lmcache-client-link`` thread), so
that a server that goes away costs no deadline. Until the first connection is made, requests
wait for it up to their deadline. Once it is lost (the server exited, was killed or closed the
connection) or a handshake is refused (CURVE keys), requests in flight and requests waiting to be
sent fail at once with :class:`UnavailableError`, and so does every new request until ZeroMQ,
which keeps reconnecting by itself, completes a handshake again. A server that stops answering
without closing the connection (a hung process, a lost host) is still caught by the deadlines.
"""

from __future__ import annotations

from lmcache_cpp.client.cache_client import CacheClient
from lmcache_cpp.client.keys import Key, TokensLike, tokens_to_bytes, wire_layout
from lmcache_cpp.client.kv_transfer import BlockIds, KvTransferClient
from lmcache_cpp.protocol import HelloInfo, LookupResult, RegistrationInfo, TransferTicket

__all__ = [
    "BlockIds",
    "CacheClient",
    "HelloInfo",
    "Key",
    "KvTransferClient",
    "LookupResult",
    "RegistrationInfo",
    "TokensLike",
    "TransferTicket",
    "tokens_to_bytes",
    "wire_layout",
]
