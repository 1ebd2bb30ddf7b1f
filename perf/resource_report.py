"""Registers and spills of the Triton kernels, without a GPU.

Compiles each kernel for an sm_90 target (H100/H200) with the installed triton and reads the cubin's
resource usage with the ``cuobjdump`` that ships inside triton's NVIDIA backend. This is the compiler's
report, not a measurement of speed: use it to keep launch configurations free of register spills and to
see their occupancy cost before a GPU run. Usage::

    python perf/resource_report.py            # the default launch configs of every kernel
    python perf/resource_report.py --quick    # two configs (CI smoke)
    python perf/resource_report.py --lane-sweep  # the lane variant at every b it serves, skip flag on/off

The triton that compiles is the one Python imports: ``PYTHONPATH=<a triton 3.6 install>`` checks another
version (the GPU machine's).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from mbf_triton.kernels import block_update as bu
from mbf_triton.kernels import fisher_stats as fs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCH = 90
_F = "*fp32"
BLOCK_UPDATE_SIG = {
    "f_ptr": _F, "g_ptr": _F, "p_ptr": _F, "m_ptr": _F, "count_ptr": "*i32", "skip_ptr": "*u8",
    "n_blocks": "i32", "n_chunks": "i32", "cols": "i32",
    "damping": "fp32", "lr": "fp32", "momentum": "fp32", "weight_decay": "fp32",
    "B": "constexpr", "B_PAD": "constexpr", "T": "constexpr", "BLOCKS": "constexpr", "HAS_SKIP": "constexpr",
    "LANE": "constexpr", "LOG_CHUNK": "constexpr", "LANES": "constexpr",
}
GROUPED_SIG = {
    "table_ptr": "*i64", "work_ptr": "*i64", "proto_ptr": "*bf16", "count_ptr": "*i32", "skip_ptr": "*u8",
    "damping": "fp32", "lr": "fp32", "momentum": "fp32", "weight_decay": "fp32",
    "B": "constexpr", "B_PAD": "constexpr", "T": "constexpr", "BLOCKS": "constexpr", "HAS_SKIP": "constexpr",
    "LANE": "constexpr", "LOG_CHUNK": "constexpr", "LANES": "constexpr",
}
LINEAR_SIG = {
    "f_ptr": _F, "part_ptr": _F, "x_ptr": _F, "g_ptr": _F, "skip_ptr": "*u8", "M": "i32", "n_in": "i32", "n_out": "i32",
    "n_chunks": "i32", "scale2_over_m": "fp32", "decay": "fp32",
    "s_xm": "i64", "s_xi": "i64", "s_gm": "i64", "s_go": "i64",
    "B": "constexpr", "T": "constexpr", "BLOCK_O": "constexpr", "BLOCK_M": "constexpr", "BLOCK_T": "constexpr",
    "PARTIAL": "constexpr", "PRECISION": "constexpr", "HAS_SKIP": "constexpr",
}
CONV_SIG = {
    "f_ptr": _F, "part_ptr": _F, "x_ptr": _F, "g_ptr": _F, "skip_ptr": "*u8",
    **{n: "i32" for n in ("N", "chunk", "n_t_tiles", "n_blocks", "Cg", "Og", "L", "L2", "L3", "K2", "K3")},
    "scale2_over_n": "fp32", "decay": "fp32",
    **{n: "i32" for n in ("S1", "S2", "S3", "st1", "st2", "st3", "dl1", "dl2", "dl3", "p1", "p2", "p3")},
    **{n: "i64" for n in ("sx_n", "sx_c", "sx_1", "sx_2", "sx_3", "sg_n", "sg_o", "sg_l1", "sg_l2", "sg_l3")},
    "B": "constexpr", "B_PAD": "constexpr", "T": "constexpr",
    "BLOCK_O": "constexpr", "BLOCK_L": "constexpr", "BLOCK_T": "constexpr",
    "PRECISION": "constexpr", "FULL": "constexpr", "PARTIAL": "constexpr", "HAS_SKIP": "constexpr",
}


def cuobjdump() -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton build ships no cuobjdump")
    return path


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 2):
    """One configuration of a ``triton.jit`` function compiled for sm_90 without a GPU (``.asm["cubin"]``,
    ``.metadata.shared``: dynamic shared memory bytes). Pointer arguments are specialised as 16-byte aligned,
    as a launch on torch tensors does; integer arguments are not (their values are unknown here)."""
    names = [n for n in fn.arg_names if n in signature]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if signature[n].startswith("*")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps,
                                                                       "num_stages": num_stages})


def cuobjdump_text(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` (``-res-usage``, ``-sass``) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(cuobjdump()), flag, str(path)], capture_output=True, text=True,
                              check=True).stdout


def parse_resources(out: str) -> dict[str, int]:
    """Registers, stack and shared bytes from ``cuobjdump -res-usage`` output."""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[:200]}")
    return {"registers": int(m[1]), "stack": int(m[2]), "shared": int(m[3])}


def resources(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 2,
              has_skip: bool = True) -> dict[str, int]:
    """Registers, stack (spill) bytes and static shared memory of one compiled configuration (by default
    with the skip flag, as the optimizer launches every kernel)."""
    kernel = compile_sm90(fn, signature, {**constexprs, "HAS_SKIP": has_skip}, num_warps, num_stages)
    return parse_resources(cuobjdump_text(kernel.asm["cubin"], "-res-usage"))


def rows(quick: bool) -> list[tuple[str, str, dict]]:
    out = []
    for b in ((9,) if quick else (2, 4, 9, 16, 25, 27, 32, 49, 64)):
        blocks, warps = bu.default_launch_config(b, "tile")
        b_pad = triton.next_power_of_2(b)
        r = resources(bu._damped_block_update_kernel, BLOCK_UPDATE_SIG,
                      {"B": b, "B_PAD": b_pad, "T": b * (b + 1) // 2, "BLOCKS": blocks, "LANE": False,
                       "LOG_CHUNK": 5, "LANES": 0}, warps)
        out.append(("block_update", f"tile b={b} blocks={blocks} warps={warps}", r))
    for b in ((9,) if quick else (2, 4, 9, 13, 16)):  # the lane variant (one mini-block per lane)
        blocks, warps = bu.default_launch_config(b, "lane")
        r = resources(bu._damped_block_update_kernel, BLOCK_UPDATE_SIG,
                      {"B": b, "B_PAD": triton.next_power_of_2(b), "T": b * (b + 1) // 2, "BLOCKS": blocks,
                       "LANE": True, "LOG_CHUNK": bu.lane_log_chunk(b), "LANES": 0}, warps)
        out.append(("block_update", f"lane b={b} blocks={blocks} warps={warps}", r))
    # the rows variant (a few lanes per block): minutes per config to compile (fully unrolled), so not in --quick
    for b in (() if quick else (17, 25, 27, 32, 64)):
        blocks, warps = bu.default_launch_config(b, "rows")
        r = resources(bu._damped_block_update_kernel, BLOCK_UPDATE_SIG,
                      {"B": b, "B_PAD": triton.next_power_of_2(b), "T": b * (b + 1) // 2, "BLOCKS": blocks,
                       "LANE": False, "LOG_CHUNK": 5, "LANES": bu.rows_lanes(b)}, warps)
        out.append(("block_update", f"rows b={b} blocks={blocks} warps={warps} K={bu.rows_lanes(b)}", r))
    for b, variant in (((1, "tile"), (9, "tile")) if quick else
                       ((1, "tile"), (9, "tile"), (16, "tile"), (32, "tile"), (9, "lane"), (16, "lane"),
                        (25, "rows"))):
        blocks, warps = bu.default_launch_config(b, variant)
        b_pad = triton.next_power_of_2(b)
        r = resources(bu._grouped_block_update_kernel, GROUPED_SIG,
                      {"B": b, "B_PAD": b_pad, "T": b * (b + 1) // 2, "BLOCKS": blocks, "LANE": variant == "lane",
                       "LOG_CHUNK": bu.lane_log_chunk(b) if variant == "lane" else 5,
                       "LANES": bu.rows_lanes(b) if variant == "rows" else 0}, warps)
        out.append(("grouped_block_update", f"{variant} b={b} blocks={blocks} warps={warps} bf16", r))
    for b, n_out, precision in (() if quick else ((9, 512, "ieee"), (16, 1000, "ieee"), (32, 256, "ieee"),
                                                   (64, 256, "ieee"), (16, 1000, "tf32x3"))):
        t = b * (b + 1) // 2
        c = dataclasses.replace(fs.default_linear_config(n_out, t), precision=precision)
        r = resources(fs._linear_fisher_ema_kernel, LINEAR_SIG,
                      {"B": b, "T": t, "BLOCK_O": c.block_o, "BLOCK_M": c.block_k, "BLOCK_T": c.block_t,
                       "PARTIAL": t > c.block_t, "PRECISION": c.precision}, c.num_warps, c.num_stages)
        out.append(("linear_stats", f"b={b} out={n_out} {c}", r))
    for b, og, n_l, precision, split in (((9, 64, 1024, "ieee", False),) if quick else (
            (1, 256, 64, "ieee", False), (9, 64, 1024, "ieee", False), (9, 512, 16, "ieee", False),
            (27, 64, 512, "ieee", False), (49, 64, 256, "ieee", False), (9, 64, 1024, "tf32x3", False),
            (9, 16, 1024, "ieee", True), (27, 64, 512, "ieee", True))):
        t = b * (b + 1) // 2
        c = dataclasses.replace(fs.default_conv_config(og, n_l, t), precision=precision)
        r = resources(fs._conv_fisher_ema_kernel, CONV_SIG,
                      {"B": b, "B_PAD": fs.conv_k_pad(b), "T": t, "BLOCK_O": c.block_o, "BLOCK_L": c.block_k,
                       "BLOCK_T": c.block_t, "PRECISION": c.precision, "FULL": fs.conv_full_blocks(b),
                       "PARTIAL": split or (t > c.block_t and not fs.conv_full_blocks(b))},
                      c.num_warps, c.num_stages)
        out.append(("conv_stats", f"b={b} out/group={og} positions={n_l}{' split' if split else ''} {c}", r))
    return out


def lane_sweep_rows(bs: tuple[int, ...] = tuple(range(2, bu.LANE_MAX_B + 1))) -> list[tuple[str, str, dict]]:
    """The lane variant at every ``b`` it serves: single kernel (fp32) and grouped kernel (bf16 parameters),
    each with the skip flag on and off, at the default launch config (the heuristic's)."""
    out = []
    for b in bs:
        blocks, warps = bu.default_launch_config(b, "lane")
        cx = {"B": b, "B_PAD": triton.next_power_of_2(b), "T": b * (b + 1) // 2, "BLOCKS": blocks, "LANE": True,
              "LOG_CHUNK": bu.lane_log_chunk(b)}
        for kernel, fn, sig in (("block_update", bu._damped_block_update_kernel, BLOCK_UPDATE_SIG),
                                ("grouped_block_update", bu._grouped_block_update_kernel, GROUPED_SIG)):
            for has_skip in (True, False):
                r = resources(fn, sig, cx, warps, has_skip=has_skip)
                dtype = " bf16" if kernel == "grouped_block_update" else ""
                flag = "on" if has_skip else "off"
                out.append((kernel, f"lane b={b} blocks={blocks} warps={warps}{dtype} skip={flag}", r))
                print(f"| {kernel} | {out[-1][1]} | {r['registers']} | {r['stack']} |", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two configurations only (CI smoke)")
    ap.add_argument("--lane-sweep", action="store_true", help="the lane variant, b = 2..16, skip flag on/off")
    ap.add_argument("--b", type=int, nargs="+", default=None, help="block sizes of --lane-sweep")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(f"triton {triton.__version__}, target sm_{ARCH}; compiler report, not a timing")
    print("| kernel | configuration | registers | spill stack bytes |\n|---|---|---|---|")
    if args.lane_sweep:
        lane_sweep_rows(tuple(args.b) if args.b else tuple(range(2, bu.LANE_MAX_B + 1)))
        return 0
    for kernel, cfg, r in rows(args.quick):
        print(f"| {kernel} | {cfg} | {r['registers']} | {r['stack']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
