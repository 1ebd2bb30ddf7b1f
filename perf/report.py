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


def _mean_points(runs: list[dict]) -> tuple[list[tuple[float, float]], bool]:
    """The mean training-loss curve over ``runs`` as (epoch, loss) points, and whether it is sub-epoch
    (every run has sub-epoch points; else the epoch ends of all)."""
    fine = all(r["fine"] for r in runs)
    pts = [r["points"] if fine else [(i + 1.0, v) for i, v in enumerate(r["curve"])] for r in runs]
    n = min(len(p) for p in pts)
    return [(pts[0][i][0], statistics.fmean(p[i][1] for p in pts)) for i in range(n)], fine


def _epochs_to(points: list[tuple[float, float]], target: float) -> float:
    """The first evaluation point (in epochs) whose loss is <= target (no interpolation), or inf."""
    return next((e for e, v in points if v <= target * (1 + 1e-9)), math.inf)


def _final(runs: list[dict]) -> float:
    return statistics.fmean(r["curve"][-1] for r in runs)


def _epochs_cell(e: float, ratio: float, fine: bool) -> str:
    return (f"{e:.1f}" if math.isfinite(e) else "never") + ("" if fine else "*") + f" ({ratio:.2f})"


def _score(r: dict) -> float:
    return r["val_loss"] if r["status"] == "ok" and math.isfinite(r["val_loss"]) else math.inf


def write_report(rows: list[dict], tasks: list[str], opts: list[str], epochs: dict, grids: dict, seeds: int,
                 out: str, smoke: bool = False, default_lr: float = 1e-3) -> None:
    from mbf_triton.experiments import TASK_SPECS

    env = rows[0] if rows else {}
    md = ["# Training quality: MBF and its step-size options against first- and second-order peers", "",
          f"{env.get('date', '')}, {env.get('device', '')}, torch {env.get('torch', '')}, mbf_triton "
          f"{env.get('mbf_triton', '')}; one thread per run. Regenerate or extend: "
          "`python perf/train_quality.py --stage all --out perf/quality` (runs already in `runs.csv` are "
          "skipped)." + (" **SMOKE RUN: tiny settings, not results.**" if smoke else ""), "",
          "Selection: lowest final validation loss of each optimizer's 5-point lr grid (seed 0); the selected "
          "point rerun with more seeds. `div`: training loss non-finite or > 1e3; `err`: the optimizer raised. "
          "mean ± standard deviation over the seeds that ran. Training loss: the whole training set's loss, "
          "evaluated 5 times per epoch at evenly spaced steps; \"epochs to target\" is the first evaluation "
          "point at or below the target (no interpolation); `*`: a run from before sub-epoch curves, "
          "resolution one epoch.", ""]
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
        target = _final(adam) if adam else math.nan
        e_adam = _epochs_to(_mean_points(adam)[0], target) if adam else math.nan
        md += ["", f"Selected points (Adam's final mean training loss, the target: {target:.4f})", "",
               "| optimizer | lr | seeds | final train loss | val loss | test metric | s/run | epochs to target "
               "(x Adam's) | rank val | rank epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
        stats = {}
        for o, runs in selected.items():
            points, fine = _mean_points(runs)
            e = _epochs_to(points, target) if adam else math.inf
            stats[o] = (statistics.fmean(r["val_loss"] for r in runs), e, fine)
        rank_val = {o: i + 1 for i, o in enumerate(sorted(stats, key=lambda o: stats[o][0]))}
        rank_ep = {o: i + 1 for i, o in enumerate(sorted(stats, key=lambda o: (stats[o][1], stats[o][0])))}
        for o, runs in selected.items():
            e = stats[o][1]
            ratio = e / e_adam if adam and math.isfinite(e) else math.inf
            md.append(f"| {o} | {runs[0]['lr']:g} | {len(runs)} | {_fmt([r['curve'][-1] for r in runs])} | "
                      f"{_fmt([r['val_loss'] for r in runs])} | {_fmt([r['test_metric'] for r in runs])} | "
                      f"{statistics.fmean(r['seconds'] for r in runs):.1f} | "
                      f"{_epochs_cell(e, ratio, stats[o][2])} | {rank_val[o]} | {rank_ep[o]} |")
        if adam:
            lines, verdicts = _defaults(task, mine, opts, grids, adam[0]["lr"], default_lr, spec.higher_is_better)
            md += lines
            verdict1 += verdicts
        md += ["", f"![{task}]({task}.png)", ""]
        if selected:
            _plot(task, selected, os.path.join(out, f"{task}.png"))
        verdict2.append((task, {o: (stats[o][1] / e_adam if adam and math.isfinite(stats[o][1]) else math.inf)
                                for o in stats if o.startswith("mbf")}, stats))
    md += ["## Done when", "", "1. `MBF(model, lr=<Adam's lr>, **candidate)`, every other argument at its default, "
           "against Adam at the same lr: no divergence where Adam trained on its grid (seed 0), final training "
           "loss <= Adam's (means), test metric within one sd of Adam's or better:", ""]
    md += [f"   - {v}" for v in sorted(verdict1)]
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
        md.append(f"   - {task}: {best}, ratio {ratios[best]:.2f}{'' if stats[best][2] else '*'} "
                  f"({'met' if ok else 'not met'}); every variant: "
                  + ", ".join(f"{o} {r:.2f}{'' if stats[o][2] else '*'}" for o, r in ratios.items()))
    md += ["", f"   Tasks met: {len(met)} of {len(verdict2)} ({', '.join(met) or 'none'}); target: at least 3.", ""]
    md += ["## Not run", ""] + ([f"- {m}" for m in missing] or ["- nothing: every planned run is in the CSV"])
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {out}/summary.md ({len(rows)} runs in the CSV, {len(missing)} planned items missing)")


def _defaults(task: str, mine: list[dict], opts: list[str], grids: dict, lr_adam: float, lr_default: float,
              higher: bool) -> tuple[list[str], list[str]]:
    """The table of the MBF variants at Adam's selected lr and at Adam's default lr beside Adam's runs at the
    same lr, and one verdict line per (variant, lr) on the issue's first condition."""
    by_seed0 = {(r["optimizer"], r["lr"]): r for r in mine if r["seed"] == 0}
    tolerated = [lr for lr in grids[ADAM] if (ADAM, lr) in by_seed0 and by_seed0[(ADAM, lr)]["status"] == "ok"]
    lines = ["", f"MBF at Adam's lr (selected {lr_adam:g}; default {lr_default:g}), every other argument at its "
             "default, beside Adam at the same lr", "",
             "| optimizer | lr | seeds | final train loss | val loss | test metric | epochs to Adam's final loss "
             "(x Adam's) | div. on Adam's grid | train <= Adam | metric within 1 sd |", "|---|" + "---|" * 9]
    verdicts = []
    for lr in dict.fromkeys((lr_adam, lr_default)):
        adam = sorted((r for r in mine if r["optimizer"] == ADAM and r["lr"] == lr and r["status"] == "ok"),
                      key=lambda r: r["seed"])
        if not adam:
            continue
        target = _final(adam)
        a_points, a_fine = _mean_points(adam)
        e_adam = _epochs_to(a_points, target)
        ta, sa = _mean_sd([r["test_metric"] for r in adam])
        lines.append(f"| adam | {lr:g} | {len(adam)} | {_fmt([r['curve'][-1] for r in adam])} | "
                     f"{_fmt([r['val_loss'] for r in adam])} | {_fmt([r['test_metric'] for r in adam])} | "
                     f"{_epochs_cell(e_adam, 1.0, a_fine)} | | | |")
        for o in opts:
            runs = sorted((r for r in mine if r["optimizer"] == o and r["lr"] == lr), key=lambda r: r["seed"])
            if not o.startswith("mbf") or not runs:
                continue
            ok = [r for r in runs if r["status"] == "ok"]
            grid = [by_seed0.get((o, g)) for g in tolerated]
            div = [f"{g:g}" for g, r in zip(tolerated, grid) if r is not None and r["status"] != "ok"]
            ran = sum(r is not None for r in grid)
            div_cell = (", ".join(div) or "none") + (f" ({ran} of {len(tolerated)} run)"
                                                     if ran < len(tolerated) else "")
            if len(ok) < len(runs):
                lines.append(f"| {o} | {lr:g} | {len(runs)} | {len(runs) - len(ok)} diverged/failed | | | | "
                             f"{div_cell} | no | no |")
                verdicts.append(f"{o} @ {lr:g}, {task}: diverged or failed at this lr (not met)")
                continue
            fm = _final(ok)
            tm = statistics.fmean(r["test_metric"] for r in ok)
            within = (tm >= ta if higher else tm <= ta) or (not math.isnan(sa) and abs(tm - ta) <= sa)
            points, fine = _mean_points(ok)
            e = _epochs_to(points, target)
            lines.append(f"| {o} | {lr:g} | {len(ok)} | {_fmt([r['curve'][-1] for r in ok])} | "
                         f"{_fmt([r['val_loss'] for r in ok])} | {_fmt([r['test_metric'] for r in ok])} | "
                         f"{_epochs_cell(e, e / e_adam, fine and a_fine)} | {div_cell} | "
                         f"{'yes' if fm <= target else 'no'} | {'yes' if within else 'no'} |")
            verdicts.append(f"{o} @ {lr:g}, {task} ({len(ok)} seeds): divergence where Adam trained: "
                            f"{div_cell}; final train loss {fm:.4f} vs Adam {target:.4f} "
                            f"({'met' if fm <= target else 'not met'}); test metric {tm:.4f} vs Adam {ta:.4f} ± "
                            f"{sa:.4f} ({'met' if within else 'not met'})")
    return lines, verdicts


def _plot(task: str, selected: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (o, runs) in enumerate(selected.items()):
        curve, times = _mean_curve(runs), _mean_curve(runs, "times")
        points, fine = _mean_points(runs)
        style = "-" if o.startswith("mbf") else "--"
        label = f"{o} (lr {runs[0]['lr']:g}, {len(runs)} seeds{'' if fine else ', per epoch'})"
        axes[0].plot([e for e, _ in points], [v for _, v in points], style, color=f"C{i % 10}", label=label)
        axes[1].plot(times, curve[:len(times)], style, color=f"C{i % 10}", label=o)
    axes[0].set(xlabel="epoch (5 evaluations per epoch)", ylabel="training loss (mean over seeds)", yscale="log",
                title=task)
    axes[1].set(xlabel="training time (s, one CPU thread, log)", ylabel="training loss", xscale="log", yscale="log",
                title=f"{task}: per second")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
