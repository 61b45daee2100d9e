"""Declare what we import and import what we declare: every third-party module that moeshard's own code imports
belongs to a distribution named in pyproject.toml's dependencies (the tests' own, in the dev extra), so a fresh
`pip install -e ".[dev]"` can never miss one (it did once: msgpack came in only through the developer's venv)."""
from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CODE = ("coordinator", "worker", "protos", "offload_core", "benchmarks", "moeshard")


# Developer tools inside the package folders: what they import is declared in the dev extra.
DEV_TOOLS = ("protos/generate.py",)


@functools.cache
def _imports_of(path: Path) -> tuple[str, ...]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return tuple(names)


def top_level_imports(folders) -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in folders:
        paths = [ROOT / folder] if folder.endswith(".py") else (ROOT / folder).rglob("*.py")
        for path in paths:
            if folder in CODE and str(path.relative_to(ROOT)) in DEV_TOOLS:
                continue
            for name in _imports_of(path):
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "moeshard":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared(requirements) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's metadata: once


def distributions_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _installed().get(module, [])}


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# Modules of optional extras that may be absent here (CI installs only the dev extra): their distributions
NOT_INSTALLED_HERE = {"llama_cpp": {"llama-cpp-python"}}


def test_every_module_the_code_imports_is_a_declared_dependency(project):
    extras = project["optional-dependencies"]
    deps = (declared(project["dependencies"]) | declared(extras["bench"]) | declared(extras["llamacpp"])
            | declared(extras["structured"]))
    missing = {m: where for m, where in top_level_imports(CODE).items()
               if not (distributions_of(m) or NOT_INSTALLED_HERE.get(m, set())) & deps}
    assert not missing, f"imported but not declared in pyproject.toml (module: first file): {missing}"


def test_every_module_the_tests_import_is_declared_for_development(project):
    deps = (declared(project["dependencies"]) | declared(project["optional-dependencies"]["dev"]))
    missing = {m: where for m, where in top_level_imports(["tests", *DEV_TOOLS]).items() if not distributions_of(m) & deps}
    assert not missing, f"tests import modules the dev extra does not declare: {missing}"


def test_every_declared_dependency_is_imported(project):
    imported = set().union(*(distributions_of(m) for m in top_level_imports(CODE)))
    unused = declared(project["dependencies"]) - imported
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
