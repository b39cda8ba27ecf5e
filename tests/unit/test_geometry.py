"""Boxes, splits and reshard plans: exhaustive and property-based checks (pure, no I/O)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from resumable.errors import CorruptCheckpointError
from resumable.geometry import Box, covers_exactly, dedupe, runs, split_bounds, split_sizes
from resumable.layout import placement_chunks
from resumable.planning import StoredChunk, assign_writers, plan_tensor_reads
from tests.unit.test_layout_runs import torch_dim_indices


@pytest.mark.parametrize("n", range(0, 13))
@pytest.mark.parametrize("parts", range(1, 6))
def test_split_sizes_match_torch_chunk(n, parts):
    expected = [len(c) for c in torch.arange(n).chunk(parts)] if n else []
    expected += [0] * (parts - len(expected))
    assert split_sizes(n, parts) == expected
    assert [s for _, s in split_bounds(n, parts)] == expected


def test_intersection_of_overlapping_and_disjoint_boxes():
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (4, 4))
    assert a.intersect(b) == Box((2, 3), (2, 1))
    assert a.intersect(Box((4, 0), (1, 4))) is None
    assert Box((), ()).intersect(Box((), ())) == Box((), ())
    assert Box((2, 3), (2, 1)).slices_in(a) == (slice(2, 4), slice(3, 4))


def test_covers_exactly_names_gaps_overlaps_and_escapes():
    assert covers_exactly((4,), [Box((0,), (2,)), Box((2,), (2,))]) is None
    assert covers_exactly((4,), [Box((0,), (3,)), Box((2,), (2,))]) == "chunks at [0] and [2] overlap"
    assert covers_exactly((4,), [Box((0,), (2,))]) == "chunks cover 2 of 4 elements"
    assert covers_exactly((4,), [Box((3,), (2,))]) == "chunk at [3] of shape [2] lies outside [4]"


def _covers_pairwise(global_shape, boxes):
    """The reference: every pair compared (what covers_exactly did before its sweep)."""
    boxes = [b for b in boxes if not b.is_empty]
    whole = Box.full(global_shape)
    if boxes == [whole]:
        return None
    for b in boxes:
        if not b.within(global_shape):
            return f"chunk at {list(b.offsets)} of shape {list(b.shape)} lies outside {list(global_shape)}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.intersect(b) is not None:
                return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    covered, total = sum(b.numel for b in boxes), whole.numel
    return f"chunks cover {covered} of {total} elements" if covered != total else None


def _kind(problem):
    if problem is None:
        return None
    return next(k for k in ("lies outside", "overlap", "chunks cover") if k in problem)


def _assert_like_reference(shape, boxes):
    got, want = covers_exactly(shape, boxes), _covers_pairwise(shape, boxes)
    assert _kind(got) == _kind(want), (shape, boxes, got, want)
    if _kind(want) == "overlap":  # the pair named may differ, but it must be one that overlaps
        named = got.removeprefix("chunks at ").removesuffix(" overlap").split(" and ")
        live = [b for b in boxes if not b.is_empty]
        assert any(str(list(a.offsets)) == named[0] and str(list(b.offsets)) == named[1]
                   and a.intersect(b) is not None for i, a in enumerate(live) for b in live[i + 1:])
    else:
        assert got == want
    return got


@st.composite
def grids(draw, max_ndim=3, max_cuts=4):
    """A global shape and a random grid tiling it (random cuts per dim), in random order."""
    ndim = draw(st.integers(0, max_ndim))
    shape, edges = [], []
    for _ in range(ndim):
        size = draw(st.integers(1, 9))
        cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=max_cuts)))) if size > 1 else []
        shape.append(size)
        edges.append(list(zip([0] + cuts, cuts + [size])))
    boxes = [Box(tuple(lo for lo, _ in combo), tuple(hi - lo for lo, hi in combo))
             for combo in itertools.product(*edges)]
    return tuple(shape), draw(st.permutations(boxes))


@settings(max_examples=300, deadline=None)
@given(grids())
def test_random_grids_are_accepted(grid):
    shape, boxes = grid
    assert _assert_like_reference(shape, boxes + [Box(tuple(0 for _ in shape), tuple(0 for _ in shape))]
                                  if shape else boxes) is None


@settings(max_examples=500, deadline=None)
@given(grids(), st.sampled_from(["drop", "duplicate", "shift", "grow"]), st.data())
def test_perturbed_grids_are_refused_with_the_right_kind(grid, how, data):
    shape, boxes = grid
    boxes = list(boxes)
    i = data.draw(st.integers(0, len(boxes) - 1))
    b = boxes[i]
    if how == "drop":
        del boxes[i]
        expected = "chunks cover"
    elif how == "duplicate":
        boxes.insert(data.draw(st.integers(0, len(boxes))), b)
        expected = "overlap"
    else:
        if not shape:
            return
        d = data.draw(st.integers(0, len(shape) - 1))
        step = data.draw(st.integers(1, 3))
        if how == "shift":
            boxes[i] = Box(tuple(o + step if k == d else o for k, o in enumerate(b.offsets)), b.shape)
        else:
            boxes[i] = Box(b.offsets, tuple(s + step if k == d else s for k, s in enumerate(b.shape)))
        # Inside the tensor it now overlaps a neighbour (or leaves a gap); else it sticks out.
        expected = "lies outside" if not boxes[i].within(shape) else None
    got = _assert_like_reference(shape, boxes)
    assert got is not None
    if expected:
        assert _kind(got) == expected, got


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 4).flatmap(lambda nd: st.tuples(
    st.lists(st.integers(0, 4), min_size=nd, max_size=nd),
    st.lists(st.tuples(st.lists(st.integers(0, 4), min_size=nd, max_size=nd),
                       st.lists(st.integers(0, 3), min_size=nd, max_size=nd)), max_size=7))))
def test_arbitrary_small_boxes_agree_with_pairwise_reference(case):
    shape, raw = case
    _assert_like_reference(tuple(shape), [Box(tuple(o), tuple(s)) for o, s in raw])


def test_three_dim_grids_and_bricks():
    grid = [Box((i, j, k), (1, 2, 1)) for i in range(3) for j in range(0, 4, 2) for k in range(5)]
    assert covers_exactly((3, 4, 5), grid) is None
    assert covers_exactly((3, 4, 5), grid + [Box((1, 1, 2), (1, 2, 1))]) == "chunks at [1, 0, 2] and [1, 1, 2] overlap"
    # A staggered wall: column c breaks at row c + 1, so no two columns break together.
    bricks = [b for c in range(50) for b in (Box((0, c), (c + 1, 1)), Box((c + 1, c), (50 - c, 1)))]
    assert covers_exactly((51, 50), bricks) is None
    assert _kind(covers_exactly((51, 50), bricks[:-1] + [Box((40, 49), (11, 1))])) == "overlap"


def test_large_splits_are_checked():
    n = 100_000
    rows = [Box((i * 3,), (3,)) for i in range(n)]
    assert covers_exactly((3 * n,), rows[::-1]) is None
    assert covers_exactly((3 * n,), rows[:-1]) == f"chunks cover {3 * n - 3} of {3 * n} elements"
    shifted = rows[:5000] + [Box((15001,), (3,))] + rows[5001:]
    assert covers_exactly((3 * n,), shifted) == "chunks at [15001] and [15003] overlap"
    grid = [Box((i * 7, j * 5), (7, 5)) for i in range(300) for j in range(300)]
    assert covers_exactly((2100, 1500), grid) is None
    assert covers_exactly((2100, 1500), grid + [grid[12345]]) == "chunks at [287, 225] and [287, 225] overlap"
    huge = [Box((i * 10**15, 0), (10**15, 2**40)) for i in range(8192)]  # never per element
    assert covers_exactly((8192 * 10**15, 2**40), huge) is None


def test_runs_group_contiguous_indices():
    assert runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
    assert runs([]) == []


def test_strided_shard_matches_torch_docstring_example():
    # torch's _StridedShard docstring: [8, 8] on a 2x2 (dp, tp) mesh, FSDP over TP.
    placements = [_StridedShard(0, split_factor=2), Shard(0)]
    rows = {c: placement_chunks((8, 8), placements, (2, 2), c)[0].box.offsets[0]
            for c in itertools.product(range(2), range(2))}
    assert rows == {(0, 0): 0, (0, 1): 4, (1, 0): 2, (1, 1): 6}


def test_strided_shard_can_give_a_rank_several_boxes():
    chunks = placement_chunks((10,), [_StridedShard(0, split_factor=3)], (2,), (1,))
    assert [c.box for c in chunks] == [Box((2,), (2,)), Box((6,), (2,)), Box((9,), (1,))]
    assert [c.local for c in chunks] == [(slice(0, 2),), (slice(2, 4),), (slice(4, 5),)]


# ---- property-based: any layout -> any layout reassembles exactly ----

@st.composite
def layouts(draw, ndim):
    mesh = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    placements = []
    for _ in mesh:
        kind = draw(st.sampled_from(["r", "s", "ss"] if ndim else ["r"]))
        if kind == "r":
            placements.append(Replicate())
        elif kind == "s":
            placements.append(Shard(draw(st.integers(0, ndim - 1))))
        else:
            placements.append(_StridedShard(draw(st.integers(0, ndim - 1)), split_factor=draw(st.integers(1, 3))))
    return mesh, placements


def _local(global_t, shape, placements, mesh, coord):
    """The local tensor DTensor would hold: the global tensor at this rank's indices per dim."""
    idx = [torch_dim_indices(shape[d], d, len(shape), placements, mesh, coord) for d in range(len(shape))]
    out = global_t
    for d, ix in enumerate(idx):
        out = out.index_select(d, torch.tensor(ix, dtype=torch.long))
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_layout_reshards_exactly_onto_any_other(data):
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    src_mesh, src_pl = data.draw(layouts(ndim))
    dst_mesh, dst_pl = data.draw(layouts(ndim))
    full = torch.arange(Box.full(shape).numel, dtype=torch.float64).reshape(shape)

    stored, boxes = [], []
    for coord in itertools.product(*map(range, src_mesh)):
        local = _local(full, shape, src_pl, src_mesh, coord)
        for ch in placement_chunks(shape, src_pl, src_mesh, coord):
            assert torch.equal(local[ch.local], full[ch.box.slices_in(Box.full(shape))])
            stored.append(StoredChunk(ch.box, f"file{coord}", "t"))
            boxes.append(ch.box)
    if full.numel():
        assert covers_exactly(shape, dedupe(boxes)) is None

    source = {s.box: full[s.box.slices_in(Box.full(shape))] for s in stored}
    for coord in itertools.product(*map(range, dst_mesh)):
        expected = _local(full, shape, dst_pl, dst_mesh, coord)
        got = torch.full_like(expected, -1.0)
        for r in plan_tensor_reads("t", placement_chunks(shape, dst_pl, dst_mesh, coord), stored):
            got[r.dst] = source[r.stored_box][r.src]
        assert torch.equal(got, expected)


def test_a_target_chunk_equal_to_a_stored_chunk_is_one_whole_read():
    """The same-layout fast path gives the read the general intersection would: the whole chunk."""
    target = placement_chunks((6, 4), [Shard(0)], (2,), (1,))  # rows 3..5, at rows 0..2 of the local tensor
    stored = [StoredChunk(Box((0, 0), (3, 4)), "f0", "w"), StoredChunk(Box((3, 0), (3, 4)), "f1", "w")]
    [read] = plan_tensor_reads("w", target, stored)
    assert (read.file, read.stored_box, read.region) == ("f1", Box((3, 0), (3, 4)), Box((3, 0), (3, 4)))
    assert read.src == (slice(0, 3), slice(0, 4)) and read.dst == (slice(0, 3), slice(0, 4))
    assert read.src == read.region.slices_in(read.stored_box)


def test_missing_source_chunk_is_reported_with_the_tensor_name():
    target = placement_chunks((4,), [Replicate()], (1,), (0,))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w': the checkpoint covers 2 of the 4 elements"):
        plan_tensor_reads("w", target, [StoredChunk(Box((0,), (2,)), "f", "w")])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True), min_size=1, max_size=4),
       st.lists(st.integers(1, 100), min_size=10, max_size=10))
def test_writer_assignment_stores_each_chunk_once_and_balances_bytes(held, sizes):
    holdings = {r: [(f"t{c}", Box((0,), (sizes[c],))) for c in cs] for r, cs in enumerate(held)}
    nbytes = {k: k[1].numel for ks in holdings.values() for k in ks}
    owner = assign_writers(holdings, nbytes)
    assert set(owner) == set(nbytes)
    for key, rank in owner.items():
        assert key in holdings[rank]
    # Fully replicated chunks (held by everyone) can always be balanced to within the largest.
    if all(set(h) == set(held[0]) for h in held):
        loads = [sum(nbytes[k] for k, r in owner.items() if r == rank) for rank in holdings]
        assert max(loads) - min(loads) <= max(nbytes.values())
