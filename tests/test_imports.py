"""The whole package against a declared layer order: no module imports from a
higher layer or from a sibling of its own layer, no import circle (imports
inside functions count), and every module imports in a fresh process in either
order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blindsight"

#: lowest first. A module belongs to the unit that is the longest prefix of its
#: name; it may import its own unit and the units of lower layers, never a unit
#: beside it in its layer or one above. Data flows models -> passes -> compiler
#: -> runtime; the commands over them sit on top.
LAYERS: list[tuple[str, ...]] = [
    ("blindsight", "blindsight.errors"),
    ("blindsight.staging", "blindsight.tables", "blindsight.records", "blindsight.configs"),
    ("blindsight.attention",),
    ("blindsight.families", "blindsight.profile", "blindsight.prompts"),
    ("blindsight.flops", "blindsight.vision_inputs", "blindsight.native", "blindsight.passes"),
    ("blindsight.models", "blindsight.compiler"),
    ("blindsight.runtime",),
    ("blindsight.calibration", "blindsight.evaluation", "blindsight.bench", "blindsight.serve"),
    ("blindsight.demo",),  # bs-demo, over all of the above
    # the console scripts: each names its command's module (imported by name, in run_cli)
    ("blindsight.entry",),
    ("blindsight.serve.__main__",),  # python -m blindsight.serve, through entry's guard
]

#: circles left to the owner of the code: each names its modules; one that is
#: gone must be taken off this list
KNOWN_CIRCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere (lazy imports in functions included)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != module:
                out.add(t)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _unit(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit that is a prefix of its name."""
    best = None
    for i, units in enumerate(LAYERS):
        for u in units:
            if (module == u or module.startswith(u + ".")) and (best is None or len(u) > len(best[1])):
                best = (i, u)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_import_goes_down_the_layers():
    bad = []
    for m, deps in sorted(GRAPH.items()):
        layer, unit = _unit(m)
        for d in sorted(deps):
            dl, du = _unit(d)
            if du != unit and dl >= layer:
                where = "beside it" if dl == layer else "above it"
                bad.append(f"{m} ({unit}) imports {d} ({du}, {where})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def _circles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    return out


def test_no_import_circle():
    circles = _circles()
    new = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not gone, f"no longer circles, take them off KNOWN_CIRCLES: {gone}"


def test_the_layer_checks_see_lazy_and_relative_imports():
    # families' tiny builders and find_spans once imported upwards inside functions
    assert "blindsight.configs" in GRAPH["blindsight.families"]
    assert "blindsight.families" not in GRAPH["blindsight.attention.spans"]
    assert "blindsight.native" in GRAPH["blindsight.compiler.genai"]  # a lazy import in compile_genai_folder
    assert GRAPH["blindsight.passes.lowering.fast"] >= {"blindsight.passes.lowering.fast.plan"}


def test_every_module_imports_in_a_fresh_process_in_both_orders():
    # a __main__ runs its command when imported
    modules = [m for m in MODULES if not m.endswith(".__main__")]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for order in (modules, modules[::-1]):
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
