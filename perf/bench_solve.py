"""Kernel benchmark: the fused Triton damped solve + update against torch's batched linalg paths.

What is timed, per block size ``b`` and number of mini-blocks ``n`` (fp32, damping 1e-2):

* ``triton``: ``damped_block_update_`` (default variant; ``tile ms`` / ``lane ms`` / ``rows ms``: each variant of
  :mod:`mbf_triton.kernels.block_update` at its default launch, checked first) on packed
  ``F (n, b(b+1)/2)``, ``grad``, ``param``, ``momentum`` ``(n, b)``: damping, Cholesky, both
  substitutions, diagonal fallback, momentum, weight decay and the parameter write, in one launch.
  Bytes moved: F read + grad read + param read/write + momentum read/write = ``4 n (b(b+1)/2 + 5b)``;
  GB/s and % of the measured copy rate use this count.
* vendor paths through torch on the dense damped matrices ``A = unpack(F) + damping I (n, b, b)``
  (unpacked and damped *outside* the timed region, which favours them), ``check_errors=False``:
  ``chol`` = ``cholesky_ex`` + ``cholesky_solve``; ``solve`` = ``linalg.solve_ex``; ``inv`` = ``inv_ex`` +
  ``bmm``. Each is timed twice: "solve only" (returns the direction) and "solve+apply" (plus the torch
  momentum / weight-decay / parameter update, the same work as the fused kernel). No diagonal fallback.
* ``reference``: what ``backend="torch"`` does (:class:`mbf_triton.backends.TorchBackend.block_update_`:
  unpack, Cholesky, fallback, apply), for information.

Speedup = best vendor "solve+apply" time / triton time (like for like); the more conservative ratio to
the best "solve only" time is printed too. Correctness of triton and of each vendor path against the
float64 reference is checked on a slice before anything is timed. Buffer sets are rotated so that the
data touched between two calls of the same set exceeds twice the L2 (and ``do_bench`` flushes the L2).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch

FULL_BS = (4, 9, 16, 25, 27, 32, 64)
FULL_BLOCKS = (10**3, 10**4, 10**5, 10**6, 10**7)
SMOKE_BS = (4, 9)
SMOKE_BLOCKS = (64, 256)
VENDOR = ("chol", "solve", "inv")
TARGET_BLOCKS = 10**6
TARGETS = {9: (10.0, 65.0), 16: (10.0, 65.0), 25: (10.0, 65.0), 27: (10.0, 65.0), 32: (10.0, 65.0), 64: (3.0, None)}
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4
MAX_SETS = 1024
BASE_BLOCKS = 1 << 16  # distinct random SPD blocks; larger problems tile them (timing is data independent)


def tril(b: int) -> int:
    return b * (b + 1) // 2


def blocks_str(n: int) -> str:
    e = round(math.log10(n)) if n > 0 else 0
    return f"10^{e}" if 10**e == n else str(n)


def fused_bytes(b: int, n: int) -> int:
    """Bytes the fused kernel must move: F read, grad read, param and momentum read + write (fp32)."""
    return 4 * n * (tril(b) + 5 * b)


@dataclass
class Case:
    b: int
    n: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--bs", type=int, nargs="+", default=None,
                   help=f"block sizes (default {FULL_BS}; smoke {SMOKE_BS})")
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help=f"numbers of mini-blocks (default {FULL_BLOCKS}; smoke {SMOKE_BLOCKS})")
    p.add_argument("--large-blocks", type=int, default=10**7,
                   help="block counts >= this are only run for b <= --large-b-max (time budget)")
    p.add_argument("--large-b-max", type=int, default=16)
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--check-blocks", type=int, default=1 << 15,
                   help="blocks checked against the float64 reference before timing")
    p.add_argument("--mem-fraction", type=float, default=0.6,
                   help="skip a size (or its vendor paths) whose estimated footprint exceeds this share "
                        "of free device memory")
    p.add_argument("--blocks-per-program", type=int, default=None, help="launch override for the kernel")
    p.add_argument("--num-warps", type=int, default=None, help="launch override for the kernel")
    p.add_argument("--time-budget-s", type=float, default=300.0,
                   help="start no new size after this many seconds (the rest is marked skipped)")
    p.add_argument("--no-vendor", action="store_true", help="time the Triton kernel only")
    p.add_argument("--no-reference", action="store_true", help="do not time the torch reference backend")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs
def random_spd_packed(n: int, b: int, device: torch.device, seed: int) -> torch.Tensor:
    """``n`` packed SPD blocks ``X X^T / 2b`` with ``X`` ``(b, 2b)``: eigenvalues in about [0.09, 2.9]."""
    from mbf_triton import reference as ref

    g = torch.Generator(device=device).manual_seed(seed)
    base = min(n, BASE_BLOCKS)
    x = torch.randn(base, b, 2 * b, device=device, generator=g)
    packed = ref.pack_tril(torch.bmm(x, x.transpose(1, 2)).div_(2 * b))
    del x
    if base == n:
        return packed.contiguous()
    reps = -(-n // base)
    return packed.repeat(reps, 1)[:n].contiguous()


def n_sets_for(set_bytes: int, device: torch.device) -> int:
    """Enough rotating buffer sets that the data between two uses of one set exceeds twice the L2."""
    if device.type != "cuda":
        return 2  # exercise the rotation in smoke mode
    return max(1, min(MAX_SETS, math.ceil(2 * common.l2_bytes(device) / max(set_bytes, 1))))


class Rotating:
    """Call ``fn(k)`` with ``k`` cycling over ``n`` buffer sets."""

    def __init__(self, fn, n: int) -> None:
        self.fn, self.n, self.k = fn, n, 0

    def __call__(self) -> Any:
        k = self.k
        self.k = (k + 1) % self.n
        return self.fn(k)


# ---------------------------------------------------------------------------------------------- paths
def vendor_solve(path: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Direction ``A^{-1} g`` for dense ``a (n, b, b)``, ``g (n, b)`` by one torch batched path."""
    rhs = g.unsqueeze(-1)
    if path == "chol":
        chol, _ = torch.linalg.cholesky_ex(a, check_errors=False)
        return torch.cholesky_solve(rhs, chol).squeeze(-1)
    if path == "solve":
        d, _ = torch.linalg.solve_ex(a, rhs, check_errors=False)
        return d.squeeze(-1)
    if path == "inv":
        inv, _ = torch.linalg.inv_ex(a, check_errors=False)
        return torch.bmm(inv, rhs).squeeze(-1)
    raise ValueError(f"path={path!r} must be one of {VENDOR}")


def torch_apply_(p: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> None:
    m.mul_(MOMENTUM).add_(d)
    p.mul_(1.0 - LR * WEIGHT_DECAY).add_(m, alpha=-LR)


def check_case(b: int, f: torch.Tensor, g: torch.Tensor, p: torch.Tensor, m: torch.Tensor, damping: float,
               kernel_kw: dict[str, Any], vendor: bool) -> dict[str, float]:
    """Max relative errors of triton (param and momentum) and of each vendor direction vs float64."""
    from mbf_triton.kernels.block_update import damped_block_update_

    from mbf_triton import reference as ref

    d64, _ = ref.damped_block_solve(f.double(), g.double(), damping)
    p64, m64 = p.double(), m.double()
    ref.apply_update_(p64, d64, m64, LR, MOMENTUM, WEIGHT_DECAY)
    pt, mt = p.clone(), m.clone()
    count = torch.zeros(1, dtype=torch.int32, device=f.device)
    damped_block_update_(f, g, pt, mt, count, b=b, damping=damping, lr=LR, momentum=MOMENTUM,
                         weight_decay=WEIGHT_DECAY, **kernel_kw)

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x.double() - y).abs() / (y.abs() + 1e-3)).max())

    errs = {"triton_err": max(rel(pt, p64), rel(mt, m64)), "triton_fallbacks": float(count.item())}
    if vendor:
        a = ref.unpack_tril(f, b)
        a.diagonal(dim1=-2, dim2=-1).add_(damping)
        for path in VENDOR:
            errs[f"{path}_err"] = rel(vendor_solve(path, a, g), d64)
    return errs


def run_case(case: Case, args: argparse.Namespace, device: torch.device, copy_gbs: float,
             seed: int) -> dict[str, Any]:
    from mbf_triton.kernels.block_update import damped_block_update_

    from mbf_triton import reference as ref
    from mbf_triton.backends import TorchBackend

    b, n = case.b, case.n
    t = tril(b)
    row: dict[str, Any] = {"b": b, "blocks": n, "bytes": fused_bytes(b, n), "copy_gbs": copy_gbs,
                           "floor_ms": fused_bytes(b, n) / (copy_gbs * 1e9) * 1e3}
    set_bytes = 4 * n * (t + 3 * b)
    sets = n_sets_for(set_bytes, device)
    budget = args.mem_fraction * common.free_bytes(device)
    if sets * set_bytes + 8 * n * t > budget:
        row["status"] = "skipped (memory)"
        return row
    row["sets"] = sets

    f_all = random_spd_packed(sets * n, b, device, seed).view(sets, n, t)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    g_all = torch.randn(sets, n, b, device=device, generator=gen)
    p_all = torch.randn(sets, n, b, device=device, generator=gen)
    m_all = torch.randn(sets, n, b, device=device, generator=gen).mul_(0.1)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    kernel_kw = {"blocks_per_program": args.blocks_per_program, "num_warps": args.num_warps}

    dense_bytes = 4 * n * b * b
    vendor_ok = not args.no_vendor and sets * set_bytes + 4 * dense_bytes <= budget
    # ---- correctness first, on a slice of the first set
    c = min(n, args.check_blocks)
    errs = check_case(b, f_all[0, :c], g_all[0, :c], p_all[0, :c], m_all[0, :c], args.damping, kernel_kw,
                      vendor_ok)
    row.update(errs)
    tol = 1e-3
    bad = [k for k, v in errs.items() if k.endswith("_err") and not v <= tol]
    if bad:
        row["status"] = "WRONG: " + ",".join(bad)
        return row

    # ---- triton
    def fused(k: int) -> None:
        damped_block_update_(f_all[k], g_all[k], p_all[k], m_all[k], count, b=b, damping=args.damping, lr=LR,
                             momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **kernel_kw)

    timing = {"device": device, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    row["triton_ms"] = common.bench_ms(Rotating(fused, sets), **timing)
    row["triton_gbs"] = row["bytes"] / (row["triton_ms"] * 1e-3) / 1e9
    row["pct_copy"] = 100.0 * row["triton_gbs"] / copy_gbs

    # ---- every kernel variant at its default launch (checks perf/kernel_model.py's predictions)
    if args.blocks_per_program is None and args.num_warps is None:
        from mbf_triton.kernels.block_update import LANE_MAX_B, VARIANTS, default_variant

        row["triton_variant"] = default_variant(b)
        for variant in VARIANTS:
            if (variant == "lane" and not 2 <= b <= LANE_MAX_B) or (variant == "rows" and b <= LANE_MAX_B):
                continue  # rows for b <= 16: not a candidate (lane is at the floor), and minutes to compile
            verr = check_case(b, f_all[0, :c], g_all[0, :c], p_all[0, :c], m_all[0, :c], args.damping,
                              {"variant": variant}, False)["triton_err"]
            row[f"triton_{variant}_err"] = verr
            if not verr <= tol:
                row[f"triton_{variant}_ms"] = math.nan
                continue

            def fused_variant(k: int, variant: str = variant) -> None:
                damped_block_update_(f_all[k], g_all[k], p_all[k], m_all[k], count, b=b, damping=args.damping,
                                     lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, variant=variant)

            row[f"triton_{variant}_ms"] = common.bench_ms(Rotating(fused_variant, sets), **timing)

    # ---- vendor paths on dense damped copies (built here, outside any timed region)
    if vendor_ok:
        dsets = n_sets_for(dense_bytes + 4 * n * b, device) if device.type == "cuda" else 2
        dsets = min(dsets, sets, max(1, int((budget - sets * set_bytes - 3 * dense_bytes) // dense_bytes)))
        a_all = torch.empty(dsets, n, b, b, device=device)
        for k in range(dsets):
            a_all[k] = ref.unpack_tril(f_all[k], b)
            a_all[k].diagonal(dim1=-2, dim2=-1).add_(args.damping)
        row["dense_sets"] = dsets
        for path in VENDOR:
            def solve_only(k: int, path: str = path) -> torch.Tensor:
                return vendor_solve(path, a_all[k % dsets], g_all[k])

            def solve_apply(k: int, path: str = path) -> None:
                torch_apply_(p_all[k], m_all[k], vendor_solve(path, a_all[k % dsets], g_all[k]))

            row[f"{path}_ms"] = common.bench_ms(Rotating(solve_only, sets), **timing)
            row[f"{path}_apply_ms"] = common.bench_ms(Rotating(solve_apply, sets), **timing)
        del a_all
        best_apply = min(VENDOR, key=lambda v: row[f"{v}_apply_ms"])
        best_solve = min(VENDOR, key=lambda v: row[f"{v}_ms"])
        row["best_vendor"] = best_apply
        row["speedup"] = row[f"{best_apply}_apply_ms"] / row["triton_ms"]
        row["speedup_vs_solve_only"] = row[f"{best_solve}_ms"] / row["triton_ms"]
    elif not args.no_vendor:
        row["vendor_status"] = "skipped (memory)"

    # ---- the torch reference backend (unpack + Cholesky + fallback + apply), for information
    if not args.no_reference and sets * set_bytes + 5 * dense_bytes <= budget:
        backend = TorchBackend()

        def reference(k: int) -> None:
            backend.block_update_(f_all[k], g_all[k], p_all[k], m_all[k], count, b=b, damping=args.damping,
                                  lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        row["reference_ms"] = common.bench_ms(Rotating(reference, sets), **timing)
    row["status"] = verdict(row)
    return row


def verdict(row: dict[str, Any]) -> str:
    """PASS/MISS against the kernel targets (only defined at 10^6 blocks), else 'ok'."""
    target = TARGETS.get(row["b"])
    if row["blocks"] != TARGET_BLOCKS or target is None or "triton_ms" not in row:
        return "ok"
    min_speedup, min_pct = target
    if "speedup" not in row:
        return "ok (no vendor timing)"
    good = row["speedup"] >= min_speedup and (min_pct is None or row["pct_copy"] >= min_pct)
    want = f">={min_speedup:g}x" + (f", >={min_pct:g}% copy" if min_pct is not None else "")
    return ("PASS " if good else "MISS ") + want


# ---------------------------------------------------------------------------------------------- output
def plot(rows: list[dict[str, Any]], path: Path, env: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in sorted({r["b"] for r in rows}):
        rs = [r for r in rows if r["b"] == b and "triton_ms" in r]
        if not rs:
            continue
        xs = [r["blocks"] for r in rs]
        ys = [r.get("speedup", math.nan) for r in rs]
        ax1.plot(xs, ys, marker="o", label=f"b={b}")
        ax2.plot(xs, [r["pct_copy"] for r in rs], marker="o", label=f"b={b}")
    ax1.set(xscale="log", yscale="log", xlabel="mini-blocks",
            ylabel="speedup vs best torch.linalg (solve+apply)", title="fused Triton solve+update")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.axhline(10.0, color="grey", lw=0.8, ls="--")
    ax2.set(xscale="log", xlabel="mini-blocks", ylabel="% of measured copy bandwidth",
            title="Triton bytes moved / time")
    ax2.axhline(65.0, color="grey", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return common.save_figure(fig, path, env)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["b", "blocks", "triton ms", "tile ms", "lane ms", "rows ms", "chol ms", "solve ms", "inv ms",
              "best+apply ms", "ref ms", "GB/s", "% copy", "speedup", "vs solve-only", "target"]
    out = []
    for r in rows:
        best = r.get("best_vendor")
        out.append([r["b"], blocks_str(r["blocks"]), r.get("triton_ms", math.nan),
                    r.get("triton_tile_ms", math.nan), r.get("triton_lane_ms", math.nan),
                    r.get("triton_rows_ms", math.nan),
                    *(r.get(f"{v}_ms", math.nan) for v in VENDOR),
                    r.get(f"{best}_apply_ms", math.nan) if best else math.nan,
                    r.get("reference_ms", math.nan),
                    r.get("triton_gbs", math.nan), r.get("pct_copy", math.nan), r.get("speedup", math.nan),
                    r.get("speedup_vs_solve_only", math.nan), r.get("status", "")])
    return common.format_table(out, header)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.start(args.smoke)
    mode = "smoke" if args.smoke else "full"
    bs = args.bs or (SMOKE_BS if args.smoke else FULL_BS)
    blocks = args.blocks or (SMOKE_BLOCKS if args.smoke else FULL_BLOCKS)
    if args.smoke:
        args.check_blocks = min(args.check_blocks, 256)
    env = common.environment(device, mode)
    print(common.env_banner(env), flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the vendor paths must solve in fp32 like the kernel

    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s (read + written bytes / median time)", flush=True)
    cases = [Case(b, n) for b in bs for n in blocks if n < args.large_blocks or b <= args.large_b_max]
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "solve.csv"
    t_start = time.perf_counter()
    bar = common.progress(cases, total=len(cases), desc="solve sweep", disable=args.no_progress)
    for i, case in enumerate(bar):
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"b={case.b} n={blocks_str(case.n)}")
        if time.perf_counter() - t_start > args.time_budget_s:
            rows.append({"b": case.b, "blocks": case.n, "status": "skipped (time budget)"})
        else:
            rows.append(run_case(case, args, device, copy_gbs, seed=1000 + i))
        if args.no_progress:
            r = rows[-1]
            print(f"b={case.b} n={blocks_str(case.n)} triton={r.get('triton_ms', math.nan):.4g} ms "
                  f"speedup={r.get('speedup', math.nan):.3g} {r.get('status', '')} "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        common.write_csv(csv_path, rows, env)  # after every case: a killed run keeps what it measured
        if device.type == "cuda":
            torch.cuda.empty_cache()

    png_path = plot(rows, args.out / "solve_speedup.png", env)
    text = table(rows)
    summary = (f"## Kernel sweep ({mode}) — {env['date']}, {env['device']}, torch {env['torch']}, "
               f"triton {env['triton']}, linalg {env['linalg']}\n\ncopy bandwidth {copy_gbs:.1f} GB/s; "
               "ms = median; speedup = best vendor solve+apply / triton; targets at 10^6 blocks.\n\n"
               + text + "\n")
    (args.out / "solve_summary.md").write_text(summary)
    print("\n" + summary)
    print(f"wrote {csv_path} and {png_path}")
    return 1 if any(str(r.get("status", "")).startswith("WRONG") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
