"""Loading a configuration: config files (TOML or JSON) and the layered :func:`load_config`."""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmcache_cpp.config.common import (
    ConfigError,
    _did_you_mean,
)
from lmcache_cpp.config.schema import ServerConfig

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Loading


def _toml_module() -> Any:
    # tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ConfigError("TOML config files need Python 3.11+ or the 'tomli' package; or use JSON")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The table in a ``.toml`` or ``.json`` config file (keys are not checked here)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"config file {str(p)!r}: unsupported extension (use .toml or .json)")
    toml = _toml_module() if suffix == ".toml" else None
    try:
        if toml is not None:
            with p.open("rb") as fh:
                data: Any = toml.load(fh)
        else:
            with p.open("r", encoding="utf-8") as fh:
                data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: cannot read: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
    except Exception as exc:
        if toml is not None and isinstance(exc, toml.TOMLDecodeError):
            raise ConfigError(f"config file {str(p)!r}: parse error: {exc}") from exc
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a table/object")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerConfig:
    """Defaults < the config file at ``path`` (if any) < ``overrides`` (field name -> value)."""
    merged: dict[str, Any] = {}
    if path is not None:
        file_values = load_config_file(path)
        known = ServerConfig.field_names()
        for key in file_values:
            if key not in known:
                raise ConfigError(
                    f"config file {os.fspath(path)!r}: unknown key {key!r}"
                    f"{_did_you_mean(key, known)}"
                )
        merged.update(file_values)
    if overrides:
        merged.update(overrides)
    return ServerConfig.from_mapping(merged)
