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
from resumable.legacy.files import Layout, folder_meta, local_path
from resumable.legacy.strategy import placement_json
from resumable.retention import KeepBest, Metric, Missing, Policy, check_metrics, decide, describe
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
    """Writes Checkpoint 1.0 files: one per rank and save, ``meta.json``, strategy files, retention.

    Args:
        directory: the checkpoint folder (``<output_dir>/checkpoint``); ``rank_{r}`` inside.
        prefix: the file-name prefix (``CKP`` → ``CKP_rank_0-1_10.safetensors``).
        fmt: ``"safetensors"`` or ``"ckpt"`` (``checkpoint_format``).
        keep_checkpoint_max: the newest files kept per rank folder (None: all, whatever the other policies say).
        keep_every_n_steps: also keep every file whose global step is divisible by K.
        keep_best: also keep the N best files by a metric each save records (``save(metrics=)``).
        remove_redundancy: store each replicated chunk once across ranks.
        save_optimizer: store the tensors under ``optimizer``.
        strategy_dir: where ``ckpt_strategy_rank_{r}.ckpt`` go (written when world size > 1).
        layout: the layout recorded in every file (``world_size``, ``mesh``, ...).
        protect: files never deleted by retention (the one this job resumed from).
        process_group: the ranks saving together.

    Collective: every rank constructs it together (the prefix suffix is agreed: the
    largest any rank folder needs, so that a step's files share one name but the rank).

    Retention (:func:`decide_folder`, the policies of :mod:`resumable.retention`) runs per rank
    folder on its ``meta.json`` records, after every rank recorded the new file.

    Raises:
        ConfigError: a policy out of range (naming the argument).
        NotImplementedYet: ``directory`` or ``strategy_dir`` is an ``s3://`` path (before anything is written).
    """

    def __init__(self, directory: str | os.PathLike[str], *, prefix: str, fmt: str, keep_checkpoint_max: int | None,
                 remove_redundancy: bool, save_optimizer: bool, strategy_dir: str | os.PathLike[str],
                 layout: Layout, protect: Iterable[Path] = (), process_group: dist.Group = None,
                 keep_every_n_steps: int | None = None, keep_best: KeepBest | None = None) -> None:
        directory = local_path(directory, "the checkpoint folder")
        strategy_dir = local_path(strategy_dir, "the strategy folder")
        if fmt not in v1.FORMATS:
            raise ConfigError(f"checkpoint_format must be one of {v1.FORMATS}, got {fmt!r}")
        self.retention = Policy(keep_checkpoint_max, keep_every_n_steps, keep_best)
        self.directory, self.prefix, self.fmt = directory, prefix, fmt
        self.remove_redundancy, self.save_optimizer = remove_redundancy, save_optimizer
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
        # Sizes, checksums, steps and metrics of this folder's files, carried into every meta.json this job writes.
        meta, why = folder_meta(self.folder)
        self.records = meta.files if meta is not None else {}
        self.notes = meta.notes if meta is not None else {}
        if why is not None and names:
            log.warning("%s: this job's meta.json records no checksum for the files already in %s%s", why,
                        self.folder, "; keep_best keeps them all (their metric is unknown)"
                        if keep_best is not None else "")
        self.suffix = max(dist.all_gather_object(v1.next_suffix(names, prefix, self.rank), process_group))
        if self.suffix:
            log.info("files with prefix %s already exist: this job writes %s_rank_%d_%d-*", prefix, prefix,
                     self.rank, self.suffix)

    def save(self, state: Mapping[str, Any], epoch: int, step: int, *,
             metrics: Mapping[str, float] | None = None) -> Path:
        """Save ``state`` as this rank's file of ``(epoch, step)``; returns the file.

        ``meta.json`` records the file with the state's ``global_step`` (an int; else no step)
        and ``metrics`` (name → number, the same on every rank, e.g. ``{"loss": 2.31}``):
        what ``keep_every_n_steps`` and ``keep_best`` decide by.

        Raises:
            ConfigError: a metric is no number, or ``keep_best``'s metric is missing (before anything is written).
            SaveError: on every rank when any rank failed (naming it); ``meta.json`` still
                names the previous complete save.

        Collective: every rank calls it together with the same ``epoch``, ``step`` and ``metrics``.
        """
        checked = check_metrics(metrics, self.retention) or {}
        global_step = state.get("global_step")
        note = v1.FileNote(global_step if isinstance(global_step, int) and not isinstance(global_step, bool)
                           and global_step >= 0 else None, checked)
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
        # meta.json keeps the record of every file still on disk, retention's victims too until
        # they are gone: a crash part way through the deletions leaves them listed with their
        # step and metric, so the next save decides them again the same way on every rank.
        records = {n: r for n, r in self.records.items() if storage.is_file(self.folder / n)}
        records[name] = record
        notes = {n: self.notes.get(n, v1.FileNote()) for n in records}
        notes[name] = note
        try:
            commit.atomic_write(self.folder / v1.META_JSON, v1.meta_bytes(epoch, step, name, records, notes))
            self.records, self.notes = records, notes
        except OSError as exc:  # reported below: this rank's meta.json still names the previous step
            error = _text(exc)
        commit.fault_point("legacy-after-meta")
        # Retention only once every rank's meta.json names this step: a rank that dies before
        # its update still names the previous step, which must then exist on every rank.
        dist.agree(error, f"recording {name} in {v1.META_JSON}", self.group)
        for path in self._doomed(name):  # one unlink each, oldest first
            commit.fault_point("legacy-retention")
            storage.remove(path)
            log.info("retention (%s): deleted %s", describe(self.retention), path)
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

    def _doomed(self, newest: str) -> list[Path]:
        """This rank folder's files of this prefix that no policy keeps (:func:`decide_folder`), oldest first.

        Never among them: ``newest`` (the file ``meta.json`` names), the protected files (the
        step resumed from), anything through a symlink (a linked rank folder is not pruned at
        all; a linked file is neither counted nor removed). Decided from this job's records
        (what its ``meta.json`` holds): no file is read.
        """
        if not self.retention.deletes:
            return []
        if (here := storage.stat(self.folder)) is not None and here.link:
            log.warning("retention (%s): %s is a symlink; its files are not deleted", describe(self.retention),
                        self.folder)
            return []
        names = [e.name for e in storage.list_dir(self.folder) if not (e.link or e.is_dir or e.special)]
        # ``protect`` holds resolved paths; no entry counted is a link, so its resolved path is the folder's + name.
        folder = self.folder.resolve()
        protected = {newest, *(p.name for p in self.protect if p.parent == folder)}
        order, kept = decide_folder(names, self.prefix, self.rank, self.retention, self.notes, latest=newest,
                                    protected=protected)
        return [self.folder / n for n in order if n not in kept]


def decide_folder(names: Iterable[str], prefix: str, rank: int, policy: Policy, notes: Mapping[str, v1.FileNote],
                  *, latest: str | None = None,
                  protected: Iterable[str] = ()) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Which files of one rank folder retention keeps, and why: :func:`resumable.retention.decide` over them. Pure.

    The files counted are the legacy names of ``prefix`` (any suffix) and ``rank``, in
    retention order: older jobs (smaller suffix) first, then older ``(epoch, step)``; each is
    given its position in that order as its id, its recorded global step (``every_n_steps``)
    and metric (``best``). A file ``notes`` lists without the metric is not ranked; one it does
    not list at all has an unknown metric (its ``meta.json`` record was lost to damage, or its
    save never recorded it) and is kept when ``best`` is configured.

    Args:
        names: the folder's regular files (the caller leaves links, folders and special files out).
        notes: the folder's ``meta.json`` records (:attr:`resumable.formats.v1.LegacyMeta.notes`).
        latest: the file ``meta.json`` names (kept, as the 2.0 tracker's target).
        protected: files never deleted (the one just written, the one resumed from).

    Returns:
        The counted files oldest first, and each kept one → its reasons
        (:data:`resumable.retention.REASONS`); the counted files absent from it are deleted.
    """
    keyed = [(_retention_key(n, prefix, rank), n) for n in names]
    order = [n for key, n in sorted((k, n) for k, n in keyed if k is not None)]
    ids = {n: i for i, n in enumerate(order)}
    metric = policy.best.metric if policy.best is not None else None
    metrics = {ids[n]: _metric(notes.get(n), metric) for n in order}
    steps = {ids[n]: s for n in order if (s := getattr(notes.get(n), "global_step", None)) is not None}
    kept = decide(metrics, policy, tracker=ids.get(latest) if latest is not None else None,
                  protected={ids[n] for n in protected if n in ids}, steps=steps)
    return order, {order[i]: why for i, why in kept.items()}


def _metric(note: v1.FileNote | None, name: str | None) -> Metric:
    if name is None:  # no best policy: nothing is ranked
        return Missing.NOT_RECORDED
    if note is None:
        return Missing.UNREADABLE
    value = note.metrics.get(name)
    return Missing.NOT_RECORDED if value is None else value


def _retention_key(name: str, prefix: str, rank: int) -> tuple[int, int, int, str] | None:
    """Retention order of one file of a rank folder (older jobs, then older steps first); None: not counted."""
    parsed = parse_legacy_name(name)
    if parsed is None or parsed.prefix != prefix or parsed.rank != rank:
        return None
    return parsed.suffix, parsed.epoch, parsed.step, parsed.ext


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
