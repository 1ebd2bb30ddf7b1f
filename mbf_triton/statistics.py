"""The batch Fisher ``Fhat`` of one parameter, from what :mod:`mbf_triton.capture` recorded for it.

A record is one forward call's ``(input x, output gradient delta)``, the output gradient summed over the
backward passes that ``.grad`` holds. With ``s = N`` (the record's samples) for a mean-reduced loss and
``s = 1`` for a summed one, the per-sample gradient of sample ``n`` is:

* ``nn.Linear`` weight: ``s * delta_n x_n^T`` (every position of an ``(N, *, in)`` input is a sample), bias
  ``s * delta_n``; the statistics kernels fold ``mean_n`` of their mini-block outer products into ``F``;
* ``nn.Conv1d/2d/3d`` weight: ``s * sum_l delta_{n,:,l} u_{n,:,l}^T`` over the receptive fields ``u``;
  bias ``s * sum_l delta_{n,:,l}``;
* norm layers' scale: ``s * sum_positions delta_n * xhat_n`` with ``xhat`` the normalised input
  (recomputed from ``x``; BatchNorm with the batch's statistics in training mode, with its running ones in
  eval mode: the mode at ``step()``), shift
  ``s * sum_positions delta_n``; samples are dim 0 here.

Several records are pooled as samples of one batch, each with its own ``s`` (gradient accumulation). Where
no per-sample data exists, the batch gradient stands in for one sample (:func:`mean_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as tnf
from torch import nn

from . import reference as ref
from .blocks import CONV_TYPES, Layout, is_weight
from .capture import NORM_TYPES, TRAILING_NORM_TYPES

Records = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DiagBatch:
    """The 1x1-block statistics of one device and decay, folded into ``F`` by one ``diag_fisher_ema_``:
    parameters without per-sample data (their batch gradient) and layer biases (their batch statistic)."""

    grad_fs: list[torch.Tensor]
    grads: list[torch.Tensor]
    fhat_fs: list[torch.Tensor]
    fhats: list[torch.Tensor]
    states: list[dict[str, Any]]


def sample_scale(n: int, reduction: str) -> float:
    """Factor turning the captured gradient of the reduced loss into a per-sample gradient."""
    return float(n) if reduction == "mean" else 1.0


def mean_gradient(grad: torch.Tensor, passes: int, reduction: str) -> torch.Tensor:
    """The batch gradient that stands in for one sample where no per-sample data exists, ``Fhat = g g^T``.
    With a mean loss, ``K`` backward passes accumulated into ``.grad`` (gradient accumulation: one mean
    loss per micro-batch) hold ``K`` times the mean gradient of all their samples: it is divided by ``K``,
    so that ``Fhat`` is the same as for one pass over the whole batch (as the per-sample path's is)."""
    if reduction == "mean" and passes > 1:
        return grad / passes
    return grad


def batch_statistics(backend, p: torch.Tensor, module: nn.Module | None, layout: Layout, f: torch.Tensor,
                     decay: float, records: Records, skip: torch.Tensor, reduction: str,
                     grad: torch.Tensor | None = None) -> torch.Tensor | None:
    """This step's batch Fisher of ``p`` from its per-sample data: folded into ``f`` by the backend's kernel
    (returns None), or returned packed, ``(n_blocks, T)``, where torch ops form it (biases, norms, rare
    paths). Without ``records``, ``grad`` (the ``(rows, cols)`` mean gradient rows, :func:`mean_gradient`)
    stands in for one sample: ``Fhat_i = g_i g_i^T``."""
    if not records:
        return ref.outer_fisher(ref.to_blocks(grad.float(), layout.b)[None])
    if isinstance(module, NORM_TYPES):
        return norm_statistics(p, module, records, reduction)
    if isinstance(module, CONV_TYPES):
        return conv_statistics(backend, p, module, layout, f, decay, records, skip, reduction)
    return linear_statistics(backend, p, module, layout, f, decay, records, skip, reduction)


def linear_statistics(backend, p, module, layout, f, decay, records: Records, skip, reduction):
    xs = [x.reshape(-1, module.in_features) for x, _ in records]
    gs = [g.reshape(-1, module.out_features) for _, g in records]
    x, gout, scale = _pool(xs, gs, reduction)
    if is_weight(p, module):
        backend.linear_fisher_ema_(f, x, gout, b=layout.b, scale=scale, decay=decay, skip=skip)
        return None
    return gout.float().square().mean(dim=0).mul_(scale * scale)[:, None]  # bias: per-sample scale * gout[m]


def conv_statistics(backend, p, module, layout, f, decay, records: Records, skip, reduction):
    d = len(module.kernel_size)
    xs = [x if x.dim() == d + 2 else x.unsqueeze(0) for x, _ in records]
    gs = [g if g.dim() == d + 2 else g.unsqueeze(0) for _, g in records]
    if len({x.shape[1:] for x in xs}) > 1:  # records of different spatial sizes: pool the Fhats
        n_total = sum(x.shape[0] for x in xs)
        return sum(x.shape[0] * _conv_fhat(p, module, x, g, sample_scale(x.shape[0], reduction))
                   for x, g in zip(xs, gs)) / n_total
    x, gout, scale = _pool(xs, gs, reduction)
    if is_weight(p, module):
        backend.conv_fisher_ema_(f, x, gout, geometry=ref.ConvGeometry.of(module), groups=module.groups,
                                 scale=scale, decay=decay, skip=skip)
        return None
    return _conv_fhat(p, module, x, gout, scale)


def _conv_fhat(p, module, x, gout, scale: float) -> torch.Tensor:
    """Reference batch Fisher of a conv weight or bias (rare paths: bias, mixed spatial sizes)."""
    if is_weight(p, module):
        return ref.conv_fisher(ref.ConvGeometry.of(module).patches(x), gout, module.groups, scale)
    per_sample = gout.float().flatten(2).sum(dim=2).mul_(scale)  # (N, C_out)
    return per_sample.square().mean(dim=0)[:, None]


def norm_statistics(p, module, records: Records, reduction: str) -> torch.Tensor:
    """Exact per-sample gradients of a norm layer's scale (output gradient times the normalised input)
    and shift (output gradient), summed over each sample's positions; ``Fhat = mean_n g_n^2``."""
    squares, n_total = [], 0
    for x, g in records:
        dtype = torch.promote_types(g.dtype, torch.float32)
        if isinstance(module, TRAILING_NORM_TYPES):
            shape = list(module.normalized_shape)
            if x.dim() == len(shape):  # one unbatched sample
                x, g = x[None], g[None]
            per_sample = g.to(dtype)
            if is_weight(p, module):
                if isinstance(module, nn.LayerNorm):
                    xhat = tnf.layer_norm(x.to(dtype), shape, eps=module.eps)
                else:
                    xhat = tnf.rms_norm(x.to(dtype), shape, eps=module.eps)
                per_sample = per_sample * xhat
            per_sample = per_sample.reshape(x.shape[0], -1, p.numel()).sum(dim=1)
        else:  # channels in dim 1 (GroupNorm, BatchNorm; BatchNorm normalises with the batch's statistics)
            xs, gs = (x, g) if x.dim() > 1 else (x[None], g[None])
            per_sample = gs.to(dtype)
            if is_weight(p, module):
                xf = xs.to(dtype)
                if isinstance(module, nn.GroupNorm):
                    xhat = tnf.group_norm(xf, module.num_groups, eps=module.eps)
                elif module.training or module.running_mean is None:
                    xhat = tnf.batch_norm(xf, None, None, training=True, eps=module.eps)
                else:  # eval mode (frozen BatchNorm): its running statistics normalise
                    xhat = tnf.batch_norm(xf, module.running_mean.to(dtype), module.running_var.to(dtype),
                                          training=False, eps=module.eps)
                per_sample = per_sample * xhat
            per_sample = per_sample.reshape(xs.shape[0], xs.shape[1], -1).sum(dim=2)
        per_sample = per_sample * sample_scale(per_sample.shape[0], reduction)
        squares.append(per_sample.square().sum(dim=0))
        n_total += per_sample.shape[0]
    return (sum(squares) / n_total)[:, None]


def _pool(xs: list[torch.Tensor], gs: list[torch.Tensor], reduction: str,
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pool the samples of several records (each with its own per-sample scale) into one batch."""
    if len(xs) == 1:
        return xs[0], gs[0], sample_scale(xs[0].shape[0], reduction)
    gs = [g * sample_scale(g.shape[0], reduction) for g in gs]
    return torch.cat(xs), torch.cat(gs), 1.0
