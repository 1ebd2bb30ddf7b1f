"""Data-parallel MBF (mbf_triton.distributed): 2 processes on gloo (CPU) against one process training on
the concatenated batch.

Each test spawns two ranks on 127.0.0.1 (a free port), trains a small model with Conv2d, LayerNorm,
Linear layers, biases, a raw parameter and a layer that gets no gradient on odd steps, and writes its
parameters and counters to a file; the test process runs the single-process reference and compares.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mbf_triton import MBF, Layout

WORLD = 2
LOCAL_BATCH = 4
RTOL = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
HAS_FSDP2 = dist.is_available() and hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard")


class Net(nn.Module):
    """Conv2d (5 output channels: FSDP2 shards of 3 and 2), LayerNorm, Linear(., 7) (shards of 4 and 3), a
    raw scale of one row (shards of 1 and 0), and ``extra``, used only on even steps (no gradient on the
    others)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.norm = nn.LayerNorm([5, 4, 4])
        self.fc1 = nn.Linear(80, 7)
        self.fc2 = nn.Linear(7, 3)
        self.extra = nn.Linear(7, 3, bias=False)
        self.scale = nn.Parameter(torch.ones(1, 3))  # one row: FSDP2 leaves rank 1 an empty shard

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


def train(model: nn.Module, opt: MBF, steps: range, rank: int | None, nan_step: int = -1,
          poison_step: int = -1) -> None:
    """``rank``: train on that rank's part of each global batch; None: on the whole batch. ``poison_step``:
    rank 1 sets its local gradient of ``fc1.weight`` to NaN after backward (under FSDP2: its shard only)."""
    for i in steps:
        x, y = batch(i, nan=i == nan_step)
        if rank is not None:
            x, y = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, use_extra=i % 2 == 0), y).backward()
        if i == poison_step and rank == 1:
            grad = _inner(model).fc1.weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(float("nan"))
        opt.step()


def hyper(cfg: dict) -> dict:
    return dict(lr=0.02, damping=0.1, weight_decay=1e-3, stat_every=cfg.get("stat_every", 1),
                backend=cfg.get("backend", "torch"), graft=cfg.get("graft"), kl_clip=cfg.get("kl_clip"),
                graft_scope=cfg.get("graft_scope", "parameter"))


COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter", "all_gather",
               "all_gather_into_tensor", "all_gather_single", "broadcast", "all_to_all_single", "barrier")


class CountCollectives:
    """Counts, per ``opt.step()``, the calls of torch.distributed's collectives (by name) while it runs."""

    def __init__(self, opt: MBF) -> None:
        self.steps: list[dict[str, int]] = []
        step = opt.step

        def counted_step(*args, **kwargs):
            self.steps.append({})
            originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
            for name, fn in originals.items():
                setattr(dist, name, self._counting(name, fn))
            try:
                return step(*args, **kwargs)
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)

        opt.step = counted_step
        opt.collective_counts = self.steps

    def _counting(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.steps[-1][name] = self.steps[-1].get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


# ------------------------------------------------------------------ the ranks
# Every scenario of one mode runs in one spawn (starting two processes costs more than the training).
def scenarios(mode: str) -> dict[str, dict]:
    if mode == "triton":  # DDP, replicated, on the Triton path (interpreted: slow, so a spawn of its own)
        return {"triton": dict(steps=1, stat_every=1, backend="triton")}
    out = {
        "every_step": dict(steps=4, stat_every=1),
        "default_schedule": dict(steps=12, stat_every=10),  # statistics on steps 0 and 10
        # a NaN in rank 1's batch on step 1, rank 0's checkpoint after step 2 loaded by every rank
        "nan_and_checkpoint": dict(steps=4, stat_every=1, nan_step=1, resume_at=2),
        # step-size options (mbf_triton.stepsize): whole-parameter sums from the ranks' rows. The kl_clip
        # bounds bind on some steps of these runs (test_step_size_options_match_one_process checks it)
        **STEPSIZE_SCENARIOS,
    }
    if mode == "fsdp":  # a NaN that reaches one rank's gradient shard only: the flag is agreed on
        out["nan_shard"] = dict(steps=3, stat_every=1, poison_step=1)
        out["graft_nan_shard"] = dict(steps=3, stat_every=1, poison_step=1, graft="adam", kl_clip=5e-3)
    if mode == "replicated":
        out["local_statistics"] = dict(steps=4, stat_every=1, process_group=None)
        out["inner_module"] = dict(steps=4, stat_every=1, inner=True)  # MBF(ddp.module): the default group
    return out


STEPSIZE_SCENARIOS = {
    "graft_adam": dict(steps=4, stat_every=1, graft="adam"),
    "graft_sgd_kl": dict(steps=4, stat_every=1, graft="sgd", kl_clip=7e-5),
    "kl_clip": dict(steps=4, stat_every=1, kl_clip=3e-3),
    # per-block grafting: a block is whole on one rank, so only kl_clip's total is summed across ranks
    "graft_block": dict(steps=4, stat_every=1, graft="adam", graft_scope="block"),
    "graft_block_kl": dict(steps=4, stat_every=1, graft="sgd", graft_scope="block", kl_clip=1e-4),
    "graft_nan_and_checkpoint": dict(steps=4, stat_every=1, nan_step=1, resume_at=2, graft="adam", kl_clip=5e-3),
}

TRITON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1" and importlib.util.find_spec("triton") is not None


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {name: _run(rank, mode, cfg, f"{out_dir}/{name}.ckpt") for name, cfg in scenarios(mode).items()}
        if mode in ("replicated", "sharded"):
            results["exchange"] = _exchange_check(rank, mode)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


EXCHANGE_LAYOUT = Layout("linear", rows=3, cols=4, b=2)  # 6 mini-blocks of 2x2 (3 packed entries)


def exchange_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the old F of all blocks, rank's statistic): block 2 is Inf on rank 1, block 4 NaN on rank 0."""
    f_old = torch.arange(18, dtype=torch.float32).view(6, 3)
    fhat = torch.full((6, 3), float(rank + 1))
    if rank == 1:
        fhat[2, 1] = float("inf")
    if rank == 0:
        fhat[4, 0] = float("nan")
    return f_old, fhat


def _exchange_check(rank: int, mode: str) -> dict:
    """The Exchange by itself: each rank's F rows after one fold with decay 0.5, and after a skipped one."""
    from mbf_triton.distributed import DataParallel

    dp = DataParallel(dist.group.WORLD, mode)
    p = torch.zeros(3, 4)
    dp.assign([(p, EXCHANGE_LAYOUT)])
    lo, hi = dp.rows(p, EXCHANGE_LAYOUT)
    out = {"rows": (lo, hi)}
    for skip in (False, True):
        f_old, fhat = exchange_inputs(rank)
        f = f_old.view(3, 6)[lo:hi].reshape(-1, 3).clone()
        exchange = dp.exchange([(p, EXCHANGE_LAYOUT, f, 0.5)])
        exchange.slot(p).copy_(fhat)
        exchange.start()
        exchange.finish({torch.device("cpu"): torch.tensor([skip])})
        out[skip] = f
    return out


def _wrap(mode: str, cfg: dict, state: dict | None = None) -> tuple[nn.Module, MBF]:
    model = make_model()
    if state is not None:
        model.load_state_dict(state)
    if mode == "fsdp":  # (mode "triton" is DDP, replicated)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        return model, MBF(model, **hyper(cfg))
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    kw = {"process_group": None} if "process_group" in cfg else {"shard_curvature": mode == "sharded"}
    return ddp, MBF(ddp.module if cfg.get("inner") else ddp, **hyper(cfg), **kw)


def _dcp():
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as helpers

    return dcp, helpers


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _run(rank: int, mode: str, cfg: dict, ckpt: str) -> dict:
    model, opt = _wrap(mode, cfg)
    counter = CountCollectives(opt)
    steps, nan_step = cfg["steps"], cfg.get("nan_step", -1)
    result: dict = {}
    if "resume_at" in cfg:  # a checkpoint mid-run: rank 0's state loads on every rank
        k = cfg["resume_at"]
        train(model, opt, range(k), rank, nan_step)
        # every rank calls both (collectives in the sharded modes)
        sd, model_sd = opt.state_dict(), full_state(_inner(model))
        if rank == 0:
            torch.save({"model": model_sd, "opt": sd}, ckpt)
        if mode == "fsdp":  # also through torch.distributed.checkpoint's state-dict helpers
            dcp, helpers = _dcp()
            saved = {"model": helpers.get_model_state_dict(model),
                     "optim": helpers.get_optimizer_state_dict(model, opt)}
            dcp.save(saved, checkpoint_id=ckpt + ".dcp")
            model3, opt3 = _wrap(mode, cfg)
            sd3 = {"model": helpers.get_model_state_dict(model3),
                   "optim": helpers.get_optimizer_state_dict(model3, opt3)}
            dcp.load(sd3, checkpoint_id=ckpt + ".dcp")
            helpers.set_model_state_dict(model3, sd3["model"])
            helpers.set_optimizer_state_dict(model3, opt3, sd3["optim"])
            train(model3, opt3, range(k, steps), rank, nan_step)
            result["resumed_dcp"] = full_state(model3)
            result["resumed_dcp_counters"] = (opt3.steps, opt3.skipped_steps)
        dist.barrier()
        saved = torch.load(ckpt)
        model2, opt2 = _wrap(mode, cfg, saved["model"])
        opt2.load_state_dict(saved["opt"])
        train(model, opt, range(k, steps), rank, nan_step)
        train(model2, opt2, range(k, steps), rank, nan_step)
        result["resumed"] = full_state(_inner(model2))
        result["resumed_counters"] = (opt2.steps, opt2.skipped_steps)
    else:
        train(model, opt, range(steps), rank, nan_step, cfg.get("poison_step", -1))
    result["params"] = full_state(_inner(model))
    result["counters"] = (opt.steps, opt.skipped_steps)
    result["f_numel"] = sum(s["F"].numel() for s in opt.state.values())
    result["graft_rows"] = [s["graft_sq"].shape[0] for s in opt.state.values() if "graft_sq" in s]
    result["collectives"] = counter.steps
    return result


def reference(cfg: dict) -> tuple[dict, MBF]:
    model = make_model()
    opt = MBF(model, **hyper(cfg), process_group=None)
    CountCollectives(opt)
    # a step with a NaN anywhere is skipped whole: the reference has it in its batch
    train(model, opt, range(cfg["steps"]), None, cfg.get("nan_step", cfg.get("poison_step", -1)))
    return full_state(model), opt


def assert_close(got: dict, want: dict, rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module", params=["replicated", "sharded", "fsdp"])
def ranks(request, tmp_path_factory):
    """(mode, per-scenario results of each rank, the scenarios' folder)."""
    if request.param == "fsdp" and not HAS_FSDP2:
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")
    return _spawn(request.param, tmp_path_factory)


def _spawn(mode: str, tmp_path_factory):
    out = tmp_path_factory.mktemp(mode)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, mode, str(out)), nprocs=WORLD, join=True)
    return mode, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("scenario", ["every_step", "default_schedule"])
def test_parity_with_one_process(ranks, scenario):
    mode, results, _ = ranks
    cfg = scenarios(mode)[scenario]
    want, opt = reference(cfg)
    moved = sum((want[n] - p).norm() for n, p in make_model().state_dict().items())
    assert moved > 0.1  # the comparison is not between two untrained models
    for r in results:
        assert_close(r[scenario]["params"], want)
        assert r[scenario]["counters"] == (cfg["steps"], 0)
    f_single = sum(s["F"].numel() for s in opt.state.values())
    if mode == "replicated":
        assert results[0][scenario]["f_numel"] == f_single
    else:  # every rank keeps about 1/world of the curvature
        assert all(r[scenario]["f_numel"] < 0.75 * f_single for r in results)
        assert sum(r[scenario]["f_numel"] for r in results) == f_single


@pytest.mark.parametrize("scenario", ["nan_and_checkpoint", "graft_nan_and_checkpoint"])
def test_nan_on_one_rank_and_checkpoint(ranks, scenario):
    """A NaN in one rank's batch skips the step on every rank (as in one process on the pooled batch); rank
    0's checkpoint, loaded on every rank, resumes bit-exactly, and loads into one process too. With grafting
    and kl_clip: Adam's statistics are left alone by the skipped step, and the checkpoint carries them."""
    mode, results, out = ranks
    cfg = scenarios(mode)[scenario]
    want, _ = reference(cfg)
    for r in results:
        res = r[scenario]
        assert res["counters"] == (cfg["steps"] - 1, 1)
        assert res["resumed_counters"] == (cfg["steps"] - 1, 1)
        assert_close(res["params"], want)
        for name, t in res["params"].items():  # resumed == uninterrupted, bit for bit
            assert torch.equal(res["resumed"][name], t), name
        if mode == "fsdp":  # through torch.distributed.checkpoint too
            assert res["resumed_dcp_counters"] == (cfg["steps"] - 1, 1)
            for name, t in res["params"].items():
                assert torch.equal(res["resumed_dcp"][name], t), name
    saved = torch.load(out / f"{scenario}.ckpt")
    if cfg.get("graft"):  # the whole grafting moment, gathered from the ranks' rows
        single = reference({**cfg, "steps": cfg["resume_at"]})[1].state_dict()
        for k, st in single["state"].items():
            assert saved["opt"]["state"][k]["graft_sq"].shape == st["graft_sq"].shape
            torch.testing.assert_close(saved["opt"]["state"][k]["graft_sq"], st["graft_sq"], rtol=1e-5, atol=1e-12)
    model = make_model()
    model.load_state_dict(saved["model"])
    opt = MBF(model, **hyper(cfg), process_group=None)
    opt.load_state_dict(saved["opt"])
    train(model, opt, range(cfg["resume_at"], cfg["steps"]), None, cfg["nan_step"])
    assert_close(full_state(model), want)
    assert (opt.steps, opt.skipped_steps) == (cfg["steps"] - 1, 1)


@pytest.mark.parametrize("scenario", ["nan_shard", "graft_nan_shard"])
def test_nan_in_one_gradient_shard(ranks, scenario):
    """FSDP2: a NaN in rank 1's gradient shard only (rank 0's shard is finite) skips the step on both (with
    grafting: Adam's statistics of both shards untouched by it)."""
    mode, results, _ = ranks
    if mode != "fsdp":
        pytest.skip("DDP's all-reduced gradient carries a NaN to every rank (test_nan_on_one_rank_and_checkpoint)")
    cfg = scenarios(mode)[scenario]
    want, _ = reference(cfg)
    for r in results:
        assert r[scenario]["counters"] == (cfg["steps"] - 1, 1)
        assert_close(r[scenario]["params"], want)


STEPSIZE_RUNS = ["graft_adam", "graft_sgd_kl", "kl_clip", "graft_block", "graft_block_kl"]


@pytest.mark.parametrize("scenario", STEPSIZE_RUNS)
def test_step_size_options_match_one_process(ranks, scenario):
    """graft="adam"/"sgd" and kl_clip need whole-parameter sums while a rank holds some rows of each
    parameter (sharded curvature, FSDP2 with uneven and empty shards): the run equals one process on the
    concatenated batch, and each rank keeps Adam's moment of its own rows only."""
    mode, results, _ = ranks
    cfg = scenarios(mode)[scenario]
    want, opt = reference(cfg)
    assert not any(opt.collective_counts)  # one process: no collective (none is initialised either)
    if cfg.get("kl_clip"):  # the bound binds: without it the run ends elsewhere
        free, _ = reference({**cfg, "kl_clip": None})
        assert max(((free[n] - want[n]).norm() / want[n].norm()).item() for n in want) > 1e-3
    single_rows = [s["graft_sq"].shape[0] for s in opt.state.values() if "graft_sq" in s]
    assert len(single_rows) == (len(opt.state) if cfg.get("graft") == "adam" else 0)
    for r in results:
        assert_close(r[scenario]["params"], want)
        assert r[scenario]["counters"] == (cfg["steps"], 0)
    rows = [r[scenario]["graft_rows"] for r in results]
    if mode == "replicated" or not single_rows:
        assert all(got == single_rows for got in rows)
    else:  # every row's moment on exactly one rank; some rank holds none of some parameter's
        assert [sum(per_param) for per_param in zip(*rows)] == single_rows
        assert all(sum(got) < sum(single_rows) for got in rows) and any(0 in got for got in rows)


@pytest.mark.parametrize("scenario", STEPSIZE_RUNS)
def test_step_size_options_add_at_most_one_all_reduce_per_step(ranks, scenario):
    """Counted in every opt.step(): the step-size options add one all_reduce (all parameters' partial sums
    together) where rows are split across ranks and a whole-parameter or global sum is needed; none in
    replicated DDP or for per-block grafting alone; the other collectives are the plain run's (same
    statistics schedule)."""
    mode, results, _ = ranks
    cfg = scenarios(mode)[scenario]
    needs_sums = cfg.get("kl_clip") is not None or cfg.get("graft_scope", "parameter") == "parameter"
    extra = 1 if mode != "replicated" and needs_sums else 0
    # all_reduces of the plain run per step (stats every step): replicated the statistics bucket; sharded
    # none (reduce_scatter + all_gather); FSDP2 the skip flag (+ reduce_scatter)
    plain_all_reduce = {"replicated": 1, "sharded": 0, "fsdp": 1}[mode]
    for r in results:
        plain, scaled = r["every_step"]["collectives"], r[scenario]["collectives"]
        assert len(plain) == len(scaled) == 4
        for p, q in zip(plain, scaled):
            assert p.get("all_reduce", 0) == plain_all_reduce
            want = {**p, "all_reduce": plain_all_reduce + extra}
            assert q == {name: n for name, n in want.items() if n}


def test_wrapped_module_uses_the_default_group(ranks):
    """MBF built on the module DDP wraps (not the wrapper) finds the default process group."""
    mode, results, _ = ranks
    if mode != "replicated":
        pytest.skip("one run is enough")
    want, _ = reference(scenarios(mode)["inner_module"])
    for r in results:
        assert_close(r["inner_module"]["params"], want)


def test_local_statistics_differ(ranks):
    """The parity check can fail: under DDP, ranks that keep their local statistics (``process_group=None``,
    the behaviour before data parallelism) end far from one process."""
    mode, results, _ = ranks
    if mode != "replicated":
        pytest.skip("one run is enough")
    cfg = scenarios(mode)["local_statistics"]
    want, _ = reference(cfg)
    got = results[0]["local_statistics"]["params"]
    err = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    assert err > 1e-3


@pytest.mark.skipif(not TRITON_CPU, reason="needs triton under TRITON_INTERPRET=1")
def test_triton_backend_parity(tmp_path_factory):
    """The Triton path shares the communication code: its statistics kernels write the bucket."""
    _, results, _ = _spawn("triton", tmp_path_factory)
    cfg = scenarios("triton")["triton"]
    want, _ = reference(cfg)
    for r in results:
        assert_close(r["triton"]["params"], want)


def test_exchange_averages_and_guards_the_mean(ranks):
    """F <- EMA(F, mean over ranks of Fhat), a block non-finite on any rank keeping its old F on every rank,
    nothing changed on a skipped step; in the sharded mode each rank gets its rows."""
    mode, results, _ = ranks
    if mode == "fsdp":
        pytest.skip("the fsdp rows come from DTensor shards (covered by the training tests)")
    f_old, _ = exchange_inputs(0)
    mean = (exchange_inputs(0)[1] + exchange_inputs(1)[1]) / 2
    want = torch.where(torch.isfinite(mean).all(dim=1, keepdim=True), torch.lerp(mean, f_old, 0.5), f_old)
    assert not torch.equal(want, f_old)
    rows = [r["exchange"]["rows"] for r in results]
    if mode == "sharded":
        assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == 3 and rows[0][1] not in (0, 3)
    for r in results:
        lo, hi = r["exchange"]["rows"]
        per_row = EXCHANGE_LAYOUT.n_chunks
        assert torch.equal(r["exchange"][False], want[lo * per_row:hi * per_row])
        assert torch.equal(r["exchange"][True], f_old[lo * per_row:hi * per_row])


def test_communication_report():
    """perf/distributed_comm.py's arithmetic: sharded and FSDP2 F per rank about 1/world of the replicated
    one, a statistics step about 5x the gradient all-reduce for 3x3 convolutions."""
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "distributed_comm.py"
    spec = iu.spec_from_file_location("distributed_comm", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.report(mod.resnet32(), 2)
    assert r["f_sharded"] < 0.51 * r["f_replicated"] and r["f_fsdp"] < 0.51 * r["f_replicated"]
    assert 4.5 < r["replicated_stats"] / r["ddp_allreduce"] < 5.5
    assert r["replicated_plain"] == 0


# ------------------------------------------------------------------ FSDP2: accumulation and discarded passes
def _fsdp_accumulation_worker(rank: int, port: int, out_dir: str) -> None:
    """Under FSDP2 the sharded parameters' AccumulateGrad never runs, so capture cannot follow passes: every
    pass since the last step or ``opt.zero_grad()`` counts. Here a junk pass is discarded by
    ``opt.zero_grad()`` and the batch is fed as 1 or 4 micro-batches (mean loss each): F must agree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = {}
        for k in (1, 4):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
            opt = MBF(model, stat_every=1, backend="torch")
            gen = torch.Generator().manual_seed(1 + rank)
            x, junk = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
            model(junk).pow(2).mean().backward()
            opt.zero_grad()
            for xs in x.chunk(k):
                model(xs).pow(2).mean().backward()
            opt.step()
            out[k] = [s["F"].clone() for s in opt.state.values()]
        torch.save(out, f"{out_dir}/acc{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not HAS_FSDP2, reason="needs FSDP2 (torch.distributed.fsdp.fully_shard)")
def test_fsdp2_accumulation_and_discarded_passes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_accumulation_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"acc{r}.pt")
        assert len(out[1]) == len(out[4]) == 4
        for one, four in zip(out[1], out[4]):
            assert one.abs().sum() > 0 or one.numel() == 0
            torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-9)
