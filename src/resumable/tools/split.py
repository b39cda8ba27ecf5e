"""Write any checkpoint source as Checkpoint 2.0 for a chosen layout, offline (``resumable split``).

Every target rank's holdings are computed with the trainer's rules
(:mod:`resumable.tools.rules`) and handed to the same pure planner the distributed save
uses (``resumable.save.build_plan``), so file names, keys, ``__metadata__``,
``metadata.json`` and ``common.json`` are exactly what the trainer would write on that
layout. Files are streamed one chunk at a time (memory: the largest chunk) into the
temporary folder, then committed by ``resumable.save.commit_plan`` (metadata, fsync, rename,
tracker), all under the folder's lock (``resumable.lock``: a live job's folder is refused).
On an object store (``s3://``) the staging prefix is the final one, metadata.json written last
commits it, and the lock is a lease, as for the trainer's saves (:mod:`resumable.commit`).
``resumable convert --to v2`` is this with a one-rank layout by default.

Example::

    write_v2(open_source("unified/"), "out/checkpoint", parse_layout("dp=2,tp=2"))
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from resumable import commit, storage
from resumable.errors import CheckpointError
from resumable.formats import hf_aux
from resumable.formats.safetensors_io import write_file_streaming
from resumable.geometry import Box
from resumable.lock import DirectoryLock, LeaseLock
from resumable.save import SavePlan, build_plan, commit_plan
from resumable.sources import Source, SourceTensor
from resumable.storage import AnyPath
from resumable.tools import progress_bar
from resumable.tools.rules import TargetLayout, check_layout, num_layers, parse_layout, rank_boxes

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

__all__ = ["TargetLayout", "parse_layout", "write_v2"]


def _cast(t: SourceTensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


def _holdings(source: Source, layout: TargetLayout, dtype: torch.dtype | None) -> list[dict]:
    """Per rank: name → (kind, dtype name, global shape, [(offsets, shape)]) as ``plan_save`` gathers it."""
    layers = num_layers(list(source.tensors))
    holdings: list[dict] = []
    for rank in range(layout.world_size):
        mine = {}
        for name, t in source.tensors.items():
            boxes = rank_boxes(name, t.shape, layout, rank, layers)
            if boxes:
                mine[name] = (t.kind, str(_cast(t, dtype)).removeprefix("torch."), list(t.shape),
                              [(b.offsets, b.shape) for b in boxes])
        holdings.append(mine)
    return holdings


class _Lazy(dict):
    """Stands in for the ``views`` of a live save: a chunk is read only when its file is written."""

    def __missing__(self, key: tuple[str, Box]) -> tuple[str, Box]:
        return key


def _plan(source: Source, out: AnyPath, iteration: int, layout: TargetLayout, holdings: list[dict], me: int,
          objects: dict, rank_locals: list, prefix: str, remove_redundancy: bool) -> SavePlan:
    return build_plan(holdings, rank_locals, objects, _Lazy(), out, iteration, prefix=prefix,
                       save_optimizer=any(t.kind == "opt" for t in source.tensors.values()),
                       remove_redundancy=remove_redundancy, group=None, me=me, world=layout.world_size,
                       mesh=layout.mesh, stages=layout.pp)


def write_v2(source: Source, out: str | os.PathLike[str], layout: TargetLayout, *, prefix: str = "CKP",
             remove_redundancy: bool = False, dtype: torch.dtype | None = None, iteration: int | None = None,
             extra_common: dict[str, Any] | None = None, progress: bool = False) -> AnyPath:
    """Write ``source`` as ``<out>/iteration_XXXXXXXX`` for ``layout`` and point the tracker at it.

    Args:
        source: what to write (see :func:`resumable.sources.open_source`).
        out: the checkpoint folder to write into (created when missing).
        layout: the target layout.
        prefix: file name prefix.
        remove_redundancy: store each replicated chunk once (balanced across ranks).
        dtype: cast floating-point tensors to this dtype.
        iteration: the folder's iteration (default: the source's, else its global step, else 0).
        extra_common: keys added to ``common.json``.
        progress: show a progress bar (bytes written).

    Returns:
        The committed iteration folder.

    Raises:
        ConfigError: ``layout`` is impossible for ``source`` (:func:`resumable.tools.rules.check_layout`);
            nothing is written, not even the lock.
        CheckpointError: the target iteration, or a newer one, already exists in ``out``.
        LockedError: a live job (or another tool) holds ``out``'s lock (the holder is named).

    Example::

        write_v2(open_source("merged/"), "ckpt", parse_layout("dp=2,tp=2"), progress=True)
    """
    found = check_layout(source, layout)
    log.info("splitting %s for layout %s: model %s (%s)", source.path, layout, found.model or "unknown", found.reason)
    out = storage.as_path(out)
    # A writer like any other: never into the folder of a live job (a flock locally, a lease on an object
    # store). Taken by this process alone (not lock_for_job, which is collective): a trainer's rank 0 calls this.
    with LeaseLock(out) if storage.is_object(out) else DirectoryLock(out):
        return _write_v2(source, out, layout, prefix=prefix, remove_redundancy=remove_redundancy, dtype=dtype,
                         iteration=iteration, extra_common=extra_common, progress=progress)


def _write_v2(source: Source, out: AnyPath, layout: TargetLayout, *, prefix: str, remove_redundancy: bool,
              dtype: torch.dtype | None, iteration: int | None, extra_common: dict[str, Any] | None,
              progress: bool) -> AnyPath:
    common = source.common
    if iteration is None:
        iteration = source.iteration if source.iteration is not None else int(common.get("global_step", 0))
    final = out / commit.iteration_dirname(iteration)
    if storage.exists(final):
        raise CheckpointError(f"{final} already exists; write into another folder or delete it first")
    newer = commit.iterations_after(out, iteration)
    if newer:  # the tracker would move back below them: a resume would start from the older one
        raise CheckpointError(f"{out} already holds iterations {newer}, newer than {iteration}; writing "
                              f"{final.name} would point the tracker back at it: write into another folder, "
                              "or pass a larger --iteration")
    objects = dict(common.get("state") or {})
    if source.model_config:  # a HuggingFace source's config.json, kept where the trainer records its own
        objects["model_config"] = source.model_config
    saved_locals = common.get("rank_local")
    rank_locals = saved_locals if isinstance(saved_locals, list) and len(saved_locals) == layout.world_size \
        else [None] * layout.world_size
    holdings = _holdings(source, layout, dtype)
    plans = [_plan(source, out, iteration, layout, holdings, me, objects, rank_locals, prefix, remove_redundancy)
             for me in range(layout.world_size)]
    head = plans[0]
    # Kept on record: a MindSpore source's scalars (learning_rate, beta1_power ...), and the metrics
    # the source was saved with (retention's "best" ranks by them).
    head.common.update({key: common[key] for key in ("mindspore", "metrics") if key in common})
    head.common.update(extra_common or {})
    total = sum(it.box.numel * source.tensors[it.name].dtype.itemsize
                for p in plans for _, items in p.files.values() for it in items)
    # An earlier run's temp folder, killed, is removed: we hold the folder's lock. Right before the try: a
    # Ctrl-C from here on removes it (on an object store the staging prefix is the final one, empty here).
    commit.prepare_staging(out, iteration)
    try:
        # The tokenizer and generation files, byte for byte, recorded in common.json (which metadata.json seals).
        record = hf_aux.copy(source.hf_files, head.temp / hf_aux.FOLDER)
        if record and not storage.is_object(head.temp):
            commit.fsync_dir(head.temp / hf_aux.FOLDER)
        head.common["state"] = hf_aux.with_record(objects, record)
        with progress_bar(total, f"writing {final.name}", progress) as bar:
            for plan in plans:
                for fname, (_, items) in plan.files.items():
                    head.metadata.files[fname].size, head.metadata.files[fname].xxh3_64 = \
                        _write(head.temp / fname, items, plan.file_meta[fname], source, dtype, bar)
        commit_plan(head)
    except BaseException:
        commit.discard_staging(head.temp)
        raise
    log.info("wrote %s for layout %s", final, layout)
    return final


def _write(path: AnyPath, items: list, file_meta: dict[str, str], source: Source, dtype: torch.dtype | None,
           bar: tqdm) -> tuple[int, str]:
    by_key = {it.key: it for it in items}

    def get(key: str) -> torch.Tensor:
        it = by_key[key]
        t = source.tensors[it.name]
        data = t.read(it.box).to(_cast(t, dtype))
        bar.update(it.box.numel * t.dtype.itemsize)
        return data

    specs = [(it.key, _cast(source.tensors[it.name], dtype), it.box.shape) for it in items]
    return write_file_streaming(path, specs, get, file_meta)
