"""The compiler's resource report for sm_90 (no GPU needed): default launch configs must not spill.

Runs perf/resource_report.py in a subprocess without TRITON_INTERPRET (the interpreter replaces the jit
functions that the report compiles), with the installed triton and, where ``MBF_TEST_TRITON_PATHS`` names
them (``os.pathsep``-separated), with other triton installs too, e.g. the GPU machine's 3.6 from
``pip install --target DIR --no-deps triton==3.6.0``: the subprocess then imports triton from ``DIR``."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
OTHER_TRITONS = [p for p in os.environ.get("MBF_TEST_TRITON_PATHS", "").split(os.pathsep) if p] or [""]


def _triton_version(path: str) -> str:
    found = [d.version for d in importlib.metadata.distributions(path=[path]) if d.metadata["Name"] == "triton"]
    if not found:
        pytest.fail(f"MBF_TEST_TRITON_PATHS names {path}, which holds no triton distribution")
    return found[0]


@pytest.mark.parametrize("triton_path", [None, *OTHER_TRITONS],
                         ids=lambda p: "installed" if p is None else p or "other")
def test_default_configs_compile_for_sm90_without_spills(triton_path):
    if triton_path == "":
        pytest.skip("MBF_TEST_TRITON_PATHS names no other triton install (e.g. 3.6, the GPU machine's)")
    if triton_path is None:
        root, version = Path(triton.__file__).parent, triton.__version__
    else:
        root, version = Path(triton_path) / "triton", _triton_version(triton_path)
    if not (root / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip(f"the triton build in {root} ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "resource_report.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"triton {version},"), proc.stdout[:200]  # compiled by the triton meant
    rows = re.findall(r"^\| (\w+) \| (.*?) \| (\d+) \| (\d+) \|$", proc.stdout, flags=re.M)
    assert {r[0] for r in rows} == {"block_update", "grouped_block_update", "conv_stats"}, proc.stdout
    for kernel, cfg, regs, stack in rows:
        assert int(stack) == 0, f"{kernel} {cfg} spills {stack} bytes"
        # the tile kernels are kept at <= 128 registers (occupancy); the lane and rows variants hold a mini-block
        # per lane by design (b(b+1)/2 + 2b values) and may use the full 255 as long as nothing spills
        limit = 255 if ("lane" in cfg or "rows" in cfg) else 128
        assert int(regs) <= limit, f"{kernel} {cfg} uses {regs} registers"
