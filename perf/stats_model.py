"""The static performance model of ``perf/kernel_model.py`` applied to the statistics kernels.

Everything this script prints is a **model prediction**, not a measurement (no GPU has run these kernels);
a GPU measurement (``perf/bench_step.py``, ``perf/run_gpu.sh``) replaces it wherever one exists.

For each benchmark model at its benchmark batch (``perf/bench_step.py``: ResNet-32 and VGG-16 at 128
CIFAR images, the autoencoder at 1000 MNIST vectors) and each weighted layer (``nn.Conv2d``,
``nn.Linear``; biases and BatchNorm parameters take the torch "diag" path, no statistics kernel):

1. The launches the optimizer makes on a statistics step, found by calling the real launchers
   (``linear_fisher_ema_``, ``conv_fisher_ema_``) with ``meta`` tensors of the layer's shapes and the
   kernels replaced by recorders: grid, constexprs and warps come from the launchers' own code, with the
   configuration the tuner returns when it is off (``MBF_TRITON_AUTOTUNE=0``: the heuristic, the same
   ``default_*_config``) and the batch split of :func:`kernels.fisher_stats.sample_split` for an H100's
   132 SMs; the second pass (``_partials_ema_kernel``) where the launcher makes one.
2. Each distinct launch configuration compiled for sm_90 and its SASS counted by class
   (:func:`kernel_model.predict`, one "block" = one program), the loops weighted by the trip counts of
   the launch (Linear: ``ceil(M / BLOCK_M)``; conv: samples per program times ``ceil(L / BLOCK_L)``;
   second pass: the number of partials). ``LDGSTS`` (the asynchronous global-to-shared copies Triton's
   loop pipeliner emits for ``tl.dot`` operands) counts as a global load here (``kernel_model`` knows
   only ``LDG``). Per launch: warp instructions = per program x programs.
3. Time per launch = ``max(compute, memory, latency)``:

   * compute: ``kernel_model``'s issue/pipe cycles per program (calibrated issue model, ``CPI_1``), for the
     busiest SM: ``ceil(programs / 132)`` programs, with the issue efficiency of the warps actually
     resident (a launch smaller than one full wave has fewer warps than its occupancy allows);
   * memory: the bytes the launch must move through DRAM (layer input and output gradient read once, ``F``
     read and written, partial sums written and read back) at the measured 3.0 TB/s; re-reads of the same
     input by other programs are assumed to hit the 50 MB L2;
   * latency (an **uncalibrated assumption**, the probe that calibrated the model has no loop of loads):
     each program's loop iterations run one after another, each waiting about ``LOAD_LATENCY_CLOCKS`` for
     its operands (Triton's two-stage pipeline keeps one iteration's loads in flight), and the programs
     resident on an SM overlap.

   Not modelled: launch latency (a few microseconds per launch; the launches are counted), the torch ops
   of the diag statistics, tails of partly filled waves beyond the busiest SM's count.

Useful multiply-adds of a layer's statistics: Linear ``M * out * sum_j T_j`` (``T_j`` the packed entries of
chunk ``j``, the short last chunk at its true size); conv ``N * C_out * C_in/groups * (L * b + T)``
(per-sample gradients, then their packed outer products). The kernels execute more (padding to tile
sizes: ``b = 9`` becomes a 16-wide tile); the executed FP32 multiply-adds come from the SASS.

Usage::

    python perf/stats_model.py              # the three models, per-layer tables and per-model totals
    python perf/stats_model.py --model resnet32

Compiled SASS is cached as in ``kernel_model`` (``MBF_MODEL_CACHE``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_model as km  # noqa: E402  (sibling script: SASS counting, the H100 rates)
import models  # noqa: E402
import resource_report as rr  # noqa: E402

LOAD_LATENCY_CLOCKS = 500  # assumed global-load latency per dependent loop iteration (not calibrated)
BLOCK_SIZE = 16  # MBF's default Linear block_size (mbf_triton.optimizer)
BENCHMARKS = {  # name: (model builder, batch, input shape without the batch), as perf/bench_step.py
    "resnet32": (models.resnet32, 128, (3, 32, 32)),
    "vgg16": (models.vgg16, 128, (3, 32, 32)),
    "autoencoder": (models.deep_autoencoder, 1000, (784,)),
}
PARTIALS_SIG = {"f_ptr": "*fp32", "part_ptr": "*fp32", "skip_ptr": "*u8", "n_blocks": "i32", "n_split": "i32",
                "decay": "fp32", "T": "constexpr", "BLOCK_R": "constexpr", "BLOCK_T": "constexpr",
                "HAS_SKIP": "constexpr"}
_ASYNC_LOADS = {"LDGSTS"}
_MMA = {"HMMA", "HGMMA", "IMMA", "QGMMA"}  # tensor-core matrix instructions


# ------------------------------------------------------------------------------------------ the launches
@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module
    x_shape: tuple[int, ...]
    g_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv"


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it: the jit function, grid, runtime arguments by name,
    constexprs and launch options."""

    kernel: str
    fn: object
    grid: tuple[int, ...]
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


class _Recorder:
    """Stands in for a ``triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name: str, fn, out: list[Launch]) -> None:
        self.name, self.fn, self.out = name, fn, out

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, num_stages: int = 2, **constexprs):
            names = [n for n in self.fn.arg_names if n not in constexprs][: len(args)]
            grid_t = tuple(grid) + (1,) * (3 - len(grid))
            self.out.append(Launch(self.name, self.fn, grid_t, dict(zip(names, args)), constexprs, num_warps,
                                   num_stages))
        return launch


@contextlib.contextmanager
def recording(sms: int = km.SMS):
    """Patch the statistics kernels with recorders (and the SM count with ``sms``): yields the list of
    launches the launchers make."""
    from mbf_triton.kernels import fisher_stats as fs

    out: list[Launch] = []
    real_split = fs.sample_split
    with contextlib.ExitStack() as stack:
        for name in ("_linear_fisher_ema_kernel", "_conv_fisher_ema_kernel", "_partials_ema_kernel"):
            stack.enter_context(mock.patch.object(fs, name, _Recorder(name, getattr(fs, name), out)))
        stack.enter_context(mock.patch.object(fs, "_sm_count", lambda index: sms))
        # the meta tensors are not on a GPU: split the batch as on one with `sms` SMs
        stack.enter_context(mock.patch.object(
            fs, "sample_split", lambda n, programs, device: real_split(n, programs, torch.device("cuda", 0))))
        yield out


def weighted_layers(name: str) -> tuple[list[Layer], int]:
    """The Conv/Linear layers of a benchmark model with their input and output shapes at its batch."""
    build, batch, shape = BENCHMARKS[name]
    model = build()
    found: list[Layer] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inputs, output):
        found.append(Layer(names[mod], mod, (batch, *inputs[0].shape[1:]), (batch, *output.shape[1:])))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(2, *shape))
    for h in handles:
        h.remove()
    return found, batch


def layer_launches(layer: Layer, precision: str | None = None) -> list[Launch]:
    """The launches of one layer's statistics on a statistics step, with the configuration the tuner picks
    when it is off (the heuristic) and an H100's batch split; ``precision`` replaces the heuristic's
    ``tl.dot`` precision (``"tf32x3"``: the tuner's tensor-core candidate)."""
    from mbf_triton.kernels import fisher_stats as fs

    from mbf_triton.reference import ConvGeometry
    from mbf_triton.tuning import configs

    meta = dict(device="meta", dtype=torch.float32)
    x, gout = torch.empty(layer.x_shape, **meta), torch.empty(layer.g_shape, **meta)
    mod = layer.module
    skip = torch.zeros(1, dtype=torch.bool, device="meta")
    with recording() as out:
        if layer.kind == "linear":
            b = min(BLOCK_SIZE, mod.in_features)
            f = torch.empty((mod.out_features * -(-mod.in_features // b), b * (b + 1) // 2), **meta)
            cfg = configs.linear_stats_heuristic(mod.out_features, b)
            cfg = dataclasses.replace(cfg, precision=precision or cfg.precision)
            fs.linear_fisher_ema_(f, x, gout, b=b, scale=1.0, decay=0.95, config=cfg, skip=skip)
        else:
            b = math.prod(mod.kernel_size)
            f = torch.empty((mod.weight.shape[0] * mod.weight.shape[1], b * (b + 1) // 2), **meta)
            cfg = configs.conv_stats_heuristic(mod.out_channels // mod.groups, math.prod(layer.g_shape[2:]), b)
            cfg = dataclasses.replace(cfg, precision=precision or cfg.precision)
            fs.conv_fisher_ema_(f, x, gout, **ConvGeometry.of(mod).kwargs(), groups=mod.groups, scale=1.0,
                                decay=0.95, config=cfg, skip=skip)
    return out


def useful_fma(layer: Layer) -> int:
    """Multiply-adds the layer's batch Fisher needs (module docstring), independent of the kernels' tiles."""
    mod = layer.module
    if layer.kind == "linear":
        b = min(BLOCK_SIZE, mod.in_features)
        chunks = [min(b, mod.in_features - j) for j in range(0, mod.in_features, b)]
        return layer.x_shape[0] * mod.out_features * sum(c * (c + 1) // 2 for c in chunks)
    b = math.prod(mod.kernel_size)
    n, c_out, cg = layer.x_shape[0], mod.weight.shape[0], mod.weight.shape[1]
    return n * c_out * cg * (math.prod(layer.g_shape[2:]) * b + b * (b + 1) // 2)


def launch_bytes(launch: Launch, layer: Layer) -> float:
    """DRAM bytes of one launch (fp32 activations; each input byte read once, see the module docstring)."""
    c = launch.constexprs
    if launch.kernel == "_partials_ema_kernel":  # partials read, F read and written
        return (launch.args["n_split"] + 2) * launch.args["n_blocks"] * c["T"] * 4
    n_blocks = (layer.module.weight.shape[0] * -(-layer.module.in_features // c["B"]) if layer.kind == "linear"
                else layer.module.weight.shape[0] * layer.module.weight.shape[1])
    f_bytes = n_blocks * c["T"] * 4
    io = 4 * (math.prod(layer.x_shape) + math.prod(layer.g_shape))
    if not c["PARTIAL"]:
        return io + 2 * f_bytes
    splits = launch.grid[2] // max(1, launch.args.get("n_t_tiles", 1)) if layer.kind == "conv" else 1
    return io + splits * f_bytes


def trip_counts(launch: Launch, layer: Layer) -> tuple[float, ...]:
    """Loop trip counts per program, outer loops first, as the kernel's source loops run at this launch.
    Conv: the mean samples per program (the last chunk may be shorter), so per-launch totals are exact."""
    a, c = launch.args, launch.constexprs
    if launch.kernel == "_linear_fisher_ema_kernel":
        return (-(-a["M"] // c["BLOCK_M"]),)
    if launch.kernel == "_conv_fisher_ema_kernel":
        splits = launch.grid[2] // a["n_t_tiles"]
        return (a["N"] / splits, -(-a["L"] // c["BLOCK_L"]))
    return (a["n_split"],)


def _config(launch: Launch, layer: Layer) -> km.Config:
    sig = {"_linear_fisher_ema_kernel": rr.LINEAR_SIG, "_conv_fisher_ema_kernel": rr.CONV_SIG,
           "_partials_ema_kernel": PARTIALS_SIG}[launch.kernel]
    per_program = launch_bytes(launch, layer) / launch.programs
    return km.Config(f"{launch.kernel} {launch.constexprs}", launch.fn, sig, launch.constexprs, launch.num_warps,
                     1, per_program, per_program, trip_counts(launch, layer), num_stages=launch.num_stages)


# ------------------------------------------------------------------------------------------ the prediction
@dataclasses.dataclass
class LaunchPrediction:
    layer: Layer
    launch: Launch
    registers: int
    spill_stack: int
    per_launch: dict  # warp instructions and tallies of the whole launch
    compute_ms: float
    memory_ms: float
    latency_ms: float
    limiter_compute: str  # what bounds the compute time (issue or a pipe)
    dram_bytes: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms, self.latency_ms)

    @property
    def limiter(self) -> str:
        worst = max(("compute", self.compute_ms), ("memory", self.memory_ms), ("latency", self.latency_ms),
                    key=lambda kv: kv[1])[0]
        return f"compute ({self.limiter_compute})" if worst == "compute" else worst


def weighted_ops(instrs: list[km.Instr], trips: tuple[float, ...]) -> tuple[collections.Counter, float]:
    """Executed instructions per warp by opcode, loops weighted by ``trips`` (as
    :func:`kernel_model.weighted_counts`), and the bytes per warp of the asynchronous global loads."""
    found = km.loops(instrs)
    ops: collections.Counter = collections.Counter()
    async_bytes = 0.0
    for ins in instrs:
        w = 1.0
        for (lo, hi), t in zip(found, trips):
            if lo <= ins.addr <= hi:
                w *= t
        ops[ins.op] += w
        if ins.op in _ASYNC_LOADS:
            async_bytes += w * km.access_bytes(ins.op, ins.mods) * 32
    return ops, async_bytes


def sass_trips(instrs: list[km.Instr], source: tuple[float, ...], name: str) -> tuple[float, ...]:
    """The source loops' trip counts mapped onto the SASS loops. Either one SASS loop per source loop, or a
    single source loop that the compiler unrolled by ``k`` into a main loop and a remainder loop (triton
    3.6 does this to the second pass's loop over the partials): ``k`` is the ratio of their global loads,
    the trips ``(n // k, n % k)``."""
    found = km.loops(instrs)
    if len(found) == len(source):
        return source
    if len(source) == 1 and len(found) == 2 and found[0][1] < found[1][0]:
        loads = [sum(1 for i in instrs if lo <= i.addr <= hi and i.op in ("LDG", *_ASYNC_LOADS)) for lo, hi in found]
        k = loads[0] // max(loads[1], 1)
        if k >= 2 and loads[0] == k * loads[1] and float(source[0]).is_integer():
            return (source[0] // k, source[0] % k)
    raise RuntimeError(f"{name}: the SASS has loops {found}, the source {len(source)}; the trip counts cannot "
                       "be assigned")


def predict_launch(launch: Launch, layer: Layer) -> LaunchPrediction:
    cfg = _config(launch, layer)
    instrs = km.compile_config(cfg)[0]
    cfg.trip_counts = sass_trips(instrs, cfg.trip_counts, cfg.name)
    p = km.predict(cfg)  # per program ("block" = program)
    per = dict(p.per_block)
    ops, async_bytes = weighted_ops(instrs, cfg.trip_counts)
    n_async = sum(ops[op] for op in _ASYNC_LOADS)
    scale = cfg.num_warps  # per warp -> per program
    per["ffma"] = ops["FFMA"] * scale
    per["tensor_mma"] = sum(v for op, v in ops.items() if op in _MMA) * scale
    per["other"] = per.get("other", 0.0) - n_async * scale
    per["ld_global"] = per.get("ld_global", 0.0) + n_async * scale
    per["ld_bytes"] = per.get("ld_bytes", 0.0) + async_bytes * scale
    per["l1_lines"] = (per.get("ld_bytes", 0.0) + per.get("st_bytes", 0.0)) / 128
    cycles = dict(p.cycles_per_block)
    cycles["l1"] = (per["l1_lines"] + per.get("spill_bytes", 0.0) / 128) / km.L1_LINES_PER_CLOCK
    # the busiest SM runs ceil(programs / SMs) programs, at most `programs_per_sm` at a time
    on_sm = -(-launch.programs // km.SMS)
    resident = min(p.programs_per_sm, on_sm)
    issue_eff = min(1.0, resident * cfg.num_warps / 4 / km.CPI_1)
    cycles["issue"] = per["total"] / (km.ISSUE_PER_SM * issue_eff)
    limiter = max(cycles, key=cycles.get)
    compute_ms = on_sm * cycles[limiter] / km.CLOCK_HZ * 1e3
    iterations = math.prod(trip_counts(launch, layer))  # source loop iterations, one after another
    latency_ms = -(-on_sm // resident) * iterations * LOAD_LATENCY_CLOCKS / km.CLOCK_HZ * 1e3
    dram = cfg.dram_bytes_per_block * launch.programs + per.get("spill_bytes", 0.0) * launch.programs
    per_launch = {k: v * launch.programs for k, v in per.items()}
    return LaunchPrediction(layer, launch, p.registers, p.spill_stack, per_launch, compute_ms,
                            dram / km.COPY_BYTES_PER_S * 1e3, latency_ms, limiter, dram)


def predict_model(name: str, precision: str | None = None) -> tuple[list[LaunchPrediction], dict[str, int]]:
    layers, _ = weighted_layers(name)
    preds, useful = [], {}
    for layer in layers:
        useful[layer.name] = useful_fma(layer)
        for launch in layer_launches(layer, precision):
            print(f"  {name} {layer.name}: {launch.kernel} grid={launch.grid} ...", file=sys.stderr, flush=True)
            preds.append(predict_launch(launch, layer))
    return preds, useful


# ------------------------------------------------------------------------------------------ the report
def _g(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _launch_str(pl: LaunchPrediction) -> str:
    c, lc = pl.launch.constexprs, pl.launch
    short = {"_linear_fisher_ema_kernel": "linear", "_conv_fisher_ema_kernel": "conv",
             "_partials_ema_kernel": "partials"}[lc.kernel]
    if short == "partials":
        tiles = f"R{c['BLOCK_R']} T{c['BLOCK_T']} splits {lc.args['n_split']}"
    elif short == "linear":
        tiles = f"o{c['BLOCK_O']} m{c['BLOCK_M']} t{c['BLOCK_T']} {c['PRECISION']}"
    else:
        tiles = f"o{c['BLOCK_O']} l{c['BLOCK_L']} t{c['BLOCK_T']} {c['PRECISION']} split {lc.grid[2]}"
    return f"{short} {tiles} w{lc.num_warps}"


def print_model(name: str, preds: list[LaunchPrediction], useful: dict[str, int]) -> dict:
    _, batch, _ = BENCHMARKS[name]
    print(f"\n## {name}, batch {batch}: statistics step (MODEL PREDICTION, H100, fp32, heuristic configs)")
    print("| layer | x -> gout | launch | programs | regs / spill B | FFMA (G lane-ops) | tensor instr. | "
          "useful FMA (G) | warp instr. (M) | ld_global instr. (M) | DRAM MB | compute / memory / latency ms | "
          "model ms | limiter |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    seen = set()
    tot = collections.Counter()
    for pl in preds:
        pb = pl.per_launch
        ffma = _ffma_lanes(pl)
        first = pl.layer.name not in seen
        seen.add(pl.layer.name)
        u = useful[pl.layer.name] if first else 0
        shapes = f"{'x'.join(map(str, pl.layer.x_shape))} -> {'x'.join(map(str, pl.layer.g_shape))}" if first else ""
        print(f"| {pl.layer.name if first else ''} | {shapes} | {_launch_str(pl)} | {pl.launch.programs} | "
              f"{pl.registers} / {pl.spill_stack} | {_g(ffma)} | {pb.get('tensor_mma', 0.0):.0f} | "
              f"{_g(u) if first else ''} | {pb['total'] / 1e6:.2f} | {pb.get('ld_global', 0.0) / 1e6:.3f} | "
              f"{pl.dram_bytes / 1e6:.2f} | {pl.compute_ms:.3f} / {pl.memory_ms:.3f} / {pl.latency_ms:.3f} | "
              f"{pl.ms:.3f} | {pl.limiter} |")
        tot["ffma"] += ffma
        tot["fp32"] += pb.get("fp32", 0.0) * 32
        tot["tensor"] += pb.get("tensor_mma", 0.0)
        tot["useful"] += u
        tot["instr"] += pb["total"]
        tot["bytes"] += pl.dram_bytes
        tot["ms"] += pl.ms
        tot["throughput_ms"] += max(pl.compute_ms, pl.memory_ms)
        tot["compute_ms"] += pl.compute_ms
        tot["latency_ms"] += pl.latency_ms
        tot["launches"] += 1
        tot[f"limit_{pl.limiter.split()[0]}"] += pl.ms
    tot["layers"] = len(seen)
    return tot


def _ffma_lanes(pl: LaunchPrediction) -> float:
    """Executed FP32 multiply-adds (lane operations) of the launch: FFMA warp instructions x 32."""
    return pl.per_launch.get("ffma", 0.0) * 32


def print_totals(totals: dict[str, dict]) -> None:
    print("\n## Per model, one statistics step (MODEL PREDICTION, H100; sums of the launches above)")
    print("| model | weighted layers | launches | useful FMA (G) | executed FFMA (G lane-ops) | all FP32 lane-ops (G) "
          "| tensor-core instr. | warp instr. (M) | DRAM MB | compute-only ms | max(compute, memory) ms | "
          "model ms (with latency) | of which latency-bound ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, t in totals.items():
        print(f"| {name} | {t['layers']} | {t['launches']} | {_g(t['useful'])} | {_g(t['ffma'])} | {_g(t['fp32'])} | "
              f"{t['tensor']:.0f} | {t['instr'] / 1e6:.1f} | {t['bytes'] / 1e6:.1f} | {t['compute_ms']:.2f} | "
              f"{t['throughput_ms']:.2f} | {t['ms']:.2f} | {t['limit_latency']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=tuple(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--precision", choices=("ieee", "tf32x3"), default=None,
                    help="replace the heuristic's dot precision (tf32x3: the tuner's tensor-core candidate; the "
                         "model has no tensor-core rate, so its times are then issue/memory bounds only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    print("Everything below is a MODEL PREDICTION (perf/stats_model.py: perf/kernel_model.py's static SASS model "
          "applied to the statistics kernels), not a measurement.")
    print(f"SASS from triton {triton.__version__}, sm_90; H100: {km.SMS} SMs, {km.CLOCK_HZ / 1e9:.2f} GHz, copy "
          f"{km.COPY_BYTES_PER_S / 1e12} TB/s, CPI_1 = {km.CPI_1}; assumed load latency {LOAD_LATENCY_CLOCKS} "
          "clocks per loop iteration (not calibrated)")
    if args.precision == "tf32x3":
        print("tl.dot precision forced to tf32x3 (not the heuristic's): tensor-core instructions are counted, but the "
              "model has no tensor-core pipe rate, so the times below count them as issue slots only (lower bounds)")
    totals = {}
    for name in args.model:
        preds, useful = predict_model(name, args.precision)
        totals[name] = print_model(name, preds, useful)
    print_totals(totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
