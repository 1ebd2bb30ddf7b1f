"""The ``"rows"`` variant of :mod:`.block_update`'s fused solve+update, as Triton device functions: a few
lanes per mini-block (``K``, a power of two), each lane holding a cyclic set of the block's rows.

Every value is a ``[BLOCKS, K]`` tensor (one mini-block per row, one lane per column). Lane ``k`` holds rows
``r = k + K*s`` (slot ``s = 0 .. S-1``, ``S = ceil(b / K)``) and, of row ``r``, only the columns a row of
slot ``s`` can have in the lower triangle, ``0 .. min(K*s + K, b) - 1``: Python-unrolled tuples
(``tl.static_range``), no padding of odd ``b`` in the arithmetic. The factorisation is right-looking and
symmetric (``A = L D L^T`` form of the damped Cholesky, so each pivot costs one division and no square
root): at pivot ``j`` every lane receives the values ``A[c, j]`` it needs from lane ``c % K`` by a masked
sum over the ``K`` lanes (``tl.sum(tl.where(lane == c % K, v, 0))``: ``log2 K`` butterfly shuffles;
written out, not a helper: each call of a jit helper costs milliseconds under the interpreter) and
updates its own rows with multiply-adds, about ``b^2/2`` such broadcasts and ``b^3 / (6K)`` multiply-adds per
lane. The pivots ``A_jj - sum_k L_jk^2`` are those of the Cholesky factorisation, so the fallback test is the same
(``<= 0`` or not finite). The forward substitution runs in the same loop; the back substitution takes one
lane-sum per row. Loads of ``F`` reuse :func:`.lane_solve._load_row` (coalesced chunks of each lane's rows);
the fallback and the update reuse :func:`.lane_solve._finish`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lane_solve import _finish, _load_row


@triton.jit
def _rows_solve_and_update(
    f_ptr, g_ptr, p_ptr, m_ptr, blk0, n_blocks, keep, n_chunks, cols,
    damping, lr, momentum, weight_decay,
    B: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr, K: tl.constexpr, LOG_CHUNK: tl.constexpr,
):
    """:func:`.block_update._solve_and_update` for mini-blocks ``blk0 .. blk0 + BLOCKS - 1`` with ``K``
    lanes per block; returns how many fell back to the diagonal (0 when ``keep`` is false)."""
    S: tl.constexpr = (B + K - 1) // K
    lane = tl.arange(0, K)[None, :]  # (1, K)
    blk = blk0 + tl.arange(0, BLOCKS)[:, None]  # (BLOCKS, 1)
    valid = blk < n_blocks
    f_base = f_ptr + blk0 * T

    # --- F: slot s of lane k is row r = k + K*s, columns 0 .. min(K*s + K, B) - 1 (masked at c > r), read
    # as the rows of a (BLOCKS*K,) vector of row starts; damping on the diagonal. x is flat: slot s starts
    # at K*s*(s+1)/2.
    flat = tl.arange(0, BLOCKS * K)
    fk = flat % K
    fvalid = blk0 + flat // K < n_blocks
    x = ()
    for s in tl.static_range(S):
        r = fk + K * s
        row = _load_row(f_base, (flat // K) * T + r * (r + 1) // 2, K * s + K if K * s + K < B else B,
                        tl.where(r < B, r + 1, 0), fvalid, BLOCKS * K, LOG_CHUNK)
        for c in tl.static_range(K * s + K if K * s + K < B else B):
            v = tl.reshape(row[c], [BLOCKS, K])
            if c >= K * s:
                v = tl.where(lane == c - K * s, v + damping, v)
            x = x + (v,)

    # --- gradient chunk: entry r of block blk is grad[row, first + r]
    rr = blk // n_chunks
    first = (blk - rr * n_chunks) * B
    voff = rr * cols + first
    vlim = tl.minimum(cols - first, B).to(tl.int32)
    z = ()
    for s in tl.static_range(S):
        e = lane + K * s
        z = z + (tl.load(g_ptr + voff + e, mask=valid & (e < vlim), other=0.0).to(tl.float32),)

    # --- A = L D L^T by columns, with the forward substitution: after pivot j, column j of x holds
    # L_rj / L_jj (= A_rj / pivot) and z_j holds y_j / L_jj (y = L^{-1} g), what the back substitution needs.
    ok = valid | ~valid
    for j in tl.static_range(B):
        pivot = tl.sum(tl.where(lane == j % K, x[K * (j // K) * (j // K + 1) // 2 + j], 0.0), axis=1, keep_dims=True)
        ok = ok & (pivot > 0.0) & (pivot <= 3.4028234663852886e38)
        w = 1.0 / pivot
        zr = tl.sum(tl.where(lane == j % K, z[j // K], 0.0), axis=1, keep_dims=True)
        mj = ()  # mj[s - j // K] = column j of slot s over the pivot: A_rj / pivot = L_rj / L_jj
        for s in tl.static_range(j // K, S):
            mj = mj + (x[K * s * (s + 1) // 2 + j] * w,)
        q = ()  # q[c - j - 1] = A_cj in every lane
        for c in tl.static_range(j + 1, B):
            q = q + (tl.sum(tl.where(lane == c % K, x[K * (c // K) * (c // K + 1) // 2 + j], 0.0), axis=1,
                            keep_dims=True),)
        nx = ()
        for s in tl.static_range(S):
            for c in tl.static_range(K * s + K if K * s + K < B else B):
                v = x[K * s * (s + 1) // 2 + c]
                if s >= j // K:
                    if c == j:
                        v = mj[s - j // K]
                    elif c > j and s >= c // K:
                        v = v - mj[s - j // K] * q[c - j - 1]
                nx = nx + (v,)
        nz = ()
        for s in tl.static_range(S):
            v = z[s]
            if s > j // K:
                v = v - mj[s - j // K] * zr
            elif s == j // K:  # rows above j keep their final values; z_j becomes y_j / L_jj
                v = tl.where(lane > j % K, v - mj[0] * zr, tl.where(lane == j % K, zr * w, v))
            nz = nz + (v,)
        x = nx
        z = nz

    # --- back substitution L^T x = y from the last row up: d_i = z_i - sum_{r > i} x[r, i] d_r, one lane-sum
    # per row (entries of d not computed yet are 0, so rows <= i add nothing)
    d = ()
    for s in tl.static_range(S):
        d = d + (tl.zeros([BLOCKS, K], dtype=tl.float32),)
    for ii in tl.static_range(B):
        part = tl.where(lane == (B - 1 - ii) % K, z[(B - 1 - ii) // K], 0.0)
        for s in tl.static_range((B - 1 - ii) // K, S):
            part -= x[K * s * (s + 1) // 2 + B - 1 - ii] * d[s]
        di = tl.sum(part, axis=1, keep_dims=True)
        nd = ()
        for s in tl.static_range(S):
            if s == (B - 1 - ii) // K:
                nd = nd + (tl.where(lane == (B - 1 - ii) % K, di, d[s]),)
            else:
                nd = nd + (d[s],)
        d = nd

    # --- diagonal fallback, momentum, decay, step (m and p loaded only now: fewer live registers)
    tl.debug_barrier()
    fb = valid & ~ok
    store = tl.where(keep, valid, False)
    for s in tl.static_range(S):
        e = lane + K * s
        emask = e < vlim
        m = tl.load(m_ptr + voff + e, mask=valid & emask, other=0.0)
        p = tl.load(p_ptr + voff + e, mask=valid & emask, other=0.0).to(tl.float32)
        new_m, new_p = _finish(d[s], m, p, ok, fb & (e < B), f_base + (blk - blk0) * T + e * (e + 3) // 2,
                               g_ptr + voff + e, emask, damping, lr, momentum, weight_decay)
        tl.store(m_ptr + voff + e, new_m, mask=store & emask)
        tl.store(p_ptr + voff + e, new_p.to(p_ptr.dtype.element_ty), mask=store & emask)
    return tl.sum(tl.sum(tl.where(keep, valid & ~ok, False).to(tl.int32), axis=1), axis=0)
