"""Which checkpoint to load: follow the tracker, an ``iteration_*`` folder, or a fresh start.

``load_checkpoint`` (docs/formats.md) may name:

- a checkpoint folder with ``latest_checkpointed_iteration.txt``: the iteration the
  tracker names (a hand-edited tracker is obeyed);
- a checkpoint folder without a tracker: its newest committed iteration;
- an ``iteration_XXXXXXXX`` folder: that iteration;
- an empty folder, a folder not created yet inside the job's own ``output_dir``, or
  ``""``: a fresh start (random initialisation), logged.

Everything else is an error that names the path and says what to do: a missing path
outside the job's output folder, a tracker naming a missing iteration, an incomplete
folder (no ``metadata.json``, a ``.tmp-`` folder of an unfinished save). An incomplete
checkpoint is never loaded silently. With ``fallback=True`` (``resume_training: true``)
a tracker whose target is missing, incomplete or damaged makes us load the newest
iteration that is committed *and* passes the size check instead, with a warning that
says what was skipped and why.

"Committed" is :func:`resumable.commit.is_committed`, the one definition. Nothing here
is collective: every rank may resolve on its own (they read the same shared folder), or
rank 0 resolves and broadcasts the result.

Example::

    r = resolve_checkpoint("output/checkpoint", output_dir="output", fallback=True)
    if r.fresh:
        init_weights()
    else:
        load(state, r.path)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from resumable.commit import (
    TRACKER,
    committed_iterations,
    is_committed,
    iteration_dirname,
    parse_iteration,
    read_tracker,
)
from resumable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from resumable.formats import v2
from resumable.formats.safetensors_io import verify_file
from resumable import storage
from resumable.storage import AnyPath, ObjectPath

log = logging.getLogger(__name__)

__all__ = ["Resolution", "fall_back", "resolve_checkpoint", "resolve_directory", "verify_files"]


@dataclass(frozen=True)
class Resolution:
    """The outcome of resolving ``load_checkpoint``.

    Attributes:
        path: the ``iteration_*`` folder to load, or None for a fresh start.
        iteration: its iteration number, or None for a fresh start.
        reason: one sentence saying why this folder (or nothing) was chosen.
        skipped: with a fallback, each newer candidate skipped and why (``"iteration_X (why)"``).
    """

    path: Path | None
    iteration: int | None
    reason: str
    skipped: tuple[str, ...] = ()

    @property
    def fresh(self) -> bool:
        """True when nothing is to be loaded (random initialisation)."""
        return self.path is None


def verify_files(folder: AnyPath | str, meta: v2.Metadata | None = None, *,
                 checksum: bool = False, only: set[str] | None = None) -> int:
    """Check that every file ``metadata.json`` names exists with its recorded size (and checksums).

    Args:
        folder: an ``iteration_*`` folder.
        meta: its parsed metadata (read when None).
        checksum: also compare the xxh3-64 of each file with the recorded one and check
            every block checksum the file's header records (one read of every byte of
            every checked file).
        only: check just these file names (a rank's share of a distributed check).

    Returns:
        How many of the checked files had their block checksums checked (0 without ``checksum``).

    Raises:
        CheckpointNotFoundError: a file is missing (named).
        CorruptCheckpointError: a file's size, checksum or a block checksum differs (named, with both values).

    Example:
        >>> verify_files("ckpt/iteration_00000100", checksum=True)
    """
    folder = storage.as_path(folder)
    meta = meta if meta is not None else v2.read_metadata(folder)
    table = v2.FILES if meta.format_version >= 2 else v2.METADATA  # where the sizes and checksums are
    blocks = 0
    names = sorted(meta.files if only is None else only)
    sizes = _sizes(folder, names, listing=only is None)
    for name in names:
        info = meta.files.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{folder / name}: read by this rank but not listed in {v2.FILES}; "
                                         "the metadata is damaged: rebuild it from the files")
        path = folder / name
        size = sizes[name]
        if size is None:
            raise CheckpointNotFoundError(
                f"{path}: missing; {table} lists it with {info.size} bytes. The checkpoint is "
                "incomplete: restore the file or load another iteration") from None
        if size != info.size:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes on disk, {table} records {info.size}; the file is "
                "truncated or was replaced: restore it or load another iteration")
        if checksum:
            digest, had_blocks, failed = verify_file(path)
            blocks += had_blocks
            if digest != info.xxh3_64:
                raise CorruptCheckpointError(
                    f"{path}: xxh3-64 checksum {digest} differs from {info.xxh3_64} recorded in "
                    f"{table}; the file is damaged: restore it or load another iteration")
            if failed is not None:  # the bytes are those saved, the header's block record is not
                raise failed
    return blocks


def _sizes(folder: AnyPath, names: list[str], *, listing: bool) -> dict[str, int | None]:
    """The size of each file (None: missing). An object store answers one listing for the whole
    folder (``listing``), a rank checking its own share a request per file: never every rank a
    listing of every rank's files."""
    if listing and isinstance(folder, ObjectPath):
        found = {e.name: e.size for e in storage.list_dir(folder) if not e.is_dir}
        return {n: found.get(n) for n in names}
    return {n: (e.size if (e := storage.stat(folder / n)) is not None and not e.is_dir else None) for n in names}


def check_iteration_folder(folder: AnyPath) -> int:
    """The iteration of a committed folder, or a clear error saying why it is not loadable."""
    name = folder.name
    if name.startswith((".tmp-", ".old-", ".del-")):
        raise CorruptCheckpointError(
            f"{folder} is the temporary folder of an unfinished save or deletion, not a checkpoint; "
            f"point load_checkpoint at a committed iteration_* folder or at {folder.parent}")
    iteration = parse_iteration(name)
    if iteration is None:
        raise CheckpointNotFoundError(f"{folder} is not an iteration_XXXXXXXX folder")
    if isinstance(folder, Path) and folder.is_symlink():
        raise CorruptCheckpointError(
            f"{folder} is a symlink (to {os.readlink(folder)}), not a committed checkpoint: an iteration folder is "
            "never a link (its files would be read from outside the checkpoint folder, and retention would count "
            "and delete through it). Point load_checkpoint at the folder it links to, or copy that folder in")
    if not storage.is_dir(folder):
        raise CheckpointNotFoundError(
            f"{folder} does not exist; committed iterations in {folder.parent}: "
            f"{_loadable(folder.parent)}")
    # is_committed() also accepts a MindFormers single-rank folder (common.json, no
    # metadata.json); a Checkpoint 2.0 load needs metadata.json, so it is required here.
    if not is_committed(folder) or not storage.is_file(folder / v2.METADATA):
        raise CorruptCheckpointError(
            f"{folder} is incomplete (no readable metadata.json): the save that wrote it did not "
            f"finish. Load another iteration (committed: {_loadable(folder.parent)}) "
            "or delete the folder")
    return iteration


def _loadable(directory: AnyPath) -> list[int]:
    """Committed iterations of ``directory`` that have a metadata.json (for messages)."""
    return [n for n in committed_iterations(directory)
            if storage.is_file(directory / iteration_dirname(n) / v2.METADATA)]


def _valid(folder: AnyPath) -> str | None:
    """None when ``folder`` is committed, its metadata.json passes its seal and parses, common.json matches
    the size and checksum metadata.json records and every data file has its size; else why not."""
    try:
        check_iteration_folder(folder)
        meta = v2.read_metadata(folder)
        verify_files(folder, meta)
        v2.read_common(folder, meta)
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def _fallback(directory: AnyPath, skipped: list[str], tried: int | Iterable[int] | None = None) -> Resolution:
    """The newest committed and valid iteration of ``directory`` (other than ``tried``), warning about what was skipped."""
    tried = {tried} if isinstance(tried, int) else set(tried or ())
    for n in reversed(committed_iterations(directory)):
        if n in tried:
            continue
        folder = directory / iteration_dirname(n)
        problem = _valid(folder)
        if problem is None:
            log.warning("resume_training: skipped %s; loading %s instead", "; ".join(skipped), folder)
            return Resolution(folder, n, f"newest valid iteration after skipping: {'; '.join(skipped)}",
                              tuple(skipped))
        skipped.append(f"{folder.name} ({problem})")
    raise CorruptCheckpointError(
        f"{directory}: no committed and valid iteration to resume from; skipped: {'; '.join(skipped)}. "
        "Restore a checkpoint or clear load_checkpoint to start fresh")


def fall_back(directory: AnyPath | str, failed: Mapping[int, str]) -> Resolution:
    """``resume_training: true`` after loading failed: the newest committed and valid iteration not in ``failed``.

    Used when an iteration passed resolution (sizes) but failed while loading (a checksum,
    a file header, common.json). Logs a warning naming every skipped iteration and why.

    Args:
        directory: the checkpoint folder.
        failed: iteration → why it could not be loaded.

    Raises:
        CorruptCheckpointError: nothing valid is left.
    """
    directory = storage.as_path(directory)
    skipped = [f"{iteration_dirname(n)} ({why})" for n, why in failed.items()]
    return _fallback(directory, skipped, failed.keys())


def resolve_directory(directory: AnyPath | str, *, fallback: bool = False) -> Resolution:
    """The checkpoint a resume from ``directory`` loads: the tracker's target, else the newest committed.

    Args:
        directory: a checkpoint folder (holding ``iteration_*`` folders and the tracker).
        fallback: when the tracker is unreadable or its target is missing, incomplete or
            fails the size check, load the newest committed and valid iteration instead
            (with a warning) rather than raising.

    Returns:
        A :class:`Resolution`; ``fresh`` when the folder holds no iteration at all.

    Raises:
        CheckpointNotFoundError: the tracker names a missing iteration (without ``fallback``).
        CorruptCheckpointError: the tracker is unreadable or names an incomplete folder
            (without ``fallback``), or nothing valid is left (with ``fallback``).

    Example:
        >>> resolve_directory("output/checkpoint").path
        PosixPath('output/checkpoint/iteration_00000200')
    """
    directory = storage.as_path(directory)
    try:
        target = read_tracker(directory)
    except CorruptCheckpointError as exc:
        if not fallback:
            raise
        return _fallback(directory, [f"{TRACKER} ({exc})"])
    if target is not None:
        folder = directory / iteration_dirname(target)
        problem = _valid(folder) if fallback else None
        if problem is not None:
            return _fallback(directory, [f"{folder.name} named by {TRACKER} ({problem})"], target)
        if not fallback and not storage.exists(folder):
            raise CheckpointNotFoundError(
                f"{directory / TRACKER} names iteration {target} but {folder} does not exist; "
                f"committed iterations: {_loadable(directory)}. Edit the tracker to one "
                "of them, or set resume_training: true to fall back to the newest valid one")
        check_iteration_folder(folder)
        return Resolution(folder, target, f"{TRACKER} names iteration {target}")
    committed = committed_iterations(directory)
    if committed:
        folder = directory / iteration_dirname(committed[-1])
        if fallback and (problem := _valid(folder)) is not None:
            return _fallback(directory, [f"{folder.name} ({problem})"], committed[-1])
        return Resolution(folder, committed[-1], f"no {TRACKER}; newest committed iteration")
    incomplete = sorted(e.name for e in storage.list_dir(directory) if parse_iteration(e.name) is not None)
    if incomplete:
        raise CorruptCheckpointError(
            f"{directory} holds only incomplete iterations ({', '.join(incomplete)}: no readable "
            "metadata.json); they are never loaded. Delete them to start fresh, or restore their metadata")
    return Resolution(None, None, f"{directory} holds no checkpoint yet")


def _inside(path: AnyPath, root: AnyPath) -> bool:
    if isinstance(path, ObjectPath) or isinstance(root, ObjectPath):
        try:
            path.relative_to(root)  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            return False
        return isinstance(path, ObjectPath) and isinstance(root, ObjectPath)
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _visible_entries(directory: AnyPath) -> list[str]:
    # Hidden names are leftovers of interrupted saves (.tmp-/.old-/.del-), atomic writes or the lock.
    return sorted(e.name for e in storage.list_dir(directory) if not e.name.startswith("."))


def resolve_checkpoint(load_checkpoint: str | os.PathLike[str] | None, *,
                       output_dir: str | os.PathLike[str] | None = None,
                       fallback: bool = False) -> Resolution:
    """Decide which Checkpoint 2.0 iteration ``load_checkpoint`` means, or that training starts fresh.

    Args:
        load_checkpoint: the YAML key's value: a checkpoint folder, an ``iteration_*``
            folder, or empty/None for a fresh start.
        output_dir: the job's own output folder; a ``load_checkpoint`` inside it that does
            not exist yet is a fresh start (automatic recovery, first run), elsewhere an error.
        fallback: ``resume_training: true``: see :func:`resolve_directory`.

    Returns:
        A :class:`Resolution` (``fresh`` when nothing is to be loaded). The choice is logged.

    Raises:
        CheckpointNotFoundError: the path does not exist (outside ``output_dir``), the
            tracker names a missing iteration, or the folder holds something other than
            Checkpoint 2.0 iterations.
        CorruptCheckpointError: an incomplete or temporary folder, a garbage tracker (see
            :func:`resolve_directory` for what ``fallback`` changes).

    Example:
        >>> resolve_checkpoint("output/checkpoint", output_dir="output").iteration
        200
    """
    result = _resolve(load_checkpoint, output_dir, fallback)
    if result.fresh:
        log.info("load_checkpoint=%r: fresh start (%s)", str(load_checkpoint or ""), result.reason)
    else:
        log.info("load_checkpoint=%r: loading %s (%s)", str(load_checkpoint), result.path, result.reason)
    return result


def _resolve(load_checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None,
             fallback: bool) -> Resolution:
    if load_checkpoint is None or str(load_checkpoint) == "":
        return Resolution(None, None, "load_checkpoint is empty")
    path = storage.as_path(load_checkpoint)
    if path.name.startswith((".tmp-", ".old-", ".del-")) or parse_iteration(path.name) is not None:
        iteration = check_iteration_folder(path)
        return Resolution(path, iteration, f"{path.name} was named explicitly")
    if not storage.exists(path):
        if output_dir is not None and _inside(path, storage.as_path(output_dir)):
            return Resolution(None, None, f"{path} does not exist yet (inside the job's output_dir)")
        raise CheckpointNotFoundError(
            f"load_checkpoint {path} does not exist; point it at a checkpoint folder or an "
            "iteration_* folder, or leave it empty to start fresh")
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(
            f"load_checkpoint {path} is a file; Checkpoint 2.0 loads a folder (the checkpoint folder "
            "or one iteration_* folder). For a single legacy file set use_legacy_format: true")
    result = resolve_directory(path, fallback=fallback)
    if result.fresh and any(n != TRACKER for n in _visible_entries(path)):
        raise CheckpointNotFoundError(
            f"{path} holds no Checkpoint 2.0 iteration (no {TRACKER}, no iteration_* folder) but is "
            f"not empty ({', '.join(_visible_entries(path)[:5])}); for rank_* trees set "
            "use_legacy_format: true, for a HuggingFace folder use pretrained_model_dir")
    return result
