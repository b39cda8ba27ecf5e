"""Small checkers for the values read from a checkpoint's JSON: type and range, with the file and key named.

Every value a parser takes from JSON goes through one of these before use, so that a
damaged or forged file gives a ``CorruptCheckpointError`` saying which file, which key,
what was found and what was expected, never a ``TypeError`` / ``OverflowError`` from
deeper code or a wrong value trained on silently. ``True`` is not an integer here, nor
``1.0``, nor ``1e400`` (JSON's infinity).

Example::

    step = need_int(common, "global_step", "ckpt/iteration_00000100/common.json")
    scale = need_number(common, "loss_scale", path, default=None)
"""

from __future__ import annotations

from collections.abc import Sequence

import math
from typing import Any, Mapping

from resumable.errors import CorruptCheckpointError
from resumable.formats.jsonfile import RESTORE

__all__ = ["MAX_DIM", "MAX_NDIM", "REQUIRED", "RESTORE", "is_int", "listed", "need_int", "need_int_list", "need_number", "need_type", "shown"]

MAX_NDIM = 64
"""Most dims of a tensor shape read from a file (a shape is multiplied out: a forged million-dim
shape of large numbers would cost quadratic time)."""
MAX_DIM = (1 << 63) - 1
"""Largest size of one dim (torch's int64)."""

REQUIRED: Any = object()
"""``default`` of a key that must be present."""

_SHOWN = 80


def shown(value: object) -> str:
    """``repr(value)``, cut short: a forged value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"... ({len(text)} characters)"


NAMES_SHOWN = 5
"""Names a message lists before it summarises the rest (:func:`listed`)."""


def listed(names: Sequence[str], see: str) -> str:
    """``names`` joined; past :data:`NAMES_SHOWN` of them, the first ones, the count and where to see
    them all (``see``, e.g. ``"the checkpoint's tensors: resumable inspect ckpt/"``).

    Example::

        listed([f"t{i}" for i in range(141)], "resumable inspect ckpt/")
        # "t0, t1, t2, t3, t4, ... (141 in all; resumable inspect ckpt/)"
    """
    if len(names) <= NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:NAMES_SHOWN])}, ... ({len(names)} in all; {see})"


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON ``true`` parses as ``True``, an int subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(where: str, key: str, rule: str, value: object, fix: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: {key!r} must be {rule}, got {shown(value)}; {fix}")


def _get(doc: Mapping[str, Any], key: str, where: str, default: Any, label: str | None, fix: str) -> tuple[Any, bool]:
    """``(value, present)``; a missing required key is an error."""
    if not isinstance(doc, Mapping):
        raise CorruptCheckpointError(f"{where}: expected an object holding {label or key!r}, got {shown(doc)}; {fix}")
    if key in doc:
        return doc[key], True
    if default is REQUIRED:
        raise CorruptCheckpointError(f"{where}: {label or key!r} is missing; {fix}")
    return default, False


def _range(minimum: int | None, maximum: int | None) -> str:
    """`` >= 0``, `` in [1, 8]``, ...: the range phrase of a message."""
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def _in_range(value: int, minimum: int | None, maximum: int | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def need_int(doc: Mapping[str, Any], key: str, where: str, *, minimum: int | None = 0, maximum: int | None = None,
             default: Any = REQUIRED, label: str | None = None, fix: str = RESTORE) -> Any:
    """``doc[key]`` as an int in ``[minimum, maximum]`` (not a bool, not a float).

    Args:
        doc: the JSON object holding the key.
        key: the key.
        where: the file (``path`` or ``path: context``), for the message.
        minimum, maximum: the allowed range (None: unbounded).
        default: returned when the key is absent (it is not checked); :data:`REQUIRED` by default.
        label: the key as the message shows it (``layout.world_size``); ``key`` by default.
        fix: what the user should do, appended to the message.

    Raises:
        CorruptCheckpointError: missing (when required), wrong type or out of range.
    """
    value, present = _get(doc, key, where, default, label, fix)
    if present and not (is_int(value) and _in_range(value, minimum, maximum)):
        raise _bad(where, label or key, "an integer" + _range(minimum, maximum), value, fix)
    return value


def need_int_list(doc: Mapping[str, Any], key: str, where: str, *, minimum: int | None = 0,
                  maximum: int | None = None, length: int | None = None, default: Any = REQUIRED,
                  label: str | None = None, fix: str = RESTORE) -> Any:
    """``doc[key]`` as a list of ints in ``[minimum, maximum]`` (of ``length`` items when given)."""
    value, present = _get(doc, key, where, default, label, fix)
    if present and not (isinstance(value, list) and (length is None or len(value) == length)
                        and all(is_int(v) and _in_range(v, minimum, maximum) for v in value)):
        items = f"{length} " if length is not None else ""
        raise _bad(where, label or key, f"a list of {items}integers{_range(minimum, maximum)}", value, fix)
    return value


def need_number(doc: Mapping[str, Any], key: str, where: str, *, finite: bool = True, default: Any = REQUIRED,
                label: str | None = None, fix: str = RESTORE) -> Any:
    """``doc[key]`` as an int or float (not a bool), finite unless ``finite=False``; None stays None when allowed
    by ``default=None``."""
    value, present = _get(doc, key, where, default, label, fix)
    if present and value is None and default is None:
        return None
    if present and (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (finite and not math.isfinite(value))):
        raise _bad(where, label or key, "a finite number" if finite else "a number", value, fix)
    return value


def need_type(doc: Mapping[str, Any], key: str, where: str, types: type | tuple[type, ...], *,
              default: Any = REQUIRED, label: str | None = None, fix: str = RESTORE) -> Any:
    """``doc[key]`` as an instance of ``types`` (``dict``, ``list``, ``str`` ...; ``type(None)`` for null)."""
    value, present = _get(doc, key, where, default, label, fix)
    allowed = types if isinstance(types, tuple) else (types,)
    if present and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        names = " or ".join("null" if t is type(None) else _JSON_NAMES.get(t, t.__name__) for t in allowed)
        raise _bad(where, label or key, f"a JSON {names}", value, fix)
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
