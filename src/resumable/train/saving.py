"""What the trainer's two save callbacks share: the layout they record, what a failed save does,
and what a fresh start over an earlier run's checkpoints says.

``CheckpointMonitor`` (:mod:`resumable.train.checkpointing`, Checkpoint 2.0) and
``LegacyCheckpointMonitor`` (:mod:`resumable.train.legacy_callbacks`, Checkpoint 1.0) both
use it; neither imports the other.
"""

from __future__ import annotations

import logging
import os
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from resumable import storage
from resumable.errors import SaveError
from resumable.train.config import TrainConfig

if TYPE_CHECKING:  # the CLI quotes a TrainCommand without importing torch
    from resumable.train.loop import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainCommand:
    """The ``resumable train`` command a job was started with (its ``--config`` and ``--set``), quoted in messages."""

    config: str | None = None
    overrides: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # the CLI's own, e.g. ("--nproc", "2") (a rank has none: --nproc equals the layout)

    def with_sets(self, *sets: str) -> str:
        """This command with ``sets`` added (its own ``--set`` of the same keys dropped), as a shell line."""
        keys = {kv.split("=", 1)[0].strip() for kv in sets}
        kept = [kv for kv in self.overrides if kv.split("=", 1)[0].strip() not in keys]
        return shlex.join(["resumable", "train", *(["--config", self.config] if self.config else []), *self.options,
                           *[x for kv in [*kept, *sets] for x in ("--set", kv)]])


def same_folder(a: object, b: object) -> bool:
    """Whether two paths name the same existing folder (links followed; object-store prefixes by name)."""
    pa, pb = storage.as_path(a), storage.as_path(b)  # type: ignore[arg-type]
    if storage.is_object(pa) or storage.is_object(pb):
        return pa == pb
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def fresh_start_refusal(cfg: TrainConfig, command: TrainCommand | None, held: str, newest: str) -> str:
    """Why a job starting at step 0 into a checkpoint folder that holds an earlier run's checkpoints
    (``held``, the newest being ``newest``) stops, and the commands to go on (Checkpoint 2.0 and 1.0 alike)."""
    directory, load = cfg.checkpoint_dir, cfg.load_checkpoint
    why = ("resume_training is false" if not cfg.resume_training and not load
           else f"resume_training is false: only the weights of {load} are loaded" if not cfg.resume_training
           else f"load_checkpoint {load} holds no checkpoint to resume")
    # Resuming means the job's own folder: a load_checkpoint elsewhere is cleared.
    sets = ("resume_training=true", *(() if not load or same_folder(load, directory) else ("load_checkpoint=",)))
    resume = (command.with_sets(*sets) if command is not None
              else "this job's command with " + " ".join(f"--set {kv}" for kv in sets))
    return (f"{directory} holds the checkpoints of an earlier run ({held}) and this run starts at step 0 "
            f"({why}): its saves would write over them. To continue that run from {newest}: "
            f"{resume}. To start over, deleting them: add --set callbacks.0.discard_newer_checkpoints=true, or "
            "set another output_dir")


def layout_info(trainer: Trainer) -> dict[str, Any]:
    """The layout recorded in metadata.json, for humans and ``resumable inspect``."""
    lay = trainer.layout
    return {"mesh": {"pp": lay.pp, "dp": lay.dp, "tp": lay.tp}, "pipeline_stages": lay.pp,
            "sharded_optimizer": lay.sharded_optimizer}


@contextmanager
def on_save_error(cfg: TrainConfig, step: int) -> Iterator[None]:
    """Apply ``callbacks.0.on_save_error`` to a save: re-raise (``raise``) or log and go on (``warn``).

    A ``SaveError`` is raised on every rank alike (the ranks agree on it), so with
    ``warn`` every rank trains on together; nothing of the failed save was committed.
    """
    try:
        yield
    except SaveError as exc:
        mon = cfg.checkpoint
        if mon is None or mon.on_save_error == "raise":
            raise
        logger.warning("checkpoint save at step %d failed, training goes on (on_save_error: warn); the newest "
                       "committed checkpoint is unchanged: %s", step, exc)
