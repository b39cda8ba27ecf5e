"""Which checkpoint ``load_checkpoint`` means: tracker, iteration folder, fresh start, errors, fallback.

Checkpoints are written by the real ``resumable.save`` (single process) into tmp folders.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import resumable
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError
from resumable.resolve import resolve_checkpoint, verify_files


def _save(directory: Path, *iterations: int) -> None:
    for it in iterations:
        resumable.save({"model": {"w": torch.full((4, 3), float(it))}, "global_step": it}, directory, it)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    directory = tmp_path / "output" / "checkpoint"
    _save(directory, 100, 200, 300)
    return directory


def test_a_checkpoint_folder_follows_its_tracker(ckpt: Path) -> None:
    r = resolve_checkpoint(ckpt)
    assert (r.path, r.iteration, r.fresh) == (ckpt / "iteration_00000300", 300, False)
    assert r.reason == "latest_checkpointed_iteration.txt names iteration 300"


def test_a_hand_edited_tracker_pointing_at_an_older_iteration_is_obeyed(ckpt: Path) -> None:
    (ckpt / "latest_checkpointed_iteration.txt").write_text("100")
    assert resolve_checkpoint(ckpt).path == ckpt / "iteration_00000100"


def test_an_iteration_folder_loads_that_iteration(ckpt: Path) -> None:
    r = resolve_checkpoint(ckpt / "iteration_00000200")
    assert (r.path, r.iteration, r.reason) == (ckpt / "iteration_00000200", 200, "iteration_00000200 was named explicitly")


def test_without_a_tracker_the_newest_committed_iteration_is_loaded(ckpt: Path) -> None:
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    assert resolve_checkpoint(ckpt).iteration == 300


def test_an_empty_folder_is_a_fresh_start_and_says_so_in_the_log(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger="resumable.resolve"):
        r = resolve_checkpoint(empty)
    assert r.fresh and r.iteration is None
    assert f"fresh start ({empty} holds no checkpoint yet)" in caplog.text


def test_a_folder_holding_only_a_leftover_temp_folder_is_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / ".tmp-iteration_00000100").mkdir(parents=True)
    assert resolve_checkpoint(tmp_path / "ckpt").fresh


def test_a_missing_folder_inside_the_job_output_dir_is_a_fresh_start(tmp_path: Path) -> None:
    r = resolve_checkpoint(tmp_path / "output" / "checkpoint", output_dir=tmp_path / "output")
    assert r.fresh
    assert r.reason == f"{tmp_path / 'output' / 'checkpoint'} does not exist yet (inside the job's output_dir)"


def test_an_empty_load_checkpoint_is_a_fresh_start() -> None:
    assert resolve_checkpoint("").fresh and resolve_checkpoint(None).fresh


def test_a_missing_path_outside_the_output_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(missing, output_dir=tmp_path / "output")
    assert str(info.value) == (
        f"load_checkpoint {missing} does not exist; point it at a checkpoint folder or an iteration_* "
        "folder, or leave it empty to start fresh")


def test_a_tracker_naming_a_missing_iteration_is_an_error(ckpt: Path) -> None:
    (ckpt / "latest_checkpointed_iteration.txt").write_text("150\n")
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(ckpt)
    assert str(info.value) == (
        f"{ckpt / 'latest_checkpointed_iteration.txt'} names iteration 150 but {ckpt / 'iteration_00000150'} "
        "does not exist; committed iterations: [100, 200, 300]. Edit the tracker to one of them, or set "
        "resume_training: true to fall back to the newest valid one")


def test_an_incomplete_iteration_folder_is_never_loaded(ckpt: Path) -> None:
    (ckpt / "iteration_00000300" / "metadata.json").unlink()  # even with common.json and files present
    expected = (f"{ckpt / 'iteration_00000300'} is incomplete (no readable metadata.json): the save that "
                "wrote it did not finish. Load another iteration (committed: [100, 200]) or delete the folder")
    for target in (ckpt, ckpt / "iteration_00000300"):
        with pytest.raises(CorruptCheckpointError) as info:
            resolve_checkpoint(target)
        assert str(info.value) == expected


def test_a_temporary_folder_is_refused(ckpt: Path) -> None:
    temp = ckpt / ".tmp-iteration_00000400"
    temp.mkdir()
    with pytest.raises(CorruptCheckpointError) as info:
        resolve_checkpoint(temp)
    assert str(info.value) == (
        f"{temp} is the temporary folder of an unfinished save or deletion, not a checkpoint; point "
        f"load_checkpoint at a committed iteration_* folder or at {ckpt}")


def test_a_garbage_tracker_is_an_error_without_fallback(ckpt: Path) -> None:
    (ckpt / "latest_checkpointed_iteration.txt").write_text("iteration 300?")
    with pytest.raises(CorruptCheckpointError) as info:
        resolve_checkpoint(ckpt)
    assert str(info.value) == (
        f"{ckpt / 'latest_checkpointed_iteration.txt'}: expected one iteration number, found 'iteration 300?'; "
        "write the iteration to load (e.g. 100) or delete the file to use the newest committed folder")


def test_fallback_skips_a_damaged_target_and_loads_the_newest_valid_iteration(ckpt: Path, caplog) -> None:
    damaged = ckpt / "iteration_00000300"
    victim = next(damaged.glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-4])  # truncated: committed, but not valid
    (ckpt / "iteration_00000200" / "metadata.json").unlink()  # incomplete
    (ckpt / "iteration_00000200" / "common.json").unlink()
    with caplog.at_level(logging.WARNING, logger="resumable.resolve"):
        r = resolve_checkpoint(ckpt, fallback=True)
    assert r.path == ckpt / "iteration_00000100"
    size = victim.stat().st_size
    skipped = (f"iteration_00000300 named by latest_checkpointed_iteration.txt ({victim}: {size} bytes on disk, "
               f"files.json records {size + 4}; the file is truncated or was replaced: restore it or load "
               "another iteration)")
    assert caplog.records[-1].getMessage() == (
        f"resume_training: skipped {skipped}; loading {ckpt / 'iteration_00000100'} instead")


def test_fallback_also_survives_a_garbage_tracker_and_a_missing_target(ckpt: Path, caplog) -> None:
    (ckpt / "latest_checkpointed_iteration.txt").write_text("???")
    assert resolve_checkpoint(ckpt, fallback=True).iteration == 300
    (ckpt / "latest_checkpointed_iteration.txt").write_text("999")
    assert resolve_checkpoint(ckpt, fallback=True).iteration == 300
    assert "iteration_00000999 named by latest_checkpointed_iteration.txt" in caplog.text


def test_fallback_with_nothing_valid_left_is_an_error_listing_what_was_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save(directory, 5)
    shutil.rmtree(directory / "iteration_00000005")
    with pytest.raises(CorruptCheckpointError) as info:
        resolve_checkpoint(directory, fallback=True)
    assert str(info.value) == (
        f"{directory}: no committed and valid iteration to resume from; skipped: iteration_00000005 named by "
        f"latest_checkpointed_iteration.txt ({directory / 'iteration_00000005'} does not exist; committed "
        "iterations in " f"{directory}: []). Restore a checkpoint or clear load_checkpoint to start fresh")


def test_a_folder_of_something_else_is_not_mistaken_for_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "rank_0").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"holds no Checkpoint 2.0 iteration .* \(rank_0\)"):
        resolve_checkpoint(tmp_path)


def test_verify_names_a_missing_file_and_a_file_with_the_wrong_checksum(ckpt: Path) -> None:
    folder = ckpt / "iteration_00000100"
    victim = next(folder.glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum sees it
    victim.write_bytes(bytes(data))
    verify_files(folder)  # sizes still match
    with pytest.raises(CorruptCheckpointError, match=rf"^{victim}: xxh3-64 checksum [0-9a-f]{{16}} differs from "):
        verify_files(folder, checksum=True)
    victim.unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        verify_files(folder)
    assert str(info.value).startswith(f"{victim}: missing; files.json lists it with ")


def test_a_symlinked_iteration_folder_is_refused_when_named_and_skipped_when_not(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "iteration_00000400"
    shutil.copytree(ckpt / "iteration_00000300", outside)
    link = ckpt / "iteration_00000400"
    link.symlink_to(outside)
    with pytest.raises(CorruptCheckpointError) as info:
        resolve_checkpoint(link)
    assert str(info.value) == (
        f"{link} is a symlink (to {outside}), not a committed checkpoint: an iteration folder is never a link (its "
        "files would be read from outside the checkpoint folder, and retention would count and delete through it). "
        "Point load_checkpoint at the folder it links to, or copy that folder in")
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    assert resolve_checkpoint(ckpt).iteration == 300  # never the newest committed
