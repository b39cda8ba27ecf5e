"""Checkpoint 2.0 on disk: file names, the metadata.json schema with validation, common.json.

The layout is in ``docs/formats.md``; the details we fixed are in ``docs/internals.md``.
Everything read from disk is validated before use: file names must be bare names inside
the checkpoint folder, every chunk must lie inside its tensor, the chunks of a tensor
must tile it exactly, dtypes must be known. Errors name ``metadata.json`` (with its
path), the tensor and the rule.

``metadata.json`` can be rebuilt from the safetensors files alone
(:func:`rebuild_metadata`): each file's ``__metadata__`` carries the global shape and
offsets of every chunk it stores plus the file's kind, writer rank and the layout.

This module is bytes and JSON only: no ``torch.distributed``, no renames.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats.hf import safe_member
from resumable.formats.jsonfile import parse_json, parse_json_object, read_bounded
from resumable import storage
from resumable.storage import AnyPath
from resumable.formats.schema import MAX_DIM, MAX_NDIM, RESTORE, is_int, need_int, need_int_list, need_number, need_type, shown
from resumable.formats.safetensors_io import DTYPE_NAMES, read_header
from resumable.geometry import Box, covers_exactly
from resumable.grid import Grid, Mesh, check_placements

FORMAT = "resumable-checkpoint"
#: 2: tensors saved by placements over a mesh are described by them (``grid``), the file
#: table moves to files.json; version 1 (every chunk listed, files inline) is still read.
#: 3: metadata.json records common.json's size and xxh3-64 (``common``) and ends with a seal
#: of its own bytes (:data:`SEAL`); the data files record per-block checksums
#: (``safetensors_io.BLOCKS_KEY``). Versions 1 and 2 are still read.
FORMAT_VERSION = 3
METADATA = "metadata.json"
FILES = "files.json"
COMMON = "common.json"
KINDS = ("model", "opt")
#: ``__metadata__`` keys written into every file.
META_CHUNKS = "resumable"          # {key: {"name", "global_shape", "offsets"}}
META_FILE = "resumable_file"       # {"kind", "rank", "iteration", "layout", "save_optimizer"}
#: metadata.json ends with ``,"seal":"xxh3_64:<16 hex>"}``: the xxh3-64 of every byte before
#: the comma, checked before any value is trusted (a flipped bit in a tensor name is damage,
#: not an architecture mismatch).
SEAL = ',"seal":"xxh3_64:'
_SEAL_RE = re.compile(rb',"seal":"xxh3_64:([0-9a-f]{16})"\}\s*$')

MAX_METADATA_BYTES = 1 << 30
"""Largest metadata.json, files.json and common.json read (they grow with tensors, files and ranks)."""
MAX_RANKS = 1 << 20
"""Most ranks (world size, writers, mesh positions) a layout may name: more is damage, and would be allocated."""

#: torch dtype names as stored in metadata.json ("float32"), the ones safetensors can hold.
DTYPES = frozenset(str(d).removeprefix("torch.") for d in DTYPE_NAMES)
_ITEMSIZE = {str(d).removeprefix("torch."): d.itemsize for d in DTYPE_NAMES}
_FILE_RE = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<kind>model|opt)-(?P<index>\d{7})-(?P<count>\d{7})\.safetensors$")


def file_name(prefix: str, kind: str, index: int, count: int) -> str:
    """``CKP-model-0000000-0000004.safetensors``; an empty prefix gives ``model-…`` (MindFormers)."""
    if kind not in KINDS:
        raise ValueError(f"file kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= index < count:
        raise ValueError(f"file index {index} must be in [0, {count})")
    if "/" in prefix or "\\" in prefix or "\0" in prefix:
        raise ValueError(f"prefix {prefix!r} must not contain path separators")
    head = f"{prefix}-" if prefix else ""
    return f"{head}{kind}-{index:07d}-{count:07d}.safetensors"


def parse_file_name(name: str) -> tuple[str, str, int, int] | None:
    """``(prefix, kind, index, count)`` of a Checkpoint 2.0 file name, or None."""
    m = _FILE_RE.match(name)
    if not m:
        return None
    return m.group("prefix") or "", m.group("kind"), int(m.group("index")), int(m.group("count"))


def chunk_key(name: str, offsets: tuple[int, ...], several: bool) -> str:
    """Key of a chunk inside a file: the tensor name, or ``name@o0,o1`` when the file holds several of its chunks."""
    return f"{name}@{','.join(map(str, offsets))}" if several else name


@dataclass(frozen=True)
class Stored:
    """Where one copy of a chunk lives: a file of the folder and the key inside it."""

    file: str
    key: str


@dataclass
class ChunkMeta:
    """A box of a tensor and every file holding a copy of it."""

    offsets: list[int]
    shape: list[int]
    stored: list[Stored]

    @property
    def box(self) -> Box:
        return Box(tuple(self.offsets), tuple(self.shape))


@dataclass
class TensorMeta:
    """One tensor: dtype (torch name), global shape, kind (model/opt) and its chunks.

    Its chunks are either listed (``chunks``) or described by placements over a mesh
    (``grid``, with ``chunks`` empty): ask :meth:`Metadata.stored` rather than reading
    ``chunks`` directly.
    """

    dtype: str
    shape: list[int]
    kind: str
    chunks: list[ChunkMeta]
    grid: Grid | None = None


@dataclass
class FileMeta:
    """One safetensors file: size, xxh3-64 of its bytes (hex), kind and the rank that wrote it."""

    size: int
    xxh3_64: str
    kind: str
    rank: int


@dataclass
class LayoutMeta:
    """The parallel layout that wrote the checkpoint (for humans and ``inspect``)."""

    world_size: int
    mesh: dict[str, int] | None = None
    pipeline_stages: int = 1
    writers: int = 1


@dataclass
class Metadata:
    """The content of ``metadata.json`` (and, from format version 2, of ``files.json``)."""

    iteration: int
    layout: LayoutMeta
    save_optimizer: bool
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    files: dict[str, FileMeta] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    common: "Seal | None" = None  # common.json's size and checksum (format 3; None: not recorded)

    def file_of(self, kind: str, rank: int) -> str:
        """The file of ``kind`` that group rank ``rank`` wrote (grid tensors name ranks, not files).

        Raises:
            CorruptCheckpointError: no such file is listed.
        """
        index = self.__dict__.get("_by_rank")
        if index is None:
            index = self.__dict__["_by_rank"] = {(f.kind, f.rank): n for n, f in self.files.items()}
        name = index.get((kind, rank))
        if name is None:
            raise CorruptCheckpointError(
                f"{METADATA}: a {kind} chunk is stored by rank {rank}, but {FILES} lists no {kind} file of "
                "that rank; the metadata is damaged: rebuild it from the files (resumable.formats.v2.rebuild_metadata)")
        return name

    def stored(self, name: str, box: Box | None = None, first_only: bool = False) -> list[tuple[Box, list[Stored]]]:
        """The stored chunks of tensor ``name`` (those overlapping ``box`` when given), with their copies.

        ``first_only``: only the copy a reader uses (what the loader needs; a tensor
        replicated on W ranks has W copies).

        A listed tensor is filtered chunk by chunk; a grid tensor finds the overlapping
        chunks by bisection (O(log chunks + overlaps)), so a rank's planning costs what its
        own targets need, whatever the world size that saved.
        """
        t = self.tensors[name]
        if t.grid is None:
            return [(c.box, c.stored[:1] if first_only else c.stored) for c in t.chunks
                    if box is None or c.box.is_empty or c.box.intersect(box) is not None]
        g = t.grid
        found = g.all_chunks() if box is None else g.overlapping(box)
        out = []
        for chunk, fixed in found:
            several = g.chunks_per_rank(fixed) > 1
            key = chunk_key(name, chunk.offsets, several)
            out.append((chunk, [Stored(self.file_of(t.kind, r), key) for r in g.copies(fixed, first_only)]))
        return out

    def chunk_count(self, name: str) -> int:
        """Number of distinct stored chunks of ``name`` (without enumerating a grid)."""
        t = self.tensors[name]
        if t.grid is None:
            return len(t.chunks)
        return t.grid.chunk_count()

    def files_json(self) -> str:
        """``files.json``: one entry per file (size, checksum, kind, writer rank)."""
        return json.dumps({"format": FILES_FORMAT, "files": {n: asdict(f) for n, f in self.files.items()}},
                          separators=(",", ":"))

    def to_json(self) -> str:
        """Serialise ``metadata.json`` compactly (one line; read it with ``jq``).

        Format version 2: grid tensors record their mesh (an index into ``meshes``) and
        placements instead of their chunks; the file table is ``files.json``, whose size
        and checksum are recorded here under ``files``.
        """
        meshes: dict[Mesh, int] = {}
        tensors = {}
        for n, t in self.tensors.items():
            if t.grid is None:
                # Listed out: dataclasses.asdict deep-copies every list (most of a commit's time).
                tensors[n] = {"dtype": t.dtype, "shape": t.shape, "kind": t.kind,
                              "chunks": [{"offsets": c.offsets, "shape": c.shape,
                                          "stored": [_location(n, c, s) for s in c.stored]}
                                         for c in t.chunks]}
                continue
            entry = {"dtype": t.dtype, "shape": t.shape, "kind": t.kind,
                     "mesh": meshes.setdefault(t.grid.mesh, len(meshes)),
                     "placements": [list(p) for p in t.grid.placements]}
            if t.grid.owner is not None:
                entry["owner"] = t.grid.owner
            tensors[n] = entry
        table = self.files_json().encode()
        doc = {"format": self.format, "format_version": FORMAT_VERSION,
               "iteration": self.iteration, "layout": asdict(self.layout),
               "save_optimizer": self.save_optimizer,
               "meshes": [m.to_json() for m in meshes],
               "files": {"table": FILES, "count": len(self.files), "size": len(table),
                         "xxh3_64": xxhash.xxh3_64_hexdigest(table)},
               "tensors": tensors}
        if self.common is not None:
            doc["common"] = {"file": COMMON, "size": self.common.size, "xxh3_64": self.common.xxh3_64}
        return seal(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def from_json(cls, text: str | bytes, source: str | os.PathLike[str] = METADATA,
                  files: bytes | None = None) -> "Metadata":
        """Parse and validate ``metadata.json``.

        Args:
            text: the file's content.
            source: its path, used in error messages.
            files: the content of ``files.json`` (format version 2 keeps the file table there).

        Raises:
            UnsafeCheckpointError: a file name that is not a bare name inside the folder.
            CorruptCheckpointError: anything else malformed, naming ``source`` and the tensor.
        """
        return _parse(text, str(source), files)

    def validate(self, source: str = METADATA) -> None:
        """Run the read-time checks on an in-memory instance (save runs them before committing)."""
        _parse(self.to_json(), source, self.files_json().encode())


FILES_FORMAT = "resumable-files"


def _location(name: str, chunk: ChunkMeta, s: Stored) -> dict[str, str]:
    """A listed copy; the key is left out when it is the tensor name and is ``"@"`` for ``name@offsets``
    (a listed chunk then costs its offsets, shape and file name: ~150 bytes, whatever the names)."""
    if s.key == name:
        return {"file": s.file}
    if s.key == chunk_key(name, tuple(chunk.offsets), True):
        return {"file": s.file, "key": "@"}
    return {"file": s.file, "key": s.key}


def _int_list(x: object) -> bool:
    # type() is int: no bool, no subclass; inline (this runs for every offset and shape of a listed chunk).
    return type(x) is list and len(x) <= MAX_NDIM and all(type(v) is int and 0 <= v <= MAX_DIM for v in x)


def check_bare_name(name: object, source: str) -> str:
    """Refuse any file name that could leave the checkpoint folder."""
    # No separator at all, so no absolute path either: a bare name cannot leave the folder.
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise UnsafeCheckpointError(
            f"{source}: file name {name!r} is not a bare file name inside the checkpoint folder; "
            "refusing to read outside it (the metadata was edited or forged)")
    return name


@dataclass(frozen=True)
class Seal:
    """The size and xxh3-64 (hex) of a JSON file's bytes, recorded where that file cannot vouch for itself."""

    size: int
    xxh3_64: str

    @classmethod
    def of(cls, data: bytes) -> "Seal":
        return cls(len(data), xxhash.xxh3_64_hexdigest(data))


def seal(text: str) -> str:
    """``text`` (one JSON object, compact) with :data:`SEAL` and the xxh3-64 of the bytes before it appended."""
    body = text[:-1]  # without the closing brace
    return f"{body}{SEAL}{xxhash.xxh3_64_hexdigest(body.encode())}\"}}"


def check_seal(text: str | bytes, source: str) -> bool:
    """Verify the seal ``text`` ends with; False when it has none (format versions 1 and 2).

    Raises:
        CorruptCheckpointError: the seal does not match the bytes before it (the file is named).
    """
    raw = text.encode() if isinstance(text, str) else text
    m = _SEAL_RE.search(raw)
    if m is None:
        return False
    found = xxhash.xxh3_64_hexdigest(raw[:m.start()])
    if found != m.group(1).decode():
        raise CorruptCheckpointError(
            f"{source}: its seal records xxh3-64 {m.group(1).decode()} but its bytes hash to {found}; "
            "the file is damaged: restore it, rebuild it from the files (resumable.formats.v2.rebuild_metadata) "
            "or load another iteration (resume_training: true falls back to the newest valid one)")
    return True


def _json_object(text: str | bytes, where: str) -> dict:
    """The JSON object in ``text`` (bounded depth, finite numbers), or an error naming ``where``."""
    return parse_json_object(text, where, fix=_REBUILD)


def _parse(text: str | bytes, source: str, files_text: bytes | None = None) -> Metadata:
    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: {problem}; the checkpoint metadata is damaged: "
                                      "restore it or rebuild it from the files (resumable.formats.v2.rebuild_metadata)")
    sealed = check_seal(text, source)  # before any value is trusted
    doc = _json_object(text, source)
    if doc.get("format") != FORMAT:
        raise bad(f"format is {shown(doc.get('format'))}, expected {FORMAT!r}")
    version = doc.get("format_version")
    if not is_int(version) or version > FORMAT_VERSION or version < 1:
        raise CorruptCheckpointError(
            f"{source}: format_version {shown(version)} is not supported (this resumable reads up to "
            f"{FORMAT_VERSION}); upgrade resumable to load this checkpoint")
    if version >= 3 and not sealed:
        raise bad(f"format_version {version} ends with a seal ({SEAL}...), this file does not")
    common = _parse_seal(doc.get("common"), COMMON, bad) if version >= 3 and "common" in doc else None
    it, lay = doc.get("iteration"), doc.get("layout")
    if not is_int(it) or it < 0:
        raise bad(f"iteration {shown(it)} is not a non-negative integer")
    layout = parse_layout(lay, source)
    raw_files = doc.get("files") if version == 1 else _file_table(doc.get("files"), files_text, bad)
    files = _parse_files(raw_files, source, bad)
    meshes = _parse_meshes(doc.get("meshes", []), layout.world_size, files, bad) if version >= 2 else []
    tensors: dict[str, TensorMeta] = {}
    raw_tensors = doc.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise bad("'tensors' is missing or not an object")
    for name, t in raw_tensors.items():
        if isinstance(t, dict) and "mesh" in t:
            tensors[name] = _parse_grid_tensor(name, t, meshes, bad)
        else:
            tensors[name] = _parse_tensor(name, t, files, source, bad)
    _check_stored_bytes(tensors, files, bad)
    return Metadata(iteration=it, layout=layout,
                    save_optimizer=need_type(doc, "save_optimizer", source, bool, default=True, fix=_REBUILD),
                    tensors=tensors, files=files, format=FORMAT, format_version=version, common=common)


def _parse_seal(entry: object, name: str, bad: Any) -> Seal:
    """A recorded ``{"file", "size", "xxh3_64"}`` of ``name``, checked."""
    if (not isinstance(entry, dict) or entry.get("file") != name or not is_int(entry.get("size"))
            or entry["size"] < 0 or not isinstance(entry.get("xxh3_64"), str)
            or not re.fullmatch(r"[0-9a-f]{16}", entry["xxh3_64"])):
        raise bad(f"'common' {shown(entry)} must name {name!r} with its size and xxh3_64 (16 hex digits)")
    return Seal(entry["size"], entry["xxh3_64"])


_REBUILD = "the checkpoint metadata is damaged: restore it or rebuild it from the files " \
           "(resumable.formats.v2.rebuild_metadata)"


def parse_layout(lay: object, where: str, fix: str = _REBUILD) -> LayoutMeta:
    """``layout`` of metadata.json (or of a file's ``__metadata__``, legacy files included), checked: counts
    of ranks are positive ints bounded by :data:`MAX_RANKS`, ``mesh`` maps names to sizes. Other keys are ignored.

    Raises:
        CorruptCheckpointError: naming ``where`` and the key.
    """
    lay = need_type({"layout": lay}, "layout", where, dict, fix=fix)
    mesh = need_type(lay, "mesh", where, (dict, type(None)), default=None, label="layout.mesh", fix=fix)
    for dim in mesh or {}:
        need_int(mesh, dim, where, minimum=1, maximum=MAX_RANKS, label=f"layout.mesh.{dim}", fix=fix)
    return LayoutMeta(
        world_size=need_int(lay, "world_size", where, minimum=1, maximum=MAX_RANKS, label="layout.world_size", fix=fix),
        mesh=mesh,
        pipeline_stages=need_int(lay, "pipeline_stages", where, minimum=1, maximum=MAX_RANKS, default=1,
                                 label="layout.pipeline_stages", fix=fix),
        writers=need_int(lay, "writers", where, minimum=1, maximum=MAX_RANKS, default=1, label="layout.writers",
                         fix=fix))


def _check_stored_bytes(tensors: dict[str, TensorMeta], files: dict[str, FileMeta], bad: Any) -> None:
    """Every element is stored at least once, so the tensors hold no more bytes than the files listed
    (whose sizes every load and verify compare with the disk): a shape forged to terabytes is refused
    here, before a tool (``merge``, ``convert``) allocates it."""
    stored = sum(f.size for f in files.values())
    for name, t in tensors.items():
        numel = 1
        for s in t.shape:
            numel *= s
        if numel * _ITEMSIZE[t.dtype] > stored:
            raise bad(f"tensor {name!r} of {t.dtype} {t.shape} needs {numel * _ITEMSIZE[t.dtype]} bytes, more than "
                      f"the {stored} bytes of all the files listed")


def _file_table(entry: object, files_text: bytes | None, bad: Any) -> object:
    """The ``files`` object of ``files.json``, checked against the size and checksum metadata.json records."""
    if not isinstance(entry, dict) or entry.get("table") != FILES or not is_int(entry.get("size")) \
            or not isinstance(entry.get("xxh3_64"), str):
        raise bad(f"'files' {shown(entry)} must name {FILES!r} with its size and xxh3_64")
    if files_text is None:
        raise bad(f"{FILES} is missing (format version 2 keeps the file table there)")
    if len(files_text) != entry["size"] or xxhash.xxh3_64_hexdigest(files_text) != entry["xxh3_64"]:
        raise bad(f"{FILES} does not match the size and checksum recorded in metadata.json")
    doc = _json_object(files_text, f"{FILES} (beside {METADATA})")
    if doc.get("format") != FILES_FORMAT:
        raise bad(f"{FILES}: format is {shown(doc.get('format'))}, expected {FILES_FORMAT!r}")
    return doc.get("files")


def _parse_files(raw_files: object, source: str, bad: Any) -> dict[str, FileMeta]:
    if not isinstance(raw_files, dict):
        raise bad("'files' is missing or not an object")
    hex16 = re.compile(r"[0-9a-f]{16}")
    files: dict[str, FileMeta] = {}
    for name, f in raw_files.items():
        check_bare_name(name, source)
        if (not isinstance(f, dict) or not is_int(f.get("size")) or f["size"] < 0
                or not isinstance(f.get("xxh3_64"), str) or not hex16.fullmatch(f["xxh3_64"])
                or f.get("kind") not in KINDS or not is_int(f.get("rank")) or not 0 <= f["rank"] < MAX_RANKS):
            raise bad(f"file {name!r} entry {shown(f)} needs size (int), xxh3_64 (16 hex digits), "
                      f"kind (model/opt) and rank (a non-negative int)")
        files[name] = FileMeta(f["size"], f["xxh3_64"], f["kind"], f["rank"])
    return files


#: Mesh positions over all meshes per listed file: a save has a few meshes (the world's, its
#: pipeline stages', holder groups) and every rank writes a file, so a forged list of meshes
#: cannot allocate more than a few positions per file entry it actually lists.
MESH_POSITIONS_PER_FILE = 16


def _parse_meshes(raw: object, world: int, files: dict[str, FileMeta], bad: Any) -> list[Mesh]:
    if not isinstance(raw, list):
        raise bad("'meshes' is not a list")
    meshes, positions = [], 0
    for i, m in enumerate(raw):
        shape = m.get("shape") if isinstance(m, dict) else None
        if not _int_list(shape) or not shape or 0 in shape:
            raise bad(f"mesh {i} {shown(m)} needs a shape of positive integers")
        size = 1
        for s in shape:
            size *= s
        if size > world:  # before any list is built: a forged mesh allocates nothing
            raise bad(f"mesh {i} has {size} positions, more than the {world} ranks that saved")
        positions += size
        if positions > MESH_POSITIONS_PER_FILE * len(files):
            raise bad(f"the meshes hold over {positions} positions for {len(files)} files listed; a checkpoint "
                      "has a few meshes over the ranks that wrote its files")
        if "ranks_range" in m:
            rr = m["ranks_range"]
            if not (_int_list(rr) and len(rr) == 3 and rr[2] > 0 and rr[1] >= rr[0]):
                raise bad(f"mesh {i}: ranks_range {shown(rr)} must be [start, stop, step] with step > 0")
            count = -(-(rr[1] - rr[0]) // rr[2])
            if count != size:
                raise bad(f"mesh {i}: ranks_range gives {count} ranks for a mesh of {size} positions")
            ranks = tuple(range(rr[0], rr[1], rr[2]))
        else:
            ranks = m.get("ranks")
            if not (isinstance(ranks, list) and all(is_int(r) and r >= 0 for r in ranks)):
                raise bad(f"mesh {i} {shown(m)} needs ranks (non-negative integers) or ranks_range")
            ranks = tuple(ranks)
        if any(r >= world for r in ranks):
            raise bad(f"mesh {i}: rank {max(ranks)} is not one of the {world} ranks that saved")
        if size != len(ranks) or len(set(ranks)) != len(ranks):
            raise bad(f"mesh {i}: {len(ranks)} ranks (distinct: {len(set(ranks))}) for a mesh of {size} positions")
        meshes.append(Mesh(tuple(shape), ranks))
    return meshes


def _tensor_head(name: str, t: object, bad: Any) -> tuple[str, list[int], str]:
    """dtype, shape and kind of a tensor entry, checked."""
    if not isinstance(t, dict):
        raise bad(f"tensor {name!r} is not an object")
    dtype, shape, kind = t.get("dtype"), t.get("shape"), t.get("kind")
    if dtype not in DTYPES:
        raise bad(f"tensor {name!r} has unknown dtype {shown(dtype)}")
    if not _int_list(shape):
        raise bad(f"tensor {name!r} has invalid shape {shown(shape)}")
    if kind not in KINDS:
        raise bad(f"tensor {name!r} has kind {shown(kind)}, expected model or opt")
    return dtype, shape, kind


#: Runs (chunks along one dim) per mesh position a grid tensor may have: FSDP over TP gives
#: dp * tp * tp by the count below (tp <= 64 in any real job); a forged split factor of 2**20
#: over a mesh of 32 made the checks enumerate 33 M runs (minutes, GBs) from a 1 kB metadata.json.
MAX_RUNS_PER_POSITION = 1024


def _parse_grid_tensor(name: str, t: dict, meshes: list[Mesh], bad: Any) -> TensorMeta:
    dtype, shape, kind = _tensor_head(name, t, bad)
    mesh, placements = t.get("mesh"), t.get("placements")
    if not is_int(mesh) or not 0 <= mesh < len(meshes):
        raise bad(f"tensor {name!r} names mesh {shown(mesh)}; 'meshes' has {len(meshes)}")
    problem = check_placements(placements, len(shape), len(meshes[mesh].shape))
    if problem is not None:
        raise bad(f"tensor {name!r}: {problem}")
    owner = t.get("owner")
    if owner is not None and (not is_int(owner) or owner < 0):
        raise bad(f"tensor {name!r} has owner {shown(owner)}, expected a non-negative integer")
    # At most the mesh sizes sharding a dim times their split factors: bounded before grid.check enumerates them.
    sizes = meshes[mesh].shape
    max_runs = MAX_RUNS_PER_POSITION * len(meshes[mesh].ranks)
    for d in range(len(shape)):
        runs = 1
        for m, p in enumerate(placements):
            if p[0] != "R" and p[1] == d:
                runs *= sizes[m] * (p[2] if p[0] == "SS" else 1)
        if runs > max_runs:
            raise bad(f"tensor {name!r}: its placements cut dim {d} into up to {runs} runs, more than "
                      f"{MAX_RUNS_PER_POSITION} per position of its mesh of {len(meshes[mesh].ranks)}")
    grid = Grid(tuple(shape), meshes[mesh], tuple(tuple(p) for p in placements), owner)
    try:
        grid.check()
    except ValueError as exc:
        raise bad(f"tensor {name!r} of shape {shape}: {exc}") from None
    return TensorMeta(dtype, list(shape), kind, [], grid)


def _parse_tensor(name: str, t: object, files: dict[str, FileMeta], source: str, bad: Any) -> TensorMeta:
    dtype, shape, kind = _tensor_head(name, t, bad)
    chunks = t.get("chunks")  # type: ignore[union-attr]
    if not isinstance(chunks, list):
        raise bad(f"tensor {name!r} has no chunk list")
    parsed = []
    for c in chunks:
        if not isinstance(c, dict) or not _int_list(c.get("offsets")) or not _int_list(c.get("shape")) \
                or len(c["offsets"]) != len(shape) or len(c["shape"]) != len(shape):
            raise bad(f"tensor {name!r} has a malformed chunk {shown(c)} (offsets and shape must be "
                      f"{len(shape)} non-negative integers)")
        stored = c.get("stored")
        if not isinstance(stored, list) or not stored:
            raise bad(f"tensor {name!r} chunk at {c['offsets']} is stored nowhere")
        copies = []
        for s in stored:
            key = s.get("key", name) if isinstance(s, dict) else None
            if not isinstance(key, str):
                raise bad(f"tensor {name!r} chunk at {c['offsets']} has a malformed location {shown(s)}")
            check_bare_name(s.get("file"), source)
            if s["file"] not in files:
                raise bad(f"tensor {name!r} chunk at {c['offsets']} is stored in {s['file']!r}, "
                          "which is not listed under 'files'")
            copies.append(Stored(s["file"], chunk_key(name, tuple(c["offsets"]), True) if key == "@" else key))
        parsed.append(ChunkMeta(list(c["offsets"]), list(c["shape"]), copies))
    problem = covers_exactly(shape, [c.box for c in parsed])
    if problem is not None:
        raise bad(f"tensor {name!r} of shape {shape}: {problem}")
    if len({tuple(c.offsets) for c in parsed}) != len(parsed):
        raise bad(f"tensor {name!r} lists one chunk twice")
    return TensorMeta(dtype, list(shape), kind, parsed)


def read_metadata(folder: AnyPath | str, *, check_members: bool = True) -> Metadata:
    """Read and validate ``<folder>/metadata.json`` (and ``files.json``, format version 2).

    Args:
        folder: an ``iteration_*`` folder.
        check_members: resolve every listed file to refuse symlinks leading outside ``folder``;
            a loading rank passes False and checks only the files it reads
            (:func:`member`), so that no rank touches every file of a large job.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): no metadata.json.
        CorruptCheckpointError / UnsafeCheckpointError: see :meth:`Metadata.from_json`;
            also UnsafeCheckpointError when metadata.json or files.json is not a regular file
            or larger than :data:`MAX_METADATA_BYTES`, or a listed file is a symlink resolving
            outside ``folder`` or not a regular file.
    """
    folder = storage.as_path(folder)
    path = folder / METADATA
    text = read_bounded(path, METADATA, MAX_METADATA_BYTES)
    try:
        files = read_bounded(folder / FILES, FILES, MAX_METADATA_BYTES)
    except CheckpointNotFoundError:
        files = None  # format version 1 keeps the table inline; version 2 reports it missing
    meta = Metadata.from_json(text, path, files)
    if check_members:
        for name in meta.files:
            member(folder, name)
    return meta


def member(folder: AnyPath | str, name: str) -> AnyPath:
    """The path of listed file ``name``, refusing one that resolves outside ``folder`` (a symlinked shard)."""
    folder = storage.as_path(folder)
    return safe_member(folder, check_bare_name(name, str(folder / METADATA)), f"{folder / METADATA}: file")


#: common.json's training context: key → the JSON types it may hold (null: absent).
_COUNTERS = ("iteration", "global_step", "epoch_num", "step_num", "consumed_samples", "global_batch_size")
_CONTAINERS: dict[str, tuple[type, ...]] = {"lr_schedule": (dict, type(None)), "data": (dict, type(None)),
                                            "state": (dict,), "rank_local": (list, type(None))}


def check_common(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """Check common.json's context values: counters are non-negative ints, ``loss_scale`` is finite,
    the containers have their type. Other keys (ours or the trainer's) are left as they are.

    Raises:
        CorruptCheckpointError: naming ``where``, the key and the value.
    """
    for key in _COUNTERS:
        if doc.get(key) is not None:
            need_int(doc, key, where)
    need_number(doc, "loss_scale", where, default=None)
    for key, types in _CONTAINERS.items():
        need_type(doc, key, where, types, default=None)
    return doc


def read_common(folder: AnyPath | str, meta: Metadata | None = None) -> dict[str, Any]:
    """Read ``<folder>/common.json`` (a JSON object, bounded, its context checked by :func:`check_common`).

    ``NaN`` is accepted inside (``state`` may hold a NaN the user saved; :func:`common_bytes`
    writes it), not in the checked context values.

    Raises:
        CheckpointNotFoundError: the file is missing.
        UnsafeCheckpointError: not a regular file, too large or nested too deep.
        CorruptCheckpointError: not JSON, not an object, or a context value of the wrong type or range;
            or its size or xxh3-64 differs from what metadata.json records (format version 3).

    Args:
        folder: the iteration folder (or a unified / HF folder holding a common.json).
        meta: its parsed metadata, whose recorded size and checksum of common.json are checked;
            None: read them from ``folder``'s metadata.json when it is resumable's (only its
            seal is checked, the rest is not validated).
    """
    folder = storage.as_path(folder)
    path = folder / COMMON
    try:
        raw = read_bounded(path, COMMON, MAX_METADATA_BYTES)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"{path}: missing; it holds the training context (step, data position) of the iteration: "
            "restore it or load another iteration") from None
    recorded = meta.common if meta is not None else _recorded_common(folder)
    if recorded is not None and Seal.of(raw) != recorded:
        found = Seal.of(raw)
        raise CorruptCheckpointError(
            f"{path}: {found.size} bytes with xxh3-64 {found.xxh3_64}, but {METADATA} records {recorded.size} "
            f"bytes with {recorded.xxh3_64}; the file is damaged or comes from another iteration: restore it "
            "or load another iteration (resume_training: true falls back to the newest valid one)")
    return check_common(parse_json_object(raw, str(path), allow_nan=True), str(path))


def _recorded_common(folder: AnyPath) -> Seal | None:
    """common.json's seal from ``folder``'s metadata.json (sealed, resumable's, format 3), else None."""
    path = folder / METADATA
    try:
        text = read_bounded(path, METADATA, MAX_METADATA_BYTES)
    except CheckpointNotFoundError:
        return None  # a unified / HF / MindFormers single-rank folder: nothing records it
    if not check_seal(text, str(path)):
        return None
    doc = _json_object(text, str(path))
    if doc.get("format") != FORMAT or "common" not in doc:
        return None

    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {problem}; the checkpoint metadata is damaged: restore it")
    return _parse_seal(doc["common"], COMMON, bad)


def common_bytes(common: dict[str, Any]) -> bytes:
    """Serialise common.json; refuses non-JSON values with the offending key named."""
    try:
        return json.dumps(common, indent=1, allow_nan=True).encode()
    except TypeError as exc:
        raise TypeError(f"common.json values must be JSON (int, float, str, bool, None, lists, dicts): {exc}") from exc


def file_metadata(chunks: dict[str, tuple[str, list[int], list[int]]], *, kind: str, rank: int,
                  iteration: int, layout: LayoutMeta, save_optimizer: bool) -> dict[str, str]:
    """The ``__metadata__`` of one file: its chunks (key → name, global shape, offsets) and its context."""
    return {
        "format": "pt",
        META_CHUNKS: json.dumps({k: {"name": n, "global_shape": g, "offsets": o}
                                 for k, (n, g, o) in chunks.items()}, separators=(",", ":")),
        META_FILE: json.dumps({"kind": kind, "rank": rank, "iteration": iteration,
                               "layout": asdict(layout), "save_optimizer": save_optimizer},
                              separators=(",", ":")),
    }


def _xxh3_of(path: AnyPath) -> str:
    h = xxhash.xxh3_64()
    with storage.open_reader(path) as f:  # a FIFO or /dev/zero is refused: it would never end
        for at in range(0, f.size, 8 << 20):
            h.update(f.read(at, min(8 << 20, f.size - at)))
    return h.hexdigest()


def _file_meta_json(metadata: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    """One JSON object of a file's ``__metadata__`` (resumable's chunk map or file context)."""
    if key not in metadata:
        raise CorruptCheckpointError(f"{path}: __metadata__ lacks resumable's {key!r} entry; this file was not "
                                     "written by resumable")
    return parse_json_object(metadata[key], f"{path}: __metadata__ {key!r}")


def rebuild_metadata(folder: AnyPath | str) -> Metadata:
    """Rebuild ``metadata.json`` from the safetensors files of a Checkpoint 2.0 folder.

    Reads every ``*-model-*`` / ``*-opt-*`` file's header (bounded) and ``__metadata__``,
    and checksums each file (this reads the files once; it is a recovery tool). common.json,
    when present, is recorded as found: check it by hand first (it cannot be rebuilt).

    Args:
        folder: an ``iteration_*`` folder (or its temp copy) written by resumable.

    Returns:
        The rebuilt, validated :class:`Metadata` (not written: call ``to_json`` and save it).

    Raises:
        CorruptCheckpointError: a file lacks resumable's ``__metadata__`` or holds a malformed
            one (the file and key named), or the chunks found do not tile their tensors (a
            file is missing).

    Example:
        >>> meta = rebuild_metadata("ckpt/iteration_00000100")
        >>> Path("ckpt/iteration_00000100/metadata.json").write_text(meta.to_json())
    """
    folder = storage.as_path(folder)
    names = sorted(e.name for e in storage.list_dir(folder) if parse_file_name(e.name))
    if not names:
        raise CorruptCheckpointError(f"{folder}: no Checkpoint 2.0 safetensors files to rebuild metadata from")
    tensors: dict[str, TensorMeta] = {}
    files: dict[str, FileMeta] = {}
    found: dict[tuple[str, tuple[int, ...], tuple[int, ...]], ChunkMeta] = {}  # a dict: one look-up per key
    for name in names:
        path = folder / name
        header = read_header(path)
        info, chunks = (_file_meta_json(header.metadata, k, path) for k in (META_FILE, META_CHUNKS))
        where = f"{path}: __metadata__ {META_FILE!r}"
        kind = info.get("kind")
        if kind not in KINDS:
            raise CorruptCheckpointError(f"{where}: 'kind' must be 'model' or 'opt', got {shown(kind)}; {RESTORE}")
        files[name] = FileMeta(header.file_size, _xxh3_of(path), kind, need_int(info, "rank", where))
        for key, c in chunks.items():
            at = f"{path}: __metadata__ {META_CHUNKS!r}, chunk {key!r}"
            entry = header.tensors.get(key)
            if entry is None:
                raise CorruptCheckpointError(f"{at}: not in the file; {RESTORE}")
            tname = need_type(c, "name", at, str)
            gshape = need_int_list(c, "global_shape", at, maximum=MAX_DIM)
            offsets = need_int_list(c, "offsets", at, maximum=MAX_DIM, length=len(gshape))
            t = tensors.setdefault(tname, TensorMeta(str(entry.torch_dtype).removeprefix("torch."), list(gshape),
                                                     kind, []))
            chunk = found.get((tname, tuple(offsets), entry.shape))
            if chunk is None:
                chunk = found[tname, tuple(offsets), entry.shape] = ChunkMeta(list(offsets), list(entry.shape), [])
                t.chunks.append(chunk)
            chunk.stored.append(Stored(name, key))
        context = info, where
    info, where = context
    meta = Metadata(iteration=need_int(info, "iteration", where), layout=parse_layout(info.get("layout"), where),
                    save_optimizer=need_type(info, "save_optimizer", where, bool),
                    tensors=dict(sorted(tensors.items())), files=files, common=_seal_of_file(folder / COMMON))
    meta.validate(str(folder / METADATA))
    return meta


def _seal_of_file(path: AnyPath) -> Seal | None:
    """The seal of ``path`` as it is now (rebuild: common.json is taken as found), None when missing."""
    try:
        return Seal.of(read_bounded(path, path.name, MAX_METADATA_BYTES))
    except CheckpointNotFoundError:
        return None
