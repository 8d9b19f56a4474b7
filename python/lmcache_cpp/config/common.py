"""What the configuration modules share: units, size limits, the error type and the value
checks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB

AUTO_L1_FRACTION: Final = 0.25
AUTO_L1_MIN_BYTES: Final = 256 * MIB
AUTO_L1_MAX_BYTES: Final = 64 * GIB
# Arena sizes are multiples of 2 MiB, the x86-64 huge page, so one size works with either page kind.
ARENA_GRANULE: Final = 2 * MIB
FS_AUTO_CAPACITY_FRACTION: Final = 0.5
MEMORY_ADAPTER_DEFAULT_CAPACITY_GB: Final = 1.0

# The binding's CacheEngine, once the native module has it (lmcache_cpp._core.CacheEngine).
CacheEngine: TypeAlias = Any

_Z85_KEY: Final = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration value, file, flag or L2 adapter spec is invalid; the message names it."""


def _did_you_mean(key: object, known: Sequence[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is not in [{lo}, {hi}]")


def _coerce(name: str, value: Any, kind: str) -> Any:
    """Type-checks one field value (ints are accepted for floats); raises ConfigError."""
    if kind.startswith("opt_"):
        if value is None:
            return None
        kind = kind[4:]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an int beyond the range of a float
            raise ConfigError(f"{name}: the integer is too large for a number") from None
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind == "adapters":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of adapter tables, got {value!r}")
        out: list[dict[str, Any]] = []
        for i, spec in enumerate(value):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{name}[{i}]: expected a table/object, got {spec!r}")
            out.append(dict(spec))
        return out
    raise AssertionError(f"unknown field kind {kind!r}")
