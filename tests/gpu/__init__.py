"""GPU tests (marked gpu). One rule for a missing backend, shared by every file here.

A test whose kernel library (mamba-ssm, causal-conv1d, flash-attn, Transformer Engine...) is not
installed is skipped with the install hint, so `make test-gpu` runs on any CUDA machine. Under
``REQUIRE_BACKENDS`` (any value but empty or 0; tests/device/device_check.sh sets it on the GPU
test machine, where every backend is meant to be there) it fails instead: a skipped kernel test
would let a device check pass with the backend off.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def backends_required() -> bool:
    return os.environ.get("REQUIRE_BACKENDS", "") not in ("", "0")


def missing_backend(reason: str) -> NoReturn:
    """Skip the calling test because a backend is missing; fail it under REQUIRE_BACKENDS."""
    __tracebackhide__ = True  # reports name the test's line, not this one
    if backends_required():
        pytest.fail(f"REQUIRE_BACKENDS is set and a backend is missing: {reason}")
    pytest.skip(reason)


def import_backend(module: str, hint: str = "") -> ModuleType:
    """`pytest.importorskip` under the rule above: the module, or a skip (a failure under REQUIRE_BACKENDS)."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing_backend(f"could not import {module} ({type(err).__name__}: {err}){' ' + hint if hint else ''}")
