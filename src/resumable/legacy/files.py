"""Our Checkpoint 1.0 rank files on disk: the rank folders, and one index of a step's files.

:class:`RankFiles` opens each file once and presents its chunks as Checkpoint 2.0 metadata,
so that loads and conversions read slices with the 2.0 read planner
(:mod:`resumable.planning`); :mod:`resumable.sources` reads our rank files through it too.
"""

from __future__ import annotations

import errno
import io
import os
import re
import zipfile
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from resumable import storage
from resumable.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v1, v2
from resumable.errors import NotImplementedYet
from resumable.storage import AnyPath, ObjectPath, Reader
from resumable.storage.local import check_regular
from resumable.formats.mindformers import parse_legacy_name
from resumable.formats.ms_ckpt import index_ms_ckpt
from resumable.formats.safetensors_io import block_digests, read_header
from resumable.geometry import Box
from resumable.layout import LocalChunk
from resumable.planning import Read, StoredChunk, plan_tensor_reads
from resumable.reads import execute_reads, place_into

Layout = dict[str, Any]  # as every rank file records it: {"world_size", "mesh", "pipeline_stages", "sharded_optimizer"}


def local_path(path: str | os.PathLike[str], key: str) -> Path:
    """``path`` (the value of YAML key ``key``) as a local Path; an ``s3://`` one is refused at once.

    The legacy layout on object storage is not built: refused before anything is read or
    written, never taken as a local folder named ``s3:``.
    """
    found = storage.as_path(path)
    if isinstance(found, ObjectPath):
        raise NotImplementedYet(f"{key} {found}: the legacy layout (use_legacy_format: true) on object storage; "
                                "Checkpoint 2.0 (use_legacy_format: false) saves to and loads from s3:// paths, "
                                "or copy the legacy checkpoint to a local folder first (aws s3 sync)")
    return found


def rank_folders(root: AnyPath) -> list[str]:
    """The ``rank_{r}`` folders under ``root``, by rank."""
    if not storage.is_dir(root):  # iterdir's errors (list_dir sees nothing there, silently)
        if storage.exists(root):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(root))
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(root))
    # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
    return sorted((e.name for e in storage.list_dir(root) if e.is_dir and re.fullmatch(r"rank_[0-9]+", e.name)),
                  key=lambda n: int(n[5:]))


def folder_meta(folder: AnyPath) -> tuple[v1.LegacyMeta | None, str | None]:
    """A rank folder's ``meta.json``, or None and why (missing, or damaged: it then vouches for nothing)."""
    try:
        meta = v1.read_meta(folder)
    except (CorruptCheckpointError, OSError) as exc:
        return None, str(exc)
    if meta is None:
        return None, f"{folder / v1.META_JSON} is missing"
    return meta, None


def folder_records(folder: AnyPath) -> tuple[dict[str, v1.FileRecord], str | None]:
    """The sizes and checksums a rank folder's ``meta.json`` records, and why there are none.

    A damaged ``meta.json`` vouches for nothing: its records are dropped and the reason is
    returned (its files are then checked by their own block checksums, or by size and header only).
    """
    meta, why = folder_meta(folder)
    return (meta.files if meta is not None else {}), why


def member(root: AnyPath, name: str) -> AnyPath:
    """``root / name``, refused unless it is a regular file (an object) that lies inside ``root`` (links followed;
    an object store has none)."""
    path = root / name
    missing = CheckpointNotFoundError(f"{path} does not exist; the checkpoint is incomplete")
    if isinstance(path, ObjectPath):
        if not storage.is_file(path):
            raise missing
        return path
    try:
        check_regular(path, "rank file")  # a FIFO or a device would block or never end
    except CheckpointNotFoundError:
        raise missing from None
    if "/" in name and not inside(path, root):  # a rank_*/ file symlinked out of the tree
        raise UnsafeCheckpointError(f"{path} resolves outside {root}; refusing to read it (a rank file of "
                                    "a checkpoint must lie inside its checkpoint folder)")
    return path


def check_rank_file(root: AnyPath, name: str, record: v1.FileRecord | None, *, checksum: bool = True) -> bool:
    """Check one rank file: its size and xxh3-64 against ``record``, else its structure only.

    Without a record (MindFormers' files, or a damaged ``meta.json``) a safetensors file
    written by resumable is checked against its own block checksums; otherwise the header
    must fit the file, or the ``.ckpt`` must open (torch zip or MindSpore protobuf): a
    truncated file fails, a flipped byte in tensor data does not.

    Returns:
        True when checksums were compared, False when only sizes and structure were checked.

    Raises:
        CheckpointNotFoundError / CorruptCheckpointError / UnsafeCheckpointError: naming the file.
    """
    path = member(root, name)
    if record is None:
        return _check_structure(path, checksum)
    size, digest = record
    entry = storage.stat(path)
    actual = entry.size if entry is not None else 0  # gone since member() saw it: 0 bytes is the mismatch
    if actual != size:
        raise CorruptCheckpointError(f"{path}: {actual} bytes on disk, {v1.META_JSON} records {size}; the file is "
                                     "truncated or was replaced: restore it or load another step")
    if not checksum:
        return False
    found = v2._xxh3_of(path)  # TODO(v2): a public checksum helper; this is v2's own
    if found != digest:
        raise CorruptCheckpointError(f"{path}: xxh3-64 {found}, {v1.META_JSON} records {digest}; the file is "
                                     "damaged: restore it or load another step")
    return True


def _check_structure(path: AnyPath, checksum: bool) -> bool:
    """A file no ``meta.json`` vouches for: its block checksums when it has them, else its structure."""
    if path.suffix == ".ckpt":
        with storage.open_reader(path, "rank file") as reader:
            torch_zip = zipfile.is_zipfile(_ReaderFile(reader))
        if torch_zip:
            v1.load_ckpt(path)
        else:  # MindSpore's protobuf .ckpt (MindFormers wrote it)
            index_ms_ckpt(path)
        return False
    header = read_header(path)
    digests = block_digests(header)
    if not digests or not checksum:
        return False
    with storage.open_reader(path, "rank file") as reader:
        for d in digests.values():
            d.check(d.start, d.end, None, reader.read)
    return True


class _ReaderFile(io.RawIOBase):
    """A seekable read-only file object over a storage :class:`Reader` (for ``zipfile.is_zipfile``)."""

    def __init__(self, reader: Reader) -> None:
        super().__init__()
        self.reader, self.pos = reader, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.reader.size}[whence]
        if base + offset < 0:  # as a real file: is_zipfile seeks 22 bytes before the end of a smaller one
            raise OSError(22, "Invalid argument")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.reader.size - self.pos))
        self.reader.readinto(memoryview(buffer).cast("B")[:n], self.pos)
        self.pos += n
        return n


@dataclass
class TreeCheck:
    """What :func:`verify_tree` found: problems as ``(where, message)``, and how each file was checked."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    checksummed: int = 0  # files compared with a checksum (meta.json's record, block checksums, a seal)
    sizes_only: int = 0  # files checked by size and structure only (MindFormers' carry no checksums)
    # A damaged file counts where its record (if any) put it.

    def count(self, checksummed: bool) -> None:
        if checksummed:
            self.checksummed += 1
        else:
            self.sizes_only += 1


def verify_tree(root: AnyPath, *, checksum: bool = True) -> TreeCheck:
    """Check every file of a legacy tree: each rank folder's ``meta.json`` and every step file, and ``strategy/``.

    Every step kept is checked, not only the one a resume would pick; the strategy
    files are those of ``<root>/../strategy`` (the job's ``output_dir``), checked only when
    the rank files are resumable's (MindSpore's are protobuf, not ours to parse). Not
    collective; reads every byte of every file (``checksum=False``: sizes and structure only).
    """
    out = TreeCheck()
    for r in rank_folders(root):
        folder = root / r
        try:
            meta = v1.read_meta(folder)
        except (CheckpointError, OSError) as exc:
            out.problems.append((str(folder / v1.META_JSON), str(exc)))
            out.count(False)
            meta = None
        else:
            if meta is not None:
                out.count(meta.sealed)
                if not storage.is_file(folder / meta.file):
                    out.problems.append((str(folder / v1.META_JSON), f"names {meta.file}, which {folder} does not "
                                         "hold: restore the file, or delete meta.json to resume from an older step"))
        records = meta.files if meta is not None else {}
        for entry in storage.list_dir(folder):
            if parse_legacy_name(entry.name) is None:
                continue
            try:
                out.count(check_rank_file(root, f"{r}/{entry.name}", records.get(entry.name), checksum=checksum))
            except (CheckpointError, OSError) as exc:
                out.problems.append((str(folder / entry.name), str(exc)))
                out.count(entry.name in records)
    strategy = root.parent / v1.STRATEGY_DIR
    # Strategy files are resumable's (JSON) when its rank files are (they carry checksums); MindSpore's
    # protobuf ones are not ours to parse.
    ours = out.checksummed > 0
    found = [strategy / e.name for e in storage.list_dir(strategy)
             if fnmatchcase(e.name, "ckpt_strategy_rank_*.ckpt")] if storage.is_dir(strategy) and ours else []
    for path in found:
        try:
            out.count("seal" in v1.read_strategy(path))  # read_strategy opens regular files only
        except (CheckpointError, OSError) as exc:
            out.problems.append((str(path), str(exc)))
            out.count(True)  # a resumable strategy file: sealed since seals exist
    return out


def inside(path: Path, root: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` resolves (links followed) to somewhere under ``root``."""
    if root is None:
        return False
    try:
        path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


class RankFiles:
    """Opened rank files of one load: headers (safetensors) or lazily mapped tensors (.ckpt), each once.

    A ``.ckpt`` carries no block checksums, so it is checked whole (:func:`check_rank_file`)
    when opened, unless named in ``checked`` (the load's resolution checked it already);
    safetensors reads check the blocks they read (:func:`resumable.reads.execute_reads`).
    """

    def __init__(self, root: AnyPath, checked: Iterable[str] = ()) -> None:
        self.root = root
        self.checked = set(checked)
        self.infos: dict[str, v1.FileInfo] = {}
        self.entries: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # key → dtype, shape
        self.ckpt: dict[str, dict[str, torch.Tensor]] = {}

    def open(self, name: str) -> v1.FileInfo:
        if name in self.infos:
            return self.infos[name]
        path = member(self.root, name)
        if path.suffix == ".ckpt":
            if name not in self.checked:
                check_rank_file(self.root, name, folder_records(path.parent)[0].get(path.name))
            tensors, meta = v1.load_ckpt(path)
            self.ckpt[name] = tensors
            self.entries[name] = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()}
        else:
            header = read_header(path)
            meta = header.metadata
            self.entries[name] = {k: (str(e.torch_dtype).removeprefix("torch."), e.shape)
                                  for k, e in header.tensors.items()}
        self.infos[name] = v1.parse_file_metadata(meta, path)
        return self.infos[name]

    def index(self, names: Iterable[str]) -> v2.Metadata:
        """The chunks of ``names`` as Checkpoint 2.0 metadata (file names relative to ``root``)."""
        meta = v2.Metadata(iteration=0, layout=v2.LayoutMeta(world_size=1), save_optimizer=True)
        boxes: dict[tuple[str, Box], v2.ChunkMeta] = {}  # one look-up per chunk, not a scan of the tensor's chunks
        for name in names:
            info = self.open(name)
            for key, (tname, gshape, offsets) in sorted(info.chunks.items()):
                entry = self.entries[name].get(key)
                if entry is None:
                    raise CorruptCheckpointError(f"{self.root / name}: chunk {key!r} listed in its metadata is not "
                                                 "in the file")
                dtype, shape = entry
                box = Box(offsets, shape)
                if not box.within(gshape):
                    raise CorruptCheckpointError(f"{self.root / name}: chunk {key!r} at {list(offsets)} of shape "
                                                 f"{list(shape)} lies outside {tname!r} {list(gshape)}")
                t = meta.tensors.setdefault(tname, v2.TensorMeta(dtype, list(gshape),
                                                                 "opt" if tname.startswith("optimizer.") else "model",
                                                                 []))
                if (t.dtype, t.shape) != (dtype, list(gshape)):
                    raise CorruptCheckpointError(f"{self.root / name}: {tname!r} is {dtype} {list(gshape)} here but "
                                                 f"{t.dtype} {t.shape} in another file of the same step")
                chunk = boxes.get((tname, box))
                if chunk is None:
                    chunk = boxes[tname, box] = v2.ChunkMeta(list(offsets), list(shape), [])
                    t.chunks.append(chunk)
                chunk.stored.append(v2.Stored(name, key))
        return meta

    def read(self, reads: Sequence[Read], sink: Callable[[Read, torch.Tensor], None]) -> int:
        """Execute reads: safetensors slices through the 2.0 reader, .ckpt from the mapped tensors."""
        st = [r for r in reads if not r.file.endswith(".ckpt")]
        total = execute_reads(self.root, st, sink) if st else 0
        for r in reads:
            if r.file.endswith(".ckpt"):
                t = self.ckpt[r.file][r.key]
                data = t[r.src] if r.src else t
                total += data.numel() * data.element_size()
                sink(r, data)
        return total


def fill(files: RankFiles, meta: v2.Metadata, name: str, box: Box) -> torch.Tensor:
    """One region of tensor ``name`` assembled from the stored chunks (conversions)."""
    t = meta.tensors[name]
    stored = [StoredChunk(c.box, s.file, s.key) for c in t.chunks for s in c.stored]
    reads = plan_tensor_reads(name, [LocalChunk(box, tuple(slice(0, s) for s in box.shape))], stored)
    # Allocated once the stored chunks (their shapes checked against the files) are known to cover the
    # region: a global shape forged in a file's metadata allocates nothing.
    out = torch.empty(box.shape, dtype=getattr(torch, t.dtype))
    files.read(reads, place_into({name: out}))
    return out
