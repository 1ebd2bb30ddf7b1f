"""``MBF``: the mini-block Fisher optimizer (Bahamou, Goldfarb & Ren, AISTATS 2023).

One ``step()``, for every parameter with a gradient:

1. statistics (on a parameter's first step, then every ``stat_every`` of its own steps): the batch estimate
   ``Fhat_i = (1/N) sum_n g_{n,i} g_{n,i}^T`` of each mini-block from exact per-sample gradients
   (captured layer inputs and output gradients of the backward passes that ``.grad`` holds;
   :mod:`mbf_triton.capture`), folded into the running
   estimate ``F_i <- stat_decay * F_i + (1 - stat_decay) * Fhat_i`` (``F_1 = Fhat_1``);
2. direction ``d_i = (F_i + damping * I)^{-1} g_i``;
3. update: ``p <- p * (1 - lr * weight_decay)``, ``m <- momentum * m + d``, ``p <- p - lr * m``.

Steps 2-3 are one fused call of the backend (:mod:`mbf_triton.backends`). A gradient with NaN/Inf
skips the whole step on the device (a flag every state-writing op reads), so ``step()`` never waits for
the GPU; the host reads the flag at the next step and settles its counters then.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from . import distributed, skipflag
from . import hyperparameters as hp
from . import reference as ref
from . import statistics as stats
from .backends import BACKENDS, get_backend
from .blocks import Layout, layout_for
from .capture import Capture
from .stepsize import FP32_STATE, StepSize

_FP32_STATE = ("F", "momentum_buffer", *FP32_STATE)  # kept in fp32 whatever the parameter's dtype


@dataclass
class _Entry:
    """One parameter's part of a step: its group, backend, hooked module (or None) and layout."""

    group: dict[str, Any]
    param: torch.Tensor
    backend: Any
    module: nn.Module | None
    layout: Layout
    # (momentum buffer, its (rows, cols) view): the optimizer's own tensor, valid while it is the state's
    momentum_view: tuple | None = None


@dataclass
class _Batch:
    """Parameters updated by one ``block_update_group_`` call: same backend, device, dtype, b and group."""

    backend: Any
    group: dict[str, Any]
    b: int
    members: list[_Entry]


@dataclass
class _Plan:
    key: tuple
    entries: list[_Entry]
    batches: list[_Batch]


class MBF(Optimizer):
    """Mini-block Fisher optimizer.

    Args:
        model: the module being trained; hooks on its ``nn.Linear``, ``nn.Conv1d/2d/3d`` and norm layers capture
            the per-sample information the statistics need. Call :meth:`remove_hooks` when done.
        params: parameters or param-group dicts (default: the trainable parameters of ``model``); all must be
            parameters of ``model``. Parameters outside its supported layers use 1x1 blocks with the batch
            gradient.
        lr: learning rate (>= 0).
        momentum: heavy-ball momentum on the preconditioned direction, in [0, 1).
        damping: ``lambda`` added to every mini-block's diagonal before the solve (> 0).
        stat_decay: exponential decay of the running Fisher estimate, in [0, 1).
        weight_decay: decoupled weight decay (>= 0).
        block_size: fan-in chunk of ``nn.Linear`` mini-blocks (>= 1; ``>= in_features`` is unit-wise).
        stat_every: update a parameter's Fisher statistics every this many of its own steps (>= 1); layers
            whose statistics are not due capture nothing.
        loss_reduction: ``"mean"`` if the loss is the mean over the batch (PyTorch's default), ``"sum"``
            if it is the sum: it sets how per-sample gradients are recovered from the batch gradient.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton is installed, else torch),
            ``"torch"`` (the reference path, any device) or ``"triton"``.
        process_group: data parallelism (:mod:`mbf_triton.distributed`): ``"auto"`` (DDP's group, the FSDP2
            mesh's, or the default group of an initialised torch.distributed), or ``None`` (no communication).
        shard_curvature: under DDP, each rank keeps and updates the curvature and momentum of 1/world of
            the mini-blocks, and the parameters are all-gathered (ZeRO-style); FSDP2 always shards them.
        graft, graft_scope, kl_clip, stat_warmup: step-size options (:mod:`mbf_triton.stepsize`); None: the paper's.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        stat_decay: float = 0.95,
        weight_decay: float = 0.0,
        block_size: int = 16,
        stat_every: int = 10,
        loss_reduction: str = "mean", backend: str = "auto", process_group: Any = "auto",
        shard_curvature: bool = False, graft: str | None = None, kl_clip: float | None = None, stat_warmup: int = 0,
        graft_scope: str = "parameter",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(stat_every, bool) or not isinstance(stat_every, int) or stat_every < 1:
            raise ValueError(f"stat_every={stat_every!r} must be an integer >= 1")
        if loss_reduction not in hp.LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} must be one of {hp.LOSS_REDUCTIONS}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self._constructing = model  # the model, while super().__init__ checks the groups
        defaults = dict(
            lr=lr, momentum=momentum, damping=damping, stat_decay=stat_decay,
            weight_decay=weight_decay, block_size=block_size,
        )
        super().__init__(params, defaults)
        self.stat_every = stat_every
        self.loss_reduction = loss_reduction
        self.backend = backend
        del self._constructing
        all_params = [p for g in self.param_groups for p in g["params"]]
        # None in one process; else the group, the mode and which mini-blocks this rank owns
        self._dp = distributed.resolve(model, all_params, process_group, bool(shard_curvature))
        if shard_curvature and (self._dp is None or self._dp.mode != "sharded"):
            raise ValueError("shard_curvature=True needs DDP (or an initialised process group of several ranks); "
                             "FSDP2 shards the curvature by itself")
        self.stepsize = StepSize(graft, kl_clip, stat_warmup, graft_scope).checked(self._dp)
        self._capture = Capture(model, params=all_params)
        self._capture.attach(self, all_params)
        # the hooks hold the capture, not the optimizer: an optimizer that is dropped takes its hooks along
        self._finalizer = weakref.finalize(self, self._capture.remove)
        self._checked: tuple | None = None  # the hyperparameters last validated (re-checked when they change)
        self._plan_cache: _Plan | None = None
        # step: steps that updated; skipped_steps: steps whose gradients held NaN/Inf; calls: step() calls
        # with gradients, both kinds (the statistics schedule counts these: the host decides what to capture
        # before it knows whether the last step was skipped)
        self._counters = {"step": 0, "skipped_steps": 0, "calls": 0}
        self._unsettled: list[skipflag.Unsettled] = []
        self._fallback_total: dict[torch.device, torch.Tensor] = {}
        self._fallback_step: dict[torch.device, torch.Tensor] = {}
        self._sync_capture()

    # ------------------------------------------------------------------ torch.optim plumbing
    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes grad_scale and found_inf (see step())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            hp.check_group_keys(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        hp.check_group(group)
        model = self._constructing if hasattr(self, "_constructing") else self._capture._model()
        if model is not None:
            hp.check_params(group["params"], model, len(self.param_groups) - 1)
        self._plan_cache = None
        if hasattr(self, "_capture"):  # a group added after construction: hook its layers too
            self._capture.watch(group["params"])
            self._capture.attach(self, group["params"])
            self._sync_capture()

    # ------------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups; MBF needs its counters and capture too.
        # The capture carries the model: a copy of (model, opt) trains the copied model.
        self._settle()
        state = dict(self.__dict__)
        state.pop("_finalizer", None)
        state["_plan_cache"] = None
        state["_unsettled"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_capture" not in state:  # a pickle of torch.optim's state only: nothing to attach
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self._capture.attach(self, params)
        self._finalizer = weakref.finalize(self, self._capture.remove)
        self._sync_capture()

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's, plus the counters; data parallel, as one process would hold it (a collective)."""
        self._settle()
        sd = super().state_dict()
        sd["mbf"] = {
            **self._counters,
            "fallback_blocks": self.fallback_blocks,
            "stat_every": self.stat_every,
            "loss_reduction": self.loss_reduction,
        }
        if self._dp is not None:  # the counters also in the groups: DCP's get_optimizer_state_dict keeps only those
            sd = {**self._dp.full_state_dict(sd, self._assign_rows(), self.layout),
                  "param_groups": [{**g, "mbf": sd["mbf"]} for g in sd["param_groups"]]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._settle()  # the counters are exact if the checkpoint carries none
        state_dict = dict(state_dict)
        groups = state_dict["param_groups"]  # the counters also ride in a data-parallel checkpoint's groups
        extra = state_dict.pop("mbf", None) or next((g["mbf"] for g in groups if "mbf" in g), None)
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k != "mbf"} for g in groups]
        # torch.optim casts floating state to the parameter's dtype; the curvature and momentum must stay
        # fp32 (bit-exact resume of bf16 models), so they bypass that and only move device.
        saved_state = {pid: dict(s) for pid, s in state_dict["state"].items()}
        kept = {pid: {k: s.pop(k) for k in _FP32_STATE if k in s} for pid, s in saved_state.items()}
        super().load_state_dict({**state_dict, "state": saved_state})
        self._plan_cache = None
        for group in self.param_groups:
            hp.check_group(group)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        if self._dp is not None:
            self._assign_rows()
        for pid, p in zip(ids, params):
            for k, v in kept.get(pid, {}).items():
                if self._dp is not None:  # this rank's rows of a whole checkpoint
                    v = self._dp.local_state(p, self.layout(p), k, v)
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32)
        if extra is not None:
            step, skipped = int(extra["step"]), int(extra["skipped_steps"])
            # checkpoints from before "calls" existed: every call with gradients was a step or a skip
            self._counters = {"step": step, "skipped_steps": skipped, "calls": int(extra.get("calls", step + skipped))}
            self._fallback_total = {}
            self._fallback_step = {}
            if extra.get("fallback_blocks"):
                device = next(p.device for g in self.param_groups for p in g["params"])
                self._fallback_counter(device)[1].fill_(int(extra["fallback_blocks"]))
        for state in self.state.values():
            if "F" in state:
                self._schedule_defaults(state)
        self._sync_capture()

    # ------------------------------------------------------------------ public counters
    @property
    def steps(self) -> int:
        """Steps that updated the parameters (reading it waits for the last step's finite check)."""
        self._settle()
        return self._counters["step"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or Inf (parameters and curvature untouched); reading it
        waits for the last step's finite check."""
        self._settle()
        return self._counters["skipped_steps"]

    @property
    def fallback_blocks(self) -> int:
        """Mini-block solves that fell back to the diagonal (non-positive or non-finite pivot), in total."""
        return int(sum(int(t.item()) for t in self._fallback_total.values()))

    def layout(self, param: torch.Tensor) -> Layout:
        """The mini-block layout of ``param`` (see :mod:`mbf_triton.blocks`)."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return layout_for(param, self._capture.module_of(param), group["block_size"])

    def summary(self) -> str:
        """A table of every parameter: name, mini-block layout, backend, launch configuration of the fused
        update (Triton), bytes of curvature state and the scale of diag F (:mod:`mbf_triton.summary`)."""
        from .summary import format_summary

        return format_summary(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; the captured output gradients of the discarded gradients go with them (records
        still waiting for their backward pass are kept: forward, ``zero_grad()``, backward is a common order)."""
        super().zero_grad(set_to_none=set_to_none)
        self._capture.discard([p for g in self.param_groups for p in g["params"]])

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model (it can no longer compute statistics)."""
        self._capture.remove()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update. Under ``torch.amp.GradScaler`` (``scaler.step(opt)``), the scaler's ``grad_scale`` and
        ``found_inf`` (attributes it sets for optimizers with ``_step_supports_amp_scaling``) unscale the
        gradients and the statistics on the device and join the skip flag: no host synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            # Earlier steps' finite checks, read only where already on the host, except after a step that
            # started some layer's statistics: whether F was initialised decides this step's EMA, so that
            # one is waited for (its kernels are done by now, the GPU is on this step's forward/backward).
            self._settle(wait=any(u.first_statistics for u in self._unsettled))
            active = [(g, p) for g in self.param_groups for p in g["params"]
                      if p.grad is not None and p.numel() > 0]
            if not active:
                return loss
            self._check_changed_groups()
            sparse = [tuple(p.shape) for _, p in active if p.grad.is_sparse]
            if sparse:
                raise ValueError(f"sparse gradients (parameters of shape {sparse}) are not supported by MBF")
            grad_scale, unscaled = skipflag.loss_scale(self)  # GradScaler's, if any (unscale_ may have run)
            # Non-finite gradients skip the whole step on the device: every kernel and reference op that
            # writes state reads this flag, so the host does not wait for the check.
            grads = [distributed.local(p.grad) for _, p in active]
            skip = self._nonfinite_flags(grads, getattr(self, "found_inf", None))
            if self._dp is not None:  # the same decision on every rank
                skip = {device: self._dp.agree(flag) for device, flag in skip.items()}
            inv_scale = self._unscale_(grads, grad_scale, unscaled)
            # everything that can fail is resolved before the first parameter changes: no partial steps
            plan = self._plan(active)
            lrs = {id(g): float(g["lr"]) for g in self.param_groups}  # one read of a tensor lr per group
            counted: list[tuple[dict[str, Any], torch.Tensor]] = []
            scheduled: list[dict[str, Any]] = []  # states whose statistics ran: their next ones are scheduled
            first = False
            try:
                diag: dict[tuple, stats.DiagBatch] = {}  # (device, decay) -> the 1x1-block statistics done together
                jobs = [(entry, *job) for entry in plan.entries
                        if (job := self._statistics_job(entry, inv_scale)) is not None]
                shared = [(e.param, e.layout, self.state[e.param]["F"], decay) for e, records, decay, _ in jobs
                          if records]
                # data parallel: the bucket the per-sample statistics go to, averaged across the ranks
                exchange = distributed.exchange(self._dp, shared)  # in one process: nothing to exchange
                for entry, records, decay, passes in jobs:
                    scheduled.append(self.state[entry.param])
                    first |= self._statistics(entry, records, decay, passes, diag, skip, counted, exchange)
                exchange.start()  # async: the local 1x1 statistics below overlap it
                for (device, decay), d in diag.items():
                    ref.diag_fisher_ema_(d.grad_fs + d.fhat_fs, d.grads, decay, skip[device], fhats=d.fhats)
                    for state in d.states:
                        first |= self._count_statistic(state, counted)
                exchange.finish(skip)
                grads = self.stepsize.scaled_gradients(plan.entries, self.state, lrs, skip)  # {}: the paper's method
                for batch in plan.batches:
                    self._apply(batch, lrs[id(batch.group)], skip[batch.members[0].param.device], grads)
                if self._dp is not None:
                    self._dp.gather_parameters([(e.param, e.layout) for e in plan.entries])
            except BaseException:
                # Statistics counted before the error were not folded in if the step was skipped: settle
                # them now (a wait on the error path only). The call counts as no step either way.
                self._unsettled.append(self._unsettled_step(skip, counted, first, counts_step=False))
                self._settle()
                raise
            for device, step_count in self._fallback_step.items():
                self._fallback_total[device].add_(step_count)
                step_count.zero_()
            for state in scheduled:
                state["stat_next"] = state["calls"] + self.stepsize.stat_interval(state["calls"], self.stat_every)
            for entry in plan.entries:  # each parameter's own schedule counts the calls it had a gradient in
                self.state[entry.param]["calls"] += 1
            this = self._unsettled_step(skip, counted, first)
            self._unsettled.append(this)
            self._counters["calls"] += 1
            self._counters["step"] += 1  # provisional: _settle moves it to skipped_steps if the flag was set
            self._settle(wait=False)  # at once where the flag is on the host already (CPU)
        finally:
            self._capture.clear()
            self._sync_capture()
        return loss

    def _check_changed_groups(self) -> None:
        """Validate the groups' hyperparameters when they changed since the last check (a tuple compare)."""
        key = hp.groups_key(self.param_groups)
        if key != self._checked:
            for group in self.param_groups:
                hp.check_group(group)
            self._checked = key

    def _sync_capture(self) -> None:
        """Capture, in the next forward/backward, the layers whose statistics are due at their next step: a
        first estimate, the schedule (every ``stat_every`` of the layer's own steps), or a first estimate made
        in a step whose skip flag is not read yet (should it be skipped, the next step starts it again)."""
        maybe_first = {id(s) for u in self._unsettled if u.first_statistics for s, _ in u.counted}
        wanted = set()
        for module, params in self._capture.layers():
            for p in params:
                state = self.state.get(p)
                if (not state or state["stat_steps"] == 0 or state["calls"] >= state["stat_next"]
                        or id(state) in maybe_first):
                    wanted.add(id(module))
                    break
        self._capture.wanted = wanted

    # the device-side skip flag (mbf_triton.skipflag); class attributes, so that tests and tools can wrap them
    _nonfinite_flags = staticmethod(skipflag.nonfinite_flags)
    _unscale_ = staticmethod(skipflag.unscale_)
    _unsettled_step = staticmethod(skipflag.unsettled_step)

    def _settle(self, wait: bool = True) -> None:
        """Read the skip flags of past steps and correct their provisional counters: a skipped step moves
        from ``steps`` to ``skipped_steps`` and its statistics are uncounted (``F`` was not touched).
        ``wait=False``: only the flags already on the host."""
        for u in list(self._unsettled):
            if u.event is not None:
                if not wait and not u.event.query():
                    continue
                u.event.synchronize()
            skipped = bool(u.flag.item())
            # off the list before its correction: each step is corrected once, even if a later wait raises
            # (Ctrl-C, a CUDA error); the correction itself is plain Python
            self._unsettled.remove(u)
            if skipped:
                if u.counts_step:
                    self._counters["step"] -= 1
                    self._counters["skipped_steps"] += 1
                for state, f in u.counted:
                    if state.get("F") is f:  # not reset (state cleared, checkpoint loaded) since
                        state["stat_steps"] -= 1  # a first estimate undone is due again at the next step

    def _fallback_counter(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._fallback_step:
            self._fallback_step[device] = torch.zeros(1, dtype=torch.int32, device=device)
            self._fallback_total[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return self._fallback_step[device], self._fallback_total[device]

    def _plan(self, active: list[tuple[dict[str, Any], torch.Tensor]]) -> _Plan:
        """What a step does with each parameter, cached while the parameters with a gradient, their
        storage, the block sizes and the backend stay the same (the per-parameter work of every step is
        then a few dictionary reads: the optimizer's host time matters on launch-bound models)."""
        # the groups are held by the plan, so their ids in the key cannot be reused while it lives
        key = (self.backend, tuple(g["block_size"] for g in self.param_groups),
               tuple((id(g), id(p), distributed.local(p).data_ptr(), p.dtype, p.shape, p.stride()) for g, p in active))
        plan = self._plan_cache
        if plan is not None and plan.key == key:
            for entry in plan.entries:  # state reset by the caller, or a checkpoint loaded on another device
                state, device = self.state[entry.param], entry.param.device
                if not state or state["F"].device != device or state["momentum_buffer"].device != device:
                    self._prepare_state(entry)
            return plan
        self._capture.track(p for _, p in active)  # e.g. unfrozen since: count its backward passes from now
        if self._dp is not None:
            self._assign_rows()
        entries = []
        batches: dict[tuple, _Batch] = {}
        for group, p in active:
            module = self._capture.module_of(p)
            layout = layout_for(p, module, group["block_size"])
            entry = _Entry(group, p, get_backend(self.backend, p.device, p.dtype), module, layout)
            self._prepare_state(entry)
            entries.append(entry)
            bkey = (id(entry.backend), p.device, p.dtype, layout.b, id(group))
            batches.setdefault(bkey, _Batch(entry.backend, group, layout.b, [])).members.append(entry)
        self._plan_cache = _Plan(key, entries, list(batches.values()))
        return self._plan_cache

    def _assign_rows(self) -> list[torch.Tensor]:
        """Data parallel: which rows of every parameter each rank owns; returns the parameters, in order."""
        self._dp.assign([(p, layout_for(p, self._capture.module_of(p), g["block_size"]))
                         for g in self.param_groups for p in g["params"] if p.numel() > 0])
        return [p for g in self.param_groups for p in g["params"]]

    def _prepare_state(self, entry: _Entry) -> None:
        """The state of ``entry``'s parameter, created or moved to its device, and checked."""
        p, layout = entry.param, entry.layout
        state = self.state[p]
        # data parallel with sharded curvature: F and the momentum of the rows this rank owns
        n_rows = layout.rows if self._dp is None else self._dp.owned_rows(p, layout)
        if not state:
            state["F"] = torch.zeros(n_rows * layout.n_chunks, layout.tri, dtype=torch.float32, device=p.device)
            shape = p.shape if n_rows == layout.rows else (n_rows, layout.cols)
            state["momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["stat_steps"] = 0
            state["calls"] = state["stat_next"] = 0  # the parameter's own statistics schedule
        self._schedule_defaults(state)
        for key in _FP32_STATE:  # e.g. a checkpoint loaded before model.cuda()
            if key in state and state[key].device != p.device:
                state[key] = state[key].to(p.device)
        if state["F"].shape != (n_rows * layout.n_chunks, layout.tri):
            raise ValueError(
                f"curvature state of shape {tuple(state['F'].shape)} does not match the parameter's mini-block "
                f"layout {layout} (was block_size changed after the first step?)"
            )

    def _schedule_defaults(self, state: dict[str, Any]) -> None:
        if "calls" not in state:  # a checkpoint from before per-parameter schedules: the global one
            calls = self._counters["calls"]
            state["calls"], state["stat_next"] = calls, -(-calls // self.stat_every) * self.stat_every

    def _statistics_job(self, entry: _Entry, inv_scale: dict[torch.device, torch.Tensor] | None,
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, int] | None:
        """None, or ``(records, decay, passes)`` if this step folds a batch Fisher into ``F``: the parameter's
        own schedule asks for it (its first step with statistics, then every ``stat_every`` of its steps) and
        the per-sample data it needs was captured."""
        p, module = entry.param, entry.module
        state = self.state[p]
        if not (state["stat_steps"] == 0 or state["calls"] >= state["stat_next"]):
            return None
        passes = self._capture.passes(p)  # also notices a .grad replaced since the last backward
        records = self._records(module, p, inv_scale) if module is not None else []
        if module is not None and not records and self._capture.seen(module):
            # A layer with no per-sample data for this gradient (first gradient off its schedule, a branch
            # skipped when it was captured, an autograd.grad-only pass): it stays due and is captured, so its
            # statistics come at its next step with captured data. Until its first, F = 0 (damping only):
            # the batch gradient would be a ~N times too small estimate.
            return None
        return records, entry.group["stat_decay"] if state["stat_steps"] > 0 else 0.0, passes

    def _statistics(self, entry: _Entry, records: list[tuple[torch.Tensor, torch.Tensor]], decay: float,
                    passes: int, diag: dict[tuple, stats.DiagBatch], skip: dict[torch.device, torch.Tensor],
                    counted: list[tuple[dict[str, Any], torch.Tensor]],
                    exchange: distributed.Exchange = distributed.NO_EXCHANGE) -> bool:
        """Fold this step's batch Fisher into ``F`` (or, data parallel, write the local one to ``exchange``,
        which averages and folds it). 1x1-block statistics formed by torch ops (norm scales, biases, batch
        gradients) are collected in ``diag`` (done together); the states whose ``stat_steps`` this counts go
        to ``counted``. True if this is ``F``'s first statistic."""
        p, module, layout = entry.param, entry.module, entry.layout
        state = self.state[p]
        if exchange.active and records:
            slot = exchange.slot(p)  # NaN-filled: what no statistic reaches stays non-finite
            fhat = stats.batch_statistics(entry.backend, p, module, layout, slot, 0.0, records, skip[p.device],
                                          self.loss_reduction)
            if fhat is not None:
                slot.copy_(fhat)
            return self._count_statistic(state, counted)
        grad = None if records else self._owned(entry, stats.mean_gradient(p.grad, passes, self.loss_reduction))
        if layout.kind == "diag":
            # 1x1 blocks whose statistic torch ops form (norm scales, biases, batch gradients): folded together
            # with the others of this device and decay; the caller counts them
            d = diag.setdefault((p.device, decay), stats.DiagBatch([], [], [], [], []))
            if records:
                d.fhat_fs.append(state["F"])
                d.fhats.append(stats.batch_statistics(entry.backend, p, module, layout, state["F"], decay, records,
                                                      skip[p.device], self.loss_reduction))
            else:
                d.grad_fs.append(state["F"])
                d.grads.append(grad)
            d.states.append(state)
            return False
        fhat = stats.batch_statistics(entry.backend, p, module, layout, state["F"], decay, records, skip[p.device],
                                      self.loss_reduction, grad=grad)
        if fhat is not None:  # formed by torch ops: no kernel folded it in
            ref.fisher_ema_(state["F"], fhat, decay, skip[p.device])
        return self._count_statistic(state, counted)

    def _records(self, module: nn.Module, p: torch.Tensor, inv_scale: dict[torch.device, torch.Tensor] | None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input, output gradient)`` of the passes ``p.grad`` holds; unscaled like the gradients under AMP."""
        records = self._capture.records_for(module, p)
        if inv_scale is None:
            return records
        return [(x, g.float() * inv_scale[g.device]) for x, g in records]

    def _owned(self, entry: _Entry, t: torch.Tensor) -> torch.Tensor:
        """The rows of ``entry``'s parameter or gradient ``t`` whose curvature this rank keeps, as a matrix."""
        t = distributed.local(t).contiguous()
        return entry.layout.matrix(t) if self._dp is None else self._dp.owned(t, entry.param, entry.layout)

    @staticmethod
    def _count_statistic(state: dict[str, Any], counted: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        """Count one statistic folded into ``state``'s F (provisionally: ``_settle`` uncounts it if the step
        was skipped); True if it was F's first."""
        state["stat_steps"] += 1
        counted.append((state, state["F"]))
        return state["stat_steps"] == 1

    def _apply(self, batch: _Batch, lr: float, skip: torch.Tensor, grads: dict) -> None:
        """Damped solve, momentum, weight decay and the write for parameters sharing b, dtype and group."""
        items, copies = [], []
        for entry in batch.members:
            p, layout = entry.param, entry.layout
            state = self.state[p]
            if state["F"].shape[0] == 0:  # sharded curvature: none of its rows is this rank's
                continue
            buf = state["momentum_buffer"]
            if entry.momentum_view is None or entry.momentum_view[0] is not buf:
                entry.momentum_view = (buf, buf.view(-1, layout.cols))
            data = distributed.local(p.data)  # a new tensor object at every access: read it once
            if not data.is_contiguous():  # updated through a contiguous copy, written back below
                data = data.contiguous()
                copies.append((p, data))
            grad = self._owned(entry, grads.get(p, p.grad))  # rescaled where a step-size option is on
            items.append((state["F"], grad, self._owned(entry, data), entry.momentum_view[1]))
        if not items:
            return
        group = batch.group
        batch.backend.block_update_group_(
            items, self._fallback_counter(batch.members[0].param.device)[0], b=batch.b,
            damping=group["damping"], lr=lr, momentum=group["momentum"], weight_decay=group["weight_decay"],
            skip=skip,
        )
        for p, work in copies:
            distributed.local(p.data).copy_(work)

    # ------------------------------------------------------------------ statistics
