"""CheckpointManager.start_from: a job never trains on over iterations newer than the one it starts from.

Real saves (single process) into tmp folders; the refusal, the explicit discard and the
one exception (a save killed between its folder rename and its tracker update).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from resumable import CheckpointManager, commit
from resumable.errors import NewerCheckpointsError


def _saved(directory: Path, *iterations: int) -> CheckpointManager:
    mgr = CheckpointManager(directory, keep_checkpoint_max=None)
    for it in iterations:
        mgr.save({"model": {"w": torch.full((2,), float(it))}, "global_step": it}, it)
    return mgr


def test_newer_iterations_are_refused_naming_them_and_what_the_resume_skipped(tmp_path: Path) -> None:
    mgr = _saved(tmp_path, 2, 4, 6)
    (tmp_path / commit.iteration_dirname(8)).mkdir()  # damaged (no metadata.json): still the user's
    with pytest.raises(NewerCheckpointsError) as info:
        mgr.start_from(2, skipped=["iteration_00000006 (a checksum differs)"])
    assert str(info.value) == (
        f"{tmp_path} holds 3 iteration(s) newer than step 2 this job starts from: iteration_00000004, "
        "iteration_00000006, iteration_00000008. Training on would write over them (and retention could delete "
        "them). This resume skipped: iteration_00000006 (a checksum differs). To keep them, resume from them "
        "(repair or restore what is damaged) or save elsewhere; to discard them, set "
        "callbacks.0.discard_newer_checkpoints: true (library: start_from(..., discard_newer=True))")
    assert commit.iterations_after(tmp_path, 0) == [2, 4, 6, 8] and commit.read_tracker(tmp_path) == 6
    assert mgr.start_from(6 + 2) == []  # nothing above 8
    mgr.close()


def test_a_long_list_of_newer_iterations_is_summarised(tmp_path: Path) -> None:
    mgr = _saved(tmp_path, 1)
    for it in range(2, 10):  # damaged or not, each is the user's: listed, the first five by name
        (tmp_path / commit.iteration_dirname(it)).mkdir()
    with pytest.raises(NewerCheckpointsError) as info:
        mgr.start_from(1)
    assert str(info.value).startswith(
        f"{tmp_path} holds 8 iteration(s) newer than step 1 this job starts from: iteration_00000002, "
        "iteration_00000003, iteration_00000004, iteration_00000005, iteration_00000006, ... (8 in all; "
        f"resumable inspect {tmp_path}). Training on would write over them")
    mgr.close()


def test_discarding_deletes_the_newer_iterations_and_moves_the_tracker_back(tmp_path: Path) -> None:
    mgr = _saved(tmp_path, 2, 4, 6)
    assert mgr.start_from(2, discard_newer=True) == [4, 6]
    assert commit.iterations_after(tmp_path, 0) == [2] and commit.read_tracker(tmp_path) == 2
    mgr.close()


def test_a_save_killed_before_its_tracker_update_is_redone_not_refused(tmp_path: Path) -> None:
    mgr = _saved(tmp_path, 2, 4)
    commit.write_tracker(tmp_path, 2)
    meta = tmp_path / commit.iteration_dirname(4) / "metadata.json"
    tracker = os.stat(tmp_path / commit.TRACKER).st_mtime_ns
    os.utime(meta, ns=(tracker + 1, tracker + 1))  # as when 4 was renamed in and the job died before the tracker
    assert mgr.start_from(2) == []
    commit.write_tracker(tmp_path, 2)  # written after 4: a user chose 2 by hand
    with pytest.raises(NewerCheckpointsError):
        mgr.start_from(2)
    mgr.close()
