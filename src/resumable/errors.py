"""Error types of resumable.

Each subclasses a built-in so callers can catch what they already know
(``FileNotFoundError``, ``ValueError``, ``NotImplementedError``). Messages say
what went wrong, where (path, rank, key) and what to do about it.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path, iteration or file a checkpoint needs does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint exists but is incomplete, inconsistent or fails its checksum."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint asks for something we refuse to do (path escape, huge header, pickle)."""


class SaveError(CheckpointError):
    """A save failed on some rank; nothing was committed."""


class NewerCheckpointsError(CheckpointError, FileExistsError):
    """A job would write over (or let retention delete) iterations newer than the one it starts from."""


class LockedError(CheckpointError):
    """Another live job holds the checkpoint folder."""


class ConfigError(ValueError):
    """A configuration key has a wrong type, an impossible value or is unknown."""


class NotImplementedYet(NotImplementedError):
    """A documented key or feature whose behaviour is not built yet."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not implemented yet: {what}")
