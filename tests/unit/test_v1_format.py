"""Checkpoint 1.0 on disk: names, prefix suffixes, epoch/step positions, metadata, .ckpt safety, strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats import v1
from resumable.legacy import resolve_here, resolve_legacy


class Payload:
    """A custom class: pickling it into a .ckpt is what weights-only loading must refuse."""

    def __init__(self) -> None:
        self.value = 3


def test_rank_file_names_follow_mindformers_with_prefix_suffixes():
    assert v1.rank_file_name("qwen3", 0, 0, 2, 3, "safetensors") == "qwen3_rank_0-2_3.safetensors"
    assert v1.rank_file_name("qwen3", 1, 2, 3, 4, "ckpt") == "qwen3_rank_1_2-3_4.ckpt"
    with pytest.raises(ValueError) as err:
        v1.rank_file_name("qwen3", 0, 0, 1, 1, "bin")
    assert str(err.value) == "checkpoint_format must be one of ('safetensors', 'ckpt'), got 'bin'"


def test_each_rank_substitutes_its_own_id_into_a_named_step():
    assert v1.substitute_rank("qwen3_rank_0-200_1.safetensors", 1) == "qwen3_rank_1-200_1.safetensors"
    assert v1.substitute_rank("qwen3_rank_3_2-1_5.ckpt", 0) == "qwen3_rank_0_2-1_5.ckpt"
    with pytest.raises(ValueError) as err:
        v1.substitute_rank("rank_0/qwen3_rank_0-200_1.safetensors", 1)
    assert str(err.value) == (
        "resume_training: 'rank_0/qwen3_rank_0-200_1.safetensors' is not a legacy checkpoint file name; expected a "
        "bare name like qwen3_rank_0-200_1.safetensors ({prefix}_rank_{rank}[_{k}]-{epoch}_{step}.{safetensors|ckpt})")


@pytest.mark.parametrize("names, expected", [
    ([], 0),
    (["meta.json", "other_rank_0-1_1.ckpt"], 0),
    (["q_rank_0-1_1.ckpt"], 1),                                   # the bare prefix counts as 0
    (["q_rank_0-1_1.ckpt", "q_rank_0_1-1_2.safetensors"], 2),
    (["q_rank_0_3-1_2.ckpt", "q_rank_1_7-1_2.ckpt"], 4),          # another rank's file does not count
])
def test_a_new_job_takes_one_more_than_the_largest_suffix_seen(names, expected):
    assert v1.next_suffix(names, "q", 0) == expected


def test_name_positions_are_one_based_epoch_and_step_in_epoch_in_training_order():
    # 3 steps per epoch: the trainer's (epochs done, steps done in epoch) after each step.
    after = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    names = [v1.name_position(e, s, 3) for e, s in after]
    assert names == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert names == sorted(names)


def test_file_metadata_round_trips_and_names_the_file_when_missing():
    meta = v1.file_metadata({"w@0,2": ("w", [4, 4], (0, 2))}, rank=1, layout={"world_size": 2},
                            remove_redundancy=True, context={"state": {"global_step": 3}, "rank_local": None})
    assert meta["format"] == "pt" and meta["remove_redundancy"] == "True"
    info = v1.parse_file_metadata(meta, "f.safetensors")
    assert info == v1.FileInfo({"w@0,2": ("w", (4, 4), (0, 2))}, 1, {"world_size": 2}, True,
                               {"state": {"global_step": 3}, "rank_local": None})
    with pytest.raises(CorruptCheckpointError) as err:
        v1.parse_file_metadata({"format": "ms"}, "x.safetensors")
    assert str(err.value) == (
        "x.safetensors: no 'resumable_legacy' entry in the file's metadata, so it was not written by resumable's "
        "Checkpoint 1.0; MindFormers legacy checkpoints are read with resumable.formats.mindformers")


def test_ckpt_round_trip_is_weights_only(tmp_path):
    path = tmp_path / "a.ckpt"
    v1.save_ckpt(path, {"w": torch.arange(6.0).reshape(2, 3), "global_step": torch.tensor(7)}, {"format": "pt"})
    tensors, meta = v1.load_ckpt(path)
    assert meta == {"format": "pt"}
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and tensors["global_step"].item() == 7


def test_a_ckpt_carrying_a_pickled_object_is_refused_and_never_unpickled(tmp_path):
    path = tmp_path / "evil_rank_0-1_1.ckpt"
    torch.save({"w": torch.ones(2), "extra": Payload(), "__metadata__": {"format": "pt"}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        v1.load_ckpt(path)
    assert str(err.value) == (
        f"{path}: refused by weights-only loading (Unsupported global: GLOBAL {__name__}.Payload was not an allowed "
        "global by default); only tensors and plain values are read from a legacy .ckpt file, never other "
        "pickled objects: re-save it with resumable")


def test_a_truncated_ckpt_is_reported_as_damaged(tmp_path):
    path = tmp_path / "a.ckpt"
    v1.save_ckpt(path, {"w": torch.ones(64)}, {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError) as err:
        v1.load_ckpt(path)
    assert str(err.value).startswith(f"{path}: not a readable legacy .ckpt file (")
    assert str(err.value).endswith("the file is truncated or damaged")


def test_strategy_files_are_json_and_checked(tmp_path):
    doc = v1.strategy_doc(rank=0, world_size=2, layout={"mesh": {"tp": 2}}, remove_redundancy=False, tensors={
        "w": {"dtype": "float32", "global_shape": [4, 2], "kind": "model", "mesh": None, "placements": None,
              "chunks": [{"offsets": [0, 0], "shape": [2, 2], "local": [[0, 2], [0, 2]], "stored": True}]}})
    (tmp_path / "ckpt_strategy_rank_0.ckpt").write_bytes(doc)
    assert v1.read_strategy(tmp_path / "ckpt_strategy_rank_0.ckpt")["tensors"]["w"]["global_shape"] == [4, 2]
    assert v1.strategy_files(tmp_path) == {0: tmp_path / "ckpt_strategy_rank_0.ckpt"}
    bad = tmp_path / "ckpt_strategy_rank_1.ckpt"
    bad.write_text(json.dumps({"format": "resumable-strategy", "rank": 1, "world_size": 2, "layout": {},
                               "tensors": {"w": {"global_shape": [4, 2], "chunks": [{"offsets": [0], "shape": [2]}]}}}))
    with pytest.raises(CorruptCheckpointError) as err:
        v1.read_strategy(bad)
    assert str(err.value) == (f"{bad}: tensor 'w', chunk 0: 'offsets' must be a list of 2 integers in [0, {2**63 - 1}], "
                              "got [0]; the file is damaged: restore it from a copy or use another checkpoint")
    with pytest.raises(CheckpointNotFoundError) as err:
        v1.strategy_files(tmp_path / "nope")
    assert str(err.value) == (f"src_strategy_path_or_dir {tmp_path / 'nope'} does not exist; point it at the source "
                              "job's <output_dir>/strategy folder or one of its ckpt_strategy_rank_*.ckpt")


# ----------------------------------------------------- which step resume_training: true loads


def _tree(root: Path, files: dict[int, list[str]], metas: dict[int, str]) -> None:
    for rank, names in files.items():
        folder = root / f"rank_{rank}"
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"x")
        if rank in metas:
            e, s = metas[rank].split("-")[1].split(".")[0].split("_")
            (folder / "meta.json").write_bytes(v1.meta_bytes(int(e), int(s), metas[rank], {}))


def test_resume_skips_a_step_missing_on_one_rank_and_one_beyond_a_meta_json(tmp_path):
    # Rank 1 never finished 1_6 (no file); rank 0's 1_8 is partial (its meta.json still says 1_6).
    _tree(tmp_path, {0: ["C_rank_0-1_4.ckpt", "C_rank_0-1_6.ckpt", "C_rank_0-1_8.ckpt"],
                     1: ["C_rank_1-1_4.ckpt", "C_rank_1-1_8.ckpt"]},
          {0: "C_rank_0-1_6.ckpt", 1: "C_rank_1-1_8.ckpt"})
    found = resolve_here(str(tmp_path), True, "ckpt", None, 0)  # the choice; resolve_legacy then checks the files
    assert found.position == (1, 4)
    assert found.files == ("rank_0/C_rank_0-1_4.ckpt", "rank_1/C_rank_1-1_4.ckpt")


def test_without_meta_json_the_newest_step_on_every_rank_wins_by_name_not_mtime(tmp_path):
    _tree(tmp_path, {0: ["C_rank_0-2_1.safetensors", "C_rank_0-1_10.safetensors"],
                     1: ["C_rank_1-1_10.safetensors", "C_rank_1-2_1.safetensors", "C_rank_1-1_9.safetensors"]}, {})
    (tmp_path / "rank_0" / "C_rank_0-1_10.safetensors").touch()  # the newest mtime, an older step
    found = resolve_here(str(tmp_path), True, "safetensors", None, 0)
    assert found.position == (2, 1)


def test_an_empty_folder_or_a_missing_one_inside_output_dir_is_a_fresh_start(tmp_path):
    assert resolve_legacy(str(tmp_path), True).fresh
    assert resolve_legacy(str(tmp_path / "out" / "checkpoint"), True, output_dir=str(tmp_path / "out")).fresh
    with pytest.raises(CheckpointNotFoundError) as err:
        resolve_legacy(str(tmp_path / "elsewhere"), True, output_dir=str(tmp_path / "out"))
    assert str(err.value) == (f"load_checkpoint {tmp_path / 'elsewhere'} does not exist; point it at a folder of "
                              "rank_* folders or one full checkpoint file, or leave it empty to start fresh")
