"""The ``"lane"`` variant of :mod:`.block_update`'s fused solve+update, as Triton device functions: one
mini-block per lane, fully unrolled scalar code over the packed triangle (each "scalar" a ``(BLOCKS,)``
vector), with the coalesced row loads and stores it reads ``F``, the gradient, the momentum and the
parameter with. The launchers and the ``"tile"`` variant are in :mod:`.block_update`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_columns(ptr, off, start: tl.constexpr, LOG_W: tl.constexpr, limit, valid, BLOCKS: tl.constexpr):
    """Columns ``start .. start+W-1`` (``W = 2**LOG_W``) of the rows ``ptr + off`` as a tuple of W
    ``(BLOCKS,)`` fp32 vectors: one coalesced ``[BLOCKS, W]`` load (consecutive lanes read consecutive
    addresses), then split into columns in registers (the compiler's layout change goes through shared
    memory once, unless each lane's W entries are one vector). Entries at or past ``limit`` (per row; None:
    no limit) read 0 and move no bytes."""
    W: tl.constexpr = 1 << LOG_W
    j = start + tl.arange(0, W)[None, :]
    if limit is None:  # whole rows: a row mask only, so that aligned rows load as 8- or 16-byte vectors
        tile = tl.load(ptr + off[:, None] + j, mask=valid[:, None], other=0.0)
    else:
        tile = tl.load(ptr + off[:, None] + j, mask=valid[:, None] & (j < limit[:, None]), other=0.0)
    cols = (tile.to(tl.float32),)
    for level in tl.static_range(LOG_W):  # cols[k] holds columns k::len(cols)
        evens = ()
        odds = ()
        for k in tl.static_range(1 << level):
            e, o = tl.split(tl.reshape(cols[k], [BLOCKS, W >> (level + 1), 2]))
            evens = evens + (e,)
            odds = odds + (o,)
        cols = evens + odds
    out = ()
    for k in tl.static_range(W):
        out = out + (tl.reshape(cols[k], [BLOCKS]),)
    return out


@triton.jit
def _load_row(ptr, off, N: tl.constexpr, limit, valid, BLOCKS: tl.constexpr, LOG_CHUNK: tl.constexpr):
    """The first ``N`` entries of the rows ``ptr + off`` as a tuple of N ``(BLOCKS,)`` vectors, loaded in
    power-of-two chunks of at most ``2**LOG_CHUNK`` columns (an odd N such as 45 = 32 + 8 + 4 + 1 is not
    padded)."""
    out = ()
    for c in tl.static_range(N >> LOG_CHUNK):
        out = out + _load_columns(ptr, off, c << LOG_CHUNK, LOG_CHUNK, limit, valid, BLOCKS)
    for bit in tl.static_range(LOG_CHUNK - 1, -1, -1):
        if (N >> bit) & 1:
            out = out + _load_columns(ptr, off, (N >> (bit + 1)) << (bit + 1), bit, limit, valid, BLOCKS)
    return out


@triton.jit
def _store_columns(ptr, off, vals, first: tl.constexpr, LOG_W: tl.constexpr, limit, mask, BLOCKS: tl.constexpr):
    """Store ``vals[first .. first+W-1]`` as columns ``first ..`` of the rows ``ptr + off``: the inverse of
    :func:`_load_columns` (columns joined into one ``[BLOCKS, W]`` tile, one coalesced store)."""
    W: tl.constexpr = 1 << LOG_W
    cols = ()
    for k in tl.static_range(W):
        cols = cols + (tl.reshape(vals[first + k], [BLOCKS, 1]),)
    for level in tl.static_range(LOG_W):  # cols[k] holds columns k::len(cols)
        joined = ()
        for k in tl.static_range(W >> (level + 1)):
            joined = joined + (tl.reshape(tl.join(cols[k], cols[k + (W >> (level + 1))]), [BLOCKS, 2 << level]),)
        cols = joined
    j = first + tl.arange(0, W)[None, :]
    tl.store(ptr + off[:, None] + j, cols[0].to(ptr.dtype.element_ty), mask=mask[:, None] & (j < limit[:, None]))


@triton.jit
def _store_row(ptr, off, vals, N: tl.constexpr, limit, mask, BLOCKS: tl.constexpr, LOG_CHUNK: tl.constexpr):
    """The inverse of :func:`_load_row`: ``vals`` (N vectors) into the rows ``ptr + off`` where ``mask``."""
    for c in tl.static_range(N >> LOG_CHUNK):
        _store_columns(ptr, off, vals, c << LOG_CHUNK, LOG_CHUNK, limit, mask, BLOCKS)
    for bit in tl.static_range(LOG_CHUNK - 1, -1, -1):
        if (N >> bit) & 1:
            _store_columns(ptr, off, vals, (N >> (bit + 1)) << (bit + 1), bit, limit, mask, BLOCKS)


@triton.jit
def _finish(x, m, p, ok, fb, fdiag_ptr, gi_ptr, gmask, damping, lr, momentum, weight_decay):
    """The end of the fused step for one entry of the direction (any shape): the solution ``x`` where the
    factorisation succeeded (``ok``), else the diagonal fallback ``g / (max(F_ii, 0) + damping)`` (max that
    keeps a NaN, as torch.clamp does), with ``F_ii`` and ``g`` reloaded only where ``fb`` (no traffic in the
    common case, and neither stays live through the factorisation); then momentum, decoupled weight decay and
    the step. Returns ``(new momentum, new parameter)`` in fp32."""
    fd = tl.load(fdiag_ptr, mask=fb, other=1.0)
    gi = tl.load(gi_ptr, mask=fb & gmask, other=0.0).to(tl.float32)
    d = tl.where(ok, x, gi / (tl.where(fd < 0.0, 0.0, fd) + damping))
    mi = m * momentum + d
    return mi, p * (1.0 - lr * weight_decay) - lr * mi


@triton.jit
def _lane_solve_and_update(
    f_ptr, g_ptr, p_ptr, m_ptr, blk0, n_blocks, keep, n_chunks, cols,
    damping, lr, momentum, weight_decay,
    B: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr, LOG_CHUNK: tl.constexpr,
):
    """:func:`_solve_and_update` with one mini-block per lane: every entry of a block is a ``(BLOCKS,)``
    vector (one value per lane) and the factorisation is fully unrolled scalar code over the packed
    triangle, ``b^3/6`` multiply-adds per block and no padding. Loads and stores are coalesced tiles split
    into (joined from) columns in registers."""
    # Blocks blk0 .. blk0 + BLOCKS - 1 (blk0 a multiple of BLOCKS). F rows from one scalar base with 32-bit
    # offsets inside the program: fewer registers, and 16-byte loads where T % 4 == 0.
    blk = blk0 + tl.arange(0, BLOCKS)
    valid = blk < n_blocks
    f_base = f_ptr + blk0 * T
    f_off = tl.arange(0, BLOCKS) * T
    a = _load_row(f_base, f_off, T, None, valid, BLOCKS, LOG_CHUNK)
    r = blk // n_chunks
    first = (blk - r * n_chunks) * B
    voff = r * cols + first
    vlim = tl.minimum(cols - first, B).to(tl.int32)  # entries in the row: B, or fewer in the tail chunk
    g = _load_row(g_ptr, voff, B, vlim, valid, BLOCKS, LOG_CHUNK)

    # Cholesky by rows (packed order), forward substitution of row i right after it: fac holds L in packed
    # order with 1 / L_ii in place of the diagonal; y = L^{-1} g.
    ok = valid | ~valid
    fac = ()
    y = ()
    for i in tl.static_range(B):
        for j in tl.static_range(i + 1):
            s = a[i * (i + 1) // 2 + j]
            for k in tl.static_range(j):
                s -= fac[i * (i + 1) // 2 + k] * fac[j * (j + 1) // 2 + k]
            if j < i:
                fac = fac + (s * fac[j * (j + 1) // 2 + j],)
            else:
                pivot = s + damping
                ok = ok & (pivot > 0.0) & (pivot <= 3.4028234663852886e38)
                fac = fac + (tl.rsqrt(pivot),)
        t = g[i]
        for k in tl.static_range(i):
            t -= fac[i * (i + 1) // 2 + k] * y[k]
        y = y + (t * fac[i * (i + 1) // 2 + i],)

    # back substitution L^T x = y, from the last row up; then fallback, momentum, decay, step
    xr = ()  # xr[B - 1 - i] = x_i
    for i in tl.static_range(B - 1, -1, -1):
        t = y[i]
        for k in tl.static_range(i + 1, B):
            t -= fac[k * (k + 1) // 2 + i] * xr[B - 1 - k]
        xr = xr + (t * fac[i * (i + 1) // 2 + i],)
    # m and p only now: loaded earlier (the compiler hoists loads) they would hold 2b registers through the
    # factorisation, which spills at b = 16
    tl.debug_barrier()
    m = _load_row(m_ptr, voff, B, vlim, valid, BLOCKS, LOG_CHUNK)
    p = _load_row(p_ptr, voff, B, vlim, valid, BLOCKS, LOG_CHUNK)
    fb = valid & ~ok
    new_m = ()
    new_p = ()
    for i in tl.static_range(B):
        mi, pi = _finish(xr[B - 1 - i], m[i], p[i], ok, fb, f_base + f_off + i * (i + 3) // 2, g_ptr + voff + i,
                         i < vlim, damping, lr, momentum, weight_decay)
        new_m = new_m + (mi,)
        new_p = new_p + (pi,)
    store = tl.where(keep, valid, False)
    _store_row(m_ptr, voff, new_m, B, vlim, store, BLOCKS, LOG_CHUNK)
    _store_row(p_ptr, voff, new_p, B, vlim, store, BLOCKS, LOG_CHUNK)
    return tl.sum(tl.where(keep, valid & ~ok, False).to(tl.int32), axis=0)
