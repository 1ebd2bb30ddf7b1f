"""The L1 cost of the solve kernels' global accesses, simulated per warp request (no GPU needed), and the
bytes the fused solve + update must move. Part of the static model of ``perf/kernel_model.py`` (which
re-exports these names); everything here is a model, not a measurement.

A warp request's cost is the number of distinct 128-byte lines (L1 wavefronts) its 32 lanes touch; a
masked-off lane touches nothing. Lanes are assigned to a ``[rows, W]`` tile as Triton's default blocked
layout does for a load whose offsets are contiguous along the last axis but of unknown alignment: one
element per lane, ``min(W, 32)`` lanes along a row, consecutive rows in the next lanes.
"""

from __future__ import annotations


def _lines_per_request(addrs: list[int], line: int = 128) -> tuple[int, int]:
    """Distinct 128-byte lines and 32-byte sectors that one warp request (32 byte addresses) touches."""
    return len({a // line for a in addrs}), len({a // 32 for a in addrs})


def chunk_widths(n: int, log_chunk: int) -> list[int]:
    """The power-of-two column chunks :func:`kernels.lane_solve._load_row` loads ``n`` entries in."""
    w = 1 << log_chunk
    return [w] * (n // w) + [1 << bit for bit in range(log_chunk - 1, -1, -1) if (n >> bit) & 1]


def l1_cost_per_block(pattern: str, n: int, stride: int, blocks: int = 4096, log_chunk: int = 5) -> tuple[float, float]:
    """(L1 lines, sectors) per mini-block for reading ``n`` fp32 entries of each block, blocks ``stride``
    entries apart, by 32-lane warp requests, simulated over ``blocks`` consecutive blocks:

    * ``"rows"``: one mini-block per lane, one load per entry (lane l reads block l's entry k);
    * ``"chunks"``: :func:`kernels.lane_solve._load_row`: a ``[BLOCKS, W]`` tile per power-of-two chunk,
      lanes along the W columns first (``min(W, 32)`` lanes per row), one fp32 each;
    * ``"interleaved"``: the tri-major layout ``(n, n_blocks)``: lane l reads entry k of block l, which sits
      next to block l+1's entry k."""
    lines = sectors = 0
    if pattern == "interleaved":
        for k in range(n):
            for w0 in range(0, blocks, 32):
                ln, sc = _lines_per_request([4 * (k * blocks + w0 + lane) for lane in range(32)])
                lines, sectors = lines + ln, sectors + sc
    elif pattern == "rows":
        for k in range(n):
            for w0 in range(0, blocks, 32):
                ln, sc = _lines_per_request([4 * ((w0 + lane) * stride + k) for lane in range(32)])
                lines, sectors = lines + ln, sectors + sc
    elif pattern == "chunks":
        start = 0
        for w in chunk_widths(n, log_chunk):
            lanes_per_row = min(w, 32)
            rows_per_req = 32 // lanes_per_row
            for c0 in range(0, w, lanes_per_row):
                for r0 in range(0, blocks, rows_per_req):
                    addrs = [4 * ((r0 + lane // lanes_per_row) * stride + start + c0 + lane % lanes_per_row)
                             for lane in range(32)]
                    ln, sc = _lines_per_request(addrs)
                    lines, sectors = lines + ln, sectors + sc
            start += w
    else:
        raise ValueError(pattern)
    return lines / blocks, sectors / blocks


def tril(b: int) -> int:
    return b * (b + 1) // 2


def floor_bytes(b: int) -> int:
    """Bytes the fused solve + update must move per mini-block (fp32): packed F read, gradient read,
    parameter and momentum read + write (as ``perf/bench_solve.py`` counts them)."""
    return 4 * (tril(b) + 5 * b)


def lane_l1_lines(b: int, f_pattern: str = "chunks", log_chunk: int = 5) -> float:
    """L1 lines per mini-block of the lane variant: F (``f_pattern``), gradient, momentum and parameter
    reads, momentum and parameter writes (the vectors of consecutive blocks are contiguous: stride b)."""
    f_lines, _ = l1_cost_per_block(f_pattern, tril(b), tril(b), log_chunk=log_chunk)
    v_lines, _ = l1_cost_per_block("chunks", b, b, log_chunk=log_chunk)
    return f_lines + 5 * v_lines


def _tile_lines(addr_rows: list[tuple[int, int]], w: int) -> int:
    """Lines touched by loading a ``[len(addr_rows), w]`` tile, row ``i`` starting at address (in fp32
    entries) ``addr_rows[i][0]`` with its first ``addr_rows[i][1]`` columns unmasked."""
    lanes_per_row = min(w, 32)
    rows_per_req = 32 // lanes_per_row
    lines = 0
    for c0 in range(0, w, lanes_per_row):
        for r0 in range(0, len(addr_rows), rows_per_req):
            addrs = [4 * (addr_rows[r0 + lane // lanes_per_row][0] + c0 + lane % lanes_per_row)
                     for lane in range(32)
                     if r0 + lane // lanes_per_row < len(addr_rows)
                     and c0 + lane % lanes_per_row < addr_rows[r0 + lane // lanes_per_row][1]]
            if addrs:
                lines += _lines_per_request(addrs)[0]
    return lines


def rows_l1_lines(b: int, lanes: int, log_chunk: int = 5, blocks: int = 256) -> float:
    """L1 lines per mini-block of the ``"rows"`` variant (:mod:`kernels.multilane_solve`, ``K = lanes``):
    ``F`` read per slot ``s`` as the ``(blocks*K,)`` rows ``r = k + K*s`` of ``min(K*s + K, b)`` columns
    (masked past ``r``), in power-of-two chunks (:func:`chunk_widths`); the gradient, momentum and
    parameter read and momentum and parameter written as ``[blocks, K]`` tiles per slot (consecutive blocks'
    vectors contiguous, stride ``b``); the fallback's reloads move nothing (masked)."""
    t, k_ = tril(b), lanes
    slots = -(-b // k_)
    lines = 0
    for s in range(slots):
        n = min(k_ * s + k_, b)
        rows = [(blk * t + r * (r + 1) // 2, r + 1 if r < b else 0)
                for blk in range(blocks) for r in range(k_ * s, k_ * s + k_)]
        start = 0
        for w in chunk_widths(n, log_chunk):
            lines += _tile_lines([(a + start, max(0, min(lim - start, w))) for a, lim in rows], w)
            start += w
        vec = [(blk * b + k_ * s + k, 1 if k_ * s + k < b else 0) for blk in range(blocks) for k in range(k_)]
        # one element per lane, lanes in (block, k) order: 32 consecutive (block, k) pairs per request
        for r0 in range(0, len(vec), 32):
            addrs = [4 * a for a, n_ in vec[r0:r0 + 32] if n_]
            if addrs:
                lines += 5 * _lines_per_request(addrs)[0]
    return lines / blocks
