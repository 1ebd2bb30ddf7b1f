"""Module hooks that capture what the Fisher statistics need: each supported layer's input and the
gradient of the loss with respect to its output.

A forward hook on every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` keeps the (detached) input and registers a
hook on the output tensor, which receives the output gradient during backward; the pair is stored as
one :class:`Record`. Several forward calls before a ``step()`` (gradient accumulation, a module used
twice) give several records, whose samples are pooled. Nothing is captured while ``capturing`` is
False, in eval mode, or under ``torch.no_grad()``; :meth:`Capture.clear` drops everything after a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import CONV_TYPES, LINEAR_TYPES


@dataclass
class Record:
    input: torch.Tensor
    grad_output: torch.Tensor | None = None


class Capture:
    """Owns the hooks on one model and the records of the current step."""

    def __init__(self, model: nn.Module) -> None:
        self.capturing = True
        self.records: dict[nn.Module, list[Record]] = {}
        self.owner: dict[int, nn.Module] = {}  # id(parameter) -> supported module owning it
        self._handles = []
        for module in model.modules():
            if isinstance(module, CONV_TYPES + LINEAR_TYPES):
                for p in module.parameters(recurse=False):
                    self.owner.setdefault(id(p), module)
                self._handles.append(module.register_forward_hook(self._forward_hook))

    def module_of(self, param: torch.Tensor) -> nn.Module | None:
        return self.owner.get(id(param))

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self.capturing and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        record = Record(inputs[0].detach())
        self.records.setdefault(module, []).append(record)

        def keep_grad(grad: torch.Tensor) -> None:
            record.grad_output = grad.detach()

        output.register_hook(keep_grad)

    def complete_records(self, module: nn.Module) -> list[Record]:
        """The records of ``module`` whose backward pass has run."""
        return [r for r in self.records.get(module, ()) if r.grad_output is not None]

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()
