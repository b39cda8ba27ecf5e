"""MindSpore .ckpt protobuf files, read and written by hand-rolled wire-format code.

The reference bytes below are spelled out field by field from the protobuf wire
format spec (key = field << 3 | wire type), independently of the writer under test.
"""

from __future__ import annotations

import re
import struct

import pytest
import torch

from resumable.errors import CorruptCheckpointError, NotImplementedYet
from resumable.formats.ms_ckpt import (
    MS_DTYPES,
    MsTensorEntry,
    index_ms_ckpt,
    load_ms_ckpt,
    ms_dtype_name,
    read_ms_tensor,
    write_ms_ckpt,
)

CONTENT = struct.pack("<2f", 1.5, -2.0)


def _len(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128  # one-byte lengths keep the reference bytes readable
    return bytes([field << 3 | 2, len(payload)]) + payload


def _value(tag: bytes, tensor: bytes, extra: bytes = b"") -> bytes:
    return _len(1, _len(1, tag) + extra + _len(2, tensor))


# Value{tag "w", tensor{dims [2] unpacked, tensor_type "Float32", tensor_content 8 bytes}}
REFERENCE = bytes.fromhex("0a1a" "0a0177" "1215" "0802" "1207") + b"Float32" + b"\x1a\x08" + CONTENT


def test_reference_bytes_decode_to_the_tensor(tmp_path):
    path = tmp_path / "ref.ckpt"
    path.write_bytes(REFERENCE)
    index = index_ms_ckpt(path)
    assert index == {"w": MsTensorEntry("w", torch.float32, (2,), ((20, 8),))}
    assert torch.equal(read_ms_tensor(path, index["w"]), torch.tensor([1.5, -2.0]))


def test_writer_produces_the_reference_bytes(tmp_path):
    path = tmp_path / "w.ckpt"
    write_ms_ckpt(path, {"w": torch.tensor([1.5, -2.0])})
    assert path.read_bytes() == REFERENCE


def test_packed_dims_and_unknown_fields_of_every_wire_type_are_handled(tmp_path):
    tensor = (
        b"\x0a\x02\x02\x03"  # dims [2, 3] packed
        + b"\x20\x96\x01"  # field 4, varint 150 (unknown)
        + _len(2, b"Int8")
        + b"\x2d\x01\x02\x03\x04"  # field 5, fixed32 (unknown)
        + _len(3, bytes(range(6)))
    )
    unknown_in_value = b"\x49" + bytes(8)  # field 9, fixed64
    top_unknown = _len(2, b"ignored") + b"\x18\x05"  # Checkpoint fields 2 and 3 (unknown)
    path = tmp_path / "p.ckpt"
    path.write_bytes(top_unknown + _value(b"x", tensor, unknown_in_value))
    assert torch.equal(load_ms_ckpt(path)["x"], torch.arange(6, dtype=torch.int8).reshape(2, 3))


def test_tensor_cut_into_several_values_with_the_same_tag_is_concatenated(tmp_path):
    def part(content: bytes) -> bytes:
        return _value(b"big", b"\x08\x04" + _len(2, b"Int16") + _len(3, content))

    path = tmp_path / "s.ckpt"
    path.write_bytes(part(struct.pack("<3h", 1, 2, 3)) + part(struct.pack("<h", 4)))
    entry = index_ms_ckpt(path)["big"]
    assert len(entry.segments) == 2 and entry.nbytes == 8
    assert read_ms_tensor(path, entry).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("name", sorted(MS_DTYPES))
def test_every_dtype_round_trips_exactly(tmp_path, name):
    dtype = MS_DTYPES[name]
    source = torch.arange(-3, 9).reshape(3, 4) if dtype != torch.bool else torch.arange(12).reshape(3, 4) % 3 == 0
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        source = source.abs()
    source = source.to(dtype)
    path = tmp_path / "t.ckpt"
    write_ms_ckpt(path, [("t", source), ("scalar", source[0, 0].clone())])
    loaded = load_ms_ckpt(path)
    assert loaded["t"].dtype == dtype and torch.equal(loaded["t"], source)
    assert loaded["scalar"].shape == () and torch.equal(loaded["scalar"], source[0, 0])
    assert ms_dtype_name(dtype) == name


def test_reading_one_tensor_reads_only_its_bytes(tmp_path):
    path = tmp_path / "two.ckpt"
    write_ms_ckpt(path, {"a": torch.zeros(3), "b": torch.arange(4.0)})
    index = index_ms_ckpt(path)
    raw = bytearray(path.read_bytes())
    offset, length = index["a"].segments[0]
    raw[offset:offset + length] = b"\xff" * length  # garbage in "a" must not affect "b"
    path.write_bytes(bytes(raw))
    assert torch.equal(read_ms_tensor(path, index["b"]), torch.arange(4.0))


def test_unsupported_torch_dtype_is_refused_by_the_writer(tmp_path):
    with pytest.raises(ValueError, match=re.escape("torch.complex64 has no MindSpore dtype name")):
        write_ms_ckpt(tmp_path / "c.ckpt", {"c": torch.zeros(2, dtype=torch.complex64)})


def _corrupt_message(path, detail: str) -> str:
    return re.escape(f"corrupt MindSpore checkpoint {path}: {detail}")


@pytest.mark.parametrize("cut", [1, 2, 5, 10, 27])
def test_truncated_file_is_corrupt(tmp_path, cut):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(REFERENCE[:cut])
    with pytest.raises(CorruptCheckpointError, match=f"^corrupt MindSpore checkpoint {re.escape(str(path))}: "):
        index_ms_ckpt(path)


def test_length_beyond_the_file_names_the_offset(tmp_path):
    path = tmp_path / "long.ckpt"
    path.write_bytes(b"\x0a\x7f" + REFERENCE[2:])
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(
            path, "field of 127 bytes at byte 2 runs past the end (28)")):
        index_ms_ckpt(path)


def test_content_size_not_matching_dims_names_the_tag(tmp_path):
    path = tmp_path / "size.ckpt"
    path.write_bytes(_value(b"fc.weight", b"\x08\x03" + _len(2, b"Float32") + _len(3, CONTENT)))
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(
            path, "value 'fc.weight': tensor_content holds 8 bytes but dims [3] of Float32 need 12")):
        index_ms_ckpt(path)


def test_unknown_tensor_type_names_the_tag(tmp_path):
    path = tmp_path / "str.ckpt"
    path.write_bytes(_value(b"name", b"\x08\x00" + _len(2, b"str") + _len(3, b"")))
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(
            path, f"value 'name' has unsupported tensor_type 'str'; supported: {sorted(MS_DTYPES)}")):
        index_ms_ckpt(path)


def test_negative_dims_are_corrupt(tmp_path):
    path = tmp_path / "neg.ckpt"
    minus_one = b"\xff" * 9 + b"\x01"
    path.write_bytes(_value(b"n", b"\x08" + minus_one + _len(2, b"Int8") + _len(3, b"")))
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(path, "value 'n' has negative dims [-1]")):
        index_ms_ckpt(path)


def test_value_without_tag_or_tensor_is_corrupt(tmp_path):
    path = tmp_path / "notag.ckpt"
    path.write_bytes(_len(1, _len(2, b"\x08\x01")))
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(path, "value #0 has no tag")):
        index_ms_ckpt(path)
    path.write_bytes(_len(1, _len(1, b"t")))
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(path, "value 't' has no tensor")):
        index_ms_ckpt(path)


def test_same_tag_with_other_dims_is_corrupt(tmp_path):
    path = tmp_path / "dup.ckpt"
    write_ms_ckpt(path, [("t", torch.zeros(2)), ("t", torch.zeros(3))])
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(
            path, "value 't' appears twice with different dims or dtype")):
        index_ms_ckpt(path)


def test_empty_file_is_corrupt(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(path, "the file is empty")):
        index_ms_ckpt(path)


def test_map_tensor_is_reported_as_not_supported(tmp_path):
    path = tmp_path / "map.ckpt"
    path.write_bytes(_len(1, _len(1, b"emb") + _len(3, b"")))
    with pytest.raises(NotImplementedYet, match=re.escape(
            f"not implemented yet: MapTensor values in MindSpore .ckpt files (value 'emb' in {path})")):
        index_ms_ckpt(path)


def test_file_shrunk_after_indexing_is_reported_on_read(tmp_path):
    path = tmp_path / "shrink.ckpt"
    path.write_bytes(REFERENCE)
    entry = index_ms_ckpt(path)["w"]
    path.write_bytes(REFERENCE[:24])
    with pytest.raises(CorruptCheckpointError, match=_corrupt_message(
            path, "value 'w' is truncated (4 of 8 bytes at offset 20); was the file changed after indexing?")):
        read_ms_tensor(path, entry)
