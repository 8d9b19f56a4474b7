"""Shared by the GPU tests: why they cannot run here, and skipping (or, with
LMCACHE_CPP_REQUIRE_GPU=1 as scripts/gpu_check.sh sets it, failing) for that reason."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lmcache_cpp import cuda as lcc

REQUIRE_GPU = os.environ.get("LMCACHE_CPP_REQUIRE_GPU") == "1"


def gpu_skip_reason(*, needs: tuple[str, ...] = ()) -> str | None:
    """None when the GPU tests can run: a CUDA build, torch with CUDA, a usable device, and the
    modules in `needs` importable."""
    info = lcc.cuda_info()
    if not info["built"]:
        return info["reason"]
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        built_for = torch.version.cuda
        return f"torch {torch.__version__} has no usable CUDA (torch.version.cuda={built_for})"
    if not info["usable"]:
        return f"no CUDA device: {info['reason']}"
    for name in needs:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


def require_gpu(*, needs: tuple[str, ...] = ()) -> None:
    """Skips the calling test when the GPU tests cannot run here; fails it instead when
    LMCACHE_CPP_REQUIRE_GPU=1."""
    reason = gpu_skip_reason(needs=needs)
    if reason is None:
        return
    if REQUIRE_GPU:
        pytest.fail(f"LMCACHE_CPP_REQUIRE_GPU=1 but the GPU tests cannot run: {reason}")
    pytest.skip(reason)
