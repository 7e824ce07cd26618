"""The import rules of the architecture, read from the source (no import runs, so a lazy import counts too).

1. The core package `llmforge` never imports the built-in plugins (`llmforge_plugins`): they register
   through the same entry points as a third-party package, and the core must work for either.
2. No import cycle among the modules of `llmforge/`, counting imports inside functions: a lazy import that
   closes a loop still makes the modules impossible to read, test or load one without the other.
3. The core (`llmforge/` minus the front ends cli/ and tui/) imports no UI library, not even inside a
   function. tests/test_imports.py checks the same rule at run time (what importing the core really
   loads, third-party libraries' own imports included); this test sees the imports that only run later.

Each failure lists every offending import as `file:line`, or every cycle as a chain of modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "llmforge"
FRONT_ENDS = ("llmforge.cli", "llmforge.tui")
UI = ("typer", "textual", "rich", "click", "textual_plotext", "plotext")


@dataclass(frozen=True)
class Import:
    """One import statement (or importlib call) found in a module: what it names and where."""

    source: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    names: tuple[str, ...]  # for `from target import a, b`: ("a", "b"); empty otherwise
    where: str  # "llmforge/x.py:12"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_files() -> dict[str, Path]:
    """Every module of the llmforge package, by dotted name."""
    return {module_name(p): p for p in sorted(CORE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node, at any depth, except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, root: Path | None = None) -> list[Import]:
    """The imports a module makes at module level, in functions and through importlib.import_module("...")."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    rel = path.relative_to(root or ROOT).as_posix()
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, (), where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` climbs level-1 packages from this one
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(Import(name, target, tuple(a.name for a in node.names), where))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            found.append(Import(name, node.args[0].value, (), where))
    return sorted(found, key=lambda imp: int(imp.where.rpartition(":")[2]))  # in reading order


def all_imports() -> list[Import]:
    return [imp for name, path in core_files().items() for imp in imports_of(name, path)]


def _top(module: str) -> str:
    return module.split(".")[0]


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported llmforge module: where (the first place it is imported)}.

    `from llmforge.x import y` points at llmforge.x.y when y is a submodule, else at llmforge.x. The parent
    packages that Python also initialises on the way are not edges: they are loaded first in any order.
    """
    modules = core_files()
    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for imp in all_imports():
        if _top(imp.target) != "llmforge":
            continue
        targets = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
        if len(targets) < len(imp.names) or not imp.names:
            targets.append(imp.target)  # some name is an attribute of the module itself
        for target in targets:
            if target in modules and target != imp.source:
                graph[imp.source].setdefault(target, imp.where)
    return graph


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


def a_cycle(graph: dict[str, dict[str, str]], group: list[str]) -> list[str]:
    """One concrete loop inside a strongly connected group (breadth-first, so a shortest one from its first
    module), as `module (file:line) -> ...` steps a reader can follow."""
    members = set(group)
    start = group[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    path.reverse()
                    steps = [f"{a} ({graph[a][b]})" for a, b in zip(path, path[1:] + [start])]
                    return steps + [start]
                if child not in came_from:
                    came_from[child] = node
                    nxt.append(child)
        frontier = nxt
    return group  # unreachable for a real strongly connected group


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    # the rules below are only as good as the reader: check it on a module that hides imports
    pkg = tmp_path / "llmforge" / "sub"
    pkg.mkdir(parents=True)
    mod = pkg / "mod.py"
    mod.write_text(
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "from . import sibling\n"
        "from ..core import thing\n"
        "if TYPE_CHECKING:\n"
        "    import typer\n"
        "def f():\n"
        "    import llmforge_plugins.merge\n"
        "    importlib.import_module('llmforge_plugins.curate')\n"
    )
    found = {(i.target, i.names) for i in imports_of("llmforge.sub.mod", mod, root=tmp_path)}
    assert ("llmforge.sub", ("sibling",)) in found
    assert ("llmforge.core", ("thing",)) in found
    assert ("llmforge_plugins.merge", ()) in found
    assert ("llmforge_plugins.curate", ()) in found
    assert not any(t == "typer" for t, _ in found)  # under TYPE_CHECKING: never imported at run time


def test_cycle_finder_reports_a_loop():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {"a": "d.py:4"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a (a.py:1)", "b (b.py:2)", "c (c.py:3)", "a"]


def test_core_never_imports_the_builtin_plugins():
    bad = [f"{imp.where}: {imp.target}" for imp in all_imports() if _top(imp.target) == "llmforge_plugins"]
    assert not bad, "llmforge imports llmforge_plugins (register through a hook instead):\n" + "\n".join(bad)


def test_no_import_cycle_in_the_core():
    graph = import_graph()
    assert "llmforge.runner" in graph and graph["llmforge.runner"]  # the graph was built
    cycles = [
        " -> ".join(a_cycle(graph, group)) + f"\n    (all modules in this loop: {', '.join(group)})"
        for group in strongly_connected(graph)
    ]
    assert not cycles, f"{len(cycles)} import cycle(s) in llmforge/:\n" + "\n".join(cycles)


def test_core_imports_no_ui_library_even_lazily():
    bad = [
        f"{imp.where}: {imp.target}"
        for imp in all_imports()
        if _top(imp.target) in UI and not imp.source.startswith(FRONT_ENDS) and imp.source != "llmforge.__main__"
    ]
    assert not bad, "the core imports a UI library (only llmforge.cli and llmforge.tui may):\n" + "\n".join(bad)
