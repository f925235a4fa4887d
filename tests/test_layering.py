"""Layering: the modules of ``src/adaprune`` import each other without cycles; ``api.py`` stays small.

The import graph is read from the source with ``ast``: every ``import`` / ``from ... import`` of an
adaprune module, at module level or inside functions and classes (only ``if TYPE_CHECKING:`` blocks
are exempt, since they never run). Relative imports are resolved against the importing module's
package; ``from pkg import name`` counts as importing the submodule ``pkg.name`` when there is one,
else as importing ``pkg`` itself; importing a submodule also imports the packages above it (their
``__init__`` runs first), except the root package and the importer's own packages. An edge means "runs that module's code while importing or
running this one", so a cycle is a pair of modules that each need the other (usually a package whose
``__init__`` imports a submodule that imports the package back).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "adaprune"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The adaprune modules that module ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    out.add(alias.name)
            continue
        if node.level:
            base = _package_of(name, path).split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not (target == ROOT or target.startswith(ROOT + ".")):
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if sub in modules else target)
    # importing ``a.b.c`` first runs the packages ``a.b`` (and ``a``): an edge to each of them too, except
    # the root (it is the entry point, always first) and the packages ``name`` itself lives in (they are
    # already being imported when ``name`` runs)
    own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {ROOT}
    for target in list(out):
        parts = target.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts))} - own
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    graph = {name: imported_modules(name, path, names) for name, path in files.items()}
    unknown = {f"{a} -> {b}" for a, deps in graph.items() for b in deps if b not in names}
    assert not unknown, f"imports of adaprune modules that do not exist: {sorted(unknown)}"
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (iterative DFS, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_analysis_sees_relative_package_and_function_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "adaprune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\nfrom .. import other as o\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..other import X\n"
        "def f():\n    from . import REG\n    import adaprune.other\n"
    )
    (pkg / "other.py").write_text("")
    names = {"adaprune", "adaprune.sub", "adaprune.sub.leaf", "adaprune.other"}
    assert imported_modules("adaprune", pkg / "__init__.py", names) == {"adaprune.sub"}
    assert imported_modules("adaprune.sub", pkg / "sub" / "__init__.py", names) == {
        "adaprune.sub.leaf", "adaprune.other"}
    assert imported_modules("adaprune.sub.leaf", pkg / "sub" / "leaf.py", names) == {
        "adaprune.sub", "adaprune.other"}
    (pkg / "other.py").write_text("from .sub.leaf import f\n")  # runs sub/__init__ first
    assert imported_modules("adaprune.other", pkg / "other.py", names) == {"adaprune.sub.leaf", "adaprune.sub"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_api_only_holds_prune() -> None:
    lines = (SRC / ROOT / "api.py").read_text(encoding="utf-8").count("\n")
    assert lines < 150, f"api.py has {lines} lines; it holds prune only (PruneResult is in result.py), helpers live elsewhere"
