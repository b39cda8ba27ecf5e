"""Streaming safetensors writer with a running checksum, and a bounded header reader.

The writer produces files that the real ``safetensors`` library reads
(``safetensors.safe_open``): an 8-byte little-endian header length, a JSON header
(``dtype``, ``shape``, ``data_offsets`` per key, plus ``__metadata__``) padded with
spaces to a multiple of 8 bytes, then the raw little-endian bytes of each tensor in
header order. Tensors are written one after another straight from memory: each is made
contiguous on its own (a view stays a view when it already is) and seen as bytes through
numpy; the file's bytes (header, then each tensor's) go to the storage layer as a sequence
of views (:func:`resumable.storage.write_stream`: ``O_DIRECT`` or ``pwrite`` threads on a
local disk, parallel multipart uploads to an object store), which computes the file's
xxh3-64 from the same bytes, in file order, as they go out. No second copy of the whole
state is made.

The reader parses only the header, with hard limits, so that a hostile or truncated
file produces a ``CorruptCheckpointError`` / ``UnsafeCheckpointError`` naming the file
instead of a huge allocation or an out-of-bounds read.

Every file also records, in ``__metadata__["resumable_blocks"]``, the xxh3-64 of each
``CHECK_BLOCK`` (1 MiB) block of each entry, blocks aligned to the entry's start
(:class:`BlockDigests`): a reader checks exactly the blocks it reads, from the memory the
bytes landed in, so that verification costs no extra I/O (only the bytes completing a
block cut at the edge of a read). :func:`write_file` hashes the tensors block by block
before the header goes out (one pass over memory, ~0.09 s per GiB);
:func:`write_file_streaming`, whose tensors exist one at a time, writes fixed-width
placeholders, hashes each tensor as it is fetched, rewrites the header in place at the
end and computes the whole-file checksum by reading the file back.

This module is bytes only: no ``torch.distributed``, no renames, no file opened by path
(the storage layer does that). A file is durable when a write returns; directory fsyncs
and renames live in ``resumable.commit``.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import xxhash

from resumable import storage
from resumable.errors import CorruptCheckpointError, NotImplementedYet, UnsafeCheckpointError
from resumable.formats.jsonfile import parse_json_object
from resumable.formats.schema import MAX_DIM, MAX_NDIM, shown
from resumable.storage import AnyPath

__all__ = [
    "BLOCKS_KEY",
    "CHECK_BLOCK",
    "DTYPE_NAMES",
    "MAX_HEADER_BYTES",
    "BlockDigests",
    "Header",
    "TensorEntry",
    "block_digests",
    "dtype_from_name",
    "dtype_name",
    "read_header",
    "read_region",
    "stored_entry",
    "verify_file",
    "write_file",
    "write_file_streaming",
]

#: safetensors dtype names ↔ torch dtypes (the subset both sides know).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
_ITEMSIZE: dict[str, int] = {v: torch.empty(0, dtype=k).element_size() for k, v in DTYPE_NAMES.items()}

#: Bytes a header read asks for first: the 8-byte length and, for most files, the header itself.
HEADER_GUESS = 64 << 10
#: Largest header we agree to parse (the safetensors library uses the same bound).
MAX_HEADER_BYTES = 100_000_000
#: Bytes read at a time by :func:`verify_file`.
READ_BYTES = 8 << 20
_MIN_BLOCK = 4096  # smallest checksum block a file may record
#: Bytes covered by one block checksum: a read cut mid-block costs at most this much extra
#: reading at each of its two edges; the digests cost 16 header bytes per MiB of data.
CHECK_BLOCK = 1 << 20
#: ``__metadata__`` key of the block checksums: JSON ``{"block": CHECK_BLOCK, "xxh3_64":
#: {key: 16 hex digits per block, concatenated}}``.
BLOCKS_KEY = "resumable_blocks"

def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``).

    Raises:
        TypeError: the dtype has no safetensors name (complex, quantized ...).
    """
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} cannot be stored in safetensors; "
            f"supported: {', '.join(str(d) for d in DTYPE_NAMES)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name, or None when unknown."""
    return _DTYPES_BY_NAME.get(name)


def _header_bytes(tensors: Sequence[tuple[str, torch.Tensor]],
                  metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """JSON header (padded to 8 bytes) for ``tensors`` in order, and the data size."""
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors __metadata__ must map str to str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, t in tensors:
        if key == "__metadata__" or key in header:
            raise ValueError(f"duplicate or reserved safetensors key {key!r}")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The safetensors library pads with spaces so that the data starts 8-byte aligned.
    raw += b" " * (-len(raw) % 8)
    return raw, offset


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as a memoryview, copying only when ``t`` is not contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()  # no-op for contiguous tensors; one copy of this chunk otherwise
    if t.numel() == 0:
        return memoryview(b"")
    # reshape(-1) on a contiguous tensor is a view; uint8 view works for every dtype,
    # including bf16 / bool that numpy cannot represent directly.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_file(path: AnyPath, tensors: Sequence[tuple[str, torch.Tensor]],
               metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Stream ``tensors`` into a new safetensors file, checksumming as it writes.

    Args:
        path: file or object to create; a local file must not exist (created with ``O_EXCL``
            so two writers can never interleave into one file).
        tensors: ``(key, tensor)`` pairs, written in this order. A tensor may be a
            non-contiguous view (a slice of a shard): only that chunk is copied, when
            its turn comes.
        metadata: ``__metadata__`` entries (str → str).

    Returns:
        ``(size_in_bytes, xxh3_64_hex)`` of the whole file as written.

    Raises:
        TypeError: a dtype safetensors cannot store, or non-str metadata.
        ValueError: a duplicate or reserved key.
        OSError: the file system refused (exists, no space, read-only ...).

    Example:
        >>> size, digest = write_file("/tmp/a.safetensors", [("w", torch.ones(2, 3))])

    Hazard: the bytes are read from ``tensors`` while the call runs; mutating them from
    another thread meanwhile stores a mix of old and new values.
    """
    by_key = dict(tensors)
    specs = [(key, t.dtype, tuple(t.shape)) for key, t in tensors]
    # ~0.09 s per GiB: python-xxhash holds the GIL, so threads would not make it shorter.
    digests = {key: _digest_hex(_byte_view(t)) for key, t in tensors}
    return _write(storage.as_path(path), specs, by_key.__getitem__, _with_blocks(metadata, digests), None)


def _check_blocks(view: memoryview) -> list[memoryview]:
    """``view`` cut into ``CHECK_BLOCK`` pieces (the last one shorter)."""
    return [view[i:i + CHECK_BLOCK] for i in range(0, len(view), CHECK_BLOCK)]


def _digest_hex(view: memoryview) -> str:
    """The block digests of one entry's bytes, concatenated (16 hex digits per block)."""
    return "".join(xxhash.xxh3_64_hexdigest(b) for b in _check_blocks(view))


def _with_blocks(metadata: Mapping[str, str] | None, digests: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus the block checksums entry."""
    return {**(metadata or {}), BLOCKS_KEY: json.dumps({"block": CHECK_BLOCK, "xxh3_64": digests},
                                                       separators=(",", ":"))}


def write_file_streaming(path: AnyPath, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                         get: Callable[[str], torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """:func:`write_file` for tensors fetched one at a time: memory bounded by the largest one.

    Args:
        path: file or object to create (a local one with ``O_EXCL``).
        specs: ``(key, dtype, shape)`` of every tensor, in file order (the header is written first).
        get: returns the tensor of a key; called once per key, in order, and released before the next.
        metadata: ``__metadata__`` entries (str → str).

    Returns:
        ``(size_in_bytes, xxh3_64_hex)`` of the whole file. The block digests are known only
        once every tensor went out, so the header is rewritten in place at the end and the
        checksum is computed by reading the file back (one read pass; the tools' writer).

    Raises:
        ValueError: ``get`` returned a tensor whose dtype or shape differs from its spec.
        TypeError, OSError: as :func:`write_file`.

    Example:
        >>> write_file_streaming("/tmp/a.safetensors", [("w", torch.float32, (2, 3))], lambda k: torch.ones(2, 3))
    """
    path = storage.as_path(path)
    # Placeholders of the digests' exact width: the final header has the same length.
    digests = {key: "0" * 16 * -(-_nbytes(dtype, shape) // CHECK_BLOCK) for key, dtype, shape in specs}

    def hashed(key: str) -> torch.Tensor:
        t = get(key)
        digests[key] = _digest_hex(_byte_view(t))
        return t

    meta = _with_blocks(metadata, digests)
    size, _ = _write(path, specs, hashed, meta, digests)
    return size, _xxh3_file(path)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _xxh3_file(path: AnyPath) -> str:
    """xxh3-64 of a file's bytes, read in ``READ_BYTES`` pieces."""
    h = xxhash.xxh3_64()
    with storage.open_reader(path, "safetensors file") as f:
        for at in range(0, f.size, READ_BYTES):
            h.update(f.read(at, min(READ_BYTES, f.size - at)))
    return h.hexdigest()


def _chunks(path: AnyPath, prefix: bytes, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
            get: Callable[[str], torch.Tensor]) -> Iterator[memoryview]:
    """The file's bytes in order: the header, then each tensor's, fetched only when its turn comes."""
    yield memoryview(prefix)
    for key, dtype, shape in specs:
        t = get(key)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{path}: tensor {key!r} was announced as {dtype} {list(shape)} but is "
                             f"{t.dtype} {list(t.shape)}")
        view = _byte_view(t)
        del t
        yield view
        del view  # release this chunk (and any contiguous copy) before the next


def _write(path: AnyPath, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]], get: Callable[[str], torch.Tensor],
           metadata: dict[str, str], late: dict[str, str] | None) -> tuple[int, str]:
    """Write the file through the storage layer; ``late``: block digests filled in by ``get`` while writing,
    the header then rewritten before the file is made durable (the returned checksum is then that of the
    placeholder header)."""
    header, data_size = _header_bytes([(key, torch.empty(tuple(shape), dtype=dtype, device="meta"))
                                       for key, dtype, shape in specs], metadata)
    prefix = struct.pack("<Q", len(header)) + header

    def final_header() -> bytes | None:
        if late is None:
            return None
        final, _ = _header_bytes([(key, torch.empty(tuple(shape), dtype=dtype, device="meta"))
                                  for key, dtype, shape in specs], _with_blocks(metadata, late))
        if len(final) != len(header):  # the digests are fixed width: a bug, never a user's input
            raise AssertionError("block digests changed the header length")
        return final

    return storage.write_stream(path, len(prefix) + data_size, _chunks(path, prefix, specs, get), final_header)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; offsets are absolute positions in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES_BY_NAME[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


@dataclass(frozen=True)
class BlockDigests:
    """The recorded xxh3-64 of each ``block``-byte block of one entry (blocks aligned to its start)."""

    path: Path
    key: str
    start: int
    end: int
    block: int
    digests: str  # 16 hex digits per block, concatenated

    def edges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` outside ``[lo, hi)`` that the blocks overlapping it also cover (what
        :meth:`check` will ask ``read`` for): none when the range starts and ends on block edges."""
        if hi <= lo:
            return []
        first = self.start + (lo - self.start) // self.block * self.block
        last = min(self.start + ((hi - 1 - self.start) // self.block + 1) * self.block, self.end)
        return [(first, lo - first)] * (first < lo) + [(hi, last - hi)] * (last > hi)

    def check(self, lo: int, hi: int, data: memoryview | None, read: Callable[[int, int], bytes]) -> None:
        """Verify every block overlapping ``[lo, hi)`` (absolute file offsets inside the entry).

        ``data`` holds the bytes of ``[lo, hi)`` as read (None: read them all); the parts of
        edge blocks outside it are fetched with ``read(offset, nbytes)``.

        Raises:
            CorruptCheckpointError: naming the file, the key, the block's byte range and what to do.
        """
        if hi <= lo:
            return
        for k in range((lo - self.start) // self.block, (hi - 1 - self.start) // self.block + 1):
            b0 = self.start + k * self.block
            b1 = min(b0 + self.block, self.end)
            if data is not None and lo <= b0 and b1 <= hi:
                found = xxhash.xxh3_64_hexdigest(data[b0 - lo:b1 - lo])
            else:
                h = xxhash.xxh3_64()
                if data is None:
                    h.update(read(b0, b1 - b0))
                else:
                    if b0 < lo:
                        h.update(read(b0, lo - b0))
                    h.update(data[max(b0, lo) - lo:min(b1, hi) - lo])
                    if b1 > hi:
                        h.update(read(hi, b1 - hi))
                found = h.hexdigest()
            if found != self.digests[16 * k:16 * k + 16]:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {self.key!r}, bytes {b0}-{b1}: xxh3-64 {found} differs from the block "
                    f"checksum {self.digests[16 * k:16 * k + 16]} recorded in the file's header; the file is "
                    "damaged: restore it or load another iteration (resume_training: true falls back to the "
                    "newest valid one)")


def block_digests(header: "Header") -> dict[str, BlockDigests] | None:
    """The block checksums a file records (key → :class:`BlockDigests`), or None when it has none
    (files written before them, or by other tools).

    Raises:
        CorruptCheckpointError: the record is malformed or does not match the entries' sizes.
    """
    raw = header.metadata.get(BLOCKS_KEY)
    if raw is None:
        return None
    doc = parse_json_object(raw, f"{header.path}: __metadata__ {BLOCKS_KEY!r}", fix=_DAMAGED)
    block, table = doc.get("block"), doc.get("xxh3_64")
    if not _is_int(block) or block < _MIN_BLOCK or not isinstance(table, dict):
        raise _corrupt(header.path, f"__metadata__ {BLOCKS_KEY!r} needs a block size of at least {_MIN_BLOCK} "
                                    "and an xxh3_64 object")
    out = {}
    for key, entry in header.tensors.items():
        hexes = table.get(key)
        blocks = -(-(entry.end - entry.start) // block)
        if not isinstance(hexes, str) or len(hexes) != 16 * blocks or not _HEX.fullmatch(hexes):
            raise _corrupt(header.path, f"__metadata__ {BLOCKS_KEY!r}: tensor {key!r} needs {blocks} block "
                                        "checksums of 16 hex digits")
        out[key] = BlockDigests(header.path, key, entry.start, entry.end, block, hexes)
    return out


_HEX = re.compile(r"[0-9a-f]*")


_DAMAGED = "the file is truncated or damaged: restore it from a copy or re-save the checkpoint"


def _corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: not a valid safetensors file: {problem}; {_DAMAGED}")


def stored_entry(header: Header, key: str, dtype: torch.dtype | None, shape: Sequence[int]) -> TensorEntry:
    """The entry of ``key`` in ``header``, once it stores ``key`` as ``dtype`` (None: any) of ``shape``.

    The metadata that names ``key`` says what it holds; a header that disagrees (damaged,
    or a file from another checkpoint) would otherwise give a wrong region or a torch
    error naming no file.

    Raises:
        CorruptCheckpointError: naming the file, the key, what it stores and what was expected.
    """
    entry = header.tensors.get(key)
    if entry is None:
        raise _corrupt(header.path, f"tensor {key!r} is not in the file")
    found = (entry.dtype, list(entry.shape))
    want = (entry.dtype if dtype is None else DTYPE_NAMES.get(dtype), list(shape))
    if found != want:
        raise _corrupt(header.path, f"tensor {key!r} is stored as {found[0]} {found[1]}, but the checkpoint's "
                                    f"metadata says {want[0]} {want[1]}")
    return entry


def read_region(reader: storage.Reader, entry: TensorEntry, src: tuple[slice, ...],
                check: BlockDigests | None = None) -> torch.Tensor:
    """``stored[src]`` of one stored entry: the rows of dim 0 it spans are read (every block they
    overlap checked against ``check`` first), then sliced.

    Raises:
        CorruptCheckpointError: a block fails its checksum, or the file ends early.
    """
    if sys.byteorder != "little":
        raise NotImplementedYet("reading safetensors (little-endian) on a big-endian host is not supported")
    shape, dtype = entry.shape, entry.torch_dtype
    row = math.prod(shape[1:]) * dtype.itemsize
    r0, r1 = (src[0].start, src[0].stop) if src else (0, 1)
    lo, hi = entry.start + r0 * row, entry.start + max(r0, r1) * row
    if not src:
        hi = entry.end
    if hi <= lo:
        return torch.empty([max(0, sl.stop - sl.start) for sl in src], dtype=dtype)
    buf = bytearray(hi - lo)
    reader.readinto(memoryview(buf), lo)
    if check is not None:
        check.check(lo, hi, memoryview(buf), reader.read)
    rows = torch.frombuffer(buf, dtype=torch.uint8).view(dtype)
    if not src:
        return rows.reshape(())
    return rows.reshape(r1 - r0, *shape[1:])[(slice(0, r1 - r0),) + tuple(src[1:])]


def verify_file(path: AnyPath) -> tuple[str, bool, CorruptCheckpointError | None]:
    """Read a file once, front to back: its whole-file xxh3-64, and every block checksum it records checked.

    Returns:
        ``(xxh3_64_hex, blocks, failed)``: ``blocks`` is False when the file records no block
        checksums; ``failed`` is an invalid header or the first block that failed its checksum
        (file, key and byte range named), or None. The caller compares the whole-file
        checksum first (a damaged header is then reported as a checksum mismatch).

    Raises:
        CorruptCheckpointError: the file shrank while being read.
    """
    path = storage.as_path(path)
    failed: CorruptCheckpointError | None = None
    try:
        header = read_header(path)
        digests, spans = block_digests(header), header.tensors.items()
    except CorruptCheckpointError as exc:  # still hashed whole, below
        failed, digests, spans = exc, None, {}.items()
    whole = xxhash.xxh3_64()
    with storage.open_reader(path, "safetensors file") as f:
        at = 0

        def take(nbytes: int) -> bytes:
            nonlocal at
            data = f.read(at, nbytes)
            at += nbytes
            whole.update(data)
            return data

        def skip_to(end: int) -> None:  # the header, gaps and the tail: hashed, not block-checked
            while at < end:
                take(min(READ_BYTES, end - at))

        for start, end, key in sorted((e.start, e.end, k) for k, e in spans if e.end > e.start):
            skip_to(start)
            check = digests[key] if digests is not None else None
            step = check.block if check is not None else READ_BYTES
            for block in range(start, end, step):
                data = take(min(step, end - block))
                if check is not None and failed is None:
                    try:  # the data is the whole block: nothing else is read
                        check.check(block, block + len(data), memoryview(data), f.read)
                    except CorruptCheckpointError as exc:
                        failed = exc
        skip_to(f.size)
    return whole.hexdigest(), digests is not None, failed


def read_header(path: AnyPath, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of a safetensors file without reading its data.

    Checks: the header length fits the file and ``max_header_bytes``; the header is a
    JSON object; every entry has a known dtype, a non-negative shape and data offsets
    inside the file whose length equals ``numel × itemsize``; no two entries overlap.

    Args:
        path: the file.
        max_header_bytes: refuse larger headers (a hostile length would otherwise make us
            allocate it).

    Returns:
        The parsed :class:`Header`.

    Raises:
        CheckpointNotFoundError / FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the header length exceeds ``max_header_bytes``.
        CorruptCheckpointError: anything else wrong, with the file and the problem named.

    Example:
        >>> h = read_header("CKP-model-0000000-0000001.safetensors")
        >>> h.tensors["model.norm.weight"].shape
    """
    path = storage.as_path(path)
    with storage.open_reader(path, "safetensors file") as f:  # a FIFO or /dev/zero: refused, never read
        first = f.read_some(0, HEADER_GUESS)  # the length and (usually) the whole header in one request
        size = f.size
        if size < 8:
            raise _corrupt(path, f"file has {size} bytes, fewer than the 8-byte header length")
        (n,) = struct.unpack("<Q", first[:8])
        if n > max_header_bytes:
            raise UnsafeCheckpointError(
                f"{path}: safetensors header length {n} exceeds the limit of {max_header_bytes} bytes; "
                "refusing to read it (the file is damaged or not a safetensors file)")
        if 8 + n > size:
            raise _corrupt(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = first[8:8 + n] if 8 + n <= len(first) else first[8:] + f.read(len(first), 8 + n - len(first))
    doc = parse_json_object(raw, f"{path}: not a valid safetensors file: header", fix=_DAMAGED)
    data_start = 8 + n
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    for key, info in doc.items():
        entries[key] = _parse_entry(path, key, info, data_start, size)
    spans = sorted((e.start, e.end, k) for k, e in entries.items() if e.end > e.start)
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _corrupt(path, f"tensors {k0!r} and {k1!r} overlap in the data section")
    return Header(path, size, data_start, entries, dict(meta))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: Path, key: str, info: object, data_start: int, size: int) -> TensorEntry:
    """Validate one header entry; offsets become absolute file positions."""
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {key!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise _corrupt(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape):
        raise _corrupt(path, f"tensor {key!r} has invalid shape {shown(shape)}")  # bounded: multiplied out below
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise _corrupt(path, f"tensor {key!r} data_offsets {offsets} run past the end of the "
                             f"{size}-byte file")
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * _ITEMSIZE[dtype]:
        raise _corrupt(path, f"tensor {key!r} spans {end - begin} bytes but {dtype} of shape "
                             f"{shape} needs {numel * _ITEMSIZE[dtype]}")
    return TensorEntry(dtype, tuple(shape), begin, end)
