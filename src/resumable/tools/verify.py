"""Completeness and integrity of checkpoints (``resumable verify``), every problem reported.

For a checkpoint folder every ``iteration_*`` folder is checked (plus the tracker; the
temporary folders of a save in progress are not checkpoints and are skipped); for one
iteration folder, that one. A Checkpoint 2.0
folder must be committed (:func:`resumable.commit.is_committed`) and every file listed
by ``metadata.json`` must exist with its size and, unless ``checksum=False``, its
xxh3-64 and the per-block checksums its header records (:func:`resumable.resolve.verify_files`,
one read per file, one file at a time so that each damaged file is named); metadata.json
must pass its seal and common.json match the size and checksum metadata.json records
(format version 3), and the HuggingFace files common.json records (``iteration_*/hf/``,
:mod:`resumable.formats.hf_aux`) their sizes and checksums. The answer says exactly what was checked (:class:`Checked`). A legacy ``rank_*`` tree: every file of every rank folder, every step kept
(:func:`resumable.legacy.files.verify_tree`): resumable's against the checksums its
``meta.json`` records (or the file's block checksums), MindFormers' by size and structure
only, and the answer says how many of each. Other foreign formats (MindFormers,
HuggingFace) carry no checksums: their metadata and every file header are parsed and
checked against each other.

Example::

    problems = verify_path("output/checkpoint")
    for p in problems: print(p)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resumable import commit, storage
from resumable.errors import CheckpointError, ConfigError
from resumable.formats import hf_aux, v2
from resumable.formats.safetensors_io import read_header, verify_file
from resumable.legacy.files import check_rank_file, folder_records, verify_tree
from resumable.resolve import verify_files
from resumable.sources import detect, open_source
from resumable.storage import AnyPath
from resumable.tools import legacy_tree

__all__ = ["Problem", "verify_path"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a folder or file) and what, with what to do."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if not self.message.startswith(self.where) else self.message


#: How ``verify`` names the formats that carry no checksums.
NO_CHECKSUMS = {"hf": "a HuggingFace folder", "unified": "a unified folder",
                "mindformers": "a MindFormers checkpoint", "mindspore": "a MindSpore file",
                "torch": "a PyTorch file", "safetensors": "a safetensors file",
                "legacy": "a rank file without its meta.json record"}


@dataclass
class Checked:
    """What was checked, counted, so that ``verify`` says exactly that (a folder may mix format versions)."""

    checksum: bool = True
    whole: int = 0      # files whose whole-file xxh3-64 was compared
    blocks: int = 0     # ... and whose per-block checksums were too
    sealed: int = 0     # iterations whose metadata.json seal and common.json record were checked
    unsealed: int = 0   # iterations of format version 1 or 2 (no seals)
    foreign: str | None = None  # the format checked, when it carries no checksums
    foreign_files: int = 0      # its safetensors files, of which ``blocks`` carry block checksums (our exports)

    def describe(self) -> str:
        """E.g. ``sizes, whole-file xxh3-64 and per-block checksums; metadata.json and common.json seals``."""
        if self.foreign is not None:
            name = NO_CHECKSUMS.get(self.foreign, self.foreign)
            if self.blocks:  # written by resumable (convert --to hf|unified): their blocks were checked
                return (f"sizes, headers and per-block checksums ({self.blocks} of {self.foreign_files} safetensors "
                        f"files carry them); {name} carries no whole-file checksums")
            return f"sizes and headers only: {name} carries no checksums"
        if not self.checksum:
            parts = ["sizes and headers (no checksums: --no-checksum)"]
        else:
            parts = ["sizes, whole-file xxh3-64" + (" and per-block checksums" if self.blocks else "")]
            if 0 < self.blocks < self.whole:
                parts[0] += f" ({self.whole - self.blocks} file(s) written before block checksums)"
        if self.sealed:
            parts.append("metadata.json and common.json seals")
        if self.unsealed:
            parts.append(f"{self.unsealed} iteration(s) of format version 1 or 2 (no seals)")
        return "; ".join(parts)


def _verify_v2(folder: AnyPath, checksum: bool, seen: Checked) -> tuple[list[Problem], int]:
    try:
        meta = v2.read_metadata(folder)
    except (CheckpointError, OSError) as exc:
        return [Problem(str(folder / v2.METADATA), str(exc))], 0
    if meta.format_version >= 3:
        seen.sealed += 1
    else:
        seen.unsealed += 1
    problems = []
    for name in sorted(meta.files):
        try:
            seen.blocks += verify_files(folder, meta, checksum=checksum, only={name})
            seen.whole += checksum
            read_header(folder / name)
        except (CheckpointError, OSError) as exc:
            problems.append(Problem(str(folder / name), str(exc)))
    try:
        common = v2.read_common(folder, meta)
        files = hf_aux.recorded(folder / hf_aux.FOLDER, (common.get("state") or {}).get(hf_aux.STATE_KEY),
                                str(folder / v2.COMMON))
    except (CheckpointError, OSError) as exc:
        problems.append(Problem(str(folder / v2.COMMON), str(exc)))
        files = {}
    problems += [Problem(where, message) for where, message in hf_aux.problems(files, checksum=checksum)]
    return problems, len(meta.files) + len(files)


def _verify_foreign(path: AnyPath, checksum: bool = False, seen: Checked | None = None,
                    open_args: Mapping[str, Any] | None = None) -> tuple[list[Problem], int]:
    """Open a foreign checkpoint (metadata and headers checked); with ``checksum``, also check
    the block checksums of its safetensors files that carry them (resumable's exports)."""
    try:
        source = open_source(path, **(open_args or {}))
    except ConfigError:
        raise  # how the caller asked to read it (--names hf on other names): not a problem of the files
    except (CheckpointError, OSError, ValueError) as exc:
        return [Problem(str(path), str(exc))], 0
    problems = [Problem(where, message) for where, message in hf_aux.problems(source.hf_files, checksum=checksum)]
    if checksum and seen is not None:
        for file in _safetensors(path) if storage.is_dir(path) else [storage.as_path(source.path)]:
            if file.suffix != ".safetensors":
                continue
            seen.foreign_files += 1
            try:
                _, blocks, failed = verify_file(file)
            except (CheckpointError, OSError) as exc:
                problems.append(Problem(str(file), str(exc)))
                continue
            seen.blocks += blocks
            if failed is not None:
                problems.append(Problem(str(file), str(failed)))
    return problems, len({f for t in source.tensors.values() for c in t.chunks for f in c.where.split(", ") if f})


def _safetensors(folder: AnyPath) -> list[AnyPath]:
    """The ``*.safetensors`` files directly in ``folder``, sorted."""
    return [folder / e.name for e in storage.list_dir(folder) if not e.is_dir and e.name.endswith(".safetensors")]


def _written_by_resumable(folder: AnyPath) -> bool:
    """True when a Checkpoint 2.0 file of ``folder`` carries resumable's own ``__metadata__``.

    Such a folder is ours even without metadata.json (which ``is_committed`` would accept
    as a MindFormers single-rank checkpoint): then its metadata.json was lost.
    """
    for path in _safetensors(folder):
        if v2.parse_file_name(path.name) is None:
            continue
        try:
            return v2.META_FILE in read_header(path).metadata
        except (CheckpointError, OSError):
            continue
    return False


def _verify_one(folder: AnyPath, checksum: bool, seen: Checked,
                open_args: Mapping[str, Any]) -> tuple[list[Problem], int]:
    if not storage.exists(folder / v2.METADATA) and _written_by_resumable(folder):
        return [Problem(str(folder / v2.METADATA), "missing: the checkpoint is incomplete; rebuild it from the "
                        "files (resumable.formats.v2.rebuild_metadata) or delete the folder")], 0
    if not commit.is_committed(folder):
        return [Problem(str(folder), "incomplete: not a committed checkpoint (no readable metadata.json); "
                                     "the save that wrote it did not finish: delete it or restore it")], 0
    fmt, _ = detect(folder)
    if fmt == "v2":
        return _verify_v2(folder, checksum, seen)
    seen.foreign = fmt
    return _verify_foreign(folder, checksum, seen, open_args)


def _verify_rank_file(path: AnyPath, checksum: bool, seen: Checked,
                      open_args: Mapping[str, Any]) -> tuple[list[Problem], int]:
    """One of our Checkpoint 1.0 rank files given alone: its size and xxh3-64 against its folder's
    meta.json, else its own block checksums (as a tree's files are checked), then opened as a source."""
    record = folder_records(path.parent)[0].get(path.name)
    if record is not None:
        seen.foreign, seen.whole = None, int(checksum)
    try:
        compared = check_rank_file(path.parent, path.name, record, checksum=checksum)
    except (CheckpointError, OSError) as exc:
        return [Problem(str(path), str(exc))], 1
    if record is None:  # described as a foreign file whose blocks were (or were not) checked
        seen.foreign_files, seen.blocks = 1, int(compared)
    return _verify_foreign(path, open_args=open_args)[0], 1


def _verify_legacy(root: AnyPath, checksum: bool, open_args: Mapping[str, Any]) -> tuple[list[Problem], int, str]:
    found = verify_tree(root, checksum=checksum)
    problems = [Problem(w, m) for w, m in found.problems]
    if not problems:  # the files are intact: do the step a resume picks, its metadata and its HF files agree?
        problems = _verify_foreign(root, checksum, open_args=open_args)[0]
    what = (f"{found.checksummed} with checksums (whole-file xxh3-64 in meta.json or per-block; seals), "
            f"{found.sizes_only} sizes only" + (" (files that carry no checksums, e.g. MindFormers')"
                                                if found.sizes_only else ""))
    return problems, found.checksummed + found.sizes_only, what


def verify_path(path: str | os.PathLike[str], *, checksum: bool = True,
                **open_args: Any) -> tuple[list[Problem], int, str]:
    """Check one checkpoint or every checkpoint of a folder.

    Returns:
        ``(problems, files_checked, what)``: no problems means everything is complete and
        intact; ``what`` says exactly what was checked (:meth:`Checked.describe`: for ours
        "sizes, whole-file xxh3-64 and per-block checksums; metadata.json and common.json
        seals", for HuggingFace or MindFormers folders "sizes and headers only: ... carries no
        checksums"; for a legacy tree how many had checksums and how many sizes only).

    Args:
        open_args: how foreign sources are read (:func:`resumable.sources.open_source`'s
            ``heads``, ``fused``, ``names``, ``src_strategy``).

    Example::

        problems, n, what = verify_path("output/checkpoint/iteration_00000100", checksum=False)
    """
    path = storage.as_path(path)
    if legacy_tree(path):
        return _verify_legacy(path, checksum, open_args)
    seen = Checked(checksum)
    problems, checked = _verify_other(path, checksum, seen, open_args)
    return problems, checked, seen.describe()


def _verify_other(path: AnyPath, checksum: bool, seen: Checked,
                  open_args: Mapping[str, Any]) -> tuple[list[Problem], int]:
    entry = storage.stat(path)
    if entry is None:
        return [Problem(str(path), f"{path} does not exist")], 0
    is_file = not entry.is_dir and not entry.special
    if entry.is_dir and (commit.parse_iteration(path.name) is not None
                         or path.name.startswith((".tmp-", ".old-", ".del-"))):
        return _verify_one(path, checksum, seen, open_args)
    iterations = [] if not entry.is_dir else [
        path / e.name for e in storage.list_dir(path) if e.is_dir and commit.parse_iteration(e.name) is not None]
    if not iterations:
        try:
            seen.foreign = detect(path)[0]
        except (CheckpointError, OSError):
            pass  # _verify_foreign names the problem
        if is_file and seen.foreign == "legacy":
            return _verify_rank_file(path, checksum, seen, open_args)
        return _verify_foreign(path, checksum, seen, open_args)
    problems: list[Problem] = []
    checked = 0
    try:
        target = commit.read_tracker(path)
        if target is not None and not commit.is_committed(path / commit.iteration_dirname(target)):
            problems.append(Problem(str(path / commit.TRACKER), f"names iteration {target}, which is not a "
                                    "committed folder; edit it to a committed iteration"))
    except CheckpointError as exc:
        problems.append(Problem(str(path / commit.TRACKER), str(exc)))
    for folder in iterations:
        found, n = _verify_one(folder, checksum, seen, open_args)
        problems += found
        checked += n
    return problems, checked
