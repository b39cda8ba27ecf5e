"""What the trainer's two save callbacks share: the layout they record and what a failed save does.

``CheckpointMonitor`` (:mod:`resumable.train.checkpointing`, Checkpoint 2.0) and
``LegacyCheckpointMonitor`` (:mod:`resumable.train.legacy_callbacks`, Checkpoint 1.0) both
use it; neither imports the other.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from resumable.errors import SaveError
from resumable.train.config import TrainConfig
from resumable.train.loop import Trainer

logger = logging.getLogger(__name__)


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
