"""The one seam between the optimizer and the arithmetic.

A backend does three things to one parameter's mini-blocks: fold the batch statistics of a Linear or a
convolution into the running Fisher ``F`` (``linear_fisher_ema_``, ``conv_fisher_ema_``), and the fused
damped solve + momentum + weight decay + parameter write (``block_update_``). Each takes the step's
device-side ``skip`` flag (one element; set when a gradient held NaN/Inf): when set it changes nothing
(the kernels store nothing; torch ops may write back the old values), so the optimizer need not wait for
the device to decide whether a step happens. :class:`TorchBackend` does
them with batched torch ops (:mod:`mbf_triton.reference`); :class:`TritonBackend` with the kernels in
``mbf_triton.kernels``. Both read and write the same state, so a checkpoint made with one loads in the
other. :func:`get_backend` is the only place that decides which one runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import weakref

import torch

from . import reference as ref
from .tuning import Tuner, get_tuner

BACKENDS = ("auto", "torch", "triton")


class TorchBackend:
    """Reference arithmetic: batched torch ops and ``torch.linalg`` (cuSOLVER/cuBLAS on a GPU)."""

    name = "torch"

    def __init__(self) -> None:
        # (ids of the Fs) -> (weak refs to them, (versions, storage, damping), factor): see _factor
        self._factors: dict[tuple[int, ...], tuple[list, tuple, ref.BlockFactor]] = {}
        self._groups: dict[int, tuple[tuple[int, ...], int]] = {}  # id(F) -> (its group's key, first block)

    def linear_fisher_ema_(
        self, f: torch.Tensor, x: torch.Tensor, gout: torch.Tensor, *, b: int, scale: float, decay: float,
        skip: torch.Tensor | None = None,
    ) -> None:
        skipped, skip = self._host_skip(skip)
        if not skipped:
            ref.fisher_ema_(f, ref.linear_fisher(x, gout, b, scale), decay, skip)

    def conv_fisher_ema_(
        self, f: torch.Tensor, x: torch.Tensor, gout: torch.Tensor, *, geometry: ref.ConvGeometry, groups: int,
        scale: float, decay: float, skip: torch.Tensor | None = None,
    ) -> None:
        skipped, skip = self._host_skip(skip)
        if not skipped:
            ref.fisher_ema_(f, ref.conv_fisher(geometry.patches(x), gout, groups, scale), decay, skip)

    def block_update_(
        self,
        f: torch.Tensor,
        grad: torch.Tensor,
        param: torch.Tensor,
        momentum_buffer: torch.Tensor,
        fallback_count: torch.Tensor,
        *,
        b: int,
        damping: float,
        lr: float,
        momentum: float,
        weight_decay: float,
        skip: torch.Tensor | None = None,
    ) -> None:
        self.block_update_group_([(f, grad, param, momentum_buffer)], fallback_count, b=b, damping=damping, lr=lr,
                                 momentum=momentum, weight_decay=weight_decay, skip=skip)

    def block_update_group_(
        self,
        items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        fallback_count: torch.Tensor,
        *,
        b: int,
        damping: float,
        lr: float,
        momentum: float,
        weight_decay: float,
        skip: torch.Tensor | None = None,
    ) -> None:
        """:meth:`block_update_` for several ``(f, grad, param, momentum_buffer)`` of one block size, dtype,
        device and hyperparameters: one batched solve over all their mini-blocks (the Triton backend does
        them in one launch)."""
        skipped, skip = self._host_skip(skip)
        if skipped:
            return
        grads = [ref.to_blocks(grad.float(), b) for _, grad, _, _ in items]
        g = grads[0] if len(grads) == 1 else torch.cat(grads)
        if b == 1:  # scalar blocks: a division, nothing worth keeping
            fs = [f for f, _, _, _ in items]
            d, fallback = ref.damped_block_solve(fs[0] if len(fs) == 1 else torch.cat(fs), g, damping)
        else:
            factor = self._factor([f for f, _, _, _ in items], b, damping)
            d, fallback = ref.block_solve(factor, g), factor.fallback
        fallback = ref.and_not_skipped(fallback, skip)  # a skipped step counts no fallback either
        fallback_count.add_(fallback.sum().to(fallback_count.dtype))
        params = [param for _, _, param, _ in items]
        ds = [ref.from_blocks(d_i, *param.shape) for param, d_i in zip(params, d.split([x.shape[0] for x in grads]))]
        ref.apply_update_(params, ds, [buf for _, _, _, buf in items], lr, momentum, weight_decay, skip)

    def direction(self, f: torch.Tensor, grad: torch.Tensor, *, b: int, damping: float) -> torch.Tensor:
        """MBF's direction alone, ``d_i = (F_i + damping I)^{-1} g_i`` for the ``(rows, cols)`` gradient
        matrix ``grad``, as fp32 blocks ``(n_blocks, b)`` (what the step-size options need the norms of).
        The update's factor where one is cached (a slice of its group's), else ``F``'s own, which the
        update then joins into its group's: one factorisation per statistics step either way, two
        triangular substitutions on the other steps."""
        g = ref.to_blocks(grad.float(), b)
        if b == 1 or g.shape[0] == 0:
            return ref.damped_block_solve(f, g, damping)[0]
        return ref.block_solve(self._own_factor(f, b, damping), g)

    # Factors of F + damping I are kept between steps: F changes only on statistics steps (every
    # ``stat_every`` steps), so the other steps cost two triangular substitutions. Valid while every F is
    # the same tensor, unmodified since (torch's version counter: every in-place torch op on F bumps it),
    # and damping is the same. A kernel that writes F through a pointer does not bump it: the Triton
    # backend, whose statistics kernels do, never reuses factors.
    reuse_factors = True
    # A skip flag (and a factor's fallback mask) in host memory is read at no cost on the CPU: a set flag then
    # skips the work, a clear one needs no guarded writes. The Triton backend reads no flag on the host (its
    # work is meant to be queued without waiting, and its tests check that the step reads nothing).
    reads_host_flags = True

    def _host_skip(self, skip: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        return ref.host_skip(skip) if self.reads_host_flags else (False, skip)

    def _factor(self, fs: list[torch.Tensor], b: int, damping: float) -> ref.BlockFactor:
        """The factor of the concatenated ``fs`` (an update group): cached, or joined from the members' own
        factors where :meth:`direction` made them all this step, else factored."""
        if not self.reuse_factors:
            return self._new_factor(fs, b, damping)
        key = tuple(id(f) for f in fs)
        factor = self._cached(key, fs, damping)
        if factor is not None:
            return factor
        own = [self._cached((id(f),), [f], damping) for f in fs] if len(fs) > 1 else [None]
        if all(o is not None for o in own):
            factor = ref.BlockFactor.join(own)
            for f in fs:  # kept once: direction() finds them as slices of the group's factor
                self._factors.pop((id(f),), None)
        else:
            factor = self._new_factor(fs, b, damping)
        self._store(key, fs, damping, factor)
        return factor

    def _own_factor(self, f: torch.Tensor, b: int, damping: float) -> ref.BlockFactor:
        """``F``'s factor alone: a slice of the cached factor of a group that holds ``f``, else its own."""
        if self.reuse_factors and (found := self._groups.get(id(f))) is not None:
            key, start = found
            entry = self._factors.get(key)
            fs = [r() for r in entry[0]] if entry is not None else []
            if any(m is f for m in fs) and (factor := self._cached(key, fs, damping)) is not None:
                return factor.rows(start, start + f.shape[0])
        return self._factor([f], b, damping)

    def _stamp(self, fs: list[torch.Tensor], damping: float) -> tuple:
        return tuple(f._version for f in fs), tuple(f.data_ptr() for f in fs), damping

    def _cached(self, key: tuple[int, ...], fs: list[torch.Tensor], damping: float) -> ref.BlockFactor | None:
        hit = self._factors.get(key)
        if hit is not None and hit[1] == self._stamp(fs, damping) and all(r() is f for r, f in zip(hit[0], fs)):
            return hit[2]
        return None

    def _store(self, key: tuple[int, ...], fs: list[torch.Tensor], damping: float, factor: ref.BlockFactor) -> None:
        if key not in self._factors:  # the entry goes when the first F does (the rest are checked by weak refs)
            weakref.finalize(fs[0], self._factors.pop, key, None)
        self._factors[key] = ([weakref.ref(f) for f in fs], self._stamp(fs, damping), factor)
        if len(fs) > 1:
            start = 0
            for f in fs:
                if id(f) not in self._groups:
                    weakref.finalize(f, self._groups.pop, id(f), None)
                self._groups[id(f)] = (key, start)
                start += f.shape[0]

    def _new_factor(self, fs: list[torch.Tensor], b: int, damping: float) -> ref.BlockFactor:
        factor = ref.damped_cholesky(fs[0] if len(fs) == 1 else torch.cat(fs), b, damping)
        if self.reads_host_flags and factor.fallback.device.type == "cpu":  # no fallback: the solve skips a select
            factor = dataclasses.replace(factor, any_fallback=bool(factor.fallback.any()))
        return factor


class TritonBackend(TorchBackend):
    """The same three operations as fused Triton kernels (``mbf_triton.kernels``).

    Launch configurations come from an :class:`mbf_triton.tuning.Tuner` (default: the process-wide
    one): tuned per (kernel, block size, block-count bucket, dtype) on the first step on a GPU, cached on
    disk; the kernels' heuristic under the interpreter, under pytest or with ``MBF_TRITON_AUTOTUNE=0``.
    :meth:`configs` lists what each layer shape got.
    """

    name = "triton"
    reuse_factors = False  # the statistics kernels write F without bumping its version counter
    reads_host_flags = False

    def __init__(self, tuner: Tuner | None = None) -> None:
        from .kernels import block_update, fisher_stats

        super().__init__()
        self._block_update = block_update
        self._fisher_stats = fisher_stats
        self._tuner = tuner

    @property
    def tuner(self) -> Tuner:
        return self._tuner if self._tuner is not None else get_tuner()

    def configs(self) -> list[dict[str, object]]:
        """One row per layer shape launched so far: kernel, shape, key, config, source, ms."""
        return self.tuner.report()

    def linear_fisher_ema_(self, f, x, gout, *, b, scale, decay, skip=None):  # noqa: D102
        config = self.tuner.linear_stats_config(f, x, gout, b=b, scale=scale, decay=decay)
        self._fisher_stats.linear_fisher_ema_(f, x, gout, b=b, scale=scale, decay=decay, config=config, skip=skip)

    def conv_fisher_ema_(self, f, x, gout, *, geometry, groups, scale, decay, skip=None):  # noqa: D102
        config = self.tuner.conv_stats_config(f, x, gout, geometry=geometry, groups=groups, scale=scale,
                                              decay=decay)
        self._fisher_stats.conv_fisher_ema_(
            f, x, gout, **geometry.kwargs(), groups=groups, scale=scale, decay=decay, config=config, skip=skip
        )

    def block_update_(self, f, grad, param, momentum_buffer, fallback_count, *, b, damping, lr, momentum,
                      weight_decay, skip=None):  # noqa: D102
        kw = dict(b=b, damping=damping, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if b > self._block_update.MAX_BLOCK_SIZE:  # e.g. 5x5x5 kernels: batched torch.linalg instead
            return super().block_update_(f, grad, param, momentum_buffer, fallback_count, **kw, skip=skip)
        config = self.tuner.block_update_config(f, grad, param, momentum_buffer, fallback_count, **kw)
        self._block_update.damped_block_update_(
            f, grad, param, momentum_buffer, fallback_count, **kw, skip=skip, **config.launch_kwargs()
        )

    def direction(self, f, grad, *, b, damping):  # noqa: D102
        # The fused solve+update kernel with a zero "parameter", a zero momentum buffer, momentum 0 and
        # lr = -1 writes p = 0 - (-1) * (0 * 0 + d) = d exactly: the direction from the same launch (and the
        # same tuned configuration) as the update, with no second implementation of the solve.
        g = grad.float().contiguous()
        d, scratch = torch.zeros_like(g), torch.zeros_like(g)
        uncounted = torch.zeros(1, dtype=torch.int32, device=g.device)  # fallbacks are counted by the update
        self.block_update_(f, g, d, scratch, uncounted, b=b, damping=damping, lr=-1.0, momentum=0.0,
                           weight_decay=0.0)
        return ref.to_blocks(d, b)

    def block_update_group_(self, items, fallback_count, *, b, damping, lr, momentum, weight_decay,
                            skip=None):  # noqa: D102
        # One launch for the whole group (launch latency dominates small models); a single parameter, or
        # b beyond the register tile, goes through the per-parameter path and its tuned configuration.
        if b > self._block_update.MAX_BLOCK_SIZE:  # one batched torch solve
            return super().block_update_group_(items, fallback_count, b=b, damping=damping, lr=lr,
                                               momentum=momentum, weight_decay=weight_decay, skip=skip)
        if len(items) == 1:
            return self.block_update_(*items[0], fallback_count, b=b, damping=damping, lr=lr, momentum=momentum,
                                      weight_decay=weight_decay, skip=skip)
        kw = dict(b=b, damping=damping, lr=lr, momentum=momentum, weight_decay=weight_decay)
        # every program runs the same per-block code as the single-parameter kernel: the group launches
        # with the configuration tuned for its largest member
        largest = max(items, key=lambda item: item[0].shape[0])
        config = self.tuner.block_update_config(*largest, fallback_count, **kw)
        fs, grads, params, bufs = (list(t) for t in zip(*items))
        self._block_update.grouped_block_update_(
            fs, grads, params, bufs, fallback_count, **kw, skip=skip, **config.launch_kwargs()
        )


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _instance(name: str) -> TorchBackend:
    return TritonBackend() if name == "triton" else TorchBackend()


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def get_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.float32) -> TorchBackend:
    """The backend that runs a parameter of ``dtype`` on ``device``: the single dispatch point.

    ``"auto"``: Triton for CUDA tensors of fp32/bf16/fp16 when triton is importable, else torch (float64
    parameters always take the torch path). ``"triton"`` needs a CUDA device, or ``TRITON_INTERPRET=1``
    (the kernels then run on the CPU, slowly: for tests).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} must be one of {BACKENDS}")
    if requested == "auto":
        use_triton = device.type == "cuda" and dtype in TRITON_DTYPES and triton_available()
        requested = "triton" if use_triton else "torch"
    if requested == "triton" and dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports parameters of {TRITON_DTYPES}, got {dtype}; use 'auto'")
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got a parameter on {device}; use backend='torch' "
                "or 'auto' (or set TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"
            )
    return _instance(requested)
