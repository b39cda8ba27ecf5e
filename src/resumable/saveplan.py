"""Save planning as plain data: what a rank holds, the coordinator's merge, each rank's files.

A rank describes its holdings as a :class:`RankSpec`: per tensor its name, kind, dtype,
global shape and, for a DTensor, its placements over a mesh (the mesh as the group ranks
at each position). Ranks of one FSDP group, or of one pipeline stage, have *equal* specs:
only their coordinates differ, and those follow from the mesh and the rank. So the
coordinator needs one spec per distinct digest, not one per rank, and it describes each
tensor once (:class:`resumable.grid.Grid`) instead of once per chunk: planning costs
O(distinct specs × tensors + world size) on the coordinator and O(own chunks) elsewhere.

* :func:`describe` (every rank): the spec and views of the local chunks.
* :func:`merge` (the coordinator): the metadata of the whole save and one
  :class:`Reply` per rank, from the distinct specs and the ranks holding each.
* :func:`rank_files` (every rank): this rank's files and what goes into each.

Pure: no I/O, no collectives (``resumable.save`` runs the collectives around them).
"""

from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import xxhash

from resumable.errors import SaveError
from resumable.formats import v2
from resumable.formats.safetensors_io import dtype_name
from resumable.geometry import Box
from resumable.grid import Encoded, Grid, Mesh, decode_placements, encode_placement
from resumable.layout import LocalChunk, local_chunks, local_tensor, placement_chunks
from resumable.planning import assign_writers


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a rank holds. ``mesh`` indexes ``RankSpec.meshes``; None: a plain (replicated) tensor."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    mesh: int | None = None
    placements: tuple[Encoded, ...] = ()


@dataclass(frozen=True)
class RankSpec:
    """Everything about a rank's holdings that does not depend on its coordinate."""

    tensors: tuple[TensorSpec, ...]
    meshes: tuple[Mesh, ...]

    @functools.cached_property
    def digest(self) -> str:
        """xxh3-128 of the spec: equal specs, equal digests (the plan cache and the merge key)."""
        doc = [[t.name, t.kind, t.dtype, t.shape, t.mesh, t.placements] for t in self.tensors]
        meshes = [[m.shape, m.ranks] for m in self.meshes]
        return xxhash.xxh3_128_hexdigest(json.dumps([doc, meshes], separators=(",", ":")).encode())


@dataclass
class Reply:
    """The coordinator's answer to one rank of a first save (empty without ``remove_redundancy``).

    Tensors are named by their index in the rank's ``RankSpec.tensors`` (names would make
    the reply as large as the spec): ``owners``: grid tensor → owner offset when not 0
    (see :class:`resumable.grid.Grid`); ``holders``: plain tensor → the mesh of the ranks
    holding it; ``listed``: irregular tensor (by name) → the offsets of the chunks this
    rank writes.
    """

    owners: dict[int, int] = field(default_factory=dict)
    holders: dict[int, Mesh] = field(default_factory=dict)
    listed: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- describe


def _group_ranks(mesh: Any, to_group: Any) -> tuple[int, ...]:
    return tuple(to_group(int(r)) for r in mesh.mesh.flatten().tolist())


def describe(tensors: Mapping[str, Any], to_group: Any) -> tuple[RankSpec, dict[tuple[str, Box], torch.Tensor]]:
    """This rank's spec and a view of each local chunk (keyed by name and box).

    Args:
        tensors: flattened tensor leaves (``name → leaf`` with ``.kind`` and ``.value``), sorted or not.
        to_group: maps a global rank to its rank in the saving group.
    """
    from torch.distributed.tensor import DTensor

    meshes: dict[Any, int] = {}
    mesh_specs: list[Mesh] = []
    specs: list[TensorSpec] = []
    views: dict[tuple[str, Box], torch.Tensor] = {}
    for name in sorted(tensors):
        leaf = tensors[name]
        value = leaf.value
        dtype_name(value.dtype)  # fail now, on this rank, for a dtype safetensors cannot hold
        dtype = str(value.dtype).removeprefix("torch.")
        shape = tuple(int(s) for s in value.shape)
        if isinstance(value, DTensor):
            dm = value.device_mesh
            index = meshes.get(id(dm))
            if index is None:
                index = meshes[id(dm)] = len(mesh_specs)
                mesh_specs.append(Mesh(tuple(int(s) for s in dm.shape), _group_ranks(dm, to_group)))
            spec = TensorSpec(name, leaf.kind, dtype, shape, index,
                              tuple(encode_placement(p) for p in value.placements))
        else:
            spec = TensorSpec(name, leaf.kind, dtype, shape)
        specs.append(spec)
        local = local_tensor(value)
        chunk: LocalChunk
        for chunk in local_chunks(value):
            views[(name, chunk.box)] = local[chunk.local]
    # Meshes are numbered in order of first use; equal meshes built twice collapse.
    unique: dict[Mesh, int] = {}
    renumber = [unique.setdefault(m, len(unique)) for m in mesh_specs]
    specs = [t if t.mesh is None else TensorSpec(t.name, t.kind, t.dtype, t.shape, renumber[t.mesh], t.placements)
             for t in specs]
    return RankSpec(tuple(specs), tuple(unique)), views


def rank_boxes(spec: RankSpec, t: TensorSpec, rank: int) -> list[Box]:
    """The boxes ``rank`` holds of ``t`` (a plain tensor: all of it)."""
    if t.mesh is None:
        return [Box.full(t.shape)]
    mesh = spec.meshes[t.mesh]
    coordinate = mesh.coordinate(rank)
    if coordinate is None:
        return []
    return [c.box for c in _chunks(t.shape, t.placements, mesh.shape, coordinate)]


@functools.lru_cache(maxsize=4096)
def _chunks(shape: tuple[int, ...], placements: tuple[Encoded, ...], mesh_shape: tuple[int, ...],
            coordinate: tuple[int, ...]) -> tuple[LocalChunk, ...]:
    return tuple(placement_chunks(shape, decode_placements(placements), mesh_shape, coordinate))


# -------------------------------------------------------------------------------- merge


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def merge(groups: Sequence[tuple[RankSpec, Sequence[int]]], *, world: int, iteration: int, prefix: str,
          save_optimizer: bool, remove_redundancy: bool, layout: v2.LayoutMeta,
          ) -> tuple[v2.Metadata, dict[int, Reply]]:
    """The coordinator's plan: metadata of the whole save, and each rank's :class:`Reply`.

    Args:
        groups: each distinct spec with the (group) ranks holding exactly it.
        world: size of the saving group; every rank writes one file per kind
            (``index`` = its rank, ``count`` = ``world``), possibly empty.

    Returns:
        The metadata (file sizes and checksums still zero) and the replies of the ranks
        that need one (every rank with ``remove_redundancy``; none without).

    Raises:
        SaveError: two ranks hold one name with different dtypes, shapes or kinds.
    """
    seen: dict[str, list[tuple[int, TensorSpec]]] = {}
    for g, (spec, ranks) in enumerate(groups):
        for t in spec.tensors:
            seen.setdefault(t.name, []).append((g, t))
    meta = v2.Metadata(iteration=iteration, layout=layout, save_optimizer=save_optimizer)
    kinds = ("model", "opt") if save_optimizer else ("model",)
    for kind in kinds:
        for r in range(world):
            meta.files[v2.file_name(prefix, kind, r, world)] = v2.FileMeta(0, "0" * 16, kind, r)
    replies: dict[int, Reply] = {}
    group_replies = [Reply() for _ in groups]
    index = [{t.name: i for i, t in enumerate(spec.tensors)} for spec, _ in groups]
    balance = _Balance()
    holder_meshes: dict[tuple[int, ...], Mesh] = {}
    irregular: list[tuple[str, list[tuple[int, TensorSpec]]]] = []
    for name in sorted(seen):
        entries = seen[name]
        g0, first = entries[0]
        for g, t in entries[1:]:
            if (t.kind, t.dtype, t.shape) != (first.kind, first.dtype, first.shape):
                raise SaveError(
                    f"saving iteration {iteration}: tensor {name!r} is {first.dtype} {list(first.shape)} on rank "
                    f"{groups[g0][1][0]} but {t.dtype} {list(t.shape)} on rank {groups[g][1][0]}; every rank must "
                    "hold pieces of the same global tensor under one name")
        meshes = {None if t.mesh is None else groups[g][0].meshes[t.mesh] for g, t in entries}
        placements = {t.placements for _, t in entries}
        if len(meshes) == 1 and len(placements) == 1 and None not in meshes:
            grid = Grid(first.shape, meshes.pop(), first.placements)
        elif meshes == {None}:
            key = tuple(g for g, _ in entries)  # plain tensors held by the same groups share one mesh
            mesh = holder_meshes.get(key)
            if mesh is None:
                holders = sorted(r for g in key for r in groups[g][1])
                mesh = holder_meshes[key] = Mesh((len(holders),), tuple(holders))
            grid = Grid(first.shape, mesh, (("R",),))
            for g, _ in entries:
                group_replies[g].holders[index[g][name]] = grid.mesh
        else:
            irregular.append((name, entries))
            continue
        if remove_redundancy:
            grid = Grid(grid.shape, grid.mesh, grid.placements,
                        balance.owner(grid, _itemsize(first.dtype)))
            if grid.owner:
                for g, _ in entries:
                    group_replies[g].owners[index[g][name]] = grid.owner
        meta.tensors[name] = v2.TensorMeta(first.dtype, list(first.shape), first.kind, [], grid)
    for g, (_, ranks) in enumerate(groups):
        for r in ranks:
            replies[r] = group_replies[g]
    if irregular:
        _list_irregular(meta, groups, irregular, replies, prefix=prefix, world=world,
                        remove_redundancy=remove_redundancy)
    meta.tensors = dict(sorted(meta.tensors.items()))
    return meta, (replies if remove_redundancy else {})


class _Balance:
    """Owner offsets that spread single-copy chunks over the replicas, largest tensors first."""

    def __init__(self) -> None:
        self._loads: dict[tuple[Mesh, tuple[int, ...]], list[tuple[int, int]]] = {}

    def owner(self, grid: Grid, itemsize: int) -> int:
        replicas = 1
        for m in grid.replicate_dims:
            replicas *= grid.mesh.shape[m]
        shards = len(grid.mesh.ranks) // replicas
        if replicas == 1 or shards % replicas == 0:
            return 0  # every replica writes shards / replicas chunks whatever the offset
        # Few chunks for many replicas (a norm held by every rank): give them to the least loaded.
        heap = self._loads.setdefault((grid.mesh, grid.replicate_dims), [(0, q) for q in range(replicas)])
        nbytes = itemsize
        for s in grid.shape:
            nbytes *= s
        load, q = heapq.heappop(heap)
        heapq.heappush(heap, (load + nbytes, q))
        return q


def _list_irregular(meta: v2.Metadata, groups: Sequence[tuple[RankSpec, Sequence[int]]],
                    irregular: list[tuple[str, list[tuple[int, TensorSpec]]]], replies: dict[int, Reply], *,
                    prefix: str, world: int, remove_redundancy: bool) -> None:
    """Tensors held under different meshes or placements by different ranks: every chunk listed."""
    held: dict[int, list[tuple[str, Box]]] = {}
    info: dict[str, TensorSpec] = {}
    for name, entries in irregular:
        for g, t in entries:
            info[name] = t
            spec, ranks = groups[g]
            for r in ranks:
                held.setdefault(r, []).extend((name, b) for b in rank_boxes(spec, t, r) if not b.is_empty)
    if remove_redundancy:
        nbytes = {ck: ck[1].numel * _itemsize(info[ck[0]].dtype) for cks in held.values() for ck in cks}
        owner = assign_writers(held, nbytes)
        written = {r: [ck for ck in cks if owner[ck] == r] for r, cks in held.items()}
        for r, cks in written.items():
            reply = replies.setdefault(r, Reply())
            replies[r] = reply = Reply(reply.owners, reply.holders, dict(reply.listed))
            for name, box in cks:
                reply.listed.setdefault(name, []).append(box.offsets)
    else:
        written = held
    chunks: dict[str, dict[Box, v2.ChunkMeta]] = {name: {} for name, _ in irregular}
    for r in sorted(written):
        per_name: dict[str, int] = {}
        for name, _ in written[r]:
            per_name[name] = per_name.get(name, 0) + 1
        for name, box in written[r]:
            t = info[name]
            chunk = chunks[name].get(box)
            if chunk is None:
                chunk = chunks[name][box] = v2.ChunkMeta(list(box.offsets), list(box.shape), [])
            chunk.stored.append(v2.Stored(v2.file_name(prefix, t.kind, r, world),
                                          v2.chunk_key(name, box.offsets, per_name[name] > 1)))
    for name, _ in irregular:
        t = info[name]
        listed = sorted(chunks[name].values(), key=lambda c: c.offsets)
        meta.tensors[name] = v2.TensorMeta(t.dtype, list(t.shape), t.kind, listed)


# --------------------------------------------------------------------------- rank files


def rank_files(spec: RankSpec, me: int, world: int, reply: Reply | None, *, prefix: str,
               save_optimizer: bool, remove_redundancy: bool) -> dict[str, tuple[str, list[tuple[str, str, Box]]]]:
    """This rank's files: name → (kind, [(tensor name, key in the file, box)]), in key order.

    Every rank writes one file per kind, so a rank needs no other rank's spec; with
    ``remove_redundancy`` the coordinator's ``reply`` says which copies are this rank's.
    """
    files: dict[str, tuple[str, list[tuple[str, str, Box]]]] = {}
    kinds = ("model", "opt") if save_optimizer else ("model",)
    for kind in kinds:
        files[v2.file_name(prefix, kind, me, world)] = (kind, [])
    for i, t in enumerate(spec.tensors):
        if t.kind not in kinds:
            continue
        boxes = [b for b in rank_boxes(spec, t, me) if not b.is_empty]
        if remove_redundancy:
            boxes = _mine(spec, i, me, boxes, reply or Reply())
        several = len(boxes) > 1
        items = files[v2.file_name(prefix, t.kind, me, world)][1]
        items.extend((t.name, v2.chunk_key(t.name, b.offsets, several), b) for b in boxes)
    for _, items in files.values():
        items.sort(key=lambda it: it[1])
    return files


def _mine(spec: RankSpec, i: int, me: int, boxes: list[Box], reply: Reply) -> list[Box]:
    """The boxes of tensor ``i`` of ``spec`` this rank writes under ``remove_redundancy``."""
    t = spec.tensors[i]
    if t.name in reply.listed:
        offsets = set(reply.listed[t.name])
        return [b for b in boxes if b.offsets in offsets]
    if i in reply.holders:
        mesh, placements = reply.holders[i], (("R",),)
    elif t.mesh is not None:
        mesh, placements = spec.meshes[t.mesh], t.placements
    else:
        raise SaveError(f"saving: the coordinator's plan does not cover tensor {t.name!r}; the ranks' states "
                        "changed between planning steps")
    coordinate = mesh.coordinate(me)
    grid = Grid(t.shape, mesh, placements, reply.owners.get(i, 0))
    return boxes if coordinate is not None and grid.writes(coordinate) else []
