"""``resumable list DIR``: one row per iteration of a Checkpoint 2.0 folder, or per step of a legacy tree.

Each row: the step, whether it is committed, whether it is valid (every file metadata.json
names present with its size, metadata.json and common.json sealed and matching; with
``verify`` also every file's xxh3-64 and block checksums), its size on disk, its age, and
whether the tracker names it; given a retention policy (the job's: the folder does not record
it), which of its policies or protections keep each committed iteration
(:func:`resumable.retention.decide`). Reads no tensor data unless ``verify``.

A legacy (``rank_*``) tree: one row per step's file (prefix, suffix, ``{epoch}_{step}``) found in
any rank folder; complete when every rank folder of the tree holds it; valid when each rank's
file matches its ``meta.json`` record (size; with ``verify`` its xxh3-64), or, without one, its
own block checksums or structure (:func:`resumable.legacy.files.check_rank_file`, what
``verify`` uses); the "latest" mark when every rank's ``meta.json`` names it (``latest_on``: the
ranks that do); with a policy, what keeps it in any rank folder, decided per rank folder as the
job's next save would (:func:`resumable.legacy.save.decide_folder`). A damaged ``meta.json`` is
the ``tracker_problem``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from resumable import commit, storage
from resumable.errors import CheckpointError, CheckpointNotFoundError
from resumable.formats import v1, v2
from resumable.formats.mindformers import LegacyFile, legacy_file_name, parse_legacy_name
from resumable.legacy.files import check_rank_file, rank_folders
from resumable.legacy.save import decide_folder
from resumable.manager import read_metric
from resumable.retention import REASONS, Policy, decide
from resumable.resolve import verify_files
from resumable.storage import AnyPath
from resumable.tools import legacy_tree, walk_files


@dataclass
class Row:
    """One iteration folder (committed or a save that never finished), or one step of a legacy tree."""

    iteration: int | None       # legacy: the global step its meta.json records (None: none does)
    folder: str                 # legacy: the tree
    committed: bool             # legacy: complete (a file in every rank folder)
    valid: bool | None          # None: not committed, nothing to check
    problem: str | None         # why it is not valid
    bytes: int                  # every regular file under the folder (legacy: the step's files)
    age_s: float                # since its newest file was written
    tracked: bool               # the tracker names it (legacy: every rank folder's meta.json does)
    kept_by: list[str] | None = None  # with a policy: its reasons (resumable.retention.REASONS); [] deleted next
    # Legacy trees only (None for Checkpoint 2.0):
    file: str | None = None          # the step's file name with the rank as {r}: CKP_rank_{r}_1-1_6.safetensors
    epoch_step: list[int] | None = None  # MindSpore's [epoch, step in epoch] of the name
    ranks: list[int] | None = None   # the rank folders holding it
    world_size: int | None = None    # rank folders the tree has (rank_0 ... rank_{n-1})
    latest_on: list[int] | None = None  # the rank folders whose meta.json names it


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

    A legacy (``rank_*``) tree gives one row per step's file (the module docstring), in retention
    order, and the damaged ``meta.json`` files as the tracker's problem.

    Raises:
        CheckpointNotFoundError: ``directory`` is not a folder.
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
        return _legacy_rows(directory, verify, policy)
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


def _legacy_rows(root: AnyPath, verify: bool, policy: Policy | None) -> tuple[list[Row], str | None]:
    """The rows of a legacy tree, oldest job then oldest step first, and its damaged meta.json files."""
    folders = {int(n[5:]): root / n for n in rank_folders(root)}
    world = max(folders) + 1  # a missing rank_N below the highest leaves every step incomplete
    metas: dict[int, v1.LegacyMeta | None] = {}
    damaged = []
    for r, folder in folders.items():
        metas[r] = None
        try:
            metas[r] = v1.read_meta(folder)
        except (CheckpointError, OSError) as exc:  # vouches for nothing: its files are checked on their own
            damaged.append(str(exc))
    steps: dict[tuple[int, int, int, str, str], dict[int, storage.Entry]] = {}  # retention order → rank → file
    listed = {r: storage.list_dir(folder) for r, folder in folders.items()}  # once: the rows and retention share it
    for r, folder in folders.items():
        for e in listed[r]:
            parsed = parse_legacy_name(e.name)
            if parsed is not None and parsed.rank == r and not (e.is_dir or e.special):
                steps.setdefault((parsed.suffix, parsed.epoch, parsed.step, parsed.ext, parsed.prefix), {})[r] = e
    kept = _legacy_kept(folders, listed, metas, policy) if policy is not None else None
    rows, now = [], time.time()
    for key in sorted(steps):
        held = steps[key]
        suffix, epoch, step, ext, prefix = key
        names = {r: legacy_file_name(LegacyFile(epoch, step, suffix, prefix, r, ext)) for r in range(world)}
        complete = sorted(held) == list(range(world))
        problems = _legacy_problems(root, names, metas, verify) if complete else []
        latest = [r for r, m in metas.items() if m is not None and m.file == names[r]]
        notes = [n for r in held if (m := metas.get(r)) is not None and (n := m.notes.get(names[r])) is not None]
        first = min(held)
        generic = f"{prefix}_rank_{{r}}" + names[first][len(f"{prefix}_rank_{first}"):]
        why = None if kept is None else [x for x in REASONS if any(x in kept.get(folders[r] / names[r], ())
                                                                      for r in held)]
        rows.append(Row(
            next((n.global_step for n in notes if n.global_step is not None), None), str(root), complete,
            (not problems) if complete else None, "; ".join(problems) or None, sum(e.size for e in held.values()),
            max(0.0, now - max(e.mtime_ns for e in held.values()) / 1e9), latest == list(range(world)), why,
            file=generic, epoch_step=[epoch, step], ranks=sorted(held), world_size=world, latest_on=latest))
    return rows, "; ".join(damaged) or None


def _legacy_problems(root: AnyPath, names: dict[int, str], metas: dict[int, v1.LegacyMeta | None],
                     verify: bool) -> list[str]:
    """Each rank's file of a complete step checked against its folder's meta.json record (the verify code)."""
    problems = []
    for r, name in names.items():
        meta = metas.get(r)
        try:
            check_rank_file(root, f"rank_{r}/{name}", meta.files.get(name) if meta is not None else None,
                            checksum=verify)
        except (CheckpointError, OSError) as exc:
            problems.append(str(exc))
    return problems


def _legacy_kept(folders: dict[int, AnyPath], listed: dict[int, list[storage.Entry]],
                 metas: dict[int, v1.LegacyMeta | None],
                 policy: Policy) -> dict[AnyPath, tuple[str, ...]]:
    """Each counted file → its reasons, decided per rank folder and prefix as that folder's next save would."""
    kept: dict[AnyPath, tuple[str, ...]] = {}
    for r, folder in folders.items():
        meta = metas[r]
        names = [e.name for e in listed[r] if not (e.link or e.is_dir or e.special)]
        prefixes = {p.prefix for p in map(parse_legacy_name, names) if p is not None and p.rank == r}
        for prefix in sorted(prefixes):
            _, why = decide_folder(names, prefix, r, policy, meta.notes if meta is not None else {},
                                   latest=meta.file if meta is not None else None)
            kept.update({folder / n: reasons for n, reasons in why.items()})
    return kept


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f} {unit}"
    return f"{seconds:.0f} s"


def render(directory: str, rows: list[Row], tracker_problem: str | None, verify: bool) -> str:
    """The table ``resumable list`` prints, then one line per invalid iteration and the tracker's problem.

    Legacy rows add a ``file`` column (the name, rank as ``{r}``), say ``complete`` (or how many
    rank folders of how many hold it) for ``committed``, and mark ``<- latest`` when every rank's
    meta.json names the step (``<- latest on rank 0`` when only some do).
    """
    checked = "checksums" if verify else "sizes"
    policy = any(r.kept_by is not None for r in rows)
    legacy = any(r.file is not None for r in rows)
    width = max([len(r.file or "") for r in rows] + [4])
    head = f"{'step':>10}  " + (f"{'file':<{width}}  {'complete':<9}" if legacy else f"{'committed':<9}")
    lines = [f"{head}  {'valid (' + checked + ')':<17}  {'size':>10}  {'age':>9}  "
             + ("tracker    kept by" if policy else "tracker")]
    for r in rows:
        valid = "-" if r.valid is None else ("yes" if r.valid else "NO")
        done = "yes" if r.committed else ("no" if r.ranks is None else f"{len(r.ranks)} of {r.world_size}")
        mark = "<- latest" if r.tracked else (f"<- latest on rank {', '.join(map(str, r.latest_on))}"
                                              if r.latest_on else "")
        step = "?" if r.iteration is None else r.iteration
        line = (f"{step:>10}  " + (f"{r.file or '':<{width}}  " if legacy else "") + f"{done:<9}  {valid:<17}  "
                f"{r.bytes / 1e6:>7.1f} MB  {_age(r.age_s):>9}  {mark:<9}")
        if r.kept_by is not None:
            line += "  " + (", ".join(r.kept_by) or "nothing: the next save deletes it")
        lines.append(line.rstrip())
    if not rows:
        lines.append(f"{directory}: no checkpoints (iteration_* folders, or rank_*/ files of a legacy tree)")
    lines += [f"PROBLEM step {_which(r)}: {r.problem}" for r in rows if r.problem]
    if tracker_problem:
        lines.append(f"PROBLEM {'meta.json' if legacy else 'tracker'}: {tracker_problem}")
    return "\n".join(lines)


def _which(r: Row) -> str:
    """A row as PROBLEM lines name it: the step, and a legacy row's file."""
    return str(r.iteration) if r.file is None else f"{'?' if r.iteration is None else r.iteration} ({r.file})"


def as_json(directory: str, rows: list[Row], tracker_problem: str | None, verify: bool) -> dict:
    """``resumable list --json``: ``{"path", "checked", "tracker_problem", "iterations": [Row fields]}``."""
    return {"path": directory, "checked": "checksums" if verify else "sizes", "tracker_problem": tracker_problem,
            "iterations": [asdict(r) for r in rows]}
