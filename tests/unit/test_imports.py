"""The house drawn from its imports: one-way layers, no cycles, the config package a leaf,
and no function-level imports of our own modules (they would hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("pretrain", "launch")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _ours(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `import name` loads (the longest known prefix), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, known: dict[str, Path], top_level: bool) -> set[str]:
    """Our modules imported by `path`: at module level, or (top_level=False) inside functions."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                                         ast.AsyncFunctionDef))
                                         for n in ast.walk(f)]
    found = set()
    for node in nodes:
        if not top_level or isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                module = _ours(target, known)
                if module and module != path_module(path, known):
                    found.add(module)
    return found


def path_module(path: Path, known: dict[str, Path]) -> str:
    return next(m for m, p in known.items() if p == path)


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {m: imports(p, known, top_level=True) for m, p in known.items()}
    # A package's __init__ is imported with any of its modules: fold it into its children's edges.
    return edges


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [module, target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_config_is_a_leaf():
    edges = graph()
    leaf = {m: t for m, t in edges.items() if m.startswith("pretrain.config")}
    assert leaf, "no pretrain.config package found"
    outside = {m: sorted(t for t in targets if not t.startswith("pretrain.config") and t != "pretrain")
               for m, targets in leaf.items()}
    assert not any(outside.values()), f"the config package imports other modules of ours: {outside}"


def test_no_function_level_imports_of_our_modules():
    known = modules()
    hidden = {m: sorted(imports(p, known, top_level=False)) for m, p in known.items()}
    hidden = {m: t for m, t in hidden.items() if t}
    assert not hidden, f"function-level imports of our modules (move them to the top): {hidden}"


def test_the_graph_sees_real_edges():
    """The checks above would pass on an empty graph: make sure it holds what we know is there."""
    edges = graph()
    assert "pretrain.config" in edges["pretrain.main"] or "pretrain.config.loading" in edges["pretrain.main"]
    assert "pretrain.parallel.prepare" in edges["pretrain.train.engine"]
    assert "pretrain.data.info" in edges["pretrain.data.shards"]
