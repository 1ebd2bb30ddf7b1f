"""The device-side skip flag: a step whose gradients hold NaN/Inf changes nothing, and the host never
waits for the check.

Layer by layer: the reference ops and every kernel launcher with the flag set leave their outputs
bit-for-bit alone and with it clear equal a launch without it; the optimizer, on both backends, skips the
whole step without reading a device value, settles its counters afterwards, and restarts statistics
that a skipped step was to start.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, kernel_device
from torch import nn

from mbf_triton import MBF
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


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 5, 5, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def _backward(model, seed: int, device: str, poison: bool = False) -> None:
    x, y = _batch(seed)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    if poison:
        model[0].weight.grad.view(-1)[3] = float("nan")


def _snapshot(model, opt):
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v.clone() for v in opt.state[p].values() if torch.is_tensor(v)]
    return tensors, [opt.state[p].get("stat_steps") for p in model.parameters()], opt.fallback_blocks


class _NoHostReads:
    """Makes every read of a tensor's value on the host raise (``item``, ``bool``, ``int``, ``float``,
    ``tolist``, ``numpy``): inside it, a step that synchronised with the device would fail."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("the step read a tensor's value on the host")

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse)
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, fn)


def _backends():
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                                                   reason="needs TRITON_INTERPRET=1 or a GPU"))]


@pytest.mark.parametrize("backend", _backends())
def test_a_poisoned_step_changes_nothing_and_reads_nothing(backend, monkeypatch):
    """Statistics and update steps with a NaN gradient: parameters, momentum, curvature, stat_steps and
    the fallback count stay as they were, bit for bit; the step body never reads a device value (the
    previous step's flag is read at the start of the next step, outside the guarded part)."""
    device = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
    model = _convnet().to(device)
    opt = MBF(model, lr=0.05, damping=0.1, stat_every=2, backend=backend)
    for i in range(2):  # state exists, configurations chosen
        _backward(model, i, device)
        opt.step()
    settle = MBF._settle
    for i, stat_step in ((2, True), (3, False)):
        assert (opt._counters["calls"] % opt.stat_every == 0) == stat_step
        opt._settle()
        before = _snapshot(model, opt)
        _backward(model, i, device, poison=True)
        monkeypatch.setattr(MBF, "_settle", lambda self, wait=True: None)
        with _NoHostReads():
            opt.step()
        monkeypatch.setattr(MBF, "_settle", settle)
        opt._settle()
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), i
        assert before[1:] == after[1:], i
    assert (opt.steps, opt.skipped_steps) == (2, 2)
    _backward(model, 4, device)  # and training goes on
    opt.step()
    assert (opt.steps, opt.skipped_steps) == (3, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _LateEvent:
    """Stands in for a CUDA event that has not completed when the step ends (as on a GPU)."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def test_skipped_first_statistics_start_again_in_the_next_step(monkeypatch):
    """The first step (which starts every F) has a NaN gradient and its flag is read only at the next
    step, as on a GPU. Meanwhile the counters are provisional and the next forward/backward is captured
    anyway; the next step then finds the skip and starts the statistics from its own batch: the model and
    the state end exactly as those of a run that never saw the poisoned step."""
    real = MBF._unsettled_step

    def late(skip, counted, first):
        u = real(skip, counted, first)
        u.event = _LateEvent()
        return u

    monkeypatch.setattr(MBF, "_unsettled_step", staticmethod(late))
    model, clean = _convnet(), _convnet()
    opt = MBF(model, lr=0.05, damping=0.1, backend="torch")
    ref_opt = MBF(clean, lr=0.05, damping=0.1, backend="torch")
    _backward(model, 0, "cpu", poison=True)
    opt.step()
    assert opt._counters["step"] == 1 and len(opt._unsettled) == 1  # provisional
    assert opt._capture.capturing  # just in case the step turns out skipped
    _backward(model, 1, "cpu")
    opt.step()
    _backward(clean, 1, "cpu")
    ref_opt.step()
    assert (opt.steps, opt.skipped_steps) == (1, 1)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["F"], ref_opt.state[q]["F"])
        assert opt.state[p]["stat_steps"] == ref_opt.state[q]["stat_steps"] == 1
    assert opt._capture.capturing  # step 1 restarted the statistics and is itself unsettled: just in case
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


@pytest.mark.gpu
def test_steps_never_synchronise_on_a_gpu():
    """CUDA's sync debug mode raises on any synchronising call inside the steps (after the first ones,
    which choose launch configurations)."""
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
