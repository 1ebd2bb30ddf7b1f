"""perf/kernel_model.py: the static SASS performance model (a smoke test: counts and structure, no timing).

The parsing, loop and access-pattern parts run on text; one small configuration is compiled for sm_90 in a
subprocess without TRITON_INTERPRET (the interpreter replaces the jit functions the model compiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PERF = Path(__file__).resolve().parents[1] / "perf"
sys.path.insert(0, str(PERF))
km = pytest.importorskip("kernel_model")

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R4, RZ ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0030*/               @P0 FFMA R5, R6, R7, R5 ;
        /*0040*/                   MUFU.RSQ R6, R5 ;
        /*0050*/                   SHFL.BFLY PT, R7, R6, 0x10, 0x1f ;
        /*0060*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0070*/                   ISETP.NE.U32.AND P1, PT, R4, 0x9, PT ;
        /*0080*/               @P1 BRA 0x30 ;
        /*0090*/                   STG.E desc[UR4][R2.64], R5 ;
        /*00a0*/                   STL [R1], R5 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_counts_loops_and_classes():
    instrs = km.parse_sass(SASS)
    assert [i.op for i in instrs][:3] == ["LDC", "MOV", "LDG"]
    assert km.loops(instrs) == [(0x30, 0x80)]  # the branch to itself at the end is no loop
    assert km.infer_trip_count(instrs, 0x30, 0x80) == 9
    counts, extra = km.weighted_counts(instrs)
    assert counts["fp32"] == 9 and counts["mufu"] == 9 and counts["shfl"] == 9
    assert counts["ld_global"] == 1 and counts["st_global"] == 1 and counts["spill"] == 1
    assert extra["ld_bytes"] == 16 * 32 and extra["st_bytes"] == 4 * 32 and extra["spill_bytes"] == 4 * 32
    assert extra["predicated"] == 9 + 9  # the FFMA and the loop branch
    with pytest.raises(ValueError, match="trip counts"):
        km.weighted_counts(instrs, (3, 4))


def test_access_patterns():
    assert km.chunk_widths(45, 5) == [32, 8, 4, 1]
    assert km.chunk_widths(136, 2) == [4] * 34
    t = 45
    rows = km.l1_cost_per_block("rows", t, t, blocks=256)
    inter = km.l1_cost_per_block("interleaved", t, t, blocks=256)
    chunks = km.l1_cost_per_block("chunks", t, t, blocks=256)
    assert rows == (45.0, 45.0)  # one line and one sector per entry and block: 32 per warp request
    assert inter[1] == pytest.approx(4 * 45 / 32)  # 4 sectors per request
    assert inter[0] < chunks[0] < rows[0]


def test_occupancy_limits():
    assert km.occupancy(32, 0, 4) == 16  # 64 warps per SM
    assert km.occupancy(255, 0, 8) == 1
    assert km.occupancy(128, 100 * 1024, 4) == 2  # shared memory bound
    assert km.occupancy(255, 0, 32) == 0


def test_model_predicts_one_compiled_config(tmp_path):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build ships no cuobjdump")
    code = (
        "import json, sys; sys.path.insert(0, %r); import kernel_model as km\n"
        "out = {}\n"
        "for v in ('lane', 'tile'):\n"
        "    p = km.predict(km.block_update_config(v, 3))\n"
        "    out[v] = {'ms': p.ms(10**6), 'floor': p.floor_ms(10**6), 'fp32': p.per_block.get('fp32', 0),\n"
        "              'mufu': p.per_block.get('mufu', 0), 'stack': p.spill_stack}\n"
        "print(json.dumps(out))\n" % str(PERF)
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MBF_MODEL_CACHE"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for v, r in out.items():
        assert r["ms"] >= r["floor"] > 0, v
        assert r["fp32"] > 0 and r["mufu"] > 0 and r["stack"] == 0, v
    # one block per lane: 3 rsqrt per block are 3/32 warp instructions; the tile kernel pays per 16x tile
    assert out["lane"]["mufu"] < out["tile"]["mufu"]


def test_stats_model_counts_the_linear_dot_fmas(tmp_path):
    """perf/stats_model.py on one small Linear layer (in 20, out 24, batch 70; b = 16: two chunks, T = 136 in
    three tiles of 64, so the statistics kernel stores partials and its EMA runs in a second launch). The
    kernel's only FP32 multiply-adds are its ``tl.dot`` over the batch (``input_precision="ieee"``: FMA
    code), so the SASS count must be, by hand: programs x ceil(70 / BLOCK_M) x BLOCK_O * BLOCK_T * BLOCK_M
    lane FMAs = 6 x 3 x 32 * 64 * 32."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build ships no cuobjdump")
    code = (
        "import json, sys; sys.path.insert(0, %r); import stats_model as sm\n"
        "from torch import nn\n"
        "layer = sm.Layer('fc', nn.Linear(20, 24), (70, 20), (70, 24))\n"
        "launches = sm.layer_launches(layer)\n"
        "p = sm.predict_launch(launches[0], layer)\n"
        "print(json.dumps({'kernels': [la.kernel for la in launches], 'grid': launches[0].grid,\n"
        "    'c': {k: launches[0].constexprs[k] for k in ('BLOCK_O', 'BLOCK_M', 'BLOCK_T', 'PARTIAL')},\n"
        "    'ffma': p.per_launch['ffma'], 'fp32': p.per_launch['fp32'], 'mma': p.per_launch['tensor_mma'],\n"
        "    'ld_bytes': p.per_launch['ld_bytes'], 'useful': sm.useful_fma(layer), 'ms': p.ms,\n"
        "    'stack': p.spill_stack, 'dram': p.dram_bytes}))\n" % str(PERF)
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MBF_MODEL_CACHE"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kernels"] == ["_linear_fisher_ema_kernel", "_partials_ema_kernel"]
    assert out["c"] == {"BLOCK_O": 32, "BLOCK_M": 32, "BLOCK_T": 64, "PARTIAL": True}
    assert out["grid"] == [2 * 3, 1, 1]  # (chunks x T tiles, output tiles)
    assert out["ffma"] * 32 == 6 * 3 * 32 * 64 * 32
    assert out["fp32"] >= out["ffma"] and out["mma"] == 0  # plus the squares g*g, x*x and the scale
    assert out["useful"] == 70 * 24 * (136 + 10)  # chunks of 16 and 4 columns
    assert out["stack"] == 0 and out["ms"] > 0
    # the dot's operands (g 32x32, x rows and columns 32x64 per step) come in by asynchronous copies (LDGSTS),
    # which count as global loads: at least every step's operands, once
    assert out["ld_bytes"] >= 6 * 3 * 4 * (32 * 32 + 2 * 32 * 64)
    # DRAM: x and gout read once, the partial statistic of 24 * 2 blocks x 136 entries written
    assert out["dram"] == 4 * (70 * 20 + 70 * 24) + 4 * 48 * 136
