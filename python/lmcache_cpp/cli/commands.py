"""The ``lmcache-cpp`` command line: the parser and one handler per subcommand.

Subcommands:

* ``serve``: the cache server (``lmcache_cpp.app``), configured by flags and a config file
  (``lmcache_cpp.config``).
* ``demo``: starts a server in a child process and plays an engine workload against it
  (``lmcache_cpp.cli.demo``).
* ``status``: asks a running server what it holds and does.
* ``info``: version and how the native core was built.
* ``l1-demo``: an in-process walk through the L1 core alone (hashing, shared-memory arena,
  object table, leases, eviction), without a server (``lmcache_cpp.cli.l1_demo``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence

import numpy as np

import lmcache_cpp
from lmcache_cpp import _core
from lmcache_cpp.cli.status import format_status

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# info


def _cmd_info(args: argparse.Namespace) -> int:
    info = dict(lmcache_cpp.build_info())
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    info["native_module"] = str(_core.__file__)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"lmcache_cpp {lmcache_cpp.__version__}")
    width = max(len(k) for k in info)
    for key in sorted(info):
        value = info[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"  {key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point


def _cmd_serve(args: argparse.Namespace) -> int:
    from lmcache_cpp.app import run_forever
    from lmcache_cpp.config import ConfigError, config_from_args

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    if args.log_level == "WARNING":  # the top-level default: the server's own setting wins
        level = getattr(logging, config.log_level)
        logging.getLogger().setLevel(level)
        lmcache_cpp.set_core_log_level(level)
    try:
        return run_forever(config, ready_line=args.ready_line)
    except (ConfigError, ValueError, OSError, lmcache_cpp.LMCacheError) as exc:
        print(f"serve: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from lmcache_cpp.client import CacheClient

    try:
        with CacheClient(args.endpoint, timeout_s=args.timeout) as client:
            status = client.status()
    except (lmcache_cpp.LMCacheError, OSError) as exc:
        print(f"status: {args.endpoint}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(status))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lmcache_cpp.cli.demo import options_from_args, run_demo

    try:
        return run_demo(options_from_args(args))
    except (RuntimeError, OSError, lmcache_cpp.LMCacheError) as exc:
        print(f"demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _cmd_l1_demo(args: argparse.Namespace) -> int:
    from lmcache_cpp.cli.l1_demo import run_l1_demo

    return run_l1_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from lmcache_cpp.cli.demo import add_demo_arguments
    from lmcache_cpp.cli.l1_demo import add_l1_demo_arguments
    from lmcache_cpp.config import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="lmcache-cpp",
        description="lmcache_cpp: a KV-cache offloading server for LLM engines, with a C++ "
        "storage engine. 'serve' runs the server, 'demo' runs it with a built-in engine "
        "workload, 'status' asks a running server what it holds.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level, also for the core's own log lines (default: WARNING)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the cache server",
        description="Runs the cache server until SIGINT or SIGTERM. Settings come from the "
        "built-in defaults, then --config FILE (TOML or JSON), then the flags below. With no "
        "flags: tcp://127.0.0.1:5555, an L1 of 25% of available memory (at most 64 GiB), no L2.",
    )
    add_serve_arguments(serve)
    serve.add_argument(
        "--ready-line",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print 'READY <endpoint>' on stdout once the socket is bound (default: on)",
    )
    serve.set_defaults(handler=_cmd_serve)

    demo_server = sub.add_parser(
        "demo",
        help="start a server and play an engine workload against it",
        description="Starts 'lmcache-cpp serve' as a child process (ipc:// socket and a file L2 "
        "in a temporary directory) and plays one engine against it through the real protocol "
        "and the shared arena: stores the chunks of several prompts, looks them up and "
        "retrieves them from L1, flushes L1 and serves them again from L2, checks every byte, "
        "and shows a summary and the server's STATUS. Exits 1 if any check fails.",
    )
    add_demo_arguments(demo_server)
    demo_server.set_defaults(handler=_cmd_demo)

    status = sub.add_parser("status", help="what a running server holds and does")
    status.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5555",
        help="the server's endpoint (default: tcp://127.0.0.1:5555)",
    )
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the reply (default: 5)"
    )
    status.add_argument("--json", action="store_true", help="print the raw STATUS reply as JSON")
    status.set_defaults(handler=_cmd_status)

    info = sub.add_parser("info", help="version and build information")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_cmd_info)

    l1_demo = sub.add_parser(
        "l1-demo",
        help="in-process walk through the L1 core alone (no server)",
        description="An in-process walk through the L1 core alone: nothing listens on a "
        "socket and no engine is involved (see 'demo' for the server). Creates a shared-memory "
        "arena and an object table, hashes synthetic prompts that share a prefix, stores one "
        "object per chunk by writing through zero-copy views, looks every prompt up with "
        "prefix leases and verifies the bytes, then keeps storing until the arena has to evict "
        "and checks that chains lost their tails first. Exits 1 if any check fails.",
    )
    add_l1_demo_arguments(l1_demo)
    l1_demo.set_defaults(handler=_cmd_l1_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lmcache_cpp.set_core_log_level(level)
    _log.debug("running %s", args.command)
    handler = args.handler
    rc: int = handler(args)
    return rc
