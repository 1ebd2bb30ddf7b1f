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
- ``graft_scope``: over which entries the norms above are taken. ``"parameter"`` (the default): one scale
  per parameter. ``"block"``: one scale per mini-block, ``s_i = ||a_i|| / ||d_i||`` with ``a_i`` the
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
``s_p`` needs ``||d_p||`` first: one extra batched solve per parameter with torch ops (the price of the
option; plain MBF pays nothing). Every scale is a device tensor: no host synchronisation, and a step
skipped on the device (non-finite gradient) leaves the Adam statistics untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import reference as ref

GRAFTS = (None, "adam", "sgd")
GRAFT_SCOPES = ("parameter", "block")
GRAFT_BETA2 = 0.999
GRAFT_EPS = 1e-8
FP32_STATE = ("graft_sq", "graft_steps")  # state kept in fp32 whatever the parameter's dtype (as F and the momentum)


@dataclass(frozen=True)
class StepSize:
    """The step-size options of one optimizer (validated here, used by :class:`mbf_triton.MBF`)."""

    graft: str | None = None
    kl_clip: float | None = None
    stat_warmup: int = 0
    graft_scope: str = "parameter"

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

    def checked(self, dp: Any) -> StepSize:
        """Refuse rescaled steps where a rank holds only part of a parameter's curvature (its norms would
        be partial); one process and replicated DDP are fine."""
        if self.scales_steps and dp is not None and dp.mode != "replicated":
            raise ValueError(f"graft={self.graft!r}, kl_clip={self.kl_clip!r} need one process or replicated DDP "
                             f"(got {dp.mode!r} curvature); pass graft=None, kl_clip=None")
        return self

    def scaled_gradients(self, entries: list[Any], states: dict[torch.Tensor, dict[str, Any]],
                         lrs: dict[int, float], skip: dict[torch.device, torch.Tensor],
                         ) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: s_p * nu * grad}`` for the optimizer's step ``entries`` (each with ``param``, ``layout``
        and ``group``; ``lrs``: each group's lr by ``id``), their ``F`` in ``states`` already holding this
        step's statistics. The fused update is then given these in place of the gradients. ``{}`` for
        the paper's method."""
        if not self.scales_steps:
            return {}
        scales, kl_terms = [], []
        for e in entries:
            p, layout, group, lr = e.param, e.layout, e.group, lrs[id(e.group)]
            state = states[p]
            g = ref.to_blocks(layout.matrix(p.grad.contiguous()).float(), layout.b)
            d, _ = ref.damped_block_solve(state["F"], g, group["damping"])
            d_norm = self._norm(d).clamp_min(1e-30)
            s = self._graft_scale(p, state, g, d_norm, group["momentum"], skip[p.device])
            if self.kl_clip is not None:
                kl_terms.append((self._quadratic(g, d, s) * (lr * lr)).clamp_min(0.0))
            scales.append(s)
        if self.kl_clip is not None:
            device = kl_terms[0].device
            total = torch.stack([t.to(device) for t in kl_terms]).sum()
            nu = torch.sqrt(self.kl_clip / total.clamp_min(1e-30)).clamp(max=1.0)
            scales = [(nu.to(e.param.device) if s is None else s * nu.to(e.param.device))
                      for s, e in zip(scales, entries)]
        return {e.param: _scaled(e.param.grad, e.layout, s) for s, e in zip(scales, entries)}

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of a blocked ``(n_blocks, b)`` tensor over the graft's scope: a scalar for the whole
        parameter, a ``(n_blocks,)`` vector for ``graft_scope="block"``."""
        return torch.linalg.vector_norm(x, dim=-1) if self.graft_scope == "block" else torch.linalg.vector_norm(x)

    @staticmethod
    def _quadratic(g: torch.Tensor, d: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """``sum_i s_i^2 g_i . d_i`` (``s``: None, one scale, or one per block)."""
        if s is None or s.ndim == 0:
            return (g * d).sum() if s is None else (g * d).sum() * s * s
        return ((g * d).sum(-1) * s * s).sum()

    def _graft_scale(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor, d_norm: torch.Tensor,
                     momentum: float, skip: torch.Tensor) -> torch.Tensor | None:
        """``s_p``: the grafted norm over MBF's (None without grafting)."""
        if self.graft is None:
            return None
        if self.graft == "sgd":
            return self._norm(g) / d_norm
        if "graft_sq" not in state:  # Adam's second moment and its count of (unskipped) steps
            state["graft_sq"] = torch.zeros_like(g)
            state["graft_steps"] = torch.zeros((), dtype=torch.float32, device=g.device)
        v, t = state["graft_sq"], state["graft_steps"]
        skipped = skip.reshape(()) if skip.dtype == torch.bool else skip.reshape(()) != 0
        v.copy_(torch.where(skipped, v, torch.lerp(g * g, v, GRAFT_BETA2)))
        t.copy_(torch.where(skipped, t, t + 1))
        t1 = t.clamp_min(1.0)
        v_hat = v / (1 - GRAFT_BETA2 ** t1)
        adam = g / (v_hat.sqrt() + GRAFT_EPS)
        if momentum == 0.0:
            return self._norm(adam) / d_norm
        # momentum's bias correction: the buffer becomes m_hat_t = (1 - mu^(t-1)) / (1 - mu^t) m_hat_(t-1)
        # + (1 - mu) / (1 - mu^t) s d after the fused update's m <- mu m + (...) d
        buf = state["momentum_buffer"]
        buf.mul_(torch.where(skipped, torch.ones_like(t1), (1 - momentum ** (t1 - 1)) / (1 - momentum ** t1)))
        return (1.0 - momentum) / (1 - momentum ** t1) * self._norm(adam) / d_norm


def _scaled(grad: torch.Tensor, layout: Any, s: torch.Tensor) -> torch.Tensor:
    """``s * grad`` in the gradient's dtype; a per-block ``s`` (``(n_blocks,)``) multiplies each mini-block's
    entries through the layout's to/from-blocks mapping."""
    if s.ndim == 0:
        return (grad.float() * s).to(grad.dtype)
    blocks = ref.to_blocks(layout.matrix(grad.contiguous()).float(), layout.b) * s[:, None]
    return ref.from_blocks(blocks, layout.rows, layout.cols).reshape(grad.shape).to(grad.dtype)
