"""The import rules of the layout, read from the source (every import, at the top of a file or inside a function):
the engine (`offload_core`) knows nothing of the programs or the network; the coordinator does not import the
worker (what they share is the wire, `protos`); no module imports itself back through others."""
from __future__ import annotations

import ast
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


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


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
    assert not _cycles(edges)
    # the check itself finds a cycle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
