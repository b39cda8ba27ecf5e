"""Hostile or broken checkpoints are refused before any large allocation, code execution or outside access.

Every case starts from a real checkpoint written by ``resumable.save`` and forges one
thing, the way an attacker (or a broken tool) would, keeping the rest consistent
(checksums recomputed where the forgery would otherwise be caught by them), then calls
``resumable.load`` as a user would. Nothing outside the checkpoint folder may be read
because of what the checkpoint says: forged names, a symlinked shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

import resumable
from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v1, v2
from tests.format1 import downgrade

MODEL = "CKP-model-0000000-0000001.safetensors"


def _state(n: int = 64, dtype: torch.dtype = torch.float32) -> dict:
    return {"model": {"w": torch.zeros(n, dtype=dtype)}}


@pytest.fixture
def it1(tmp_path: Path) -> Path:
    resumable.save({"model": {"w": torch.arange(64.0)}}, tmp_path / "ckpt", 1)
    folder = tmp_path / "ckpt" / "iteration_00000001"
    downgrade(folder)  # format version 1 lists what is forged here: chunks and file entries
    return folder


def _edit_metadata(folder: Path, edit) -> None:
    doc = json.loads((folder / "metadata.json").read_text())
    edit(doc)
    (folder / "metadata.json").write_text(json.dumps(doc))


def _reseal(folder: Path, name: str = MODEL) -> None:
    """Make metadata.json's size and checksum of ``name`` match the (forged) file, as a forger would."""
    def edit(doc: dict) -> None:
        doc["files"][name]["size"] = (folder / name).stat().st_size
        doc["files"][name]["xxh3_64"] = v2._xxh3_of(folder / name)
    _edit_metadata(folder, edit)


def _load_error(folder: Path, state: dict | None = None, verify: str = "checksum") -> BaseException:
    state = state if state is not None else _state()
    with pytest.raises(Exception) as info:
        resumable.load(state, folder, verify=verify)
    assert torch.count_nonzero(state["model"]["w"]) == 0  # refused before any tensor was touched
    return info.value


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_a_file_name_leaving_the_folder_is_refused(it1: Path, name: str) -> None:
    def edit(doc: dict) -> None:
        doc["files"][name] = doc["files"].pop(MODEL)
        doc["tensors"]["w"]["chunks"][0]["stored"][0]["file"] = name
    _edit_metadata(it1, edit)
    err = _load_error(it1)
    assert isinstance(err, UnsafeCheckpointError)
    assert str(err) == (f"{it1 / 'metadata.json'}: file name {name!r} is not a bare file name inside the checkpoint "
                        "folder; refusing to read outside it (the metadata was edited or forged)")


def test_a_shard_symlinked_outside_the_folder_is_refused_even_when_its_bytes_are_valid(it1: Path,
                                                                                        tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    (it1 / MODEL).rename(outside)  # a perfectly valid file, with the recorded size and checksum
    (it1 / MODEL).symlink_to(outside)
    err = _load_error(it1)
    assert isinstance(err, UnsafeCheckpointError)
    assert str(err) == (f"{it1 / 'metadata.json'}: file {MODEL!r} in {it1} resolves outside the folder; "
                        "refusing to open it")


def test_a_symlink_to_another_file_inside_the_folder_is_allowed(it1: Path) -> None:
    (it1 / MODEL).rename(it1 / "real.safetensors")
    (it1 / MODEL).symlink_to("real.safetensors")
    state = _state()
    resumable.load(state, it1, verify="checksum")
    assert torch.equal(state["model"]["w"], torch.arange(64.0))


@pytest.mark.parametrize("chunks, problem", [
    ([{"offsets": [60], "shape": [64]}], "chunk at [60] of shape [64] lies outside [64]"),
    ([{"offsets": [0], "shape": [40]}, {"offsets": [32], "shape": [32]}], "chunks at [0] and [32] overlap"),
    ([{"offsets": [0], "shape": [40]}], "chunks cover 40 of 64 elements"),
])
def test_chunks_out_of_bounds_overlapping_or_missing_are_refused(it1: Path, chunks: list, problem: str) -> None:
    def edit(doc: dict) -> None:
        doc["tensors"]["w"]["chunks"] = [dict(c, stored=[{"file": MODEL, "key": "w"}]) for c in chunks]
    _edit_metadata(it1, edit)
    err = _load_error(it1)
    assert isinstance(err, CorruptCheckpointError)
    assert str(err) == (f"{it1 / 'metadata.json'}: tensor 'w' of shape [64]: {problem}; the checkpoint metadata is "
                        "damaged: restore it or rebuild it from the files (resumable.formats.v2.rebuild_metadata)")


def test_a_dtype_recorded_differently_from_the_file_is_refused_not_reinterpreted(it1: Path) -> None:
    _edit_metadata(it1, lambda doc: doc["tensors"]["w"].update(dtype="int32"))  # same size as float32
    err = _load_error(it1, _state(dtype=torch.int32))
    assert isinstance(err, CorruptCheckpointError)
    assert str(err) == (f"{it1 / MODEL}: key 'w' is F32 of shape [64] in the file but metadata.json records I32 of "
                        "shape [64]; the file and the metadata disagree: restore the file or rebuild metadata.json")


def test_a_stored_shape_larger_than_the_file_data_is_refused(it1: Path) -> None:
    # The header claims 64 000 elements over the 256 bytes of data it holds.
    raw = (it1 / MODEL).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["w"]["shape"] = [64_000]
    forged = json.dumps(header).encode()
    forged += b" " * (-len(forged) % 8)
    (it1 / MODEL).write_bytes(struct.pack("<Q", len(forged)) + forged + raw[8 + n:])
    _reseal(it1)
    err = _load_error(it1)
    assert isinstance(err, CorruptCheckpointError)
    assert str(err) == (f"{it1 / MODEL}: not a valid safetensors file: tensor 'w' spans 256 bytes but F32 of shape "
                        "[64000] needs 256000; the file is truncated or damaged: restore it from a copy or re-save "
                        "the checkpoint")


def test_a_safetensors_header_claiming_gigabytes_is_refused_before_reading_it(it1: Path) -> None:
    raw = (it1 / MODEL).read_bytes()
    (it1 / MODEL).write_bytes(struct.pack("<Q", 50 << 30) + raw[8:])  # "the header is 50 GiB"
    _reseal(it1)
    err = _load_error(it1)
    assert isinstance(err, UnsafeCheckpointError)
    assert str(err) == (f"{it1 / MODEL}: safetensors header length {50 << 30} exceeds the limit of 100000000 bytes; "
                        "refusing to read it (the file is damaged or not a safetensors file)")


def test_a_metadata_shape_of_a_trillion_elements_allocates_nothing(it1: Path) -> None:
    # 4 TB of float32 in files of a few hundred bytes: damage, refused as such (so a resume falls back),
    # before a load compares it with the state or a tool allocates it.
    def edit(doc: dict) -> None:
        doc["tensors"]["w"]["shape"] = [10**12]
        doc["tensors"]["w"]["chunks"][0]["shape"] = [10**12]
    _edit_metadata(it1, edit)
    err = _load_error(it1)
    assert type(err) is CorruptCheckpointError
    size = sum(f["size"] for f in json.loads((it1 / "metadata.json").read_text())["files"].values())
    assert str(err).startswith(f"{it1 / 'metadata.json'}: tensor 'w' of float32 [1000000000000] needs 4000000000000 "
                               f"bytes, more than the {size} bytes of all the files listed; the checkpoint metadata "
                               "is damaged")


class _Payload:
    """Pickles as a call to ``os.system``: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_legacy_ckpt_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "CKP_rank_0-1_2.ckpt"
    torch.save({"w": torch.ones(2), "__metadata__": {"format": "pt"}, "x": _Payload(marker)}, evil)
    assert b"system" in evil.read_bytes()  # the payload really is in the file
    with pytest.raises(UnsafeCheckpointError) as info:
        v1.load_ckpt(evil)
    assert str(info.value).startswith(f"{evil}: refused by weights-only loading (")
    assert str(info.value).endswith("); only tensors and plain values are read from a legacy .ckpt file, never "
                                    "other pickled objects: re-save it with resumable")
    assert not marker.exists()


def test_the_pickle_payload_of_the_test_above_is_real(tmp_path: Path) -> None:
    # The check that refuses it must be what stands between the file and the shell.
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # what a careless loader does
    assert marker.exists()


def test_a_legacy_rank_file_symlinked_outside_the_tree_is_refused(tmp_path: Path) -> None:
    from resumable.legacy import LegacyLoadOptions, LegacySaver, load_legacy, resolve_here, resolve_legacy

    tree = tmp_path / "checkpoint"
    layout = {"world_size": 1, "mesh": None, "pipeline_stages": 1, "sharded_optimizer": False}
    LegacySaver(tree, prefix="CKP", fmt="safetensors", keep_checkpoint_max=None, remove_redundancy=False,
                save_optimizer=True, strategy_dir=tmp_path / "strategy", layout=layout
                ).save({"model": {"w": torch.arange(64.0)}}, 1, 2)
    rank_file = tree / "rank_0" / "CKP_rank_0-1_2.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    rank_file.rename(outside)
    rank_file.symlink_to(outside)
    with pytest.raises(UnsafeCheckpointError) as info:  # refused while resolving, before anything is read
        resolve_legacy(str(tree), True)
    assert str(info.value) == (f"{tree}: epoch 1 step 2 cannot be loaded: {rank_file} resolves outside {tree}; "
                               "refusing to read it (a rank file of a checkpoint must lie inside its checkpoint folder)")
    source = resolve_here(str(tree), True, "safetensors", None, 0)  # the load refuses it too
    state = _state()
    with pytest.raises(UnsafeCheckpointError) as info:
        load_legacy(state, source, LegacyLoadOptions(layout=layout))
    assert str(info.value) == (f"{rank_file} resolves outside {tree}; refusing to read it (a rank file of a "
                               "checkpoint must lie inside its checkpoint folder)")
    assert torch.count_nonzero(state["model"]["w"]) == 0
