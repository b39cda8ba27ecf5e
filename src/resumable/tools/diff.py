"""Per-tensor comparison of two checkpoints of any formats and layouts (``resumable diff``).

Both sides are opened with :func:`resumable.sources.open_source`, so names are ours
(MindFormers names mapped) and layouts do not matter: each tensor is assembled in full,
one pair at a time (memory: two copies of the largest tensor).

Example::

    rows = diff_sources(open_source("a/"), open_source("b/"))
    all(r.status == "equal" for r in rows)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from resumable.sources import Source, SourceTensor

__all__ = ["DiffRow", "diff_sources"]


@dataclass(frozen=True)
class DiffRow:
    """The comparison of one tensor: status and, when comparable, the largest absolute difference.

    ``status`` is one of ``equal``, ``different``, ``shape mismatch``, ``dtype mismatch``,
    ``missing in A``, ``missing in B``.
    """

    name: str
    status: str
    max_abs_diff: float | None = None
    detail: str = ""


def _describe(t: SourceTensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _compare(name: str, a: SourceTensor, b: SourceTensor) -> DiffRow:
    if a.shape != b.shape:
        return DiffRow(name, "shape mismatch", None, f"A {_describe(a)}, B {_describe(b)}")
    ta, tb = a.read(), b.read()
    if ta.numel() == 0:
        diff = 0.0
    else:
        diff = float((ta.double() - tb.double()).abs().max()) if not ta.dtype == tb.dtype == torch.bool \
            else float((ta != tb).any())
    if a.dtype != b.dtype:
        return DiffRow(name, "dtype mismatch", diff, f"A {_describe(a)}, B {_describe(b)}")
    same = torch.equal(ta, tb)
    return DiffRow(name, "equal" if same else "different", diff)


def diff_sources(a: Source, b: Source, *, model_only: bool = False) -> Iterator[DiffRow]:
    """Compare every tensor name of either side, in name order.

    Args:
        a, b: the two checkpoints.
        model_only: skip optimizer state (to compare with a HuggingFace export).

    Yields:
        One :class:`DiffRow` per name.
    """
    names = sorted(set(a.tensors) | set(b.tensors))
    for name in names:
        ta, tb = a.tensors.get(name), b.tensors.get(name)
        if model_only and (ta or tb).kind != "model":  # type: ignore[union-attr]
            continue
        if ta is None:
            yield DiffRow(name, "missing in A", None, _describe(tb))  # type: ignore[arg-type]
        elif tb is None:
            yield DiffRow(name, "missing in B", None, _describe(ta))
        else:
            yield _compare(name, ta, tb)
