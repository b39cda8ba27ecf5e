"""PyTorch checkpoint files (``torch.save`` output: ``.ckpt``, ``.pt``, ``.pth``, ``.bin``) as named tensors.

A file is only ever opened with ``torch.load(weights_only=True)`` (mapped when it is a
zip; the legacy pickle format is read whole): a file carrying any other pickled object
is refused, never unpickled. Nested dicts (and lists) of tensors are flattened into
dotted names; a ``state_dict`` or ``model`` entry holding the tensors of a training
script's checkpoint (``{"model": ..., "optimizer": ..., "epoch": 3}``) gives its tensors
their names without the prefix. Every other leaf (numbers, strings, ...) is kept, in the
nesting it had, as plain JSON values.

Example::

    f = read_torch_file("lightning.ckpt")
    f.tensors["encoder.weight"], f.objects["global_step"]
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resumable import storage
from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.storage import AnyPath, ObjectPath
from resumable.storage.local import check_regular

__all__ = ["PICKLE_PROTOCOL", "TorchFile", "WRAPPERS", "is_zip", "load_weights_only", "read_object", "read_torch_file"]

WRAPPERS = ("state_dict", "model")
"""Top-level entries whose tensors are named without the entry's name (Lightning, training scripts)."""

PICKLE_PROTOCOL = 0x80
"""First byte of the legacy (non-zip) ``torch.save`` format: pickle's PROTO opcode."""

MAX_DEPTH = 32
"""Deepest nesting flattened (a checkpoint nests a few levels; a forged file could nest thousands)."""

_ZIP_TAIL = 22 + 0xFFFF + 20 + 56
"""Bytes at the end of a file that ``zipfile.is_zipfile`` reads: the end-of-central-directory record after
a comment of up to 64 KiB, and the zip64 locator and record before it."""


def read_object(path: ObjectPath, what: str) -> bytes:
    """All the bytes of an object, for a reader that needs the whole file (it cannot be mapped): memory
    as large as the object, bounded by its size as listed (an object growing meanwhile is refused)."""
    entry = storage.stat(path)
    return storage.read_bounded(path, what, entry.size if entry is not None else 0)


def is_zip(path: AnyPath) -> bool:
    """``zipfile.is_zipfile`` of a file, or of an object's tail (all it reads). A local caller checks the
    file is regular first (it would block on a FIFO)."""
    if isinstance(path, Path):
        return zipfile.is_zipfile(path)
    with storage.open_reader(path, "checkpoint file") as reader:
        start = max(0, reader.size - _ZIP_TAIL)
        return zipfile.is_zipfile(io.BytesIO(reader.read(start, reader.size - start)))


@dataclass(frozen=True)
class TorchFile:
    """A PyTorch file's tensors (dotted name → tensor) and its other leaves (JSON values, nested)."""

    path: AnyPath
    tensors: dict[str, torch.Tensor]
    objects: dict[str, Any]
    wrapper: str | None


def load_weights_only(path: AnyPath, what: str, resave: str) -> Any:
    """``torch.load(weights_only=True)`` of a regular file (mapped when a zip) or of an object (read whole
    into memory: :func:`read_object`), its failures named.

    Args:
        what: the kind of file, for the messages ("PyTorch checkpoint", "legacy .ckpt file").
        resave: the advice when pickled objects other than tensors and plain values are refused.

    Raises:
        UnsafeCheckpointError: the file carries objects weights-only loading refuses: never unpickled.
        CorruptCheckpointError: anything else that fails (weights-only runs no code, so a damaged
            pickle stream fails as IndexError, KeyError ..., found by tests/unit/test_fuzz_parsers.py).
    """
    if isinstance(path, Path):
        check_regular(path, what)  # torch.load would block on a FIFO
        source: Any = path
        mapped = zipfile.is_zipfile(path)
    else:
        source, mapped = io.BytesIO(read_object(path, what)), False
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False; we only name what was refused.
        m = re.search(r"WeightsUnpickler error: (.*?)\.?(?: Please use|$)", str(exc), re.MULTILINE)
        reason = m.group(1) if m else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused by weights-only loading ({reason}); only tensors and plain values are read from a "
            f"{what}, never other pickled objects: {resave}") from exc
    except Exception as exc:  # noqa: BLE001 - see Raises
        raise CorruptCheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc}); the "
                                     "file is truncated or damaged") from exc


def _plain(value: Any) -> Any:
    """A JSON value for a non-tensor leaf (torch.Size, dtype, device ... as text or lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Size):
        return list(value)
    return str(value)


def _flatten(path: AnyPath, value: Any, name: str, depth: int, tensors: dict[str, torch.Tensor]) -> Any:
    """Put the tensors under ``value`` into ``tensors`` (dotted names); return what is left, or None."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} is {value.layout} "
                                         f"{'quantized' if value.is_quantized else ''}; only dense tensors are read")
        if name in tensors:
            raise CorruptCheckpointError(f"{path}: two entries flatten to the tensor name {name!r}")
        tensors[name] = value
        return None
    if depth > MAX_DEPTH:
        raise UnsafeCheckpointError(f"{path}: {name!r} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return _plain(value)
    kept = {}
    for key, item in items:
        rest = _flatten(path, item, f"{name}.{key}" if name else key, depth + 1, tensors)
        if rest is not None or not isinstance(item, (torch.Tensor, Mapping, list, tuple)):
            kept[key] = rest
    if isinstance(value, Mapping):
        return kept or None
    return [kept.get(str(i)) for i in range(len(items))] if kept else None


def _holds_tensors(value: Any, depth: int) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > MAX_DEPTH:
        return False  # _flatten refuses it, naming the entry
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return any(_holds_tensors(v, depth + 1) for v in items)


def read_torch_file(path: str | os.PathLike[str] | ObjectPath) -> TorchFile:
    """Read a ``torch.save`` file safely into named tensors and plain values.

    Raises:
        UnsafeCheckpointError: not a regular file, pickled objects other than tensors and
            plain values, or nesting deeper than :data:`MAX_DEPTH`.
        CorruptCheckpointError: damaged, not a dict, or sparse/quantized tensors.

    Example::

        read_torch_file("model.pt").tensors["fc1.weight"].shape
    """
    path = storage.as_path(path)
    doc = load_weights_only(path, "PyTorch checkpoint", "re-save it as a state dict of tensors")
    if not isinstance(doc, Mapping):
        raise CorruptCheckpointError(f"{path}: holds a {type(doc).__name__}, not a dict of tensors (a state dict)")
    wrapper = next((k for k in WRAPPERS if isinstance(doc.get(k), Mapping) and _holds_tensors(doc[k], 1)), None)
    tensors: dict[str, torch.Tensor] = {}
    objects: dict[str, Any] = {}
    for key, value in doc.items():
        rest = _flatten(path, value, "" if key == wrapper else str(key), 1, tensors)
        if rest is not None or not isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            objects[str(key)] = rest
    return TorchFile(path, tensors, objects, wrapper)
