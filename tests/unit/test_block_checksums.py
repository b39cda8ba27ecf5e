"""Every byte a load or a tool reads is checked against the per-block checksums its file records.

Real checkpoints written by ``resumable.save``, one byte flipped on disk, then the
reader a user calls: ``load`` with its default verification, the safe_open fallback
(``load_async``), the reads of part of a stored chunk, the tools' sources.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import resumable
from resumable.errors import CorruptCheckpointError
from resumable.formats import safetensors_io as sio
from resumable.geometry import Box
from resumable.planning import Read
from resumable.reads import read_direct
from resumable.sources import open_source

MODEL = "CKP-model-0000000-0000001.safetensors"
ROWS, COLS = 1000, 700  # float32: 2.8 MB, three blocks; a row is 2800 bytes, never a block edge


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"big": torch.randn(ROWS, COLS, generator=g), "norm": torch.ones(8)}}


def _zeros() -> dict:
    return {"model": {"big": torch.zeros(ROWS, COLS), "norm": torch.zeros(8)}}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return resumable.save(_state(), tmp_path / "ckpt", 1)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _entry(folder: Path, key: str = "big") -> sio.TensorEntry:
    return sio.read_header(folder / MODEL).tensors[key]


def _block_message(folder: Path, key: str, k: int) -> str:
    """The start of the error for block ``k`` of ``key`` (the digests differ per run: matched up to them)."""
    e = _entry(folder, key)
    b0 = e.start + k * sio.CHECK_BLOCK
    return f"{folder / MODEL}: tensor {key!r}, bytes {b0}-{min(b0 + sio.CHECK_BLOCK, e.end)}: xxh3-64 "


def test_every_file_records_one_digest_per_block_of_each_entry(folder: Path) -> None:
    header = sio.read_header(folder / MODEL)
    digests = sio.block_digests(header)
    assert digests is not None and set(digests) == {"big", "norm"}
    assert len(digests["big"].digests) == 16 * 3 and len(digests["norm"].digests) == 16
    doc = json.loads(header.metadata[sio.BLOCKS_KEY])
    assert doc["block"] == sio.CHECK_BLOCK == 1 << 20


def test_a_flipped_byte_in_tensor_data_fails_a_default_load_naming_file_key_and_bytes(folder: Path) -> None:
    _flip(folder / MODEL, _entry(folder).start + sio.CHECK_BLOCK + 5)  # in block 1
    with pytest.raises(CorruptCheckpointError) as info:
        resumable.load(_zeros(), folder)
    message = str(info.value)
    assert message.startswith(_block_message(folder, "big", 1))
    assert message.endswith("recorded in the file's header; the file is damaged: restore it or load another "
                            "iteration (resume_training: true falls back to the newest valid one)")
    resumable.load(_zeros(), folder, verify="size")  # the old default: sizes only, not seen


def test_an_intact_checkpoint_loads_bit_for_bit_with_the_blocks_checked(folder: Path) -> None:
    target = _zeros()
    resumable.load(target, folder)
    assert torch.equal(target["model"]["big"], _state()["model"]["big"])


def test_a_read_ending_inside_a_block_completes_it_and_catches_a_flip_just_past_its_edge(folder: Path) -> None:
    # Rows 0..399 end mid-block 1 (400 x 2800 bytes = 1.07 MiB): a reshard target reads them only.
    rows = 400
    read = Read("big", MODEL, "big", Box((0, 0), (ROWS, COLS)), Box((0, 0), (rows, COLS)),
                (slice(0, rows), slice(0, COLS)), (slice(0, rows), slice(0, COLS)))
    target = torch.zeros(rows, COLS)
    read_direct(folder, [read], {"big": target})
    assert torch.equal(target, _state()["model"]["big"][:rows])
    _flip(folder / MODEL, _entry(folder).start + rows * COLS * 4 + 3)  # not read, but in the block the read cuts
    with pytest.raises(CorruptCheckpointError, match="^" + _block_message(folder, "big", 1)):
        read_direct(folder, [read], {"big": torch.zeros(rows, COLS)})


def test_a_read_starting_inside_a_block_catches_a_flip_in_the_bytes_it_read(folder: Path) -> None:
    start = 700  # 1.96 MB into the entry: block 1, read from its middle
    read = Read("big", MODEL, "big", Box((0, 0), (ROWS, COLS)), Box((start, 0), (ROWS - start, COLS)),
                (slice(start, ROWS), slice(0, COLS)), (slice(0, ROWS - start), slice(0, COLS)))
    _flip(folder / MODEL, _entry(folder).start + start * COLS * 4 + 1)
    with pytest.raises(CorruptCheckpointError, match="^" + _block_message(folder, "big", 1)):
        read_direct(folder, [read], {"big": torch.zeros(ROWS - start, COLS)})


def test_a_strided_slice_through_safe_open_checks_the_blocks_it_spans(folder: Path) -> None:
    # A column split is not one byte run: it goes through the safe_open fallback (load_async reads that way).
    _flip(folder / MODEL, _entry(folder).start + 2 * sio.CHECK_BLOCK + 11)
    pending = resumable.load_async(_zeros(), folder)
    with pytest.raises(CorruptCheckpointError, match="^" + _block_message(folder, "big", 2)):
        pending.result(_zeros())


def test_a_flipped_byte_in_a_small_tensor_read_in_a_group_is_caught(folder: Path) -> None:
    _flip(folder / MODEL, _entry(folder, "norm").start + 4)
    with pytest.raises(CorruptCheckpointError, match="^" + _block_message(folder, "norm", 0)):
        resumable.load(_zeros(), folder)


def test_the_tools_source_reader_refuses_a_flipped_byte(folder: Path) -> None:
    _flip(folder / MODEL, _entry(folder).start + 17)
    source = open_source(folder)
    assert torch.equal(source.tensors["norm"].read(), torch.ones(8))
    with pytest.raises(CorruptCheckpointError, match="^" + _block_message(folder, "big", 0)):
        source.tensors["big"].read(Box((0, 0), (10, 10)))


def test_files_without_block_checksums_load_with_sizes_only_and_are_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = resumable.save(_state(), tmp_path / "ckpt", 1)
    for name in (MODEL, "CKP-opt-0000000-0000001.safetensors"):
        path = folder / name
        if not path.exists():
            continue
        meta = {k: v for k, v in sio.read_header(path).metadata.items() if k != sio.BLOCKS_KEY}
        _rewrite_without_blocks(path, _read_all(path), meta)
    _reseal_files(folder)
    target = _zeros()
    with caplog.at_level(logging.INFO, logger="resumable.reads"):
        resumable.load(target, folder)
    assert torch.equal(target["model"]["big"], _state()["model"]["big"])
    notes = [r.getMessage() for r in caplog.records if "carry no block checksums" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("1 file(s) carry no block checksums")


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def _rewrite_without_blocks(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The file as resumable wrote it before block checksums (safetensors' own writer, same metadata)."""
    from safetensors.torch import save_file
    os.unlink(path)
    save_file(tensors, str(path), metadata=meta)


def _reseal_files(folder: Path) -> None:
    """files.json and metadata.json re-recorded for the rewritten files (as an older save wrote them)."""
    from resumable.formats import v2
    meta = v2.read_metadata(folder)
    for name, entry in meta.files.items():
        entry.size, entry.xxh3_64 = (folder / name).stat().st_size, sio._xxh3_file(folder / name)
    (folder / v2.FILES).write_text(meta.files_json())
    (folder / v2.METADATA).write_text(meta.to_json())


@pytest.mark.parametrize("command", [
    ["merge"], ["split", "--layout", "dp=1,tp=1"], ["convert", "--to", "v2"],
    ["convert", "--to", "unified"], ["convert", "--to", "legacy"], ["diff"]], ids=lambda c: " ".join(c))
def test_a_tool_reading_a_source_with_one_flipped_byte_exits_non_zero_naming_the_file(
        folder: Path, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture) -> None:
    from resumable.cli import main
    _flip(folder / MODEL, _entry(folder).start + sio.CHECK_BLOCK + 99)
    other = [str(resumable.save(_state(), tmp_path / "other", 1))] if command == ["diff"] else [str(tmp_path / "out")]
    code = main([command[0], str(folder), *other, *command[1:]])
    err = capsys.readouterr().err
    assert code == 1, err  # damaged
    assert f"error: {_block_message(folder, 'big', 1)}" in err
