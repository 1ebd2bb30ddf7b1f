"""Data-parallel MBF (mbf_triton.distributed): 2 processes on gloo (CPU) against one process training on
the concatenated batch.

Each test spawns two ranks on 127.0.0.1 (a free port), trains a small model with Conv2d, LayerNorm,
Linear layers, biases, a raw parameter and a layer that gets no gradient on odd steps, and writes its
parameters and counters to a file; the test process runs the single-process reference and compares.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mbf_triton import MBF

WORLD = 2
LOCAL_BATCH = 4
RTOL = 1e-5


class Net(nn.Module):
    """Conv2d (5 output channels: FSDP2 shards of 3 and 2), LayerNorm, Linear(., 7) (shards of 4 and 3), a
    raw scale, and ``extra``, used only on even steps (no gradient on the others)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.norm = nn.LayerNorm([5, 4, 4])
        self.fc1 = nn.Linear(80, 7)
        self.fc2 = nn.Linear(7, 3)
        self.extra = nn.Linear(7, 3, bias=False)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.tanh(self.fc1(torch.relu(self.norm(self.conv(x))).flatten(1)))
        out = self.fc2(h)
        if use_extra:
            out = out + self.extra(h)
        return out * self.scale


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (WORLD * LOCAL_BATCH samples); ``nan``: one NaN in the last rank's part."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 2, 4, 4, generator=g)
    y = torch.randint(0, 3, (WORLD * LOCAL_BATCH,), generator=g)
    if nan:
        x[-1, 0, 0, 0] = float("nan")
    return x, y


def train(model: nn.Module, opt: MBF, steps: range, rank: int | None, nan_step: int = -1) -> None:
    """``rank``: train on that rank's part of each global batch; None: on the whole batch."""
    for i in steps:
        x, y = batch(i, nan=i == nan_step)
        if rank is not None:
            x, y = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, use_extra=i % 2 == 0), y).backward()
        opt.step()


def hyper(cfg: dict) -> dict:
    return dict(lr=0.02, damping=0.1, weight_decay=1e-3, stat_every=cfg.get("stat_every", 1),
                backend=cfg.get("backend", "torch"))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


# ------------------------------------------------------------------ the ranks
def _worker(rank: int, port: int, cfg: dict, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        result = _run(rank, cfg)
        if rank == 0 or cfg["mode"] == "fsdp":
            torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _wrap(cfg: dict) -> tuple[nn.Module, MBF]:
    model = make_model()
    if cfg["mode"] == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        return model, MBF(model, **hyper(cfg))
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    kw = {"process_group": None} if "process_group" in cfg else {"shard_curvature": cfg["mode"] == "sharded"}
    return ddp, MBF(ddp, **hyper(cfg), **kw)


def _run(rank: int, cfg: dict) -> dict:
    model, opt = _wrap(cfg)
    steps = cfg["steps"]
    result: dict = {}
    if "resume_at" in cfg:  # a checkpoint mid-run: rank 0's state loads on every rank
        k = cfg["resume_at"]
        train(model, opt, range(k), rank)
        path = cfg["ckpt"]
        if rank == 0:
            torch.save({"model": full_state(model.module), "opt": opt.state_dict()}, path)
        dist.barrier()
        ckpt = torch.load(path)
        model2, opt2 = _wrap(cfg)
        model2.module.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        train(model, opt, range(k, steps), rank)
        train(model2, opt2, range(k, steps), rank)
        result["resumed"] = full_state(model2.module)
    else:
        train(model, opt, range(steps), rank, nan_step=cfg.get("nan_step", -1))
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    result["params"] = full_state(inner)
    result["counters"] = (opt.steps, opt.skipped_steps)
    result["f_numel"] = sum(s["F"].numel() for s in opt.state.values())
    return result


def run_ranks(tmp_path, **cfg) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    cfg.setdefault("ckpt", str(tmp_path / "ckpt.pt"))
    mp.spawn(_worker, args=(port, cfg, out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}") for r in range(WORLD) if os.path.exists(f"{out}.{r}")]


def reference(cfg: dict, nan_step: int = -1) -> tuple[dict, MBF]:
    model = make_model()
    opt = MBF(model, **hyper(cfg), process_group=None)
    train(model, opt, range(cfg["steps"]), None, nan_step=nan_step)
    return full_state(model), opt


def assert_close(got: dict, want: dict, rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("mode", ["replicated", "sharded", "fsdp"])
@pytest.mark.parametrize("stat_every", [1, 10])
def test_parity_with_one_process(tmp_path, mode, stat_every):
    steps = 4 if stat_every == 1 else 12  # the default schedule: statistics on steps 0 and 10
    cfg = dict(mode=mode, steps=steps, stat_every=stat_every)
    results = run_ranks(tmp_path, **cfg)
    want, opt = reference(cfg)
    moved = sum((want[n] - p).norm() for n, p in make_model().state_dict().items())
    assert moved > 0.1  # the comparison is not between two untrained models
    for r in results:
        assert_close(r["params"], want)
        assert r["counters"] == (steps, 0)
    f_single = sum(s["F"].numel() for s in opt.state.values())
    if mode == "replicated":
        assert results[0]["f_numel"] == f_single
    else:  # every rank keeps about 1/world of the curvature
        assert results[0]["f_numel"] < 0.75 * f_single


def test_local_statistics_differ(tmp_path):
    """The parity check can fail: under DDP, ranks that keep their local statistics (``process_group=None``,
    the behaviour before data parallelism) end far from one process."""
    cfg = dict(mode="replicated", steps=4, stat_every=1, process_group=None)
    want, _ = reference(cfg)
    got = run_ranks(tmp_path, **cfg)[0]["params"]
    err = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    assert err > 1e-3
