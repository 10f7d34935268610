"""Architecture rules, checked on the source: layers import one way, one install name, small modules.

nuance.orchestration -> nuance.trainers -> nuance.data: a layer imports itself and the layers below it,
never one above, at module level or inside a function. The repo's folders are installed under one
import package, `nuance`, so no code imports them by their bare folder names.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("orchestration", "trainers", "data")  # top to bottom
BARE_NAMES = {*LAYERS, "recipes"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _layer_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "nuance":  # `from nuance import data`
                found += [(node.lineno, f"nuance.{alias.name}") for alias in node.names]
    return found


def test_layers_import_one_way() -> None:
    wrong = []
    for path in _layer_files():
        layer = path.relative_to(REPO).parts[0]
        allowed = set(LAYERS[LAYERS.index(layer) :]) | {"recipes"}
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "nuance" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {module}")
    assert not wrong, "imports against orchestration -> trainers -> data:\n" + "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a function-local upward import is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nuance.orchestration.schema import Recipe\n")
    assert (2, "nuance.orchestration.schema") in _imports(probe)


def test_no_code_imports_the_bare_folder_names() -> None:
    files = [*_layer_files(), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    bare = [
        f"{path.relative_to(REPO)}:{line}: import {module}"
        for path in files
        for line, module in _imports(path)
        if module.split(".")[0] in BARE_NAMES
    ]
    assert not bare, "\n".join(bare)


def test_pyproject_installs_every_layer_folder_under_nuance() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(("nuance", *p.relative_to(REPO).parts))
        for top in (*LAYERS, "recipes")
        for p in [REPO / top, *(REPO / top).rglob("*")]
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py")) | any(p.glob("*.yaml"))
    }
    assert folders == set(setuptools["packages"])
    assert setuptools["package-dir"] == {f"nuance.{top}": top for top in (*LAYERS, "recipes")}


@pytest.mark.parametrize("path", _layer_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_small(path: Path) -> None:
    text = path.read_text()
    num_lines = text.count("\n")
    assert num_lines <= MAX_MODULE_LINES, f"{path.name} has {num_lines} lines: split it along its seams"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, ", ".join(long)
