"""What the Fisher statistics need, captured from the backward passes that the step will consume.

A forward hook on every supported layer (``nn.Linear``, ``nn.Conv1d/2d/3d`` and the affine norm layers)
keeps the (detached) input and hooks the output tensor, whose hook receives the output gradient during
backward; the pair is one :class:`Record`. Each output gradient is kept with the identity of its backward
pass (``torch._C._current_graph_task_id()``): one record may collect several (``retain_graph``).

Which passes count is decided per parameter, by a pre-hook on the parameter's ``AccumulateGrad`` node
(the engine runs it once per pass that accumulates into ``.grad``, and never for ``torch.autograd.grad``
passes that do not reach ``.grad``). It compares ``.grad`` with the snapshot taken at the end of the last
pass that accumulated into it (after every end-of-pass callback, so that DDP's all-reduce and bucket views
are part of the snapshot): if ``.grad`` was set to ``None``, replaced or zeroed in place since, the
earlier passes' contributions were discarded (:meth:`_Track.intact`). The passes still in ``.grad`` are
the parameter's *valid passes*; :meth:`Capture.records_for` sums the output gradients of those passes
only. At ``step()`` a ``.grad`` that is not the snapshot's tensor discards them too (its version is not
compared there: clipping and ``GradScaler`` rescale ``.grad`` in place after backward).

Memory stays bounded by one step's activations: records whose graph is gone and that hold no valid pass
are dropped at the layer's next forward, whoever owns the gradient; a capture whose optimizer is gone, or
that was copied or unpickled with a model but without its optimizer, records nothing.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .blocks import CONV_TYPES, LINEAR_TYPES, is_weight, own
from .distributed import is_dtensor
from .reference import ConvGeometry

# normalised over the trailing dims (LayerNorm, RMSNorm), or per channel in dim 1 (GroupNorm, BatchNorm)
TRAILING_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)
NORM_TYPES = TRAILING_NORM_TYPES + (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
HOOKED_TYPES = CONV_TYPES + LINEAR_TYPES + NORM_TYPES


@dataclass(eq=False)
class Record:
    """One forward call of a hooked layer: its input and, per backward pass, its output gradient."""

    input: torch.Tensor
    parts: list = field(default_factory=list)  # [graph task id, output gradient]
    graph: weakref.ref | None = None  # the output hook: dead once autograd has freed the graph


def _task() -> int:
    return torch._C._current_graph_task_id()


def _will_run(node) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # not part of this graph: the pass cannot accumulate into its parameter
        return False


class _OutputHook:
    """Receives a layer output's gradient; keeps it only for passes that accumulate into the layer's
    parameters (not ``torch.autograd.grad`` towards inputs, e.g. a gradient penalty or an attack)."""

    __slots__ = ("record", "tracks", "holding", "__weakref__")

    def __init__(self, record: Record, tracks: list[_Track], holding: list[_Track]) -> None:
        self.record, self.tracks, self.holding = record, tracks, holding

    def __call__(self, grad: torch.Tensor) -> None:
        if not any(t.sharded or _will_run(t.node) for t in self.tracks):
            return
        task, parts = _task(), self.record.parts
        for t in self.tracks:
            if t.sharded:  # its AccumulateGrad never runs (FSDP2): the pass is noted here instead
                if not t.tasks:
                    self.holding.append(t)  # cleared after the step
                t.tasks.add(task)
        g = grad.detach()
        if parts and parts[-1][0] == task:
            parts[-1][1] = parts[-1][1] + g
        else:
            parts.append([task, g])


class _ForwardHook:
    """The forward hook registered on each layer (a small object, so models with hooks copy and pickle)."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, inputs: tuple, kwargs: dict, output) -> None:
        # the input passed by keyword too (``layer(input=x)``): else such a layer would never get statistics
        x = inputs[0] if inputs else kwargs.get("input")
        self.capture._forward(module, x, output)


class _Track:
    """The backward passes whose contributions one parameter's ``.grad`` still holds."""

    __slots__ = ("param", "node", "handle", "tasks", "snap", "last_task", "sharded")

    def __init__(self, param: torch.Tensor, node) -> None:
        self.param, self.node, self.handle = param, node, None
        # an FSDP2 parameter (DTensor): its AccumulateGrad node never runs (FSDP2 accumulates into an unsharded
        # copy and sets the sharded .grad itself), so the layer's output-gradient hook notes its passes: every
        # pass through the layer since the last step or opt.zero_grad() counts
        self.sharded = is_dtensor(param)
        self.tasks: set[int] = set()
        # (.grad's TensorImpl address, its _version, whether it is a view) at the end of the last pass
        self.snap: tuple | None = None
        self.last_task = -1

    def intact(self, check_version: bool) -> bool:
        """Whether ``.grad`` is the tensor of the last snapshot (not set to None or replaced), and, with
        ``check_version``, not modified in place since (zeroed). The address, not the Python object, is
        compared: gradients set from C++ (DDP's bucket views) get a new Python object at each access. A view's
        version is shared with its base (DDP's bucket: every parameter's accumulation bumps it), so it is
        not compared for views."""
        g, snap = self.param.grad, self.snap
        if g is None or snap is None or g._cdata != snap[0]:
            return False
        return not check_version or snap[2] or g._version == snap[1]


class Capture:
    """Owns the hooks on one model and the records of the current step.

    Only layers with a parameter among ``params`` (default: all) are hooked; a layer records only while
    its id is in :attr:`wanted` (the optimizer's statistics schedule), with grad enabled (in either mode),
    and while one of its parameters requires grad (frozen layers keep no inputs alive).
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor] | None = None) -> None:
        self.wanted: set[int] = set()
        self.records: dict[nn.Module, list[Record]] = {}
        self._model = weakref.ref(_unwrap(model))
        self._owner: weakref.ref | None = None
        # id(parameter) -> (parameter, module); the parameter is kept so that its id cannot be reused
        self._module_of: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        # id(parameter) -> the layers that share it (weight tying between like layers): their records pool
        self._sharers: dict[int, list[nn.Module]] = {}
        self._layers: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}  # id(module) -> (module, params)
        self._hook_keys: list[tuple[nn.Module, int]] = []
        self._tracks: dict[int, _Track] = {}
        self._touched: dict[int, list[_Track]] = {}  # graph task -> tracks to snapshot at its end
        self._seen: set[int] = set()
        self._holding: list[_Track] = []  # tracks that may hold passes (cleared after a step)
        self.watch(params)

    # ------------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict:
        # records, tracks and the owner stay behind: a copy records nothing until an optimizer attaches it
        return {"model": self._model(), "module_of": list(self._module_of.values()),
                "layers": list(self._layers.values()), "hook_keys": self._hook_keys,
                "sharers": [(self._module_of[k][0], ms) for k, ms in self._sharers.items()]}

    def __setstate__(self, state: dict) -> None:
        model = state["model"]
        self._model = (lambda: None) if model is None else weakref.ref(model)
        self.wanted, self.records, self._owner = set(), {}, None
        self._module_of = {id(p): (p, m) for p, m in state["module_of"]}
        self._layers = {id(m): (m, ps) for m, ps in state["layers"]}
        self._sharers = {id(p): ms for p, ms in state.get("sharers", ())}
        self._hook_keys = state["hook_keys"]
        self._tracks, self._touched, self._seen, self._holding = {}, {}, set(), []

    def attach(self, owner: object, params: list[torch.Tensor]) -> None:
        """Make ``owner`` (the optimizer) this capture's user: until it is gone, the hooks record."""
        self._owner = weakref.ref(owner)
        self.track(params)

    def _active(self) -> bool:
        return self._owner is not None and self._owner() is not None

    # ------------------------------------------------------------------ hooks
    def watch(self, params: list[torch.Tensor] | None = None) -> None:
        """Hook the supported layers with a parameter in ``params`` (default: all layers)."""
        model = self._model()
        if model is None:
            return
        wanted = None if params is None else {id(p) for p in params}
        owners: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(module)
        for module in model.modules():
            if not isinstance(module, HOOKED_TYPES):
                continue
            mine = [p for p in (own(module, "weight"), own(module, "bias"))
                    if isinstance(p, torch.Tensor) and (wanted is None or id(p) in wanted)
                    and _poolable(p, owners.get(id(p), [module]))]
            if not mine:
                continue
            for p in mine:
                self._module_of.setdefault(id(p), (p, module))
                if len(owners.get(id(p), ())) > 1:
                    self._sharers[id(p)] = owners[id(p)]
            layer = self._layers.get(id(module))
            if layer is None:
                self._layers[id(module)] = (module, mine)
                handle = module.register_forward_hook(_ForwardHook(self), with_kwargs=True)
                self._hook_keys.append((module, handle.id))
            else:
                layer[1].extend(p for p in mine if all(p is not q for q in layer[1]))

    @property
    def model(self) -> nn.Module | None:
        """The model whose layers are hooked (None once it is gone)."""
        return self._model()

    def module_of(self, param: torch.Tensor) -> nn.Module | None:
        entry = self._module_of.get(id(param))
        return entry[1] if entry is not None and entry[0] is param else None

    def layers(self) -> list[tuple[nn.Module, list[torch.Tensor]]]:
        return list(self._layers.values())

    def track(self, params) -> None:
        """Follow which backward passes accumulate into each of ``params``' gradients."""
        for p in params:
            self._track(p)

    def _track(self, p: torch.Tensor) -> _Track | None:
        t = self._tracks.get(id(p))
        if t is not None and t.param is p:
            return t
        if not p.requires_grad or not self._active():
            return None
        t = _Track(p, get_gradient_edge(p).node)
        t.handle = t.node.register_prehook(_BeforeAccumulate(self, t))
        self._tracks[id(p)] = t
        return t

    @property
    def capturing(self) -> bool:
        """Whether some layer records in the next forward."""
        return bool(self.wanted)

    def seen(self, module: nn.Module) -> bool:
        """Whether ``module``'s forward hook has run (layers called functionally, e.g. the ``out_proj`` of
        ``nn.MultiheadAttention``, never have per-sample data), or that of a layer sharing its weight."""
        params = self._layers.get(id(module), (module, []))[1]
        sharers = [m for p in params for m in self._sharers.get(id(p), ())]
        return id(module) in self._seen or any(id(m) in self._seen for m in sharers)

    def _forward(self, module: nn.Module, x: torch.Tensor | None, output) -> None:
        # any mode: a model trained in eval mode (or a frozen BatchNorm) has per-sample data too; an eval
        # pass that no backward into .grad follows holds no valid pass and is dropped (see _alive)
        if not torch.is_grad_enabled() or not self._active():
            return
        self._seen.add(id(module))
        if id(module) not in self.wanted:
            return
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return  # no tensor input or an empty batch: nothing to learn from
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        tracks = [self._track(p) for p in self._layers[id(module)][1] if p.requires_grad]
        tracks = [t for t in tracks if t is not None]
        if not tracks:
            return
        records = self.records.setdefault(module, [])
        if records and _task() == -1:  # not during a backward (checkpointing's recomputation)
            records[:] = [r for r in records if self._alive(r, tracks)]
        record = Record(x.detach())
        hook = _OutputHook(record, tracks, self._holding)
        record.graph = weakref.ref(hook)
        output.register_hook(hook)
        records.append(record)

    @staticmethod
    def _alive(record: Record, tracks: list[_Track]) -> bool:
        """Whether ``record`` can still matter: its graph can still run backward, or it holds a pass that a
        gradient still holds (drops the passes that none holds)."""
        record.parts = [pt for pt in record.parts if any(pt[0] in t.tasks for t in tracks)]
        return bool(record.parts) or record.graph() is not None

    def _before_accumulate(self, t: _Track) -> None:
        task = _task()
        if t.last_task == task:
            return
        t.last_task = task
        if not t.intact(check_version=True):  # .grad was discarded (or replaced) since the last pass
            t.tasks.clear()
        if not t.tasks:
            self._holding.append(t)
        t.tasks.add(task)
        touched = self._touched.get(task)
        if touched is None:
            self._touched[task] = touched = []
            # two hops: runs after every callback queued during the pass (DDP's all-reduce and copy-back)
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(lambda: self._snapshot(task)))
        touched.append(t)

    def _snapshot(self, task: int) -> None:
        for t in self._touched.pop(task, ()):
            g = t.param.grad
            t.snap = None if g is None else (g._cdata, g._version, g._is_view())

    # ------------------------------------------------------------------ what a step reads
    def passes(self, param: torch.Tensor) -> int:
        """The number of backward passes whose contributions ``param.grad`` holds (0 if unknown); a
        ``.grad`` set since the last pass discards them."""
        t = self._tracks.get(id(param))
        if t is None or t.param is not param:
            return 0
        if not t.sharded and not t.intact(check_version=False):  # (a sharded .grad is set by FSDP2 itself)
            t.tasks.clear()
        return len(t.tasks)

    def records_for(self, module: nn.Module, param: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input, output gradient)`` of ``module``'s records, summed over the passes that ``param.grad``
        holds (call :meth:`passes` first); records without such a pass are left out."""
        t = self._tracks.get(id(param))
        if t is None or t.param is not param or not t.tasks:
            return []
        out = []
        for r in (r for m in self._sharers.get(id(param), [module]) for r in self.records.get(m, ())):
            g = None
            for task, part in r.parts:
                if task in t.tasks:
                    g = part if g is None else g + part
            if g is not None:
                out.append((r.input, g))
        return out

    def discard(self, params) -> None:
        """The gradients of ``params`` were discarded (``zero_grad``): forget the passes they held."""
        for p in params:
            t = self._tracks.get(id(p))
            if t is not None and t.param is p:
                t.tasks.clear()
        for module, records in list(self.records.items()):
            tracks = [t for p in self._layers[id(module)][1] if (t := self._tracks.get(id(p))) is not None]
            records[:] = [r for r in records if self._alive(r, tracks)]
            if not records:
                del self.records[module]

    def clear(self) -> None:
        """After a step: the records and passes it consumed are gone."""
        self.records.clear()
        for t in self._holding:
            t.tasks.clear()
        self._holding.clear()

    def remove(self) -> None:
        for module, key in self._hook_keys:
            module._forward_hooks.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
        self._hook_keys.clear()
        for t in self._tracks.values():
            if t.handle is not None:
                t.handle.remove()
        self._tracks.clear()
        self._layers.clear()
        self.records.clear()
        self._owner = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (its hooks are that module's): a capture that held the
    wrapper would make ``copy.deepcopy`` of the wrapped model rebuild the wrapper around a half-copied module."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    return model


def _poolable(p: torch.Tensor, modules: list[nn.Module]) -> bool:
    """Whether the per-sample data of ``modules`` (all the modules holding ``p``) gives ``p``'s per-sample
    gradients: one module, or like layers sharing ``p`` in the same role (tied ``nn.Linear`` weights; convs of
    one geometry), whose uses pool as separate samples like one layer used twice. A parameter shared with any
    other module (an embedding tied to an output layer) has per-sample data for part of its gradient only:
    it takes the batch-gradient path, as parameters outside supported layers do."""
    first = modules[0]
    for m in modules:
        if type(m) is not type(first) or not isinstance(m, LINEAR_TYPES + CONV_TYPES):
            return len(modules) == 1
        if is_weight(p, m) != is_weight(p, first):
            return False
        if isinstance(m, CONV_TYPES) and (ConvGeometry.of(m), m.groups) != (ConvGeometry.of(first), first.groups):
            return False
    return True


class _BeforeAccumulate:
    __slots__ = ("capture", "track")

    def __init__(self, capture: Capture, track: _Track) -> None:
        self.capture, self.track = capture, track

    def __call__(self, grad_outputs):
        self.capture._before_accumulate(self.track)
