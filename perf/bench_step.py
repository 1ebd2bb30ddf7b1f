"""Step benchmark: one training iteration and one optimizer step, MBF against Adam and SGD.

Models (see ``perf/models.py``): ResNet-32 and VGG-16 on CIFAR-shaped batches of 128 (3x32x32, 10
classes, cross-entropy) and the deep autoencoder on MNIST-shaped batches of 1000 (784 pixels in [0, 1],
binary cross-entropy on logits). Data are random tensors made on the device (no download); the timing
does not depend on the values as long as they stay finite (a run whose optimizer skipped a step because a
gradient was not finite is flagged).

Optimizers: MBF(triton) and MBF(torch reference), each with statistics every step (``stat_every=1``) and
with the optimizer's default ``stat_every`` (read from its signature; one run when it is 1), Adam
(``fused=True`` on CUDA) and SGD with momentum 0.9.

Timed: ``iter`` = zero_grad + forward + loss + backward + step; ``step`` = ``opt.step()`` alone (after an
untimed forward/backward and a device synchronisation); ``host`` = the CPU time of the ``opt.step()``
call (Python, launches and any synchronisation inside it): where it approaches ``step``, the optimizer is
launch-bound, not GPU-bound. Both are averaged over windows of ``W`` consecutive iterations (``W`` = the
default ``stat_every``, so a window holds exactly one statistics step) and the median over windows is
reported, per iteration. CUDA events on the current stream; warm-up (Triton compilation, cuDNN
autotuning) is excluded. Peak memory is ``torch.cuda.max_memory_allocated`` with the counter reset before
the model is built; optimizer-state bytes per parameter = bytes of all tensors in ``opt.state`` / number
of trainable parameters.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import models
import torch
import torch.nn.functional as tnf
from torch import nn

TARGET_STAT1 = 1.5  # full MBF iteration with statistics every step, <= this x Adam(fused)
TARGET_DEFAULT = 1.15  # with the default stat_every


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    batch: int
    make_batch: Callable[[int, torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OptSpec:
    name: str
    build: Callable[[nn.Module], torch.optim.Optimizer]
    target: float | None  # max ratio of the iteration time to Adam's, if a target applies


def _images(size: int) -> Callable[[int, torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, size, size, device=device, generator=gen)
        y = torch.randint(0, 10, (n,), device=device, generator=gen)
        return x, y
    return make


def _pixels(dim: int) -> Callable[[int, torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(n: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, dim, device=device, generator=gen)
        return x, x
    return make


def _ce(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return tnf.cross_entropy(out, y)


def _bce(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return tnf.binary_cross_entropy_with_logits(out, x)


def model_specs(smoke: bool) -> list[ModelSpec]:
    if smoke:
        ae = (64, 32, 16, 8, 4)
        return [
            ModelSpec("resnet32", lambda: models.resnet32(width_div=8, blocks_per_stage=1), 4, _images(8),
                      _ce),
            ModelSpec("vgg16", lambda: models.vgg16(width_div=64), 2, _images(32), _ce),
            ModelSpec("autoencoder", lambda: models.deep_autoencoder(ae), 16, _pixels(ae[0]), _bce),
        ]
    return [
        ModelSpec("resnet32", models.resnet32, 128, _images(32), _ce),
        ModelSpec("vgg16", models.vgg16, 128, _images(32), _ce),
        ModelSpec("autoencoder", models.deep_autoencoder, 1000, _pixels(784), _bce),
    ]


def default_stat_every() -> int:
    from mbf_triton import MBF

    return int(inspect.signature(MBF.__init__).parameters["stat_every"].default)


def triton_usable(device: torch.device) -> bool:
    from mbf_triton.backends import triton_available

    return triton_available() and (device.type == "cuda" or common.interpreted())


def opt_specs(device: torch.device, args: argparse.Namespace, stat_default: int) -> list[OptSpec]:
    from mbf_triton import MBF

    def mbf(backend: str, stat_every: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: MBF(m, lr=args.mbf_lr, damping=args.damping, momentum=0.9, stat_every=stat_every,
                             backend=backend)

    specs = []
    backends = (["triton"] if triton_usable(device) else []) + ["torch"]
    for backend in backends:
        target = backend == "triton"
        specs.append(OptSpec(f"mbf-{backend} s=1", mbf(backend, 1), TARGET_STAT1 if target else None))
        if stat_default != 1:
            specs.append(OptSpec(f"mbf-{backend} s={stat_default}", mbf(backend, stat_default),
                                 TARGET_DEFAULT if target else None))
    fused = {"fused": True} if device.type == "cuda" else {}
    specs.append(OptSpec("adam" + ("(fused)" if fused else ""),
                         lambda m: torch.optim.Adam(m.parameters(), lr=args.adam_lr, **fused), None))
    specs.append(OptSpec("sgd-momentum",
                         lambda m: torch.optim.SGD(m.parameters(), lr=args.sgd_lr, momentum=0.9), None))
    return specs


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Elapsed milliseconds of a region: CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start: Any) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return (start, ev)
        return (time.perf_counter() - start) * 1e3

    def ms(self, stamp: Any) -> float:
        if self.cuda:
            return stamp[0].elapsed_time(stamp[1])
        return stamp


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def run_one(spec: ModelSpec, ospec: OptSpec, device: torch.device, args: argparse.Namespace,
            window: int) -> dict[str, Any]:
    from mbf_triton import MBF

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = spec.build().to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = spec.make_batch(spec.batch, device, gen)
    opt = ospec.build(model)
    clock = Clock(device)
    losses: list[torch.Tensor] = []

    def fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        loss = spec.loss(model(x), x, y)
        loss.backward()
        losses.append(loss.detach())

    def iteration() -> None:
        fwd_bwd()
        opt.step()

    try:
        for _ in range(window * math.ceil(args.warmup / window)):  # warm-up ends on a window boundary
            iteration()
        common.synchronize(device)
        iter_windows, step_windows = [], []
        for _ in range(args.windows):
            t0 = clock.start()
            for _ in range(window):
                iteration()
            iter_windows.append(clock.stop(t0))
        host_windows = []
        for _ in range(args.windows):
            stamps, host = [], 0.0
            for _ in range(window):
                fwd_bwd()
                common.synchronize(device)  # the step starts on an idle device: its own latency is timed
                t0 = clock.start()
                h0 = time.perf_counter()
                opt.step()
                host += time.perf_counter() - h0
                stamps.append(clock.stop(t0))
            step_windows.append(stamps)
            host_windows.append(host * 1e3 / window)
        common.synchronize(device)
        iter_ms = statistics.median(clock.ms(s) / window for s in iter_windows)
        step_ms = statistics.median(sum(clock.ms(s) for s in w) / window for w in step_windows)
        row: dict[str, Any] = {
            "model": spec.name, "optimizer": ospec.name, "batch": spec.batch, "params": n_params,
            "window": window, "iter_ms": iter_ms, "step_ms": step_ms,
            "step_host_ms": statistics.median(host_windows),
            "state_bytes_per_param": state_bytes(opt) / n_params,
            "peak_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                            else math.nan),
            "final_loss": float(losses[-1]),
        }
        notes = []
        if isinstance(opt, MBF):
            if opt.skipped_steps:
                notes.append(f"{opt.skipped_steps} skipped steps (non-finite gradients)")
            if opt.fallback_blocks:
                notes.append(f"{opt.fallback_blocks} fallback blocks")
        if not all(math.isfinite(float(v)) for v in losses[-3:]):
            notes.append("non-finite loss")
        row["notes"] = "; ".join(notes)
        return row
    finally:
        if isinstance(opt, MBF):
            opt.remove_hooks()


def add_ratios(rows: list[dict[str, Any]], targets: dict[str, float | None]) -> None:
    for r in rows:
        adam = next((a for a in rows if a["model"] == r["model"] and a["optimizer"].startswith("adam")), None)
        r["iter_vs_adam"] = r["iter_ms"] / adam["iter_ms"] if adam else math.nan
        r["step_vs_adam"] = r["step_ms"] / adam["step_ms"] if adam else math.nan
        target = targets.get(r["optimizer"])
        if target is None or not math.isfinite(r["iter_vs_adam"]):
            r["target"] = "-"
        else:
            r["target"] = ("PASS" if r["iter_vs_adam"] <= target else "MISS") + f" <={target:g}x"


# ---------------------------------------------------------------------------------------------- output
def plot(rows: list[dict[str, Any]], path: Path, env: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["model"] == name]
        pos = range(len(rs))
        ax.bar(pos, [r["iter_ms"] for r in rs], color="tab:blue", label="iteration")
        ax.bar(pos, [r["step_ms"] for r in rs], color="tab:orange", width=0.5, label="optimizer step")
        ax.set_xticks(list(pos), [r["optimizer"] for r in rs], rotation=35, ha="right", fontsize=8)
        ax.set(ylabel="ms per iteration (median)", title=f"{name} (batch {rs[0]['batch']})")
        for i, r in enumerate(rs):
            if math.isfinite(r.get("iter_vs_adam", math.nan)):
                ax.annotate(f"{r['iter_vs_adam']:.2f}x", (i, r["iter_ms"]), ha="center", va="bottom",
                            fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return common.save_figure(fig, path, env)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "optimizer", "iter ms", "step ms", "step host ms", "iter/Adam", "step/Adam", "peak MiB",
              "state B/param", "target", "notes"]
    return common.format_table(
        [[r["model"], r["optimizer"], r["iter_ms"], r["step_ms"], r["step_host_ms"], r["iter_vs_adam"],
          r["step_vs_adam"],
          r["peak_mem_mb"], r["state_bytes_per_param"], r["target"], r["notes"] or "-"] for r in rows],
        header)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--models", nargs="+", default=None, help="subset of resnet32 vgg16 autoencoder")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5; smoke 0)")
    p.add_argument("--windows", type=int, default=None,
                   help="timed windows of W iterations, for iterations and for steps (default 10; smoke 1)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new model/optimizer run after this many seconds (default: none; ignored by "
                        "--smoke, which always runs its fixed, small set of runs)")
    p.add_argument("--mbf-lr", type=float, default=1e-3)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--adam-lr", type=float, default=1e-4)
    p.add_argument("--sgd-lr", type=float, default=1e-3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.start(args.smoke)
    mode = "smoke" if args.smoke else "full"
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 5)
    args.windows = args.windows if args.windows is not None else (1 if args.smoke else 10)
    env = common.environment(device, mode)
    print(common.env_banner(env), flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    stat_default = default_stat_every()
    window = 1 if args.smoke else stat_default  # smoke: one iteration per window (the interpreter is slow)
    specs = [s for s in model_specs(args.smoke) if args.models is None or s.name in args.models]
    ospecs = opt_specs(device, args, stat_default)
    print(f"MBF default stat_every = {stat_default}; timing windows of {window} iteration(s)"
          + ("" if triton_usable(device) else "; MBF(triton) not available here"), flush=True)
    # smoke: a fixed, small set of runs whatever the machine's load (no time budget); the interpreted Triton
    # path (many seconds per iteration) only once, on the model it runs fastest (resnet32's smoke size)
    interpreted_once = ("resnet32", "mbf-triton s=1")
    jobs = [(s, o) for s in specs for o in ospecs
            if not (args.smoke and o.name.startswith("mbf-triton") and (s.name, o.name) != interpreted_once)]
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "step.csv"
    # the targets are GPU ratios: a CPU or interpreter run is not judged against them
    targets = {o.name: o.target for o in ospecs} if device.type == "cuda" else {}
    t_start = time.perf_counter()
    bar = common.progress(jobs, total=len(jobs), desc="step bench", disable=args.no_progress)
    for spec, ospec in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{spec.name} / {ospec.name}")
        if (not args.smoke and args.time_budget_s is not None
                and time.perf_counter() - t_start > args.time_budget_s):
            print(f"time budget spent: skipping {spec.name} / {ospec.name}", flush=True)
            continue
        rows.append(run_one(spec, ospec, device, args, window))
        if args.no_progress:
            r = rows[-1]
            print(f"{spec.name} / {ospec.name}: iter {r['iter_ms']:.4g} ms, step {r['step_ms']:.4g} ms "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        add_ratios(rows, targets)
        common.write_csv(csv_path, rows, env)  # after every run: a killed run keeps what it measured

    png_path = plot(rows, args.out / "step_time.png", env)
    summary = (f"## Step benchmark ({mode}) — {env['date']}, {env['device']}, torch {env['torch']}, "
               f"triton {env['triton']}\n\nms per iteration: median over windows of {window} iteration(s); "
               f"MBF default stat_every = {stat_default}; targets: MBF(triton) s=1 <= {TARGET_STAT1}x "
               f"Adam, default stat_every <= {TARGET_DEFAULT}x.\n\n" + table(rows) + "\n")
    (args.out / "step_summary.md").write_text(summary)
    print("\n" + summary)
    print(f"wrote {csv_path} and {png_path}")
    bad = [r for r in rows if "non-finite" in r["notes"] or "skipped" in r["notes"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
