"""The streaming writer against the real safetensors reader, and the bounded header reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open

from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import safetensors_io as sio
from resumable.storage import local as storage_local

ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
              torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
              torch.float8_e4m3fn, torch.float8_e5m2]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 100, shape, generator=g)
    return (raw % 2).to(dtype) if dtype == torch.bool else raw.to(dtype)


def test_every_dtype_zero_d_empty_and_strided_tensors_read_back_exactly_with_safetensors(tmp_path: Path):
    tensors = []
    for i, dtype in enumerate(ALL_DTYPES):
        tensors += [(f"{dtype}.2d", _sample(dtype, (3, 5), i)), (f"{dtype}.0d", _sample(dtype, (), i)),
                    (f"{dtype}.empty", torch.empty((0, 4), dtype=dtype))]
    tensors.append(("strided", torch.arange(24.0).reshape(4, 6)[:, 1:4]))  # a view: copied per chunk
    path = tmp_path / "a.safetensors"
    size, digest = sio.write_file(path, tensors, {"k": "v"})
    assert size == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(k for k, _ in tensors)
        assert f.metadata().keys() == {"k", sio.BLOCKS_KEY} and f.metadata()["k"] == "v"
        for key, t in tensors:
            got = f.get_tensor(key)
            assert got.dtype == t.dtype and got.shape == t.shape, key
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), key


def test_checksum_is_xxh3_of_the_file_bytes_and_header_is_8_byte_aligned(tmp_path: Path):
    path = tmp_path / "a.safetensors"
    _, digest = sio.write_file(path, [("w", torch.randn(1000)), ("b", torch.ones(3, dtype=torch.bfloat16))])
    data = path.read_bytes()
    assert digest == xxhash.xxh3_64(data).hexdigest()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0


def test_large_tensor_spanning_several_blocks_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(storage_local, "BLOCK_BYTES", 4096)
    t = torch.randn(10_000)
    path = tmp_path / "a.safetensors"
    _, digest = sio.write_file(path, [("t", t)])
    assert digest == xxhash.xxh3_64(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_writer_refuses_an_existing_file_and_unsupported_dtypes(tmp_path: Path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        sio.write_file(path, [("t", torch.ones(1))])
    assert path.read_bytes() == b"keep"
    with pytest.raises(TypeError, match=r"^dtype torch.complex64 cannot be stored in safetensors; supported: "):
        sio.write_file(tmp_path / "b.safetensors", [("c", torch.ones(2, dtype=torch.complex64))])


def test_header_reader_returns_absolute_offsets_and_metadata(tmp_path: Path):
    path = tmp_path / "a.safetensors"
    sio.write_file(path, [("a", torch.ones(2, 3)), ("z", torch.tensor(1, dtype=torch.int64))], {"m": "1"})
    h = sio.read_header(path)
    assert h.metadata["m"] == "1"
    a, z = h.tensors["a"], h.tensors["z"]
    assert (a.dtype, a.shape, a.end - a.start) == ("F32", (2, 3), 24)
    assert (z.dtype, z.shape, z.start, z.end) == ("I64", (), a.end, a.end + 8)
    assert h.file_size == z.end


def _raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _msg(path: Path, problem: str) -> str:
    return (f"{path}: not a valid safetensors file: {problem}; the file is truncated or damaged: "
            "restore it from a copy or re-save the checkpoint")


def test_header_reader_rejects_a_truncated_file(tmp_path: Path):
    good = tmp_path / "good.safetensors"
    sio.write_file(good, [("t", torch.ones(4))])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(cut)
    assert str(e.value) == _msg(cut, "tensor 't' data_offsets [0, 16] run past the end of the "
                                     f"{cut.stat().st_size}-byte file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(tiny)
    assert str(e.value) == _msg(tiny, "file has 3 bytes, fewer than the 8-byte header length")


def test_header_reader_refuses_a_huge_header_length(tmp_path: Path):
    path = _raw_file(tmp_path / "h.safetensors", {}, length=10**12)
    with pytest.raises(UnsafeCheckpointError) as e:
        sio.read_header(path)
    assert str(e.value) == (f"{path}: safetensors header length 1000000000000 exceeds the limit of 100000000 "
                            "bytes; refusing to read it (the file is damaged or not a safetensors file)")
    short = _raw_file(tmp_path / "s.safetensors", {}, length=5000)
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(short)
    assert str(e.value) == _msg(short, f"header length 5000 runs past the end of the {short.stat().st_size}-byte file")


def test_header_reader_rejects_offsets_beyond_the_file(tmp_path: Path):
    path = _raw_file(tmp_path / "o.safetensors", {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                     b"\0" * 8)
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(path)
    assert str(e.value) == _msg(path, f"tensor 't' data_offsets [0, 16] run past the end of the "
                                      f"{path.stat().st_size}-byte file")


def test_header_reader_rejects_overlapping_tensors(tmp_path: Path):
    path = _raw_file(tmp_path / "o.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(path)
    assert str(e.value) == _msg(path, "tensors 'a' and 'b' overlap in the data section")


def test_header_reader_rejects_unknown_dtype_wrong_size_and_non_object(tmp_path: Path):
    p1 = _raw_file(tmp_path / "d.safetensors", {"t": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                   b"\0" * 16)
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(p1)
    assert str(e.value) == _msg(p1, "tensor 't' has unknown dtype 'F128'")
    p2 = _raw_file(tmp_path / "s.safetensors", {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                   b"\0" * 8)
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(p2)
    assert str(e.value) == _msg(p2, "tensor 't' spans 8 bytes but F32 of shape [3] needs 12")
    p3 = _raw_file(tmp_path / "l.safetensors", [1, 2])
    with pytest.raises(CorruptCheckpointError) as e:
        sio.read_header(p3)
    assert str(e.value) == _msg(p3, "header: top level is a JSON list, expected an object")
