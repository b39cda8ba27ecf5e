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
                                            names mapped), its newest complete step
``model.safetensors`` (+ index)             ``unified`` with ``common.json``, else ``hf``
==========================================  =========================================

MindFormers names become ours through :mod:`resumable.models.qwen3`: fused
``linear_qkv`` / ``linear_fc1`` appear as q/k/v and gate/up tensors whose regions are
gathered from the fused rows on demand (no full copy); ``adam_m``/``adam_v`` become
``exp_avg``/``exp_avg_sq``; AdamW's per-parameter ``step`` is created from the global
step. The head counts needed to split ``linear_qkv`` are read from the shapes
(``q_layernorm`` gives head_dim, ``linear_proj`` the query heads).

Nothing here is collective; reading is lazy (headers and JSON only until a chunk is read).

Example::

    src = open_source("output/checkpoint")              # newest committed iteration
    w = src.tensors["model.norm.weight"].read()        # assembled from its chunks
    src.common["global_step"]
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Literal

import torch

from resumable import commit
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError
from resumable.formats import hf, mindformers as mf, v1, v2
from resumable.formats.jsonfile import check_regular
from resumable.formats.safetensors_io import open_safetensors, read_header, stored_slice
from resumable.models.qwen3 import AttentionShape, fc1_rows, infer_heads, map_mf_name, qkv_rows
from resumable.geometry import Box, runs
from resumable.reads import check_slice

log = logging.getLogger(__name__)

__all__ = ["Source", "SourceChunk", "SourceTensor", "detect", "open_source"]

Format = Literal["v2", "mindformers", "legacy", "unified", "hf"]
Reader = Callable[[Box], torch.Tensor]
_MF_PREFIXES = ("embedding.", "decoder.", "output_layer.", "adam_m.", "adam_v.", "moment1.", "moment2.")
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
        model_config: a HuggingFace ``config.json`` dict, when the source has one.
    """

    path: Path
    format: Format
    iteration: int | None
    tensors: dict[str, SourceTensor]
    common: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None


# --------------------------------------------------------------------------- detection


def _iteration_kind(folder: Path) -> Format:
    meta = folder / v2.METADATA
    if meta.is_file():
        doc = hf.load_json_object(meta, "metadata", mf.MAX_METADATA_BYTES)
        if doc.get("format") == v2.FORMAT:
            return "v2"
        if "state_dict_metadata" in doc:
            return "mindformers"
        raise CorruptCheckpointError(
            f"{meta} is neither resumable's (format {v2.FORMAT!r}) nor MindFormers' (state_dict_metadata)")
    return "mindformers"  # a single-rank MindFormers 2.0 save has no metadata.json


def detect(path: str | os.PathLike[str]) -> tuple[Format, Path]:
    """The format of ``path`` and the folder to read (a checkpoint folder resolves to its iteration).

    Raises:
        CheckpointNotFoundError: the path is missing or holds no checkpoint (says what was looked for).
        CorruptCheckpointError: the tracker names an uncommitted folder.

    Example::

        detect("output/checkpoint")     # ("v2", Path("output/checkpoint/iteration_00000020"))
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{path} does not exist or is not a folder; give a checkpoint folder, an iteration_* "
            "folder, a rank_* tree or a HuggingFace/unified folder")
    if commit.parse_iteration(path.name) is not None:
        if not commit.is_committed(path):
            raise CorruptCheckpointError(f"{path} is not a committed checkpoint (no readable metadata.json "
                                         "or common.json); it cannot be read")
        return _iteration_kind(path), path
    if (path / hf.SINGLE).is_file() or (path / hf.INDEX).is_file():
        return ("unified" if (path / v2.COMMON).is_file() else "hf"), path
    if any(p.is_dir() and p.name.startswith("rank_") for p in path.iterdir()):
        return "legacy", path
    folder = commit.latest_committed(path)
    if folder is None:
        raise CheckpointNotFoundError(
            f"{path} holds no checkpoint: no committed iteration_* folder, no rank_* folders, no "
            f"{hf.SINGLE} or {hf.INDEX}")
    return _iteration_kind(folder), folder


# ------------------------------------------------------------------------------ readers


def _safetensors_reader(file: Path, key: str, box: Box, dtype: torch.dtype) -> Reader:
    """Reads regions of one stored chunk, each checked against the file's block checksums
    (so a damaged source never converts, merges or splits cleanly)."""
    def read(region: Box) -> torch.Tensor:
        with open_safetensors(file) as handle:
            piece = stored_slice(handle, file, key, dtype, box.shape)
            src = region.slices_in(box) if box.shape else ()
            data = handle.get_tensor(key) if not box.shape else piece[src].contiguous()
        check_slice(file, key, src, box.shape, dtype.itemsize)
        return data
    return read


class _StoredChunks(Sequence[SourceChunk]):
    """A v2 tensor's chunks, listed only when iterated: counting them (``inspect``) costs O(1) for a grid."""

    def __init__(self, folder: Path, meta: v2.Metadata, name: str) -> None:
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


def _open_v2(folder: Path) -> Source:
    meta = v2.read_metadata(folder)
    tensors = {name: SourceTensor(name, getattr(torch, t.dtype), tuple(t.shape),
                                  _StoredChunks(folder, meta, name))  # type: ignore[arg-type]
               for name, t in meta.tensors.items()}
    common = v2.read_common(folder, meta)
    config = (common.get("state") or {}).get("model_config")
    return Source(folder, "v2", meta.iteration, tensors, common, asdict(meta.layout),
                  config if isinstance(config, dict) else None)


def _open_hf(folder: Path, fmt: Format) -> Source:
    tensors = {}
    for name, entry in hf.index_hf_folder(folder).items():
        chunk = SourceChunk(Box.full(entry.shape), lambda region, e=entry: hf.read_hf_box(e, region), entry.file.name)
        tensors[name] = SourceTensor(name, entry.dtype, entry.shape, (chunk,))
    common = v2.read_common(folder) if (folder / v2.COMMON).is_file() else {}
    config = hf.read_hf_config(folder) if (folder / hf.CONFIG).is_file() else None
    if config is not None and config.get("tie_word_embeddings") and "lm_head.weight" not in tensors \
            and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = SourceTensor("lm_head.weight", *_same(tensors["model.embed_tokens.weight"]))
    return Source(folder, fmt, common.get("iteration"), tensors, common, None, config or None)


def _same(t: SourceTensor) -> tuple[torch.dtype, tuple[int, ...], tuple[SourceChunk, ...]]:
    return t.dtype, t.shape, t.chunks


def _foreign_chunks(t: mf.ForeignTensor) -> tuple[SourceChunk, ...]:
    """Distinct boxes of a foreign tensor (the first replica of each)."""
    seen: dict[Box, SourceChunk] = {}
    for c in t.chunks:
        seen.setdefault(c.box, SourceChunk(c.box, lambda region, c=c: mf.read_chunk(c, region), c.file.name))
    return tuple(seen.values())


def _infer_heads(ckpt: mf.ForeignCheckpoint) -> AttentionShape:
    try:
        return infer_heads({n: t.shape for n, t in ckpt.tensors.items()})
    except ValueError as e:
        raise CorruptCheckpointError(f"{ckpt.path}: {e}") from None


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


def _map_foreign(ckpt: mf.ForeignCheckpoint, heads: AttentionShape | None) -> dict[str, SourceTensor]:
    """Our tensors from a foreign checkpoint: MindFormers names mapped, or ours kept."""
    names = ckpt.tensors.keys()
    if not any(n.startswith(_MF_PREFIXES) for n in names):  # our own legacy files: our names already
        return {n: SourceTensor(n, t.dtype, t.shape, _foreign_chunks(t))
                for n, t in ckpt.tensors.items() if n not in _CONTEXT}
    out: dict[str, SourceTensor] = {}
    for name, t in ckpt.tensors.items():
        mapped = map_mf_name(name)
        if mapped.transform == "drop":
            continue
        whole = SourceTensor(name, t.dtype, t.shape, _foreign_chunks(t))
        if mapped.transform == "rename":
            out[mapped.hf_names[0]] = SourceTensor(mapped.hf_names[0], *_same(whole))
            continue
        heads = heads or _infer_heads(ckpt)
        parts = qkv_rows(heads) if mapped.transform == "qkv" else fc1_rows(t.shape[0])
        for hf_name, rows in zip(mapped.hf_names, parts):
            shape = (len(rows), *t.shape[1:])
            out[hf_name] = SourceTensor(hf_name, t.dtype, shape,
                                        (SourceChunk(Box.full(shape), _rows_reader(whole, rows), name),))
    step = float(ckpt.context.global_step)
    for name in [n for n in out if n.startswith("optimizer.state.") and n.endswith(".exp_avg")]:
        step_name = name[:-len("exp_avg")] + "step"
        out[step_name] = SourceTensor(step_name, torch.float32, (), (
            SourceChunk(Box((), ()), lambda region, s=step: torch.tensor(s, dtype=torch.float32), "global_step"),))
    return dict(sorted(out.items()))


def _foreign_common(ckpt: mf.ForeignCheckpoint) -> dict[str, Any]:
    """Our common.json for a MindFormers context (no LR, RNG or data position: they were never saved)."""
    ctx = ckpt.context
    consumed = ctx.consumed_samples
    if consumed is None and ctx.global_batch_size:
        consumed = ctx.global_step * ctx.global_batch_size
    state = {"global_step": ctx.global_step, "epoch_num": ctx.epoch or 0, "step_num": ctx.step or 0,
             "consumed_samples": consumed or 0, "global_batch_size": ctx.global_batch_size or 0,
             "loss_scale": ctx.loss_scale}
    iteration = ckpt.iteration if ckpt.iteration is not None else ctx.global_step
    return {"iteration": iteration, **state, "state": state, "rank_local": None}


def _open_foreign(ckpt: mf.ForeignCheckpoint, fmt: Format, heads: AttentionShape | None) -> Source:
    common = _foreign_common(ckpt)
    return Source(ckpt.path, fmt, common["iteration"], _map_foreign(ckpt, heads), common)


def _legacy_ext(root: Path) -> str:
    return "safetensors" if any(root.glob("rank_*/*.safetensors")) else "ckpt"


def _written_by_us(path: Path) -> bool:
    """Our Checkpoint 1.0 files carry ``resumable_legacy`` metadata (.ckpt: a torch zip, not protobuf)."""
    if path.suffix == ".ckpt":
        check_regular(path, "legacy rank file")  # is_zipfile would block on a FIFO
        return zipfile.is_zipfile(path)
    return v1.META_KEY in read_header(path).metadata


def _open_our_legacy(root: Path, paths: list[Path]) -> Source:
    """Our own Checkpoint 1.0 step: chunks indexed from each rank file's metadata (see resumable.legacy)."""
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
    state = dict(infos[0].context.get("state") or {})
    common = {"iteration": state.get("global_step", 0), **{k: state[k] for k in _CONTEXT if k in state},
              "state": state, "rank_local": [i.context.get("rank_local") for i in infos]}
    return Source(root, "legacy", common["iteration"], tensors, common, infos[0].layout)


def _open_legacy(root: Path, heads: AttentionShape | None) -> Source:
    ext = _legacy_ext(root)
    _, paths = mf.select_legacy_files(root, ext)
    if paths and _written_by_us(paths[0]):
        return _open_our_legacy(root, paths)
    return _open_foreign(mf.read_mf_legacy(root, ext), "legacy", heads)


def open_source(path: str | os.PathLike[str], *, heads: AttentionShape | None = None) -> Source:
    """Open any checkpoint (see the module table) for reading.

    Args:
        path: a checkpoint folder, an ``iteration_*`` folder, a ``rank_*`` tree or a
            HuggingFace / unified folder.
        heads: attention head counts for splitting MindFormers ``linear_qkv`` (default:
            inferred from the shapes).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: naming the path.

    Example::

        open_source("mf_run/checkpoint").tensors["model.layers.0.self_attn.q_proj.weight"].read()
    """
    fmt, folder = detect(path)
    if fmt == "v2":
        return _open_v2(folder)
    if fmt in ("hf", "unified"):
        return _open_hf(folder, fmt)
    if fmt == "legacy":
        return _open_legacy(folder, heads)
    return _open_foreign(mf.read_mf_checkpoint(folder), fmt, heads)
