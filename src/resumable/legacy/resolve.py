"""Which Checkpoint 1.0 step to load: a step's file per source rank, one full file, or a fresh start.

Rank 0's choice is broadcast so that every rank loads the same step; every rank learns
every rank's failure (:func:`resolve_legacy`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from resumable import dist
from resumable.errors import CheckpointError, CheckpointNotFoundError
from resumable.formats import v1
from resumable.formats.mindformers import parse_legacy_name, select_legacy_files
from resumable.legacy.files import inside, rank_folders
from resumable.load import agree_on

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LegacySource:
    """What to load: a step's file per source rank (a tree), one full file, or nothing.

    Attributes:
        root: the folder file names are relative to (the tree, or the single file's folder).
        files: file names relative to ``root``, by source rank (one for a single file).
        position: ``(epoch, step)`` of the tree's step, None for a single file.
        single: a full (unified) checkpoint in one file.
        reason: why this was chosen, for the log.
    """

    root: Path | None
    files: tuple[str, ...]
    position: tuple[int, int] | None
    single: bool
    reason: str

    @property
    def fresh(self) -> bool:
        return self.root is None

    @property
    def fmt(self) -> str:
        return Path(self.files[0]).suffix.lstrip(".")


def _fresh(reason: str) -> LegacySource:
    return LegacySource(None, (), None, False, reason)


def resolve_here(load_checkpoint: str, resume_training: bool | str, fmt: str,
                  output_dir: str | os.PathLike[str] | None, rank: int) -> LegacySource:
    """This rank's view of what ``load_checkpoint`` means (reads the shared folder only)."""
    if not load_checkpoint:
        return _fresh("load_checkpoint is empty")
    path = Path(load_checkpoint)
    if path.is_file():
        parsed = parse_legacy_name(path.name)
        if path.parent.name.startswith("rank_") and parsed is not None:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} is one rank's file of a rank_* tree; point load_checkpoint at "
                f"{path.parent.parent} (and name the step with resume_training: \"{path.name}\")")
        return LegacySource(path.parent, (path.name,), None, True, f"{path.name} is a single full checkpoint file")
    if not path.exists():
        if inside(path, output_dir):
            return _fresh(f"{path} does not exist yet (inside the job's output_dir)")
        raise CheckpointNotFoundError(f"load_checkpoint {path} does not exist; point it at a folder of rank_* "
                                      "folders or one full checkpoint file, or leave it empty to start fresh")
    ranks = rank_folders(path)
    if not ranks:
        visible = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if visible:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} holds no rank_* folders ({', '.join(visible[:5])}); for Checkpoint 2.0 "
                "iterations set use_legacy_format: false")
        return _fresh(f"{path} is empty")
    if isinstance(resume_training, str):
        names = tuple(f"{r}/{v1.substitute_rank(resume_training, int(r[5:]))}" for r in ranks)
        # A rank beyond the source's rank folders (a larger job converting) has no file of its own.
        if rank < len(names) and not (path / names[rank]).is_file():
            raise CheckpointNotFoundError(f"resume_training {resume_training!r}: rank {rank} has no "
                                          f"{path / names[rank]}")
        parsed = parse_legacy_name(resume_training)
        assert parsed is not None
        return LegacySource(path, names, (parsed.epoch, parsed.step), False, f"resume_training names {resume_training}")
    if not any(parse_legacy_name(p.name) for r in ranks for p in (path / r).iterdir()) and not any(
            (path / r / v1.META_JSON).exists() for r in ranks):
        return _fresh(f"{path} holds rank folders but no checkpoint yet")
    position, paths = select_legacy_files(path, fmt)
    return LegacySource(path, tuple(f"{p.parent.name}/{p.name}" for p in paths), position, False,
                        f"epoch {position[0]} step {position[1]} is the newest step complete on every rank")


def resolve_legacy(load_checkpoint: str, resume_training: bool | str, *, fmt: str = "safetensors",
                   output_dir: str | os.PathLike[str] | None = None, process_group: dist.Group = None) -> LegacySource:
    """Decide which legacy checkpoint ``load_checkpoint`` / ``resume_training`` mean, on every rank.

    Args:
        load_checkpoint: a folder of ``rank_*`` folders, one full checkpoint file, or "" (fresh).
            A missing folder inside ``output_dir`` or an empty one is a fresh start.
        resume_training: ``True``/``False``: the newest step complete on every rank
            (``meta.json`` bounds it; without any, the newest step present on every rank by
            the epoch/step in the names). A file name: that step, each rank substituting its
            own rank id.
        fmt: ``load_ckpt_format``.
        output_dir: the job's output folder.

    Returns:
        The same :class:`LegacySource` on every rank.

    Raises:
        CheckpointNotFoundError / CorruptCheckpointError / ValueError: on every rank, naming
            each failing rank and path.

    Collective: every rank calls it (one all_gather).
    """
    me = dist.rank(process_group)
    try:
        found: LegacySource | None = resolve_here(load_checkpoint, resume_training, fmt, output_dir, me)
        error = None
    except (CheckpointError, ValueError, OSError) as exc:
        found, error = None, exc
    agree_on(error, process_group)
    chosen = dist.broadcast_object(found, 0, process_group)  # rank 0's choice, so all load the same step
    assert chosen is not None
    log.info("load_checkpoint=%r: %s", load_checkpoint, "fresh start: " + chosen.reason if chosen.fresh
             else f"loading {chosen.root} ({chosen.reason})")
    return chosen
