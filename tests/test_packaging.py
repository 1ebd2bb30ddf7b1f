"""The wheel a user installs: built offline from a copy of the sources, it holds the Triton kernels, the
command line, the LICENSE and the declared dependencies (no test may need the network)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mbf_triton", "kernels")


def _backend_missing() -> str | None:
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (the build backend) is not installed"
    import setuptools

    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} needs the 'wheel' package to build wheels"
    return None


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory) -> Path:
    missing = _backend_missing()
    if missing:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to the sources
        path = ROOT / name
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy(path, src / name))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("mbf_triton-*.whl")
    return wheel


def test_wheel_holds_kernels_cli_and_license(wheel_file: Path) -> None:
    names = set(zipfile.ZipFile(wheel_file).namelist())
    for module in ("kernels/block_update.py", "kernels/fisher_stats.py", "kernels/__init__.py", "optimizer.py",
                   "reference.py", "summary.py", "cli/__init__.py", "cli/demo.py", "cli/tune.py",
                   "tuning/tuner.py", "__main__.py"):
        assert f"mbf_triton/{module}" in names, module
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), sorted(names)
    assert not any(n.startswith(("tests/", "perf/")) for n in names)


def test_wheel_metadata_declares_dependencies_and_console_script(wheel_file: Path) -> None:
    with zipfile.ZipFile(wheel_file) as zf:
        info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        license_text = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("LICENSE"))
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch>=") for r in core) and any(r.startswith("triton>=") for r in core)
    assert any(r.startswith("tqdm") for r in core)  # `tune` needs it after a plain install
    assert any("matplotlib" in r and "extra == \"demo\"" in r for r in requires)
    assert "mbf-triton = mbf_triton.cli:main" in entry_points
    assert "MIT License" in license_text
