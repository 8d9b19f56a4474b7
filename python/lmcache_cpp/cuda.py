"""The GPU data path: whether it is usable here, and its classes.

The GPU copy kernels, host registration and events exist in ``lmcache_cpp._core`` only when the
package was built with CUDA (``pip install -C cmake.define.LMCACHE_CPP_ENABLE_CUDA=ON .``; see
docs/design/gpu.md). Such a build imports on any machine: the CUDA runtime is linked into the
module and looks for the driver only when first used. :func:`cuda_info` says what was found and
:func:`cuda_unavailable_reason` why the GPU path cannot be used: built without CUDA, no driver, a
driver older than the runtime, or no device.

The classes (:class:`CudaKvCacheView`, :class:`CudaEvent`, :class:`CudaHostRegistration`,
:class:`CopyEngine`, :class:`CudaCopyStats`) are re-exported from ``_core``; in a build without
CUDA, touching one raises :class:`~lmcache_cpp.errors.NotSupportedError` with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

from lmcache_cpp import _core
from lmcache_cpp.errors import NotSupportedError, UnavailableError

if TYPE_CHECKING:
    from lmcache_cpp._core import (
        CopyEngine,
        CudaCopyStats,
        CudaEvent,
        CudaHostRegistration,
        CudaKvCacheView,
    )

__all__ = [
    "CopyEngine",
    "CudaCopyStats",
    "CudaEvent",
    "CudaHostRegistration",
    "CudaInfo",
    "CudaKvCacheView",
    "cuda_available",
    "cuda_info",
    "cuda_unavailable_reason",
    "require_cuda",
]

_CLASSES = frozenset(
    {"CopyEngine", "CudaCopyStats", "CudaEvent", "CudaHostRegistration", "CudaKvCacheView"}
)

NOT_BUILT_REASON = (
    "lmcache_cpp was built without CUDA (rebuild with "
    "`pip install -C cmake.define.LMCACHE_CPP_ENABLE_CUDA=ON .`)"
)


class CudaInfo(TypedDict):
    """What the CUDA probe found (versions as 1000 * major + 10 * minor, e.g. 13000)."""

    built: bool  # the module has the GPU path
    usable: bool  # and a device is reachable through a new enough driver
    device_count: int
    runtime_version: int  # of the CUDA runtime linked into the module; 0 when not built
    driver_version: int  # CUDA version the driver supports; 0 when there is no driver
    reason: str  # why not usable; "" when usable


def cuda_info() -> CudaInfo:
    """The CUDA probe of this process (cached by the core after the first call; never raises)."""
    probe = getattr(_core, "cuda_info", None)
    if probe is None:
        return CudaInfo(
            built=False,
            usable=False,
            device_count=0,
            runtime_version=0,
            driver_version=0,
            reason=NOT_BUILT_REASON,
        )
    found: dict[str, Any] = probe()
    return CudaInfo(
        built=bool(found["built"]),
        usable=bool(found["usable"]),
        device_count=int(found["device_count"]),
        runtime_version=int(found["runtime_version"]),
        driver_version=int(found["driver_version"]),
        reason=str(found["reason"]),
    )


def cuda_available() -> bool:
    """True when the GPU path is built and a CUDA device is usable here."""
    return cuda_info()["usable"]


def cuda_unavailable_reason() -> str | None:
    """Why the GPU path cannot be used here, or None when it can."""
    info = cuda_info()
    return None if info["usable"] else info["reason"]


def require_cuda() -> None:
    """Raises NotSupportedError (built without CUDA) or UnavailableError (no usable device)."""
    info = cuda_info()
    if not info["built"]:
        raise NotSupportedError(info["reason"])
    if not info["usable"]:
        raise UnavailableError(f"CUDA is not usable: {info['reason']}")


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        if hasattr(_core, name):
            return getattr(_core, name)
        raise NotSupportedError(f"lmcache_cpp.cuda.{name}: {NOT_BUILT_REASON}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
