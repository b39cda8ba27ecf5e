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

    Returns None when they do, else a sentence saying what is wrong.
    """
    boxes = [b for b in boxes if not b.is_empty]
    whole = Box.full(global_shape)
    if boxes == [whole]:  # one chunk holding the whole tensor: nothing to compare
        return None
    total = whole.numel
    for b in boxes:
        if not b.within(global_shape):
            return f"chunk at {list(b.offsets)} of shape {list(b.shape)} lies outside {list(global_shape)}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.intersect(b) is not None:
                return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    covered = sum(b.numel for b in boxes)
    if covered != total:
        return f"chunks cover {covered} of {total} elements"
    return None


def dedupe(boxes: Iterable[Box]) -> list[Box]:
    """Distinct boxes in first-seen order (replicas of one chunk collapse)."""
    seen: dict[Box, None] = {}
    for b in boxes:
        seen.setdefault(b, None)
    return list(seen)
