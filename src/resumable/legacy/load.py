"""Loading a resolved Checkpoint 1.0 step: fill the state in place, converting its layout when allowed.

Each rank reads only the slices it needs, with the same read planner as Checkpoint 2.0
(:mod:`resumable.planning`); a layout change goes through :mod:`resumable.legacy.transform`
first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from resumable import dist
from resumable.dist import agree_on
from resumable.errors import ConfigError
from resumable.formats import v1
from resumable.layout import local_chunks
from resumable.legacy.files import Layout, RankFiles, local_path
from resumable.legacy.resolve import LegacySource
from resumable.legacy.strategy import check_strategy
from resumable.legacy.transform import one_ckpt_per_rank, transform, unify
from resumable.load import check_state, plan_reads, restore_objects
from resumable.reads import place_into
from resumable.state import flatten_state

log = logging.getLogger(__name__)


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


def _conversion(source: LegacySource, files: RankFiles, opts: LegacyLoadOptions, world: int) -> str | None:
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
        one_ckpt_per_rank(source.root)
    check_strategy(opts.src_strategy_path_or_dir, files, source.files)
    return "unify" if source.fmt == "safetensors" else "transform"


def _convert(kind: str, source: LegacySource, files: RankFiles, opts: LegacyLoadOptions, state: Mapping[str, Any],
             group: dist.Group) -> LegacySource:
    """Run a conversion chosen by :func:`_conversion`. Collective: every rank calls it."""
    out = local_path(opts.output_dir, "output_dir")
    if kind == "unify":
        return unify(source, files, out / v1.UNIFIED_DIR, group)
    workers = check_transform_process_num(opts.transform_process_num, dist.world_size(group))
    mine = {n: [(b.offsets, b.shape) for b in dict.fromkeys(c.box for c in local_chunks(leaf.value))]
            for n, leaf in flatten_state(state).tensors.items()}
    targets = dist.all_gather_object(mine, group)
    return transform(source, files, out / v1.TRANSFORMED_DIR, targets, opts.layout, workers, group)


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
        NotImplementedYet: ``source.root``, ``output_dir`` or ``src_strategy_path_or_dir`` is on object
            storage (at once, on every rank).
        StateMismatchError / CheckpointError: as :func:`resumable.load`; on every rank.

    Collective: every rank calls it with its own state (two agreements, more when converting).
    """
    if source.fresh or source.root is None:
        raise ValueError("load_legacy needs a resolved checkpoint, not a fresh start")
    local_path(source.root, "load_checkpoint")
    local_path(opts.output_dir, "output_dir")
    if opts.src_strategy_path_or_dir:
        local_path(opts.src_strategy_path_or_dir, "src_strategy_path_or_dir")
    group, me = process_group, dist.rank(process_group)
    files = RankFiles(source.root, checked=source.files)  # resolve_legacy checked them
    kind, error = None, None
    try:
        kind = _conversion(source, files, opts, dist.world_size(group))
    except Exception as exc:  # agreed below: every rank raises, none waits
        error = exc
    agree_on(error, group)
    if kind is not None:
        source = _convert(kind, source, files, opts, state, group)
        files = RankFiles(source.root, checked=source.files)  # type: ignore[arg-type]  # just written
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
