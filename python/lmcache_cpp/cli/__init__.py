"""The ``lmcache-cpp`` command and what it runs besides the server.

* ``commands``: the parser and the subcommands (``serve``, ``demo``, ``status``, ``info``,
  ``l1-demo``); ``main`` is the console script.
* ``status``: the human-readable STATUS summary.
* ``demo`` and ``l1_demo``: the two demos; ``console``: their progress bar and report.
"""

from __future__ import annotations

from lmcache_cpp.cli.commands import build_parser, main
from lmcache_cpp.cli.status import format_status

__all__ = ["build_parser", "format_status", "main"]
