"""The benchmark scripts run end to end in their CPU smoke mode (tiny sizes, Triton interpreter).

Checks plumbing only (CSV with the environment columns, plots, exit status); the numbers mean nothing.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
ENV_COLUMNS = ("date", "device", "torch", "triton", "mbf_triton", "linalg", "mode")

pytest.importorskip("matplotlib")


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(PERF / script), "--smoke", "--no-progress", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # a safety net only


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, f"{path} has no rows"
    for r in rows:
        for col in ENV_COLUMNS:
            assert r.get(col), f"{path}: column {col!r} missing or empty in {r}"
        assert r["mode"] == "smoke"
    return rows


@pytest.mark.parametrize(
    "script, csv_name, png_name",
    [("bench_solve.py", "solve.csv", "solve_speedup.png"), ("bench_step.py", "step.csv", "step_time.png")],
)
def test_benchmark_smoke(tmp_path: Path, script: str, csv_name: str, png_name: str) -> None:
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path / csv_name)
    assert (tmp_path / png_name).stat().st_size > 0
    if script == "bench_solve.py":
        assert all(float(r["triton_err"]) < 1e-3 for r in rows)
        assert all(float(r["triton_ms"]) > 0 for r in rows)
    else:
        assert {r["model"] for r in rows} == {"resnet32", "vgg16", "autoencoder"}
        assert any(r["optimizer"].startswith("adam") for r in rows)


def test_cpu_step_bench_runs_a_fixed_small_amount_of_work() -> None:
    """perf/bench_cpu.py prints a row per (task, optimizer) and a verdict per target; one round of one
    window of each configuration (the verdict itself depends on the machine and is not checked here)."""
    proc = subprocess.run([sys.executable, str(PERF / "bench_cpu.py"), "--rounds", "1", "--warmup", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [re.match(r"(autoencoder|cnn)\s+(adam|mbf stat|mbf paper|mbf)\s+([\d.]+)\s+([\d.]+)", line)
            for line in proc.stdout.splitlines() if line.startswith(("autoencoder ", "cnn "))]
    assert [(m.group(1), m.group(2)) for m in rows] == [
        (t, o) for t in ("autoencoder", "cnn") for o in ("adam", "mbf", "mbf paper", "mbf stat")]
    assert all(float(m.group(3)) > 0 for m in rows)
    assert "targets" in proc.stdout and "load average" in proc.stdout


def test_help() -> None:
    for script in ("bench_solve.py", "bench_step.py"):
        proc = subprocess.run([sys.executable, str(PERF / script), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "--smoke" in proc.stdout


def test_host_overhead_counts_launches_and_times_the_step() -> None:
    """perf/host_overhead.py: the stubbed-kernel host measurement runs on the CPU and counts what a
    step launches (the fused update of the autoencoder's weights and biases: 2 grouped launches, and the
    grafting's directions: 2 more)."""
    proc = subprocess.run([sys.executable, str(PERF / "host_overhead.py"), "--models", "autoencoder", "--steps",
                           "2"], cwd=PERF, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| autoencoder")]
    assert len(rows) == 2
    (no_stats, stats) = rows
    # weights (b=16) and biases (b=1): 2 update launches, and 2 more for the directions that the default
    # per-block Adam grafting takes norms of (grouped like the update)
    assert float(no_stats[3]) > 0 and int(no_stats[4]) == 4
    assert int(stats[4]) > int(no_stats[4])  # plus the statistics kernels
