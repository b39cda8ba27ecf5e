"""PyTorch DCP's own planners on the synthetic state of W simulated ranks.

Run::

    python -m bench.scale_dcp --world 8 64 512 1024 --model 8b --layout fsdp [--max-seconds 60]

Each W runs in a fresh process and prints one JSON line; :func:`measure_dcp` is the
same measurement for an in-process caller. No tensor data exists anywhere: every
rank's state is the geometry :mod:`bench.scale_state` gives it.

What is real DCP code and what is not:

* One rank's local save plan (``dcp_local_plan_s``, rank 1) is
  ``DefaultSavePlanner.set_up_planner`` + ``create_local_plan`` on a state dict of
  meta-device DTensors on a real ``DeviceMesh`` of W ranks, built in this process on
  torch's fake process group (``torch.testing._internal.distributed.fake_pg``).
  Its pickled size is ``dcp_local_plan_bytes``: what the rank sends in DCP's
  gather (``gather_object`` pickles it with the default protocol).
* The coordinator needs every rank's local plan. Re-creating a fake world per rank is
  too slow for W in the thousands, so they are built here as
  ``_create_write_items_for_dtensor`` builds them, with DCP's own dataclasses and
  DTensor's own chunk geometry (``_compute_local_shape_and_global_offset``, the
  plain-data core of ``compute_local_shape_and_global_offset``). Ranks 0 and 1 are
  checked to pickle to the same bytes as the real path. Each plan is pickled and
  unpickled, as the gather does; the unpickling is the coordinator's
  ``dcp_gather_unpickle_s``, and the RSS the unpickled plans take there
  ``dcp_gathered_plans_mib``.
* ``dcp_global_plan_first_s``: the coordinator's global step on the gathered plans,
  ``DefaultSavePlanner(enable_plan_caching=True).create_global_plan`` (dedup, global
  plan, metadata, validation) + ``FileSystemWriter.prepare_global_plan``.
  ``dcp_global_plan_part_bytes`` is rank 1's pickled part of the scatter and
  ``dcp_scatter_pickle_s`` the coordinator pickling all W parts. ``dcp_finish_plan_s``
  is the coordinator's ``finish_plan``.
* ``dcp_global_plan_cached_s``: the next save with unchanged state. With plan caching
  every rank's ``create_local_plan`` finds its plan equal to the cached one and sends
  ``SavePlan([], usable=False)`` (``dcp_local_plan_cached_s``: that comparison on
  rank 0); the coordinator's global step then reuses the cached global plan and
  metadata. (Without caching the second save costs what the first does.)
* ``dcp_metadata_bytes``: the ``.metadata`` file ``FileSystemWriter.finish`` writes
  (pickled ``Metadata`` with every rank's chunks and a ``_StorageInfo`` per saved
  item, synthesised as one file per rank, items back to back, raw tensor bytes).
  ``dcp_load_metadata_parse_s`` is ``FileSystemReader.read_metadata`` on it.
* Loads, for loading rank 1: ``create_default_local_load_plan`` (what
  ``DefaultLoadPlanner.create_local_plan`` returns for a flat state dict) on
  meta-device DTensors on a fake mesh, against that metadata, for the same layout
  (``dcp_load_plan_same_s``), for the layout on W/2 ranks
  (``dcp_load_plan_reshard_s``) and, for ``tp8_fsdp``, for ``tp4_fsdp`` on W ranks
  (``dcp_load_plan_tp_change_s``). ``DefaultLoadPlanner.set_up_planner`` is not used:
  it would allocate every meta DTensor's local tensor for real.

Times are seconds of one call (median of 3 where one call takes under a second).
``peak_rss_mib`` is the process's peak RSS (``ru_maxrss``), so per W only when each W
has its own process, as on the command line.

Limits. ``max_seconds`` bounds each measured step (a ``SIGALRM`` timer; for the
gather, the unpickling summed over ranks): a step that runs longer is abandoned, its field and the later ones are ``null`` and ``skipped`` says
which step it was. Before the plans of all W ranks are built, the memory they and the
global step on them need is extrapolated from the first 32 ranks; if it exceeds the
memory available the W is skipped the same way. The command line skips the larger W
after a skip.

Cost. For Shard(0) sharding of a matrix whose dim 1 is the larger (k/v_proj,
down_proj and their moments), ``_validate_global_plan`` sweeps along dim 1, where
every rank's chunk spans the whole extent, so it compares all pairs of the W chunks:
the first global plan grows faster than W (8b fsdp on 2 cores: 1.6 s at W = 64,
62 s at 1024, 505 s at 4096).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import gc
import json
import multiprocessing
import pickle
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import (
    _compute_local_shape_and_global_offset,
    compute_local_shape_and_global_offset,
)
from torch.testing._internal.distributed.fake_pg import FakeStore

from bench.scale_state import LAYOUTS, MODELS, Holding, ReshardTarget, rank_holdings, reshard_target

T = TypeVar("T")

#: The rank whose local plans are timed (not the coordinator, rank 0).
PROBE_RANK = 1
#: Ranks built before the memory of all W plans is extrapolated.
PROBE_RANKS = 32
#: Peak RSS growth of the save planning relative to the gathered plans (measured 2.0x
#: to 2.1x for 8b fsdp at W = 512 to 4096), with a margin.
GLOBAL_STEP_MEMORY_FACTOR = 2.5

FIELDS = (
    "dcp_local_plan_s",
    "dcp_local_plan_bytes",
    "dcp_gather_unpickle_s",
    "dcp_gathered_plans_mib",
    "dcp_global_plan_first_s",
    "dcp_global_plan_part_bytes",
    "dcp_scatter_pickle_s",
    "dcp_finish_plan_s",
    "dcp_local_plan_cached_s",
    "dcp_local_plan_cached_bytes",
    "dcp_global_plan_cached_s",
    "dcp_metadata_bytes",
    "dcp_load_metadata_parse_s",
    "dcp_load_plan_same_s",
    "dcp_load_plan_bytes",
    "dcp_load_plan_reshard_s",
    "dcp_load_plan_tp_change_s",
)


class Skipped(Exception):
    """A measurement that would exceed the time or memory allowed."""


# ----------------------------------------------------------------- helpers


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds of one call of ``fn`` (median of 3 if a call is under a second) and its result."""
    times, result = [], None
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[0] >= 1.0:
            break
    return statistics.median(times), result  # type: ignore[return-value]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _clear_plan_cache() -> None:
    """Forget DCP's class-level plan caches (they outlive planners)."""
    for cache in (
        SavePlanner._cached_save_plan,
        SavePlanner._cached_final_save_plan,
        SavePlanner._cached_all_plans,
        SavePlanner._cached_global_plan,
        SavePlanner._cached_metadata,
    ):
        cache.clear()


@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`Skipped` in the block once it has run ``seconds`` (None: no limit)."""
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Skipped(f"{what} took over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


Limit = Callable[[str], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _fake_world(world: int, rank: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world`` on torch's fake process group."""
    if dist.is_initialized():
        raise RuntimeError("measure_dcp needs a process without a default process group")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _dtensor_state_dict(holdings: list[Holding]) -> dict[str, DTensor]:
    """Meta-device DTensors for a rank's holdings (inside :func:`_fake_world`)."""
    meshes: dict[tuple[Any, ...], DeviceMesh] = {}
    state: dict[str, DTensor] = {}
    for h in holdings:
        key = (h.mesh_shape, h.mesh_dim_names, h.mesh_ranks)
        mesh = meshes.get(key)
        if mesh is None:
            ranks = torch.tensor(h.mesh_ranks).view(h.mesh_shape)
            mesh = meshes[key] = DeviceMesh("cpu", ranks, mesh_dim_names=h.mesh_dim_names)
            if tuple(mesh.get_coordinate() or ()) != h.coordinate:
                raise AssertionError(f"{h.name}: mesh coordinate {mesh.get_coordinate()} != {h.coordinate}")
        local_shape, _ = compute_local_shape_and_global_offset(h.shape, mesh, h.placements)
        local = torch.empty(local_shape, dtype=getattr(torch, h.dtype), device="meta")
        state[h.name] = DTensor.from_local(
            local, mesh, h.placements, run_check=False, shape=torch.Size(h.shape), stride=_contiguous_stride(h.shape)
        )
    return state


def _synthetic_local_plan(holdings: list[Holding]) -> SavePlan:
    """The plan ``DefaultSavePlanner.create_local_plan`` makes for these holdings.

    Item for item what ``_create_write_items_for_dtensor`` builds, with the chunk
    geometry of DTensor's ``_compute_local_shape_and_global_offset``; ``planner_data``
    is the flattening map of a flat state dict, ``{fqn: (fqn,)}``.
    """
    geometry: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    items: list[WriteItem] = []
    for h in holdings:
        key = (h.shape, h.placements, h.mesh_shape, h.coordinate)
        if key not in geometry:
            geometry[key] = _compute_local_shape_and_global_offset(h.shape, h.mesh_shape, h.coordinate, h.placements)
        sizes, offsets = (torch.Size(v) for v in geometry[key])
        items.append(
            WriteItem(
                index=MetadataIndex(h.name, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                    properties=TensorProperties(dtype=getattr(torch, h.dtype)),
                    size=torch.Size(h.shape),
                ),
            )
        )
    return SavePlan(items, planner_data={h.name: (h.name,) for h in holdings})


def _gather_local_plans(
    model: str, layout: str, world: int, max_seconds: float | None
) -> tuple[list[SavePlan], list[bytes], float, float]:
    """Every rank's local plan as the coordinator unpickles it from the gather.

    Returns the plans, the pickled plans of ranks 0 and 1 (for checking), the
    seconds spent unpickling and the MiB the plans added to the RSS. Raises
    :class:`Skipped` when the unpickling takes over ``max_seconds`` or when,
    extrapolated from the first ranks, the plans and the global step on them would
    not fit in the memory available.
    """
    plans: list[SavePlan] = []
    probes: list[bytes] = []
    unpickle_s, rss0 = 0.0, _rss_bytes()
    for rank in range(world):
        data = pickle.dumps(_synthetic_local_plan(rank_holdings(model, layout, world, rank)))
        if rank <= PROBE_RANK:
            probes.append(data)
        start = time.perf_counter()
        plans.append(pickle.loads(data))
        unpickle_s += time.perf_counter() - start
        if max_seconds is not None and unpickle_s > max_seconds:
            raise Skipped(f"unpickling the gathered plans took over {max_seconds:g} s")
        if rank + 1 == PROBE_RANKS and world > PROBE_RANKS:
            need = (_rss_bytes() - rss0) * world / PROBE_RANKS * GLOBAL_STEP_MEMORY_FACTOR
            if need > _available_bytes():
                raise Skipped(f"the save planning would need ~{need / 2**30:.1f} GiB, more than is available")
    return plans, probes, unpickle_s, (_rss_bytes() - rss0) / 2**20


def _write_results(plans: list[SavePlan]) -> list[list[WriteResult]]:
    """What ``FileSystemWriter.write_data`` would report: one file per rank, items back to back."""
    results = []
    for plan in plans:
        offset, rank_results = 0, []
        path = f"{plan.storage_data.prefix}0.distcp"
        for item in plan.items:
            length = item.tensor_storage_size() or 0
            rank_results.append(WriteResult(item.index, length, _StorageInfo(path, offset, length)))
            offset += length
        results.append(rank_results)
    return results


def _local_plan_probe(model: str, layout: str, world: int) -> tuple[float, SavePlan]:
    """Rank 1's real ``create_local_plan``, timed."""
    with _fake_world(world, PROBE_RANK):
        state = _dtensor_state_dict(rank_holdings(model, layout, world, PROBE_RANK))

        def local_plan() -> SavePlan:
            planner = DefaultSavePlanner(enable_plan_caching=True)
            planner.set_up_planner(state, is_coordinator=False)
            return planner.create_local_plan()

        return _timed(local_plan)


def _coordinator_saves(
    out: dict[str, Any], limit: Limit, model: str, layout: str, world: int, plans: list[SavePlan], ckpt: Path
) -> bytes:
    """The coordinator's two saves (the second with plan caching), writing ``.metadata`` to ``ckpt``.

    Fills ``out`` as it goes and returns rank 0's own pickled local plan.
    """
    writer = FileSystemWriter(ckpt)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    with _fake_world(world, 0):
        state = _dtensor_state_dict(rank_holdings(model, layout, world, 0))
        planner = DefaultSavePlanner(enable_plan_caching=True)
        planner.set_up_planner(state, is_coordinator=True)
        own_plan = pickle.dumps(planner.create_local_plan())

        with limit("the first global plan"):
            start = time.perf_counter()
            parts, metadata = planner.create_global_plan(plans)
            parts = writer.prepare_global_plan(parts)
            out["dcp_global_plan_first_s"] = time.perf_counter() - start
        out["dcp_global_plan_part_bytes"] = len(pickle.dumps(parts[PROBE_RANK]))
        with limit("pickling the scatter"):
            out["dcp_scatter_pickle_s"], _ = _timed(lambda: [pickle.dumps(p) for p in parts])
        start = time.perf_counter()
        final_plan = planner.finish_plan(parts[0])
        out["dcp_finish_plan_s"] = time.perf_counter() - start
        with limit("writing .metadata"):
            writer.finish(metadata, _write_results(parts))
        del parts, metadata

        # The next save: nothing changed, so every rank sends an unusable empty plan.
        again = DefaultSavePlanner(enable_plan_caching=True)
        again.set_up_planner(state, is_coordinator=True)
        start = time.perf_counter()
        unchanged = again.create_local_plan()
        out["dcp_local_plan_cached_s"] = time.perf_counter() - start
        if unchanged.usable:
            raise AssertionError("plan caching did not recognise the unchanged plan")
        out["dcp_local_plan_cached_bytes"] = len(pickle.dumps(unchanged))
        start = time.perf_counter()
        cached_parts, _ = again.create_global_plan([unchanged] * world)
        cached_parts = writer.prepare_global_plan(cached_parts)
        out["dcp_global_plan_cached_s"] = time.perf_counter() - start
        if pickle.dumps(again.finish_plan(cached_parts[0])) != pickle.dumps(final_plan):
            raise AssertionError("the cached final plan differs from the first save's")
    return own_plan


def _load_plan(metadata: Metadata, model: str, layout: str, world: int) -> tuple[float, int]:
    """Rank 1's ``create_default_local_load_plan`` for ``layout`` on ``world`` ranks: seconds and pickled bytes."""
    with _fake_world(world, PROBE_RANK):
        state = _dtensor_state_dict(rank_holdings(model, layout, world, PROBE_RANK))
        seconds, plan = _timed(lambda: create_default_local_load_plan(state, metadata))
    return seconds, len(pickle.dumps(plan))


def _reshard_or_none(layout: str, world: int, change: Literal["half", "tp"]) -> ReshardTarget | None:
    try:
        return reshard_target(layout, world, change)
    except ValueError:
        return None


# ----------------------------------------------------------------- measurement


def measure_dcp(model: str, layout: str, world: int, max_seconds: float | None = None) -> dict[str, Any]:
    """DCP's planning costs for ``model`` under ``layout`` on ``world`` simulated ranks.

    Needs a process with no default process group (it makes fake ones) and, with
    ``max_seconds``, the main thread (the limit is a ``SIGALRM`` timer). Returns the
    fields listed in the module docstring; those not measured are ``None`` and
    ``skipped`` says why.
    """
    if model not in MODELS or layout not in LAYOUTS:
        raise ValueError(f"unknown model {model!r} or layout {layout!r}")
    result: dict[str, Any] = {"world": world, "model": model, "layout": layout}
    result.update(dict.fromkeys(FIELDS), skipped=None)
    _clear_plan_cache()
    try:
        _measure(result, max_seconds, model, layout, world)
    except Skipped as skip:
        result["skipped"] = str(skip)
    finally:
        _clear_plan_cache()
        gc.collect()
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def _measure(out: dict[str, Any], max_seconds: float | None, model: str, layout: str, world: int) -> None:
    limit: Limit = functools.partial(_deadline, max_seconds)
    with limit("rank 1's local plan"):
        out["dcp_local_plan_s"], probe_plan = _local_plan_probe(model, layout, world)
    probe_bytes = pickle.dumps(probe_plan)
    out["dcp_local_plan_bytes"] = len(probe_bytes)

    plans, synthetic, out["dcp_gather_unpickle_s"], out["dcp_gathered_plans_mib"] = _gather_local_plans(
        model, layout, world, max_seconds
    )
    if synthetic[PROBE_RANK] != probe_bytes:
        raise AssertionError(f"synthetic plan of rank {PROBE_RANK} differs from DCP's")
    with tempfile.TemporaryDirectory(prefix="scale_dcp_") as tmp:
        ckpt = Path(tmp)
        own_plan = _coordinator_saves(out, limit, model, layout, world, plans, ckpt)
        if synthetic[0] != own_plan:
            raise AssertionError("synthetic plan of rank 0 differs from DCP's")
        del plans, synthetic
        _clear_plan_cache()
        gc.collect()

        out["dcp_metadata_bytes"] = (ckpt / ".metadata").stat().st_size
        with limit("reading .metadata"):
            out["dcp_load_metadata_parse_s"], metadata = _timed(FileSystemReader(ckpt).read_metadata)

    with limit("the load plan"):
        out["dcp_load_plan_same_s"], out["dcp_load_plan_bytes"] = _load_plan(metadata, model, layout, world)
    half = _reshard_or_none(layout, world, "half")
    if half is not None:
        with limit("the W -> W/2 load plan"):
            out["dcp_load_plan_reshard_s"], _ = _load_plan(metadata, model, half.layout, half.world)
    tp = _reshard_or_none(layout, world, "tp")
    if tp is not None:
        with limit("the TP-change load plan"):
            out["dcp_load_plan_tp_change_s"], _ = _load_plan(metadata, model, tp.layout, tp.world)


# ----------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[8, 64, 512, 1024])
    parser.add_argument("--model", choices=sorted(MODELS), default="8b")
    parser.add_argument("--layout", choices=LAYOUTS, default="fsdp")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="abandon a step past this, and skip the larger W"
    )
    args = parser.parse_args(argv)

    skip_reason: str | None = None
    context = multiprocessing.get_context("spawn")
    for world in sorted(args.world):
        if skip_reason is not None:
            row = {"world": world, "model": args.model, "layout": args.layout, **dict.fromkeys(FIELDS)}
            row.update(skipped=f"a smaller W was skipped: {skip_reason}", peak_rss_mib=None)
        else:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(measure_dcp, args.model, args.layout, world, args.max_seconds).result()
            skip_reason = row["skipped"]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
