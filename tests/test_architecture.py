"""The package's architecture: layers import only downwards (cli > theory > integrations > study >
run > data > engine), no import cycle anywhere (imports inside functions included), and no module
over 400 lines. The contracts live in pyproject.toml and are checked by ``lint-imports``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hybridft"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts, on the ``hybridft`` package found in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package whose ``module`` (a path under hybridft/) ends with ``line``; its src dir."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "hybridft", ignore=shutil.ignore_patterns("__pycache__"))
    path = src / "hybridft" / module
    path.write_text(path.read_text() + "\n\n" + line + "\n")
    return src


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import cycle a depth-first search meets (one per back edge)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the path, then "done"

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == "open":
                found.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [])
    return found


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers_contract(tmp_path):
    src = copy_with(tmp_path, "engine/zo.py", "def _upward():\n    from hybridft.run import config")
    result = lint_imports(src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "each layer imports only from the layers below it BROKEN" in result.stdout
    assert "hybridft.engine.zo -> hybridft.run.config" in result.stdout


def test_a_cycle_between_sibling_modules_breaks_the_acyclic_contract(tmp_path):
    src = copy_with(tmp_path, "study/grid.py", "def _back():\n    from hybridft.study import bench")
    result = lint_imports(src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no import cycle among the modules of a package BROKEN" in result.stdout


def test_the_import_graph_has_no_cycle_counting_imports_inside_functions():
    graph = grimp.build_graph("hybridft", exclude_type_checking_imports=True, cache_dir=None)
    # imported only inside a function: the graph holds it
    assert graph.direct_import_exists(importer="hybridft.theory.reproduce", imported="hybridft.theory.command")
    assert cycles(graph) == []


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}


@pytest.mark.parametrize("graph_edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
])
def test_cycles_finds_a_cycle_and_only_a_cycle(graph_edges, expected):
    graph = grimp.ImportGraph()
    for importer, imported in graph_edges.items():
        graph.add_module(importer)
        for other in imported:
            graph.add_import(importer=importer, imported=other)
    assert cycles(graph) == expected
