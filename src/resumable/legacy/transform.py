"""Layout changes of a Checkpoint 1.0 step (``auto_trans_ckpt``, as in MindFormers).

Safetensors are merged into ``<output_dir>/unified_checkpoint/`` by rank 0, one tensor in
memory at a time, then every rank reads its slices; ``.ckpt`` files are rewritten per
target rank into ``<output_dir>/transformed_checkpoint/rank_{r}/`` by
``transform_process_num`` of the job's ranks. The source layout comes from
``src_strategy_path_or_dir`` and is checked against the files before anything is written
(:func:`resumable.legacy.strategy.check_strategy`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from resumable import commit, dist, storage
from resumable.dist import agree_on
from resumable.errors import ConfigError
from resumable.formats import v1, v2
from resumable.formats.mindformers import parse_legacy_name
from resumable.formats.safetensors_io import write_file_streaming
from resumable.geometry import Box
from resumable.legacy.files import Layout, RankFiles, fill, local_path, rank_folders
from resumable.legacy.resolve import LegacySource

log = logging.getLogger(__name__)


def unify(source: LegacySource, files: RankFiles, out_dir: Path, group: dist.Group) -> LegacySource:
    """Rank 0 merges the step into one full safetensors file, one tensor in memory at a time.

    Collective: every rank calls it; the others wait for rank 0 (agreement).

    Raises:
        NotImplementedYet: ``out_dir`` is on object storage (at once, on every rank).
    """
    out_dir = local_path(out_dir, "output_dir")
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
                return fill(files, meta, key, Box.full(meta.tensors[key].shape))

            commit.make_dirs(out_dir)  # unified_checkpoint/ created durably before the file in it
            tmp = commit.temp_path(out_dir / name)
            try:
                write_file_streaming(tmp, specs, fetch, file_meta)
                commit.publish_file(tmp, out_dir / name)
            finally:
                storage.remove(tmp)
            log.info("auto_trans_ckpt: merged %d rank files into %s", len(source.files), out_dir / name)
        except Exception as exc:  # told to every rank
            error = exc
    agree_on(error, group)
    return LegacySource(out_dir, (name,), source.position, True, f"unified from {source.root}")


def transform(source: LegacySource, files: RankFiles, out_root: Path, targets: list[dict[str, Any]], layout: Layout,
               workers: int, group: dist.Group) -> LegacySource:
    """Rewrite a ``.ckpt`` step per target rank; ``workers`` of the job's ranks share the targets.

    Collective: every rank calls it with every rank's target holdings (``targets``).

    Raises:
        NotImplementedYet: ``out_root`` is on object storage (at once, on every rank).
    """
    out_root = local_path(out_root, "output_dir")
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


def _write_target(files: RankFiles, meta: v2.Metadata, holdings: Mapping[str, list[tuple]], folder: Path, name: str,
                  rank: int, layout: Layout, state: Mapping[str, Any], position: tuple[int, int]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    chunks = {}
    for tname, boxes in sorted(holdings.items()):
        if tname not in meta.tensors:
            continue  # check_state reports it when the target loads
        for offsets, shape in boxes:
            box = Box(tuple(offsets), tuple(shape))
            key = v2.chunk_key(tname, box.offsets, len(boxes) > 1)
            tensors[key] = fill(files, meta, tname, box)
            chunks[key] = (tname, meta.tensors[tname].shape, box.offsets)
    tensors.update(v1.context_scalars(state))
    file_meta = v1.file_metadata(chunks, rank=rank, layout=layout, remove_redundancy=False,
                                 context={"state": state, "rank_local": None})
    commit.make_dirs(folder)
    tmp = commit.temp_path(folder / name)
    try:
        record = v1.save_ckpt(tmp, tensors, file_meta)
        commit.publish_file(tmp, folder / name)
    finally:
        storage.remove(tmp)
    commit.atomic_write(folder / v1.META_JSON, v1.meta_bytes(position[0], position[1], name, {name: record}))


def one_ckpt_per_rank(root: Path) -> None:
    """Refuse a ``.ckpt`` tree with several steps in a rank folder: a conversion rewrites exactly one."""
    for r in rank_folders(root):
        found = [e.name for e in storage.list_dir(root / r) if Path(e.name).suffix == ".ckpt"
                 and parse_legacy_name(e.name)]
        if len(found) > 1:
            raise ConfigError(
                f"auto_trans_ckpt: {root / r} holds {len(found)} .ckpt files ({', '.join(found)}); converting .ckpt "
                "checkpoints takes one file per rank folder: keep only the step to convert")
