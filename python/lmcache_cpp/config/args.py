"""The ``serve`` command's flags, and the configuration they give."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from lmcache_cpp.config.loading import (
    load_config,
)
from lmcache_cpp.config.schema import (
    ServerConfig,
)

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Command line


def _flag_default(value: Any, none_text: str) -> str:
    if value is None:
        return none_text
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "none"
    return str(value)


def _parse_positive_float_or_auto(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    return float(text)


def _parse_port_or_off(text: str) -> int | None:
    if text.strip().lower() in ("off", "none"):
        return None
    return int(text)


def _parse_adapter_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f'expected a JSON object such as {{"type": "fs", "path": "/dir"}}, got {text!r}'
        )
    return value


def _parse_optional_path(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


_FLAG_TYPES: Final[dict[str, Callable[[str], Any]]] = {
    "int": int,
    "float": float,
    "str": str,
    "opt_str": _parse_optional_path,
}


_DEST_PREFIX: Final = "serve_"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config`` and one flag per :class:`ServerConfig` field to ``parser``.

    Flags that are not given leave no attribute in the namespace (their default is
    ``argparse.SUPPRESS``), which is how :func:`config_from_args` tells them from given ones;
    the help texts show the built-in defaults. Destinations are ``serve_<field>`` so that a
    parent parser's own options (``--log-level`` of the top-level CLI) never pose as given flags.
    """
    parser.add_argument(
        "--config",
        dest=_DEST_PREFIX + "config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML (.toml) or JSON (.json) file of settings, keys as the field names "
        "(chunk_size, l2_adapters, ...); flags override it (default: none)",
    )
    for f in dataclasses.fields(ServerConfig):
        kind: str = f.metadata["kind"]
        default = [] if kind == "adapters" else f.default
        shown = _flag_default(default, f.metadata.get("none_text", "none"))
        help_text = f"{f.metadata['help']} (default: {shown})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar", None)
        elif kind == "adapters":
            flag = "--l2-adapter"
            kwargs["action"] = "append"
            kwargs["type"] = _parse_adapter_json
        elif f.name == "l1_size_gb":
            kwargs["type"] = _parse_positive_float_or_auto
        elif f.name == "metrics_port":
            kwargs["type"] = _parse_port_or_off
        elif f.name == "log_level":
            kwargs["type"] = str.upper
        else:
            kwargs["type"] = _FLAG_TYPES[kind]
        parser.add_argument(flag, dest=_DEST_PREFIX + f.name, **kwargs)


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed flags: defaults < ``--config`` file < given flags."""
    overrides = {
        name: getattr(ns, _DEST_PREFIX + name)
        for name in ServerConfig.field_names()
        if hasattr(ns, _DEST_PREFIX + name)
    }
    return load_config(getattr(ns, _DEST_PREFIX + "config", None), overrides)
