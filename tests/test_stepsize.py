"""The step-size options (mbf_triton.stepsize): each does what it says, the paper's method is untouched,
both backends make the same steps, skipped steps leave their state alone, checkpoints carry it."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import kernel_device
from torch import nn

from mbf_triton import MBF
from mbf_triton.stepsize import GRAFT_BETA2, GRAFT_EPS


def model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """float64 by default: the tests compare parameter changes of ~1e-5 on parameters of ~1."""
    torch.manual_seed(seed)
    # a Linear with a short tail chunk (13 = 4+4+4+1 at b=4), a conv, a norm layer (1x1 batch-gradient
    # statistics) and Linear biases (a conv bias before a norm layer has a zero gradient)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 13), nn.Tanh(), nn.Linear(13, 5),
    ).to(dtype)


def batch(i: int, n: int = 12):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def step(m: nn.Module, opt: MBF, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One training step; returns (gradients, parameter changes)."""
    x, y = batch(i)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x.to(next(m.parameters()).dtype)), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.detach().clone() for p in m.parameters()]
    opt.step()
    return grads, [p.detach() - b for p, b in zip(m.parameters(), before)]


def norms(ts):
    return torch.stack([t.float().norm() for t in ts])


TOL = dict(rtol=2e-5, atol=1e-10)  # float64 model, fp32 curvature and graft arithmetic
BASE = dict(lr=0.01, momentum=0.0, damping=1e-2, block_size=4, stat_every=1, backend="torch")
PLAIN = dict(BASE, graft=None)  # the paper's method


def test_default_is_the_paper_method_and_grafting_is_an_option():
    m1, m2, m3 = model(), model(), model()
    o1, o2 = MBF(m1, **BASE), MBF(m2, **BASE, graft=None, kl_clip=None, stat_warmup=0)
    o3 = MBF(m3, **BASE, graft="adam")
    for i in range(3):
        step(m1, o1, i)
        step(m2, o2, i)
        step(m3, o3, i)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert not any("graft_sq" in s for s in o1.state.values())  # plain MBF keeps no grafting state
    assert all("graft_sq" in s for s in o3.state.values())


def test_graft_adam_gives_every_parameter_adams_step_norm_along_mbfs_direction():
    m, plain_m = model(), model()
    opt = MBF(m, **BASE, graft="adam")
    plain = MBF(plain_m, **PLAIN)
    v = [torch.zeros_like(p) for p in m.parameters()]
    for i in range(4):
        grads, deltas = step(m, opt, i)
        for k, g in enumerate(grads):  # Adam with beta1 = 0, kept here independently
            v[k] = GRAFT_BETA2 * v[k] + (1 - GRAFT_BETA2) * g * g
        adam = [g / ((vk / (1 - GRAFT_BETA2 ** (i + 1))).sqrt() + GRAFT_EPS) for g, vk in zip(grads, v)]
        torch.testing.assert_close(norms(deltas), BASE["lr"] * norms(adam), **TOL)
        if i == 0:  # same start: the grafted step is plain MBF's, rescaled per parameter
            _, plain_deltas = step(plain_m, plain, i)
            for d, pd in zip(deltas, plain_deltas):
                cos = (d * pd).sum() / (d.norm() * pd.norm())
                assert cos > 1 - 1e-5, cos
            ratios = norms(deltas) / norms(plain_deltas)  # and the lengths changed, by parameter
            assert ratios.max() > 2 * ratios.min(), ratios


@pytest.mark.parametrize("scope", ["parameter", "block"])  # equal block norms make equal parameter norms
def test_graft_sgd_step_norm_is_lr_times_the_gradient_norm(scope):
    m = model()
    opt = MBF(m, **BASE, graft="sgd", graft_scope=scope)
    for i in range(3):
        grads, deltas = step(m, opt, i)
        torch.testing.assert_close(norms(deltas), BASE["lr"] * norms(grads), **TOL)


@pytest.mark.parametrize("scope", ["parameter", "block"])
def test_graft_with_momentum_is_adams_bias_corrected_first_moment_in_norm(scope):
    m = model()
    opt = MBF(m, **{**BASE, "momentum": 0.9}, graft="adam", graft_scope=scope)
    # first step: m = (1 - 0.9) s d at lr / (1 - 0.9): Adam's first step, lr * g / (|g| + eps)
    grads, deltas = step(m, opt, 0)
    adam = [g / (g.abs() + GRAFT_EPS) for g in grads]
    torch.testing.assert_close(norms(deltas), BASE["lr"] * norms(adam), **TOL)
    # second step: lr / (1 - 0.9^2) * (0.9 m_1 + 0.1 s_2 d_2): a convex combination, no longer than lr * max
    _, deltas2 = step(m, opt, 1)
    assert (norms(deltas2) <= BASE["lr"] * norms(adam) * 1.5).all()


def blocks64(t: torch.Tensor, rows: int, cols: int, b: int) -> torch.Tensor:
    """``t`` as its ``(rows, cols)`` matrix cut into ``(rows * chunks, b)`` mini-blocks, zero-padded (float64)."""
    chunks = -(-cols // b)
    out = torch.zeros(rows, chunks * b, dtype=torch.float64)
    out[:, :cols] = t.reshape(rows, cols).double()
    return out.reshape(rows * chunks, b)


def unpacked64(f: torch.Tensor, b: int) -> torch.Tensor:
    """Packed lower triangles ``(n, b(b+1)/2)`` (row by row) -> symmetric ``(n, b, b)`` float64."""
    i, j = torch.tril_indices(b, b)
    full = torch.zeros(f.shape[0], b, b, dtype=torch.float64)
    full[:, i, j] = f.double()
    full[:, j, i] = f.double()
    return full


@pytest.mark.parametrize("kl_clip", [None, 1e-9])
def test_graft_block_scope_gives_every_mini_block_adams_step_norm(kl_clip):
    """Independent float64 computation: ``s_i = ||a_i|| / ||d_i||`` per mini-block with ``a`` Adam's step
    (beta1 = 0) and ``d_i = (F_i + damping I)^{-1} g_i`` from the ``F`` the step used (stat_every=1), then
    K-FAC's ``nu`` over ``sum_i lr^2 s_i^2 g_i . d_i``; the update is ``-lr nu s_i d_i``."""
    m = model()
    opt = MBF(m, **BASE, graft="adam", graft_scope="block", kl_clip=kl_clip)
    lr, damping = BASE["lr"], BASE["damping"]
    v = [torch.zeros_like(p) for p in m.parameters()]
    clipped = []
    for i in range(3):
        grads, deltas = step(m, opt, i)
        expected, quad = [], torch.zeros((), dtype=torch.float64)
        for k, (p, g) in enumerate(zip(m.parameters(), grads)):
            v[k] = GRAFT_BETA2 * v[k] + (1 - GRAFT_BETA2) * g * g
            adam = g / ((v[k] / (1 - GRAFT_BETA2 ** (i + 1))).sqrt() + GRAFT_EPS)
            lay = opt.layout(p)
            gb, ab = (blocks64(t, lay.rows, lay.cols, lay.b) for t in (g, adam))
            f = unpacked64(opt.state[p]["F"], lay.b) + damping * torch.eye(lay.b, dtype=torch.float64)
            d = torch.linalg.solve(f, gb.unsqueeze(-1)).squeeze(-1)
            s = ab.norm(dim=1) / d.norm(dim=1)
            quad = quad + (lr * lr * s * s * (gb * d).sum(1)).sum()
            expected.append((s[:, None] * d).reshape(lay.rows, -1)[:, :lay.cols].reshape(p.shape))
            if lay.kind == "diag":  # 1x1 blocks: Adam's step exactly
                torch.testing.assert_close(expected[-1], adam, rtol=1e-9, atol=1e-12)
            elif lay.kind == "linear" and lay.cols > lay.b:  # the scale differs from block to block
                assert s.max() > 1.5 * s.min(), s
        nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / quad.item()) ** 0.5)
        clipped.append(nu < 1)
        for delta, e in zip(deltas, expected):  # fp32 curvature: small entries to 1e-6 of the largest
            torch.testing.assert_close(delta, -lr * nu * e, rtol=2e-5, atol=1e-6 * lr * e.abs().max().item())
    assert all(clipped) if kl_clip is not None else not any(clipped)


def test_graft_block_and_parameter_scopes_differ_only_inside_multi_entry_blocks():
    m_p, m_b = model(), model()
    o_p = MBF(m_p, **BASE, graft="adam", graft_scope="parameter")
    o_b = MBF(m_b, **BASE, graft="adam", graft_scope="block")
    _, d_p = step(m_p, o_p, 0)
    _, d_b = step(m_b, o_b, 0)
    for p, a, b in zip(m_p.parameters(), d_p, d_b):
        torch.testing.assert_close(a.norm(), b.norm(), **TOL)  # both have Adam's norm per parameter
        if o_p.layout(p).b > 1:
            assert not torch.allclose(a, b, rtol=1e-3, atol=0)  # different directions


@pytest.mark.parametrize("graft", [None, "sgd"])
def test_kl_clip_bounds_the_quadratic_model_of_the_step(graft):
    m_plain, m_free, m_clip = model(), model(), model()
    grads, d_plain = step(m_plain, MBF(m_plain, **PLAIN), 0)  # -lr * d (momentum 0)
    _, d_free = step(m_free, MBF(m_free, **BASE, graft=graft), 0)  # -lr * s * d
    lr = BASE["lr"]
    s = norms(d_free) / norms(d_plain)
    # Delta^T (F + damping I) Delta = lr^2 s^2 g . d = -lr s^2 g . (-lr d), summed over the parameters
    quad = sum(-lr * sp * sp * (g * d).sum() for sp, g, d in zip(s, grads, d_plain))
    kappa = 0.01 * quad.item()
    _, d_clip = step(m_clip, MBF(m_clip, **BASE, graft=graft, kl_clip=kappa), 0)
    nu = (kappa / quad) ** 0.5
    for a, b in zip(d_clip, d_free):
        torch.testing.assert_close(a, nu * b, **TOL)
    # a bound the step is already inside changes nothing
    m_loose = model()
    loose = MBF(m_loose, **BASE, graft=graft, kl_clip=100 * quad.item())
    _, d_loose = step(m_loose, loose, 0)
    for a, b in zip(d_loose, d_free):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_stat_warmup_takes_statistics_at_every_early_step():
    m = model()
    opt = MBF(m, **{**BASE, "stat_every": 10}, stat_warmup=3)
    w = m[4].weight
    counts = []
    for i in range(14):
        step(m, opt, i)
        counts.append(opt.state[w]["stat_steps"])
    # the parameter's steps 0, 1, 2 (warm-up), then stat_every=10 of its own steps later: 12
    assert counts == [1, 2, 3] + [3] * 9 + [4, 4]


@pytest.mark.parametrize("scope", ["parameter", "block"])
def test_a_skipped_first_step_is_as_if_it_never_happened(scope):
    """Adam's statistics and the momentum's bias correction count unskipped steps, on the device."""
    kw = dict(BASE, momentum=0.9, graft="adam", kl_clip=1e-3, graft_scope=scope)  # stat_every=1: same statistics steps
    m, clean = model(), model()
    opt, ref_opt = MBF(m, **kw), MBF(clean, **kw)
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x.double()), y).backward()
    m[4].weight.grad[0, 0] = float("nan")
    opt.step()
    for i in range(1, 5):
        step(m, opt, i)
        step(clean, ref_opt, i)
    assert (opt.steps, opt.skipped_steps) == (4, 1)
    for p, q in zip(m.parameters(), clean.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["graft_steps"], ref_opt.state[q]["graft_steps"])


@pytest.mark.parametrize("scope", ["parameter", "block"])
def test_skipped_step_leaves_graft_state_untouched(scope):
    m = model()
    opt = MBF(m, **BASE, graft="adam", kl_clip=1e-3, graft_scope=scope)
    step(m, opt, 0)
    saved = {p: (opt.state[p]["graft_sq"].clone(), opt.state[p]["graft_steps"].clone()) for p in m.parameters()}
    before = [p.detach().clone() for p in m.parameters()]
    x, y = batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(m(x.double()), y).backward()
    m[4].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["graft_sq"], saved[p][0])
        assert torch.equal(opt.state[p]["graft_steps"], saved[p][1])
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("scope", ["parameter", "block"])
def test_graft_state_roundtrips_through_a_checkpoint(scope):
    kw = dict(BASE, momentum=0.9, graft="adam", kl_clip=1e-2, stat_every=2, stat_warmup=1, graft_scope=scope)
    m = model()
    opt = MBF(m, **kw)
    for i in range(3):
        step(m, opt, i)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    for i in range(3, 6):
        step(m, opt, i)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = model(seed=1)
    m2.load_state_dict(ckpt["model"])
    opt2 = MBF(m2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for i in range(3, 6):
        step(m2, opt2, i)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    ({"graft": "lion"}, "graft"), ({"kl_clip": 0.0}, "kl_clip"), ({"kl_clip": float("inf")}, "kl_clip"),
    ({"kl_clip": True}, "kl_clip"), ({"stat_warmup": -1}, "stat_warmup"), ({"stat_warmup": 1.5}, "stat_warmup"),
    ({"graft_scope": "layer"}, "graft_scope"), ({"graft_scope": None}, "graft_scope"),
])
def test_invalid_stepsize_arguments_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        MBF(model(), **kw)


@pytest.mark.parametrize("scope", ["parameter", "block"])
def test_triton_backend_makes_the_same_scaled_steps(scope):
    device = kernel_device()
    kw = dict(BASE, momentum=0.9, weight_decay=1e-2, graft="adam", kl_clip=1e-4, stat_every=2, stat_warmup=1,
              graft_scope=scope)
    runs = []
    for backend in ("torch", "triton"):
        m = model(dtype=torch.float32).to(device)
        opt = MBF(m, **{**kw, "backend": backend})
        for i in range(3):
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(m(x.to(device)), y.to(device)).backward()
            opt.step()
        runs.append((m, opt))
    (m_ref, o_ref), (m_tri, o_tri) = runs
    for (n, a), b in zip(m_ref.named_parameters(), m_tri.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=n)
        torch.testing.assert_close(o_tri.state[b]["graft_sq"], o_ref.state[a]["graft_sq"], atol=1e-7, rtol=1e-4)


def test_rescaled_steps_refuse_sharded_curvature():
    class DP:  # what mbf_triton.distributed.resolve returns, reduced to its mode
        def __init__(self, mode):
            self.mode = mode

    StepSize = MBF(model(), **PLAIN).stepsize.__class__
    for mode in ("sharded", "fsdp"):
        with pytest.raises(ValueError, match="replicated DDP"):
            StepSize(graft="adam").checked(DP(mode))
        with pytest.raises(ValueError, match="replicated DDP"):  # per-block norms too (they would need the rows)
            StepSize(graft="adam", graft_scope="block").checked(DP(mode))
        StepSize(graft=None, stat_warmup=2).checked(DP(mode))  # the paper's step is fine everywhere
    StepSize(graft="adam", kl_clip=1e-3).checked(DP("replicated"))
    StepSize(graft="adam").checked(None)
