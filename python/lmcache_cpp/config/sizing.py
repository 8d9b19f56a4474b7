"""Memory sizing: the automatic L1 size and the huge-page check, from ``/proc/meminfo``."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lmcache_cpp.config.common import (
    ARENA_GRANULE,
    AUTO_L1_FRACTION,
    AUTO_L1_MAX_BYTES,
    AUTO_L1_MIN_BYTES,
    KIB,
    MIB,
)

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Memory sizing


def _meminfo_bytes(text: str, key: str) -> int | None:
    """A ``/proc/meminfo`` value in bytes (``kB`` lines are scaled; bare counts returned as is)."""
    match = re.search(rf"^{re.escape(key)}:\s+(\d+)(\s+kB)?\s*$", text, re.MULTILINE)
    if match is None:
        return None
    value = int(match.group(1))
    return value * KIB if match.group(2) else value


def _read_meminfo() -> str:
    try:
        return Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return ""


def auto_l1_size_bytes(meminfo: str | None = None) -> int:
    """The automatic L1 size: 25% of MemAvailable, within [256 MiB, 64 GiB], in 2 MiB units.

    ``meminfo`` is the text of ``/proc/meminfo`` (read when None). Without MemAvailable the
    available physical pages from ``sysconf`` are used; without either, the 256 MiB minimum.
    """
    text = _read_meminfo() if meminfo is None else meminfo
    available = _meminfo_bytes(text, "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            available = 0
    size = int(available * AUTO_L1_FRACTION)
    size = min(max(size, AUTO_L1_MIN_BYTES), AUTO_L1_MAX_BYTES)
    size = size // ARENA_GRANULE * ARENA_GRANULE
    if size > available:
        _log.warning(
            "automatic L1 size %d MiB exceeds available memory (%d MiB); set l1_size_gb",
            size // MIB,
            available // MIB,
        )
    return size


def huge_pages_available(nbytes: int, meminfo: str | None = None) -> bool:
    """Whether ``/proc/meminfo`` shows enough free explicit huge pages for ``nbytes``."""
    text = _read_meminfo() if meminfo is None else meminfo
    free = _meminfo_bytes(text, "HugePages_Free")
    page = _meminfo_bytes(text, "Hugepagesize")
    if not free or not page:
        return False
    return free * page >= nbytes
