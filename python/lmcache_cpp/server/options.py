"""The server's settings (:class:`ServerOptions`) and its endpoint check."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import zmq
import zmq.utils.z85

from lmcache_cpp import endpoint as endpoint_policy
from lmcache_cpp.protocol import (
    ProtocolLimits,
)

# ---------------------------------------------------------------------------------------------
# Options and endpoint policy


def check_endpoint(endpoint: str, allow_remote: bool, curve_enabled: bool) -> None:
    """Raises ValueError (:class:`~lmcache_cpp.endpoint.EndpointError`) unless the server may
    bind ``endpoint``: the policy of :mod:`lmcache_cpp.endpoint`."""
    endpoint_policy.check_endpoint(
        endpoint,
        allow_remote=allow_remote,
        curve_enabled=curve_enabled,
        remote_hint="ServerOptions.allow_remote=True with CURVE keys",
        curve_hint="ServerOptions.curve_secret_key and curve_public_key",
    )


def _check_z85_key(name: str, key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or len(key) != 40:
        raise ValueError(f"ServerOptions.{name} must be a 40-character z85 CURVE key")
    try:
        zmq.utils.z85.decode(key)
    except Exception as exc:
        raise ValueError(f"ServerOptions.{name} is not valid z85: {exc}") from None


@dataclass
class ServerOptions:
    """Settings of a :class:`CacheServer`; validated on construction (ValueError).

    ``max_frame_bytes`` / ``max_tokens_per_key``, when given, override the matching fields of
    ``limits``; after construction they always equal ``limits.max_frame_bytes`` and
    ``limits.max_tokens``.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    worker_threads: int = 4
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    max_frame_bytes: int | None = None
    max_tokens_per_key: int | None = None
    heartbeat_grace_s: float = 30.0
    reap_interval_s: float = 1.0
    allow_remote: bool = False
    curve_secret_key: str | None = None
    curve_public_key: str | None = None
    curve_authorized_clients_dir: str | None = None
    ipc_mode: int | None = 0o600
    max_clients: int = 4096
    max_queued_jobs: int = 4096
    max_jobs_per_client: int = 256
    # A pool request that waited longer than this for a worker is answered DeadlineExceeded
    # without running (its client has likely given up; running it would only add load).
    max_queue_wait_s: float = 10.0
    transport_max_frame_bytes: int | None = None
    stop_timeout_s: float = 5.0
    name: str = "lmcache_cpp"
    # CLEAR with force (it drops objects other clients hold leases on) needs this token in the
    # request; None: no client may force a CLEAR. `lmcache-cpp serve` writes a fresh one to a
    # file only its user can read (docs/operations.md).
    admin_token: str | None = None
    # The device layer of the server-driven mode (STORE/RETRIEVE, lmcache_cpp.device): "none"
    # (those requests are NotSupported), "cuda", or "fake" (for tests only: shared memory and
    # FIFOs stand in for GPU memory and events).
    device: str = "none"

    def __post_init__(self) -> None:
        overrides: dict[str, int] = {}
        if self.max_frame_bytes is not None:
            overrides["max_frame_bytes"] = self.max_frame_bytes
        if self.max_tokens_per_key is not None:
            overrides["max_tokens"] = self.max_tokens_per_key
        if overrides:
            self.limits = dataclasses.replace(self.limits, **overrides)
        self.max_frame_bytes = self.limits.max_frame_bytes
        self.max_tokens_per_key = self.limits.max_tokens
        for name in ("worker_threads", "max_clients", "max_queued_jobs", "max_jobs_per_client"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ServerOptions.{name} must be an int >= 1, got {value!r}")
        for name in ("heartbeat_grace_s", "reap_interval_s", "stop_timeout_s", "max_queue_wait_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServerOptions.{name} must be a positive number, got {value!r}")
        if self.transport_max_frame_bytes is not None and (
            self.transport_max_frame_bytes < self.limits.max_frame_bytes
        ):
            raise ValueError(
                "ServerOptions.transport_max_frame_bytes must be at least limits.max_frame_bytes"
            )
        if self.device not in ("none", "fake", "cuda"):
            raise ValueError(
                f"ServerOptions.device must be 'none', 'fake' or 'cuda', got {self.device!r}"
            )
        if (self.curve_secret_key is None) != (self.curve_public_key is None):
            raise ValueError(
                "ServerOptions: give both curve_secret_key and curve_public_key or neither"
            )
        _check_z85_key("curve_secret_key", self.curve_secret_key)
        _check_z85_key("curve_public_key", self.curve_public_key)
        if self.curve_authorized_clients_dir is not None and self.curve_secret_key is None:
            raise ValueError("ServerOptions.curve_authorized_clients_dir needs CURVE keys")
        check_endpoint(self.endpoint, self.allow_remote, self.curve_enabled)

    @property
    def curve_enabled(self) -> bool:
        return self.curve_secret_key is not None

    @property
    def effective_transport_max_frame_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: a frame above it makes ZeroMQ drop the connection (no reply can be
        sent). Default: twice ``limits.max_frame_bytes``; frames between the two get a
        ResourceExhausted reply."""
        if self.transport_max_frame_bytes is not None:
            return self.transport_max_frame_bytes
        return 2 * self.limits.max_frame_bytes
