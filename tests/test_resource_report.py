"""The compiler's resource report for sm_90 (no GPU needed): default launch configs must not spill.

Runs perf/resource_report.py in a subprocess without TRITON_INTERPRET (the interpreter replaces the jit
functions that the report compiles)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_default_configs_compile_for_sm90_without_spills():
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "resource_report.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| (.*?) \| (\d+) \| (\d+) \|$", proc.stdout, flags=re.M)
    assert {r[0] for r in rows} == {"block_update", "grouped_block_update", "conv_stats"}, proc.stdout
    for kernel, cfg, regs, stack in rows:
        assert int(stack) == 0, f"{kernel} {cfg} spills {stack} bytes"
        # the tile kernels are kept at <= 128 registers (occupancy); the lane and rows variants hold a mini-block
        # per lane by design (b(b+1)/2 + 2b values) and may use the full 255 as long as nothing spills
        limit = 255 if ("lane" in cfg or "rows" in cfg) else 128
        assert int(regs) <= limit, f"{kernel} {cfg} uses {regs} registers"
