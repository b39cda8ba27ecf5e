"""resumable: checkpointing and resume-training for distributed PyTorch training."""

import os
from pathlib import Path

from resumable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    LockedError,
    NotImplementedYet,
    SaveError,
    UnsafeCheckpointError,
)

from resumable.async_save import async_save
from resumable.manager import CheckpointManager
from resumable.save import save
from resumable.load import LoadResult, StateMismatchError, load, load_async
from resumable.resolve import resolve_checkpoint

__version__ = "0.1.0"


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
