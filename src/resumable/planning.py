"""Plans as plain data: who writes each chunk, and which reads fill a target chunk.

Pure functions over boxes and names; the engines (save.py, load.py) execute them.
A read is (source file and key, slices in the stored chunk, slices in the local
tensor) — resharding is nothing more than this plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from resumable.errors import CorruptCheckpointError
from resumable.geometry import Box
from resumable.layout import LocalChunk

ChunkKey = tuple[str, Box]


def assign_writers(
    holdings: Mapping[int, Sequence[ChunkKey]], nbytes: Mapping[ChunkKey, int]
) -> dict[ChunkKey, int]:
    """Give every distinct chunk to exactly one of the ranks holding it, balancing bytes.

    Greedy: the largest chunks first, each to its least-loaded holder (lowest rank on
    ties), which keeps the spread between writers within the largest chunk size.
    Deterministic, so every rank can compute the same plan from the same input.
    """
    holders: dict[ChunkKey, list[int]] = {}
    for rank in sorted(holdings):
        for key in holdings[rank]:
            holders.setdefault(key, []).append(rank)
    load = {rank: 0 for rank in holdings}
    owner: dict[ChunkKey, int] = {}
    for key in sorted(holders, key=lambda k: (-nbytes[k], k[0], k[1])):
        rank = min(holders[key], key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += nbytes[key]
    return owner


@dataclass(frozen=True)
class StoredChunk:
    """A saved chunk of a tensor: its box and where its bytes are."""

    box: Box
    file: str
    key: str


@dataclass(frozen=True)
class Read:
    """Copy ``stored[src]`` into ``local[dst]`` for one tensor."""

    name: str
    file: str
    key: str
    stored_box: Box
    region: Box
    src: tuple[slice, ...]
    dst: tuple[slice, ...]

    @property
    def numel(self) -> int:
        return self.region.numel


def _shift(region: Box, chunk: LocalChunk) -> tuple[slice, ...]:
    """Slices of ``region`` in the local tensor that holds ``chunk`` at ``chunk.local``."""
    return tuple(
        slice(loc.start + r - b, loc.start + r - b + s)
        for loc, r, b, s in zip(chunk.local, region.offsets, chunk.box.offsets, region.shape)
    )


def plan_tensor_reads(name: str, targets: Iterable[LocalChunk], stored: Sequence[StoredChunk]) -> list[Read]:
    """Reads that fill every target chunk of tensor ``name`` from the stored chunks.

    ``stored`` may list replicas of a box; the first one is used. Raises
    CorruptCheckpointError when the stored chunks leave part of a target uncovered.
    """
    distinct: dict[Box, StoredChunk] = {}
    for s in stored:
        distinct.setdefault(s.box, s)
    reads = []
    for target in targets:
        if target.box.is_empty:
            continue
        exact = distinct.get(target.box)
        if exact is not None:  # the same layout: stored chunks tile, so this one alone covers it
            full = tuple(slice(0, n) for n in target.box.shape)
            reads.append(Read(name, exact.file, exact.key, target.box, target.box, full, _shift(target.box, target)))
            continue
        covered = 0
        for box, s in distinct.items():
            region = target.box.intersect(box)
            if region is None:
                continue
            covered += region.numel
            reads.append(Read(name, s.file, s.key, box, region, region.slices_in(box), _shift(region, target)))
        if covered != target.box.numel:
            raise CorruptCheckpointError(
                f"tensor {name!r}: the checkpoint covers {covered} of the {target.box.numel} elements "
                f"of the region at offsets {list(target.box.offsets)} shape {list(target.box.shape)}"
            )
    return reads
