"""``python -m lmcache_cpp``: the ``lmcache-cpp`` command line."""

from __future__ import annotations

import sys

from lmcache_cpp.cli import main

if __name__ == "__main__":
    sys.exit(main())
