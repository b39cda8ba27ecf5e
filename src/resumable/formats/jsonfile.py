"""Bounded reading of the files a checkpoint holds: regular files only, sizes and JSON depth capped.

Everything a checkpoint folder holds is input we did not write ourselves (a damaged
disk, a broken tool, a forger). Every parser reads through this module so that hostile
input is refused in linear time and bounded memory and never blocks:

- :func:`read_bounded` reads at most a size cap, through the storage layer, which refuses
  anything that is not a regular file (a FIFO, ``/dev/zero``, a socket, a folder) before
  and after opening it (``resumable.storage.local.open_regular``);
- :func:`parse_json` refuses nesting deeper than :data:`MAX_DEPTH` in linear time
  before ``json`` sees the text (its recursive parser would raise ``RecursionError``),
  integers of more digits than Python converts, and ``NaN``/``Infinity`` unless the
  file may hold them;
- every error is a ``CorruptCheckpointError`` / ``UnsafeCheckpointError`` naming the file.

The values inside are then checked against a schema (:mod:`resumable.formats.schema`).

This module is bytes and JSON only: no ``torch.distributed``, no renames.

Example::

    doc = load_json_object(Path("ckpt/iteration_00000100/common.json"), "common.json", allow_nan=True)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from resumable import storage
from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.storage import AnyPath

__all__ = [
    "files_in",
    "MAX_DEPTH",
    "MAX_JSON_BYTES",
    "load_json",
    "load_json_object",
    "parse_json",
    "parse_json_object",
    "parse_tracker",
    "read_bounded",
    "read_tracker_file",
]

MAX_JSON_BYTES = 64 << 20
"""Default cap of a JSON file: config.json, an HF index, common.json, meta.json are far smaller."""

MAX_DEPTH = 64
"""Deepest JSON nesting parsed; ours is under 10 deep, and ``json`` recurses once per level."""

# A string, or an unterminated one up to the end: every byte is scanned once (a failed match
# retried from each later quote would be quadratic); json refuses the unterminated one anyway.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
_BLOCK = 1 << 20

def files_in(folder: AnyPath, pattern: re.Pattern[str]) -> list[tuple[re.Match[str], AnyPath]]:
    """The entries of ``folder`` whose names match ``pattern``, with their match.

    Raises:
        UnsafeCheckpointError: a matching entry (a local symlink) resolves outside the folder.
    """
    found = []
    for entry in storage.list_dir(folder):
        m = pattern.match(entry.name)
        if m:
            path = folder / entry.name
            if isinstance(path, Path) and path.resolve().parent != Path(folder).resolve():
                raise UnsafeCheckpointError(f"{path} resolves outside {folder}; refusing to read it")
            found.append((m, path))
    return found


def read_bounded(path: AnyPath, what: str, limit: int) -> bytes:
    """The bytes of a regular file (or an object) of at most ``limit`` bytes, through the storage layer.

    Raises:
        CheckpointNotFoundError: missing.
        UnsafeCheckpointError: not a regular file, or larger than ``limit``.
    """
    return storage.read_bounded(storage.as_path(path), what, limit)


def nesting_depth(data: bytes) -> int:
    """How deep the JSON text ``data`` nests arrays and objects, in linear time and without parsing it.

    Strings are cut out first (brackets inside them do not nest); the depth is then the
    largest running count of opening minus closing brackets, summed by numpy a block at a
    time (a truncated text's unclosed brackets count too).
    """
    steps = np.frombuffer(_NOT_BRACKET.sub(b"", _STRING.sub(b"", data)).translate(_STEPS), dtype=np.int8)
    depth = deepest = 0
    for start in range(0, len(steps), _BLOCK):
        running = np.cumsum(steps[start:start + _BLOCK], dtype=np.int64) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


MAX_TRACKER_BYTES = 4096
"""A tracker holds one number; anything longer is not one."""
_MAX_ITERATION_DIGITS = 18  # iteration_XXXXXXXX names and int64 counters: a longer number is damage


def read_tracker_file(path: AnyPath | str) -> int:
    """The iteration number in a tracker file (``latest_checkpointed_iteration.txt``): one non-negative
    integer, surrounding whitespace allowed (MindFormers writes no newline).

    Raises:
        CheckpointNotFoundError: missing.
        UnsafeCheckpointError: not a regular file, or longer than :data:`MAX_TRACKER_BYTES`.
        CorruptCheckpointError: anything but one number of at most 18 digits (longer ones are
            damage, and Python's ``int`` refuses over 4300 digits without naming a file).
    """
    path = storage.as_path(path)
    return parse_tracker(read_bounded(path, "tracker", MAX_TRACKER_BYTES), path)


def parse_tracker(data: bytes, path: object) -> int:
    """The iteration number in a tracker's bytes (:func:`read_tracker_file`); ``path`` names it in errors."""
    text = data.decode("utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_ITERATION_DIGITS):
        shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise CorruptCheckpointError(
            f"{path}: expected one iteration number, found {shown!r}; "
            "write the iteration to load (e.g. 100) or delete the file to use the newest committed folder")
    return int(text)


class _Constant(ValueError):
    """``NaN`` / ``Infinity`` in a file whose numbers must be finite."""


def _refuse_constant(name: str) -> float:
    raise _Constant(f"{name} where numbers must be finite")


RESTORE = "the file is damaged: restore it from a copy or use another checkpoint"


def parse_json(data: bytes | str, where: str, *, allow_nan: bool = False, fix: str = RESTORE) -> Any:
    """Parse JSON read from a checkpoint, refusing deep nesting, huge integers and (unless allowed) NaN.

    Args:
        data: the text (UTF-8 bytes or str).
        where: the file (and the key holding the text, for JSON inside a header), for messages.
        allow_nan: accept ``NaN`` / ``Infinity`` (common.json may hold a NaN the user saved).
        fix: what the user should do, ending the message.

    Raises:
        CorruptCheckpointError: not JSON, not UTF-8, too deep, an integer of more than
            4300 digits, or a refused constant; ``where`` is named.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise UnsafeCheckpointError(f"{where}: JSON nested {depth} levels deep, more than the {MAX_DEPTH} we parse; "
                                    f"{fix}")
    try:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and int()'s digit limit.
        return json.loads(raw, parse_constant=None if allow_nan else _refuse_constant)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: not valid JSON or not parsable ({exc}); {fix}") from exc


def parse_json_object(data: bytes | str, where: str, *, allow_nan: bool = False,
                      fix: str = RESTORE) -> dict[str, Any]:
    """:func:`parse_json` of text that must hold a JSON object."""
    doc = parse_json(data, where, allow_nan=allow_nan, fix=fix)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: top level is a JSON {type(doc).__name__}, expected an object; {fix}")
    return doc


def load_json(path: AnyPath | str, what: str, *, limit: int = MAX_JSON_BYTES,
              allow_nan: bool = False) -> Any:
    """Read (:func:`read_bounded`) and parse (:func:`parse_json`) one JSON file.

    Example::

        load_json(Path("ckpt/config.json"), "HuggingFace config")
    """
    return parse_json(read_bounded(path, what, limit), f"{what} {path}", allow_nan=allow_nan)


def load_json_object(path: AnyPath | str, what: str, limit: int = MAX_JSON_BYTES, *,
                     allow_nan: bool = False) -> dict[str, Any]:
    """:func:`load_json` of a file that must hold a JSON object.

    Raises:
        CheckpointNotFoundError: missing.
        UnsafeCheckpointError: not a regular file, larger than ``limit``, or nested too deep.
        CorruptCheckpointError: not JSON, or not an object; the file is named.

    Example::

        load_json_object(Path("ckpt/config.json"), "HuggingFace config")
    """
    return parse_json_object(read_bounded(path, what, limit), f"{what} {path}", allow_nan=allow_nan)
