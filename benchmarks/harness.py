"""What the Python benchmarks share: their child processes and the frame of their ``main()``.

Every child starts in its own session, with its stderr in ``<workdir>/<name>.log``, so a Ctrl-C
reaches only the benchmark, which then stops its children in order. :func:`run_benchmark` is the
frame every benchmark's ``main()`` runs its work in: a temporary work directory, SIGTERM turned
into KeyboardInterrupt, the failure printed with the tails of the children's logs, every child
stopped and the directory removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

__all__ = [
    "ChildProcesses",
    "apply_defaults",
    "child_role",
    "raise_interrupt",
    "run_benchmark",
]

_STOP_GRACE_S = 15.0


class ChildProcesses:
    """The child processes of one benchmark; subclasses read their stdout (:meth:`_watch`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[tuple[subprocess.Popen[str], IO[str]]] = []

    def _spawn(self, name: str, argv: Sequence[str], stdin: bool) -> subprocess.Popen[str]:
        log = (self.workdir / f"{name}.log").open("w")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._started.append((proc, log))
        return proc

    @staticmethod
    def send(proc: subprocess.Popen[str], signum: int) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def wait_or_kill(self, proc: subprocess.Popen[str], timeout_s: float) -> int | None:
        """The exit status once the child exited within ``timeout_s``, else None after a
        SIGKILL; closes its log either way."""
        try:
            proc.wait(timeout=timeout_s)
            status: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            status = None
        for p, log in self._started:
            if p is proc:
                log.close()
        return status

    def stop_all(self) -> None:
        """SIGTERM to every running child (newest first), then SIGKILL to what is left after
        15 s."""
        for proc, _ in reversed(self._started):
            self.send(proc, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for proc, _ in reversed(self._started):
            self.wait_or_kill(proc, max(0.1, deadline - time.monotonic()))

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise KeyboardInterrupt


_Children = TypeVar("_Children", bound=ChildProcesses)


def run_benchmark(
    tool: str,
    children_type: Callable[[Path], _Children],
    body: Callable[[_Children], int],
    *,
    errors: tuple[type[BaseException], ...],
    logs: Sequence[str] = ("server",),
    log_lines: int = 20,
    keep: bool = False,
) -> int:
    """Runs ``body`` with the benchmark's children in a fresh work directory; returns the exit
    status: ``body``'s, 130 when interrupted (Ctrl-C or SIGTERM), 1 on one of ``errors`` (printed
    with the tails of the ``logs`` children's logs). ``keep`` leaves the directory in place."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"lmcache-{tool.replace('_', '-')}-"))
    children = children_type(workdir)
    try:
        return body(children)
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130
    except errors as exc:
        print(f"{tool}: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name in logs:
            tail = children.log_tail(name, log_lines)
            if tail:
                print(f"--- {name} log (last lines):\n{tail}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        if keep:
            print(f"{tool}: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def apply_defaults(args: argparse.Namespace, defaults: Mapping[str, object]) -> argparse.Namespace:
    """Sets every option of ``defaults`` that the command line left at None."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def child_role(args: argparse.Namespace, roles: Mapping[str, Callable[[Any], int]]) -> int | None:
    """Runs the child role the command line names (a hidden ``--_<role>`` flag whose value is
    the role's spec) and returns its exit status; None when this process is the benchmark."""
    for dest, role_main in roles.items():
        spec = getattr(args, dest)
        if spec:
            return role_main(spec)
    return None
