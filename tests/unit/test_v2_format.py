"""Checkpoint 2.0 names, metadata.json round trip and validation, rebuild from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v2
from resumable.save import save

FILE = "CKP-model-0000000-0000002.safetensors"
FILE2 = "CKP-model-0000001-0000002.safetensors"


def _doc() -> dict:
    return {
        "format": "resumable-checkpoint", "format_version": 1, "iteration": 7,
        "layout": {"world_size": 2, "mesh": {"tp": 2}, "pipeline_stages": 1, "writers": 2},
        "save_optimizer": False,
        "tensors": {"w": {"dtype": "float32", "shape": [5, 2], "kind": "model", "chunks": [
            {"offsets": [0, 0], "shape": [3, 2], "stored": [{"file": FILE, "key": "w"}]},
            {"offsets": [3, 0], "shape": [2, 2], "stored": [{"file": FILE2, "key": "w"}]}]}},
        "files": {FILE: {"size": 10, "xxh3_64": "0123456789abcdef", "kind": "model", "rank": 0},
                  FILE2: {"size": 11, "xxh3_64": "fedcba9876543210", "kind": "model", "rank": 1}},
    }


FIX = ("; the checkpoint metadata is damaged: restore it or rebuild it from the files "
       "(resumable.formats.v2.rebuild_metadata)")


def test_file_names_follow_the_mindformers_pattern_and_parse_back():
    assert v2.file_name("CKP", "model", 3, 4) == "CKP-model-0000003-0000004.safetensors"
    assert v2.file_name("", "opt", 0, 1) == "opt-0000000-0000001.safetensors"
    assert v2.parse_file_name("my-run-opt-0000001-0000002.safetensors") == ("my-run", "opt", 1, 2)
    assert v2.parse_file_name("model-0000000-0000001.safetensors") == ("", "model", 0, 1)
    assert v2.parse_file_name("CKP-model-0-1.safetensors") is None
    assert v2.chunk_key("w", (0, 4), True) == "w@0,4" and v2.chunk_key("w", (0, 4), False) == "w"


def test_metadata_round_trips_through_json():
    meta = v2.Metadata.from_json(json.dumps(_doc()))
    assert meta.tensors["w"].chunks[1].stored == [v2.Stored(FILE2, "w")]
    assert meta.layout == v2.LayoutMeta(2, {"tp": 2}, 1, 2)
    assert v2.Metadata.from_json(meta.to_json()) == meta
    assert json.loads(meta.to_json()) == _doc()


@pytest.mark.parametrize("bad_name", ["../evil.safetensors", "/etc/passwd", "a/b.safetensors", "..", ""])
def test_metadata_refuses_file_names_outside_the_folder(bad_name: str):
    doc = _doc()
    doc["files"][bad_name] = doc["files"].pop(FILE2)
    doc["tensors"]["w"]["chunks"][1]["stored"][0]["file"] = bad_name
    with pytest.raises(UnsafeCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "/ck/metadata.json")
    assert str(e.value) == (f"/ck/metadata.json: file name {bad_name!r} is not a bare file name inside the "
                            "checkpoint folder; refusing to read outside it (the metadata was edited or forged)")


CHUNK_CASES = {
    "out of bounds": ([((0, 0), (3, 2)), ((3, 0), (3, 2))],
                      "chunk at [3, 0] of shape [3, 2] lies outside [5, 2]"),
    "overlap": ([((0, 0), (3, 2)), ((2, 0), (3, 2))], "chunks at [0, 0] and [2, 0] overlap"),
    "gap": ([((0, 0), (3, 2)), ((4, 0), (1, 2))], "chunks cover 8 of 10 elements"),
}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_metadata_rejects_chunks_that_do_not_tile_the_tensor(case: str):
    boxes, problem = CHUNK_CASES[case]
    doc = _doc()
    for chunk, (offsets, shape) in zip(doc["tensors"]["w"]["chunks"], boxes):
        chunk["offsets"], chunk["shape"] = list(offsets), list(shape)
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "/ck/metadata.json")
    assert str(e.value) == f"/ck/metadata.json: tensor 'w' of shape [5, 2]: {problem}" + FIX


def test_metadata_rejects_unknown_dtype_unlisted_file_and_newer_version():
    doc = _doc()
    doc["tensors"]["w"]["dtype"] = "complex64"
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "m.json")
    assert str(e.value) == "m.json: tensor 'w' has unknown dtype 'complex64'" + FIX
    doc = _doc()
    del doc["files"][FILE2]
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "m.json")
    assert str(e.value) == (f"m.json: tensor 'w' chunk at [3, 0] is stored in {FILE2!r}, which is not listed "
                            "under 'files'" + FIX)
    doc = _doc()
    doc["format_version"] = 2
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "m.json")
    assert str(e.value) == ("m.json: format_version 2 is not supported (this resumable reads up to 1); "
                            "upgrade resumable to load this checkpoint")
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(b"[1]", "m.json")
    assert str(e.value) == "m.json: top level is a JSON list, expected an object" + FIX


def test_metadata_is_rebuilt_exactly_from_the_files_alone(tmp_path: Path):
    state = {"model": {"w": torch.randn(4, 3), "s": torch.tensor(2.0), "h": torch.ones(2, dtype=torch.bfloat16)},
             "optimizer": {"state": {"w": {"exp_avg": torch.zeros(4, 3)}}}, "global_step": 9}
    folder = save(state, tmp_path, 9, prefix="run")
    written = v2.read_metadata(folder)
    rebuilt = v2.rebuild_metadata(folder)
    assert rebuilt == written
    assert rebuilt.files["run-opt-0000000-0000001.safetensors"].kind == "opt"


def test_rebuild_lists_only_the_tensors_the_remaining_files_hold(tmp_path: Path):
    # A deleted file takes its tensors with it: metadata.json, not the files, is what
    # notices a missing file (verify compares the two).
    folder = save({"model": {"w": torch.ones(2)}, "optimizer": {"m": torch.ones(3)}}, tmp_path, 1)
    (folder / "CKP-model-0000000-0000001.safetensors").unlink()
    meta = v2.rebuild_metadata(folder)
    assert sorted(meta.tensors) == ["optimizer.m"]  # what the files alone can prove


def test_common_json_round_trips_and_rejects_non_objects(tmp_path: Path):
    (tmp_path / "common.json").write_bytes(v2.common_bytes({"global_step": 3, "loss_scale": None}))
    assert v2.read_common(tmp_path) == {"global_step": 3, "loss_scale": None}
    (tmp_path / "common.json").write_text("[]")
    with pytest.raises(CorruptCheckpointError) as e:
        v2.read_common(tmp_path)
    assert str(e.value) == f"{tmp_path / 'common.json'}: top level is a JSON list, expected an object"
