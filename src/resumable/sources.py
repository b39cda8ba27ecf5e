"""Checkpoint sources: any checkpoint on disk seen as named chunks of global tensors.

:func:`open_source` takes a path and returns a :class:`Source`: every tensor under
*our* name (HuggingFace parameter names, ``optimizer.state.<fqn>.exp_avg`` ...), its
dtype, global shape and chunks, each chunk with a function that reads any region of
it (only those bytes where the format allows), plus the training context as
``common.json`` would hold it. merge, split, diff, convert and ``inspect`` are built on
it, and so is the trainer's conversion of a foreign ``load_checkpoint`` (``train/foreign.py``).

==========================================  =========================================
path                                        format
==========================================  =========================================
``iteration_*`` with our ``metadata.json``  ``v2`` (Checkpoint 2.0, resumable)
a folder with the tracker / iterations      ``v2`` or ``mindformers``: its resolved
                                            iteration, by what that folder holds
``iteration_*`` with MindFormers metadata   ``mindformers`` (2.0; no metadata.json:
or none (single rank)                       every tensor is one full chunk)
a folder of ``rank_*`` folders              ``legacy`` (Checkpoint 1.0: ours, chunks
                                            from each file's metadata; or MindFormers',
                                            sliced ones placed by ``src_strategy``),
                                            its newest complete step
``model.safetensors`` (+ index)             ``unified`` with ``common.json``, else ``hf``
one file (or a folder holding only it):
  our Checkpoint 1.0 rank file              ``legacy`` (full tensors only; a rank's part
                                            is refused, naming the tree)
  MindSpore ``.ckpt`` (protobuf),           ``mindspore`` (``save_checkpoint``'s output,
  ``.safetensors`` ``{"format": "ms"}``     one legacy rank file)
  other ``.safetensors``                    ``safetensors``
  ``torch.save`` output (``.ckpt``,         ``torch``: read weights-only, nested dicts
  ``.pt``, ``.pth``, ``.bin``)              flattened by dotted names
==========================================  =========================================

MindSpore checkpoints (the ``mindformers``, MindFormers ``legacy``, ``mindspore`` and
``safetensors`` rows) are read name-agnostically (:mod:`resumable.formats.ms_names`):
tensors keep their names, ``adam_m.``/``moment1.`` and ``adam_v.``/``moment2.`` moments
become ``optimizer.state.<name>.exp_avg`` / ``.exp_avg_sq`` with AdamW's per-parameter
``step`` created from the global step, and the training scalars (``global_step``,
``learning_rate``, ``beta1_power`` ...) leave the tensors: their values are recorded in
``common["mindspore"]`` and the context keys (``global_step``, ``epoch_num`` ...) are
filled from them or from ``common.json``. Then ``names`` decides on the model mapping:
``auto`` applies the mapping of the known model (:mod:`resumable.models`) whose MindFormers
names every parameter is, ``hf`` insists on one (one error listing the names that do not
fit), ``keep`` never maps. The model says which of our parameters each stored one holds
(its ``mf_import_plan``: for Qwen3, fused ``linear_qkv`` / ``linear_fc1`` appear as q/k/v
and gate/up tensors whose regions are gathered from the fused rows on demand, no full copy;
the fused layout and head counts from the caller, a recorded ``config.json`` — the
iteration folder, its checkpoint folder, the legacy root, or beside a single file — or
MindFormers' defaults and the shapes, checked against every layer); a moment holds the same
parts of its parameter's moments. Each
decision and its reason is a line of :attr:`Source.notes`, logged when opened.

Nothing here is collective; reading is lazy (headers and JSON only until a chunk is read).
Every read goes through :mod:`resumable.storage`: any path may be ``s3://bucket/prefix``
(a region of a safetensors chunk is one ranged read; a ``.ckpt`` or PyTorch file in an object
store is read whole into memory), except a ``rank_*`` tree, refused there (``NotImplementedYet``).

Example::

    src = open_source("output/checkpoint")              # newest committed iteration
    w = src.tensors["model.norm.weight"].read()        # assembled from its chunks
    src.common["global_step"]
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Literal

import torch

from resumable import commit, storage
from resumable.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from resumable.formats import hf, hf_aux, mindformers as mf, schema, v1, v2
from resumable.storage import AnyPath
from resumable.storage.local import check_regular
from resumable.formats.safetensors_io import block_digests, read_header, read_region, stored_entry
from resumable.formats.ms_names import NAMES, OPT_STATE, Names, our_name, parse_ms_name
from resumable.formats.torch_file import PICKLE_PROTOCOL, is_zip, read_torch_file
from resumable.models import MODELS, identify_mindformers
from resumable.models.qwen3 import AttentionShape, FusedLayout
from resumable.geometry import Box, covers_exactly, runs
from resumable.reads import check_slice

log = logging.getLogger(__name__)

__all__ = ["NAMES", "Fused", "Names", "Source", "SourceChunk", "SourceTensor", "detect", "open_source"]

Format = Literal["v2", "mindformers", "legacy", "unified", "hf", "mindspore", "torch", "safetensors"]
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""Files read as a checkpoint when given alone (or alone in a folder)."""
Fused = FusedLayout | Mapping[str, bool]
"""A fused layout, or only some of its keys (the others as when none is given)."""
Reader = Callable[[Box], torch.Tensor]
_CONTEXT = ("global_step", "epoch_num", "step_num", "consumed_samples", "global_batch_size", "loss_scale")


@dataclass(frozen=True)
class SourceChunk:
    """A stored box of a tensor and a function reading any region of it (global coordinates)."""

    box: Box
    read: Reader
    where: str = ""

    def read_region(self, region: Box) -> torch.Tensor:
        if region.intersect(self.box) != region and not region.is_empty:
            raise ValueError(f"region {region} is not inside chunk {self.box}")
        return self.read(region)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source: its name (ours), dtype, global shape and distinct chunks (they tile it)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[SourceChunk, ...]

    @property
    def kind(self) -> str:
        """``opt`` for optimizer state, else ``model`` (the file kind of Checkpoint 2.0)."""
        return "opt" if self.name.startswith("optimizer.") else "model"

    @property
    def nbytes(self) -> int:
        return Box.full(self.shape).numel * self.dtype.itemsize

    def read(self, region: Box | None = None) -> torch.Tensor:
        """The tensor, or one region of it, assembled from the chunks that overlap it."""
        region = Box.full(self.shape) if region is None else region
        if not self.shape:
            return self.chunks[0].read(region)
        parts = [(chunk, part) for chunk in self.chunks if (part := region.intersect(chunk.box)) is not None]
        covered = sum(part.numel for _, part in parts)
        if covered != region.numel:
            files = ", ".join(sorted({c.where for c in self.chunks})) or "no file"
            raise CorruptCheckpointError(
                f"tensor {self.name!r} (stored in {files}): the chunks cover {covered} of {region.numel} elements "
                f"of the region at {list(region.offsets)} shape {list(region.shape)}; the checkpoint's metadata "
                "and its files disagree: restore the damaged file or re-save the checkpoint")
        # Allocated only once the chunks (their shapes from the files' headers) cover it: a global shape
        # forged in a rank file's metadata allocates nothing.
        out = torch.empty(region.shape, dtype=self.dtype)
        for chunk, part in parts:
            out[part.slices_in(region)] = chunk.read(part)
        return out


@dataclass
class Source:
    """A checkpoint opened for reading.

    Attributes:
        path: the folder read (an ``iteration_*`` folder, a legacy root or a HF folder).
        format: ``v2``, ``mindformers``, ``legacy``, ``unified`` or ``hf``.
        iteration: the iteration, when the format has one.
        tensors: our name → tensor.
        common: the training context as our ``common.json`` holds it (``global_step``,
            ``state`` with the plain values of the saved state, ``rank_local`` ...).
        layout: the layout that wrote it (v2 ``metadata.json``'s), when known.
        model_config: a HuggingFace ``config.json`` dict, when the source has one; for a MindFormers
            Qwen3, the model config recorded beside it (MindFormers' keys, no ``model_type`` unless it
            is HuggingFace's: exports infer config.json from the shapes and take what shapes cannot tell,
            ``rms_norm_eps`` / ``rope_theta``, from it).
        notes: the decisions taken while reading it, one line each (which names and why,
            the fused layout and where it came from ...); :func:`open_source` logs them.
        hf_files: its generation and tokenizer files, to carry byte for byte (:mod:`resumable.formats.hf_aux`).
    """

    path: AnyPath
    format: Format
    iteration: int | None
    tensors: dict[str, SourceTensor]
    common: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    hf_files: dict[str, hf_aux.AuxFile] = field(default_factory=dict)


# --------------------------------------------------------------------------- detection


def _iteration_kind(folder: AnyPath) -> Format:
    meta = folder / v2.METADATA
    if storage.is_file(meta):
        doc = hf.load_json_object(meta, "metadata", mf.MAX_METADATA_BYTES)
        if doc.get("format") == v2.FORMAT:
            return "v2"
        if "state_dict_metadata" in doc:
            return "mindformers"
        raise CorruptCheckpointError(
            f"{meta} is neither resumable's (format {v2.FORMAT!r}) nor MindFormers' (state_dict_metadata)")
    return "mindformers"  # a single-rank MindFormers 2.0 save has no metadata.json


def detect(path: str | os.PathLike[str] | storage.ObjectPath) -> tuple[Format, AnyPath]:
    """The format of ``path`` and the folder to read (a checkpoint folder resolves to its iteration).

    Raises:
        CheckpointNotFoundError: the path is missing or holds no checkpoint (says what was looked for).
        CorruptCheckpointError: the tracker names an uncommitted folder.

    Example::

        detect("output/checkpoint")     # ("v2", Path("output/checkpoint/iteration_00000020"))
    """
    path = storage.as_path(path)
    if storage.is_file(path):
        return _file_kind(path), path
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(
            f"{path} does not exist (or is neither a folder nor a file); give a checkpoint folder, an iteration_* "
            "folder, a rank_* tree, a HuggingFace/unified folder or a .safetensors / .ckpt file")
    if commit.parse_iteration(path.name) is not None:
        if not commit.is_committed(path):
            raise CorruptCheckpointError(f"{path} is not a committed checkpoint (no readable metadata.json "
                                         "or common.json); it cannot be read")
        return _iteration_kind(path), path
    if storage.is_file(path / hf.SINGLE) or storage.is_file(path / hf.INDEX):
        return ("unified" if storage.is_file(path / v2.COMMON) else "hf"), path
    entries = storage.list_dir(path)
    if any(e.is_dir and not e.special and e.name.startswith("rank_") for e in entries):
        return "legacy", path
    folder = commit.latest_committed(path)
    if folder is None and storage.is_file(path / v2.COMMON) and (
            storage.is_file(path / v2.METADATA) or any(mf.is_v2_file_name(e.name) for e in entries)):
        return _iteration_kind(path), path  # an iteration folder under another name (copied, renamed)
    if folder is None:
        single = _only_file(path, entries)
        if single is not None:
            return _file_kind(single), single
        raise CheckpointNotFoundError(
            f"{path} holds no checkpoint: no committed iteration_* folder, no rank_* folders, no "
            f"{hf.SINGLE} or {hf.INDEX}, no .safetensors or .ckpt file")
    return _iteration_kind(folder), folder


def _only_file(folder: AnyPath, entries: list[storage.Entry]) -> AnyPath | None:
    """The one checkpoint file of a folder (its ``entries``) with no tracker and no iterations; several are
    refused by name."""
    if storage.exists(folder / commit.TRACKER) or any(commit.parse_iteration(e.name) is not None for e in entries):
        return None
    files = [folder / e.name for e in entries if (folder / e.name).suffix in FILE_SUFFIXES
             and not e.name.startswith(".") and not e.is_dir]
    if len(files) > 1:
        raise CheckpointNotFoundError(
            f"{folder} holds {len(files)} checkpoint files and no checkpoint folder structure (no tracker, "
            f"iteration_* or rank_* folders): pass one of them: {', '.join(str(f) for f in files)}")
    return files[0] if files else None


def _file_kind(path: AnyPath) -> Format:
    """What one file is: ours (a Checkpoint 1.0 rank file), a MindSpore file, a PyTorch file or safetensors."""
    if isinstance(path, Path):
        check_regular(path, "checkpoint file")  # a FIFO would block the reads below
    if path.suffix == ".safetensors":
        meta = read_header(path).metadata
        if v2.META_FILE in meta:
            raise CheckpointNotFoundError(f"{path} is one file of a resumable Checkpoint 2.0 iteration, which only "
                                          f"its metadata.json describes: pass its folder {path.parent}")
        if v1.META_KEY in meta:
            return "legacy"
        if mf.is_v2_file_name(path.name) and storage.is_file(path.parent / v2.COMMON):
            raise CheckpointNotFoundError(f"{path} is one file of a MindFormers 2.0 iteration, whose tensors may "
                                          f"span its other files: pass its folder {path.parent}")
        return "mindspore" if meta.get("format") == "ms" or mf.parse_legacy_name(path.name) else "safetensors"
    if path.suffix not in FILE_SUFFIXES:
        raise CheckpointNotFoundError(f"{path}: not a checkpoint file (expected one of {', '.join(FILE_SUFFIXES)})")
    if is_zip(path):
        return "legacy" if _ours_ckpt(path) else "torch"
    with storage.open_reader(path, "checkpoint file") as f:
        first = f.read(0, 1) if f.size else b""
    if first == bytes([PICKLE_PROTOCOL]):
        return "torch"
    if path.suffix != ".ckpt":
        raise CorruptCheckpointError(f"{path}: neither a torch.save file (zip or pickle) nor a MindSpore .ckpt")
    return "mindspore"


def _ours_ckpt(path: AnyPath) -> bool:
    """Whether a torch zip is one of our Checkpoint 1.0 rank files (``__metadata__`` with ``resumable_legacy``)."""
    meta = read_torch_file(path).objects.get("__metadata__")  # v1.save_ckpt's key
    return isinstance(meta, dict) and v1.META_KEY in meta


# ------------------------------------------------------------------------------ readers


def _safetensors_reader(file: AnyPath, key: str, box: Box, dtype: torch.dtype) -> Reader:
    """Reads regions of one stored chunk, each checked against the file's block checksums
    (so a damaged source never converts, merges or splits cleanly)."""
    def read(region: Box) -> torch.Tensor:
        src = region.slices_in(box)
        header = read_header(file)
        entry = stored_entry(header, key, dtype, box.shape)
        digests = block_digests(header)
        if digests is None:
            check_slice(file, key, src, box.shape, dtype.itemsize)  # nothing to check: logs it, once per folder
        with storage.open_reader(file) as reader:
            reader.random()
            return read_region(reader, entry, src, None if digests is None else digests[key]).contiguous()
    return read


class _StoredChunks(Sequence[SourceChunk]):
    """A v2 tensor's chunks, listed only when iterated: counting them (``inspect``) costs O(1) for a grid."""

    def __init__(self, folder: AnyPath, meta: v2.Metadata, name: str) -> None:
        self._folder, self._meta, self._name = folder, meta, name
        self._chunks: tuple[SourceChunk, ...] | None = None

    def _all(self) -> tuple[SourceChunk, ...]:
        if self._chunks is None:
            dtype = getattr(torch, self._meta.tensors[self._name].dtype)
            self._chunks = tuple(
                SourceChunk(box, _safetensors_reader(self._folder / v2.check_bare_name(copies[0].file, self._name),
                                                     copies[0].key, box, dtype), copies[0].file)
                for box, copies in self._meta.stored(self._name, first_only=True))
        return self._chunks

    def __len__(self) -> int:
        return self._meta.chunk_count(self._name)

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]

    def __iter__(self) -> Iterator[SourceChunk]:
        return iter(self._all())


def _open_v2(folder: AnyPath) -> Source:
    meta = v2.read_metadata(folder)
    tensors = {name: SourceTensor(name, getattr(torch, t.dtype), tuple(t.shape),
                                  _StoredChunks(folder, meta, name))  # type: ignore[arg-type]
               for name, t in meta.tensors.items()}
    common = v2.read_common(folder, meta)
    state = common.get("state") or {}
    config = state.get("model_config")
    files = hf_aux.recorded(folder / hf_aux.FOLDER, state.get(hf_aux.STATE_KEY), str(folder / v2.COMMON))
    return Source(folder, "v2", meta.iteration, tensors, common, asdict(meta.layout),
                  config if isinstance(config, dict) else None, hf_files=files)


def _open_hf(folder: AnyPath, fmt: Format) -> Source:
    tensors = {}
    for name, entry in hf.index_hf_folder(folder).items():
        chunk = SourceChunk(Box.full(entry.shape), lambda region, e=entry: hf.read_hf_box(e, region), entry.file.name)
        tensors[name] = SourceTensor(name, entry.dtype, entry.shape, (chunk,))
    common = v2.read_common(folder) if storage.is_file(folder / v2.COMMON) else {}
    config = hf.read_hf_config(folder) if storage.is_file(folder / hf.CONFIG) else None
    if config is not None and config.get("tie_word_embeddings") and "lm_head.weight" not in tensors \
            and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = SourceTensor("lm_head.weight", *_same(tensors["model.embed_tokens.weight"]))
    record = (common.get("state") or {}).get(hf_aux.STATE_KEY)  # a unified folder we wrote vouches for them
    files = hf_aux.recorded(folder, record, str(folder / v2.COMMON)) if record is not None else hf_aux.find(folder)
    return Source(folder, fmt, common.get("iteration"), tensors, common, None, config or None, hf_files=files)


def _same(t: SourceTensor) -> tuple[torch.dtype, tuple[int, ...], tuple[SourceChunk, ...]]:
    return t.dtype, t.shape, t.chunks


def _foreign_chunks(t: mf.ForeignTensor) -> tuple[SourceChunk, ...]:
    """Distinct boxes of a foreign tensor (the first replica of each)."""
    seen: dict[Box, SourceChunk] = {}
    for c in t.chunks:
        seen.setdefault(c.box, SourceChunk(c.box, lambda region, c=c: mf.read_chunk(c, region), c.file.name))
    return tuple(seen.values())


def _rows_reader(fused: SourceTensor, rows: list[int]) -> Reader:
    """Read a region of a tensor made of ``rows`` of ``fused`` (one run of fused rows at a time)."""
    def read(region: Box) -> torch.Tensor:
        out = torch.empty(region.shape, dtype=fused.dtype)
        at = 0
        for start, length in runs(rows[region.offsets[0]:region.offsets[0] + region.shape[0]]):
            box = Box((start, *region.offsets[1:]), (length, *region.shape[1:]))
            out[at:at + length] = fused.read(box)
            at += length
        return out
    return read


@dataclass(frozen=True)
class _Options:
    """What the caller of :func:`open_source` asked for (see its Args)."""

    heads: AttentionShape | None = None
    fused: Fused | None = None
    names: Names = "auto"
    src_strategy: AnyPath | None = None


@dataclass(frozen=True)
class _Recorded:
    """A model config found beside a checkpoint: its keys (top level over ``model_config``) and its file."""

    path: AnyPath
    keys: dict[str, Any]


def _recorded_config(folders: Sequence[AnyPath]) -> _Recorded | None:
    """The first ``config.json`` of ``folders`` (a MindFormers or HuggingFace model config), if any."""
    for folder in folders:
        path = folder / hf.CONFIG
        if storage.is_file(path):  # a FIFO is no config: is_file() is False, and load_json_object refuses it too
            doc = hf.load_json_object(path, "model config")
            inner = doc.get("model_config")
            return _Recorded(path, {**inner, **doc} if isinstance(inner, dict) else doc)
    return None


def _scalars(ckpt: mf.ForeignCheckpoint, notes: list[str]) -> dict[str, int | float]:
    """MindSpore's training scalars (``ms_names.SCALARS``) of one element: name → value.

    A scalar name holding more than one element is no scalar: it stays a tensor, with a note.
    """
    out: dict[str, int | float] = {}
    for name, t in ckpt.tensors.items():
        if parse_ms_name(name).kind != "scalar":
            continue
        if math.prod(t.shape) != 1:
            notes.append(f"{name}: kept as a tensor of shape {list(t.shape)} (MindSpore's scalar of that name has "
                         "one element)")
            continue
        value = mf.read_chunk(t.chunks[0]).reshape(-1)[0]
        out[name] = value.item() if value.dtype.is_floating_point or value.dtype == torch.bool else int(value)
    return out


def _mapping_model(path: Path, params: list[str], names: Names, notes: list[str]) -> ModuleType | None:
    """The model whose MindFormers names are mapped to HuggingFace ones (``names``: auto, keep or hf), or
    None to keep the stored names; the reason noted."""
    if names == "keep":
        notes.append("names: kept as stored (names='keep' / --names keep)")
        return None
    found = identify_mindformers(params)
    if found.model is not None:
        notes.append(f"names: mapped MindFormers names to HuggingFace ({found.reason}"
                     + (", names='hf')" if names == "hf" else ")"))
        return MODELS[found.model]
    if names == "hf":
        raise ConfigError(f"{path}: --names hf maps MindFormers names to HuggingFace, but {found.reason}; the "
                          f"names known are those of resumable.models ({', '.join(MODELS)}): pass --names keep "
                          "(or auto) to keep the checkpoint's own names")
    notes.append(f"names: kept ({found.reason})")
    return None


def _param_shapes(path: Path, tensors: Mapping[str, mf.ForeignTensor]) -> dict[str, tuple[int, ...]]:
    """Parameter → shape, from the parameter or its moments (which must have its shape: they split alike)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in tensors.items():
        parsed = parse_ms_name(name)
        if parsed.kind == "scalar":
            continue
        if shapes.setdefault(parsed.param, t.shape) != t.shape:
            raise CorruptCheckpointError(f"{path}: {name!r} has shape {list(t.shape)} but parameter "
                                         f"{parsed.param!r} (or its other moment) has {list(shapes[parsed.param])}; "
                                         "a moment has its parameter's shape")
    return shapes


def _mapped_tensors(path: Path, tensors: Mapping[str, mf.ForeignTensor], model: ModuleType, opts: _Options,
                    config: _Recorded | None, notes: list[str]) -> dict[str, SourceTensor]:
    """Our tensors under the model's HuggingFace names: renamed, or row sets of fused tensors read on demand.

    ``model.mf_import_plan`` says which of our parameters each stored parameter holds; a moment
    holds the same parts of its parameter's moments (its rows are in the same order).
    """
    plan = model.mf_import_plan(_param_shapes(path, tensors), where=str(path), notes=notes, heads=opts.heads,
                                fused=opts.fused, config=None if config is None else config.keys,
                                config_path="" if config is None else str(config.path))
    out: dict[str, SourceTensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors.items():
        parsed = parse_ms_name(name)
        whole = SourceTensor(name, t.dtype, t.shape, _foreign_chunks(t))
        if parsed.kind == "scalar":  # a scalar's name holding many elements (see _scalars): kept as is
            _claim(path, out, origin, name, whole)
            continue
        for part in plan[parsed.param]:
            ours = our_name(replace(parsed, param=part.param))
            if part.rows is None:
                _claim(path, out, origin, name, SourceTensor(ours, *_same(whole)))
                continue
            shape = (len(part.rows), *t.shape[1:])
            _claim(path, out, origin, name, SourceTensor(ours, t.dtype, shape, (SourceChunk(
                Box.full(shape), _rows_reader(whole, part.rows), ", ".join(sorted({c.where for c in whole.chunks}))),)))
    return out


def _claim(path: Path, out: dict[str, SourceTensor], origin: dict[str, str], stored: str, t: SourceTensor) -> None:
    """Add ``t`` (read from the stored tensor ``stored``), refusing a second tensor under the same name."""
    if t.name in out:
        raise CorruptCheckpointError(f"{path}: {origin[t.name]!r} and {stored!r} are both {t.name!r}; a checkpoint "
                                     "holds one optimizer's moments: remove the other's")
    origin[t.name], out[t.name] = stored, t


def _kept_tensors(path: Path, tensors: Mapping[str, mf.ForeignTensor]) -> dict[str, SourceTensor]:
    """Our tensors under the checkpoint's own names (moments as ``optimizer.state.<p>.exp_avg[_sq]``)."""
    out: dict[str, SourceTensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors.items():
        parsed = parse_ms_name(name)
        ours = name if parsed.kind == "scalar" else our_name(parsed)  # a scalar's name of many elements: as is
        _claim(path, out, origin, name, SourceTensor(ours, t.dtype, t.shape, _foreign_chunks(t)))
    return out


def _steps(out: dict[str, SourceTensor], global_step: int) -> None:
    """AdamW's per-parameter ``step`` for every ``exp_avg`` read from a MindSpore moment: the global step."""
    step = float(global_step)
    for name in [n for n in out if n.startswith(OPT_STATE) and n.endswith(".exp_avg")]:
        step_name = name[:-len("exp_avg")] + "step"
        if step_name not in out:
            out[step_name] = SourceTensor(step_name, torch.float32, (), (SourceChunk(
                Box((), ()), lambda region, s=step: torch.tensor(s, dtype=torch.float32)),))  # in no file


def _foreign_common(ckpt: mf.ForeignCheckpoint, scalars: dict[str, int | float]) -> dict[str, Any]:
    """Our common.json for a MindFormers context (no LR, RNG or data position: they were never saved);
    every MindSpore scalar's value under ``mindspore``."""
    ctx = ckpt.context
    consumed = ctx.consumed_samples
    if consumed is None and ctx.global_batch_size:
        consumed = ctx.global_step * ctx.global_batch_size
    state = {"global_step": ctx.global_step, "epoch_num": ctx.epoch or 0, "step_num": ctx.step or 0,
             "consumed_samples": consumed or 0, "global_batch_size": ctx.global_batch_size or 0,
             "loss_scale": ctx.loss_scale}
    iteration = ckpt.iteration if ckpt.iteration is not None else ctx.global_step
    common = {"iteration": iteration, **state, "state": state, "rank_local": None}
    if scalars:
        common["mindspore"] = dict(sorted(scalars.items()))
    return common


def _open_foreign(ckpt: mf.ForeignCheckpoint, fmt: Format, opts: _Options, config_dirs: Sequence[AnyPath]) -> Source:
    """A MindSpore / MindFormers checkpoint: names kept or mapped (:func:`_mapping_model`), scalars to common."""
    notes: list[str] = []
    scalars = _scalars(ckpt, notes)
    tensors = {n: t for n, t in ckpt.tensors.items() if n not in scalars}
    params = sorted({parsed.param for n in tensors if (parsed := parse_ms_name(n)).kind != "scalar"})
    recorded = None
    model = _mapping_model(ckpt.path, params, opts.names, notes)
    if model is not None:
        recorded = _recorded_config(config_dirs)
        out = _mapped_tensors(ckpt.path, tensors, model, opts, recorded, notes)
    else:
        out = _kept_tensors(ckpt.path, tensors)
    _steps(out, ckpt.context.global_step)
    if scalars:
        notes.append(f"scalars: {', '.join(sorted(scalars))} recorded in common.json (\"mindspore\")")
    common = _foreign_common(ckpt, scalars)
    return Source(ckpt.path, fmt, common["iteration"], dict(sorted(out.items())), common,
                  model_config=recorded.keys if recorded is not None else None, notes=notes)


def _legacy_ext(root: AnyPath) -> str:
    """``safetensors`` when a ``rank_*`` folder holds a ``*.safetensors`` file (hidden ones aside, as glob), else ``ckpt``."""
    return "safetensors" if any(
        e.name.endswith(".safetensors") and not e.name.startswith(".")
        for rank in storage.list_dir(root) if rank.is_dir and rank.name.startswith("rank_")
        for e in storage.list_dir(root / rank.name)) else "ckpt"


def _written_by_us(path: AnyPath) -> bool:
    """Our Checkpoint 1.0 files carry ``resumable_legacy`` metadata (.ckpt: a torch zip, not protobuf)."""
    if path.suffix == ".ckpt":
        if isinstance(path, Path):
            check_regular(path, "legacy rank file")  # is_zipfile would block on a FIFO
        return is_zip(path)
    return v1.META_KEY in read_header(path).metadata


def _open_our_legacy(root: AnyPath, paths: list[AnyPath], *, single: bool = False) -> Source:
    """Our own Checkpoint 1.0 step: chunks indexed from each rank file's metadata (see resumable.legacy).

    ``single``: ``paths`` is one file given alone; refused when it holds only part of its step."""
    from resumable.legacy import RankFiles  # the legacy loader's file index: one reader of our rank files

    files = RankFiles(root)
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    meta = files.index(names)

    def reader(file: str, key: str, box: Box, dtype: torch.dtype) -> Reader:
        if not file.endswith(".ckpt"):
            return _safetensors_reader(root / file, key, box, dtype)
        return lambda region: files.ckpt[file][key][region.slices_in(box)].clone()

    tensors = {name: SourceTensor(name, getattr(torch, t.dtype), tuple(t.shape), tuple(
        SourceChunk(c.box, reader(c.stored[0].file, c.stored[0].key, c.box, getattr(torch, t.dtype)),
                    c.stored[0].file) for c in t.chunks))
        for name, t in meta.tensors.items()}
    infos = [files.infos[n] for n in names]
    world = infos[0].layout.get("world_size", 1)
    if single and world != 1 and (infos[0].remove_redundancy or any(
            covers_exactly(t.shape, [c.box for c in t.chunks]) for t in tensors.values())):
        raise CheckpointNotFoundError(
            f"{paths[0]} holds rank {infos[0].rank}'s part of a {world}-rank Checkpoint 1.0 step, not full "
            f"tensors: pass the tree holding every rank_* folder ({root}) instead")
    state = dict(infos[0].context.get("state") or {})
    common = {"iteration": state.get("global_step", 0), **{k: state[k] for k in _CONTEXT if k in state},
              "state": state, "rank_local": [i.context.get("rank_local") for i in infos]}
    config = state.get("model_config")
    return Source(root, "legacy", common["iteration"], tensors, common, infos[0].layout,
                  config if isinstance(config, dict) else None,
                  hf_files=hf_aux.recorded(root / hf_aux.FOLDER, state.get(hf_aux.STATE_KEY), str(root / names[0])))


def _config_dirs(file: AnyPath) -> list[AnyPath]:
    """Where a single file's model config may lie: beside it, and at the root of its legacy tree."""
    inside_tree = re.fullmatch(r"rank_\d+", file.parent.name) is not None
    return [file.parent, file.parent.parent] if inside_tree else [file.parent]


def _refuse_rank_share(path: AnyPath) -> None:
    """A MindFormers legacy rank file saved with remove_redundancy beside other ranks holds only its share."""
    rank = path.parent
    if (path.suffix != ".safetensors" or re.fullmatch(r"rank_\d+", rank.name) is None
            or read_header(path).metadata.get("remove_redundancy") != "True"):
        return
    others = [e.name for e in storage.list_dir(rank.parent) if e.name != rank.name and re.fullmatch(r"rank_\d+", e.name)]
    if others:
        raise CheckpointNotFoundError(
            f"{path} was saved with remove_redundancy beside {len(others)} other rank folder(s): it holds only "
            f"{rank.name}'s share of the tensors; pass the tree {rank.parent} instead")


def _torch_reader(t: torch.Tensor) -> Reader:
    full = Box.full(tuple(t.shape))
    return lambda region: t[region.slices_in(full)].clone()


def _open_torch(path: AnyPath, opts: _Options) -> Source:
    """A PyTorch file: its own (flattened) names; its other values become the common state."""
    if opts.names == "hf":
        raise ConfigError(f"--names hf maps MindFormers names, but {path} is a PyTorch file: its names are kept "
                          "(pass --names auto or keep)")
    f = read_torch_file(path)
    tensors = {n: SourceTensor(n, t.dtype, tuple(t.shape), (SourceChunk(Box.full(tuple(t.shape)), _torch_reader(t),
                                                                        path.name),))
               for n, t in sorted(f.tensors.items())}
    step = f.objects.get("global_step")
    step = step if schema.is_int(step) and step >= 0 else 0
    notes = [f"names: kept (a PyTorch file{'; tensors of its ' + repr(f.wrapper) + ' entry named without it' if f.wrapper else ''})"]
    if f.objects:
        notes.append(f"state: its other entries ({', '.join(sorted(f.objects))}) kept in common.json's state")
    common = {"iteration": step, "global_step": step, "state": f.objects, "rank_local": None}
    return Source(path, "torch", step, tensors, common, notes=notes)


def _open_file(path: AnyPath, fmt: Format, opts: _Options) -> Source:
    """One file given alone (see :func:`detect`)."""
    if fmt == "legacy":
        source = _open_our_legacy(path.parent.parent, [path], single=True)
        source.path = path
        return source
    if fmt == "torch":
        return _open_torch(path, opts)
    _refuse_rank_share(path)
    return _open_foreign(mf.read_ms_file(path), fmt, opts, _config_dirs(path))


def _open_legacy(folder: AnyPath, opts: _Options) -> Source:
    ext = _legacy_ext(folder)
    _, paths = mf.select_legacy_files(folder, ext)
    if paths and _written_by_us(paths[0]):
        source = _open_our_legacy(folder, paths)
        if opts.src_strategy is not None:
            source.notes.append(f"src_strategy {opts.src_strategy} not used: resumable's rank files record "
                                "their own chunks and strategy")
        return source
    source = _open_foreign(mf.read_mf_legacy(folder, ext, strategy=opts.src_strategy), "legacy", opts, [folder])
    if opts.src_strategy is not None:
        source.notes.append(f"slices placed by the strategy files {opts.src_strategy}")
    return source


def open_source(path: str | os.PathLike[str] | storage.ObjectPath, *, heads: AttentionShape | None = None,
                fused: Fused | None = None, names: Names = "auto",
                src_strategy: str | os.PathLike[str] | storage.ObjectPath | None = None) -> Source:
    """Open any checkpoint (see the module table) for reading.

    Args:
        path: a checkpoint folder, an ``iteration_*`` folder, a ``rank_*`` tree or a
            HuggingFace / unified folder, or one file; local, or ``s3://``.
        heads: attention head counts for splitting MindFormers ``linear_qkv`` (default:
            the recorded config's, else inferred from the shapes).
        fused: the row order of MindFormers' fused ``linear_qkv`` / ``linear_fc1``: a
            :class:`FusedLayout`, or a dict of some of its keys; a key not given comes from
            the checkpoint's recorded ``config.json`` when it sets it, else MindFormers' default.
        names: a MindSpore checkpoint's names: ``auto`` maps MindFormers Qwen3 names to
            HuggingFace ones when every parameter is one, else keeps them; ``hf`` always
            maps (an error when a name does not fit); ``keep`` never does.
        src_strategy: a MindFormers legacy tree's strategy file or folder
            (``src_strategy_path_or_dir``), for trees whose ranks hold slices.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: naming the path.
        ConfigError: ``names`` is unknown, or ``hf`` and a name is not a MindFormers Qwen3 name.

    Example::

        open_source("mf_run/checkpoint").tensors["model.layers.0.self_attn.q_proj.weight"].read()
        open_source("net.ckpt", names="keep").tensors["fc1.weight"]
    """
    if names not in NAMES:
        raise ConfigError(f"names {names!r}: choose one of {', '.join(NAMES)}")
    opts = _Options(heads, fused, names, None if src_strategy is None else storage.as_path(src_strategy))
    fmt, folder = detect(path)
    single = storage.is_file(folder)
    if single:
        source = _open_file(folder, fmt, opts)
    elif fmt == "v2":
        source = _open_v2(folder)
    elif fmt in ("hf", "unified"):
        source = _open_hf(folder, fmt)
    elif fmt == "legacy":
        source = _open_legacy(folder, opts)
    else:
        source = _open_foreign(mf.read_mf_checkpoint(folder), fmt, opts, [folder, folder.parent])
    if opts.src_strategy is not None and (fmt != "legacy" or single):
        source.notes.append(f"src_strategy {opts.src_strategy} not used: a {fmt} checkpoint records its own layout")
    for note in source.notes:
        log.info("%s: %s", source.path, note)
    return source
