"""Bytes each data-parallel mode communicates, and the curvature memory per rank: arithmetic from the layouts.

    python perf/distributed_comm.py [--world 2 8] [--out perf/out]

For ResNet-32 and VGG-16 (perf/models.py, fp32 parameters), per rank and per step, what a ring collective
sends (all-reduce ``2 (W-1)/W S``, reduce-scatter and all-gather ``(W-1)/W S`` of a buffer of ``S``
bytes, padded to ``W`` equal segments where the mode pads):

* ``ddp grad all-reduce``: DDP's own gradient all-reduce, the yardstick (every step, every mode on DDP);
* ``replicated``: MBF's statistics all-reduce (statistics steps only; the bucket holds the packed ``Fhat``
  of every parameter with per-sample data, i.e. the Linear/conv weights and biases; norm scales use the
  already averaged gradient);
* ``sharded``: the statistics reduce-scatter (statistics steps) plus the all-gather of the updated
  parameters (every step), on top of DDP's all-reduce;
* ``fsdp``: the statistics reduce-scatter of the dim-0 shards (statistics steps) plus a 4-byte skip flag
  all-reduce (every step), on top of FSDP2's own parameter all-gather and gradient reduce-scatter.

Per-rank ``F`` memory: the packed fp32 curvature each rank keeps (the largest rank in the sharded modes);
the momentum (fp32, parameter-sized) shrinks the same way. Nothing here is timed or measured: the numbers
follow from the mini-block layouts and the partition code that the optimizer itself uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import resnet32, vgg16  # noqa: E402

from mbf_triton import MBF  # noqa: E402
from mbf_triton.distributed import contiguous_slices, dim0_slices  # noqa: E402

MB = 1e6


def layouts(model: torch.nn.Module) -> list[tuple[torch.Tensor, object, bool]]:
    """(parameter, layout, has per-sample statistics) for every trainable parameter, in optimizer order."""
    opt = MBF(model, process_group=None, backend="torch")
    out = [(p, opt.layout(p), opt._capture.module_of(p) is not None) for p in opt.param_groups[0]["params"]]
    opt.remove_hooks()
    return out


def report(model: torch.nn.Module, world: int) -> dict[str, float]:
    """Bytes per rank and step (ring algorithms) and per-rank ``F`` bytes, for ``world`` ranks."""
    items = layouts(model)
    fp32 = 4
    ring = (world - 1) / world
    grad = sum(p.numel() for p, _, _ in items) * fp32
    f_total = sum(lay.curvature_numel for _, lay, _ in items) * fp32
    bucket = sum(lay.curvature_numel for _, lay, shared in items if shared) * fp32

    def padded(slices_of, per_row_of, filt) -> tuple[float, list[float]]:
        """(the padded buffer: world x the largest segment, each rank's segment) in bytes."""
        seg = [0.0] * world
        for (p, lay, shared), rows in zip(items, slices_of):
            if filt(shared):
                for r, (lo, hi) in enumerate(rows):
                    seg[r] += (hi - lo) * per_row_of(p, lay) * fp32
        return world * max(seg), seg

    def f_rows(p, lay):
        return lay.n_chunks * lay.tri

    def p_rows(p, lay):
        return lay.cols

    sharded = contiguous_slices([lay for _, lay, _ in items], world)
    fsdp = [dim0_slices(p.shape[0], lay, world) for p, lay, _ in items]
    stats_sharded, _ = padded(sharded, f_rows, lambda shared: shared)
    params_sharded, _ = padded(sharded, p_rows, lambda shared: True)
    _, f_sharded = padded(sharded, f_rows, lambda shared: True)
    stats_fsdp, _ = padded(fsdp, f_rows, lambda shared: shared)
    _, f_fsdp = padded(fsdp, f_rows, lambda shared: True)
    return {
        "params_M": sum(p.numel() for p, _, _ in items) / 1e6,
        "ddp_allreduce": 2 * ring * grad,
        "fsdp_own": 2 * ring * grad,  # parameter all-gather + gradient reduce-scatter (no re-gather in backward)
        "replicated_stats": 2 * ring * bucket,
        "replicated_plain": 0.0,
        "sharded_stats": ring * stats_sharded + ring * params_sharded,
        "sharded_plain": ring * params_sharded,
        "fsdp_stats": ring * stats_fsdp + ring * world * fp32,
        "fsdp_plain": ring * world * fp32,
        "f_replicated": f_total,
        "f_sharded": max(f_sharded),
        "f_fsdp": max(f_fsdp),
        "bucket": bucket,
        # graft / kl_clip with sharded curvature or FSDP2: one all-reduce of at most 3 fp32 sums per tensor
        "stepsize_sums": 2 * ring * 3 * fp32 * len(items),
    }


def table(worlds: list[int]) -> str:
    lines = [
        "Data-parallel MBF: bytes sent per rank per step (ring algorithms) and per-rank curvature memory.",
        "ARITHMETIC FROM THE MINI-BLOCK LAYOUTS, not a measurement; fp32 parameters; 'extra' is what MBF adds",
        "to the data-parallel wrapper's own traffic (DDP: gradient all-reduce; FSDP2: parameter all-gather +",
        "gradient reduce-scatter, counted once per step).",
        "",
        "| model | W | DDP grad all-reduce MB | replicated extra: stats step / plain step MB | sharded extra: stats / "
        "plain MB | FSDP2 own MB | FSDP2 extra: stats / plain MB | F per rank MB: replicated / sharded / FSDP2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, build in (("ResNet-32", resnet32), ("VGG-16", vgg16)):
        for w in worlds:
            r = report(build(), w)
            lines.append(
                f"| {name} ({r['params_M']:.2f} M params) | {w} | {r['ddp_allreduce'] / MB:.2f} | "
                f"{r['replicated_stats'] / MB:.2f} ({r['replicated_stats'] / r['ddp_allreduce']:.2f}x) / 0 | "
                f"{r['sharded_stats'] / MB:.2f} / {r['sharded_plain'] / MB:.2f} | {r['fsdp_own'] / MB:.2f} | "
                f"{r['fsdp_stats'] / MB:.2f} / {r['fsdp_plain']:.0f} B | "
                f"{r['f_replicated'] / MB:.2f} / {r['f_sharded'] / MB:.2f} / {r['f_fsdp'] / MB:.2f} |"
            )
    lines += ["", "With stat_every=k, MBF's average extra per step is the statistics-step figure / k (plus the "
              "plain-step figure).", "",
              "Step-size options (graft, kl_clip) add, with sharded curvature and FSDP2, one all-reduce of at most "
              "3 fp32 sums per parameter tensor every step (none replicated):"]
    for name, build in (("ResNet-32", resnet32), ("VGG-16", vgg16)):
        lines.append(f"- {name}: " + ", ".join(f"W={w}: {report(build(), w)['stepsize_sums']:.0f} B" for w in worlds))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 8], help="numbers of ranks (default: 2 8)")
    ap.add_argument("--out", type=Path, default=None, help="also write distributed_comm.md here")
    args = ap.parse_args(argv)
    if any(w < 1 for w in args.world):
        ap.error(f"--world must be >= 1, got {args.world}")
    text = table(args.world)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distributed_comm.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
