"""The torch path's fast forms, checked in float64 against independent per-sample and dense computations:
the GEMM statistics (Linear: squared output gradients against outer products of input chunks; conv:
per-sample gradients per tile of output channels), the vectorised Cholesky solve, and the factors the
torch backend keeps between statistics steps."""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from torch import nn

from mbf_triton import MBF
from mbf_triton import reference as ref
from mbf_triton.backends import TorchBackend

DT = torch.float64


def per_sample_outer(g: torch.Tensor, b: int) -> torch.Tensor:
    """``(1/N) sum_n g_n g_n^T`` per mini-block, one sample and one block at a time (packed)."""
    n, rows, cols = g.shape
    blocks = []
    for r in range(rows):
        for j in range(0, cols, b):
            acc = torch.zeros(b, b, dtype=DT)
            for s in range(n):
                v = torch.zeros(b, dtype=DT)
                chunk = g[s, r, j : j + b]
                v[: chunk.numel()] = chunk
                acc += torch.outer(v, v)
            blocks.append(acc / n)
    return ref.pack_tril(torch.stack(blocks))


@pytest.mark.parametrize("n_in, b", [(7, 3), (8, 8), (5, 16), (12, 4)])
def test_linear_fisher_gemm_equals_per_sample_gradients(n_in, b):
    """Linear: per-sample gradient of unit o is scale * gout[n, o] * x[n]; the GEMM never forms it."""
    torch.manual_seed(0)
    m, n_out, scale = 6, 3, 2.5
    x, gout = torch.randn(m, n_in, dtype=DT), torch.randn(m, n_out, dtype=DT)
    per_sample = scale * gout[:, :, None] * x[:, None, :]  # (M, out, in)
    got = ref.linear_fisher(x, gout, min(b, n_in), scale)
    torch.testing.assert_close(got, per_sample_outer(per_sample, min(b, n_in)), **tol(DT))


@pytest.mark.parametrize("groups, tile_elements", [(1, 1 << 21), (1, 1), (2, 50)])
def test_conv_fisher_tiles_equal_per_sample_gradients(monkeypatch, groups, tile_elements):
    """Conv: per-sample weight gradients from autograd, one sample at a time, against conv_fisher, also
    with tiles of one output channel (tile_elements=1) and of a few."""
    monkeypatch.setattr(ref, "_CONV_TILE_ELEMENTS", tile_elements)
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=(1, 2), groups=groups, bias=False).double()
    x = torch.randn(3, 4, 5, 6, dtype=DT)
    gout = torch.randn(conv(x).shape, dtype=DT)
    per_sample = []
    for s in range(len(x)):
        conv.zero_grad()
        conv(x[s : s + 1]).backward(gout[s : s + 1])
        per_sample.append(conv.weight.grad.reshape(-1, 9).clone())
    expected = per_sample_outer(torch.stack(per_sample), 9)
    geometry = ref.ConvGeometry((3, 3), (1, 2), ((1, 1), (1, 1)), (1, 1))
    torch.testing.assert_close(ref.conv_fisher(geometry.patches(x), gout, groups, 1.0), expected, **tol(DT))


@pytest.mark.parametrize("b", [2, 3, 9, 16, 33])
def test_damped_block_solve_equals_dense_solve_with_fallbacks(b):
    """Vectorised Cholesky (b <= 32) and LAPACK (b > 32) against torch.linalg.solve; an indefinite and a
    non-finite block fall back to the diagonal."""
    torch.manual_seed(b)
    n, damping = 7, 1e-2
    a = torch.randn(n, b, b + 2, dtype=DT)
    a = a @ a.mT / b
    a[2] = -torch.eye(b, dtype=DT)  # indefinite even with the damping
    a[4, b - 1, 0] = a[4, 0, b - 1] = float("nan")
    f, g = ref.pack_tril(a), torch.randn(n, b, dtype=DT)
    d, fallback = ref.damped_block_solve(f, g, damping)
    assert fallback.tolist() == [i in (2, 4) for i in range(n)]
    ok = ~fallback
    expected = torch.linalg.solve(a[ok] + damping * torch.eye(b, dtype=DT), g[ok].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(d[ok], expected, **tol(DT))
    diag = a[2].diagonal().clamp(min=0)
    torch.testing.assert_close(d[2], g[2] / (diag + damping), **tol(DT))


def test_torch_backend_reuses_factors_until_f_changes():
    """Between statistics steps the torch backend solves with the factor of the last statistics step; a
    changed F (in-place) or damping invalidates it, and the result always equals a fresh solve."""
    backend = TorchBackend()
    torch.manual_seed(0)
    b, n = 4, 5
    a = torch.randn(n, b, b + 1)
    f = ref.pack_tril(a @ a.mT)
    calls = []
    real = ref.damped_cholesky

    def counting(*args):
        calls.append(args)
        return real(*args)

    def step(damping=1e-3):
        p, buf, count = torch.zeros(n, b), torch.zeros(n, b), torch.zeros(1, dtype=torch.int32)
        g = torch.randn(n, b)
        backend.block_update_(f, g, p, buf, count, b=b, damping=damping, lr=1.0, momentum=0.0, weight_decay=0.0)
        torch.testing.assert_close(-p, ref.block_solve(real(f, b, damping), g), rtol=0, atol=0)  # a fresh solve

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "damped_cholesky", counting)
        step()
        step()
        assert len(calls) == 1
        f.mul_(2.0)  # e.g. the statistics EMA
        step()
        assert len(calls) == 2
        step(damping=1e-2)
        assert len(calls) == 3


@pytest.mark.parametrize("graft", [None, "adam"])
def test_default_schedule_matches_fresh_factors_bit_for_bit(graft):
    """MBF with stat_every=3 on the torch path: reused factors give the same parameters as a backend that
    refactors every step (grafted: the directions' factors, joined into the update's, included)."""
    def run(reuse: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = MBF(model, lr=0.1, damping=1e-2, stat_every=3, backend="torch", graft=graft)
        backend = TorchBackend()
        backend.reuse_factors = reuse
        for i in range(7):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            model(x).square().mean().backward()
            for entry in opt._plan([(g, p) for g in opt.param_groups for p in g["params"]]).entries:
                entry.backend = backend
            for batch in opt._plan_cache.batches:
                batch.backend = backend
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)

