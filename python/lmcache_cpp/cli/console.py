"""What the command-line tools print besides their results: one progress bar and one report of
checks, shared by ``lmcache-cpp demo`` and ``lmcache-cpp l1-demo``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["Progress", "Report"]


class Progress:
    """A one-line progress bar on a stream (stderr by default); silent when disabled."""

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self._label = label
        self._total = max(total, 1)
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._last_drawn = -1
        self.advance(0)

    def advance(self, n: int = 1) -> None:
        self._done = min(self._done + n, self._total)
        if not self._enabled:
            return
        percent = self._done * 100 // self._total
        if percent != self._last_drawn:
            self._last_drawn = percent
            self._draw(percent)

    def _draw(self, percent: int) -> None:
        width = 30
        filled = width * self._done // self._total
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:3d}% {self._done}/{self._total}")
        self._stream.flush()

    def close(self) -> None:
        if self._enabled:
            self._draw(self._done * 100 // self._total)
            self._stream.write("\n")
            self._stream.flush()


@dataclass
class Report:
    """The outcome of a tool's checks: the failures, and the rows of its summary table."""

    failures: list[str] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        """Records ``what`` as a failure unless ``ok``."""
        if not ok:
            self.failures.append(what)

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
