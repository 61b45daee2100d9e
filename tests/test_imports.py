"""The import rules of the layout, read from the source (every import, at the top of a file or inside a function):
the engine (`offload_core`) knows nothing of the programs or the network; the coordinator does not import the
worker (what they share is the wire, `protos`); no module imports itself back through others."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offload_core", "coordinator", "worker", "protos", "benchmarks", "moeshard")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names relative to the repository's top folders (`moeshard.x` is
    `x`); for `from a import b`, both `a` and `a.b` (b may be a module)."""
    module = _module(path).split(".")
    package = module if path.name == "__init__.py" else module[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return {n.removeprefix("moeshard.") for n in out}


def _graph() -> dict[str, set[str]]:
    files = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py") if not f.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    graph = {_module(f): _imports(f) for f in files}
    assert len(graph) > 50, "the walk found too few modules: is ROOT the repository?"
    return graph


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None: the standard library's topological
    sort finds it."""
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


@pytest.mark.parametrize("importer, forbidden", [
    ("offload_core", ("coordinator", "worker", "grpc", "fastapi", "uvicorn")),
    ("coordinator", ("worker",)),
    ("worker", ("coordinator",)),
    ("protos", ("coordinator", "worker")),
])
def test_layers_import_only_downwards(importer, forbidden):
    broken = sorted(f"{m} imports {n}" for m, names in _graph().items() if m.split(".")[0] == importer
                    for n in names if n.split(".")[0] in forbidden)
    assert not broken, broken


def test_no_import_cycles():
    graph = _graph()
    edges = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    assert _cycle(edges) is None, _cycle(edges)
    # the check itself finds a cycle where there is one
    found = _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found is not None and set(found) == {"a", "b", "c"}
