"""Pure-PyTorch reference of every MBF computation.

This module is three things at once: the CPU path of the optimizer (``backend="torch"``), the
vendor baseline the benchmarks compare against (batched ``torch.linalg`` on small matrices) and the
oracle every Triton kernel is tested against.  It only uses batched torch ops: no Python loop over
samples or mini-blocks.

Storage conventions shared with the Triton kernels (``kernels/``):

* A parameter is viewed as a 2-D matrix ``(rows, cols)`` (see :mod:`mbf_triton.blocks`). Each row is
  cut into ``ceil(cols / b)`` consecutive chunks of ``b`` entries; a short last chunk is zero-padded to
  ``b``. Mini-block ``i = r * n_chunks + j`` holds ``W[r, j*b:(j+1)*b]``.
* The running Fisher estimate of the mini-blocks is one fp32 tensor ``F`` of shape
  ``(n_blocks, b*(b+1)//2)``: the lower triangle of each symmetric ``b x b`` block, packed row by row,
  entry ``(p, q)`` with ``q <= p`` at ``p*(p+1)//2 + q``. Padded rows/columns of a short chunk stay 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf

__all__ = [
    "tril_size",
    "tril_indices",
    "diag_indices",
    "pack_tril",
    "unpack_tril",
    "to_blocks",
    "from_blocks",
    "linear_fisher",
    "outer_fisher",
    "ConvGeometry",
    "conv_patches",
    "conv_fisher",
    "fisher_ema_",
    "and_not_skipped",
    "BlockFactor",
    "damped_cholesky",
    "block_solve",
    "damped_block_solve",
    "apply_update_",
]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: low-precision inputs are upcast, float64 (the oracle's precision) is kept."""
    return t if t.dtype == torch.float64 else t.float()


def tril_size(b: int) -> int:
    """Number of entries of the packed lower triangle of a ``b x b`` block."""
    return b * (b + 1) // 2


@functools.lru_cache(maxsize=None)
def _tril_indices_cpu(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.tril_indices enumerates row by row, column ascending: exactly the packed order.
    idx = torch.tril_indices(b, b)
    return idx[0].contiguous(), idx[1].contiguous()


def tril_indices(b: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every packed entry, in packed order."""
    rows, cols = _tril_indices_cpu(b)
    return rows.to(device), cols.to(device)


def diag_indices(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed position of each diagonal entry ``(p, p)``: ``p*(p+3)//2``."""
    p = torch.arange(b, device=device)
    return p * (p + 3) // 2


def pack_tril(a: torch.Tensor) -> torch.Tensor:
    """``(..., b, b)`` -> ``(..., b*(b+1)//2)``: the lower triangle, row by row."""
    b = a.shape[-1]
    rows, cols = tril_indices(b, a.device)
    return a.flatten(-2).index_select(-1, rows * b + cols)  # index_select: ~5x faster than a[..., rows, cols]


def unpack_tril(p: torch.Tensor, b: int) -> torch.Tensor:
    """``(..., b*(b+1)//2)`` -> symmetric ``(..., b, b)``."""
    if p.shape[-1] != tril_size(b):
        raise ValueError(f"packed size {p.shape[-1]} does not match b={b} ({tril_size(b)} expected)")
    return p.index_select(-1, _symmetric_gather(b, p.device)).unflatten(-1, (b, b))


@functools.lru_cache(maxsize=None)
def _symmetric_gather_cpu(b: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    hi, lo = torch.maximum(i, j), torch.minimum(i, j)
    return (hi * (hi + 1) // 2 + lo).reshape(-1)


def _symmetric_gather(b: int, device: torch.device | str) -> torch.Tensor:
    """Packed position of every entry ``(i, j)`` of a symmetric ``b x b`` block, row-major."""
    return _symmetric_gather_cpu(b).to(device)


def to_blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """``(rows, cols)`` -> ``(rows * ceil(cols/b), b)``, the short last chunk of each row zero-padded."""
    rows, cols = x.shape
    pad = -cols % b
    if pad:
        x = tnf.pad(x, (0, pad))
    return x.reshape(rows * ((cols + pad) // b), b)


def from_blocks(xb: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drops the padding."""
    return xb.reshape(rows, -1)[:, :cols]


def linear_fisher(x: torch.Tensor, gout: torch.Tensor, b: int, scale: float) -> torch.Tensor:
    """Batch Fisher of the fan-in mini-blocks of a Linear weight, packed.

    ``x``: inputs ``(M, in)``; ``gout``: gradients of the loss w.r.t. the outputs ``(M, out)``.
    The per-sample gradient of mini-block ``(o, j)`` is ``scale * gout[m, o] * x[m, j*b:(j+1)*b]``
    (``scale`` turns the captured gradient of the reduced loss into the gradient of one sample's loss),
    so ``Fhat[(o, j)] = scale**2 / M * sum_m gout[m, o]**2 x_j[m] x_j[m]^T``: one matrix product
    ``(gout**2)^T @ Z`` with ``Z[m, (j, t)]`` the packed outer products of the input chunks.
    Returns ``(out * n_chunks, b*(b+1)//2)`` fp32.
    """
    m, n_in = x.shape
    n_out = gout.shape[1]
    x = _f32(x)
    xb = to_blocks(x, b)  # (M * n_chunks, b)
    n_chunks = xb.shape[0] // m
    rows, cols = tril_indices(b, x.device)
    z = (xb.index_select(1, rows) * xb.index_select(1, cols)).reshape(m, -1)  # (M, n_chunks * T)
    g2 = _f32(gout).square().to(z.dtype)
    fhat = (g2.t() @ z).mul_(scale * scale / m)  # (out, n_chunks * T)
    return fhat.reshape(n_out * n_chunks, tril_size(b))


def outer_fisher(g: torch.Tensor) -> torch.Tensor:
    """``(1/N) sum_n g[n, i] g[n, i]^T`` for per-sample mini-block gradients ``g`` ``(N, n_blocks, b)``.

    Returns the packed ``(n_blocks, b*(b+1)//2)`` fp32 result.
    """
    n, _, b = g.shape
    gt = _f32(g).permute(1, 0, 2)  # (n_blocks, N, b): one small Gram matrix per block, as a batched GEMM
    return pack_tril(torch.bmm(gt.transpose(1, 2), gt)).div_(n)


_CONV_TILE_ELEMENTS = 1 << 21  # per-sample gradient entries held at once by conv_fisher (8 MiB in fp32)


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution reads its input, as in ``nn.Conv*d`` (``padding``: ``(left, right)`` per dim)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:  # tuples, so that a geometry can key a cache
        object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))
        object.__setattr__(self, "stride", tuple(int(s) for s in self.stride))
        object.__setattr__(self, "padding", tuple((int(lo), int(hi)) for lo, hi in self.padding))
        object.__setattr__(self, "dilation", tuple(int(d) for d in self.dilation))

    @classmethod
    def of(cls, module) -> ConvGeometry:
        """The geometry of an ``nn.Conv1d/2d/3d`` (string paddings resolved as PyTorch does)."""
        k, dil = module.kernel_size, module.dilation
        if module.padding == "valid":
            padding = tuple((0, 0) for _ in k)
        elif module.padding == "same":
            total = [di * (ki - 1) for ki, di in zip(k, dil)]
            padding = tuple((t // 2, t - t // 2) for t in total)
        else:
            padding = tuple((pi, pi) for pi in module.padding)
        return cls(tuple(k), tuple(module.stride), padding, tuple(dil), module.padding_mode)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`conv_patches` of ``x`` under this geometry."""
        return conv_patches(x, self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode)

    def kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``mbf_triton.kernels.fisher_stats.conv_fisher_ema_``."""
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "padding_mode": self.padding_mode}


def conv_patches(
    x: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Strided view of the receptive fields of an N-d convolution (no copy for zero padding).

    ``x``: ``(N, C, *S)`` with ``d = len(kernel_size)`` spatial dims; ``padding``: ``(left, right)`` per
    spatial dim. Returns ``u`` of shape ``(N, C, *L, *K)``, ``u[n, c, l..., k...] = x_pad[n, c, l*stride
    + k*dilation]``, where ``L`` is the convolution's output size and ``K = kernel_size``.
    """
    d = len(kernel_size)
    pads = [p for lr in reversed(padding) for p in lr]  # F.pad wants the last dim first
    if any(pads):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = tnf.pad(x, pads, mode=mode)
    for i in range(d):
        window = dilation[i] * (kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, window, stride[i])  # appends the window as the last dim
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    return x


def conv_fisher(u: torch.Tensor, gout: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """Batch Fisher of the per-kernel mini-blocks of a convolution weight, packed.

    ``u``: receptive fields ``(N, C_in, *L, *K)`` (:func:`conv_patches`); ``gout``: gradients w.r.t.
    the output ``(N, C_out, *L)``. The exact per-sample gradient of the weight is
    ``G[n, o, c, k] = scale * sum_l gout[n, o, l] * u[n, g*C_in/groups + c, l, k]`` (``g`` = group of
    ``o``); mini-block ``o * C_in/groups + c`` is ``G[n, o, c, :]``. Returns
    ``(C_out * C_in/groups, prod(K)*(prod(K)+1)//2)`` fp32.

    The per-sample gradients are formed for a tile of output channels at a time (at most
    ``_CONV_TILE_ELEMENTS`` of them at once, as the kernel forms a tile of blocks in registers), each
    tile's by one GEMM over the output positions, and folded into their Gram matrices by another.
    """
    n, c_in = u.shape[:2]
    d = (u.dim() - 2) // 2
    k = 1
    for s in u.shape[2 + d :]:
        k *= s
    c_out = gout.shape[1]
    cg, og = c_in // groups, c_out // groups
    ug = _f32(u).reshape(n, groups, cg, -1, k)  # (N, G, Cg, L, K)
    gg = _f32(gout).to(ug.dtype).reshape(n, groups, og, -1)  # (N, G, Og, L)
    out = ug.new_empty(groups, og, cg, tril_size(k))
    tile = max(1, _CONV_TILE_ELEMENTS // (n * groups * cg * k))
    for o0 in range(0, og, tile):
        o1 = min(og, o0 + tile)
        per_sample = torch.einsum("ngol,ngclk->ngock", gg[:, :, o0:o1], ug).mul_(scale)  # (N, G, Ot, Cg, K)
        out[:, o0:o1] = outer_fisher(per_sample.reshape(n, -1, k)).view(groups, o1 - o0, cg, -1)
    return out.reshape(c_out * cg, -1)


def host_skip(skip: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
    """``(skipped, flag)``: a flag in host memory is read at no cost, and then no write needs guarding
    (``flag`` None); a device's flag is passed on, for the ops to guard their writes with it."""
    if skip is not None and skip.device.type == "cpu":
        return bool(skip.item()), None
    return False, skip


def and_not_skipped(ok: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """``ok`` where the step is not skipped, all false where it is. ``skip``: the step's one-element flag
    (bool, or uint8 0/1); one elementwise op, ``ok > skip``, as these run for every small parameter."""
    return ok if skip is None else ok > skip.reshape(1)


def fisher_ema_(f: torch.Tensor, fhat: torch.Tensor, decay: float, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``F <- decay * F + (1 - decay) * Fhat`` in place (``decay=0`` initialises ``F = Fhat``).

    A mini-block whose new value is not finite keeps its old value: a non-finite statistic never
    reaches the curvature state. ``skip``: the step's device-side skip flag (one element, bool or uint8;
    non-zero: ``F`` is left as it is), read without a host synchronisation.
    """
    fhat = fhat.to(f.dtype)
    new = fhat if decay == 0.0 else torch.lerp(fhat, f, decay)
    if skip is None and new.device.type == "cpu" and torch.isfinite(new.sum()):
        # no flag to honour (the torch backend read its host flag already): one reduction answers for every
        # block on the CPU (inf/NaN anywhere make the sum non-finite; a sum that overflows from finite
        # entries takes the per-block path below)
        f.copy_(new)
        return f
    # |x| < inf is false for NaN and +-Inf: torch.isfinite in two elementwise ops instead of four
    ok = and_not_skipped((new.abs() < math.inf).all(dim=-1, keepdim=True), skip)
    f.copy_(torch.where(ok, new, f))
    return f


def diag_fisher_ema_(
    fs: list[torch.Tensor],
    grads: list[torch.Tensor],
    decay: float,
    skip: torch.Tensor | None = None,
    fhats: list[torch.Tensor] = (),
) -> None:
    """:func:`fisher_ema_` for many parameters of 1x1 mini-blocks at once.

    ``fs``: ``(numel, 1)`` running estimates on one device: first those of the parameters in ``grads``,
    then those of ``fhats``. A parameter without per-sample information (norm scales, ...) has its batch
    gradient in ``grads``: it stands in for one sample, ``Fhat_i = g_i^2`` (:func:`outer_fisher` of one
    sample). One with per-sample information (a layer's bias) has its batch statistic in ``fhats``. The
    same numbers as one :func:`fisher_ema_` per parameter, in a fixed handful of launches instead of
    several per parameter.
    """
    if not fs:
        return
    if len(fs) != len(grads) + len(fhats):
        raise ValueError("fs must hold one tensor per entry of grads and fhats")
    parts = [h.reshape(-1).float() for h in fhats]
    if grads:  # fp32 like F (float64 grads too)
        parts.insert(0, torch.cat([g.reshape(-1).float() for g in grads]).square_())
    fhat = torch.cat(parts) if len(parts) > 1 else parts[0]
    f = torch.cat([x.reshape(-1) for x in fs])
    fisher_ema_(f[:, None], fhat[:, None], decay, skip)
    torch._foreach_copy_([x.view(-1) for x in fs], list(f.split([x.numel() for x in fs])))


_VECTORISED_CHOLESKY_MAX_B = 32  # measured on a 2-core CPU: vectorised 2x faster at b=9-16, 2x slower at b=64


@dataclass(frozen=True)
class BlockFactor:
    """The damped Cholesky factors of many ``b x b`` mini-blocks, batch-last (:func:`damped_cholesky`).

    ``chol``: ``(b*(b+1)//2, n)``, the lower factor of ``F_i + damping * I`` packed row by row (the same
    order as ``F``), one column per block: row ``p`` of every factor is the contiguous slab
    ``chol[p*(p+1)//2 : p*(p+1)//2 + p + 1]``. ``fallback``: ``(n,)`` blocks whose factorisation met a
    non-positive or non-finite pivot; ``diag_denom``: ``(b, n)`` their ``max(diag F, 0) + damping``.
    """

    b: int
    chol: torch.Tensor
    fallback: torch.Tensor
    diag_denom: torch.Tensor
    any_fallback: bool | None = None  # False: no block fell back (set by a caller that may read it), else None

    @classmethod
    def of(cls, b: int, chol: torch.Tensor, fallback: torch.Tensor, diag: torch.Tensor, damping: float):
        return cls(b, chol, fallback, diag.clamp(min=0).add_(damping))

    @classmethod
    def join(cls, factors: list[BlockFactor]) -> BlockFactor:
        """The factors of several block sets as one (blocks in order), as if factored together."""
        none = all(f.any_fallback is False for f in factors)
        return cls(factors[0].b, torch.cat([f.chol for f in factors], 1), torch.cat([f.fallback for f in factors]),
                   torch.cat([f.diag_denom for f in factors], 1), False if none else None)

    def rows(self, start: int, stop: int) -> BlockFactor:
        """The factors of blocks ``start .. stop - 1`` (views)."""
        return BlockFactor(self.b, self.chol[:, start:stop], self.fallback[start:stop],
                           self.diag_denom[:, start:stop], False if self.any_fallback is False else None)


def damped_cholesky(f: torch.Tensor, b: int, damping: float) -> BlockFactor:
    """Cholesky factors of ``F_i + damping * I`` for every packed block of ``f`` ``(n, b*(b+1)//2)``.

    For ``b <= 32`` vectorised across the blocks (batch-last: every torch op works on all ``n`` blocks at
    once, ``O(b)`` ops in all), the way the solve kernel factors one block per lane; on the CPU this is
    about twice as fast as ``torch.linalg.cholesky_ex`` on thousands of tiny matrices. Larger blocks use
    ``cholesky_ex``. A block with a non-positive or non-finite pivot is flagged in ``fallback`` (its factor
    entries are then meaningless). The factor of each block depends on that block alone (bit for bit).
    """
    n = f.shape[0]
    if b > _VECTORISED_CHOLESKY_MAX_B:  # O(b) ops of O(n b^2) work each lose to LAPACK's blocked code here
        a = unpack_tril(f, b)
        a.diagonal(dim1=-2, dim2=-1).add_(damping)
        chol, info = torch.linalg.cholesky_ex(a)
        packed_chol = pack_tril(chol).t().contiguous()
        bad = (info != 0) | ~torch.isfinite(packed_chol.sum(dim=0))
        diag = f.index_select(1, diag_indices(b, f.device)).t()
        return BlockFactor.of(b, packed_chol, bad, diag, damping)
    packed = f.t().contiguous()  # (T, n): row p of every block is packed[p*(p+1)//2 : ... + p + 1]
    # the lower triangle, batch-last, row by row (contiguous slabs); the upper triangle is never read
    a = torch.empty(b, b, n, dtype=f.dtype, device=f.device)
    for p in range(b):
        a[p, : p + 1].copy_(packed[p * (p + 1) // 2 : (p + 1) * (p + 2) // 2])
    a.diagonal(dim1=0, dim2=1).add_(damping)  # diagonal() puts the batch dim first: (n, b)
    bad = torch.zeros(n, dtype=torch.bool, device=f.device)
    for k in range(b):  # right-looking; only the lower triangle of `a` is read
        pivot = a[k, k]
        bad |= ~((pivot > 0) & (pivot < math.inf))  # also true for NaN
        d = pivot.masked_fill(bad, 1.0).sqrt_()
        a[k, k] = d
        if k + 1 < b:
            col = a[k + 1 :, k].div_(d)  # (b-k-1, n)
            # the whole trailing square in one op (twice the lower triangle's work, ~b times fewer ops)
            a[k + 1 :, k + 1 :].addcmul_(col[:, None], col[None, :], value=-1.0)
    chol = torch.cat([a[p, : p + 1] for p in range(b)])  # (T, n), packed row by row
    # a non-finite entry makes a later pivot non-finite; this also catches overflow in the last row
    bad |= ~torch.isfinite(chol.sum(dim=0))
    diag = f.index_select(1, diag_indices(b, f.device)).t()  # (b, n)
    return BlockFactor.of(b, chol, bad, diag, damping)


def block_solve(factor: BlockFactor, g: torch.Tensor) -> torch.Tensor:
    """``d_i = (F_i + damping * I)^{-1} g_i`` from :func:`damped_cholesky`'s factors; ``g``: ``(n, b)``.

    Forward and back substitution on all blocks at once (each reads contiguous rows of the packed factor);
    fallback blocks take ``g / (max(diag F, 0) + damping)``. Returns ``(n, b)`` in the factor's dtype.
    """
    b, chol = factor.b, factor.chol
    rhs = g.to(chol.dtype).t().contiguous()  # (b, n)
    y = rhs.clone()
    for i in range(b):  # L y = g, row by row, in place
        start = i * (i + 1) // 2
        if i:
            y[i].sub_((chol[start : start + i] * y[:i]).sum(dim=0))
        y[i].div_(chol[start + i])
    for i in reversed(range(b)):  # L^T x = y, column by column: x_i, then remove it from the rows above
        start = i * (i + 1) // 2
        y[i].div_(chol[start + i])
        if i:
            y[:i].addcmul_(chol[start : start + i], y[i], value=-1.0)
    if factor.any_fallback is False:
        return y.t()
    return torch.where(factor.fallback, rhs / factor.diag_denom, y).t()


def damped_block_solve(
    f: torch.Tensor, g: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_i = (F_i + damping * I)^{-1} g_i`` for every mini-block, by Cholesky.

    ``f``: packed ``(n, b*(b+1)//2)`` fp32; ``g``: ``(n, b)``. A block whose Cholesky factorisation
    fails (non-positive or non-finite pivot) falls back to the diagonal,
    ``d = g / (max(diag(F_i), 0) + damping)``. Returns ``(d fp32 (n, b), fallback bool (n,))``.
    :func:`damped_cholesky` then :func:`block_solve`; a caller whose ``F`` did not change since the last
    step can keep the factor and call :func:`block_solve` alone (same numbers).
    """
    n, b = g.shape
    g = g.to(f.dtype)
    if b == 1:  # scalar blocks: no factorisation
        denom = f[:, :1] + damping
        fallback = ~(denom[:, 0] > 0) | ~torch.isfinite(denom[:, 0])
        d = torch.where(fallback[:, None], g / (f[:, :1].clamp(min=0) + damping), g / denom)
        return d, fallback
    factor = damped_cholesky(f, b, damping)
    return block_solve(factor, g), factor.fallback


def apply_update_(
    param: torch.Tensor | list[torch.Tensor],
    direction: torch.Tensor | list[torch.Tensor],
    momentum_buffer: torch.Tensor | list[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    skip: torch.Tensor | None = None,
) -> None:
    """Decoupled weight decay, heavy-ball momentum on the direction, then ``p -= lr * m``.

    ``m <- momentum * m + d``; ``p <- p * (1 - lr * weight_decay) - lr * m``; arithmetic in fp32
    (float64 for float64 parameters; ``momentum_buffer`` is fp32), the result cast to the parameter's dtype.
    ``skip``: the step's device-side skip flag; when set, ``param`` and ``momentum_buffer`` keep their values.
    The first three arguments may be lists (several parameters sharing the hyperparameters): fp32
    parameters without a flag are then updated in place by ``torch._foreach`` ops, the same arithmetic
    in a few calls.
    """
    if isinstance(param, torch.Tensor):
        param, direction, momentum_buffer = [param], [direction], [momentum_buffer]
    if skip is None and all(p.dtype == torch.float32 for p in param):
        torch._foreach_mul_(momentum_buffer, momentum)
        torch._foreach_add_(momentum_buffer, direction)
        if weight_decay != 0.0:
            torch._foreach_mul_(param, 1.0 - lr * weight_decay)
        torch._foreach_add_(param, momentum_buffer, alpha=-lr)
        return
    for p_, d_, m_ in zip(param, direction, momentum_buffer):
        _apply_one_(p_, d_, m_, lr, momentum, weight_decay, skip)


def _apply_one_(param, direction, momentum_buffer, lr, momentum, weight_decay, skip) -> None:
    m = momentum_buffer.mul(momentum).add_(direction)
    p = _f32(param)  # fp32 arithmetic (float64 for float64 parameters); out of place until the writes
    if weight_decay != 0.0:
        p = p.mul(1.0 - lr * weight_decay)
    p = p.add(m, alpha=-lr)
    if skip is not None:
        skipped = skip.reshape(1) if skip.dtype == torch.bool else skip.reshape(1) != 0
        m, p = torch.where(skipped, momentum_buffer, m), torch.where(skipped, param, p)
    momentum_buffer.copy_(m)
    param.copy_(p)
