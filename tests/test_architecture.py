"""The package's shape, checked by walking its source with `ast`: no import cycles between detsweep
modules (module-level or inside functions), ray only in `detsweep/cluster/`, and `detsweep/sweep/`
importable without torch or ray."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "detsweep"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, anywhere in the file (module level, functions, TYPE_CHECKING aside)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are annotations, never executed
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            # A module depends on the deepest detsweep module its import names, not on the package
            # `__init__` it passes through (that would make every subpackage a cycle with itself).
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                deps.add(imported)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_detsweep_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    """The check above can fail: a two-module loop and a three-module loop are both found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_ray_is_imported_only_in_the_cluster_package():
    offenders = sorted(
        str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "cluster")
        and any(n == "ray" or n.startswith("ray.") for n in _imports(path)))
    assert offenders == []


@pytest.mark.parametrize("module", ["detsweep.sweep", "detsweep.sweep.plan", "detsweep.sweep.resume",
                                    "detsweep.models.registry", "detsweep.checkpoint", "detsweep.results",
                                    "detsweep.run"])
def test_the_sweep_package_and_the_cli_import_neither_torch_nor_ray(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
