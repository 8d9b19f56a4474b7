"""Exceptions raised by lmcache_cpp.

The C++ core reports expected failures as ``Status`` values carrying a stable ``StatusCode``.
They become exceptions only at the Python edge, in one place: the native module's exception
translator (``bindings/core_module.cc``) calls :func:`from_code` below with the code and message
and raises what it returns. This module is therefore the single table from status code to
exception class; the native module holds no class list of its own.

Every class derives from :class:`LMCacheError`, whose instances carry ``code`` (the integer
``StatusCode``) and ``code_name`` (the core's name for it, e.g. ``"KeyAbsent"``).
:class:`InvalidArgumentError` is also a :class:`ValueError`. No other class doubles as a builtin
exception: ``OutOfMemoryError`` is not a ``MemoryError`` (the arena is full, the process is not),
and the timeout and I/O classes are named ``DeadlineExceededError`` and ``LMCacheIOError`` so they
do not shadow the builtins ``TimeoutError`` and ``IOError``.
"""

from __future__ import annotations

from typing import ClassVar, Final

from lmcache_cpp._core import StatusCode, status_code_name

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "CorruptionError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "KeyAbsentError",
    "LMCacheError",
    "LMCacheIOError",
    "LeaseNotHeldError",
    "LockedError",
    "NotFoundError",
    "NotReadableError",
    "NotSupportedError",
    "NotWritableError",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "WrongStateError",
    "error_class",
    "from_code",
]


class LMCacheError(Exception):
    """Base class of every error the core reports.

    ``code`` is the integer status code, ``code_name`` the core's name for it and ``message``
    the core's message. ``str(err)`` is ``"<code_name>: <message>"``, the core's own format.
    Instantiated directly only for a code this version does not know (a newer peer's).
    """

    status_code: ClassVar[int] = int(StatusCode.INTERNAL)

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.message: str = message
        self.code: int = type(self).status_code if code is None else int(code)
        self.code_name: str = status_code_name(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.message else self.code_name

    def __reduce__(self) -> tuple[type[LMCacheError], tuple[str, int]]:
        return (type(self), (self.message, self.code))


class InvalidArgumentError(LMCacheError, ValueError):
    """The caller passed something malformed."""

    status_code = int(StatusCode.INVALID_ARGUMENT)


class KeyAbsentError(LMCacheError):
    """The object is not in the table."""

    status_code = int(StatusCode.KEY_ABSENT)


class NotReadableError(LMCacheError):
    """The object exists but cannot be read (still being written)."""

    status_code = int(StatusCode.NOT_READABLE)


class NotWritableError(LMCacheError):
    """The object exists and cannot be reserved for writing."""

    status_code = int(StatusCode.NOT_WRITABLE)


class WrongStateError(LMCacheError):
    """The transition is illegal in the object's current state."""

    status_code = int(StatusCode.WRONG_STATE)


class LockedError(LMCacheError):
    """The object holds leases; the operation needs it unleased."""

    status_code = int(StatusCode.LOCKED)


class OutOfMemoryError(LMCacheError):
    """The arena cannot hold the batch, even after eviction."""

    status_code = int(StatusCode.OUT_OF_MEMORY)


class LeaseNotHeldError(LMCacheError):
    """The request releases or commits a lease it does not hold."""

    status_code = int(StatusCode.LEASE_NOT_HELD)


class NotFoundError(LMCacheError):
    """A non-object entity (session, handle, engine) does not exist."""

    status_code = int(StatusCode.NOT_FOUND)


class AlreadyExistsError(LMCacheError):
    """Creating something that exists."""

    status_code = int(StatusCode.ALREADY_EXISTS)


class ResourceExhaustedError(LMCacheError):
    """A bounded table is full."""

    status_code = int(StatusCode.RESOURCE_EXHAUSTED)


class DeadlineExceededError(LMCacheError):
    """A deadline passed (core code ``Timeout``)."""

    status_code = int(StatusCode.TIMEOUT)


class CancelledError(LMCacheError):
    """The operation was cancelled or the component stopped."""

    status_code = int(StatusCode.CANCELLED)


class LMCacheIOError(LMCacheError):
    """An operating-system call failed (core code ``IoError``)."""

    status_code = int(StatusCode.IO_ERROR)


class CorruptionError(LMCacheError):
    """Stored bytes failed validation."""

    status_code = int(StatusCode.CORRUPTION)


class PermissionDeniedError(LMCacheError):
    """The caller may not use this handle or resource."""

    status_code = int(StatusCode.PERMISSION_DENIED)


class UnavailableError(LMCacheError):
    """The component is stopped or not started."""

    status_code = int(StatusCode.UNAVAILABLE)


class NotSupportedError(LMCacheError):
    """The build or platform lacks the feature."""

    status_code = int(StatusCode.NOT_SUPPORTED)


class InternalError(LMCacheError):
    """An invariant broke; a bug."""

    status_code = int(StatusCode.INTERNAL)


_BY_CODE: Final[dict[int, type[LMCacheError]]] = {
    cls.status_code: cls
    for cls in (
        InvalidArgumentError,
        KeyAbsentError,
        NotReadableError,
        NotWritableError,
        WrongStateError,
        LockedError,
        OutOfMemoryError,
        LeaseNotHeldError,
        NotFoundError,
        AlreadyExistsError,
        ResourceExhaustedError,
        DeadlineExceededError,
        CancelledError,
        LMCacheIOError,
        CorruptionError,
        PermissionDeniedError,
        UnavailableError,
        NotSupportedError,
        InternalError,
    )
}


def error_class(code: int) -> type[LMCacheError]:
    """The exception class for a non-OK status code (:class:`LMCacheError` if unknown)."""
    return _BY_CODE.get(int(code), LMCacheError)


def from_code(code: int, message: str) -> LMCacheError:
    """The exception for a non-OK status ``code`` with ``message``.

    Called by the native module's exception translator for every failed core call; also usable
    for statuses that arrive from elsewhere (e.g. an error reply from a server).
    """
    return error_class(code)(message, code)
