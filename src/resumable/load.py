"""Load a Checkpoint 2.0 iteration into a state built on the target layout, in place.

The caller builds its model and optimizer on the layout it wants to train with (any
mix of plain tensors, TP/FSDP/FSDP-over-TP DTensors, a pipeline stage's subset of the
names) and passes the nested state dict; :func:`load` fills every tensor in place and
the plain values from ``common.json``. Resharding is the general case: for each target
chunk the planner (:mod:`resumable.planning`) lists the overlapping stored chunks, and
each rank reads only those slices, file by file, straight into its local tensors
(:func:`resumable.reads.read_direct`: ``os.preadv`` into the target's memory; strided
slices through ``safe_open(...).get_slice(key)[slices]``). The same layout is the special
case where every overlap is a whole stored chunk. Peak memory is the target state plus
one slice.

Order of calls (every rank of ``process_group`` calls :func:`load` with its own state)::

    every rank, no collective    resolve the folder, read metadata.json, verify files
                                 (checksums: a 1/world share each), match the state
                                 against the metadata, plan reads, check file headers
    collective #1 (agree_on)       everyone learns every failure; nothing is touched yet
    plain: no collective         read slices into the local tensors
    balanced: collectives        see resumable.balanced
    every rank                   common.json → plain values, rank_local
    collective #2 (agree_on)       everyone learns whether every rank loaded

Optimizer state must exist before loading (it is filled in place). Build the state with
:func:`training_state` (which calls ``get_optimizer_state_dict``: it initialises AdamW's
moments) and apply it afterwards with :func:`apply_training_state`.

Example (single process or under ``torchrun``)::

    state = training_state(model, optim)
    result = load(state, "output/checkpoint")          # follows the tracker
    apply_training_state(model, optim, state)
    step = result.common["global_step"]
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch

from resumable import dist, errors, storage
from resumable.storage import AnyPath
from resumable.balanced import balanced_reads
from resumable.dist import agree_on
from resumable.errors import StateMismatchError
from resumable.formats import v2
from resumable.formats.schema import NAMES_SHOWN, listed
from resumable.formats.safetensors_io import Header
from resumable.gc_pause import gc_paused
from resumable.layout import LocalChunk, local_chunks
from resumable.planning import Read, StoredChunk, plan_tensor_reads
from resumable.reads import check_headers, execute_reads, place_into, read_direct
from resumable.resolve import check_iteration_folder, resolve_directory, verify_files
from resumable.state import OPTIMIZER_NAMESPACE, RANK_LOCAL, FlatState, flatten_state, merge_objects

log = logging.getLogger(__name__)

__all__ = ["LoadResult", "PendingLoad", "StateMismatchError", "apply_training_state", "load",
           "load_async", "read_common", "training_state"]

Verify = Literal["blocks", "checksum", "size", "none"]
read_common = v2.read_common


@dataclass
class LoadResult:
    """What :func:`load` did.

    Attributes:
        path: the ``iteration_*`` folder loaded.
        iteration: its iteration.
        common: the whole ``common.json`` (global step, epoch, data position ...).
        rank_local: this rank's saved ``rank_local`` value when the world size is
            unchanged, else None.
        bytes_read: tensor bytes this rank read from disk.
        tensors: number of tensors filled.
        seconds: wall time of the load on this rank.
        phases: seconds of its phases on this rank (``plan``: metadata, checks and read
            plan, agreed; ``read``), for :meth:`CheckpointManager.record_load`; empty for
            :func:`load_async`.
    """

    path: AnyPath
    iteration: int
    common: dict[str, Any]
    rank_local: Any
    bytes_read: int
    tensors: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- planning


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_state(meta: v2.Metadata, flat: FlatState, folder: AnyPath) -> None:
    """Compare the target tensors with the checkpoint; report every mismatch at once.

    Names in the checkpoint but absent from the state are fine (a pipeline stage loads
    its own subset; a model without optimizer ignores the optimizer state).

    Raises:
        StateMismatchError: listing all missing names, then all shape and dtype mismatches.
    """
    missing, wrong = [], []
    for name, leaf in flat.tensors.items():
        saved = meta.tensors.get(name)
        if saved is None:
            missing.append(name)
            continue
        shape = list(leaf.value.shape)
        if shape != saved.shape:
            wrong.append(f"{name}: shape {shape} in the state, {saved.shape} in the checkpoint")
        if _dtype_str(leaf.value.dtype) != saved.dtype:
            wrong.append(f"{name}: dtype {_dtype_str(leaf.value.dtype)} in the state, "
                         f"{saved.dtype} in the checkpoint")
    if not missing and not wrong:
        return
    missing.sort()
    see = f"resumable inspect {folder}"
    tensors_see = f"the checkpoint's tensors: {see}"
    if not wrong and not meta.save_optimizer and all(flat.tensors[n].kind == "opt" for n in missing):
        # A weights-only checkpoint asked for the optimizer state: say so, not "rebuild the model".
        raise StateMismatchError(
            f"checkpoint {folder} was saved with save_optimizer=False: it holds the model's weights only, and the "
            f"state asks for {len(missing)} optimizer tensor(s) ({listed(missing, tensors_see)}). "
            "Load the weights alone (a state of {'model': ...}), or a checkpoint saved with the optimizer")
    lines = [f"the state does not match checkpoint {folder}:"]
    if missing:
        lines.append(f"{len(missing)} tensor(s) missing from the checkpoint: {listed(missing, tensors_see)}")
    lines.extend(wrong[:NAMES_SHOWN])
    if len(wrong) > NAMES_SHOWN:
        lines.append(f"... {len(wrong) - NAMES_SHOWN} more shape or dtype mismatch(es); the checkpoint's shapes: {see}")
    lines.append("build the model with the architecture (and optimizer) the checkpoint was saved with")
    raise StateMismatchError("\n".join(lines))


def unused_names(meta: v2.Metadata, flat: FlatState, exclude: Iterable[str] = ()) -> list[str]:
    """Saved tensors this rank's state has no place for, sorted (pure).

    Only the kinds the state loads count (a model-only state leaves the optimizer's
    tensors aside on purpose); a name equal to an ``exclude`` entry, or under it
    (``entry.`` prefix), is left out on purpose too. Whether another rank uses a name
    (a pipeline stage holds a subset) is :func:`_check_unused`'s question.
    """
    kinds = {leaf.kind for leaf in flat.tensors.values()}
    skip = set(exclude)
    prefixes = tuple(f"{e}." for e in skip)
    return sorted(n for n, t in meta.tensors.items()
                  if t.kind in kinds and n not in flat.tensors and n not in skip and not n.startswith(prefixes))


def _check_unused(prep: "_Prepared", group: dist.Group) -> None:
    """Raise on every rank when saved tensors are used by no rank's state (collective).

    Called only when every rank has names of its own unused (pipeline stages, or a real
    mismatch): one all-reduce of a flag per saved tensor says which any rank uses.
    """
    names = sorted(prep.meta.tensors)
    used = dist.all_reduce_max([int(n in prep.flat.tensors) for n in names], group)
    mine = set(prep.unused)
    unused = [n for n, u in zip(names, used) if not u and n in mine]
    if unused:
        see = f"the checkpoint's tensors: resumable inspect {prep.folder}"
        raise StateMismatchError(
            f"checkpoint {prep.folder} holds {len(unused)} tensor(s) the state has no place for on any rank: "
            f"{listed(unused, see)}; they would be dropped silently. Build the model "
            "with the architecture it was saved with (e.g. the same tie_word_embeddings), or leave them out on "
            "purpose with exclude_from_loading")


def plan_reads(meta: v2.Metadata, flat: FlatState) -> list[Read]:
    """Every read this rank needs to fill its local chunks of the target tensors (pure)."""
    reads: list[Read] = []
    for name, leaf in sorted(flat.tensors.items()):
        reads.extend(plan_chunk_reads(meta, name, local_chunks(leaf.value)))
    return reads


def plan_chunk_reads(meta: v2.Metadata, name: str, targets: Iterable[LocalChunk]) -> list[Read]:
    """The reads that fill ``targets`` (chunks of tensor ``name`` held by this rank) from the checkpoint.

    Each target asks the metadata only for the stored chunks overlapping it
    (:meth:`resumable.formats.v2.Metadata.stored`), so a rank's planning grows with its
    own targets, not with the number of ranks that saved.
    """
    reads: list[Read] = []
    for target in targets:
        if target.box.is_empty:
            continue
        stored = [StoredChunk(box, s.file, s.key) for box, copies in meta.stored(name, target.box, first_only=True)
                  for s in copies]
        reads.extend(plan_tensor_reads(name, [target], stored))
    return reads


# ------------------------------------------------------------------------------ helpers


def _iteration_folder(path: str | os.PathLike[str] | AnyPath) -> AnyPath:
    """An ``iteration_*`` folder as is; a checkpoint folder through its tracker."""
    path = storage.as_path(path)
    if path.name.startswith(("iteration_", ".tmp-", ".old-", ".del-")):
        check_iteration_folder(path)
        return path
    if not storage.is_dir(path):
        raise errors.CheckpointNotFoundError(
            f"{path} does not exist; pass a checkpoint folder or an iteration_* folder")
    found = resolve_directory(path)
    if found.path is None:
        raise errors.CheckpointNotFoundError(
            f"{path} holds no committed checkpoint; nothing to load (start fresh, or check the path)")
    return found.path


def _blocks(verify: Verify) -> bool:
    """Whether the bytes read are checked against their block checksums while they are read."""
    return verify in ("blocks", "checksum")


def _verify(folder: AnyPath, meta: v2.Metadata, reads: Iterable[Read], verify: Verify, rank: int, world: int) -> None:
    """Sizes of the files this rank reads (a stat each); checksums of every file, split across ranks.

    No rank stats every file of the job: at thousands of ranks that alone is millions of
    metadata operations on the shared file system. With ``"checksum"`` file *i* is checked
    by rank *i mod n*, so every file is checked once in all.
    """
    if verify == "none":
        return
    if verify not in ("blocks", "size", "checksum"):
        raise ValueError(f"verify must be 'blocks', 'checksum', 'size' or 'none', got {verify!r}")
    verify_files(folder, meta, only={r.file for r in reads})
    if verify == "checksum":
        mine = {name for i, name in enumerate(sorted(meta.files)) if i % world == rank}
        verify_files(folder, meta, checksum=True, only=mine)


def _rank_local(common: Mapping[str, Any], meta: v2.Metadata, group: dist.Group) -> Any:
    """This rank's saved ``rank_local`` when the world size is unchanged, else None (logged)."""
    saved = common.get(RANK_LOCAL)
    if saved is None:
        return None
    n, me = dist.world_size(group), dist.rank(group)
    if meta.layout.world_size != n:
        log.info("world size changed (%d saved, %d now): per-rank values (RNG) are not restored",
                 meta.layout.world_size, n)
        return None
    if isinstance(saved, list):
        return saved[me] if me < len(saved) else None
    if isinstance(saved, dict):
        return saved.get(str(me), saved.get(me))  # type: ignore[call-overload]
    return None


def _param_groups(state: Mapping[str, Any]) -> list | None:
    optim = state.get(OPTIMIZER_NAMESPACE)
    groups = optim.get("param_groups") if isinstance(optim, Mapping) else None
    return groups if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None


def restore_objects(state: dict, common: Mapping[str, Any], rank_local: Any) -> None:
    """Fill plain values from common.json's ``state``; keep each optimizer group's own ``params``.

    ``optimizer.param_groups[i]["params"]`` lists the parameter names *this* rank's
    optimizer holds, which depends on the layout (a pipeline stage has a subset): the
    hyper-parameters (lr, betas, ...) come from the checkpoint, the name lists stay.
    """
    saved = common.get("state")
    before = _param_groups(state)
    kept = [g.get("params") for g in before] if before is not None else None
    if isinstance(saved, Mapping):
        merge_objects(state, {k: v for k, v in saved.items() if k != RANK_LOCAL})
    after = _param_groups(state)
    if kept is not None and after is not None:
        if len(after) != len(kept):
            raise StateMismatchError(
                f"the checkpoint's optimizer has {len(after)} parameter group(s), the state {len(kept)}; "
                "build the optimizer with the same parameter groups it was saved with")
        for group, params in zip(after, kept):
            if params is not None:
                group["params"] = params
    if RANK_LOCAL in state and rank_local is not None:
        state[RANK_LOCAL] = rank_local


@dataclass
class _Prepared:
    folder: AnyPath
    meta: v2.Metadata
    flat: FlatState
    reads: list[Read] = field(default_factory=list)
    headers: dict[str, Header] = field(default_factory=dict)  # of the files ``reads`` name, once checked
    unused: list[str] = field(default_factory=list)  # saved tensors this rank's state leaves aside


def _agree_prepared(err: BaseException | None, prep: _Prepared | None, group: dist.Group) -> _Prepared:
    """The agreement before any tensor is touched: failures, then saved tensors no rank uses (collective)."""
    if not agree_on(err, group, all_used=prep is not None and not prep.unused):
        assert prep is not None
        _check_unused(prep, group)
    assert prep is not None
    return prep


def _prepare(state: Mapping[str, Any], path: str | os.PathLike[str], verify: Verify,
             group: dist.Group, check_files: bool, exclude: Iterable[str] = ()) -> _Prepared:
    """Everything before the first byte of tensor data is read; local to this rank."""
    folder = _iteration_folder(path)
    with gc_paused():
        meta = v2.read_metadata(folder, check_members=False)
        flat = flatten_state(state)
        check_state(meta, flat, folder)
        reads = plan_reads(meta, flat)
        _verify(folder, meta, reads, verify, dist.rank(group), dist.world_size(group))
        headers = check_headers(folder, meta, reads) if check_files else {}
    return _Prepared(folder, meta, flat, reads, headers, unused_names(meta, flat, exclude))


def _finish(prep: _Prepared, state: dict, group: dist.Group, nbytes: int, start: float) -> LoadResult:
    common = v2.read_common(prep.folder, prep.meta)
    rank_local = _rank_local(common, prep.meta, group)
    restore_objects(state, common, rank_local)
    result = LoadResult(prep.folder, prep.meta.iteration, common, rank_local, nbytes,
                        len(prep.flat.tensors), time.perf_counter() - start)
    log.info("rank %d loaded %d tensors (%.1f MB read) from %s in %.2fs", dist.rank(group), result.tensors,
             nbytes / 1e6, prep.folder, result.seconds)
    return result


# ----------------------------------------------------------------------------- public


def load(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: dist.Group = None,
         balanced: bool = False, verify: Verify = "blocks", exclude_from_loading: Iterable[str] = ()) -> LoadResult:
    """Fill ``state`` in place from a Checkpoint 2.0 iteration, resharding as needed.

    Args:
        state: the nested target state, built on the layout to train with: tensors and
            DTensors (their local shards are overwritten), plain values (replaced by the
            saved ones). Optimizer state must already exist (see :func:`training_state`).
        path: an ``iteration_*`` folder, or a checkpoint folder (its tracker is followed).
        process_group: the ranks loading together (default: the default group; works
            without ``torch.distributed`` as a world of one).
        balanced: read each needed region once across the ranks and send it to the
            others that need it (``balanced_load``), instead of every rank reading its own.
        verify: ``"blocks"`` (default: the files this rank reads exist with their sizes,
            and every byte read is checked against its file's per-block checksums while
            it is read, at no extra I/O), ``"checksum"`` (also the xxh3-64 of every whole
            file, the files split across ranks, before any tensor is touched), ``"size"``
            (sizes only: the bytes read are not checked) or ``"none"``. Files without
            block checksums (older checkpoints) get their sizes and headers checked, logged once.
        exclude_from_loading: saved tensor names (or dotted prefixes: ``"lm_head"``) left
            unloaded on purpose. Any other saved tensor of a kind the state loads (model;
            optimizer when the state has one) that no rank's state has a place for is an
            error: dropping it silently changes the model.

    Returns:
        A :class:`LoadResult` (``common`` holds the training context).

    Raises:
        CheckpointNotFoundError: the folder or a file is missing.
        CorruptCheckpointError: sizes, checksums (whole-file or block: file, key and byte range
            named), headers or metadata are wrong. A block failing while reading is raised
            on every rank after some tensors were filled: the state is then unusable.
        StateMismatchError: names missing from the checkpoint, shape or dtype mismatches, all listed;
            saved tensors no rank has a place for (their count and the first five).
        CheckpointError: another rank failed (its message included).

    Collective: every rank of ``process_group`` calls it, with its own ``state`` and the same
    other arguments (two agreement steps; more with ``balanced``).

    Example:
        >>> state = {"model": model.state_dict()}
        >>> load(state, "output/checkpoint/iteration_00000100").common["global_step"]
        100
    """
    dist.require_group("resumable.load")
    start = time.perf_counter()
    with gc_paused():  # the whole call blocks the caller; planning and reads allocate in bursts
        prep: _Prepared | None = None
        try:
            prep = _prepare(state, path, verify, process_group, check_files=not balanced,
                            exclude=exclude_from_loading)
            err: BaseException | None = None
        except Exception as exc:  # any failure, agreed below so that no rank is left waiting
            err = exc
        prep = _agree_prepared(err, prep, process_group)
        planned = time.perf_counter()
        targets = {name: leaf.value for name, leaf in prep.flat.tensors.items()}
        nbytes: int | None = None
        if balanced:  # collective: every rank takes part, so it stays outside the try below
            nbytes = balanced_reads(prep.folder, prep.meta, prep.reads, targets, process_group,
                                    verify=_blocks(verify))
        result = None
        try:
            if nbytes is None:
                nbytes = read_direct(prep.folder, prep.reads, targets, prep.headers, verify=_blocks(verify))
            read = time.perf_counter() - planned
            result = _finish(prep, state, process_group, nbytes, start)
            result.phases.update(plan=planned - start, read=read)
            err = None
        except Exception as exc:  # agreed below
            err = exc
        agree_on(err, process_group)
        assert result is not None
        return result


class PendingLoad:
    """A load whose reading runs in a background thread; see :func:`load_async`.

    The thread only reads files into CPU buffers (no collective, no touch of the
    caller's tensors); :meth:`result` joins it, agrees across ranks and copies the
    buffers into the real state.
    """

    def __init__(self, template: Mapping[str, Any], path: str | os.PathLike[str], verify: Verify,
                 process_group: dist.Group, exclude_from_loading: Iterable[str] = ()) -> None:
        self._group = process_group
        self._start = time.perf_counter()
        self._buffers: list[tuple[Read, torch.Tensor]] = []
        self._prep: _Prepared | None = None
        self._error: BaseException | None = None
        self._bytes = 0
        # Rank and world size are read here, on the caller's thread, so the worker
        # thread never touches torch.distributed.
        self._rank, self._world = dist.rank(process_group), dist.world_size(process_group)
        self._exclude = tuple(exclude_from_loading)
        self._thread = threading.Thread(target=self._run, args=(template, path, verify),
                                        name="resumable-load", daemon=True)
        self._thread.start()

    def _run(self, template: Mapping[str, Any], path: str | os.PathLike[str], verify: Verify) -> None:
        try:
            folder = _iteration_folder(path)
            meta = v2.read_metadata(folder, check_members=False)
            flat = flatten_state(template)
            check_state(meta, flat, folder)
            reads = plan_reads(meta, flat)
            _verify(folder, meta, reads, verify, self._rank, self._world)
            check_headers(folder, meta, reads)
            self._prep = _Prepared(folder, meta, flat, reads, unused=unused_names(meta, flat, self._exclude))
            self._bytes = execute_reads(folder, reads, lambda r, data: self._buffers.append((r, data)),
                                        verify=_blocks(verify))
        except BaseException as exc:  # handed to the caller's thread in result()
            self._error = exc

    def done(self) -> bool:
        """True when the background reading has finished (successfully or not). Not collective."""
        return not self._thread.is_alive()

    def result(self, state: dict[str, Any]) -> LoadResult:
        """Wait for the reads, then fill ``state`` in place exactly as :func:`load` would.

        Args:
            state: the real target state; it must have the same names, shapes, dtypes and
                layout as the template given to :func:`load_async`.

        Returns:
            The :class:`LoadResult`.

        Raises:
            The errors of :func:`load`; StateMismatchError when ``state`` differs from the template.

        Collective: every rank of the process group calls it (two agreement steps).
        """
        self._thread.join()
        err = self._error
        if err is None:
            assert self._prep is not None
            try:
                flat = flatten_state(state)
                check_state(self._prep.meta, flat, self._prep.folder)
                if plan_reads(self._prep.meta, flat) != self._prep.reads:
                    raise StateMismatchError(
                        "the state given to PendingLoad.result() has another layout than the template "
                        "given to load_async(); build both on the same mesh and placements")
                self._prep.flat = flat
            except Exception as exc:  # agreed below
                err = exc
        self._prep = _agree_prepared(err, self._prep, self._group)
        result = None
        try:
            sink = place_into({n: leaf.value for n, leaf in self._prep.flat.tensors.items()})
            for read, data in self._buffers:
                sink(read, data)
            self._buffers.clear()
            result = _finish(self._prep, state, self._group, self._bytes, self._start)
            err = None
        except Exception as exc:  # agreed below
            err = exc
        agree_on(err, self._group)
        assert result is not None
        return result


def load_async(template: Mapping[str, Any], path: str | os.PathLike[str], *, process_group: dist.Group = None,
               verify: Verify = "blocks", exclude_from_loading: Iterable[str] = ()) -> PendingLoad:
    """Start reading a checkpoint in a background thread while the caller builds its model.

    ``template`` describes what will be loaded: the same nested state the real load will
    fill, with the same names, shapes, dtypes and DTensor placements, but its tensors may
    live on the ``meta`` device (build the model under ``torch.device("meta")``,
    parallelize it, take its state). The thread reads this rank's slices into CPU buffers
    (the size of this rank's share of the state); :meth:`PendingLoad.result` then copies
    them into the real state. The result is identical to :func:`load`'s.

    Args:
        template: the target state's shape and layout (tensors may be on ``meta``).
        path: an ``iteration_*`` folder or a checkpoint folder.
        process_group: the ranks loading together.
        verify: as for :func:`load` (runs in the thread).
        exclude_from_loading: as for :func:`load`.

    Returns:
        A :class:`PendingLoad`; call ``result(state)`` once the real state exists.

    Collective: not here (the thread does file I/O only); ``result()`` is collective.

    Example:
        >>> pending = load_async(training_state(meta_model, meta_optim), "output/checkpoint")
        >>> model, optim = build_and_init()            # overlaps with the reading
        >>> state = training_state(model, optim)
        >>> pending.result(state); apply_training_state(model, optim, state)

    Hazard: the template's tensors are not read, but the template must not change
    (names, placements) until ``result()`` returns.
    """
    dist.require_group("resumable.load_async")
    return PendingLoad(template, path, verify, process_group, exclude_from_loading)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter FQN, ready for :func:`load` and ``save``.

    Uses ``torch.distributed.checkpoint.state_dict.get_state_dict``, which also creates
    the optimizer state (AdamW moments) when the optimizer has not stepped yet, so that
    loading has tensors to fill.

    Example:
        >>> state = training_state(model, optim)
        >>> load(state, "output/checkpoint"); apply_training_state(model, optim, state)
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def apply_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                         state: Mapping[str, Any]) -> None:
    """Hand a loaded :func:`training_state` back to the model and optimizer (param groups included).

    Example:
        >>> apply_training_state(model, optim, state)
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
