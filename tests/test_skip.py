"""The device-side skip flag: a step whose gradients hold NaN/Inf changes nothing, and the host never
waits for the check.

Layer by layer: the reference ops and every kernel launcher with the flag set leave their outputs
bit-for-bit alone and with it clear equal a launch without it; the optimizer, on both backends, skips the
whole step without reading a device value, settles its counters afterwards, and restarts statistics
that a skipped step was to start.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, kernel_device
from torch import nn

from mbf_triton import MBF, statistics
from mbf_triton import reference as ref

SET = torch.ones(1, dtype=torch.uint8)
CLEAR = torch.zeros(1, dtype=torch.uint8)


def _flags(device):
    return {"set": SET.to(device), "set-bool": SET.bool().to(device), "clear": CLEAR.to(device), "none": None}


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def test_reference_ops_honour_the_flag():
    gen = torch.Generator().manual_seed(0)
    f0 = torch.rand(6, 10, generator=gen)
    fhat = torch.rand(6, 10, generator=gen)
    p0, d = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    m0 = torch.randn(4, 5, generator=gen)
    out = {}
    for name, flag in _flags("cpu").items():
        f, p, m = f0.clone(), p0.to(torch.bfloat16), m0.clone()
        ref.fisher_ema_(f, fhat, 0.7, flag)
        ref.apply_update_(p, d, m, 0.1, 0.9, 0.01, flag)
        fs, gs = [f0[:3, :1].clone(), f0[3:, :1].clone()], [fhat[:3, 0], fhat[3:, 0]]
        ref.diag_fisher_ema_(fs, gs, 0.5, flag)
        out[name] = (f, p, m, *fs)
    for name in ("set", "set-bool"):
        expected = (f0, p0.to(torch.bfloat16), m0, f0[:3, :1], f0[3:, :1])
        assert all(torch.equal(a, b) for a, b in zip(out[name], expected)), name
    assert all(torch.equal(a, b) for a, b in zip(out["clear"], out["none"]))
    assert not torch.equal(out["none"][0], f0)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


def _update_case(b, rows, cols, device, gen):
    a = torch.randn(rows * math.ceil(cols / b), b, b + 3, generator=gen)
    f = ref.pack_tril(a @ a.transpose(1, 2)).float()
    f[0] = -5.0  # an indefinite block: a launch that runs counts one fallback
    return [t.to(device) for t in (f, torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen),
                                   torch.randn(rows, cols, generator=gen))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's rsqrt of the indefinite block
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("b", [1, 9, 27])
def test_block_update_kernels_honour_the_flag(b, grouped):
    from mbf_triton.kernels import block_update

    device = kernel_device()
    gen = torch.Generator().manual_seed(b)
    cases = [_update_case(b, 3, 2 * b + 1, device, gen), _update_case(b, 2, b, device, gen)]
    hp = {"b": b, "damping": 1e-2, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    if b > block_update.LANE_MAX_B:  # the default "rows" variant is slow to compile and to interpret; it has
        hp["variant"] = "tile"  # its own skip-flag test (test_kernel_block_update.py)
    out = {}
    for name, flag in _flags(device).items():
        state = [[t.clone() for t in case] for case in cases]
        count = torch.zeros(1, dtype=torch.int32, device=device)
        if grouped:
            fs, grads, params, moms = (list(t) for t in zip(*state))
            block_update.grouped_block_update_(fs, grads, params, moms, count, skip=flag, **hp)
        else:
            for f, g, p, m in state:
                block_update.damped_block_update_(f, g, p, m, count, skip=flag, **hp)
        out[name] = [t for case in state for t in case] + [count]
    before = [t for case in cases for t in case] + [torch.zeros(1, dtype=torch.int32, device=device)]
    for name in ("set", "set-bool"):
        assert all(torch.equal(a, e) for a, e in zip(out[name], before)), name
    assert all(torch.equal(a, e) for a, e in zip(out["clear"], out["none"]))
    assert int(out["none"][-1].item()) == 2  # the launch did run (one fallback per parameter)


@pytest.mark.parametrize("block_t", [16, 64], ids=["tiled-T", "one-T-tile"])
def test_linear_statistics_kernel_honours_the_flag(block_t):
    from mbf_triton.kernels import fisher_stats

    device = kernel_device()
    gen = torch.Generator().manual_seed(3)
    b, n_in, n_out = 9, 20, 5
    x, g = torch.randn(7, n_in, generator=gen).to(device), torch.randn(7, n_out, generator=gen).to(device)
    f0 = torch.rand(n_out * 3, ref.tril_size(b), generator=gen).to(device)
    cfg = fisher_stats.FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    out = {}
    for name, flag in _flags(device).items():
        f = f0.clone()
        fisher_stats.linear_fisher_ema_(f, x, g, b=b, scale=2.0, decay=0.5, config=cfg, skip=flag)
        out[name] = f
    assert torch.equal(out["set"], f0) and torch.equal(out["set-bool"], f0)
    assert torch.equal(out["clear"], out["none"]) and not torch.equal(out["none"], f0)


@pytest.mark.parametrize(("kernel_size", "block_t", "split"), [
    ((3, 3), 16, 1),  # whole 9x9 blocks per program
    ((3, 3), 16, 2),  # the same, batch split: partials + second pass
    ((5, 5), 16, 1),  # packed-entry tiles, T tiled: partials + second pass
    ((5, 5), 512, 1),  # packed-entry tiles, one T tile
    ((1, 1), 16, 1),  # 1x1 kernels (reduction)
], ids=["full", "full-split", "tiled-T", "one-T-tile", "k1"])
def test_conv_statistics_kernel_honours_the_flag(kernel_size, block_t, split):
    from mbf_triton.kernels import fisher_stats

    device = kernel_device()
    gen = torch.Generator().manual_seed(5)
    c_in, c_out = 3, 4
    x = torch.randn(3, c_in, 6, 6, generator=gen).to(device)
    pad = kernel_size[0] // 2
    g = torch.randn(3, c_out, 6, 6, generator=gen).to(device)
    b = math.prod(kernel_size)
    f0 = torch.rand(c_out * c_in, ref.tril_size(b), generator=gen).to(device)
    cfg = fisher_stats.FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    out = {}
    for name, flag in _flags(device).items():
        f = f0.clone()
        fisher_stats.conv_fisher_ema_(f, x, g, kernel_size=kernel_size, padding=pad, groups=1, scale=1.5,
                                      decay=0.5, config=cfg, samples_split=split, skip=flag)
        out[name] = f
    assert torch.equal(out["set"], f0) and torch.equal(out["set-bool"], f0)
    assert torch.equal(out["clear"], out["none"]) and not torch.equal(out["none"], f0)


def test_bad_flags_are_refused():
    from mbf_triton.kernels import fisher_stats

    device = kernel_device()
    x, g = torch.randn(4, 6, device=device), torch.randn(4, 2, device=device)
    f = torch.zeros(2 * 2, ref.tril_size(3), device=device)
    for bad in (torch.zeros(1, device=device), torch.zeros(2, dtype=torch.uint8, device=device), 0):
        with pytest.raises(TypeError, match="skip"):
            fisher_stats.linear_fisher_ema_(f, x, g, b=3, scale=1.0, decay=0.0, skip=bad)


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4))


class _EveryPath(nn.Module):
    """A model whose parameters take every statistics and update path: conv b=9 with a bias (per-sample
    bias statistics), b=81 (beyond the register tile: torch update on the Triton backend), 1x1 conv
    (b=1 kernel), a conv used at two spatial sizes (pooled reference statistics), BatchNorm and a bare
    parameter (batch-gradient 1x1 statistics), Linear weight and bias; built channels_last, so the conv
    weights are not contiguous (updated through a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c9 = nn.Conv2d(3, 2, 9, padding=4, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.c11 = nn.Conv2d(2, 2, 1)
        self.cm = nn.Conv2d(2, 2, 3, padding=1)
        self.lin = nn.Linear(2 * 5 * 5, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c11(self.bn(self.c9(self.c1(x))).relu())
        h = self.cm(h)
        small = self.cm(h[:, :, :3, :3])
        return self.lin(h.flatten(1)) * self.scale + small.mean()


def _every_path(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _EveryPath().to(memory_format=torch.channels_last)
    assert not model.c1.weight.is_contiguous()
    return model


def _batch(seed: int, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _backward(model, seed: int, device: str, poison: bool = False, n: int = 6) -> None:
    x, y = _batch(seed, n)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[3] = float("nan")


def _snapshot(model, opt):
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v.clone() for v in opt.state[p].values() if torch.is_tensor(v)]
    return tensors, [opt.state[p].get("stat_steps") for p in model.parameters()], opt.fallback_blocks


class _NoHostReads:
    """Makes every read of a tensor's value on the host raise (``item``, ``bool``, ``int``, ``float``,
    ``tolist``, ``numpy``): inside it, a step that synchronised with the device would fail."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy")

    def __init__(self, allow_cpu: bool = False) -> None:
        self.allow_cpu = allow_cpu  # the torch backend on a CPU reads its host flags: no device to wait for

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def guard(name):
            def refuse(tensor, *args, **kwargs):
                if self.allow_cpu and tensor.device.type == "cpu":
                    return self.saved[name](tensor, *args, **kwargs)
                raise AssertionError("the step read a tensor's value on the host")
            return refuse

        for n in self.NAMES:
            setattr(torch.Tensor, n, guard(n))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, fn)


def _backends():
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                                                   reason="needs TRITON_INTERPRET=1 or a GPU"))]


@pytest.mark.parametrize("backend", _backends())
def test_a_poisoned_step_changes_nothing_and_reads_nothing(backend, monkeypatch):
    """Statistics and update steps with a NaN gradient, on a model that takes every path (and one
    indefinite curvature block, which a step that ran would count as a fallback): parameters, momentum,
    curvature, stat_steps and the fallback count stay as they were, bit for bit; the step body never
    reads a device value (the flags are read by _settle, outside the guarded part)."""
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    model = _every_path().to(device)
    opt = MBF(model, lr=0.05, damping=0.1, stat_every=2, block_size=4, backend=backend)
    for i in range(2):  # state exists, configurations chosen
        _backward(model, i, device, n=2)  # two samples: the b=81 statistics are slow under the interpreter
        opt.step()
    settle = MBF._settle
    for i, stat_step in ((2, True), (3, False)):
        assert (opt._counters["calls"] % opt.stat_every == 0) == stat_step
        opt._settle()
        opt.state[model.lin.weight]["F"][0] = -5.0  # indefinite: a step that ran would count a fallback
        before = _snapshot(model, opt)
        _backward(model, i, device, poison=True, n=2)
        monkeypatch.setattr(MBF, "_settle", lambda self, wait=True: None)
        # the torch backend on a CPU may read host flags (free); the Triton path reads none, also on a CPU
        with _NoHostReads(allow_cpu=backend == "torch" and device == "cpu"):
            opt.step()
        monkeypatch.setattr(MBF, "_settle", settle)
        opt._settle()
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), i
        assert before[1:] == after[1:], i
    assert (opt.steps, opt.skipped_steps) == (2, 2)
    _backward(model, 5, device, n=2)  # and training goes on (an update step: the indefinite block is counted)
    opt.step()
    assert (opt.steps, opt.skipped_steps, opt.fallback_blocks) == (3, 2, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _LateEvent:
    """Stands in for a CUDA event that has not completed when the step ends (as on a GPU)."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def _late_flags(monkeypatch) -> None:
    """Make every step's flag arrive late, as on a GPU: read only when a step or a counter waits for it."""
    real = MBF._unsettled_step

    def late(*args, **kwargs):
        u = real(*args, **kwargs)
        u.event = _LateEvent()
        return u

    monkeypatch.setattr(MBF, "_unsettled_step", staticmethod(late))


@pytest.mark.parametrize("late", [False, True], ids=["flag-at-once", "flag-late"])
def test_skipped_first_statistics_start_again_in_the_next_step(late, monkeypatch):
    """The first step (which starts every F) has a NaN gradient. Its flag is read at once (CPU) or only at
    the next step (as on a GPU: meanwhile the counters are provisional and the next forward/backward is
    captured just in case). Either way the next step starts the statistics from its own batch, and the
    model and the state end exactly as those of a run that never saw the poisoned step."""
    if late:
        _late_flags(monkeypatch)
    model, clean = _convnet(), _convnet()
    opt = MBF(model, lr=0.05, damping=0.1, backend="torch")
    ref_opt = MBF(clean, lr=0.05, damping=0.1, backend="torch")
    _backward(model, 0, "cpu", poison=True)
    opt.step()
    if late:
        assert opt._counters["step"] == 1 and len(opt._unsettled) == 1  # provisional
    else:
        assert opt._counters["step"] == 0 and not opt._unsettled
    assert opt._capture.capturing  # the statistics must start again in the next step
    _backward(model, 1, "cpu")
    opt.step()
    _backward(clean, 1, "cpu")
    ref_opt.step()
    assert (opt.steps, opt.skipped_steps) == (1, 1)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["F"], ref_opt.state[q]["F"])
        assert opt.state[p]["stat_steps"] == ref_opt.state[q]["stat_steps"] == 1
    assert opt._capture.capturing == late  # step 1 restarted the statistics; unsettled: just in case
    _backward(model, 2, "cpu")
    opt.step()
    _backward(clean, 2, "cpu")
    ref_opt.step()
    assert (opt.steps, opt.skipped_steps) == (2, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean.parameters()))
    assert not opt._capture.capturing  # no statistics started in step 2 and none due: no capture


def test_statistics_schedule_counts_skipped_steps():
    """The host decides what to capture before it knows whether the last step was skipped, so the
    ``stat_every`` schedule counts calls of ``step()`` with gradients, skipped ones included."""
    model = _convnet()
    opt = MBF(model, lr=0.05, stat_every=3, backend="torch")
    w = model[0].weight
    changed = []
    for i in range(7):
        _backward(model, i, "cpu", poison=i == 3)
        before = opt.state[w]["F"].clone() if opt.state[w] else None
        opt.step()
        changed.append(before is None or not torch.equal(before, opt.state[w]["F"]))
    assert changed == [True, False, False, False, False, False, True]  # call 3 was skipped
    assert (opt.steps, opt.skipped_steps, opt.state[w]["stat_steps"]) == (6, 1, 2)
    sd = opt.state_dict()
    assert sd["mbf"]["calls"] == 7
    del sd["mbf"]["calls"]  # a checkpoint from before the field: steps + skips is the same count
    opt2 = MBF(_convnet(), lr=0.05, stat_every=3, backend="torch")
    opt2.load_state_dict(sd)
    assert opt2._counters["calls"] == 7


def test_a_step_that_raises_after_skipped_statistics_uncounts_them(monkeypatch):
    """A poisoned first step whose later layer raises (say, out of memory) after the first layer's
    statistics were counted: the count is undone (F was not touched), so the next good step initialises F
    instead of averaging into zeros; the call counts as no step at all."""
    _late_flags(monkeypatch)
    model, clean = _convnet(), _convnet()
    opt = MBF(model, lr=0.05, damping=0.1, backend="torch")
    real = statistics.linear_statistics

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    _backward(model, 0, "cpu", poison=True)
    monkeypatch.setattr(statistics, "linear_statistics", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    monkeypatch.setattr(statistics, "linear_statistics", real)
    assert opt.state[model[0].weight]["stat_steps"] == 0
    assert (opt.steps, opt.skipped_steps, opt._counters["calls"]) == (0, 0, 0)
    ref_opt = MBF(clean, lr=0.05, damping=0.1, backend="torch")
    for m, o in ((model, opt), (clean, ref_opt)):
        _backward(m, 1, "cpu")
        o.step()
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["F"], ref_opt.state[q]["F"])


def test_state_reset_or_checkpoint_load_while_a_skip_is_unsettled(monkeypatch):
    """A state cleared in place after a skipped, not yet settled statistics step is left alone by the late
    correction (the next step re-creates it and starts its statistics); a checkpoint loaded while a skip
    is unsettled keeps its own counters (the pending correction is applied before, not after, the load)."""
    _late_flags(monkeypatch)
    model = _convnet()
    opt = MBF(model, lr=0.05, backend="torch", stat_every=1)
    _backward(model, 0, "cpu")
    opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())  # steps 1, skipped 0 (as torch.save would keep it)
    _backward(model, 1, "cpu", poison=True)
    opt.step()
    w = model[0].weight
    opt.state[w].clear()
    _backward(model, 2, "cpu")
    opt.step()  # re-creates the state; its first statistics come from this batch
    assert (opt.steps, opt.skipped_steps) == (2, 1)  # settles step 1
    assert opt.state[w]["stat_steps"] == 1
    _backward(model, 3, "cpu", poison=True)
    opt.step()
    opt.load_state_dict(checkpoint)
    assert (opt.steps, opt.skipped_steps) == (1, 0)
    assert all(s["stat_steps"] == 1 for s in opt.state.values())


def _mlp_step(model, opt, seed: int, poison=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    if poison is not None:
        poison.grad.view(-1)[0] = float("nan")
    opt.step()


def test_first_statistics_of_1x1_parameters_alone_restart_after_a_late_skip(monkeypatch):
    """A param group of 1x1-block parameters only (a LayerNorm, added later) starts its statistics in a
    skipped step whose flag arrives late: the next step waits for that flag and starts F again (decay 0)
    instead of averaging into the untouched zeros."""
    _late_flags(monkeypatch)
    out = []
    for poison in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        opt = MBF(model, [model[0].weight, model[0].bias, model[2].weight, model[2].bias], lr=0.05,
                  stat_every=100, stat_decay=0.9, backend="torch")
        for i in range(2):  # the layers' statistics started (step 0) and settled
            _mlp_step(model, opt, i)
        opt.add_param_group({"params": list(model[1].parameters())})
        if poison:
            _mlp_step(model, opt, 7, poison=model[1].weight)
        _mlp_step(model, opt, 2)
        out.append(opt.state[model[1].weight]["F"].clone())
    assert torch.equal(out[0], out[1])


def test_an_interrupted_settle_corrects_each_step_once(monkeypatch):
    """Reading the counters waits for the pending flags; a wait that raises (Ctrl-C, a CUDA error) after
    some steps were corrected leaves those corrected once: the next read does not correct them again."""
    _late_flags(monkeypatch)
    model = _convnet()
    opt = MBF(model, lr=0.05, backend="torch", stat_every=1)
    _backward(model, 0, "cpu")
    opt.step()
    opt._settle()
    for i in (1, 2):
        _backward(model, i, "cpu", poison=True)
        opt.step()
    assert len(opt._unsettled) == 2

    class Interrupted(_LateEvent):
        def synchronize(self) -> None:
            raise KeyboardInterrupt

    opt._unsettled[1].event = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        opt._settle()
    opt._unsettled[0].event = _LateEvent()
    assert (opt.steps, opt.skipped_steps) == (1, 2)
    assert opt.state[model[0].weight]["stat_steps"] == 1


@pytest.mark.gpu
def test_steps_never_synchronise_on_a_gpu():
    """CUDA's sync debug mode raises on a synchronising torch call (a blocking copy, ``item()``, a stream
    sync) inside the steps after the first ones, which choose launch configurations. (It does not see an
    event wait, which the step after one that started statistics makes on purpose.)"""
    model = _convnet().cuda()
    opt = MBF(model, lr=0.05, stat_every=2, backend="triton")
    for i in range(3):
        _backward(model, i, "cuda")
        opt.step()
    torch.cuda.synchronize()
    for i in range(3, 7):
        _backward(model, i, "cuda", poison=i == 4)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (opt.steps, opt.skipped_steps) == (6, 1)
