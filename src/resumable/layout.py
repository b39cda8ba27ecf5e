"""Which boxes of a global tensor a rank holds, and where they sit in its local tensor.

A plain ``torch.Tensor`` is one box covering everything (replicated). A ``DTensor``'s
local shard is the Cartesian product, over tensor dims, of the global indices its
placements give this rank along that dim. With ``Shard`` those indices are one
contiguous run; with ``_StridedShard`` (FSDP over TP) they can be several runs, so
the local tensor holds several boxes.

The indices are found by following the placements' own ``_split_tensor`` rules
(``torch.chunk``'s uneven splits), one mesh dim at a time, left to right, exactly as
DTensor does, but on runs of indices rather than on the indices themselves: the cost
is the number of runs, not the size of the dim. No collective, no I/O.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from resumable.geometry import Box


@dataclass(frozen=True)
class LocalChunk:
    """A box of the global tensor and the slices where it sits in the local tensor."""

    box: Box
    local: tuple[slice, ...]


def is_dtensor(t: object) -> bool:
    return isinstance(t, DTensor)


def global_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's own data: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_dim(p: Placement, ndim: int) -> int | None:
    # _StridedShard subclasses the same C++ base as Shard; both expose .dim.
    if isinstance(p, Replicate):
        return None
    if isinstance(p, Shard) or hasattr(p, "split_factor"):
        return p.dim % ndim if ndim else 0
    raise ValueError(
        f"cannot checkpoint a DTensor with placement {p!r}: only Shard, _StridedShard and "
        "Replicate are stored (reduce Partial tensors before saving)"
    )


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of piece ``i`` of ``torch.chunk`` splitting ``n`` items into
    ``parts`` (``ceil(n / parts)`` each; the last pieces short or empty)."""
    step = -(-n // parts)
    return min(i * step, n), min((i + 1) * step, n)


def _take(runs: list[tuple[int, int]], firsts: list[int], lo: int, hi: int,
          out: list[tuple[int, int]]) -> None:
    """Append positions ``[lo, hi)`` of the index sequence ``runs`` (``(start, length)``
    runs; ``firsts[k]`` is the position of run ``k``'s first index) to ``out``, merging
    runs that touch."""
    k = bisect.bisect_right(firsts, lo) - 1
    while lo < hi:
        start, length = runs[k]
        skip = lo - firsts[k]
        take = min(length - skip, hi - lo)
        g = start + skip
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + take)
        else:
            out.append((g, take))
        lo += take
        k += 1


def dim_runs(
    size: int,
    dim: int,
    ndim: int,
    placements: Sequence[Placement],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
) -> list[tuple[int, int, int]]:
    """The global indices along tensor dim ``dim`` held at mesh ``coordinate``, as
    ``(global start, length, local start)`` runs in local order.

    Each mesh dim sharding ``dim`` splits the rank's index sequence the way its
    placement's ``_split_tensor`` splits a tensor: ``Shard`` keeps piece ``c`` of a
    ``torch.chunk`` into the mesh dim's size; ``_StridedShard(split_factor=f)`` chunks
    into ``f`` pieces, chunks each of those into the mesh dim's size and concatenates
    the ``c``-th parts. Done on runs, so O(runs + split factors), never per index.
    """
    sharded = [_shard_dim(p, ndim) == dim for p in placements]  # rejects Partial, as DTensor's rules would
    runs_: list[tuple[int, int]] = [(0, size)] if size > 0 else []
    n = size
    for mesh_dim, p in enumerate(placements):
        if not sharded[mesh_dim]:
            continue
        parts, c = int(mesh_shape[mesh_dim]), int(coordinate[mesh_dim])
        if parts <= 0:
            raise ValueError(f"mesh dim {mesh_dim} has size {parts}")
        if c < 0:
            raise ValueError(f"negative mesh coordinate {tuple(coordinate)}")
        if c >= parts:  # not a coordinate of this mesh dim: nothing held
            return []
        if hasattr(p, "split_factor"):
            factor = int(p.split_factor)
            if factor <= 0:
                raise ValueError(f"placement {p!r} has split factor {factor}")
            pieces = [(a + lo, a + hi) for a, b in (_chunk(n, factor, j) for j in range(factor))
                      for lo, hi in [_chunk(b - a, parts, c)]]
        else:
            pieces = [_chunk(n, parts, c)]
        firsts, at = [], 0
        for _, length in runs_:
            firsts.append(at)
            at += length
        taken: list[tuple[int, int]] = []
        for lo, hi in pieces:
            _take(runs_, firsts, lo, hi, taken)
        runs_, n = taken, sum(length for _, length in taken)
        if not n:
            return []
    out, local = [], 0
    for start, length in runs_:
        out.append((start, length, local))
        local += length
    return out


def dim_indices(
    size: int,
    dim: int,
    ndim: int,
    placements: Sequence[Placement],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
) -> list[int]:
    """Global indices along tensor dim ``dim`` held at mesh ``coordinate``, in local order
    (:func:`dim_runs`, expanded: O(size), for tests that index a tensor with them)."""
    return [i for start, length, _ in dim_runs(size, dim, ndim, placements, mesh_shape, coordinate)
            for i in range(start, start + length)]


def placement_chunks(
    shape: Sequence[int],
    placements: Sequence[Placement],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
) -> list[LocalChunk]:
    """The boxes a rank at ``coordinate`` holds of a tensor of ``shape`` under ``placements``."""
    ndim = len(shape)
    if ndim == 0:
        for p in placements:
            _shard_dim(p, 0)  # rejects Partial
        return [LocalChunk(Box((), ()), ())]
    per_dim: list[list[tuple[int, int, int]]] = []  # (global start, length, local start)
    for d in range(ndim):
        held = dim_runs(shape[d], d, ndim, placements, mesh_shape, coordinate)
        if not held:
            return []  # an uneven split left this rank nothing
        if any(b[0] < a[0] + a[1] for a, b in zip(held, held[1:])):
            raise ValueError(f"placements {placements} give non-increasing indices along dim {d}")
        per_dim.append(held)
    chunks = []
    for combo in itertools.product(*per_dim):
        box = Box(tuple(r[0] for r in combo), tuple(r[1] for r in combo))
        local = tuple(slice(r[2], r[2] + r[1]) for r in combo)
        chunks.append(LocalChunk(box, local))
    return chunks


def local_chunks(t: torch.Tensor) -> list[LocalChunk]:
    """The boxes of ``t``'s global tensor that this rank holds (empty if none)."""
    if not isinstance(t, DTensor):
        return [LocalChunk(Box.full(t.shape), tuple(slice(0, s) for s in t.shape))]
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the tensor's mesh
        return []
    return list(_placement_chunks_cached(global_shape(t), tuple(t.placements), tuple(mesh.shape),
                                         tuple(coordinate)))


@functools.lru_cache(maxsize=4096)
def _placement_chunks_cached(shape: tuple[int, ...], placements: tuple[Placement, ...], mesh_shape: tuple[int, ...],
                             coordinate: tuple[int, ...]) -> tuple[LocalChunk, ...]:
    """:func:`placement_chunks`, remembered: a state repeats few (shape, placements) pairs
    (every layer, and each parameter's optimizer moments), so each is worked out once."""
    return tuple(placement_chunks(shape, placements, mesh_shape, coordinate))


def is_replicated(t: torch.Tensor) -> bool:
    """True when every rank of the tensor's mesh holds all of it."""
    return not isinstance(t, DTensor) or all(isinstance(p, Replicate) for p in t.placements)
