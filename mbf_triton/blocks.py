"""Mini-block layouts: how each parameter is cut into small blocks.

Every parameter is viewed as a row-major matrix ``(rows, cols)`` whose rows are cut into
``ceil(cols / b)`` chunks of ``b`` consecutive entries (the short last chunk is zero-padded to ``b``
in the curvature state and in registers; it is never padded in the parameter itself):

* ``nn.Conv1d/2d/3d`` weight ``(C_out, C_in/groups, *k)``: one block per (out, in) kernel, so
  ``rows = C_out * C_in/groups``, ``cols = b = prod(k)``.
* ``nn.Linear`` weight ``(out, in)``: ``rows = out``, ``cols = in``, ``b = min(block_size, in)``.
* everything else (biases, norm scales, embeddings, raw parameters): ``rows = numel``, ``cols = b = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)


@dataclass(frozen=True)
class Layout:
    """Where the mini-blocks of one parameter are. ``kind`` is ``"conv"``, ``"linear"`` or ``"diag"``."""

    kind: str
    rows: int
    cols: int
    b: int

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "linear", "diag"):
            raise ValueError(f"kind={self.kind!r} must be 'conv', 'linear' or 'diag'")
        if self.rows < 1 or self.cols < 1 or not 1 <= self.b <= self.cols:
            raise ValueError(f"invalid layout rows={self.rows}, cols={self.cols}, b={self.b}")

    @property
    def n_chunks(self) -> int:
        return -(-self.cols // self.b)

    @property
    def n_blocks(self) -> int:
        return self.rows * self.n_chunks

    @property
    def tri(self) -> int:
        """Entries of one packed block: ``b*(b+1)//2``."""
        return self.b * (self.b + 1) // 2

    @property
    def curvature_numel(self) -> int:
        return self.n_blocks * self.tri

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a contiguous parameter-shaped tensor) as the ``(rows, cols)`` matrix, without copy."""
        return t.view(self.rows, self.cols)


def own(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s registered parameter ``name`` (None if it has none, e.g. a parametrized ``weight``: reading
    ``module.weight`` there would run the parametrization, a spectral norm's power iteration)."""
    return module._parameters.get(name)


def is_weight(param: torch.Tensor, module: nn.Module | None) -> bool:
    """Whether ``param`` is ``module``'s registered ``weight``."""
    return module is not None and own(module, "weight") is param


def layout_for(param: torch.Tensor, module: nn.Module | None, block_size: int) -> Layout:
    """The layout of ``param``; ``module`` is the supported module it is the weight of, else None."""
    if is_weight(param, module):
        if isinstance(module, CONV_TYPES):
            b = math.prod(param.shape[2:])
            return Layout("conv", param.shape[0] * param.shape[1], b, b)
        if isinstance(module, LINEAR_TYPES):
            n_out, n_in = param.shape
            return Layout("linear", n_out, n_in, min(block_size, n_in))
    return Layout("diag", param.numel(), 1, 1)
