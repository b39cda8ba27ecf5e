"""The library imports neither the command-line tools nor the trainer (docs/internals.md, layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import resumable

LIBRARY = Path(resumable.__file__).parent
OUTSIDE = ("resumable.tools", "resumable.train", "resumable.cli", "resumable.demo")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_no_library_module_imports_the_tools_or_the_trainer() -> None:
    library = [p for p in LIBRARY.rglob("*.py")
               if p.relative_to(LIBRARY).parts[0] not in ("tools", "train") and p.name not in ("cli.py", "demo.py")]
    assert len(library) > 20
    offending = {str(p.relative_to(LIBRARY)): sorted(m for m in _imports(p) if m.startswith(OUTSIDE))
                 for p in library}
    assert {k: v for k, v in offending.items() if v} == {}
