"""The package's import graph: no circles between modules, deferred (function-level) imports included.

``import-linter`` (configured in pyproject.toml, run by CI) checks the layers from ``cli`` down to ``errors``; this
test checks the stronger property that no two modules depend on each other in a circle, whatever their layer.
Imports under ``if TYPE_CHECKING:`` are not executed and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moai_sdk

ROOT = Path(moai_sdk.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (function bodies included, TYPE_CHECKING blocks excluded)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        # the deepest project module named by ``target`` (``a.b.c`` may be a module or a name inside ``a.b``)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for alias in child.names:
                    resolve(f"{prefix}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``; a package's __init__ re-exporting its children
    # is not a circle, so edges from a package to its own submodules are dropped
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = dfs(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_deferred_imports(tmp_path):
    # a function-level import back up must count, or the test below could not fail
    pkg = tmp_path / "moai_sdk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n    return y\nx = 1\n")
    modules = {"moai_sdk", "moai_sdk.a", "moai_sdk.b"}
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        graph = {m: _imports(pkg / (m.split(".")[-1] + ".py"), modules) for m in ("moai_sdk.a", "moai_sdk.b")}
    finally:
        ROOT = saved
    assert find_cycle(graph) == ["moai_sdk.a", "moai_sdk.b", "moai_sdk.a"]


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
