"""Checkpoint 1.0 integrity: checksums in meta.json, verify over a whole tree, the resume's fallback, retention.

Real legacy saves (``LegacySaver`` in this process: a one-rank job needs no process
group), hand-damaged files, real resolutions. Multi-rank cases run the trainer in
``tests/distributed/test_legacy_train.py`` and ``tests/e2e/test_legacy_scenarios.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash

from resumable.errors import CorruptCheckpointError
from resumable.formats import v1
from resumable.legacy import LegacySaver, resolve_legacy
from resumable.tools.verify import verify_path
from tests.fixtures.mindformers import build_legacy

WITH = "with checksums (whole-file xxh3-64 in meta.json or per-block; seals)"  # verify's words
LAYOUT = {"world_size": 1, "mesh": None, "pipeline_stages": 1, "sharded_optimizer": False}


def _saver(tree: Path, fmt: str = "safetensors", keep: int | None = None,
           protect: tuple[Path, ...] = ()) -> LegacySaver:
    return LegacySaver(tree, prefix="CKP", fmt=fmt, keep_checkpoint_max=keep, remove_redundancy=False,
                       save_optimizer=True, strategy_dir=tree.parent / "strategy", layout=LAYOUT, protect=protect)


def _save(tree: Path, steps: list[int], fmt: str = "safetensors", keep: int | None = None) -> None:
    saver = _saver(tree, fmt, keep)
    for step in steps:  # 256 KiB of tensor data: several 1 MiB-block checksums would not fit, one does
        saver.save({"model": {"w": torch.arange(65536.0) + step}, "global_step": step}, 1, step)


def _name(step: int, fmt: str = "safetensors") -> str:
    return f"CKP_rank_0-1_{step}.{fmt}"


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------ meta.json


def test_meta_json_records_the_size_and_checksum_of_every_kept_file_and_is_sealed(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4, 6], keep=2)
    folder = tree / "rank_0"
    doc = json.loads((folder / "meta.json").read_text())
    # MindFormers' three keys stay as they were: its readers find the last file as before.
    assert {k: doc[k] for k in ("last_epoch", "last_step", "last_ckpt_file")} == {
        "last_epoch": 1, "last_step": 6, "last_ckpt_file": _name(6)}
    meta = v1.read_meta(folder)
    assert meta is not None and meta.sealed and meta.position == (1, 6)
    # 1_2 was deleted by keep_checkpoint_max after meta.json was written: its record outlives it until the next
    # save (a crash part way through the deletions leaves every victim listed with its step and metric).
    assert sorted(meta.files) == [_name(2), _name(4), _name(6)]
    assert sorted(p.name for p in folder.iterdir()) == [_name(4), _name(6), "meta.json"]
    for name, (size, digest) in meta.files.items():
        if name != _name(2):
            data = (folder / name).read_bytes()
            assert (size, digest) == (len(data), xxhash.xxh3_64_hexdigest(data))
    # Each record carries the global step the state held (no metrics were given).
    assert {n: (note.global_step, dict(note.metrics)) for n, note in meta.notes.items()} == {
        _name(s): (s, {}) for s in (2, 4, 6)}
    assert doc["files"][_name(6)] == {"size": meta.files[_name(6)][0], "xxh3_64": meta.files[_name(6)][1],
                                      "global_step": 6}


def test_a_flipped_byte_or_a_forged_key_in_meta_json_is_refused_naming_the_file(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4])
    path = tree / "rank_0" / "meta.json"
    good = path.read_text()
    path.write_text(good.replace('"last_step": 4', '"last_step": 6'))  # still valid JSON, still plausible
    with pytest.raises(CorruptCheckpointError) as err:
        v1.read_meta(path.parent)
    assert str(err.value).startswith(f"{path}: its seal ")
    assert str(err.value).endswith("does not match its content; the file is damaged: delete it (the newest step "
                                   "complete on the other ranks is then loaded)")
    path.write_text(good.replace('"last_epoch"', '"last_epocj"'))
    with pytest.raises(CorruptCheckpointError) as err:
        v1.read_meta(path.parent)
    assert str(err.value).startswith(f"{path}: keys must be ['last_ckpt_file', 'last_epoch', 'last_step']")


def test_a_ckpt_file_is_checksummed_while_torch_save_writes_it(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2], fmt="ckpt")
    meta = v1.read_meta(tree / "rank_0")
    assert meta is not None
    data = (tree / "rank_0" / _name(2, "ckpt")).read_bytes()
    assert meta.files == {_name(2, "ckpt"): (len(data), xxhash.xxh3_64_hexdigest(data))}


# ------------------------------------------------------------------------------- verify


def test_verify_checks_every_step_of_every_rank_folder_and_names_each_damaged_file(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4, 6])
    (tmp_path / "strategy").mkdir()
    strategy = tmp_path / "strategy" / v1.strategy_file_name(0)
    strategy.write_bytes(v1.strategy_doc(rank=0, world_size=2, layout={**LAYOUT, "world_size": 2},
                                         remove_redundancy=False, tensors={}))
    problems, checked, what = verify_path(tree)
    assert (problems, checked, what) == ([], 5, f"5 {WITH}, 0 sizes only")  # 3 steps, meta.json, strategy
    # Damage the OLDEST step (a resume would not even look at it) and the strategy file.
    rank0 = tree / "rank_0"
    _flip(rank0 / _name(2))
    _truncate(rank0 / _name(4))
    strategy.write_bytes(strategy.read_bytes().replace(b'"rank":0', b'"rank":1'))
    problems, checked, _ = verify_path(tree)
    assert [p.where for p in problems] == [str(rank0 / _name(2)), str(rank0 / _name(4)), str(strategy)]
    assert "meta.json records" in problems[0].message and "damaged" in problems[0].message
    assert "bytes on disk, meta.json records" in problems[1].message
    assert "its seal" in problems[2].message
    done = subprocess.run([sys.executable, "-m", "resumable.cli", "verify", str(tree)], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"PROBLEM {rank0 / _name(2)}: xxh3-64 " in done.stdout
    assert done.stdout.splitlines()[-1] == f"{tree}: 3 problem(s) found (5 files checked: 5 {WITH}, 0 sizes only)"


def test_verify_says_sizes_only_for_a_mindformers_tree_and_still_finds_a_torn_file(tmp_path):
    build_legacy(tmp_path, [[(1, 2, 0), (1, 4, 0)]], [(1, 4)])
    problems, checked, what = verify_path(tmp_path)
    assert (problems, what) == ([], f"0 {WITH}, 3 sizes only (files that carry no checksums, e.g. MindFormers')")
    torn = tmp_path / "rank_0" / "tiny_rank_0-1_2.safetensors"
    os.chmod(torn, 0o600)
    _truncate(torn)
    problems, _, _ = verify_path(tmp_path)
    assert [p.where for p in problems] == [str(torn)]


# ------------------------------------------------------------ which step a resume loads


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_damaged_newest_file_falls_back_to_the_newest_intact_step_with_a_warning(tmp_path, caplog, damage):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4, 6])
    newest = tree / "rank_0" / _name(6)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="resumable.legacy.resolve"):
        found = resolve_legacy(str(tree), True)
    assert (found.position, found.files) == ((1, 4), (f"rank_0/{_name(4)}",))
    assert f"skipping epoch 1 step 6 of {tree}: {newest}: " in caplog.text
    assert "falling back to epoch 1 step 4" in caplog.text
    # Without resume_training (weights only) or with a named step there is no fallback: an error naming the file.
    for resume in (False, _name(6)):
        with pytest.raises(CorruptCheckpointError) as err:
            resolve_legacy(str(tree), resume)
        assert str(err.value).startswith(f"{tree}: epoch 1 step 6 cannot be loaded: {newest}: ")


def test_a_damaged_or_missing_meta_json_bounds_nothing_and_the_files_vouch_for_themselves(tmp_path, caplog):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4, 6])
    meta = tree / "rank_0" / "meta.json"
    meta.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        assert resolve_legacy(str(tree), True).position == (1, 6)  # checked against its block checksums
    assert f"ignoring {meta}: " in caplog.text
    # meta.json gone and a flipped byte in the newest file: its own block checksums still catch it.
    meta.unlink()
    _flip(tree / "rank_0" / _name(6))
    assert resolve_legacy(str(tree), True).position == (1, 4)


def test_a_torn_newest_ckpt_falls_back_and_when_no_step_is_intact_the_error_names_every_try(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4], fmt="ckpt")
    _truncate(tree / "rank_0" / _name(4, "ckpt"))
    assert resolve_legacy(str(tree), True, fmt="ckpt").position == (1, 2)
    _flip(tree / "rank_0" / _name(2, "ckpt"))
    with pytest.raises(CorruptCheckpointError) as err:
        resolve_legacy(str(tree), True, fmt="ckpt")
    assert str(err.value).startswith(f"{tree}: epoch 1 step 2 cannot be loaded: {tree / 'rank_0' / _name(2, 'ckpt')}")
    assert str(err.value).endswith("; no older step complete on every rank is intact either")


# ------------------------------------------------------------------------------ retention


def test_retention_never_follows_a_symlink_neither_a_linked_step_file_nor_a_linked_rank_folder(tmp_path, caplog):
    tree = tmp_path / "checkpoint"
    outside = tmp_path / "elsewhere"
    _save(outside, [1])
    target = outside / "rank_0" / _name(1)
    (tree / "rank_0").mkdir(parents=True)
    (tree / "rank_0" / _name(1)).symlink_to(target)  # the oldest name: would be deleted first if counted
    _save(tree, [2, 4], keep=1)  # the link's name takes the bare prefix: this job writes CKP_rank_0_1-*
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [_name(1), "CKP_rank_0_1-1_4.safetensors",
                                                                    "meta.json"]
    assert target.is_file()
    # A linked rank folder: saves still land there, but nothing in it is deleted.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "rank_0").symlink_to(outside / "rank_0", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        _save(linked, [2, 3], keep=1)
    assert sorted(p.name for p in (outside / "rank_0").iterdir()) == [
        _name(1), "CKP_rank_0_1-1_2.safetensors", "CKP_rank_0_1-1_3.safetensors", "meta.json"]
    assert f"{linked / 'rank_0'} is a symlink; its files are not deleted" in caplog.text


def test_retention_keeps_the_step_resumed_from_and_the_one_meta_json_names(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4])
    resumed = tree / "rank_0" / _name(2)
    saver = _saver(tree, keep=1, protect=(resumed,))  # a new job: prefix suffix _1
    saver.save({"model": {"w": torch.zeros(4)}}, 1, 6)
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [_name(2), "CKP_rank_0_1-1_6.safetensors",
                                                                    "meta.json"]
    # 1_4's record outlives its file until the next save (retention deletes after meta.json is written).
    assert sorted(v1.read_meta(tree / "rank_0").files) == [_name(2), _name(4), "CKP_rank_0_1-1_6.safetensors"]
    saver.save({"model": {"w": torch.zeros(4)}}, 1, 8)
    assert sorted(v1.read_meta(tree / "rank_0").files) == [_name(2), "CKP_rank_0_1-1_6.safetensors",
                                                            "CKP_rank_0_1-1_8.safetensors"]
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [_name(2), "CKP_rank_0_1-1_8.safetensors",
                                                                    "meta.json"]


_CRASH = """
import sys, torch
from pathlib import Path
from resumable.legacy import LegacySaver
tree = Path(sys.argv[1])
saver = LegacySaver(tree, prefix="CKP", fmt="safetensors", keep_checkpoint_max=1, remove_redundancy=False,
                    save_optimizer=True, strategy_dir=tree.parent / "strategy",
                    layout={"world_size": 1, "mesh": None, "pipeline_stages": 1, "sharded_optimizer": False})
saver.save({"model": {"w": torch.arange(65536.0)}, "global_step": 8}, 1, 8)
"""


def test_a_crash_in_the_middle_of_a_legacy_deletion_leaves_a_tree_that_resumes_from_the_newest(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4, 6])
    # keep_checkpoint_max 1 deletes 1_2, 1_4 and 1_6 after saving 1_8: SIGKILL before the second unlink.
    env = {**os.environ, "RESUMABLE_FAULT": "legacy-retention:2"}
    done = subprocess.run([sys.executable, "-c", _CRASH, str(tree)], env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [_name(4), _name(6),
                                                                    "CKP_rank_0_1-1_8.safetensors", "meta.json"]
    assert resolve_legacy(str(tree), True).position == (1, 8)
    assert verify_path(tree)[0] == []


def test_tools_reading_a_legacy_ckpt_tree_refuse_a_flipped_byte_naming_the_file(tmp_path):
    from resumable.sources import open_source

    tree = tmp_path / "checkpoint"
    _save(tree, [2], fmt="ckpt")
    path = tree / "rank_0" / _name(2, "ckpt")
    _flip(path, path.stat().st_size // 2)  # inside the tensor data: torch.load would not notice
    with pytest.raises(CorruptCheckpointError) as err:
        open_source(tree)
    assert str(err.value).startswith(f"{path}: xxh3-64 ")


def test_a_folder_named_like_the_newest_step_is_skipped_by_the_resume_and_never_counted_by_retention(tmp_path):
    tree = tmp_path / "checkpoint"
    _save(tree, [2, 4])
    stray = tree / "rank_0" / _name(6)
    stray.mkdir()
    # Beyond meta.json's step it is no candidate, nothing a resume would have to refuse to bury.
    found = resolve_legacy(str(tree), True)
    assert (found.position, found.newer) == ((1, 4), ())
    (tree / "rank_0" / "meta.json").unlink()  # no bound left: the newest name is tried, and skipped
    found = resolve_legacy(str(tree), True)
    assert found.position == (1, 4) and found.newer == (((1, 6), (f"rank_0/{_name(6)}",)),)
    assert found.skipped[0].startswith(f"epoch 1 step 6: rank file {stray} ")
    _save(tree, [8], keep=1)  # a new job (suffix _1) keeping one file: the stray folder stays, uncounted
    assert sorted(p.name for p in (tree / "rank_0").iterdir()) == [_name(6), "CKP_rank_0_1-1_8.safetensors",
                                                                    "meta.json"]
