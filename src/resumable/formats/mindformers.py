"""MindFormers checkpoints (2.0 ``iteration_*`` folders and legacy ``rank_*`` trees) described neutrally.

Parsing gives a :class:`ForeignCheckpoint`: for every tensor, under its MindFormers
name, its dtype, global shape and chunks (a :class:`~resumable.geometry.Box`, the file
and the key inside it; the same box listed twice means two replicas), plus the
training context. Nothing but headers and JSON is read; :func:`read_chunk` then reads
one chunk (or a region of it) when the loader wants it. Names stay the checkpoint's:
:mod:`resumable.sources` maps them (moments and scalars for every model, a model's own
names through :mod:`resumable.models`).

What is understood (see ``docs/mindformers.md``):

- 2.0 with ``metadata.json``: pieces of ``axis_fragmentations`` (or, when absent, of
  ``layout.tensor_map`` over ``layout.device_matrix``), ``global_offset = [k]`` being the
  piece's row-major index; the files of each piece from ``storage_data``.
- 2.0 without ``metadata.json`` (one rank): every tensor of every
  ``[{prefix}-]{model|opt}-{index}-{count}.safetensors`` file is one full chunk.
- ``common.json``'s context; ``ckpt_status`` is not used.
- Legacy: the newest ``(epoch, step)`` complete on every rank (the rule of
  docs/mindformers.md); ranks hold full tensors or, with ``remove_redundancy``, a share of
  them. A tensor- or pipeline-parallel tree holds slices: given the job's strategy files
  (:mod:`resumable.formats.ms_strategy`), each rank's slices are placed at their boxes;
  without them, slices of different shapes, or strategy files found beside the tree that
  split its tensors, are reported, not guessed.

Every file name read from metadata must be a bare name inside the folder.

Example::

    ckpt = read_mf_checkpoint(resolve_mf_iteration("output/checkpoint"))
    ckpt.context.global_step                         # 100
    qkv = ckpt.tensors["decoder.layers.0.self_attention.linear_qkv.weight"]
    full = read_tensor(qkv)
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from resumable import storage
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet, UnsafeCheckpointError
from resumable.formats.hf import load_json_object, read_stored, safe_member, safetensors_header
from resumable.formats.jsonfile import read_tracker_file
from resumable.formats.schema import MAX_DIM, MAX_NDIM, need_int, need_number, shown
from resumable.formats.ms_ckpt import MS_DTYPES, MsTensorEntry, index_ms_ckpt, read_ms_tensor
from resumable.formats.ms_names import parse_ms_name
from resumable.formats.ms_strategy import STRATEGY_FILE, ParamLayout, read_ms_strategy
from resumable.formats.safetensors_io import read_header
from resumable.geometry import Box, covers_exactly, dedupe
from resumable.storage import AnyPath

__all__ = [
    "TRACKER",
    "ForeignCheckpoint",
    "ForeignChunk",
    "ForeignTensor",
    "LegacyFile",
    "TrainingContext",
    "is_v2_file_name",
    "parse_legacy_name",
    "read_chunk",
    "read_mf_checkpoint",
    "read_mf_legacy",
    "read_ms_file",
    "read_tensor",
    "resolve_mf_iteration",
]

TRACKER = "latest_checkpointed_iteration.txt"
MAX_STORAGE_KEY = 4096
"""Longest ``storage_data`` key handed to ``ast.literal_eval`` (a name and a short tuple)."""

MAX_METADATA_BYTES = 1 << 30
"""Largest metadata.json parsed: one entry per piece and replica grows with model and world size."""

_V2_FILE = re.compile(r"^(?:(.+)-)?(model|opt)-(\d{7})-(\d{7})\.safetensors$")
_LEGACY_FILE = re.compile(r"^(.+)_rank_(\d+)(?:_(\d+))?-(\d+)_(\d+)\.(ckpt|safetensors)$")
_CONTEXT_SCALARS = ("global_step", "epoch_num", "step_num", "loss_scale", "global_batch_size")
PASS_STRATEGY = ("pass the source job's strategy files: src_strategy_path_or_dir (trainer) "
                 "or --src-strategy (resumable convert)")
"""How to read a tensor-parallel legacy tree, for messages."""


@dataclass(frozen=True)
class ForeignChunk:
    """One stored piece of a tensor: its box in the global tensor, its file and its key there."""

    box: Box
    file: AnyPath
    key: str


@dataclass(frozen=True)
class ForeignTensor:
    """A tensor of a foreign checkpoint, by its name there; a box listed twice is a replica."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[ForeignChunk, ...]


@dataclass(frozen=True)
class TrainingContext:
    """Where training stood, as MindFormers recorded it (``epoch_num``, ``step_num``, ...).

    MindFormers keeps no LR, RNG or scheduler state: the LR follows ``global_step``.
    """

    global_step: int
    epoch: int | None = None
    step: int | None = None
    consumed_samples: int | None = None
    global_batch_size: int | None = None
    loss_scale: float | None = None


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A parsed MindFormers checkpoint: ``path`` is the iteration folder or the legacy root."""

    path: AnyPath
    iteration: int | None
    tensors: dict[str, ForeignTensor]
    context: TrainingContext


# ---------------------------------------------------------------- reading chunks


@functools.lru_cache(maxsize=64)
def _ckpt_index(path: str, mtime_ns: int, size: int) -> dict[str, MsTensorEntry]:
    return index_ms_ckpt(path)


def _ms_entry(path: AnyPath, key: str) -> MsTensorEntry:
    stat = storage.stat(path)
    if stat is None or stat.is_dir:
        raise CheckpointNotFoundError(f"MindSpore checkpoint {path} does not exist")
    index = _ckpt_index(str(path), stat.mtime_ns, stat.size)
    if key not in index:
        raise CorruptCheckpointError(f"{path} holds no tensor {key!r}")
    return index[key]


def read_chunk(chunk: ForeignChunk, region: Box | None = None) -> torch.Tensor:
    """Read a chunk, or only ``region`` of it (global coordinates, inside ``chunk.box``).

    Safetensors chunks read just the region's bytes; ``.ckpt`` chunks read the chunk.

    Example::

        part = read_chunk(chunk, Box((0, 0), (4, 16)))
    """
    region = chunk.box if region is None else region
    inner = region.slices_in(chunk.box)
    if chunk.file.suffix == ".ckpt":
        tensor = read_ms_tensor(chunk.file, _ms_entry(chunk.file, chunk.key))
        return tensor[inner].clone() if inner else tensor
    return read_stored(chunk.file, chunk.key, None, chunk.box.shape, inner)


def read_tensor(tensor: ForeignTensor) -> torch.Tensor:
    """Assemble a full tensor from its chunks (first replica of each box).

    Example::

        w = read_tensor(ckpt.tensors["output_layer.weight"])
    """
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    full = Box.full(tensor.shape)
    done: set[Box] = set()
    for chunk in tensor.chunks:
        if chunk.box not in done:
            out[chunk.box.slices_in(full)] = read_chunk(chunk)
            done.add(chunk.box)
    return out


# ---------------------------------------------------------------- Checkpoint 2.0


def resolve_mf_iteration(checkpoint_dir: str | os.PathLike[str] | storage.ObjectPath) -> AnyPath:
    """The ``iteration_*`` folder that ``latest_checkpointed_iteration.txt`` names.

    The tracker holds a bare integer, with or without a trailing newline.

    Example::

        resolve_mf_iteration("output/checkpoint")    # Path("output/checkpoint/iteration_00000100")
    """
    root = storage.as_path(checkpoint_dir)
    tracker = root / TRACKER
    if not storage.exists(tracker):
        raise CheckpointNotFoundError(f"{tracker} does not exist; is {root} a MindFormers checkpoint folder?")
    iteration = read_tracker_file(tracker)
    folder = root / f"iteration_{iteration:08d}"
    if not storage.is_dir(folder):
        raise CheckpointNotFoundError(f"{tracker} names iteration {iteration} but {folder} does not exist")
    return folder


def read_mf_checkpoint(iteration_dir: str | os.PathLike[str] | storage.ObjectPath) -> ForeignCheckpoint:
    """Describe a MindFormers Checkpoint 2.0 ``iteration_*`` folder.

    Raises:
        CheckpointNotFoundError: ``common.json`` or a named file is missing.
        UnsafeCheckpointError: a file name leaves the folder, or a ``storage_data`` key is huge.
        CorruptCheckpointError: malformed JSON, pieces out of bounds, overlapping or
            missing, or files whose tensors disagree with the metadata.

    Example::

        ckpt = read_mf_checkpoint("output/checkpoint/iteration_00000100")
    """
    folder = storage.as_path(iteration_dir)
    match = re.fullmatch(r"iteration_(\d+)", folder.name)
    context = _v2_context(load_json_object(folder / "common.json", "MindFormers common.json"), folder / "common.json")
    meta_path = folder / "metadata.json"
    if storage.is_file(meta_path):
        meta = load_json_object(meta_path, "MindFormers metadata", MAX_METADATA_BYTES)
        tensors = _v2_tensors(folder, meta, meta_path)
    else:
        tensors = _single_rank_tensors(folder)
    return ForeignCheckpoint(folder, int(match.group(1)) if match else None, tensors, context)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _v2_context(common: dict[str, Any], path: AnyPath) -> TrainingContext:
    where = str(path)
    fields = {"epoch": "epoch_num", "step": "step_num", "consumed_samples": "consumed_samples",
              "global_batch_size": "global_batch_size"}
    values = {field: None if common.get(key) is None else need_int(common, key, where) for field, key in fields.items()}
    loss_scale = need_number(common, "loss_scale", where, default=None)
    return TrainingContext(need_int(common, "global_step", where),
                           loss_scale=None if loss_scale is None else float(loss_scale), **values)


def _storage_key(key: str, path: AnyPath) -> tuple[str, int]:
    """``"('fc1.weight', (3,))"`` → ``("fc1.weight", 3)``, evaluated as a literal only."""
    if len(key) > MAX_STORAGE_KEY:
        raise UnsafeCheckpointError(f"{path}: storage_data key of {len(key)} characters exceeds {MAX_STORAGE_KEY}")
    try:
        value = ast.literal_eval(key)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if (not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], tuple) or len(value[1]) != 1 or not _int(value[1][0])):
        raise CorruptCheckpointError(f"{path}: storage_data key {key[:200]!r} is not of the form \"('name', (k,))\"")
    return value[0], value[1][0]


def _storage_files(meta: dict[str, Any], path: AnyPath) -> dict[tuple[str, int], list[str]]:
    stored = meta.get("storage_data")
    if not isinstance(stored, dict):
        raise CorruptCheckpointError(f"{path} has no \"storage_data\" object")
    out = {}
    for key, entries in stored.items():
        piece = _storage_key(key, path)
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) and "file_name" in e for e in entries):
            raise CorruptCheckpointError(f"{path}: storage_data[{key!r}] must be a non-empty list of {{\"file_name\": ...}}")
        out[piece] = [e["file_name"] for e in entries]
    return out


def _ints(value: Any, what: str, minimum: int) -> list[int]:
    """A list of at most MAX_NDIM ints >= ``minimum`` (shapes and fragments are multiplied out)."""
    if (not isinstance(value, list) or len(value) > MAX_NDIM
            or not all(_int(v) and minimum <= v <= MAX_DIM for v in value)):
        raise ValueError(f"{what} must be a list of at most {MAX_NDIM} integers >= {minimum}, got {shown(value)}")
    return value


def _fragments(entry: dict[str, Any], ndim: int) -> list[int]:
    """Pieces per axis: ``axis_fragmentations``, else derived from the layout's tensor_map."""
    if "axis_fragmentations" in entry:
        frag = _ints(entry["axis_fragmentations"], "axis_fragmentations", 1)
    else:
        layout = entry.get("layout") or {}
        matrix = _ints(layout.get("device_matrix", []), "layout.device_matrix", 1)
        tmap = _ints(layout.get("tensor_map", [-1] * ndim), "layout.tensor_map", -1)
        if any(d >= len(matrix) for d in tmap):
            raise ValueError(f"layout.tensor_map {tmap} refers past device_matrix {matrix}")
        frag = [1 if d == -1 else matrix[-d - 1] for d in tmap]
    if len(frag) != ndim:
        raise ValueError(f"{len(frag)} fragmentation entries for a {ndim}-D tensor")
    return frag


def _piece_box(k: int, frag: list[int], local: list[int]) -> Box:
    coord = []
    for count in reversed(frag):  # row-major: the last axis varies fastest
        coord.append(k % count)
        k //= count
    return Box(tuple(c * s for c, s in zip(reversed(coord), local)), tuple(local))


class _Headers:
    """Safetensors headers of a folder's files, each read once, names checked for safety."""

    def __init__(self, folder: AnyPath) -> None:
        self.folder, self.cache = folder, {}

    def get(self, file_name: object, what: str) -> tuple[AnyPath, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        path = safe_member(self.folder, file_name, what)
        if path not in self.cache:
            if not storage.is_file(path):
                raise CheckpointNotFoundError(f"{path}, named by {self.folder / 'metadata.json'}, does not exist")
            self.cache[path] = safetensors_header(path)
        return path, self.cache[path]


def _v2_tensors(folder: AnyPath, meta: dict[str, Any], path: AnyPath) -> dict[str, ForeignTensor]:
    described = meta.get("state_dict_metadata")
    if not isinstance(described, dict):
        raise CorruptCheckpointError(f"{path} has no \"state_dict_metadata\" object")
    stored = _storage_files(meta, path)
    headers = _Headers(folder)
    tensors = {}
    for name, entry in described.items():
        try:
            tensors[name] = _v2_tensor(name, entry, stored, headers)
        except CorruptCheckpointError:
            raise
        except KeyError as e:
            raise CorruptCheckpointError(f"{path}: tensor {name!r}: missing key {e}") from e
        except (ValueError, TypeError) as e:
            raise CorruptCheckpointError(f"{path}: tensor {name!r}: {e}") from e
    if stored:
        name, k = next(iter(stored))
        raise CorruptCheckpointError(f"{path}: storage_data names piece {k} of {name!r}, which state_dict_metadata lacks")
    return tensors


def _v2_tensor(name: str, entry: dict[str, Any], stored: dict[tuple[str, int], list[str]],
               headers: _Headers) -> ForeignTensor:
    dtype_name = entry["properties"]["dtype"]
    if dtype_name not in MS_DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}; supported: {sorted(MS_DTYPES)}")
    dtype = MS_DTYPES[dtype_name]
    shape = tuple(_ints(entry["global_shape"], "global_shape", 0))
    frag = _fragments(entry, len(shape))
    pieces = math.prod(frag)
    boxes: dict[int, Box] = {}
    for chunk in entry["chunk"]:
        offset = _ints(chunk["global_offset"], "global_offset", 0)
        if len(offset) != 1 or offset[0] >= pieces:
            raise ValueError(f"global_offset {offset} is not one piece index below {pieces} ({frag} fragments)")
        local = _ints(chunk["local_shape"], "local_shape", 0)
        if len(local) != len(shape):
            raise ValueError(f"local_shape {local} does not match global_shape {list(shape)}")
        box = _piece_box(offset[0], frag, local)
        if not box.within(shape):
            raise ValueError(f"piece {offset[0]} at {list(box.offsets)} of shape {local} lies outside {list(shape)}")
        boxes.setdefault(offset[0], box)
    problem = covers_exactly(shape, boxes.values())
    if problem:
        raise ValueError(problem)
    chunks = []
    for k, box in boxes.items():
        if (name, k) not in stored:
            raise ValueError(f"piece {k} has no storage_data entry")
        for file_name in stored.pop((name, k)):
            file, header = headers.get(file_name, "storage_data file_name")
            if header.get(name) != (dtype, box.shape):
                found = "nothing" if name not in header else f"{header[name][0]} {list(header[name][1])}"
                raise CorruptCheckpointError(
                    f"{file}: tensor {name!r} piece {k} should be {dtype} {list(box.shape)}, the file holds {found}")
            chunks.append(ForeignChunk(box, file, name))
    return ForeignTensor(name, dtype, shape, tuple(chunks))


def is_v2_file_name(name: str) -> bool:
    """Whether ``name`` is a MindFormers 2.0 model/opt file name (``[{prefix}-]{model|opt}-{i:07d}-{n:07d}``)."""
    return _V2_FILE.match(name) is not None


def _single_rank_tensors(folder: AnyPath) -> dict[str, ForeignTensor]:
    files = [folder / e.name for e in storage.list_dir(folder) if _V2_FILE.match(e.name)]
    if not files:
        raise CheckpointNotFoundError(
            f"{folder} has neither metadata.json nor [prefix-]model|opt-NNNNNNN-NNNNNNN.safetensors files")
    return _full_chunks({path: safetensors_header(path) for path in files})


def _full_chunks(headers: dict[AnyPath, dict[str, tuple[torch.dtype, tuple[int, ...]]]],
                 strategy: AnyPath | None = None) -> dict[str, ForeignTensor]:
    """Every tensor of every file as a full chunk; the same name in several files is a replica.

    ``strategy``: the strategy that was given, which lists none of these tensors.
    """
    first: dict[str, tuple[torch.dtype, tuple[int, ...], AnyPath]] = {}
    chunks: dict[str, list[ForeignChunk]] = {}  # appended to: a tuple grown per file was quadratic in the files
    for path, header in headers.items():
        for name, (dtype, shape) in header.items():
            seen = first.setdefault(name, (dtype, shape, path))
            if seen[:2] != (dtype, shape):
                found = f"tensor {name!r} is {seen[0]} {list(seen[1])} in {seen[2]} but {dtype} {list(shape)} in {path}"
                if strategy is None:
                    raise NotImplementedYet(f"{found}: sharded legacy checkpoints need the strategy files; "
                                            + PASS_STRATEGY)
                raise CorruptCheckpointError(
                    f"{found}, and the strategy {strategy} has no entry for it (only tensors whole in every file "
                    "may lack one); give the strategy files of the job that wrote the checkpoint")
            chunks.setdefault(name, []).append(ForeignChunk(Box.full(shape), path, name))
    return {name: ForeignTensor(name, dtype, shape, tuple(chunks[name])) for name, (dtype, shape, _) in first.items()}


# ---------------------------------------------------------------- legacy (Checkpoint 1.0)


@dataclass(frozen=True, order=True)
class LegacyFile:
    """A parsed legacy file name ``{prefix}_rank_{rank}[_{suffix}]-{epoch}_{step}.{ext}``."""

    epoch: int
    step: int
    suffix: int
    prefix: str
    rank: int
    ext: str


def parse_legacy_name(name: str) -> LegacyFile | None:
    """Parse a legacy checkpoint file name; None when it is not one.

    Example::

        parse_legacy_name("tiny_rank_0_1-2_3.safetensors")
        # LegacyFile(epoch=2, step=3, suffix=1, prefix="tiny", rank=0, ext="safetensors")
    """
    m = _LEGACY_FILE.match(name)
    if not m:
        return None
    prefix, rank, suffix, epoch, step, ext = m.groups()
    return LegacyFile(int(epoch), int(step), int(suffix or 0), prefix, int(rank), ext)


def _rank_dirs(root: AnyPath) -> list[AnyPath]:
    ranks = {}
    for entry in storage.list_dir(root):
        m = re.fullmatch(r"rank_([0-9]+)", entry.name)
        if m and entry.is_dir and not entry.special:
            ranks[int(m.group(1))] = root / entry.name
    if not ranks:
        raise CheckpointNotFoundError(f"{root} has no rank_N folders; is it a MindFormers legacy checkpoint folder?")
    # Compared with the folders that exist, never ranged over: a stray rank_999999999 allocates nothing.
    order = sorted(ranks)
    if order[-1] != len(order) - 1:
        gap = next(i for i, r in enumerate(order) if r != i)  # sorted, distinct: the first hole
        raise CorruptCheckpointError(
            f"{root} has {len(order)} rank folders but the highest is rank_{order[-1]}: rank_{gap} is missing "
            "(a tree holds rank_0 ... rank_N-1); restore the missing folders or remove the stray ones")
    return [ranks[r] for r in order]


def _meta_position(path: AnyPath) -> tuple[int, int] | None:
    if not storage.is_file(path / "meta.json"):
        return None
    meta = load_json_object(path / "meta.json", "MindFormers meta.json", allow_nan=True)  # ours may record a NaN loss
    return need_int(meta, "last_epoch", str(path / "meta.json")), need_int(meta, "last_step", str(path / "meta.json"))


def _rank_files(path: AnyPath, rank: int, ext: str) -> dict[tuple[int, int], LegacyFile]:
    """(epoch, step) → newest file (largest prefix suffix) of one rank folder."""
    files: dict[tuple[int, int], LegacyFile] = {}
    for entry in storage.list_dir(path):
        parsed = parse_legacy_name(entry.name)
        if parsed is None or parsed.ext != ext:
            continue
        if parsed.rank != rank:
            raise CorruptCheckpointError(f"{path / entry.name} names rank {parsed.rank} but lies in rank_{rank}")
        key = (parsed.epoch, parsed.step)
        if key not in files or (parsed.suffix, parsed.prefix) > (files[key].suffix, files[key].prefix):
            files[key] = parsed
    return files


def legacy_file_name(f: LegacyFile) -> str:
    """The file name of a parsed legacy name (the inverse of :func:`parse_legacy_name`)."""
    suffix = f"_{f.suffix}" if f.suffix else ""
    return f"{f.prefix}_rank_{f.rank}{suffix}-{f.epoch}_{f.step}.{f.ext}"


def select_legacy_files(root: str | os.PathLike[str] | storage.ObjectPath,
                        fmt: str) -> tuple[tuple[int, int], list[AnyPath]]:
    """The newest ``(epoch, step)`` complete on every rank of a legacy tree, and its file per rank.

    The rule of :func:`read_mf_legacy` (``meta.json`` bounds, presence on every rank,
    largest prefix suffix per step), without reading any file's content.

    Raises:
        ValueError: ``fmt`` is not ``"safetensors"`` or ``"ckpt"``.
        CheckpointNotFoundError: no rank folder, or no step complete on every rank.
        CorruptCheckpointError: missing rank folders, a bad meta.json, a file in the wrong rank folder.

    Example::

        (epoch, step), paths = select_legacy_files("output/checkpoint", "safetensors")
    """
    return complete_legacy_steps(root, fmt)[0]


def complete_legacy_steps(root: str | os.PathLike[str] | storage.ObjectPath, fmt: str,
                          meta_position: Callable[[AnyPath], tuple[int, int] | None] = _meta_position,
                          ) -> list[tuple[tuple[int, int], list[AnyPath]]]:
    """Every ``(epoch, step)`` complete on every rank of a legacy tree, newest first, with its file per rank.

    Args:
        meta_position: a rank folder's ``meta.json`` bound (None: it does not bound the
            choice); resumable's resume passes one that skips a damaged ``meta.json``.

    Raises:
        As :func:`select_legacy_files`.
    """
    if fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', got {fmt!r}")
    root = storage.as_path(root)
    dirs = _rank_dirs(root)
    per_rank = [_rank_files(d, r, fmt) for r, d in enumerate(dirs)]
    bounds = [b for b in (meta_position(d) for d in dirs) if b is not None]
    common = set.intersection(*(set(files) for files in per_rank))
    if bounds:
        common = {pos for pos in common if pos <= min(bounds)}
    if not common:
        raise CheckpointNotFoundError(
            f"{root}: no (epoch, step) with a .{fmt} file on every rank"
            + (f" at or before {min(bounds)} (the oldest meta.json)" if bounds else ""))
    return [(pos, [d / legacy_file_name(files[pos]) for d, files in zip(dirs, per_rank)])
            for pos in sorted(common, reverse=True)]


def read_mf_legacy(checkpoint_dir: str | os.PathLike[str] | storage.ObjectPath, fmt: str = "safetensors",
                   strategy: str | os.PathLike[str] | storage.ObjectPath | None = None) -> ForeignCheckpoint:
    """Describe the last complete save of a MindFormers legacy ``rank_*`` tree.

    "Last complete": the minimum ``(epoch, step)`` over the ranks' ``meta.json`` bounds
    the choice (ranks without one do not bound it); among the ``(epoch, step)`` present
    on every rank at or below it, the newest wins. For one ``(epoch, step)`` the file
    with the largest prefix suffix (the latest run) is taken.

    Args:
        checkpoint_dir: the folder holding ``rank_0``, ``rank_1``, ...
        fmt: ``"safetensors"`` or ``"ckpt"`` (``load_ckpt_format``).
        strategy: the source job's strategy files (a ``ckpt_strategy_rank_*.ckpt`` or a
            folder of them, :func:`~resumable.formats.ms_strategy.read_ms_strategy`). Rank
            r's file (``rank_r``) then holds slices of the tensors the strategy lists,
            placed at their boxes (ranks holding one box are replicas; a moment without an
            entry is split like its parameter); every other tensor must be whole in the
            files holding it. The boxes of each tensor must tile it exactly.

    Raises:
        CheckpointNotFoundError: no rank folder, or no step complete on every rank.
        CorruptCheckpointError: inconsistent files, a missing ``global_step`` scalar, or
            slices that do not fit the strategy (tensor and ranks named).
        NotImplementedYet: without ``strategy``, ranks hold different shapes of a tensor,
            or the tree's job left strategy files (``strategy/`` beside the ranks or above)
            that split the tensors.

    Example::

        ckpt = read_mf_legacy("output/checkpoint")
        ckpt.context.global_step                    # 12
        tp = read_mf_legacy("output/checkpoint", strategy="output/strategy")
    """
    root = storage.as_path(checkpoint_dir)
    chosen, paths = select_legacy_files(root, fmt)
    headers = {p: _legacy_header(p) for p in paths}
    flags = {p: _remove_redundancy_flag(p) for p in paths}
    if len(set(flags.values())) > 1:
        raise CorruptCheckpointError(f"{root}: files disagree on remove_redundancy: "
                                     + ", ".join(f"{p.name}={v}" for p, v in flags.items()))
    if strategy is None:
        tensors = _full_chunks(headers)
        _refuse_unread_strategy(root, tensors)
    else:
        tensors = _strategy_chunks(paths, headers, read_ms_strategy(strategy), storage.as_path(strategy))
    return ForeignCheckpoint(root, None, tensors, _legacy_context(tensors, root, chosen))


def _layout_of(name: str, layouts: dict[str, ParamLayout]) -> ParamLayout | None:
    """A tensor's layout; an optimizer moment the strategy does not list is split like its parameter."""
    if name in layouts:
        return layouts[name]
    parsed = parse_ms_name(name)
    return layouts.get(parsed.param) if parsed.kind == "moment" else None


def _ranks_text(ranks: list[int]) -> str:
    shown_ranks = ", ".join(map(str, ranks[:8]))
    return shown_ranks + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def _strategy_chunks(paths: list[AnyPath], headers: dict[AnyPath, dict[str, tuple[torch.dtype, tuple[int, ...]]]],
                     layouts: dict[str, ParamLayout], strategy: AnyPath) -> dict[str, ForeignTensor]:
    """Slices (``paths[r]`` is rank r's file) at the boxes their layouts give; the tensors without one whole."""
    placed: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    chunks: dict[str, list[ForeignChunk]] = {}
    holders: dict[str, list[int]] = {}
    whole: dict[AnyPath, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {path: {} for path in paths}
    for rank, path in enumerate(paths):
        for name, (dtype, shape) in headers[path].items():
            layout = _layout_of(name, layouts)
            if layout is None:
                whole[path][name] = (dtype, shape)
                continue
            try:
                shape_global, box = layout.global_shape(shape), layout.rank_box(rank, shape)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{path} (rank {rank}) holds {name!r} as {list(shape)}: {e}") from e
            seen = placed.setdefault(name, (dtype, shape_global, rank))
            if seen[:2] != (dtype, shape_global):
                raise CorruptCheckpointError(
                    f"tensor {name!r}: rank {seen[2]}'s slice makes it {seen[0]} {list(seen[1])} but rank {rank}'s "
                    f"({path}, {dtype} {list(shape)}) makes it {dtype} {list(shape_global)}; the files do not "
                    f"follow one layout of the strategy {strategy}")
            chunks.setdefault(name, []).append(ForeignChunk(box, path, name))
            holders.setdefault(name, []).append(rank)
    tensors = _full_chunks(whole, strategy)
    for name, (dtype, shape, _) in placed.items():
        problem = covers_exactly(shape, dedupe(c.box for c in chunks[name]))
        if problem:
            raise CorruptCheckpointError(
                f"tensor {name!r} {list(shape)}, held by ranks {_ranks_text(holders[name])}: the slices placed by the "
                f"strategy {strategy} do not tile it ({problem}); a rank's file is missing or the strategy is not "
                "the one of the job that wrote the checkpoint")
        tensors[name] = ForeignTensor(name, dtype, shape, tuple(chunks[name]))
    return tensors


def _refuse_unread_strategy(root: AnyPath, tensors: dict[str, ForeignTensor]) -> None:
    """Refuse a tree whose job's strategy files (``strategy/`` in or beside ``root``) split its tensors.

    Evenly split slices have the same shape on every rank and would pass for replicas.
    A folder that is not MindSpore's (resumable's own JSON strategy files) is left alone.
    """
    for folder in (root / "strategy", root.parent / "strategy"):
        if storage.is_dir(folder) and any(STRATEGY_FILE.match(entry.name) for entry in storage.list_dir(folder)):
            try:
                layouts = read_ms_strategy(folder)
            except CorruptCheckpointError:
                return
            split = next((name for name in tensors if (lay := _layout_of(name, layouts)) and lay.is_split), None)
            if split is not None:
                raise NotImplementedYet(
                    f"{root} is split by its job's strategy files ({folder} splits {split!r}, ...): its rank files "
                    f"hold slices, not copies; {PASS_STRATEGY}")
            return


def _legacy_header(path: AnyPath) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if path.suffix == ".ckpt":
        return {name: (e.dtype, e.shape) for name, e in index_ms_ckpt(path).items()}
    return safetensors_header(path)


def _remove_redundancy_flag(path: AnyPath) -> str | None:
    if path.suffix == ".ckpt":
        return None
    return read_header(path).metadata.get("remove_redundancy")


def _scalar_values(tensors: dict[str, ForeignTensor]) -> dict[str, float | int]:
    """The context scalars a file holds (``global_step``, ``epoch_num`` ...: one element each)."""
    values: dict[str, float | int] = {}
    for name in _CONTEXT_SCALARS:
        tensor = tensors.get(name)
        if tensor is not None and tensor.shape in ((), (1,)):
            values[name] = read_chunk(tensor.chunks[0]).reshape(-1)[0].item()
    return values


def _context(values: dict[str, float | int], global_step: int) -> TrainingContext:
    def optional(name: str, kind: type) -> Any:
        return None if name not in values else kind(values[name])

    return TrainingContext(
        global_step=global_step,
        epoch=optional("epoch_num", int),
        step=optional("step_num", int),
        global_batch_size=optional("global_batch_size", int),
        loss_scale=optional("loss_scale", float),
    )


def _legacy_context(tensors: dict[str, ForeignTensor], root: AnyPath, chosen: tuple[int, int]) -> TrainingContext:
    values = _scalar_values(tensors)
    if not isinstance(values.get("global_step"), int):
        raise CorruptCheckpointError(f"{root}: the files of epoch {chosen[0]} step {chosen[1]} hold no integer "
                                     "global_step scalar")
    return _context(values, int(values["global_step"]))


# ---------------------------------------------------------------- single files


def read_ms_file(path: str | os.PathLike[str] | storage.ObjectPath) -> ForeignCheckpoint:
    """Describe one MindSpore file: ``save_checkpoint``'s ``.ckpt`` (protobuf) or ``.safetensors``, or one
    legacy rank file. Every tensor is one full chunk; the context comes from its scalars (``global_step``
    0 when it has none: a network saved without a training loop).

    Raises:
        UnsafeCheckpointError: not a regular file.
        CorruptCheckpointError: not a readable safetensors or MindSpore protobuf file.

    Example::

        read_ms_file("lenet.ckpt").tensors["fc1.weight"].shape      # (120, 400)
    """
    path = storage.as_path(path)
    tensors = _full_chunks({path: _legacy_header(path)})
    values = _scalar_values(tensors)
    step = values.get("global_step", 0)
    if not float(step).is_integer() or step < 0:
        raise CorruptCheckpointError(f"{path}: global_step {step!r} is not a non-negative integer")
    return ForeignCheckpoint(path, None, tensors, _context(values, int(step)))
