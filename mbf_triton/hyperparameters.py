"""Everything MBF checks about its arguments, in one place: each param group's hyperparameters and keys,
and the parameters themselves (they must belong to the hooked model; sparse gradients are refused)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

LOSS_REDUCTIONS = ("mean", "sum")
HYPERPARAMETERS = ("lr", "momentum", "damping", "stat_decay", "weight_decay", "block_size")
# keys a param group may carry besides the hyperparameters: torch.optim's names, lr schedulers' initial_lr
GROUP_KEYS = frozenset(HYPERPARAMETERS) | {"params", "param_names", "name", "initial_lr"}


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number in {allowed}")
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        raise ValueError(f"{name}={value!r} must be a finite number in {allowed}")


def check_group(group: dict[str, Any]) -> None:
    """All per-group hyperparameters are validated here and nowhere else."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
        lr = lr.item()
    _check_number("lr", lr, 0.0, math.inf, False, True)
    _check_number("momentum", group["momentum"], 0.0, 1.0, False, True)
    _check_number("damping", group["damping"], 0.0, math.inf, True, True)
    _check_number("stat_decay", group["stat_decay"], 0.0, 1.0, False, True)
    _check_number("weight_decay", group["weight_decay"], 0.0, math.inf, False, True)
    bs = group["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"block_size={bs!r} must be an integer >= 1")


def groups_key(groups: list[dict[str, Any]]) -> tuple:
    """The groups' hyperparameters as one comparable value (a tensor lr by identity): validate again only
    when it changes."""
    return tuple(tuple(id(v) if isinstance(v := g[k], torch.Tensor) else v for k in HYPERPARAMETERS)
                 for g in groups)


def check_group_keys(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    unknown = sorted(str(k) for k in set(group) - GROUP_KEYS - set(defaults))
    if unknown:
        raise ValueError(f"unknown param group keys {unknown}; MBF's are {sorted(GROUP_KEYS)}")


def check_params(params: list[torch.Tensor], model: nn.Module, index: int) -> None:
    """Parameters of group ``index`` must belong to ``model``; sparse gradients are not supported."""
    own = {id(p) for p in model.parameters()}
    foreign = [f"#{i} (shape {tuple(p.shape)})" for i, p in enumerate(params) if id(p) not in own]
    if foreign:
        raise ValueError(f"param group {index}: parameters {', '.join(foreign)} are not parameters of "
                         "model (MBF hooks the model that owns them: pass a model that holds them all)")
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    sparse = [f"#{i} (shape {tuple(p.shape)})" for i, p in enumerate(params) if id(p) in sparse]
    if sparse:
        raise ValueError(f"param group {index}: parameters {', '.join(sparse)} would get sparse gradients "
                         "(nn.Embedding/EmbeddingBag with sparse=True), which MBF does not support; "
                         "use sparse=False")
