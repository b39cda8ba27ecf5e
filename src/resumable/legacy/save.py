"""Checkpoint 1.0 (legacy) engine: save per-rank files, resolve which step to load, load, convert layouts.

On disk see :mod:`resumable.formats.v1`. Every rank writes its own file into
``<directory>/rank_{r}/`` and its own ``meta.json``; nothing is shared but the agreement
that every rank wrote. Loading reads a step's files (the newest complete on every rank,
a named step, or one full/unified file) and fills the state in place with the same read
planner as Checkpoint 2.0 (:mod:`resumable.planning`): each rank reads only the slices
it needs.

Order of calls across ranks (every rank calls each public function together)::

    LegacySaver()        all_gather     every rank: its folder's prefix suffixes; all use the max
    LegacySaver.save     all_gather     (remove_redundancy) holdings → the same writer plan
                         no             write temp file, fsync, rename; strategy file
                         agree          every rank wrote, else SaveError everywhere
                         no             meta.json (atomic), then keep_checkpoint_max
    resolve_legacy       broadcast /    rank 0 picks the step (or each rank checks its own
                         all_gather     substituted name); every rank learns every failure
    load_legacy          all_gather     agreement before and after reading (load.agree_on);
                                        conversions add one agreement each

Layout changes need ``auto_trans_ckpt`` (as in MindFormers): safetensors are merged into
``<output_dir>/unified_checkpoint/`` by rank 0, one tensor in memory at a time, then every
rank reads its slices; ``.ckpt`` files are rewritten per target rank into
``<output_dir>/transformed_checkpoint/rank_{r}/`` by ``transform_process_num`` of the
job's ranks. The source layout comes from ``src_strategy_path_or_dir`` and is checked
against the files before anything is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from resumable import commit, dist
from resumable.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    SaveError,
    UnsafeCheckpointError,
)
from resumable.formats import v1, v2
from resumable.formats.mindformers import parse_legacy_name, select_legacy_files
from resumable.formats.safetensors_io import read_header, write_file, write_file_streaming
from resumable.geometry import Box
from resumable.layout import LocalChunk, local_chunks, local_tensor, placement_chunks
from resumable.load import agree_on, place_into, restore_objects, check_state, execute_reads, plan_reads
from resumable.planning import Read, StoredChunk, assign_writers, plan_tensor_reads
from resumable.state import flatten_state

log = logging.getLogger(__name__)

__all__ = ["LegacyLoadResult", "LegacySaver", "LegacySource", "load_legacy", "resolve_legacy"]

Layout = dict[str, Any]  # {"world_size", "mesh", "pipeline_stages", "sharded_optimizer"}


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# =============================================================================== saving


def _placement_json(p: Placement) -> list:
    if isinstance(p, Replicate):
        return ["R"]
    if hasattr(p, "split_factor"):
        return ["SS", int(p.dim), int(p.split_factor)]
    if isinstance(p, Shard):
        return ["S", int(p.dim)]
    raise ValueError(f"cannot record placement {p!r} in a strategy file")


def _placement(j: Sequence[Any]) -> Placement:
    from torch.distributed.tensor.placement_types import _StridedShard

    kind = j[0] if j else None
    if kind == "R":
        return Replicate()
    if kind == "S":
        return Shard(int(j[1]))
    if kind == "SS":
        return _StridedShard(int(j[1]), split_factor=int(j[2]))
    raise CorruptCheckpointError(f"unknown placement {j!r} in a strategy file")


@dataclass
class _Local:
    """One rank's tensors for a save: boxes, views to write, and its strategy entries."""

    holdings: dict[str, tuple[str, list[int], list[Box]]] = field(default_factory=dict)  # name → dtype, shape, boxes
    views: dict[tuple[str, Box], torch.Tensor] = field(default_factory=dict)
    strategy: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    rank_local: Any = None


def _describe(state: Mapping[str, Any], save_optimizer: bool) -> _Local:
    flat = flatten_state(state)
    out = _Local(objects=flat.objects, rank_local=flat.rank_local)
    for name, leaf in sorted(flat.tensors.items()):
        if leaf.kind == "opt" and not save_optimizer:
            continue
        if name in v1.SCALARS:
            raise ValueError(f"state tensor {name!r} collides with a context scalar of the legacy format; rename it")
        t = leaf.value
        chunks = local_chunks(t)
        local = local_tensor(t)
        dtype = str(t.dtype).removeprefix("torch.")
        boxes = []
        for c in chunks:
            out.views[(name, c.box)] = local[c.local]
            boxes.append(c.box)
        out.holdings[name] = (dtype, list(t.shape), boxes)
        mesh = None
        if isinstance(t, DTensor):
            m = t.device_mesh
            mesh = {"dim_names": list(m.mesh_dim_names or ()), "shape": list(m.shape),
                    "coordinate": m.get_coordinate()}
        out.strategy[name] = {
            "dtype": dtype, "global_shape": list(t.shape), "kind": leaf.kind, "mesh": mesh,
            "placements": [_placement_json(p) for p in t.placements] if isinstance(t, DTensor) else None,
            "chunks": [{"offsets": list(c.box.offsets), "shape": list(c.box.shape),
                        "local": [[s.start, s.stop] for s in c.local], "stored": True} for c in chunks]}
    return out


def _mine_to_store(local: _Local, remove_redundancy: bool, group: dist.Group) -> list[tuple[str, Box]]:
    """This rank's chunks to write; with ``remove_redundancy`` each distinct chunk goes to one holder.

    Collective (all_gather) when ``remove_redundancy``; every rank computes the same plan.
    """
    mine = [(n, b) for n, (_, _, boxes) in local.holdings.items() for b in dict.fromkeys(boxes)]
    if not remove_redundancy:
        return mine
    gathered = dist.all_gather_object({n: (d, [(b.offsets, b.shape) for b in boxes])
                                       for n, (d, _, boxes) in local.holdings.items()}, group)
    held: dict[int, list[tuple[str, Box]]] = {}
    nbytes: dict[tuple[str, Box], int] = {}
    for r, h in enumerate(gathered):
        keys = []
        for name, (dtype, boxes) in sorted(h.items()):
            size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            for o, s in boxes:
                key = (name, Box(tuple(o), tuple(s)))
                keys.append(key)
                nbytes[key] = key[1].numel * size
        held[r] = list(dict.fromkeys(keys))
    owner = assign_writers(held, nbytes)
    me = dist.rank(group)
    return [k for k in mine if owner[k] == me]


class LegacySaver:
    """Writes Checkpoint 1.0 files: one per rank and save, ``meta.json``, strategy files, keep-N.

    Args:
        directory: the checkpoint folder (``<output_dir>/checkpoint``); ``rank_{r}`` inside.
        prefix: the file-name prefix (``CKP`` → ``CKP_rank_0-1_10.safetensors``).
        fmt: ``"safetensors"`` or ``"ckpt"`` (``checkpoint_format``).
        keep_checkpoint_max: files kept per rank folder (None: all).
        remove_redundancy: store each replicated chunk once across ranks.
        save_optimizer: store the tensors under ``optimizer``.
        strategy_dir: where ``ckpt_strategy_rank_{r}.ckpt`` go (written when world size > 1).
        layout: the layout recorded in every file (``world_size``, ``mesh``, ...).
        protect: files never deleted by retention (the one this job resumed from).
        process_group: the ranks saving together.

    Collective: every rank constructs it together (the prefix suffix is agreed: the
    largest any rank folder needs, so that a step's files share one name but the rank).
    """

    def __init__(self, directory: str | os.PathLike[str], *, prefix: str, fmt: str, keep_checkpoint_max: int | None,
                 remove_redundancy: bool, save_optimizer: bool, strategy_dir: str | os.PathLike[str],
                 layout: Layout, protect: Iterable[Path] = (), process_group: dist.Group = None) -> None:
        if fmt not in v1.FORMATS:
            raise ConfigError(f"checkpoint_format must be one of {v1.FORMATS}, got {fmt!r}")
        if keep_checkpoint_max is not None and keep_checkpoint_max < 1:
            raise ConfigError(f"keep_checkpoint_max must be at least 1, got {keep_checkpoint_max}")
        self.directory, self.prefix, self.fmt = Path(directory), prefix, fmt
        self.keep, self.remove_redundancy, self.save_optimizer = keep_checkpoint_max, remove_redundancy, save_optimizer
        self.strategy_dir, self.layout, self.group = Path(strategy_dir), dict(layout), process_group
        self.protect = {Path(p).resolve() for p in protect}
        self.rank, self.world = dist.rank(process_group), dist.world_size(process_group)
        self.folder = self.directory / f"rank_{self.rank}"
        # Temp files of a save interrupted by a crash (.<name>.tmp-<pid>-<hex>): each rank its
        # own folder, rank 0 the shared strategy folder. The caller holds the folder's lock.
        commit.clean_leftovers(self.folder)
        if self.rank == 0:
            commit.clean_leftovers(self.strategy_dir)
        names = [p.name for p in self.folder.iterdir()] if self.folder.is_dir() else []
        self.suffix = max(dist.all_gather_object(v1.next_suffix(names, prefix, self.rank), process_group))
        if self.suffix:
            log.info("files with prefix %s already exist: this job writes %s_rank_%d_%d-*", prefix, prefix,
                     self.rank, self.suffix)

    def save(self, state: Mapping[str, Any], epoch: int, step: int) -> Path:
        """Save ``state`` as this rank's file of ``(epoch, step)``; returns the file.

        Raises:
            SaveError: on every rank when any rank failed (naming it); ``meta.json`` still
                names the previous complete save.

        Collective: every rank calls it together with the same ``epoch`` and ``step``.
        """
        name = v1.rank_file_name(self.prefix, self.rank, self.suffix, epoch, step, self.fmt)
        final = self.folder / name
        error = None
        try:
            local = _describe(state, self.save_optimizer)
        except Exception as exc:  # reported to every rank by the agreement below
            error, local = _text(exc), None
        what = f"saving {final.parent.parent}/rank_*/{name}"
        dist.agree(error, what, self.group)  # a failed description would desynchronise the gather below
        assert local is not None
        try:
            store = _mine_to_store(local, self.remove_redundancy, self.group)
            self._write(final, local, store)
            if self.world > 1:
                self._write_strategy(local, set(store))
        except Exception as exc:  # reported below
            error = _text(exc)
        try:
            commit.fault_point("legacy-file-published")
            dist.agree(error, what, self.group)
        except SaveError:
            if error is None:  # another rank failed: this step is not complete anywhere
                final.unlink(missing_ok=True)
            raise
        commit.fault_point("legacy-before-meta")
        try:
            commit.atomic_write(self.folder / v1.META_JSON, v1.meta_bytes(epoch, step, name))
        except OSError as exc:  # reported below: this rank's meta.json still names the previous step
            error = _text(exc)
        commit.fault_point("legacy-after-meta")
        # Retention only once every rank's meta.json names this step: a rank that dies before
        # its update still names the previous step, which must then exist on every rank.
        dist.agree(error, f"recording {name} in {v1.META_JSON}", self.group)
        self._retain(final)
        return final

    def _write(self, final: Path, local: _Local, store: list[tuple[str, Box]]) -> None:
        per_name: dict[str, int] = {}
        for n, _ in store:
            per_name[n] = per_name.get(n, 0) + 1
        items: list[tuple[str, torch.Tensor]] = []
        chunks = {}
        for n, box in sorted(store, key=lambda k: (k[0], k[1])):
            key = v2.chunk_key(n, box.offsets, per_name[n] > 1)
            items.append((key, local.views[(n, box)]))
            chunks[key] = (n, local.holdings[n][1], box.offsets)
        items += sorted(v1.context_scalars(local.objects).items())
        meta = v1.file_metadata(chunks, rank=self.rank, layout=self.layout, remove_redundancy=self.remove_redundancy,
                                context={"state": local.objects, "rank_local": local.rank_local})
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = commit.temp_path(final)
        try:
            if self.fmt == "safetensors":
                write_file(tmp, items, meta)
            else:
                v1.save_ckpt(tmp, dict(items), meta)
            commit.publish_file(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def _write_strategy(self, local: _Local, stored: set[tuple[str, Box]]) -> None:
        tensors = {}
        for n, entry in local.strategy.items():
            chunks = [dict(c, stored=(n, Box(tuple(c["offsets"]), tuple(c["shape"]))) in stored)
                      for c in entry["chunks"]]
            tensors[n] = dict(entry, chunks=chunks)
        self.strategy_dir.mkdir(parents=True, exist_ok=True)
        commit.atomic_write(self.strategy_dir / v1.strategy_file_name(self.rank),
                            v1.strategy_doc(rank=self.rank, world_size=self.world, layout=self.layout,
                                            remove_redundancy=self.remove_redundancy, tensors=tensors))

    def _retain(self, newest: Path) -> None:
        """Delete this rank folder's oldest files of this prefix (older jobs first) beyond ``keep``."""
        if self.keep is None:
            return
        files = []
        for p in self.folder.iterdir():
            parsed = parse_legacy_name(p.name)
            if parsed is not None and parsed.prefix == self.prefix and parsed.rank == self.rank:
                files.append(((parsed.suffix, parsed.epoch, parsed.step, parsed.ext), p))
        files.sort()
        excess = len(files) - self.keep
        for _, p in files:
            if excess <= 0:
                break
            if p == newest or p.resolve() in self.protect:
                continue
            p.unlink(missing_ok=True)
            excess -= 1
            log.info("keep_checkpoint_max=%d: deleted %s", self.keep, p)


# ============================================================================ resolving


@dataclass(frozen=True)
class LegacySource:
    """What to load: a step's file per source rank (a tree), one full file, or nothing.

    Attributes:
        root: the folder file names are relative to (the tree, or the single file's folder).
        files: file names relative to ``root``, by source rank (one for a single file).
        position: ``(epoch, step)`` of the tree's step, None for a single file.
        single: a full (unified) checkpoint in one file.
        reason: why this was chosen, for the log.
    """

    root: Path | None
    files: tuple[str, ...]
    position: tuple[int, int] | None
    single: bool
    reason: str

    @property
    def fresh(self) -> bool:
        return self.root is None

    @property
    def fmt(self) -> str:
        return Path(self.files[0]).suffix.lstrip(".")


def _fresh(reason: str) -> LegacySource:
    return LegacySource(None, (), None, False, reason)


def _rank_folders(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("rank_")
                   and p.name[5:].isdigit()), key=lambda n: int(n[5:]))


def _inside(path: Path, root: str | os.PathLike[str] | None) -> bool:
    if root is None:
        return False
    try:
        path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def resolve_here(load_checkpoint: str, resume_training: bool | str, fmt: str,
                  output_dir: str | os.PathLike[str] | None, rank: int) -> LegacySource:
    """This rank's view of what ``load_checkpoint`` means (reads the shared folder only)."""
    if not load_checkpoint:
        return _fresh("load_checkpoint is empty")
    path = Path(load_checkpoint)
    if path.is_file():
        parsed = parse_legacy_name(path.name)
        if path.parent.name.startswith("rank_") and parsed is not None:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} is one rank's file of a rank_* tree; point load_checkpoint at "
                f"{path.parent.parent} (and name the step with resume_training: \"{path.name}\")")
        return LegacySource(path.parent, (path.name,), None, True, f"{path.name} is a single full checkpoint file")
    if not path.exists():
        if _inside(path, output_dir):
            return _fresh(f"{path} does not exist yet (inside the job's output_dir)")
        raise CheckpointNotFoundError(f"load_checkpoint {path} does not exist; point it at a folder of rank_* "
                                      "folders or one full checkpoint file, or leave it empty to start fresh")
    ranks = _rank_folders(path)
    if not ranks:
        visible = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if visible:
            raise CheckpointNotFoundError(
                f"load_checkpoint {path} holds no rank_* folders ({', '.join(visible[:5])}); for Checkpoint 2.0 "
                "iterations set use_legacy_format: false")
        return _fresh(f"{path} is empty")
    if isinstance(resume_training, str):
        names = tuple(f"{r}/{v1.substitute_rank(resume_training, int(r[5:]))}" for r in ranks)
        # A rank beyond the source's rank folders (a larger job converting) has no file of its own.
        if rank < len(names) and not (path / names[rank]).is_file():
            raise CheckpointNotFoundError(f"resume_training {resume_training!r}: rank {rank} has no "
                                          f"{path / names[rank]}")
        parsed = parse_legacy_name(resume_training)
        assert parsed is not None
        return LegacySource(path, names, (parsed.epoch, parsed.step), False, f"resume_training names {resume_training}")
    if not any(parse_legacy_name(p.name) for r in ranks for p in (path / r).iterdir()) and not any(
            (path / r / v1.META_JSON).exists() for r in ranks):
        return _fresh(f"{path} holds rank folders but no checkpoint yet")
    position, paths = select_legacy_files(path, fmt)
    return LegacySource(path, tuple(f"{p.parent.name}/{p.name}" for p in paths), position, False,
                        f"epoch {position[0]} step {position[1]} is the newest step complete on every rank")


def resolve_legacy(load_checkpoint: str, resume_training: bool | str, *, fmt: str = "safetensors",
                   output_dir: str | os.PathLike[str] | None = None, process_group: dist.Group = None) -> LegacySource:
    """Decide which legacy checkpoint ``load_checkpoint`` / ``resume_training`` mean, on every rank.

    Args:
        load_checkpoint: a folder of ``rank_*`` folders, one full checkpoint file, or "" (fresh).
            A missing folder inside ``output_dir`` or an empty one is a fresh start.
        resume_training: ``True``/``False``: the newest step complete on every rank
            (``meta.json`` bounds it; without any, the newest step present on every rank by
            the epoch/step in the names). A file name: that step, each rank substituting its
            own rank id.
        fmt: ``load_ckpt_format``.
        output_dir: the job's output folder.

    Returns:
        The same :class:`LegacySource` on every rank.

    Raises:
        CheckpointNotFoundError / CorruptCheckpointError / ValueError: on every rank, naming
            each failing rank and path.

    Collective: every rank calls it (one all_gather).
    """
    me = dist.rank(process_group)
    try:
        found: LegacySource | None = resolve_here(load_checkpoint, resume_training, fmt, output_dir, me)
        error = None
    except (CheckpointError, ValueError, OSError) as exc:
        found, error = None, exc
    agree_on(error, process_group)
    chosen = dist.broadcast_object(found, 0, process_group)  # rank 0's choice, so all load the same step
    assert chosen is not None
    log.info("load_checkpoint=%r: %s", load_checkpoint, "fresh start: " + chosen.reason if chosen.fresh
             else f"loading {chosen.root} ({chosen.reason})")
    return chosen


# ============================================================================== reading


class _Files:
    """Opened rank files of one load: headers (safetensors) or lazily mapped tensors (.ckpt), each once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.infos: dict[str, v1.FileInfo] = {}
        self.entries: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # key → dtype, shape
        self.ckpt: dict[str, dict[str, torch.Tensor]] = {}

    def open(self, name: str) -> v1.FileInfo:
        if name in self.infos:
            return self.infos[name]
        path = self.root / name
        if not path.is_file():
            raise CheckpointNotFoundError(f"{path} does not exist; the checkpoint is incomplete")
        if "/" in name and not _inside(path, self.root):  # a rank_*/ file symlinked out of the tree
            raise UnsafeCheckpointError(f"{path} resolves outside {self.root}; refusing to read it (a rank file of "
                                        "a checkpoint must lie inside its checkpoint folder)")
        if path.suffix == ".ckpt":
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
                chunk = next((c for c in t.chunks if c.box == box), None)
                if chunk is None:
                    chunk = v2.ChunkMeta(list(offsets), list(shape), [])
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


def _fill(files: _Files, meta: v2.Metadata, name: str, box: Box) -> torch.Tensor:
    """One region of tensor ``name`` assembled from the stored chunks (conversions)."""
    t = meta.tensors[name]
    out = torch.empty(box.shape, dtype=getattr(torch, t.dtype))
    stored = [StoredChunk(c.box, s.file, s.key) for c in t.chunks for s in c.stored]
    reads = plan_tensor_reads(name, [LocalChunk(box, tuple(slice(0, s) for s in box.shape))], stored)
    files.read(reads, place_into({name: out}))
    return out


# ========================================================================= conversions


def _derived_boxes(doc: Mapping[str, Any], rank: int) -> dict[str, list[Box]]:
    """Boxes every tensor of a single-file strategy has on ``rank`` (no pipeline split)."""
    root = doc["layout"].get("mesh") or {}
    names, sizes = list(root), list(root.values())
    coord, rest = {}, rank
    for n, s in reversed(list(zip(names, sizes))):
        coord[n], rest = rest % s, rest // s
    out = {}
    for tname, t in doc["tensors"].items():
        shape = t["global_shape"]
        if not t.get("placements"):
            out[tname] = [Box.full(shape)]
            continue
        mesh = t["mesh"]
        if not mesh or not mesh["dim_names"] or any(n not in coord for n in mesh["dim_names"]):
            raise CorruptCheckpointError(
                f"tensor {tname!r} sits on an unnamed mesh; pass the strategy folder as src_strategy_path_or_dir")
        sub = [coord[n] for n in mesh["dim_names"]]
        chunks = placement_chunks(shape, [_placement(p) for p in t["placements"]], mesh["shape"], sub)
        out[tname] = [c.box for c in chunks]
    return out


def check_strategy(src: str | os.PathLike[str], files: _Files, names: Sequence[str]) -> None:
    """Check that ``src_strategy_path_or_dir`` describes the source files ``names`` (by source rank).

    A folder must hold every source rank's strategy; a single file suffices when the source
    had no pipeline split (every rank's boxes follow from the placements and the mesh).

    Raises:
        CheckpointNotFoundError: a source rank's strategy file is missing.
        CorruptCheckpointError: the strategy's world size or boxes differ from the files.
    """
    found = v1.strategy_files(src)
    docs = {r: v1.read_strategy(p) for r, p in found.items()}
    single = len(docs) == 1 and len(names) > 1
    first = next(iter(docs.values()))
    if first["world_size"] != len(names):
        raise CorruptCheckpointError(f"src_strategy_path_or_dir {src} describes {first['world_size']} rank(s) but "
                                     f"the checkpoint has {len(names)}; give the strategy of the job that wrote it")
    if single and int(first["layout"].get("pipeline_stages", 1)) > 1:
        raise CheckpointNotFoundError(
            f"src_strategy_path_or_dir {src} is one file but the source had {first['layout']['pipeline_stages']} "
            "pipeline stages; pass the whole strategy folder")
    for rank, name in enumerate(names):
        if single:
            expected = _derived_boxes(first, rank)
        elif rank in docs:
            expected = {t: [Box(tuple(c["offsets"]), tuple(c["shape"])) for c in e["chunks"]]
                        for t, e in docs[rank]["tensors"].items()}
        else:
            raise CheckpointNotFoundError(f"src_strategy_path_or_dir {src} has no {v1.strategy_file_name(rank)}")
        for key, (tname, _, offsets) in files.open(name).chunks.items():
            shape = files.entries[name][key][1]
            if Box(offsets, shape) not in expected.get(tname, []):
                raise CorruptCheckpointError(
                    f"{files.root / name} holds {tname!r} at {list(offsets)} of shape {list(shape)}, which the "
                    f"strategy {src} does not give rank {rank}; src_strategy_path_or_dir must describe the layout "
                    "that wrote this checkpoint")


def _unify(source: LegacySource, files: _Files, out_dir: Path, group: dist.Group) -> LegacySource:
    """Rank 0 merges the step into one full safetensors file, one tensor in memory at a time.

    Collective: every rank calls it; the others wait for rank 0 (agreement).
    """
    first = parse_legacy_name(Path(source.files[0]).name)
    assert first is not None and source.position is not None
    name = f"{first.prefix}-{first.epoch}_{first.step}.safetensors"
    error = None
    if dist.rank(group) == 0:
        try:
            meta = files.index(source.files)
            info = files.open(source.files[0])
            scalars = v1.context_scalars(info.context["state"])
            specs = [(n, getattr(torch, t.dtype), tuple(t.shape)) for n, t in sorted(meta.tensors.items())]
            specs += [(k, v.dtype, tuple(v.shape)) for k, v in sorted(scalars.items())]
            chunks = {n: (n, t.shape, [0] * len(t.shape)) for n, t in meta.tensors.items()}
            file_meta = v1.file_metadata(chunks, rank=-1, layout={"world_size": 1, "unified": True},
                                         remove_redundancy=False,
                                         context={"state": info.context["state"], "rank_local": None})

            def fetch(key: str) -> torch.Tensor:
                if key in scalars:
                    return scalars[key]
                return _fill(files, meta, key, Box.full(meta.tensors[key].shape))

            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = commit.temp_path(out_dir / name)
            try:
                write_file_streaming(tmp, specs, fetch, file_meta)
                commit.publish_file(tmp, out_dir / name)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("auto_trans_ckpt: merged %d rank files into %s", len(source.files), out_dir / name)
        except Exception as exc:  # told to every rank
            error = exc
    agree_on(error, group)
    return LegacySource(out_dir, (name,), source.position, True, f"unified from {source.root}")


def _transform(source: LegacySource, files: _Files, out_root: Path, targets: list[dict[str, Any]], layout: Layout,
               workers: int, group: dist.Group) -> LegacySource:
    """Rewrite a ``.ckpt`` step per target rank; ``workers`` of the job's ranks share the targets.

    Collective: every rank calls it with every rank's target holdings (``targets``).
    """
    world, me = dist.world_size(group), dist.rank(group)
    per = world // workers
    first = parse_legacy_name(Path(source.files[0]).name)
    assert first is not None and source.position is not None
    names = [v1.rank_file_name(first.prefix, t, first.suffix, first.epoch, first.step, "ckpt") for t in range(world)]
    error = None
    try:
        if me < workers:
            meta = files.index(source.files)
            state = files.open(source.files[0]).context["state"]
            for t in range(me * per, (me + 1) * per):
                _write_target(files, meta, targets[t], out_root / f"rank_{t}", names[t], t, layout, state,
                              source.position)
    except Exception as exc:  # told to every rank
        error = exc
    agree_on(error, group)
    return LegacySource(out_root, tuple(f"rank_{t}/{n}" for t, n in enumerate(names)), source.position, False,
                        f"transformed from {source.root}")


def _write_target(files: _Files, meta: v2.Metadata, holdings: Mapping[str, list[tuple]], folder: Path, name: str,
                  rank: int, layout: Layout, state: Mapping[str, Any], position: tuple[int, int]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    chunks = {}
    for tname, boxes in sorted(holdings.items()):
        if tname not in meta.tensors:
            continue  # check_state reports it when the target loads
        for offsets, shape in boxes:
            box = Box(tuple(offsets), tuple(shape))
            key = v2.chunk_key(tname, box.offsets, len(boxes) > 1)
            tensors[key] = _fill(files, meta, tname, box)
            chunks[key] = (tname, meta.tensors[tname].shape, box.offsets)
    tensors.update(v1.context_scalars(state))
    file_meta = v1.file_metadata(chunks, rank=rank, layout=layout, remove_redundancy=False,
                                 context={"state": state, "rank_local": None})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = commit.temp_path(folder / name)
    try:
        v1.save_ckpt(tmp, tensors, file_meta)
        commit.publish_file(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    commit.atomic_write(folder / v1.META_JSON, v1.meta_bytes(position[0], position[1], name))


def _one_ckpt_per_rank(root: Path) -> None:
    for r in _rank_folders(root):
        found = sorted(p.name for p in (root / r).iterdir() if p.suffix == ".ckpt" and parse_legacy_name(p.name))
        if len(found) > 1:
            raise ConfigError(
                f"auto_trans_ckpt: {root / r} holds {len(found)} .ckpt files ({', '.join(found)}); converting .ckpt "
                "checkpoints takes one file per rank folder: keep only the step to convert")


# =============================================================================== loading


@dataclass
class LegacyLoadResult:
    """What :func:`load_legacy` loaded: the files, the step and the saved context."""

    source: LegacySource
    state: dict[str, Any]
    rank_local: Any
    bytes_read: int


@dataclass(frozen=True)
class LegacyLoadOptions:
    """The YAML keys of a legacy load.

    Attributes:
        layout: this job's layout (compared with the one recorded in the files).
        auto_trans_ckpt: convert a checkpoint written under another layout.
        src_strategy_path_or_dir: the source layout's strategy file or folder.
        transform_process_num: ranks converting ``.ckpt`` files (must divide the world size).
        remove_redundancy: the checkpoint was saved without redundancy.
        output_dir: where ``unified_checkpoint/`` and ``transformed_checkpoint/`` go.
    """

    layout: Layout
    auto_trans_ckpt: bool = False
    src_strategy_path_or_dir: str = ""
    transform_process_num: int | None = None
    remove_redundancy: bool = False
    output_dir: str = "./output"


def check_transform_process_num(value: int | None, world_size: int) -> int:
    """The number of converting ranks; raises ConfigError naming the key when it does not divide the world."""
    workers = world_size if value is None else value
    if workers < 1 or world_size % workers:
        raise ConfigError(f"transform_process_num ({value}) must divide the world size ({world_size}): each "
                          "converting process takes the same number of target ranks")
    return workers


def _conversion(source: LegacySource, files: _Files, opts: LegacyLoadOptions, world: int) -> str | None:
    """``"unify"``, ``"transform"`` or None (layout unchanged); raises when a change is not allowed. Not collective."""
    if source.single:
        return None
    if len(source.files) != world and not opts.auto_trans_ckpt:
        raise ConfigError(f"{source.root} holds {len(source.files)} rank folder(s) but this job has {world} ranks; "
                          "set auto_trans_ckpt: true with src_strategy_path_or_dir to convert it")
    saved = files.open(source.files[0]).layout
    if saved == opts.layout:
        return None
    if not opts.auto_trans_ckpt:
        raise ConfigError(
            f"{source.root / source.files[0]} was saved with layout {saved} but this job runs {opts.layout}; "
            "the legacy format converts between layouts only with auto_trans_ckpt: true and "
            f"src_strategy_path_or_dir: <the source job's output_dir>/{v1.STRATEGY_DIR}")
    if len(source.files) == 1:
        return None  # one rank wrote full tensors: every layout reads its slices directly
    if not opts.src_strategy_path_or_dir:
        raise ConfigError("auto_trans_ckpt: true needs src_strategy_path_or_dir (the source job's strategy folder "
                          "or, without pipeline stages, one of its ckpt_strategy_rank_*.ckpt files)")
    if source.fmt == "ckpt":
        check_transform_process_num(opts.transform_process_num, world)
        assert source.root is not None
        _one_ckpt_per_rank(source.root)
    check_strategy(opts.src_strategy_path_or_dir, files, source.files)
    return "unify" if source.fmt == "safetensors" else "transform"


def _convert(kind: str, source: LegacySource, files: _Files, opts: LegacyLoadOptions, state: Mapping[str, Any],
             group: dist.Group) -> LegacySource:
    """Run a conversion chosen by :func:`_conversion`. Collective: every rank calls it."""
    out = Path(opts.output_dir)
    if kind == "unify":
        return _unify(source, files, out / v1.UNIFIED_DIR, group)
    workers = check_transform_process_num(opts.transform_process_num, dist.world_size(group))
    mine = {n: [(b.offsets, b.shape) for b in dict.fromkeys(c.box for c in local_chunks(leaf.value))]
            for n, leaf in flatten_state(state).tensors.items()}
    targets = dist.all_gather_object(mine, group)
    return _transform(source, files, out / v1.TRANSFORMED_DIR, targets, opts.layout, workers, group)


def load_legacy(state: dict[str, Any], source: LegacySource, opts: LegacyLoadOptions, *,
                process_group: dist.Group = None) -> LegacyLoadResult:
    """Fill ``state`` in place from a resolved legacy checkpoint (converting its layout when allowed).

    Args:
        state: the nested target state on this job's layout (``model``, ``optimizer``, plain values).
        source: from :func:`resolve_legacy` (not fresh).
        opts: the YAML keys of the load.

    Returns:
        A :class:`LegacyLoadResult`; ``state``'s plain values hold the saved context.

    Raises:
        ConfigError: a layout change without ``auto_trans_ckpt``, a de-duplicated checkpoint
            without ``remove_redundancy``, a bad ``transform_process_num``.
        StateMismatchError / CheckpointError: as :func:`resumable.load`; on every rank.

    Collective: every rank calls it with its own state (two agreements, more when converting).
    """
    if source.fresh or source.root is None:
        raise ValueError("load_legacy needs a resolved checkpoint, not a fresh start")
    group, me = process_group, dist.rank(process_group)
    files = _Files(source.root)
    kind, error = None, None
    try:
        kind = _conversion(source, files, opts, dist.world_size(group))
    except Exception as exc:  # agreed below: every rank raises, none waits
        error = exc
    agree_on(error, group)
    if kind is not None:
        source = _convert(kind, source, files, opts, state, group)
        files = _Files(source.root)  # type: ignore[arg-type]
    prep = None
    try:
        own = source.files[me] if len(source.files) > 1 else source.files[0]
        info = files.open(own)
        needed = [own]
        if info.remove_redundancy and not source.single:
            if not opts.remove_redundancy:
                raise ConfigError(f"{source.root / own} was saved with remove_redundancy (each rank stored a share "
                                  "of the replicated tensors); set remove_redundancy: true to load it")
            needed = list(source.files)
        meta = files.index(needed)
        flat = flatten_state(state)
        check_state(meta, flat, source.root / own)
        prep = (own, info, flat, plan_reads(meta, flat))
        error = None
    except Exception as exc:  # agreed below, so that no rank is left waiting
        error = exc
    agree_on(error, group)
    assert prep is not None
    own, info, flat, reads = prep
    result = None
    try:
        nbytes = files.read(reads, place_into({n: leaf.value for n, leaf in flat.tensors.items()}))
        same = info.layout == opts.layout and info.rank == me  # RNG state only for the rank that wrote it
        rank_local = info.context.get("rank_local") if same else None
        restore_objects(state, {"state": info.context.get("state") or {}}, rank_local)
        result = LegacyLoadResult(source, state, rank_local, nbytes)
        error = None
    except Exception as exc:  # agreed below
        error = exc
    agree_on(error, group)
    assert result is not None
    log.info("rank %d loaded %s (%.1f MB read)", me, source.root / own, result.bytes_read / 1e6)
    return result
