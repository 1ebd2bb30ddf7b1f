"""Data-parallel MBF: a small CNN on scikit-learn's bundled digits, under DDP or FSDP2.

    torchrun --nproc-per-node=2 examples/data_parallel.py                      # DDP, curvature replicated
    torchrun --nproc-per-node=2 examples/data_parallel.py --shard-curvature    # DDP, curvature sharded
    torchrun --nproc-per-node=2 examples/data_parallel.py --fsdp               # FSDP2 (fully_shard)
    torchrun --nproc-per-node=2 examples/data_parallel.py --fsdp --graft adam  # any mode: Adam-grafted steps

gloo on CPUs, NCCL on GPUs (one GPU per process). Every rank trains on its own part of each global
batch; MBF averages the curvature statistics across the ranks, so the run is the single-process
algorithm on the global batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from mbf_triton import MBF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--shard-curvature", action="store_true", help="DDP: each rank keeps 1/world of F")
    ap.add_argument("--graft", choices=("none", "adam", "sgd"), default="none",
                    help="step-size grafting (mbf_triton.stepsize); 'none' is the paper's step")
    ap.add_argument("--kl-clip", type=float, default=None, help="trust region on the step (K-FAC's KL clipping)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--check-parity", action="store_true",
                    help="rank 0 also trains one process on the whole global batch and compares the parameters")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    def make_model() -> nn.Module:
        torch.manual_seed(0)  # the same initial model on every rank
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.LayerNorm(8 * 8 * 8), nn.Linear(8 * 8 * 8, 10),
        ).to(device)

    hyper = dict(lr=0.01, damping=0.03, stat_every=5, graft=None if args.graft == "none" else args.graft,
                 kl_clip=args.kl_clip)
    if hyper["graft"] == "adam":
        hyper["lr"] = 1e-3  # Adam's learning rate
    model = make_model()
    single = single_opt = None
    if args.check_parity and rank == 0:  # one process on the pooled batch, no communication
        single = make_model()
        single_opt = MBF(single, **hyper, process_group=None)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
        opt = MBF(model, **hyper)
    else:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        opt = MBF(model, **hyper, shard_curvature=args.shard_curvature)

    local = args.global_batch // world
    n = (len(x) // args.global_batch) * args.global_batch
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))[:n]
        total = torch.zeros(2, device=device)
        for i in range(0, n, args.global_batch):
            idx = perm[i + rank * local:i + (rank + 1) * local]  # this rank's part of the global batch
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(idx), torch.tensor(float(len(idx)), device=device)])
            if single is not None:
                ids = perm[i:i + args.global_batch]
                single_opt.zero_grad()
                nn.functional.cross_entropy(single(x[ids].to(device)), y[ids].to(device)).backward()
                single_opt.step()
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: mean training loss {total[0].item() / total[1].item():.4f} "
                  f"(world {world}, {'fsdp' if args.fsdp else 'ddp'}"
                  f"{', sharded curvature' if args.shard_curvature else ''}"
                  f"{f', graft={args.graft}' if args.graft != 'none' else ''}; steps {opt.steps}, "
                  f"skipped {opt.skipped_steps})")
    if args.check_parity:
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        params = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in inner.state_dict().items()}
        if rank == 0:
            ref = single.state_dict()
            err = max(((params[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
            print(f"parity with one process on the global batch: max relative parameter difference {err:.2e}")
    sd = opt.state_dict()  # every rank calls it: the sharded modes gather the curvature
    if rank == 0:
        f_numel = sum(s["F"].numel() for s in sd["state"].values())
        print(f"checkpoint: whole curvature of {f_numel} fp32 entries, loads on any rank or in one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
