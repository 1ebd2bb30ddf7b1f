"""``opt.summary()`` and ``fisher_diagonal``: what each parameter gets, read back from the optimizer."""

from __future__ import annotations

import torch
from conftest import kernel_device
from torch import nn

from mbf_triton import MBF
from mbf_triton import reference as ref
from mbf_triton.summary import fisher_diagonal, summarize


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def step(net: nn.Module, opt: MBF) -> None:
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()


def test_summary_rows_before_and_after_a_step():
    net = model()
    opt = MBF(net, block_size=20, backend="torch")
    rows = summarize(opt)
    assert [r.name for r in rows] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    conv, linear = rows[0], rows[4]
    assert (conv.layout.kind, conv.layout.b, conv.layout.n_blocks) == ("conv", 9, 6)
    assert (linear.layout.kind, linear.layout.b, linear.layout.n_blocks) == ("linear", 20, 15)  # 48 = 20+20+8
    assert conv.curvature_bytes == 6 * 45 * 4 and linear.curvature_bytes == 15 * 210 * 4
    assert all(r.backend == "torch" and r.launch == "-" and r.fisher_median is None for r in rows)
    step(net, opt)
    rows = summarize(opt)
    assert sum(r.curvature_bytes for r in rows) == sum(s["F"].nbytes for s in opt.state.values())
    diag = fisher_diagonal(opt)
    for r, p in zip(rows, net.parameters()):
        f = opt.state[p]["F"]
        lay = opt.layout(p)
        real = ref.from_blocks(f[:, ref.diag_indices(lay.b)], lay.rows, lay.cols).reshape(p.shape)
        assert torch.equal(diag[r.name], real)  # padding of the linear tail chunk excluded
        assert r.fisher_median == float(real.median()) and r.fisher_max == float(real.max())
    text = opt.summary()
    assert "3.weight" in text and "linear" in text and "diag F median" in text
    assert f"{sum(r.curvature_bytes for r in rows):,} bytes of curvature state" in text
    assert "torch on cpu" in text


def test_summary_follows_param_groups_and_outlives_the_model():
    net = model()
    params = list(net.parameters())
    opt = MBF(net, [{"params": params[:4]}, {"params": params[4:], "lr": 0.1}], backend="torch")
    assert [r.name for r in summarize(opt)] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    del net  # the optimizer holds the model weakly: its parameters are then numbered
    assert [r.name for r in summarize(opt)] == [f"param{i}" for i in range(6)]


def test_summary_reports_the_triton_launch_configuration():
    device = kernel_device()
    net = model().to(device)
    opt = MBF(net, backend="triton")
    step(net, opt)
    rows = summarize(opt)
    assert all(r.backend == "triton" for r in rows)
    assert all("blocks=" in r.launch and r.launch.endswith(")") for r in rows), [r.launch for r in rows]
    assert "triton on" in opt.summary()
