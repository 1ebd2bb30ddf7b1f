"""The reference statistics and update, checked from outside: per-sample gradients from ``torch.func``
(vmap over grad) and an explicit dense solve of the assembled block-diagonal matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from torch import nn
from torch.func import functional_call, grad, vmap

from mbf_triton import MBF
from mbf_triton import reference as ref

DT = torch.float64


def per_sample_grads(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of each sample's own loss ``loss_fn(model(x_n), y_n)``, stacked over samples."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def blocks_of(opt: MBF, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients ``(N, *p.shape)`` cut into mini-blocks ``(N, n_blocks, b)``."""
    lay = opt.layout(p)
    return torch.stack([ref.to_blocks(gn.reshape(lay.rows, lay.cols), lay.b) for gn in g])


def first_step_curvature(model, loss_fn, x, y, **kw):
    """Run one step with lr=0 and return the optimizer (F = Fhat of this batch)."""
    opt = MBF(model, lr=0.0, momentum=0.0, backend="torch", **kw)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    return opt


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def xent(out, y):
    return nn.functional.cross_entropy(out, y)


class Rowwise(nn.Module):
    """Linear layers applied to (N, T, in) inputs: every position is a sample."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def conv_net(dim: int, out: int = 6, **conv_kw) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    return nn.Sequential(conv(4, out, **conv_kw), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


CASES = {
    "mlp_tail_chunks": (lambda: nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)), (9, 7), "mse", 3),
    "mlp_unitwise": (lambda: nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)), (6, 7), "xent", 64),
    "conv1d_stride_pad_dil_groups": (
        lambda: conv_net(1, kernel_size=3, stride=2, padding=2, dilation=2, groups=2), (5, 4, 11), "xent", 4),
    "conv2d_groups_bias": (lambda: conv_net(2, kernel_size=3, stride=1, padding=1, groups=2), (4, 4, 5, 6),
                           "xent", 5),
    "conv2d_depthwise_stride": (lambda: conv_net(2, out=8, kernel_size=(3, 2), stride=2, padding=(1, 0), groups=4),
                                (4, 4, 7, 6), "mse", 4),
    "conv2d_same_reflect": (lambda: conv_net(2, kernel_size=3, padding="same", padding_mode="reflect"),
                            (3, 4, 5, 5), "xent", 4),
    "conv2d_circular_dilation": (
        lambda: conv_net(2, kernel_size=2, padding=1, dilation=2, padding_mode="circular"), (3, 4, 6, 5), "xent", 4),
    "conv3d": (lambda: conv_net(3, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1), (3, 4, 4, 5, 3),
               "xent", 4),
    "conv1d_pointwise": (lambda: conv_net(1, kernel_size=1), (4, 4, 5), "xent", 4),
}


def make_case(name: str, reduction: str = "mean"):
    build, xshape, loss, block_size = CASES[name]
    torch.manual_seed(hash(name) % 2**31)
    model = build().to(DT)
    x = torch.randn(*xshape, dtype=DT)
    model(x)  # materialise lazy layers
    out_dim = model(x).shape[-1]
    if loss == "mse":
        y = torch.randn(xshape[0], out_dim, dtype=DT)
        fn = nn.functional.mse_loss
    else:
        y = torch.randint(0, out_dim, (xshape[0],))
        fn = nn.functional.cross_entropy
    def loss_fn(out, target):  # the batch loss, and applied to one sample, that sample's loss
        return fn(out, target, reduction=reduction)

    batch_fn = sample_fn = loss_fn
    return model, x, y, batch_fn, sample_fn, block_size


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fisher_matches_torch_func(name, reduction):
    model, x, y, batch_fn, sample_fn, block_size = make_case(name, reduction)
    opt = first_step_curvature(model, batch_fn, x, y, block_size=block_size, loss_reduction=reduction)
    psg = per_sample_grads(model, sample_fn, x, y)
    for pname, p in model.named_parameters():
        g = blocks_of(opt, p, psg[pname])
        expected = ref.outer_fisher(g).double()
        assert opt.state[p]["F"].shape == expected.shape, pname
        torch.testing.assert_close(opt.state[p]["F"].double(), expected, **tol(torch.float32), msg=pname)


def test_linear_positions_count_as_samples():
    torch.manual_seed(0)
    model = Rowwise().to(DT)
    x = torch.randn(3, 4, 6, dtype=DT)
    y = torch.randn(3, 4, 2, dtype=DT)
    opt = first_step_curvature(model, mse, x, y, block_size=4)
    # the oracle: each of the 12 positions is one sample of a loss that is the mean over positions
    psg = per_sample_grads(model, mse, x.reshape(12, 6), y.reshape(12, 2))
    for pname, p in model.named_parameters():
        expected = ref.outer_fisher(blocks_of(opt, p, psg[pname]))
        torch.testing.assert_close(opt.state[p]["F"].double(), expected, **tol(torch.float32), msg=pname)


def test_parameters_outside_supported_layers_use_batch_gradient():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.rand(2) + 0.5)

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(1)
    model = Scaled().to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    opt = first_step_curvature(model, mse, x, y)
    g = model.scale.grad
    torch.testing.assert_close(opt.state[model.scale]["F"].double(), (g * g)[:, None], **tol(torch.float32))
    assert opt.layout(model.scale).b == 1


def test_diag_statistics_of_many_parameters_equal_one_at_a_time():
    """``diag_fisher_ema_`` (one batched update for all 1x1-block parameters) gives the same bits as one
    ``fisher_ema_`` per parameter: ``outer_fisher`` of the batch gradient for parameters without per-sample
    data, the given statistic for biases; mixed dtypes, both decays, an overflowing square, a NaN."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(7, generator=gen), torch.randn(3, 2, generator=gen).bfloat16(),
             torch.randn(1, generator=gen).half(), torch.randn(5, generator=gen)]
    grads[3][2] = 3e19  # its square overflows fp32: that entry keeps its old value
    fhats = [torch.rand(4, 1, generator=gen), torch.rand(2, 1, generator=gen)]
    fhats[1][0] = float("nan")
    for decay in (0.0, 0.9):
        fs = [torch.rand(g.numel(), 1, generator=gen) for g in grads + fhats]
        old, expected = [f.clone() for f in fs], [f.clone() for f in fs]
        for f, g in zip(expected, grads):
            ref.fisher_ema_(f, ref.outer_fisher(g.reshape(1, -1, 1)), decay)
        for f, h in zip(expected[len(grads):], fhats):
            ref.fisher_ema_(f, h, decay)
        ref.diag_fisher_ema_(fs, grads, decay, fhats=fhats)
        for f, e in zip(fs, expected):
            assert torch.equal(f, e)
        assert torch.isfinite(fs[3]).all() and fs[3][2] == expected[3][2]
        assert fs[-1][0] == old[-1][0] and fs[-1][1] != old[-1][1]  # the NaN statistic kept the old value
    with pytest.raises(ValueError, match="one tensor per entry"):
        ref.diag_fisher_ema_(fs, grads, 0.5)


def test_gradient_accumulation_pools_samples():
    model, x, y, batch_fn, sample_fn, _ = make_case("conv2d_groups_bias")
    opt = MBF(model, lr=0.0, momentum=0.0, backend="torch")
    model.zero_grad()
    for sl in (slice(0, 2), slice(2, 4)):  # two micro-batches, each a mean loss
        batch_fn(model(x[sl]), y[sl]).backward()
    opt.step()
    psg = per_sample_grads(model, sample_fn, x, y)
    for pname, p in model.named_parameters():
        expected = ref.outer_fisher(blocks_of(opt, p, psg[pname]))
        torch.testing.assert_close(opt.state[p]["F"].double(), expected, **tol(torch.float32), msg=pname)


@pytest.mark.parametrize("name", ["mlp_tail_chunks", "conv2d_groups_bias", "conv1d_stride_pad_dil_groups"])
def test_one_step_equals_dense_block_diagonal_solve(name):
    """stat_decay=0, momentum=0, weight_decay=0: p1 = p0 - lr (F + lambda I)^-1 g with F assembled densely."""
    model, x, y, batch_fn, sample_fn, block_size = make_case(name)
    lr, damping = 0.3, 1e-2
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    psg = per_sample_grads(model, sample_fn, x, y)
    opt = MBF(model, lr=lr, momentum=0.0, damping=damping, stat_decay=0.0, weight_decay=0.0,
              block_size=block_size, backend="torch", graft=None)  # the paper's step
    model.zero_grad()
    batch_fn(model(x), y).backward()
    g = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    for pname, p in model.named_parameters():
        lay = opt.layout(p)
        n = p.numel()
        # assemble the block-diagonal matrix index by index, independently of reference.to_blocks
        dense = torch.zeros(n, n, dtype=DT)
        gs = psg[pname].reshape(len(x), n)
        for r in range(lay.rows):
            for j in range(lay.n_chunks):
                idx = torch.arange(r * lay.cols + j * lay.b, r * lay.cols + min((j + 1) * lay.b, lay.cols))
                dense[idx[:, None], idx[None, :]] = gs[:, idx].T @ gs[:, idx] / len(x)
        d = torch.linalg.solve(dense + damping * torch.eye(n, dtype=DT), g[pname].reshape(n))
        torch.testing.assert_close(p.detach(), p0[pname] - lr * d.reshape(p.shape), **tol(torch.float32),
                                   msg=pname)


def test_conv_patches_matches_autograd():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False).to(DT)
    x = torch.randn(3, 4, 9, 8, dtype=DT)
    out = conv(x)
    go = torch.randn_like(out)
    out.backward(go)
    u = ref.conv_patches(x, conv.kernel_size, conv.stride, ((1, 1), (1, 1)), conv.dilation)
    ug = u.reshape(3, 2, 2, -1, 9)
    per_sample = torch.einsum("ngol,ngclk->ngock", go.reshape(3, 2, 3, -1), ug)
    torch.testing.assert_close(per_sample.sum(0).reshape(conv.weight.shape), conv.weight.grad)


@pytest.mark.parametrize("b", [1, 2, 5, 9])
def test_pack_unpack_and_blocks_roundtrip(b):
    a = torch.randn(7, b, b, dtype=DT)
    a = a + a.mT
    torch.testing.assert_close(ref.unpack_tril(ref.pack_tril(a), b), a)
    assert torch.equal(ref.pack_tril(a)[:, ref.diag_indices(b)], a.diagonal(dim1=-2, dim2=-1))
    x = torch.randn(4, 11, dtype=DT)
    xb = ref.to_blocks(x, b)
    assert xb.shape == (4 * -(-11 // b), b)
    assert torch.equal(ref.from_blocks(xb, 4, 11), x)


def test_damped_solve_fallback_is_diagonal():
    b = 4
    f = ref.pack_tril(-10 * torch.eye(b, dtype=DT).expand(3, b, b).clone())
    f[1] = ref.pack_tril(2 * torch.eye(b, dtype=DT))
    g = torch.randn(3, b, dtype=DT)
    d, fb = ref.damped_block_solve(f, g, 1e-3)
    assert fb.tolist() == [True, False, True]
    torch.testing.assert_close(d[0], g[0] / 1e-3)
    torch.testing.assert_close(d[1], g[1] / (2 + 1e-3))
