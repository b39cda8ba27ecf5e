"""``resumable list DIR``: one row per iteration of a Checkpoint 2.0 folder.

Each row: the step, whether it is committed, whether it is valid (every file metadata.json
names present with its size, metadata.json and common.json sealed and matching; with
``verify`` also every file's xxh3-64 and block checksums), its size on disk, its age, and
whether the tracker names it; given a retention policy (the job's: the folder does not record
it), which of its policies or protections keep each committed iteration
(:func:`resumable.retention.decide`). Reads no tensor data unless ``verify``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from resumable import commit, storage
from resumable.errors import CheckpointError, CheckpointNotFoundError, NotImplementedYet
from resumable.formats import v2
from resumable.manager import read_metric
from resumable.retention import Policy, decide
from resumable.resolve import verify_files
from resumable.storage import AnyPath
from resumable.tools import legacy_tree, walk_files


@dataclass
class Row:
    """One iteration folder (committed or a save that never finished)."""

    iteration: int
    folder: str
    committed: bool
    valid: bool | None          # None: not committed, nothing to check
    problem: str | None         # why it is not valid
    bytes: int                  # every regular file under the folder
    age_s: float                # since its newest file was written
    tracked: bool               # the tracker names it
    kept_by: list[str] | None = None  # with a policy: its reasons (resumable.retention.REASONS); [] deleted next


def _size_and_mtime(folder: AnyPath, mtime_ns: int) -> tuple[int, float]:
    """Bytes of every file under ``folder`` and the newest modification time (the folder's own, ``mtime_ns``,
    included: an object store has none, 0)."""
    size, newest = 0, mtime_ns
    for _, entry in walk_files(folder):
        size += entry.size
        newest = max(newest, entry.mtime_ns)
    return size, newest / 1e9


def _problem(folder: AnyPath, checksum: bool) -> str | None:
    try:
        meta = v2.read_metadata(folder)
        verify_files(folder, meta, checksum=checksum)
        v2.read_common(folder, meta)
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def list_iterations(directory: str | os.PathLike[str], *, verify: bool = False,
                    policy: Policy | None = None) -> tuple[list[Row], str | None]:
    """Rows oldest first, and the tracker's problem (None when it is readable or absent).

    ``policy``: fill each committed row's ``kept_by`` as the job's next retention would decide.

    Raises:
        CheckpointNotFoundError: ``directory`` is not a folder.
        NotImplementedYet: a legacy (``rank_*``) tree.
        ValueError: ``directory`` is one iteration folder (list its parent).
    """
    directory = storage.as_path(directory)
    entry = storage.stat(directory)
    if entry is None or not entry.is_dir:
        raise CheckpointNotFoundError(f"{directory}: no such folder; give a checkpoint folder "
                                      "(<output_dir>/checkpoint, holding iteration_* folders)")
    if commit.parse_iteration(directory.name) is not None:
        raise ValueError(f"{directory} is one iteration; list the checkpoint folder holding it: "
                         f"resumable list {directory.parent}")
    if legacy_tree(directory):
        raise NotImplementedYet(f"resumable list on a legacy (rank_*) tree such as {directory}; "
                                f"use resumable inspect {directory} or resumable verify {directory}")
    tracker_problem = None
    try:
        tracked = commit.read_tracker(directory)
    except CheckpointError as exc:
        tracked, tracker_problem = None, str(exc)
    rows = []
    now = time.time()
    for found in storage.list_dir(directory):
        name = found.name.removeprefix(".tmp-")
        n = commit.parse_iteration(name)
        if n is None or found.link or not found.is_dir:
            continue
        child = directory / found.name
        committed = found.name == name and commit.is_committed(child)
        size, mtime = _size_and_mtime(child, found.mtime_ns)
        problem = _problem(child, verify) if committed else None
        rows.append(Row(n, str(child), committed, (problem is None) if committed else None, problem, size,
                        max(0.0, now - mtime), committed and n == tracked))
    rows.sort(key=lambda r: (r.iteration, r.committed))
    if policy is not None:
        committed = {r.iteration: storage.as_path(r.folder) for r in rows if r.committed}
        metrics = {n: read_metric(f, policy.best.metric) if policy.best else 0.0 for n, f in committed.items()}
        kept = decide(metrics, policy, tracker=tracked)
        for r in rows:
            if r.committed:
                r.kept_by = list(kept.get(r.iteration, ()))
    return rows, tracker_problem


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f} {unit}"
    return f"{seconds:.0f} s"


def render(directory: str, rows: list[Row], tracker_problem: str | None, verify: bool) -> str:
    """The table ``resumable list`` prints, then one line per invalid iteration and the tracker's problem."""
    checked = "checksums" if verify else "sizes"
    policy = any(r.kept_by is not None for r in rows)
    lines = [f"{'step':>10}  {'committed':<9}  {'valid (' + checked + ')':<17}  {'size':>10}  {'age':>9}  "
             + ("tracker    kept by" if policy else "tracker")]
    for r in rows:
        valid = "-" if r.valid is None else ("yes" if r.valid else "NO")
        line = (f"{r.iteration:>10}  {'yes' if r.committed else 'no':<9}  {valid:<17}  "
                f"{r.bytes / 1e6:>7.1f} MB  {_age(r.age_s):>9}  {'<- latest' if r.tracked else '':<9}")
        if r.kept_by is not None:
            line += "  " + (", ".join(r.kept_by) or "nothing: the next save deletes it")
        lines.append(line.rstrip())
    if not rows:
        lines.append(f"{directory}: no iteration folders")
    lines += [f"PROBLEM step {r.iteration}: {r.problem}" for r in rows if r.problem]
    if tracker_problem:
        lines.append(f"PROBLEM tracker: {tracker_problem}")
    return "\n".join(lines)


def as_json(directory: str, rows: list[Row], tracker_problem: str | None, verify: bool) -> dict:
    """``resumable list --json``: ``{"path", "checked", "tracker_problem", "iterations": [Row fields]}``."""
    return {"path": directory, "checked": "checksums" if verify else "sizes", "tracker_problem": tracker_problem,
            "iterations": [asdict(r) for r in rows]}
