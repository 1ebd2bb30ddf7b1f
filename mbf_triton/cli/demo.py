"""``python -m mbf_triton demo``: MBF against Adam (and SGD) on scikit-learn's bundled digits.

Trains the same seeded model with MBF at the point chosen by the study in ``perf/train_quality.py`` (see
``experiments.TUNED``) and at MBF's defaults with Adam's tuned learning rate, and with Adam and SGD at their
tuned learning rates; prints a comparison table (with the device and the backend that ran) and MBF's
``opt.summary()``, and writes a plot and a CSV. Uses the Triton kernels on a CUDA machine and the torch path
elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

from ..experiments import TASK_SPECS, TUNED, load_digits, train


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


DESCRIPTION = ("Train MBF (tuned and default settings), Adam and SGD on scikit-learn's bundled digits; print a "
               "table and MBF's per-parameter summary, write a CSV and a plot.")

# the runs the demo can make: "mbf" uses the study's tuned point (experiments.TUNED), "mbf-default" MBF's own
# defaults at Adam's tuned learning rate (what a user swapping MBF in for Adam gets), the others their tuned
# learning rates
RUNS = ("mbf", "mbf-default", "adam", "sgd")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--task", choices=sorted(TUNED), default="autoencoder", help="which digits task")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default: the task's demo length")
    parser.add_argument("--optimizers", nargs="+", default=list(RUNS), choices=RUNS,
                        help="runs to compare ('mbf': tuned settings, 'mbf-default': MBF's defaults at Adam's lr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available; MBF then runs its Triton kernels)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads (default 1: these models are too small to gain from more, and "
                             "threads contending with other work on a shared machine slow every step down)")
    parser.add_argument("--out", default="mbf_demo", help="directory for demo.csv and demo.png")


def main(argv: list[str] | None = None) -> int:
    """``python -m mbf_triton demo``: see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m mbf_triton demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _settings(task: str, name: str) -> tuple[str, dict]:
    """(optimizer, keyword arguments of experiments.train) of a run."""
    if name == "mbf-default":  # the swap-in: MBF's defaults at the learning rate tuned for Adam
        return "mbf", {"lr": TUNED[task]["adam"]["lr"]}
    return name, dict(TUNED[task][name])


def device_label(device: str) -> str:
    """The device in words: the GPU's name, or the CPU with the threads torch uses."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''} of {os.cpu_count()} cores)"


def run(args: argparse.Namespace) -> int:
    """The demo, from parsed options."""
    task = TASK_SPECS[args.task]
    epochs = args.epochs or TUNED[args.task]["demo_epochs"]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        data = load_digits(args.device)
    except ImportError as e:  # scikit-learn is in the demo extra
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = device_label(args.device)
    print(f"task: {args.task} on digits ({len(data.x_train)} train / {len(data.x_test)} test), "
          f"{epochs} epochs, batch 100, on {where}", flush=True)
    started = time.perf_counter()
    results = {}
    for name in args.optimizers:
        opt_name, hp = _settings(args.task, name)
        lr = hp.pop("lr")
        bar = _progress(epochs, name)

        def on_epoch(epoch: int, loss: float, bar=bar) -> None:
            if bar is not None:
                bar.set_postfix(train_loss=f"{loss:.4f}")
                bar.update(1)

        hist = train(args.task, opt_name, lr, epochs=epochs, seed=args.seed, data=data, device=args.device,
                     on_epoch=on_epoch, **hp)
        if bar is not None:
            bar.close()
        results[name] = (lr, hp, hist)

    ref_name = "adam" if "adam" in results else next(iter(results))
    target = min(results[ref_name][2].train_loss)
    mbf_backend = next((h.backend for n, (_, _, h) in results.items() if n.startswith("mbf")), "-")
    print(f"\ndevice: {where}; MBF backend: {mbf_backend}; Adam/SGD: torch.optim")
    header = (f"{'run':12s} {'settings':44s} {'final loss':>10s} {'best':>7s} {task.metric:>14s} "
              f"{'epochs to ' + ref_name + ' best':>19s} {'train s':>8s} {'backend':>8s}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, (lr, hp, hist) in results.items():
        reach = hist.epochs_to(target)
        reach_s = "never" if math.isinf(reach) else str(reach)
        settings = _describe(lr, hp)
        print(f"{name:12s} {settings:44s} {hist.train_loss[-1]:10.4f} {min(hist.train_loss):7.4f} "
              f"{hist.test_metric:14.4f} {reach_s:>19s} {hist.wall_time[-1]:8.1f} {hist.backend:>8s}")
        rows.append({"run": name, "lr": lr, **{f"hp_{k}": v for k, v in hp.items()},
                     "final_train_loss": hist.train_loss[-1], "best_train_loss": min(hist.train_loss),
                     "test_metric": hist.test_metric, "epochs_to_ref_best": reach,
                     "train_seconds": hist.wall_time[-1], "device": where, "backend": hist.backend})
    for name, (_, _, hist) in results.items():
        if hist.summary:
            print(f"\n{name}: opt.summary() after training\n{hist.summary}")

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "demo.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    png = _plot(results, args.task, where, mbf_backend, os.path.join(args.out, "demo.png"))
    print(f"\nwrote {csv_path}" + (f" and {png}" if png else " (matplotlib not installed: no plot)")
          + f"; {time.perf_counter() - started:.0f} s in all")
    return 0


def _describe(lr: float, hp: dict) -> str:
    short = {"damping": "damp", "block_size": "b", "stat_decay": "decay", "stat_every": "every"}
    def value(v) -> str:
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    # settings that are off (e.g. graft=None: the paper's plain step) are left out of the label
    return " ".join([f"lr={lr:g}", *(f"{short.get(k, k)}={value(v)}" for k, v in hp.items() if v is not None)])


def _plot(results, task: str, where: str, backend: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, (lr, hp, hist) in results.items():
        epochs = range(1, len(hist.train_loss) + 1)
        style = {"marker": "o", "markersize": 2.5}
        ax1.plot(epochs, hist.train_loss, label=f"{name} ({_describe(lr, hp)})", **style)
        ax2.plot(hist.wall_time, hist.train_loss, label=name, **style)
    ax1.set(xlabel="epoch", ylabel="training loss (full training set)", title="loss against epochs")
    ax2.set(xlabel="wall-clock seconds of training (log scale)", ylabel="training loss",
            title="loss against training time", xscale="log")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        # labelled ticks at 1, 2, 3, 5 and 7 of every decade: a loss spanning less than a decade still gets
        # several labels (the default labels only powers of ten)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    ax2.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax2.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"MBF demo: digits {task} on {where}; MBF backend: {backend}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
