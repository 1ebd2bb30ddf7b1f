"""Shared pieces of the benchmarks: the environment record, the timer, the copy-bandwidth probe, CSV output.

Run the benchmarks as scripts from the repository root (``python perf/bench_solve.py --help``). Nothing
here imports triton at module level: a smoke run must set ``TRITON_INTERPRET=1`` (see
:func:`use_interpreter_for_smoke`) before the first triton import.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
H100_L2_BYTES = 50 * 1024**2  # fallback when the device does not report its L2 size

ENV_COLUMNS = (
    "date", "device", "torch", "cuda", "triton", "mbf_triton", "linalg", "python", "git", "mode", "interpret",
)


def use_interpreter_for_smoke(smoke: bool) -> None:
    """In smoke mode without a GPU, run Triton kernels in its CPU interpreter.

    Must be called before anything imports triton; an explicit ``TRITON_INTERPRET`` from the caller wins.
    """
    if smoke and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def limit_cpu_threads(smoke: bool) -> None:
    """Smoke runs use one intra-op thread: on a shared CI runner, torch's spinning thread pool makes tiny
    ops hundreds of times slower under contention. Full runs keep torch's default."""
    if smoke:
        torch.set_num_threads(1)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def start(smoke: bool) -> torch.device:
    """The benchmarks' common start: the interpreter for smoke runs without a GPU, the thread limit, and
    the device (:func:`use_interpreter_for_smoke`, :func:`limit_cpu_threads`, :func:`pick_device`)."""
    use_interpreter_for_smoke(smoke)
    limit_cpu_threads(smoke)
    return pick_device(smoke)


def pick_device(smoke: bool) -> torch.device:
    """CUDA for full runs (required), the CPU for smoke runs unless a GPU is present and not interpreted."""
    if torch.cuda.is_available() and not interpreted():
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("full mode needs a CUDA GPU (and TRITON_INTERPRET unset); use --smoke on a CPU")
    return torch.device("cpu")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (Triton interpreter): checks the script end to end, "
                             "measures nothing meaningful")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory for CSV, plots and logs (default: perf/out/)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ---------------------------------------------------------------------------------------------- versions
def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "absent"
    return str(getattr(mod, "__version__", "unknown"))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = ""
    try:
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        dirty = "+dirty" if st.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return out.stdout.strip() + dirty if out.returncode == 0 else "unknown"


def linalg_library(device: torch.device) -> str:
    """The batched-linalg library torch uses for ``device``, as recorded in the CSV."""
    if device.type != "cuda":
        return "cpu-lapack"
    pref = str(torch.backends.cuda.preferred_linalg_library()).split(".")[-1]
    # "Default" is torch's heuristic: cuSOLVER/cuBLAS batched kernels for small batched matrices on
    # recent versions, MAGMA for some sizes; the exact choice is version dependent (KERNEL_NOTES).
    return f"{pref}(torch heuristic)" if pref.lower() == "default" else pref


def environment(device: torch.device, mode: str) -> dict[str, str]:
    """One record of where and with what the numbers were measured; goes into every CSV row."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "mbf_triton": _version("mbf_triton"),
        "linalg": linalg_library(device),
        "python": platform.python_version(),
        "git": _git_commit(),
        "mode": mode,
        "interpret": "1" if interpreted() else "0",
    }


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or H100_L2_BYTES)
    return H100_L2_BYTES


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return 4 * 1024**3  # smoke runs are tiny; a nominal CPU budget


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100,
             cpu_repeats: int = 3) -> float:
    """Median milliseconds of one call of ``fn``.

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events around each call, warm-up
    excluded). CPU: median of ``cpu_repeats`` ``perf_counter`` timings after one warm-up call.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, cpu_repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy rate: bytes read + written by ``dst.copy_(src)`` over its median time (GB/s)."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 32 << 20
        nbytes = min(nbytes, free_bytes(device) // 4)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=200, cpu_repeats=5)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------- output
def write_csv(path: Path, rows: Sequence[dict[str, Any]], env: dict[str, str]) -> Path:
    """Rows prefixed with the environment columns; the column set is the union over rows, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = list(ENV_COLUMNS)
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **{k: _fmt(v) for k, v in r.items()}})
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width text table (also valid Markdown)."""
    cells = [[str(h) for h in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def env_banner(env: dict[str, str]) -> str:
    return " | ".join(f"{k}={env[k]}" for k in ENV_COLUMNS)


def progress(iterable: Iterable[Any], *, total: int | None = None, desc: str = "", disable: bool = False):
    """tqdm when available and wanted, else the iterable itself."""
    if disable:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


def save_figure(fig, path, env: dict):
    """Title a benchmark figure with the environment (and the smoke warning), save it and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}"
                 + (" | SMOKE (not performance)" if env["mode"] == "smoke" else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
