"""What an :class:`~mbf_triton.MBF` optimizer does with each parameter, as a table (``opt.summary()``).

One row per parameter: its name in the model (when the optimizer knows the model), the mini-block
layout (kind, block size ``b``, number of blocks), the backend that runs it (``torch`` or ``triton``), the
launch configuration of its fused update kernel (tuned, from the autotune cache, or the heuristic; the
Triton path only), the bytes of its curvature state ``F``, and the scale of the diagonal of ``F`` (median
and max over the parameter's real mini-block entries; blank before its first statistics): the number to
compare ``damping`` with (``damping`` far above it: MBF acts like SGD with learning rate ``lr / damping``;
far below: like a natural-gradient method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import reference as ref
from .backends import get_backend
from .blocks import Layout
from .tuning.configs import block_update_key, describe


@dataclass(frozen=True)
class ParamSummary:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: Layout
    backend: str
    launch: str  # the fused update's launch configuration and where it came from, or "-" (torch ops)
    curvature_bytes: int
    fisher_median: float | None  # of diag F over the real entries; None before the first statistics
    fisher_max: float | None


def fisher_diagonal(opt: Any) -> dict[str, torch.Tensor]:
    """The diagonal of every parameter's running Fisher estimate ``F``, as a tensor shaped like the
    parameter (fp32; absent for parameters without statistics yet), keyed by name (``param<i>`` where the
    model does not name it). ``{k: v.median().item() for k, v in fisher_diagonal(opt).items()}`` gives a
    per-layer scale to set ``damping`` against."""
    out = {}
    for name, p, group in _params(opt):
        state = opt.state.get(p, {})
        if state.get("stat_steps", 0) < 1 or "F" not in state:
            continue
        layout = opt.layout(p)
        diag = state["F"].index_select(1, ref.diag_indices(layout.b, state["F"].device))  # (n_blocks, b)
        out[name] = ref.from_blocks(diag, layout.rows, layout.cols).reshape(p.shape)
    return out


def summarize(opt: Any) -> list[ParamSummary]:
    """One :class:`ParamSummary` per parameter of ``opt``'s param groups, in order."""
    diag = fisher_diagonal(opt)
    items = list(_params(opt))
    layouts = {id(p): opt.layout(p) for _, p, _ in items}
    rows = []
    for name, p, group in items:
        layout = layouts[id(p)]
        backend = get_backend(opt.backend, p.device, p.dtype)
        state = opt.state.get(p, {})
        f = state.get("F")
        nbytes = f.numel() * f.element_size() if f is not None else layout.curvature_numel * 4
        d = diag.get(name)
        rows.append(ParamSummary(
            name, tuple(p.shape), p.dtype, p.device, layout, backend.name,
            _launch(backend, p, layout, group, items, layouts), nbytes,
            None if d is None else float(d.median()), None if d is None else float(d.max()),
        ))
    return rows


def format_summary(opt: Any) -> str:
    """:func:`summarize` as a text table with a totals line."""
    rows = summarize(opt)
    header = ["parameter", "shape", "kind", "b", "blocks", "backend", "update launch", "F bytes",
              "diag F median", "diag F max"]
    table = [[r.name, "x".join(map(str, r.shape)) or "scalar", r.layout.kind, str(r.layout.b),
              str(r.layout.n_blocks), r.backend, r.launch, f"{r.curvature_bytes:,}",
              _num(r.fisher_median), _num(r.fisher_max)] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    right = {3, 4, 7, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    total = sum(r.curvature_bytes for r in rows)
    backends = sorted({f"{r.backend} on {r.device}" for r in rows})
    out = [line(header), line(["-" * w for w in widths]), *(line(row) for row in table)]
    out.append(f"{len(rows)} parameters, {total:,} bytes of curvature state; backend: {', '.join(backends) or '-'}")
    return "\n".join(out)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def _params(opt: Any):
    names = {}
    model = opt._capture.model
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters()}
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            yield names.get(id(p), f"param{i}"), p, group
            i += 1


def _launch(backend: Any, p: torch.Tensor, layout: Layout, group: dict, items: list, layouts: dict) -> str:
    """The update kernel's launch configuration of ``p`` on the Triton path: the parameters of one block
    size, dtype, device and group launch together with the configuration of the largest one."""
    if backend.name != "triton":
        return "-"
    from .kernels.block_update import MAX_BLOCK_SIZE

    if layout.b > MAX_BLOCK_SIZE:
        return f"torch.linalg (b > {MAX_BLOCK_SIZE})"
    mates = [q for _, q, g in items
             if g is group and q.device == p.device and q.dtype == p.dtype and layouts[id(q)].b == layout.b]
    n_blocks = max(layouts[id(q)].n_blocks for q in mates)
    choice = backend.tuner.chosen.get(block_update_key(layout.b, n_blocks, p.dtype))
    if choice is None:
        return "not launched yet"
    return f"{describe(choice.config)} ({choice.source})"
