"""The training-quality study's report: ``summary.md`` and one figure per task, from the runs in the CSV
(whatever stage the study has reached; what is missing is listed, nothing is filled in)."""

from __future__ import annotations

import math
import os
import statistics

ADAM = "adam"


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan)


def _fmt(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "-"
    m, s = _mean_sd(xs)
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else "")


def _mean_curve(runs: list[dict], key: str = "curve") -> list[float]:
    n = min(len(r[key]) for r in runs)
    return [statistics.fmean(r[key][i] for r in runs) for i in range(n)]


def _epochs_to(curve: list[float], target: float) -> float:
    return next((i + 1 for i, v in enumerate(curve) if v <= target * (1 + 1e-9)), math.inf)


def _score(r: dict) -> float:
    return r["val_loss"] if r["status"] == "ok" and math.isfinite(r["val_loss"]) else math.inf


def write_report(rows: list[dict], tasks: list[str], opts: list[str], epochs: dict, grids: dict, seeds: int,
                 out: str, smoke: bool = False) -> None:
    from mbf_triton.experiments import TASK_SPECS

    env = rows[0] if rows else {}
    md = ["# Training quality: MBF and its step-size options against first- and second-order peers", "",
          f"{env.get('date', '')}, {env.get('device', '')}, torch {env.get('torch', '')}, mbf_triton "
          f"{env.get('mbf_triton', '')}; one thread per run. Regenerate or extend: "
          "`python perf/train_quality.py --stage all --out perf/quality` (runs already in `runs.csv` are "
          "skipped)." + (" **SMOKE RUN: tiny settings, not results.**" if smoke else ""), "",
          "Selection: lowest final validation loss of each optimizer's 5-point lr grid (seed 0); the selected "
          "point rerun with more seeds. `div`: training loss non-finite or > 1e3; `err`: the optimizer raised. "
          "mean ± standard deviation over the seeds that ran.", ""]
    missing, verdict1, verdict2 = [], [], []
    for task in tasks:
        ep = epochs[task]
        mine = [r for r in rows if r["task"] == task and r["epochs"] == ep]
        spec = TASK_SPECS[task]
        md += [f"## {task} ({ep} epochs, batch {spec.batch_size}; test metric: {spec.metric})", "",
               "Sweep, seed 0: final validation loss per learning rate", "",
               "| optimizer | " + " | ".join(f"lr {i + 1}" for i in range(5)) + " |", "|---|" + "---|" * 5]
        selected: dict[str, list[dict]] = {}
        for o in opts:
            cells = []
            for lr in grids[o]:
                r = next((r for r in mine if r["optimizer"] == o and r["lr"] == lr and r["seed"] == 0), None)
                if r is None:
                    cells.append(f"{lr:g}: not run")
                    missing.append(f"{task}/{o}/lr={lr:g}")
                else:
                    cells.append(f"{lr:g}: " + {"ok": f"{r['val_loss']:.4f}", "diverged": "div"}.get(
                        r["status"], "err"))
            md.append(f"| {o} | " + " | ".join(cells) + " |")
            sweep = [r for r in mine if r["optimizer"] == o and r["seed"] == 0]
            best = min(sweep, key=_score, default=None)
            if best is not None and math.isfinite(_score(best)):
                runs = [r for r in mine if r["optimizer"] == o and r["lr"] == best["lr"] and r["status"] == "ok"]
                selected[o] = sorted(runs, key=lambda r: r["seed"])
                if len(runs) < seeds:
                    missing.append(f"{task}/{o}: {len(runs)} of {seeds} seeds")
        errors = [r for r in mine if r["status"] == "error"]
        if errors:
            md += ["", "Errors: " + "; ".join(f"{r['optimizer']} lr={r['lr']:g} seed {r['seed']}: {r['error']}"
                                               for r in errors)]
        adam = selected.get(ADAM)
        target = _mean_curve(adam)[-1] if adam else math.nan
        e_adam = _epochs_to(_mean_curve(adam), target) if adam else math.nan
        md += ["", f"Selected points (Adam's final mean training loss, the target: {target:.4f})", "",
               "| optimizer | lr | seeds | final train loss | val loss | test metric | s/run | epochs to target "
               "(x Adam's) | rank val | rank epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
        stats = {}
        for o, runs in selected.items():
            curve = _mean_curve(runs)
            e = _epochs_to(curve, target) if adam else math.inf
            stats[o] = (statistics.fmean(r["val_loss"] for r in runs), e)
        rank_val = {o: i + 1 for i, o in enumerate(sorted(stats, key=lambda o: stats[o][0]))}
        rank_ep = {o: i + 1 for i, o in enumerate(sorted(stats, key=lambda o: (stats[o][1], stats[o][0])))}
        for o, runs in selected.items():
            e = stats[o][1]
            ratio = e / e_adam if adam and math.isfinite(e) else math.inf
            md.append(f"| {o} | {runs[0]['lr']:g} | {len(runs)} | {_fmt([r['curve'][-1] for r in runs])} | "
                      f"{_fmt([r['val_loss'] for r in runs])} | {_fmt([r['test_metric'] for r in runs])} | "
                      f"{statistics.fmean(r['seconds'] for r in runs):.1f} | "
                      f"{e if math.isfinite(e) else 'never'} ({ratio:.2f}) | {rank_val[o]} | {rank_ep[o]} |")
        md += ["", f"![{task}]({task}.png)", ""]
        if selected:
            _plot(task, selected, os.path.join(out, f"{task}.png"))
        verdict1.append(_done_when_1(task, mine, selected, grids, spec.higher_is_better))
        verdict2.append((task, {o: (stats[o][1] / e_adam if adam and math.isfinite(stats[o][1]) else math.inf)
                                for o in stats if o.startswith("mbf")}, stats))
    md += ["## Done when", "", "1. `MBF(model, lr=<Adam's lr>, graft='adam')`, every other argument at its default "
           "(`mbf-graft`):", ""] + [f"   - {v}" for v in verdict1]
    met = []
    md += ["", "2. Tuned MBF (the MBF variant with the lowest validation loss) reaches Adam's final mean training "
           "loss in at most 0.7x Adam's epochs:", ""]
    for task, ratios, stats in verdict2:
        if not ratios:
            md.append(f"   - {task}: no MBF run selected")
            continue
        best = min(ratios, key=lambda o: stats[o][0])
        ok = ratios[best] <= 0.7
        met += [task] if ok else []
        md.append(f"   - {task}: {best}, ratio {ratios[best]:.2f} ({'met' if ok else 'not met'}); every variant: "
                  + ", ".join(f"{o} {r:.2f}" for o, r in ratios.items()))
    md += ["", f"   Tasks met: {len(met)} of {len(verdict2)} ({', '.join(met) or 'none'}); target: at least 3.", ""]
    md += ["## Not run", ""] + ([f"- {m}" for m in missing] or ["- nothing: every planned run is in the CSV"])
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {out}/summary.md ({len(rows)} runs in the CSV, {len(missing)} planned items missing)")


def _done_when_1(task: str, mine: list[dict], selected: dict, grids: dict, higher: bool) -> str:
    if ADAM not in selected or "mbf-graft" not in selected:
        return f"{task}: not evaluated (Adam's or mbf-graft's runs missing)"
    by = {(r["optimizer"], r["lr"]): r for r in mine if r["seed"] == 0}
    shared = [lr for lr in grids[ADAM] if (ADAM, lr) in by and ("mbf-graft", lr) in by]
    tolerated = [lr for lr in shared if by[(ADAM, lr)]["status"] == "ok"]
    bad = [lr for lr in tolerated if by[("mbf-graft", lr)]["status"] != "ok"]
    a, m = selected[ADAM], selected["mbf-graft"]
    fa, fm = statistics.fmean(r["curve"][-1] for r in a), statistics.fmean(r["curve"][-1] for r in m)
    ta, sa = _mean_sd([r["test_metric"] for r in a])
    tm = statistics.fmean(r["test_metric"] for r in m)
    better = tm >= ta if higher else tm <= ta
    within = better or (not math.isnan(sa) and abs(tm - ta) <= sa)
    lr_a = a[0]["lr"]
    at_adam = by.get(("mbf-graft", lr_a))
    at = (f"; at Adam's selected lr {lr_a:g} (seed 0) final train loss {at_adam['curve'][-1]:.4f} vs Adam's "
          f"{by[(ADAM, lr_a)]['curve'][-1]:.4f}" if at_adam and at_adam["curve"] else "")
    return (f"{task}: divergence where Adam trained: {bad or 'none'} ({len(tolerated)} lrs); final train loss "
            f"{fm:.4f} vs Adam {fa:.4f} ({'met' if fm <= fa else 'not met'}); test metric {tm:.4f} vs Adam "
            f"{ta:.4f} ± {sa:.4f} ({'met' if within else 'not met'}){at}")


def _plot(task: str, selected: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (o, runs) in enumerate(selected.items()):
        curve, times = _mean_curve(runs), _mean_curve(runs, "times")
        style = "-" if o.startswith("mbf") else "--"
        label = f"{o} (lr {runs[0]['lr']:g}, {len(runs)} seeds)"
        axes[0].plot(range(1, len(curve) + 1), curve, style, color=f"C{i % 10}", label=label)
        axes[1].plot(times, curve, style, color=f"C{i % 10}", label=o)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean over seeds)", yscale="log", title=task)
    axes[1].set(xlabel="training time (s, one CPU thread, log)", ylabel="training loss", xscale="log", yscale="log",
                title=f"{task}: per second")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
