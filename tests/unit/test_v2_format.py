"""Checkpoint 2.0 names, metadata.json round trip and validation, rebuild from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resumable.errors import CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v2
from resumable.geometry import Box
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
        "files": {FILE: {"size": 100, "xxh3_64": "0123456789abcdef", "kind": "model", "rank": 0},
                  FILE2: {"size": 110, "xxh3_64": "fedcba9876543210", "kind": "model", "rank": 1}},
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
    # Written back it is format version 3: the file table moves to files.json, sealed by size and checksum,
    # and metadata.json ends with a seal of its own bytes.
    again = v2.Metadata.from_json(meta.to_json(), files=meta.files_json().encode())
    assert (again.tensors, again.files, again.layout, again.format_version) == (meta.tensors, meta.files,
                                                                                 meta.layout, 3)
    assert v2.check_seal(meta.to_json(), "m.json")
    doc = json.loads(meta.to_json())
    assert doc["files"]["table"] == "files.json" and doc["files"]["count"] == 2
    # An irregular split stays listed; a key equal to the tensor name is left out.
    assert doc["tensors"]["w"]["chunks"][1] == {"offsets": [3, 0], "shape": [2, 2], "stored": [{"file": FILE2}]}


def test_a_listed_copy_spells_out_only_a_key_it_cannot_derive():
    doc = _doc()
    chunks = doc["tensors"]["w"]["chunks"]
    chunks[0]["stored"][0]["key"], chunks[1]["stored"][0]["key"] = "w@0,0", "other"
    meta = v2.Metadata.from_json(json.dumps(doc))
    written = json.loads(meta.to_json())["tensors"]["w"]["chunks"]
    assert [c["stored"] for c in written] == [[{"file": FILE, "key": "@"}], [{"file": FILE2, "key": "other"}]]
    again = v2.Metadata.from_json(meta.to_json(), files=meta.files_json().encode())
    assert [c.stored[0].key for c in again.tensors["w"].chunks] == ["w@0,0", "other"]


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
    doc["format_version"] = 4
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "m.json")
    assert str(e.value) == ("m.json: format_version 4 is not supported (this resumable reads up to 3); "
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
    # The files record chunks, not placements: the rebuilt metadata lists the same chunks and copies.
    assert rebuilt.files == written.files and sorted(rebuilt.tensors) == sorted(written.tensors)
    for name, t in written.tensors.items():
        assert (rebuilt.tensors[name].dtype, rebuilt.tensors[name].shape) == (t.dtype, t.shape)
        assert rebuilt.stored(name) == written.stored(name)
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
    assert str(e.value) == (f"{tmp_path / 'common.json'}: top level is a JSON list, expected an object; the file is "
                            "damaged: restore it from a copy or use another checkpoint")


def _grid_doc(world: int = 4) -> tuple[dict, dict]:
    files = {v2.file_name("CKP", "model", r, world): {"size": 100, "xxh3_64": "0" * 16, "kind": "model", "rank": r}
             for r in range(world)}
    table = {"format": "resumable-files", "files": files}
    doc = {"format": "resumable-checkpoint", "format_version": 2, "iteration": 1,
           "layout": {"world_size": world, "mesh": {"dp": world}, "pipeline_stages": 1, "writers": world},
           "save_optimizer": False, "meshes": [{"shape": [world], "ranks_range": [0, world, 1]}],
           "tensors": {"w": {"dtype": "float32", "shape": [10, 3], "kind": "model", "mesh": 0,
                             "placements": [["S", 0]]}}}
    return doc, table


def _parse(doc: dict, table: dict) -> v2.Metadata:
    files = json.dumps(table).encode()
    import xxhash
    doc["files"] = {"table": "files.json", "count": len(table["files"]), "size": len(files),
                    "xxh3_64": xxhash.xxh3_64_hexdigest(files)}
    return v2.Metadata.from_json(json.dumps(doc), "/ck/metadata.json", files)


def test_a_grid_tensor_gives_its_chunks_by_torch_chunk_rules_and_the_files_of_their_ranks():
    meta = _parse(*_grid_doc())
    # 10 rows over 4 ranks: 3, 3, 3, 1 (torch.chunk), each in its rank's file under the tensor name.
    assert [(b.offsets, b.shape, [s.file for s in c]) for b, c in meta.stored("w")] == [
        ((r * 3, 0), (3 if r < 3 else 1, 3), [v2.file_name("CKP", "model", r, 4)]) for r in range(4)]
    assert [b.offsets for b, _ in meta.stored("w", Box((2, 0), (2, 3)))] == [(0, 0), (3, 0)]
    assert meta.chunk_count("w") == 4


def test_a_grid_with_replicas_and_an_owner_names_one_copy_per_chunk():
    doc, table = _grid_doc(4)
    doc["meshes"] = [{"shape": [2, 2], "ranks": [0, 1, 2, 3]}]
    doc["tensors"]["w"]["placements"] = [["R"], ["S", 0]]
    every = _parse(doc, table)
    assert [[s.file[10:17] for s in c] for _, c in every.stored("w")] == [["0000000", "0000002"],
                                                                        ["0000001", "0000003"]]
    doc["tensors"]["w"]["owner"] = 1
    owned = _parse(doc, table)
    assert [[s.file[10:17] for s in c] for _, c in owned.stored("w")] == [["0000002"], ["0000001"]]


GRID_CASES = {
    "mesh index": (lambda d, t: d["tensors"]["w"].update(mesh=3), "tensor 'w' names mesh 3; 'meshes' has 1"),
    "placement dim": (lambda d, t: d["tensors"]["w"].update(placements=[["S", 2]]),
                      "tensor 'w': placement ['S', 2] is not [\"R\"], [\"S\", dim] or [\"SS\", dim, split_factor] "
                      "for 2 dims"),
    "placement count": (lambda d, t: d["tensors"]["w"].update(placements=[["S", 0], ["R"]]),
                        "tensor 'w': placements [['S', 0], ['R']] must be a list of 1 entries (one per mesh dim)"),
    "ranks count": (lambda d, t: d["meshes"][0].update(ranks_range=[0, 3, 1]),
                    "mesh 0: ranks_range gives 3 ranks for a mesh of 4 positions"),
    "duplicate ranks": (lambda d, t: d["meshes"].__setitem__(0, {"shape": [4], "ranks": [0, 1, 1, 2]}),
                        "mesh 0: 4 ranks (distinct: 3) for a mesh of 4 positions"),
    "absurd mesh": (lambda d, t: d["meshes"].__setitem__(0, {"shape": [10**12], "ranks_range": [0, 10**12, 1]}),
                    "mesh 0 has 1000000000000 positions, more than the 4 ranks that saved"),
    "rank out of the job": (lambda d, t: d["meshes"].__setitem__(0, {"shape": [4], "ranks": [0, 1, 2, 9]}),
                            "mesh 0: rank 9 is not one of the 4 ranks that saved"),
}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_a_forged_grid_is_refused_naming_the_tensor_or_mesh(case: str):
    edit, problem = GRID_CASES[case]
    doc, table = _grid_doc()
    edit(doc, table)
    with pytest.raises(CorruptCheckpointError) as e:
        _parse(doc, table)
    assert str(e.value) == f"/ck/metadata.json: {problem}" + FIX


def test_a_files_table_that_does_not_match_its_seal_or_is_missing_is_refused():
    doc, table = _grid_doc()
    good = json.dumps(table).encode()
    _parse(doc, table)
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "/ck/metadata.json", good.replace(b'"size": 100', b'"size": 200', 1))
    assert str(e.value) == ("/ck/metadata.json: files.json does not match the size and checksum recorded in "
                            "metadata.json" + FIX)
    with pytest.raises(CorruptCheckpointError) as e:
        v2.Metadata.from_json(json.dumps(doc), "/ck/metadata.json", None)
    assert str(e.value) == ("/ck/metadata.json: files.json is missing (format version 2 keeps the file table "
                            "there)" + FIX)


def test_a_grid_tensor_stored_by_a_rank_without_a_file_is_refused_when_read():
    doc, table = _grid_doc()
    del table["files"][v2.file_name("CKP", "model", 2, 4)]
    meta = _parse(doc, table)
    with pytest.raises(CorruptCheckpointError, match="stored by rank 2, but files.json lists no model file"):
        meta.stored("w")


def test_a_checkpoint_in_format_version_1_still_loads(tmp_path: Path):
    from resumable.load import load
    from tests.format1 import downgrade

    folder = save({"model": {"w": torch.arange(6.0).reshape(2, 3)}}, tmp_path, 1)
    assert downgrade(folder)["format_version"] == 1
    target = {"model": {"w": torch.zeros(2, 3)}}
    load(target, folder, verify="checksum")
    assert torch.equal(target["model"]["w"], torch.arange(6.0).reshape(2, 3))
