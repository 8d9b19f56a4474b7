"""Engine-driven transfers: :class:`KvTransferClient` moves a worker's KV blocks through the
server's shared L1 arena."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from lmcache_cpp import _core
from lmcache_cpp.client.cache_client import CacheClient
from lmcache_cpp.client.keys import Key
from lmcache_cpp.errors import (
    InternalError,
    InvalidArgumentError,
    KeyAbsentError,
    LMCacheError,
    UnavailableError,
)
from lmcache_cpp.protocol import (
    RegistrationInfo,
    TransferTicket,
    WireKey,
)

_log = logging.getLogger(__name__)

BlockIds: TypeAlias = npt.NDArray[np.integer[Any]] | Sequence[int]


class TransferRequests(Protocol):
    """The requests a :class:`KvTransferClient` makes: a :class:`CacheClient`'s, or the server's
    own against its engine (server-driven mode, ``server/device_transfers.py``)."""

    def prepare_store(self, key: Key | WireKey) -> TransferTicket: ...

    def commit_store(
        self, handle: bytes, success: bool = True, crc32c: Sequence[int] | None = None
    ) -> int: ...

    def prepare_retrieve(
        self, key: Key | WireKey, timeout_s: float | None = None
    ) -> TransferTicket: ...

    def commit_retrieve(self, handle: bytes) -> None: ...

    def unregister_kv_cache(self, registration_id: int) -> None: ...


class KvTransferClient:
    """Moves one worker's KV blocks to and from the server's L1 arena (engine-driven mode).

    Built from a REGISTER_KV_CACHE reply (:meth:`register` does both); maps the arena with
    ``_core.AttachedArena``, so the server must be on the same host. ``block_ids`` is the
    request's block table: engine block ``block_ids[j]`` holds tokens ``[j*BS, (j+1)*BS)`` of the
    request, so chunk ``c`` is the blocks ``[c*CS/BS, (c+1)*CS/BS)``. Keys name one rank
    (``worker_id`` >= 0) or a world of one. Every failure raises; nothing reports partial success.
    """

    def __init__(
        self,
        client: CacheClient | TransferRequests,
        registration: RegistrationInfo,
        *,
        num_threads: int = 0,
        owns_registration: bool = False,
    ) -> None:
        self._client = client
        self._registration = registration
        self._chunk_size = int(registration["chunk_size"])
        self._object_bytes = int(registration["object_bytes"])
        self._num_threads = num_threads
        self._owns_registration = owns_registration
        descriptor = _core.ArenaDescriptor(registration["arena_path"], registration["arena_size"])
        self._arena: _core.AttachedArena | None = _core.AttachedArena(descriptor)

    @classmethod
    def register(
        cls,
        client: CacheClient,
        model_name: str,
        world_size: int,
        worker_id: int,
        kv: _core.KvCacheView,
        *,
        num_threads: int = 0,
    ) -> KvTransferClient:
        """Registers ``kv``'s layout and maps the arena; :meth:`close` unregisters."""
        reg = client.register_kv_cache(model_name, world_size, worker_id, kv.layout)
        try:
            return cls(client, reg, num_threads=num_threads, owns_registration=True)
        except BaseException:
            client.unregister_kv_cache(reg["registration_id"])
            raise

    @property
    def registration(self) -> RegistrationInfo:
        return self._registration

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    def close(self) -> None:
        """Unmaps the arena (and unregisters, when :meth:`register` made the registration)."""
        if self._arena is None:
            return
        self._arena = None
        if self._owns_registration:
            self._client.unregister_kv_cache(self._registration["registration_id"])

    def __enter__(self) -> KvTransferClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def store(self, kv: _core.KvCacheView, block_ids: BlockIds, key: Key | WireKey) -> int:
        """PREPARE_STORE, gather every reserved chunk into the arena, COMMIT_STORE.

        Returns the objects published (chunks already present are skipped). The CRC32C of every
        object is computed while it is copied and sent with COMMIT_STORE (the object carries it
        from then on: docs/design/integrity.md). When a copy fails the ticket is committed with
        success=False and the error raised.
        """
        self._check_key(key)
        ids = np.asarray(block_ids)
        ticket = self._client.prepare_store(key)
        crcs: list[int] | None = [0] * len(ticket.offsets)
        try:
            arena = self._check_ticket(kv, ticket)
            chunk_ids: list[npt.NDArray[Any]] = []
            objects: list[npt.NDArray[np.uint8]] = []
            written: list[int] = []
            for i, offset in enumerate(ticket.offsets):
                if offset < 0:
                    continue
                chunk_ids.append(self._chunk_blocks(kv, ids, ticket.first_chunk + i))
                objects.append(self._object(arena, offset))
                written.append(i)
            if objects:
                got = kv.gather_batch(
                    self._chunk_size,
                    chunk_ids,
                    objects,
                    num_threads=self._num_threads,
                    checksums=True,
                )
                if got is None:  # a copy that gives none (GPU): the server computes them
                    crcs = None
                else:
                    crcs = [0] * len(ticket.offsets)
                    for i, crc in zip(written, got, strict=True):
                        crcs[i] = crc
        except BaseException:
            try:
                self._client.commit_store(ticket.handle, success=False)
            except LMCacheError as exc:
                _log.warning("aborting store ticket %s failed: %s", ticket.handle.hex(), exc)
            raise
        return self._client.commit_store(ticket.handle, success=True, crc32c=crcs)

    def retrieve(
        self,
        kv: _core.KvCacheView,
        block_ids: BlockIds,
        key: Key | WireKey,
        skip_tokens: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """PREPARE_RETRIEVE, scatter every chunk into the engine's blocks, COMMIT_RETRIEVE.

        ``skip_tokens``: leading tokens of the request already in the engine's blocks (not
        written). Returns the tokens of the key's range now in the engine (skipped ones
        included). Raises if any chunk is absent (KeyAbsentError), a copy fails, or a lease was
        lost while copying (LeaseNotHeldError: the copied bytes must not be used).
        """
        if skip_tokens < 0:
            raise InvalidArgumentError(f"skip_tokens must be >= 0, got {skip_tokens}")
        self._check_key(key)
        ids = np.asarray(block_ids)
        ticket = self._client.prepare_retrieve(key, timeout_s)
        try:
            arena = self._check_ticket(kv, ticket)
            chunk_ids: list[npt.NDArray[Any]] = []
            objects: list[npt.NDArray[np.uint8]] = []
            skips: list[int] = []
            cs = self._chunk_size
            for i, offset in enumerate(ticket.offsets):
                chunk = ticket.first_chunk + i
                if offset < 0:
                    raise KeyAbsentError(f"chunk {chunk} of the range is not available")
                skip = min(max(skip_tokens - chunk * cs, 0), cs)
                if skip == cs:
                    continue
                chunk_ids.append(self._chunk_blocks(kv, ids, chunk))
                objects.append(self._object(arena, offset))
                skips.append(skip)
            if objects:
                kv.scatter_batch(
                    cs, objects, chunk_ids, skip_tokens=skips, num_threads=self._num_threads
                )
        except BaseException:
            try:
                self._client.commit_retrieve(ticket.handle)
            except LMCacheError as exc:
                _log.debug("releasing retrieve ticket %s: %s", ticket.handle.hex(), exc)
            raise
        self._client.commit_retrieve(ticket.handle)
        return len(ticket.offsets) * self._chunk_size

    # ---- helpers -----------------------------------------------------------------------------

    def _check_key(self, key: Key | WireKey) -> None:
        if key.worker_id < 0 and key.world_size != 1:
            raise InvalidArgumentError(
                "a transfer names one rank: set worker_id (or use a world_size of 1)"
            )

    def _check_ticket(self, kv: _core.KvCacheView, ticket: TransferTicket) -> _core.AttachedArena:
        arena = self._arena
        if arena is None:
            raise UnavailableError("the transfer client is closed")
        expected = kv.object_bytes(self._chunk_size)
        if ticket.object_bytes != expected:
            raise InvalidArgumentError(
                f"the server's objects are {ticket.object_bytes} bytes, this KV cache's chunks "
                f"{expected}: the layout differs from the registered one"
            )
        return arena

    def _chunk_blocks(
        self, kv: _core.KvCacheView, ids: npt.NDArray[Any], chunk: int
    ) -> npt.NDArray[Any]:
        per_chunk = self._chunk_size // int(kv.layout.block_size)
        lo, hi = chunk * per_chunk, (chunk + 1) * per_chunk
        if ids.ndim != 1 or hi > ids.shape[0]:
            raise InvalidArgumentError(
                f"block_ids has {ids.shape[0] if ids.ndim == 1 else ids.shape} entries; chunk "
                f"{chunk} needs blocks [{lo}, {hi})"
            )
        return ids[lo:hi]

    def _object(self, arena: _core.AttachedArena, offset: int) -> npt.NDArray[np.uint8]:
        if offset + self._object_bytes > arena.size:
            raise InternalError(
                f"object at offset {offset} ({self._object_bytes} bytes) is outside the arena"
            )
        return arena.view(offset, self._object_bytes)
