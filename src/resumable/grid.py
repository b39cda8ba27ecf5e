"""A tensor's stored chunks described by its placements over a mesh: the compact metadata form.

Every chunk ``resumable.save`` writes comes from a DTensor's placements over its device
mesh (a plain tensor is ``Replicate`` over the ranks holding it), so instead of listing
one chunk per rank, ``metadata.json`` records the mesh (its shape and the ranks at each
position) and the placements once per tensor. This module turns that description back
into chunks, without ever enumerating more than a question needs:

* along each tensor dim, the stored runs form a partition of ``[0, size)``: one run per
  combination of the coordinates of the mesh dims that shard that dim (computed once per
  distinct ``(size, placements, mesh shape)``, with :func:`resumable.layout.dim_runs`);
* the stored chunks are the products of those runs (a grid); the chunks a target box
  overlaps are found per dim by bisection: O(log runs + overlaps);
* the copies of a chunk are the mesh positions that agree on the sharding dims and vary
  over the ``Replicate`` dims; with ``owner`` set (``remove_redundancy``) exactly one
  copy was written: replica ``(owner + s) % R``, ``s`` the chunk's linear index over the
  sharding dims, ``R`` the number of replicas.

Placements are encoded as JSON lists: ``["S", dim]``, ``["SS", dim, split_factor]``
(``_StridedShard``, FSDP over TP), ``["R"]``. Pure: no I/O, no ``torch.distributed``.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

from resumable.geometry import Box

Encoded = tuple  # ("S", dim) | ("SS", dim, split_factor) | ("R",)


def encode_placement(p: object) -> Encoded:
    """A torch placement as its JSON form (Partial and others are refused)."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    if hasattr(p, "split_factor"):
        return ("SS", int(p.dim), int(p.split_factor))  # type: ignore[attr-defined]
    if isinstance(p, Shard):
        return ("S", int(p.dim))
    if isinstance(p, Replicate):
        return ("R",)
    raise ValueError(f"cannot checkpoint a DTensor with placement {p!r}: only Shard, _StridedShard and "
                     "Replicate are stored (reduce Partial tensors before saving)")


@functools.lru_cache(maxsize=None)
def decode_placements(encoded: tuple[Encoded, ...]) -> tuple:
    """The torch placements of an encoded tuple."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    out = []
    for e in encoded:
        if e[0] == "S":
            out.append(Shard(e[1]))
        elif e[0] == "SS":
            out.append(_StridedShard(e[1], split_factor=e[2]))
        else:
            out.append(Replicate())
    return tuple(out)


def check_placements(encoded: object, ndim: int, mesh_ndim: int) -> str | None:
    """None when ``encoded`` is a valid placement list for a tensor of ``ndim`` dims, else why not."""
    if not isinstance(encoded, (list, tuple)) or len(encoded) != mesh_ndim:
        return f"placements {encoded!r} must be a list of {mesh_ndim} entries (one per mesh dim)"
    for e in encoded:
        ok = isinstance(e, (list, tuple)) and len(e) >= 1 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in e[1:])
        if ok and e[0] == "R":
            ok = len(e) == 1
        elif ok and e[0] == "S":
            ok = len(e) == 2 and 0 <= e[1] < ndim
        elif ok and e[0] == "SS":
            ok = len(e) == 3 and 0 <= e[1] < ndim and 1 <= e[2] <= 1 << 20
        else:
            ok = False
        if not ok:
            return f"placement {e!r} is not [\"R\"], [\"S\", dim] or [\"SS\", dim, split_factor] for {ndim} dims"
    return None


@dataclass(frozen=True)
class Mesh:
    """A device mesh as positions of the saving group: ``ranks[i]`` sits at row-major position ``i``."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    def __hash__(self) -> int:
        # Remembered: planning hashes a mesh of W ranks once per tensor (O(W) each time otherwise).
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.shape, self.ranks))
        return h

    @functools.cached_property
    def _position(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.ranks)}

    def coordinate(self, rank: int) -> tuple[int, ...] | None:
        """``rank``'s coordinate in the mesh, or None when it is not part of it."""
        i = self._position.get(rank)
        if i is None:
            return None
        coord = []
        for size in reversed(self.shape):
            coord.append(i % size)
            i //= size
        return tuple(reversed(coord))

    def rank_at(self, coordinate: Sequence[int]) -> int:
        i = 0
        for c, size in zip(coordinate, self.shape):
            i = i * size + c
        return self.ranks[i]

    def as_range(self) -> tuple[int, int, int] | None:
        """``(start, stop, step)`` when the ranks step evenly upwards (then stored and sent as that)."""
        r = self.ranks
        step = r[1] - r[0] if len(r) > 1 else 1
        if r and step > 0 and all(b - a == step for a, b in zip(r, r[1:])):
            return r[0], r[0] + step * len(r), step
        return None

    def __reduce__(self) -> tuple:
        # Sent to every rank of a first save with remove_redundancy: a range pickles in O(1).
        span = self.as_range()
        return (_ranged, (self.shape, *span)) if span else (Mesh, (self.shape, self.ranks))

    def to_json(self) -> dict:
        span = self.as_range()
        if span:
            return {"shape": list(self.shape), "ranks_range": list(span)}
        return {"shape": list(self.shape), "ranks": list(self.ranks)}


def _ranged(shape: tuple[int, ...], start: int, stop: int, step: int) -> Mesh:
    return Mesh(shape, tuple(range(start, stop, step)))


def _sharding_dims(encoded: tuple[Encoded, ...], dim: int) -> tuple[int, ...]:
    return tuple(m for m, e in enumerate(encoded) if e[0] != "R" and e[1] == dim)


@functools.lru_cache(maxsize=4096)
def dim_table(size: int, dim: int, ndim: int, encoded: tuple[Encoded, ...], mesh_shape: tuple[int, ...]
              ) -> tuple[list[int], list[tuple[int, int, tuple[int, ...]]], dict[tuple[int, ...], int]]:
    """The stored runs along tensor dim ``dim``: sorted starts, ``(start, length, combo)`` and runs per combo.

    ``combo`` holds the coordinates of the mesh dims sharding ``dim`` (in mesh-dim order).
    One entry per run of every combo: O(product of those mesh dims' sizes), once per key.

    Raises:
        ValueError: the runs do not partition ``[0, size)`` (placements that make no sense).
    """
    from resumable.geometry import split_bounds
    from resumable.layout import dim_runs

    placements = decode_placements(encoded)
    shard = _sharding_dims(encoded, dim)
    entries: list[tuple[int, int, tuple[int, ...]]] = []
    per_combo: dict[tuple[int, ...], int] = {}
    if len(shard) == 1 and encoded[shard[0]][0] == "S":
        # One plain Shard: torch.chunk's bounds, one run per coordinate (FSDP's common case, W entries).
        bounds = split_bounds(size, mesh_shape[shard[0]])
        per_combo = {(c,): 1 for c in range(len(bounds))}
        entries = [(start, length, (c,)) for c, (start, length) in enumerate(bounds) if length]
        return [e[0] for e in entries], entries, per_combo
    coordinate = [0] * len(mesh_shape)
    for combo in itertools.product(*(range(mesh_shape[m]) for m in shard)):
        for m, c in zip(shard, combo):
            coordinate[m] = c
        found = dim_runs(size, dim, ndim, placements, mesh_shape, coordinate)
        per_combo[combo] = len(found)
        entries.extend((start, length, combo) for start, length, _ in found if length)
    entries.sort()
    at = 0
    for start, length, _ in entries:
        if start != at:
            raise ValueError(f"placements {list(encoded)} over mesh {list(mesh_shape)} do not partition "
                             f"dim {dim} of size {size}")
        at += length
    if at != size:
        raise ValueError(f"placements {list(encoded)} over mesh {list(mesh_shape)} cover {at} of {size} "
                         f"indices of dim {dim}")
    return [e[0] for e in entries], entries, per_combo


@dataclass(frozen=True)
class Grid:
    """The chunks of one tensor of ``shape``, stored by the ranks of ``mesh`` under ``placements``."""

    shape: tuple[int, ...]
    mesh: Mesh
    placements: tuple[Encoded, ...]
    owner: int | None = None  # None: every replica stored its copy; k: replica (k + s) % R did

    def _tables(self) -> list:
        return [dim_table(self.shape[d], d, len(self.shape), self.placements, self.mesh.shape)
                for d in range(len(self.shape))]

    def check(self) -> None:
        """Raise ValueError unless the runs along every dim partition it (once per distinct dim key)."""
        self._tables()

    def chunk_count(self) -> int:
        """Number of distinct chunks, without enumerating them."""
        n = 1
        for _, entries, _ in self._tables():
            n *= len(entries)
        return n

    @property
    def replicate_dims(self) -> tuple[int, ...]:
        return tuple(m for m, e in enumerate(self.placements) if e[0] == "R")

    @property
    def shard_dims(self) -> tuple[int, ...]:
        return tuple(m for m, e in enumerate(self.placements) if e[0] != "R")

    def copies(self, fixed: dict[int, int], first_only: bool = False) -> list[int]:
        """The ranks storing the chunk whose sharding-dim coordinates are ``fixed`` (mesh dim → coordinate).

        ``first_only``: just the copy a reader uses (the owner, else the first replica):
        O(mesh dims), where listing every copy of a tensor replicated on W ranks is O(W).
        """
        free = self.replicate_dims
        coordinate = [fixed.get(m, 0) for m in range(len(self.mesh.shape))]
        if self.owner is None and first_only:
            return [self.mesh.rank_at(coordinate)]
        if self.owner is not None:
            s = 0
            for m in self.shard_dims:
                s = s * self.mesh.shape[m] + fixed.get(m, 0)
            q = self.owner + s
            for m in reversed(free):  # the replica number q, row-major over the replicate dims
                q, coordinate[m] = divmod(q, self.mesh.shape[m])
            return [self.mesh.rank_at(coordinate)]
        replicas = []
        for combo in itertools.product(*(range(self.mesh.shape[m]) for m in free)):
            for m, c in zip(free, combo):
                coordinate[m] = c
            replicas.append(self.mesh.rank_at(coordinate))
        return replicas

    def writes(self, coordinate: Sequence[int]) -> bool:
        """True when the rank at ``coordinate`` wrote its chunks (always, unless ``owner`` is set)."""
        if self.owner is None:
            return True
        fixed = {m: coordinate[m] for m in self.shard_dims}
        return self.copies(fixed) == [self.mesh.rank_at(coordinate)]

    def chunks_per_rank(self, fixed: dict[int, int]) -> int:
        """How many chunks each copy-holder of a chunk with sharding coordinates ``fixed`` holds."""
        n = 1
        for d, (_, _, per_combo) in enumerate(self._tables()):
            n *= per_combo[tuple(fixed[m] for m in _sharding_dims(self.placements, d))]
        return n

    def overlapping(self, box: Box) -> Iterator[tuple[Box, dict[int, int]]]:
        """Stored chunks overlapping ``box``, each with its sharding-dim coordinates (mesh dim → coordinate)."""
        if not self.shape:
            yield Box((), ()), {}
            return
        per_dim = []
        for d, (starts, entries, _) in enumerate(self._tables()):
            lo, hi = box.offsets[d], box.offsets[d] + box.shape[d]
            i = max(bisect.bisect_right(starts, lo) - 1, 0)
            hits = []
            while i < len(entries) and entries[i][0] < hi:
                start, length, combo = entries[i]
                if start + length > lo:
                    hits.append((start, length, d, combo))
                i += 1
            per_dim.append(hits)
        yield from self._cells(per_dim)

    def all_chunks(self) -> Iterator[tuple[Box, dict[int, int]]]:
        """Every stored chunk (O(chunks): for tools and small checkpoints, not for planning)."""
        if not self.shape:
            yield Box((), ()), {}
            return
        yield from self._cells([[(s, n, d, c) for s, n, c in entries]
                                for d, (_, entries, _) in enumerate(self._tables())])

    def _cells(self, per_dim: list) -> Iterator[tuple[Box, dict[int, int]]]:
        shard_of = [_sharding_dims(self.placements, d) for d in range(len(self.shape))]
        for combo in itertools.product(*per_dim):
            fixed: dict[int, int] = {}
            for _, _, d, c in combo:
                fixed.update(zip(shard_of[d], c))
            yield Box(tuple(c[0] for c in combo), tuple(c[1] for c in combo)), fixed
