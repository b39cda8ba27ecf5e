"""Synchronous Checkpoint 2.0 save: plan, write, agree, commit.

Order of calls across ranks (every step is entered by every rank of the group)::

    step                         collective?   who does the work
    1 plan_save                  all_reduce    every rank digests its spec; 32 bytes tell whether
                                               every rank still has the last save's plan (reused)
                                 p2p (first)   else: digests to rank 0, one spec per distinct
                                               digest, each rank its own reply
    2 prepare temp folder        broadcast     rank 0 creates .tmp-iteration_X; others wait
    3 write_files                no            each rank streams its model/opt files
    4 finish_save: report        p2p gather    each rank sends rank 0 (error | file sizes+checksums)
    5 finish_save: commit        broadcast     rank 0 writes files.json, common.json, metadata.json,
                                               renames the folder, fsyncs, writes the tracker,
                                               tells every rank the outcome
                                               (then runs on_commit, e.g. retention)

A failure on any rank at steps 1, 2, 4 or 5 becomes a ``SaveError`` on every rank (a
failure count is all-reduced, or rank 0 broadcasts the outcome: never left for a later
collective to trip over), the temp folder is removed and nothing is committed.
``async_save`` reuses steps 1, 3-5 with staged copies and a background thread. No rank
but rank 0 sends or receives more than its own share (docs/internals.md, "Commit protocol").

Run it::

    python -c "import torch, resumable; print(resumable.save({'model': {'w': torch.ones(2)}}, 'ckpt', 1))"
    torchrun --nproc-per-node 2 my_train.py     # each rank calls resumable.save(...) together
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from resumable import commit, dist, saveplan, storage
from resumable.errors import CheckpointError, SaveError, describe_os_error
from resumable.formats import v2
from resumable.formats.safetensors_io import write_file
from resumable.geometry import Box
from resumable.gc_pause import gc_paused
from resumable.planning import assign_writers
from resumable.state import flatten_state
from resumable.storage import AnyPath

log = logging.getLogger(__name__)

#: Top-level state keys copied into common.json's top level (docs/internals.md).
CONTEXT_KEYS = ("global_step", "epoch_num", "step_num", "consumed_samples", "global_batch_size",
                "loss_scale", "lr_schedule", "data")


@dataclass
class WriteItem:
    """One chunk this rank writes: where it goes in the file and where its bytes are now."""

    name: str
    key: str
    box: Box
    tensor: torch.Tensor  # a view of the live local tensor, or a staged CPU copy


@dataclass
class SavePlan:
    """Everything one rank needs to write its files and (rank 0) commit. Built by :func:`plan_save`."""

    iteration: int
    directory: AnyPath
    group: Any
    rank: int
    files: dict[str, tuple[str, list[WriteItem]]]  # file name -> (kind, items), this rank's files only
    file_meta: dict[str, dict[str, str]]            # file name -> __metadata__
    metadata: v2.Metadata | None                    # rank 0: complete but for file sizes/checksums
    common: dict[str, Any] | None                   # rank 0: complete but for rank_local (gathered at finish)
    rank_local: Any = None                          # this rank's per-rank value (RNG), sent at finish
    # Seconds per phase (plan, stage, write, commit) and rank 0's bytes summed over ranks at
    # the commit: what the manager's save event reports (resumable.events).
    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def temp(self) -> AnyPath:
        """Where the files are written: the temp folder (local) or the final prefix (object store)."""
        return commit.staging_folder(self.directory, self.iteration)

    @property
    def final(self) -> AnyPath:
        return self.directory / commit.iteration_dirname(self.iteration)


def error_text(exc: BaseException) -> str:
    """A rank's failure in the words every rank's ``SaveError`` quotes; the system's OSErrors worded."""
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, CheckpointError):
        return describe_os_error(exc)  # the path, what failed and what to do, not "[Errno 28] ..."
    return f"{type(exc).__name__}: {exc}"


def _mesh_info(state_tensors: Mapping[str, Any], layout_info: Any) -> tuple[dict[str, int] | None, int]:
    """Mesh dims (name → size) and pipeline stages, from ``layout_info`` or the first DTensor's mesh."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    stages = 1
    mesh = None
    if isinstance(layout_info, Mapping):
        stages = int(layout_info.get("pipeline_stages", 1))
        mesh = layout_info.get("mesh")
        if isinstance(mesh, Mapping):
            return {str(k): int(v) for k, v in mesh.items()}, stages
    elif isinstance(layout_info, DeviceMesh):
        mesh = layout_info
    if mesh is None:
        mesh = next((leaf.value.device_mesh for leaf in state_tensors.values() if isinstance(leaf.value, DTensor)),
                    None)
    if mesh is None:
        return None, stages
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    return dict(zip(names, (int(s) for s in mesh.shape))), stages


@dataclass
class PlanStructure:
    """The structure of the last plan of one (group, options): reused while the digests agree."""

    digest: str
    plan_id: int
    files: dict[str, tuple[str, list[tuple[str, str, Box]]]]
    shapes: dict[str, list[int]]
    metadata: v2.Metadata | None  # rank 0 only


#: (group, prefix, save_optimizer, remove_redundancy, layout) → the last plan's structure.
_CACHE: dict[tuple, PlanStructure] = {}


def to_group(group: Any) -> Callable[[int], int]:
    if group is None or not dist.initialized():
        return lambda r: r
    return lambda r: torch.distributed.get_group_rank(group, r)


def plan_save(state: Mapping[str, Any], directory: str | os.PathLike[str], iteration: int, *, prefix: str,
              save_optimizer: bool, remove_redundancy: bool, group: Any, layout_info: Any) -> SavePlan:
    """Step 1: describe this rank's holdings and agree on the plan (cached across saves).

    Every rank digests its spec (:class:`resumable.saveplan.RankSpec`); one 32-byte
    all-reduce tells whether every rank still has the structure of the last save and the
    same plan: then the plan is reused and nothing else is exchanged. Otherwise (first
    save, or anything changed) the coordinator gathers the digests, asks one rank per
    distinct digest for its spec, merges them (:func:`resumable.saveplan.merge`) and sends
    each rank its reply (point to point: a rank receives only its own).

    Collective: every rank of ``group`` calls it. A rank whose state cannot be described
    (an unsupported value, a dtype safetensors cannot hold) reports the error, so every
    rank raises ``SaveError`` naming it.
    """
    with gc_paused():
        return _plan_save(state, storage.as_path(directory), iteration, prefix=prefix, save_optimizer=save_optimizer,
                          remove_redundancy=remove_redundancy, group=group, layout_info=layout_info)


def _plan_save(state: Mapping[str, Any], directory: AnyPath, iteration: int, *, prefix: str,
               save_optimizer: bool, remove_redundancy: bool, group: Any, layout_info: Any) -> SavePlan:
    me, world = dist.rank(group), dist.world_size(group)
    error, spec, views, flat = None, None, {}, None
    try:
        flat = flatten_state(state)
        tensors = {n: leaf for n, leaf in flat.tensors.items() if save_optimizer or leaf.kind != "opt"}
        spec, views = saveplan.describe(tensors, to_group(group))
        mesh, stages = _mesh_info(tensors, layout_info)
    except Exception as exc:  # reported to every rank below, then raised there as SaveError
        error = error_text(exc)
        mesh, stages = None, 1
    layout = v2.LayoutMeta(world_size=world, mesh=mesh, pipeline_stages=stages, writers=world)
    key = (group if group is not None else "default", prefix, save_optimizer, remove_redundancy,
           json.dumps(mesh, sort_keys=True), stages, world, me)
    cached = _CACHE.get(key)
    same = spec is not None and cached is not None and cached.digest == spec.digest
    plan_id = cached.plan_id if same and cached is not None else -1
    stale, failed, high, neg_low = dist.all_reduce_max([not same, error is not None, plan_id, -plan_id], group)
    if failed:
        dist.agree(error, f"saving iteration {iteration}", group)
    if not stale and high == -neg_low:
        assert cached is not None
        structure = cached
    else:
        assert spec is not None
        structure = agree_on_plan(spec, me, world, group, iteration=iteration, prefix=prefix,
                                   save_optimizer=save_optimizer, remove_redundancy=remove_redundancy,
                                   layout=layout)
        if len(_CACHE) >= 16:
            _CACHE.clear()  # a job alternating many structures: keep memory bounded
        _CACHE[key] = structure
    assert flat is not None
    return bind_plan(structure, views, flat.objects, flat.rank_local, directory, iteration, group, me, layout,
                     save_optimizer)


def agree_on_plan(spec: saveplan.RankSpec, me: int, world: int, group: Any, *, iteration: int, prefix: str,
                   save_optimizer: bool, remove_redundancy: bool, layout: v2.LayoutMeta) -> PlanStructure:
    """A first save's planning: digests to rank 0, one spec per distinct digest, a reply to each rank.

    Collective: every rank of ``group`` calls it (also the legacy saver, for ``remove_redundancy``).
    Raises ``SaveError`` on every rank when the specs disagree (a name with two shapes).
    """
    digests = dist.gather_object(spec.digest, 0, group)
    wanted = None
    if me == 0:
        assert digests is not None
        first: dict[str, int] = {}
        for r, d in enumerate(digests):
            first.setdefault(d, r)
        wanted = [first[d] == r for r, d in enumerate(digests)]
    send = dist.scatter_object(wanted, 0, group)
    specs = dist.gather_object(spec if send else None, 0, group)
    replies = None
    if me == 0:
        assert specs is not None and digests is not None
        ranks: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            ranks.setdefault(d, []).append(r)
        groups = [(specs[rs[0]], rs) for rs in ranks.values()]
        plan_id = random.getrandbits(62)
        try:
            meta, per_rank = saveplan.merge(groups, world=world, iteration=iteration, prefix=prefix,
                                            save_optimizer=save_optimizer, remove_redundancy=remove_redundancy,
                                            layout=layout)
            replies = [(None, plan_id, per_rank.get(r)) for r in range(world)]
        except SaveError as exc:
            meta, replies = None, [(str(exc), -1, None)] * world
    problem, plan_id, reply = dist.scatter_object(replies, 0, group)
    if problem is not None:
        raise SaveError(problem)
    files = saveplan.rank_files(spec, me, world, reply, prefix=prefix, save_optimizer=save_optimizer,
                                remove_redundancy=remove_redundancy)
    shapes = {t.name: list(t.shape) for t in spec.tensors}
    return PlanStructure(spec.digest, plan_id, files, shapes, meta if me == 0 else None)


def bind_plan(structure: PlanStructure, views: Mapping, objects: dict, rank_local: Any, directory: AnyPath,
              iteration: int, group: Any, me: int, layout: v2.LayoutMeta, save_optimizer: bool) -> SavePlan:
    """This save's plan from a structure: the live tensors, this iteration's file metadata and folder.

    Pure, O(own chunks) on every rank (rank 0 also copies the file table: O(world size)).
    ``views`` maps (name, box) to the tensor holding that chunk now.
    """
    files: dict[str, tuple[str, list[WriteItem]]] = {}
    file_meta: dict[str, dict[str, str]] = {}
    for fname, (kind, items) in structure.files.items():
        files[fname] = (kind, [WriteItem(name, k, box, views[(name, box)]) for name, k, box in items])
        described = {k: (name, structure.shapes[name], list(box.offsets)) for name, k, box in items}
        file_meta[fname] = v2.file_metadata(described, kind=kind, rank=me, iteration=iteration, layout=layout,
                                            save_optimizer=save_optimizer)
    meta = common = None
    if structure.metadata is not None:
        t = structure.metadata
        meta = v2.Metadata(iteration=iteration, layout=layout, save_optimizer=save_optimizer, tensors=t.tensors,
                           files={n: v2.FileMeta(0, "0" * 16, f.kind, f.rank) for n, f in t.files.items()})
        common = _common(objects, iteration, [])
    return SavePlan(iteration, directory, group, me, files, file_meta, meta, common, rank_local)


def build_plan(holdings: list[dict], rank_locals: list[Any], objects: dict, views: dict, directory: AnyPath,
                iteration: int, *, prefix: str, save_optimizer: bool, remove_redundancy: bool, group: Any,
                me: int, world: int, mesh: dict[str, int] | None, stages: int) -> SavePlan:
    """A plan from explicit boxes per rank, every chunk listed in metadata.json (offline tools: ``split``).

    Live saves plan from placements instead (:func:`plan_save`); this path serves writers
    that know each rank's boxes but hold no DTensors. Pure.
    """
    entries: dict[str, tuple[str, str, list[int]]] = {}
    held: dict[int, list[tuple[str, Box]]] = {}
    for r, h in enumerate(holdings):
        keys = []
        for name, (kind, dtype, shape, boxes) in sorted(h.items()):
            first = entries.setdefault(name, (kind, dtype, shape))
            if first != (kind, dtype, shape):
                raise SaveError(f"saving iteration {iteration}: tensor {name!r} is {first[1]} {first[2]} on one rank "
                                f"but {dtype} {shape} on rank {dist.global_rank(group, r)}; every rank must hold "
                                "pieces of the same global tensor under one name")
            keys += [(name, Box(tuple(o), tuple(s))) for o, s in boxes]
        held[r] = list(dict.fromkeys(keys))  # a rank lists a replicated box once
    itemsize = {n: torch.empty(0, dtype=getattr(torch, d)).element_size() for n, (_, d, _) in entries.items()}
    if remove_redundancy:
        nbytes = {ck: ck[1].numel * itemsize[ck[0]] for keys in held.values() for ck in keys}
        owner = assign_writers(held, nbytes)
        assigned = {r: [ck for ck in held[r] if owner[ck] == r] for r in held}
        writers = sorted({r for r, cks in assigned.items() if cks}) or [0]
    else:
        assigned, writers = held, list(range(world))
    kinds = ["model", "opt"] if save_optimizer else ["model"]
    layout = v2.LayoutMeta(world_size=world, mesh=mesh, pipeline_stages=stages, writers=len(writers))
    meta = v2.Metadata(iteration=iteration, layout=layout, save_optimizer=save_optimizer)
    for name, (kind, dtype, shape) in sorted(entries.items()):
        meta.tensors[name] = v2.TensorMeta(dtype, list(shape), kind, [])
    chunk_index: dict[tuple[str, Box], v2.ChunkMeta] = {}
    my_files: dict[str, tuple[str, list[WriteItem]]] = {}
    file_meta: dict[str, dict[str, str]] = {}
    for index, w in enumerate(writers):
        for kind in kinds:
            fname = v2.file_name(prefix, kind, index, len(writers))
            mine = sorted((ck for ck in assigned.get(w, []) if entries[ck[0]][0] == kind),
                          key=lambda ck: (ck[0], ck[1]))
            per_name: dict[str, int] = {}
            for name, _ in mine:
                per_name[name] = per_name.get(name, 0) + 1
            items, described = [], {}
            for name, box in mine:
                key = v2.chunk_key(name, box.offsets, per_name[name] > 1)
                chunk = chunk_index.get((name, box))
                if chunk is None:
                    chunk = chunk_index[(name, box)] = v2.ChunkMeta(list(box.offsets), list(box.shape), [])
                    meta.tensors[name].chunks.append(chunk)
                chunk.stored.append(v2.Stored(fname, key))
                described[key] = (name, list(entries[name][2]), list(box.offsets))
                if w == me:
                    items.append(WriteItem(name, key, box, views[(name, box)]))
            # Every rank fills the file entry; sizes and checksums arrive at the agree step.
            meta.files[fname] = v2.FileMeta(0, "0" * 16, kind, w)
            if w == me:
                my_files[fname] = (kind, items)
                file_meta[fname] = v2.file_metadata(described, kind=kind, rank=w, iteration=iteration,
                                                    layout=layout, save_optimizer=save_optimizer)
    for t in meta.tensors.values():
        t.chunks.sort(key=lambda c: c.offsets)
    common = _common(objects, iteration, rank_locals)
    return SavePlan(iteration, directory, group, me, my_files, file_meta, meta, common)


def _common(objects: dict[str, Any], iteration: int, rank_locals: list[Any]) -> dict[str, Any]:
    common: dict[str, Any] = {"iteration": iteration}
    common["global_step"] = objects.get("global_step", iteration)
    for key in CONTEXT_KEYS:
        if key in objects:
            common[key] = objects[key]
    common["state"] = objects
    common["rank_local"] = rank_locals
    return common


def record_metrics(plan: SavePlan, metrics: Mapping[str, float] | None) -> None:
    """Rank 0: record ``metrics`` (name → number) as common.json's ``metrics``."""
    if metrics is not None and plan.common is not None:
        plan.common["metrics"] = {str(k): float(v) for k, v in metrics.items()}


def prepare_temp(plan: SavePlan) -> None:
    """Step 2: rank 0 creates an empty temp folder (removing a stale one); everyone waits.

    Collective: every rank of the plan's group calls it.
    """
    error = None
    if plan.rank == 0:
        try:
            commit.prepare_staging(plan.directory, plan.iteration)
        except (OSError, CheckpointError) as exc:
            error = error_text(exc)
    dist.agree(error, f"preparing {plan.temp}", plan.group)


def write_files(plan: SavePlan) -> dict[str, tuple[int, str]]:
    """Step 3: stream this rank's files into the temp folder, all at once. Not collective.

    A rank's model and opt files are written concurrently (a thread each, every file with
    its own block writers): the device then always has a file's writes queued while the
    other file's blocks are cut, checksummed and copied (7-15% faster here than one file
    after the other).

    Returns:
        file name → (size, xxh3-64 hex).
    """
    def one(fname: str) -> tuple[int, str]:
        items = plan.files[fname][1]
        written = write_file(plan.temp / fname, [(it.key, it.tensor) for it in items], plan.file_meta[fname])
        commit.fault_point("one-file-written")
        return written

    names = list(plan.files)
    if len(names) <= 1:
        out = {fname: one(fname) for fname in names}
    else:
        # Leaving the block waits for every file: no thread writes after a failure is raised.
        with ThreadPoolExecutor(len(names), thread_name_prefix="resumable-file") as pool:
            futures = {fname: pool.submit(one, fname) for fname in names}
            out = {fname: f.result() for fname, f in futures.items()}
    commit.fault_point("files-written")
    return out


def finish_save(plan: SavePlan, written: dict[str, tuple[int, str]] | None, error: str | None,
                on_commit: Callable[[SavePlan], None] | None = None) -> AnyPath:
    """Steps 4-5: agree on the written files, then rank 0 commits; everyone learns the outcome.

    Args:
        plan: this rank's plan.
        written: what :func:`write_files` returned (None when it failed).
        error: this rank's failure text, or None.
        on_commit: run on rank 0 after the tracker names the new checkpoint (retention);
            its errors are logged, not raised: the checkpoint is already committed.

    Returns:
        The committed folder.

    Raises:
        SaveError: on every rank when any rank failed; the temp folder is removed.

    Collective: every rank of the plan's group calls it, failed or not.
    """
    what = f"saving {plan.final}"
    committed = False
    try:
        # Point to point to rank 0: a rank sends its own files' sizes and receives nothing.
        results = dist.gather_object((error, written or {}, plan.rank_local), 0, plan.group)
        outcome = None
        if plan.rank == 0:
            assert results is not None and plan.metadata is not None and plan.common is not None
            failed = [(dist.global_rank(plan.group, r), e) for r, (e, _, _) in enumerate(results) if e is not None]
            if failed:
                detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
                outcome = f"{what} failed on {len(failed)} rank(s), nothing was committed: {detail}"
            else:
                try:
                    for _, files, _ in results:
                        for fname, (size, digest) in files.items():
                            plan.metadata.files[fname].size, plan.metadata.files[fname].xxh3_64 = size, digest
                            plan.nbytes += size
                    plan.common["rank_local"] = [rl for _, _, rl in results]
                    began = time.perf_counter()
                    commit_plan(plan)
                    plan.seconds["commit"] = time.perf_counter() - began
                    committed = True
                except Exception as exc:  # told to every rank below
                    outcome = (f"committing {plan.final} failed on 1 rank(s), nothing was committed: "
                               f"rank {dist.global_rank(plan.group, 0)}: {error_text(exc)}")
        outcome = dist.broadcast_object(outcome, 0, plan.group)
        if outcome is not None:
            raise SaveError(outcome)
    except BaseException as exc:
        if plan.rank == 0 and not committed:
            try:
                commit.discard_staging(plan.temp)
            except (OSError, CheckpointError) as cleanup:  # the next start removes it
                log.warning("could not remove %s after the failed save: %s", plan.temp, cleanup)
        if isinstance(exc, RuntimeError) and not isinstance(exc, SaveError):
            # A collective failed: a peer died (connection closed) or hangs (the group's timeout).
            outcome = ("the checkpoint was committed by rank 0 before the failure" if committed
                       else "nothing was committed")
            raise SaveError(f"{what}: a collective with the other ranks failed, {outcome}; a rank died or does not "
                            f"answer (see its log): {error_text(exc)}") from exc
        raise
    if plan.rank == 0 and on_commit is not None:
        try:
            on_commit(plan)
        except Exception:
            log.exception("after committing %s: clean-up failed (the checkpoint itself is committed)", plan.final)
    return plan.final


def commit_plan(plan: SavePlan) -> None:
    """Rank 0: files.json, common.json and metadata.json (sealed; it records the other two's sizes and
    checksums, and is written last), commit (:func:`resumable.commit.commit_folder`), tracker."""
    assert plan.metadata is not None and plan.common is not None, "only rank 0 commits"
    with gc_paused():
        common = v2.common_bytes(plan.common)
        plan.metadata.common = v2.Seal.of(common)  # metadata.json, written last, vouches for common.json
        table, text = plan.metadata.files_json().encode(), plan.metadata.to_json()
        v2.Metadata.from_json(text, plan.temp / v2.METADATA, table)  # never commit a plan that does not tile
        files = ((v2.FILES, table), (v2.COMMON, common), (v2.METADATA, text.encode()))
    previous = commit.commit_folder(plan.temp, plan.final, files)  # an earlier copy, set aside (local)
    commit.fault_point("after-rename")
    try:
        commit.write_tracker(plan.directory, plan.iteration, by_save=True)
    except (OSError, CheckpointError):
        # E.g. the disk filled up between the rename and the tracker: take the folder back out of
        # view and put the earlier copy back, so that "nothing was committed" (what every rank is
        # told) is true and the tracker's target is whole.
        commit.unpublish_folder(plan.final, plan.temp, previous)
        raise
    commit.fault_point("after-tracker")
    commit.discard_previous(previous)
    log.info("committed %s", plan.final)


def save(state: Mapping[str, Any], directory: str | os.PathLike[str], iteration: int, *, prefix: str = "CKP",
         save_optimizer: bool = True, remove_redundancy: bool = False, process_group: Any = None,
         layout_info: Any = None, on_commit: Callable[[SavePlan], None] | None = None,
         metrics: Mapping[str, float] | None = None) -> AnyPath:
    """Save ``state`` as Checkpoint 2.0 ``<directory>/iteration_XXXXXXXX`` and point the tracker at it.

    Args:
        state: nested dict of tensors, DTensors and JSON-able values (docs/internals.md:
            ``model`` / ``optimizer`` / ``rank_local`` conventions).
        directory: the checkpoint folder (created when missing).
        iteration: the iteration (global step) number of the folder.
        prefix: file name prefix (``CKP`` → ``CKP-model-0000000-0000002.safetensors``); "" allowed.
        save_optimizer: store tensors under ``optimizer`` in ``-opt-`` files; False skips them.
        remove_redundancy: store each replicated chunk once, balancing bytes across writers.
        process_group: the group whose ranks save together (default: the default group).
        layout_info: a ``DeviceMesh`` or ``{"mesh": {name: size}, "pipeline_stages": n}``
            recorded in metadata.json; by default the first DTensor's mesh.
        on_commit: called on rank 0 after the commit (the manager's retention).
        metrics: numbers recorded in common.json's ``metrics`` (rank 0's), e.g. ``{"loss": 2.31}``:
            what retention's ``keep_best`` ranks by.

    Returns:
        The committed folder.

    Raises:
        SaveError: on every rank, when any rank failed (naming it); nothing is committed.

    Example:
        >>> save({"model": model.state_dict(), "global_step": 100}, "ckpt", 100)
        PosixPath('ckpt/iteration_00000100')

    Collective: every rank of ``process_group`` calls it with the same ``directory``,
    ``iteration`` and options. Tensors are read while the call runs: do not mutate them
    from another thread meanwhile.
    """
    dist.require_group("resumable.save")
    started = time.perf_counter()
    plan = plan_save(state, directory, iteration, prefix=prefix, save_optimizer=save_optimizer,
                     remove_redundancy=remove_redundancy, group=process_group, layout_info=layout_info)
    plan.started = started
    record_metrics(plan, metrics)
    prepare_temp(plan)
    plan.seconds["plan"] = time.perf_counter() - started
    written, error = None, None
    try:
        written = timed(plan, "write", write_files)
    except Exception as exc:  # reported to every rank by finish_save
        error = error_text(exc)
    return finish_save(plan, written, error, on_commit)


def timed(plan: SavePlan, phase: str, step: Callable[[SavePlan], Any]) -> Any:
    """``step(plan)``, adding its seconds to ``plan.seconds[phase]`` (also when it raises)."""
    began = time.perf_counter()
    try:
        return step(plan)
    finally:
        plan.seconds[phase] = plan.seconds.get(phase, 0.0) + time.perf_counter() - began
