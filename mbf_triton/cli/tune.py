"""``python -m mbf_triton tune``: sweep the Triton kernels' launch configurations.

Times every candidate of :mod:`mbf_triton.tuning.configs` for synthetic shapes (``--b``/``--blocks``) or a
model's layers (``--model``: a demo task from :mod:`mbf_triton.experiments`, or ``pkg.mod:factory``), times
the winner and the heuristic again (the verdict), prints a table, writes ``autotune.csv``,
``autotune_summary.csv`` and ``autotune.png``, and stores the winners in the autotune cache.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocks import layout_for
from ..experiments import TASK_SPECS
from ..reference import ConvGeometry
from ..tuning.configs import KERNELS, describe
from ..tuning.environment import device_name, interpreted, versions
from ..tuning.tuner import Choice, Timer, Tuner, cpu_timer, cuda_timer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Job:
    kernel: str
    b: int
    n_blocks: int
    label: str


def _spd_packed(n_blocks: int, b: int, device, gen: torch.Generator) -> torch.Tensor:
    t = b * (b + 1) // 2
    f = torch.rand(n_blocks, t, generator=gen, device="cpu").mul_(0.01)
    idx = torch.arange(b)
    f[:, idx * (idx + 3) // 2] += 1.0
    return f.to(device)


def _build_block_update(job: _Job, dtype, device, gen):
    b = job.b
    n_chunks = min(job.n_blocks, 64)
    rows = -(-job.n_blocks // n_chunks)
    cols = n_chunks * b
    n_blocks = rows * n_chunks
    f = _spd_packed(n_blocks, b, device, gen)
    grad = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    param = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    mom = torch.zeros(rows, cols, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    es = param.element_size()
    bytes_moved = f.numel() * 4 + grad.numel() * es + 2 * param.numel() * es + 2 * mom.numel() * 4
    args = (f, grad, param, mom, count)
    kw = dict(b=b, damping=1e-2, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return args, kw, bytes_moved, n_blocks, f"{rows}x{cols}"


def _build_linear(job: _Job, dtype, device, gen, samples: int):
    b = job.b
    n_out = max(1, math.isqrt(job.n_blocks))
    n_chunks = -(-job.n_blocks // n_out)
    n_in = n_chunks * b
    f = _spd_packed(n_out * n_chunks, b, device, gen)
    x = torch.randn(samples, n_in, generator=gen).to(device=device, dtype=dtype)
    gout = torch.randn(samples, n_out, generator=gen).to(device=device, dtype=dtype)
    bytes_moved = 2 * f.numel() * 4 + (x.numel() + gout.numel()) * x.element_size()
    return (
        (f, x, gout),
        dict(b=b, scale=1.0, decay=0.9),
        bytes_moved,
        f.shape[0],
        f"M={samples} {n_out}x{n_in}",
    )


def _build_conv(job: _Job, dtype, device, gen, samples: int, positions: int):
    b = job.b
    c = max(1, math.isqrt(job.n_blocks))
    k = math.isqrt(b)
    side = max(1, math.isqrt(positions))
    if k * k == b:  # a k x k convolution with "same" zero padding: side x side output positions
        lo, hi = (k - 1) // 2, k // 2
        geometry = ConvGeometry((k, k), (1, 1), ((lo, hi), (lo, hi)), (1, 1))
        x = torch.randn(samples, c, side, side, generator=gen)
        gout = torch.randn(samples, c, side, side, generator=gen)
    else:  # a 1-D convolution of width b without padding: side^2 output positions
        geometry = ConvGeometry((b,), (1,), ((0, 0),), (1,))
        x = torch.randn(samples, c, side * side + b - 1, generator=gen)
        gout = torch.randn(samples, c, side * side, generator=gen)
    x, gout = x.to(device=device, dtype=dtype), gout.to(device=device, dtype=dtype)
    f = _spd_packed(c * c, b, device, gen)
    bytes_moved = 2 * f.numel() * 4 + (x.numel() + gout.numel()) * x.element_size()
    return (
        (f, x, gout),
        dict(geometry=geometry, groups=1, scale=1.0, decay=0.9),
        bytes_moved,
        c * c,
        f"N={samples} C={c} L={side}^2",
    )


def confirm(timer: Timer, launch: Callable[[object], object], tuned: object, heuristic: object,
            rounds: int = 3) -> tuple[float, float]:
    """Median ms of the heuristic and the tuned config, timed again after the sweep, alternating
    ``rounds`` times: the sweep's own minimum is biased towards the winner (it is the fastest of several
    noisy timings), so the claim "tuned is not slower than the heuristic" rests on these numbers."""
    heur, best = [], []
    for _ in range(rounds):
        heur.append(float(timer(lambda: launch(heuristic), heuristic)))
        best.append(float(timer(lambda: launch(tuned), tuned)))
    return statistics.median(heur), statistics.median(best)


def _copy_gbps(device: torch.device, timer: Timer, numel: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), None)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _model_jobs(spec: str, block_size: int) -> list[_Job]:
    from torch import nn

    if ":" in spec:
        import importlib

        mod_name, fn_name = spec.split(":", 1)
        model = getattr(importlib.import_module(mod_name), fn_name)()
    else:
        if spec not in TASK_SPECS:
            raise SystemExit(
                f"--model {spec!r}: use one of {sorted(TASK_SPECS)} or 'package.module:factory'"
            )
        model = TASK_SPECS[spec].build()
    owner = {}
    for mname, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            owner[id(w)] = m
    seen: dict[tuple[int, int], list[str]] = {}
    for pname, p in model.named_parameters():
        lay = layout_for(p, owner.get(id(p)), block_size)
        seen.setdefault((lay.b, lay.n_blocks), []).append(pname)
    return [_Job("block_update", b, n, ",".join(names)) for (b, n), names in sorted(seen.items())]


DESCRIPTION = (
    "Sweep the Triton kernels' launch configurations, print the timings, write CSV + plot, and store the "
    "winners in the autotune cache (run once per GPU before long training jobs)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tune`` subcommand's options."""
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=["block_update"],
                   help="kernels to sweep (default: block_update)")
    p.add_argument("--b", nargs="+", type=int, default=None, help="mini-block sizes (default 9 16 25 32)")
    p.add_argument("--blocks", nargs="+", type=float, default=None, help="block counts (default 1e5 1e6)")
    p.add_argument(
        "--model",
        default=None,
        help="sweep the block update over a model's layers: 'autoencoder', 'cnn' or 'pkg.mod:factory'",
    )
    p.add_argument("--block-size", type=int, default=16, help="MBF block_size for --model (Linear fan-in)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--samples", type=int, default=None, help="M (Linear) / N (conv) of the statistics")
    p.add_argument("--positions", type=int, default=None, help="output positions L of the conv statistics")
    p.add_argument("--out", default="mbf_tune", help="directory for the CSV and the plot")
    p.add_argument(
        "--top", type=int, default=8, help="candidate rows printed per shape (all go to the CSV)"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="do not write the winners into the autotune cache"
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no new shape after this many seconds (the shapes left are listed as skipped)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, run under the Triton interpreter on CPU: exercises the pipeline, "
        "the timings are meaningless",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbf_triton tune``: see ``--help``."""
    p = argparse.ArgumentParser(prog="python -m mbf_triton tune", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace) -> int:
    """The sweep, from parsed options."""
    on_gpu = torch.cuda.is_available() and not interpreted()
    if not on_gpu and not args.smoke:
        print(
            "Tuning needs a CUDA GPU (and TRITON_INTERPRET unset); nothing was run. "
            "Use --smoke to exercise the sweep on CPU with meaningless timings."
        )
        return 0
    if not on_gpu and not interpreted():
        if any(m.startswith("mbf_triton.kernels") for m in sys.modules):
            print(
                "--smoke on CPU needs TRITON_INTERPRET=1 set before the kernels are imported; rerun as "
                "TRITON_INTERPRET=1 python -m mbf_triton tune --smoke"
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels are not imported yet: they will be interpreted
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = _DTYPES[args.dtype]
    smoke = args.smoke
    bs = args.b or ([3, 4] if smoke else [9, 16, 25, 32])
    counts = [int(c) for c in (args.blocks or ([6, 20] if smoke else [1e5, 1e6]))]
    samples = args.samples or (3 if smoke else 256)
    positions = args.positions or (4 if smoke else 196)
    if args.model:
        jobs = _model_jobs(args.model, args.block_size)
    else:
        jobs = [_Job(k, b, n, "") for k in args.kernel for b in bs for n in counts]
    timer: Timer = cuda_timer if on_gpu else (lambda fn, cfg=None: cpu_timer(fn, cfg, reps=1))
    timer_name = (
        "triton.testing.do_bench median"
        if on_gpu
        else "CPU perf_counter under TRITON_INTERPRET (MEANINGLESS)"
    )
    tuner = Tuner(mode="force", timer=timer, disk_cache=not args.no_cache, read_cache=False)
    copy_gbps = _copy_gbps(device, timer, 1 << (20 if smoke else 26))
    vers = versions()
    gpu = device_name(device)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"device: {gpu} | triton {vers['triton']} | torch {vers['torch']} | mbf_triton {vers['mbf_triton']}"
    )
    print(
        f"timer: {timer_name}; copy bandwidth {'(torch copy on CPU) ' if not on_gpu else ''}"
        f"{copy_gbps:.1f} GB/s"
    )
    if not on_gpu:
        print("NOTE: CPU smoke run: the timings below say nothing about a GPU.")

    sweep = _Sweep(device, dtype, args.dtype, torch.Generator().manual_seed(0), samples, positions, timer, tuner,
                   copy_gbps, {"device": gpu, **vers, "timer": timer_name, "date": stamp})
    rows: list[dict[str, object]] = []
    summary: list[dict[str, object]] = []
    t_start = time.perf_counter()
    skipped: list[_Job] = []
    for job in _progress(jobs):
        if args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s:
            skipped.append(job)
            continue
        shape_rows, summary_row, choice = sweep.shape(job)
        rows.extend(shape_rows)
        summary.append(summary_row)
        _print_shape(job, summary_row["n_blocks"], shape_rows[0]["shape"] if shape_rows else "", args.dtype,
                     choice, shape_rows, args.top)
        _write_csvs(Path(args.out), rows, summary, gpu, vers, stamp)  # a sweep stopped part-way keeps its rows

    _print_summary(summary, on_gpu)
    if skipped:
        print(f"time budget of {args.time_budget_s:g} s spent: {len(skipped)} shape(s) not tuned: "
              + ", ".join(f"{j.kernel} b={j.b} n={j.n_blocks}" for j in skipped))
    csv_path, summary_path = _write_csvs(Path(args.out), rows, summary, gpu, vers, stamp)
    png_path = _plot(summary, copy_gbps, Path(args.out) / "autotune.png", f"{gpu} ({timer_name})")
    print(f"\nwrote {csv_path}, {summary_path}" + (f" and {png_path}" if png_path else ""))
    if not args.no_cache and tuner.cache_files():
        print("cache: " + ", ".join(str(path) for path in tuner.cache_files()))
    return 0


def _progress(jobs: list[_Job]):
    """``jobs`` with a progress bar on stderr where tqdm is installed (it is a dependency; a bare
    environment without it still runs, with a line per shape instead)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        for i, job in enumerate(jobs):
            print(f"tune: shape {i + 1}/{len(jobs)}", file=sys.stderr)
            yield job
        return
    yield from tqdm(jobs, desc="tune", unit="shape", file=sys.stderr, disable=None)


@dataclass
class _Sweep:
    """What every shape of one sweep shares."""

    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    gen: torch.Generator
    samples: int
    positions: int
    timer: Timer
    tuner: Tuner
    copy_gbps: float
    meta: dict[str, object]  # device, versions, timer, date: repeated on every CSV row

    def shape(self, job: _Job) -> tuple[list[dict[str, object]], dict[str, object], Choice]:
        """Tune one shape; its CSV rows (one per trial), its summary row and the choice."""
        tuner = self.tuner
        tuner.chosen.clear()  # every shape is timed, even when it shares a key with the previous one
        if job.kernel == "block_update":
            targs, kw, nbytes, n_blocks, shape = _build_block_update(job, self.dtype, self.device, self.gen)
            tuner.block_update_config(*targs, **kw)
        elif job.kernel == "linear_stats":
            targs, kw, nbytes, n_blocks, shape = _build_linear(job, self.dtype, self.device, self.gen, self.samples)
            tuner.linear_stats_config(*targs, **kw)
        else:
            targs, kw, nbytes, n_blocks, shape = _build_conv(job, self.dtype, self.device, self.gen, self.samples,
                                                             self.positions)
            tuner.conv_stats_config(*targs, **kw)
        choice = tuner.chosen[tuner.last_key]
        heuristic = choice.trials[0].config if choice.trials else choice.config
        if choice.config == heuristic or choice.heuristic_ms is None:
            confirmed = (choice.heuristic_ms, choice.ms)  # the same config, or no heuristic timing to confirm
        else:
            try:
                confirmed = confirm(self.timer, tuner.last_run, choice.config, heuristic)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, keep the sweep going
                print(f"could not time {job.kernel} b={job.b} again: {type(e).__name__}: {e}"[:300])
                confirmed = (None, None)

        def gbps(ms: float | None) -> float | None:
            return None if ms is None else nbytes / (ms * 1e-3) / 1e9

        rows = [
            {
                "kernel": job.kernel, "b": job.b, "n_blocks": n_blocks, "dtype": self.dtype_name, "shape": shape,
                "layers": job.label, "config": describe(t.config), "status": t.status, "ms": t.ms,
                "gbps": gbps(t.ms), "pct_copy": None if t.ms is None else 100 * gbps(t.ms) / self.copy_gbps,
                "n_regs": t.n_regs, "n_spills": t.n_spills,
                "best": t.config == choice.config and choice.source == "tuned", "heuristic": t.config == heuristic,
                "source": choice.source, **self.meta,
            }
            for t in choice.trials
        ]
        summary = {
            "label": f"{job.kernel}\nb={job.b} n={n_blocks}", "best": gbps(choice.ms),
            "heuristic": gbps(choice.heuristic_ms), "kernel": job.kernel, "b": job.b, "n_blocks": n_blocks,
            "config": describe(choice.config), "ms": choice.ms, "heuristic_ms": choice.heuristic_ms,
            "confirm_heuristic_ms": confirmed[0], "confirm_tuned_ms": confirmed[1], "source": choice.source,
        }
        return rows, summary, choice


def _print_summary(summary: list[dict[str, object]], on_gpu: bool) -> None:
    print("\nsummary" + (" (CPU smoke: meaningless timings)" if not on_gpu else ""))
    print("sweep ms: the best of the sweep; heur./tuned ms: both configs timed again after the sweep, "
          "alternating, median of 3 (the verdict uses these)")
    print(
        f"{'kernel':<13} {'b':>3} {'blocks':>9} {'best config':<28} {'sweep ms':>9} {'heur. ms':>9} "
        f"{'tuned ms':>9} {'speedup':>8} {'tuned<=heur':>11}"
    )
    for s in summary:
        hms, tms = s["confirm_heuristic_ms"], s["confirm_tuned_ms"]
        ok = "" if tms is None or hms is None else ("yes" if tms <= hms else "NO")
        speed = "" if tms is None or hms is None else f"{hms / tms:.2f}x"
        print(
            f"{s['kernel']:<13} {s['b']:>3} {s['n_blocks']:>9} {s['config']:<28} {_fmt(s['ms']):>9} "
            f"{_fmt(hms):>9} {_fmt(tms):>9} {speed:>8} {ok:>11}"
        )


def _write_csvs(out: Path, rows: list[dict], summary: list[dict], gpu: str, vers: dict, stamp: str):
    """All trials (``autotune.csv``) and one line per shape (``autotune_summary.csv``); rewritten after every
    shape, so that a sweep stopped part-way keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "autotune_summary.csv"
    with open(summary_path, "w", newline="") as fh:
        fields = ["kernel", "b", "n_blocks", "config", "source", "ms", "heuristic_ms", "confirm_heuristic_ms",
                  "confirm_tuned_ms"]
        writer = csv.DictWriter(fh, fieldnames=fields + ["device", "triton", "torch", "mbf_triton", "date"])
        writer.writeheader()
        for row in summary:
            writer.writerow({**{k: row[k] for k in fields}, "device": gpu, "triton": vers["triton"],
                             "torch": vers["torch"], "mbf_triton": vers["mbf_triton"], "date": stamp})
    csv_path = out / "autotune.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, summary_path


def _fmt(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.4f}"


def _print_shape(
    job: _Job, n_blocks: int, shape: str, dtype: str, choice: Choice, rows: list[dict], top: int
) -> None:
    label = f" [{job.label}]" if job.label else ""
    print(
        f"\n{job.kernel} b={job.b} blocks={n_blocks} ({shape}) {dtype}{label}: {choice.source} "
        f"{describe(choice.config)}"
    )
    print(f"  {'config':<28} {'ms':>9} {'GB/s':>8} {'%copy':>6}  {'status':<10} mark")
    timed = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
    shown = timed[:top] + [r for r in timed[top:] if r["heuristic"]]
    for r in shown + [r for r in rows if r["ms"] is None]:
        mark = " ".join(m for m, on in (("best", r["best"]), ("heuristic", r["heuristic"])) if on)
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.1f}"
        pct = "" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}"
        print(f"  {r['config']:<28} {_fmt(r['ms']):>9} {gbps:>8} {pct:>6}  {r['status'][:40]:<10} {mark}")
    if len(timed) > len(shown):
        print(f"  ... {len(timed) - len(shown)} more in the CSV")


def _plot(summary: list[dict], copy_gbps: float, path: Path, title: str) -> Path | None:
    """The bar chart of tuned vs heuristic bandwidth, or None (with a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'mbf-triton[bench]'); the CSVs have everything")
        return None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(summary) + 2), 4.5))
    xs = list(range(len(summary)))
    ax.bar([x - 0.2 for x in xs], [s["heuristic"] or 0.0 for s in summary], width=0.4, label="heuristic")
    ax.bar([x + 0.2 for x in xs], [s["best"] or 0.0 for s in summary], width=0.4, label="tuned")
    ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="device copy")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in summary], fontsize=7)
    ax.set_ylabel("GB/s (all bytes read and written)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path