"""A static performance model of the solve kernels on an H100, from their sm_90 SASS (no GPU needed).

Everything this script prints is a **model prediction**, not a measurement; a GPU measurement replaces
it wherever one exists (``perf/run_gpu.sh solve`` times the same variants).

What it does, per kernel configuration:

1. Compiles the ``triton.jit`` function for sm_90 with the installed triton (as
   ``perf/resource_report.py`` does), disassembles the cubin with the ``cuobjdump`` that ships with triton,
   and reads registers, spill stack and shared memory.
2. Counts the SASS instructions by class. Straight-line (unrolled) code counts once per warp; a loop (a
   backward branch) counts its body times its trip count, which the caller states (the kernel source
   knows it: ``for k in range(B)``). Instructions under a predicate count as issued (a false predicate
   still takes its issue slot), and are also reported as "predicated". The counts per warp times the warps
   per program, over the mini-blocks per program, give warp instructions **per mini-block**.
3. Predicts the time at ``n`` mini-blocks as ``max(compute, memory)``:

   * compute: per SM, the busiest of the issue slot and the execution pipes, with NVIDIA's documented
     per-SM throughputs for compute capability 9.0 (CUDA C++ Programming Guide, "Arithmetic
     Instructions"; H100 whitepaper): 4 warp instructions issued per clock (one per sub-partition);
     FP32 add/mul/fma 128 lanes/clock; 32-bit integer multiply-add (IMAD), add, logic, shift, compare,
     select 64; MUFU (rsqrt, rcp, ex2, lg2, sin, cos) 16; conversions 16; warp shuffles 32; shared memory
     128 bytes/clock (LDS/STS/LDSM/STSM count their bytes per warp); global loads/stores through the L1
     one 128-byte line ("wavefront") per clock, the lines per warp request coming from the access pattern
     the variant declares (coalesced, or one mini-block per lane with a stride between lanes).
     Issue efficiency: a sub-partition issues ``min(1, warps / CPI_1)`` instructions per clock, where
     ``warps`` is the resident warps per sub-partition (from registers, shared memory and the 64-warp,
     32-program limits) and ``CPI_1`` the clocks between two instructions of one warp left alone (the
     dependent-latency a single warp cannot hide), calibrated below.
     Clock: 1.98 GHz (H100 SXM5 boost, the clock of NVIDIA's 67 TFLOP/s FP32 figure); 132 SMs.
   * memory: the bytes each mini-block must move through device memory (each input read once, each
     output written once, at the true size: masked padding moves nothing), plus any spill traffic
     (``LDL``/``STL`` bytes), at the measured copy rate of 3.0 TB/s (``KERNEL_NOTES.md``).
   * a program count below one wave of the GPU is not modelled: the benchmark sizes (10^5, 10^6 blocks)
     fill many waves.

4. Calibration (``calibrate()``): the same counts for ``shared/calibration/gj_probe_kernel.py`` at the
   configurations of ``h100_probe.csv`` against the measured H100 times. ``CPI_1`` is the one fitted
   constant (everything else is a datasheet rate); the fit and every point's ratio are printed and kept in
   ``perf/NOTES.md``.

Assumptions that the calibration does not test (the probe is a single-pass, coalesced, shuffle-heavy
kernel): the L1 wavefront cost of strided loads (one line per distinct 128-byte line a warp request
touches, no merging of misses to one line across instructions), and that the DRAM traffic of a strided
pattern is still its bytes (every sector of a line is used by the same warp shortly after).

Usage::

    python perf/kernel_model.py            # calibration, every solve variant and b, the summary line
    python perf/kernel_model.py --quick    # b = 9 only, no calibration (CI smoke)

The ``"rows"`` variant is modelled for ``17 <= b <= MBF_MODEL_ROWS_MAX_B`` (default 32): its fully unrolled
code takes 10-30 minutes per configuration to compile on this project's small shared CPU (triton's layout
rematerialisation pass), and b = 64 did not finish here.

Calibrate with the triton that timed the probe (3.6.0; the SASS of one kernel differs a lot between
versions), e.g. ``pip install --target /tmp/t36 --no-deps triton==3.6.0`` and
``PYTHONPATH=/tmp/t36 python perf/kernel_model.py --calibration-only``. Compiled SASS is cached in
``~/.cache/mbf_triton/kernel_model`` (``MBF_MODEL_CACHE``): the fully unrolled probe at b = 64 takes tens of
minutes to compile on a small CPU.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import resource_report as rr  # noqa: E402,I001  (sibling script: compiling for sm_90 and cuobjdump)
from access_patterns import chunk_widths, floor_bytes, l1_cost_per_block, tril  # noqa: E402,F401
from access_patterns import lane_l1_lines, rows_l1_lines  # noqa: E402  (L1 cost of each variant's accesses)

PROBE_TRITON = "3.6.0"  # the triton version of the H100 probe timings (h100_probe.csv header)
CALIBRATION_DIR = Path(os.environ.get("MBF_CALIBRATION_DIR", ROOT.parent / "shared" / "calibration"))

# ------------------------------------------------------------------------------------------ the machine
SMS = 132
CLOCK_HZ = 1.98e9
COPY_BYTES_PER_S = 3.0e12  # measured device copy rate (KERNEL_NOTES.md)
ISSUE_PER_SM = 4.0  # warp instructions per clock per SM (one per sub-partition)
# lanes (thread operations) per clock per SM, CUDA C++ Programming Guide, compute capability 9.0
LANES_PER_CLOCK = {"fp32": 128, "int": 64, "alu": 64, "mufu": 16, "conv": 16, "shfl": 32}
SHARED_BYTES_PER_CLOCK = 128  # shared memory, per SM
L1_LINES_PER_CLOCK = 1.0  # global memory through the L1: one 128-byte line per clock
MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 64, 32
REGISTERS_PER_SM, SHARED_PER_SM = 65536, 228 * 1024
CPI_1 = 7.0  # clocks between two instructions of a lone warp (fitted on the calibration probe, NOTES)

# SASS opcode -> class. Anything not listed only takes an issue slot (branches, uniform datapath, NOP...).
_FP32 = {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "FSWZADD", "HFMA2", "HADD2", "HMUL2"}
_INT = {"IMAD", "IMAD32I", "IDP", "IMUL"}
_ALU = {"IADD3", "IADD32I", "VIADD", "LOP3", "LOP32I", "SHF", "SHL", "SHR", "LEA", "ISETP", "FSETP", "FSEL",
        "SEL", "FMNMX", "IMNMX", "VIMNMX", "PRMT", "SGXT", "P2R", "R2P", "PLOP3", "MOV", "MOV32I", "IABS",
        "BMSK", "CS2R", "FCHK", "IADD", "BREV", "FLO", "POPC"}
_MUFU = {"MUFU"}
_CONV = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS"}
_GLOBAL_LD = {"LDG"}
_GLOBAL_ST = {"STG"}
_SPILL = {"LDL", "STL"}
_ATOMIC = {"ATOM", "ATOMG", "RED", "REDG"}
_BARRIER = {"BAR"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "QGMMA", "WARPGROUP"}
CLASS_ORDER = ("fp32", "int", "alu", "mufu", "conv", "shfl", "shared", "ld_global", "st_global", "spill",
               "atomic", "barrier", "tensor", "other")


def opcode_class(op: str) -> str:
    for cls, names in (("fp32", _FP32), ("int", _INT), ("alu", _ALU), ("mufu", _MUFU), ("conv", _CONV),
                       ("shfl", {"SHFL"}), ("shared", _SHARED), ("ld_global", _GLOBAL_LD),
                       ("st_global", _GLOBAL_ST), ("spill", _SPILL), ("atomic", _ATOMIC),
                       ("barrier", _BARRIER), ("tensor", _TENSOR)):
        if op in names:
            return cls
    return "other"


def access_bytes(op: str, mods: tuple[str, ...]) -> int:
    """Bytes per thread of a memory instruction from its width modifier (``.64``, ``.128``, ``.U16``...)."""
    if op == "STSM" or op == "LDSM":  # 8x8 matrices of 16-bit: .x4 -> 4 x 128 bytes per warp
        n = next((int(m) for m in mods if m in ("1", "2", "4")), 1)
        return 4 * n
    for m in mods:
        if m in ("128", "64"):
            return int(m) // 8
        if m in ("U16", "S16"):
            return 2
        if m in ("U8", "S8"):
            return 1
    return 4


# ------------------------------------------------------------------------------------------ SASS parsing
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    predicated: bool
    op: str
    mods: tuple[str, ...]
    operands: str


def parse_sass(text: str) -> list[Instr]:
    out = []
    for m in _LINE.finditer(text):
        mods = tuple(x for x in m[4].split(".") if x)
        out.append(Instr(int(m[1], 16), m[2] is not None, m[3], mods, m[5].strip()))
    if not out:
        raise RuntimeError("no SASS instructions found")
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` addresses of every loop: a branch to an earlier address (not to itself)."""
    found = []
    for ins in instrs:
        if ins.op == "BRA":
            m = re.search(r"0x([0-9a-f]+)", ins.operands)
            if m and int(m[1], 16) < ins.addr:
                found.append((int(m[1], 16), ins.addr))
    return sorted(found)


def infer_trip_count(instrs: list[Instr], lo: int, hi: int) -> int:
    """Trip count of the loop ``[lo, hi]`` from its SASS: a (uniform) register stepped by an immediate
    (``VIADD/IADD3/UIADD3 Rk, Rk, step``) and either compared with an immediate bound counting from 0
    (``ISETP.NE ... Rk, bound``: Triton's ``for k in range(B)``) or counted down to zero from an immediate
    set before the loop (``UMOV/MOV Rk, start`` ... ``ISETP.NE ... RZ, Rk``: a loop the compiler unrolled
    by ``|step|``)."""
    body = [i for i in instrs if lo <= i.addr <= hi]
    reg = r"(U?R\d+)"
    imm = r"(-?0x[0-9a-f]+|-?\d+)"
    steps = {}
    for i in body:
        m = re.fullmatch(rf"{reg}, {reg}, {imm}", i.operands.replace(", URZ", "").replace(", RZ", ""))
        if i.op in ("VIADD", "IADD3", "UIADD3") and m and m[1] == m[2]:
            step = int(m[3], 0)
            steps[m[1]] = step - (1 << 32) if step >= 1 << 31 else step  # 0xffffffff: -1
    for i in body:
        if i.op not in ("ISETP", "UISETP"):
            continue
        m = re.search(rf"U?P\d, U?PT, {reg}, {imm}, U?P", i.operands + ", P")
        if m and steps.get(m[1]) and int(m[2], 0) * steps[m[1]] > 0:
            return -(-int(m[2], 0) // steps[m[1]])
        m = re.search(rf"U?P\d, U?PT, U?RZ, {reg}, U?P", i.operands + ", P")
        if m and steps.get(m[1], 0) < 0:
            for j in reversed([j for j in instrs if j.addr < lo]):
                mv = re.fullmatch(rf"{m[1]}, {imm}", j.operands)
                if j.op in ("MOV", "UMOV") and mv:
                    return -(-int(mv[1], 0) // -steps[m[1]])
    raise ValueError(f"no trip count found for the loop at {lo:#x}-{hi:#x}; pass trip_counts")


def weighted_counts(instrs: list[Instr], trip_counts: tuple[int, ...] | None = None,
                    default_trip: int | None = None) -> tuple[dict, dict]:
    """Executed warp instructions per warp by class, and further tallies (``predicated``, ``shared_bytes``,
    ``ld_bytes``, ``st_bytes``, ``spill_bytes``, ``mufu``, ``ld_128``...), loops times their trip counts.

    ``trip_counts``: one per loop in the order of their first address (outer loops first); None: read
    from the SASS (:func:`infer_trip_count`), or ``default_trip`` where the SASS does not say (the loop's
    source trip count: the compiler's partial unrolling then makes it an overestimate)."""
    found = loops(instrs)
    if trip_counts is None:
        trips = []
        for lo, hi in found:
            try:
                trips.append(infer_trip_count(instrs, lo, hi))
            except ValueError:
                if default_trip is None:
                    raise
                trips.append(default_trip)
        trip_counts = tuple(trips)
    if len(found) != len(trip_counts):
        raise ValueError(f"the SASS has {len(found)} loops {found}; {len(trip_counts)} trip counts given")
    cls_count: dict[str, float] = collections.Counter()
    extra: dict[str, float] = collections.Counter()
    for ins in instrs:
        w = 1.0
        for (lo, hi), trips in zip(found, trip_counts):
            if lo <= ins.addr <= hi:
                w *= trips
        cls = opcode_class(ins.op)
        cls_count[cls] += w
        if ins.predicated:
            extra["predicated"] += w
        if cls in ("shared", "ld_global", "st_global", "spill"):
            nbytes = access_bytes(ins.op, ins.mods) * 32 * w  # per warp
            key = {"shared": "shared_bytes", "ld_global": "ld_bytes", "st_global": "st_bytes",
                   "spill": "spill_bytes"}[cls]
            extra[key] += nbytes
            if cls in ("ld_global", "st_global"):
                extra[f"{cls}_w{access_bytes(ins.op, ins.mods) * 8}"] += w
    return dict(cls_count), dict(extra)


# ------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass
class Config:
    """One kernel configuration to judge. ``l1_lines_per_block``: 128-byte L1 lines per mini-block that its
    global loads/stores touch (None: coalesced, from the SASS widths: bytes / 128 per warp request)."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    blocks_per_program: int
    dram_bytes_per_block: float
    floor_bytes_per_block: float
    trip_counts: tuple[int, ...] | None = ()
    l1_lines_per_block: float | None = None
    default_trip: int | None = None
    num_stages: int = 2


@dataclasses.dataclass
class Prediction:
    config: Config
    registers: int
    spill_stack: int
    shared: int
    per_block: dict  # warp instructions per mini-block by class, plus tallies
    programs_per_sm: int
    warps_per_smsp: float
    cycles_per_block: dict  # SM clocks per mini-block by limiter

    def compute_ms(self, n: int) -> float:
        return n * max(self.cycles_per_block.values()) / (SMS * CLOCK_HZ) * 1e3

    def memory_ms(self, n: int) -> float:
        spill = self.per_block.get("spill_bytes", 0.0)
        return n * (self.config.dram_bytes_per_block + spill) / COPY_BYTES_PER_S * 1e3

    def ms(self, n: int) -> float:
        return max(self.compute_ms(n), self.memory_ms(n))

    def floor_ms(self, n: int) -> float:
        return n * self.config.floor_bytes_per_block / COPY_BYTES_PER_S * 1e3

    def limiter(self, n: int) -> str:
        if self.memory_ms(n) >= self.compute_ms(n):
            return "memory"
        return max(self.cycles_per_block, key=self.cycles_per_block.get)


def occupancy(registers: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM (registers allocated per warp in units of 256)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SHARED_PER_SM // shared if shared else MAX_PROGRAMS_PER_SM
    return max(0, min(MAX_PROGRAMS_PER_SM, MAX_WARPS_PER_SM // num_warps, by_regs, by_smem))


CACHE_DIR = Path(os.environ.get("MBF_MODEL_CACHE", Path.home() / ".cache" / "mbf_triton" / "kernel_model"))


def compile_config(cfg: Config):
    """``(instructions, resources, shared bytes)`` of a configuration; the SASS is cached on disk by the
    kernel's source hash, the constexprs, the launch options and the triton version (large unrolled
    kernels take minutes to compile)."""
    import triton

    key = json.dumps([cfg.fn.cache_key, sorted((k, repr(v)) for k, v in cfg.constexprs.items()), cfg.num_warps,
                      cfg.num_stages, triton.__version__, rr.ARCH])
    path = CACHE_DIR / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if path.exists():
        data = json.loads(path.read_text())
    else:
        kernel = rr.compile_sm90(cfg.fn, cfg.signature, cfg.constexprs, cfg.num_warps, cfg.num_stages)
        cubin = kernel.asm["cubin"]
        res = rr.parse_resources(rr.cuobjdump_text(cubin, "-res-usage"))
        shared = max(res["shared"], int(getattr(kernel.metadata, "shared", 0) or 0))
        data = {"sass": rr.cuobjdump_text(cubin, "-sass"), "res": res, "shared": shared}
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return parse_sass(data["sass"]), data["res"], data["shared"]


def predict(cfg: Config) -> Prediction:
    instrs, res, shared = compile_config(cfg)
    counts, extra = weighted_counts(instrs, cfg.trip_counts, cfg.default_trip)
    scale = cfg.num_warps / cfg.blocks_per_program  # per warp -> per mini-block
    per_block = {k: v * scale for k, v in {**counts, **extra}.items()}
    per_block["total"] = sum(counts.values()) * scale
    progs = occupancy(res["registers"], shared, cfg.num_warps)
    if progs == 0:
        raise ValueError(f"{cfg.name}: does not fit on an SM ({res['registers']} registers, {shared} B shared)")
    warps_smsp = progs * cfg.num_warps / 4
    issue_eff = min(1.0, warps_smsp / CPI_1)
    cyc = {"issue": per_block["total"] / (ISSUE_PER_SM * issue_eff)}
    for cls, lanes in LANES_PER_CLOCK.items():
        cyc[cls] = per_block.get(cls, 0.0) * 32 / lanes
    cyc["shared"] = per_block.get("shared_bytes", 0.0) / SHARED_BYTES_PER_CLOCK
    if cfg.l1_lines_per_block is None:
        lines = (per_block.get("ld_bytes", 0.0) + per_block.get("st_bytes", 0.0)) / 128
    else:
        lines = cfg.l1_lines_per_block
    per_block["l1_lines"] = lines
    cyc["l1"] = (lines + per_block.get("spill_bytes", 0.0) / 128) / L1_LINES_PER_CLOCK
    return Prediction(cfg, res["registers"], res["stack"], shared, per_block, progs, warps_smsp, cyc)


# ------------------------------------------------------------------------------------------ calibration
def _gj_module():
    path = CALIBRATION_DIR / "gj_probe_kernel.py"
    spec = importlib.util.spec_from_file_location("gj_probe_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gj_config(mod, b: int, bm: int) -> Config:
    import triton

    sig = {"F": "*fp32", "G": "*fp32", "X": "*fp32", "lam": "fp32", "n": "i32",
           "B": "constexpr", "BP": "constexpr", "BM": "constexpr"}
    nbytes = 4 * b * b + 8 * b
    return Config(f"gj_probe b={b} BM={bm}", mod.gj_solve, sig,
                  {"B": b, "BP": triton.next_power_of_2(b), "BM": bm}, 4, bm, nbytes, nbytes)


def calibrate(min_blocks: int = 10**5) -> list[dict]:
    """Predicted vs measured for every row of ``h100_probe.csv`` (the gj probe kernel)."""
    mod = _gj_module()
    rows = []
    with open(CALIBRATION_DIR / "h100_probe.csv") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    for r in sorted(csv.DictReader(lines), key=lambda r: (int(r["b"]) == 64, int(r["b"]), int(r["blocks"]))):
        b, n, bm, measured = int(r["b"]), int(r["blocks"]), int(r["BM"]), float(r["gj_ms"])
        print(f"  compiling the probe at b={b} BM={bm} ...", file=sys.stderr, flush=True)
        p = predict(gj_config(mod, b, bm))
        rows.append({"b": b, "blocks": n, "BM": bm, "measured_ms": measured, "predicted_ms": p.ms(n),
                     "ratio": p.ms(n) / measured, "limiter": p.limiter(n), "registers": p.registers,
                     "warps_per_smsp": p.warps_per_smsp, "counted": n >= min_blocks, "prediction": p})
    return rows


def block_update_config(variant: str, b: int, blocks: int | None = None, warps: int | None = None,
                        log_chunk: int = 5, lanes: int | None = None) -> Config:
    """The single-parameter solve + update kernel (``_damped_block_update_kernel``) as launched for
    ``variant`` ``"tile"`` (the register-tile kernel), ``"lane"`` (one mini-block per lane) or ``"rows"``
    (``lanes`` lanes per block, default :func:`kernels.block_update.rows_lanes`)."""
    import triton
    from mbf_triton.kernels import block_update as bu

    if variant == "tile":
        d_blocks, d_warps = bu.default_launch_config(b, "tile")
        blocks, warps = blocks or d_blocks, warps or d_warps
        trips, l1 = None, None  # loops: for k in range(B), trip counts read from the SASS
    elif variant == "lane":
        warps = warps or 4
        blocks = blocks or 32 * warps
        trips, l1 = (), lane_l1_lines(b, "chunks", log_chunk)
    elif variant == "rows":
        lanes = lanes or bu.rows_lanes(b)
        warps = warps or 4
        blocks = blocks or 32 * warps // lanes
        trips, l1 = (), rows_l1_lines(b, lanes, log_chunk)
    else:
        raise ValueError(variant)
    constexprs = {"B": b, "B_PAD": triton.next_power_of_2(b), "T": tril(b), "BLOCKS": blocks, "HAS_SKIP": True,
                  "LANE": variant == "lane", "LOG_CHUNK": log_chunk, "LANES": lanes if variant == "rows" else 0}
    name = f"{variant} b={b} blocks={blocks} warps={warps}" + (f" K={lanes}" if variant == "rows" else "")
    return Config(name, bu._damped_block_update_kernel,
                  rr.BLOCK_UPDATE_SIG, constexprs, warps, blocks, floor_bytes(b), floor_bytes(b), trips, l1,
                  default_trip=b if variant == "tile" else None)


def mix_str(p: Prediction) -> str:
    pb = p.per_block
    parts = [f"{pb['total']:.1f} total"]
    for cls in CLASS_ORDER:
        if pb.get(cls, 0.0) >= 0.05:
            parts.append(f"{cls} {pb[cls]:.1f}")
    if pb.get("predicated", 0.0) >= 0.05:
        parts.append(f"predicated {pb['predicated']:.1f}")
    parts.append(f"L1 lines {pb['l1_lines']:.1f}")
    return ", ".join(parts)


def print_calibration(rows: list[dict]) -> float:
    import triton

    print("## Calibration: gj_probe_kernel (model prediction vs H100 measurement, h100_probe.csv)")
    print(f"SASS from triton {triton.__version__}; the probe was timed with triton {PROBE_TRITON} (compile with "
          "that version to calibrate: the SASS of the same kernel differs between versions)")
    print(f"CPI_1 = {CPI_1} (fitted), clock {CLOCK_HZ / 1e9:.2f} GHz, {SMS} SMs, copy {COPY_BYTES_PER_S / 1e12} TB/s")
    print("| b | blocks | BM | regs | warps/SMSP | measured ms | model prediction ms | pred/meas | limiter |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 1.0
    for r in rows:
        mark = "" if r["counted"] else " (<10^5, not counted)"
        print(f"| {r['b']} | {r['blocks']} | {r['BM']} | {r['registers']} | {r['warps_per_smsp']:.1f} | "
              f"{r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | {r['ratio']:.2f}{mark} | {r['limiter']} |")
        if r["counted"]:
            worst = max(worst, r["ratio"], 1 / r["ratio"])
    print(f"worst calibration factor at >= 10^5 blocks: {worst:.2f}x")
    return worst


ROWS_MAX_B = int(os.environ.get("MBF_MODEL_ROWS_MAX_B", "32"))  # rows above b = 32: hours to compile here
SOLVE_EX_MS_1E6 = {9: 3.26, 16: 6.39, 32: 31.93}  # measured on the H100 (shared/calibration/README.md)
N_BIG = 10**6


def solve_variants(b: int) -> list[Config]:
    """The solve + update variants of block size ``b`` at their default launch configs."""
    from mbf_triton.kernels import block_update as bu

    out = [block_update_config("tile", b)]
    if 2 <= b <= bu.LANE_MAX_B:
        blocks, warps = bu.default_launch_config(b, "lane")
        out.append(block_update_config("lane", b, blocks, warps, bu.lane_log_chunk(b)))
    if bu.LANE_MAX_B < b <= ROWS_MAX_B:
        blocks, warps = bu.default_launch_config(b, "rows")
        out.append(block_update_config("rows", b, blocks, warps, 5, bu.rows_lanes(b)))
    return out


def print_variants(bs: tuple[int, ...]) -> dict[int, Prediction]:
    print("\n## Solve + update variants (model prediction, H100, fp32 parameters, default launch configs)")
    print("| variant | b | regs | spill B | warps/SMSP | warp instr. per block (mix) | model ms 10^5 | model ms 10^6 "
          "| floor ms 10^6 | model/floor | limiter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best: dict[int, Prediction] = {}
    for b in bs:
        for cfg in solve_variants(b):
            print(f"  compiling {cfg.name} ...", file=sys.stderr, flush=True)
            p = predict(cfg)
            ratio = p.ms(N_BIG) / p.floor_ms(N_BIG)
            print(f"| {cfg.name} | {b} | {p.registers} | {p.spill_stack} | {p.warps_per_smsp:.1f} | {mix_str(p)} | "
                  f"{p.ms(10**5):.3f} | {p.ms(N_BIG):.3f} | {p.floor_ms(N_BIG):.3f} | {ratio:.2f} | "
                  f"{p.limiter(N_BIG)} |", flush=True)
            if b not in best or p.ms(N_BIG) < best[b].ms(N_BIG):
                best[b] = p
    print("\n## Best variant per b (model prediction at 10^6 blocks)")
    print("| b | best variant | model ms | model/floor | vs tile kernel | measured solve_ex ms | solve_ex/model |")
    print("|---|---|---|---|---|---|---|")
    for b, p in best.items():
        tile = predict(block_update_config("tile", b))
        sx = SOLVE_EX_MS_1E6.get(b)
        sx_str = f"{sx:.2f} | {sx / p.ms(N_BIG):.1f}x" if sx else "not measured | -"
        print(f"| {b} | {p.config.name} | {p.ms(N_BIG):.3f} | {p.ms(N_BIG) / p.floor_ms(N_BIG):.2f} | "
              f"{tile.ms(N_BIG) / p.ms(N_BIG):.1f}x | {sx_str} |")
    return best


def print_layouts(bs: tuple[int, ...]) -> None:
    """F's packed rows (n_blocks, T) read per lane by scalar loads, in the coalesced chunks the lane variant
    uses, or from a tri-major (T, n_blocks) layout: L1 lines and sectors per block, and the L1 time against
    the DRAM time of the block's bytes (model prediction)."""
    from mbf_triton.kernels import block_update as bu

    print("\n## F layout for one block per lane (model: L1 lines / 32-byte sectors per block, F reads only)")
    print("| b | T | rows, scalar per lane | chunks (lane variant) | tri-major (T, n_blocks) | sectors per request "
          "rows / chunks / tri-major | DRAM clocks per block (all bytes) |")
    print("|---|---|---|---|---|---|---|")
    per_clock = COPY_BYTES_PER_S / (SMS * CLOCK_HZ)
    for b in bs:
        t = tril(b)
        r = {pat: l1_cost_per_block(pat, t, t, blocks=1024, log_chunk=bu.lane_log_chunk(b))
             for pat in ("rows", "chunks", "interleaved")}
        reqs = {"rows": t, "interleaved": t, "chunks": None}
        spr = " / ".join(f"{r[k][1] * 32 / reqs[k]:.1f}" if reqs[k] else "-"
                         for k in ("rows", "chunks", "interleaved"))
        print(f"| {b} | {t} | {r['rows'][0]:.1f} / {r['rows'][1]:.1f} | {r['chunks'][0]:.1f} / {r['chunks'][1]:.1f} | "
              f"{r['interleaved'][0]:.1f} / {r['interleaved'][1]:.1f} | {spr} | {floor_bytes(b) / per_clock:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="b = 9 only, no calibration (CI smoke)")
    ap.add_argument("--calibration-only", action="store_true")
    ap.add_argument("--b", type=int, nargs="+", default=None, help="block sizes (default 4 9 16 25 27 32 64)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print("Everything below is a MODEL PREDICTION (perf/kernel_model.py, static SASS model), not a measurement.")
    if not args.quick:
        rows = calibrate()
        print_calibration(rows)
        for r in rows:
            if r["counted"]:
                print(f"  b={r['b']} BM={r['BM']}: {mix_str(r['prediction'])}")
        if args.calibration_only:
            return 0
    bs = tuple(args.b or ((9,) if args.quick else (4, 9, 16, 25, 27, 32, 64)))
    print_layouts(tuple(b for b in bs if b <= 32))
    best = print_variants(bs)
    mid = {b: p for b, p in best.items() if b in (25, 27, 32)}
    if mid:
        worst = max(p.ms(N_BIG) / p.floor_ms(N_BIG) for p in mid.values())
        print("worst predicted/floor for b in {25,27,32}: " + f"{worst:.2f} ("
              + ", ".join(f"b={b} {p.ms(N_BIG):.3f} ms" for b, p in mid.items()) + ")")
    if 64 in best:
        tile64 = predict(block_update_config("tile", 64)).ms(N_BIG)
        p64 = best[64]
        print(f"b=64: best {p64.config.name} {p64.ms(N_BIG):.3f} ms, {tile64 / p64.ms(N_BIG):.1f}x faster than the "
              "tile kernel")
    small = [p.ms(N_BIG) / p.floor_ms(N_BIG) for b, p in best.items() if b <= 16]
    print(f"worst predicted/floor for b<=16: {max(small):.2f}" if small else "worst predicted/floor for b<=16: n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
