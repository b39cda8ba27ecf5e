"""The pure part of balanced_load: disjoint units covering every rank's needs, balanced readers."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from resumable.balanced import Unit, assign_readers, box_difference, refine
from resumable.geometry import Box


def _cells(box: Box) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(o, o + s) for o, s in zip(box.offsets, box.shape))))


@st.composite
def _regions(draw) -> tuple[Box, list[tuple[int, Box]]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    needs = []
    for rank in range(draw(st.integers(1, 4))):
        lo = [draw(st.integers(0, s - 1)) for s in shape]
        size = [draw(st.integers(1, s - o)) for o, s in zip(lo, shape)]
        needs.append((rank, Box(tuple(lo), tuple(size))))
    return Box.full(shape), needs


@settings(max_examples=200, deadline=None)
@given(_regions())
def test_units_are_disjoint_and_each_rank_gets_exactly_its_region(case) -> None:
    _, needs = case
    pieces = refine(needs)
    seen: set[tuple[int, ...]] = set()
    for box, _ in pieces:
        cells = _cells(box)
        assert not cells & seen  # disjoint: every element is read once
        seen |= cells
    for rank, region in needs:
        got = set().union(*(_cells(b) for b, owners in pieces if rank in owners))
        assert got == _cells(region)


@settings(max_examples=200, deadline=None)
@given(_regions(), _regions())
def test_box_difference_is_exactly_the_cells_outside(a, b) -> None:
    x, y = a[1][0][1], b[1][0][1]
    if x.ndim != y.ndim:
        return
    cells = [_cells(p) for p in box_difference(x, y)]
    union: set[tuple[int, ...]] = set().union(*cells)
    assert sum(map(len, cells)) == len(union)  # the pieces do not overlap
    assert union == _cells(x) - _cells(y)


def test_replicas_become_one_unit_and_readers_are_balanced_by_bytes() -> None:
    rows = [Box((i, 0), (1, 4)) for i in range(4)]
    needs = [(rank, Box((0, 0), (4, 4))) for rank in range(2)]
    assert refine(needs) == [(Box((0, 0), (4, 4)), frozenset({0, 1}))]
    units = [Unit("w", "f", "w", Box((0, 0), (4, 4)), r, (0, 1)) for r in rows]
    assigned, load = assign_readers(units, {"w": 4}, 2)
    assert [u.reader for u in assigned] == [0, 1, 0, 1]
    assert load == [32, 32]
