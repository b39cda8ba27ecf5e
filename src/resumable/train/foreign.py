"""A foreign ``load_checkpoint`` (MindFormers, legacy ``rank_*``, HuggingFace / unified) for the trainer.

The trainer loads Checkpoint 2.0 only; anything else is converted once into
``<output_dir>/converted_checkpoint/`` (one rank's layout: the loader reshards online) by
the split tool's writer. The conversion never deletes what the user pointed at, nor a
folder it did not write itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from resumable import commit
from resumable.errors import CheckpointError, ConfigError
from resumable.formats import v2
from resumable.sources import detect, open_source
from resumable.tools.split import TargetLayout, write_v2

log = logging.getLogger(__name__)

__all__ = ["CONVERTED", "ensure_loadable"]

CONVERTED = "converted_checkpoint"


def _is_v2_or_empty(path: Path) -> bool:
    if not path.exists():
        return True
    if path.is_dir() and not any(p for p in path.iterdir() if not p.name.startswith(".")):
        return True
    try:
        fmt, _ = detect(path)
    except CheckpointError:
        return True  # missing or damaged (a garbage tracker, its target gone): resolve_checkpoint decides, falling back
    return fmt == "v2"


def _refuse_overlap(path: Path, target: Path) -> None:
    """Refuse a ``load_checkpoint`` that the conversion into ``target`` would replace or write into."""
    src, dst = path.resolve(), target.resolve()
    how = ("is that folder" if src == dst else "is inside that folder" if src.is_relative_to(dst)
           else "contains that folder" if dst.is_relative_to(src) else None)
    if how is not None:
        raise ConfigError(
            f"load_checkpoint {path} is not a Checkpoint 2.0 folder, so it is converted into {target}, which the "
            f"conversion replaces; but load_checkpoint {how}: move the checkpoint out of it, or set output_dir "
            "to a folder outside the checkpoint")


def _conversion_origin(target: Path) -> dict[str, Any] | None:
    """``converted_from`` of the newest committed iteration in ``target``: None when it records none."""
    try:
        done = commit.latest_committed(target) if target.is_dir() and not target.is_symlink() else None
        found = None if done is None else v2.read_common(done).get("converted_from")
    except (CheckpointError, OSError):
        return None  # damaged or unreadable: not known to be a conversion, so never deleted (below)
    return found if isinstance(found, dict) else None


def _refuse_foreign(target: Path, origin: dict[str, Any] | None) -> None:
    """Refuse to delete ``target`` unless it is a conversion (``origin``) or holds only hidden leftovers of one."""
    if origin is not None:
        return
    if target.is_dir() and not target.is_symlink() and all(p.name.startswith(".") for p in target.iterdir()):
        return  # an interrupted conversion: its lock and temp folder only
    raise ConfigError(
        f"{target} is where load_checkpoint is converted to, but it holds something that is not an earlier "
        "conversion (no readable common.json recording converted_from); it is never deleted: move it away or "
        "set output_dir to another folder")


def ensure_loadable(path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                    dtype: torch.dtype | None = None) -> Path:
    """A Checkpoint 2.0 path the loader can read for ``load_checkpoint = path``.

    Our own checkpoints (and empty or missing paths) are returned unchanged. A
    MindFormers 2.0 folder, a legacy ``rank_*`` tree or a HuggingFace / unified folder
    is converted once into ``<output_dir>/converted_checkpoint/`` (one rank's layout:
    the loader reshards online) and that folder is returned; a later call with the same
    source reuses the conversion (``common.json["converted_from"]`` records it).

    Args:
        path: the ``load_checkpoint`` value.
        output_dir: the job's ``output_dir``.
        dtype: cast floating-point tensors to this dtype (the trainer trains in
            float32; MindFormers checkpoints often hold bfloat16 weights).

    Returns:
        The path to give ``resolve_checkpoint`` / ``load``.

    Raises:
        ConfigError: ``path`` is, is inside or contains ``<output_dir>/converted_checkpoint``
            (the conversion replaces that folder), or that folder holds something other
            than an earlier conversion (it is never deleted then).

    Who calls it: rank 0 only, before resolving; broadcast the result to the other ranks
    (they must not convert concurrently). Not collective.

    Example::

        load_from = ensure_loadable(cfg.load_checkpoint, cfg.output_dir, dtype=torch.float32)
    """
    path = Path(path)
    if _is_v2_or_empty(path):
        return path
    target = Path(output_dir) / CONVERTED
    _refuse_overlap(path, target)
    source = open_source(path)
    origin = {"path": str(source.path.resolve()), "format": source.format, "iteration": source.iteration}
    found = _conversion_origin(target)
    if found == origin:
        log.info("load_checkpoint %s: reusing its conversion in %s", path, target)
        return target
    if target.exists() or target.is_symlink():
        _refuse_foreign(target, found)
        shutil.rmtree(target)  # an earlier conversion of another source, or an interrupted one
    write_v2(source, target, TargetLayout(), dtype=dtype, extra_common={"converted_from": origin})
    log.info("load_checkpoint %s is a %s checkpoint: converted to Checkpoint 2.0 in %s", path, source.format, target)
    return target
