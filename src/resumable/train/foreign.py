"""A foreign ``load_checkpoint`` (MindFormers, legacy ``rank_*``, HuggingFace / unified) for the trainer.

The trainer loads Checkpoint 2.0 only; anything else is converted once into
``<output_dir>/converted_checkpoint/`` (one rank's layout: the loader reshards online) by
the split tool's writer. The conversion never deletes what the user pointed at, nor a
folder it did not write itself. In legacy mode (``use_legacy_format: true``) the same
conversion serves what the legacy loader cannot read (:func:`needs_conversion_legacy`):
the trainer then loads the converted Checkpoint 2.0 folder with the 2.0 loader.

What changes the result is recorded in ``common.json["converted_from"]`` and compared
before a conversion is reused: the source (path, format, iteration), the requested
fused layout (``model.use_contiguous_weight_layout_attention`` /
``model.use_interleaved_weight_layout_mlp``, None when the config sets neither: the
checkpoint's recorded config, else MindFormers' defaults), ``names``, the strategy
(``src_strategy_path_or_dir``), the dtype and the reader's notes (the decisions it took).
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from resumable import commit, storage
from resumable.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from resumable.formats import v1, v2
from resumable.storage import AnyPath
from resumable.storage.local import check_regular
from resumable.formats.mindformers import select_legacy_files
from resumable.formats.safetensors_io import read_header
from resumable.models.qwen3 import FusedLayout
from resumable.sources import Names, detect, open_source
from resumable.tools.split import TargetLayout, write_v2
from resumable.train.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CONVERTED", "ForeignOptions", "ensure_loadable", "needs_conversion_legacy"]

CONVERTED = "converted_checkpoint"


@dataclass(frozen=True)
class ForeignOptions:
    """How a foreign ``load_checkpoint`` is read: the trainer's keys that change the conversion."""

    fused: FusedLayout | None = None
    """MindFormers' fused ``linear_qkv`` / ``linear_fc1`` row order; None: the checkpoint's recorded config, else
    MindFormers' defaults."""
    names: Names = "auto"
    """A MindSpore checkpoint's names (``resumable.sources.open_source``)."""
    src_strategy: str = ""
    """``src_strategy_path_or_dir``: the strategy files of a MindFormers legacy tree whose ranks hold slices."""
    dtype: torch.dtype | None = None
    """Cast floating-point tensors (the trainer trains in float32; MindFormers often saves bfloat16)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ForeignOptions":
        """The options a trainer config asks for (a fused layout only when the YAML sets one of its keys)."""
        keys = {"use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp"}
        fused = cfg.model.fused_layout if keys & cfg.model.model_fields_set else None
        return cls(fused, "auto", cfg.src_strategy_path_or_dir, torch.float32)

    def origin(self) -> dict[str, Any]:
        """What of these options changes a conversion's result, as JSON."""
        strategy = _where(storage.as_path(self.src_strategy)) if self.src_strategy else None
        return {"fused": None if self.fused is None else asdict(self.fused), "names": self.names,
                "src_strategy": strategy, "dtype": None if self.dtype is None else str(self.dtype)}


def _where(path: AnyPath) -> str:
    """A source's path as recorded in ``converted_from``: local ones resolved, an ``s3://`` URL as given."""
    return str(path if storage.is_object(path) else Path(path).resolve())


def _is_v2_or_empty(path: AnyPath) -> bool:
    entry = storage.stat(path)
    if entry is None:
        return True
    if not entry.is_dir:
        return False  # a single file (MindSpore .ckpt, .safetensors): never Checkpoint 2.0
    if not any(not e.name.startswith(".") for e in storage.list_dir(path)):
        return True
    try:
        fmt, _ = detect(path)
    except CheckpointError:
        return True  # missing or damaged (a garbage tracker, its target gone): resolve_checkpoint decides, falling back
    return fmt == "v2"


def _refuse_overlap(path: AnyPath, target: Path) -> None:
    """Refuse a ``load_checkpoint`` that the conversion into ``target`` would replace or write into."""
    if storage.is_object(path):
        return  # the conversion is written locally
    src, dst = Path(path).resolve(), target.resolve()
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
    if target.is_dir() and not target.is_symlink() and all(e.name.startswith(".") for e in storage.list_dir(target)):
        return  # an interrupted conversion: its lock and temp folder only
    raise ConfigError(
        f"{target} is where load_checkpoint is converted to, but it holds something that is not an earlier "
        "conversion (no readable common.json recording converted_from); it is never deleted: move it away or "
        "set output_dir to another folder")


def ensure_loadable(path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                    options: ForeignOptions = ForeignOptions()) -> AnyPath:
    """A Checkpoint 2.0 path the loader can read for ``load_checkpoint = path``.

    Our own checkpoints (and empty or missing paths) are returned unchanged. A
    MindFormers 2.0 folder, a legacy ``rank_*`` tree (with ``options.src_strategy`` when
    its ranks hold slices), a single ``.ckpt`` / ``.safetensors`` file or a HuggingFace /
    unified folder is converted once into ``<output_dir>/converted_checkpoint/`` (one
    rank's layout: the loader reshards online) and that folder is returned; a later call
    with the same source and options reuses the conversion (``common.json["converted_from"]``
    records both, see the module docstring).

    Args:
        path: the ``load_checkpoint`` value.
        output_dir: the job's ``output_dir``.
        options: how to read a foreign checkpoint (:meth:`ForeignOptions.from_config`).

    Returns:
        The path to give ``resolve_checkpoint`` / ``load``.

    Raises:
        ConfigError: ``path`` is, is inside or contains ``<output_dir>/converted_checkpoint``
            (the conversion replaces that folder), or that folder holds something other
            than an earlier conversion (it is never deleted then).
        NotImplementedYet: a MindFormers legacy tree whose ranks hold slices, without
            ``src_strategy`` (the message says to set ``src_strategy_path_or_dir``).

    Who calls it: rank 0 only, before resolving; broadcast the result to the other ranks
    (they must not convert concurrently). Not collective.

    Example::

        load_from = ensure_loadable(cfg.load_checkpoint, cfg.output_dir, ForeignOptions.from_config(cfg))
    """
    path = storage.as_path(path)
    if _is_v2_or_empty(path):
        if options.src_strategy:
            log.info("src_strategy_path_or_dir %s is not used: load_checkpoint %s is a Checkpoint 2.0 folder (or "
                     "none), which records its own layout", options.src_strategy, path)
        return path
    target = Path(output_dir) / CONVERTED
    _refuse_overlap(path, target)
    source = open_source(path, fused=options.fused, names=options.names, src_strategy=options.src_strategy or None)
    origin = {"path": _where(source.path), "format": source.format, "iteration": source.iteration,
              **options.origin(), "notes": list(source.notes)}
    found = _conversion_origin(target)
    if found == origin:
        log.info("load_checkpoint %s: reusing its conversion in %s", path, target)
        return target
    if target.exists() or target.is_symlink():
        _refuse_foreign(target, found)
        storage.remove_tree(target)  # an earlier conversion of another source or with other options, or an interrupted one
    write_v2(source, target, TargetLayout(), dtype=options.dtype, extra_common={"converted_from": origin})
    log.info("load_checkpoint %s is a %s checkpoint: converted to Checkpoint 2.0 in %s", path, source.format, target)
    return target


def _ours_legacy_file(path: Path) -> bool:
    """Whether a legacy rank file (or a single full file) was written by resumable's legacy saver."""
    if path.suffix == ".ckpt":
        check_regular(path, "legacy .ckpt file")  # is_zipfile would block on a FIFO
        return zipfile.is_zipfile(path) and v1.META_KEY in v1.load_ckpt(path)[1]  # else MindSpore protobuf
    return v1.META_KEY in (read_header(path).metadata or {})


def needs_conversion_legacy(path: str | os.PathLike[str]) -> bool:
    """Whether a legacy-mode ``load_checkpoint`` is one the legacy loader cannot read, to convert first.

    True for a MindFormers legacy tree (its newest complete step's files are not
    resumable's), a MindFormers 2.0 folder, a HuggingFace / unified folder and a single
    file not written by resumable. False for our own legacy trees and files, our
    Checkpoint 2.0 folders (the legacy resolver names the key to change), an empty or
    missing path, and anything damaged or unreadable: the legacy resolver reports it (and
    falls back past damaged steps where it may). Reads names and one file's header. Not
    collective.

    Example::

        if needs_conversion_legacy(cfg.load_checkpoint): ...
    """
    path = Path(path)
    try:
        if path.is_file():
            return not _ours_legacy_file(path)
        if _is_v2_or_empty(path):
            return False
        fmt, root = detect(path)
        if fmt != "legacy":
            return True
        for fmt in v1.FORMATS:  # safetensors first, as sources reads a tree holding both
            try:
                _, files = select_legacy_files(root, fmt)
            except CheckpointNotFoundError:
                continue
            return not _ours_legacy_file(files[0])
    except (CheckpointError, OSError):
        pass
    return False
