"""Checkpoint 1.0 (legacy) on disk: file names, meta.json, file metadata, strategy files, ``.ckpt`` I/O.

The layout is in ``docs/formats.md`` ("Checkpoint 1.0"); names follow MindFormers
(``docs/mindformers.md``) and are parsed with :mod:`resumable.formats.mindformers`::

    <output_dir>/checkpoint/rank_{r}/{prefix}_rank_{r}[_{k}]-{epoch}_{step}.{safetensors|ckpt}
    <output_dir>/checkpoint/rank_{r}/meta.json      {"last_epoch", "last_step", "last_ckpt_file", "files", "seal"}
    <output_dir>/strategy/ckpt_strategy_rank_{r}.ckpt

``{epoch}_{step}`` is MindSpore's: the 1-based epoch the step belongs to and the 1-based
step inside that epoch (the last step of the first epoch of 10 steps is ``1_10``, the
next one ``2_1``), so name order is training order (:func:`name_position`).

What a rank's file holds (both formats hold the same keys):

- its chunks of every network and optimizer tensor, under the tensor's name (``name@o0,o1``
  when it holds several chunks of one tensor, as Checkpoint 2.0 does);
- the context scalars ``epoch_num``, ``step_num``, ``global_step``, ``consumed_samples``,
  ``global_batch_size`` (int64, shape ``[]``) and ``loss_scale`` (float32, when set);
- ``__metadata__`` (str → str): ``format`` ``"pt"``, ``remove_redundancy`` ``"True"|"False"``
  and ``resumable_legacy``: JSON of the chunk map (key → name, global shape, offsets),
  the writing rank, the layout and the context (the non-tensor state and ``rank_local``).

``meta.json`` keeps MindFormers' three keys and, when resumable wrote it, ``files``: the
size and whole-file xxh3-64 of every rank file of the folder written by resumable (a file
cannot vouch for itself, so its checksum lives here, written after it), with the global
step and metrics the save recorded (what retention ranks by, :class:`FileNote`), and ``seal``: the
xxh3-64 of the other keys as canonical JSON, so that a damaged ``meta.json`` is detected
rather than trusted (:func:`read_meta`). Strategy files carry a ``seal`` of their own.

A ``.ckpt`` is ``torch.save`` of ``{key: tensor, ..., "__metadata__": {str: str}}`` and is
only ever read with ``torch.load(weights_only=True)``: a file carrying any pickled object
is refused (:func:`load_ckpt`). A strategy file is JSON (never pickle) describing one rank's
sharding (:func:`strategy_doc`).

This module is bytes and JSON only: no ``torch.distributed``, no renames (see ``commit``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import xxhash

from resumable import storage
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError
from resumable.formats import v2
from resumable.formats.jsonfile import files_in, load_json_object, parse_json_object
from resumable.formats.schema import MAX_DIM, MAX_NDIM, RESTORE, need_int, need_int_list, need_type, shown
from resumable.formats.torch_file import load_weights_only
from resumable.grid import check_placements
from resumable.formats.mindformers import LegacyFile, legacy_file_name, parse_legacy_name

__all__ = [
    "META_JSON",
    "FileInfo",
    "FileNote",
    "FileRecord",
    "LegacyMeta",
    "file_metadata",
    "load_ckpt",
    "meta_bytes",
    "name_position",
    "next_suffix",
    "parse_file_metadata",
    "rank_file_name",
    "read_meta",
    "read_strategy",
    "save_ckpt",
    "seal",
    "strategy_doc",
    "strategy_file_name",
    "substitute_rank",
]

META_JSON = "meta.json"
META_KEY = "resumable_legacy"
STRATEGY_DIR = "strategy"
UNIFIED_DIR = "unified_checkpoint"
TRANSFORMED_DIR = "transformed_checkpoint"
STRATEGY_FORMAT = "resumable-strategy"
FORMATS = ("safetensors", "ckpt")
#: Context values also stored as scalar tensors (MindFormers keeps these in its files).
SCALARS = ("epoch_num", "step_num", "global_step", "consumed_samples", "global_batch_size", "loss_scale")
_STRATEGY_RE = re.compile(r"^ckpt_strategy_rank_(\d+)\.ckpt$")
MAX_STRATEGY_BYTES = 1 << 30


# ------------------------------------------------------------------------------ names


def rank_file_name(prefix: str, rank: int, suffix: int, epoch: int, step: int, fmt: str) -> str:
    """``{prefix}_rank_{rank}[_{suffix}]-{epoch}_{step}.{fmt}`` (no ``_0`` for suffix 0).

    Example:
        >>> rank_file_name("qwen3", 1, 2, 3, 4, "ckpt")
        'qwen3_rank_1_2-3_4.ckpt'
    """
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {fmt!r}")
    if not prefix or "/" in prefix or "\\" in prefix or "\0" in prefix:
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
    return legacy_file_name(LegacyFile(epoch, step, suffix, prefix, rank, fmt))


def substitute_rank(name: str, rank: int) -> str:
    """The same step's file name for ``rank`` (``resume_training: "<file name>"``).

    Example:
        >>> substitute_rank("qwen3_rank_0-200_1.safetensors", 1)
        'qwen3_rank_1-200_1.safetensors'

    Raises:
        ValueError: ``name`` is not a legacy file name (the message shows the expected form).
    """
    parsed = parse_legacy_name(Path(name).name)
    if parsed is None or Path(name).name != name:
        raise ValueError(
            f"resume_training: {name!r} is not a legacy checkpoint file name; expected a bare name like "
            "qwen3_rank_0-200_1.safetensors ({prefix}_rank_{rank}[_{k}]-{epoch}_{step}.{safetensors|ckpt})")
    return legacy_file_name(LegacyFile(parsed.epoch, parsed.step, parsed.suffix, parsed.prefix, rank, parsed.ext))


def next_suffix(names: list[str] | tuple[str, ...], prefix: str, rank: int) -> int:
    """The prefix suffix a new job uses so that it overwrites nothing.

    0 when no file of ``rank`` carries ``prefix``; else one more than the largest suffix
    seen (the bare prefix counts as 0): ``qwen3_rank_0`` → ``qwen3_rank_0_1`` → ``_2``.

    Example:
        >>> next_suffix(["q_rank_0-1_1.ckpt", "q_rank_0_3-1_2.ckpt", "other_rank_0_9-1_1.ckpt"], "q", 0)
        4
    """
    seen = [p.suffix for p in map(parse_legacy_name, names)
            if p is not None and p.prefix == prefix and p.rank == rank]
    return max(seen) + 1 if seen else 0


def name_position(epochs_done: int, step_in_epoch: int, steps_of_last_epoch: int) -> tuple[int, int]:
    """MindSpore's ``(epoch, step)`` of a file name for the state after a step.

    Args:
        epochs_done: completed epochs (the trainer's 0-based epoch in progress).
        step_in_epoch: steps done in the epoch in progress.
        steps_of_last_epoch: steps the just-completed epoch had (used when
            ``step_in_epoch`` is 0: that step closed an epoch).

    Example:
        >>> name_position(0, 3, 10), name_position(1, 0, 10), name_position(1, 1, 10)
        ((1, 3), (1, 10), (2, 1))
    """
    if step_in_epoch > 0:
        return epochs_done + 1, step_in_epoch
    if epochs_done == 0:
        return 1, 0  # nothing trained yet
    return epochs_done, steps_of_last_epoch


# ---------------------------------------------------------------------------- meta.json


#: (size in bytes, xxh3-64 hex) of one file, as ``meta.json`` records it.
FileRecord = tuple[int, str]
_META_KEYS = {"last_epoch", "last_step", "last_ckpt_file"}
_RECORD_KEYS = {"size", "xxh3_64"}
_NOTE_KEYS = {"global_step", "metrics"}  # optional in a record: written by resumable since retention policies


@dataclass(frozen=True)
class FileNote:
    """What a save recorded about one rank file beside its size and checksum (retention ranks by it).

    Attributes:
        global_step: the trainer's global step the file holds (None: not recorded, e.g. a
            ``meta.json`` written before these fields, or a ``LegacySaver`` given none).
        metrics: name → number (the trainer's ``loss``, the same on every rank); empty: none recorded.
    """

    global_step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def seal(doc: Mapping[str, Any]) -> str:
    """xxh3-64 of ``doc`` as canonical JSON (sorted keys, no spaces): what a ``seal`` key holds."""
    return xxhash.xxh3_64_hexdigest(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def meta_bytes(epoch: int, step: int, file_name: str, files: Mapping[str, FileRecord],
               notes: Mapping[str, FileNote] | None = None) -> bytes:
    """The content of a rank's ``meta.json`` naming its last complete save, sealed.

    Args:
        files: size and checksum of every rank file of the folder to record (the new one included).
        notes: the global step and metrics of those files, where known (``files[name]["global_step"]``,
            ``["metrics"]``; left out when unknown, so older readers' records are unchanged).
    """
    notes = notes or {}
    records: dict[str, dict[str, Any]] = {}
    for n, (size, digest) in sorted(files.items()):
        record: dict[str, Any] = {"size": size, "xxh3_64": digest}
        note = notes.get(n)
        if note is not None and note.global_step is not None:
            record["global_step"] = note.global_step
        if note is not None and note.metrics:
            record["metrics"] = {k: float(v) for k, v in sorted(note.metrics.items())}
        records[n] = record
    doc: dict[str, Any] = {"last_epoch": epoch, "last_step": step, "last_ckpt_file": file_name, "files": records}
    doc["seal"] = seal(doc)
    return (json.dumps(doc) + "\n").encode()


@dataclass(frozen=True)
class LegacyMeta:
    """A parsed ``meta.json``.

    Attributes:
        position: ``(last_epoch, last_step)``.
        file: ``last_ckpt_file``.
        files: name → (size, xxh3-64) of the files resumable recorded; empty for MindFormers'.
        sealed: written by resumable (its seal matched).
        notes: name → its global step and metrics, for every file of ``files`` (empty notes
            where the record has neither).
    """

    position: tuple[int, int]
    file: str
    files: dict[str, FileRecord]
    sealed: bool
    notes: dict[str, FileNote] = field(default_factory=dict)


def _record(value: Any) -> bool:
    if not (isinstance(value, dict) and _RECORD_KEYS <= set(value) <= _RECORD_KEYS | _NOTE_KEYS):
        return False
    metrics = value.get("metrics", {})
    return (_ints([value["size"]]) and isinstance(value["xxh3_64"], str)
            and re.fullmatch(r"[0-9a-f]{16}", value["xxh3_64"]) is not None
            and ("global_step" not in value or _ints([value["global_step"]]))
            and isinstance(metrics, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in metrics.values()))


def read_meta(folder: str | os.PathLike[str]) -> LegacyMeta | None:
    """Read and check a rank folder's ``meta.json``; None when there is none.

    MindFormers' (the three keys only) is accepted unsealed; resumable's must carry a
    matching ``seal``, so a flipped byte anywhere in it is an error, not a wrong step.
    A record's ``global_step`` and ``metrics`` are optional (older files have neither); a
    metric may be ``NaN`` (a diverged loss).

    Raises:
        CorruptCheckpointError: not JSON, an unknown or missing key, a wrong type, or a seal
            that does not match; the file and the key are named.
    """
    path = storage.as_path(folder) / META_JSON
    try:
        doc = load_json_object(path, "legacy meta.json", allow_nan=True)
    except CheckpointNotFoundError:  # no meta.json (or a dangling link named so): none written yet
        return None
    given = doc.pop("seal", None)
    unknown = sorted(set(doc) - _META_KEYS - {"files"})
    if unknown or not _META_KEYS <= set(doc):
        raise CorruptCheckpointError(f"{path}: keys must be {sorted(_META_KEYS)} (and files, seal when resumable "
                                     f"wrote it), got {sorted(doc)}; the file is damaged: delete it (the newest "
                                     "step complete on the other ranks is then loaded)")
    if "files" in doc or given is not None:
        if given != seal(doc):
            raise CorruptCheckpointError(f"{path}: its seal {given!r} does not match its content; the file is "
                                         "damaged: delete it (the newest step complete on the other ranks is then "
                                         "loaded)")
        if not (isinstance(doc.get("files"), dict) and all(_record(v) for v in doc["files"].values())):
            raise CorruptCheckpointError(f"{path}: \"files\" must map file names to {{size, xxh3_64}} (and optional "
                                         "global_step, metrics {name: number})")
    if not (_ints([doc["last_epoch"], doc["last_step"]]) and isinstance(doc["last_ckpt_file"], str)):
        raise CorruptCheckpointError(f"{path}: \"last_epoch\" and \"last_step\" must be non-negative integers and "
                                     "\"last_ckpt_file\" a file name")
    records = doc.get("files", {})
    files = {n: (r["size"], r["xxh3_64"]) for n, r in records.items()}
    notes = {n: FileNote(r.get("global_step"), {k: float(v) for k, v in r.get("metrics", {}).items()})
             for n, r in records.items()}
    return LegacyMeta((doc["last_epoch"], doc["last_step"]), doc["last_ckpt_file"], files, given is not None, notes)


# ------------------------------------------------------------------------ file metadata


@dataclass(frozen=True)
class FileInfo:
    """What a rank file's ``__metadata__`` says about it.

    Attributes:
        chunks: key → (tensor name, global shape, offsets) of every chunk in the file.
        rank: the rank that wrote it (-1 for a unified checkpoint).
        layout: the layout that wrote it (``world_size``, ``mesh``, ``pipeline_stages``, ...).
        remove_redundancy: the file holds only its rank's share of replicated chunks.
        context: ``{"state": non-tensor state, "rank_local": the writer's own values}``.
    """

    chunks: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]
    rank: int
    layout: dict[str, Any]
    remove_redundancy: bool
    context: dict[str, Any]


def file_metadata(chunks: Mapping[str, tuple[str, list[int] | tuple[int, ...], list[int] | tuple[int, ...]]], *,
                  rank: int, layout: Mapping[str, Any], remove_redundancy: bool,
                  context: Mapping[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` of one rank file (see the module docstring).

    Raises:
        TypeError: the context holds a value JSON cannot store (naming it).
    """
    doc = {"chunks": {k: {"name": n, "global_shape": list(g), "offsets": list(o)} for k, (n, g, o) in chunks.items()},
           "rank": rank, "layout": dict(layout), "context": dict(context)}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"legacy checkpoint context must be JSON (int, float, str, bool, None, lists, dicts): {exc}") \
            from exc
    return {"format": "pt", "remove_redundancy": str(bool(remove_redundancy)), META_KEY: text}


def _ints(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                           for v in value)


def parse_file_metadata(meta: Mapping[str, str] | None, source: str | os.PathLike[str]) -> FileInfo:
    """Parse and check a rank file's ``__metadata__``.

    Raises:
        CorruptCheckpointError: no ``resumable_legacy`` entry (a file not written by
            resumable), bad JSON, a malformed chunk map, rank, layout or context; ``source``
            and the key are named.
    """
    if not meta or META_KEY not in meta:
        raise CorruptCheckpointError(
            f"{source}: no {META_KEY!r} entry in the file's metadata, so it was not written by resumable's "
            "Checkpoint 1.0; MindFormers legacy checkpoints are read with resumable.formats.mindformers")
    where = f"{source}: __metadata__ {META_KEY!r}"
    doc = parse_json_object(meta[META_KEY], where, allow_nan=True)  # the context may hold a NaN the user saved
    chunks = {}
    for key, c in need_type(doc, "chunks", where, dict).items():
        at = f"{where}, chunk {key!r}"
        gshape = need_int_list(c, "global_shape", at, maximum=MAX_DIM)
        if len(gshape) > MAX_NDIM:
            raise CorruptCheckpointError(f"{at}: 'global_shape' has {len(gshape)} dims, more than {MAX_NDIM}")
        offsets = need_int_list(c, "offsets", at, maximum=MAX_DIM, length=len(gshape))
        chunks[key] = (need_type(c, "name", at, str), tuple(gshape), tuple(offsets))
    layout = need_type(doc, "layout", where, dict)
    v2.parse_layout(layout, where, fix=RESTORE)
    return FileInfo(chunks, need_int(doc, "rank", where, minimum=-1), layout, meta.get("remove_redundancy") == "True",
                    need_type(doc, "context", where, dict))


def context_scalars(objects: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The context values MindFormers keeps as scalar tensors (present ones only)."""
    out = {}
    for name in SCALARS:
        value = objects.get(name)
        if isinstance(value, bool) or value is None:
            continue
        if name == "loss_scale" and isinstance(value, (int, float)):
            out[name] = torch.tensor(float(value), dtype=torch.float32)
        elif isinstance(value, int):
            out[name] = torch.tensor(value, dtype=torch.int64)
    return out


# ---------------------------------------------------------------------------- .ckpt I/O


def save_ckpt(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str]) -> FileRecord:
    """Write a ``.ckpt`` (``torch.save`` of tensors and ``__metadata__``) to a new file, fsynced.

    ``torch.save`` streams into a new local file (``O_EXCL``, fsynced), checksummed as it
    goes; an object is serialised into memory first, then uploaded
    (:func:`resumable.storage.write_serialized`).

    Returns:
        ``(size_in_bytes, xxh3_64_hex)`` of the file, computed while writing.

    Raises:
        ValueError: a key is ``__metadata__``.
        OSError: the file exists or cannot be written.
    """
    if "__metadata__" in tensors:
        raise ValueError("'__metadata__' is reserved in a .ckpt file")
    payload: dict[str, Any] = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    payload["__metadata__"] = dict(metadata)
    return storage.write_serialized(storage.as_path(path), lambda f: torch.save(payload, f))


def load_ckpt(path: str | os.PathLike[str] | storage.ObjectPath) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Open a ``.ckpt`` safely: ``torch.load(weights_only=True, mmap=True)``; tensors map lazily.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        UnsafeCheckpointError: the file carries pickled objects that weights-only loading
            refuses (a custom class, a function ...): it is never unpickled.
        CorruptCheckpointError: not a torch zip file, or not a dict of tensors with
            ``__metadata__`` (str → str).
        FileNotFoundError: no such file.
    """
    path = storage.as_path(path)
    doc = load_weights_only(path, "legacy .ckpt file", "re-save it with resumable")
    meta = doc.pop("__metadata__", None) if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or not isinstance(meta, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in doc.items())):
        raise CorruptCheckpointError(f"{path}: a legacy .ckpt must hold a dict of tensors and '__metadata__' "
                                     "(str → str); this one does not")
    return doc, meta


# ----------------------------------------------------------------------- strategy files


def strategy_file_name(rank: int) -> str:
    """``ckpt_strategy_rank_{rank}.ckpt``."""
    return f"ckpt_strategy_rank_{rank}.ckpt"


def strategy_doc(*, rank: int, world_size: int, layout: Mapping[str, Any], remove_redundancy: bool,
                 tensors: Mapping[str, Mapping[str, Any]]) -> bytes:
    """A strategy file: this rank's sharding of every network and optimizer tensor, as JSON.

    ``tensors[name]``: ``dtype``, ``global_shape``, ``kind``, ``mesh`` (``dim_names``,
    ``shape``, ``coordinate``; None for a plain tensor), ``placements`` (``["S", d]``,
    ``["SS", d, split_factor]``, ``["R"]``; None for a plain tensor) and ``chunks``: every
    box the rank holds with its place in the local tensor and whether this rank's file
    stores it (``{"offsets", "shape", "local": [[start, stop], ...], "stored"}``).
    """
    doc = {"format": STRATEGY_FORMAT, "format_version": 1, "rank": rank, "world_size": world_size,
           "layout": dict(layout), "remove_redundancy": remove_redundancy, "tensors": dict(tensors)}
    doc["seal"] = seal(doc)
    return json.dumps(doc, separators=(",", ":")).encode()


def read_strategy(path: str | os.PathLike[str] | storage.ObjectPath) -> dict[str, Any]:
    """Read and check one strategy file.

    Raises:
        CheckpointNotFoundError: no such file.
        UnsafeCheckpointError: the file is larger than we parse.
        CorruptCheckpointError: not a resumable strategy (e.g. a pickled MindSpore strategy),
            or a malformed tensor entry; the file and the tensor are named.
    """
    path = storage.as_path(path)
    try:
        doc = load_json_object(path, "strategy file", MAX_STRATEGY_BYTES)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{exc}; strategy files written by resumable are JSON "
                                     "(src_strategy_path_or_dir must name them)") from exc
    given = doc.get("seal")  # strategy files written before seals have none
    if given is not None and given != seal({k: v for k, v in doc.items() if k != "seal"}):
        raise CorruptCheckpointError(f"{path}: its seal {given!r} does not match its content; the strategy file "
                                     "is damaged: restore it, or re-save on that layout to rewrite it")
    if doc.get("format") != STRATEGY_FORMAT or not isinstance(doc.get("tensors"), dict):
        raise CorruptCheckpointError(f"{path}: not a resumable strategy file (format {doc.get('format')!r})")
    where = str(path)
    world = need_int(doc, "world_size", where, minimum=1, maximum=v2.MAX_RANKS)
    need_int(doc, "rank", where, maximum=world - 1)
    layout = need_type(doc, "layout", where, dict)
    v2.parse_layout({"world_size": world, **layout}, where, fix=RESTORE)  # the world size is recorded beside it
    for name, t in doc["tensors"].items():
        _check_strategy_tensor(t, f"{where}: tensor {name!r}")
    return doc


def _check_strategy_tensor(t: object, where: str) -> None:
    """One tensor entry of a strategy file: shapes, its mesh and placements (what ``check_strategy`` uses)."""
    shape = need_int_list(t, "global_shape", where, maximum=MAX_DIM)
    if len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(f"{where}: 'global_shape' has {len(shape)} dims, more than {MAX_NDIM}")
    for i, c in enumerate(need_type(t, "chunks", where, list)):
        need_int_list(c, "offsets", f"{where}, chunk {i}", maximum=MAX_DIM, length=len(shape))
        need_int_list(c, "shape", f"{where}, chunk {i}", maximum=MAX_DIM, length=len(shape))
    placements = need_type(t, "placements", where, (list, type(None)), default=None)
    mesh = need_type(t, "mesh", where, (dict, type(None)), default=None)
    if not placements:
        return
    if mesh is None:
        raise CorruptCheckpointError(f"{where}: has placements but no 'mesh'; the strategy file is damaged")
    sizes = need_int_list(mesh, "shape", f"{where}: mesh", minimum=1, maximum=v2.MAX_RANKS, length=len(placements))
    names = need_type(mesh, "dim_names", f"{where}: mesh", list)
    if len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
        raise CorruptCheckpointError(f"{where}: mesh 'dim_names' {shown(names)} must name each of its {len(sizes)} "
                                     "dims; the strategy file is damaged")
    problem = check_placements(placements, len(shape), len(sizes))
    if problem is not None:
        raise CorruptCheckpointError(f"{where}: {problem}; the strategy file is damaged")
    runs = 1
    for p in placements:
        runs *= p[2] if p[0] == "SS" else 1
    if runs > v2.MAX_RUNS_PER_POSITION:  # a rank holds this many boxes of the tensor: each is built
        raise CorruptCheckpointError(f"{where}: split factors giving each rank {runs} boxes, more than "
                                     f"{v2.MAX_RUNS_PER_POSITION}; the strategy file is damaged")


def strategy_files(path_or_dir: str | os.PathLike[str]) -> dict[int, storage.AnyPath]:
    """Rank → strategy file of ``src_strategy_path_or_dir`` (one file, or a folder of them).

    Raises:
        CheckpointNotFoundError: the path does not exist or the folder holds no strategy file.
        UnsafeCheckpointError: a symlink in the folder points outside it.
    """
    path = storage.as_path(path_or_dir)
    if storage.is_file(path):
        m = _STRATEGY_RE.match(path.name)
        return {int(m.group(1)) if m else -1: path}
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"src_strategy_path_or_dir {path} does not exist; point it at the source "
                                      "job's <output_dir>/strategy folder or one of its ckpt_strategy_rank_*.ckpt")
    found = {int(m.group(1)): entry for m, entry in files_in(path, _STRATEGY_RE)}
    if not found:
        raise CheckpointNotFoundError(f"src_strategy_path_or_dir {path} holds no ckpt_strategy_rank_*.ckpt file")
    return found
