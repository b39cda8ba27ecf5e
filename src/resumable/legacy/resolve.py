"""Which Checkpoint 1.0 step to load: a step's file per source rank, one full file, or a fresh start.

Rank 0's choice is broadcast so that every rank loads the same step; every rank learns
every rank's failure (:func:`resolve_legacy`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from resumable import dist, errors, storage
from resumable.dist import agree_on
from resumable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from resumable.formats import v1
from resumable.formats.mindformers import complete_legacy_steps, parse_legacy_name
from resumable.legacy.files import check_rank_file, folder_records, inside, local_path, rank_folders

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
        older: with ``resume_training: true``, the older steps complete on every rank,
            newest first, as ``(position, files)``: where :func:`resolve_legacy` falls back
            when a file of the chosen step fails its check.
        newer: the steps newer than the one a job starts from (a named step; weights
            only: every step; a fallback: the damaged steps it skipped), as ``(position,
            files)``: a job saving into this tree must not bury them unless told to discard them.
        skipped: why a fallback skipped each newer step (for the refusal's message).
    """

    root: Path | None
    files: tuple[str, ...]
    position: tuple[int, int] | None
    single: bool
    reason: str
    older: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = ()
    newer: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = ()
    skipped: tuple[str, ...] = ()

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
    """This rank's view of what ``load_checkpoint`` means (reads the shared folder only).

    Raises:
        NotImplementedYet: ``load_checkpoint`` or ``output_dir`` is an ``s3://`` path.
    """
    if output_dir:
        local_path(output_dir, "output_dir")
    if not load_checkpoint:
        return _fresh("load_checkpoint is empty")
    path = local_path(load_checkpoint, "load_checkpoint")
    if storage.is_file(path):
        parsed = parse_legacy_name(path.name)
        if path.parent.name.startswith("rank_") and parsed is not None:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} is one rank's file of a rank_* tree; point load_checkpoint at "
                f"{path.parent.parent} (and name the step with resume_training: \"{path.name}\")")
        return LegacySource(path.parent, (path.name,), None, True, f"{path.name} is a single full checkpoint file")
    if not _exists(path):
        if inside(path, output_dir):
            return _fresh(f"{path} does not exist yet (inside the job's output_dir)")
        raise CheckpointNotFoundError(f"load_checkpoint {path} does not exist; point it at a folder of rank_* "
                                      "folders or one full checkpoint file, or leave it empty to start fresh")
    ranks = rank_folders(path)
    if not ranks:
        visible = [e.name for e in storage.list_dir(path) if not e.name.startswith(".")]
        if visible:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} holds no rank_* folders ({', '.join(visible[:5])}); for Checkpoint 2.0 "
                "iterations set use_legacy_format: false")
        return _fresh(f"{path} is empty")
    if not any(parse_legacy_name(e.name) for r in ranks for e in storage.list_dir(path / r)) and not any(
            _exists(path / r / v1.META_JSON) for r in ranks):
        return _fresh(f"{path} holds rank folders but no checkpoint yet")
    if isinstance(resume_training, str):
        names = tuple(f"{r}/{v1.substitute_rank(resume_training, int(r[5:]))}" for r in ranks)
        # A rank beyond the source's rank folders (a larger job converting) has no file of its own.
        if rank < len(names) and not storage.is_file(path / names[rank]):
            raise CheckpointNotFoundError(f"resume_training {resume_training!r}: rank {rank} has no "
                                          f"{path / names[rank]}")
        parsed = parse_legacy_name(resume_training)
        assert parsed is not None
        named = (parsed.epoch, parsed.step)
        try:
            steps = complete_steps(path, fmt)
        except CheckpointNotFoundError:  # the named step is all there is (or another format)
            steps = []
        return LegacySource(path, names, named, False, f"resume_training names {resume_training}",
                            newer=tuple(step for step in steps if step[0] > named))
    (position, files), *older = steps = complete_steps(path, fmt)
    reason = f"epoch {position[0]} step {position[1]} is the newest step complete on every rank"
    if resume_training is True:
        return LegacySource(path, files, position, False, reason, older=tuple(older))
    return LegacySource(path, files, position, False, reason, newer=tuple(steps))


def _exists(path: Path) -> bool:
    """``Path.exists``: something is there, links followed (a dangling link is nothing)."""
    entry = storage.stat(path)
    if entry is None or not (entry.link and entry.special):
        return entry is not None
    return storage.stat(path.resolve()) is not None  # a link to a FIFO or a device, or a dangling one


def complete_steps(root: Path, fmt: str) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
    """The steps complete on every rank, newest first, files relative to ``root``."""
    return [(pos, tuple(f"{p.parent.name}/{p.name}" for p in paths))
            for pos, paths in complete_legacy_steps(root, fmt, _tolerant_bound)]


def _tolerant_bound(folder: Path) -> tuple[int, int] | None:
    """A rank folder's ``meta.json`` bound; a damaged one bounds nothing (warned): the others' bounds decide."""
    try:
        meta = v1.read_meta(folder)
    except (CorruptCheckpointError, OSError) as exc:
        log.warning("ignoring %s: %s", folder / v1.META_JSON, exc)
        return None
    return None if meta is None else meta.position


def _check_share(root: Path, files: Sequence[str], me: int, world: int) -> list[tuple[str, str]]:
    """Check the files ``i`` with ``i % world == me`` (:func:`~resumable.legacy.files.check_rank_file`).

    Returns:
        The problems, as (error type name, message).
    """
    problems = []
    records: dict[Path, dict[str, v1.FileRecord]] = {}
    for i, name in enumerate(files):
        if i % world != me:
            continue
        path = root / name
        if path.parent not in records:
            records[path.parent], why = folder_records(path.parent)
            if why is not None:
                log.warning("%s: %s files are checked by their own block checksums, or (.ckpt) by size and "
                            "structure only", why, path.parent)
        try:
            check_rank_file(root, name, records[path.parent].get(path.name))
        except (CheckpointError, OSError) as exc:
            problems.append((type(exc).__name__, str(exc)))
    return problems


def _verified(source: LegacySource, group: dist.Group) -> LegacySource:
    """The newest of ``source``'s step and its fallbacks whose files all pass their check, on every rank.

    Raises:
        CorruptCheckpointError: on every rank, naming each failed file, when no step passes
            (with no fallbacks: when the chosen one fails).

    Collective: one 8-byte all-reduce per step tried (texts gathered only on failure).
    """
    assert source.root is not None
    me, world = dist.rank(group), dist.world_size(group)
    candidates = [(source.position, source.files), *source.older]
    skipped: list[str] = []
    for n, (position, files) in enumerate(candidates):
        problems = _check_share(source.root, files, me, world)
        if dist.all_reduce_max([len(problems) > 0], group)[0] == 0:
            if n == 0:
                return source
            return replace(source, files=files, position=position, older=tuple(candidates[n + 1:]),
                           newer=tuple(candidates[:n]), skipped=tuple(skipped),
                           reason=f"epoch {position[0]} step {position[1]} is the newest step complete and intact "
                                  "on every rank")
        gathered = [p for rank_problems in dist.all_gather_object(problems, group) for p in rank_problems]
        found = "; ".join(text for _, text in gathered)
        if n + 1 == len(candidates):
            kind = getattr(errors, gathered[0][0], None)  # the first failure's type (an unsafe link stays unsafe)
            cls = kind if isinstance(kind, type) and issubclass(kind, CheckpointError) else CorruptCheckpointError
            raise cls(f"{source.root}: epoch {position[0]} step {position[1]} cannot be loaded: "
                                         f"{found}" + ("; no older step complete on every rank is intact either"
                                                       if n else ""))
        log.warning("skipping epoch %d step %d of %s: %s; falling back to epoch %d step %d", *position, source.root,
                    found, *candidates[n + 1][0])
        skipped.append(f"epoch {position[0]} step {position[1]}: {found}")
    raise AssertionError("unreachable: the last candidate raises")


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

    Every file of a tree's chosen step is checked before anything loads it (file ``i`` by
    rank ``i mod world``): size and xxh3-64 against its folder's ``meta.json``, or its
    header when no intact ``meta.json`` records it. With ``resume_training: true`` a step
    that fails (a torn or damaged file, a rank whose ``meta.json`` is damaged and whose file
    is torn, ...) is skipped with a warning for the newest older step complete on every
    rank that passes; a damaged ``meta.json`` bounds nothing (the other ranks' do).

    Returns:
        The same :class:`LegacySource` on every rank.

    Raises:
        CheckpointNotFoundError / CorruptCheckpointError / ValueError: on every rank, naming
            each failing rank and path (a named step, or ``resume_training: false``, never
            falls back).

    Collective: every rank calls it (one all_gather, one all-reduce per step checked).
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
    if not chosen.fresh and not chosen.single:
        chosen = _verified(chosen, process_group)
    log.info("load_checkpoint=%r: %s", load_checkpoint, "fresh start: " + chosen.reason if chosen.fresh
             else f"loading {chosen.root} ({chosen.reason})")
    return chosen
