"""Imports only go downwards (docs/internals.md, layers): checked on every module's source with ``ast``.

Every import counts, at module level and inside functions (a lazy import is still a
dependency: it only moves the failure to run time). ``from resumable.x import y`` is an
edge to ``resumable.x.y`` when that is a module, else to ``resumable.x``; a package's own
``__init__`` is not counted as imported by its submodules (Python runs it first, but that
is nesting, not dependence).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "src" / "resumable"  # read, not imported: no torch to load
OUTSIDE = ("resumable.tools", "resumable.train", "resumable.cli", "resumable.demo")
TOOLS = ("resumable.tools", "resumable.cli")
# The code that runs training: `resumable train` (cli._train) starts the trainer, so it alone
# of the tools may import it.
TRAIN_ENTRIES = {("resumable.cli", "_train")}


@dataclass(frozen=True)
class Import:
    module: str     # the importing module
    function: str   # the outermost function the import is in, "" at module level
    target: str     # the resumable module imported


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in LIBRARY.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The resumable module ``name`` is, or is inside (``resumable.x.func`` → ``resumable.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function or (child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else "")
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # from .x import y: relative to the package
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for target in filter(None, map(_resolve, names)):
                if target != module:
                    found.append(Import(module, inner, target))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


IMPORTS = [i for m in sorted(MODULES) for i in _imports(m)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_scan_sees_module_level_and_lazy_imports() -> None:
    assert len(MODULES) > 40
    assert Import("resumable.load", "", "resumable.dist") in IMPORTS  # from resumable import dist
    assert Import("resumable.load", "", "resumable.reads") in IMPORTS  # from resumable.reads import ...
    assert Import("resumable.train.checkpointing", "checkpoint_callbacks", "resumable.train.pretrained") in IMPORTS
    assert Import("resumable.cli", "_train", "resumable.train.__main__") in IMPORTS


def test_cycle_finder_finds_a_cycle_through_three_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_library_module_imports_the_tools_or_the_trainer() -> None:
    library = [m for m in MODULES if not m.startswith(OUTSIDE)]
    assert len(library) > 20
    offending = sorted(f"{i.module} imports {i.target}" for i in IMPORTS
                       if i.module in library and i.target.startswith(OUTSIDE))
    assert offending == []


def test_no_import_cycle_among_resumable_modules() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        graph[i.module].add(i.target)
    assert _cycles(graph) == []


def test_the_tools_import_the_trainer_only_to_run_training() -> None:
    offending = sorted(f"{i.module}:{i.function or '<module>'} imports {i.target}" for i in IMPORTS
                       if i.module.startswith(TOOLS) and i.target.startswith("resumable.train")
                       and (i.module, i.function) not in TRAIN_ENTRIES)
    assert offending == []
