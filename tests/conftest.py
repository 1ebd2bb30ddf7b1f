"""Shared test configuration: one device switch, one quick/full switch, one tolerance table.

* Kernel tests run on CUDA when a GPU is present, else on the CPU under Triton's interpreter
  (``TRITON_INTERPRET=1`` must be set before triton is imported, as ``.ci/run`` does); otherwise they
  are skipped.
* ``MBF_TEST_MODE=quick|full`` picks the shape set (default: full on a GPU, quick elsewhere).
* Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped without one.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODE = os.environ.get("MBF_TEST_MODE", "full" if HAS_CUDA and not INTERPRET else "quick")
QUICK = MODE == "quick"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton
    HAS_TRITON = False

# Tolerances of a result computed in ``dtype`` against the float64 reference: (atol, rtol).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def kernel_device() -> str:
    """Device on which the Triton kernels can run here, or skip the calling test."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRET:
        return "cpu"
    if HAS_CUDA:
        return "cuda"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA and not INTERPRET:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run without TRITON_INTERPRET on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
