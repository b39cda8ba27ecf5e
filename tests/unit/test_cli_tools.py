"""The checkpoint commands on real folders: --help, inspect, verify, diff (exit codes and messages)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from resumable.cli import build_parser, main
from resumable.save import save

COMMANDS = ["train", "inspect", "verify", "diff", "merge", "split", "convert", "list"]


def _state(seed: int = 0, shape: tuple[int, int] = (4, 6)) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return {"model": {"w": w, "b": torch.arange(3, dtype=torch.int64)},
            "optimizer": {"state": {"w": {"exp_avg": torch.randn(shape, generator=g), "step": torch.tensor(2.0)}}},
            "global_step": 2}


@pytest.fixture
def ckpt(tmp_path):
    save(_state(), tmp_path / "ckpt", 1)
    save(_state(1), tmp_path / "ckpt", 2)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_complete_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: resumable {command}")
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"{command}: {action.dest} has no help text"
        for flag in action.option_strings:
            assert flag in text


def test_unknown_command_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as done:
        main(["frobnicate"])
    assert done.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_inspect_json_lists_iterations_latest_and_tensors(ckpt, capsys):
    (ckpt / "iteration_00000003").mkdir()  # a save that never finished
    assert main(["inspect", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "v2" and report["tracker"] == 2 and report["latest"] == 2
    assert [(r["iteration"], r["committed"], r["latest"]) for r in report["iterations"]] == [
        (1, True, False), (2, True, True), (3, False, False)]
    assert report["layout"] == {"world_size": 1, "mesh": None, "pipeline_stages": 1, "writers": 1}
    assert report["common"]["global_step"] == 2
    assert {t["name"]: (t["dtype"], t["shape"], t["chunks"], t["kind"]) for t in report["tensors"]} == {
        "b": ("int64", [3], 1, "model"), "w": ("float32", [4, 6], 1, "model"),
        "optimizer.state.w.exp_avg": ("float32", [4, 6], 1, "opt"), "optimizer.state.w.step": ("float32", [], 1, "opt")}


def test_inspect_tables_mark_the_latest_and_incomplete(ckpt, capsys):
    (ckpt / "iteration_00000003").mkdir()
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "2          iteration_00000002  yes              <- latest" in out
    assert "3          iteration_00000003  NO (incomplete)" in out
    assert "4 tensors, 220 B; 5 files, " in out  # 24 + 96 + 96 + 4 bytes; 2 safetensors, 3 JSON


def test_verify_passes_an_intact_folder(ckpt, capsys):
    assert main(["verify", str(ckpt)]) == 0
    assert capsys.readouterr().out == f"{ckpt}: OK (4 files checked: sizes, whole-file xxh3-64 and per-block checksums; metadata.json and common.json seals)\n"


def _model_file(ckpt, iteration: int = 2):
    folder = ckpt / f"iteration_{iteration:08d}"
    return folder / "CKP-model-0000000-0000001.safetensors"


def test_verify_catches_a_flipped_byte_and_names_the_file(ckpt, capsys):
    path = _model_file(ckpt)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["verify", str(ckpt)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"PROBLEM {path}: xxh3-64 checksum ")
    assert lines[0].endswith("recorded in files.json; the file is damaged: restore it or load another iteration")
    assert lines[1] == f"{ckpt}: 1 problem(s) found (4 files checked: sizes, whole-file xxh3-64 and per-block checksums; metadata.json and common.json seals)"
    assert main(["verify", str(ckpt), "--no-checksum"]) == 0  # same size: only the checksum sees it


def test_verify_catches_a_truncated_file_even_without_checksums(ckpt, capsys):
    path = _model_file(ckpt, 1)
    size = path.stat().st_size
    os.truncate(path, size - 5)
    assert main(["verify", str(ckpt / "iteration_00000001"), "--no-checksum"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"PROBLEM {path}: {size - 5} bytes on disk, files.json records {size}; the file is truncated or was "
        "replaced: restore it or load another iteration",
        f"{ckpt / 'iteration_00000001'}: 1 problem(s) found (2 files checked: sizes and headers (no checksums: "
        "--no-checksum); metadata.json and common.json seals)"]


def test_verify_reports_an_incomplete_iteration_and_a_missing_path(ckpt, tmp_path, capsys):
    (ckpt / "iteration_00000003").mkdir()
    assert main(["verify", str(ckpt)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"PROBLEM {ckpt / 'iteration_00000003'}: incomplete: not a committed checkpoint (no readable "
        "metadata.json); the save that wrote it did not finish: delete it or restore it")
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"PROBLEM {tmp_path / 'nowhere'} does not exist"


def test_diff_is_zero_for_equal_checkpoints_of_different_formats(ckpt, tmp_path, capsys):
    assert main(["merge", str(ckpt), str(tmp_path / "unified"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["diff", str(ckpt), str(tmp_path / "unified")]) == 0
    assert capsys.readouterr().out == f"A={ckpt} B={tmp_path / 'unified'}: 4 equal; context equal (1 key)\n"


def test_diff_reports_every_kind_of_difference(tmp_path, capsys):
    a, b = _state(), _state()
    b["model"]["w"] = a["model"]["w"].clone()
    b["model"]["w"][1, 2] += 0.5
    b["model"]["b"] = torch.arange(4, dtype=torch.int64)                 # shape mismatch
    b["optimizer"]["state"]["w"]["step"] = torch.tensor(2.0, dtype=torch.float64)  # dtype mismatch
    del b["optimizer"]["state"]["w"]["exp_avg"]                           # missing in B
    b["model"]["extra"] = torch.zeros(2)                                  # missing in A
    save(a, tmp_path / "a", 1)
    save(b, tmp_path / "b", 1)
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "shape mismatch   b  (A int64 [3], B int64 [4])",
        "missing in A     extra  (float32 [2])",
        "missing in B     optimizer.state.w.exp_avg  (float32 [4, 6])",
        "dtype mismatch   optimizer.state.w.step  max abs diff 0  (A float32 [], B float64 [])",
        "different        w  max abs diff 0.5 at [1, 2] (A 0.468096, B 0.968096)",
        f"A={tmp_path / 'a'} B={tmp_path / 'b'}: 1 different, 1 dtype mismatch, 1 missing in A, "
        "1 missing in B, 1 shape mismatch; context equal (1 key)"]


def test_errors_name_the_path_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (
        f"resumable inspect: error: {tmp_path / 'nowhere'} does not exist (or is neither a folder nor a file); give "
        "a checkpoint folder, an iteration_* folder, a rank_* tree, a HuggingFace/unified folder or a .safetensors / "
        ".ckpt file\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    save(_state(), tmp_path / "ckpt", 1)
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"resumable merge: error: {tmp_path / 'out'} exists and is not empty; choose a new output folder or "
        "delete it\n")
    assert main(["split", str(tmp_path / "ckpt"), str(tmp_path / "s"), "--layout", "dp=two"]) == 2
    assert capsys.readouterr().err == (
        "resumable split: error: --layout 'dp=two': 'dp=two' is not one of pp=N, dp=N, tp=N with N >= 1 "
        "(e.g. --layout dp=2,tp=2)\n")


def test_verify_says_that_hf_and_mindformers_folders_carry_no_checksums(tmp_path, capsys):
    from safetensors.torch import save_file

    from tests.fixtures.mindformers import build_v2, mf_state
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, str(hf / "model.safetensors"))
    assert main(["verify", str(hf)]) == 0
    assert capsys.readouterr().out == (f"{hf}: OK (1 files checked: sizes and headers only: a HuggingFace folder "
                                       "carries no checksums)\n")
    mf = build_v2(tmp_path / "mf", 12, mf_state(0))
    assert main(["verify", str(mf)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("files checked: sizes and headers only: a MindFormers checkpoint carries no checksums)\n"), out
    assert "checksums)" in out and "xxh3" not in out


def test_split_into_a_folder_with_newer_iterations_refuses_and_keeps_the_tracker(tmp_path, capsys):
    save(_state(), tmp_path / "src", 3)
    save(_state(1), tmp_path / "ckpt", 5)
    capsys.readouterr()
    assert main(["split", str(tmp_path / "src"), str(tmp_path / "ckpt"), "--layout", "dp=1", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"resumable split: error: {tmp_path / 'ckpt'} already holds iterations [5], newer than 3; writing "
        "iteration_00000003 would point the tracker back at it: write into another folder, or pass a larger "
        "--iteration\n")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == [
        "iteration_00000005", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "5\n"


def test_convert_to_legacy_refuses_a_step_older_than_one_already_there(tmp_path, capsys):
    save(dict(_state(), global_step=5, step_num=5), tmp_path / "five", 5)  # named epoch 1 step 5
    save(dict(_state(1), global_step=3, step_num=3), tmp_path / "three", 3)
    legacy = tmp_path / "legacy"
    assert main(["convert", str(tmp_path / "five"), str(legacy), "--to", "legacy", "--quiet"]) == 0
    meta = (legacy / "rank_0" / "meta.json").read_bytes()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "three"), str(legacy), "--to", "legacy", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"resumable convert: error: {legacy / 'rank_0'} already holds later steps (CKP_rank_0-1_5.safetensors) "
        "than epoch 1 step 3; writing it would point meta.json back at it: write into another folder\n")
    assert (legacy / "rank_0" / "meta.json").read_bytes() == meta


def test_verify_checks_the_block_checksums_of_a_unified_export_and_says_so(ckpt, tmp_path, capsys):
    out = tmp_path / "unified"
    assert main(["convert", str(ckpt), str(out), "--to", "unified"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert capsys.readouterr().out.endswith(
        f"sizes, headers and per-block checksums ({len(files)} of {len(files)} safetensors files carry them); a "
        "unified folder carries no whole-file checksums)\n")
    data = bytearray(files[0].read_bytes())
    data[-2] ^= 0x01  # the last tensor's data
    files[0].write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert capsys.readouterr().out.startswith(f"PROBLEM {files[0]}: tensor ")
