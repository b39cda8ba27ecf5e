"""MindSpore ``.ckpt`` files (protobuf) read and written without protobuf or MindSpore.

A ``.ckpt`` file is one protobuf message of three small types (MindSpore's
``checkpoint.proto``)::

    Checkpoint  { repeated Value value = 1; }
    Value       { required string tag = 1; optional TensorProto tensor = 2;
                  optional MapTensorProto maptensor = 3; }
    TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                  required bytes tensor_content = 3; }

``tensor_content`` is the raw little-endian array. MindSpore cuts tensors above
512 MB into several consecutive ``Value`` s with the same tag and full ``dims``,
whose contents concatenate; the index below records such a tensor as several byte
segments. Indexing walks the wire format over an ``mmap`` and skips the tensor
bytes, so it costs memory for the index only (an object in an object store cannot be
mapped: its bytes are read into memory to index it); :func:`read_ms_tensor` then reads
one tensor's bytes through a storage reader (a file or ranged reads of an object).

Example::

    write_ms_ckpt("net.ckpt", {"w": torch.ones(2, 3)})
    index = index_ms_ckpt("net.ckpt")       # {"w": MsTensorEntry(dtype=float32, shape=(2, 3), ...)}
    w = read_ms_tensor("net.ckpt", index["w"])
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from resumable import storage
from resumable.errors import CorruptCheckpointError, NotImplementedYet
from resumable.formats.torch_file import read_object
from resumable.storage.local import open_regular
from resumable.formats.protowire import LENGTH, VARINT, Wire, WireError, as_int64, length_field, varint_field
from resumable.formats.schema import MAX_DIM, MAX_NDIM, shown

__all__ = [
    "MS_DTYPES",
    "MsTensorEntry",
    "index_ms_ckpt",
    "load_ms_ckpt",
    "ms_dtype_name",
    "read_ms_tensor",
    "write_ms_ckpt",
]

MS_DTYPES: dict[str, torch.dtype] = {
    "Bool": torch.bool,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "UInt16": torch.uint16,
    "UInt32": torch.uint32,
    "UInt64": torch.uint64,
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float32": torch.float32,
    "Float64": torch.float64,
}
"""MindSpore dtype names (as in ``tensor_type`` and MindFormers' metadata.json) → torch."""

_MS_NAMES = {dtype: name for name, dtype in MS_DTYPES.items()}

if sys.byteorder != "little":  # tensor_content is little-endian; so is every host torch supports well
    raise ImportError("resumable.formats.ms_ckpt needs a little-endian host")


def ms_dtype_name(dtype: torch.dtype) -> str:
    """MindSpore's name of a torch dtype.

    Example::

        ms_dtype_name(torch.bfloat16)   # "BFloat16"
    """
    try:
        return _MS_NAMES[dtype]
    except KeyError:
        raise ValueError(f"{dtype} has no MindSpore dtype name; supported: {sorted(_MS_NAMES.values())}") from None


@dataclass(frozen=True)
class MsTensorEntry:
    """Where one tensor's bytes lie in a ``.ckpt`` file.

    ``segments`` are ``(offset, length)`` byte ranges in file order; their
    concatenation is the tensor's little-endian content.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.segments)


def _parse_tensor(wire: Wire) -> tuple[list[int], str | None, tuple[int, int] | None]:
    dims: list[int] = []
    dtype_name, content = None, None
    while not wire.done():
        field, wire_type = wire.key()
        if field == 1 and wire_type in (VARINT, LENGTH):  # repeated int64, unpacked or packed
            dims.extend(as_int64(v) for v in wire.varints(wire_type))
        elif field == 2 and wire_type == LENGTH:
            dtype_name = wire.text()
        elif field == 3 and wire_type == LENGTH:
            content = wire.span()
        else:
            wire.skip(wire_type)
    return dims, dtype_name, content


def _parse_value(wire: Wire, number: int, path: str) -> tuple[str, list[int], str, tuple[int, int]]:
    tag, tensor, has_map = None, None, False
    while not wire.done():
        field, wire_type = wire.key()
        if field == 1 and wire_type == LENGTH:
            tag = wire.text()
        elif field == 2 and wire_type == LENGTH:
            tensor = _parse_tensor(wire.sub())
        elif field == 3 and wire_type == LENGTH:
            wire.span()
            has_map = True
        else:
            wire.skip(wire_type)
    where = f"value #{number}" if tag is None else f"value {tag!r}"
    if tag is None:
        raise WireError(f"{where} has no tag")
    if has_map:
        raise NotImplementedYet(f"MapTensor values in MindSpore .ckpt files ({where} in {path})")
    if tensor is None:
        raise WireError(f"{where} has no tensor")
    dims, dtype_name, content = tensor
    if dtype_name is None or content is None:
        raise WireError(f"{where} lacks tensor_type or tensor_content")
    if dtype_name not in MS_DTYPES:
        raise WireError(f"{where} has unsupported tensor_type {dtype_name!r}; supported: {sorted(MS_DTYPES)}")
    if any(d < 0 for d in dims):
        raise WireError(f"{where} has negative dims {shown(dims)}")
    if len(dims) > MAX_NDIM or any(d > MAX_DIM for d in dims):  # dims are multiplied out below
        raise WireError(f"{where} has dims {shown(dims)}: at most {MAX_NDIM}, each at most {MAX_DIM}")
    return tag, dims, dtype_name, content


def _entry_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def index_ms_ckpt(path: str | os.PathLike[str] | storage.ObjectPath) -> dict[str, MsTensorEntry]:
    """Index a MindSpore ``.ckpt`` file: tag → dtype, shape and byte segments.

    Only the message structure is read (through ``mmap``); tensor bytes are skipped.

    Args:
        path: the ``.ckpt`` file.

    Returns:
        Entries in file order, keyed by tag.

    Raises:
        CorruptCheckpointError: empty or truncated file, a length past the end of the
            file, unknown ``tensor_type``, or content whose size is not dims × itemsize;
            the message names the file and the tag.
        NotImplementedYet: the file holds a MapTensor.

    Example::

        index_ms_ckpt("net.ckpt")["fc.weight"].shape    # (8, 4)
    """
    where = storage.as_path(path)
    if not isinstance(where, Path):
        return _index_checked(read_object(where, "MindSpore checkpoint"), str(where))
    fd = open_regular(where, "MindSpore checkpoint")  # mmap of a FIFO or device: refused
    try:
        if os.fstat(fd).st_size == 0:
            return _index_checked(b"", str(where))
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
            return _index_checked(buf, str(where))
    finally:
        os.close(fd)


def _index_checked(buf: mmap.mmap | bytes, path: str) -> dict[str, MsTensorEntry]:
    if not len(buf):
        raise CorruptCheckpointError(f"corrupt MindSpore checkpoint {path}: the file is empty")
    try:
        return _index(buf, path)
    except WireError as e:
        raise CorruptCheckpointError(f"corrupt MindSpore checkpoint {path}: {e}") from None


def _index(buf: mmap.mmap | bytes, path: str) -> dict[str, MsTensorEntry]:
    wire = Wire(buf, 0, len(buf))
    parts: dict[str, tuple[list[int], str, list[tuple[int, int]]]] = {}
    number = 0
    while not wire.done():
        field, wire_type = wire.key()
        if field != 1 or wire_type != LENGTH:
            wire.skip(wire_type)
            continue
        start, length = wire.span()
        tag, dims, dtype_name, content = _parse_value(Wire(buf, start, start + length), number, path)
        number += 1
        if tag in parts:  # a tensor cut into slices: same tag, same full dims
            if parts[tag][:2] != (dims, dtype_name):
                raise WireError(f"value {tag!r} appears twice with different dims or dtype")
            parts[tag][2].append(content)
        else:
            parts[tag] = (dims, dtype_name, [content])
    entries = {}
    for tag, (dims, dtype_name, segments) in parts.items():
        entry = MsTensorEntry(tag, MS_DTYPES[dtype_name], tuple(dims), tuple(segments))
        expected = _entry_nbytes(entry.shape, entry.dtype)
        if entry.nbytes != expected:
            raise WireError(
                f"value {tag!r}: tensor_content holds {entry.nbytes} bytes but dims {dims} "
                f"of {dtype_name} need {expected}"
            )
        entries[tag] = entry
    return entries


def read_ms_tensor(path: str | os.PathLike[str] | storage.ObjectPath, entry: MsTensorEntry) -> torch.Tensor:
    """Read one tensor of a ``.ckpt`` file, given its entry from :func:`index_ms_ckpt`.

    Reads exactly the tensor's bytes into a fresh tensor (no other tensor is loaded).

    Example::

        entry = index_ms_ckpt("net.ckpt")["fc.weight"]
        w = read_ms_tensor("net.ckpt", entry)
    """
    out = torch.empty(entry.shape, dtype=entry.dtype)
    raw = out.reshape(-1).view(torch.uint8).numpy()  # shares memory with ``out``
    filled = 0
    with storage.open_reader(storage.as_path(path), "MindSpore checkpoint") as f:
        for offset, length in entry.segments:
            got = max(0, min(length, f.size - offset))
            if got != length:
                raise CorruptCheckpointError(
                    f"corrupt MindSpore checkpoint {path}: value {entry.name!r} is truncated "
                    f"({got} of {length} bytes at offset {offset}); was the file changed after indexing?"
                )
            f.readinto(memoryview(raw[filled:filled + length]), offset)
            filled += length
    return out


def load_ms_ckpt(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read every tensor of a ``.ckpt`` file (for small files and tests).

    Example::

        load_ms_ckpt("net.ckpt")    # {"fc.weight": tensor(...), ...}
    """
    return {name: read_ms_tensor(path, entry) for name, entry in index_ms_ckpt(path).items()}


def write_ms_ckpt(
    path: str | os.PathLike[str] | storage.ObjectPath,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> None:
    """Write tensors as a new MindSpore ``.ckpt`` file (or object), through the storage layer.

    ``dims`` are written unpacked, as MindSpore's proto2 schema does. The storage layer's
    writer needs the size first: an iterable of pairs is gathered before writing (a mapping
    costs nothing more). The file is written in place, fsynced.

    Args:
        path: the file to create (an existing one is refused).
        tensors: a mapping, or an iterable of ``(tag, tensor)`` pairs.

    Example::

        write_ms_ckpt("net.ckpt", {"fc.weight": torch.randn(8, 4), "global_step": torch.tensor([3], dtype=torch.int32)})
    """
    values = [(_value_head(tag, tensor), _content(tensor))
              for tag, tensor in (tensors.items() if isinstance(tensors, Mapping) else tensors)]
    total = sum(len(head) + content.nbytes for head, content in values)

    def chunks() -> Iterable[memoryview]:
        for head, content in values:
            yield memoryview(head)
            yield content

    storage.write_stream(storage.as_path(path), total, chunks())


def _content(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _value_head(tag: str, tensor: torch.Tensor) -> bytes:
    """The bytes of one ``Value`` before its tensor content."""
    dtype_name = ms_dtype_name(tensor.dtype).encode()
    nbytes = tensor.numel() * tensor.element_size()
    dims = b"".join(varint_field(1, d) for d in tensor.shape)
    tensor_len = len(dims) + len(length_field(2, len(dtype_name))) + len(dtype_name) \
        + len(length_field(3, nbytes)) + nbytes
    tag_bytes = tag.encode()
    value_len = len(length_field(1, len(tag_bytes))) + len(tag_bytes) + len(length_field(2, tensor_len)) + tensor_len
    return b"".join((length_field(1, value_len), length_field(1, len(tag_bytes)), tag_bytes,
                     length_field(2, tensor_len), dims, length_field(2, len(dtype_name)), dtype_name,
                     length_field(3, nbytes)))
