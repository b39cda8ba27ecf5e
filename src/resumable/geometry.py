"""Geometry of sharded tensors: boxes of a global tensor, intersections, splits.

Everything on disk and in memory is described as *boxes* (chunks) of one global
tensor: element ``offsets`` and a ``shape`` inside the global shape. Saving writes
boxes; loading intersects the boxes a target rank needs with the boxes that were
saved and copies only the overlaps. This module is pure: no I/O, no
``torch.distributed``, so it can be tested exhaustively.

Uneven splits follow ``torch.chunk``: ``ceil(n / parts)`` elements per part, the
last parts smaller or empty.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True, order=True)
class Box:
    """A rectangular region ``[offsets, offsets + shape)`` of a global tensor."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.shape):
            raise ValueError(f"box rank mismatch: offsets {self.offsets} vs shape {self.shape}")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.shape):
            raise ValueError(f"box with negative offsets or shape: {self.offsets}, {self.shape}")

    @classmethod
    def full(cls, shape: Sequence[int]) -> "Box":
        return cls(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def end(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.shape))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_empty(self) -> bool:
        return self.numel == 0

    def within(self, global_shape: Sequence[int]) -> bool:
        """True when the box lies inside a tensor of ``global_shape``."""
        return len(global_shape) == self.ndim and all(
            e <= g for e, g in zip(self.end, global_shape)
        )

    def intersect(self, other: "Box") -> "Box | None":
        """The overlap of two boxes, or None when they do not overlap (or either is empty)."""
        if self.ndim != other.ndim:
            raise ValueError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.end, other.end))
        if any(h <= l for l, h in zip(lo, hi)) and self.ndim > 0:
            return None
        if self.is_empty or other.is_empty:
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def slices_in(self, outer: "Box") -> tuple[slice, ...]:
        """Slices that select this box inside a tensor holding ``outer``."""
        if self.intersect(outer) != self and not self.is_empty:
            raise ValueError(f"{self} is not inside {outer}")
        return tuple(
            slice(o - oo, o - oo + s) for o, oo, s in zip(self.offsets, outer.offsets, self.shape)
        )


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.chunk(range(n), parts)``, padded with zeros to ``parts`` entries."""
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    step = -(-n // parts) if n else 0
    sizes = []
    left = n
    for _ in range(parts):
        take = min(step, left)
        sizes.append(take)
        left -= take
    return sizes


def split_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each part of ``split_sizes(n, parts)``."""
    bounds, start = [], 0
    for size in split_sizes(n, parts):
        bounds.append((start, size))
        start += size
    return bounds


def runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Group increasing indices into contiguous ``(start, length)`` runs."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def covers_exactly(global_shape: Sequence[int], boxes: Iterable[Box]) -> str | None:
    """Check that ``boxes`` tile the global tensor with no gap and no overlap.

    Returns None when they do, else a sentence saying what is wrong: the first chunk
    (in the given order) that lies outside, else two chunks that overlap, else how many
    elements the chunks cover.

    O(n log n) in the number of chunks for the layouts sharding produces (regular grids
    over any number of dims), never per element: a checkpoint of thousands of ranks
    holds tens of thousands of chunks, and comparing every pair took minutes.
    """
    boxes = [b for b in boxes if not b.is_empty]
    whole = Box.full(global_shape)
    if boxes == [whole]:  # one chunk holding the whole tensor: nothing to compare
        return None
    for b in boxes:
        if not b.within(global_shape):
            return f"chunk at {list(b.offsets)} of shape {list(b.shape)} lies outside {list(global_shape)}"
    pair = _find_overlap(boxes, tuple(global_shape))
    if pair is not None:
        a, b = boxes[min(pair)], boxes[max(pair)]  # in the order they were given
        return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    # Disjoint boxes inside the tensor tile it exactly when their volumes add up to it.
    covered, total = sum(b.numel for b in boxes), whole.numel
    if covered != total:
        return f"chunks cover {covered} of {total} elements"
    return None


def _find_overlap(boxes: Sequence[Box], global_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """Indices of two overlapping boxes among non-empty ``boxes`` (all inside), or None.

    A dim every box spans whole cannot separate two boxes, so only the other dims are
    compared (a tensor split along rows is checked as a 1-D problem).
    """
    dims = tuple(d for d, g in enumerate(global_shape)
                 if any(b.offsets[d] != 0 or b.shape[d] != g for b in boxes))
    return _overlap_in(boxes, range(len(boxes)), dims)


def _overlap_in(boxes: Sequence[Box], ids: Iterable[int], dims: tuple[int, ...]) -> tuple[int, int] | None:
    """Two of the boxes ``ids`` that overlap when compared along ``dims`` only, or None.

    Two non-empty boxes overlap exactly when their intervals overlap along every dim.
    """
    ids = list(ids)
    if len(ids) < 2:
        return None
    if not dims:  # no dim left to separate them: every pair overlaps
        return ids[0], ids[1]
    d = dims[0]
    if len(dims) == 1:
        # Sorted by start, a box overlaps an earlier one iff it starts before the
        # furthest end seen so far.
        ids.sort(key=lambda i: boxes[i].offsets[d])
        reach, reach_id = -1, -1
        for i in ids:
            start = boxes[i].offsets[d]
            if start < reach:
                return reach_id, i
            end = start + boxes[i].shape[d]
            if end > reach:
                reach, reach_id = end, i
        return None
    if len(dims) == 2:
        return _overlap_2d(boxes, ids, d, dims[1])
    # Three dims or more: sweep along ``d``. A pair overlaps iff both are open at the
    # later one's start and their cross-sections (the other dims) overlap, so at each
    # coordinate where boxes start, the open boxes' cross-sections are checked
    # (recursively) for an overlap. Grids cost one cross-section check per grid row.
    events = sorted([(boxes[i].offsets[d], 1, i) for i in ids]
                    + [(boxes[i].offsets[d] + boxes[i].shape[d], 0, i) for i in ids])  # ends first
    open_: dict[int, None] = {}
    k = 0
    while k < len(events):
        at, started = events[k][0], False
        while k < len(events) and events[k][0] == at:
            _, kind, i = events[k]
            if kind:
                open_[i], started = None, True
            else:
                del open_[i]
            k += 1
        if started:
            pair = _overlap_in(boxes, open_, dims[1:])
            if pair is not None:
                return pair
    return None


def _overlap_2d(boxes: Sequence[Box], ids: list[int], d0: int, d1: int) -> tuple[int, int] | None:
    """:func:`_overlap_in` along two dims: sweep ``d0``, keeping the open boxes' ``d1``
    intervals sorted. They are disjoint (else we would have stopped), so a new interval
    overlaps one of them iff it overlaps its neighbour on either side: O(n log n)."""
    events = sorted([(boxes[i].offsets[d0], 1, i) for i in ids]
                    + [(boxes[i].offsets[d0] + boxes[i].shape[d0], 0, i) for i in ids])  # ends first
    starts: list[int] = []  # open intervals along d1, by start
    owners: list[int] = []  # the box of each
    for _, kind, i in events:
        start = boxes[i].offsets[d1]
        if not kind:  # the box closes: its start is unique among the open (disjoint) intervals
            at = bisect.bisect_left(starts, start)
            del starts[at], owners[at]
            continue
        end = start + boxes[i].shape[d1]
        at = bisect.bisect_right(starts, start)
        if at > 0:
            before = boxes[owners[at - 1]]
            if before.offsets[d1] + before.shape[d1] > start:
                return owners[at - 1], i
        if at < len(starts) and starts[at] < end:
            return owners[at], i
        starts.insert(at, start)
        owners.insert(at, i)
    return None


def dedupe(boxes: Iterable[Box]) -> list[Box]:
    """Distinct boxes in first-seen order (replicas of one chunk collapse)."""
    seen: dict[Box, None] = {}
    for b in boxes:
        seen.setdefault(b, None)
    return list(seen)
