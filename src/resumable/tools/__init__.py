"""Offline checkpoint tools behind the ``resumable`` command line: inspect, verify, diff, merge, split, convert.

Each module holds one command's work as plain functions (no argparse, no printing
beyond progress bars), so tests and other programs call them directly; ``resumable.cli``
only parses arguments and formats results. This package module itself imports neither torch
nor tqdm: the command line builds its parsers from it (``resumable --help`` in well under a second).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tqdm import tqdm

    from resumable.storage import AnyPath, Entry

Target = Literal["v2", "unified", "hf", "legacy"]
TARGETS: tuple[str, ...] = ("v2", "unified", "hf", "legacy")
"""The formats ``resumable convert --to`` writes (:func:`resumable.tools.convert.convert`)."""


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar of the bytes written, on stderr, shown only when ``enabled`` and stderr is a terminal: never
    in a captured log. Log lines meanwhile go through ``tqdm.write`` (``resumable.tools.commands``), which
    clears the bar before and redraws it after them."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled or not sys.stderr.isatty())


def walk_files(folder: AnyPath, under: str = "") -> Iterator[tuple[str, Entry]]:
    """``(path relative to folder, entry)`` of every file under ``folder`` (a local folder or an object-store
    prefix), depth first, sorted; local symlinks and special files are left out (never followed)."""
    from resumable import storage

    for entry in storage.list_dir(folder):
        if entry.link or entry.special:
            continue
        name = f"{under}{entry.name}"
        if entry.is_dir:
            yield from walk_files(folder / entry.name, f"{name}/")
        else:
            yield name, entry


def legacy_tree(path: AnyPath) -> bool:
    """True when ``path`` is a legacy ``rank_*`` tree (a folder of ``rank_<n>`` folders; local or ``s3://``)."""
    from resumable import storage
    from resumable.legacy.files import rank_folders

    return storage.is_dir(path) and bool(rank_folders(path))
