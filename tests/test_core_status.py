"""Status -> exception mapping, the stub's fidelity, version/build info and the log bridge."""

from __future__ import annotations

import ast
import enum
import importlib.metadata
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

import lmcache_cpp as lc
from lmcache_cpp import _core, errors

# Written out independently of lmcache_cpp.errors, so a wrong table there fails here.
EXPECTED: dict[str, tuple[int, str, type[lc.LMCacheError]]] = {
    "INVALID_ARGUMENT": (1, "InvalidArgument", lc.InvalidArgumentError),
    "KEY_ABSENT": (2, "KeyAbsent", lc.KeyAbsentError),
    "NOT_READABLE": (3, "NotReadable", lc.NotReadableError),
    "NOT_WRITABLE": (4, "NotWritable", lc.NotWritableError),
    "WRONG_STATE": (5, "WrongState", lc.WrongStateError),
    "LOCKED": (6, "Locked", lc.LockedError),
    "OUT_OF_MEMORY": (7, "OutOfMemory", lc.OutOfMemoryError),
    "LEASE_NOT_HELD": (8, "LeaseNotHeld", lc.LeaseNotHeldError),
    "NOT_FOUND": (9, "NotFound", lc.NotFoundError),
    "ALREADY_EXISTS": (10, "AlreadyExists", lc.AlreadyExistsError),
    "RESOURCE_EXHAUSTED": (11, "ResourceExhausted", lc.ResourceExhaustedError),
    "TIMEOUT": (12, "Timeout", lc.DeadlineExceededError),
    "CANCELLED": (13, "Cancelled", lc.CancelledError),
    "IO_ERROR": (14, "IoError", lc.LMCacheIOError),
    "CORRUPTION": (15, "Corruption", lc.CorruptionError),
    "PERMISSION_DENIED": (16, "PermissionDenied", lc.PermissionDeniedError),
    "UNAVAILABLE": (17, "Unavailable", lc.UnavailableError),
    "NOT_SUPPORTED": (18, "NotSupported", lc.NotSupportedError),
    "INTERNAL": (19, "Internal", lc.InternalError),
}


def test_every_status_code_has_an_expected_class() -> None:
    names = {m.name for m in lc.StatusCode if m is not lc.StatusCode.OK}
    assert names == set(EXPECTED)
    assert lc.StatusCode.OK == 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_status_code_maps_to_its_class(name: str) -> None:
    value, code_name, cls = EXPECTED[name]
    assert int(lc.StatusCode[name]) == value
    with pytest.raises(lc.LMCacheError) as info:
        _core.raise_status(value, "something failed")
    err = info.value
    assert type(err) is cls
    assert err.code == value
    assert err.code_name == code_name
    assert err.message == "something failed"
    assert str(err) == f"{code_name}: something failed"
    assert errors.from_code(value, "m").__class__ is cls


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        _core.raise_status(int(lc.StatusCode.INVALID_ARGUMENT), "bad")
    assert issubclass(lc.InvalidArgumentError, ValueError)


def test_no_other_class_doubles_as_a_builtin_exception() -> None:
    assert not issubclass(lc.OutOfMemoryError, MemoryError)
    assert not issubclass(lc.DeadlineExceededError, TimeoutError)
    assert not issubclass(lc.LMCacheIOError, OSError)
    for _, _, cls in EXPECTED.values():
        if cls is not lc.InvalidArgumentError:
            assert not issubclass(cls, ValueError)


def test_ok_raises_nothing() -> None:
    assert _core.raise_status(0, "") is None


def test_unknown_code_raises_the_base_class() -> None:
    with pytest.raises(lc.LMCacheError) as info:
        _core.raise_status(999, "from a newer peer")
    assert type(info.value) is lc.LMCacheError
    assert info.value.code == 999
    assert info.value.code_name == "Unknown"


def test_errors_pickle_with_their_code() -> None:
    err = errors.from_code(int(lc.StatusCode.LOCKED), "leased")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is lc.LockedError
    assert (back.code, back.code_name, back.message) == (err.code, "Locked", "leased")


def test_status_code_names_come_from_the_core() -> None:
    for name, (value, code_name, _) in EXPECTED.items():
        assert lc.status_code_name(value) == code_name, name
    assert lc.status_code_name(0) == "OK"


def test_real_core_failures_use_the_mapping() -> None:
    with pytest.raises(lc.InvalidArgumentError, match="InvalidArgument"):
        lc.ChunkHasher(lc.NamespaceConfig(), 0)
    with pytest.raises(lc.InvalidArgumentError):
        lc.Arena(0)
    with pytest.raises(lc.LMCacheIOError):
        lc.AttachedArena(lc.ArenaDescriptor("/nonexistent/lmcache_cpp", 4096))


def test_errors_are_re_exported() -> None:
    classes = [n for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert len(classes) == len(EXPECTED) + 1
    for name in classes:
        assert getattr(lc, name) is getattr(errors, name)
        assert name in lc.__all__


# ---- the stub (generated at build time by nanobind's stubgen) matches the module ---------------

_STUB = Path(lc.__file__).with_name("_core.pyi")
_STUB_ONLY = {"Tokens", "ByteView"}  # type aliases that exist only for the type checker
# In the module only when it was built with CUDA (bindings/bind_cuda.cc).
_CUDA_ONLY = {
    "cuda_info",
    "CopyEngine",
    "CudaCopyStats",
    "CudaEvent",
    "CudaHostRegistration",
    "CudaKvCacheView",
    # bindings/bind_device.cc (the server-driven mode's CUDA primitives)
    "CudaExportedEvent",
    "CudaImportedEvent",
    "CudaIpcMemory",
    "CudaStream",
}
_BUILT_WITH_CUDA = bool(_core.build_info().get("cuda", False))


def _stub_tree() -> ast.Module:
    return ast.parse(_STUB.read_text())


def _stub_members(node: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names


def _stub_top_level() -> dict[str, ast.stmt]:
    out: dict[str, ast.stmt] = {}
    for node in _stub_tree().body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _module_public_names() -> set[str]:
    return {n for n in dir(_core) if not n.startswith("_")}


def test_stub_lists_exactly_the_module_names() -> None:
    stub = set(_stub_top_level()) - _STUB_ONLY
    if not _BUILT_WITH_CUDA:
        stub -= _CUDA_ONLY
    assert stub == _module_public_names()


# Supplied by Python or nanobind for every class (the stub may list them or leave them to
# `object`).
_IMPLICIT = {"__doc__", "__module__", "__new__", "__repr__", "__str__", "__init__"}


def _runtime_members(cls: type[Any]) -> set[str]:
    if issubclass(cls, enum.Enum):
        return set(cls.__members__)
    return {n for n in vars(cls) if n not in _IMPLICIT}


@pytest.mark.parametrize(
    "name",
    sorted(n for n, node in _stub_top_level().items() if isinstance(node, ast.ClassDef)),
)
def test_stub_class_members_match(name: str) -> None:
    if name in _CUDA_ONLY and not _BUILT_WITH_CUDA:
        pytest.skip("the module was built without CUDA")
    node = _stub_top_level()[name]
    assert isinstance(node, ast.ClassDef)
    cls = getattr(_core, name)
    assert _stub_members(node) - _IMPLICIT == _runtime_members(cls)
    if "__init__" not in _stub_members(node) and not issubclass(cls, enum.Enum):
        with pytest.raises(TypeError):
            cls()  # the stub declares no constructor: Python code cannot make one


def test_stub_enum_values_match() -> None:
    for node in _stub_tree().body:
        if not isinstance(node, ast.ClassDef):
            continue
        if node.name in _CUDA_ONLY and not _BUILT_WITH_CUDA:
            continue
        cls = getattr(_core, node.name)
        if not issubclass(cls, enum.Enum):
            continue
        for item in node.body:
            if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant):
                (target,) = item.targets
                assert isinstance(target, ast.Name)
                assert cls[target.id].value == item.value.value, f"{node.name}.{target.id}"


def test_stub_defaults_of_options_match() -> None:
    opts = lc.ObjectTableOptions()
    assert opts.read_lease_ttl_s == 300.0
    assert opts.write_lease_ttl_s == 120.0
    assert opts.high_watermark == 0.95
    assert opts.low_watermark == 0.9
    assert opts.reap_interval_s == 1.0
    assert opts.eviction_policy == "lru"
    assert opts.alignment == 4096
    assert lc.CHUNK_HASH_SIZE == 32
    assert lc.MAX_BLOCK_HASH_SIZE == 64


# ---- version and build info -------------------------------------------------------------------


def test_version_matches_the_distribution() -> None:
    assert lc.__version__ == lc.version() == importlib.metadata.version("lmcache_cpp")


def test_build_info_reports_xxhash_truthfully() -> None:
    info = lc.build_info()
    assert {"version", "compiler", "optimized", "nanobind", "stable_abi", "xxhash"} <= set(info)
    assert info["nanobind"] == "3.1.0"
    ns = lc.NamespaceConfig("m")
    if info["xxhash"]:
        assert lc.ChunkHasher(ns, 4, lc.HashAlgorithm.XXH3).algorithm is lc.HashAlgorithm.XXH3
    else:
        with pytest.raises(lc.NotSupportedError):
            lc.ChunkHasher(ns, 4, lc.HashAlgorithm.XXH3)


# ---- logging bridge ---------------------------------------------------------------------------


@pytest.fixture
def core_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="lmcache_cpp.core")
    return caplog


def _core_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "lmcache_cpp.core"]


def test_core_log_lines_reach_python_logging(core_logs: pytest.LogCaptureFixture) -> None:
    _core.emit_log(logging.WARNING, "from the calling thread")
    _core.emit_log(logging.ERROR, "from a C++ thread", from_cpp_thread=True)
    assert _core_messages(core_logs) == [
        (logging.WARNING, "from the calling thread"),
        (logging.ERROR, "from a C++ thread"),
    ]


def test_core_log_level_filters_in_the_core(core_logs: pytest.LogCaptureFixture) -> None:
    try:
        _core.emit_log(logging.INFO, "dropped at the default level")
        lc.set_core_log_level(logging.DEBUG)
        _core.emit_log(logging.DEBUG, "kept once lowered")
    finally:
        lc.set_core_log_level(logging.WARNING)
    assert _core_messages(core_logs) == [(logging.DEBUG, "kept once lowered")]


def test_a_failing_handler_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def hook(unraisable: Any) -> None:
        seen.append(type(unraisable.exc_value).__name__)

    def bad_handler(level: int, message: str) -> None:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(sys, "unraisablehook", hook)
    try:
        _core.set_log_handler(bad_handler, logging.WARNING)
        _core.emit_log(logging.WARNING, "x")
        _core.emit_log(logging.WARNING, "y", from_cpp_thread=True)
    finally:
        lc.set_core_log_level(logging.WARNING)
    assert seen == ["RuntimeError", "RuntimeError"]


def test_handler_none_restores_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    try:
        _core.set_log_handler(None)
        _core.emit_log(logging.ERROR, "to stderr", from_cpp_thread=True)
    finally:
        lc.set_core_log_level(logging.WARNING)
    assert "to stderr" in capfd.readouterr().err


def test_non_callable_handler_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _core.set_log_handler(42)  # type: ignore[arg-type]
