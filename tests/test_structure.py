"""The shape issue 19 gave the package, kept: no import circle hides behind ``TYPE_CHECKING``,
nothing in ``cell/`` imports the ``Cell`` it composes, the façade and the links stay small.

(Layers and private modules are import-linter's contracts in ``pyproject.toml``, which
``scripts/check`` runs; these are what it cannot express.)"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flare_async"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.Module, module: str) -> Iterator[tuple[str, bool]]:
    """``(imported module, under TYPE_CHECKING)`` for every import in a module."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                guarded.update(id(n) for n in ast.walk(child))
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
            for alias in node.names:
                yield f"{base}.{alias.name}", id(node) in guarded
                yield base, id(node) in guarded
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in guarded


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    modules = _modules()
    runtime: dict[str, set[str]] = {m: set() for m in modules}
    typing_only: list[tuple[str, str]] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        for target, guarded in _imports(tree, module):
            if target not in modules or target == module:
                continue
            if guarded:
                typing_only.append((module, target))
            else:
                runtime[module].add(target)
    return runtime, typing_only


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
            # Importing a module imports its packages' __init__ first.
            parent = m.rsplit(".", 1)[0]
            if parent != m and parent in graph:
                todo.append(parent)
    return False


def test_no_type_checking_import_closes_a_circle() -> None:
    runtime, typing_only = _graph()
    circles = [
        (a, b) for a, b in typing_only if _reaches(runtime, b, a) and not a.endswith(".__init__")
    ]
    # A package's __init__ importing its own submodule lazily (transport: aiohttp only when
    # ws:// is used) is no circle: the submodule reaches the package only as its parent.
    circles = [(a, b) for a, b in circles if not b.startswith(a + ".")]
    assert not circles, circles


def test_nothing_in_cell_imports_the_cell_it_composes() -> None:
    runtime, typing_only = _graph()
    users = [
        m
        for m, targets in runtime.items()
        if m.startswith("flare_async.cell.") and "flare_async.cell._cell" in targets
    ]
    users += [a for a, b in typing_only if b == "flare_async.cell._cell"]
    assert not users, users


def test_the_cell_facade_and_every_link_stay_small() -> None:
    assert len((PACKAGE / "cell" / "_cell.py").read_text().splitlines()) < 400
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "transport").glob("*.py")}
    assert max(sizes.values()) < 400, sizes
