"""The optimizer's hyperparameters, validated in one place: errors name the argument and the allowed range."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

LOSS_REDUCTIONS = ("mean", "sum")


def check_number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
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
    check_number("lr", lr, 0.0, math.inf, False, True)
    check_number("momentum", group["momentum"], 0.0, 1.0, False, True)
    check_number("damping", group["damping"], 0.0, math.inf, True, True)
    check_number("stat_decay", group["stat_decay"], 0.0, 1.0, False, True)
    check_number("weight_decay", group["weight_decay"], 0.0, math.inf, False, True)
    bs = group["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"block_size={bs!r} must be an integer >= 1")
