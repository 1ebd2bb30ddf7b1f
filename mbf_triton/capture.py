"""Module hooks that capture what the Fisher statistics need: each supported layer's input and the
gradient of the loss with respect to its output.

A forward hook on every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` keeps the (detached) input and registers a
hook on the output tensor, which receives the output gradient during backward; the pair is stored as
one :class:`Record`. Several forward calls before a ``step()`` (gradient accumulation, a module used
twice) give several records, whose samples are pooled. Nothing is captured while ``capturing`` is
False, in eval mode, or under ``torch.no_grad()``; :meth:`Capture.clear` drops everything after a step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import CONV_TYPES, LINEAR_TYPES


@dataclass
class Record:
    input: torch.Tensor
    grad_output: torch.Tensor | None = None


class Capture:
    """Owns the hooks on one model and the records of the current step.

    Only layers whose ``weight`` or ``bias`` is among ``params`` (default: all) are hooked, and a layer
    records nothing while none of those parameters requires grad (frozen layers keep no inputs alive).
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor] | None = None) -> None:
        self.capturing = True
        self.records: dict[nn.Module, list[Record]] = {}
        # id(parameter) -> (parameter, module); the parameter is kept so that its id cannot be reused
        self._owner: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        self._hooked: set[int] = set()
        self._handles = []
        self._model = weakref.ref(model)
        self.watch(params)

    def watch(self, params: list[torch.Tensor] | None = None) -> None:
        """Hook the supported layers whose ``weight`` or ``bias`` is in ``params`` (default: all layers)."""
        model = self._model()
        if model is None:
            return
        wanted = None if params is None else {id(p) for p in params}
        for module in model.modules():
            if not isinstance(module, CONV_TYPES + LINEAR_TYPES):
                continue
            mine = [p for p in (module.weight, getattr(module, "bias", None))
                    if isinstance(p, torch.Tensor) and (wanted is None or id(p) in wanted)]
            if not mine:
                continue
            for p in mine:
                self._owner.setdefault(id(p), (p, module))
            if id(module) not in self._hooked:
                self._hooked.add(id(module))
                self._handles.append(module.register_forward_hook(self._forward_hook))

    @property
    def model(self) -> nn.Module | None:
        """The model whose layers are hooked (None once it is gone)."""
        return self._model()

    def module_of(self, param: torch.Tensor) -> nn.Module | None:
        entry = self._owner.get(id(param))
        return entry[1] if entry is not None and entry[0] is param else None

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self.capturing and module.training and torch.is_grad_enabled()):
            return
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].numel() == 0:
            return  # keyword-only call or empty batch: nothing to learn from
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if not any(p.requires_grad for p in (module.weight, getattr(module, "bias", None))
                   if isinstance(p, torch.Tensor)):
            return
        record = Record(inputs[0].detach())
        self.records.setdefault(module, []).append(record)

        def keep_grad(grad: torch.Tensor) -> None:
            # several backward passes through one graph (retain_graph) add up, as p.grad does
            g = grad.detach()
            record.grad_output = g if record.grad_output is None else record.grad_output + g

        output.register_hook(keep_grad)

    def complete_records(self, module: nn.Module) -> list[Record]:
        """The records of ``module`` whose backward pass has run."""
        return [r for r in self.records.get(module, ()) if r.grad_output is not None]

    def clear(self) -> None:
        self.records.clear()

    def drop_completed(self) -> None:
        """Forget the records whose backward pass has run; keep those still waiting for it (a forward
        followed by ``zero_grad()`` and then ``backward()`` is a common loop order)."""
        for module in list(self.records):
            pending = [r for r in self.records[module] if r.grad_output is None]
            if pending:
                self.records[module] = pending
            else:
                del self.records[module]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self.records.clear()
