"""Comparison of two checkpoints of any formats and layouts (``resumable diff``): tensors and training context.

Both sides are opened with :func:`resumable.sources.open_source`, so names are ours
(MindFormers names mapped) and layouts do not matter: each tensor is assembled in full,
one pair at a time (memory: two copies of the largest tensor, and their float64 difference).
The training context (:func:`context`) is what ``common.json`` records for a resume: the
counters (``global_step``, ``epoch_num`` ...), the LR schedule, the data position and the
plain values of the saved state.

Example::

    a, b = open_source("a/"), open_source("b/")
    rows = list(diff_sources(a, b, atol=1e-6))
    all(r.status in SAME for r in rows) and diff_context(a, b).same
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from resumable.sources import Source, SourceTensor

__all__ = ["SAME", "ContextDiff", "ContextRow", "DiffRow", "context", "diff_context", "diff_sources"]

#: The tensor statuses that count as the same (``diff`` exits 0).
SAME = ("equal", "within tolerance")

#: common.json entries that say how a checkpoint was stored, not where training stands: never compared
#: (``iteration`` names the folder, ``global_step`` is the training position; RNG states are per rank).
_STORAGE = ("iteration", "rank_local", "source_layout")


@dataclass(frozen=True)
class DiffRow:
    """The comparison of one tensor.

    ``status`` is one of ``equal``, ``within tolerance`` (not equal, every element within
    ``atol + rtol * |B|``), ``different``, ``shape mismatch``, ``dtype mismatch``, ``missing in A``,
    ``missing in B``. When the shapes agree, ``max_abs_diff`` is the largest absolute difference
    (NaN against NaN counts as equal, NaN against a number as infinite) and, when it is not 0,
    ``at`` the index of its first occurrence and ``values`` A's and B's values there.
    """

    name: str
    status: str
    max_abs_diff: float | None = None
    detail: str = ""
    at: tuple[int, ...] | None = None
    values: tuple[float, float] | None = None


def _describe(t: SourceTensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _gap(ta: torch.Tensor, tb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|A - B|, B)`` in float64: 0 where both are equal or both NaN, infinite where one only is NaN
    (in place where it can: three float64 copies at most)."""
    da, db = ta.double(), tb.double()
    gap = da.sub(db).abs_().nan_to_num_(nan=math.inf)
    return gap.masked_fill_((da == db) | (da.isnan() & db.isnan()), 0.0), db


def _compare(name: str, a: SourceTensor, b: SourceTensor, atol: float, rtol: float) -> DiffRow:
    if a.shape != b.shape:
        return DiffRow(name, "shape mismatch", None, f"A {_describe(a)}, B {_describe(b)}")
    ta, tb = a.read(), b.read()
    if a.dtype == b.dtype and torch.equal(ta, tb):
        return DiffRow(name, "equal", 0.0)
    gap, db = _gap(ta, tb)
    flat = int(gap.argmax()) if gap.numel() else 0
    biggest = float(gap.reshape(-1)[flat]) if gap.numel() else 0.0
    where: dict[str, Any] = {}
    if biggest:
        where = {"at": tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), gap.shape)),
                 "values": (float(ta.reshape(-1)[flat]), float(tb.reshape(-1)[flat]))}
    if a.dtype != b.dtype:
        return DiffRow(name, "dtype mismatch", biggest, f"A {_describe(a)}, B {_describe(b)}", **where)
    if not biggest:  # NaN where the other is NaN, -0.0 against 0.0
        return DiffRow(name, "equal", 0.0)
    close = bool((gap <= (db.abs().mul_(rtol).add_(atol) if rtol else atol)).all())
    return DiffRow(name, "within tolerance" if close else "different", biggest, **where)


def diff_sources(a: Source, b: Source, *, model_only: bool = False, atol: float = 0.0,
                 rtol: float = 0.0) -> Iterator[DiffRow]:
    """Compare every tensor name of either side, in name order.

    Args:
        a, b: the two checkpoints.
        model_only: skip optimizer state (to compare with a HuggingFace export).
        atol, rtol: tensors of one dtype and shape whose every element satisfies
            ``|A - B| <= atol + rtol * |B|`` are ``within tolerance`` (default 0: only equal ones pass).

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
            yield _compare(name, ta, tb, atol, rtol)


def context(source: Source) -> dict[str, Any]:
    """The training context ``source`` records, as ``{dotted key: value}``: the plain values of the saved
    state (common.json's ``state``) under the context keys common.json holds at its top level
    (``global_step``, ``epoch_num``, ``lr_schedule``, ``data``, ``mindspore`` ...); empty for a source
    that records none (a HuggingFace folder)."""
    common = source.common
    merged = {**(common.get("state") or {}), **{k: v for k, v in common.items() if k not in (*_STORAGE, "state")}}
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):  # an empty dict (the state's emptied "model" namespace) holds no value
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value
    walk("", merged)
    return flat


@dataclass(frozen=True)
class ContextRow:
    """One context key that differs: ``status`` ``different``, ``missing in A`` or ``missing in B``
    (the missing side's value is None)."""

    key: str
    status: str
    a: Any
    b: Any


@dataclass(frozen=True)
class ContextDiff:
    """The training contexts compared: ``keys`` of either side, the ``rows`` that differ, and ``missing``
    ("A" or "B") when one side records no training context at all (then no key is compared)."""

    keys: int
    rows: list[ContextRow]
    missing: str | None = None

    @property
    def same(self) -> bool:
        return not self.rows and self.missing is None


def _same(x: Any, y: Any) -> bool:
    # JSON text equality too: NaN equals NaN, as it reads back from common.json.
    return bool(x == y) or json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def diff_context(a: Source, b: Source) -> ContextDiff:
    """Compare the training contexts of ``a`` and ``b`` (:func:`context`), key by key."""
    ca, cb = context(a), context(b)
    keys = sorted(set(ca) | set(cb))
    if bool(ca) != bool(cb):
        return ContextDiff(len(keys), [], "B" if ca else "A")
    rows = [ContextRow(k, "missing in A", None, cb[k]) if k not in ca else
            ContextRow(k, "missing in B", ca[k], None) if k not in cb else ContextRow(k, "different", ca[k], cb[k])
            for k in keys if k not in ca or k not in cb or not _same(ca[k], cb[k])]
    return ContextDiff(len(keys), rows)
