"""resumable: checkpointing and resume-training for distributed PyTorch training.

The torch-backed API (``save``, ``load``, ``CheckpointManager`` ...) is imported on first use, so that
``import resumable.cli`` (``resumable --help``) loads no torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resumable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    LockedError,
    NotImplementedYet,
    SaveError,
    StateMismatchError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    from resumable.async_save import async_save
    from resumable.load import LoadResult, load, load_async
    from resumable.manager import CheckpointManager
    from resumable.resolve import resolve_checkpoint
    from resumable.save import save

__version__ = "0.1.0"

#: The lazily imported names and their modules.
_LAZY = {"async_save": "resumable.async_save", "CheckpointManager": "resumable.manager", "save": "resumable.save",
         "LoadResult": "resumable.load", "load": "resumable.load", "load_async": "resumable.load",
         "resolve_checkpoint": "resumable.resolve"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resumable' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``resumable.save``, ``.load`` and ``.async_save`` stay the functions: importing the submodules of
    those names (``import resumable.save``) would otherwise bind the modules over them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def latest(directory: "str | os.PathLike[str]") -> "Path | None":
    """The committed checkpoint a resume would load from ``directory``, or None when there is none.

    Follows ``latest_checkpointed_iteration.txt`` when present, else the newest committed
    ``iteration_*`` folder (``resumable.commit.is_committed`` decides what counts).

    Raises:
        CorruptCheckpointError: the tracker is unreadable or names an uncommitted folder.

    Example:
        >>> resumable.latest("output/checkpoint")
        PosixPath('output/checkpoint/iteration_00000200')
    """
    from resumable.commit import latest_committed

    return latest_committed(directory)

__all__ = [
    "CheckpointManager",
    "async_save",
    "latest",
    "save",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "LockedError",
    "NotImplementedYet",
    "SaveError",
    "UnsafeCheckpointError",
    "load",
    "load_async",
    "resolve_checkpoint",
    "LoadResult",
    "StateMismatchError",
]
