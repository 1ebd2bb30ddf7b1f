"""``python -m mbf_triton demo``: MBF against Adam (and SGD) on scikit-learn's bundled digits.

Trains the same seeded model with each optimizer at the learning rates chosen by the study in
``perf/train_quality.py`` (see ``experiments.TUNED``), prints a comparison table and writes a plot and a CSV.
Uses the Triton kernels on a CUDA machine and the torch reference path elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import torch

from ..experiments import TASK_SPECS, TUNED, load_digits, train


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


DESCRIPTION = "Train MBF, Adam and SGD on scikit-learn's bundled digits; print a table, write a CSV and a plot."


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--task", choices=sorted(TASK_SPECS), default="autoencoder", help="which digits task")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default: the task's demo length")
    parser.add_argument("--optimizers", nargs="+", default=["mbf", "adam", "sgd"], choices=["mbf", "adam", "sgd"],
                        help="optimizers to compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--out", default="mbf_demo", help="directory for demo.csv and demo.png")


def main(argv: list[str] | None = None) -> int:
    """``python -m mbf_triton demo``: see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m mbf_triton demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo, from parsed options."""
    task = TASK_SPECS[args.task]
    epochs = args.epochs or TUNED[args.task]["demo_epochs"]
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data = load_digits(args.device)
    print(f"task: {args.task} on digits ({len(data.x_train)} train / {len(data.x_test)} test), "
          f"{epochs} epochs, batch 100, device {args.device}")
    results = {}
    for name in args.optimizers:
        hp = dict(TUNED[args.task][name])
        lr = hp.pop("lr")
        bar = _progress(epochs, f"{name} lr={lr:g}")

        def on_epoch(epoch: int, loss: float, bar=bar) -> None:
            if bar is not None:
                bar.set_postfix(train_loss=f"{loss:.4f}")
                bar.update(1)

        t0 = time.perf_counter()
        hist = train(args.task, name, lr, epochs=epochs, seed=args.seed, data=data, device=args.device,
                     on_epoch=on_epoch, **hp)
        if bar is not None:
            bar.close()
        results[name] = (lr, hp, hist, time.perf_counter() - t0)

    ref_name = "adam" if "adam" in results else next(iter(results))
    target = min(results[ref_name][2].train_loss)
    header = (f"{'optimizer':10s} {'lr':>8s} {'final train loss':>17s} {'best':>8s} "
              f"{task.metric:>14s} {'epochs to ' + ref_name + ' best':>18s} {'train s':>8s}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, (lr, hp, hist, secs) in results.items():
        reach = hist.epochs_to(target)
        reach_s = "never" if math.isinf(reach) else str(reach)
        print(f"{name:10s} {lr:8.2g} {hist.train_loss[-1]:17.4f} {min(hist.train_loss):8.4f} "
              f"{hist.test_metric:14.4f} {reach_s:>18s} {hist.wall_time[-1]:8.1f}")
        rows.append({"optimizer": name, "lr": lr, **{f"hp_{k}": v for k, v in hp.items()},
                     "final_train_loss": hist.train_loss[-1], "best_train_loss": min(hist.train_loss),
                     "test_metric": hist.test_metric, "epochs_to_ref_best": reach, "train_seconds": hist.wall_time[-1]})

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "demo.csv")
    with open(csv_path, "w", newline="") as fh:
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    png = _plot(results, args.task, os.path.join(args.out, "demo.png"))
    print(f"wrote {csv_path}" + (f" and {png}" if png else " (matplotlib not installed: no plot)"))
    return 0


def _plot(results, task: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (lr, _, hist, _) in results.items():
        epochs = range(1, len(hist.train_loss) + 1)
        ax1.plot(epochs, hist.train_loss, label=f"{name} (lr={lr:g})")
        ax2.plot(hist.wall_time, hist.train_loss, label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", title=f"digits {task}: loss per epoch", yscale="log")
    ax2.set(xlabel="training time (s)", ylabel="training loss", title="loss per second", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
