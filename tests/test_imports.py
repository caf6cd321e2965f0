"""Calibration and evaluation share blindsight.prompts and import neither each other nor in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calibration", "evaluation")


def _modules() -> list[str]:
    names = ["blindsight.prompts"]
    for pkg in PACKAGES:
        for f in sorted((ROOT / "blindsight" / pkg).glob("*.py")):
            names.append(f"blindsight.{pkg}" if f.stem == "__init__" else f"blindsight.{pkg}.{f.stem}")
    return names


def _file(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere (lazy imports in functions included)."""
    out = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    return out - {module}


def test_no_import_cycle_and_no_reaching_across():
    known = set(_modules())
    graph = {m: _imports(m, known) for m in known}
    for m, deps in graph.items():
        for pkg, other in (("calibration", "evaluation"), ("evaluation", "calibration")):
            if m.startswith(f"blindsight.{pkg}"):
                assert not any(d.startswith(f"blindsight.{other}") for d in deps), (m, deps)
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_every_module_imports_in_a_fresh_process_in_both_orders():
    modules = _modules()
    for order in (modules, modules[::-1]):
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
