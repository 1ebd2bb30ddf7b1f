"""Fused damped mini-block solve and parameter update: one pass over ``F``, ``grad``, ``param`` and ``m``.

For every mini-block ``i`` (storage conventions in :mod:`mbf_triton.reference`), all in fp32:

* ``A = unpack(F_i) + damping * I``; Cholesky ``A = L L^T`` without pivoting;
* if a pivot is ``<= 0`` or not finite the block falls back to ``d = g / (max(diag(F_i), 0) + damping)``
  and is counted in ``fallback_count``; else ``d = A^{-1} g`` by forward and back substitution;
* ``m <- momentum * m + d``; ``p <- p * (1 - lr * weight_decay) - lr * m`` on the real (unpadded) entries.

Exactly :func:`mbf_triton.reference.damped_block_solve` followed by
:func:`mbf_triton.reference.apply_update_`; the factor never leaves registers.

Two variants compute this same function (``variant=``; the autotuner times both on a GPU, and without one
the launchers take :func:`default_variant`, the pick of the calibrated static model ``perf/kernel_model.py``):

* ``"lane"`` (``2 <= b <= LANE_MAX_B``): one mini-block per lane. Every entry of a block is a
  ``(BLOCKS,)`` vector with one value per lane, and the damped Cholesky (by rows, in the packed order),
  both substitutions and the update are fully unrolled scalar code over the packed triangle
  (``tl.static_range`` over tuples): ``b^3/6 + b^2`` multiply-adds and ``b`` rsqrt per block, no padding
  of odd sizes, no reductions. ``F`` rows are read as coalesced ``[BLOCKS, W]`` tiles of power-of-two
  widths ``W`` (``T = 45 = 32 + 8 + 4 + 1``) split into columns in registers, or, where ``T % 4 == 0``,
  as 16-byte vectors per lane (:func:`lane_log_chunk`); the gradient, momentum and parameter likewise.
  ``F`` keeps its packed ``(n_blocks, T)`` layout: the model predicts that a tri-major ``(T, n_blocks)``
  layout would not be faster (perf/NOTES.md).
* ``"tile"``: described next.

Design of ``"tile"``: a program owns ``BLOCKS`` consecutive mini-blocks and holds them as one register tile
``[BLOCKS, B_PAD, B_PAD]`` (``B_PAD`` = next power of two of ``b``), the symmetric matrix unpacked from
the packed triangle by masked loads (no global traffic for the padding; padded entries are 0 and are
never touched by the ``b`` steps of the loop). The factorisation is right-looking: step ``k`` extracts
column ``k`` by a masked reduction, scales it by ``rsqrt(pivot)``, subtracts its outer product from the
trailing submatrix and writes it back as column ``k`` of ``L`` in place; the forward substitution runs in
the same loop. The back substitution reads the rows of ``L`` from the same tile. ``b = 1`` takes a scalar
kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import keep_step, skip_args
from .lane_solve import _lane_solve_and_update
from .multilane_solve import _rows_solve_and_update

__all__ = ["LANE_MAX_B", "MAX_BLOCK_SIZE", "ROWS_MAX_B", "VARIANTS", "damped_block_update_", "default_launch_config",
           "default_variant", "grouped_block_update_", "lane_log_chunk", "rows_lanes"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_SIZE = 64  # the register tile holds B_PAD^2 floats per block; larger b use the torch path
_MAX_B = MAX_BLOCK_SIZE
LANE_MAX_B = 16  # the lane variant holds b(b+1)/2 + 2b values per lane: 255 registers at b = 16
ROWS_MAX_B = 32  # the rows variant was modelled up to here (it runs for any b >= 2; not a default: compile time)
VARIANTS = ("tile", "lane", "rows")
_RUNTIME_SCALARS = ["damping", "lr", "momentum", "weight_decay"]


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _scalar_block_update_kernel(
    f_ptr, g_ptr, p_ptr, m_ptr, count_ptr, skip_ptr,
    n_blocks,
    damping, lr, momentum, weight_decay,
    BLOCKS: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    # b = 1: mini-block i is entry i of the flattened (rows, cols) matrix and F_i is one number.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCKS + tl.arange(0, BLOCKS)
    valid = offs < n_blocks
    keep = keep_step(skip_ptr, HAS_SKIP)
    fv = tl.load(f_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    denom = fv + damping
    ok = (denom > 0.0) & (denom <= 3.4028234663852886e38)
    # max(F, 0) that keeps a NaN, as torch.clamp does.
    diag = tl.where(fv < 0.0, 0.0, fv) + damping
    d = tl.where(ok, g / denom, g / diag)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0)
    m = m * momentum + d
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    p = p * (1.0 - lr * weight_decay) - lr * m
    tl.store(m_ptr + offs, m, mask=tl.where(keep, valid, False))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=tl.where(keep, valid, False))
    n_fallback = tl.sum(tl.where(keep, valid & ~ok, False).to(tl.int32), axis=0)
    tl.atomic_add(count_ptr, n_fallback, mask=n_fallback > 0)  # no atomic traffic in the common case


@triton.jit
def _solve_and_update(
    f_ptr, g_ptr, p_ptr, m_ptr, blk, valid, keep, n_chunks, cols,
    damping, lr, momentum, weight_decay,
    B: tl.constexpr, B_PAD: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr,
):
    """The fused solve + update of mini-blocks ``blk`` (int64, (BLOCKS,)) of one parameter; returns how
    many of them fell back to the diagonal. ``keep`` false (a skipped step): nothing stored or counted."""
    # --- the damped symmetric blocks, unpacked from the packed lower triangle -------------------------
    ii = tl.arange(0, B_PAD)[None, :, None]  # row index of the 3-D tile
    jj = tl.arange(0, B_PAD)[None, None, :]  # column index of the 3-D tile
    packed = tl.where(ii >= jj, ii * (ii + 1) // 2 + jj, jj * (jj + 1) // 2 + ii)
    tile_mask = valid[:, None, None] & (ii < B) & (jj < B)
    a = tl.load(f_ptr + blk[:, None, None] * T + packed, mask=tile_mask, other=0.0)
    a = tl.where((ii == jj) & (ii < B), a + damping, a)

    # --- gradient chunk of each block: row r, chunk c of the (rows, cols) matrix ---------------------
    t = tl.arange(0, B_PAD)[None, :]  # (1, B_PAD) position inside the block
    r = blk // n_chunks
    col = (blk - r * n_chunks)[:, None] * B + t
    vec_off = r[:, None] * cols + col
    vec_mask = valid[:, None] & (t < B) & (col < cols)
    g = tl.load(g_ptr + vec_off, mask=vec_mask, other=0.0).to(tl.float32)
    fdiag = tl.load(f_ptr + blk[:, None] * T + t * (t + 3) // 2, mask=valid[:, None] & (t < B), other=0.0)

    # --- right-looking Cholesky with the forward substitution in the same loop ---------------------
    ok = blk >= 0  # all true
    z = g
    inv_diag = tl.zeros([BLOCKS, B_PAD], dtype=tl.float32)
    for k in range(B):
        column = tl.sum(tl.where(jj == k, a, 0.0), axis=2)  # A[:, :, k]
        pivot = tl.sum(tl.where(t == k, column, 0.0), axis=1)  # A[:, k, k]
        ok = ok & (pivot > 0.0) & (pivot <= 3.4028234663852886e38)
        inv = tl.rsqrt(pivot)
        l_col = tl.where(t > k, column * inv[:, None], 0.0)  # L[:, i, k] for i > k
        a = a - l_col[:, :, None] * l_col[:, None, :]  # only the trailing i, j > k change
        a = tl.where((jj == k) & (ii > k), l_col[:, :, None], a)
        inv_diag = tl.where(t == k, inv[:, None], inv_diag)
        y_k = tl.sum(tl.where(t == k, z, 0.0), axis=1) * inv
        z = tl.where(t == k, y_k[:, None], z - l_col * y_k[:, None])

    # --- back substitution L^T x = y, rows of L read from the strictly lower part of the tile --------
    for kk in range(B):
        k = B - 1 - kk
        x_k = tl.sum(tl.where(t == k, z * inv_diag, 0.0), axis=1)
        l_row = tl.sum(tl.where(ii == k, a, 0.0), axis=1)  # A[:, k, :]
        l_row = tl.where(t < k, l_row, 0.0)
        z = tl.where(t == k, x_k[:, None], z - l_row * x_k[:, None])

    # --- diagonal fallback; max(diag, 0) keeps a NaN as torch.clamp does -----------------------------
    d = tl.where(ok[:, None], z, g / (tl.where(fdiag < 0.0, 0.0, fdiag) + damping))

    # --- momentum, decoupled weight decay and the step on the real entries ---------------------------
    m = tl.load(m_ptr + vec_off, mask=vec_mask, other=0.0)
    m = m * momentum + d
    p = tl.load(p_ptr + vec_off, mask=vec_mask, other=0.0).to(tl.float32)
    p = p * (1.0 - lr * weight_decay) - lr * m
    tl.store(m_ptr + vec_off, m, mask=tl.where(keep, vec_mask, False))
    tl.store(p_ptr + vec_off, p.to(p_ptr.dtype.element_ty), mask=tl.where(keep, vec_mask, False))
    return tl.sum(tl.where(keep, valid & ~ok, False).to(tl.int32), axis=0)




@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _damped_block_update_kernel(
    f_ptr, g_ptr, p_ptr, m_ptr, count_ptr, skip_ptr,
    n_blocks, n_chunks, cols,
    damping, lr, momentum, weight_decay,
    B: tl.constexpr, B_PAD: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr, HAS_SKIP: tl.constexpr,
    LANE: tl.constexpr = False, LOG_CHUNK: tl.constexpr = 5, LANES: tl.constexpr = 0,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) int64
    if LANE:
        n_fallback = _lane_solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, pid * BLOCKS, n_blocks, keep_step(skip_ptr, HAS_SKIP), n_chunks, cols,
            damping, lr, momentum, weight_decay, B, T, BLOCKS, LOG_CHUNK,
        )
    elif LANES > 0:
        n_fallback = _rows_solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, pid * BLOCKS, n_blocks, keep_step(skip_ptr, HAS_SKIP), n_chunks, cols,
            damping, lr, momentum, weight_decay, B, T, BLOCKS, LANES, LOG_CHUNK,
        )
    else:
        n_fallback = _solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, blk, blk < n_blocks, keep_step(skip_ptr, HAS_SKIP), n_chunks, cols,
            damping, lr, momentum, weight_decay, B, B_PAD, T, BLOCKS,
        )
    tl.atomic_add(count_ptr, n_fallback, mask=n_fallback > 0)  # no atomic traffic in the common case


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _grouped_block_update_kernel(
    table_ptr, work_ptr, proto_ptr, count_ptr, skip_ptr,
    damping, lr, momentum, weight_decay,
    B: tl.constexpr, B_PAD: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr, HAS_SKIP: tl.constexpr,
    LANE: tl.constexpr = False, LOG_CHUNK: tl.constexpr = 5, LANES: tl.constexpr = 0,
):
    # Many parameters with the same b in one launch (as torch's foreach optimizers do): program ``pid``
    # takes BLOCKS mini-blocks of parameter ``work[pid, 0]`` from block ``work[pid, 1]`` on. Row ``t`` of
    # the table holds the addresses of F, grad, param, momentum and n_blocks, n_chunks, cols of parameter t.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * pid)
    first = tl.load(work_ptr + 2 * pid + 1)
    row = table_ptr + 7 * t
    f_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(proto_ptr.dtype)
    p_ptr = tl.load(row + 2).to(proto_ptr.dtype)
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n_blocks = tl.load(row + 4)
    blk = first + tl.arange(0, BLOCKS)
    if LANE:
        n_fallback = _lane_solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, tl.multiple_of(first, BLOCKS), n_blocks, keep_step(skip_ptr, HAS_SKIP),
            tl.load(row + 5),
            tl.load(row + 6), damping, lr, momentum, weight_decay, B, T, BLOCKS, LOG_CHUNK,
        )
    elif LANES > 0:
        n_fallback = _rows_solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, tl.multiple_of(first, BLOCKS), n_blocks, keep_step(skip_ptr, HAS_SKIP),
            tl.load(row + 5), tl.load(row + 6), damping, lr, momentum, weight_decay, B, T, BLOCKS, LANES,
            LOG_CHUNK,
        )
    else:
        n_fallback = _solve_and_update(
            f_ptr, g_ptr, p_ptr, m_ptr, blk, blk < n_blocks, keep_step(skip_ptr, HAS_SKIP), tl.load(row + 5),
            tl.load(row + 6), damping, lr, momentum, weight_decay, B, B_PAD, T, BLOCKS,
        )
    tl.atomic_add(count_ptr, n_fallback, mask=n_fallback > 0)


def default_variant(b: int) -> str:
    """The kernel variant for block size ``b`` without a GPU timing: ``"lane"`` (one mini-block per lane,
    unrolled scalar code) for ``2 <= b <= LANE_MAX_B``, else ``"tile"``. Chosen by ``perf/kernel_model.py``
    (a static model of the sm_90 SASS, calibrated on H100 timings of a probe kernel; see perf/NOTES.md): a
    model prediction, to be replaced by the autotuner's timings on a GPU.

    ``"rows"`` (a few lanes per block) is predicted 7-16x faster than tile at b = 25 and 32 (ROWS_MAX_B is
    as far as it was modelled) but is not a default, nor a tuner candidate: its fully unrolled code took
    1-5 minutes (triton 3.6) and 10-30 minutes (triton 3.9) per configuration to compile on the 2-core
    development machine, a stall at the first step of every model with such blocks. Pass ``variant="rows"``
    to the launchers (perf/bench_solve.py times it)."""
    return "lane" if 2 <= b <= LANE_MAX_B else "tile"


def rows_lanes(b: int) -> int:
    """Lanes per mini-block of the ``"rows"`` variant (``K``): each lane holds ``ceil(b / K)`` rows of
    ``K * s + K`` columns (slot ``s``), about ``b^2 / (2K)`` registers; more lanes cost ``log2 K`` shuffles
    per broadcast. 4 up to b = 28 (109 values at b = 25: 255 registers, no spill), 8 up to 40 (b = 32:
    80 values, 255 registers, no spill; K = 4 there, 144 values, was not compiled to the end), 32 above
    (not modelled). See perf/NOTES.md."""
    return 2 if b <= 8 else (4 if b <= 28 else (8 if b <= 40 else 32))


def lane_log_chunk(b: int) -> int:
    """log2 of the widest column chunk the lane variant loads ``F`` in. With ``T = b(b+1)/2`` a multiple of
    4, chunks of 4: each lane reads its own block's entries as 16-byte vectors and no layout change is
    needed; else chunks of up to 32 columns read coalesced across lanes and are regrouped per lane through
    shared memory (one block per lane reading scalars would touch one 128-byte line per entry and block:
    ``perf/kernel_model.py`` predicts the L1, not DRAM, would then bound b = 9 and 16)."""
    return 2 if (b * (b + 1) // 2) % 4 == 0 else 5


def default_launch_config(b: int, variant: str | None = None) -> tuple[int, int]:
    """``(blocks_per_program, num_warps)`` for block size ``b`` and ``variant`` (default
    :func:`default_variant`).

    ``"tile"``: about 8 tile floats per thread. Chosen from the compiler's resource report (triton 3.9,
    sm_90, no GPU run): ptxas needs roughly 10-12 registers per tile float per thread, so 8 floats keeps a
    program near 80-90 registers with no spills (b = 4, 9, 16, 32, 64), where the earlier 4096-float tiles
    took 250 registers (b = 9, 16) or spilled (b = 4). ``"lane"``: one mini-block per lane, 4 warps
    (8 for b >= 13, where 4 warps spill a few registers). Whether this is fastest on the GPU is still to be
    measured (perf/NOTES.md).
    """
    variant = default_variant(b) if variant is None else variant
    if b == 1:
        return 1024, 4
    if variant == "lane":
        warps = 8 if b >= 13 else 4
        return 32 * warps, warps
    if variant == "rows":
        return 32 * 4 // rows_lanes(b), 4
    b_pad = triton.next_power_of_2(b)
    num_warps = 4 if b_pad <= 16 else (8 if b_pad <= 32 else 16)
    return max(1, (8 * 32 * num_warps) // (b_pad * b_pad)), num_warps


def _check_pow2(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a positive power of two")


def _check_tensors(named: tuple[tuple[str, object], ...], device_index: int) -> None:
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if x.get_device() != device_index:  # an int: much cheaper than comparing torch.device objects
            raise ValueError(f"{name} is on {x.device}, not on the device of f")


def _check_counter(fallback_count, device_index: int) -> None:
    _check_tensors((("fallback_count", fallback_count),), device_index)
    if fallback_count.dtype != torch.int32 or tuple(fallback_count.shape) != (1,):
        raise TypeError(f"fallback_count must be an int32 tensor of shape (1,), got "
                        f"{fallback_count.dtype} {tuple(fallback_count.shape)}")


def _check_inputs(f, grad, param, momentum_buffer, b):
    """Validate one parameter's tensors; returns ``(rows, cols, n_chunks, n_blocks, T)``."""
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= _MAX_B:
        raise ValueError(f"b={b!r} must be an int in [1, {_MAX_B}]")
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f must be a torch.Tensor, got {type(f).__name__}")
    _check_tensors((("f", f), ("grad", grad), ("param", param), ("momentum_buffer", momentum_buffer)),
                   f.get_device())
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-D (rows, cols), got shape {tuple(grad.shape)}")
    rows, cols = grad.shape
    n_chunks = -(-cols // b)
    n_blocks = rows * n_chunks
    t = b * (b + 1) // 2
    if f.dtype != torch.float32:
        raise TypeError(f"f must be float32, got {f.dtype}")
    if tuple(f.shape) != (n_blocks, t):
        raise ValueError(
            f"f has shape {tuple(f.shape)}, expected {(n_blocks, t)} for grad {(rows, cols)} and {b=}"
        )
    if grad.dtype not in _PARAM_DTYPES:
        raise TypeError(f"grad dtype {grad.dtype} must be one of {_PARAM_DTYPES}")
    if param.dtype != grad.dtype:
        raise TypeError(f"param dtype {param.dtype} must equal grad dtype {grad.dtype}")
    if param.shape != grad.shape:
        raise ValueError(f"param shape {tuple(param.shape)} must equal grad shape {tuple(grad.shape)}")
    if momentum_buffer.dtype != torch.float32:
        raise TypeError(f"momentum_buffer must be float32, got {momentum_buffer.dtype}")
    if momentum_buffer.shape != grad.shape:
        raise ValueError(
            f"momentum_buffer shape {tuple(momentum_buffer.shape)} must equal grad shape {tuple(grad.shape)}"
        )
    return rows, cols, n_chunks, n_blocks, t


def _check_variant(b: int, variant: str | None) -> str:
    variant = default_variant(b) if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    if variant == "lane" and b > LANE_MAX_B:
        raise ValueError(f"variant='lane' supports b <= {LANE_MAX_B} (registers), got b={b}")
    if variant == "rows" and b < 2:
        raise ValueError("variant='rows' supports b >= 2, got b=1")
    return variant


def _launch_options(b, blocks_per_program, num_warps, num_stages, variant):
    """``(blocks, launch kwargs)``; the kernel's variant constexprs included."""
    default_blocks, default_warps = default_launch_config(b, variant)
    blocks = default_blocks if blocks_per_program is None else blocks_per_program
    warps = default_warps if num_warps is None else num_warps
    _check_pow2("blocks_per_program", blocks)
    _check_pow2("num_warps", warps)
    launch = {"num_warps": warps}
    if num_stages is not None:
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages={num_stages!r} must be an int >= 1")
        launch["num_stages"] = num_stages
    if b > 1:
        launch.update(LANE=variant == "lane", LOG_CHUNK=lane_log_chunk(b) if variant == "lane" else 5,
                      LANES=rows_lanes(b) if variant == "rows" else 0)
    return blocks, launch


def damped_block_update_(
    f: torch.Tensor,
    grad: torch.Tensor,
    param: torch.Tensor,
    momentum_buffer: torch.Tensor,
    fallback_count: torch.Tensor,
    *,
    b: int,
    damping: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    skip: torch.Tensor | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    variant: str | None = None,
):
    """Damped mini-block Cholesky solve fused with the momentum / weight-decay update, in place.

    ``f``: packed running Fisher ``(n_blocks, b*(b+1)//2)`` fp32 (read only); ``grad``, ``param``:
    ``(rows, cols)`` of the parameter's dtype (fp32, bf16 or fp16); ``momentum_buffer``: ``(rows, cols)``
    fp32; ``fallback_count``: int32 ``(1,)``, incremented by the number of blocks that took the diagonal
    fallback. ``param`` and ``momentum_buffer`` are updated in place; no host synchronisation. ``skip``:
    the step's device-side skip flag (:func:`mbf_triton.kernels._common.skip_args`): when set, nothing is
    written and nothing is counted.

    ``blocks_per_program``, ``num_warps``, ``num_stages``: launch configuration (default:
    :func:`default_launch_config`, Triton's default stages); ``variant``: ``"tile"`` or ``"lane"`` (``b <=
    LANE_MAX_B``), default :func:`default_variant`; both compute the same function. Returns the compiled
    kernel that ran (None under the interpreter or when there is nothing to do), so a tuner can read its
    register metadata.
    """
    rows, cols, n_chunks, n_blocks, t = _check_inputs(f, grad, param, momentum_buffer, b)
    _check_counter(fallback_count, f.get_device())
    skip_ptr, has_skip = skip_args(skip, f)
    blocks, launch = _launch_options(b, blocks_per_program, num_warps, num_stages, _check_variant(b, variant))
    if n_blocks == 0:
        return None
    # Plain Python floats: an int here would change the kernel signature and force a recompilation.
    scalars = (float(damping), float(lr), float(momentum), float(weight_decay))
    grid = (triton.cdiv(n_blocks, blocks),)
    if b == 1:
        return _scalar_block_update_kernel[grid](
            f, grad, param, momentum_buffer, fallback_count, skip_ptr, n_blocks, *scalars,
            BLOCKS=blocks, HAS_SKIP=has_skip, **launch,
        )
    return _damped_block_update_kernel[grid](
        f, grad, param, momentum_buffer, fallback_count, skip_ptr, n_blocks, n_chunks, cols,
        *scalars, B=b, B_PAD=triton.next_power_of_2(b), T=t, BLOCKS=blocks, HAS_SKIP=has_skip, **launch,
    )


_WORK_CACHE: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_LIMIT = 256


def _stream_key(device: torch.device) -> tuple[str, int]:
    """Device and current stream: a cached device tensor is only read on the stream whose copy wrote it
    (and goes back to the caching allocator on that stream)."""
    return str(device), (torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host synchronisation (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _address_table(flat: list[int], device: torch.device) -> torch.Tensor:
    """The ``(params, 7)`` int64 table of the grouped kernel on ``device``, cached by its content.

    In a training loop the addresses repeat from step to step (the parameters and the optimizer state
    never move, and the caching allocator hands the gradients the same blocks), so after the first steps
    no copy is made at all; on a miss the copy is asynchronous. At most ``_CACHE_LIMIT`` tables are kept.
    """
    key = (_stream_key(device), tuple(flat))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _to_device(torch.tensor(flat, dtype=torch.int64).view(-1, 7), device)
        if len(_TABLE_CACHE) >= _CACHE_LIMIT:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = table
    return table


def _work_list(n_blocks: tuple[int, ...], blocks: int, device: torch.device) -> torch.Tensor:
    """``(programs, 2)`` int64: (parameter, first mini-block) of every program; cached per shape set."""
    key = (n_blocks, blocks, _stream_key(device))
    work = _WORK_CACHE.get(key)
    if work is None:
        counts = torch.tensor([-(-n // blocks) for n in n_blocks], dtype=torch.int64)
        param = torch.repeat_interleave(torch.arange(len(n_blocks)), counts)
        starts = torch.cumsum(counts, 0) - counts
        first = (torch.arange(int(counts.sum())) - starts[param]) * blocks
        work = _to_device(torch.stack([param, first], dim=1).contiguous(), device)
        if len(_WORK_CACHE) >= _CACHE_LIMIT:
            _WORK_CACHE.clear()
        _WORK_CACHE[key] = work
    return work


def grouped_block_update_(
    fs: list[torch.Tensor],
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    fallback_count: torch.Tensor,
    *,
    b: int,
    damping: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    skip: torch.Tensor | None = None,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    variant: str | None = None,
):
    """:func:`damped_block_update_` for many parameters of one block size and dtype in a single launch.

    The lists hold, per parameter, the same tensors :func:`damped_block_update_` takes (all on one device,
    all parameters of one dtype). A table of their addresses and a cached work list (parameter, first
    mini-block) per program let one grid cover all of them.
    """
    if not (len(fs) == len(grads) == len(params) == len(momentum_buffers)):
        raise ValueError("fs, grads, params and momentum_buffers must have the same length")
    if not params:
        return None
    flat, n_blocks = [], []
    dtype, device_index = params[0].dtype, params[0].get_device()
    for f, g, p, m in zip(fs, grads, params, momentum_buffers):
        _, cols, n_chunks, nb, t = _check_inputs(f, g, p, m, b)
        if p.dtype != dtype or p.get_device() != device_index:
            raise ValueError("all parameters of a group must share dtype and device")
        flat += (f.data_ptr(), g.data_ptr(), p.data_ptr(), m.data_ptr(), nb, n_chunks, cols)
        n_blocks.append(nb)
    _check_counter(fallback_count, fs[0].get_device())
    skip_ptr, has_skip = skip_args(skip, fs[0])
    blocks, launch = _launch_options(b, blocks_per_program, num_warps, num_stages, _check_variant(b, variant))
    if sum(n_blocks) == 0:
        return None
    device = params[0].device
    table = _address_table(flat, device)
    work = _work_list(tuple(n_blocks), blocks, device)
    scalars = (float(damping), float(lr), float(momentum), float(weight_decay))
    return _grouped_block_update_kernel[(work.shape[0],)](
        table, work, params[0], fallback_count, skip_ptr, *scalars,
        B=b, B_PAD=triton.next_power_of_2(b), T=b * (b + 1) // 2, BLOCKS=blocks, HAS_SKIP=has_skip,
        **launch,
    )
