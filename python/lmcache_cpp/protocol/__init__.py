"""The cache server's wire protocol: request ids, framing, payload schemas, limits.

Everything here is pure (no sockets, no threads) and shared by the server
(:mod:`lmcache_cpp.server`) and the client (:mod:`lmcache_cpp.client`). The normative description,
request by request, is ``docs/protocol.md``; this module is its executable form.

Framing (ZeroMQ DEALER -> ROUTER, msgpack with bin/str distinguished)::

    request  = [header, payload]           header = [version, request_type, seq]
    reply    = [header, payload]           header = [version, request_type, seq, status]

``seq`` is chosen by the client and echoed; ``status`` is 0 for success, else a
:class:`lmcache_cpp.StatusCode` value, and the payload of an error reply is ``{"message": str}``.
Every request gets exactly one reply. :func:`decode_request` turns every malformed request into a
:class:`ProtocolError` carrying the status code and message of that reply, so a server can answer
anything it receives.

Requests are strict: unknown payload fields are refused (a misspelt optional field such as
``cache_salt`` must never be silently dropped). Replies are lenient: a client ignores reply fields
it does not know, so a server may add reply fields without a version change.
"""

from __future__ import annotations

from lmcache_cpp.protocol import bodies, fields, framing, replies, requests
from lmcache_cpp.protocol.bodies import *  # noqa: F403
from lmcache_cpp.protocol.fields import *  # noqa: F403
from lmcache_cpp.protocol.framing import *  # noqa: F403
from lmcache_cpp.protocol.replies import *  # noqa: F403
from lmcache_cpp.protocol.requests import *  # noqa: F403

__all__ = [
    *bodies.__all__,
    *fields.__all__,
    *framing.__all__,
    *replies.__all__,
    *requests.__all__,
]
