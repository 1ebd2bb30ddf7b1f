"""Per-layer autotuning of the Triton kernels' launch configurations, with an on-disk cache and a sweep CLI.

For every distinct ``(kernel, b, block-count bucket, dtype[, stats dims])`` key met by the optimizer, the
:class:`Tuner` times candidate launch configurations once (first step), keeps the fastest, records it in
``Tuner.chosen`` and in a JSON cache on disk; later steps, and later runs on the same GPU with the same
triton and mbf_triton versions, reuse it.

* Candidates come from functions (:func:`block_update_candidates`, :func:`linear_stats_candidates`,
  :func:`conv_stats_candidates`); impossible or register-hungry tiles are pruned before anything runs;
  on a GPU a candidate whose compiled kernel spills registers (``n_spills`` of the compiled kernel, when
  the installed triton exposes it) or fails to compile/launch is pruned before it is timed.
* Trials run on scratch copies of everything the kernel writes (``param``, ``momentum_buffer``,
  ``fallback_count``; ``F`` for the statistics): tuning never changes the optimizer's state.
* Timing: ``triton.testing.do_bench(..., return_mode="median")`` on CUDA; any ``timer(fn, config) -> ms``
  can be injected (tests use a fake one).
* Off switch: ``MBF_TRITON_AUTOTUNE=0`` or :func:`set_enabled(False) <set_enabled>` gives the kernels'
  fixed heuristic configs. Under ``TRITON_INTERPRET=1``, on CPU tensors, or while pytest runs a test
  (one fixed config keeps tests reproducible), the heuristic is used too, without timing.
* Cache: ``${MBF_TRITON_CACHE_DIR:-~/.cache/mbf_triton}/autotune-<gpu>-triton<ver>-mbf<ver>.json`` with a
  header repeating those fields; a stale header, corrupt JSON or an invalid entry is ignored with an
  :class:`AutotuneCacheWarning`. Writes merge with the file under an exclusive lock (``fcntl.flock``
  where available) and replace it atomically, so concurrent processes keep each other's entries.

``python -m mbf_triton tune --help``: the sweep CLI (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AutotuneCacheWarning",
    "BlockUpdateConfig",
    "Choice",
    "DiskCache",
    "Trial",
    "Tuner",
    "block_update_candidates",
    "cache_path",
    "conv_stats_candidates",
    "get_tuner",
    "is_enabled",
    "linear_stats_candidates",
    "main",
    "set_enabled",
]

ENV_ENABLE = "MBF_TRITON_AUTOTUNE"
ENV_CACHE_DIR = "MBF_TRITON_CACHE_DIR"
# 2: conv statistics read x with in-kernel padding, whole blocks for b <= 16, precision;
# 3: every kernel takes the step's skip flag (other register allocation: entries timed without it are stale)
CACHE_FORMAT = 3
KERNELS = ("block_update", "linear_stats", "conv_stats")
MODES = ("auto", "off", "force")

# Register budget of one program's main tile, in fp32 values per thread (255 registers per thread at most).
MAX_VALUES_PER_THREAD = 32  # above this ptxas spilled or used ~250 registers (sm_90 resource report)
MIN_VALUES_PER_THREAD = 2
MAX_BLOCK_TILE = 16384  # fp32 entries of one block-update program's [BLOCKS, B_PAD, B_PAD] tile
SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined statistics loads may take

Timer = Callable[[Callable[[], object], object], float]  # timer(fn, config) -> milliseconds


class AutotuneCacheWarning(UserWarning):
    """A cache file or entry was ignored (corrupt, stale or invalid)."""


# ----------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------


def _is_pow2(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and not v & (v - 1)


@dataclass(frozen=True)
class BlockUpdateConfig:
    """Launch configuration of :func:`mbf_triton.kernels.block_update.damped_block_update_`.

    ``num_stages=None``: Triton's default (the kernel has no pipelined loads, so it rarely matters).
    """

    blocks_per_program: int
    num_warps: int
    num_stages: int | None = None

    def __post_init__(self) -> None:
        if not _is_pow2(self.blocks_per_program):
            raise ValueError(
                f"blocks_per_program={self.blocks_per_program!r} must be a positive power of two"
            )
        if not _is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two <= 32")
        if self.num_stages is not None and (not isinstance(self.num_stages, int) or self.num_stages < 1):
            raise ValueError(f"num_stages={self.num_stages!r} must be None or an int >= 1")

    def launch_kwargs(self) -> dict[str, int | None]:
        return {
            "blocks_per_program": self.blocks_per_program,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    def describe(self) -> str:
        stages = "" if self.num_stages is None else f" s={self.num_stages}"
        return f"blocks={self.blocks_per_program} w={self.num_warps}{stages}"


def _stats_config_type() -> type:
    from .kernels.fisher_stats import FisherStatsConfig

    return FisherStatsConfig


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
    cls = BlockUpdateConfig if kernel == "block_update" else _stats_config_type()
    names = {f.name for f in dataclasses.fields(cls)}
    optional = {"precision"}  # entries written before the field existed mean the default ("ieee")
    if not isinstance(data, dict) or not names - optional <= set(data) <= names:
        raise ValueError(f"config {data!r} must be a dict with keys {sorted(names)}")
    for k, v in data.items():
        if k == "precision":
            if not isinstance(v, str):
                raise ValueError(f"config field precision={v!r} must be a string")
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
# Candidates (all pruning that needs no compilation happens here)
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
    from .kernels.block_update import default_launch_config

    blocks, warps = default_launch_config(b)
    return BlockUpdateConfig(blocks, warps)


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


def linear_stats_candidates(n_out: int, m: int, b: int, *, phase: int = 0, best: object = None) -> list:
    """Statistics tiles for a Linear layer: phase 0 varies the tiles, phase 1 warps/stages of ``best``."""
    from .kernels.fisher_stats import default_linear_config

    t_size = b * (b + 1) // 2
    heuristic = default_linear_config(n_out, t_size)
    return _stats_candidates(heuristic, t_size, n_out, m, 1, phase, best or heuristic)


def conv_stats_candidates(og: int, n_l: int, b: int, *, phase: int = 0, best: object = None) -> list:
    """Statistics tiles for a convolution (``og`` outputs per group, ``n_l`` positions), as the Linear."""
    from .kernels.fisher_stats import conv_full_blocks, default_conv_config

    t_size = b * (b + 1) // 2
    heuristic = default_conv_config(og, n_l, t_size)
    if conv_full_blocks(b):  # whole blocks per program: no T tile to vary, a (o, B_PAD, B_PAD) accumulator
        return _stats_candidates(heuristic, 16, og, n_l, 1 if b == 1 else 16, phase, best or heuristic)
    return _stats_candidates(heuristic, t_size, og, n_l, 3, phase, best or heuristic)


# ----------------------------------------------------------------------------------------------------
# Environment: switches, versions, cache location
# ----------------------------------------------------------------------------------------------------

_ENABLED_OVERRIDE: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Turn autotuning on (``True``), off (``False``: the kernels' fixed heuristic configs) or back to the
    environment (``None``: ``MBF_TRITON_AUTOTUNE``, default on). Affects every :class:`Tuner` built without
    an explicit ``mode``."""
    global _ENABLED_OVERRIDE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r} must be True, False or None")
    _ENABLED_OVERRIDE = enabled


def is_enabled() -> bool:
    """Whether tuning is switched on (by :func:`set_enabled`, else ``MBF_TRITON_AUTOTUNE``)."""
    if _ENABLED_OVERRIDE is not None:
        return _ENABLED_OVERRIDE
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter" if _interpreted() else "cpu"


def versions() -> dict[str, str]:
    import triton

    from . import __version__

    return {"triton": triton.__version__, "mbf_triton": __version__, "torch": torch.__version__}


def cache_dir() -> Path:
    """``$MBF_TRITON_CACHE_DIR``, else ``$XDG_CACHE_HOME/mbf_triton``, else ``~/.cache/mbf_triton``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mbf_triton"


def cache_header(gpu: str) -> dict[str, object]:
    v = versions()
    return {"format": CACHE_FORMAT, "gpu": gpu, "triton": v["triton"], "mbf_triton": v["mbf_triton"]}


def cache_path(gpu: str, directory: Path | None = None) -> Path:
    h = cache_header(gpu)
    tv, mv = _sanitise(str(h["triton"])), _sanitise(str(h["mbf_triton"]))
    name = f"autotune-{_sanitise(gpu)}-triton{tv}-mbf{mv}.json"
    return (directory or cache_dir()) / name


# ----------------------------------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` + ``.lock`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(str(path) + ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class DiskCache:
    """One JSON file ``{"header": {...}, "entries": {key: {"config": {...}, "ms": ...}}}``."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = Path(path)
        self.header = dict(header)

    @staticmethod
    def _ignored(warn: bool, message: str) -> dict[str, dict]:
        """Nothing is trusted from what ``message`` describes (warned once per load)."""
        if warn:
            warnings.warn(message, AutotuneCacheWarning, stacklevel=4)
        return {}

    def _read(self, warn: bool) -> dict[str, dict]:
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            return self._ignored(warn, f"ignoring unreadable autotune cache {self.path}: {e}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            return self._ignored(warn, f"ignoring corrupt autotune cache {self.path} ({e}); it will be rewritten")
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return self._ignored(warn, f"ignoring malformed autotune cache {self.path} (no 'entries' object)")
        if data.get("header") != self.header:
            return self._ignored(warn, f"ignoring stale autotune cache {self.path}: header "
                                       f"{data.get('header')!r} does not match {self.header!r}")
        entries: dict[str, dict] = {}
        for key, entry in data["entries"].items():
            try:
                _validate_entry(key, entry)
            except ValueError as e:
                self._ignored(warn, f"ignoring invalid autotune cache entry {key!r} in {self.path}: {e}")
                continue
            entries[key] = entry
        return entries

    def load(self) -> dict[str, dict]:
        """Valid entries on disk; anything corrupt, stale or invalid is skipped with a warning."""
        return self._read(warn=True)

    def store(self, entries: dict[str, dict]) -> None:
        """Merge ``entries`` into the file (they win over what is there) atomically, under the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            merged = self._read(warn=False)
            merged.update(entries)
            payload = json.dumps({"header": self.header, "entries": merged}, indent=1, sort_keys=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def _validate_entry(key: object, entry: object) -> None:
    if not isinstance(key, str) or key.split("|", 1)[0] not in KERNELS:
        raise ValueError(f"key {key!r} does not name a kernel of {KERNELS}")
    if not isinstance(entry, dict) or "config" not in entry:
        raise ValueError("entry must be an object with a 'config'")
    ms = entry.get("ms")
    if ms is not None and (not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0):
        raise ValueError(f"ms={ms!r} must be a finite number >= 0")
    config_from_dict(key.split("|", 1)[0], entry["config"])


# ----------------------------------------------------------------------------------------------------
# Keys
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
# Timing and compiled-kernel metadata
# ----------------------------------------------------------------------------------------------------


def cuda_timer(fn: Callable[[], object], config: object = None) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (short warm-up and repetition)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def cpu_timer(fn: Callable[[], object], config: object = None, reps: int = 3) -> float:
    """Median milliseconds of ``fn`` by ``time.perf_counter`` (CPU / interpreter: the numbers mean nothing
    about a GPU; used by the smoke mode so the pipeline runs end to end)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _register_use(compiled: object) -> tuple[int | None, int | None]:
    """``(n_regs, n_spills)`` of a compiled kernel if the installed triton exposes them (best effort)."""
    if compiled is None:
        return None, None
    try:
        if getattr(compiled, "n_spills", None) is None and hasattr(compiled, "_init_handles"):
            compiled._init_handles()
        return getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    except Exception:  # noqa: BLE001 - metadata is optional
        return None, None


# ----------------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One candidate: ``status`` is ``"ok"`` or why it was pruned; ``ms`` its median time when timed."""

    config: object
    status: str = "ok"
    ms: float | None = None
    n_regs: int | None = None
    n_spills: int | None = None


@dataclass
class Choice:
    """The config a key got. ``source``: ``tuned`` (timed now), ``cache`` (from disk), ``heuristic``
    (tuning off) or ``default`` (CPU / interpreter / pytest: no timing)."""

    config: object
    source: str
    ms: float | None = None
    heuristic_ms: float | None = None
    trials: list[Trial] = field(default_factory=list, repr=False)


def _cleared_flag(device: torch.device) -> torch.Tensor:
    """A clear skip flag: trial launches compile, time and prune the kernel variant the optimizer runs
    (it always passes its step's flag, and the flag changes register allocation)."""
    return torch.zeros(1, dtype=torch.bool, device=device)


class Tuner:
    """Picks, records and caches one launch config per kernel key.

    ``mode``: ``"auto"`` (tune CUDA launches, heuristic under the interpreter / on CPU / under pytest),
    ``"off"`` (always the heuristic), ``"force"`` (tune wherever the kernels run, the interpreter included:
    for tests and the smoke CLI); ``None`` follows :func:`set_enabled` / ``MBF_TRITON_AUTOTUNE``.
    ``timer(fn, config) -> ms``: default :func:`cuda_timer` on CUDA, :func:`cpu_timer` elsewhere.
    ``disk_cache``: use the JSON cache (directory ``cache_directory``, default :func:`cache_dir`);
    ``read_cache=False`` re-tunes every key but still writes the winners (the sweep CLI).
    """

    def __init__(
        self,
        *,
        mode: str | None = None,
        timer: Timer | None = None,
        disk_cache: bool = True,
        read_cache: bool = True,
        cache_directory: str | os.PathLike | None = None,
        prune_spills: bool = True,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES} or None")
        self.mode = mode
        self.timer = timer
        self.disk_cache = disk_cache
        self.read_cache = read_cache
        self.last_key: str | None = None
        self.last_run: Callable[[object], object] | None = None  # trial launcher of the last tuned call
        self.cache_directory = None if cache_directory is None else Path(cache_directory)
        self.prune_spills = prune_spills
        self.chosen: dict[str, Choice] = {}
        self.layers: dict[tuple, str] = {}  # (kernel, shapes...) -> key
        self._disk: dict[str, tuple[DiskCache, dict[str, dict]]] = {}

    # -- mode and cache ---------------------------------------------------------------------------
    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        if _ENABLED_OVERRIDE is not None:
            return "auto" if _ENABLED_OVERRIDE else "off"
        if not is_enabled():
            return "off"
        if "PYTEST_CURRENT_TEST" in os.environ:
            return "off"
        return "auto"

    def _cache_for(self, device: torch.device) -> tuple[DiskCache, dict[str, dict]]:
        gpu = device_name(device)
        if gpu not in self._disk:
            cache = DiskCache(cache_path(gpu, self.cache_directory), cache_header(gpu))
            self._disk[gpu] = (cache, cache.load())
        return self._disk[gpu]

    def _timer_for(self, device: torch.device) -> Timer:
        if self.timer is not None:
            return self.timer
        return cuda_timer if device.type == "cuda" and not _interpreted() else cpu_timer

    # -- the generic selection ----------------------------------------------------------------------
    def select(
        self,
        kernel: str,
        key: str,
        layer: tuple,
        device: torch.device,
        heuristic: object,
        phases: Callable[[int, object], list],
        run: Callable[[object], object],
        n_phases: int = 1,
    ) -> Choice:
        """The config for ``key``: from memory, else heuristic (off / CPU), else the disk cache, else tuned.

        ``phases(i, best) -> candidates``; ``run(config)`` launches once on scratch buffers and returns
        the compiled kernel (or None).
        """
        self.layers[layer] = key
        self.last_key = key
        mode = self.resolved_mode()
        if mode == "off":
            choice = self.chosen.get(key)
            if choice is None or choice.source != "heuristic":
                choice = self.chosen[key] = Choice(heuristic, "heuristic")
            return choice
        choice = self.chosen.get(key)
        if choice is not None and choice.source != "heuristic":
            return choice
        if mode == "auto" and (device.type != "cuda" or _interpreted()):
            choice = self.chosen[key] = Choice(heuristic, "default")
            return choice
        if self.disk_cache and self.read_cache:
            _, entries = self._cache_for(device)
            entry = entries.get(key)
            if entry is not None:
                choice = Choice(
                    config_from_dict(kernel, entry["config"]),
                    "cache",
                    entry.get("ms"),
                    entry.get("heuristic_ms"),
                )
                self.chosen[key] = choice
                return choice
        choice = self.tune(heuristic, phases, run, device, n_phases)
        self.chosen[key] = choice
        if self.disk_cache:
            cache, entries = self._cache_for(device)
            entry = {
                "config": config_to_dict(choice.config),
                "ms": choice.ms,
                "heuristic_ms": choice.heuristic_ms,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            entries[key] = entry
            try:
                cache.store({key: entry})
            except OSError as e:
                warnings.warn(
                    f"could not write the autotune cache {cache.path}: {e}",
                    AutotuneCacheWarning,
                    stacklevel=2,
                )
        return choice

    def tune(
        self,
        heuristic: object,
        phases: Callable[[int, object], list],
        run: Callable[[object], object],
        device: torch.device,
        n_phases: int = 1,
    ) -> Choice:
        """Time the candidates of each phase (pruning failures and spills first); the fastest wins."""
        timer = self._timer_for(device)
        trials: list[Trial] = []
        seen: set = set()
        best: Trial | None = None
        for phase in range(n_phases):
            for cfg in phases(phase, best.config if best else heuristic):
                if cfg in seen:
                    continue
                seen.add(cfg)
                trial = Trial(cfg)
                trials.append(trial)
                try:
                    compiled = run(cfg)  # compile + one launch on scratch buffers
                except Exception as e:  # noqa: BLE001 - any failure prunes the candidate
                    trial.status = (
                        f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                    )
                    continue
                trial.n_regs, trial.n_spills = _register_use(compiled)
                if self.prune_spills and trial.n_spills and cfg != heuristic:
                    trial.status = f"pruned: {trial.n_spills} register spills"
                    continue
                try:
                    trial.ms = float(timer(lambda cfg=cfg: run(cfg), cfg))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory in the timer: prune, never crash
                    trial.status = f"failed while timing: {type(e).__name__}"[:200]
                    continue
                if best is None or trial.ms < best.ms:
                    best = trial
        heuristic_ms = next((t.ms for t in trials if t.config == heuristic), None)
        if best is None:
            warnings.warn(
                "every autotune candidate failed; using the heuristic config", RuntimeWarning, stacklevel=3
            )
            return Choice(heuristic, "heuristic", trials=trials)
        return Choice(best.config, "tuned", best.ms, heuristic_ms, trials)

    # -- the three kernels ------------------------------------------------------------------------
    def _reuse(self, key: str, layer: tuple) -> object | None:
        """The config already chosen for ``key`` (the fast path after the first step), else None."""
        choice = self.chosen.get(key)
        if choice is None or choice.source == "heuristic" or self.resolved_mode() == "off":
            return None
        self.layers[layer] = key
        self.last_key = key
        return choice.config

    def block_update_config(
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
    ) -> BlockUpdateConfig:
        """Launch config for this ``damped_block_update_`` call (trials on scratch copies of param,
        momentum and the fallback counter; ``f`` and ``grad`` are only read)."""
        from .kernels.block_update import damped_block_update_

        n_blocks = int(f.shape[0])
        hyper = dict(b=b, damping=damping, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return self._choose(
            "block_update",
            block_update_key(b, n_blocks, param.dtype),
            ("block_update", tuple(param.shape), b, param.dtype),
            f.device,
            lambda: block_update_heuristic(b),
            lambda phase, best: block_update_candidates(b, n_blocks),
            lambda: (param.clone(), momentum_buffer.clone(), fallback_count.clone(), _cleared_flag(f.device)),
            lambda scratch, cfg: damped_block_update_(f, grad, *scratch[:3], **hyper, skip=scratch[3],
                                                      **cfg.launch_kwargs()),
        )

    def _choose(
        self,
        kernel: str,
        key: str,
        layer: tuple,
        device: torch.device,
        heuristic: Callable[[], object],
        phases: Callable[[int, object], list],
        make_scratch: Callable[[], object],
        launch: Callable[[object, object], object],
        n_phases: int = 1,
    ) -> object:
        """The config of one kernel call: reused after the first step, else :meth:`select` with trial
        launches ``launch(scratch, config)`` on ``make_scratch()`` (made once, on the first trial), so that
        tuning never writes the caller's parameters or state."""
        reused = self._reuse(key, layer)
        if reused is not None:
            return reused
        scratch: list[object] = []

        def run(cfg: object) -> object:
            if not scratch:
                scratch.append(make_scratch())
            return launch(scratch[0], cfg)

        self.last_run = run  # the sweep CLI times the winner and the heuristic again with it
        return self.select(kernel, key, layer, device, heuristic(), phases, run, n_phases).config

    def linear_stats_config(
        self, f: torch.Tensor, x: torch.Tensor, gout: torch.Tensor, *, b: int, scale: float, decay: float
    ) -> object:
        """Tile config for this ``linear_fisher_ema_`` call (trials on a scratch copy of ``f``)."""
        from .kernels.fisher_stats import default_linear_config, linear_fisher_ema_

        m, n_out = x.shape[0], gout.shape[1]
        return self._choose(
            "linear_stats",
            linear_stats_key(b, int(f.shape[0]), x.dtype, m, n_out),
            ("linear_stats", tuple(x.shape), tuple(gout.shape), b, x.dtype),
            f.device,
            lambda: default_linear_config(n_out, b * (b + 1) // 2),
            lambda phase, best: linear_stats_candidates(n_out, m, b, phase=phase, best=best),
            lambda: (f.clone(), _cleared_flag(f.device)),
            lambda scratch, cfg: linear_fisher_ema_(scratch[0], x, gout, b=b, scale=scale, decay=decay, config=cfg,
                                                    skip=scratch[1]),
            n_phases=2,
        )

    def conv_stats_config(
        self,
        f: torch.Tensor,
        x: torch.Tensor,
        gout: torch.Tensor,
        *,
        geometry: Any,
        groups: int,
        scale: float,
        decay: float,
    ) -> object:
        """Tile config for this ``conv_fisher_ema_`` call (trials on a scratch copy of ``f``);
        ``geometry``: a :class:`mbf_triton.reference.ConvGeometry`."""
        from .kernels.fisher_stats import conv_fisher_ema_, default_conv_config

        n = x.shape[0]
        b = math.prod(geometry.kernel_size)
        n_l = math.prod(gout.shape[2:])
        og = gout.shape[1] // max(groups, 1)
        return self._choose(
            "conv_stats",
            conv_stats_key(b, int(f.shape[0]), x.dtype, n, n_l, og),
            ("conv_stats", tuple(x.shape), tuple(gout.shape), geometry, groups, x.dtype),
            f.device,
            lambda: default_conv_config(og, n_l, b * (b + 1) // 2),
            lambda phase, best: conv_stats_candidates(og, n_l, b, phase=phase, best=best),
            lambda: (f.clone(), _cleared_flag(f.device)),
            lambda scratch, cfg: conv_fisher_ema_(scratch[0], x, gout, **geometry.kwargs(), groups=groups,
                                                  scale=scale, decay=decay, config=cfg, skip=scratch[1]),
            n_phases=2,
        )

    # -- what each layer got ------------------------------------------------------------------------
    def report(self) -> list[dict[str, object]]:
        """One row per layer shape seen: kernel, shape, key, config, source, tuned and heuristic ms."""
        rows = []
        for layer, key in self.layers.items():
            choice = self.chosen.get(key)
            if choice is None:
                continue
            rows.append(
                {
                    "kernel": layer[0],
                    "shape": layer[1:],
                    "key": key,
                    "config": choice.config,
                    "source": choice.source,
                    "ms": choice.ms,
                    "heuristic_ms": choice.heuristic_ms,
                }
            )
        return rows

    def format_report(self) -> str:
        lines = [f"{'kernel':<13} {'source':<9} {'config':<28} {'ms':>9} {'heur. ms':>9}  key"]
        for r in self.report():
            ms = "" if r["ms"] is None else f"{r['ms']:.4f}"
            hms = "" if r["heuristic_ms"] is None else f"{r['heuristic_ms']:.4f}"
            lines.append(
                f"{r['kernel']:<13} {r['source']:<9} {describe(r['config']):<28} {ms:>9} {hms:>9}  "
                f"{r['key']}"
            )
        return "\n".join(lines)


_DEFAULT_TUNER: Tuner | None = None


def get_tuner() -> Tuner:
    """The process-wide tuner that :class:`mbf_triton.backends.TritonBackend` uses (created on first use)."""
    global _DEFAULT_TUNER
    if _DEFAULT_TUNER is None:
        _DEFAULT_TUNER = Tuner()
    return _DEFAULT_TUNER


# ----------------------------------------------------------------------------------------------------
# The sweep CLI
# ----------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Job:
    kernel: str
    b: int
    n_blocks: int
    label: str


def _spd_packed(n_blocks: int, b: int, device, gen: torch.Generator) -> torch.Tensor:
    t = b * (b + 1) // 2
    f = torch.rand(n_blocks, t, generator=gen, device="cpu").mul_(0.01)
    idx = torch.arange(b)
    f[:, idx * (idx + 3) // 2] += 1.0
    return f.to(device)


def _build_block_update(job: _Job, dtype, device, gen):
    b = job.b
    n_chunks = min(job.n_blocks, 64)
    rows = -(-job.n_blocks // n_chunks)
    cols = n_chunks * b
    n_blocks = rows * n_chunks
    f = _spd_packed(n_blocks, b, device, gen)
    grad = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    param = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    mom = torch.zeros(rows, cols, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    es = param.element_size()
    bytes_moved = f.numel() * 4 + grad.numel() * es + 2 * param.numel() * es + 2 * mom.numel() * 4
    args = (f, grad, param, mom, count)
    kw = dict(b=b, damping=1e-2, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return args, kw, bytes_moved, n_blocks, f"{rows}x{cols}"


def _build_linear(job: _Job, dtype, device, gen, samples: int):
    b = job.b
    n_out = max(1, math.isqrt(job.n_blocks))
    n_chunks = -(-job.n_blocks // n_out)
    n_in = n_chunks * b
    f = _spd_packed(n_out * n_chunks, b, device, gen)
    x = torch.randn(samples, n_in, generator=gen).to(device=device, dtype=dtype)
    gout = torch.randn(samples, n_out, generator=gen).to(device=device, dtype=dtype)
    bytes_moved = 2 * f.numel() * 4 + (x.numel() + gout.numel()) * x.element_size()
    return (
        (f, x, gout),
        dict(b=b, scale=1.0, decay=0.9),
        bytes_moved,
        f.shape[0],
        f"M={samples} {n_out}x{n_in}",
    )


def _build_conv(job: _Job, dtype, device, gen, samples: int, positions: int):
    from .reference import ConvGeometry

    b = job.b
    c = max(1, math.isqrt(job.n_blocks))
    k = math.isqrt(b)
    side = max(1, math.isqrt(positions))
    if k * k == b:  # a k x k convolution with "same" zero padding: side x side output positions
        lo, hi = (k - 1) // 2, k // 2
        geometry = ConvGeometry((k, k), (1, 1), ((lo, hi), (lo, hi)), (1, 1))
        x = torch.randn(samples, c, side, side, generator=gen)
        gout = torch.randn(samples, c, side, side, generator=gen)
    else:  # a 1-D convolution of width b without padding: side^2 output positions
        geometry = ConvGeometry((b,), (1,), ((0, 0),), (1,))
        x = torch.randn(samples, c, side * side + b - 1, generator=gen)
        gout = torch.randn(samples, c, side * side, generator=gen)
    x, gout = x.to(device=device, dtype=dtype), gout.to(device=device, dtype=dtype)
    f = _spd_packed(c * c, b, device, gen)
    bytes_moved = 2 * f.numel() * 4 + (x.numel() + gout.numel()) * x.element_size()
    return (
        (f, x, gout),
        dict(geometry=geometry, groups=1, scale=1.0, decay=0.9),
        bytes_moved,
        c * c,
        f"N={samples} C={c} L={side}^2",
    )


def confirm(timer: Timer, launch: Callable[[object], object], tuned: object, heuristic: object,
            rounds: int = 3) -> tuple[float, float]:
    """Median ms of the heuristic and the tuned config, timed again after the sweep, alternating
    ``rounds`` times: the sweep's own minimum is biased towards the winner (it is the fastest of several
    noisy timings), so the claim "tuned is not slower than the heuristic" rests on these numbers."""
    heur, best = [], []
    for _ in range(rounds):
        heur.append(float(timer(lambda: launch(heuristic), heuristic)))
        best.append(float(timer(lambda: launch(tuned), tuned)))
    return statistics.median(heur), statistics.median(best)


def _copy_gbps(device: torch.device, timer: Timer, numel: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), None)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _model_jobs(spec: str, block_size: int) -> list[_Job]:
    from torch import nn

    from .blocks import layout_for

    if ":" in spec:
        import importlib

        mod_name, fn_name = spec.split(":", 1)
        model = getattr(importlib.import_module(mod_name), fn_name)()
    else:
        from .experiments import TASK_SPECS

        if spec not in TASK_SPECS:
            raise SystemExit(
                f"--model {spec!r}: use one of {sorted(TASK_SPECS)} or 'package.module:factory'"
            )
        model = TASK_SPECS[spec].build()
    owner = {}
    for mname, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            owner[id(w)] = m
    seen: dict[tuple[int, int], list[str]] = {}
    for pname, p in model.named_parameters():
        lay = layout_for(p, owner.get(id(p)), block_size)
        seen.setdefault((lay.b, lay.n_blocks), []).append(pname)
    return [_Job("block_update", b, n, ",".join(names)) for (b, n), names in sorted(seen.items())]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mbf_triton tune",
        description="Sweep the Triton kernels' launch configurations, print the timings, write CSV + plot, "
        "and store the winners in the autotune cache (run once per GPU before long training jobs).",
    )
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=["block_update"])
    p.add_argument("--b", nargs="+", type=int, default=None, help="mini-block sizes (default 9 16 25 32)")
    p.add_argument("--blocks", nargs="+", type=float, default=None, help="block counts (default 1e5 1e6)")
    p.add_argument(
        "--model",
        default=None,
        help="sweep the block update over a model's layers: 'autoencoder', 'cnn' or 'pkg.mod:factory'",
    )
    p.add_argument("--block-size", type=int, default=16, help="MBF block_size for --model (Linear fan-in)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--samples", type=int, default=None, help="M (Linear) / N (conv) of the statistics")
    p.add_argument("--positions", type=int, default=None, help="output positions L of the conv statistics")
    p.add_argument("--out", default="mbf_tune", help="directory for the CSV and the plot")
    p.add_argument(
        "--top", type=int, default=8, help="candidate rows printed per shape (all go to the CSV)"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="do not write the winners into the autotune cache"
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no new shape after this many seconds (the shapes left are listed as skipped)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, run under the Triton interpreter on CPU: exercises the pipeline, "
        "the timings are meaningless",
    )
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mbf_triton tune``: see ``--help``."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    on_gpu = torch.cuda.is_available() and not _interpreted()
    if not on_gpu and not args.smoke:
        print(
            "Tuning needs a CUDA GPU (and TRITON_INTERPRET unset); nothing was run. "
            "Use --smoke to exercise the sweep on CPU with meaningless timings."
        )
        return 0
    if not on_gpu and not _interpreted():
        if any(m.startswith("mbf_triton.kernels") for m in sys.modules):
            print(
                "--smoke on CPU needs TRITON_INTERPRET=1 set before the kernels are imported; rerun as "
                "TRITON_INTERPRET=1 python -m mbf_triton tune --smoke"
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels are not imported yet: they will be interpreted
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = _DTYPES[args.dtype]
    smoke = args.smoke
    bs = args.b or ([3, 4] if smoke else [9, 16, 25, 32])
    counts = [int(c) for c in (args.blocks or ([6, 20] if smoke else [1e5, 1e6]))]
    samples = args.samples or (3 if smoke else 256)
    positions = args.positions or (4 if smoke else 196)
    if args.model:
        jobs = _model_jobs(args.model, args.block_size)
    else:
        jobs = [_Job(k, b, n, "") for k in args.kernel for b in bs for n in counts]
    timer: Timer = cuda_timer if on_gpu else (lambda fn, cfg=None: cpu_timer(fn, cfg, reps=1))
    timer_name = (
        "triton.testing.do_bench median"
        if on_gpu
        else "CPU perf_counter under TRITON_INTERPRET (MEANINGLESS)"
    )
    tuner = Tuner(mode="force", timer=timer, disk_cache=not args.no_cache, read_cache=False)
    copy_gbps = _copy_gbps(device, timer, 1 << (20 if smoke else 26))
    vers = versions()
    gpu = device_name(device)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(
        f"device: {gpu} | triton {vers['triton']} | torch {vers['torch']} | mbf_triton {vers['mbf_triton']}"
    )
    print(
        f"timer: {timer_name}; copy bandwidth {'(torch copy on CPU) ' if not on_gpu else ''}"
        f"{copy_gbps:.1f} GB/s"
    )
    if not on_gpu:
        print("NOTE: CPU smoke run: the timings below say nothing about a GPU.")

    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, object]] = []
    summary: list[dict[str, object]] = []
    t_start = time.perf_counter()
    skipped: list[_Job] = []
    for job in tqdm(jobs, desc="tune", unit="shape", file=sys.stderr, disable=None):
        if args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s:
            skipped.append(job)
            continue
        tuner.chosen.clear()  # every shape is timed, even when it shares a key with the previous one
        if job.kernel == "block_update":
            targs, kw, nbytes, n_blocks, shape = _build_block_update(job, dtype, device, gen)
            tuner.block_update_config(*targs, **kw)
        elif job.kernel == "linear_stats":
            targs, kw, nbytes, n_blocks, shape = _build_linear(job, dtype, device, gen, samples)
            tuner.linear_stats_config(*targs, **kw)
        else:
            targs, kw, nbytes, n_blocks, shape = _build_conv(job, dtype, device, gen, samples, positions)
            tuner.conv_stats_config(*targs, **kw)
        choice = tuner.chosen[tuner.last_key]
        heuristic = choice.trials[0].config if choice.trials else choice.config
        if choice.config == heuristic or choice.heuristic_ms is None:
            confirmed = (choice.heuristic_ms, choice.ms)  # the same config, or no heuristic timing to confirm
        else:
            try:
                confirmed = confirm(timer, tuner.last_run, choice.config, heuristic)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, keep the sweep going
                print(f"could not time {job.kernel} b={job.b} again: {type(e).__name__}: {e}"[:300])
                confirmed = (None, None)
        shape_rows = []
        for t in choice.trials:
            gbps = None if t.ms is None else nbytes / (t.ms * 1e-3) / 1e9
            shape_rows.append(
                {
                    "kernel": job.kernel,
                    "b": job.b,
                    "n_blocks": n_blocks,
                    "dtype": args.dtype,
                    "shape": shape,
                    "layers": job.label,
                    "config": describe(t.config),
                    "status": t.status,
                    "ms": t.ms,
                    "gbps": gbps,
                    "pct_copy": None if gbps is None else 100 * gbps / copy_gbps,
                    "n_regs": t.n_regs,
                    "n_spills": t.n_spills,
                    "best": t.config == choice.config and choice.source == "tuned",
                    "heuristic": t.config == heuristic,
                    "source": choice.source,
                    "device": gpu,
                    "triton": vers["triton"],
                    "torch": vers["torch"],
                    "mbf_triton": vers["mbf_triton"],
                    "timer": timer_name,
                    "date": stamp,
                }
            )
        rows.extend(shape_rows)
        _print_shape(job, n_blocks, shape, args.dtype, choice, shape_rows, args.top)
        best_gbps = None if choice.ms is None else nbytes / (choice.ms * 1e-3) / 1e9
        heur_gbps = None if choice.heuristic_ms is None else nbytes / (choice.heuristic_ms * 1e-3) / 1e9
        summary.append(
            {
                "label": f"{job.kernel}\nb={job.b} n={n_blocks}",
                "best": best_gbps,
                "heuristic": heur_gbps,
                "kernel": job.kernel,
                "b": job.b,
                "n_blocks": n_blocks,
                "config": describe(choice.config),
                "ms": choice.ms,
                "heuristic_ms": choice.heuristic_ms,
                "confirm_heuristic_ms": confirmed[0],
                "confirm_tuned_ms": confirmed[1],
                "source": choice.source,
            }
        )
        _write_csvs(Path(args.out), rows, summary, gpu, vers, stamp)

    print("\nsummary" + (" (CPU smoke: meaningless timings)" if not on_gpu else ""))
    print("sweep ms: the best of the sweep; heur./tuned ms: both configs timed again after the sweep, "
          "alternating, median of 3 (the verdict uses these)")
    print(
        f"{'kernel':<13} {'b':>3} {'blocks':>9} {'best config':<28} {'sweep ms':>9} {'heur. ms':>9} "
        f"{'tuned ms':>9} {'speedup':>8} {'tuned<=heur':>11}"
    )
    for s in summary:
        hms, tms = s["confirm_heuristic_ms"], s["confirm_tuned_ms"]
        ok = "" if tms is None or hms is None else ("yes" if tms <= hms else "NO")
        speed = "" if tms is None or hms is None else f"{hms / tms:.2f}x"
        print(
            f"{s['kernel']:<13} {s['b']:>3} {s['n_blocks']:>9} {s['config']:<28} {_fmt(s['ms']):>9} "
            f"{_fmt(hms):>9} {_fmt(tms):>9} {speed:>8} {ok:>11}"
        )

    if skipped:
        print(f"time budget of {args.time_budget_s:g} s spent: {len(skipped)} shape(s) not tuned: "
              + ", ".join(f"{j.kernel} b={j.b} n={j.n_blocks}" for j in skipped))

    csv_path, summary_path = _write_csvs(Path(args.out), rows, summary, gpu, vers, stamp)
    out = Path(args.out)
    png_path = out / "autotune.png"
    _plot(summary, copy_gbps, png_path, f"{gpu} ({timer_name})")
    print(f"\nwrote {csv_path}, {summary_path} and {png_path}")
    if not args.no_cache and tuner._disk:
        print("cache: " + ", ".join(str(c.path) for c, _ in tuner._disk.values()))
    return 0


def _write_csvs(out: Path, rows: list[dict], summary: list[dict], gpu: str, vers: dict, stamp: str):
    """All trials (``autotune.csv``) and one line per shape (``autotune_summary.csv``); rewritten after every
    shape, so that a sweep stopped part-way keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "autotune_summary.csv"
    with open(summary_path, "w", newline="") as fh:
        fields = ["kernel", "b", "n_blocks", "config", "source", "ms", "heuristic_ms", "confirm_heuristic_ms",
                  "confirm_tuned_ms"]
        writer = csv.DictWriter(fh, fieldnames=fields + ["device", "triton", "torch", "mbf_triton", "date"])
        writer.writeheader()
        for row in summary:
            writer.writerow({**{k: row[k] for k in fields}, "device": gpu, "triton": vers["triton"],
                             "torch": vers["torch"], "mbf_triton": vers["mbf_triton"], "date": stamp})
    csv_path = out / "autotune.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, summary_path


def _fmt(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.4f}"


def _print_shape(
    job: _Job, n_blocks: int, shape: str, dtype: str, choice: Choice, rows: list[dict], top: int
) -> None:
    label = f" [{job.label}]" if job.label else ""
    print(
        f"\n{job.kernel} b={job.b} blocks={n_blocks} ({shape}) {dtype}{label}: {choice.source} "
        f"{describe(choice.config)}"
    )
    print(f"  {'config':<28} {'ms':>9} {'GB/s':>8} {'%copy':>6}  {'status':<10} mark")
    timed = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
    shown = timed[:top] + [r for r in timed[top:] if r["heuristic"]]
    for r in shown + [r for r in rows if r["ms"] is None]:
        mark = " ".join(m for m, on in (("best", r["best"]), ("heuristic", r["heuristic"])) if on)
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.1f}"
        pct = "" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}"
        print(f"  {r['config']:<28} {_fmt(r['ms']):>9} {gbps:>8} {pct:>6}  {r['status'][:40]:<10} {mark}")
    if len(timed) > len(shown):
        print(f"  ... {len(timed) - len(shown)} more in the CSV")


def _plot(summary: list[dict], copy_gbps: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(summary) + 2), 4.5))
    xs = list(range(len(summary)))
    ax.bar([x - 0.2 for x in xs], [s["heuristic"] or 0.0 for s in summary], width=0.4, label="heuristic")
    ax.bar([x + 0.2 for x in xs], [s["best"] or 0.0 for s in summary], width=0.4, label="tuned")
    ax.axhline(copy_gbps, color="k", linestyle="--", linewidth=1, label="device copy")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in summary], fontsize=7)
    ax.set_ylabel("GB/s (all bytes read and written)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
