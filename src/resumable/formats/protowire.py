"""The protobuf wire format, read and written without protobuf: the one walker of MindSpore's files.

MindSpore's ``.ckpt`` files (:mod:`resumable.formats.ms_ckpt`) and its strategy files
(:mod:`resumable.formats.ms_strategy`) are single protobuf messages. A message is a
sequence of ``key`` varints (``field << 3 | wire type``) each followed by its value: a
varint, 8 or 4 fixed bytes, or a varint length and that many bytes (strings, bytes,
nested messages, packed repeated numbers). :class:`Wire` walks one message held in a
buffer (bytes or an ``mmap``) and never reads past its end: every length is checked
against the enclosing message, every varint is at most 10 bytes, and a problem raises
:class:`WireError` saying at which byte, for the caller to name the file.

Example::

    wire = Wire(data, 0, len(data))
    while not wire.done():
        field, wire_type = wire.key()
        if field == 1 and wire_type == LENGTH:
            name = wire.text()
        else:
            wire.skip(wire_type)
"""

from __future__ import annotations

import mmap

__all__ = ["FIXED32", "FIXED64", "LENGTH", "VARINT", "Wire", "WireError", "as_int32", "as_int64", "length_field",
           "varint_bytes", "varint_field"]

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class WireError(Exception):
    """A wire-format problem at a byte offset; callers turn it into an error naming their file."""


class Wire:
    """A cursor over a protobuf message held in ``buf[start:end]``."""

    def __init__(self, buf: mmap.mmap | bytes, start: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, start, end

    def done(self) -> bool:
        return self.pos >= self.end

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise WireError(f"truncated varint at byte {self.pos}")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise WireError(f"varint longer than 10 bytes ending at byte {self.pos}")

    def key(self) -> tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def span(self) -> tuple[int, int]:
        """``(offset, length)`` of a length-delimited field, checked against the message end."""
        length = self.varint()
        start = self.pos
        if length > self.end - start:
            raise WireError(f"field of {length} bytes at byte {start} runs past the end ({self.end})")
        self.pos = start + length
        return start, length

    def sub(self) -> "Wire":
        """A cursor over the nested message of a length-delimited field."""
        start, length = self.span()
        return Wire(self.buf, start, start + length)

    def skip(self, wire_type: int) -> None:
        if wire_type == VARINT:
            self.varint()
        elif wire_type == LENGTH:
            self.span()
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if self.pos + size > self.end:
                raise WireError(f"truncated fixed-width field at byte {self.pos}")
            self.pos += size
        else:
            raise WireError(f"unsupported wire type {wire_type} at byte {self.pos}")

    def text(self) -> str:
        start, length = self.span()
        try:
            return bytes(self.buf[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"string at byte {start} is not UTF-8") from None

    def varints(self, wire_type: int) -> list[int]:
        """One element of a repeated number field: a single varint, or a packed run of them."""
        if wire_type == VARINT:
            return [self.varint()]
        if wire_type != LENGTH:
            raise WireError(f"a repeated number field has wire type {wire_type} at byte {self.pos}")
        packed = self.sub()
        out = []
        while not packed.done():
            out.append(packed.varint())
        return out


def as_int64(value: int) -> int:
    """A varint read as protobuf int64 (negative numbers are 10-byte two's complement).

    A varint of more than 64 bits stays as large as it is, for the caller's range check to refuse.
    """
    return value - (1 << 64) if 1 << 63 <= value < 1 << 64 else value


def as_int32(value: int) -> int | None:
    """A varint read as protobuf int32 (negatives sign-extended to 64 bits); None when out of range."""
    value = as_int64(value)
    return value if -(1 << 31) <= value < 1 << 31 else None


def varint_bytes(value: int) -> bytes:
    """A varint's bytes; a negative ``value`` is written as int64 two's complement (10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(field: int, value: int) -> bytes:
    """A whole varint field: key and value."""
    return varint_bytes(field << 3 | VARINT) + varint_bytes(value)


def length_field(field: int, payload_len: int) -> bytes:
    """The key and length of a length-delimited field (its payload follows)."""
    return varint_bytes(field << 3 | LENGTH) + varint_bytes(payload_len)
