"""A grid (placements over a mesh) gives exactly the chunks and copies the ranks hold, found by bisection.

The reference is brute force: every mesh coordinate's boxes from ``layout.placement_chunks``
(torch's own split rules), collected; the grid must agree chunk for chunk, copy for copy,
and its ``overlapping`` must equal filtering every chunk by intersection.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from resumable.geometry import Box
from resumable.grid import Grid, Mesh, dim_table, encode_placement
from resumable.layout import placement_chunks


def _reference(shape, placements, mesh_shape, ranks):
    held: dict[Box, list[int]] = {}
    for i, coord in enumerate(itertools.product(*(range(n) for n in mesh_shape))):
        for c in placement_chunks(shape, placements, mesh_shape, coord):
            if not c.box.is_empty:
                held.setdefault(c.box, []).append(ranks[i])
    return held


@st.composite
def layouts(draw):
    kind = draw(st.sampled_from(["fsdp", "hsdp", "tp_fsdp", "shard_shard", "rowwise"]))
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape = (draw(st.integers(0, 24)), draw(st.integers(0, 9)))
    if kind == "fsdp":
        return shape, (Shard(0),), (a * b,)
    if kind == "hsdp":
        return shape, (Replicate(), Shard(0)), (a, b)
    if kind == "tp_fsdp":  # FSDP over TP on dim 0
        return shape, (_StridedShard(0, split_factor=b), Shard(0)), (a, b)
    if kind == "rowwise":
        return shape, (Shard(0), Shard(1)), (a, b)
    return shape, (Shard(0), Shard(0)), (a, b)


@settings(max_examples=150, deadline=None)
@given(layouts(), st.data())
def test_a_grid_lists_what_the_ranks_hold_and_finds_overlaps_by_bisection(layout, data):
    shape, placements, mesh_shape = layout
    n = 1
    for s in mesh_shape:
        n *= s
    ranks = tuple(data.draw(st.permutations(range(n))))
    grid = Grid(shape, Mesh(mesh_shape, ranks), tuple(encode_placement(p) for p in placements))
    held = _reference(shape, placements, mesh_shape, ranks)
    got = {box: sorted(grid.copies(fixed)) for box, fixed in grid.all_chunks() if not box.is_empty}
    assert got == {box: sorted(r) for box, r in held.items()}
    for box, fixed in grid.all_chunks():
        assert grid.copies(fixed, first_only=True) == grid.copies(fixed)[:1]
        several = grid.chunks_per_rank(fixed) > 1
        for r in grid.copies(fixed):
            coord = grid.mesh.coordinate(r)
            assert several == (len(placement_chunks(shape, placements, mesh_shape, coord)) > 1)
    lo = [data.draw(st.integers(0, max(s - 1, 0))) for s in shape]
    target = Box(tuple(lo), tuple(data.draw(st.integers(0, s - o)) for s, o in zip(shape, lo)))
    if not target.is_empty:
        want = sorted(b for b in held if b.intersect(target) is not None)
        assert sorted(b for b, _ in grid.overlapping(target)) == want


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3), st.data())
def test_an_owner_picks_exactly_one_copy_and_spreads_them_over_the_replicas(replicas, shards, owner, data):
    mesh = Mesh((replicas, shards), tuple(range(replicas * shards)))
    grid = Grid((shards * 2, 3), mesh, (("R",), ("S", 0)), owner)
    writers = []
    for box, fixed in grid.all_chunks():
        (rank,) = grid.copies(fixed)
        coordinate = mesh.coordinate(rank)
        assert coordinate[1] == fixed[1] and grid.writes(coordinate)
        assert sum(grid.writes((q, fixed[1])) for q in range(replicas)) == 1
        writers.append(coordinate[0])
    counts = [writers.count(q) for q in range(replicas)]
    assert max(counts) - min(counts) <= 1


@given(st.integers(0, 10**6), st.integers(1, 300))
def test_one_plain_shard_takes_the_arithmetic_path_with_torch_chunk_bounds(size, parts):
    from resumable.layout import dim_runs

    starts, entries, _ = dim_table(size, 0, 1, (("S", 0),), (parts,))
    expected = []
    for c in range(parts):
        expected += [(s, n, (c,)) for s, n, _ in dim_runs(size, 0, 1, (Shard(0),), (parts,), (c,)) if n]
    assert entries == sorted(expected) and starts == [e[0] for e in entries]
