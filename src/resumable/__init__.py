"""resumable: checkpointing and resume-training for distributed PyTorch training."""

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

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "LockedError",
    "NotImplementedYet",
    "SaveError",
    "UnsafeCheckpointError",
]
