"""Training quality study: MBF against Adam and SGD-momentum on the digits autoencoder and CNN.

Protocol (the same for every optimizer):
1. sweep: each optimizer trains once (seed 0) for every point of its grid (learning rates; MBF also
   damping and, on the autoencoder, the Linear block size); the point with the lowest final
   *validation* loss is selected;
2. seeds: the selected point is trained with ``--seeds`` seeds (different initialisation and shuffling,
   same data split);
3. report: mean and spread (min..max) over seeds of the training-loss curves per epoch and per second,
   the test metric, and the paper-style targets (autoencoder: epochs MBF needs to reach Adam's final
   training loss, relative to Adam's; CNN: test accuracy against Adam's).

Writes ``runs.csv`` (one row per run and epoch), ``summary.md`` (tables), ``<task>.png`` into ``--out``.
``--smoke`` runs a tiny version (CI). Regenerate the committed results with::

    python perf/train_quality.py --out perf/quality
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from mbf_triton import __version__
from mbf_triton.experiments import TASK_SPECS, train

# Grids: the same number of learning rates for every optimizer (five, log-spaced around the values a
# first probe found useful); MBF additionally sweeps damping and block size briefly.
GRIDS = {
    "autoencoder": {
        "epochs": 40,
        "adam": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
        "sgd": [{"lr": lr} for lr in (0.03, 0.1, 0.3, 1.0, 3.0)],
        "mbf": [{"lr": r * d, "damping": d, "block_size": 16, "stat_decay": 0.99}
                for d in (1e-4, 1e-5, 3e-6) for r in (1, 3, 10)]
        + [{"lr": 3 * d, "damping": d, "block_size": 64, "stat_decay": 0.99} for d in (1e-4, 1e-5, 3e-6)],
    },
    "cnn": {
        "epochs": 15,
        "adam": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
        "sgd": [{"lr": lr} for lr in (3e-3, 1e-2, 3e-2, 0.1, 0.3)],
        "mbf": [{"lr": r * d, "damping": d, "stat_decay": 0.99} for d in (1e-2, 1e-3, 1e-4) for r in (0.3, 1, 3)],
    },
}
SMOKE_GRIDS = {
    "autoencoder": {"epochs": 2, "adam": [{"lr": 1e-2}], "sgd": [{"lr": 0.3}],
                    "mbf": [{"lr": 1e-5, "damping": 1e-5}, {"lr": 3e-5, "damping": 1e-5}]},
    "cnn": {"epochs": 1, "adam": [{"lr": 1e-3}], "sgd": [{"lr": 0.03}], "mbf": [{"lr": 1e-3, "damping": 1e-3}]},
}
MBF_FIXED = {"backend": "auto", "stat_every": 1}  # statistics every step, as in the paper


def _run(job: tuple[str, str, dict, int, int, str]) -> dict:
    task, opt, point, seed, epochs, device = job
    torch.set_num_threads(1)
    hp = dict(point)
    lr = hp.pop("lr")
    if opt == "mbf":
        hp.update(MBF_FIXED)
    t0 = time.perf_counter()
    hist = train(task, opt, lr, epochs=epochs, seed=seed, device=device, **hp)
    return {"task": task, "optimizer": opt, "point": point, "seed": seed, "train_loss": hist.train_loss,
            "wall_time": hist.wall_time, "val_loss": hist.val_loss, "test_metric": hist.test_metric,
            "diverged": hist.diverged, "seconds": time.perf_counter() - t0}


def _map(jobs, n_workers: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True) if tqdm else None
    out = []
    if n_workers <= 1:
        for j in jobs:
            out.append(_run(j))
            bar and bar.update(1)
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            for r in pool.map(_run, jobs):
                out.append(r)
                bar and bar.update(1)
    bar and bar.close()
    return out


def _fmt_point(p: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["autoencoder", "cnn"], choices=sorted(TASK_SPECS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="perf/quality")
    ap.add_argument("--smoke", action="store_true", help="tiny grids and epochs (CI)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    grids = SMOKE_GRIDS if args.smoke else GRIDS
    jobs = 1 if args.device != "cpu" else args.jobs
    os.makedirs(args.out, exist_ok=True)
    env = {"date": datetime.date.today().isoformat(), "device": _device_name(args.device),
           "torch": torch.__version__, "mbf_triton": __version__, "python": platform.python_version()}

    rows, md = [], [f"# Training quality: MBF vs Adam vs SGD-momentum (digits, {env['date']})", "",
                    f"Device: {env['device']}; torch {env['torch']}; mbf_triton {env['mbf_triton']}. "
                    f"Regenerate: `python perf/train_quality.py --out {args.out}`"
                    + (" (SMOKE RUN: tiny settings, not results)" if args.smoke else ""), ""]
    verdicts = []
    for task in args.tasks:
        grid, epochs = grids[task], grids[task]["epochs"]
        sweep_jobs = [(task, o, p, 0, epochs, args.device) for o in ("mbf", "adam", "sgd") for p in grid[o]]
        sweep = _map(sweep_jobs, jobs, f"{task}: sweep")
        best = {}
        md += [f"## {task} ({epochs} epochs, batch 100)", "", "Sweep (seed 0), final validation loss:", "",
               "| optimizer | point | val loss | final train loss |", "|---|---|---|---|"]
        for o in ("mbf", "adam", "sgd"):
            mine = [r for r in sweep if r["optimizer"] == o]
            for r in sorted(mine, key=lambda r: _key(r)):
                md.append(f"| {o} | {_fmt_point(r['point'])} | {r['val_loss']:.4f} | {r['train_loss'][-1]:.4f} |")
            best[o] = min(mine, key=_key)
        seed_jobs = [(task, o, best[o]["point"], s, epochs, args.device) for o in best for s in range(1, args.seeds)]
        runs = {o: [best[o]] for o in best}
        for r in _map(seed_jobs, jobs, f"{task}: seeds"):
            runs[r["optimizer"]].append(r)
        for o, rs in runs.items():
            for r in rs:
                for e, (loss, wt) in enumerate(zip(r["train_loss"], r["wall_time"])):
                    rows.append({**env, "task": task, "optimizer": o, "point": _fmt_point(r["point"]),
                                 "seed": r["seed"], "epoch": e + 1, "train_loss": loss, "wall_time_s": wt,
                                 "val_loss": r["val_loss"], "test_metric": r["test_metric"]})
        md += ["", f"Selected points, {args.seeds} seeds (mean, min..max):", "",
               f"| optimizer | point | final train loss | {TASK_SPECS[task].metric} | train time (s) |",
               "|---|---|---|---|---|"]
        curves = {o: _mean_curve(rs) for o, rs in runs.items()}
        for o, rs in runs.items():
            fl = [r["train_loss"][-1] for r in rs]
            tm = [r["test_metric"] for r in rs]
            wt = [r["wall_time"][-1] for r in rs]
            md.append(f"| {o} | {_fmt_point(best[o]['point'])} | {_stat(fl)} | {_stat(tm)} | {sum(wt)/len(wt):.1f} |")
        md.append("")
        if task == "autoencoder":
            target = curves["adam"][-1]
            e_adam = _epochs_to(curves["adam"], target)
            e_mbf = _epochs_to(curves["mbf"], target)
            ratio = e_mbf / e_adam
            ok = ratio <= 0.7
            verdicts.append(f"autoencoder: MBF reaches Adam's final mean training loss ({target:.4f}) at epoch "
                            f"{e_mbf if math.isfinite(e_mbf) else 'never'} vs Adam's {e_adam}: ratio "
                            f"{ratio:.2f} (target <= 0.70: {'MET' if ok else 'NOT MET'})")
        else:
            acc = {o: sum(r["test_metric"] for r in rs) / len(rs) for o, rs in runs.items()}
            ok = acc["mbf"] >= acc["adam"]
            verdicts.append(f"cnn: MBF mean test accuracy {acc['mbf']:.4f} vs Adam {acc['adam']:.4f} "
                            f"(target MBF >= Adam: {'MET' if ok else 'NOT MET'})")
        _plot(task, runs, best, os.path.join(args.out, f"{task}.png"))
        md += [f"![{task}]({task}.png)", ""]
    md += ["## Targets", ""] + [f"- {v}" for v in verdicts] + [""]
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write("\n".join(md))
    print("\n".join(verdicts))
    print(f"wrote {args.out}/summary.md, runs.csv and plots")
    return 0


def _key(r: dict) -> float:
    return math.inf if r["diverged"] or not math.isfinite(r["val_loss"]) else r["val_loss"]


def _stat(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.4f} ({min(xs):.4f}..{max(xs):.4f})"


def _mean_curve(rs: list[dict]) -> list[float]:
    n = min(len(r["train_loss"]) for r in rs)
    return [sum(r["train_loss"][i] for r in rs) / len(rs) for i in range(n)]


def _epochs_to(curve: list[float], target: float) -> float:
    return next((i + 1 for i, v in enumerate(curve) if v <= target * (1 + 1e-9)), math.inf)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _plot(task: str, runs: dict, best: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color, (o, rs) in zip(itertools.cycle(["C0", "C1", "C2"]), runs.items()):
        n = min(len(r["train_loss"]) for r in rs)
        ep = list(range(1, n + 1))
        mean = _mean_curve(rs)
        lo = [min(r["train_loss"][i] for r in rs) for i in range(n)]
        hi = [max(r["train_loss"][i] for r in rs) for i in range(n)]
        t = [sum(r["wall_time"][i] for r in rs) / len(rs) for i in range(n)]
        label = f"{o} ({_fmt_point(best[o]['point'])})"
        axes[0].plot(ep, mean, color=color, label=label)
        axes[0].fill_between(ep, lo, hi, color=color, alpha=0.2)
        axes[1].plot(t, mean, color=color, label=o)
        axes[1].fill_between(t, lo, hi, color=color, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean, min..max over seeds)", yscale="log",
                title=f"digits {task}")
    axes[1].set(xlabel="training time (s, log)", ylabel="training loss", xscale="log", yscale="log",
                title="per second of training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
