"""What can be tuned, per kernel: launch-configuration types, the heuristic, the candidates worth timing,
the cache key of a call, and the :class:`Problem` that describes one call to the tuner.

Everything here is pure (no timing, no disk): candidates are pruned by arithmetic on the tile sizes before
anything is compiled. The statistics kernels' config type, ``FisherStatsConfig``, lives beside those
kernels in :mod:`mbf_triton.kernels.fisher_stats`; the block update's, :class:`BlockUpdateConfig`, here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

KERNELS = ("block_update", "linear_stats", "conv_stats")

# Register budget of one program's main tile, in fp32 values per thread (255 registers per thread at most).
MAX_VALUES_PER_THREAD = 32  # above this ptxas spilled or used ~250 registers (sm_90 resource report)
MIN_VALUES_PER_THREAD = 2
MAX_BLOCK_TILE = 16384  # fp32 entries of one block-update program's [BLOCKS, B_PAD, B_PAD] tile
SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined statistics loads may take


# ----------------------------------------------------------------------------------------------------
# Configuration types and their JSON form
# ----------------------------------------------------------------------------------------------------


def _kernels():
    """``(block_update, fisher_stats)``: imported on first use, so that ``import mbf_triton`` works where
    triton is not installed (the torch path never reaches here)."""
    from ..kernels import block_update, fisher_stats

    return block_update, fisher_stats


def _is_pow2(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and not v & (v - 1)


@dataclass(frozen=True)
class BlockUpdateConfig:
    """Launch configuration of :func:`mbf_triton.kernels.block_update.damped_block_update_`.

    ``num_stages=None``: Triton's default (the kernel has no pipelined loads, so it rarely matters).
    ``variant``: ``"tile"`` (register tile per block), ``"lane"`` (one mini-block per lane, ``b <= 16``) or
    ``"rows"`` (``rows_lanes(b)`` lanes per block, ``b >= 2``; explicit only: minutes to compile;
    ``blocks_per_program * rows_lanes(b) = 32 * num_warps``).
    """

    blocks_per_program: int
    num_warps: int
    num_stages: int | None = None
    variant: str = "tile"

    def __post_init__(self) -> None:
        if not _is_pow2(self.blocks_per_program):
            raise ValueError(
                f"blocks_per_program={self.blocks_per_program!r} must be a positive power of two"
            )
        if not _is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two <= 32")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be None or an int >= 1")
        if self.variant not in ("tile", "lane", "rows"):
            raise ValueError(f"variant={self.variant!r} must be 'tile', 'lane' or 'rows'")

    def launch_kwargs(self) -> dict[str, int | str | None]:
        return {
            "blocks_per_program": self.blocks_per_program,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "variant": self.variant,
        }

    def describe(self) -> str:
        stages = "" if self.num_stages is None else f" s={self.num_stages}"
        return f"{self.variant} blocks={self.blocks_per_program} w={self.num_warps}{stages}"


def describe(config: object) -> str:
    """Short human-readable form of a block-update or statistics config."""
    if isinstance(config, BlockUpdateConfig):
        return config.describe()
    c = config
    prec = "" if c.precision == "ieee" else f" {c.precision}"
    return f"o={c.block_o} k={c.block_k} t={c.block_t} w={c.num_warps} s={c.num_stages}{prec}"


def config_to_dict(config: object) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(kernel: str, data: object) -> object:
    """Validated config of ``kernel`` from its JSON form; raises ``ValueError`` on anything unexpected."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}")
    cls = BlockUpdateConfig if kernel == "block_update" else _kernels()[1].FisherStatsConfig
    names = {f.name for f in dataclasses.fields(cls)}
    optional = {"precision", "variant"}  # entries written before the field existed mean the default
    if not isinstance(data, dict) or not names - optional <= set(data) <= names:
        raise ValueError(f"config {data!r} must be a dict with keys {sorted(names)}")
    for k, v in data.items():
        if k in ("precision", "variant"):
            if not isinstance(v, str):
                raise ValueError(f"config field {k}={v!r} must be a string")
            continue
        if not (v is None or (isinstance(v, int) and not isinstance(v, bool))):
            raise ValueError(f"config field {k}={v!r} must be an int")
        if v is None and not (cls is BlockUpdateConfig and k == "num_stages"):
            raise ValueError(f"config field {k} must not be null")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Heuristics and candidates (all pruning that needs no compilation happens here)
# ----------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def block_update_heuristic(b: int) -> BlockUpdateConfig:
    """The config without a GPU timing: the variant ``perf/kernel_model.py`` predicts fastest
    (:func:`mbf_triton.kernels.block_update.default_variant`) at its default launch."""
    bu = _kernels()[0]
    variant = bu.default_variant(b)
    blocks, warps = bu.default_launch_config(b, variant)
    return BlockUpdateConfig(blocks, warps, variant=variant)


def block_update_candidates(
    b: int, n_blocks: int, *, warps: Sequence[int] = (1, 2, 4, 8, 16), stages: Sequence[int | None] = (None,)
) -> list[BlockUpdateConfig]:
    """Launch configs worth timing for ``n_blocks`` mini-blocks of size ``b``; the heuristic comes first.

    ``blocks_per_program`` runs over powers of two with a register tile ``B_PAD^2 * blocks`` of at most
    ``MAX_BLOCK_TILE`` fp32 and between ``MIN_VALUES_PER_THREAD`` and ``MAX_VALUES_PER_THREAD`` values per
    thread; programs holding more mini-blocks than exist are dropped.
    """
    heuristic = block_update_heuristic(b)
    per_block = 1 if b == 1 else _next_pow2(b) ** 2
    most = max(1, _next_pow2(n_blocks))
    span = _pow2_range(64, 4096) if b == 1 else _pow2_range(1, 1024)
    out = [heuristic]
    for blocks in span:
        tile = per_block * blocks
        if blocks > most or tile > MAX_BLOCK_TILE:
            continue
        for w in warps:
            per_thread = tile / (32 * w)
            if not MIN_VALUES_PER_THREAD <= per_thread <= MAX_VALUES_PER_THREAD:
                continue
            for s in stages:
                cfg = BlockUpdateConfig(blocks, w, s)
                if cfg not in out:
                    out.append(cfg)
    if 2 <= b <= _kernels()[0].LANE_MAX_B:  # one mini-block per lane: blocks = 32 * warps
        for w in warps:
            cfg = BlockUpdateConfig(32 * w, w, None, "lane")
            if 32 * w <= max(32, most) and cfg not in out:
                out.append(cfg)
    # no "rows" (a few lanes per block) candidates: each takes minutes to compile (fully unrolled), a stall
    # the tuner would impose on the first step (see kernels.block_update.default_variant)
    return out


def _stats_tiles_ok(bo: int, bk: int, bt: int, warps: int, stages: int, n_acc: int) -> bool:
    # accumulators live in registers; operands of tl.dot are staged through shared memory
    values = (n_acc * bo * bt + bo * bk + 2 * bk * bt) / (32 * warps)
    smem = max(stages - 1, 1) * (bo * bk + 2 * bk * bt) * 4
    return MIN_VALUES_PER_THREAD <= values <= MAX_VALUES_PER_THREAD and smem <= SMEM_BUDGET


def _stats_candidates(heuristic, t_size: int, n_o: int, n_k: int, n_acc: int, phase: int, best) -> list:
    cls = type(heuristic)
    if phase == 0:  # tiles, at the heuristic's warps and stages
        out = [heuristic]
        for bt in _pow2_range(16, max(16, min(128, _next_pow2(t_size)))):
            for bo in _pow2_range(16, max(16, min(64, _next_pow2(n_o)))):
                for bk in _pow2_range(16, max(16, min(64, _next_pow2(n_k)))):
                    cfg = cls(bo, bk, bt, heuristic.num_warps, heuristic.num_stages)
                    if cfg not in out and _stats_tiles_ok(bo, bk, bt, cfg.num_warps, cfg.num_stages, n_acc):
                        out.append(cfg)
        return out
    out = []  # phase 1: warps and stages around the best tile, with the fp32 FMA dot and with 3xTF32
    for precision in ("ieee", "tf32x3"):  # 3xTF32: tensor cores, about fp32 accuracy (see the README)
        for w in (2, 4, 8):
            for s in (1, 2, 3):
                cfg = dataclasses.replace(best, num_warps=w, num_stages=s, precision=precision)
                if cfg == best or _stats_tiles_ok(cfg.block_o, cfg.block_k, cfg.block_t, w, s, n_acc):
                    out.append(cfg)
    return out


def linear_stats_heuristic(n_out: int, b: int) -> object:
    return _kernels()[1].default_linear_config(n_out, b * (b + 1) // 2)


def linear_stats_candidates(n_out: int, m: int, b: int, *, phase: int = 0, best: object = None) -> list:
    """Statistics tiles for a Linear layer: phase 0 varies the tiles, phase 1 warps/stages of ``best``."""
    heuristic = linear_stats_heuristic(n_out, b)
    t_size = b * (b + 1) // 2
    return _stats_candidates(heuristic, t_size, n_out, m, 1, phase, best or heuristic)


def conv_stats_heuristic(og: int, n_l: int, b: int) -> object:
    return _kernels()[1].default_conv_config(og, n_l, b * (b + 1) // 2)


def conv_stats_candidates(og: int, n_l: int, b: int, *, phase: int = 0, best: object = None) -> list:
    """Statistics tiles for a convolution (``og`` outputs per group, ``n_l`` positions), as the Linear."""
    heuristic = conv_stats_heuristic(og, n_l, b)
    t_size = b * (b + 1) // 2
    if _kernels()[1].conv_full_blocks(b):  # whole blocks per program: no T tile, a (o, B_PAD, B_PAD) accumulator
        return _stats_candidates(heuristic, 16, og, n_l, 1 if b == 1 else 16, phase, best or heuristic)
    return _stats_candidates(heuristic, t_size, og, n_l, 3, phase, best or heuristic)


# ----------------------------------------------------------------------------------------------------
# Keys: calls within a factor of two in every size share a tuned config
# ----------------------------------------------------------------------------------------------------


def bucket(n: int) -> int:
    """``ceil(log2(n))`` (0 for ``n <= 1``): sizes within a factor of two share a tuned config."""
    return max(0, int(n) - 1).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def block_update_key(b: int, n_blocks: int, dtype: torch.dtype) -> str:
    return f"block_update|b={b}|blocks=2^{bucket(n_blocks)}|{_dtype_name(dtype)}"


def linear_stats_key(b: int, n_blocks: int, dtype: torch.dtype, m: int, n_out: int) -> str:
    return (
        f"linear_stats|b={b}|blocks=2^{bucket(n_blocks)}|{_dtype_name(dtype)}"
        f"|M=2^{bucket(m)}|out=2^{bucket(n_out)}"
    )


def conv_stats_key(b: int, n_blocks: int, dtype: torch.dtype, n: int, n_l: int, og: int) -> str:
    return (
        f"conv_stats|b={b}|blocks=2^{bucket(n_blocks)}|{_dtype_name(dtype)}"
        f"|N=2^{bucket(n)}|L=2^{bucket(n_l)}|out=2^{bucket(og)}"
    )


# ----------------------------------------------------------------------------------------------------
# Problems: one kernel call, described for the tuner
# ----------------------------------------------------------------------------------------------------


def _cleared_flag(device: torch.device) -> torch.Tensor:
    """A clear skip flag: trial launches compile, time and prune the kernel variant the optimizer runs
    (it always passes its step's flag, and the flag changes register allocation)."""
    return torch.zeros(1, dtype=torch.bool, device=device)


@dataclass(frozen=True)
class Problem:
    """One kernel call to choose a launch config for.

    ``key``: the cache key (calls with one key share a config); ``layer``: the call's exact shapes (for the
    report); ``heuristic()``: the fixed config; ``candidates(phase, best)``: the configs of each tuning
    phase; ``scratch()``: copies of everything the kernel writes (made once, on the first trial: tuning
    never writes the caller's tensors); ``launch(scratch, config)``: one launch, returning the compiled
    kernel or None.
    """

    kernel: str
    key: str
    layer: tuple
    device: torch.device
    heuristic: Callable[[], object]
    candidates: Callable[[int, object], list]
    scratch: Callable[[], tuple]
    launch: Callable[[tuple, object], object]
    n_phases: int = 1


def block_update_problem(
    f: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, momentum_buffer: torch.Tensor,
    fallback_count: torch.Tensor, *, b: int, damping: float, lr: float, momentum: float, weight_decay: float,
) -> Problem:
    """A ``damped_block_update_`` call (trials on scratch copies of param, momentum and the fallback counter;
    ``f`` and ``grad`` are only read)."""
    n_blocks = int(f.shape[0])
    hyper = dict(b=b, damping=damping, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return Problem(
        "block_update",
        block_update_key(b, n_blocks, param.dtype),
        ("block_update", tuple(param.shape), b, param.dtype),
        f.device,
        lambda: block_update_heuristic(b),
        lambda phase, best: block_update_candidates(b, n_blocks),
        lambda: (param.clone(), momentum_buffer.clone(), fallback_count.clone(), _cleared_flag(f.device)),
        lambda s, cfg: _kernels()[0].damped_block_update_(f, grad, *s[:3], **hyper, skip=s[3], **cfg.launch_kwargs()),
    )


def linear_stats_problem(
    f: torch.Tensor, x: torch.Tensor, gout: torch.Tensor, *, b: int, scale: float, decay: float
) -> Problem:
    """A ``linear_fisher_ema_`` call (trials on a scratch copy of ``f``)."""
    m, n_out = x.shape[0], gout.shape[1]
    return Problem(
        "linear_stats",
        linear_stats_key(b, int(f.shape[0]), x.dtype, m, n_out),
        ("linear_stats", tuple(x.shape), tuple(gout.shape), b, x.dtype),
        f.device,
        lambda: linear_stats_heuristic(n_out, b),
        lambda phase, best: linear_stats_candidates(n_out, m, b, phase=phase, best=best),
        lambda: (f.clone(), _cleared_flag(f.device)),
        lambda s, cfg: _kernels()[1].linear_fisher_ema_(s[0], x, gout, b=b, scale=scale, decay=decay, config=cfg,
                                                        skip=s[1]),
        n_phases=2,
    )


def conv_stats_problem(
    f: torch.Tensor, x: torch.Tensor, gout: torch.Tensor, *, geometry: Any, groups: int, scale: float, decay: float
) -> Problem:
    """A ``conv_fisher_ema_`` call (trials on a scratch copy of ``f``); ``geometry``: a
    :class:`mbf_triton.reference.ConvGeometry`."""
    n = x.shape[0]
    b = math.prod(geometry.kernel_size)
    n_l = math.prod(gout.shape[2:])
    og = gout.shape[1] // max(groups, 1)
    return Problem(
        "conv_stats",
        conv_stats_key(b, int(f.shape[0]), x.dtype, n, n_l, og),
        ("conv_stats", tuple(x.shape), tuple(gout.shape), geometry, groups, x.dtype),
        f.device,
        lambda: conv_stats_heuristic(og, n_l, b),
        lambda phase, best: conv_stats_candidates(og, n_l, b, phase=phase, best=best),
        lambda: (f.clone(), _cleared_flag(f.device)),
        lambda s, cfg: _kernels()[1].conv_fisher_ema_(s[0], x, gout, **geometry.kwargs(), groups=groups,
                                                      scale=scale, decay=decay, config=cfg, skip=s[1]),
        n_phases=2,
    )
