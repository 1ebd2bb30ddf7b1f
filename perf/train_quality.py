"""Training-quality study: MBF (plain and with the step-size options) against first- and second-order peers.

Protocol, the same for every optimizer:
1. sweep: each optimizer trains once (seed 0) at every learning rate of its grid (five log-spaced points
   for every optimizer; every other hyperparameter at its package default); the point with the lowest
   final *validation* loss is selected (a diverged or failed run is never selected, and is reported);
2. seeds: the selected point is trained again with seeds 1.. (initialisation and shuffling; same split);
3. defaults (``--stage defaults``): each optimizer of ``--optimizers`` (the candidate default configurations)
   and Adam at Adam's selected lr and at 1e-3 (Adam's default), seeds 0.., every other argument at its default;
4. report: per task, the selected points' final training loss, validation loss and test metric (mean and
   standard deviation over seeds), seconds per run, the epoch at which the mean curve reaches Adam's final
   mean training loss, each optimizer's rank; the defaults at Adam's lr beside Adam's with the issue's
   conditions; figures of the training loss against epochs and seconds.

Training loss: the whole training set's loss (eval mode) ``EVALS_PER_EPOCH`` times per epoch at evenly spaced
steps (``fine_epoch``/``fine_loss`` in the CSV), the last at each epoch's end (``train_loss``). Rows written
before sub-epoch curves existed have only the epoch ends; ``--rerun-coarse`` reruns those the stages schedule.

Runs in stages with a resumable CSV (``runs.csv``, one row per run; runs already in it are skipped), so a
study that does not fit one sitting continues where it stopped: ``--stage sweep|seeds|defaults|report``
(or ``all``: sweep, seeds, report), ``--tasks``, ``--optimizers`` choose what runs now; ``report`` writes
``summary.md`` and the figures from whatever the CSV holds and says what is missing. Peers from the package index need
``pip install 'mbf-triton[study]'`` (see ``perf/peers.py``). ``--smoke`` is a tiny run for CI.

    python perf/train_quality.py --stage all --out perf/quality
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import NAMES, make_peer  # noqa: E402

from mbf_triton import __version__  # noqa: E402
from mbf_triton.experiments import TASK_SPECS, train  # noqa: E402

# Five log-spaced points for every optimizer (half a decade apart). The first study had four; Adam's best
# sat at its top on four tasks, so every grid got one more point at its top.
ADAM_LIKE = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # Adam's lr scale: Adam, the grafted MBFs, SOAP, Shampoo, Kron
GRIDS = {
    **{name: ADAM_LIKE for name in NAMES},
    "mbf": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),  # the paper's method at damping 1e-3: lr / damping is SGD's lr
    "sgd": (3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "kfac": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
EPOCHS = {"autoencoder": 10, "cnn": 5, "resnet": 5, "charlm": 4, "tabular": 15}
CORE = ("mbf", "mbf-graft", "adam", "sgd")
EVALS_PER_EPOCH = 5
ADAM_DEFAULT_LR = 1e-3
SMOKE = {"tasks": ("tabular", "autoencoder"), "optimizers": CORE, "epochs": 1, "grid": 2}
FIELDS = ["task", "optimizer", "lr", "seed", "epochs", "status", "train_loss", "wall_time", "val_loss",
          "test_metric", "seconds", "error", "date", "device", "torch", "mbf_triton", "fine_epoch", "fine_loss"]


def _run(job: tuple) -> dict:
    task, opt, lr, seed, epochs, env = job
    torch.set_num_threads(1)
    row = {"task": task, "optimizer": opt, "lr": lr, "seed": seed, "epochs": epochs, **env}
    t0 = time.perf_counter()
    try:
        hist = train(task, opt, lr, epochs=epochs, seed=seed, make=make_peer(opt), evals_per_epoch=EVALS_PER_EPOCH)
        status = "diverged" if hist.diverged else "ok"
        row.update(status=status, train_loss=";".join(f"{v:.6g}" for v in hist.train_loss),
                   wall_time=";".join(f"{v:.4g}" for v in hist.wall_time), val_loss=hist.val_loss,
                   test_metric=hist.test_metric, error="", fine_epoch=";".join(f"{v:.4g}" for v in hist.fine_epoch),
                   fine_loss=";".join(f"{v:.6g}" for v in hist.fine_loss))
    except Exception as e:  # a peer's failure (e.g. a non-PD Cholesky) is a result of the study
        status = "error"
        row.update(status=status, train_loss="", wall_time="", val_loss=math.inf, test_metric=math.nan,
                   error=f"{type(e).__name__}: {e}".replace("\n", " ")[:200])
        if os.environ.get("MBF_STUDY_TRACEBACK"):
            traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _floats(text: str | None) -> list[float]:
    return [float(v) for v in text.split(";")] if text else []


def _read(path: str) -> tuple[list[str], list[dict]]:
    """The CSV's header and rows as dicts of strings. A file begun with an older, shorter header (a prefix of
    :data:`FIELDS`) holds rows of both lengths: the extra values are the newer fields, in order."""
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    header = table[0] if table else []
    names = header + [f for f in FIELDS if f not in header]
    return header, [dict(zip(names, values)) for values in table[1:]]


def _load(path: str) -> list[dict]:
    """The CSV's runs, one per key: a rerun (appended later) replaces the earlier row of its key."""
    if not os.path.exists(path):
        return []
    rows = _read(path)[1]
    for r in rows:
        r["lr"], r["seed"], r["epochs"] = float(r["lr"]), int(r["seed"]), int(r["epochs"])
        for k in ("val_loss", "test_metric", "seconds"):
            r[k] = float(r[k])
        r["curve"], r["times"] = _floats(r["train_loss"]), _floats(r["wall_time"])
        # (epoch, loss) points: sub-epoch where the run has them, else the epoch ends
        fine = list(zip(_floats(r.get("fine_epoch")), _floats(r.get("fine_loss"))))
        r["fine"] = bool(fine)
        r["points"] = fine or [(i + 1.0, v) for i, v in enumerate(r["curve"])]
    return list({_key(r): r for r in rows}.values())


def _key(r: dict) -> tuple:
    return (r["task"], r["optimizer"], float(r["lr"]), int(r["seed"]), int(r["epochs"]))


def _execute(jobs: list[tuple], path: str, n_workers: int) -> None:
    """Run ``jobs``, appending each finished run to the CSV at once (an interrupted study keeps them)."""
    if not jobs:
        return
    new = not os.path.exists(path)
    if not new and _read(path)[0] != FIELDS:  # an older header: rewrite the file with the current one
        header, rows = _read(path)
        with open(path + ".tmp", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(path + ".tmp", path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        results = map(_run, jobs) if n_workers <= 1 else ProcessPoolExecutor(n_workers).map(_run, jobs)
        for i, row in enumerate(results):
            w.writerow(row)
            fh.flush()
            print(f"[{i + 1}/{len(jobs)}] {row['task']} {row['optimizer']} lr={row['lr']:g} seed={row['seed']}: "
                  f"{row['status']} val={row['val_loss']:.4g} ({row['seconds']}s) {row['error']}", flush=True)


def _score(r: dict) -> float:
    return r["val_loss"] if r["status"] == "ok" and math.isfinite(r["val_loss"]) else math.inf


def _selected(rows: list[dict], task: str, opt: str, epochs: int) -> dict | None:
    sweep = [r for r in rows if r["task"] == task and r["optimizer"] == opt and r["seed"] == 0
             and r["epochs"] == epochs]
    best = min(sweep, key=_score, default=None)
    return best if best is not None and math.isfinite(_score(best)) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("sweep", "seeds", "defaults", "report", "all"), default="all")
    ap.add_argument("--rerun-coarse", action="store_true",
                    help="rerun scheduled runs whose CSV row has no sub-epoch curve (older runs)")
    ap.add_argument("--tasks", nargs="+", default=list(EPOCHS), choices=sorted(TASK_SPECS))
    ap.add_argument("--optimizers", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="perf/quality")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (CI): core optimizers, 1 epoch, 2 lrs")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    tasks, opts = args.tasks, args.optimizers
    epochs = dict(EPOCHS)
    grids = dict(GRIDS)
    if args.smoke:
        tasks, opts = list(SMOKE["tasks"]), list(SMOKE["optimizers"])
        epochs = {t: SMOKE["epochs"] for t in epochs}
        grids = {o: g[1:1 + SMOKE["grid"]] for o, g in grids.items()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.csv")
    env = {"date": datetime.date.today().isoformat(), "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "mbf_triton": __version__}
    def finished(rows: list[dict]) -> set:
        return {_key(r) for r in rows if r["fine"] or not args.rerun_coarse}

    if args.stage in ("sweep", "all"):
        done = finished(_load(path))
        jobs = [(t, o, lr, 0, epochs[t], env) for t in tasks for o in opts for lr in grids[o]
                if (t, o, lr, 0, epochs[t]) not in done]
        _execute(jobs, path, args.jobs)
    if args.stage in ("seeds", "all"):
        rows = _load(path)
        done = finished(rows)
        jobs = []
        for t in tasks:
            for o in opts:
                best = _selected(rows, t, o, epochs[t])
                if best is not None:
                    jobs += [(t, o, best["lr"], s, epochs[t], env) for s in range(args.seeds)
                             if (t, o, best["lr"], s, epochs[t]) not in done]
        _execute(jobs, path, args.jobs)
    if args.stage == "defaults":  # Adam's selected lr and Adam's default lr, for Adam and the candidates
        rows = _load(path)
        done = finished(rows)
        jobs = []
        for t in tasks:
            adam = _selected(rows, t, "adam", epochs[t])
            if adam is None:
                print(f"{t}: Adam's sweep has not run; no defaults runs", flush=True)
                continue
            for lr in dict.fromkeys((adam["lr"], ADAM_DEFAULT_LR)):
                jobs += [(t, o, lr, s, epochs[t], env) for s in range(args.seeds)
                         for o in dict.fromkeys(("adam", *opts)) if (t, o, lr, s, epochs[t]) not in done]
        _execute(sorted(jobs, key=lambda j: (j[3], j[1] != "adam")), path, args.jobs)
    from report import write_report  # noqa: E402  (matplotlib only where a report is written)

    write_report(_load(path), tasks, opts, epochs, grids, args.seeds, args.out, smoke=args.smoke,
                 default_lr=ADAM_DEFAULT_LR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
