"""The :class:`Tuner`: picks, records and caches one launch config per kernel key.

For every distinct key (:mod:`.configs`) met by the optimizer it times candidate configurations once
(first step), keeps the fastest, records it in ``Tuner.chosen`` and in the disk cache (:mod:`.cache`);
later steps, and later runs on the same GPU with the same triton and mbf_triton versions, reuse it.

* Candidates whose compiled kernel spills registers (``n_spills``, when the installed triton exposes it) or
  fails to compile/launch are pruned before they are timed.
* Trials run on scratch copies of everything the kernel writes (``Problem.scratch``): tuning never
  changes the optimizer's state.
* Timing: ``triton.testing.do_bench(..., return_mode="median")`` on CUDA; any ``timer(fn, config) -> ms``
  can be injected (tests use a fake one).
* Off switch: ``MBF_TRITON_AUTOTUNE=0`` or :func:`~.environment.set_enabled` gives the heuristic configs.
  Under ``TRITON_INTERPRET=1``, on CPU tensors, or while pytest runs a test (one fixed config keeps tests
  reproducible), the heuristic is used too, without timing.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import environment as env
from .cache import AutotuneCacheWarning, DiskCache, cache_header, cache_path
from .configs import (
    BlockUpdateConfig,
    Problem,
    block_update_problem,
    config_from_dict,
    config_to_dict,
    conv_stats_problem,
    describe,
    linear_stats_problem,
)

Timer = Callable[[Callable[[], object], object], float]  # timer(fn, config) -> milliseconds


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


class Tuner:
    """Picks, records and caches one launch config per kernel key.

    ``mode``: ``"auto"`` (tune CUDA launches, heuristic under the interpreter / on CPU / under pytest),
    ``"off"`` (always the heuristic), ``"force"`` (tune wherever the kernels run, the interpreter included:
    for tests and the smoke CLI); ``None`` follows :func:`~.environment.set_enabled` / ``MBF_TRITON_AUTOTUNE``.
    ``timer(fn, config) -> ms``: default :func:`cuda_timer` on CUDA, :func:`cpu_timer` elsewhere.
    ``disk_cache``: use the JSON cache (directory ``cache_directory``, default :func:`~.cache.cache_dir`);
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
        if mode is not None and mode not in env.MODES:
            raise ValueError(f"mode={mode!r} must be one of {env.MODES} or None")
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
        override = env.enabled_override()
        if override is not None:
            return "auto" if override else "off"
        if not env.is_enabled():
            return "off"
        if "PYTEST_CURRENT_TEST" in os.environ:
            return "off"
        return "auto"

    def _cache_for(self, device: torch.device) -> tuple[DiskCache, dict[str, dict]]:
        gpu = env.device_name(device)
        if gpu not in self._disk:
            cache = DiskCache(cache_path(gpu, self.cache_directory), cache_header(gpu))
            self._disk[gpu] = (cache, cache.load())
        return self._disk[gpu]

    def cache_files(self) -> list[Path]:
        """The cache files this tuner has read or written."""
        return [c.path for c, _ in self._disk.values()]

    def _timer_for(self, device: torch.device) -> Timer:
        if self.timer is not None:
            return self.timer
        return cuda_timer if device.type == "cuda" and not env.interpreted() else cpu_timer

    # -- the one entry point ----------------------------------------------------------------------
    def config(self, problem: Problem) -> object:
        """The launch config of one kernel call: reused after the first step, else :meth:`select` with trial
        launches on the problem's scratch copies (made once, on the first trial)."""
        choice = self.chosen.get(problem.key)
        if choice is not None and choice.source != "heuristic" and self.resolved_mode() != "off":
            self.layers[problem.layer] = problem.key  # the fast path after the first step
            self.last_key = problem.key
            return choice.config
        scratch: list[tuple] = []

        def run(cfg: object) -> object:
            if not scratch:
                scratch.append(problem.scratch())
            return problem.launch(scratch[0], cfg)

        self.last_run = run  # the sweep CLI times the winner and the heuristic again with it
        return self.select(problem.kernel, problem.key, problem.layer, problem.device, problem.heuristic(),
                           problem.candidates, run, problem.n_phases).config

    def block_update_config(self, *args, **kwargs) -> BlockUpdateConfig:
        """:meth:`config` of a ``damped_block_update_`` call (arguments as :func:`.configs.block_update_problem`)."""
        return self.config(block_update_problem(*args, **kwargs))

    def linear_stats_config(self, *args, **kwargs) -> object:
        """:meth:`config` of a ``linear_fisher_ema_`` call (arguments as :func:`.configs.linear_stats_problem`)."""
        return self.config(linear_stats_problem(*args, **kwargs))

    def conv_stats_config(self, *args, **kwargs) -> object:
        """:meth:`config` of a ``conv_fisher_ema_`` call (arguments as :func:`.configs.conv_stats_problem`)."""
        return self.config(conv_stats_problem(*args, **kwargs))

    # -- selection and timing ---------------------------------------------------------------------
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
        if mode == "auto" and (device.type != "cuda" or env.interpreted()):
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
            self._remember(device, key, choice)
        return choice

    def _remember(self, device: torch.device, key: str, choice: Choice) -> None:
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
            warnings.warn(f"could not write the autotune cache {cache.path}: {e}", AutotuneCacheWarning,
                          stacklevel=3)

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
