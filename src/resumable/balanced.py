"""``balanced_load``: each needed region is read from disk by one rank and sent to the others.

With a plain load every rank reads all it needs, so a tensor replicated over 8 data
parallel ranks is read 8 times. Here rank 0 pools the ranks' read plans, splits every stored
chunk into disjoint *units* (pieces needed by the same set of ranks), gives each unit to
one of the ranks that need it (largest first, to the least-loaded one, so bytes read are
balanced), and the reader sends the unit to the other ranks that need it with
point-to-point ``isend``/``irecv`` (gloo and NCCL both have them). The placed values are
bit-identical to a plain load: the same bytes, copied by the same slicing.

Order of calls (from :func:`resumable.load.load` with ``balanced=True``, on every rank of
the group, after its first agreement step)::

    collective  gather_object of every rank's reads to rank 0, which cuts the units and picks
                their readers; scatter_object of each rank's own units (point to point)
    local       header checks of the files this rank reads
    collective  agreement (a bad header fails every rank before any read)
    local       every unit this rank reads, at once, by :func:`resumable.reads.read_direct`
                (the parallel streams of a plain load)
    collective  agreement (a failed read fails every rank before any send)
    p2p         per tensor, in name order: readers isend, the others irecv; each rank
                waits for that tensor's messages before the next tensor, so at most one
                tensor's units are in flight

Memory: units are read straight into the reader's own target slices and sent from there;
receivers take them straight into theirs. A temporary copy is made only where a slice is
not one contiguous run (on disk or in the target), so peak memory stays at the target
state plus at most one tensor's such units (or one per read thread).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as tdist

from resumable import dist
from resumable.dist import agree_on
from resumable.errors import CheckpointError
from resumable.formats import v2
from resumable.formats.safetensors_io import Header
from resumable.geometry import Box
from resumable.layout import local_tensor
from resumable.planning import Read
from resumable.reads import check_headers, read_direct

log = logging.getLogger(__name__)

__all__ = ["Unit", "assign_readers", "balanced_reads", "box_difference", "refine", "units_of"]


def box_difference(a: Box, b: Box) -> list[Box]:
    """``a`` minus ``b`` as disjoint boxes (slabs peeled off one dim at a time).

    Example:
        >>> box_difference(Box((0,), (8,)), Box((2,), (3,)))
        [Box(offsets=(0,), shape=(2,)), Box(offsets=(5,), shape=(3,))]
    """
    inter = a.intersect(b)
    if inter is None:
        return [a]
    out = []
    lo, hi = list(a.offsets), list(a.end)
    for d in range(a.ndim):
        if inter.offsets[d] > lo[d]:
            out.append(_box(lo, hi, d, lo[d], inter.offsets[d]))
        if inter.end[d] < hi[d]:
            out.append(_box(lo, hi, d, inter.end[d], hi[d]))
        lo[d], hi[d] = inter.offsets[d], inter.end[d]  # the rest lies inside inter along d
    return out


def _box(lo: list[int], hi: list[int], d: int, start: int, stop: int) -> Box:
    offsets = tuple(start if i == d else lo[i] for i in range(len(lo)))
    shape = tuple(stop - start if i == d else hi[i] - lo[i] for i in range(len(lo)))
    return Box(offsets, shape)


def refine(needs: Iterable[tuple[int, Box]]) -> list[tuple[Box, frozenset[int]]]:
    """Split the regions ranks need into disjoint pieces, each with the set of ranks needing it.

    Identical regions (replicas across data parallel ranks) become one piece with
    several owners; disjoint regions stay whole; partial overlaps are cut.
    """
    pieces: list[tuple[Box, frozenset[int]]] = []
    for rank, region in needs:
        rest = [region]
        updated: list[tuple[Box, frozenset[int]]] = []
        for box, owners in pieces:
            inter = box.intersect(region)
            if inter is None:
                updated.append((box, owners))
                continue
            updated.append((inter, owners | {rank}))
            updated.extend((d, owners) for d in box_difference(box, inter))
            rest = [x for r in rest for x in box_difference(r, inter)]
        updated.extend((r, frozenset({rank})) for r in rest)
        pieces = updated
    return pieces


@dataclass(frozen=True)
class Unit:
    """A disjoint piece of one stored chunk, the ranks needing it, and the one reading it."""

    name: str
    file: str
    key: str
    stored_box: Box
    box: Box
    owners: tuple[int, ...]
    reader: int = -1

    def src(self) -> tuple[slice, ...]:
        return self.box.slices_in(self.stored_box)


def units_of(plans: list[list[tuple]]) -> list[Unit]:
    """Deterministic units from every rank's reads (``plans[rank]`` as gathered); pure."""
    needs: dict[tuple[str, Box], list[tuple[int, Box]]] = defaultdict(list)
    where: dict[tuple[str, Box], tuple[str, str]] = {}
    for rank, plan in enumerate(plans):
        for name, file, key, s_off, s_shape, r_off, r_shape in plan:
            stored = Box(tuple(s_off), tuple(s_shape))
            needs[(name, stored)].append((rank, Box(tuple(r_off), tuple(r_shape))))
            where.setdefault((name, stored), (file, key))
    units = []
    for (name, stored), regions in needs.items():
        file, key = where[(name, stored)]
        for box, owners in refine(regions):
            units.append(Unit(name, file, key, stored, box, tuple(sorted(owners))))
    units.sort(key=lambda u: (u.name, u.box.offsets, u.box.shape))
    return units


def assign_readers(units: list[Unit], itemsize: Mapping[str, int], world: int) -> tuple[list[Unit], list[int]]:
    """Give each unit to one of its owners: largest first, to the least-loaded (lowest rank on ties).

    Returns:
        The units with ``reader`` set (same order) and the bytes each rank will read.
    """
    load = [0] * world
    readers: dict[int, int] = {}
    order = sorted(range(len(units)), key=lambda i: (-units[i].box.numel * itemsize[units[i].name], i))
    for i in order:
        u = units[i]
        r = min(u.owners, key=lambda o: (load[o], o))
        readers[i] = r
        load[r] += u.box.numel * itemsize[u.name]
    return [Unit(u.name, u.file, u.key, u.stored_box, u.box, u.owners, readers[i]) for i, u in enumerate(units)], load


def _dst(unit: Unit, mine: list[Read]) -> tuple[slice, ...]:
    """Slices of ``unit.box`` in this rank's local tensor (it lies inside one of this rank's regions)."""
    for r in mine:
        if unit.box.intersect(r.region) == unit.box:
            return tuple(slice(d.start + o - ro, d.start + o - ro + s)
                         for d, o, ro, s in zip(r.dst, unit.box.offsets, r.region.offsets, unit.box.shape))
    raise AssertionError(f"unit {unit} is not inside any region this rank needs")  # refine() guarantees it


def balanced_reads(folder: Path, meta: v2.Metadata, reads: list[Read], targets: Mapping[str, torch.Tensor],
                   group: Any, *, verify: bool = True) -> int:
    """Fill this rank's targets for ``reads`` with the work of reading shared across ranks.

    Args:
        folder: the ``iteration_*`` folder.
        meta: its metadata.
        reads: this rank's plan (:func:`resumable.load.plan_reads`).
        targets: name → the target tensor (DTensor or tensor) to fill in place.
        group: the process group.
        verify: the reader of each unit checks its bytes against the block checksums
            (:func:`resumable.reads.read_direct`) before any unit is sent.

    Returns:
        The bytes this rank read from disk.

    Raises:
        CorruptCheckpointError: a file this rank reads has a bad header or a block failing its
            checksum (every rank raises, before any send).

    Collective: every rank of ``group`` calls it after :func:`resumable.load.load`'s first
    agreement step (see the module docstring for the order).
    """
    me, world = dist.rank(group), dist.world_size(group)
    mine = [(r.name, r.file, r.key, r.stored_box.offsets, r.stored_box.shape, r.region.offsets, r.region.shape)
            for r in reads]
    # Rank 0 plans the units of the whole job (linear in it); every rank sends its own reads and
    # gets back only the units it reads or receives, each tagged with its index in the job's list.
    plans = dist.gather_object(mine, 0, group)
    parts = None
    if me == 0:
        assert plans is not None
        itemsize = {n: torch.empty(0, dtype=getattr(torch, t.dtype)).element_size() for n, t in meta.tensors.items()}
        units, load = assign_readers(units_of(plans), itemsize, world)
        plain = sum(r_shape_numel(p) * itemsize[p[0]] for plan in plans for p in plan)
        log.info("balanced_load: %d bytes read in all (%d without balancing); per rank: %s",
                 sum(load), plain, load)
        parts = [([], load[r]) for r in range(world)]
        for tag, u in enumerate(units):
            for o in u.owners:
                parts[o][0].append((tag, u))
    tagged, my_load = dist.scatter_object(parts, 0, group)
    err: BaseException | None = None
    headers: dict[str, Header] = {}
    try:
        headers = check_headers(folder, meta, [Read(u.name, u.file, u.key, u.stored_box, u.box, u.src(), ())
                                               for _, u in tagged if u.reader == me])
    except (CheckpointError, OSError) as exc:
        err = exc
    agree_on(err, group)

    my_reads: dict[tuple[str, Box], list[Read]] = defaultdict(list)
    for r in reads:
        my_reads[(r.name, r.stored_box)].append(r)
    mine_units = [(tag, u, _dst(u, my_reads[(u.name, u.stored_box)])) for tag, u in tagged]
    # Every unit this rank reads first, all at once, with the parallel streams of a plain
    # load (straight into its own target slices); then the exchange. Reading unit by unit
    # between sends left the disk idle while the ranks waited on each other (replicated
    # 1 -> 2 of the bench state: 2.2 s against 0.9 s for a plain load).
    try:
        read_direct(folder, [Read(u.name, u.file, u.key, u.stored_box, u.box, u.src(), dst)
                             for _, u, dst in mine_units if u.reader == me], targets, headers, verify=verify)
    except (CheckpointError, OSError) as exc:  # a truncated file: every rank fails, none waits on a send
        err = exc
    agree_on(err, group)
    locals_ = {name: local_tensor(t) for name, t in targets.items()}
    by_name: dict[str, list[tuple[int, Unit, tuple[slice, ...]]]] = defaultdict(list)
    for tag, u, dst in mine_units:
        by_name[u.name].append((tag, u, dst))
    with torch.no_grad():
        for name in sorted(by_name):  # one tensor's messages in flight at a time (bounds temporaries)
            works, arrived = [], []
            for tag, u, dst in by_name[name]:
                target = locals_[name][dst]
                if u.reader == me:
                    data = target if target.is_contiguous() else target.contiguous()
                    works += [tdist.isend(data, group=group, group_dst=o, tag=tag) for o in u.owners if o != me]
                elif target.is_contiguous():
                    works.append(tdist.irecv(target, group=group, group_src=u.reader, tag=tag))
                else:
                    buf = torch.empty(u.box.shape, dtype=target.dtype, device=target.device)
                    works.append(tdist.irecv(buf, group=group, group_src=u.reader, tag=tag))
                    arrived.append((buf, target))
            for w in works:
                w.wait()  # sends keep their tensors alive until here; receives fill theirs
            for buf, target in arrived:
                target.copy_(buf)
    return my_load


def r_shape_numel(p: tuple) -> int:
    """Elements of the region of one gathered read tuple."""
    n = 1
    for s in p[6]:
        n *= s
    return n
