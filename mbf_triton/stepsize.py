"""Step-size options beyond the paper: how long MBF's step is, and when its statistics are taken.

MBF's direction ``d_i = (F_i + damping I)^{-1} g_i`` has a length set by the Fisher's scale against
``damping``: where ``F << damping`` it is ``g / damping`` (SGD with learning rate ``lr / damping``), where
``F >> damping`` a natural-gradient step. Layers of one model sit in different regimes (the digits
autoencoder's Fisher diagonal spans 1e-8..5e-4), so a good ``lr`` depends on ``damping`` and on the model.
The options here make ``lr`` mean what it means for a first-order method:

- ``graft="adam"`` (layer-wise grafting, as distributed Shampoo does): each parameter's direction is
  rescaled to the norm of Adam's: ``s_p = (1 - momentum) ||g / (sqrt(v_hat) + eps)|| / ||d||`` with
  ``v <- beta2 v + (1 - beta2) g^2`` (Adam's second moment, bias-corrected, ``beta2 = 0.999``,
  ``eps = 1e-8``). MBF's heavy-ball momentum ``m <- momentum m + s d`` then is Adam's first-moment EMA in
  norm, and bias-corrected as Adam's: at the parameter's ``t``-th (unskipped) step the buffer is first
  multiplied by ``(1 - momentum^(t-1)) / (1 - momentum^t)`` and the new direction's factor is
  ``(1 - momentum) / (1 - momentum^t)`` instead of ``1 - momentum``, so the buffer *is* Adam's
  bias-corrected first moment ``m_hat`` in norm and ``lr`` is Adam's learning rate from the first step on;
  MBF keeps only the direction. (``t`` is per parameter, on the device: skipped steps do not count, a
  cleared state starts again at 1.)
- ``graft="sgd"``: ``s_p = ||g|| / ||d||``: ``lr`` is torch SGD-with-momentum's learning rate.
- ``graft_scope``: over which entries the norms above are taken. ``"parameter"``: one scale per
  parameter. ``"block"`` (the default, with ``graft="adam"``: the training study's pick, README
  "Training quality"): one scale per mini-block, ``s_i = ||a_i|| / ||d_i||`` with ``a_i`` the
  grafted step (Adam's or SGD's) restricted to block ``i``'s entries, as distributed Shampoo grafts per
  block of its blocking. On 1x1 (``diag``) blocks that is Adam's (or SGD's) step exactly; inside a larger
  block the direction is MBF's. A mini-block lies whole on one rank (rows of ``F`` are blocks), so these
  norms need no communication. The momentum's bias correction is the same (a per-parameter ``t``).
- ``kl_clip=kappa`` (K-FAC's trust region): with ``Delta_p = lr s_p d_p``, all directions are scaled by
  ``nu = min(1, sqrt(kappa / sum_p lr^2 s_p^2 g_p . d_p))``, so the step's quadratic model
  ``Delta^T (F + damping I) Delta`` (= ``lr^2 s^2 g . d``) stays below ``kappa``.
- ``stat_warmup=k``: statistics at every one of the first ``k`` steps (calls of ``step()`` with
  gradients), then every ``stat_every``: the first ``F`` estimates come from more than one batch.

How the scale reaches the update: ``d`` is linear in ``g``, so the fused solve-and-update of either
backend is given ``s_p nu g_p`` in place of ``g_p`` and produces ``s_p nu d_p`` with the same momentum,
weight decay and write (one update path, the same math on the torch and Triton backends). Computing
``s_p`` needs ``||d_p||`` first: the backend's ``direction`` (torch: through the factor the update then
reuses; Triton: the fused kernel writing ``d`` alone), the price of the option; plain MBF pays nothing.
Every scale is a device tensor: no host synchronisation, and a step skipped on the device (non-finite
gradient) leaves the Adam statistics untouched.

Data parallel (:mod:`mbf_triton.distributed`): a rank solves, updates and keeps Adam's second moment for
the rows (mini-blocks) of each parameter it owns. ``s_p`` and ``nu`` need whole-parameter sums
(``||Adam step||^2``, ``||g||^2``, ``||d||^2``, ``g . d``), so each rank forms the sums over its rows,
for all parameters in one ``(3, n)`` fp32 tensor, and one async ``all_reduce`` adds up the rows of it that
the options need (sharded curvature and FSDP2; the momentum's bias correction runs meanwhile). Every rank
then computes the same scales. Per-block grafting alone needs none (a block is whole on its rank), with
``kl_clip`` only its quadratic; replicated DDP and one process own every row: no collective. The skip
flag is the same on every rank by then (DDP's averaged gradient, FSDP2's agreed flag), so a skipped step
leaves every rank's Adam statistics untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed
from . import reference as ref

GRAFTS = (None, "adam", "sgd")
GRAFT_SCOPES = ("parameter", "block")
GRAFT_BETA2 = 0.999
GRAFT_EPS = 1e-8
FP32_STATE = ("graft_sq", "graft_steps")  # state kept in fp32 whatever the parameter's dtype (as F and the momentum)


@dataclass(frozen=True)
class StepSize:
    """The step-size options of one optimizer (validated here, used by :class:`mbf_triton.MBF`)."""

    graft: str | None = "adam"
    kl_clip: float | None = None
    stat_warmup: int = 0
    graft_scope: str = "block"

    def __post_init__(self) -> None:
        if self.graft not in GRAFTS:
            raise ValueError(f"graft={self.graft!r} must be one of {GRAFTS}")
        if self.graft_scope not in GRAFT_SCOPES:
            raise ValueError(f"graft_scope={self.graft_scope!r} must be one of {GRAFT_SCOPES}")
        k = self.kl_clip
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < float("inf")):
            raise ValueError(f"kl_clip={k!r} must be None or a finite number > 0")
        w = self.stat_warmup
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"stat_warmup={w!r} must be an integer >= 0")

    @property
    def scales_steps(self) -> bool:
        """True if the directions are rescaled (plain MBF otherwise)."""
        return self.graft is not None or self.kl_clip is not None

    def stat_interval(self, calls: int, stat_every: int) -> int:
        """Steps from a parameter's statistics at its own step ``calls`` (0-based) to its next ones."""
        return 1 if calls + 1 < self.stat_warmup else stat_every

    def scaled_gradients(self, entries: list[Any], states: dict[torch.Tensor, dict[str, Any]],
                         lrs: dict[int, float], skip: dict[torch.device, torch.Tensor],
                         owned: Callable[[Any, torch.Tensor], torch.Tensor], dp: Any = None,
                         ) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: s_p * nu * grad}`` for the optimizer's step ``entries`` (each with ``param``, ``layout``
        and ``group``; ``lrs``: each group's lr by ``id``), their ``F`` in ``states`` already holding this
        step's statistics; each value is the ``(rows, cols)`` matrix of the rows this rank updates
        (``owned(entry, tensor)``: all rows in one process). The fused update is then given these in place
        of the gradients. ``{}`` for the paper's method. Data parallel with rows split across ranks (``dp``),
        the whole-parameter sums that the options need are all-reduced together: at most one collective
        (:func:`distributed.sum_async`)."""
        if not self.scales_steps:
            return {}
        grads = [owned(e, e.param.grad) for e in entries]
        sums, block_scales = self._partial_sums(entries, states, grads, skip)
        summed = self._summed_rows()
        # None in one process, where every rank has every row, and where no sum needs the other ranks' rows
        pending = distributed.sum_async(dp, sums[summed]) if summed is not None else None
        coefs = [self._momentum_correction(states[e.param], e.group["momentum"], skip[e.param.device])
                 for e in entries]  # local work while the sums travel
        if pending is not None:
            pending.wait()
        scales = self._scales(sums, coefs, [lrs[id(e.group)] for e in entries])
        return {e.param: _scaled(g, e.layout.b, s if r is None else s.to(r.device) * r)
                for e, g, s, r in zip(entries, grads, scales, block_scales)}

    def _summed_rows(self) -> slice | None:
        """The rows of :meth:`_partial_sums` that need every rank's rows: the norms of per-parameter grafting
        (0, 1) and kl_clip's quadratic (2); None if none does (per-block grafting alone)."""
        lo = 0 if self.graft is not None and self.graft_scope == "parameter" else 2
        hi = 3 if self.kl_clip is not None else 2
        return slice(lo, hi) if hi > lo else None

    def _partial_sums(self, entries: list[Any], states: dict[torch.Tensor, dict[str, Any]],
                      grads: list[torch.Tensor], skip: dict[torch.device, torch.Tensor],
                      ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """``(3, n)`` fp32, per entry the sums over this rank's rows of ``||a||^2`` (``a`` the grafted step:
        Adam's, after folding ``g^2`` into its second moment, or the gradient), ``||d||^2`` and
        ``sum_i r_i^2 g_i . d_i``; and per entry the per-block scales ``r_i = ||a_i|| / ||d_i||``
        (``graft_scope="block"``; else None and ``r_i = 1``)."""
        norms = self.graft is not None and self.graft_scope == "parameter"  # rows 0, 1 are read
        quads = self.kl_clip is not None  # row 2 is read
        cols: list[list[torch.Tensor]] = [[], [], []]
        block_scales = []
        home = None
        for e, grad, d in zip(entries, grads, _directions(entries, states, grads)):
            state, layout = states[e.param], e.layout
            g = ref.to_blocks(grad.float(), layout.b)
            home = g.device if home is None else home
            a = self._adam_step(state, g, skip[g.device]) if self.graft == "adam" else g
            r = None
            if self.graft is not None and self.graft_scope == "block":
                r = torch.linalg.vector_norm(a, dim=-1) / torch.linalg.vector_norm(d, dim=-1).clamp_min(1e-30)
            if norms:
                cols[0].append(a.square().sum())
                cols[1].append(d.square().sum())
            if quads:
                gd = (g * d).sum(-1)
                cols[2].append(gd.sum() if r is None else (gd * r * r).sum())
            block_scales.append(r)
        # sums no option reads (the default, per-block grafting alone, reads none) stay zero: fewer launches
        return torch.stack([torch.stack([x.to(home) for x in col]) if col else
                            torch.zeros(len(entries), device=home) for col in cols]), block_scales

    def _scales(self, sums: torch.Tensor, coefs: list[torch.Tensor | float], lrs: list[float]) -> torch.Tensor:
        """``s_p * nu`` of every entry from the whole-parameter sums (``(3, n)``, :meth:`_partial_sums`):
        ``s_p`` is the momentum's factor times ``||a|| / ||d||`` (per-parameter grafting), the factor alone
        (per-block grafting: the blocks' ratios are applied on top), 1 without grafting."""
        a_sq, d_sq, quad = sums.unbind(0)
        ratio = torch.ones_like(d_sq)
        if self.graft is not None and self.graft_scope == "parameter":
            ratio = a_sq.sqrt() / d_sq.sqrt().clamp_min(1e-30)
        # (the factors are device tensors or floats: no host-to-device copy, no synchronisation)
        s = torch.stack([x * (c.to(x.device) if torch.is_tensor(c) else c) for x, c in zip(ratio, coefs)])
        if self.kl_clip is not None:
            total = torch.stack([(q * (lr * lr)).clamp_min(0.0) for q, lr in zip(quad * s * s, lrs)]).sum()
            s = s * torch.sqrt(self.kl_clip / total.clamp_min(1e-30)).clamp(max=1.0)
        return s

    def _adam_step(self, state: dict[str, Any], g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Adam's step ``g / (sqrt(v_hat) + eps)`` (no first moment) for the blocks ``g`` of this rank's
        rows, after folding ``g^2`` into the second moment ``v`` and counting the step (not when skipped)."""
        if "graft_sq" not in state:  # Adam's second moment (this rank's rows) and its count of unskipped steps
            state["graft_sq"] = torch.zeros_like(g)
            state["graft_steps"] = torch.zeros((), dtype=torch.float32, device=g.device)
        v, t = state["graft_sq"], state["graft_steps"]
        skipped = _as_bool(skip)
        v.copy_(torch.where(skipped, v, torch.lerp(g * g, v, GRAFT_BETA2)))
        t.copy_(torch.where(skipped, t, t + 1))
        v_hat = v / (1 - GRAFT_BETA2 ** t.clamp_min(1.0))
        return g / (v_hat.sqrt() + GRAFT_EPS)

    def _momentum_correction(self, state: dict[str, Any], momentum: float, skip: torch.Tensor,
                             ) -> torch.Tensor | float:
        """Adam grafting with momentum: the buffer becomes ``m_hat_t = (1 - mu^(t-1)) / (1 - mu^t) m_hat_(t-1)
        + (1 - mu) / (1 - mu^t) s d`` after the fused update's ``m <- mu m + (...) d``: rescales the buffer
        (not when skipped) and returns the new direction's factor; 1 otherwise."""
        if self.graft != "adam" or momentum == 0.0:
            return 1.0
        t1 = state["graft_steps"].clamp_min(1.0)
        buf = state["momentum_buffer"]
        buf.mul_(torch.where(_as_bool(skip), torch.ones_like(t1), (1 - momentum ** (t1 - 1)) / (1 - momentum ** t1)))
        return (1.0 - momentum) / (1 - momentum ** t1)


def _directions(entries: list[Any], states: dict[torch.Tensor, dict[str, Any]], grads: list[torch.Tensor],
                ) -> list[torch.Tensor]:
    """MBF's direction of every entry (fp32 blocks of the rows this rank holds), from the backends'
    ``directions`` called per update group (backend, device, dtype, b, param group: as the optimizer's
    update batches), so that the Triton backend launches once per group and the torch backend factors
    each group once for both the directions and the update."""
    out: list[torch.Tensor | None] = [None] * len(entries)
    batches: dict[tuple, list[int]] = {}
    for k, (e, grad) in enumerate(zip(entries, grads)):
        if states[e.param]["F"].shape[0] == 0:  # none of its rows is this rank's
            out[k] = ref.to_blocks(grad.float(), e.layout.b)
        else:
            key = (id(e.backend), e.param.device, e.param.dtype, e.layout.b, id(e.group))
            batches.setdefault(key, []).append(k)
    for ks in batches.values():
        e = entries[ks[0]]
        ds = e.backend.directions([(states[entries[k].param]["F"], grads[k]) for k in ks], b=e.layout.b,
                                  damping=e.group["damping"])
        for k, d in zip(ks, ds):
            out[k] = d
    return out


def _as_bool(skip: torch.Tensor) -> torch.Tensor:
    return skip.reshape(()) if skip.dtype == torch.bool else skip.reshape(()) != 0


def _scaled(grad: torch.Tensor, b: int, s: torch.Tensor) -> torch.Tensor:
    """``s * grad`` for a ``(rows, cols)`` gradient matrix, in its dtype; a per-block ``s`` (one per
    mini-block of width ``b``) multiplies each mini-block's entries through the to/from-blocks mapping."""
    if s.ndim == 0:
        return (grad.float() * s.to(grad.device)).to(grad.dtype)
    if grad.numel() == 0:  # none of the parameter's rows is this rank's
        return grad
    blocks = ref.to_blocks(grad.float(), b) * s[:, None]
    return ref.from_blocks(blocks, *grad.shape).to(grad.dtype).contiguous()
