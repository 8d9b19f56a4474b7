"""Keys and token ids as the client sends them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from lmcache_cpp import _core
from lmcache_cpp.errors import (
    InvalidArgumentError,
)
from lmcache_cpp.protocol import (
    LAYOUT_NAMES,
    WireKey,
    WireLayout,
    key_map,
)

TokensLike: TypeAlias = bytes | npt.NDArray[np.integer[Any]] | Sequence[int]
"""Token ids: packed little-endian uint32 bytes, a 1-D integer array, or a sequence of ints."""

_U32_MAX: Final = (1 << 32) - 1


def tokens_to_bytes(tokens: TokensLike) -> bytes:
    """Packs token ids as little-endian uint32 (ValueError for ids outside [0, 2**32))."""
    if isinstance(tokens, bytes | bytearray | memoryview):
        data = bytes(tokens)
        if len(data) % 4:
            raise ValueError(f"token bytes must be a multiple of 4 bytes, got {len(data)}")
        return data
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > _U32_MAX:
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


@dataclass(frozen=True)
class Key:
    """A request's key (see ``docs/protocol.md``, "Key map").

    ``tokens`` may be bytes (packed little-endian uint32), a 1-D integer array (numpy, or a torch
    CPU tensor) or a sequence of ints; it is stored as bytes. Give exactly one of ``tokens`` and
    ``block_hashes``. ``worker_id`` -1 means every rank; ``end`` -1 the end of the key.
    """

    model_name: str
    world_size: int = 1
    worker_id: int = -1
    request_id: str = ""
    tokens: TokensLike | None = None
    block_hashes: bytes | None = None
    block_hash_size: int = 32
    cache_salt: str = ""
    start: int = 0
    end: int = -1

    def __post_init__(self) -> None:
        if self.tokens is not None and not isinstance(self.tokens, bytes):
            object.__setattr__(self, "tokens", tokens_to_bytes(self.tokens))
        if (self.tokens is None) == (self.block_hashes is None):
            raise ValueError("Key: give exactly one of tokens and block_hashes")

    @property
    def token_bytes(self) -> bytes | None:
        assert self.tokens is None or isinstance(self.tokens, bytes)
        return self.tokens

    def with_range(self, start: int, end: int) -> Key:
        """The same key over tokens [start, end)."""
        return Key(
            self.model_name,
            self.world_size,
            self.worker_id,
            self.request_id,
            self.tokens,
            self.block_hashes,
            self.block_hash_size,
            self.cache_salt,
            start,
            end,
        )

    def to_wire_key(self) -> WireKey:
        return WireKey(
            model_name=self.model_name,
            world_size=self.world_size,
            worker_id=self.worker_id,
            request_id=self.request_id,
            cache_salt=self.cache_salt,
            tokens=self.token_bytes,
            block_hashes=self.block_hashes,
            block_hash_size=self.block_hash_size,
            start=self.start,
            end=self.end,
        )

    def to_wire(self) -> dict[str, Any]:
        """The key map of the wire format (``to_wire_key().to_wire()``, built directly)."""
        return key_map(**self.__dict__)  # the fields are key_map's parameters


def wire_layout(layout: _core.KvCacheLayout) -> WireLayout:
    """The REGISTER_KV_CACHE layout map of a ``_core.KvCacheLayout``."""
    return WireLayout(
        layout=LAYOUT_NAMES[int(layout.layout)],
        num_layers=int(layout.num_layers),
        block_size=int(layout.block_size),
        num_heads=int(layout.num_heads),
        head_size=int(layout.head_size),
        element_size=int(layout.element_size),
        num_blocks=int(layout.num_blocks),
        block_stride=int(layout.block_stride),
        plane_stride=int(layout.plane_stride),
    )


def _key(key: Key | WireKey) -> WireKey:
    return key.to_wire_key() if isinstance(key, Key) else key


def _check_handle(handle: bytes) -> bytes:
    if not isinstance(handle, bytes) or len(handle) != 16:
        raise InvalidArgumentError("a handle is 16 bytes")
    return handle


# ---------------------------------------------------------------------------------------------
# The I/O thread's bookkeeping
