"""The package's shape: imports point one way, and the run's flow goes through one seam."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> the ``pipeline`` modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("pipeline"):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        graph[name] = found
    return graph


def test_no_import_cycle_in_the_package() -> None:
    graph = _imports()
    known = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {t for t in map(resolve, deps) if t and t != m} for m, deps in graph.items()}
    # A package imports its own submodules (re-exports): not a cycle through the code.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_execute_knows_no_engine_by_name() -> None:
    source = (PACKAGE / "execute.py").read_text(encoding="utf-8")
    for word in ("on_ray", "pipeline.cluster", "import ray", "Runner("):
        assert word not in source, f"execute.py names {word!r}: engines sit behind one seam"
