"""The package's structure: every module sits in one layer, imports point only down (or sideways within a
layer, without cycles), and no module grows past about 600 lines.

kernels <- tuning <- backends <- optimizer <- applications (demo, experiments, cli) <- the package root.
Every ``import`` statement counts, at module level or inside a function: a function-level import hides a
cycle at import time but not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600

# layer rank by module name prefix (the longest matching prefix wins); a new module must be placed here
LAYERS = {
    "mbf_triton.kernels": 0,
    "mbf_triton._version": 0,
    "mbf_triton.blocks": 0,
    "mbf_triton.tuning": 1,
    "mbf_triton.reference": 2,
    "mbf_triton.backends": 2,
    "mbf_triton.capture": 3,
    "mbf_triton.hyperparameters": 0,
    "mbf_triton.statistics": 3,
    "mbf_triton.skipflag": 3,
    "mbf_triton.optimizer": 3,
    "mbf_triton.stepsize": 3,
    "mbf_triton.summary": 3,
    "mbf_triton.distributed": 3,  # the optimizer's data parallelism (imports blocks and reference)
    "mbf_triton.experiments": 4,
    "mbf_triton.cli": 4,
    "mbf_triton.__main__": 5,
    "mbf_triton": 5,  # the package root re-exports the public API
}


def _modules() -> dict[str, Path]:
    """Module name -> file, as installed (``kernels/`` is ``mbf_triton.kernels``)."""
    out = {}
    for top, package in ((ROOT / "mbf_triton", "mbf_triton"), (ROOT / "kernels", "mbf_triton.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> str:
    path = MODULES[name]
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _resolve(name: str, target: str) -> str | None:
    """The project module ``target`` names (or the closest package above it), None outside the project."""
    while target and target not in MODULES:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def imports_of(name: str) -> set[str]:
    """The project modules that ``name`` imports anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name)
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the submodule where one exists, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            resolved = _resolve(name, t)
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


def rank(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        pytest.fail(f"module {name} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return LAYERS[prefix]


def test_the_walker_sees_the_known_imports():
    assert "mbf_triton.tuning.tuner" in imports_of("mbf_triton.backends") or \
        "mbf_triton.tuning" in imports_of("mbf_triton.backends")
    assert "mbf_triton.kernels.block_update" in imports_of("mbf_triton.tuning.configs")  # inside a function
    assert "mbf_triton.kernels._common" in imports_of("mbf_triton.kernels.block_update")
    assert "mbf_triton.optimizer" in imports_of("mbf_triton.experiments")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    mine = rank(name)
    up = sorted(t for t in imports_of(name) if rank(t) > mine)
    assert not up, f"{name} (layer {mine}) imports from higher layers: {up}"


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == _package_of(node) or node.startswith(nxt + "."):
                continue  # a module importing its own package's __init__ names is its parent, not a cycle
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): give its jobs rooms of their own"
