"""A save on a full disk fails with ENOSPC named, commits nothing, and keeps the previous checkpoint.

The disk is real: a 2 MiB tmpfs mounted by the test (we run as root in CI; where mounting
is not allowed the tests skip and say why). A checkpoint of the tiny model takes about
1.3 MB, so the first save fits and the second cannot.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import resumable
from resumable import CheckpointManager, commit
from resumable.errors import SaveError
from resumable.resolve import verify_files

TRACKER = commit.TRACKER


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root and mount permission): "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


ENOSPC = "no space left on the device: free space on that file system (or write to another one) and run again"


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_save_that_fills_the_disk_raises_enospc_and_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    directory = small_disk / "checkpoint"
    mgr = CheckpointManager(directory, keep_checkpoint_max=1)
    mgr.save({"model": {"w": torch.ones(100_000)}, "global_step": 1}, 1)  # 400 kB: fits
    with pytest.raises(SaveError) as info:
        mgr.save({"model": {"w": torch.ones(1_000_000)}, "global_step": 2}, 2)  # 4 MB: cannot
    temp_file = directory / ".tmp-iteration_00000002" / "CKP-model-0000000-0000001.safetensors"
    assert str(info.value) == (f"saving {directory / 'iteration_00000002'} failed on 1 rank(s), nothing was "
                               f"committed: rank 0: {temp_file}: {ENOSPC}")
    # Nothing half-written stays; the previous checkpoint is whole and still the tracker's.
    assert _entries(directory) == [".lock", "iteration_00000001", TRACKER]
    assert commit.read_tracker(directory) == 1
    verify_files(directory / "iteration_00000001", checksum=True)
    # Space is back (the failed temp folder was removed): the next save commits.
    mgr.save({"model": {"w": torch.ones(100_000)}, "global_step": 3}, 3)
    mgr.close()
    assert commit.read_tracker(directory) == 3 and commit.committed_iterations(directory) == [3]


def test_a_disk_full_exactly_at_the_tracker_update_commits_nothing(small_disk: Path) -> None:
    # The folder rename succeeded, then the tracker's temp file cannot be created (no inode
    # left): the new folder must go back out of view, or "nothing was committed" would be false.
    directory = small_disk / "checkpoint"
    mgr = CheckpointManager(directory, keep_checkpoint_max=None)
    mgr.save({"model": {"w": torch.ones(4)}, "optimizer": {"m": torch.ones(4)}}, 1)
    fs = os.statvfs(small_disk)
    used = fs.f_files - fs.f_ffree
    # Save 2 creates 6 inodes before the tracker (temp folder, model and opt files, files.json,
    # common.json, metadata.json): allow exactly those.
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 6}", str(small_disk)], check=True)
    with pytest.raises(SaveError) as info:
        mgr.save({"model": {"w": torch.zeros(4)}, "optimizer": {"m": torch.zeros(4)}}, 2)
    message = str(info.value)
    assert message.startswith(f"committing {directory / 'iteration_00000002'} failed on 1 rank(s), nothing was "
                              f"committed: rank 0: {directory}/.{TRACKER}.tmp-")
    assert message.endswith(f": {ENOSPC}")
    assert _entries(directory) == [".lock", "iteration_00000001", TRACKER]
    assert commit.read_tracker(directory) == 1
    verify_files(directory / "iteration_00000001", checksum=True)


def test_a_disk_full_at_the_tracker_while_resaving_an_iteration_keeps_the_earlier_copy(small_disk: Path) -> None:
    # Saving an iteration that exists (a resume redoing it) sets the old copy aside; when the
    # tracker cannot be written the old copy, the tracker's target, must be back in place.
    directory = small_disk / "checkpoint"
    mgr = CheckpointManager(directory, keep_checkpoint_max=None)
    mgr.save({"model": {"w": torch.ones(4)}, "optimizer": {"m": torch.ones(4)}}, 2)
    before = (directory / "iteration_00000002" / "metadata.json").read_bytes()
    fs = os.statvfs(small_disk)
    subprocess.run(["mount", "-o", f"remount,nr_inodes={fs.f_files - fs.f_ffree + 6}", str(small_disk)], check=True)
    with pytest.raises(SaveError) as info:
        mgr.save({"model": {"w": torch.zeros(4)}, "optimizer": {"m": torch.zeros(4)}}, 2)
    assert str(info.value).startswith(f"committing {directory / 'iteration_00000002'} failed on 1 rank(s), nothing "
                                      f"was committed: rank 0: {directory}/")
    assert str(info.value).endswith(f": {ENOSPC}")
    assert _entries(directory) == [".lock", "iteration_00000002", TRACKER]
    assert commit.read_tracker(directory) == 2
    assert (directory / "iteration_00000002" / "metadata.json").read_bytes() == before
    verify_files(directory / "iteration_00000002", checksum=True)
    state = {"model": {"w": torch.full((4,), 7.0)}}
    resumable.load(state, directory)
    assert torch.equal(state["model"]["w"], torch.ones(4))  # the earlier save's values, not the failed one's


def test_an_async_save_that_fills_the_disk_surfaces_enospc_at_the_next_call(small_disk: Path) -> None:
    directory = small_disk / "checkpoint"
    mgr = CheckpointManager(directory, keep_checkpoint_max=None, async_save=True)
    mgr.save({"model": {"w": torch.ones(100_000)}}, 1)
    mgr.save({"model": {"w": torch.ones(1_000_000)}}, 2)  # returns: the write fails in the background
    with pytest.raises(SaveError) as info:
        mgr.close()
    assert str(info.value).endswith(f": {ENOSPC}") and "rank 0: " in str(info.value)
    assert _entries(directory) == [".lock", "iteration_00000001", TRACKER]
    verify_files(directory / "iteration_00000001", checksum=True)


TINY = ["model.num_hidden_layers=2", "train_dataset.seq_length=32", "parallel_config.data_parallel=1",
        "parallel_config.model_parallel=1", "callbacks.0.save_checkpoint_steps=2", "runner_config.stop_step=4"]


def _train(out: Path, directory: Path, *sets: str) -> subprocess.CompletedProcess:
    # Only the checkpoints go to the small disk: the job's log must still be writable.
    args = [x for kv in [*TINY, f"output_dir={out}", f"callbacks.0.directory={directory}", *sets]
            for x in ("--set", kv)]
    return subprocess.run([sys.executable, "-m", "resumable.train", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_training_stops_or_goes_on_as_on_save_error_says(small_disk: Path, tmp_path: Path, policy: str) -> None:
    directory = small_disk / "checkpoint"
    done = _train(tmp_path / "out", directory, f"callbacks.0.on_save_error={policy}")
    step4 = directory / ".tmp-iteration_00000004"
    enospc = f"rank 0: {step4}/"
    if policy == "raise":  # the job stops with the error, not a hang or a half checkpoint
        assert done.returncode != 0
        assert f"saving {directory / 'iteration_00000004'} failed on 1 rank(s), nothing was committed: " \
               f"{enospc}" in done.stderr and ENOSPC in done.stderr
    else:  # every step trained; the failed save (and the final one, same step) were logged and skipped
        assert done.returncode == 0, done.stderr[-3000:]
        assert "checkpoint save at step 4 failed, training goes on (on_save_error: warn); the newest committed " \
               "checkpoint is unchanged: " in done.stderr and enospc in done.stderr
        assert "trained 4 steps (global step 4)" in done.stdout
    assert _entries(directory) == [".lock", "iteration_00000002", TRACKER]
    assert commit.read_tracker(directory) == 2
    verify_files(directory / "iteration_00000002", checksum=True)


@pytest.mark.parametrize("argv", [["merge"], ["convert", "--to", "hf", "--hf-config", "CONFIG"],
                                  ["split", "--layout", "dp=2"]], ids=lambda a: " ".join(a[:3]))
def test_a_tool_output_that_fills_the_disk_names_the_file_and_leaves_nothing(small_disk: Path, tmp_path: Path,
                                                                            argv: list[str]) -> None:
    from resumable.cli import main

    resumable.save({"model": {"model.embed_tokens.weight": torch.randn(1024, 768)}, "global_step": 1},
                   tmp_path / "src", 1)  # 3 MiB: more than the disk holds
    (tmp_path / "config.json").write_text('{"model_type": "custom"}')  # not Qwen3: its shapes are not checked
    cmd, *options = [str(tmp_path / "config.json") if a == "CONFIG" else a for a in argv]
    done = subprocess.run([sys.executable, "-m", "resumable.cli", cmd, str(tmp_path / "src"), str(small_disk / "out"),
                           *options, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"resumable {cmd}: error: {small_disk}/")
    assert done.stderr.endswith(": no space left on the device: free space on that file system (or write to another "
                                "one) and run again\n")
    assert done.stderr.count("\n") == 1, done.stderr
    # Nothing that looks like an output, no temp folder: the disk is as empty as before (split: its lock only).
    left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*"))
    assert left == (["out", "out/.lock"] if cmd == "split" else []), left
