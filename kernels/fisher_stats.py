"""Triton kernels forming the mini-block Fisher statistics and folding them into the running estimate.

Two launchers, both fused with the exponential moving average ``F <- decay * F + (1 - decay) * Fhat``
(``decay == 0`` ignores the old ``F``) and its finite guard (a mini-block whose new value has any
non-finite entry keeps its old value), exactly as :func:`mbf_triton.reference.fisher_ema_`:

* :func:`linear_fisher_ema_`: fan-in mini-blocks of a Linear weight,
  ``Fhat = scale^2 / M * (gout^2)^T @ Z`` with ``Z[m, (j, t)] = x[m, j*b+row(t)] * x[m, j*b+col(t)]``
  (:func:`mbf_triton.reference.linear_fisher`). ``Z`` only ever exists as register tiles.
* :func:`conv_fisher_ema_`: per-kernel mini-blocks of a convolution weight with exact per-sample
  gradients (:func:`mbf_triton.reference.conv_fisher`), read from the layer input itself (zero padding
  masked, never materialised). Per-sample gradients only exist in registers.

``F`` is fp32 ``(n_blocks, T)``, ``T = b*(b+1)//2``, the packed lower triangle row by row. When one
program sees whole mini-blocks and the whole batch, the EMA and the finite guard are applied in the
statistics kernel itself. Otherwise (packed columns tiled by ``BLOCK_T``, or the batch split across
programs) each program stores its raw partial statistic to a scratch buffer and one pass over each
mini-block (:func:`_partials_ema_kernel`) adds the partials in a fixed order and applies both.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import keep_step, skip_args

__all__ = ["FisherStatsConfig", "linear_fisher_ema_", "conv_fisher_ema_", "default_linear_config",
           "default_conv_config"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
PRECISIONS = ("ieee", "tf32x3")


@dataclass(frozen=True)
class FisherStatsConfig:
    """Tile sizes of the statistics kernels (all powers of two >= 16, as ``tl.dot`` needs).

    ``block_o``: output features/channels per program; ``block_k``: reduction tile (samples ``M`` for
    Linear, output positions ``L`` for conv); ``block_t``: packed triangle entries per program.
    """

    block_o: int = 32
    block_k: int = 32
    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 2
    precision: str = "ieee"  # of the main tl.dot: "ieee" (fp32 FMA) or "tf32x3" (tensor cores, ~fp32 accuracy)

    def __post_init__(self) -> None:
        for name in ("block_o", "block_k", "block_t"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# The heuristics below keep ptxas free of register spills: read off `cuobjdump -res-usage` for sm_90 with
# triton 3.9 (no GPU run). The earlier 4-warp tiles (linear o64 k32 t128, conv o32 k64 t64) spilled
# 376-1624 bytes of stack per thread; these use at most ~130 (linear) and ~105 (conv) registers.


def default_linear_config(n_out: int, t_size: int) -> FisherStatsConfig:
    """Heuristic tiles of :func:`linear_fisher_ema_` for ``n_out`` outputs and ``t_size`` packed entries."""
    return FisherStatsConfig(
        block_o=_pow2_clamp(n_out, 16, 64), block_k=32, block_t=_pow2_clamp(t_size, 16, 64), num_warps=8
    )


def conv_full_blocks(b: int) -> bool:
    """Whether the conv kernel forms whole mini-blocks per program (b <= 16): then ``block_t`` is unused."""
    return conv_k_pad(b) <= 16


def conv_k_pad(b: int) -> int:
    """Width of the conv kernel's per-sample gradient tile: ``b`` padded to a power of two >= 16 (the
    ``tl.dot`` minimum), except 1 for 1x1 kernels, whose gradient is a reduction over the positions."""
    return 1 if b == 1 else max(16, triton.next_power_of_2(b))


def default_conv_config(og: int, n_l: int, t_size: int) -> FisherStatsConfig:
    """Heuristic tiles of :func:`conv_fisher_ema_`: ``og`` outputs per group, ``n_l`` output positions.

    b <= 16 (3x3, 1x1, ...): whole mini-blocks per program (:func:`conv_full_blocks`), ``block_t`` unused,
    16 output channels (32 took ~195 registers: one program per SM).
    Larger b: the per-sample gradients are formed again for every tile of packed entries, so the tile is
    as wide as the register budget allows: 64 where ptxas stays at ~100-130 registers with no spill
    (sm_90, triton 3.9: gradient width 64), 32 where 64 would take ~205 registers (width 32: 5x5 and
    3x3x3 kernels) or more (width 128).
    """
    b = _tri_side(t_size)
    if b == 1:  # 1x1: a reduction over positions, one number per block: 56-64 registers
        return FisherStatsConfig(block_o=_pow2_clamp(og, 16, 32), block_k=32, block_t=16, num_warps=4)
    if conv_full_blocks(b):  # a (16, 16, 16) accumulator: 94-109 registers (triton 3.6 / 3.9), no spill
        return FisherStatsConfig(block_o=16, block_k=16, block_t=16, num_warps=8)
    block_t = _pow2_clamp(t_size, 16, 64 if conv_k_pad(b) == 64 else 32)
    return FisherStatsConfig(block_o=_pow2_clamp(og, 16, 32), block_k=16, block_t=block_t, num_warps=8)


def _tri_side(t_size: int) -> int:
    """``b`` of a packed triangle of ``t_size = b*(b+1)//2`` entries."""
    b = (math.isqrt(8 * t_size + 1) - 1) // 2
    if b * (b + 1) // 2 != t_size:
        raise ValueError(f"{t_size} is not a triangular number")
    return b


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tril_row_col(t):
    """Row ``p`` and column ``q`` (``q <= p``) of packed entry ``t = p*(p+1)//2 + q``."""
    tf = t.to(tl.float32)
    p = ((tl.sqrt(8.0 * tf + 1.0) - 1.0) * 0.5).to(tl.int32)
    # the float estimate can be off by one either way: correct it exactly in integers
    p = tl.where((p + 1) * (p + 2) // 2 <= t, p + 1, p)
    p = tl.where(p * (p + 1) // 2 > t, p - 1, p)
    q = t - p * (p + 1) // 2
    return p, q


@triton.jit
def _ema(fhat, old, decay):
    """torch.lerp(fhat, old, decay), the same two-sided formula; decay == 0: the old value (possibly
    garbage) must not leak in, hence a select, not arithmetic."""
    lerp = tl.where(decay < 0.5, fhat + decay * (old - fhat), old - (old - fhat) * (1.0 - decay))
    return tl.where(decay == 0.0, fhat, lerp)


@triton.jit
def _ema_guard_store(f_ptr, part_ptr, fhat, blk, offs_t, o_mask, t_mask, decay,
                     T: tl.constexpr, PARTIAL: tl.constexpr):
    """A ``(BLOCK_O, BLOCK_T)`` tile of mini-blocks ``blk`` (int64, one per row) holding whole blocks:
    EMA and guard into ``F``; or, ``PARTIAL``, its raw statistic to ``part_ptr`` (same layout)."""
    mask = o_mask[:, None] & t_mask[None, :]
    off = blk[:, None] * T + offs_t[None, :]
    if PARTIAL:
        tl.store(part_ptr + off, fhat, mask=mask)
    else:
        old = tl.load(f_ptr + off, mask=mask, other=0.0)
        new = _ema(fhat, old, decay)
        bad = tl.sum(tl.where(mask & ~(tl.abs(new) <= _FLT_MAX), 1, 0), axis=1)
        tl.store(f_ptr + off, tl.where(bad[:, None] == 0, new, old), mask=mask)


@triton.jit
def _ema_guard_store_blocks(f_ptr, part_ptr, fhat, blk, o_mask, decay, B: tl.constexpr, B_PAD: tl.constexpr,
                            T: tl.constexpr, PARTIAL: tl.constexpr):
    """Whole mini-blocks ``blk`` given as full ``(BLOCK_O, B_PAD, B_PAD)`` tiles, their lower triangles
    ``q <= p < B`` at packed entries ``p*(p+1)//2 + q``: EMA and guard into ``F``, or, ``PARTIAL``, the raw
    statistic to ``part_ptr``."""
    p = tl.arange(0, B_PAD)[None, :, None]
    q = tl.arange(0, B_PAD)[None, None, :]
    mask = o_mask[:, None, None] & (q <= p) & (p < B)
    off = blk[:, None, None] * T + p * (p + 1) // 2 + q
    if PARTIAL:
        tl.store(part_ptr + off, fhat, mask=mask)
    else:
        old = tl.load(f_ptr + off, mask=mask, other=0.0)
        new = _ema(fhat, old, decay)
        bad = tl.sum(tl.sum(tl.where(mask & ~(tl.abs(new) <= _FLT_MAX), 1, 0), axis=2), axis=1)
        tl.store(f_ptr + off, tl.where(bad[:, None, None] == 0, new, old), mask=mask)


@triton.jit(do_not_specialize=["n_split", "decay"])
def _partials_ema_kernel(f_ptr, part_ptr, skip_ptr, n_blocks, n_split, decay, T: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SKIP: tl.constexpr):
    """``F <- EMA(F, sum of the partial statistics)`` with the per-block finite guard: the second pass when
    the statistics kernel tiled the packed columns or split the batch."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    mask = tl.where(keep_step(skip_ptr, HAS_SKIP), rows < n_blocks, False)[:, None] & (offs_t < T)[None, :]
    off = rows[:, None] * T + offs_t[None, :]
    fhat = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    stride = (n_blocks + tl.zeros([], dtype=tl.int64)) * T  # int64 (n_blocks may be a specialised 1)
    for sp in range(0, n_split):
        fhat += tl.load(part_ptr + sp * stride + off, mask=mask, other=0.0)
    old = tl.load(f_ptr + off, mask=mask, other=0.0)
    new = _ema(fhat, old, decay)
    bad = tl.sum(tl.where(mask & ~(tl.abs(new) <= _FLT_MAX), 1, 0), axis=1)
    tl.store(f_ptr + off, new, mask=mask & (bad == 0)[:, None])


def _finish(f: torch.Tensor, parts: torch.Tensor | None, t_size: int, decay: float,
            skip_ptr: torch.Tensor, has_skip: bool) -> None:
    """The second pass over ``F`` when the statistics kernel stored partials (``parts``: ``(n, *f.shape)``)."""
    if parts is None:
        return
    n_blocks = f.shape[0]
    block_t = triton.next_power_of_2(t_size)
    block_r = max(1, min(16, 4096 // block_t))
    _partials_ema_kernel[(triton.cdiv(n_blocks, block_r),)](
        f, parts, skip_ptr, n_blocks, parts.shape[0], float(decay),
        T=t_size, BLOCK_R=block_r, BLOCK_T=block_t, HAS_SKIP=has_skip, num_warps=4,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sample_split(n: int, programs: int, device: torch.device) -> int:
    """How many programs share the samples of one tile (partial sums, reduced deterministically after):
    enough for about 4 programs per SM on a GPU; 1 elsewhere. A layer with few output x input channel
    tiles (ResNet-32's first stage: 16 programs) would otherwise loop over the whole batch in a handful of
    programs while the rest of the GPU idles."""
    if device.type != "cuda" or n <= 1:
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n, -(-target // max(programs, 1))))


# ----------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M", "scale2_over_m", "decay"])
def _linear_fisher_ema_kernel(
    f_ptr, part_ptr, x_ptr, g_ptr, skip_ptr,
    M, n_in, n_out, n_chunks, scale2_over_m, decay,
    s_xm, s_xi, s_gm, s_go,
    B: tl.constexpr, T: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    pid_jt = tl.program_id(0)  # (chunk, tile of the packed triangle): can exceed 65535, so axis 0
    pid_o = tl.program_id(1)
    n_t_tiles = (T + BLOCK_T - 1) // BLOCK_T
    j = pid_jt // n_t_tiles
    tt = pid_jt % n_t_tiles

    offs_o = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    o_mask = offs_o < n_out
    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    row, col = _tril_row_col(offs_t)
    i_row = j * B + row
    i_col = j * B + col  # col <= row, so i_col < n_in whenever i_row < n_in
    xt_mask = t_mask & (i_row < n_in) & (i_col < n_in)
    x_row_off = i_row.to(tl.int64) * s_xi
    x_col_off = i_col.to(tl.int64) * s_xi
    g_o_off = offs_o * s_go

    acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_m64 = offs_m.to(tl.int64)
        g = tl.load(g_ptr + g_o_off[:, None] + offs_m64[None, :] * s_gm,
                    mask=o_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
        zmask = m_mask[:, None] & xt_mask[None, :]
        x_m_off = offs_m64[:, None] * s_xm
        xr = tl.load(x_ptr + x_m_off + x_row_off[None, :], mask=zmask, other=0.0).to(tl.float32)
        xc = tl.load(x_ptr + x_m_off + x_col_off[None, :], mask=zmask, other=0.0).to(tl.float32)
        acc = tl.dot(g * g, xr * xc, acc, input_precision=PRECISION)

    fhat = acc * scale2_over_m
    blk = offs_o * n_chunks + j
    store_mask = tl.where(keep_step(skip_ptr, HAS_SKIP), o_mask, False)  # nothing stored when the step is skipped
    _ema_guard_store(f_ptr, part_ptr, fhat, blk, offs_t, store_mask, t_mask, decay, T, PARTIAL)


def _check_f(f: torch.Tensor, n_blocks: int, t_size: int, device: torch.device) -> None:
    if not isinstance(f, torch.Tensor) or f.dtype != torch.float32:
        raise ValueError(f"f must be a float32 tensor, got {getattr(f, 'dtype', type(f))}")
    if tuple(f.shape) != (n_blocks, t_size):
        raise ValueError(f"f has shape {tuple(f.shape)}, expected {(n_blocks, t_size)}")
    if not f.is_contiguous():
        raise ValueError("f must be contiguous")
    if f.device != device:
        raise ValueError(f"f is on {f.device}, the inputs on {device}")


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1]")


def _check_float(name: str, t: torch.Tensor, dim: int | tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t)}")
    dims = (dim,) if isinstance(dim, int) else dim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {_FLOAT_DTYPES}")


def linear_fisher_ema_(
    f: torch.Tensor,
    x: torch.Tensor,
    gout: torch.Tensor,
    *,
    b: int,
    scale: float,
    decay: float,
    config: FisherStatsConfig | None = None,
    skip: torch.Tensor | None = None,
):
    """``F <- EMA(F, linear_fisher(x, gout, b, scale), decay)`` in place, with the finite guard.

    ``f``: fp32 ``(out * ceil(in/b), b*(b+1)//2)`` contiguous; ``x``: ``(M, in)``; ``gout``:
    ``(M, out)``; any strides, fp32/bf16/fp16. Mini-block ``o * n_chunks + j`` is ``W[o, j*b:(j+1)*b]``.
    ``config``: tile sizes (default :func:`default_linear_config`). ``skip``: the step's device-side skip
    flag (:func:`mbf_triton.kernels._common.skip_args`): when set, ``F`` is left as it is. Returns the
    compiled statistics kernel (None under the interpreter), for a tuner to read its register metadata.
    """
    _check_float("x", x, 2)
    _check_float("gout", gout, 2)
    if b < 1:
        raise ValueError(f"b={b} must be >= 1")
    m, n_in = x.shape
    if gout.shape[0] != m:
        raise ValueError(f"gout has {gout.shape[0]} rows, x has {m}")
    n_out = gout.shape[1]
    if m == 0 or n_in == 0 or n_out == 0:
        raise ValueError(f"empty input: x {tuple(x.shape)}, gout {tuple(gout.shape)}")
    if gout.device != x.device:
        raise ValueError(f"gout is on {gout.device}, x on {x.device}")
    _check_decay(decay)
    n_chunks = triton.cdiv(n_in, b)
    t_size = b * (b + 1) // 2
    _check_f(f, n_out * n_chunks, t_size, x.device)
    skip_ptr, has_skip = skip_args(skip, f)
    if config is None:
        config = default_linear_config(n_out, t_size)
    n_t_tiles = triton.cdiv(t_size, config.block_t)
    parts = None if n_t_tiles == 1 else torch.empty((1, *f.shape), dtype=f.dtype, device=f.device)
    grid = (n_chunks * n_t_tiles, triton.cdiv(n_out, config.block_o))
    compiled = _linear_fisher_ema_kernel[grid](
        f, f if parts is None else parts, x, gout, skip_ptr,
        m, n_in, n_out, n_chunks, float(scale) * float(scale) / m, float(decay),
        x.stride(0), x.stride(1), gout.stride(0), gout.stride(1),
        B=b, T=t_size,
        BLOCK_O=config.block_o, BLOCK_M=config.block_k, BLOCK_T=config.block_t, PARTIAL=parts is not None,
        PRECISION=config.precision, HAS_SKIP=has_skip,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _finish(f, parts, t_size, decay, skip_ptr, has_skip)
    return compiled


# ----------------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "chunk", "scale2_over_n", "decay"])
def _conv_fisher_ema_kernel(
    f_ptr, part_ptr, x_ptr, g_ptr, skip_ptr,
    N, chunk, n_t_tiles, n_blocks, Cg, Og, L, L2, L3, K2, K3, scale2_over_n, decay,
    S1, S2, S3, st1, st2, st3, dl1, dl2, dl3, p1, p2, p3,
    sx_n, sx_c, sx_1, sx_2, sx_3,
    sg_n, sg_o, sg_l1, sg_l2, sg_l3,
    B: tl.constexpr, B_PAD: tl.constexpr, T: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr, FULL: tl.constexpr, PARTIAL: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    # FULL (B_PAD <= 16, i.e. b <= 16): a program owns whole mini-blocks and accumulates the full outer
    # products G[o, :] G[o, :]^T elementwise (B_PAD^2 = 256 multiply-adds per output and sample, no
    # selection), storing their lower triangles packed; BLOCK_T is unused and there is one T tile.
    # B_PAD == 1 (1x1 kernels): G by a reduction over the positions instead of a 16-wide tl.dot.
    # The batch may be cut into chunks of `chunk` samples, one per program along grid axis 2. PARTIAL (T
    # tiled or batch split): each program stores its raw partial sum to part_ptr[chunk]; _partials_ema_kernel
    # adds them up and applies the EMA and the guard.
    # Otherwise:
    # Program: input channel c of a group, BLOCK_O output channels, BLOCK_T packed triangle entries.
    # Per sample: the per-sample gradients of the program's mini-blocks, G[o, k] = sum_l g[o, l] u[l, k]
    # with u[l, k] the input under kernel tap k at output position l (read from x, zero padding masked)
    # (one tl.dot per tile of positions, K padded to B_PAD), then their packed outer products
    # G[o, row(t)] * G[o, col(t)], with the columns row(t) / col(t) picked by a tl.dot with a 0/1 selection
    # matrix (exact: one product by 1.0 plus zeros), folded into the accumulator. Forming G once and
    # selecting costs L*B_PAD + 2*B_PAD*BLOCK_T multiply-adds per output and sample instead of the
    # 2*L*BLOCK_T of expanding every packed entry over the positions.
    pid_o = tl.program_id(0)  # (group, tile of output channels in the group)
    c = tl.program_id(1)  # input channel inside the group
    tt = tl.program_id(2) % n_t_tiles  # tile of packed triangle entries
    sp = tl.program_id(2) // n_t_tiles  # chunk of samples
    n_start = sp * chunk
    n_end = tl.minimum(N, n_start + chunk)
    n_o_tiles = tl.cdiv(Og, BLOCK_O)
    grp = pid_o // n_o_tiles
    ot = pid_o % n_o_tiles

    offs_ol = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_ol < Og
    offs_o = (grp * Og + offs_ol).to(tl.int64)
    cin = (grp * Cg + c).to(tl.int64)

    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    row, col = _tril_row_col(offs_t)
    offs_k = tl.arange(0, B_PAD)
    k_mask = offs_k < B
    # input position of output position l and kernel tap k along dim d: l_d*st_d + k_d*dl_d - p_d; taps
    # that fall into the zero padding are masked (the padded input is never materialised)
    k1 = offs_k // (K2 * K3)
    k2 = (offs_k // K3) % K2
    k3 = offs_k % K3
    if not FULL:
        sel_row = tl.where(offs_k[:, None] == row[None, :], 1.0, 0.0)  # (B_PAD, BLOCK_T)
        sel_col = tl.where(offs_k[:, None] == col[None, :], 1.0, 0.0)
    x_c_ptr = x_ptr + cin * sx_c
    g_o_off = offs_o * sg_o
    l23 = L2 * L3

    if FULL:
        acc = tl.zeros((BLOCK_O, B_PAD, B_PAD), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    x_n_ptr = x_c_ptr + n_start.to(tl.int64) * sx_n  # advanced by one stride per sample below
    g_n_ptr = g_ptr + n_start.to(tl.int64) * sg_n
    for _n in range(n_start, n_end):
        grad = tl.zeros((BLOCK_O, B_PAD), dtype=tl.float32)  # per-sample gradients of the blocks (o, c)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            l_mask = offs_l < L
            l1 = offs_l // l23
            l2 = (offs_l // L3) % L2
            l3 = offs_l % L3
            g_l_off = l1.to(tl.int64) * sg_l1 + l2.to(tl.int64) * sg_l2 + l3.to(tl.int64) * sg_l3
            g = tl.load(g_n_ptr + g_o_off[:, None] + g_l_off[None, :],
                        mask=o_mask[:, None] & l_mask[None, :], other=0.0).to(tl.float32)
            i1 = (l1 * st1 - p1)[:, None] + (k1 * dl1)[None, :]  # (BLOCK_L, B_PAD) input positions
            i2 = (l2 * st2 - p2)[:, None] + (k2 * dl2)[None, :]
            i3 = (l3 * st3 - p3)[:, None] + (k3 * dl3)[None, :]
            inside = (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2) & (i3 >= 0) & (i3 < S3)
            x_off = i1.to(tl.int64) * sx_1 + i2.to(tl.int64) * sx_2 + i3.to(tl.int64) * sx_3
            u = tl.load(x_n_ptr + x_off, mask=l_mask[:, None] & k_mask[None, :] & inside, other=0.0)
            if B_PAD == 1:  # 1x1 kernel: G[o] = sum_l g[o, l] u[l], no 16-wide padded dot
                grad += tl.sum(g[:, :, None] * u.to(tl.float32)[None, :, :], axis=1)
            else:
                grad = tl.dot(g, u.to(tl.float32), grad, input_precision=PRECISION)
        if FULL:
            acc += grad[:, :, None] * grad[:, None, :]
        else:
            g_row = tl.dot(grad, sel_row, input_precision="ieee")
            g_col = tl.dot(grad, sel_col, input_precision="ieee")
            acc += g_row * g_col
        x_n_ptr += sx_n
        g_n_ptr += sg_n

    fhat = acc * scale2_over_n
    blk = offs_o * Cg + c
    part = part_ptr + sp.to(tl.int64) * n_blocks * T
    store_mask = tl.where(keep_step(skip_ptr, HAS_SKIP), o_mask, False)  # nothing stored when the step is skipped
    if FULL:
        _ema_guard_store_blocks(f_ptr, part, fhat, blk, store_mask, decay, B, B_PAD, T, PARTIAL)
    else:
        _ema_guard_store(f_ptr, part, fhat, blk, offs_t, store_mask, t_mask, decay, T, PARTIAL)


def _int_tuple(name: str, value, d: int) -> tuple[int, ...]:
    v = (value,) * d if isinstance(value, int) else tuple(value)
    if len(v) != d or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"{name}={value!r} must be an int or {d} ints")
    return v


def conv_fisher_ema_(
    f: torch.Tensor,
    x: torch.Tensor,
    gout: torch.Tensor,
    *,
    kernel_size: tuple[int, ...],
    groups: int,
    scale: float,
    decay: float,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[tuple[int, int], ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    padding_mode: str = "zeros",
    config: FisherStatsConfig | None = None,
    samples_split: int | None = None,
    skip: torch.Tensor | None = None,
):
    """``F <- EMA(F, conv_fisher(conv_patches(x, ...), gout, groups, scale), decay)`` in place, with the
    finite guard.

    ``x``: the layer input ``(N, C_in, *S)`` with ``d = 1..3`` spatial dims, any strides; ``gout``: the
    gradient w.r.t. the output ``(N, C_out, *L)``, any strides; ``f``: fp32 ``(C_out * C_in/groups,
    prod(K)*(prod(K)+1)//2)`` contiguous. The convolution's geometry as in ``nn.Conv*d``: ``kernel_size``,
    ``stride``, ``dilation`` (ints or ``d``-tuples), ``padding`` (an int, ``d`` ints, or ``d`` pairs
    ``(left, right)``), ``padding_mode``. Zero padding is applied by masking inside the kernel; other modes pad
    ``x`` first. ``config``: tile sizes (default :func:`default_conv_config`). ``samples_split``: how many
    programs share the batch of one tile (default :func:`sample_split`: ~4 programs per SM on a GPU).
    ``skip``: the step's device-side skip flag (:func:`mbf_triton.kernels._common.skip_args`): when set,
    ``F`` is left as it is. Returns the compiled statistics kernel (None under the interpreter).
    """
    _check_float("x", x, (3, 4, 5))
    d = x.dim() - 2
    _check_float("gout", gout, 2 + d)
    ks = _int_tuple("kernel_size", kernel_size, d)
    st = _int_tuple("stride", stride, d)
    dl = _int_tuple("dilation", dilation, d)
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode={padding_mode!r} must be 'zeros', 'reflect', 'replicate' or 'circular'")
    # padding: an int, d ints (symmetric, as nn.Conv*d takes), or d (left, right) pairs
    if isinstance(padding, int):
        pads = ((padding, padding),) * d
    else:
        pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != d or any(len(p) != 2 or min(p) < 0 for p in pads) or min(ks + st + dl) < 1:
        raise ValueError(f"invalid geometry: kernel_size={kernel_size}, stride={stride}, padding={padding}, "
                         f"dilation={dilation} for {d} spatial dims")
    if padding_mode != "zeros" and any(lo or hi for lo, hi in pads):
        x = torch.nn.functional.pad(x, [p for lr in reversed(pads) for p in lr], mode=padding_mode)
        pads = ((0, 0),) * d
    n, c_in = x.shape[:2]
    c_out = gout.shape[1]
    l_shape = tuple((x.shape[2 + i] + sum(pads[i]) - dl[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(d))
    if gout.shape[0] != n or tuple(gout.shape[2:]) != l_shape:
        raise ValueError(f"gout has shape {tuple(gout.shape)}, expected ({n}, C_out, *{l_shape}) for input "
                         f"{tuple(x.shape)} and this geometry")
    if gout.device != x.device:
        raise ValueError(f"gout is on {gout.device}, x on {x.device}")
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    if n == 0 or c_in == 0 or c_out == 0 or gout.numel() == 0:
        raise ValueError(f"empty input: x {tuple(x.shape)}, gout {tuple(gout.shape)}")
    _check_decay(decay)
    cg, og = c_in // groups, c_out // groups
    b = math.prod(ks)
    n_l = math.prod(l_shape)
    t_size = b * (b + 1) // 2
    _check_f(f, c_out * cg, t_size, x.device)
    skip_ptr, has_skip = skip_args(skip, f)

    # normalise to 3 spatial dims: leading dims of size 1 (one position, one tap, stride 0 in memory)
    e = 3 - d
    sizes = (1,) * e + tuple(x.shape[2:])
    ls = (1,) * e + l_shape
    ks3 = (1,) * e + ks
    geometry = (*sizes, *((1,) * e + st), *((1,) * e + dl), *((0,) * e + tuple(p[0] for p in pads)))
    sx = (0,) * e + tuple(x.stride(2 + i) for i in range(d))
    sg_l = (0,) * e + tuple(gout.stride(2 + i) for i in range(d))

    if config is None:
        config = default_conv_config(og, n_l, t_size)
    full = conv_full_blocks(b)
    n_t_tiles = 1 if full else triton.cdiv(t_size, config.block_t)
    grid_o = groups * triton.cdiv(og, config.block_o)
    n_split = sample_split(n, grid_o * cg * n_t_tiles, x.device) if samples_split is None else samples_split
    if isinstance(n_split, bool) or not isinstance(n_split, int) or n_split < 1:
        raise ValueError(f"samples_split={samples_split!r} must be an int >= 1")
    chunk = -(-n // min(n_split, n))
    n_split = -(-n // chunk)  # no empty chunks
    partial = n_split > 1 or n_t_tiles > 1
    parts = torch.empty((n_split, *f.shape), dtype=f.dtype, device=f.device) if partial else None
    grid = (grid_o, cg, n_t_tiles * n_split)
    compiled = _conv_fisher_ema_kernel[grid](
        f, f if parts is None else parts, x, gout, skip_ptr,
        n, chunk, n_t_tiles, f.shape[0], cg, og, n_l, ls[1], ls[2], ks3[1], ks3[2],
        float(scale) * float(scale) / n, float(decay),
        *geometry,
        x.stride(0), x.stride(1), *sx,
        gout.stride(0), gout.stride(1), *sg_l,
        B=b, B_PAD=conv_k_pad(b), T=t_size,
        BLOCK_O=config.block_o, BLOCK_L=config.block_k, BLOCK_T=config.block_t,
        PRECISION=config.precision, FULL=full, PARTIAL=partial, HAS_SKIP=has_skip,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _finish(f, parts, t_size, decay, skip_ptr, has_skip)
    return compiled
