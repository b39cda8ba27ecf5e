"""Saving Checkpoint 1.0: every rank writes its own file into ``<directory>/rank_{r}/`` and its own ``meta.json``.

Nothing is shared but the agreement that every rank wrote; with ``remove_redundancy`` each
replicated chunk is written by one of its holders. On disk see :mod:`resumable.formats.v1`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.distributed.tensor import DTensor

from resumable import commit, dist, saveplan, storage
from resumable.errors import ConfigError, SaveError
from resumable.formats import v1, v2
from resumable.formats.mindformers import parse_legacy_name
from resumable.formats.safetensors_io import write_file
from resumable.geometry import Box
from resumable.layout import local_chunks, local_tensor
from resumable.legacy.files import Layout, folder_records, local_path
from resumable.legacy.strategy import placement_json
from resumable.save import agree_on_plan, error_text, to_group
from resumable.state import flatten_state

log = logging.getLogger(__name__)


@dataclass
class _Local:
    """One rank's tensors for a save: boxes, views to write, and its strategy entries."""

    holdings: dict[str, tuple[str, list[int], list[Box]]] = field(default_factory=dict)  # name → dtype, shape, boxes
    views: dict[tuple[str, Box], torch.Tensor] = field(default_factory=dict)
    strategy: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    rank_local: Any = None
    tensors: dict[str, Any] = field(default_factory=dict)  # the flattened leaves saved (for planning)


def _describe(state: Mapping[str, Any], save_optimizer: bool) -> _Local:
    flat = flatten_state(state)
    out = _Local(objects=flat.objects, rank_local=flat.rank_local)
    for name, leaf in sorted(flat.tensors.items()):
        if leaf.kind == "opt" and not save_optimizer:
            continue
        if name in v1.SCALARS:
            raise ValueError(f"state tensor {name!r} collides with a context scalar of the legacy format; rename it")
        out.tensors[name] = leaf
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
            "placements": [placement_json(p) for p in t.placements] if isinstance(t, DTensor) else None,
            "chunks": [{"offsets": list(c.box.offsets), "shape": list(c.box.shape),
                        "local": [[s.start, s.stop] for s in c.local], "stored": True} for c in chunks]}
    return out


def _mine_to_store(local: _Local, remove_redundancy: bool, group: dist.Group) -> list[tuple[str, Box]]:
    """This rank's chunks to write; with ``remove_redundancy`` each distinct chunk goes to one holder.

    Collective when ``remove_redundancy``: the planning of a Checkpoint 2.0 first save
    (digests to rank 0, one spec per distinct digest, a reply per rank), so no rank
    gathers every rank's holdings.
    """
    mine = [(n, b) for n, (_, _, boxes) in local.holdings.items() for b in dict.fromkeys(boxes)]
    if not remove_redundancy:
        return mine
    world = dist.world_size(group)
    spec, _ = saveplan.describe(local.tensors, to_group(group))
    structure = agree_on_plan(spec, dist.rank(group), world, group, iteration=0, prefix="legacy",
                              save_optimizer=True, remove_redundancy=True,
                              layout=v2.LayoutMeta(world_size=world, writers=world))
    return [(name, box) for _, items in structure.files.values() for name, _, box in items]


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

    Raises:
        NotImplementedYet: ``directory`` or ``strategy_dir`` is an ``s3://`` path (before anything is written).
    """

    def __init__(self, directory: str | os.PathLike[str], *, prefix: str, fmt: str, keep_checkpoint_max: int | None,
                 remove_redundancy: bool, save_optimizer: bool, strategy_dir: str | os.PathLike[str],
                 layout: Layout, protect: Iterable[Path] = (), process_group: dist.Group = None) -> None:
        directory = local_path(directory, "the checkpoint folder")
        strategy_dir = local_path(strategy_dir, "the strategy folder")
        if fmt not in v1.FORMATS:
            raise ConfigError(f"checkpoint_format must be one of {v1.FORMATS}, got {fmt!r}")
        if keep_checkpoint_max is not None and keep_checkpoint_max < 1:
            raise ConfigError(f"keep_checkpoint_max must be at least 1, got {keep_checkpoint_max}")
        self.directory, self.prefix, self.fmt = directory, prefix, fmt
        self.keep, self.remove_redundancy, self.save_optimizer = keep_checkpoint_max, remove_redundancy, save_optimizer
        self.strategy_dir, self.layout, self.group = strategy_dir, dict(layout), process_group
        self.protect = {Path(p).resolve() for p in protect}
        self.rank, self.world = dist.rank(process_group), dist.world_size(process_group)
        self.folder = self.directory / f"rank_{self.rank}"
        # Temp files of a save interrupted by a crash (.<name>.tmp-<pid>-<hex>): each rank its
        # own folder, rank 0 the shared strategy folder. The caller holds the folder's lock.
        commit.clean_leftovers(self.folder)
        if self.rank == 0:
            commit.clean_leftovers(self.strategy_dir)
        names = [e.name for e in storage.list_dir(self.folder)]
        # Sizes and checksums of this folder's files, carried into every meta.json this job writes.
        self.records, why = folder_records(self.folder)
        if why is not None and names:
            log.warning("%s: this job's meta.json records no checksum for the files already in %s", why, self.folder)
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
            error, local = error_text(exc), None
        what = f"saving {final.parent.parent}/rank_*/{name}"
        dist.agree(error, what, self.group)  # a failed description would desynchronise the gather below
        assert local is not None
        record = None
        try:
            store = _mine_to_store(local, self.remove_redundancy, self.group)
            record = self._write(final, local, store)
            if self.world > 1:
                self._write_strategy(local, set(store))
        except Exception as exc:  # reported below
            error = _text(exc)
        try:
            commit.fault_point("legacy-file-published")
            dist.agree(error, what, self.group)
        except SaveError:
            if error is None:  # another rank failed: this step is not complete anywhere
                storage.remove(final)
            raise
        commit.fault_point("legacy-before-meta")
        assert record is not None
        doomed = self._beyond_keep(final)
        # meta.json records what the folder keeps: retention's victims are left out already.
        gone = {p.name for p in doomed}
        records = {n: r for n, r in self.records.items() if n not in gone and storage.is_file(self.folder / n)}
        records[name] = record
        try:
            commit.atomic_write(self.folder / v1.META_JSON, v1.meta_bytes(epoch, step, name, records))
            self.records = records
        except OSError as exc:  # reported below: this rank's meta.json still names the previous step
            error = _text(exc)
        commit.fault_point("legacy-after-meta")
        # Retention only once every rank's meta.json names this step: a rank that dies before
        # its update still names the previous step, which must then exist on every rank.
        dist.agree(error, f"recording {name} in {v1.META_JSON}", self.group)
        for path in doomed:  # one unlink each, oldest first: a crash part way leaves older steps, never a gap
            commit.fault_point("legacy-retention")
            storage.remove(path)
            log.info("keep_checkpoint_max=%d: deleted %s", self.keep, path)
        return final

    def _write(self, final: Path, local: _Local, store: list[tuple[str, Box]]) -> v1.FileRecord:
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
        commit.make_dirs(self.folder)  # a first save: the checkpoint folder fsynced after rank_N/ appears
        tmp = commit.temp_path(final)
        try:
            if self.fmt == "safetensors":
                record = write_file(tmp, items, meta)
            else:
                record = v1.save_ckpt(tmp, dict(items), meta)
            commit.publish_file(tmp, final)
        finally:
            storage.remove(tmp)
        return record

    def _write_strategy(self, local: _Local, stored: set[tuple[str, Box]]) -> None:
        tensors = {}
        for n, entry in local.strategy.items():
            chunks = [dict(c, stored=(n, Box(tuple(c["offsets"]), tuple(c["shape"]))) in stored)
                      for c in entry["chunks"]]
            tensors[n] = dict(entry, chunks=chunks)
        commit.make_dirs(self.strategy_dir)
        commit.atomic_write(self.strategy_dir / v1.strategy_file_name(self.rank),
                            v1.strategy_doc(rank=self.rank, world_size=self.world, layout=self.layout,
                                            remove_redundancy=self.remove_redundancy, tensors=tensors))

    def _beyond_keep(self, newest: Path) -> list[Path]:
        """This rank folder's oldest files of this prefix (older jobs first) beyond ``keep``, to delete.

        Never among them: ``newest`` (the step ``meta.json`` is about to name), the protected
        files (the step resumed from), anything through a symlink (a linked rank folder is not
        pruned at all; a linked file is neither counted nor removed).
        """
        if self.keep is None:
            return []
        if (here := storage.stat(self.folder)) is not None and here.link:
            log.warning("keep_checkpoint_max=%d: %s is a symlink; its files are not deleted", self.keep, self.folder)
            return []
        # Resolved (no entry is a link; the folder's ancestors may be) to compare with ``protect``.
        files = [(key, (self.folder / e.name).resolve()) for e in storage.list_dir(self.folder)
                 if (key := _retention_key(e, self.prefix, self.rank)) is not None]
        return _excess(sorted(files), self.keep, {newest.resolve(), *self.protect})


def _retention_key(entry: storage.Entry, prefix: str, rank: int) -> tuple[int, int, int, str] | None:
    """Retention order of one entry of a rank folder (older jobs, then older steps first); None: not counted."""
    parsed = parse_legacy_name(entry.name)
    if (parsed is None or parsed.prefix != prefix or parsed.rank != rank or entry.link or entry.is_dir
            or entry.special):
        return None
    return parsed.suffix, parsed.epoch, parsed.step, parsed.ext


def _excess(files: list[tuple[Any, Path]], keep: int, kept: set[Path]) -> list[Path]:
    """The oldest of ``files`` (sorted oldest first) beyond ``keep``, never one of ``kept``. Pure."""
    excess = len(files) - keep
    out = []
    for _, p in files:
        if len(out) >= excess:
            break
        if p not in kept:
            out.append(p)
    return out


def discard_steps(root: Path, steps: Iterable[tuple[tuple[int, int], Sequence[str]]], group: dist.Group = None) -> None:
    """Delete the files of ``steps`` (``discard_newer_checkpoints``): file ``i`` by rank ``i mod world``.

    Links are removed, never followed. Collective only in that every rank calls it with the same steps.
    """
    me, world = dist.rank(group), dist.world_size(group)
    for (epoch, step), files in steps:
        for name in files[me::world]:
            storage.remove(root / name)
            log.warning("discard_newer_checkpoints: deleted %s (epoch %d step %d, newer than the step this job "
                        "starts from)", root / name, epoch, step)
