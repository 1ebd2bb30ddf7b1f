"""Fisher statistics kernels (kernels/fisher_stats.py) against the pure-torch reference."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

_ROOT = Path(__file__).resolve().parents[1]
try:
    import mbf_triton  # noqa: F401
except ImportError:  # pragma: no cover - running from a bare checkout
    sys.path.insert(0, str(_ROOT))

try:
    from mbf_triton.kernels import fisher_stats
except ImportError:  # pragma: no cover - kernels/ not yet mapped into the package
    sys.path.insert(0, str(_ROOT / "kernels"))
    import fisher_stats

from conftest import QUICK, kernel_device, tol  # noqa: E402

from mbf_triton import reference as ref  # noqa: E402

FisherStatsConfig = fisher_stats.FisherStatsConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    # The kernels and the reference both compute in fp32 from exactly up-cast inputs, so the fp32
    # tolerance applies whatever the input dtype; atol is relative to the magnitude of the result.
    atol, rtol = tol(torch.float32)["atol"], tol(torch.float32)["rtol"]
    finite = expected[torch.isfinite(expected)]
    mag = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(out.cpu(), expected.cpu(), atol=atol * mag, rtol=rtol, equal_nan=True)


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


def _linear_inputs(m, n_in, n_out, dtype, device, strided, gen):
    if strided:  # transposed + sliced views: neither stride is 1 along the expected dim
        x = torch.randn(n_in + 5, 2 * m, generator=gen).to(dtype).t()[::2, 3 : n_in + 3]
        g = torch.randn(n_out + 2, m, generator=gen).to(dtype).t()[:, 1 : n_out + 1]
        assert not x.is_contiguous() and not g.is_contiguous()
    else:
        x = torch.randn(m, n_in, generator=gen).to(dtype)
        g = torch.randn(m, n_out, generator=gen).to(dtype)
    return x.to(device), g.to(device)


def _check_linear_two_steps(b, m, n_in, n_out, dtype, strided, config=None, scale=0.7):
    device = kernel_device()
    gen = torch.Generator().manual_seed(1000 * b + n_in)
    n_chunks = math.ceil(n_in / b)
    t = ref.tril_size(b)
    f = torch.full((n_out * n_chunks, t), float("nan"), device=device)  # garbage: decay 0 ignores it
    f_ref = f.clone()
    for decay in (0.0, 0.9):
        x, g = _linear_inputs(m, n_in, n_out, dtype, device, strided, gen)
        fisher_stats.linear_fisher_ema_(f, x, g, b=b, scale=scale, decay=decay, config=config)
        ref.fisher_ema_(f_ref, ref.linear_fisher(x.double(), g.double(), b, scale), decay)
        assert torch.isfinite(f).all()
        _assert_close(f, f_ref)


M_ODD = 37 if QUICK else 300  # not a multiple of any tile


@pytest.mark.parametrize("b", [1, 2, 3, 4, 9, 16, 25, 27, 32, 49, 64])
def test_linear_block_sizes(b):
    _check_linear_two_steps(b, M_ODD, 3 * b + 1, 20 if QUICK else 70, torch.float32, strided=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [9, 27])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_dtypes(dtype, b, strided):
    _check_linear_two_steps(b, M_ODD, 2 * b + 5, 19, dtype, strided)


@pytest.mark.parametrize("b,n_in", [(4, 4), (9, 5), (16, 1), (64, 40)])
def test_linear_unitwise(b, n_in):
    """One chunk per row (b >= in): a single zero-padded mini-block per output feature."""
    _check_linear_two_steps(b, M_ODD, n_in, 17, torch.float32, strided=False)


@pytest.mark.parametrize(
    "config",
    [
        FisherStatsConfig(block_o=16, block_k=16, block_t=16),  # T tiled: scratch + guarded copy
        FisherStatsConfig(block_o=64, block_k=64, block_t=64, num_warps=8),  # one T tile
        # 3xTF32 on the tensor cores (a tuner candidate): fp32 accuracy is asserted against float64 on a
        # GPU; the interpreter computes every dot in fp32 and only checks the plumbing
        FisherStatsConfig(block_o=32, block_k=32, block_t=64, num_warps=4, precision="tf32x3"),
    ],
    ids=["small-tiles", "large-tiles", "tf32x3"],
)
def test_linear_configs(config):
    _check_linear_two_steps(9, 50, 31, 40, torch.float32, strided=True, config=config)


# ----------------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------------

# (kernel_size, stride, padding (l, r) per dim, dilation, C_in, C_out, groups, spatial size)
CONV_CASES = {
    "1d-k3-s2": ((3,), (2,), ((1, 1),), (1,), 4, 6, 1, (9,)),
    "1d-k4-depthwise-dil2": ((4,), (1,), ((2, 1),), (2,), 4, 4, 4, (10,)),
    "2d-k3": ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, 5, 1, (5, 6)),
    "2d-k3-s2-dil2-groups2": ((3, 3), (2, 1), ((0, 1), (2, 0)), (2, 1), 4, 6, 2, (7, 6)),
    "2d-k1": ((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 5, 3, 1, (4, 5)),
    "2d-k5": ((5, 5), (1, 2), ((2, 2), (2, 2)), (1, 1), 2, 3, 1, (5, 5)),
    "2d-k3-depthwise": ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 3, 6, 3, (4, 4)),
    "3d-k3": ((3, 3, 3), (1, 1, 1), ((1, 1), (0, 1), (1, 0)), (1, 1, 1), 2, 3, 1, (3, 4, 3)),
    "3d-k133-s2": ((1, 3, 3), (2, 1, 2), ((0, 0), (1, 1), (1, 1)), (1, 1, 1), 2, 4, 2, (4, 4, 5)),
    "2d-k7": ((7, 7), (1, 1), ((3, 3), (3, 3)), (1, 1), 1, 2, 1, (4, 4)),
}


def _geometry(case) -> dict:
    ks, stride, padding, dilation = case[:4]
    return {"kernel_size": ks, "stride": stride, "padding": padding, "dilation": dilation}


def _conv_inputs(case, n, dtype, device, gen, channels_last=False, c_scale=1):
    ks, stride, padding, dilation, c_in, c_out, groups, size = case
    c_in, c_out = c_in * c_scale, c_out * c_scale
    x = torch.randn(n, c_in, *size, generator=gen).to(dtype).to(device)
    if channels_last and len(size) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    u = ref.conv_patches(x, ks, stride, padding, dilation)
    d = len(ks)
    l_shape = u.shape[2 : 2 + d]
    # gout as a strided view too: every other channel of a wider tensor
    g = torch.randn(n, 2 * c_out, *l_shape, generator=gen).to(dtype).to(device)[:, ::2]
    return x, u, g


def _check_conv_two_steps(case, dtype, n, config=None, channels_last=False, c_scale=1, scale=0.5, split=None):
    device = kernel_device()
    ks, _, _, _, c_in, c_out, groups, _ = case
    gen = torch.Generator().manual_seed(7 + sum(ks) + c_in)
    b = math.prod(ks)
    n_blocks = (c_out * c_scale) * (c_in * c_scale // groups)
    f = torch.full((n_blocks, ref.tril_size(b)), float("nan"), device=device)
    f_ref = f.clone()
    for decay in (0.0, 0.9):
        x, u, g = _conv_inputs(case, n, dtype, device, gen, channels_last, c_scale)
        fisher_stats.conv_fisher_ema_(f, x, g, **_geometry(case), groups=groups, scale=scale, decay=decay,
                                      config=config, samples_split=split)
        ref.fisher_ema_(f_ref, ref.conv_fisher(u.double(), g.double(), groups, scale), decay)
        assert torch.isfinite(f).all()
        _assert_close(f, f_ref)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_geometries(name):
    _check_conv_two_steps(CONV_CASES[name], torch.float32, n=3 if QUICK else 8)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes(mode):
    """Zero padding is masked inside the kernel; the other modes pad the input first."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(21)
    ks, stride, padding, dilation = (3, 3), (2, 1), ((2, 1), (1, 2)), (1, 2)
    x = torch.randn(3, 4, 6, 7, generator=gen).to(device)
    u = ref.conv_patches(x, ks, stride, padding, dilation, mode)
    g = torch.randn(3, 6, *u.shape[2:4], generator=gen).to(device)
    f = torch.full((6 * 2, 45), float("nan"), device=device)
    fisher_stats.conv_fisher_ema_(f, x, g, kernel_size=ks, stride=stride, padding=padding, dilation=dilation,
                                  padding_mode=mode, groups=2, scale=0.7, decay=0.0)
    _assert_close(f, ref.conv_fisher(u.double(), g.double(), 2, 0.7).float())


@pytest.mark.parametrize("split", [2, 3, 5, 9])
@pytest.mark.parametrize("name,block_t", [("2d-k3", 16), ("2d-k5", 16), ("2d-k1", 16), ("3d-k3", 64)])
def test_conv_samples_split(name, block_t, split):
    """The batch cut into chunks, one per program, partial sums reduced after (a GPU does this for layers
    with few channel tiles): whole-block, T-tiled, 1x1 and 3-D paths; 9 > N = 5 samples clamps."""
    cfg = FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    _check_conv_two_steps(CONV_CASES[name], torch.float32, n=5, config=cfg, split=split)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_dtypes_channels_last(dtype):
    _check_conv_two_steps(CONV_CASES["2d-k3-s2-dil2-groups2"], dtype, n=2, channels_last=True)


@pytest.mark.parametrize(
    "config",
    [
        FisherStatsConfig(block_o=16, block_k=16, block_t=16),  # T and L tiled, O tile partly empty
        FisherStatsConfig(block_o=32, block_k=64, block_t=64, num_warps=8),
        FisherStatsConfig(block_o=32, block_k=16, block_t=64, num_warps=8, precision="tf32x3"),
    ],
    ids=["small-tiles", "large-tiles", "tf32x3"],
)
def test_conv_configs(config):
    # C_out per group = 18 > 16: several output-channel tiles per group
    _check_conv_two_steps(CONV_CASES["2d-k3-s2-dil2-groups2"], torch.float32, n=2, config=config, c_scale=6)


def test_reference_conv_fisher_matches_autograd():
    """Sanity of the oracle itself: per-sample grads of a real nn.Conv2d, their sum and their Fisher."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False).double()
    x = torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64)
    gout = torch.randn(3, 6, 4, 3, generator=gen, dtype=torch.float64)
    (conv(x) * gout).sum().backward()
    per_sample = []
    for i in range(x.shape[0]):
        (gw,) = torch.autograd.grad((conv(x[i : i + 1]) * gout[i : i + 1]).sum(), conv.weight)
        per_sample.append(gw)
    per_sample = torch.stack(per_sample)  # (N, C_out, C_in/groups, 3, 3)
    torch.testing.assert_close(per_sample.sum(0), conv.weight.grad)
    u = ref.conv_patches(x, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1))
    fhat = ref.conv_fisher(u, gout, groups=2, scale=1.0)
    expected = ref.outer_fisher(per_sample.reshape(3, 6 * 2, 9))
    torch.testing.assert_close(fhat.double(), expected.double(), **tol(torch.float32))


# ----------------------------------------------------------------------------------------------------
# Finite guard
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_t", [16, 64], ids=["tiled-T", "one-T-tile"])
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_linear_finite_guard(block_t, decay):
    device = kernel_device()
    gen = torch.Generator().manual_seed(11)
    b, m, n_in, n_out = 9, 20, 30, 5
    x = torch.randn(m, n_in, generator=gen)
    x[4, 12] = float("inf")  # chunk 1 of every output row
    g = torch.randn(m, n_out, generator=gen)
    x, g = x.to(device), g.to(device)
    f0 = torch.rand(n_out * 4, ref.tril_size(b), generator=gen).to(device)
    f = f0.clone()
    cfg = FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    fisher_stats.linear_fisher_ema_(f, x, g, b=b, scale=1.0, decay=decay, config=cfg)
    f_ref = ref.fisher_ema_(f0.clone(), ref.linear_fisher(x.double(), g.double(), b, 1.0), decay)
    bad = torch.arange(n_out * 4, device=device) % 4 == 1
    assert torch.equal(f[bad], f0[bad])  # kept bit for bit
    assert not torch.equal(f[~bad], f0[~bad])
    _assert_close(f, f_ref)


@pytest.mark.parametrize("block_t", [16, 64], ids=["tiled-T", "one-T-tile"])
def test_conv_finite_guard(block_t):
    device = kernel_device()
    gen = torch.Generator().manual_seed(12)
    case = CONV_CASES["2d-k3-s2-dil2-groups2"]
    ks, stride, padding, dilation, c_in, c_out, groups, size = case
    x = torch.randn(2, c_in, *size, generator=gen)
    x[1, 3, 2, 2] = float("nan")  # input channel 3 = channel 1 of group 1
    u = ref.conv_patches(x.to(device), ks, stride, padding, dilation)
    g = torch.randn(2, c_out, *u.shape[2:4], generator=gen).to(device)
    f0 = torch.rand(c_out * 2, 45, generator=gen).to(device)
    f = f0.clone()
    cfg = FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    fisher_stats.conv_fisher_ema_(f, x.to(device), g, **_geometry(case), groups=groups, scale=1.0, decay=0.3,
                                  config=cfg)
    f_ref = ref.fisher_ema_(f0.clone(), ref.conv_fisher(u.double(), g.double(), groups, 1.0), 0.3)
    o = torch.arange(c_out * 2, device=device) // 2
    bad = (o >= c_out // groups) & (torch.arange(c_out * 2, device=device) % 2 == 1)
    assert torch.equal(f[bad], f0[bad])
    assert not torch.equal(f[~bad], f0[~bad])
    _assert_close(f, f_ref)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("name,block_t", [("2d-k5", 16), ("2d-k5", 64), ("3d-k3", 32), ("2d-k3", 16),
                                          ("2d-k1", 16)])
def test_conv_finite_guard_any_path(name, block_t, split):
    """A NaN in one input channel: exactly the mini-blocks that read it keep their old F, on both kernel
    paths (whole blocks per program for b <= 16, packed-entry tiles otherwise, T tiled or not)."""
    device = kernel_device()
    case = CONV_CASES[name]
    ks, stride, padding, dilation, c_in, c_out, groups, size = case
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, c_in, *size, generator=gen)
    x[1, c_in - 1].view(-1)[0] = float("nan")
    x = x.to(device)
    u = ref.conv_patches(x, ks, stride, padding, dilation)
    g = torch.randn(2, c_out, *u.shape[2 : 2 + len(ks)], generator=gen).to(device)
    b = math.prod(ks)
    f0 = torch.rand(c_out * (c_in // groups), ref.tril_size(b), generator=gen).to(device)
    f = f0.clone()
    cfg = FisherStatsConfig(block_o=16, block_k=16, block_t=block_t)
    fisher_stats.conv_fisher_ema_(f, x, g, **_geometry(case), groups=groups, scale=1.0, decay=0.3, config=cfg,
                                  samples_split=split)
    fhat = ref.conv_fisher(u.double(), g.double(), groups, 1.0)
    bad = ~torch.isfinite(fhat).all(dim=1)
    assert bad.any() and not bad.all()
    assert torch.equal(f[bad], f0[bad])
    _assert_close(f[~bad], ref.fisher_ema_(f0.clone()[~bad], fhat[~bad], 0.3))


# ----------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------


def test_bad_arguments():
    device = kernel_device()
    x = torch.randn(8, 10, device=device)
    g = torch.randn(8, 3, device=device)
    f = torch.zeros(3 * 3, 10, device=device)
    with pytest.raises(ValueError, match="gout"):
        fisher_stats.linear_fisher_ema_(f, x, g[:5], b=4, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="x"):
        fisher_stats.linear_fisher_ema_(f, x.long(), g, b=4, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="f "):
        fisher_stats.linear_fisher_ema_(f[:, :9], x, g, b=4, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="f must be a float32"):
        fisher_stats.linear_fisher_ema_(f.double(), x, g, b=4, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="decay"):
        fisher_stats.linear_fisher_ema_(f, x, g, b=4, scale=1.0, decay=1.5)
    with pytest.raises(ValueError, match="block_t"):
        FisherStatsConfig(block_t=24)
    xc = torch.randn(2, 4, 5, 5, device=device)
    gc = torch.randn(2, 6, 5, 5, device=device)
    fc = torch.zeros(6 * 2, 45, device=device)
    geo = {"kernel_size": (3, 3), "padding": 1}
    with pytest.raises(ValueError, match="groups"):
        fisher_stats.conv_fisher_ema_(fc, xc, gc, **geo, groups=3, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="gout"):
        fisher_stats.conv_fisher_ema_(fc, xc, gc[:, :, :4], **geo, groups=2, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="gout"):  # the output size does not follow from this geometry
        fisher_stats.conv_fisher_ema_(fc, xc, gc, kernel_size=(3, 3), groups=2, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="x "):
        fisher_stats.conv_fisher_ema_(fc, xc[0, 0], gc, **geo, groups=2, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="kernel_size"):
        fisher_stats.conv_fisher_ema_(fc, xc, gc, kernel_size=(3, 3, 3), padding=1, groups=2, scale=1.0,
                                      decay=0.0)
    with pytest.raises(ValueError, match="padding_mode"):
        fisher_stats.conv_fisher_ema_(fc, xc, gc, **geo, padding_mode="mirror", groups=2, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="samples_split"):
        fisher_stats.conv_fisher_ema_(fc, xc, gc, **geo, groups=2, scale=1.0, decay=0.0, samples_split=0)
    with pytest.raises(ValueError, match="padding_mode"):  # checked even where there is no padding
        fisher_stats.conv_fisher_ema_(fc, xc, gc[:, :, 1:4, 1:4], kernel_size=(3, 3), padding_mode="mirror",
                                      groups=2, scale=1.0, decay=0.0)
    # nn.Conv2d's forms of padding: an int, one int per dim, or (left, right) pairs
    outs = []
    for padding in (1, (1, 1), ((1, 1), (1, 1))):
        out = torch.zeros_like(fc)
        fisher_stats.conv_fisher_ema_(out, xc, gc, kernel_size=(3, 3), padding=padding, groups=2, scale=1.0,
                                      decay=0.0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert hash(ref.ConvGeometry([3, 3], [1, 1], [[1, 1], [1, 1]], [1, 1])) == hash(
        ref.ConvGeometry((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)))


# ----------------------------------------------------------------------------------------------------
# GPU: realistic shapes, no recompilation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_linear_realistic_shape():
    _check_linear_two_steps(16, 1000, 784, 1000, torch.float32, strided=False, scale=0.05)
    _check_linear_two_steps(16, 1000, 784, 1000, torch.bfloat16, strided=True, scale=0.05)
    tf32x3 = FisherStatsConfig(block_o=64, block_k=32, block_t=64, num_warps=8, precision="tf32x3")
    _check_linear_two_steps(16, 1000, 784, 1000, torch.float32, strided=False, scale=0.05, config=tf32x3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_realistic_shape(dtype):
    vgg = ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 64, 64, 1, (16, 16))
    _check_conv_two_steps(vgg, dtype, n=32, scale=0.02)
    depthwise = ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 128, 128, 128, (16, 16))
    _check_conv_two_steps(depthwise, dtype, n=32, scale=0.05)
    stem = ((7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 3, 64, 1, (32, 32))
    _check_conv_two_steps(stem, dtype, n=16, scale=0.02, channels_last=True)
    tf32x3 = FisherStatsConfig(block_o=32, block_k=16, block_t=64, num_warps=8, precision="tf32x3")
    _check_conv_two_steps(vgg, dtype, n=32, scale=0.02, config=tf32x3)


def _n_compiled(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)  # triton >= 3.0: device -> (kernel_cache, ...)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in kernel.cache.values())  # older triton: device -> {key: kernel}


@pytest.mark.gpu
def test_no_recompilation_on_decay_and_scale():
    device = kernel_device()
    x = torch.randn(64, 40, device=device)
    g = torch.randn(64, 30, device=device)
    f = torch.zeros(30 * 5, 36, device=device)
    xc = torch.randn(4, 4, 8, 8, device=device)
    gc = torch.randn(4, 8, 8, 8, device=device)
    fc = torch.zeros(8 * 4, 45, device=device)
    fisher_stats.linear_fisher_ema_(f, x, g, b=8, scale=1.0, decay=0.0)
    fisher_stats.conv_fisher_ema_(fc, xc, gc, kernel_size=(3, 3), padding=1, groups=1, scale=1.0, decay=0.0)
    lin = _n_compiled(fisher_stats._linear_fisher_ema_kernel)
    conv = _n_compiled(fisher_stats._conv_fisher_ema_kernel)
    assert lin >= 1 and conv >= 1
    for step, (decay, scale) in enumerate([(0.9, 0.5), (0.95, 3.0), (0.5, 1e-3), (0.0, 7.0)]):
        fisher_stats.linear_fisher_ema_(f, x, g, b=8, scale=scale, decay=decay)
        fisher_stats.conv_fisher_ema_(fc, xc, gc, kernel_size=(3, 3), padding=1, groups=1, scale=scale,
                                      decay=decay)
    assert _n_compiled(fisher_stats._linear_fisher_ema_kernel) == lin
    assert _n_compiled(fisher_stats._conv_fisher_ema_kernel) == conv


def test_sample_split_heuristic(monkeypatch):
    """About 4 programs per SM on a GPU (here a pretend 132-SM device), never more splits than samples,
    no split on the CPU."""
    monkeypatch.setattr(fisher_stats, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert fisher_stats.sample_split(128, 16, cuda) == 33  # ResNet-32 stage 1: 16 programs
    assert fisher_stats.sample_split(128, 256, cuda) == 3
    assert fisher_stats.sample_split(128, 16384, cuda) == 1  # VGG-16's wide layers fill the GPU alone
    assert fisher_stats.sample_split(5, 16, cuda) == 5
    assert fisher_stats.sample_split(128, 16, torch.device("cpu")) == 1
