"""The README's fenced blocks, and what the tests do with each.

Every ``bash`` or ``python`` block in README.md carries a marker on the line above it,
``<!-- readme-test: MODE -->`` or ``<!-- readme-test: MODE (why) -->``, with MODE one of:

- ``run``: tests/e2e/test_readme.py runs every command, in README order, in one folder
  holding a copy of ``configs/``;
- ``check``: the commands are too long to run there: their targets, modules, config files
  and flags are checked instead;
- ``save NAME``: a script other blocks run as ``NAME``;
- ``run by PATH``: that test runs the block (and says so by using this module).

A bash block's command lines have their ``\\`` continuations joined and comments dropped;
text in double quotes in a command's comment is output the command states it prints.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_LANGUAGES = ("bash", "python")
MARKER_PREFIX = "<!-- readme-test:"
_MARKER = re.compile(r"<!-- readme-test: (?P<mode>run by \S+|run|check|save \S+)(?: \((?P<why>.+)\))? -->")
_FENCE = re.compile(r"```(\S*)")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its language, its text and its marker's mode."""

    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str  # the line above the fence
    mode: str | None  # None: no valid marker


@dataclass(frozen=True)
class Command:
    """One command line of a bash block and the outputs its comment quotes."""

    argv: list[str]
    said: list[str]


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block of ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = _FENCE.fullmatch(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = lines[i - 1] if i else ""
        valid = _MARKER.fullmatch(marker)
        found.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", marker,
                           valid["mode"] if valid else None))
        i = end + 1
    return found


def block(mode: str) -> Block:
    """The one command block whose marker's mode is ``mode``."""
    chosen = [b for b in blocks() if b.mode == mode]
    assert len(chosen) == 1, f"README.md: {len(chosen)} blocks marked {mode!r}, expected 1"
    return chosen[0]


def commands(text: str) -> list[Command]:
    """The command lines of a bash block."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            comment = line.partition("#")[2]
            found.append(Command(argv, re.findall(r'"([^"]+)"', comment)))
    return found
