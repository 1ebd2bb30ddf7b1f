"""Data-parallel MBF on torch.distributed: which mini-blocks each rank owns, and what the ranks exchange.

The statistics are the only new communication. On a statistics step every rank forms the batch Fisher
``Fhat_r`` of its own samples for every parameter with per-sample data (the backends' statistics, run
with ``decay = 0`` into a flat fp32 bucket filled with NaN beforehand: a block whose statistic was
non-finite, or that a skipped step did not write, stays non-finite), one collective sums the bucket
across the process group, and each rank folds the mean into the running estimate of the blocks it owns,
``F <- decay * F + (1 - decay) * mean_r Fhat_r`` (``F_1 = mean_r Fhat_r``), with the finite guard applied
to the mean: a block that is non-finite on any rank keeps its old ``F`` on every rank, as in one process.
With equal local batches and a mean loss on each rank, ``mean_r Fhat_r`` is exactly the statistic of the
pooled global batch (the per-sample gradients are the same, ``N_local * gout``, as in one process with
``N = world * N_local`` and ``s = N``). Parameters with no per-sample data use the batch gradient, which
the data-parallel wrapper has already reduced, so their statistics need no communication.

Modes (every rank sees the same parameters, schedule and skip flag, so they build the same bucket):

* ``replicated`` (DDP, the default): every rank owns every mini-block; one ``all_reduce`` of the bucket.
* ``sharded`` (DDP with ``shard_curvature=True``, ZeRO-style): the rows (sets of mini-blocks) of all
  parameters, in param-group order, are cut into ``world`` contiguous slices of about equal curvature
  size; rank ``r`` keeps ``F`` and the momentum of slice ``r`` only. One ``reduce_scatter`` brings each
  owner the summed statistics of its rows; owners solve and update their rows; one ``all_gather`` per
  parameter dtype brings every rank the updated parameters.
* ``fsdp`` (FSDP2, ``fully_shard``): parameters are DTensors sharded on dim 0 (``torch.chunk``
  semantics: chunks of ``ceil(d0 / world)``, the last ones shorter or empty). A mini-block never crosses
  a dim-0 index, so rank ``r`` owns the rows of its shard; one ``reduce_scatter`` as above; the update
  works on the local shard and FSDP2 gathers parameters itself. The gradient is reduce-scattered by
  FSDP2, so a NaN in one rank's gradient reaches only that shard's owner: the skip flag is max-reduced
  across the group (one element, every step).

The bucket is laid out as ``world`` equal segments (one in the replicated mode), segment ``r`` holding
the statistics of the rows rank ``r`` owns; a parameter whose rows all lie in one segment writes its
statistic there directly, one split across segments writes a scratch tensor that is copied in pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .blocks import Layout

MODES = ("replicated", "sharded", "fsdp")

try:  # DTensor (FSDP2's parameters); a torch without it has no FSDP2 either
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group)


def resolve(model: nn.Module, params: list[torch.Tensor], process_group: Any, shard_curvature: bool,
            ) -> DataParallel | None:
    """The data parallelism ``model`` runs under, or None for one process.

    ``process_group="auto"``: the group of a ``DistributedDataParallel`` wrapper, the mesh of FSDP2's
    DTensor parameters, else the default group when torch.distributed is initialised with more than one
    rank (a module wrapped by DDP and handed over without its wrapper). ``None``: no communication.
    """
    if type(model).__name__ == "FullyShardedDataParallel":  # FSDP1's flat parameters hide the layers' shapes
        raise ValueError("FSDP1 (FullyShardedDataParallel) is not supported: use FSDP2 (fully_shard) or DDP")
    fsdp = [p for p in params if is_dtensor(p)]
    if fsdp and len(fsdp) != len(params):
        raise ValueError("FSDP2: every parameter handed to MBF must be a sharded DTensor (fully_shard the model, "
                         "then build the optimizer)")
    if process_group == "auto":
        if fsdp:
            mesh = fsdp[0].device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"FSDP2 on a {mesh.ndim}-D device mesh (HSDP) is not supported; use a 1-D mesh")
            process_group = mesh.get_group()
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = model.process_group
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            process_group = dist.group.WORLD
        else:
            process_group = None
    if process_group is None:
        if fsdp:
            raise ValueError("FSDP2 parameters need a process group (process_group='auto')")
        return None
    world = dist.get_world_size(process_group)
    if world == 1 and not fsdp:
        return None
    mode = "fsdp" if fsdp else ("sharded" if shard_curvature else "replicated")
    return DataParallel(process_group, mode)


def contiguous_slices(layouts: list[Layout], world: int) -> list[list[tuple[int, int]]]:
    """Sharded curvature: the rows ``[lo, hi)`` of each layout that each rank owns, cutting the rows of all
    layouts, in order, into ``world`` contiguous slices of about equal curvature size (a row, and hence a
    mini-block, is never split; a row goes to the rank whose slice holds its first curvature entry)."""
    total = sum(layout.curvature_numel for layout in layouts)
    offset = 0
    out = []
    for layout in layouts:
        per_row = layout.n_chunks * layout.tri
        bounds = [0] + [min(layout.rows, max(0, -(-(r * total - world * offset) // (world * per_row))))
                        for r in range(1, world)] + [layout.rows]
        out.append([(bounds[r], bounds[r + 1]) for r in range(world)])
        offset += layout.curvature_numel
    return out


def dim0_slices(d0: int, layout: Layout, world: int) -> list[tuple[int, int]]:
    """FSDP2: the rows of ``layout`` in each rank's dim-0 shard of a parameter with ``d0`` rows on dim 0
    (``torch.chunk`` semantics: chunks of ``ceil(d0 / world)``, the last ones shorter or empty)."""
    per_index = layout.rows // d0  # matrix rows per dim-0 index
    chunk = -(-d0 // world)
    return [(min(r * chunk, d0) * per_index, min((r + 1) * chunk, d0) * per_index) for r in range(world)]


@dataclass
class _Spec:
    """One parameter's statistic in the bucket: its owned ``F`` and decay, per rank the owned rows and
    their offset in that rank's segment."""

    f: torch.Tensor
    decay: float
    layout: Layout
    pieces: list[tuple[int, int, int, int]]  # (rank, lo, hi, offset in the rank's segment)
    out: torch.Tensor | None = None  # where the backend writes the full statistic (n_blocks, T)


class Exchange:
    """The statistics of one step: :meth:`slot` per parameter, then :meth:`start` (the collective, async),
    then :meth:`finish` (wait, mean, fold into the owned ``F``). :data:`NO_EXCHANGE`: nothing to exchange."""

    active = True

    def __init__(self, dp: DataParallel, items: list[tuple[torch.Tensor, Layout, torch.Tensor, float]],
                 device: torch.device) -> None:
        self.dp = dp
        segments = dp.world if dp.mode != "replicated" else 1
        sizes = [0] * segments
        self.specs: dict[int, _Spec] = {}
        for p, layout, f, decay in items:
            per_row = layout.n_chunks * layout.tri
            pieces = []
            for r, (lo, hi) in enumerate(dp.rows_all(p, layout) if segments > 1 else [(0, layout.rows)]):
                if hi > lo:
                    pieces.append((r, lo, hi, sizes[r]))
                    sizes[r] += (hi - lo) * per_row
            self.specs[id(p)] = _Spec(f, decay, layout, pieces)
        self.length = max(sizes) if sizes else 0
        self.bucket = torch.full((segments * self.length,), math.nan, dtype=torch.float32, device=device)
        for spec in self.specs.values():
            n_blocks, t = spec.layout.n_blocks, spec.layout.tri
            if len(spec.pieces) == 1:  # all rows in one segment: written in place
                r, _, _, off = spec.pieces[0]
                start = r * self.length + off
                spec.out = self.bucket[start:start + n_blocks * t].view(n_blocks, t)
            else:
                spec.out = torch.full((n_blocks, t), math.nan, dtype=torch.float32, device=device)
        self._work = None
        self._received: torch.Tensor | None = None

    def slot(self, p: torch.Tensor) -> torch.Tensor:
        """Where the backend writes ``p``'s full batch statistic ``(n_blocks, T)`` (with ``decay = 0``)."""
        return self.specs[id(p)].out

    def start(self) -> None:
        """Launch the collective (async: the caller can do local work before :meth:`finish`)."""
        for spec in self.specs.values():
            if len(spec.pieces) > 1:
                per_row = spec.layout.n_chunks * spec.layout.tri
                flat = spec.out.view(-1)
                for r, lo, hi, off in spec.pieces:
                    start = r * self.length + off
                    self.bucket[start:start + (hi - lo) * per_row].copy_(flat[lo * per_row:hi * per_row])
        if self.dp.mode == "replicated":
            self._received = self.bucket
            self._work = dist.all_reduce(self.bucket, group=self.dp.group, async_op=True)
        else:
            self._received = torch.empty(self.length, dtype=torch.float32, device=self.bucket.device)
            self._work = _reduce_scatter(self._received, self.bucket, self.dp.group, async_op=True)

    def finish(self, skip: dict[torch.device, torch.Tensor]) -> None:
        """Wait for the collective, then ``F <- EMA(F, mean over ranks)`` with the finite guard and the
        step's skip flag (per device), for the rows this rank owns."""
        from .reference import fisher_ema_

        skip = skip[self.bucket.device]
        self._work.wait()
        received = self._received.mul_(1.0 / self.dp.world)
        me = self.dp.rank if self.dp.mode != "replicated" else 0
        for spec in self.specs.values():
            t = spec.layout.tri
            per_row = spec.layout.n_chunks * t
            for r, lo, hi, off in spec.pieces:
                if r == me:
                    fisher_ema_(spec.f, received[off:off + (hi - lo) * per_row].view(-1, t), spec.decay, skip)


class _NoExchange:
    active = False

    def start(self) -> None:
        pass

    def finish(self, skip: dict[torch.device, torch.Tensor]) -> None:
        pass


NO_EXCHANGE = _NoExchange()


def exchange(dp: DataParallel | None, items: list[tuple[torch.Tensor, Layout, torch.Tensor, float]]):
    """The step's :class:`Exchange` for ``(param, layout, owned F, decay)`` items, or :data:`NO_EXCHANGE`
    in one process or when no statistic is to be exchanged."""
    return dp.exchange(items) if dp is not None and items else NO_EXCHANGE


def sum_async(dp: DataParallel | None, t: torch.Tensor):
    """Start summing ``t`` (fp32, per-rank partial sums over owned rows) across the ranks in place, and
    return the pending work (``.wait()`` before reading ``t``); None, and nothing sent, in one process or
    where every rank owns every row (``t`` is the whole sum already)."""
    if dp is None or dp.mode == "replicated" or dp.world == 1:
        return None
    return dist.all_reduce(t, group=dp.group, async_op=True)


def row_width(key: str, layout: Layout) -> int | None:
    """Entries per row of ``layout``'s matrix in the state ``key`` that a rank keeps for its rows only (the
    curvature, the momentum, Adam's grafting moment); None for per-parameter state (counters)."""
    return {"F": layout.n_chunks * layout.tri, "momentum_buffer": layout.cols,
            "graft_sq": layout.n_chunks * layout.b}.get(key)


class DataParallel:
    """The process group, the mode and which rows of each parameter every rank owns.

    A parameter is seen as its layout's ``(rows, cols)`` matrix (:mod:`mbf_triton.blocks`); a row holds
    whole mini-blocks, so the curvature and momentum of a rank are those of its rows.
    """

    def __init__(self, group: Any, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        self.group = group
        self.mode = mode
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._slices: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}  # sharded: id(p) -> rows

    # ------------------------------------------------------------------ ownership
    def assign(self, items: list[tuple[torch.Tensor, Layout]]) -> None:
        """Sharded mode: cut the rows of all ``items`` (in order) into ``world`` contiguous slices of about
        equal curvature size. A no-op in the other modes (replicated: all rows; fsdp: the dim-0 shard)."""
        if self.mode != "sharded":
            return
        slices = contiguous_slices([layout for _, layout in items], self.world)
        self._slices = {id(p): (p, rows) for (p, _), rows in zip(items, slices)}

    def rows_all(self, p: torch.Tensor, layout: Layout) -> list[tuple[int, int]]:
        """The rows ``[lo, hi)`` of ``p``'s matrix that each rank owns."""
        if self.mode == "replicated":
            return [(0, layout.rows)] * self.world
        if self.mode == "sharded":
            entry = self._slices.get(id(p))
            if entry is None or entry[0] is not p:
                raise RuntimeError("sharded curvature: a parameter appeared after the rows were assigned")
            return entry[1]
        return dim0_slices(p.shape[0], layout, self.world)

    def rows(self, p: torch.Tensor, layout: Layout) -> tuple[int, int]:
        """The rows of ``p``'s matrix this rank owns."""
        lo, hi = self.rows_all(p, layout)[self.rank]
        if self.mode == "fsdp":
            local_rows = local(p).numel() // layout.cols
            if local_rows != hi - lo:
                raise ValueError(f"FSDP2 parameter of shape {tuple(p.shape)}: local shard has {local_rows} rows of "
                                 f"its mini-block matrix, dim-0 chunking gives {hi - lo} (only Shard(0) is supported)")
        return lo, hi

    def owned_rows(self, p: torch.Tensor, layout: Layout) -> int:
        lo, hi = self.rows(p, layout)
        return hi - lo

    def owned(self, t: torch.Tensor, p: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The rows this rank owns of ``t``, a contiguous local tensor shaped as ``p`` (replicated, sharded)
        or as ``p``'s local shard (fsdp), as a matrix view."""
        if self.mode == "fsdp":
            return t.view(-1, layout.cols)
        lo, hi = self.rows(p, layout)
        return layout.matrix(t)[lo:hi]

    # ------------------------------------------------------------------ communication
    def exchange(self, items: list[tuple[torch.Tensor, Layout, torch.Tensor, float]]) -> Exchange:
        """The statistics exchange of one step for ``(param, layout, owned F, decay)`` items."""
        devices = {p.device for p, *_ in items}
        if len(devices) != 1:
            raise ValueError(f"data-parallel MBF needs every parameter on one device, got {sorted(map(str, devices))}")
        return Exchange(self, items, devices.pop())

    def agree(self, skip: torch.Tensor) -> torch.Tensor:
        """The skip flag, true on every rank if it is true on one (fsdp: the gradient is sharded). DDP's
        averaged gradient carries a NaN to every rank already: no communication there."""
        if self.mode != "fsdp":
            return skip
        flag = skip.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag > 0

    def gather_parameters(self, items: list[tuple[torch.Tensor, Layout]]) -> None:
        """Sharded mode: every rank gets the rows the others updated; one ``all_gather`` per dtype."""
        if self.mode != "sharded":
            return
        pieces, copies = [], []
        for p, layout in items:
            data = p.data
            if not data.is_contiguous():  # e.g. channels_last: gathered into a copy, written back
                data = data.contiguous()
                copies.append((p, data))
            mat = layout.matrix(data)
            lo, hi = self.rows(p, layout)
            pieces.append((mat, self.rows_all(p, layout), mat[lo:hi]))
        self.gather_rows(pieces)
        for p, data in copies:
            p.data.copy_(data.view(p.shape))

    def gather_rows(self, items: list[tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]]) -> None:
        """All-gather row slices: for each ``(full, rows_all, mine)``, ``full`` (a ``(rows, k)`` matrix)
        receives every rank's rows ``rows_all[r]``, this rank's coming from ``mine``. One collective per
        dtype and device (the pieces packed into equal, padded segments)."""
        by_kind: dict[tuple, list] = {}
        for item in items:
            by_kind.setdefault((item[0].dtype, item[0].device), []).append(item)
        for (dtype, device), group_items in by_kind.items():
            sizes = [0] * self.world
            offsets = []
            for full, rows_all, _ in group_items:
                k = full.shape[1]
                offsets.append([sizes[r] for r in range(self.world)])
                for r, (lo, hi) in enumerate(rows_all):
                    sizes[r] += (hi - lo) * k
            length = max(sizes)
            if length == 0:
                continue
            send = torch.empty(length, dtype=dtype, device=device)
            for (full, rows_all, mine), offs in zip(group_items, offsets):
                lo, hi = rows_all[self.rank]
                send[offs[self.rank]:offs[self.rank] + (hi - lo) * full.shape[1]].copy_(mine.reshape(-1))
            recv = torch.empty(self.world * length, dtype=dtype, device=device)
            _all_gather(recv, send, self.group)
            for (full, rows_all, _), offs in zip(group_items, offsets):
                k = full.shape[1]
                for r, (lo, hi) in enumerate(rows_all):
                    if hi > lo:
                        start = r * length + offs[r]
                        full[lo:hi].copy_(recv[start:start + (hi - lo) * k].view(hi - lo, k))

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, entries: list[tuple[torch.Tensor, Layout, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The states of ``entries`` (``(param, layout, state)``) with the whole ``F``, momentum and grafting
        moment, as in one process: gathered from their owners (a collective: every rank calls it); the
        states as they are when every rank owns every row."""
        if self.mode == "replicated":
            return [state for _, _, state in entries]
        out, items = [], []
        for p, layout, state in entries:
            full = dict(state)
            for key in ("F", "momentum_buffer", "graft_sq"):  # in this order on every rank
                if key in state:
                    width = row_width(key, layout)
                    whole = torch.empty(layout.rows, width, dtype=torch.float32, device=state[key].device)
                    items.append((whole, self.rows_all(p, layout), state[key]))
                    full[key] = whole.view(p.shape) if key == "momentum_buffer" else whole.view(layout.n_blocks, -1)
            out.append(full)
        self.gather_rows(items)
        return out

    def full_state_dict(self, sd: dict[str, Any], params: list[torch.Tensor], layout_of) -> dict[str, Any]:
        """An optimizer ``state_dict`` (``sd``, its state keyed by index into ``params``) with the whole
        curvature and momentum of every parameter (:meth:`full_state`)."""
        keys = list(sd["state"])
        full = self.full_state([(params[k], layout_of(params[k]), sd["state"][k]) for k in keys])
        return {**sd, "state": dict(zip(keys, full))}

    def local_state(self, p: torch.Tensor, layout: Layout, key: str, value: torch.Tensor) -> torch.Tensor:
        """A loaded ``F``, momentum or grafting moment: this rank's rows of a whole one (a checkpoint of any
        mode or of one process); one already of this rank's size, and per-parameter state, is kept."""
        lo, hi = self.rows(p, layout)
        per_row = row_width(key, layout)
        if self.mode == "replicated" or (hi - lo) == layout.rows or per_row is None:
            return value
        if value.numel() == (hi - lo) * per_row:
            return value
        if value.numel() != layout.rows * per_row:
            raise ValueError(f"checkpoint {key} of shape {tuple(value.shape)} fits neither the whole parameter "
                             f"{tuple(p.shape)} nor this rank's {hi - lo} rows of it")
        rows = value.reshape(layout.rows, per_row)[lo:hi]
        if key == "momentum_buffer":
            return rows.reshape(hi - lo, layout.cols)
        return rows.reshape(-1, per_row // layout.n_chunks)
