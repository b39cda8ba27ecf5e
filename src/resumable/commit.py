"""Commit protocol: the only module that renames folders, replaces files and fsyncs folders.

A checkpoint is *committed* when its folder carries its final name
``iteration_XXXXXXXX`` and holds a readable ``metadata.json`` (or, for a MindFormers
single-rank checkpoint, a readable ``common.json`` and no ``metadata.json``).
:func:`is_committed` is the one definition used by discovery, retention, verification
and the CLI, on both backends. How a save gets there differs:

- local folder: files are written under ``.tmp-iteration_XXXXXXXX`` beside the final
  folder, metadata.json with them; the rename is the commit point;
- object store (no rename): every rank uploads its files under the final prefix; after
  every rank reported success the coordinator writes ``files.json`` and ``common.json``,
  then ``metadata.json`` (which records every file's size and checksum) last: its
  appearance is the commit point (a PUT is atomic), so a prefix without it is an
  interrupted save, removed at the next start with any multipart upload left open.

The tracker ``latest_checkpointed_iteration.txt`` is replaced only afterwards: locally
atomically (rename), on an object store with a conditional write (``If-Match`` the
version this job last read or wrote, ``If-None-Match: *`` when there was none), so two
jobs can never both advance it (:class:`~resumable.storage.Conflict`).

Folder names this module owns (all hidden, all removed by :func:`clean_leftovers`):

====================================  ===============================================
``.tmp-iteration_XXXXXXXX``           a save in progress, or (after an exchange) the
                                      previous copy of a replaced iteration
``.old-iteration_XXXXXXXX``           two-step replacement without ``renameat2``: the
                                      previous copy, set aside until the new one is in
``.del-iteration_XXXXXXXX``           retention: renamed away first, then deleted, so a
                                      crash mid-delete never leaves a half folder that
                                      looks committed
``.{name}.tmp-{pid}-{hex}``           :func:`atomic_write` in progress; as a folder
                                      (:func:`new_output_dir`), a tool's output being
                                      written, beside it (a crashed run's is left)
====================================  ===============================================

Nothing here is collective: callers decide which rank calls what (rank 0 commits).
Concurrency: safe for one job; two jobs writing one directory are not supported.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

from resumable import storage
from resumable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, SaveError
from resumable.formats.jsonfile import MAX_TRACKER_BYTES, load_json_object, parse_tracker, read_tracker_file
from resumable.retention import Metric, Missing, Policy, decide, describe
from resumable.storage import AnyPath, ObjectPath
from resumable.storage.local import fsync_dir, fsync_file, make_dirs, temp_path

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
COMMON = "common.json"
_ITER_RE = re.compile(r"^iteration_(\d{8,})$")
_LEFTOVER_RE = re.compile(r"^\.(tmp|old|del)-(iteration_\d{8,})$")
_ATOMIC_TMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")

#: Environment variable of the crash-test seam, see :func:`fault_point`.
FAULT_ENV = "RESUMABLE_FAULT"
_fault_hits: dict[str, int] = {}
_fault_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Crash-test seam: SIGKILL this process at the named point when ``RESUMABLE_FAULT`` asks for it.

    ``RESUMABLE_FAULT=<point>[:<n>][@<rank>]`` kills the process the ``n``-th time (default
    1st) it reaches ``<point>``, only on global rank ``<rank>`` (``RANK``; default any).
    SIGKILL, not an exception: nothing runs after it (no ``finally``, no atexit), exactly
    as when a node dies. Unset in production, it costs one dictionary lookup.

    Points, in the order a save reaches them: ``one-file-written`` (a writer, once per
    file: that file durable, its other file possibly half-written, as they are written
    concurrently), ``files-written`` (every rank, temp files fsynced, before agreeing),
    ``before-rename`` (rank 0, metadata.json and common.json in the temp folder),
    ``after-rename`` (rank 0, folder committed, tracker not yet updated), ``after-tracker``
    (rank 0, before retention), ``retention-renamed`` (a folder renamed to ``.del-`` but not
    yet deleted), ``atomic-write`` (a temp file of :func:`atomic_write` written, not yet
    renamed: the tracker, a legacy meta.json, a strategy file), ``staged`` (async: staged,
    background thread not started), ``legacy-file-published`` (legacy: this rank's file
    renamed into place, before agreeing), ``legacy-before-meta`` (legacy: every rank
    wrote, meta.json not yet replaced), ``legacy-after-meta`` (legacy: before retention),
    ``legacy-retention`` (legacy: before each file retention deletes).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    point, _, nth = spec.partition(":")
    if point != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    with _fault_lock:  # a rank's files are written by concurrent threads
        _fault_hits[name] = hits = _fault_hits.get(name, 0) + 1
    if hits == int(nth or 1):
        log.warning("%s=%s: killing process %d at %s", FAULT_ENV, os.environ[FAULT_ENV], os.getpid(), name)
        os.kill(os.getpid(), signal.SIGKILL)


def iteration_dirname(iteration: int) -> str:
    """``iteration_00000100`` for 100."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iteration_{iteration:08d}"


def parse_iteration(name: str) -> int | None:
    """The iteration of a final folder name, or None (temp folders never parse)."""
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def temp_dirname(iteration: int) -> str:
    """``.tmp-iteration_00000100``: where a save of 100 writes before it commits."""
    return ".tmp-" + iteration_dirname(iteration)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace local file ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    Writes a temp file in the same folder, fsyncs it, renames it over ``path`` and fsyncs
    the folder (``resumable.storage.local.atomic_write``, fault point ``atomic-write``
    before the rename). On any error the temp file is removed and ``path`` is untouched.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full.

    Example:
        >>> atomic_write(Path("ckpt") / "latest_checkpointed_iteration.txt", b"100\\n")
    """
    storage.local.atomic_write(path, data, lambda: fault_point("atomic-write"))


def publish_file(temp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename a complete, fsynced temp file (from :func:`temp_path`) to ``final`` and fsync the folder.

    Readers see the old ``final`` (if any) or the new one, never a partial file. The caller
    fsyncs the file's data first (the writers in ``formats`` do).
    """
    final = Path(final)
    os.replace(temp, final)
    fsync_dir(final.parent)


def new_output_dir(final: AnyPath | str) -> AnyPath:
    """A new, empty hidden folder beside ``final`` (``.{name}.tmp-{pid}-{hex}``) to write an output into.

    Its name is this process's own, so no other writer's temp folder is ever removed;
    :func:`publish_output_dir` renames it to ``final`` once complete. On an object store
    (no rename) the output is written in place: ``final`` itself, which must hold no object
    (a tool killed part way leaves a partial prefix, which a rerun refuses, naming it).

    Raises:
        CheckpointError: (object store) ``final`` already holds objects.
    """
    final = storage.as_path(final)
    if isinstance(final, ObjectPath):
        if storage.exists(final):
            raise CheckpointError(f"{final} already holds objects; choose another output or delete them "
                                  f"(aws s3 rm --recursive {final})")
        return final
    make_dirs(final.parent)
    temp = temp_path(final)
    storage.local.mkdir(temp)
    return temp


def publish_output_dir(temp: AnyPath, final: AnyPath) -> None:
    """Commit a tool's output folder: every file and folder in ``temp`` fsynced, then renamed to ``final``.

    The commit protocol for outputs that are not iterations (``merge``, ``convert --to
    hf|unified``): fsync every file under ``temp`` and then every folder (deepest first),
    rename ``temp`` to ``final`` (which must be missing or an empty folder: the rename
    replaces it atomically) and fsync the parent. After a power loss ``final`` is either
    absent (or still empty) or complete; never a complete-looking folder of empty files.

    On an object store the output was written in place (:func:`new_output_dir`): nothing to do.

    Raises:
        OSError: ``final`` is not empty (``ENOTEMPTY``), or a write-back error of a file.
    """
    if isinstance(final, ObjectPath):
        return
    temp, final = Path(temp), Path(final)
    storage.local.fsync_tree(temp)
    os.rename(temp, final)
    fsync_dir(final.parent)


def _json_object(path: AnyPath) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable, not an object, or hostile (a FIFO
    would block every command that looks for checkpoints; deep nesting would raise RecursionError)."""
    try:
        return load_json_object(path, "checkpoint file", _MAX_JSON, allow_nan=True)
    except (CheckpointError, OSError):
        return None


_MAX_JSON = 1 << 30  # formats.v2.MAX_METADATA_BYTES (not imported: v2 brings torch into this light module)

#: Keys only our common.json has (MindFormers' holds epoch/step/loss-scale scalars only).
_OUR_COMMON_KEYS = ("state", "rank_local")


def is_committed(folder: AnyPath | str) -> bool:
    """True when ``folder`` is a complete checkpoint; THE definition used everywhere, on both backends.

    A folder is committed when its name is ``iteration_XXXXXXXX`` (never a temp name)
    and it holds a ``metadata.json`` that parses as a JSON object (written last by every
    save, on an object store after every file it lists). A MindFormers single-rank
    checkpoint has no metadata.json; it counts when ``common.json`` parses and at least
    one ``.safetensors`` file is present, unless that common.json is ours (we always
    write metadata.json: ours without it is damaged, and must not count toward
    ``keep_checkpoint_max`` as a good checkpoint). A local symlink is never committed,
    whatever it points at: its files live outside the folder, and retention would delete
    through it.
    """
    folder = storage.as_path(folder)
    if parse_iteration(folder.name) is None:
        return False
    if isinstance(folder, Path) and (folder.is_symlink() or not folder.is_dir()):
        return False
    meta = _json_object(folder / METADATA)
    if meta is not None:
        return True
    if storage.exists(folder / METADATA):
        return False
    common = _json_object(folder / COMMON)
    return (common is not None and not all(k in common for k in _OUR_COMMON_KEYS)
            and any(e.name.endswith(".safetensors") and not e.is_dir for e in storage.list_dir(folder)))


def committed_iterations(directory: AnyPath | str) -> list[int]:
    """Iterations of the committed folders directly under ``directory``, oldest first."""
    directory = storage.as_path(directory)
    found = []
    for entry in storage.list_dir(directory):
        n = parse_iteration(entry.name)
        if n is not None and is_committed(directory / entry.name):
            found.append(n)
    return sorted(found)


#: Object store: the tracker's version (ETag) this process last read or wrote, per tracker.
_tracker_versions: dict[ObjectPath, str | None] = {}


def read_tracker(directory: AnyPath | str) -> int | None:
    """The iteration named by ``latest_checkpointed_iteration.txt``, or None when absent.

    Tolerates surrounding whitespace and a missing trailing newline (MindFormers
    writes none). On an object store the version read is remembered: the next
    :func:`write_tracker` of this process succeeds only if nobody wrote it since.

    Raises:
        CorruptCheckpointError: the file holds anything but one non-negative integer of at
            most 18 digits (UnsafeCheckpointError: not a regular file, or over 4 kB).
    """
    path = storage.as_path(directory) / TRACKER
    if isinstance(path, ObjectPath):
        data, version = storage.backend(path).read_versioned(path, "tracker", MAX_TRACKER_BYTES)
        _tracker_versions[path] = version
        return None if data is None else parse_tracker(data, path)
    try:
        return read_tracker_file(path)
    except CheckpointNotFoundError:
        return None


#: Object store: the tracker's user metadata naming the save that wrote it (see :func:`interrupted_commit`).
SAVED_BY = "resumable-saved"


def write_tracker(directory: AnyPath | str, iteration: int, *, by_save: bool = False) -> None:
    """Point the tracker at ``iteration`` (call only after that folder is committed).

    Local: atomically (rename). Object store: a conditional write against the version this
    process last read or wrote (read now when it never did); ``by_save``: the save of
    ``iteration`` writes it, and says so in the object's metadata (:data:`SAVED_BY`).

    Raises:
        SaveError: (object store) another job wrote the tracker since this one read it.
    """
    path = storage.as_path(directory) / TRACKER
    data = f"{iteration}\n".encode()
    if not isinstance(path, ObjectPath):
        atomic_write(path, data)
        return
    if path not in _tracker_versions:
        read_tracker(directory)
    try:
        _tracker_versions[path] = storage.backend(path).write_if(
            path, data, _tracker_versions[path], metadata={SAVED_BY: str(iteration)} if by_save else None)
    except storage.Conflict:
        _tracker_versions.pop(path, None)
        raise SaveError(f"{path} was changed by someone else since this job read it: another job is saving "
                        f"into {path.parent} (or the tracker was edited by hand); iteration {iteration} is "
                        "written but the tracker was not moved to it. Stop the other job; one job per "
                        "checkpoint folder") from None


def remove_tracker(directory: AnyPath | str) -> None:
    """Delete the tracker (resolution then falls back to the newest committed iteration)."""
    path = storage.as_path(directory) / TRACKER
    if storage.exists(path):
        storage.remove(path)
        if isinstance(path, Path):
            fsync_dir(path.parent)
    _tracker_versions.pop(path, None)  # type: ignore[arg-type]


def staging_folder(directory: AnyPath, iteration: int) -> AnyPath:
    """Where a save of ``iteration`` writes its files: the temp folder locally, the final prefix on an object store."""
    if storage.backend(directory).renames:
        return directory / temp_dirname(iteration)
    return directory / iteration_dirname(iteration)


def prepare_staging(directory: AnyPath, iteration: int) -> AnyPath:
    """Rank 0, before the ranks write: an empty staging folder for ``iteration`` (:func:`staging_folder`).

    Local: ``directory`` created (fsynced), a stale temp folder of an earlier attempt
    removed, the temp folder made. Object store: objects under the final prefix (an
    interrupted save of this iteration, or an uncommitted one) removed; a committed copy
    is uncommitted first (its metadata.json deleted) unless it is the tracker's target,
    which is refused: without rename, saving it again would leave no good checkpoint
    while the new one is written.

    Raises:
        SaveError: (object store) the iteration is committed and named by the tracker.
    """
    staging = staging_folder(directory, iteration)
    if isinstance(staging, Path):
        make_dirs(directory)  # a first save: <output_dir> fsynced after checkpoint/ appears
        if staging.exists():
            log.warning("removing stale %s left by an earlier attempt at this iteration", staging)
            storage.remove_tree(staging)
        storage.local.mkdir(staging)
        return staging
    if storage.exists(staging):
        if is_committed(staging):
            if read_tracker(directory) == iteration:
                raise SaveError(f"{staging} is committed and named by the tracker; on an object store it cannot "
                                "be replaced safely (there is no rename): save under a new iteration")
            storage.remove(staging / METADATA)  # uncommitted at once: never half a committed folder
        log.warning("removing %s (an earlier attempt at this iteration) before saving it again", staging)
        storage.remove_tree(staging)
    return staging


def commit_folder(staging: AnyPath, final: AnyPath, files: Sequence[tuple[str, bytes]]) -> AnyPath | None:
    """Rank 0, once every rank wrote: write ``files`` (metadata.json last) and commit.

    Local: the files written into the temp folder and fsynced with it, fault point
    ``before-rename``, then :func:`publish_folder`. Object store: each file uploaded in
    order, fault point ``before-rename`` before the last one (metadata.json), whose upload
    is the commit point.

    Returns:
        The previous copy set aside (local, the same iteration saved again), or None.
    """
    if isinstance(staging, ObjectPath):
        for name, data in files[:-1]:
            storage.write_atomic(staging / name, data)
        fault_point("before-rename")
        name, data = files[-1]
        storage.write_atomic(staging / name, data)
        return None
    for name, data in files:
        storage.local.write_durable(staging / name, data)
    fsync_dir(staging)
    fault_point("before-rename")
    return publish_folder(staging, final)


def discard_staging(staging: AnyPath) -> None:
    """Remove a failed save's staging folder (never a committed one: on an object store staging is final)."""
    if isinstance(staging, ObjectPath):
        if not is_committed(staging):
            storage.remove_tree(staging)
        return
    if staging.exists():
        storage.remove_tree(staging)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. a file system without exchange support: use the two-step path
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b} failed: {os.strerror(err)}")


def publish_folder(temp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path | None:
    """Rename a complete temp folder to its final name: the commit point of a save.

    When ``final`` already exists (the same iteration saved again) the old copy is kept
    until the tracker names the new one: the two are swapped atomically with
    ``renameat2(RENAME_EXCHANGE)`` and the old copy is set aside as ``.old-…`` (without
    exchange support: ``final`` → ``.old-…``, ``temp`` → ``final``). The caller removes
    it with :func:`discard_previous` once the tracker is written, or puts it back with
    :func:`unpublish_folder`; a crash in between leaves ``.old-…``, which
    :func:`clean_leftovers` removes (``final`` committed) or renames back. The parent
    folder is fsynced after the rename.

    Returns:
        The old copy's hidden path, or None when ``final`` did not exist.

    Raises:
        CheckpointError: ``final`` is a file or a symlink (not a folder a save wrote).

    Who calls it: the coordinator (rank 0) only, after every rank agreed the files are written.
    """
    temp, final = Path(temp), Path(final)
    parent = final.parent
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        kind = "a symlink" if final.is_symlink() else "a file"
        raise CheckpointError(
            f"{final} is {kind}, not a checkpoint folder, and is in the way of this save: move it out of "
            f"{parent} (a checkpoint folder holds only the iteration_* folders its saves write)")
    if not final.exists():
        os.rename(temp, final)
        fsync_dir(parent)
        return None
    old = parent / (".old-" + final.name)
    if old.exists() or old.is_symlink():
        _remove_entry(old)
    if _renameat2_exchange(temp, final):
        os.rename(temp, old)  # the previous copy, now under the temp name
    else:
        os.rename(final, old)
        os.rename(temp, final)
    fsync_dir(parent)
    return old


def unpublish_folder(final: AnyPath, temp: AnyPath, previous: Path | None = None) -> None:
    """Undo :func:`publish_folder` when the tracker could not be updated.

    The new copy goes back to ``temp`` (the caller removes it) and ``previous`` (the old
    copy :func:`publish_folder` returned) back to ``final``, so the tracker's target is
    whole again and "nothing was committed" is true. A crash between the two renames
    leaves ``.old-…`` without ``final``: :func:`clean_leftovers` renames it back.
    On an object store (no rename: ``final`` is the staging prefix) metadata.json is deleted
    first (the iteration is uncommitted at once), then the rest.
    Who calls it: the coordinator (rank 0) only.
    """
    if isinstance(final, ObjectPath):
        storage.remove(final / METADATA)
        storage.remove_tree(final)
        return
    final = Path(final)
    os.rename(final, temp)
    if previous is not None:
        os.rename(previous, final)
    fsync_dir(final.parent)


def discard_previous(previous: Path | None) -> None:
    """Remove the old copy :func:`publish_folder` set aside, once the tracker names the new one.

    A failure is logged, not raised: the new checkpoint is committed, and
    :func:`clean_leftovers` removes the ``.old-…`` copy at the next start.
    """
    if previous is None:
        return
    try:
        _remove_entry(previous)
    except OSError as exc:
        log.warning("could not remove the replaced copy %s (removed at the next start): %s", previous, exc)


def _remove_entry(path: Path) -> None:
    """Remove a folder tree, or a file or symlink itself (a symlink is never followed)."""
    storage.remove_tree(path)


def clean_leftovers(directory: AnyPath | str) -> list[AnyPath]:
    """Remove what interrupted saves and deletions left behind; returns what was removed.

    Removes ``.tmp-iteration_*`` and ``.del-iteration_*`` folders and stale
    ``atomic_write`` temp files. An ``.old-iteration_X`` folder (a replacement
    interrupted) is renamed back to ``iteration_X`` when no committed ``iteration_X``
    exists, else removed. Such names that are files or symlinks (never ours: put there
    by hand, or a save that met a stray file) are unlinked, never followed. Every
    action is logged.

    On an object store (no temp names): an iteration prefix that is not committed (an
    interrupted save or deletion) is removed, and so is every multipart upload left open
    under ``directory`` (a writer killed mid-file).

    Who calls it: one process (rank 0) at start-up, before any save of this job begins;
    never while a save into ``directory`` is running.
    """
    directory = storage.as_path(directory)
    if isinstance(directory, ObjectPath):
        return _clean_object_leftovers(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for child in (directory / e.name for e in storage.list_dir(directory)):
        m = _LEFTOVER_RE.match(child.name)
        if m and (child.is_symlink() or not child.is_dir()):
            storage.remove(child)
            removed.append(child)
            log.warning("removed leftover %s (not a folder: a file or symlink is never followed)", child)
        elif m:
            final = directory / m.group(2)
            if m.group(1) == "old" and not is_committed(final):
                if final.exists() or final.is_symlink():
                    _remove_entry(final)  # an uncommitted half: the old copy is the good one
                os.rename(child, final)
                fsync_dir(directory)
                log.warning("restored %s from interrupted replacement %s", final, child.name)
                continue
            storage.remove_tree(child)
            removed.append(child)
            log.warning("removed leftover %s of an interrupted save or deletion", child)
        elif _ATOMIC_TMP_RE.match(child.name) and (child.is_symlink() or child.is_file()):
            storage.remove(child)
            removed.append(child)
            log.warning("removed leftover temp file %s", child)
    return removed


def _clean_object_leftovers(directory: ObjectPath) -> list[AnyPath]:
    removed: list[AnyPath] = []
    for key in storage.backend(directory).abort_uploads(directory):  # type: ignore[attr-defined]
        removed.append(ObjectPath(directory.bucket, key))
        log.warning("aborted the unfinished upload of s3://%s/%s (a save killed mid-file)", directory.bucket, key)
    for entry in storage.list_dir(directory):
        folder = directory / entry.name
        if entry.is_dir and parse_iteration(entry.name) is not None and not is_committed(folder):
            storage.remove_tree(folder)
            removed.append(folder)
            log.warning("removed leftover %s of an interrupted save or deletion (no metadata.json)", folder)
    return removed


def _delete(folder: AnyPath) -> None:
    """Delete an iteration: first made uncommitted in one atomic step, then removed.

    Local: renamed to ``.del-…``; object store: its metadata.json deleted. A crash part way
    leaves a leftover, never a half folder that looks committed.
    """
    if isinstance(folder, ObjectPath):
        storage.remove(folder / METADATA)
        fault_point("retention-renamed")
        storage.remove_tree(folder)
        return
    doomed = folder.parent / (".del-" + folder.name)
    if doomed.exists() or doomed.is_symlink():
        _remove_entry(doomed)
    os.rename(folder, doomed)
    fsync_dir(folder.parent)
    fault_point("retention-renamed")
    _remove_entry(doomed)


def iterations_after(directory: AnyPath | str, start: int) -> list[int]:
    """Iterations above ``start`` named by entries of ``directory``, oldest first.

    Every entry named like an iteration folder counts, committed or not (a damaged
    folder may be repaired), files and symlinks too: a save of that iteration would
    replace it or trip over it, and the tracker would move back below it.
    """
    return sorted(n for e in storage.list_dir(storage.as_path(directory))
                  if (n := parse_iteration(e.name)) is not None and n > start)


def interrupted_commit(directory: AnyPath | str) -> int | None:
    """The iteration whose save stopped between its folder rename and its tracker update, if any.

    It is the newest iteration, the only one above the tracker's target, committed, with
    a metadata.json written after the tracker. A tracker written after that folder (by
    hand: the user chose the older iteration) does not qualify. A resume from the
    tracker's target redoes that save, which replaces the folder; nothing else is lost.
    Object stores record modification times to the second only: there the tracker must still
    be the one the save of its target wrote (:data:`SAVED_BY` in its metadata); a tracker
    written by anything else (a hand edit, ``discard_newer_checkpoints``) does not qualify.
    """
    directory = storage.as_path(directory)
    try:
        target = read_tracker(directory)
    except CorruptCheckpointError:
        return None
    newer = iterations_after(directory, target) if target is not None else []
    if len(newer) != 1 or not is_committed(folder := directory / iteration_dirname(newer[0])):
        return None
    if isinstance(directory, ObjectPath):
        written_by = storage.backend(directory).user_metadata(directory / TRACKER)  # type: ignore[attr-defined]
        return newer[0] if written_by.get(SAVED_BY) == str(target) else None
    meta, tracker = storage.stat(folder / METADATA), storage.stat(directory / TRACKER)
    if meta is None or tracker is None:
        return None
    return newer[0] if meta.mtime_ns > tracker.mtime_ns else None


def discard_after(directory: AnyPath | str, start: int) -> list[int]:
    """Delete every iteration entry above ``start`` (asked for explicitly), the tracker first.

    The tracker is pointed at ``start`` when that iteration is committed here, else
    removed, before anything is deleted: it never names a deleted folder.

    Returns:
        The deleted iterations, oldest first (each logged).

    Who calls it: rank 0, at start-up, when the user asked to discard newer checkpoints.
    """
    directory = storage.as_path(directory)
    doomed = iterations_after(directory, start)
    if not doomed:
        return []
    if is_committed(directory / iteration_dirname(start)):
        write_tracker(directory, start)
    else:
        remove_tracker(directory)
    for n in doomed:
        _delete(directory / iteration_dirname(n))
        log.warning("discard_newer_checkpoints: deleted %s (newer than step %d this job starts from)",
                    directory / iteration_dirname(n), start)
    return doomed


def apply_retention(directory: AnyPath | str, policy: Policy, protect: Iterable[int] = (),
                    read_metric: Callable[[int], Metric] | None = None) -> list[int]:
    """Delete the committed checkpoints no policy keeps (:func:`resumable.retention.decide`).

    Never deletes the tracker's target, an iteration newer than it (a job that resumed
    from an older one must not delete what came after), an iteration in ``protect`` (the
    one being loaded or written), nor, with ``policy.best``, one whose metric is unreadable.
    Symlinks are never committed, so never counted nor deleted through. Oldest first, each
    folder first renamed to ``.del-…`` (atomic: it stops being committed at once), then
    deleted: a crash part way leaves only committed folders and ``.del-`` leftovers, which
    the next start removes; the tracker is never touched.

    Args:
        directory: the checkpoint folder.
        policy: the configured policies.
        protect: iterations that must not be deleted.
        read_metric: iteration → its ``policy.best.metric`` (``Missing`` when absent or
            unreadable); called only with ``policy.best``, for the committed iterations.

    Returns:
        The deleted iterations, oldest first.

    Who calls it: rank 0, after the tracker names the newest commit.
    """
    if not policy.deletes:
        return []
    directory = storage.as_path(directory)
    try:
        target = read_tracker(directory)
    except CorruptCheckpointError:
        log.warning("tracker in %s is unreadable; retention skipped", directory)
        return []
    committed = committed_iterations(directory)
    ranked = policy.best is not None and read_metric is not None
    metrics = {n: read_metric(n) if ranked else Missing.NOT_RECORDED for n in committed}
    kept = decide(metrics, policy, tracker=target, protected=protect)
    deleted = []
    for n in committed:
        if n in kept:
            continue
        folder = directory / iteration_dirname(n)
        _delete(folder)
        deleted.append(n)
        log.info("retention (%s): deleted %s", describe(policy), folder)
    return deleted


def latest_committed(directory: AnyPath | str) -> AnyPath | None:
    """The folder a resume should load: the tracker's target when committed, else the newest committed.

    Raises:
        CorruptCheckpointError: the tracker is unreadable, or names a folder that is not committed.
    """
    directory = storage.as_path(directory)
    target = read_tracker(directory)
    if target is not None:
        folder = directory / iteration_dirname(target)
        if not is_committed(folder):
            raise CorruptCheckpointError(
                f"{directory / TRACKER} names iteration {target} but {folder} is not a committed "
                f"checkpoint; committed iterations: {committed_iterations(directory)}; "
                "edit the tracker to one of them")
        return folder
    committed = committed_iterations(directory)
    return directory / iteration_dirname(committed[-1]) if committed else None
