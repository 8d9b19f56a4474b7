"""Engine-driven transfers from a GPU KV cache (docs/design/gpu.md): :class:`CudaKvTransferClient`.

The GPU counterpart of :class:`~lmcache_cpp.client.KvTransferClient`, with the same requests and
guarantees: it maps the server's L1 arena (so the server must be on the same host), registers the
whole mapping with CUDA once (in timed pieces), and moves blocks between the worker's CUDA KV
tensors (a :class:`~lmcache_cpp.cuda.CudaKvCacheView`) and the arena objects on the worker's CUDA
stream:

* store: PREPARE_STORE, gather the reserved chunks on the stream, wait for the copy's event,
  COMMIT_STORE (a failed copy commits with success=False and raises);
* retrieve: PREPARE_RETRIEVE, scatter the leased chunks on the stream, wait for the copy's event,
  COMMIT_RETRIEVE (the leases keep the objects until the copy has read them).

It waits for its own copies' event only, never for the device. The stream must be ordered after
the work that wrote the KV blocks being stored (pass the compute stream, or make the copy stream
wait on it); work queued on the stream after a retrieve sees the retrieved blocks.

Requires a CUDA build and a usable device (:func:`lmcache_cpp.cuda.require_cuda`). Not yet run on
a GPU: see the status in docs/design/gpu.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import numpy.typing as npt

from lmcache_cpp import _core
from lmcache_cpp.client import BlockIds, CacheClient, Key, KvTransferClient, RegistrationInfo
from lmcache_cpp.client.kv_transfer import TransferRequests
from lmcache_cpp.cuda import require_cuda
from lmcache_cpp.errors import LMCacheError, UnavailableError
from lmcache_cpp.protocol import WireKey

__all__ = ["CudaKvTransferClient", "StreamBoundView"]


class StreamBoundView:
    """A CudaKvCacheView in the shape of the CPU view KvTransferClient drives: each batch is
    queued on one stream and the call returns once the copy's event has completed (also when
    queueing failed part way, so that no copy still reads or writes the arena afterwards)."""

    def __init__(
        self,
        view: _core.CudaKvCacheView,
        stream: int,
        event: _core.CudaEvent,
        engine: _core.CopyEngine | None = None,
    ) -> None:
        self._view = view
        self._stream = stream
        self._event = event
        self._engine = _core.CopyEngine.KERNEL if engine is None else engine

    @property
    def layout(self) -> _core.KvCacheLayout:
        return self._view.layout

    def object_bytes(self, chunk_size: int) -> int:
        return self._view.object_bytes(chunk_size)

    def gather_batch(
        self,
        chunk_size: int,
        block_ids: list[npt.NDArray[Any]],
        objects: list[npt.NDArray[Any]],
        num_tokens: list[int] | None = None,
        *,
        num_threads: int = 0,
        checksums: bool = False,
    ) -> list[int] | None:
        """Gathers on the GPU. No checksums come back from a GPU copy: the server computes the
        objects' CRC32C at COMMIT_STORE instead (returns None)."""
        del num_threads, checksums  # CPU options
        self._run(
            lambda: self._view.gather_batch(
                chunk_size,
                block_ids,
                objects,
                num_tokens,
                stream=self._stream,
                event=self._event,
                engine=self._engine,
            )
        )
        return None

    def scatter_batch(
        self,
        chunk_size: int,
        objects: list[npt.NDArray[Any]],
        block_ids: list[npt.NDArray[Any]],
        num_tokens: list[int] | None = None,
        skip_tokens: list[int] | None = None,
        *,
        num_threads: int = 0,
    ) -> None:
        del num_threads
        self._run(
            lambda: self._view.scatter_batch(
                chunk_size,
                objects,
                block_ids,
                num_tokens,
                skip_tokens,
                stream=self._stream,
                event=self._event,
                engine=self._engine,
            )
        )

    def _run(self, copy: Callable[[], object]) -> None:
        try:
            copy()  # records the event after the copies
        except BaseException:
            # The call may have queued part of its copies before failing: wait for the stream
            # up to here before the caller releases the arena objects, keeping the first error.
            with contextlib.suppress(LMCacheError):
                self._event.record(self._stream)
                self._event.synchronize()
            raise
        self._event.synchronize()


class CudaKvTransferClient:
    """Moves one worker's GPU KV blocks to and from the server's L1 arena (engine-driven mode).

    Built from a REGISTER_KV_CACHE reply (:meth:`register` does both). ``stream`` (an int handle,
    e.g. ``torch.cuda.current_stream().cuda_stream``) is where copies run unless a call names
    another; ``device`` is the KV tensors' device. ``engine`` picks the copy engine, and
    ``piece_bytes`` the size of the arena's registration pieces. Block ids and keys as in
    :class:`KvTransferClient`; every failure raises, nothing reports partial success.
    """

    def __init__(
        self,
        client: CacheClient | TransferRequests,
        registration: RegistrationInfo,
        *,
        device: int,
        stream: int,
        engine: _core.CopyEngine | None = None,
        piece_bytes: int = 1 << 30,
        owns_registration: bool = False,
    ) -> None:
        require_cuda()
        self._transfer = KvTransferClient(client, registration, owns_registration=owns_registration)
        try:
            arena = self._transfer._arena
            if arena is None:
                raise UnavailableError("the transfer client is closed")
            self._host: _core.CudaHostRegistration | None = _core.CudaHostRegistration(
                arena.view(), piece_bytes=piece_bytes
            )
            self._event = _core.CudaEvent(device)
        except BaseException:
            self._transfer.close()
            raise
        self._stream = stream
        self._engine = _core.CopyEngine.KERNEL if engine is None else engine

    @classmethod
    def register(
        cls,
        client: CacheClient,
        model_name: str,
        world_size: int,
        worker_id: int,
        kv: _core.CudaKvCacheView,
        *,
        stream: int,
        engine: _core.CopyEngine | None = None,
        piece_bytes: int = 1 << 30,
    ) -> CudaKvTransferClient:
        """Registers ``kv``'s layout, maps and registers the arena; :meth:`close` undoes it."""
        reg = client.register_kv_cache(model_name, world_size, worker_id, kv.layout)
        try:
            return cls(
                client,
                reg,
                device=kv.device,
                stream=stream,
                engine=engine,
                piece_bytes=piece_bytes,
                owns_registration=True,
            )
        except BaseException:
            client.unregister_kv_cache(reg["registration_id"])
            raise

    @property
    def registration(self) -> RegistrationInfo:
        return self._transfer.registration

    @property
    def chunk_size(self) -> int:
        return self._transfer.chunk_size

    @property
    def register_seconds(self) -> float:
        """How long registering the arena with CUDA took (context creation excluded)."""
        return 0.0 if self._host is None else self._host.register_seconds

    def close(self) -> None:
        """Unregisters the arena from CUDA, unmaps it (and unregisters the layout, when
        :meth:`register` made the registration). Copies must have finished (they have, unless a
        store or retrieve is running on another thread)."""
        host, self._host = self._host, None
        try:
            if host is not None:
                host.unregister()
        finally:
            self._transfer.close()

    def __enter__(self) -> CudaKvTransferClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def store(
        self,
        kv: _core.CudaKvCacheView,
        block_ids: BlockIds,
        key: Key | WireKey,
        *,
        stream: int | None = None,
    ) -> int:
        """PREPARE_STORE, gather every reserved chunk into the arena on the stream, wait for the
        copy, COMMIT_STORE. Returns the objects published (chunks already present are skipped)."""
        return self._transfer.store(self._bind(kv, stream), block_ids, key)

    def retrieve(
        self,
        kv: _core.CudaKvCacheView,
        block_ids: BlockIds,
        key: Key | WireKey,
        skip_tokens: int = 0,
        *,
        timeout_s: float | None = None,
        stream: int | None = None,
    ) -> int:
        """PREPARE_RETRIEVE, scatter every chunk into the blocks on the stream, wait for the copy,
        COMMIT_RETRIEVE. Returns the tokens of the key's range now in the engine (skipped ones
        included); raises like :meth:`KvTransferClient.retrieve`."""
        return self._transfer.retrieve(
            self._bind(kv, stream), block_ids, key, skip_tokens, timeout_s=timeout_s
        )

    def _bind(self, kv: _core.CudaKvCacheView, stream: int | None) -> _core.KvCacheView:
        if self._host is None:
            raise UnavailableError("the transfer client is closed")
        bound = StreamBoundView(
            kv, self._stream if stream is None else stream, self._event, self._engine
        )
        # KvTransferClient drives any object with the CPU view's layout, object_bytes and
        # gather_batch/scatter_batch; this one copies on the GPU.
        return cast(_core.KvCacheView, bound)
